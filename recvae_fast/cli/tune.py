"""`recvae-fast tune [DATA] --out DIR`: the Optuna search (recvae_fast.tune) on train's split of the
data; then the best trial trained into OUT/trial-N as `train` would, and evaluated on the test
users, once."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from ..runfolder import RUN_NAME, SUMMARY_NAME, RunLock, read_json, write_json
from ..training import timedelta_text
from ..tuning import import_optuna, tune
from .errors import UsageError
from .run_folder import train_in_folder
from .settings import RunSettings, checked_split, eval_batch_size, new_run_settings
from .tables import metrics_table
from .train import OneProcess

TUNE_NAME = "tune.json"  # a study folder's summary: the study, its best trial and that trial's test metrics


def run(args) -> dict:
    t0 = time.perf_counter()
    try:
        import_optuna()
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    out = Path(args.out)
    settings = new_run_settings(args)  # the search space sets the other hyperparameters
    cfg, split, _ = checked_split(args, out, settings)
    result = tune(split, out, args.trials, space=args.space, config=asdict(cfg), storage=args.storage,
                  study_name=args.study_name, n_jobs=args.jobs, eval_batch_size=eval_batch_size(args),
                  progress="trials" if args.no_progress else True, heartbeat_s=args.heartbeat,
                  finalists=args.finalists, finalist_folds=args.finalist_folds,
                  finalist_seeds=args.finalist_seeds)
    best = out / f"trial-{result.best_trial}"
    with RunLock(best, wait_s=600):  # another worker of the study may be training it
        if (best / SUMMARY_NAME).is_file():
            summary = read_json(best / SUMMARY_NAME)
        else:  # a new run, or the continuation of one a stopped worker started
            best_run = RunSettings(settings.source, settings.data, result.best_config,
                                   read_json(best / RUN_NAME) if (best / RUN_NAME).is_file() else None)
            summary = train_in_folder(best, args, OneProcess(args), lambda: best_run, resume=False,
                                      t0=time.perf_counter())
    record = {**result.record(), "best_run": str(best), "test": summary["test"],
              "popularity_test": summary["popularity_test"], "wall_time_s": time.perf_counter() - t0}
    with RunLock(out, wait_s=600):
        write_json(out / TUNE_NAME, record, indent=2)
    return {**record, "table": result.table}


def render(result: dict, args) -> str:
    if args.json:
        return json.dumps({key: value for key, value in result.items() if key != "table"}, indent=2)
    if result["best_mean"] is None:  # no final selection: the search's best score chose
        why = f"valid NDCG@100 {result['best_value']:.4f}"
    else:
        why = (f"mean valid NDCG@100 {result['best_mean']:.4f} over the final selection's runs (search "
               f"{result['best_value']:.4f})")
    return (result["table"] + f"\n\nchosen: trial {result['best_trial']}, {why}; "
            f"its run folder {result['best_run']}, test metrics ({result['test']['n_users']} users; "
            f"{timedelta_text(result['wall_time_s'])} in all):\n"
            + metrics_table({"RecVAE": result["test"], "popularity": result["popularity_test"]})
            + f"\nall figures: {Path(args.out) / TUNE_NAME}")
