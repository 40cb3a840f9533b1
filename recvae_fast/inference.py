"""Scoring in user batches on one device: `recommend` and `evaluate` (recvae_fast.recommend and
recvae_fast.evaluate, in recvae_fast.api, run these for a RecVAE).

Scores are z = mu(fold-in) against the decoder, the user's own items excluded, and the best k
kept. Users go in batches, and items in chunks once a batch's score block would pass
SCORES_PER_BLOCK, so all users × items never exist at once (on CUDA, nor even B × I).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from . import precision as precision_mod
from .metrics import metric_cutoffs, metrics_at
from .model import RecVAE
from .scoring import blocked_topk
from .sparse import as_user_matrix
from .ops.topk_masked import TopK, TopKAccumulator, check_k, topk_masked

SCORES_PER_BLOCK = 1 << 25  # 128 MiB of float32 scores at most per block


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


@torch.no_grad()
def recommend(
    model: RecVAE,
    interactions,
    k: int = 100,
    exclude_seen: bool = True,
    batch_size: int = 500,
    precision: str = precision_mod.DEFAULT_PRECISION,
    exclude=None,
) -> TopK:
    """recvae_fast.recommend (which documents it) for a RecVAE: U × k best items, in user batches."""
    product_dtype = precision_mod.autocast_dtype(precision)
    n_items = model.input_dim
    k = check_k(k)
    if k > n_items:
        raise ValueError(f"k={k} is larger than the catalogue ({n_items} items)")
    batch_size = check_batch_size(batch_size)
    interactions = as_user_matrix("interactions", interactions, n_items)
    n_users = interactions.shape[0]
    if exclude is not None:
        if not sp.issparse(exclude) or exclude.shape != interactions.shape:
            raise ValueError(f"exclude must be a scipy.sparse matrix of the interactions' shape {interactions.shape}")
        exclude = _pattern(exclude)
    was_training = model.training
    model.eval()
    weight, bias = model.decoder.weight, model.decoder.bias
    if product_dtype is not None and weight.dtype != torch.float32:
        raise ValueError(f"precision {precision!r} needs a float32 model, got {weight.dtype}")
    if product_dtype is not None:
        precision_mod.warn_if_slow(precision, weight.device)
    item_chunk = max(1, min(n_items, SCORES_PER_BLOCK // max(1, batch_size)))
    out_ids = np.empty((n_users, k), dtype=np.int64)
    out_scores = np.empty((n_users, k), dtype=np.float32)
    try:
        for start in range(0, n_users, batch_size):
            rows = interactions[start : start + batch_size]
            with precision_mod.autocast(precision, weight.device):
                mu, _ = model.encode(rows)
            seen = rows if exclude_seen else sp.csr_matrix(rows.shape, dtype=np.float32)
            if exclude is not None:
                seen = _pattern(seen) + exclude[start : start + batch_size]
            scores, ids = _topk_of_scores(mu, weight, bias, seen, k, item_chunk, product_dtype)
            out_ids[start : start + len(ids)] = ids
            out_scores[start : start + len(ids)] = scores
    finally:
        model.train(was_training)
    return TopK(out_scores, out_ids)


def _pattern(matrix) -> sp.csr_matrix:
    """A CSR matrix of ones where `matrix` stores an entry (an explicit zero included): a sum of
    patterns has an entry wherever one of them has, which a sum of values may cancel."""
    csr = sp.csr_matrix(matrix)
    return sp.csr_matrix((np.ones(csr.nnz, dtype=np.float32), csr.indices, csr.indptr), shape=csr.shape)


def _scores(mu, weight, bias, product_dtype):
    """mu·weightᵀ + bias, the product's operands in product_dtype when given (float32 result)."""
    if product_dtype is None:
        return torch.addmm(bias, mu, weight.t())
    return precision_mod.lowp_mm(mu, weight.t(), product_dtype).add_(bias)


def _topk_of_scores(mu, weight, bias, seen: sp.csr_matrix, k: int, item_chunk: int, product_dtype=None):
    """Masked top-k of mu·Wdᵀ + bd, in item chunks when the block would be too large (any device)."""
    if mu.device.type == "cpu":  # score cache-sized blocks, each merged into the top-k while in cache
        return tuple(blocked_topk(mu, weight, bias, seen, k, product_dtype=product_dtype))
    n_items = weight.shape[0]
    if item_chunk >= n_items:
        scores, ids = topk_masked(_scores(mu, weight, bias, product_dtype).float(), seen, k)
    else:
        acc = TopKAccumulator(mu.shape[0], k, n_items=n_items, seen=seen)
        for offset in range(0, n_items, item_chunk):
            chunk = slice(offset, offset + item_chunk)
            block = _scores(mu, weight[chunk], bias[chunk], product_dtype)
            acc.push(block.float(), offset)
        scores, ids = acc.result()
    return torch.as_tensor(scores).float().cpu().numpy(), torch.as_tensor(ids).cpu().numpy()


def evaluate(
    model: RecVAE,
    fold_in,
    heldout,
    batch_size: int = 500,
    ks=None,
    precision: str = precision_mod.DEFAULT_PRECISION,
) -> dict:
    """recvae_fast.evaluate (which documents it) for a RecVAE: the metrics of its top-k."""
    precision_mod.check_precision(precision)
    n_items = model.input_dim
    batch_size = check_batch_size(batch_size)
    deepest = max(metric_cutoffs(ks, n_items))  # checks ks
    fold_in = as_user_matrix("fold_in", fold_in, n_items)
    heldout = as_user_matrix("heldout", heldout, n_items)
    if fold_in.shape[0] != heldout.shape[0]:
        raise ValueError(f"fold_in has {fold_in.shape[0]} users, heldout has {heldout.shape[0]}")
    ranked = recommend(model, fold_in, k=min(deepest, n_items), exclude_seen=True, batch_size=batch_size,
                       precision=precision).items
    metrics = metrics_at(ranked, heldout, ks)
    if metrics["n_users"] == 0:
        raise ValueError("no user has held-out items: nothing to evaluate")
    return metrics
