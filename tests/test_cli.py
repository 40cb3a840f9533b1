"""The command line end to end on a small synthetic set, and each bad-input case."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from recvae_fast.cli import main

from helpers import write_taste_ratings

TINY_TRAIN = ["--epochs", "2", "--hidden-dim", "16", "--latent-dim", "8", "--batch-size", "64",
              "--no-progress", "--heldout-users", "40"]


@pytest.fixture(scope="module")
def ratings_file(tmp_path_factory):
    """A MovieLens-style ratings.csv with 300 users and string-free integer ids."""
    return write_taste_ratings(tmp_path_factory.mktemp("data") / "ratings.csv")


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
    (["--topk", "0,20"], "--topk must be positive integers separated by commas"),
    (["--topk", "10,,20"], "--topk must be positive integers"),
    (["--topk", "ten"], "--topk must be positive integers"),
    (["--topk", "20,-5"], "--topk must be positive integers"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--min-users-per-item", "-1"], "--min-users-per-item must be >= 0"),
    (["--min-users-per-item", "100000"], "empty"),
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


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_resume_rewrites_damaged_split_files(damage, run_copy, capsys):
    """The resumed run rebuilds the split from its data and checks it against run.json; split files that
    no longer hold that split are written again, so the finished run evaluates."""
    split_file = run_copy / "split.npz"
    intact = split_file.read_bytes()
    if damage == "truncate":
        split_file.write_bytes(intact[:1000])
    else:
        split_file.unlink()
    assert main(["evaluate", str(run_copy)]) == 2
    capsys.readouterr()
    assert main(["train", "--out", str(run_copy), "--resume", "--epochs", "3", "--no-progress"]) == 0
    assert split_file.read_bytes() == intact
    assert main(["evaluate", str(run_copy)]) == 0


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

    monkeypatch.setattr(cli.evaluate, "evaluate", broken)
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

    monkeypatch.setattr(cli.evaluate, "evaluate", interrupted)
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


# ----------------------------------------------------------------------------- the CLI as a new user meets it


def _help_entries(parser) -> dict[str, str]:
    """Each argument's whole entry in format_help() (its wrapped lines joined), by its first name."""
    entries, current = {}, None
    for line in parser.format_help().splitlines():
        start = re.match(r"^  (\S+)", line)  # an entry starts at indent 2; its continuation is deeper
        if start:
            current = start.group(1).rstrip(",")
            entries[current] = line.strip()
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def _subparsers(parser) -> dict:
    import argparse

    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_help_of_every_subcommand_names_every_default_and_what_each_flag_does(monkeypatch):
    import argparse

    from recvae_fast.cli import build_parser

    monkeypatch.setenv("COLUMNS", "100")
    commands = _subparsers(build_parser())
    assert set(commands) == {"train", "evaluate", "recommend", "report", "export", "tune"}
    for command, parser in commands.items():
        entries = _help_entries(parser)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            name = action.option_strings[0] if action.option_strings else action.dest
            entry = entries[name]
            where = f"{command} {name}: {entry}"
            invocation_and_default = re.sub(r"\((default|required)[^)]*\)|default: .*$", "", entry).split()
            assert len(invocation_and_default) >= 3, f"says nothing about what it does: {where}"
            if action.required:
                assert "(required)" in entry or not action.option_strings, where
            else:
                assert "default" in entry.lower(), f"no default shown: {where}"
            if action.default not in (None, False, argparse.SUPPRESS):
                assert f"default: {action.default})" in entry, where
            if action.default is False:
                assert "(default: off)" in entry, where
    train = _help_entries(commands["train"])
    assert "(default: 600)" in train["--hidden-dim"] and "(default: 0.0005)" in train["--lr"]
    assert "(default: 50, the authors'; 10 on the synthetic dataset)" in train["--epochs"]
    assert "(default: test)" in _help_entries(commands["evaluate"])["--split"]


def test_synthetic_defaults_to_a_short_run_and_other_data_to_the_authors_schedule(ratings_file):
    from recvae_fast.cli import build_parser
    from recvae_fast.cli.parser import SYNTHETIC_EPOCHS
    from recvae_fast.cli.settings import new_run_settings

    def epochs(*argv):
        return new_run_settings(build_parser().parse_args(["train", *argv, "--out", "x"])).config["n_epochs"]

    assert SYNTHETIC_EPOCHS == 10
    assert epochs() == epochs("synthetic") == SYNTHETIC_EPOCHS
    assert epochs(str(ratings_file)) == 50
    assert epochs("synthetic", "--epochs", "3") == 3


