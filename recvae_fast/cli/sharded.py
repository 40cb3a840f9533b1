"""`recvae-fast train --item-shards` under torchrun: this rank's part of the run folder protocol."""
from __future__ import annotations

import contextlib
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from ..distributed import evaluate_sharded, fit_sharded, gather_full_state_dict, init_distributed
from ..distributed.checkpoint import latest_checkpoint
from ..distributed.training import agree
from ..metrics import metric_cutoffs
from ..runfolder import LOG_NAME, RUN_NAME, read_json
from ..training import TrainConfig
from .errors import UsageError
from .run_folder import SHARDED_NAME, train_in_folder
from .settings import new_run_settings


class ItemSharded:
    """This rank's part of a torchrun job that splits the model by items (recvae_fast.distributed):
    every rank reads the data, makes the same split and checks it; rank 0 alone writes the folder,
    the checkpoints under its `sharded` folder."""

    def __init__(self, args, item_shards: int):
        self.args, self.item_shards = args, item_shards
        self.is_writer = dist.get_rank() == 0

    def has_checkpoint(self, out: Path) -> bool:
        return latest_checkpoint(out / SHARDED_NAME) is not None

    def fit(self, split, cfg, out, resume):
        args = self.args
        model = fit_sharded(split.train, split.valid_in, split.valid_out, item_shards=self.item_shards,
                            checkpoint_dir=out / SHARDED_NAME, resume=resume, log_path=out / LOG_NAME,
                            patience=args.patience, progress="epochs" if args.no_progress else True, **asdict(cfg))
        passes = 1 if cfg.not_alternating else cfg.n_enc_epochs + cfg.n_dec_epochs
        users_per_epoch = split.train.shape[0] * passes
        return model, [{**r, "users_per_s": users_per_epoch / r["train_time_s"]} for r in model.history]

    def state_dict(self, model) -> dict:
        return gather_full_state_dict(model)

    def test(self, model, split, cfg) -> dict:
        return evaluate_sharded(model, split.test_in, split.test_out, batch_size=cfg.batch_size,
                                ks=metric_cutoffs(None))

    def agree(self, error: BaseException | None) -> None:
        """Every rank stops if any rank failed: the failing ranks with their own error, the others
        with one naming them (as a UsageError: exit 2 on every rank)."""
        try:
            agree(error)
        except RuntimeError as exc:
            if exc is error:
                raise
            raise UsageError(str(exc)) from None

    def summary_fields(self) -> dict:
        return {"item_shards": self.item_shards, "processes": dist.get_world_size()}


def train_sharded(args, out: Path, item_shards: int, t0: float) -> dict | None:
    """train under torchrun: returns the summary on rank 0, None on the others."""
    device = args.device
    if device is None and args.resume:  # the run's own device (its run.json is checked later, on every rank)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            device = read_json(out / RUN_NAME)["config"]["device"]
    # gloo for CPU tensors even where CUDA exists; NCCL for a GPU run.
    init_distributed("gloo" if str(device or TrainConfig().device).startswith("cpu") else "nccl",
                     timeout=timedelta(minutes=10))
    try:
        return train_in_folder(out, args, ItemSharded(args, item_shards), lambda: new_run_settings(args),
                               resume=args.resume, t0=t0)
    finally:
        dist.destroy_process_group()
