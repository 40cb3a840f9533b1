"""The multinomial NLL fused with the decoder: −mll_u = n_u·LSE_u − Σ_{i∈nz(u)} x_ui·logit_ui,
logits = z·Wdᵀ + bd, never building B × I.

    impl "torch"   torch ops over cache-sized item blocks (recvae_fast.cache_blocks)
    impl "cpp"     the same block loop with each block's bias, target logits, max, exp and sum one
                   C++ call (csrc/nll_blocks.cpp), and so the decoder backward's G and dbd per block
    impl "triton"  kernels/multinomial_nll.py (registered there as recvae_fast::triton_multinomial_nll)

"torch" and "cpp" stream the item blocks once (online LSE) and save the B log-sum-exps for
backward. Only in the decoder phase, and within the kept-probabilities budget (NLLOptions: an
eighth of memory), do they keep each block's probabilities (B × I in all) so that backward needs no
second logits product. Large outputs live in recycled memory (recvae_fast.workspace). They run as
the registered ops

    recvae_fast::multinomial_nll(z, weight, bias, indptr, indices, values, item_block,
                                 want_grad_z, keep_probs, cpp, product_dtype)
                                 -> (nll, lse, dz_per_g, kept, kept_max, block_used)
        only nll is differentiable (in z, weight, bias), the rest is what its backward needs;
        item_block 0: the machine's rule, decided when the op runs; product_dtype (None, or bf16
        under autocast): the dtype of the products' operands, everything else in the inputs' dtype.
    recvae_fast::multinomial_nll_decoder_backward(...) -> (grad_weight, grad_bias)
        that backward's decoder part, one op so that its block loop stays out of traced graphs.

Under torch.autocast the products take the autocast dtype's operands on float32 inputs
(bf16/fp16 inputs are widened to float32 first); LSE, softmax and the gradients' sums stay float32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cache_blocks import _MIN_BLOCK, nll_block_size
from ..precision import (autocast_product_dtype, lowp_mm, register_autocast_kernel, register_float32_autocast,
                         widen_low)
from ..sparse import CSRBatch
from ..workspace import recycled_empty
from .dispatch import FLOAT32_64, compute_dtype, import_kernel, resolve_impl


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


@dataclass(frozen=True)
class NLLOptions:
    """Tuning knobs of the "torch" and "cpp" block loops (the Triton kernel picks its own tiles).

    item_block: items per block; 0 is the machine's rule (recvae_fast.cache_blocks), applied when
    the op runs. keep_probs: True/False forces keeping the decoder-phase probabilities from forward
    to backward (else backward recomputes the logits: one more product, no B × I memory); None
    keeps them while B × I values fit the budget. That budget is kept_probs_bytes if given, else
    kept_probs_fraction of the device's memory: with the kept memory recycled from step to step
    (recvae_fast.workspace), keeping is the faster choice at every size measured (1M items, B 500,
    2 GB: 3.4 s against 4.9 s on 2 CPU cores)."""

    item_block: int = 0
    keep_probs: bool | None = None
    kept_probs_fraction: float = 1 / 8
    kept_probs_bytes: int | None = None

    def __post_init__(self):
        if isinstance(self.item_block, bool) or not isinstance(self.item_block, int) or self.item_block < 0:
            raise ValueError(f"item_block must be an integer >= 0 (0: the machine's rule), got {self.item_block!r}")
        if self.keep_probs not in (None, True, False):
            raise ValueError(f"keep_probs must be True, False or None, got {self.keep_probs!r}")
        if not 0 <= self.kept_probs_fraction <= 1:
            raise ValueError(f"kept_probs_fraction must be in [0, 1], got {self.kept_probs_fraction!r}")
        if self.kept_probs_bytes is not None and not (isinstance(self.kept_probs_bytes, int)
                                                      and self.kept_probs_bytes >= 0):
            raise ValueError(f"kept_probs_bytes must be an integer >= 0 or None, got {self.kept_probs_bytes!r}")

    def kept_probs_budget(self, device: torch.device) -> int:
        """Bytes of kept decoder-phase probabilities allowed on `device`."""
        if self.kept_probs_bytes is not None:
            return self.kept_probs_bytes
        return int(_memory_bytes(device) * self.kept_probs_fraction)


DEFAULT_OPTIONS = NLLOptions()


def multinomial_nll(z: Tensor, weight: Tensor, bias: Tensor, batch: CSRBatch, *, impl: str | None = None,
                    options: NLLOptions | None = None) -> Tensor:
    """−mll per user [B]: n_u·logsumexp(z_u·Wᵀ + b) − Σ_{i∈nz(u)} x_ui·(z_u·W[i] + b[i]), never
    building B × I; differentiable in z, weight and bias (only those that need it get a gradient).
    impl: see recvae_fast.ops.dispatch; options: the block loop's knobs ("torch" and "cpp")."""
    impl = resolve_impl("multinomial_nll", impl, z.device, compute_dtype(z))
    if impl == "triton":
        if options is not None:
            raise ValueError("multinomial_nll: options tune the 'torch' and 'cpp' block loops; impl 'triton' "
                             "takes none")
        return import_kernel("multinomial_nll", "multinomial_nll")(z, weight, bias, batch)
    options = DEFAULT_OPTIONS if options is None else options
    grad_on = torch.is_grad_enabled()
    want_grad_z = grad_on and z.requires_grad
    want_grad_decoder = grad_on and (weight.requires_grad or bias.requires_grad)
    keep_probs = options.keep_probs
    if keep_probs is None:
        keep_probs = z.shape[0] * weight.shape[0] * z.element_size() <= options.kept_probs_budget(z.device)
    nll, *_ = torch.ops.recvae_fast.multinomial_nll(
        z, weight, bias, batch.indptr, batch.indices, batch.values, options.item_block, want_grad_z,
        bool(keep_probs) and want_grad_decoder, impl == "cpp",
    )
    return nll


