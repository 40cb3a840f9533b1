"""Training into a run folder (its files and guarantees: recvae_fast.runfolder), one protocol for
one process and for every rank of an item-sharded torchrun job:

1. validate everything (flags, data, split, fit's inputs; a resumed run's run.json under the lock),
   writing nothing; on a sharded job every rank stops if any rank failed;
2. the writer locks the folder, refuses one that holds another run, and (re)starts a run that has
   no checkpoint yet with its split, run.json and an empty log;
3. train (resuming from the checkpoint when there is one), then write run.json (a resumed run: its
   new epochs), model.pt, the test metrics and summary.json, each atomically.

How the model is trained is a Training, so that the protocol is independent of the training API.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from .. import data as data_mod
from ..metrics import metric_cutoffs, popularity_baseline
from ..runfolder import (
    CHECKPOINT_NAME, ITEMS_NAME, LOG_NAME, MODEL_NAME, RUN_FORMAT, RUN_NAME, SPLIT_NAME, SUMMARY_NAME, USERS_NAME,
    RunLock, check_regular_files, save_tensors, write_json,
)
from ..atomic import atomic_write_text
from ..training import TrainConfig
from .errors import EXPECTED_ERRORS, UsageError
from .settings import RunSettings, checked_split, resume_settings, training_options

RUN_FILES = (MODEL_NAME, CHECKPOINT_NAME, ITEMS_NAME, USERS_NAME, RUN_NAME, SPLIT_NAME, LOG_NAME, SUMMARY_NAME)
SHARDED_NAME = "sharded"  # the DCP checkpoints of a run trained with --item-shards


class Training(Protocol):
    """How a run folder's model is trained and tested: in this process, or as one rank of a sharded job."""

    item_shards: int | None  # run.json's "item_shards" (None: one process)
    is_writer: bool  # this process writes the run folder (rank 0 of a sharded job)

    def has_checkpoint(self, out: Path) -> bool:
        """Whether `out` holds a checkpoint to resume from."""

    def fit(self, split: data_mod.Split, cfg: TrainConfig, out: Path, resume: bool) -> tuple[object, list]:
        """(model, history: one record per epoch) after training on the split, checkpointing into `out`."""

    def state_dict(self, model) -> dict:
        """The whole model's weights (on a sharded job: every rank calls it)."""

    def test(self, model, split: data_mod.Split, cfg: TrainConfig) -> dict:
        """The model's metrics on the split's test users."""

    def agree(self, error: BaseException | None) -> None:
        """Raises `error`, and on a sharded job an error on every rank when any rank failed."""

    def summary_fields(self) -> dict:
        """summary.json's fields besides the common ones."""


def train_in_folder(out: Path, args, training: Training, settings: Callable[[], RunSettings], *, resume: bool,
                    t0: float) -> dict | None:
    """Train a run into `out` with `training`: a new one (settings() gives its settings), or with
    `resume` the one in `out` (its run.json and the flags, resume_settings). Returns summary.json's
    content on the writer, None on the other ranks."""
    with contextlib.ExitStack() as held:
        error = None
        try:
            if resume and training.is_writer and (out / RUN_NAME).is_file():
                # Read and check the run as it is now, not as another writer leaves it (without a
                # run.json resume_settings refuses the folder, which the lock would have created).
                held.enter_context(RunLock(out))
            run = resume_settings(out, args, training.item_shards) if resume else settings()
            cfg, split, split_fp = checked_split(args, out, run, training.item_shards)
            if training.is_writer:
                held.enter_context(RunLock(out))
                check_regular_files(out, RUN_FILES)
                if run.saved_run is None and any((out / name).exists()
                                                 for name in (CHECKPOINT_NAME, MODEL_NAME, SHARDED_NAME)):
                    raise UsageError(f"--out {out} already holds a run: continue it with --resume, or choose "
                                     "another --out (or delete that folder)")
        except EXPECTED_ERRORS as exc:
            error = exc
        training.agree(error)
        description = {"format": RUN_FORMAT, "source": run.source, "data": run.data, "config": asdict(cfg),
                       "training": training_options(args), "split_fingerprint": split_fp}
        if training.item_shards is not None:
            description["item_shards"] = training.item_shards
        # A run without a checkpoint has not finished an epoch: --resume or a new run starts it over,
        # writing its split files again and run.json last (the files of a run that a kill cut short
        # before its first epoch may disagree with run.json; rewriting them makes them agree).
        resume_fit = run.saved_run is not None and training.has_checkpoint(out)

        def start():
            if run.saved_run is None:  # a resumed run printed it when it started
                print(data_line(split), file=sys.stderr)
            if not resume_fit:
                split.save(out)
                write_json(out / RUN_NAME, description, indent=2)
                atomic_write_text(out / LOG_NAME, "")
            elif not _split_files_agree(out, split_fp):
                # The split was rebuilt from the data and checked against run.json's fingerprint: rewrite
                # split.npz, items.json and users.json when they are damaged, so evaluate and recommend work.
                split.save(out)

        _on_writer(training, start)
        model, history = training.fit(split, cfg, out, resume_fit)
        state = training.state_dict(model)

        def save_model():
            if run.saved_run is not None:  # the new n_epochs, once fit has accepted the checkpoint
                write_json(out / RUN_NAME, description, indent=2)
            save_tensors(state, out / MODEL_NAME)

        _on_writer(training, save_model)
        test = training.test(model, split, cfg)

        def save_summary():
            summary = {**run_summary(run.source, cfg, split, history, test, t0, ks=args.topk),
                       **training.summary_fields()}
            write_json(out / SUMMARY_NAME, summary, indent=2)
            return summary

        return _on_writer(training, save_summary)  # every rank returns once the writer's files are written


def _split_files_agree(out: Path, fingerprint: str) -> bool:
    """Whether the run folder's split files load and hold the split with this fingerprint."""
    try:
        return data_mod.Split.load(out).fingerprint() == fingerprint
    except data_mod.DataError:
        return False


def _on_writer(training: Training, write: Callable[[], object]):
    """write() on the writer; then every rank stops if it failed, so that none waits for it in a
    collective. Returns what write returned (None on the other ranks)."""
    result, error = None, None
    if training.is_writer:
        try:
            result = write()
        except EXPECTED_ERRORS as exc:
            error = exc
    training.agree(error)
    return result


def run_summary(source: str, cfg: TrainConfig, split: data_mod.Split, history: list, test: dict, t0: float,
                ks=None) -> dict:
    """summary.json's common fields."""
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


def data_line(split: data_mod.Split) -> str:
    """The dataset as trained (after preprocessing): users, items, interactions, density."""
    parts = (split.train, split.valid_in, split.valid_out, split.test_in, split.test_out)
    n_users = split.train.shape[0] + split.valid_in.shape[0] + split.test_in.shape[0]
    n_items, nnz = split.train.shape[1], sum(part.nnz for part in parts)
    return (f"data: {n_users:,} users ({split.train.shape[0]:,} train, {split.valid_in.shape[0]:,} validation, "
            f"{split.test_in.shape[0]:,} test), {n_items:,} items, {nnz:,} interactions, "
            f"density {nnz / max(1, n_users * n_items):.3%}")
