"""`recvae-fast` (or `python -m recvae_fast`): train, evaluate and recommend from the command line.

    recvae-fast train [synthetic | PATH] --out DIR     # data -> split -> fit -> test metrics
    recvae-fast train --out DIR --resume               # continue DIR with its own data and settings
    torchrun --nproc-per-node N -m recvae_fast train DATA --out DIR --item-shards S  # model split by items
    recvae-fast evaluate DIR                           # the saved model on the saved test split
    recvae-fast recommend DIR [PATH] --k 100 --output recs.csv   # default data: the run's own
    recvae-fast recommend DIR --items 50,172,181 --output recs.csv   # one new user, by item ids
    recvae-fast tune [synthetic | PATH] --out DIR --trials N     # Optuna search, then the best trial's run

The run folder's files and guarantees are described in recvae_fast.runfolder. Every input (flags,
data, the run folder when resuming) is validated before anything is written. Expected failures
(bad input, I/O errors, corrupt or incompatible files, a device that is not there, a busy run
folder) end with one line on stderr and exit code 2; Ctrl-C ends with exit code 130, keeping the
last finished epoch. Anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from . import __version__
from . import data as data_mod
from .atomic import atomic_write_text, write_output
from .api import evaluate, fit, recommend
from .metrics import PAPER_METRICS, metric_cutoffs, popularity_baseline
from .precision import DEFAULT_PRECISION, PRECISIONS, check_precision
from .runfolder import (
    CHECKPOINT_NAME, ITEMS_NAME, LOG_NAME, MODEL_NAME, RUN_FORMAT, RUN_NAME, SPLIT_NAME, SUMMARY_NAME, USERS_NAME,
    RunFolderBusy, RunFolderError, RunLock, check_regular_files, read_json, save_tensors, write_json,
)
from .runs import histories_matrix, load_run
from .training import SELECTION_K, TrainConfig, check_fit_inputs, timedelta_text
from .tuning import import_optuna, tune
from .validation import DATA_OPTION_RULES, check_run_description

RUN_FILES = (MODEL_NAME, CHECKPOINT_NAME, ITEMS_NAME, USERS_NAME, RUN_NAME, SPLIT_NAME, LOG_NAME, SUMMARY_NAME)
SHARDED_NAME = "sharded"  # the DCP checkpoints of a run trained with --item-shards
TUNE_NAME = "tune.json"  # a study folder's summary: the study, its best trial and that trial's test metrics
_FC1_GRAD = {"auto": None, "dense": False, "row-sparse": True}  # --fc1-grad -> TrainConfig.sparse_fc1_grad
# Flags that define the data and its split (saved in run.json, reused by --resume and recommend).
DATA_OPTIONS = tuple(DATA_OPTION_RULES)
LAYOUT_OPTIONS = ("sep", "user_col", "item_col", "rating_col")  # how a file is read: the run's own file only
# The embedded synthetic dataset's epochs when --epochs is not given: its validation NDCG@100 peaks
# near epoch 9 of the authors' 50 (then slowly overfits), so 10 epochs keep the main job near a minute
# on a 2-core CPU. Other data: the authors' schedule (TrainConfig).
SYNTHETIC_EPOCHS = 10
# train's table without --topk: the paper's metrics (summary.json has every cut-off's).
PAPER_COLUMNS = [f"ndcg@{k}" for k in PAPER_METRICS["ndcg_ks"]] + [f"recall@{k}" for k in PAPER_METRICS["recall_ks"]]
EVAL_BATCH_SIZE = 500  # users scored at a time when --eval-batch-size is not given
# Flags that shape the result besides the data and TrainConfig (validation.TRAINING_OPTION_RULES): saved
# in run.json's "training", reused by --resume, changed only with --force. --threads and
# --eval-batch-size change only speed.
# --threads above this many per CPU only oversubscribes; tens of thousands abort torch's thread pools.
MAX_THREADS_PER_CPU = 4
# --flag -> TrainConfig field, for the hyperparameters (saved in run.json, reused by --resume).
HYPER_FLAGS = {"hidden_dim": "hidden_dim", "latent_dim": "latent_dim", "batch_size": "batch_size",
               "epochs": "n_epochs", "n_enc_epochs": "n_enc_epochs", "n_dec_epochs": "n_dec_epochs", "lr": "lr",
               "gamma": "gamma", "beta": "beta", "dropout_rate": "dropout_rate",
               "not_alternating": "not_alternating", "fc1_grad": "sparse_fc1_grad", "seed": "seed",
               "device": "device", "precision": "precision"}


class UsageError(Exception):
    """Bad input from the command line: reported in one line, no traceback."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------- data


def _data_options(args) -> dict:
    """The data flags given on the command line (None: not given)."""
    return {name: getattr(args, name, None) for name in DATA_OPTIONS}


def _check_data_options(options: dict) -> None:
    for name in ("min_items", "heldout_users"):
        value = options.get(name)
        if value is not None and value < 1:
            raise UsageError(f"{_flag(name)} must be >= 1, got {value}")
    if options.get("min_users_per_item") is not None and options["min_users_per_item"] < 0:
        raise UsageError(f"--min-users-per-item must be >= 0, got {options['min_users_per_item']}")
    if options.get("data_seed") is not None and options["data_seed"] < 0:
        raise UsageError(f"--data-seed must be >= 0, got {options['data_seed']}")
    threshold = options.get("rating_threshold")
    if threshold is not None and not math.isfinite(threshold):
        raise UsageError(f"--rating-threshold must be a finite number, got {threshold}")


def _source(data: str) -> str:
    """'synthetic' or the data file's absolute path (checked to exist)."""
    if data == "synthetic":
        return data
    path = Path(data)
    if not path.is_file():
        raise UsageError(f"data file not found: {data}" if not path.exists() else f"data path is not a file: {data}")
    return str(path.resolve())


def _load_data(source: str, options: dict, *, rating_threshold="from options") -> data_mod.Interactions:
    if source == "synthetic":
        return data_mod.synthetic_dataset(seed=options.get("data_seed") or 0)
    threshold = options.get("rating_threshold") if rating_threshold == "from options" else rating_threshold
    return data_mod.load_interactions(
        source, sep=options.get("sep"), user_col=options.get("user_col"), item_col=options.get("item_col"),
        rating_col=options.get("rating_col"), rating_threshold=threshold,
    )


