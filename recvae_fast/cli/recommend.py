"""`recvae-fast recommend RUN [DATA] --output F.csv`: the top-k items of each user of a data file (by
default the run's own), or with --items of one new user, as CSV with the original ids. The file's
layout flags default to the run's for the run's own file and are detected for another file;
--rating-threshold (default: the run's) applies only to a file with a rating column."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .. import data as data_mod
from ..atomic import write_output
from ..api import recommend
from ..runs import histories_matrix, load_run
from .errors import UsageError
from .parser import NEW_USER
from .run_folder import RUN_FILES
from .settings import LAYOUT_OPTIONS, check_output, data_options, data_source, eval_batch_size, load_data, \
    scoring_precision


def _file_inputs(options: dict, source: str, items) -> tuple[sp.csr_matrix, sp.csr_matrix, list, dict]:
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
    interactions = load_data(source, options, rating_threshold=None)  # every interaction: what "seen" means
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


def _users_with_items(inputs: sp.csr_matrix, user_ids: list, counts: dict, skip: bool) -> np.ndarray:
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


def run(args) -> dict:
    trained = load_run(args.run)
    run_folder, items, description = trained.folder, trained.items, trained.description
    if args.k > len(items):
        raise UsageError(f"--k {args.k} is larger than the catalogue ({len(items)} items)")
    if args.items is not None and args.data is not None:
        raise UsageError("give either a data file or --items, not both")
    run_options = dict(description.get("data") or {})
    source = data_source(args.data) if args.data is not None else description.get("source")
    if args.items is not None:
        source = "--items"
    elif source != description.get("source"):  # another file: its own layout, detected (or given now)
        run_options = {name: value for name, value in run_options.items() if name not in LAYOUT_OPTIONS}
    options = {**run_options, **{name: value for name, value in data_options(args).items() if value is not None}}
    output = Path(args.output)
    check_output(output, [run_folder / name for name in RUN_FILES]
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
        inputs, seen, user_ids, counts = _file_inputs(options, source, items)
        rows = _users_with_items(inputs, user_ids, counts, args.skip_users_without_items)
        if rows.size < len(user_ids):
            inputs, seen, user_ids = inputs[rows], seen[rows], [user_ids[r] for r in rows]
    # Never an item the user has in the file, whatever its rating (the model's input may hold fewer).
    scores, ids = recommend(trained.model, inputs, k=args.k, exclude_seen=not args.include_seen,
                            exclude=None if args.include_seen else seen, batch_size=eval_batch_size(args),
                            precision=scoring_precision(args, description))

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
