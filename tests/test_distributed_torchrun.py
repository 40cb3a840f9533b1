"""A rank killed mid-epoch under `torchrun --max-restarts 1`: the group restarts, resumes from the last
complete checkpoint, and ends at the weights of an uninterrupted run with the same seed.

This file is also the training script torchrun runs (see main). Two fresh torchrun attempts cost about
30 s on the 2-core development machine (each new interpreter imports torch); the test is in the
default suite, as CI must show the restart."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

N_ITEMS, N_USERS = 23, 30
FIT = dict(hidden_dim=12, latent_dim=5, batch_size=7, n_epochs=3, n_enc_epochs=2, n_dec_epochs=1, gamma=0.005, seed=3)
KILL_AT_STEP = 22  # of the first attempt: in epoch 2 (each epoch has 3 passes of 5 batches)


def training_data():
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import random_ratings

    return random_ratings(N_USERS, N_ITEMS, seed=5).astype(np.float32)


def initial_state():
    from recvae_fast import RecVAE

    torch.manual_seed(0)
    return RecVAE(FIT["hidden_dim"], FIT["latent_dim"], N_ITEMS).double().state_dict()


def main(argv=None):
    """torchrun entry: fit_sharded with checkpoints, resuming when one exists; rank 1 kills itself at
    KILL_AT_STEP on the first attempt when --kill is given."""
    from recvae_fast.distributed import training
    from recvae_fast.distributed.checkpoint import gather_full_state_dict, latest_checkpoint
    from recvae_fast.distributed.mesh import init_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--kill", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    init_distributed("gloo", timeout=timedelta(seconds=30))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if args.kill and attempt == 0 and dist.get_rank() == 1:
        step_fn, steps = training.sharded_train_step, [0]

        def step_then_die(*a, **k):
            steps[0] += 1
            if steps[0] == KILL_AT_STEP:
                (args.folder / "killed").write_text(f"rank 1 killed at step {KILL_AT_STEP}")
                os.kill(os.getpid(), signal.SIGKILL)
            return step_fn(*a, **k)

        training.sharded_train_step = step_then_die
    checkpoints = args.folder / "checkpoints"
    model = training.fit_sharded(training_data(), item_shards=2, initial_state=initial_state(), dtype=torch.float64,
                                 checkpoint_dir=checkpoints, resume=latest_checkpoint(checkpoints) is not None, **FIT)
    full = gather_full_state_dict(model)
    if dist.get_rank() == 0:
        torch.save({"attempt": attempt, "weights": full}, args.folder / "final.pt")
    dist.destroy_process_group()


def _uninterrupted_worker(rank, folder):
    from recvae_fast.distributed.checkpoint import gather_full_state_dict
    from recvae_fast.distributed.training import fit_sharded

    model = fit_sharded(training_data(), item_shards=2, initial_state=initial_state(), dtype=torch.float64, **FIT)
    full = gather_full_state_dict(model)
    if rank == 0:
        torch.save(full, Path(folder) / "uninterrupted.pt")


def test_killed_rank_restarts_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from test_distributed import spawn

    killed_run = tmp_path / "killed"
    killed_run.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--max-restarts", "1", "--monitor-interval", "0.2"]
    # one implementation for the killed run and the uninterrupted one (spawned from this process)
    monkeypatch.setenv("RECVAE_FAST_IMPL", "cpp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*torchrun, __file__, str(killed_run), "--kill"], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, "\n".join(l for l in done.stderr.splitlines() if "[rank1]" in l or "[rank0]" in l)[-4000:]
    assert (killed_run / "killed").exists(), "rank 1 was never killed: the test tested nothing"
    final = torch.load(killed_run / "final.pt", weights_only=True)
    assert final["attempt"] == 1  # the restarted group finished the run

    spawn(_uninterrupted_worker, 2, tmp_path, str(tmp_path))
    expected = torch.load(tmp_path / "uninterrupted.pt", weights_only=True)
    for key, value in expected.items():
        torch.testing.assert_close(final["weights"][key], value, rtol=0, atol=0, msg=key)


if __name__ == "__main__":
    main()
