"""The command line end to end on a small synthetic set, and each bad-input case."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from recvae_fast.cli import main

TINY_TRAIN = ["--epochs", "2", "--hidden-dim", "16", "--latent-dim", "8", "--batch-size", "64",
              "--no-progress", "--heldout-users", "40"]


@pytest.fixture(scope="module")
def ratings_file(tmp_path_factory):
    """A MovieLens-style ratings.csv with 300 users and string-free integer ids."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "ratings.csv"
    with open(path, "w") as f:
        f.write("userId,movieId,rating,timestamp\n")
        for user in range(300):
            taste = user % 3
            items = rng.choice(np.arange(taste * 40, taste * 40 + 60), size=rng.integers(6, 25), replace=False)
            for item in items:
                f.write(f"{1000 + user},{5000 + item},{rng.choice([3.0, 4.0, 5.0])},{978300760}\n")
    return path


@pytest.fixture(scope="module")
def trained_run(ratings_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", str(ratings_file), "--rating-threshold", "3.5", "--out", str(out), *TINY_TRAIN]) == 0
    return out


def test_train_writes_a_complete_run(trained_run):
    for name in ("model.pt", "checkpoint.pt", "items.json", "users.json", "split.npz", "run.json", "metrics.jsonl",
                 "summary.json"):
        assert (trained_run / name).exists(), name
    summary = json.loads((trained_run / "summary.json").read_text())
    assert set(summary["test"]) >= {"ndcg@100", "recall@20", "recall@50"}
    assert 0 <= summary["test"]["ndcg@100"] <= 1
    assert len((trained_run / "metrics.jsonl").read_text().splitlines()) == 2
    items = json.loads((trained_run / "items.json").read_text())
    assert all(5000 <= int(i) < 5200 for i in items)


def test_evaluate_reports_the_saved_test_metrics(trained_run, capsys):
    assert main(["evaluate", str(trained_run)]) == 0
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((trained_run / "summary.json").read_text())
    assert printed["test"]["ndcg@100"] == pytest.approx(summary["test"]["ndcg@100"])


def _ratings_by_user(ratings_file, above=None) -> dict:
    seen = {}
    for r in csv.DictReader(open(ratings_file)):
        if above is None or float(r["rating"]) > above:
            seen.setdefault(r["userId"], set()).add(r["movieId"])
    return seen


def test_recommend_writes_original_ids_without_seen_items(trained_run, ratings_file, tmp_path):
    """Seen means every interaction of the user in the file, whatever its rating (also the ones at or
    below the run's --rating-threshold, which the model's input leaves out)."""
    out = tmp_path / "recs.csv"
    assert main(["recommend", str(trained_run), str(ratings_file), "--k", "5", "--output", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    seen = _ratings_by_user(ratings_file)
    assert any(seen[u] - above for u, above in _ratings_by_user(ratings_file, 3.5).items())  # the rule matters
    per_user = {}
    for r in rows:
        per_user.setdefault(r["user"], []).append(r)
        assert r["item"] not in seen[r["user"]]
        assert 1000 <= int(r["user"]) < 1300 and 5000 <= int(r["item"]) < 5200
    assert all([int(r["rank"]) for r in recs] == list(range(1, len(recs) + 1)) for recs in per_user.values())
    assert all(len(recs) == 5 for recs in per_user.values())
    first = per_user[next(iter(per_user))]
    assert [float(r["score"]) for r in first] == sorted((float(r["score"]) for r in first), reverse=True)


def test_recommend_without_data_uses_the_runs_own(trained_run, ratings_file, tmp_path, capsys):
    out = tmp_path / "recs.csv"
    assert main(["recommend", str(trained_run), "--k", "3", "--output", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["data"] == str(ratings_file.resolve())
    assert {r["user"] for r in csv.DictReader(open(out))} == set(_ratings_by_user(ratings_file))  # not synthetic


def test_resume_continues_a_run_with_its_own_data_and_settings(ratings_file, tmp_path):
    """The README's resume line: no data flags repeated. Also with the row-sparse fc1 gradient,
    whose RowSparseAdam state the checkpoint carries."""
    args = ["train", str(ratings_file), "--rating-threshold", "3.5", "--out", str(tmp_path), "--fc1-grad", "row-sparse"]
    assert main(args + [a if a != "2" else "1" for a in TINY_TRAIN]) == 0
    assert main(["train", "--out", str(tmp_path), "--resume", "--epochs", "2", "--no-progress"]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["fc1_grad"] for r in records] == ["row-sparse", "row-sparse"]
    assert json.loads((tmp_path / "run.json").read_text())["config"]["n_epochs"] == 2


def _bad(tmp_path, content: str, name="bad.csv"):
    path = tmp_path / name
    path.write_text(content)
    return str(path)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda t, r: ["train", str(t / "missing.csv"), "--out", str(t / "o")], "not found"),
        (lambda t, r: ["train", _bad(t, "a,b,c\n1,2,3\n"), "--user-col", "user", "--out", str(t / "o")], "user"),
        (lambda t, r: ["train", _bad(t, "userId,movieId,rating\n1,2,abc\n"), "--out", str(t / "o")], "abc"),
        (lambda t, r: ["train", _bad(t, "userId,movieId,rating\n1,2,nan\n"), "--out", str(t / "o")], "finite"),
        (lambda t, r: ["train", _bad(t, "userId,movieId,rating\n1,2,1\n1,3,1\n"), "--rating-threshold", "3.5",
                       "--out", str(t / "o")], "empty"),
        (lambda t, r: ["recommend", str(r), "--k", "100000", "--output", str(t / "x.csv")], "larger than the catalogue"),
        (lambda t, r: ["recommend", str(r), "--k", "0", "--output", str(t / "x.csv")], "positive"),
        (lambda t, r: ["evaluate", str(t)], "not a finished training run"),
        (lambda t, r: ["train", "--out", str(t / "o"), "--batch-size", "0"], "batch_size"),
    ],
)
def test_bad_input_exits_with_one_clear_line(make_args, message, tmp_path, trained_run, capsys):
    code = main(make_args(tmp_path, trained_run))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert message.lower() in err.lower(), err


def test_console_script_runs_without_a_traceback(tmp_path):
    """The installed entry point, as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "recvae_fast.cli", "train", str(tmp_path / "nope.csv"), "--out", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("recvae-fast: error:") and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- validation before writing


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flags, message", [
    (["--lr", "inf"], "lr must be a finite"),
    (["--gamma", "nan"], "gamma must be a finite"),
    (["--beta", "inf"], "beta must be a finite"),
    (["--dropout-rate", "1"], "dropout_rate"),
    (["--seed", "-1"], "seed must be an integer >= 0"),
    (["--heldout-users", "0"], "--heldout-users must be >= 1"),
    (["--min-items", "0"], "--min-items must be >= 1"),
    (["--epochs", "0"], "n_epochs must be a positive"),
    (["--batch-size", "0"], "batch_size must be a positive"),
    (["--patience", "0"], "--patience must be >= 1"),
    (["--rating-threshold", "nan"], "--rating-threshold must be a finite"),
    (["--device", "foo"], "not a device name"),
    (["--device", "cuda:99"], "cuda"),
])
def test_bad_flags_are_refused_before_anything_is_written(flags, message, ratings_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(ratings_file), "--out", str(out), "--no-progress", *flags]) == 2
    assert message.lower() in _error_line(capsys).lower()
    assert not out.exists()


def test_out_that_is_a_file_is_refused(ratings_file, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(["train", str(ratings_file), "--out", str(tmp_path / "file")]) == 2
    assert "is not a folder" in _error_line(capsys)
    assert (tmp_path / "file").read_text() == "mine"


def _snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


@pytest.fixture
def run_copy(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


@pytest.mark.parametrize("extra, message", [
    (["--resume", "--seed", "1"], "--seed 1"),
    (["--resume", "--heldout-users", "10"], "--heldout-users 10"),
    (["--resume", "--rating-threshold", "4"], "--rating-threshold 4"),
    (["--resume", "--lr", "0.1"], "--lr 0.1"),
    (["--resume", "OTHER"], "data"),
    (["--epochs", "0"], "n_epochs"),
    ([], "already holds a run"),
])
def test_rejected_train_leaves_the_run_folder_as_it_was(extra, message, run_copy, ratings_file, tmp_path, capsys):
    other = tmp_path / "other.csv"
    other.write_text(ratings_file.read_text())
    before = _snapshot(run_copy)
    data = [str(other)] if "OTHER" in extra else [str(ratings_file)] if "--resume" not in extra else []
    flags = [f for f in extra if f != "OTHER"]
    assert main(["train", *data, "--out", str(run_copy), "--no-progress", *flags]) == 2
    assert message.lower() in _error_line(capsys).lower()
    assert _snapshot(run_copy) == before
    assert main(["evaluate", str(run_copy)]) == 0  # still a usable run


def test_resume_refuses_a_data_file_that_changed(run_copy, ratings_file, tmp_path, capsys):
    changed = tmp_path / "ratings.csv"
    changed.write_text(ratings_file.read_text() + "1000,5001,5.0,978300760\n1000,5002,5.0,978300760\n")
    description = json.loads((run_copy / "run.json").read_text())
    description["source"] = str(changed)
    (run_copy / "run.json").write_text(json.dumps(description))
    before = _snapshot(run_copy)
    assert main(["train", "--out", str(run_copy), "--resume", "--epochs", "3"]) == 2
    assert "no longer what" in _error_line(capsys)
    assert _snapshot(run_copy) == before


# ----------------------------------------------------------------------------- unsafe and corrupt files


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("target, command", [
    ("model.pt", lambda run, out: ["evaluate", str(run)]),
    ("model.pt", lambda run, out: ["recommend", str(run), "--k", "3", "--output", str(out)]),
    ("checkpoint.pt", lambda run, out: ["train", "--out", str(run), "--resume", "--epochs", "3", "--no-progress"]),
])
def test_a_pickle_payload_in_a_run_folder_never_runs(target, command, run_copy, tmp_path, capsys):
    import torch

    marker = tmp_path / "pwned"
    torch.save({"decoder.weight": _Payload(marker), "format": 2}, run_copy / target)
    assert main(command(run_copy, tmp_path / "recs.csv")) == 2
    assert f"{target} is corrupt, truncated or not a safe tensor file" in _error_line(capsys)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_a_damaged_model_file_gives_one_line_naming_it(damage, run_copy, capsys):
    path = run_copy / "model.pt"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 3], "empty": b"", "garbage": os.urandom(len(data))}[damage])
    assert main(["evaluate", str(run_copy)]) == 2
    assert "model.pt is corrupt, truncated" in _error_line(capsys)


def test_damaged_json_and_split_files_give_one_line_naming_them(run_copy, capsys):
    (run_copy / "items.json").write_text("[1, 2,")
    assert main(["evaluate", str(run_copy)]) == 2
    assert "items.json is not valid JSON" in _error_line(capsys)
    shutil.copy(run_copy / "run.json", run_copy / "items.json")
    assert main(["evaluate", str(run_copy)]) == 2
    assert "items.json: expected a JSON list of item ids" in _error_line(capsys)


def test_damaged_split_gives_one_line_naming_it(run_copy, capsys):
    (run_copy / "split.npz").write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["evaluate", str(run_copy)]) == 2
    assert "split.npz is not a readable .npz archive" in _error_line(capsys)


# ----------------------------------------------------------------------------- recommend's output, errors


def test_recommend_output_may_not_overwrite_an_input_or_be_a_folder(trained_run, ratings_file, tmp_path, capsys):
    before = ratings_file.read_bytes()
    assert main(["recommend", str(trained_run), str(ratings_file), "--output", str(ratings_file)]) == 2
    assert "would overwrite an input" in _error_line(capsys)
    assert ratings_file.read_bytes() == before
    assert main(["recommend", str(trained_run), "--output", str(trained_run / "model.pt")]) == 2
    assert "would overwrite an input" in _error_line(capsys)
    assert main(["recommend", str(trained_run), "--output", str(tmp_path)]) == 2
    assert "is a folder" in _error_line(capsys)


def test_an_unexpected_error_is_a_bug_and_keeps_its_traceback(trained_run, monkeypatch):
    from recvae_fast import cli

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "evaluate", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["evaluate", str(trained_run)])


def test_python_dash_m_runs_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "recvae_fast", "evaluate", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"recvae-fast: error: {tmp_path} is not a finished training run (no model.pt)"


def test_resume_of_a_folder_without_a_run_creates_nothing(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "holds no run to continue" in _error_line(capsys)
    assert not (tmp_path / "nothing").exists()


def test_a_tampered_run_description_is_refused_in_one_line(run_copy, capsys):
    description = json.loads((run_copy / "run.json").read_text())
    description["config"]["evil"] = 1
    (run_copy / "run.json").write_text(json.dumps(description))
    assert main(["train", "--out", str(run_copy), "--resume"]) == 2
    assert "run.json has unknown or missing settings: evil" in _error_line(capsys)


def test_ctrl_c_exits_130_with_one_line(trained_run, monkeypatch, capsys):
    from recvae_fast import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "evaluate", interrupted)
    assert main(["evaluate", str(trained_run)]) == 130
    assert _error_line(capsys).startswith("recvae-fast: interrupted")


def test_report_and_export_commands_on_a_trained_run(trained_run, tmp_path, capsys):
    """`report` writes report.png / report.md into the run; `export` writes a .pt2 whose scores equal
    `recommend` on the run's test fold-in users; a missing output folder is one line, exit 2."""
    import numpy as np
    import recvae_fast
    from recvae_fast.export import load_scorer
    from recvae_fast.training import load_model
    from recvae_fast import data as data_mod

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["report", str(run)]) == 0
    assert (run / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best epoch" in (run / "report.md").read_text().lower()
    out = tmp_path / "scorer.pt2"
    assert main(["export", str(run), "--output", str(out), "--k", "7"]) == 0
    split = data_mod.Split.load(run)
    model = load_model(run / "model.pt")
    want = recvae_fast.recommend(model, split.test_in, k=7)
    got = load_scorer(out)(split.test_in)
    np.testing.assert_array_equal(got.items, want.items)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    assert main(["export", str(run), "--output", str(tmp_path / "no" / "x.pt2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("recvae-fast ")
