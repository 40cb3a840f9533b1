"""Blocked scoring on the CPU: the masked top-k of mu·Wdᵀ + bd without a users × items score matrix.

Each item block's B × block scores are computed into one reused buffer and merged into the running
top-k (the C++ kernel of recvae_fast.ops.topk_masked) right away, while the block is still in cache; the
result equals `topk_masked` on the whole score matrix (same tie rule: lower item index first; seen
items never returned; -inf / -1 padding). Scores are ranked in float32, as `recommend` does.
"""
from __future__ import annotations

import numpy as np
import torch

from .cache_blocks import item_block_size
from .precision import lowp_mm
from .ops.topk_masked import TopK, _check_threads, _ext, _seen_csr, check_k

# The merge into the running top-k costs a small fixed amount per row and block, so scoring blocks
# are this many times the NLL's cache block. A/B at B 500 on the 2-core development machine:
# 4,096 items best at 20k items (35.9 ms against 37.0 at
# 2,048), 2,048 best at 1M (1,063 ms against 1,129 at 4,096); not yet a sweep in a bench.
SCORING_BLOCK_FACTOR = 4


def scoring_block_size(n_rows: int) -> int:
    return item_block_size(n_rows, 4) * SCORING_BLOCK_FACTOR


@torch.no_grad()
def blocked_topk(
    mu: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    seen,
    k: int,
    *,
    item_block: int | None = None,
    num_threads: int | None = None,
    product_dtype: torch.dtype | None = None,
) -> TopK:
    """The best k unseen items of mu·weightᵀ + bias per row (CPU tensors): TopK(float32 numpy B × k,
    int64 numpy B × k), best first, ties to the lower item index, padded with -inf / -1.

    seen: any form `topk_masked` accepts (B rows, catalogue columns). item_block: items per block
    (default: scoring_block_size). product_dtype (bf16 for bf16-mixed, float32 mu and weight): the
    product's operands in it, its result widened to float32 before the bias and the top-k, which
    is exact on those scores."""
    k = check_k(k)
    for name, t in (("mu", mu), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            raise TypeError(f"{name} must be a CPU tensor")
    n_rows, n_items = mu.shape[0], weight.shape[0]
    if mu.dim() != 2 or weight.dim() != 2 or mu.shape[1] != weight.shape[1] or bias.shape != (n_items,):
        raise ValueError(
            f"shapes do not match: mu {tuple(mu.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)}"
        )
    if not (mu.dtype == weight.dtype == bias.dtype):
        raise TypeError(f"mu, weight and bias must share one dtype, got {mu.dtype}, {weight.dtype}, {bias.dtype}")
    if product_dtype is not None and mu.dtype != torch.float32:
        raise TypeError(f"product_dtype needs float32 mu, weight and bias, got {mu.dtype}")
    block = scoring_block_size(n_rows) if item_block is None else int(item_block)
    if block < 1:
        raise ValueError(f"item_block must be >= 1, got {block}")
    indptr, indices, _ = _seen_csr(seen, n_rows, n_items)
    threads = _check_threads(num_threads)
    cap = min(k, n_items)
    state = _ext().State(n_rows, cap, cap)
    scores = torch.empty(n_rows, min(block, n_items), dtype=mu.dtype)
    scores32 = scores if mu.dtype == torch.float32 else torch.empty(scores.shape, dtype=torch.float32)
    # float32: the top-k adds the bias as it reads each score (one pass over the block fewer than
    # addmm's copy of the bias into it); other dtypes are rounded to float32 after the bias.
    bias32 = bias.detach().contiguous().numpy() if mu.dtype == torch.float32 else None
    mu_prod = mu if product_dtype is None else mu.to(product_dtype)
    for start in range(0, n_items, block):
        stop = min(n_items, start + block)
        out = scores[:, : stop - start] if stop - start == scores.shape[1] else scores.new_empty(n_rows, stop - start)
        if product_dtype is not None:
            lowp_mm(mu_prod, weight[start:stop].t(), product_dtype, out=out)
            state.push(out.numpy(), "float32", start, indptr, indices, threads, bias32[start:stop])
            continue
        if bias32 is not None:
            torch.mm(mu, weight[start:stop].t(), out=out)
            state.push(out.numpy(), "float32", start, indptr, indices, threads, bias32[start:stop])
            continue
        torch.addmm(bias[start:stop], mu, weight[start:stop].t(), out=out)
        out = scores32[:, : stop - start].copy_(out) if out.shape == scores32.shape else out.float()
        state.push(out.numpy(), "float32", start, indptr, indices, threads)
    if n_rows == 0 or cap == 0:
        return TopK(np.full((n_rows, k), -np.inf, np.float32), np.full((n_rows, k), -1, np.int64))
    vals, idx = state.result(threads)
    if cap < k:  # a catalogue smaller than k: pad
        vals = np.concatenate([vals, np.full((n_rows, k - cap), -np.inf)], axis=1)
        idx = np.concatenate([idx, np.full((n_rows, k - cap), -1, np.int64)], axis=1)
    return TopK(vals.astype(np.float32), idx)