def _batch_of(indptr: Tensor, indices: Tensor, values: Tensor, n_cols: int) -> CSRBatch:
    """The CSRBatch of tensors that already form one (the registered ops take tensors, not batches)."""
    return CSRBatch(indptr, indices, values, n_cols)


def kept_max_rows(n_items: int, item_block: int) -> int:
    """Rows of the forward's kept_max: one per item block, for the smallest block the op may use
    (the machine's rule never picks fewer than _MIN_BLOCK items), so the shape is known before it runs."""
    return -(-n_items // (item_block or _MIN_BLOCK))


def _check_cpp(z: Tensor, op: str) -> None:
    if z.device.type != "cpu" or z.dtype not in FLOAT32_64:
        raise TypeError(f"recvae_fast::{op}: cpp=True takes CPU float32/float64 tensors, got {z.dtype} on {z.device}")


def _csr_cursor(extension, indptr, indices, values, dtype):
    """The C++ walk over the batch's nonzeros block by block, and the tensors its arrays view
    (which must stay alive as long as it does)."""
    arrays = (indptr.contiguous(), indices.contiguous(), values.detach().to(dtype).contiguous())
    return extension.CsrCursor(*(a.numpy() for a in arrays)), arrays


def _unvisited(cursor, batch: CSRBatch, dtype) -> tuple[Tensor, Tensor, Tensor] | None:
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


def _x_weight(batch: CSRBatch, weight: Tensor) -> Tensor:
    """Σ_i x_ui·Wd[i] per user: one bag over the nonzeros."""
    return F.embedding_bag(batch.indices, weight, batch.indptr, mode="sum", per_sample_weights=batch.values,
                           include_last_offset=True)


# ----------------------------------------------------------------------------- forward


class _ForwardBlocks:
    """What the two forward block loops share: each block's logits memory (kept, or one buffer that
    stays in cache), the running max and sum, E_softmax[Wd] (want_grad_z) and the kept maxima."""

    def __init__(self, z, weight, n_items, block, item_block, want_grad_z, keep_probs, product_dtype):
        n_users = z.shape[0]
        self.n_users, self.n_items, self.block = n_users, n_items, block
        self.want_grad_z, self.keep_probs, self.product_dtype = want_grad_z, keep_probs, product_dtype
        self.run_max = torch.full((n_users,), float("-inf"), dtype=z.dtype, device=z.device)
        self.run_sum = torch.zeros(n_users, dtype=z.dtype, device=z.device)
        self.rescale = torch.empty_like(self.run_sum)
        self.expected_w = torch.zeros_like(z) if want_grad_z else z.new_empty(0)
        self.z_prod, self.w_prod = (z, weight) if product_dtype is None else (z.to(product_dtype),
                                                                            weight.to(product_dtype))
        if keep_probs:  # each block's logits (then probabilities) are written where they are kept
            self.kept = recycled_empty("multinomial_nll.kept", (n_users * n_items,), z.dtype, z.device)
        else:  # one block's logits at a time, in one buffer that stays in cache
            self.kept, self.logits_buffer = z.new_empty(0), z.new_empty(n_users * min(block, n_items))
        self.kept_max = z.new_zeros((kept_max_rows(n_items, item_block), n_users) if keep_probs else 0)

    def blocks(self):
        """(k, start, the block's Wd rows in the product dtype, its B × width logits memory) per block."""
        n_users = self.n_users
        for k, start in enumerate(range(0, self.n_items, self.block)):
            w_block = self.w_prod[start : start + self.block]
            width = w_block.shape[0]
            if self.keep_probs:
                logits = self.kept[n_users * start : n_users * (start + width)].view(n_users, width)
            else:
                logits = self.logits_buffer[: n_users * width].view(n_users, width)
            yield k, start, w_block, logits

    def block_done(self, k: int, probs: Tensor, w_block: Tensor) -> None:
        """After block k's softmax step (probs = exp(logits − run_max), rescale set)."""
        if self.want_grad_z and self.product_dtype is None:
            self.expected_w.mul_(self.rescale[:, None]).addmm_(probs, w_block)
        elif self.want_grad_z:
            self.expected_w.mul_(self.rescale[:, None]).add_(lowp_mm(probs, w_block, self.product_dtype))
        if self.keep_probs:
            self.kept_max[k] = self.run_max


def _forward_blocks_cpp(s: _ForwardBlocks, z, weight, bias, batch: CSRBatch) -> tuple[Tensor, Tensor | None]:
    """The block loop with each block's softmax step in C++ (the bias is added there, not copied
    into the block first; Σ_i x_ui·logit_ui is gathered from each block's logits): (targets, Σ x·Wd
    or None when no dz is wanted)."""
    from .. import _nll_blocks  # loaded on first use, not when the package is imported

    targets = torch.zeros_like(s.run_sum)
    # numpy views made once: a conversion per block costs microseconds each
    cursor, _cursor_arrays = _csr_cursor(_nll_blocks, batch.indptr, batch.indices, batch.values, z.dtype)
    bias_array, n_threads = bias.detach().contiguous().numpy(), max(1, torch.get_num_threads())
    row_state = (s.run_max.numpy(), s.run_sum.numpy(), s.rescale.numpy(), cursor)
    for k, start, w_block, logits in s.blocks():
        width = w_block.shape[0]
        _mm_into(logits, s.z_prod, w_block.t(), s.product_dtype)
        _nll_blocks.online_softmax_block(logits.numpy(), bias_array[start : start + width], *row_state, start,
                                         targets.numpy(), n_threads)
        s.block_done(k, logits, w_block)  # exponentiated in place
    x_weight = _x_weight(batch, weight) if s.want_grad_z else None
    left = _unvisited(cursor, batch, z.dtype)
    if left is not None:  # logit_ui of what the walk missed, from its Wd row
        rows, items, x = left
        targets.index_add_(0, rows, x * ((z[rows] * weight[items]).sum(dim=1) + bias[items]))
    return targets, x_weight


def _forward_blocks_torch(s: _ForwardBlocks, z, weight, bias, batch: CSRBatch) -> tuple[Tensor, Tensor]:
    """The block loop in torch ops: (targets, Σ x·Wd)."""
    for k, start, w_block, logits in s.blocks():
        width = w_block.shape[0]
        if s.product_dtype is None:
            torch.addmm(bias[start : start + width], z, w_block.t(), out=logits)
        else:
            _mm_into(logits, s.z_prod, w_block.t(), s.product_dtype).add_(bias[start : start + width])
        new_max = torch.maximum(s.run_max, logits.amax(dim=1))
        torch.exp(s.run_max - new_max, out=s.rescale)  # exp(-inf) = 0 on the first block
        logits.sub_(new_max[:, None]).exp_()  # exponentiated in place: exp(logits − run_max)
        s.run_sum.mul_(s.rescale).add_(logits.sum(dim=1))
        s.run_max = new_max
        s.block_done(k, logits, w_block)
    x_weight = _x_weight(batch, weight)
    # Σ_i x_ui·logit_ui = z_u·(Σ_i x_ui·Wd[i]) + Σ_i x_ui·bd[i]
    x_bias = torch.zeros_like(s.run_sum).index_add_(0, batch.row_ids(), batch.values * bias[batch.indices])
    return (z * x_weight).sum(dim=1) + x_bias, x_weight


def nll_forward(z, weight, bias, indptr, indices, values, item_block: int, want_grad_z: bool, keep_probs: bool,
                cpp: bool, product_dtype: torch.dtype | None = None):
    """The blocked NLL's forward: (nll [B], lse [B], dz_per_g, kept, kept_max, block_used).

    item_block items per block (0: the machine's rule, decided here, so a compiled graph follows
    the thread count at run time); block_used [1] says which was used. Streams cache-sized item
    blocks once (online LSE); every step on a block's B × block logits (product, max, exp, sum,
    probs·Wd) runs while the block is in cache, in C++ (cpp) or torch ops.
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
    if cpp:
        _check_cpp(z, "multinomial_nll")
    batch = _batch_of(indptr, indices, values, weight.shape[0])
    block = item_block or nll_block_size(z.shape[0], z.element_size(), keep_probs)
    s = _ForwardBlocks(z, weight, weight.shape[0], block, item_block, want_grad_z, keep_probs, product_dtype)
    loop = _forward_blocks_cpp if cpp else _forward_blocks_torch
    targets, x_weight = loop(s, z, weight, bias, batch)
    lse = s.run_max + torch.log(s.run_sum)
    n = batch.row_sums()
    nll = n * lse - targets
    if want_grad_z:
        # dz/g_u: n_u·E[Wd]_u − Σ_i x_ui·Wd[i]
        s.expected_w.div_(s.run_sum[:, None]).mul_(n[:, None]).sub_(x_weight)
    return nll, lse, s.expected_w, s.kept, s.kept_max, torch.tensor([block])


# ----------------------------------------------------------------------------- decoder backward


def nll_decoder_grads(grad_nll, z, weight, bias, indptr, indices, values, lse, kept, kept_max, block_used,
                      cpp: bool, product_dtype: torch.dtype | None = None):
    """(dWd, dbd) of the blocked NLL from the forward's lse (and kept probabilities if any, else
    each block's logits are recomputed): G = g·n·softmax − g·x per block, dWd = Gᵀz, dbd = Σ_u G.
    product_dtype: as in nll_forward (G and z as the operands of dWd's product; dbd and G in z's
    dtype). Reads its inputs only."""
    if cpp:
        _check_cpp(z, "multinomial_nll_decoder_backward")
    batch = _batch_of(indptr, indices, values, weight.shape[0])
    block = int(block_used)
    grad_w = recycled_empty("multinomial_nll.grad_weight", weight.shape, weight.dtype, weight.device)
    grad_b = torch.empty_like(bias)
    grads = _decoder_grads_cpp if cpp else _decoder_grads_torch
    grads(grad_nll, z, weight, bias, batch, lse, kept, kept_max, block, grad_w, grad_b, product_dtype)
    return grad_w, grad_b


def _block_widths(n_items: int, block: int) -> list[int]:
    return [min(block, n_items - start) for start in range(0, n_items, block)]


def _decoder_grads_cpp(grad_nll, z, weight, bias, batch, lse, kept, kept_max, block, grad_w, grad_b,
                       product_dtype=None):
    """nll_decoder_grads with each block's G, its sparse −g·x part and dbd in one C++ call
    (csrc/nll_blocks.cpp), then dWd's block as one product."""
    from .. import _nll_blocks  # loaded on first use, not when the package is imported

    n_users, n_items = z.shape[0], weight.shape[0]
    widths = _block_widths(n_items, block)
    cursor, _cursor_arrays = _csr_cursor(_nll_blocks, batch.indptr, batch.indices, batch.values, z.dtype)
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
            _nll_blocks.decoder_grad_block(prob_blocks[k].view(n_users, width).numpy(), g_block.numpy(), None, None,
                                           block_scales[k], row_grad, cursor, start,
                                           grad_b_array[start : start + width], n_threads)
        else:  # recomputed into G's buffer: exp(z·Wdᵀ + bd − lse)·scale in place
            _mm_into(g_block, z_prod, weight_blocks[k].t(), product_dtype)
            _nll_blocks.decoder_grad_block(g_block.numpy(), g_block.numpy(), bias_array[start : start + width],
                                           lse_array, scale_array, row_grad, cursor, start,
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
    """nll_decoder_grads in torch ops (impl "torch")."""
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


# ----------------------------------------------------------------------------- the registered ops


@torch.library.custom_op("recvae_fast::multinomial_nll", mutates_args=())
def _multinomial_nll_op(
    z: Tensor, weight: Tensor, bias: Tensor, indptr: Tensor, indices: Tensor, values: Tensor,
    item_block: int, want_grad_z: bool, keep_probs: bool, cpp: bool, product_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return nll_forward(z, weight, bias, indptr, indices, values, item_block, want_grad_z, keep_probs, cpp,
                       product_dtype)


@_multinomial_nll_op.register_fake
def _(z, weight, bias, indptr, indices, values, item_block, want_grad_z, keep_probs, cpp, product_dtype=None):
    n_users, n_items = z.shape[0], weight.shape[0]
    return (
        z.new_empty(n_users),
        z.new_empty(n_users),
        z.new_empty(z.shape if want_grad_z else (0,)),
        z.new_empty(n_users * n_items if keep_probs else 0),
        z.new_empty((kept_max_rows(n_items, item_block), n_users) if keep_probs else (0,)),
        torch.empty(1, dtype=torch.int64, device="cpu"),
    )


@torch.library.custom_op("recvae_fast::multinomial_nll_decoder_backward", mutates_args=())
def _decoder_backward_op(
    grad_nll: Tensor, z: Tensor, weight: Tensor, bias: Tensor, indptr: Tensor, indices: Tensor, values: Tensor,
    lse: Tensor, kept: Tensor, kept_max: Tensor, block_used: Tensor, cpp: bool,
    product_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    return nll_decoder_grads(grad_nll, z, weight, bias, indptr, indices, values, lse, kept, kept_max, block_used,
                             cpp, product_dtype)


@_decoder_backward_op.register_fake
def _(grad_nll, z, weight, bias, indptr, indices, values, lse, kept, kept_max, block_used, cpp, product_dtype=None):
    return torch.empty_like(weight), torch.empty_like(bias)


def _setup(ctx, inputs, output):
    z, weight, bias, indptr, indices, values = inputs[:6]
    _, lse, dz_per_g, kept, kept_max, block_used = output
    ctx.mark_non_differentiable(lse, dz_per_g, kept, kept_max, block_used)
    ctx.set_materialize_grads(False)  # else autograd zero-fills a B × I "gradient" for kept, never read
    ctx.save_for_backward(z, weight, bias, indptr, indices, values, lse, dz_per_g, kept, kept_max, block_used)
    ctx.cpp = inputs[9]
    ctx.product_dtype = inputs[10] if len(inputs) > 10 else None


def _backward(ctx, grad_nll, *_unused):
    z, weight, bias, indptr, indices, values, lse, dz_per_g, kept, kept_max, block_used = ctx.saved_tensors
    need_z, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_z = grad_weight = grad_bias = None
    if grad_nll is None:  # nll was not used in the loss (grads are not materialised)
        return (None,) * 11
    if need_z:
        if dz_per_g.numel() != z.numel():
            raise RuntimeError("recvae_fast::multinomial_nll: z needs a gradient but ran with want_grad_z=False")
        grad_z = grad_nll[:, None] * dz_per_g
    if need_weight or need_bias:
        grad_weight, grad_bias = _decoder_backward_op(
            grad_nll, z, weight, bias, indptr, indices, values, lse, kept, kept_max, block_used, ctx.cpp,
            ctx.product_dtype,
        )
    return (
        grad_z, grad_weight if need_weight else None, grad_bias if need_bias else None,
        None, None, None, None, None, None, None, None,
    )


_multinomial_nll_op.register_autograd(_backward, setup_context=_setup)


def _autocast(device_type, z, weight, bias, indptr, indices, values, item_block, want_grad_z, keep_probs, cpp,
              product_dtype=None):
    """Under autocast: bf16/fp16 inputs widened to float32, and the products' operands in the
    autocast dtype (LSE, softmax and the gradients' sums stay float32). float64 stays float64,
    products included: autocast leaves float64 alone."""
    z, weight, bias, values = widen_low((z, weight, bias, values))
    if product_dtype is None and z.dtype == torch.float32:
        product_dtype = autocast_product_dtype(device_type)
    return _multinomial_nll_op(z, weight, bias, indptr, indices, values, item_block, want_grad_z, keep_probs, cpp,
                               product_dtype)


register_autocast_kernel("recvae_fast::multinomial_nll", _autocast)
register_float32_autocast("recvae_fast::multinomial_nll_decoder_backward")
