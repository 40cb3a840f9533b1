"""The command line end to end on a small synthetic set, and each bad-input case."""
from __future__ import annotations

import csv
import json
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
    for name in ("model.pt", "checkpoint.pt", "items.json", "split.npz", "metrics.jsonl", "summary.json"):
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


def test_recommend_writes_original_ids_without_seen_items(trained_run, ratings_file, tmp_path):
    out = tmp_path / "recs.csv"
    assert main(["recommend", str(trained_run), str(ratings_file), "--rating-threshold", "3.5",
                 "--k", "5", "--output", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    seen = {}
    for r in csv.DictReader(open(ratings_file)):
        if float(r["rating"]) > 3.5:
            seen.setdefault(r["userId"], set()).add(r["movieId"])
    per_user = {}
    for r in rows:
        per_user.setdefault(r["user"], []).append(r)
        assert r["item"] not in seen[r["user"]]
        assert 1000 <= int(r["user"]) < 1300 and 5000 <= int(r["item"]) < 5200
    assert all([int(r["rank"]) for r in recs] == list(range(1, len(recs) + 1)) for recs in per_user.values())
    assert all(len(recs) == 5 for recs in per_user.values())
    first = per_user[next(iter(per_user))]
    assert [float(r["score"]) for r in first] == sorted((float(r["score"]) for r in first), reverse=True)


def test_resume_continues_a_run(ratings_file, tmp_path):
    """Also with the row-sparse fc1 gradient, whose RowSparseAdam state the checkpoint carries."""
    args = ["train", str(ratings_file), "--rating-threshold", "3.5", "--out", str(tmp_path), "--fc1-grad", "row-sparse"]
    assert main(args + [a if a != "2" else "1" for a in TINY_TRAIN]) == 0
    assert main(args + TINY_TRAIN + ["--resume"]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["fc1_grad"] for r in records] == ["row-sparse", "row-sparse"]


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
