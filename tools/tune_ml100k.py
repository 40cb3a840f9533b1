"""The README's tuning figures: `recvae-fast tune` on MovieLens-100K (killed with SIGKILL in the
middle of a trial, then started again with the same command; its final selection retrains the best
trials and the defaults on five cross-validation folds of the non-test users), then the chosen
configuration and the defaults, each trained with three seeds on the study's split and scored on its
test users (which neither the search nor the selection saw). The record also holds the paired
difference on those users: per user, the chosen configuration's NDCG@100 less the defaults' (each the
mean over the three seeds), its mean and standard error, to tell a real gap from the noise of a few
test users. Appends one JSON line to benches/results/tune_ml100k.jsonl.

MovieLens-100K as RecBole ships it, read by the project's own RecBole .inter reader:

    pip download --no-deps recbole==1.2.1 -d /tmp/recbole
    unzip -o /tmp/recbole/recbole-1.2.1-py3-none-any.whl 'recbole/dataset_example/ml-100k/*' -d /tmp/recbole
    python tools/tune_ml100k.py /tmp/recbole/recbole/dataset_example/ml-100k/ml-100k.inter --out runs/tune-ml100k

The study uses tools/tune_ml100k_space.toml and two worker processes of one torch thread each. It
takes minutes; run it from the repository root.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import optuna
import torch

import recvae_fast
from recvae_fast import data
from recvae_fast.metrics import mean_over_users, ndcg_at_k
from recvae_fast.training import TrainConfig

SEEDS = (0, 1, 2)
RECORD = Path(__file__).parent.parent / "benches" / "results" / "tune_ml100k.jsonl"
SPACE = Path(__file__).parent / "tune_ml100k_space.toml"


def test_ndcg(job: tuple[str, dict]) -> list:
    """Per test user NDCG@100 (NaN: no held-out item) of a model trained with `config` on the study
    folder's split (one torch thread); its mean is `evaluate`'s."""
    folder, config = job
    torch.set_num_threads(1)
    split = data.Split.load(folder)
    model, _ = recvae_fast.fit(split.train, split.valid_in, split.valid_out, progress=False, **config)
    per_user = ndcg_at_k(recvae_fast.recommend(model, split.test_in, k=100).items, split.test_out, 100)
    assert math.isclose(mean_over_users(per_user), recvae_fast.evaluate(model, split.test_in, split.test_out)[
        "ndcg@100"], rel_tol=1e-9)
    return per_user.tolist()


def paired_difference(best: list, defaults: list) -> dict:
    """Per user: the mean over seeds of best's NDCG@100 less the defaults'; their mean and standard error."""
    # A user without held-out items is NaN in every run (one split): dropped after the mean.
    diff = np.mean(np.array(best), axis=0) - np.mean(np.array(defaults), axis=0)
    diff = diff[~np.isnan(diff)]
    return {"users": int(diff.size), "mean": float(diff.mean()),
            "standard_error": float(diff.std(ddof=1) / math.sqrt(diff.size)),
            "users_better": int((diff > 0).sum()), "users_worse": int((diff < 0).sum())}


def _trials(out: str, states) -> list:
    """The study's trials in `states`, read through Optuna: only once its processes are gone."""
    if not (Path(out) / "study.db").is_file():
        return []
    try:
        study = optuna.load_study(study_name="recvae", storage=f"sqlite:///{Path(out).resolve() / 'study.db'}")
    except KeyError:  # not created yet
        return []
    return study.get_trials(states=states)


