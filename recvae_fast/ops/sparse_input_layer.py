"""The sparse input layer (the encoder's fc1 over a CSR batch): h1_pre[u] = b1 + Σ_{i∈nz(u)} c_ui·W1[i],
with c_ui = x_ui·m_ui / ((1 − p)·‖x_u‖), never building the B × I input.

    impl "torch"   embedding_bag forward; backward by torch's sort and embedding_bag
    impl "cpp"     the same forward; backward by the C++ sparse-rows helpers (recvae_fast.ops.sparse_rows)
    impl "triton"  kernels/sparse_input_layer.py (registered there as recvae_fast::triton_sparse_input_layer)

The "torch" and "cpp" ones run as the registered op

    recvae_fast::sparse_input_layer(indptr, indices, coef, weight_t, bias, sparse_grad, cpp) -> h1_pre
        bias + Σ_{i∈nz(u)} coef_ui·weight_t[i]; differentiable in coef, weight_t and bias
        (sparse_grad=True: weight_t's gradient is a sparse COO tensor of the batch's rows);
        cpp=True: weight_t's gradient from the C++ CSR transpose and row sums.

It takes tensors, never a CSRBatch (a batch is passed as indptr, indices and the coefficients).
Under torch.autocast it computes in float32 (bf16/fp16 inputs widened).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..precision import register_float32_autocast
from ..sparse import CSRBatch
from .dispatch import compute_dtype, import_kernel, resolve_impl
from .sparse_rows import csr_row_sums, csr_transpose


def sparse_input_layer(
    batch: CSRBatch,
    weight_t: torch.Tensor,
    bias: torch.Tensor,
    dropout_rate: float = 0.0,
    keep_mask: torch.Tensor | None = None,
    *,
    sparse_grad: bool = False,
    impl: str | None = None,
) -> torch.Tensor:
    """fc1 over the nonzeros of `batch`: h1_pre [B, H] = bias + Σ_{i∈nz(u)} c_ui·weight_t[i], with
    c_ui = x_ui·m_ui / ((1 − dropout_rate)·‖x_u‖); weight_t is W1 stored I × H so the gather reads
    whole rows. keep_mask: bool per nonzero (None: drawn). sparse_grad=True makes weight_t's
    gradient a sparse COO tensor of the rows the batch uses ("torch" and "cpp" skip the nonzeros
    dropout drops, so their rows may be absent: RowSparseAdam steps an absent row as a zero one).
    impl: see recvae_fast.ops.dispatch."""
    impl = resolve_impl("sparse_input_layer", impl, weight_t.device, compute_dtype(weight_t))
    if impl == "triton":
        kernel = import_kernel("sparse_input_layer", "sparse_input_layer")
        # The kernel's 4th argument is the dropout rate, whatever its name: passed by position.
        return kernel(batch, weight_t, bias, dropout_rate, keep_mask, sparse_grad=sparse_grad)
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
    return weighted_row_gather(indptr, indices, coef, weight_t, bias, sparse_grad, impl == "cpp")


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


def weighted_row_gather(indptr: Tensor, indices: Tensor, coef: Tensor, weight_t: Tensor, bias: Tensor,
                        sparse_grad: bool, cpp: bool) -> Tensor:
    """bias + Σ_{n ∈ row u} coef_n·weight_t[indices_n] per CSR row u: recvae_fast::sparse_input_layer
    on given coefficients (the item-sharded model's gather over its shard)."""
    return torch.ops.recvae_fast.sparse_input_layer(indptr, indices, coef, weight_t, bias, sparse_grad, cpp)


# ----------------------------------------------------------------------------- the registered op


def _row_ids(indptr: Tensor, nnz: int) -> Tensor:
    rows = torch.arange(indptr.numel() - 1, device=indptr.device)
    return torch.repeat_interleave(rows, indptr[1:] - indptr[:-1], output_size=nnz)


@torch.library.custom_op("recvae_fast::sparse_input_layer", mutates_args=())
def _sparse_input_layer_op(
    indptr: Tensor, indices: Tensor, coef: Tensor, weight_t: Tensor, bias: Tensor, sparse_grad: bool, cpp: bool
) -> Tensor:
    if cpp and weight_t.device.type != "cpu":
        raise ValueError(f"recvae_fast::sparse_input_layer: cpp=True runs on CPU tensors, got {weight_t.device}")
    h = F.embedding_bag(indices, weight_t, indptr, mode="sum", per_sample_weights=coef, include_last_offset=True)
    return h + bias


@_sparse_input_layer_op.register_fake
def _(indptr, indices, coef, weight_t, bias, sparse_grad, cpp):
    return weight_t.new_empty(indptr.shape[0] - 1, weight_t.shape[1])


def _setup(ctx, inputs, output):
    indptr, indices, coef, weight_t, _, sparse_grad, cpp = inputs
    ctx.save_for_backward(indptr, indices, coef, weight_t)
    ctx.sparse_grad, ctx.cpp = sparse_grad, cpp


def _backward(ctx, grad):
    indptr, indices, coef, weight_t = ctx.saved_tensors
    need_coef, need_weight, need_bias = ctx.needs_input_grad[2:5]
    grad_coef = grad_weight = grad_bias = None
    if need_coef:
        grad_coef = (grad[_row_ids(indptr, indices.numel())] * weight_t[indices]).sum(dim=1)
    if need_weight and ctx.cpp and not ctx.sparse_grad:
        # dW[i] = Σ_{n: item i} coef_n·grad[row_n]: the same bag, transposed (nonzeros grouped by
        # item, by the C++ counting sort), so each row of dW is one weighted sum of grad rows.
        item_ptr, users, item_coef = csr_transpose(indptr, indices, coef.detach(), weight_t.shape[0])
        grad_weight = _rows_of_weight_grad(item_ptr, users, item_coef, grad, False, True)
    elif need_weight:
        # The same with torch's sort; row-sparse: only the batch's items get a row.
        rows = _row_ids(indptr, indices.numel())
        order = torch.argsort(indices, stable=True)
        items_sorted = indices[order]
        if ctx.sparse_grad:  # the batch's items only, one row each (a coalesced COO tensor)
            items, counts = torch.unique_consecutive(items_sorted, return_counts=True)
        else:
            items, counts = None, torch.bincount(items_sorted, minlength=weight_t.shape[0])
        offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        sums = _rows_of_weight_grad(offsets, rows[order], coef[order], grad, ctx.sparse_grad, ctx.cpp)
        if ctx.sparse_grad:
            grad_weight = torch.sparse_coo_tensor(items[None], sums, weight_t.shape, is_coalesced=True,
                                                  check_invariants=False)
        else:
            grad_weight = sums
    if need_bias:
        grad_bias = grad.sum(dim=0)
    return None, None, grad_coef, grad_weight, grad_bias, None, None


def _rows_of_weight_grad(offsets: Tensor, users: Tensor, coef: Tensor, grad: Tensor, row_sparse: bool,
                         cpp: bool) -> Tensor:
    """dW1's rows, one per bag (item): Σ coef·grad[user] over the bag's nonzeros. cpp: the C++ CSR
    row sums (recvae_fast::csr_row_sums: embedding_bag's per-bag cost dominates at ~2 nonzeros per
    bag), in recycled memory; else embedding_bag."""
    if not cpp:
        return F.embedding_bag(users, grad, offsets, mode="sum", per_sample_weights=coef, include_last_offset=True)
    key = "sparse_input_layer.grad_rows" if row_sparse else "sparse_input_layer.grad_weight"
    return csr_row_sums(offsets, users, coef.detach(), grad.detach().contiguous(), key, max(1, torch.get_num_threads()))


_sparse_input_layer_op.register_autograd(_backward, setup_context=_setup)
register_float32_autocast("recvae_fast::sparse_input_layer")
