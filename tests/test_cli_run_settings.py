"""`train --resume` keeps every setting that shapes the result (run.json's "training": --patience,
--topk), refusing a changed one unless --force; and the command line's output: the data line at the
start of training, summary.json's cut-offs, `evaluate | reader` that stops early."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from recvae_fast.cli import main

# lr 1e-12 leaves every float32 weight as it is: validation NDCG@100 never improves after epoch 1,
# so --patience 1 stops after epoch 2, every time.
FROZEN = ["--lr", "1e-12", "--hidden-dim", "16", "--latent-dim", "8", "--batch-size", "64", "--no-progress",
          "--heldout-users", "30"]


@pytest.fixture(scope="module")
def ratings_file(tmp_path_factory):
    rng = np.random.default_rng(2)
    path = tmp_path_factory.mktemp("data") / "ratings.csv"
    with open(path, "w") as f:
        f.write("userId,movieId\n")
        for user in range(200):
            for item in rng.choice(80, size=rng.integers(6, 20), replace=False):
                f.write(f"{user},{item}\n")
    return path


def _epochs(out) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_reuses_patience_and_topk_and_an_early_stop_stays_stopped(ratings_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(ratings_file), "--out", str(out), "--epochs", "6", "--patience", "1",
                 "--topk", "10", *FROZEN]) == 0
    assert _epochs(out) == [1, 2]  # stopped early
    assert json.loads((out / "run.json").read_text())["training"] == {"patience": 1, "topk": [10, 100]}
    capsys.readouterr()

    assert main(["train", "--out", str(out), "--resume", "--epochs", "8", "--no-progress"]) == 0
    assert _epochs(out) == [1, 2]  # still stopped: the run's patience
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["n_epochs"] == 8 and "ndcg@10" in summary["test"]  # the run's --topk
    capsys.readouterr()

    for flag, now, before in (("--patience", "3", "1"), ("--topk", "20", "10,100")):
        assert main(["train", "--out", str(out), "--resume", flag, now]) == 2
        err = capsys.readouterr().err.strip()
        assert f"these differ: {flag} {now if flag == '--patience' else '20,100'} (the run's: {before}; " \
               "--force accepts it)" in err and len(err.splitlines()) == 1, err
    assert _epochs(out) == [1, 2]

    assert main(["train", "--out", str(out), "--resume", "--patience", "3", "--force", "--no-progress"]) == 0
    assert _epochs(out) == [1, 2, 3, 4]  # best epoch 1, three epochs without improvement
    assert json.loads((out / "run.json").read_text())["training"] == {"patience": 3, "topk": [10, 100]}


def test_a_run_json_without_training_settings_resumes_with_the_flags_given(ratings_file, tmp_path):
    """A run folder written before run.json kept --patience and --topk: they come from the command
    line, as resume then took them, and run.json gets them."""
    out = tmp_path / "run"
    assert main(["train", str(ratings_file), "--out", str(out), "--epochs", "1", *FROZEN]) == 0
    run = json.loads((out / "run.json").read_text())
    del run["training"]
    (out / "run.json").write_text(json.dumps(run))
    assert main(["train", "--out", str(out), "--resume", "--epochs", "6", "--patience", "2", "--no-progress"]) == 0
    assert _epochs(out) == [1, 2, 3]
    assert json.loads((out / "run.json").read_text())["training"] == {"patience": 2, "topk": None}


def test_force_without_resume_and_a_corrupt_training_entry_are_refused(ratings_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(ratings_file), "--out", str(out), "--force", *FROZEN]) == 2
    assert "--force applies to --resume only" in capsys.readouterr().err and not out.exists()
    assert main(["train", str(ratings_file), "--out", str(out), "--epochs", "1", *FROZEN]) == 0
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "training": {"patience": 1}}))
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2"]) == 2
    assert "training must be a table of patience, topk" in capsys.readouterr().err


def test_training_starts_with_the_data_line_and_summary_gives_both_models_the_same_cutoffs(ratings_file, tmp_path,
                                                                                          capsys):
    from recvae_fast import data as data_mod

    out = tmp_path / "run"
    assert main(["train", str(ratings_file), "--out", str(out), "--epochs", "1", *FROZEN]) == 0
    err = capsys.readouterr().err.splitlines()
    split = data_mod.Split.load(out)
    nnz = sum(m.nnz for m in (split.train, split.valid_in, split.valid_out, split.test_in, split.test_out))
    assert err[0] == (f"data: 200 users (140 train, 30 validation, 30 test), {split.n_items} items, {nnz:,} "
                      f"interactions, density {nnz / (200 * split.n_items):.3%}")
    assert err[1].startswith("epoch 1/1 |") and len(err) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["test"]) == list(summary["popularity_test"])
    assert {"ndcg@20", "ndcg@100", "recall@20", "recall@50", "recall@100"} <= set(summary["test"])


def test_evaluate_into_a_reader_that_stops_early_exits_quietly(ratings_file, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(ratings_file), "--out", str(out), "--epochs", "1", *FROZEN]) == 0
    # `true` exits at once, long before evaluate prints: its write meets a closed pipe.
    done = subprocess.run(["bash", "-c", f'"{sys.executable}" -m recvae_fast evaluate "{out}" | true; '
                                         'echo "status ${PIPESTATUS[0]}" >&2'], capture_output=True, text=True,
                          timeout=120)
    assert done.stderr == "status 141\n", done.stderr