def _progress(out: str) -> tuple[int, bool]:
    """(finished trials, whether a trial runs and has reported an epoch) of the study being written.
    Read-only: a reader that opened the file through Optuna would create the schema itself, racing
    the tune process that is creating it."""
    try:
        with sqlite3.connect(f"file:{Path(out).resolve() / 'study.db'}?mode=ro", uri=True, timeout=60) as db:
            finished = db.execute("SELECT COUNT(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchone()[0]
            running = db.execute("SELECT 1 FROM trials WHERE state = 'RUNNING' AND EXISTS (SELECT 1 FROM "
                                 "trial_intermediate_values v WHERE v.trial_id = trials.trial_id) LIMIT 1").fetchone()
    except sqlite3.OperationalError:  # no file or no tables yet
        return 0, False
    return finished, running is not None


def run_killed_once(command: list, out: str, kill_after: int) -> dict:
    """Start the study, SIGKILL every process of it once `kill_after` trials have finished and a
    trial is in the middle of its epochs, then run the same command to the end."""
    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    t0 = time.perf_counter()
    process = subprocess.Popen(command, start_new_session=True)  # its workers share its process group
    while True:
        time.sleep(0.5)
        if process.poll() is not None:
            raise SystemExit(f"the study ended before it could be killed (exit code {process.returncode})")
        finished, running = _progress(out)
        if finished >= kill_after and running:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            break
    first_s = time.perf_counter() - t0
    killed = [t.number for t in _trials(out, (optuna.trial.TrialState.RUNNING,))]
    finished_at_kill = len(_trials(out, finished_states))
    t1 = time.perf_counter()
    subprocess.run(command, check=True)
    return {"killed_after_s": round(first_s, 1), "finished_at_kill": finished_at_kill,
            "running_at_kill": killed, "restart_wall_s": round(time.perf_counter() - t1, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="ml-100k.inter")
    parser.add_argument("--out", required=True, help="the study folder (a new one)")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--kill-after", type=int, default=10, help="finished trials before the SIGKILL")
    parser.add_argument("--heldout-users", type=int, default=None,
                        help="validation and test users each (default: train's, a tenth of the users)")
    args = parser.parse_args()

    command = ["recvae-fast", "tune", args.data, "--rating-threshold", "3.5", "--out", args.out,
               "--trials", str(args.trials), "--space", str(SPACE.relative_to(Path.cwd()) if SPACE.is_relative_to(
                   Path.cwd()) else SPACE), "--jobs", "2", "--no-progress"]
    if args.heldout_users is not None:
        command += ["--heldout-users", str(args.heldout_users)]
    t0 = time.perf_counter()
    kill = run_killed_once([sys.executable, "-m", "recvae_fast", *command[1:]], args.out, args.kill_after)
    study_wall_s = round(time.perf_counter() - t0, 1)
    summary = json.loads((Path(args.out) / "tune.json").read_text())

    split = data.Split.load(args.out)
    defaults = asdict(TrainConfig())
    best = {k: v for k, v in summary["best_config"].items() if k != "seed"}
    # The chosen configuration may be the defaults' own: each distinct (config, seed) is trained once.
    same = {k: v for k, v in best.items() if k != "device"} == {k: v for k, v in defaults.items()
                                                                 if k not in ("seed", "device")}
    configs = {"defaults": defaults} if same else {"defaults": defaults, "best": best}
    jobs = [(args.out, {**config, "seed": seed}) for seed in SEEDS for config in configs.values()]
    t1 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        per_user = pool.map(test_ndcg, jobs, chunksize=1)
    seeds_wall_s = time.perf_counter() - t1
    per_config = {name: per_user[i::len(configs)] for i, name in enumerate(configs)}
    per_config.setdefault("best", per_config["defaults"])
    figures = {name: [mean_over_users(np.array(u)) for u in runs] for name, runs in per_config.items()}

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    record = {
        "command": " ".join(command), "commit": commit, "data": Path(args.data).name,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "users": {"train": split.train.shape[0], "valid": split.valid_in.shape[0], "test": split.test_in.shape[0]},
        "items": split.n_items,
        "space": [line for line in SPACE.read_text().splitlines() if line and not line.startswith("#")],
        "study_wall_s": study_wall_s, "kill": kill, "trials": summary["states"],
        "seed_runs_wall_s": round(seeds_wall_s, 1),
        "search_best_trial": summary["search_best_trial"], "finalists": summary["finalists"],
        "best_trial": summary["best_trial"], "best_is_defaults": same, "best_valid_ndcg@100": summary["best_value"],
        "best_valid_ndcg@100_selection_mean": summary["best_mean"],
        "best_config": {k: summary["best_config"][k] for k in ("gamma", "latent_dim", "hidden_dim", "lr",
                                                                 "dropout_rate", "n_epochs")},
        "best_run_test_ndcg@100": summary["test"]["ndcg@100"],
        "seeds": list(SEEDS),
        "test_ndcg@100_defaults": figures["defaults"], "test_ndcg@100_best": figures["best"],
        "mean_defaults": statistics.mean(figures["defaults"]), "mean_best": statistics.mean(figures["best"]),
        "paired_best_minus_defaults": paired_difference(per_config["best"], per_config["defaults"]),
    }
    RECORD.parent.mkdir(exist_ok=True)
    with open(RECORD, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
