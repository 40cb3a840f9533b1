"""The two fused ops in plain torch: the CPU path, and the fallback wherever Triton is not used.

Same contracts as the Triton ops in recvae_fast.kernels (same arguments, same results):
- sparse_input_layer: h1_pre[u] = b1 + Σ_{i∈nz(u)} c_ui·W1[i], c_ui = x_ui·m_ui / ((1−p)·‖x_u‖)
- multinomial_nll:   −mll_u = n_u·LSE_u − Σ_{i∈nz(u)} x_ui·logit_ui, logits = z·Wdᵀ + bd
The first gathers W1 rows with embedding_bag (no B × I input; its weight gradient comes from the
C++ CSR row sums on the CPU); the second streams cache-sized item blocks (recvae_fast.cache_blocks)
and saves the B log-sum-exps for backward. On the CPU each block's bias, target logits, max, exp and
sum are one C++ call (csrc/nll_blocks.cpp), and so are the decoder backward's G and dbd per block.
Only in the decoder phase, and within kept_probs_budget (an eighth of memory), does it keep each
block's probabilities (B × I in all) so that backward needs no second logits product. Large outputs live in recycled memory (recvae_fast.workspace).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .cache_blocks import _MIN_BLOCK, nll_block_size
from .precision import lowp_mm
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
    Nonzeros that dropout drops are left out of the gather and of its backward (half the rows at
    rate 0.5). sparse_grad=True makes weight_t's gradient a sparse COO tensor of the rows the kept
    nonzeros touch (an absent row and a zero row step alike in RowSparseAdam)."""
    if not 0 <= dropout_rate < 1:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    if keep_mask is not None and keep_mask.shape != (batch.nnz,):
        raise ValueError(f"keep_mask must have one entry per nonzero ({batch.nnz}), got {tuple(keep_mask.shape)}")
    if dropout_rate > 0 and keep_mask is None:
        keep_mask = torch.rand(batch.nnz, device=batch.device) >= dropout_rate
    coef = input_coefficients(batch, dropout_rate, keep_mask)
    indptr, indices = batch.indptr, batch.indices
    if dropout_rate > 0:  # a dropped nonzero's coefficient is 0: it adds nothing, and is skipped
        kept = keep_mask != 0
        kept_per_row = torch.zeros_like(indptr[1:]).index_add_(0, batch.row_ids(), kept.to(indptr.dtype))
        indptr = torch.cat([indptr[:1], kept_per_row.cumsum(0)])
        indices, coef = indices[kept], coef[kept]
    return torch.ops.recvae_fast.sparse_input_layer(indptr, indices, coef, weight_t, bias, sparse_grad)


def _batch_of(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n_cols: int) -> CSRBatch:
    """The CSRBatch of tensors that already form one (the registered ops take tensors, not batches)."""
    return CSRBatch(indptr, indices, values, n_cols)


MACHINE_ITEM_BLOCK = 0  # an item_block of 0: the machine's rule (cache_blocks), applied when the op runs


