"""`recommend_sharded` and `evaluate_sharded`: recvae_fast.recommend / evaluate for a ShardedRecVAE.

Every rank passes the same users. User batches are dealt round-robin over the "data" dimension; in
a batch, each rank of the item group takes the masked top-k of its own items (ids offset by lo),
and the item group's S × k candidates per user are merged with the one-device tie rule (higher
score first, then lower item index), which gives exactly the one-device top-k of the same scores.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist

from ..inference import SCORES_PER_BLOCK, check_batch_size
from ..metrics import metric_cutoffs, metrics_at
from ..sparse import as_user_matrix
from ..ops.topk_masked import TopK, TopKAccumulator, check_k
from .mesh import collective_device
from .model import ShardedRecVAE


def merge_candidates(scores: torch.Tensor, items: torch.Tensor, k: int) -> TopK:
    """The best k of several best-first candidate lists laid side by side (B × n, item −1 = padding):
    higher score first, equal scores to the lower item, padding last (after eligible −inf items)."""
    key = torch.where(items < 0, torch.iinfo(torch.int64).max, items)
    key, order = torch.sort(key, dim=1, stable=True)  # by item, padding last
    scores = torch.gather(scores, 1, order)
    # then by score, stably: equal scores keep item order, padding stays below eligible −inf items
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices
    scores, key = torch.gather(scores, 1, by_score)[:, :k], torch.gather(key, 1, by_score)[:, :k]
    return TopK(scores, torch.where(key == torch.iinfo(torch.int64).max, -1, key))


def _local_topk(model: ShardedRecVAE, mu: torch.Tensor, seen: sp.csr_matrix, k: int) -> TopK:
    """Masked top-k over this rank's items, ids global; B × k with −1 / −inf padding."""
    lo, hi = model.layout.lo, model.layout.hi
    weight, bias = model.decoder.weight, model.decoder.bias
    chunk = max(1, SCORES_PER_BLOCK // max(1, mu.shape[0]))
    acc = TopKAccumulator(mu.shape[0], k, n_items=hi - lo, seen=sp.csr_matrix(seen[:, lo:hi]))
    for start in range(0, hi - lo, chunk):
        # float32 before ranking, as recvae_fast.recommend, so that both rank the same numbers
        acc.push(torch.addmm(bias[start : start + chunk], mu, weight[start : start + chunk].t()).float(), start)
    scores, items = acc.result()
    items = torch.as_tensor(items)
    return TopK(torch.as_tensor(scores), torch.where(items >= 0, items + lo, items))


@torch.no_grad()
def recommend_sharded(model: ShardedRecVAE, interactions, k: int = 100, exclude_seen: bool = True,
                      batch_size: int = 500) -> TopK:
    """As recvae_fast.recommend (which calls this for a ShardedRecVAE): every rank passes the same users
    and gets the same whole result, TopK(scores float32 U × k, items int64 U × k) as numpy arrays,
    equal to one device's with the same weights."""
    layout = model.layout
    k = check_k(k)
    if k > layout.n_items:
        raise ValueError(f"k={k} is larger than the catalogue ({layout.n_items} items)")
    batch_size = check_batch_size(batch_size)
    interactions = as_user_matrix("interactions", interactions, layout.n_items)
    n_users = interactions.shape[0]
    # Rows scored by other data ranks keep values below any result (−inf, and an item id below the −1
    # of padding); a max over the data group fills them in.
    out_scores = torch.full((n_users, k), float("-inf"), dtype=torch.float32)
    out_items = torch.full((n_users, k), torch.iinfo(torch.int64).min, dtype=torch.int64)
    was_training = model.training
    model.eval()
    try:
        for number, start in enumerate(range(0, n_users, batch_size)):
            if number % layout.data_size != layout.data_rank:
                continue
            rows = interactions[start : start + batch_size]
            mu, _ = model.encoder(model.view(rows), 0.0, impl=model.impl)
            seen = rows if exclude_seen else sp.csr_matrix(rows.shape, dtype=np.float32)
            local = _local_topk(model, mu, seen, k)
            scores, items = local.scores.to(mu.device), local.items.to(mu.device)
            if layout.n_shards > 1:
                all_scores = [torch.empty_like(scores) for _ in range(layout.n_shards)]
                all_items = [torch.empty_like(items) for _ in range(layout.n_shards)]
                dist.all_gather(all_scores, scores.contiguous(), group=layout.items_group)
                dist.all_gather(all_items, items.contiguous(), group=layout.items_group)
                scores, items = merge_candidates(torch.cat(all_scores, 1), torch.cat(all_items, 1), k)
            out_scores[start : start + len(items)] = scores.cpu()
            out_items[start : start + len(items)] = items.cpu()
    finally:
        model.train(was_training)
    if layout.data_size > 1:  # each row was filled by one data rank; the others left their fill value
        device = collective_device()
        out_scores, out_items = out_scores.to(device), out_items.to(device)
        dist.all_reduce(out_scores, op=dist.ReduceOp.MAX, group=layout.data_group)
        dist.all_reduce(out_items, op=dist.ReduceOp.MAX, group=layout.data_group)
        out_scores, out_items = out_scores.cpu(), out_items.cpu()
    return TopK(out_scores.numpy(), out_items.numpy())


def evaluate_sharded(model: ShardedRecVAE, fold_in, heldout, batch_size: int = 500, ks=None) -> dict:
    """As recvae_fast.evaluate (which calls this for a ShardedRecVAE): {"ndcg@100", "recall@20",
    "recall@50", "n_users"} or, with `ks`, NDCG@k and Recall@k for every k in ks; the same on every rank."""
    n_items = model.layout.n_items
    deepest = max(metric_cutoffs(ks, n_items))  # checks ks
    fold_in = as_user_matrix("fold_in", fold_in, n_items)
    heldout = as_user_matrix("heldout", heldout, n_items)
    if fold_in.shape[0] != heldout.shape[0]:
        raise ValueError(f"fold_in has {fold_in.shape[0]} users, heldout has {heldout.shape[0]}")
    ranked = recommend_sharded(model, fold_in, k=min(deepest, n_items), exclude_seen=True,
                               batch_size=batch_size).items
    metrics = metrics_at(ranked, heldout, ks)
    if metrics["n_users"] == 0:
        raise ValueError("no user has held-out items: nothing to evaluate")
    return metrics
