"""`train --item-shards S` under torchrun: a real two-process run (about 15 s on the 2-core development
machine), `evaluate` and the model file without torchrun, and `--resume` under torchrun (15 s more);
the flag's errors exit 2 in one line."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from recvae_fast.cli import main
from recvae_fast.distributed.checkpoint import latest_checkpoint, load_into_recvae
from recvae_fast.training import load_model

TRAIN = ["--epochs", "2", "--hidden-dim", "16", "--latent-dim", "8", "--no-progress"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_item_shards_above_one_without_torchrun_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    assert main(["train", "synthetic", "--out", str(out), "--item-shards", "2", *TRAIN]) == 2
    assert "launch with torchrun" in _one_error_line(capsys)
    assert not out.exists()  # nothing written


def test_item_shards_must_divide_the_number_of_processes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")  # what torchrun sets on every rank; checked before any rendezvous
    out = tmp_path / "run"
    assert main(["train", "synthetic", "--out", str(out), "--item-shards", "3", *TRAIN]) == 2
    assert "--item-shards 3 must divide the number of torchrun processes (4)" in _one_error_line(capsys)
    assert main(["train", "synthetic", "--out", str(out), "--item-shards", "0", *TRAIN]) == 2
    assert "--item-shards must be >= 1" in _one_error_line(capsys)
    assert not out.exists()


def _torchrun_train(args: list[str]) -> dict:
    """`torchrun --nproc-per-node 2 -m recvae_fast train ARGS`: the JSON summary it prints; rank 0
    alone prints the data line (a new run) and one line per epoch to stderr, and the progress bar
    unless --no-progress."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([*torchrun, "-m", "recvae_fast", "train", *args, "--json"], env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout)  # one JSON document: only rank 0 prints, the epochs go to stderr
    lines = re.split(r"[\r\n]", done.stderr)
    assert sum(line.startswith("data: ") for line in lines) == ("--resume" not in args), done.stderr[-4000:]
    epochs = [int(m.group(1)) for m in map(re.compile(r"epoch (\d+)/\d+ \|").match, lines) if m]
    assert epochs == list(range(summary["epochs_trained"] - len(epochs) + 1, summary["epochs_trained"] + 1))
    assert epochs and ("training: " in done.stderr) == ("--no-progress" not in args), done.stderr[-4000:]
    return summary


def test_torchrun_train_evaluate_without_torchrun_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    # --patience and --fc1-grad row-sparse work with item shards (patience 5 does not stop 2 epochs)
    summary = _torchrun_train(["synthetic", "--out", str(out), "--item-shards", "2", "--patience", "5",
                               "--fc1-grad", "row-sparse", *[a for a in TRAIN if a != "--no-progress"]])
    assert summary["item_shards"] == 2 and summary["processes"] == 2 and summary["epochs_trained"] == 2
    assert summary == json.loads((out / "summary.json").read_text())
    assert json.loads((out / "run.json").read_text())["item_shards"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(r["item_shards"] == 2 for r in records)
    assert all(r["fc1_grad"] == "row-sparse" for r in records)

    # model.pt is the authors' format of the whole model: the best epoch's parameters of the DCP checkpoint.
    model = load_model(out / "model.pt")
    assert model.input_dim == summary["items"]
    from_checkpoint = load_into_recvae(latest_checkpoint(out / "sharded"), best=True)
    for key, value in from_checkpoint.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)

    # evaluate on one process, from the folder, gives the test metrics the sharded run reported.
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
    test = json.loads(capsys.readouterr().out)["test"]
    assert test == pytest.approx({key: summary["test"][key] for key in test}, rel=1e-5)

    # the run continues only under torchrun with the same --item-shards
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3"]) == 2
    assert "trained with --item-shards 2 under torchrun" in _one_error_line(capsys)
    assert main(["train", "synthetic", "--out", str(out), *TRAIN]) == 2  # nor is it overwritten by a new run
    assert "already holds a run" in _one_error_line(capsys)

    # --resume under torchrun continues from the last DCP checkpoint: one more epoch, appended to the log.
    resumed = _torchrun_train(["--out", str(out), "--resume", "--item-shards", "2", "--epochs", "3", "--no-progress"])
    assert resumed["epochs_trained"] == 3 and resumed["config"]["n_epochs"] == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert json.loads((out / "run.json").read_text())["config"]["n_epochs"] == 3
    assert (out / "sharded" / "LATEST").read_text().strip() == "step-000003"