def _make_split(source: str, options: dict, seed: int) -> data_mod.Split:
    interactions = data_mod.preprocess(_load_data(source, options), min_items_per_user=options["min_items"],
                                       min_users_per_item=options.get("min_users_per_item") or 0)
    if options["heldout_users"] is None:
        options["heldout_users"] = max(1, interactions.matrix.shape[0] // 10)
    return data_mod.split_strong_generalization(interactions, n_heldout_users=options["heldout_users"], seed=seed)


# ----------------------------------------------------------------------------- train


def _given_hyperparameters(args) -> dict:
    """TrainConfig fields given on the command line."""
    given = {}
    for flag, name in HYPER_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            given[name] = _FC1_GRAD[value] if flag == "fc1_grad" else value
    if "beta" in given and "gamma" not in given:
        given["gamma"] = None  # --beta replaces the default gamma
    return given


def _training_options(args) -> dict:
    """run.json's "training": patience and the metric cut-offs of this run (validation.TRAINING_OPTION_RULES)."""
    return {"patience": args.patience, "topk": list(args.topk) if args.topk is not None else None}


def _setting_text(value) -> str:
    """A setting as given on the command line: --topk's cut-offs as 10,100."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _resume_settings(out: Path, args, item_shards: int | None = None) -> tuple[str, dict, dict, dict]:
    """(source, data options, hyperparameters, run.json) of the run in `out`, with the flags given
    now; refuses flags that differ from the run's (only --epochs may change, and with --force
    --patience and --topk) and another number of item shards (None: a single-process run). Sets
    args.patience and args.topk to the run's unless given (a run.json written before they were
    saved: the flags given now, or their defaults, as resume then did)."""
    if not (out / RUN_NAME).is_file():
        raise UsageError(f"--resume: {out} holds no run to continue (no {RUN_NAME})")
    saved = read_json(out / RUN_NAME)
    source, options, config = check_run_description(saved, out / RUN_NAME, RUN_FORMAT, TrainConfig.__dataclass_fields__)
    config.setdefault("precision", DEFAULT_PRECISION)  # a run.json written before the flag existed ran in float32
    try:
        TrainConfig(**config).validate()
    except (TypeError, ValueError) as exc:
        raise RunFolderError(f"{out / RUN_NAME}: config: {_one_line(exc)}") from None
    if saved.get("item_shards") != item_shards:
        trained, now = (f"--item-shards {n} under torchrun" if n else "one process, without --item-shards"
                        for n in (saved.get("item_shards"), item_shards))
        raise UsageError(f"--resume: {out} was trained with {trained}, not {now}; resume it the same way")
    differ = []
    if args.data is not None and _source(args.data) != source:
        differ.append(f"data {args.data} (the run's: {source})")
    for name, value in _data_options(args).items():
        if value is not None and value != options.get(name):
            differ.append(f"{_flag(name)} {value} (the run's: {options.get(name)})")
    given = _given_hyperparameters(args)
    for flag, name in HYPER_FLAGS.items():
        if name in given and name != "n_epochs" and given[name] != config.get(name):
            differ.append(f"{_flag(flag)} {getattr(args, flag)} (the run's: {config.get(name)})")
    training = saved.get("training")  # checked by check_run_description
    if training is not None:
        saved_topk = tuple(training["topk"]) if training["topk"] is not None else None
        for name, saved_value in (("patience", training["patience"]), ("topk", saved_topk)):
            value = getattr(args, name)
            if value is None:
                setattr(args, name, saved_value)
            elif value != saved_value and not args.force:
                differ.append(f"{_flag(name)} {_setting_text(value)} (the run's: {_setting_text(saved_value)}; "
                              "--force accepts it)")
    if differ:
        raise UsageError("--resume continues a run with its own data and settings; these differ: "
                         + "; ".join(differ) + " (omit them, or train into another --out)")
    config.update(given)
    return source, options, config, saved


def cmd_train(args) -> dict:
    t0 = time.perf_counter()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if args.patience is not None and args.patience < 1:
        raise UsageError(f"--patience must be >= 1, got {args.patience}")
    if args.force and not args.resume:
        raise UsageError("--force applies to --resume only (a new run takes every flag as given)")
    item_shards = args.item_shards
    world = os.environ.get("WORLD_SIZE")
    if item_shards is None and world is not None and world.isdigit() and int(world) > 1:
        item_shards = int(world)  # under torchrun, as fit() in a process group: every process holds a shard
    if item_shards is not None and _item_shards(item_shards) is not None:
        if args.topk is not None or args.eval_batch_size is not None:
            raise UsageError("--topk and --eval-batch-size are not supported with --item-shards (the sharded "
                             "evaluation reports NDCG@100, Recall@20, Recall@50, --batch-size users at a time)")
        return _train_sharded(args, out, item_shards, t0)
    if args.resume:
        if not (out / RUN_NAME).is_file():  # checked before the lock, which would create the folder
            raise UsageError(f"--resume: {out} holds no run to continue (no {RUN_NAME})")
        with RunLock(out):  # read and check the run as it is now, not as another writer leaves it
            return _train(args, out, *_resume_settings(out, args), t0)
    options, config = _new_run_settings(args)
    return _train(args, out, _source(args.data or "synthetic"), options, config, None, t0)


def _new_run_settings(args) -> tuple[dict, dict]:
    """(data options, hyperparameters) of a new run: the flags given, with the defaults."""
    options = {name: value for name, value in _data_options(args).items()}
    options["min_items"] = 5 if options["min_items"] is None else options["min_items"]
    options["min_users_per_item"] = options["min_users_per_item"] or 0
    config = {**asdict(TrainConfig()), **_given_hyperparameters(args)}
    if (args.data or "synthetic") == "synthetic" and args.epochs is None:
        config["n_epochs"] = SYNTHETIC_EPOCHS
    return options, config


def _summary(source: str, cfg: TrainConfig, split: data_mod.Split, history: list, test: dict, t0: float,
             ks=None) -> dict:
    return {
        "data": source,
        "config": asdict(cfg),
        "users": {"train": split.train.shape[0], "valid": split.valid_in.shape[0], "test": split.test_in.shape[0]},
        "items": split.train.shape[1],
        "epochs_trained": len(history),
        "best_epoch": max(history, key=lambda r: r.get("valid_ndcg@100", -1))["epoch"] if history else None,
        "test": test,
        "popularity_test": popularity_baseline(split.train, split.test_in, split.test_out, ks=metric_cutoffs(ks)),
        "train_users_per_s": float(np.mean([r["users_per_s"] for r in history])) if history else None,
        "wall_time_s": time.perf_counter() - t0,
    }


def _data_line(split: data_mod.Split) -> str:
    """The dataset as trained (after preprocessing): users, items, interactions, density."""
    parts = (split.train, split.valid_in, split.valid_out, split.test_in, split.test_out)
    n_users = split.train.shape[0] + split.valid_in.shape[0] + split.test_in.shape[0]
    n_items, nnz = split.train.shape[1], sum(part.nnz for part in parts)
    return (f"data: {n_users:,} users ({split.train.shape[0]:,} train, {split.valid_in.shape[0]:,} validation, "
            f"{split.test_in.shape[0]:,} test), {n_items:,} items, {nnz:,} interactions, "
            f"density {nnz / max(1, n_users * n_items):.3%}")


def _checked_split(args, out: Path, source: str, options: dict, config: dict, saved_run: dict | None,
                   item_shards: int = 1):
    """(TrainConfig, split, its fingerprint) after checking the data options, the hyperparameters,
    that a resumed run's data did not change, and fit's inputs; writes nothing."""
    _check_data_options(options)
    cfg = TrainConfig(**config)
    cfg.validate()
    split = _make_split(source, options, cfg.seed)
    split_fp = split.fingerprint()
    if saved_run is not None and saved_run.get("split_fingerprint") != split_fp:
        raise UsageError(f"--resume: the data at {source} is no longer what {out} was trained on "
                         "(the file changed since the run started)")
    check_fit_inputs(split.train, split.valid_in, split.valid_out, patience=args.patience, metric_ks=args.topk,
                     eval_batch_size=_eval_batch_size(args), item_shards=item_shards, **asdict(cfg))
    return cfg, split, split_fp


def _train(args, out: Path, source: str, options: dict, config: dict, saved_run: dict | None, t0: float) -> dict:
    # 1. Validate everything: flags, data, split and the fit inputs; nothing is written yet.
    cfg, split, split_fp = _checked_split(args, out, source, options, config, saved_run)
    with RunLock(out):
        check_regular_files(out, RUN_FILES)
        # 2. Describe a new run (refusing to overwrite another), then train, then the results.
        run_description = {
            "format": RUN_FORMAT, "source": source, "data": options, "config": asdict(cfg),
            "training": _training_options(args), "split_fingerprint": split_fp,
        }
        if saved_run is None and any((out / name).exists() for name in (CHECKPOINT_NAME, MODEL_NAME, SHARDED_NAME)):
            raise UsageError(f"--out {out} already holds a run: continue it with --resume, or choose another "
                             "--out (or delete that folder)")
        if saved_run is None:  # every check passed: a new run starts (a resumed one printed it when it started)
            print(_data_line(split), file=sys.stderr)
        # A run without a checkpoint has not finished an epoch: --resume or a new run starts it over,
        # writing its split files again and run.json last (the files of a run that a kill cut short
        # before its first epoch may disagree with run.json; rewriting them makes them agree).
        resume_fit = saved_run is not None and (out / CHECKPOINT_NAME).is_file()
        if not resume_fit:
            split.save(out)
            write_json(out / RUN_NAME, run_description, indent=2)
        model, history = fit(
            split.train, split.valid_in, split.valid_out, checkpoint_dir=out, resume=resume_fit,
            log_path=out / LOG_NAME, patience=args.patience, progress="epochs" if args.no_progress else True,
            metric_ks=args.topk, eval_batch_size=_eval_batch_size(args), **asdict(cfg),
        )
        if saved_run is not None:  # the new n_epochs, once fit has accepted the checkpoint
            write_json(out / RUN_NAME, run_description, indent=2)
        save_tensors(model.state_dict(), out / MODEL_NAME)
        # The test metrics at the popularity baseline's cut-offs (the table shows the paper's unless --topk).
        test = evaluate(model, split.test_in, split.test_out, batch_size=_eval_batch_size(args),
                        ks=metric_cutoffs(args.topk), precision=cfg.precision)
        summary = _summary(source, cfg, split, history, test, t0, ks=args.topk)
        write_json(out / SUMMARY_NAME, summary, indent=2)
    return summary


# ----------------------------------------------------------------------------- train --item-shards (torchrun)


def _item_shards(shards: int) -> int | None:
    """The number of item shards to train with, checked against torchrun's world size (None: one
    shard without torchrun, which is the ordinary single-process run)."""
    if shards < 1:
        raise UsageError(f"--item-shards must be >= 1, got {shards}")
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        if shards > 1:
            raise UsageError(f"--item-shards {shards} needs one process per shard: launch with "
                             f"torchrun --nproc-per-node N -m recvae_fast train ... (N a multiple of {shards})")
        return None
    if int(world) % shards != 0:
        raise UsageError(f"--item-shards {shards} must divide the number of torchrun processes ({world}); "
                         "processes / item shards is the data-parallel size")
    return shards


def _agree(error: BaseException | None) -> None:
    """Every rank stops if any rank failed its checks: the failing ranks with their own error, the
    others with one naming them (as a UsageError: exit 2 on every rank)."""
    from .distributed.training import agree

    try:
        agree(error)
    except RuntimeError as exc:
        if exc is error:
            raise
        raise UsageError(str(exc)) from None


def _train_sharded(args, out: Path, item_shards: int, t0: float) -> dict | None:
    """train under torchrun: every rank reads the data, makes the same split and checks it; rank 0
    alone holds the run folder's lock and writes its files. Returns the summary on rank 0, None on
    the others."""
    import torch.distributed as dist

    from .distributed import evaluate_sharded, fit_sharded, gather_full_state_dict, init_distributed
    from .distributed.checkpoint import latest_checkpoint

    device = args.device
    if device is None and args.resume:  # the run's own device (its run.json is checked later, on every rank)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            device = read_json(out / RUN_NAME)["config"]["device"]
    # gloo for CPU tensors even where CUDA exists; NCCL for a GPU run.
    init_distributed("gloo" if str(device or TrainConfig().device).startswith("cpu") else "nccl",
                     timeout=timedelta(minutes=10))
    try:
        is_writer = dist.get_rank() == 0
        sharded_dir = out / SHARDED_NAME
        with contextlib.ExitStack() as lock:
            error = None
            try:
                if args.resume:
                    if is_writer:
                        lock.enter_context(RunLock(out))
                    source, options, config, saved_run = _resume_settings(out, args, item_shards)
                else:
                    options, config = _new_run_settings(args)
                    source, saved_run = _source(args.data or "synthetic"), None
                cfg, split, split_fp = _checked_split(args, out, source, options, config, saved_run, item_shards)
                if is_writer and saved_run is None:
                    lock.enter_context(RunLock(out))
                    if any((out / name).exists() for name in (CHECKPOINT_NAME, MODEL_NAME, SHARDED_NAME)):
                        raise UsageError(f"--out {out} already holds a run: continue it with --resume, or choose "
                                         "another --out (or delete that folder)")
            except (UsageError, ValueError, RunFolderBusy, OSError) as exc:
                error = exc
            _agree(error)
            if is_writer and saved_run is None:
                print(_data_line(split), file=sys.stderr)

            run_description = {
                "format": RUN_FORMAT, "source": source, "data": options, "config": asdict(cfg),
                "training": _training_options(args), "split_fingerprint": split_fp, "item_shards": item_shards,
            }
            # As _train: before a first complete checkpoint, the run starts over with fresh files.
            resume_fit = saved_run is not None and latest_checkpoint(sharded_dir) is not None
            if is_writer and not resume_fit:
                split.save(out)
                write_json(out / RUN_NAME, run_description, indent=2)
                atomic_write_text(out / LOG_NAME, "")
            model = fit_sharded(split.train, split.valid_in, split.valid_out, item_shards=item_shards,
                                checkpoint_dir=sharded_dir, resume=resume_fit, log_path=out / LOG_NAME,
                                patience=args.patience, progress="epochs" if args.no_progress else True,
                                **asdict(cfg))
            test = evaluate_sharded(model, split.test_in, split.test_out, batch_size=cfg.batch_size,
                                    ks=metric_cutoffs(None))
            full_state = gather_full_state_dict(model)
            summary = None
            if is_writer:
                if saved_run is not None:  # the new n_epochs, once fit_sharded has accepted the checkpoint
                    write_json(out / RUN_NAME, run_description, indent=2)
                save_tensors(full_state, out / MODEL_NAME)
                history = [{**r, "users_per_s": _users_per_epoch(cfg, split) / r["train_time_s"]}
                           for r in model.history]
                summary = {**_summary(source, cfg, split, history, test, t0), "item_shards": item_shards,
                           "processes": dist.get_world_size()}
                write_json(out / SUMMARY_NAME, summary, indent=2)
            dist.barrier()  # the others finish once rank 0's files are written
        return summary
    finally:
        dist.destroy_process_group()


def _users_per_epoch(cfg: TrainConfig, split: data_mod.Split) -> int:
    passes = 1 if cfg.not_alternating else cfg.n_enc_epochs + cfg.n_dec_epochs
    return split.train.shape[0] * passes


# ----------------------------------------------------------------------------- evaluate, recommend


def _load_run(run_dir: str):
    """(run folder, model, item id map, run.json) of a finished run; every file read safely."""
    trained = load_run(run_dir)
    return trained.folder, trained.model, trained.items, trained.description


def _scoring_precision(args, description: dict) -> str:
    """--precision, or the precision the run was trained in (run.json), or float32."""
    if args.precision is not None:
        return args.precision
    config = description.get("config")
    saved = config.get("precision", DEFAULT_PRECISION) if isinstance(config, dict) else DEFAULT_PRECISION
    if saved not in PRECISIONS:
        raise RunFolderError(f"run.json names an unknown precision {saved!r}")
    return saved


def cmd_evaluate(args) -> dict:
    run, model, _, description = _load_run(args.run)
    split = data_mod.Split.load(run)  # validated: array kinds, CSR structure, ids (DataError naming the file)
    if split.n_items != model.input_dim:
        raise RunFolderError(f"{run / SPLIT_NAME} has {split.n_items} items, {run / MODEL_NAME} {model.input_dim}")
    fold_in, heldout = (split.test_in, split.test_out) if args.split == "test" else (split.valid_in, split.valid_out)
    return {args.split: evaluate(model, fold_in, heldout, batch_size=_eval_batch_size(args), ks=args.topk,
                                 precision=_scoring_precision(args, description))}


def _check_output(output: Path, inputs: list[Path]) -> None:
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder")
    for path in inputs:
        if output.resolve() == path.resolve():
            raise UsageError(f"--output {output} would overwrite an input ({path})")


def _top_k_excluding(model, inputs: sp.csr_matrix, seen: sp.csr_matrix, k: int, chunk_users: int = 500,
                     precision: str = DEFAULT_PRECISION):
    """recommend() on `inputs` with every item of `seen` excluded (seen ⊇ inputs' items): each chunk
    of users asks for k + its largest count of seen-but-not-input items, which are then dropped."""
    n_users, n_items = inputs.shape
    scores = np.full((n_users, k), -np.inf, dtype=np.float32)
    items = np.full((n_users, k), -1, dtype=np.int64)
    extra = seen - seen.multiply(inputs.astype(bool))  # seen items the model input does not hold
    extra.eliminate_zeros()
    extra_counts = np.diff(extra.indptr)
    for start in range(0, n_users, chunk_users):
        rows = slice(start, min(start + chunk_users, n_users))
        fetch = min(n_items, k + int(extra_counts[rows].max(initial=0)))
        top = recommend(model, inputs[rows], k=fetch, exclude_seen=True, batch_size=chunk_users, precision=precision)
        chunk_seen = seen[rows]
        for r in range(top.items.shape[0]):
            own = set(chunk_seen.indices[chunk_seen.indptr[r] : chunk_seen.indptr[r + 1]].tolist())
            keep = [j for j in range(fetch) if top.items[r, j] >= 0 and top.items[r, j] not in own][:k]
            scores[start + r, : len(keep)] = top.scores[r, keep]
            items[start + r, : len(keep)] = top.items[r, keep]
    return scores, items


NEW_USER = "new"  # the user column of recommend --items' output


def _recommend_inputs(options: dict, source: str, items) -> tuple[sp.csr_matrix, sp.csr_matrix, list, dict]:
    """(model input, seen items, user ids, counts of what was left out) of recommend's data file.
    Seen: every interaction of the user in the file, whatever its rating. The model's input: the
    same, or with a rating column and a --rating-threshold, the ratings above it as 1 (as the run
    was trained)."""
    if source == "synthetic":
        rated = False
    else:
        rated = data_mod.has_rating_column(source, sep=options.get("sep"), user_col=options.get("user_col"),
                                           item_col=options.get("item_col"), rating_col=options.get("rating_col"))
    threshold = options.get("rating_threshold") if rated else None
    interactions = _load_data(source, options, rating_threshold=None)  # every interaction: what "seen" means
    source_cols = items.index(interactions.item_ids, strict=False)  # -1: an item the model does not know
    coo = interactions.matrix.tocoo()
    known = source_cols[coo.col] >= 0
    shape = (interactions.matrix.shape[0], len(items))
    seen = sp.csr_matrix((coo.data[known], (coo.row[known], source_cols[coo.col[known]])), shape=shape,
                         dtype=np.float32)
    if threshold is None:
        inputs = seen
    else:  # as in training: ratings above the threshold, as 1
        inputs = (seen > threshold).astype(np.float32).tocsr()
        inputs.eliminate_zeros()
    counts = {"unknown_items": int((source_cols < 0).sum()),
              "unknown_item_interactions": int((~known).sum()),
              "rating_threshold": threshold,
              "interactions_at_or_below_threshold": int(seen.nnz - inputs.nnz)}
    return inputs, seen, interactions.user_ids.tolist(), counts


def _check_histories(inputs: sp.csr_matrix, user_ids: list, counts: dict, skip: bool) -> np.ndarray:
    """The rows of users with at least one item for the model; the others are refused (a model
    input without items gives only the generic list), or with `skip` left out and counted."""
    empty = np.flatnonzero(np.diff(inputs.indptr) == 0)
    if empty.size and not skip:
        why = "every item unknown to the run"
        if counts.get("rating_threshold") is not None:
            why += f" or rated at or below --rating-threshold {counts['rating_threshold']:g}"
        shown = ", ".join(repr(user_ids[r]) for r in empty[:5]) + (f" and {empty.size - 5} more" if empty.size > 5
                                                                     else "")
        raise UsageError(f"{empty.size} of {len(user_ids)} users have no item the model can use ({why}): {shown}; "
                         "leave them out, or pass --skip-users-without-items")
    counts["users_without_items_skipped"] = int(empty.size)
    return np.flatnonzero(np.diff(inputs.indptr) > 0)


def cmd_recommend(args) -> dict:
    """Recommendations for the users of a data file (by default the run's own) or, with --items,
    for one new user. The file's layout flags default to the run's for the run's own file, and are
    detected for another file; --rating-threshold (default: the run's) applies only to a file with
    a rating column."""
    run, model, items, description = _load_run(args.run)
    if args.k > len(items):
        raise UsageError(f"--k {args.k} is larger than the catalogue ({len(items)} items)")
    if args.items is not None and args.data is not None:
        raise UsageError("give either a data file or --items, not both")
    run_options = dict(description.get("data") or {})
    source = _source(args.data) if args.data is not None else description.get("source")
    if args.items is not None:
        source = "--items"
    elif source != description.get("source"):  # another file: its own layout, detected (or given now)
        run_options = {name: value for name, value in run_options.items() if name not in LAYOUT_OPTIONS}
    options = {**run_options, **{name: value for name, value in _data_options(args).items() if value is not None}}
    _check_data_options(options)
    output = Path(args.output)
    _check_output(output, [run / name for name in RUN_FILES]
                  + ([Path(source)] if source not in ("synthetic", "--items") else []))
    if args.items is not None:
        history = [part.strip() for part in args.items.split(",") if part.strip()]
        inputs, unknown = histories_matrix(items, [history])
        seen, user_ids = inputs, [NEW_USER]
        counts = {"unknown_items": len(set(unknown[0])), "unknown_item_ids": unknown[0][:20]}
        if inputs.nnz == 0:
            what = f"only item ids the run does not know: {', '.join(unknown[0][:5])}" if history else "no item ids"
            raise UsageError(f"--items has {what}; nothing to recommend from")
    else:
        inputs, seen, user_ids, counts = _recommend_inputs(options, source, items)
        rows = _check_histories(inputs, user_ids, counts, args.skip_users_without_items)
        if rows.size < len(user_ids):
            inputs, seen, user_ids = inputs[rows], seen[rows], [user_ids[r] for r in rows]
    precision = _scoring_precision(args, description)
    if args.include_seen:
        scores, ids = recommend(model, inputs, k=args.k, exclude_seen=False, batch_size=_eval_batch_size(args),
                                precision=precision)
    else:
        scores, ids = _top_k_excluding(model, inputs, seen, args.k, chunk_users=_eval_batch_size(args),
                                       precision=precision)

    item_ids = items.to_list()

    def write(f):
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        writer = csv.writer(text)
        writer.writerow(["user", "item", "rank", "score"])
        for row, user in enumerate(user_ids):
            for rank in range(args.k):
                if ids[row, rank] < 0:
                    break
                writer.writerow([user, item_ids[ids[row, rank]], rank + 1, f"{scores[row, rank]:.6g}"])
        text.flush()
        text.detach()

    output.parent.mkdir(parents=True, exist_ok=True)
    write_output(output, write)
    return {"users": len(user_ids), "k": args.k, "data": source, **counts, "output": str(output)}


# ----------------------------------------------------------------------------- parser, error boundary


# ----------------------------------------------------------------------------- report, export


def cmd_report(args) -> dict:
    try:
        from .report import write_report
    except ImportError as exc:  # matplotlib is an optional extra
        raise UsageError(f"report needs matplotlib: pip install 'recvae_fast[report]' ({exc})") from exc
    return {name: str(path) for name, path in write_report(args.run).items()}


def cmd_export(args) -> dict:
    from .export import export_scorer

    run, model, items, description = _load_run(args.run)
    if args.k > len(items):
        raise UsageError(f"--k {args.k} is larger than the catalogue ({len(items)} items)")
    precision = _scoring_precision(args, description)
    output = Path(args.output)
    _check_output(output, [run / name for name in RUN_FILES])
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: folder {output.parent} does not exist")
    export_scorer(model, output, k=args.k, precision=precision)
    return {"output": str(output), "k": args.k, "items": len(items), "precision": precision,
            "note": "columns are the run's items.json positions; load with recvae_fast.export.load_scorer "
                    "or torch.export.load"}


# ----------------------------------------------------------------------------- tune


def cmd_tune(args) -> dict:
    """The search (recvae_fast.tune) on train's split of the data; then the best trial trained into
    OUT/trial-N as `train` would, and evaluated on the test users, once."""
    t0 = time.perf_counter()
    try:
        import_optuna()
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    for name in ("trials", "jobs", "heartbeat"):
        if getattr(args, name) < 1:
            raise UsageError(f"{_flag(name)} must be >= 1, got {getattr(args, name)}")
    out = Path(args.out)
    options, config = _new_run_settings(args)  # the search space sets the other hyperparameters
    source = _source(args.data)
    cfg, split, _ = _checked_split(args, out, source, options, config, None)
    result = tune(split, out, args.trials, space=args.space, config=asdict(cfg), storage=args.storage,
                  study_name=args.study_name, n_jobs=args.jobs, eval_batch_size=_eval_batch_size(args),
                  progress="trials" if args.no_progress else True, heartbeat_s=args.heartbeat)
    best = out / f"trial-{result.best_trial}"
    with RunLock(best, wait_s=600):  # another worker of the study may be training it
        summary = read_json(best / SUMMARY_NAME) if (best / SUMMARY_NAME).is_file() else _train(
            args, best, source, options, result.best_config,
            read_json(best / RUN_NAME) if (best / RUN_NAME).is_file() else None, time.perf_counter())
    record = {**result.record(), "best_run": str(best), "test": summary["test"],
              "popularity_test": summary["popularity_test"], "wall_time_s": time.perf_counter() - t0}
    with RunLock(out, wait_s=600):
        write_json(out / TUNE_NAME, record, indent=2)
    return {**record, "table": result.table}


def _render_tune(result: dict, args) -> str:
    if args.json:
        return json.dumps({key: value for key, value in result.items() if key != "table"}, indent=2)
    return (result["table"] + f"\n\nbest: trial {result['best_trial']}, valid NDCG@100 {result['best_value']:.4f}; "
            f"its run folder {result['best_run']}, test metrics ({result['test']['n_users']} users; "
            f"{timedelta_text(result['wall_time_s'])} in all):\n"
            + metrics_table({"RecVAE": result["test"], "popularity": result["popularity_test"]})
            + f"\nall figures: {Path(args.out) / TUNE_NAME}")


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default. Flags whose parsed default is None ("not given",
    which --resume tells from the run's own settings) state their default in their help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required and action.option_strings:
            return text + " (required)"
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS):
            return text
        if action.default is False:
            return text + " (default: off)"
        return text + " (default: %(default)s)"


def _add_data_options(p: argparse.ArgumentParser, *, detected: str = "detected",
                      threshold_default: str = "keep every interaction, with its value") -> None:
    p.add_argument("--sep", default=None, help=f"field separator of the ratings file (default: {detected})")
    p.add_argument("--user-col", default=None, help=f"user column name (default: {detected})")
    p.add_argument("--item-col", default=None, help=f"item column name (default: {detected})")
    p.add_argument("--rating-col", default=None,
                   help=f"rating column name, or none for a file without one (default: {detected})")
    p.add_argument("--rating-threshold", type=float, default=None,
                   help=f"keep ratings > this, as 1 (the paper uses 3.5) (default: {threshold_default})")
    p.add_argument("--data-seed", type=int, default=None, help="seed of the synthetic dataset (default: 0)")


def _add_precision_option(p: argparse.ArgumentParser, default_text: str) -> None:
    # Checked by _check_common_options (one line listing the choices), not by argparse's choices.
    p.add_argument("--precision", default=None, metavar="{" + ",".join(PRECISIONS) + "}",
                   help="32-true (float32) or bf16-mixed (bf16 products with float32 accumulation, float32 "
                        "softmax, KL, LayerNorm statistics, weights and optimiser; fast only with AMX, "
                        f"AVX512-BF16 or a GPU's tensor cores, slower elsewhere) (default: {default_text})")


def _add_evaluation_options(p: argparse.ArgumentParser, *, topk: bool = True) -> None:
    if topk:
        p.add_argument("--topk", default=None, metavar="K[,K...]",
                       help="metric cut-offs, e.g. 10,20,50,100: NDCG@k and Recall@k at each k; 100 is always "
                            "added, since validation NDCG@100 picks the best epoch (default: the paper's "
                            "NDCG@100, Recall@20, Recall@50)")
    p.add_argument("--eval-batch-size", type=int, default=None,
                   help=f"users scored at a time (default: {EVAL_BATCH_SIZE})")
    p.add_argument("--threads", type=int, default=None,
                   help=f"CPU threads for torch, torch.set_num_threads (default: torch's choice, "
                        f"{torch.get_num_threads()} on this machine)")


def _add_split_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-items", type=int, default=None, help="drop users with fewer items than this (default: 5)")
    p.add_argument("--min-users-per-item", type=int, default=None,
                   help="first drop items with fewer users than this, then users with fewer than --min-items "
                        "items (default: 0: keep every item)")
    p.add_argument("--heldout-users", type=int, default=None,
                   help="validation users, and as many test users (default: 10%% of the users)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recvae-fast", description="Train, evaluate and use RecVAE.",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    d = TrainConfig()

    def add_command(name: str, help_text: str):
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)

    p = add_command("train", "train on a dataset (default: the embedded synthetic one), then print its test "
                             "metrics next to the popularity baseline's")
    p.add_argument("data", nargs="?", default=None,
                   help="'synthetic' or a ratings file (CSV/TSV/.inter/Parquet) (default: synthetic, or with "
                        "--resume the run's own)")
    p.add_argument("--out", required=True, help="run folder for the model, split, checkpoint and logs")
    _add_data_options(p)
    _add_split_options(p)
    # Hyperparameters default to None: "not given", so that --resume can tell them from the run's.
    p.add_argument("--hidden-dim", type=int, default=None, help=f"encoder hidden layer width (default: {d.hidden_dim})")
    p.add_argument("--latent-dim", type=int, default=None, help=f"latent dimension (default: {d.latent_dim})")
    p.add_argument("--batch-size", type=int, default=None, help=f"training users per step (default: {d.batch_size})")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs to train; with --resume: train up to this (default: {d.n_epochs}, the authors'; "
                        f"{SYNTHETIC_EPOCHS} on the synthetic dataset)")
    p.add_argument("--n-enc-epochs", type=int, default=None,
                   help=f"encoder passes over the users per epoch (default: {d.n_enc_epochs})")
    p.add_argument("--n-dec-epochs", type=int, default=None,
                   help=f"decoder passes over the users per epoch (default: {d.n_dec_epochs})")
    p.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default: {d.lr})")
    p.add_argument("--gamma", type=float, default=None, help=f"KL weight gamma * n_u (default: {d.gamma})")
    p.add_argument("--beta", type=float, default=None,
                   help="constant KL weight, replacing gamma (default: none, gamma is used)")
    p.add_argument("--dropout-rate", type=float, default=None,
                   help=f"input dropout of the encoder passes (default: {d.dropout_rate})")
    p.add_argument("--not-alternating", action="store_true", default=None,
                   help="step encoder and decoder together, one pass per epoch (default: off, they alternate)")
    p.add_argument("--fc1-grad", choices=sorted(_FC1_GRAD), default=None,
                   help="fc1 gradient layout: row-sparse (with an exact row-sparse Adam) or dense; auto picks "
                        "row-sparse on the CPU for large catalogues (default: auto)")
    p.add_argument("--seed", type=int, default=None, help=f"split and training seed, >= 0 (default: {d.seed})")
    p.add_argument("--device", default=None, help=f"cpu, cuda, cuda:1, ... (default: {d.device})")
    _add_precision_option(p, f"{d.precision}, or with --resume the run's own")
    p.add_argument("--patience", type=int, default=None,
                   help="stop when validation NDCG@100 has not improved for this many epochs (default: off)")
    _add_evaluation_options(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out with its data and settings (--epochs may raise its epochs)")
    p.add_argument("--force", action="store_true",
                   help="with --resume: accept a --patience or --topk other than the run's (its data and "
                        "hyperparameters cannot change)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars; one line per epoch still goes to stderr")
    p.add_argument("--json", action="store_true", help="print summary.json's content instead of the table")
    p.add_argument("--item-shards", type=int, default=None,
                   help="split the model by items over this many processes; launch with torchrun --nproc-per-node "
                        "N -m recvae_fast train ... (S must divide N; N / S is the data-parallel size). "
                        "Default: without torchrun one process, not sharded; under torchrun N (every process "
                        "holds a shard)")
    p.set_defaults(run_command=cmd_train, render=_render_train)

    p = add_command("evaluate", "metrics of a trained run on its saved split (JSON)")
    p.add_argument("run", help="run folder written by train")
    p.add_argument("--split", choices=["test", "valid"], default="test", help="the users to score")
    _add_evaluation_options(p)
    _add_precision_option(p, "the run's own")
    p.set_defaults(run_command=cmd_evaluate)

    p = add_command("recommend", "top-k items per user to CSV, with original ids: for the users of a file "
                                 "(user,item[,rating]), or for one new user given by --items")
    p.add_argument("run", help="run folder written by train")
    p.add_argument("data", nargs="?", default=None,
                   help="the users' interactions, 'synthetic' or a file of user,item[,rating] rows "
                        "(default: the run's own data)")
    p.add_argument("--items", default=None, metavar="ID[,ID...]",
                   help=f"instead of a file: the item ids of one new user (written as user {NEW_USER!r}); "
                        "ids the run does not know are counted and left out (default: none, the users of the "
                        "data file)")
    _add_data_options(p, detected="the run's for its own file, else detected",
                      threshold_default="the run's; it applies only to a file with a rating column, "
                                        "never to --items or a file of user,item pairs")
    p.add_argument("--k", type=int, default=100, help="items per user")
    p.add_argument("--output", required=True, help="CSV file to write (user,item,rank,score); not an input")
    p.add_argument("--include-seen", action="store_true",
                   help="also recommend items the user already has (seen: any rating in the data)")
    p.add_argument("--skip-users-without-items", action="store_true",
                   help="leave out (and count) the users left with no item the model knows, instead of refusing "
                        "the file")
    _add_evaluation_options(p, topk=False)
    _add_precision_option(p, "the run's own")
    p.set_defaults(run_command=cmd_recommend)

    p = add_command("report", "report.png (validation metrics and losses per epoch) and report.md in RUN")
    p.add_argument("run", help="run folder written by train")
    p.set_defaults(run_command=cmd_report)

    p = add_command("export", "the scoring path (fold-in items -> masked top-k) as a torch.export .pt2")
    p.add_argument("run", help="run folder written by train")
    p.add_argument("--output", required=True, help="the .pt2 file to write (its folder must exist)")
    p.add_argument("--k", type=int, default=100, help="items returned per user")
    _add_precision_option(p, "the run's own")
    p.set_defaults(run_command=cmd_export)

    p = add_command("tune", "search hyperparameters with Optuna on one stored split (validation users), then train "
                            "the best trial into a run folder and print its test metrics (pip install -e \".[tune]\")")
    p.add_argument("data", nargs="?", default="synthetic", help="'synthetic' or a ratings file, as for train")
    p.add_argument("--out", required=True, help="study folder: split, study.db, trials.csv, plots, best trial's run")
    p.add_argument("--trials", type=int, default=30, help="finished (complete or pruned) trials the study ends with")
    p.add_argument("--space", default=None, help="JSON/TOML/YAML file overriding the search space (default: "
                                                 "recvae_fast.tuning.DEFAULT_SPACE)")
    p.add_argument("--storage", default=None, help="Optuna RDB URL of the study (default: sqlite:///OUT/study.db)")
    p.add_argument("--study-name", default="recvae", help="the study's name in the storage")
    p.add_argument("--jobs", type=int, default=1, help="worker processes; more may join with the same command")
    p.add_argument("--heartbeat", type=int, default=10,
                   help="seconds between a running trial's heartbeats; a trial silent for twice as long is rerun")
    _add_data_options(p)
    _add_split_options(p)
    p.add_argument("--seed", type=int, default=None, help=f"split and training seed, >= 0 (default: {d.seed})")
    p.add_argument("--device", default=None, help=f"cpu, cuda, cuda:1, ... (default: {d.device})")
    _add_precision_option(p, d.precision)
    _add_evaluation_options(p, topk=False)
    p.add_argument("--no-progress", action="store_true", help="no progress bars; one line per trial still")
    p.add_argument("--json", action="store_true", help="print tune.json's content instead of the tables")
    # train's other flags, unset: the run folder code of train reads them. A hyperparameter flag of
    # train added here (as --seed, --device and --precision are) reaches every trial through _new_run_settings.
    p.set_defaults(run_command=cmd_tune, render=_render_tune, patience=None, topk=None,
                   **{flag: None for flag in HYPER_FLAGS if flag not in ("seed", "device", "precision")})
    return parser


def _parse_topk(text: str) -> tuple[int, ...]:
    """--topk "10,20,50" -> (10, 20, 50, 100): distinct positive cut-offs, ascending, with 100."""
    try:
        ks = [int(part) for part in text.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) <= 0:
        raise UsageError(f"--topk must be positive integers separated by commas, e.g. 10,20,50,100; got {text!r}")
    return tuple(sorted(set(ks) | {SELECTION_K}))


def _check_common_options(args) -> None:
    """The options several commands share, checked (and --topk parsed) before a command runs."""
    if getattr(args, "k", 1) <= 0:
        raise UsageError(f"--k must be positive, got {args.k}")
    for name in ("eval_batch_size", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"{_flag(name)} must be >= 1, got {value}")
    cpus = os.cpu_count() or 1
    if getattr(args, "threads", None) is not None and args.threads > MAX_THREADS_PER_CPU * cpus:
        raise UsageError(f"--threads must be at most {MAX_THREADS_PER_CPU * cpus} ({MAX_THREADS_PER_CPU} per CPU of "
                         f"the {cpus} here), got {args.threads}")
    if getattr(args, "topk", None) is not None:
        args.topk = _parse_topk(args.topk)
    if getattr(args, "precision", None) is not None:
        try:
            check_precision(args.precision)
        except ValueError as exc:
            raise UsageError(f"--precision: {exc}") from None


def _eval_batch_size(args) -> int:
    return EVAL_BATCH_SIZE if args.eval_batch_size is None else args.eval_batch_size


def _metric_label(key: str) -> str:
    name, _, k = key.partition("@")
    return {"ndcg": "NDCG", "recall": "Recall"}.get(name, name) + "@" + k


def metrics_table(rows: dict[str, dict], columns: list[str] | None = None) -> str:
    """A plain-text table: one row per model, a column per metric in `columns` (default: those of
    the first row, n_users left out)."""
    columns = columns or [key for key in next(iter(rows.values())) if key != "n_users"]
    lines = [["model", *map(_metric_label, columns)]]
    for name, metrics in rows.items():
        lines.append([name, *(f"{metrics[c]:.4f}" if isinstance(metrics.get(c), float) else "-" for c in columns)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    # The model names left-aligned, the figures right-aligned.
    return "\n".join("  ".join([line[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(line[1:], widths[1:]))])
                     for line in lines)


def _render_train(summary: dict, args) -> str:
    """train's printout: the test metrics of RecVAE and of the popularity baseline as a table."""
    if args.json:
        return json.dumps(summary, indent=2)
    best = f"best epoch {summary['best_epoch']} of {summary['epochs_trained']}" if summary["best_epoch"] else \
        f"{summary['epochs_trained']} epochs"
    return (f"test metrics ({summary['test']['n_users']} users; {best}; "
            f"{timedelta_text(summary['wall_time_s'])}):\n"
            + metrics_table({"RecVAE": summary["test"], "popularity": summary["popularity_test"]},
                            None if args.topk else PAPER_COLUMNS)
            + f"\nall figures: {Path(args.out) / SUMMARY_NAME}")


def _render_json(result: dict, args) -> str:
    return json.dumps(result, indent=2)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    threads_before = torch.get_num_threads()  # restored at the end: main() may run inside a Python process
    try:
        _check_common_options(args)
        if getattr(args, "threads", None) is not None:
            torch.set_num_threads(args.threads)
        result = args.run_command(args)
    except KeyboardInterrupt:
        how = ("a study keeps its finished trials; the same command continues it" if args.command == "tune"
               else "a run folder keeps its last finished epoch; continue with --resume")
        print(f"recvae-fast: interrupted ({how})", file=sys.stderr)
        return 130
    except (UsageError, ValueError, RunFolderBusy, OSError) as exc:  # ValueError covers DataError, RunFolderError
        print(f"recvae-fast: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads_before)
    if result is not None:  # None: a rank other than 0 of a torchrun job
        try:
            print(getattr(args, "render", _render_json)(result, args), flush=True)
        except BrokenPipeError:  # the reader stopped early (`| head`): no traceback, nothing more to write
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at the interpreter's exit
            return 141  # as a process ended by SIGPIPE
    return 0


if __name__ == "__main__":
    sys.exit(main())
