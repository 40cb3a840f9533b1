"""A finished run folder loaded (`load_run`), and recommendations for new users given by the
original ids of their items (`recommend_for_items`).

`recvae_fast.recommend` works on matrix columns; a run folder's items.json maps them to the
original item ids (column j is `load_run(folder).item_ids[j]`). `recommend_for_items` does both
ends: original ids in, original ids out.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .api import recommend
from .data import IdMap
from .data.split import check_ids_files
from .model import RecVAE
from .runfolder import ITEMS_NAME, MODEL_NAME, RUN_FORMAT, RUN_NAME, SPLIT_NAME, RunFolderError, read_json
from .training import TrainConfig, load_model
from .validation import check_run_description


@dataclass(frozen=True)
class TrainedRun:
    """A finished run folder, loaded: its best model, its items (column -> original id) and run.json."""

    folder: Path
    model: RecVAE
    items: IdMap
    description: dict

    @property
    def item_ids(self) -> np.ndarray:
        """The original item id of every model column (int64 or numpy strings)."""
        return self.items.ids


def load_run(folder: str | os.PathLike) -> TrainedRun:
    """The model, item ids and run.json of a run folder written by `recvae-fast train`; every file
    read safely (no unpickling) and checked before use (RunFolderError or DataError naming the file):
    run.json's fields, items.json and users.json as written with split.npz, the weights finite."""
    folder = Path(folder)
    for name in (MODEL_NAME, ITEMS_NAME, RUN_NAME, SPLIT_NAME):
        if not (folder / name).is_file():
            raise RunFolderError(f"{folder} is not a finished training run (no {name})")
    description = read_json(folder / RUN_NAME)
    check_run_description(description, folder / RUN_NAME, RUN_FORMAT, TrainConfig.__dataclass_fields__)
    items = IdMap.load_json(folder / ITEMS_NAME, "item")
    check_ids_files(folder)  # items.json as written with split.npz (the columns' ids)
    model = load_model(folder / MODEL_NAME)
    if len(items) != model.input_dim:
        raise RunFolderError(f"{folder / ITEMS_NAME} lists {len(items)} item ids, the model has "
                             f"{model.input_dim} items")
    return TrainedRun(folder, model, items, description)


def histories_matrix(items: IdMap, histories) -> tuple[sp.csr_matrix, list[list]]:
    """(users × items matrix of the histories, each known item once with value 1; per history, its
    ids that are not in `items`, in their order). A string id matches an integer id written the
    same ('20' finds 20)."""
    if isinstance(histories, (str, bytes)) or not hasattr(histories, "__iter__"):
        raise ValueError("histories must be a list of item id lists, one per user")
    rows, cols, unknown = [], [], []
    for h, history in enumerate(histories):
        if isinstance(history, (str, bytes)) or not hasattr(history, "__iter__"):
            raise ValueError(f"history {h} is {history!r}, not a list of item ids")
        ids = list(history)
        positions = items.index(np.array(ids, dtype=object), strict=False) if ids else np.empty(0, np.int64)
        unknown.append([i for i, p in zip(ids, positions.tolist()) if p < 0])
        known = np.unique(positions[positions >= 0])
        cols.append(known)
        rows.append(np.full(known.size, h, dtype=np.int64))
    cols_all = np.concatenate(cols) if cols else np.empty(0, np.int64)
    rows_all = np.concatenate(rows) if rows else np.empty(0, np.int64)
    matrix = sp.csr_matrix((np.ones(cols_all.size, np.float32), (rows_all, cols_all)),
                           shape=(len(unknown), len(items)))
    return matrix, unknown


def _shown(values, n: int = 5) -> str:
    more = f" and {len(values) - n} more" if len(values) > n else ""
    return ", ".join(repr(v) for v in values[:n]) + more


def recommend_for_items(run, histories, k: int = 100, *, include_seen: bool = False,
                        ignore_unknown: bool = False, batch_size: int = 500) -> list[list[tuple]]:
    """Top-k items for new users, each given by the original ids of the items it interacted with.

    run: a run folder (path) or a `TrainedRun` (`load_run`). histories: one list of original item
    ids per user (ints or strings). Each item counts once, as an implicit interaction (value 1, as
    a file without a rating column is read). Returns, per history, [(original item id, score), ...]
    best first: k pairs, fewer when fewer items are eligible; the history's own items are left out
    unless include_seen.

    Raises ValueError naming the history: an item id the run does not know (unless ignore_unknown,
    which skips such ids), or a history with no known item at all (whatever ignore_unknown says:
    the model would only give such a user its generic list).
    """
    trained = run if isinstance(run, TrainedRun) else load_run(run)
    matrix, unknown = histories_matrix(trained.items, histories)
    for h, ids in enumerate(unknown):
        if matrix.indptr[h + 1] == matrix.indptr[h]:
            what = f"only item ids the run does not know ({_shown(ids)})" if ids else "no item ids"
            raise ValueError(f"history {h} has {what}: nothing to recommend from")
        if ids and not ignore_unknown:
            raise ValueError(f"history {h} has item ids the run does not know: {_shown(ids)} "
                             "(ignore_unknown=True skips them)")
    top = recommend(trained.model, matrix, k=k, exclude_seen=not include_seen, batch_size=batch_size)
    item_ids = trained.items.to_list()
    return [[(item_ids[j], float(s)) for j, s in zip(ids.tolist(), scores.tolist()) if j >= 0]
            for ids, scores in zip(top.items, top.scores)]
