"""Ranking metrics for strong-generalisation evaluation, and the popularity baseline.

Inputs: `ranked`, a B × k' integer array of item columns per user, best first (−1 = padding,
never a hit), and `heldout`, a B × I scipy sparse matrix (values finite and >= 0) whose entries
with a value > 0 are the user's relevant items (binary relevance). Per-user results are float64 arrays with NaN for users
with no held-out item; average them with `mean_over_users` (or np.nanmean).

    NDCG@k   = Σ_{r ≤ k} hit_r / log2(r + 1)  /  Σ_{r ≤ min(n_heldout, k)} 1 / log2(r + 1)
    Recall@k = (hits in the top k) / min(k, n_heldout)

(r is the 1-based rank.) Only the first k columns of `ranked` are used; if it has fewer, the
missing ranks are misses. Each row of `ranked` is assumed to hold distinct items.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

from .sparse import as_user_matrix
from .ops.topk_masked import check_k

__all__ = [
    "ndcg_at_k",
    "recall_at_k",
    "hits_matrix",
    "mean_over_users",
    "ranking_metrics",
    "PAPER_METRICS",
    "check_cutoffs",
    "metric_cutoffs",
    "metrics_at",
    "popularity_ranking",
    "popularity_baseline",
]


def _relevant(heldout) -> sp.csr_matrix:
    """The held-out matrix as a canonical CSR holding only its entries with value > 0."""
    h = as_user_matrix("heldout", heldout)
    if not h.has_canonical_format:
        h = h.copy()
        h.sum_duplicates()
    if h.nnz and not (h.data > 0).all():  # stored zeros are not relevant
        h = h.copy()
        h.eliminate_zeros()
    return h


def hits_matrix(ranked, heldout, k: int | None = None) -> np.ndarray:
    """B × min(k, k') boolean array: is ranked[u, r] a held-out item of user u."""
    ranked = np.asarray(ranked)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be a 2-D array (users × ranks), got shape {ranked.shape}")
    if ranked.dtype.kind not in "iu":
        raise TypeError(f"ranked must hold integer item indices, got dtype {ranked.dtype}")
    h = _relevant(heldout)
    n_users, n_items = h.shape
    if ranked.shape[0] != n_users:
        raise ValueError(f"ranked has {ranked.shape[0]} rows, heldout has {n_users} users")
    if k is not None:
        ranked = ranked[:, : check_k(k)]
    ranked = ranked.astype(np.int64, copy=False)
    if ranked.size and (ranked.max() >= n_items or ranked.min() < -1):
        raise ValueError(f"ranked holds item indices outside [-1, {n_items}) (−1 is padding)")
    valid = ranked >= 0
    # Keys u·I + i: the held-out keys are sorted because the CSR is canonical.
    hkeys = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(h.indptr)) * n_items + h.indices
    if hkeys.size == 0:
        return np.zeros(ranked.shape, dtype=bool)
    rkeys = np.arange(n_users, dtype=np.int64)[:, None] * n_items + np.where(valid, ranked, 0)
    pos = np.minimum(np.searchsorted(hkeys, rkeys), hkeys.size - 1)
    return (hkeys[pos] == rkeys) & valid


def _n_heldout(heldout) -> np.ndarray:
    return np.diff(_relevant(heldout).indptr).astype(np.int64)


def ndcg_at_k(ranked, heldout, k: int) -> np.ndarray:
    """Per-user NDCG@k (binary gains, 1/log2(rank+1) discounts, IDCG over min(n_heldout, k));
    NaN for users with no held-out item."""
    k = check_k(k)
    hits = hits_matrix(ranked, heldout, k)
    n = _n_heldout(heldout)
    discounts = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    dcg = hits.astype(np.float64) @ discounts[: hits.shape[1]]
    idcg_table = np.concatenate([[0.0], np.cumsum(discounts)])
    idcg = idcg_table[np.minimum(n, k)]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = dcg / idcg
    out[n == 0] = np.nan
    return out


def recall_at_k(ranked, heldout, k: int) -> np.ndarray:
    """Per-user Recall@k = hits in the top k / min(k, n_heldout); NaN for users with no
    held-out item."""
    k = check_k(k)
    hits = hits_matrix(ranked, heldout, k)
    n = _n_heldout(heldout)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = hits.sum(axis=1) / np.minimum(n, k).astype(np.float64)
    out[n == 0] = np.nan
    return out


def mean_over_users(per_user) -> float:
    """Mean over users that have a value (NaN = no held-out items, skipped); NaN if none."""
    values = np.asarray(per_user, dtype=np.float64)
    if values.size == 0 or np.isnan(values).all():
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values))


def ranking_metrics(ranked, heldout, ndcg_ks=(100,), recall_ks=(20, 50)) -> dict:
    """{"ndcg@k": ..., "recall@k": ..., "n_users": users with held-out items}, averaged over
    users with held-out items."""
    out = {}
    for k in ndcg_ks:
        out[f"ndcg@{k}"] = mean_over_users(ndcg_at_k(ranked, heldout, k))
    for k in recall_ks:
        out[f"recall@{k}"] = mean_over_users(recall_at_k(ranked, heldout, k))
    out["n_users"] = int((_n_heldout(heldout) > 0).sum())
    return out