def _train_tiny(ratings_file, out, *flags) -> int:
    """Two epochs on the small ratings file, 10 batches of 25 users a pass."""
    return main(["train", str(ratings_file), "--out", str(out), "--epochs", "2", "--hidden-dim", "16",
                 "--latent-dim", "8", "--batch-size", "25", "--heldout-users", "25", *flags])


DURATION = r"(?:\d+\.\d s|(?:\d+:)?\d+:\d\d)"  # timedelta_text: 12.3 s, 4:05 or 1:02:03 on a slow machine
EPOCH_LINE = re.compile(r"^epoch (\d)/2 \| encoder loss \S+ \| decoder loss \S+ \| valid ndcg@100 0\.\d{4} "
                        rf"recall@20 0\.\d{{4}} recall@50 0\.\d{{4}} \| {DURATION} \(elapsed {DURATION}\)$")


def _table(stdout: str) -> dict[str, dict[str, float]]:
    """train's table as {model: {column: value}}, checking its shape."""
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("test metrics (25 users; ") and lines[-1].startswith("all figures: "), stdout
    header, *rows = (line.split() for line in lines[1:-1])
    assert header[0] == "model" and [row[0] for row in rows] == ["RecVAE", "popularity"], stdout
    return {row[0]: {column: float(value) for column, value in zip(header[1:], row[1:])} for row in rows}


