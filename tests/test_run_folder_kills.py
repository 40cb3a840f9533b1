"""A `train` process stopped at random points (SIGINT, SIGKILL) leaves a consistent run folder, a
second writer is refused while it runs, and resuming ends exactly where an uninterrupted run ends."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from recvae_fast import data
from recvae_fast.cli import main

from helpers import default_sigint

EPOCHS = 8
TRAIN = ["--rating-threshold", "3.5", "--epochs", str(EPOCHS), "--hidden-dim", "16", "--latent-dim", "8",
         "--batch-size", "128", "--n-enc-epochs", "1", "--heldout-users", "40", "--no-progress"]


@pytest.fixture(scope="module")
def ratings_file(tmp_path_factory):
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("data") / "ratings.csv"
    lines = ["userId,movieId,rating"]
    for user in range(300):
        for item in rng.choice(150, size=rng.integers(6, 20), replace=False):
            lines.append(f"{user},{item},{rng.choice([2.0, 4.0, 5.0])}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _assert_consistent(run) -> int:
    """Every file present parses; the log is the checkpoint's history or that less its last epoch.
    Returns the number of epochs the checkpoint holds."""
    for name in ("run.json", "summary.json"):
        if (run / name).exists():
            json.loads((run / name).read_text())
    if (run / "run.json").exists():  # written after the split: the split is complete and consistent
        data.Split.load(run)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").exists() else []
    if not (run / "checkpoint.pt").exists():
        assert logged == []
        return 0
    history = torch.load(run / "checkpoint.pt", weights_only=True)["state"]["history"]
    assert logged in (history, history[:-1]), (len(logged), len(history))
    if (run / "model.pt").exists():
        torch.load(run / "model.pt", weights_only=True)
    return len(history)


def _start_train(args):
    return subprocess.Popen([sys.executable, "-m", "recvae_fast", "train", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)


def _wait_until(condition, proc, timeout=120.0) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def _new_checkpoint(run, proc):
    """True once `proc` has replaced (or written) checkpoint.pt: a rename gives it a new inode."""
    path = run / "checkpoint.pt"
    before = path.stat().st_ino if path.exists() else None
    return lambda: path.exists() and path.stat().st_ino != before


def _holds_lock(run, proc):
    """True once `proc` holds the run folder's writer lock (it writes its pid into .lock)."""
    def check():
        try:
            return (run / ".lock").read_text().startswith(f"pid {proc.pid} ")
        except FileNotFoundError:
            return False
    return check


def test_kills_at_random_points_leave_a_resumable_run(ratings_file, tmp_path, capsys):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    reference, run = tmp_path / "reference", tmp_path / "killed"
    assert main(["train", str(ratings_file), "--out", str(reference), *TRAIN]) == 0
    capsys.readouterr()

    epochs_seen = []
    for attempt, sig in enumerate([signal.SIGINT, signal.SIGKILL, signal.SIGKILL]):
        args = ["--out", str(run), "--resume", "--no-progress"] if (run / "run.json").exists() \
            else [str(ratings_file), "--out", str(run), *TRAIN]
        proc = _start_train(args)
        started = _wait_until(_holds_lock(run, proc), proc)
        if attempt == 0 and started and _wait_until((run / "run.json").exists, proc):
            # While it trains, a second writer is refused with the holder's pid.
            assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
            assert f"pid {proc.pid}" in capsys.readouterr().err, f"seed {seed}"
        if sig == signal.SIGINT:  # Ctrl-C right after the first epoch: exit 130, progress kept
            _wait_until(_new_checkpoint(run, proc), proc)
        elif attempt == 1:  # once this process has written a checkpoint: in training and its writes
            _wait_until(_new_checkpoint(run, proc), proc)
            time.sleep(rng.uniform(0.0, 1.0))
        else:  # anywhere: data, split, setup, epochs, checkpoint and log writes
            time.sleep(rng.uniform(0.0, 3.0))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if sig == signal.SIGINT:
            assert err.strip().splitlines()[-1].startswith("recvae-fast: interrupted"), err
        assert proc.returncode in (0, 130 if sig == signal.SIGINT else -signal.SIGKILL), (proc.returncode, err)
        epochs_seen.append(_assert_consistent(run))
    assert epochs_seen[-1] < EPOCHS or (run / "model.pt").exists(), f"seed {seed}"

    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    capsys.readouterr()
    assert _assert_consistent(run) == EPOCHS
    final, expected = torch.load(run / "model.pt", weights_only=True), torch.load(reference / "model.pt",
                                                                                   weights_only=True)
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=0, msg=f"{key} (kill seed {seed}, {epochs_seen})")
    losses = lambda folder: [(r["epoch"], r["encoder_loss"], r["decoder_loss"], r["valid_ndcg@100"])  # noqa: E731
                             for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]
    assert losses(run) == losses(reference)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