# The paper's metrics (and evaluate's default): NDCG@100, Recall@20, Recall@50.
PAPER_METRICS = {"ndcg_ks": (100,), "recall_ks": (20, 50)}
_PAPER_DEEPEST = max(PAPER_METRICS["ndcg_ks"] + PAPER_METRICS["recall_ks"])


def check_cutoffs(ks, n_items: int | None = None) -> tuple[int, ...]:
    """Metric cut-offs as a sorted tuple of distinct positive ints; ValueError when empty or any
    is not a positive integer, or (given n_items) is beyond the catalogue: a cut-off costs memory in
    proportion to it, and no ranking is longer than the catalogue (the paper's 100 is always allowed)."""
    ks = tuple(ks)
    if not ks:
        raise ValueError("give at least one metric cut-off k")
    ks = tuple(sorted({check_k(k) for k in ks}))
    if n_items is not None and ks[-1] > max(n_items, _PAPER_DEEPEST):
        raise ValueError(f"metric cut-off k={ks[-1]} is larger than the catalogue ({n_items} items)")
    return ks


def metric_cutoffs(ks=None, n_items: int | None = None) -> tuple[int, ...]:
    """Every cut-off that metrics_at(..., ks) uses, checked (see check_cutoffs) and sorted (None: the
    paper's 20, 50, 100)."""
    return check_cutoffs(PAPER_METRICS["ndcg_ks"] + PAPER_METRICS["recall_ks"] if ks is None else ks, n_items)


def metrics_at(ranked, heldout, ks=None) -> dict:
    """ranking_metrics at the cut-offs `ks`: NDCG@k and Recall@k for every k (ascending), or with
    ks None the paper's NDCG@100, Recall@20, Recall@50."""
    if ks is None:
        return ranking_metrics(ranked, heldout, **PAPER_METRICS)
    ks = check_cutoffs(ks)
    return ranking_metrics(ranked, heldout, ndcg_ks=ks, recall_ks=ks)


def popularity_ranking(popularity, exclude, k: int, max_block: int = 1 << 24) -> np.ndarray:
    """Top-k items per row of `exclude` (B × I sparse: items a user already has) by
    `popularity` (length I; higher first, ties to the lower item index), skipping the row's
    excluded items. Rows with fewer than k eligible items are padded with −1."""
    k = check_k(k)
    popularity = np.asarray(popularity, dtype=np.float64)
    ex = as_user_matrix("exclude", exclude)
    n_users, n_items = ex.shape
    if popularity.shape != (n_items,):
        raise ValueError(f"popularity has shape {popularity.shape}, expected ({n_items},)")
    order = np.argsort(-popularity, kind="stable")  # ties: lower index first
    position = np.empty(n_items, dtype=np.int64)
    position[order] = np.arange(n_items)
    counts = np.diff(ex.indptr)
    out = np.full((n_users, k), -1, dtype=np.int64)
    start = 0
    while start < n_users:
        # The answer lies in the first k + n_excluded positions of the global order.
        width = int(min(n_items, k + counts[start]))
        stop = start + 1
        while stop < n_users:
            w = int(min(n_items, max(width, k + counts[stop])))
            if (stop - start + 1) * w > max_block:
                break
            width, stop = w, stop + 1
        rows = ex[start:stop]
        b = stop - start
        mask = np.zeros((b, width), dtype=bool)
        r = np.repeat(np.arange(b), np.diff(rows.indptr))
        p = position[rows.indices]
        inside = p < width
        mask[r[inside], p[inside]] = True
        first = np.argsort(mask, axis=1, kind="stable")[:, :k]  # eligible (False) positions first
        eligible = ~np.take_along_axis(mask, first, axis=1)
        items = np.where(eligible, order[first], -1)
        out[start:stop, : items.shape[1]] = items
        start = stop
    return out


def popularity_baseline(train, fold_in, heldout, ks=(20, 50, 100)) -> dict:
    """Most-popular baseline: rank items by training popularity (users per item), excluding
    each user's fold-in items; returns "ndcg@k" and "recall@k" for every k in ks (so
    "ndcg@100", "recall@20", "recall@50" with the defaults) and "n_users"."""
    train = as_user_matrix("train", train)
    n_items = train.shape[1]
    fold_in = as_user_matrix("fold_in", fold_in, n_items, items_of="train")
    heldout = as_user_matrix("heldout", heldout, n_items, items_of="train")
    if fold_in.shape[0] != heldout.shape[0]:
        raise ValueError(f"fold_in has {fold_in.shape[0]} users, heldout has {heldout.shape[0]}")
    ks = check_cutoffs(ks, n_items)
    popularity = np.bincount(train.indices[train.data != 0], minlength=n_items).astype(np.float64)
    ranked = popularity_ranking(popularity, fold_in, max(ks))
    return metrics_at(ranked, heldout, ks)
