"""`recvae-fast`: train, evaluate and recommend from the command line.

    recvae-fast train [synthetic | PATH] --out DIR     # data -> split -> fit -> test metrics
    recvae-fast evaluate DIR                           # the saved model on the saved test split
    recvae-fast recommend DIR [synthetic | PATH] --k 100 --output recs.csv

A run folder holds model.pt (the best model, in the authors' state_dict format), checkpoint.pt
(for --resume), items.json (column -> original item id), split.npz (the validation and test
matrices), metrics.jsonl (one line per epoch) and summary.json (config, test metrics, the
popularity baseline, time). Bad input ends the program with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from . import data as data_mod
from .inference import evaluate, recommend
from .metrics import popularity_baseline
from .training import CHECKPOINT_NAME, TrainConfig, fit, load_model

MODEL_NAME, ITEMS_NAME, SPLIT_NAME, LOG_NAME, SUMMARY_NAME = (
    "model.pt", "items.json", "split.npz", "metrics.jsonl", "summary.json",
)

_FC1_GRAD = {"auto": None, "dense": False, "row-sparse": True}  # --fc1-grad -> TrainConfig.sparse_fc1_grad


class UsageError(Exception):
    """Bad input from the command line: reported in one line, no traceback."""


def _load_data(source: str, args) -> data_mod.Interactions:
    if source == "synthetic":
        return data_mod.synthetic_dataset(seed=args.data_seed)
    path = Path(source)
    if not path.exists():
        raise UsageError(f"data file not found: {source}")
    return data_mod.load_interactions(
        path,
        sep=args.sep,
        user_col=args.user_col,
        item_col=args.item_col,
        rating_col=args.rating_col,
        rating_threshold=args.rating_threshold,
    )


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sep", default=None, help="field separator (default: detected)")
    p.add_argument("--user-col", default=None, help="user column name (default: detected)")
    p.add_argument("--item-col", default=None, help="item column name (default: detected)")
    p.add_argument("--rating-col", default=None, help="rating column name (default: detected)")
    p.add_argument("--rating-threshold", type=float, default=None,
                   help="keep ratings > this as 1 (the paper uses 3.5); default: keep values")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic dataset")


def cmd_train(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    interactions = _load_data(args.data, args)
    interactions = data_mod.preprocess(interactions, min_items_per_user=args.min_items)
    n_heldout = args.heldout_users or max(1, interactions.matrix.shape[0] // 10)
    split = data_mod.split_strong_generalization(interactions, n_heldout_users=n_heldout, seed=args.seed)
    cfg = TrainConfig(
        hidden_dim=args.hidden_dim, latent_dim=args.latent_dim, batch_size=args.batch_size,
        n_epochs=args.epochs, n_enc_epochs=args.n_enc_epochs, n_dec_epochs=args.n_dec_epochs,
        lr=args.lr, gamma=None if args.beta is not None else args.gamma, beta=args.beta,
        dropout=args.dropout, not_alternating=args.not_alternating, sparse_fc1_grad=_FC1_GRAD[args.fc1_grad],
        seed=args.seed, device=args.device,
    )
    (out / ITEMS_NAME).write_text(json.dumps([_jsonable(i) for i in split.item_ids]))
    sp.save_npz(out / SPLIT_NAME, sp.vstack([split.valid_in, split.valid_out, split.test_in, split.test_out]).tocsr())
    (out / "split_sizes.json").write_text(json.dumps(
        {"valid": split.valid_in.shape[0], "test": split.test_in.shape[0]}))
    if not args.resume:
        (out / LOG_NAME).unlink(missing_ok=True)
    model = fit(
        split.train, split.valid_in, split.valid_out, checkpoint_dir=out, resume=args.resume,
        log_path=out / LOG_NAME, progress=not args.no_progress, **asdict(cfg),
    )
    torch.save(model.state_dict(), out / MODEL_NAME)
    test = evaluate(model, split.test_in, split.test_out)
    baseline = popularity_baseline(split.train, split.test_in, split.test_out)
    history = model.history
    summary = {
        "data": args.data,
        "config": asdict(cfg),
        "users": {"train": split.train.shape[0], "valid": split.valid_in.shape[0], "test": split.test_in.shape[0]},
        "items": split.train.shape[1],
        "best_epoch": max(history, key=lambda r: r.get("valid_ndcg@100", -1))["epoch"] if history else None,
        "test": test,
        "popularity_test": baseline,
        "train_users_per_s": float(np.mean([r["users_per_s"] for r in history])) if history else None,
        "wall_time_s": time.perf_counter() - t0,
    }
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
    return summary


def _jsonable(value):
    return value.item() if isinstance(value, np.generic) else value


def _load_run(run_dir: str):
    run = Path(run_dir)
    for name in (MODEL_NAME, ITEMS_NAME):
        if not (run / name).exists():
            raise UsageError(f"{run_dir} is not a finished training run (no {name})")
    model = load_model(run / MODEL_NAME)
    item_ids = json.loads((run / ITEMS_NAME).read_text())
    return run, model, item_ids


def cmd_evaluate(args) -> dict:
    run, model, _ = _load_run(args.run)
    if not (run / SPLIT_NAME).exists():
        raise UsageError(f"{args.run} has no saved split ({SPLIT_NAME})")
    stacked = sp.load_npz(run / SPLIT_NAME).tocsr()
    sizes = json.loads((run / "split_sizes.json").read_text())
    v, t = sizes["valid"], sizes["test"]
    parts = {"valid": (stacked[:v], stacked[v : 2 * v]), "test": (stacked[2 * v : 2 * v + t], stacked[2 * v + t :])}
    fold_in, heldout = parts[args.split]
    return {args.split: evaluate(model, fold_in, heldout)}


def cmd_recommend(args) -> dict:
    run, model, item_ids = _load_run(args.run)
    interactions = _load_data(args.data, args)
    if args.k > len(item_ids):
        raise UsageError(f"--k {args.k} is larger than the catalogue ({len(item_ids)} items)")
    column_of = {str(item): col for col, item in enumerate(item_ids)}
    source_cols = np.array([column_of.get(str(i), -1) for i in interactions.item_ids])
    coo = interactions.matrix.tocoo()
    known = source_cols[coo.col] >= 0
    matrix = sp.csr_matrix(
        (coo.data[known], (coo.row[known], source_cols[coo.col[known]])),
        shape=(interactions.matrix.shape[0], len(item_ids)), dtype=np.float32,
    )
    scores, ids = recommend(model, matrix, k=args.k, exclude_seen=not args.include_seen)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user", "item", "rank", "score"])
        for row, user in enumerate(interactions.user_ids):
            for rank in range(args.k):
                if ids[row, rank] < 0:
                    break
                writer.writerow([user, item_ids[ids[row, rank]], rank + 1, f"{scores[row, rank]:.6g}"])
    return {"users": int(matrix.shape[0]), "k": args.k, "unknown_items_dropped": int((~known).sum()),
            "output": str(output)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recvae-fast", description="Train, evaluate and use RecVAE.")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = TrainConfig()

    p = sub.add_parser("train", help="train on a dataset (default: the embedded synthetic one)")
    p.add_argument("data", nargs="?", default="synthetic", help="'synthetic' or a ratings file (CSV/TSV/.inter)")
    p.add_argument("--out", required=True, help="run folder for the model, id maps and logs")
    _add_data_options(p)
    p.add_argument("--min-items", type=int, default=5, help="drop users with fewer items (default 5)")
    p.add_argument("--heldout-users", type=int, default=None, help="validation and test users each (default: 10%%)")
    p.add_argument("--hidden-dim", type=int, default=defaults.hidden_dim)
    p.add_argument("--latent-dim", type=int, default=defaults.latent_dim)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--epochs", type=int, default=defaults.n_epochs)
    p.add_argument("--n-enc-epochs", type=int, default=defaults.n_enc_epochs)
    p.add_argument("--n-dec-epochs", type=int, default=defaults.n_dec_epochs)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--gamma", type=float, default=defaults.gamma, help="KL weight gamma * n_u")
    p.add_argument("--beta", type=float, default=None, help="constant KL weight (replaces gamma)")
    p.add_argument("--dropout", type=float, default=defaults.dropout)
    p.add_argument("--not-alternating", action="store_true", help="step encoder and decoder together")
    p.add_argument("--fc1-grad", choices=sorted(_FC1_GRAD), default="auto",
                   help="fc1 gradient layout: row-sparse (with an exact row-sparse Adam) or dense; auto picks "
                        "row-sparse on the CPU for large catalogues (default: auto)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run_command=cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a trained run on its saved split")
    p.add_argument("run", help="run folder written by train")
    p.add_argument("--split", choices=["test", "valid"], default="test")
    p.set_defaults(run_command=cmd_evaluate)

    p = sub.add_parser("recommend", help="top-k items per user to CSV, with original ids")
    p.add_argument("run", help="run folder written by train")
    p.add_argument("data", nargs="?", default="synthetic", help="the users' interactions ('synthetic' or a file)")
    _add_data_options(p)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--output", required=True, help="CSV file to write (user,item,rank,score)")
    p.add_argument("--include-seen", action="store_true", help="also recommend items the user already has")
    p.set_defaults(run_command=cmd_recommend)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.run_command
    try:
        if getattr(args, "k", 1) <= 0:
            raise UsageError(f"--k must be positive, got {args.k}")
        result = command(args)
    except (UsageError, data_mod.DataError, ValueError, TypeError, IndexError, FileNotFoundError) as exc:
        print(f"recvae-fast: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
