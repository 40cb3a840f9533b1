"""The two fused ops in plain torch: the CPU path, and the fallback wherever Triton is not used.

Same contracts as the Triton ops in recvae_fast.kernels (same arguments, same results):
- sparse_input_layer: h1_pre[u] = b1 + Σ_{i∈nz(u)} c_ui·W1[i], c_ui = x_ui·m_ui / ((1−p)·‖x_u‖)
- multinomial_nll:   −mll_u = n_u·LSE_u − Σ_{i∈nz(u)} x_ui·logit_ui, logits = z·Wdᵀ + bd
The first gathers W1 rows with embedding_bag (no B × I input; its weight gradient comes from the
C++ CSR row sums on the CPU); the second streams cache-sized item blocks (recvae_fast.cache_blocks),
each block's max / exp / sum in one C++ call on the CPU (csrc/online_softmax.cpp), and saves the B
log-sum-exps for backward. Only in the decoder phase, and within kept_probs_budget
(an eighth of memory), does it keep each block's probabilities (B × I in all) so that backward
needs no second logits product. Large outputs live in recycled memory (recvae_fast.workspace).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .cache_blocks import _MIN_BLOCK, nll_block_size
from .sparse import CSRBatch
from .workspace import recycled_empty

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
    return torch.ops.recvae_fast.sparse_input_layer(batch.indptr, batch.indices, coef, weight_t, bias, sparse_grad)


def _batch_of(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n_cols: int) -> CSRBatch:
    """The CSRBatch of tensors that already form one (the registered ops take tensors, not batches)."""
    return CSRBatch(indptr, indices, values, n_cols)


MACHINE_ITEM_BLOCK = 0  # an item_block of 0: the machine's rule (cache_blocks), applied when the op runs


def kept_max_rows(n_items: int, item_block: int) -> int:
    """Rows of the forward's kept_max: one per item block, for the smallest block the op may use
    (the machine's rule never picks fewer than _MIN_BLOCK items), so the shape is known before it runs."""
    return -(-n_items // (item_block or _MIN_BLOCK))


# False: the NLL's forward takes the torch-ops route on the CPU too (tests compare both routes).
USE_CPP_SOFTMAX = True


def _online_softmax_extension(z: torch.Tensor):
    """csrc/online_softmax.cpp's module where it applies (CPU, float32/float64), else None."""
    if not USE_CPP_SOFTMAX or z.device.type != "cpu" or z.dtype not in (torch.float32, torch.float64):
        return None
    from . import _online_softmax  # loaded on first use, not when the package is imported

    return _online_softmax


def nll_forward(z, weight, bias, indptr, indices, values, item_block: int, want_grad_z: bool, keep_probs: bool):
    """The blocked NLL's forward: (nll [B], lse [B], dz_per_g, kept, kept_max, block_used).

    item_block items per block (MACHINE_ITEM_BLOCK: the machine's rule, decided here, so a
    compiled graph follows the thread count at run time); block_used [1] says which was used.
    Streams cache-sized item blocks once (online LSE); every step on a block's B × block logits
    (product, max, exp, sum, probs·Wd) runs while the block is in cache.
    - want_grad_z (encoder phase): the same pass accumulates E_softmax[Wd]_u = Σ_i softmax_ui·Wd[i];
      dz_u = g_u·(n_u·E[Wd]_u − Σ_i x_ui·Wd[i]) is linear in the upstream g_u, so dz_per_g [B, K]
      makes backward one multiply. Else dz_per_g is empty.
    - keep_probs (decoder phase): each block's exp(logits − m) (m: the running max at that block)
      is kept for backward: `kept` holds the blocks one after another, block k as a contiguous
      B × width matrix (B × I values in all), kept_max [kept_max_rows, B] the m of each (rows past
      the last block unused). Else both empty.
    """
    batch = _batch_of(indptr, indices, values, weight.shape[0])
    n_users, n_items = z.shape[0], weight.shape[0]
    block = item_block or nll_block_size(n_users, z.element_size(), keep_probs)
    run_max = torch.full((n_users,), float("-inf"), dtype=z.dtype, device=z.device)
    run_sum = torch.zeros(n_users, dtype=z.dtype, device=z.device)
    rescale = torch.empty_like(run_sum)
    fused = _online_softmax_extension(z)  # the per-block softmax step in C++ (CPU), else torch ops
    if fused is not None:  # numpy views made once: a conversion per block costs microseconds each
        row_state = (run_max.numpy(), run_sum.numpy(), rescale.numpy(), max(1, torch.get_num_threads()))
    expected_w = torch.zeros_like(z) if want_grad_z else z.new_empty(0)
    if keep_probs:  # each block's logits (then probabilities) are written where they are kept
        kept = recycled_empty("multinomial_nll.kept", (n_users * n_items,), z.dtype, z.device)
    else:  # one block's logits at a time, in one buffer that stays in cache
        kept, logits_buffer = z.new_empty(0), z.new_empty(n_users * min(block, n_items))
    kept_max = z.new_zeros((kept_max_rows(n_items, item_block), n_users) if keep_probs else 0)
    for k, start in enumerate(range(0, n_items, block)):
        w_block = weight[start : start + block]
        width = w_block.shape[0]
        if keep_probs:
            logits = kept[n_users * start : n_users * (start + width)].view(n_users, width)
        else:
            logits = logits_buffer[: n_users * width].view(n_users, width)
        torch.addmm(bias[start : start + block], z, w_block.t(), out=logits)
        probs = logits  # exponentiated in place: exp(logits − run_max) after the max's update
        if fused is not None:
            fused.online_softmax_block(logits.numpy(), *row_state)
        else:
            new_max = torch.maximum(run_max, logits.amax(dim=1))
            torch.exp(run_max - new_max, out=rescale)  # exp(-inf) = 0 on the first block
            logits.sub_(new_max[:, None]).exp_()
            run_sum.mul_(rescale).add_(probs.sum(dim=1))
            run_max = new_max
        if want_grad_z:
            expected_w.mul_(rescale[:, None]).addmm_(probs, w_block)
        if keep_probs:
            kept_max[k] = run_max
    lse = run_max + torch.log(run_sum)
    # Σ_i x_ui·logit_ui = z_u·(Σ_i x_ui·Wd[i]) + Σ_i x_ui·bd[i]: one bag over the nonzeros.
    x_weight = F.embedding_bag(
        indices, weight, indptr, mode="sum", per_sample_weights=values, include_last_offset=True,
    )
    x_bias = torch.zeros_like(lse).index_add_(0, batch.row_ids(), values * bias[indices])
    n = batch.row_sums()
    nll = n * lse - (z * x_weight).sum(dim=1) - x_bias
    if want_grad_z:
        # dz/g_u: n_u·E[Wd]_u − Σ_i x_ui·Wd[i]
        expected_w.div_(run_sum[:, None]).mul_(n[:, None]).sub_(x_weight)
    return nll, lse, expected_w, kept, kept_max, torch.tensor([block])


def nll_decoder_grads(grad_nll, z, weight, bias, indptr, indices, values, lse, kept, kept_max, block_used):
    """(dWd, dbd) of the blocked NLL from the forward's lse (and kept probabilities if any, else
    each block's logits are recomputed): G = g·n·softmax − g·x per block, dWd = Gᵀz, dbd = Σ_u G.
    Reads its inputs only."""
    batch = _batch_of(indptr, indices, values, weight.shape[0])
    n_users, n_items = z.shape[0], weight.shape[0]
    block = int(block_used)
    grad_w = recycled_empty("multinomial_nll.grad_weight", weight.shape, weight.dtype, weight.device)
    grad_b = torch.empty_like(bias)
    # The sparse −g·x part goes into each block's G before its product, so dWd and dbd take one
    # product and one sum per block; nonzeros sorted by item give each block a contiguous slice.
    # Per-block views and indices are made for all blocks at once: each small torch call costs
    # ~10 µs, which at 20 blocks adds up to milliseconds.
    row_ids = batch.row_ids()
    order = torch.argsort(indices, stable=True)
    items_sorted = indices[order]
    gx_sorted = (grad_nll[row_ids] * values)[order]
    item_block_start = torch.div(items_sorted, block, rounding_mode="floor") * block
    # each nonzero's position in its block's row-major B × width G
    flat = row_ids[order] * (n_items - item_block_start).clamp_(max=block) + (items_sorted - item_block_start)
    block_starts = torch.arange(0, n_items + block, block, device=z.device).clamp_(max=n_items)
    bounds = torch.searchsorted(items_sorted, block_starts)[1:-1].tolist()
    flat_blocks, gx_blocks = flat.tensor_split(bounds), gx_sorted.tensor_split(bounds)
    widths = [min(block, n_items - start) for start in range(0, n_items, block)]
    grad_w_blocks, grad_b_blocks = grad_w.split(block), grad_b.split(block)
    scale = grad_nll * batch.row_sums()
    if kept.numel():
        prob_blocks = kept.split([n_users * width for width in widths])
        block_scales = (scale * torch.exp(kept_max[: len(widths)] - lse)).unsqueeze(-1)
    else:
        weight_blocks, bias_blocks = weight.split(block), bias.split(block)
        scale = scale.unsqueeze(-1)
    g_buffer = z.new_empty(n_users * min(block, n_items))  # one block's G at a time, allocated once
    for k, width in enumerate(widths):
        g_block = g_buffer[: n_users * width].view(n_users, width)
        if kept.numel():
            torch.mul(prob_blocks[k].view(n_users, width), block_scales[k], out=g_block)
        else:
            torch.addmm(bias_blocks[k], z, weight_blocks[k].t(), out=g_block)
            g_block.sub_(lse[:, None]).exp_().mul_(scale)
        g_block.view(-1).index_add_(0, flat_blocks[k], gx_blocks[k], alpha=-1)
        torch.mm(g_block.t(), z, out=grad_w_blocks[k])
        torch.sum(g_block, dim=0, out=grad_b_blocks[k])
    return grad_w, grad_b


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


_HOST_MEMORY_BYTES = _host_memory_bytes()  # read once here: torch.compile cannot trace os.sysconf


def _memory_bytes(device: torch.device) -> int:
    """The memory of the device kept probabilities would live on (host RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return _HOST_MEMORY_BYTES


# Decoder-phase probabilities kept from forward to backward at most (B × I values), as a fraction
# of the device's memory: above it, backward recomputes the logits instead (one more product, no
# B × I memory). With the kept memory recycled from step to step (recvae_fast.workspace), keeping
# is the faster choice at every size measured: 1M items, B 500 (2 GB), 3.4 s against 4.9 s on 2 CPU
# cores. None: an eighth of the memory; a number of bytes overrides it.
KEPT_PROBS_FRACTION = 1 / 8
KEPT_PROBS_BYTES: int | None = None


def kept_probs_budget(device: torch.device) -> int:
    """Bytes of kept decoder-phase probabilities allowed on `device`."""
    if KEPT_PROBS_BYTES is not None:
        return KEPT_PROBS_BYTES
    return int(_memory_bytes(device) * KEPT_PROBS_FRACTION)


def multinomial_nll_blocked(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    batch: CSRBatch,
    item_block: int,
    keep_probs: bool | None = None,
) -> torch.Tensor:
    """multinomial_nll with an explicit item block; keep_probs: True/False forces keeping the
    decoder-phase probabilities (else recomputing them), None decides by kept_probs_budget."""
    if item_block < 1:
        raise ValueError(f"item_block must be >= 1, got {item_block}")
    return _registered_nll(z, weight, bias, batch, item_block, keep_probs)


def multinomial_nll(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, batch: CSRBatch) -> torch.Tensor:
    """−mll per user, [B]; differentiable in z, weight and bias (only those that need it)."""
    return _registered_nll(z, weight, bias, batch, MACHINE_ITEM_BLOCK, None)


def _registered_nll(z, weight, bias, batch: CSRBatch, item_block: int, keep_probs: bool | None) -> torch.Tensor:
    """recvae_fast::multinomial_nll, asked for the gradients the call needs (only those)."""
    grad_on = torch.is_grad_enabled()
    want_grad_z = grad_on and z.requires_grad
    want_grad_decoder = grad_on and (weight.requires_grad or bias.requires_grad)
    if keep_probs is None:
        keep_probs = z.shape[0] * weight.shape[0] * z.element_size() <= kept_probs_budget(z.device)
    nll, *_ = torch.ops.recvae_fast.multinomial_nll(
        z, weight, bias, batch.indptr, batch.indices, batch.values, item_block, want_grad_z,
        bool(keep_probs) and want_grad_decoder,
    )
    return nll


from . import custom_ops as _custom_ops  # noqa: E402,F401 - registers the recvae_fast:: ops, built from the functions above