def kept_max_rows(n_items: int, item_block: int) -> int:
    """Rows of the forward's kept_max: one per item block, for the smallest block the op may use
    (the machine's rule never picks fewer than _MIN_BLOCK items), so the shape is known before it runs."""
    return -(-n_items // (item_block or _MIN_BLOCK))


# False: the NLL takes the torch-ops route on the CPU too (tests compare both routes).
USE_CPP_BLOCKS = True


def _nll_blocks_extension(z: torch.Tensor):
    """csrc/nll_blocks.cpp's module where it applies (CPU, float32/float64), else None."""
    if not USE_CPP_BLOCKS or z.device.type != "cpu" or z.dtype not in (torch.float32, torch.float64):
        return None
    from . import _nll_blocks  # loaded on first use, not when the package is imported

    return _nll_blocks


def _csr_cursor(extension, indptr, indices, values, dtype):
    """The C++ walk over the batch's nonzeros block by block, and the tensors its arrays view
    (which must stay alive as long as it does)."""
    arrays = (indptr.contiguous(), indices.contiguous(), values.detach().to(dtype).contiguous())
    return extension.CsrCursor(*(a.numpy() for a in arrays)), arrays


def _unvisited(cursor, batch: CSRBatch, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(rows, items, values in dtype) of the nonzeros the block walk did not visit (rows not sorted
    by item, or items out of range: a batch that is not canonical), or None when it visited them all."""
    if cursor.complete():
        return None
    row_ids = batch.row_ids()
    left = torch.arange(batch.nnz, device=row_ids.device) >= torch.from_numpy(cursor.positions())[row_ids]
    return row_ids[left], batch.indices[left], batch.values[left].to(dtype)


def _mm_into(out, a, b, product_dtype):
    """out = a @ b, with operands in product_dtype when given (bf16 under autocast; out keeps its
    dtype, float32), else in their own dtype."""
    if product_dtype is None:
        return torch.mm(a, b, out=out)
    return lowp_mm(a, b, product_dtype, out=out)


def nll_forward(z, weight, bias, indptr, indices, values, item_block: int, want_grad_z: bool, keep_probs: bool,
                product_dtype: torch.dtype | None = None):
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
    - product_dtype (bf16 under autocast): the logits and P·Wd products take operands in it (z and
      Wd cast once per call) and give z's dtype; the max, exp, sums and outputs stay in z's dtype.
    """
    batch = _batch_of(indptr, indices, values, weight.shape[0])
    n_users, n_items = z.shape[0], weight.shape[0]
    block = item_block or nll_block_size(n_users, z.element_size(), keep_probs)
    run_max = torch.full((n_users,), float("-inf"), dtype=z.dtype, device=z.device)
    run_sum = torch.zeros(n_users, dtype=z.dtype, device=z.device)
    rescale = torch.empty_like(run_sum)
    expected_w = torch.zeros_like(z) if want_grad_z else z.new_empty(0)
    fused = _nll_blocks_extension(z)  # the per-block step in C++ (CPU), else torch ops
    z_prod, w_prod = (z, weight) if product_dtype is None else (z.to(product_dtype), weight.to(product_dtype))
    if fused is not None:  # numpy views made once: a conversion per block costs microseconds each
        targets = torch.zeros_like(run_sum)  # Σ_i x_ui·logit_ui, gathered from each block's logits
        cursor, _cursor_arrays = _csr_cursor(fused, indptr, indices, values, z.dtype)
        bias_array, n_threads = bias.detach().contiguous().numpy(), max(1, torch.get_num_threads())
        row_state = (run_max.numpy(), run_sum.numpy(), rescale.numpy(), cursor)
    if keep_probs:  # each block's logits (then probabilities) are written where they are kept
        kept = recycled_empty("multinomial_nll.kept", (n_users * n_items,), z.dtype, z.device)
    else:  # one block's logits at a time, in one buffer that stays in cache
        kept, logits_buffer = z.new_empty(0), z.new_empty(n_users * min(block, n_items))
    kept_max = z.new_zeros((kept_max_rows(n_items, item_block), n_users) if keep_probs else 0)
    for k, start in enumerate(range(0, n_items, block)):
        w_block = w_prod[start : start + block]
        width = w_block.shape[0]
        if keep_probs:
            logits = kept[n_users * start : n_users * (start + width)].view(n_users, width)
        else:
            logits = logits_buffer[: n_users * width].view(n_users, width)
        probs = logits  # exponentiated in place: exp(logits − run_max) after the max's update
        if fused is not None:  # the bias is added in the C++ step, not copied into the block first
            _mm_into(logits, z_prod, w_block.t(), product_dtype)
            fused.online_softmax_block(logits.numpy(), bias_array[start : start + width], *row_state, start,
                                       targets.numpy(), n_threads)
        else:
            if product_dtype is None:
                torch.addmm(bias[start : start + block], z, w_block.t(), out=logits)
            else:
                _mm_into(logits, z_prod, w_block.t(), product_dtype).add_(bias[start : start + block])
            new_max = torch.maximum(run_max, logits.amax(dim=1))
            torch.exp(run_max - new_max, out=rescale)  # exp(-inf) = 0 on the first block
            logits.sub_(new_max[:, None]).exp_()
            run_sum.mul_(rescale).add_(probs.sum(dim=1))
            run_max = new_max
        if want_grad_z and product_dtype is None:
            expected_w.mul_(rescale[:, None]).addmm_(probs, w_block)
        elif want_grad_z:
            expected_w.mul_(rescale[:, None]).add_(lowp_mm(probs, w_block, product_dtype))
        if keep_probs:
            kept_max[k] = run_max
    lse = run_max + torch.log(run_sum)
    if want_grad_z or fused is None:  # Σ_i x_ui·Wd[i]: one bag over the nonzeros
        x_weight = F.embedding_bag(
            indices, weight, indptr, mode="sum", per_sample_weights=values, include_last_offset=True,
        )
    if fused is not None:
        left = _unvisited(cursor, batch, z.dtype)
        if left is not None:  # logit_ui of what the walk missed, from its Wd row
            rows, items, x = left
            targets.index_add_(0, rows, x * ((z[rows] * weight[items]).sum(dim=1) + bias[items]))
    else:  # Σ_i x_ui·logit_ui = z_u·(Σ_i x_ui·Wd[i]) + Σ_i x_ui·bd[i]
        x_bias = torch.zeros_like(lse).index_add_(0, batch.row_ids(), values * bias[indices])
        targets = (z * x_weight).sum(dim=1) + x_bias
    n = batch.row_sums()
    nll = n * lse - targets
    if want_grad_z:
        # dz/g_u: n_u·E[Wd]_u − Σ_i x_ui·Wd[i]
        expected_w.div_(run_sum[:, None]).mul_(n[:, None]).sub_(x_weight)
    return nll, lse, expected_w, kept, kept_max, torch.tensor([block])


def nll_decoder_grads(grad_nll, z, weight, bias, indptr, indices, values, lse, kept, kept_max, block_used,
                      product_dtype: torch.dtype | None = None):
    """(dWd, dbd) of the blocked NLL from the forward's lse (and kept probabilities if any, else
    each block's logits are recomputed): G = g·n·softmax − g·x per block, dWd = Gᵀz, dbd = Σ_u G.
    product_dtype: as in nll_forward (G and z as the operands of dWd's product; dbd and G in z's
    dtype). Reads its inputs only."""
    batch = _batch_of(indptr, indices, values, weight.shape[0])
    block = int(block_used)
    grad_w = recycled_empty("multinomial_nll.grad_weight", weight.shape, weight.dtype, weight.device)
    grad_b = torch.empty_like(bias)
    fused = _nll_blocks_extension(z)
    if fused is not None:
        _decoder_grads_cpp(fused, grad_nll, z, weight, bias, batch, lse, kept, kept_max, block, grad_w, grad_b,
                           product_dtype)
    else:
        _decoder_grads_torch(grad_nll, z, weight, bias, batch, lse, kept, kept_max, block, grad_w, grad_b,
                             product_dtype)
    return grad_w, grad_b


def _block_widths(n_items: int, block: int) -> list[int]:
    return [min(block, n_items - start) for start in range(0, n_items, block)]


def _decoder_grads_cpp(fused, grad_nll, z, weight, bias, batch, lse, kept, kept_max, block, grad_w, grad_b,
                       product_dtype=None):
    """nll_decoder_grads with each block's G, its sparse −g·x part and dbd in one C++ call
    (csrc/nll_blocks.cpp), then dWd's block as one product."""
    n_users, n_items = z.shape[0], weight.shape[0]
    widths = _block_widths(n_items, block)
    cursor, _cursor_arrays = _csr_cursor(fused, batch.indptr, batch.indices, batch.values, z.dtype)
    grad_nll = grad_nll.detach().to(z.dtype).contiguous()
    scale = grad_nll * batch.row_sums().to(z.dtype)
    n_threads, row_grad, grad_b_array = max(1, torch.get_num_threads()), grad_nll.numpy(), grad_b.numpy()
    g_buffer = z.new_empty(n_users * min(block, n_items))  # one block's G at a time, allocated once
    z_prod, w_prod = (z, weight) if product_dtype is None else (z.to(product_dtype), weight.to(product_dtype))
    if kept.numel():
        prob_blocks = kept.split([n_users * width for width in widths])
        block_scales = (scale * torch.exp(kept_max[: len(widths)] - lse)).numpy()
    else:
        weight_blocks = w_prod.split(block)
        bias_array, lse_array, scale_array = bias.detach().contiguous().numpy(), lse.numpy(), scale.numpy()
    for k, (start, width) in enumerate(zip(range(0, n_items, block), widths)):
        g_block = g_buffer[: n_users * width].view(n_users, width)
        if kept.numel():
            fused.decoder_grad_block(prob_blocks[k].view(n_users, width).numpy(), g_block.numpy(), None, None,
                                     block_scales[k], row_grad, cursor, start,
                                     grad_b_array[start : start + width], n_threads)
        else:  # recomputed into G's buffer: exp(z·Wdᵀ + bd − lse)·scale in place
            _mm_into(g_block, z_prod, weight_blocks[k].t(), product_dtype)
            fused.decoder_grad_block(g_block.numpy(), g_block.numpy(), bias_array[start : start + width], lse_array,
                                     scale_array, row_grad, cursor, start,
                                     grad_b_array[start : start + width], n_threads)
        _mm_into(grad_w[start : start + width], g_block.t(), z_prod, product_dtype)
    left = _unvisited(cursor, batch, z.dtype)
    if left is not None:  # the −g·x part of what the walk missed, added to dWd and dbd directly
        rows, items, x = left
        gx = grad_nll[rows] * x
        grad_w.index_add_(0, items, z[rows] * gx[:, None], alpha=-1)
        grad_b.index_add_(0, items, gx, alpha=-1)


def _decoder_grads_torch(grad_nll, z, weight, bias, batch, lse, kept, kept_max, block, grad_w, grad_b,
                         product_dtype=None):
    """nll_decoder_grads in torch ops (GPU, other dtypes, or USE_CPP_BLOCKS off)."""
    n_users, n_items = z.shape[0], weight.shape[0]
    indices, values = batch.indices, batch.values
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
    widths = _block_widths(n_items, block)
    grad_w_blocks, grad_b_blocks = grad_w.split(block), grad_b.split(block)
    scale = grad_nll * batch.row_sums()
    if kept.numel():
        prob_blocks = kept.split([n_users * width for width in widths])
        block_scales = (scale * torch.exp(kept_max[: len(widths)] - lse)).unsqueeze(-1)
    else:
        weight_blocks, bias_blocks = weight.split(block), bias.split(block)
        scale = scale.unsqueeze(-1)
    z_prod = z if product_dtype is None else z.to(product_dtype)
    g_buffer = z.new_empty(n_users * min(block, n_items))  # one block's G at a time, allocated once
    for k, width in enumerate(widths):
        g_block = g_buffer[: n_users * width].view(n_users, width)
        if kept.numel():
            torch.mul(prob_blocks[k].view(n_users, width), block_scales[k], out=g_block)
        elif product_dtype is None:
            torch.addmm(bias_blocks[k], z, weight_blocks[k].t(), out=g_block)
            g_block.sub_(lse[:, None]).exp_().mul_(scale)
        else:
            _mm_into(g_block, z_prod, weight_blocks[k].t(), product_dtype).add_(bias_blocks[k])
            g_block.sub_(lse[:, None]).exp_().mul_(scale)
        g_block.view(-1).index_add_(0, flat_blocks[k], gx_blocks[k], alpha=-1)
        _mm_into(grad_w_blocks[k], g_block.t(), z_prod, product_dtype)
        torch.sum(g_block, dim=0, out=grad_b_blocks[k])


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
