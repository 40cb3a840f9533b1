"""The two fused ops in plain torch: the CPU path, and the fallback wherever Triton is not used.

Same contracts as the Triton ops in recvae_fast.kernels (same arguments, same results):
- sparse_input_layer: h1_pre[u] = b1 + Σ_{i∈nz(u)} c_ui·W1[i], c_ui = x_ui·m_ui / ((1−p)·‖x_u‖)
- multinomial_nll:   −mll_u = n_u·LSE_u − Σ_{i∈nz(u)} x_ui·logit_ui, logits = z·Wdᵀ + bd
The first gathers W1 rows with embedding_bag (no B × I input); the second streams cache-sized
item blocks (recvae_fast.cache_blocks) and saves the B log-sum-exps for backward. Only in the
decoder phase, and within KEPT_PROBS_BYTES, does it keep each block's probabilities (B × I in all)
so that backward needs no second logits product.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache_blocks import item_block_size
from .sparse import CSRBatch

def input_coefficients(batch: CSRBatch, dropout_rate: float, keep_mask: torch.Tensor | None) -> torch.Tensor:
    """c_ui for each nonzero: the row L2 normalisation and inverted dropout, folded together."""
    row_ids = batch.row_ids()
    sq_norm = torch.zeros(batch.n_rows, dtype=batch.dtype, device=batch.device)
    sq_norm.index_add_(0, row_ids, batch.values * batch.values)
    norm = sq_norm.sqrt()
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))  # an empty user keeps h1_pre = b1
    coef = batch.values / norm[row_ids]
    if dropout_rate > 0:
        if keep_mask is None:
            keep_mask = torch.rand(batch.nnz, device=batch.device) >= dropout_rate
        coef = coef * keep_mask.to(coef.dtype) / (1 - dropout_rate)
    return coef


def sparse_input_layer(
    batch: CSRBatch,
    weight_t: torch.Tensor,
    bias: torch.Tensor,
    dropout_rate: float = 0.0,
    keep_mask: torch.Tensor | None = None,
    sparse_grad: bool = False,
) -> torch.Tensor:
    """fc1 over the nonzeros only; weight_t is W1 stored I × H so the gather reads whole rows.
    sparse_grad=True makes weight_t's gradient a sparse COO tensor of the batch's rows only."""
    if not 0 <= dropout_rate < 1:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    if keep_mask is not None and keep_mask.shape != (batch.nnz,):
        raise ValueError(f"keep_mask must have one entry per nonzero ({batch.nnz}), got {tuple(keep_mask.shape)}")
    coef = input_coefficients(batch, dropout_rate, keep_mask)
    # embedding_bag's weight gradient is an index_add over the nonzeros (a scatter into the batch's rows).
    h = F.embedding_bag(
        batch.indices, weight_t, batch.indptr, mode="sum", per_sample_weights=coef, include_last_offset=True,
        sparse=sparse_grad,
    )
    return h + bias


class _BlockedMultinomialNLL(torch.autograd.Function):
    """Streams cache-sized item blocks once in forward (online LSE); every step on a block's
    B × block logits (product, max, exp, sum, probs·Wd) runs while the block is in cache.

    Only the gradients the call needs are prepared:
    - z needs a gradient (encoder phase): the same pass accumulates E_softmax[Wd]_u = Σ_i
      softmax_ui·Wd[i]; dz_u = g_u·(n_u·E[Wd]_u − Σ_i x_ui·Wd[i]) is linear in the upstream g_u,
      so backward is one multiply.
    - Wd or bd needs a gradient (decoder phase): with keep_probs, each block's exp(logits − m)
      (m: the running max at that block) is kept, and backward turns it into G = g·n·softmax − g·x
      with one per-user scale, exp(m − LSE); without it (over the memory budget), backward
      recomputes each block's logits from the saved LSE. Then dWd = Gᵀz and dbd = Σ_u G per block.
    """

    @staticmethod
    def forward(ctx, z, weight, bias, batch: CSRBatch, block: int, want_grad_z: bool, keep_probs: bool):
        n_users = z.shape[0]
        run_max = torch.full((n_users,), float("-inf"), dtype=z.dtype, device=z.device)
        run_sum = torch.zeros(n_users, dtype=z.dtype, device=z.device)
        expected_w = torch.zeros_like(z) if want_grad_z else None
        kept = []  # (exp(logits − m), m) per block, with keep_probs
        for start in range(0, weight.shape[0], block):
            w_block = weight[start : start + block]
            logits = torch.addmm(bias[start : start + block], z, w_block.t())
            new_max = torch.maximum(run_max, logits.amax(dim=1))
            rescale = torch.exp(run_max - new_max)  # exp(-inf) = 0 on the first block
            probs = logits.sub_(new_max[:, None]).exp_()
            run_sum.mul_(rescale).add_(probs.sum(dim=1))
            if want_grad_z:
                expected_w.mul_(rescale[:, None]).addmm_(probs, w_block)
            if keep_probs:
                kept.append((probs, new_max))
            run_max = new_max
        lse = run_max + torch.log(run_sum)
        # Σ_i x_ui·logit_ui = z_u·(Σ_i x_ui·Wd[i]) + Σ_i x_ui·bd[i]: one bag over the nonzeros.
        x_weight = F.embedding_bag(
            batch.indices, weight, batch.indptr, mode="sum", per_sample_weights=batch.values,
            include_last_offset=True,
        )
        x_bias = torch.zeros_like(lse).index_add_(0, batch.row_ids(), batch.values * bias[batch.indices])
        n = batch.row_sums()
        nll = n * lse - (z * x_weight).sum(dim=1) - x_bias
        if want_grad_z:
            # dz/g_u: n_u·E[Wd]_u − Σ_i x_ui·Wd[i]
            expected_w.div_(run_sum[:, None]).mul_(n[:, None]).sub_(x_weight)
        ctx.save_for_backward(z, weight, bias, lse, n, expected_w)
        ctx.batch, ctx.block, ctx.kept = batch, block, kept
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        z, weight, bias, lse, n, dz_per_g = ctx.saved_tensors
        batch, block, kept = ctx.batch, ctx.block, ctx.kept
        ctx.kept = None
        need_z, need_w, need_b = ctx.needs_input_grad[:3]
        grad_z = grad_nll[:, None] * dz_per_g if need_z else None
        if not (need_w or need_b):
            return grad_z, None, None, None, None, None, None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        # The sparse −g·x part goes into each block's G before its product, so dWd and dbd take one
        # product and one sum per block; nonzeros sorted by item give each block a contiguous slice.
        row_ids = batch.row_ids()
        order = torch.argsort(batch.indices, stable=True)
        items_sorted = batch.indices[order]
        rows_sorted = row_ids[order]
        gx_sorted = (grad_nll[row_ids] * batch.values)[order]
        n_items = weight.shape[0]
        block_starts = torch.arange(0, n_items + block, block, device=z.device).clamp_(max=n_items)
        bounds = torch.searchsorted(items_sorted, block_starts).tolist()
        scale = grad_nll * n
        for k, start in enumerate(range(0, n_items, block)):
            if kept:
                probs, block_max = kept[k]
                g_block = probs.mul_((scale * torch.exp(block_max - lse))[:, None])
            else:
                logits = torch.addmm(bias[start : start + block], z, weight[start : start + block].t())
                g_block = logits.sub_(lse[:, None]).exp_().mul_(scale[:, None])
            lo, hi = bounds[k], bounds[k + 1]
            flat = rows_sorted[lo:hi] * g_block.shape[1] + (items_sorted[lo:hi] - start)
            g_block.view(-1).index_add_(0, flat, gx_sorted[lo:hi], alpha=-1)
            if need_w:
                torch.mm(g_block.t(), z, out=grad_w[start : start + block])
            if need_b:
                torch.sum(g_block, dim=0, out=grad_b[start : start + block])
        return grad_z, grad_w, grad_b, None, None, None, None


# Decoder-phase probabilities kept from forward to backward at most (B × I values): above it,
# backward recomputes the logits instead (one more product, no B × I memory).
KEPT_PROBS_BYTES = 1 << 30


def multinomial_nll_blocked(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    batch: CSRBatch,
    item_block: int,
    keep_probs: bool | None = None,
) -> torch.Tensor:
    """multinomial_nll with an explicit item block; keep_probs: True/False forces keeping the
    decoder-phase probabilities (else recomputing them), None decides by KEPT_PROBS_BYTES."""
    if item_block < 1:
        raise ValueError(f"item_block must be >= 1, got {item_block}")
    grad_on = torch.is_grad_enabled()
    want_grad_z = grad_on and z.requires_grad
    want_grad_decoder = grad_on and (weight.requires_grad or bias.requires_grad)
    if keep_probs is None:
        keep_probs = z.shape[0] * weight.shape[0] * z.element_size() <= KEPT_PROBS_BYTES
    return _BlockedMultinomialNLL.apply(
        z, weight, bias, batch, item_block, want_grad_z, bool(keep_probs) and want_grad_decoder
    )


def multinomial_nll(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, batch: CSRBatch) -> torch.Tensor:
    """−mll per user, [B]; differentiable in z, weight and bias (only those that need it)."""
    return multinomial_nll_blocked(z, weight, bias, batch, item_block_size(z.shape[0], z.element_size()))