def test_no_progress_prints_one_line_per_epoch_on_stderr_and_the_table_on_stdout(ratings_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train_tiny(ratings_file, out, "--no-progress") == 0
    captured = capsys.readouterr()
    data_line, *lines = captured.err.splitlines()
    assert data_line.startswith("data: 300 users (250 train, 25 validation, 25 test), ")
    assert len(lines) == 2 and "\r" not in captured.err, captured.err  # no bars, nothing per batch
    assert [int(EPOCH_LINE.match(line).group(1)) for line in lines] == [1, 2], lines
    summary = json.loads((out / "summary.json").read_text())
    table = _table(captured.out)
    assert list(table["RecVAE"]) == ["NDCG@100", "Recall@20", "Recall@50"]
    for model, metrics in (("RecVAE", summary["test"]), ("popularity", summary["popularity_test"])):
        for column, key in (("NDCG@100", "ndcg@100"), ("Recall@20", "recall@20"), ("Recall@50", "recall@50")):
            assert table[model][column] == pytest.approx(metrics[key], abs=5e-5), (model, column)
    assert captured.out.strip().endswith(f"all figures: {out / 'summary.json'}")


def test_progress_shows_an_overall_bar_with_an_eta_and_a_bar_per_pass(ratings_file, tmp_path, capsys):
    assert _train_tiny(ratings_file, tmp_path / "run") == 0
    err = capsys.readouterr().err
    # 250 training users in batches of 25: 10 batches a pass, 3 + 1 passes an epoch, 2 epochs.
    overall = re.findall(r"training: +(\d+)%\|[^|]*\| (\d+)/(\d+) \[(\d\d:\d\d)<(\d\d:\d\d)", err)
    assert overall and {total for _, _, total, _, _ in overall} == {"80"}, err[-2000:]
    assert overall[-1][:3] == ("100", "80", "80")
    for desc in ("epoch 1 encoder 1/3", "epoch 1 encoder 3/3", "epoch 2 decoder 1/1"):
        assert re.search(re.escape(desc) + r": +\d+%\|[^|]*\| \d+/10 ", err), desc
    epoch_lines = [line for line in re.split(r"[\r\n]", err) if EPOCH_LINE.match(line)]
    assert [int(EPOCH_LINE.match(line).group(1)) for line in epoch_lines] == [1, 2]


def test_topk_sets_the_cutoffs_of_validation_test_and_the_table(ratings_file, tmp_path, capsys):
    from recvae_fast import data as data_mod
    from recvae_fast.metrics import popularity_baseline

    out = tmp_path / "run"
    assert _train_tiny(ratings_file, out, "--no-progress", "--topk", "50,10,10") == 0
    table = _table(capsys.readouterr().out)
    columns = ["NDCG@10", "NDCG@50", "NDCG@100", "Recall@10", "Recall@50", "Recall@100"]
    assert list(table["RecVAE"]) == list(table["popularity"]) == columns
    keys = ["ndcg@10", "ndcg@50", "ndcg@100", "recall@10", "recall@50", "recall@100"]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["test"]) == keys + ["n_users"]
    split = data_mod.Split.load(out)
    popularity = popularity_baseline(split.train, split.test_in, split.test_out, ks=(10, 50, 100))
    assert summary["popularity_test"] == pytest.approx(popularity)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all([k for k in r if k.startswith("valid_")] == [f"valid_{k}" for k in keys + ["n_users"]] for r in records)
    # evaluate at the same cut-offs reproduces the test metrics; at the default ones, the paper's three.
    assert main(["evaluate", str(out), "--topk", "10,50"]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == pytest.approx(summary["test"])
    assert main(["evaluate", str(out)]) == 0
    paper = json.loads(capsys.readouterr().out)["test"]
    assert list(paper) == ["ndcg@100", "recall@20", "recall@50", "n_users"]
    assert paper["ndcg@100"] == pytest.approx(summary["test"]["ndcg@100"])


def test_json_prints_the_summary_instead_of_the_table(trained_run, ratings_file, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((out / "summary.json").read_text())


def _spy(monkeypatch, name: str) -> list:
    """Replace the scoring function `name` of the command `name` (recvae_fast.cli.<name>.<name>) by a
    wrapper recording (threads, batch_size) at each call."""
    import torch

    from recvae_fast import cli

    command = getattr(cli, name)
    calls, real = [], getattr(command, name)

    def spy(*args, **kwargs):
        calls.append((torch.get_num_threads(), kwargs.get("batch_size")))
        return real(*args, **kwargs)

    monkeypatch.setattr(command, name, spy)
    return calls


def test_threads_and_eval_batch_size_reach_scoring_and_threads_are_restored(trained_run, tmp_path, monkeypatch,
                                                                             capsys):
    import torch

    before = torch.get_num_threads()
    evaluations = _spy(monkeypatch, "evaluate")
    assert main(["evaluate", str(trained_run)]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(trained_run), "--threads", "1", "--eval-batch-size", "7"]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == pytest.approx(default["test"])  # same figures
    assert evaluations == [(before, 500), (1, 7)]
    assert torch.get_num_threads() == before
    recommendations = _spy(monkeypatch, "recommend")
    assert main(["recommend", str(trained_run), "--k", "3", "--output", str(tmp_path / "r.csv"),
                 "--eval-batch-size", "11", "--threads", "1"]) == 0
    assert recommendations and all(call == (1, 11) for call in recommendations)
    assert torch.get_num_threads() == before
    assert main(["evaluate", str(trained_run), "--threads", "0"]) == 2
    assert "--threads must be >= 1" in _error_line(capsys)


def test_topk_and_eval_batch_size_are_refused_with_item_shards(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for flags in (["--topk", "10"], ["--eval-batch-size", "100"]):
        assert main(["train", "synthetic", "--out", str(tmp_path / "o"), "--item-shards", "2", *flags]) == 2
        assert "not supported with --item-shards" in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_under_torchrun_item_shards_defaults_to_the_number_of_processes(tmp_path, monkeypatch, capsys):
    """As fit() inside a process group: without --item-shards, torchrun's N processes shard the
    items N ways (here seen by the sharded path's own refusal, before any process group starts)."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["train", "synthetic", "--out", str(tmp_path / "o"), "--topk", "10"]) == 2
    assert "not supported with --item-shards" in _error_line(capsys)
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: the ordinary run, which takes --topk
    assert main(["train", "synthetic", "--out", str(tmp_path / "o"), "--topk", "0"]) == 2
    assert "not supported with --item-shards" not in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_min_users_per_item_filters_items_is_saved_and_reused_by_resume(ratings_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train_tiny(ratings_file, out, "--no-progress", "--min-users-per-item", "30") == 0
    users_per_item: dict = {}
    for r in csv.DictReader(open(ratings_file)):
        users_per_item.setdefault(r["movieId"], set()).add(r["userId"])
    items = json.loads((out / "items.json").read_text())
    assert items and all(len(users_per_item[str(i)]) >= 30 for i in items)
    assert any(len(users) < 30 for users in users_per_item.values())  # the filter removed some
    assert json.loads((out / "run.json").read_text())["data"]["min_users_per_item"] == 30
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--min-users-per-item", "20"]) == 2
    assert "--min-users-per-item 20 (the run's: 30)" in _error_line(capsys)
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--no-progress"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_run_from_before_min_users_per_item_resumes_keeping_every_item(run_copy, capsys):
    description = json.loads((run_copy / "run.json").read_text())
    del description["data"]["min_users_per_item"]
    (run_copy / "run.json").write_text(json.dumps(description))
    assert main(["train", "--out", str(run_copy), "--resume", "--epochs", "3", "--no-progress"]) == 0
    assert json.loads((run_copy / "run.json").read_text())["data"]["min_users_per_item"] == 0
