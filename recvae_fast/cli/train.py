"""`recvae-fast train`: a run folder trained in this process, or with --item-shards by every rank
of a torchrun job (the model split by items: recvae_fast.cli.sharded), then its test metrics next
to the popularity baseline's."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from ..api import evaluate, fit
from ..metrics import PAPER_METRICS, metric_cutoffs
from ..runfolder import CHECKPOINT_NAME, LOG_NAME, SUMMARY_NAME
from ..training import timedelta_text
from .errors import UsageError
from .run_folder import train_in_folder
from .settings import eval_batch_size, new_run_settings
from .tables import metrics_table

# train's table without --topk: the paper's metrics (summary.json has every cut-off's).
PAPER_COLUMNS = [f"ndcg@{k}" for k in PAPER_METRICS["ndcg_ks"]] + [f"recall@{k}" for k in PAPER_METRICS["recall_ks"]]


class OneProcess:
    """Training in this process (recvae_fast.fit), the checkpoint in the run folder."""

    item_shards = None
    is_writer = True

    def __init__(self, args):
        self.args = args

    def has_checkpoint(self, out: Path) -> bool:
        return (out / CHECKPOINT_NAME).is_file()

    def fit(self, split, cfg, out, resume):
        args = self.args
        return fit(split.train, split.valid_in, split.valid_out, checkpoint_dir=out, resume=resume,
                   log_path=out / LOG_NAME, patience=args.patience, progress="epochs" if args.no_progress else True,
                   metric_ks=args.topk, eval_batch_size=eval_batch_size(args), **asdict(cfg))

    def state_dict(self, model) -> dict:
        return model.state_dict()

    def test(self, model, split, cfg) -> dict:
        # At the popularity baseline's cut-offs (the table shows the paper's unless --topk).
        return evaluate(model, split.test_in, split.test_out, batch_size=eval_batch_size(self.args),
                        ks=metric_cutoffs(self.args.topk), precision=cfg.precision)

    def agree(self, error: BaseException | None) -> None:
        if error is not None:
            raise error

    def summary_fields(self) -> dict:
        return {}


def run(args) -> dict | None:
    t0 = time.perf_counter()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
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
        from .sharded import train_sharded  # torch.distributed is imported only for such a run

        return train_sharded(args, out, item_shards, t0)
    return train_in_folder(out, args, OneProcess(args), lambda: new_run_settings(args), resume=args.resume, t0=t0)


def _item_shards(shards: int) -> int | None:
    """The number of item shards to train with, checked against torchrun's world size (None: one
    shard without torchrun, which is the ordinary single-process run)."""
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


def render(summary: dict, args) -> str:
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
