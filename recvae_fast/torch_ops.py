"""The two fused ops in plain torch: the CPU path, and the fallback wherever Triton is not used.

Same contracts as the Triton ops in recvae_fast.kernels (same arguments, same results):
- sparse_input_layer: h1_pre[u] = b1 + Σ_{i∈nz(u)} c_ui·W1[i], c_ui = x_ui·m_ui / ((1−p)·‖x_u‖)
- multinomial_nll:   −mll_u = n_u·LSE_u − Σ_{i∈nz(u)} x_ui·logit_ui, logits = z·Wdᵀ + bd
Neither ever builds a B × I tensor: the first gathers W1 rows with embedding_bag, the second
goes through item chunks of bounded size and saves only the B log-sum-exps for backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .sparse import CSRBatch

# Item chunk for the streamed softmax: about this many logits (B × chunk) exist at once.
LOGITS_PER_CHUNK = 1 << 22


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


class _ChunkedMultinomialNLL(torch.autograd.Function):
    """Streams item chunks once in forward (online LSE). When z needs a gradient, the same pass
    also accumulates E_softmax[Wd]_u = Σ_i softmax_ui·Wd[i]: since dz_u = g_u·(n_u·E[Wd]_u − Σ_i
    x_ui·Wd[i]) is linear in the upstream g_u, the encoder phase then needs no second pass."""

    @staticmethod
    def forward(ctx, z, weight, bias, batch: CSRBatch, chunk: int, want_grad_z: bool):
        n_users = z.shape[0]
        run_max = torch.full((n_users,), float("-inf"), dtype=z.dtype, device=z.device)
        run_sum = torch.zeros(n_users, dtype=z.dtype, device=z.device)
        expected_w = torch.zeros_like(z) if want_grad_z else None
        for start in range(0, weight.shape[0], chunk):
            w_chunk = weight[start : start + chunk]
            logits = torch.addmm(bias[start : start + chunk], z, w_chunk.t())
            new_max = torch.maximum(run_max, logits.amax(dim=1))
            rescale = torch.exp(run_max - new_max)  # exp(-inf) = 0 on the first chunk
            probs = torch.exp(logits.sub_(new_max[:, None]))
            run_sum = run_sum * rescale + probs.sum(dim=1)
            if want_grad_z:
                expected_w.mul_(rescale[:, None]).addmm_(probs, w_chunk)
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
        ctx.batch, ctx.chunk = batch, chunk
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        z, weight, bias, lse, n, dz_per_g = ctx.saved_tensors
        batch, chunk = ctx.batch, ctx.chunk
        need_z, need_w, need_b = ctx.needs_input_grad[:3]
        grad_z = grad_nll[:, None] * dz_per_g if need_z else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        if not (need_w or need_b):
            return grad_z, None, None, None, None, None
        # G = g·n·softmax − g·x, recomputed chunk by chunk from the saved LSE. The sparse −g·x
        # part goes into each chunk's G before its product, so dWd and dbd take one product and
        # one sum per chunk; nonzeros sorted by item give each chunk a contiguous slice.
        row_ids = batch.row_ids()
        order = torch.argsort(batch.indices, stable=True)
        items_sorted = batch.indices[order]
        rows_sorted = row_ids[order]
        gx_sorted = (grad_nll[row_ids] * batch.values)[order]
        n_items = weight.shape[0]
        chunk_starts = torch.arange(0, n_items + chunk, chunk, device=z.device).clamp_(max=n_items)
        bounds = torch.searchsorted(items_sorted, chunk_starts).tolist()
        scale = (grad_nll * n)[:, None]
        for k, start in enumerate(range(0, n_items, chunk)):
            logits = torch.addmm(bias[start : start + chunk], z, weight[start : start + chunk].t())
            g_chunk = torch.exp(logits.sub_(lse[:, None])).mul_(scale)
            lo, hi = bounds[k], bounds[k + 1]
            flat = rows_sorted[lo:hi] * g_chunk.shape[1] + (items_sorted[lo:hi] - start)
            g_chunk.view(-1).index_add_(0, flat, gx_sorted[lo:hi], alpha=-1)
            if need_w:
                torch.mm(g_chunk.t(), z, out=grad_w[start : start + chunk])
            if need_b:
                torch.sum(g_chunk, dim=0, out=grad_b[start : start + chunk])
        return grad_z, grad_w, grad_b, None, None, None


def multinomial_nll(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, batch: CSRBatch) -> torch.Tensor:
    """−mll per user, [B]; differentiable in z, weight and bias (only those that need it)."""
    chunk = max(256, LOGITS_PER_CHUNK // max(1, z.shape[0]))
    want_grad_z = torch.is_grad_enabled() and z.requires_grad
    return _ChunkedMultinomialNLL.apply(z, weight, bias, batch, chunk, want_grad_z)
