"""Sparse encoder input layer of RecVAE as Triton kernels: the op, its autograd and its entry points.

    h1_pre[u] = b1 + Σ_{i∈nz(u)} c_ui·W1[i],   c_ui = x_ui·m_ui / ((1 − p)·‖x_u‖)
    dW1[i]    = Σ_u c_ui·dh1_pre[u],           db1 = Σ_u dh1_pre[u]

(p = dropout_rate, m_ui the dropout keep mask.) W1 is stored I × H (`weight_t`), so the forward
is a gather of whole rows of W1, one per nonzero: nothing of size B × I exists. The kernels, one
per module with its launcher:
- sparse_input_forward: h1_pre, one program per (user, H tile); it also writes c_ui and the user
  of each nonzero when dW1 is wanted, so the backward reuses the exact coefficients (and mask);
- dropout_mask: the Philox keep-mask of the nonzeros (`dropout_keep_mask`, the same draw as the
  forward's);
- dW1 has two implementations, chosen by `grad_method` (both give either gradient layout):
  - "segment" (default), sparse_input_backward: a segment reduction over the nonzeros sorted by item;
  - "atomic", sparse_input_backward_atomic: a zero fill and an atomic scatter in CSR order.
    This is a measured alternative, not a default: its caller is
    tools/gpu_check_sparse_input_layer.py, which times both methods on both layouts on a GPU
    (the choice of the default waits on that measurement) and checks the atomic gradients at 1M
    and 4M items. Why segment is the default until then: every output row is written exactly once
    (no separate zero fill: at 1M items a memset of 2.4 GB costs as much as the whole scatter),
    popular items (power-law data) get up to B nonzeros, which atomics serialise on one address,
    and the result is deterministic.
sparse_input_configs holds their tile configurations. db1 = dh1_pre.sum(0) in torch (B × H, one
small reduction). Forward and dW1 are ops registered with torch.library.triton_op
(`recvae_fast::triton_sparse_input_layer`, `recvae_fast::triton_sparse_input_layer_backward`), the
autograd formula registered on the forward.

Gradient layouts (`sparse_grad`): False gives the dense I × H dW1. True gives a coalesced torch
sparse COO tensor of shape I × H whose rows are the items of the batch (indices sorted): at 1M
items this avoids writing 2.4 GB in backward, and lets the optimiser skip reading it (see
kernels/row_sparse_adam.py). It costs one device→host sync (the number of unique items sizes the
result). Autograd accepts a sparse gradient for the dense parameter (as nn.Embedding(sparse=True)
does); torch.optim.Adam does not accept it.

Not fused: swish and LayerNorm1. LN needs the whole H row in one program (BLOCK_H = 1024 for H = 600,
41 % of the gather wasted) and the op's contract returns h1_pre; on B × H = 300k elements the torch
elementwise/LN kernels cost a few µs each.

Precision: fp32/bf16/fp16 accumulate in fp32, fp64 in fp64. 1/(1 − p) is passed as a one-element
tensor of the accumulation dtype (Triton passes Python floats as fp32). All index × stride products
are int64 (I × H passes 2³¹ at 3.6M items for H = 600). Absent tensors (bias, keep mask, the
backward's coefficients) are passed as None with a constexpr flag.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from . import sparse_input_backward, sparse_input_backward_atomic
from ._common import INT32_MAX, SUPPORTED_DTYPES, acc_dtypes, check_batch, check_runs_here
from .dropout_mask import check_dropout_rate, check_seed, dropout_keep_mask
from .sparse_input_forward import forward

__all__ = ["sparse_input_layer", "dropout_keep_mask"]

_GRAD_METHODS = ("segment", "atomic")


def _validate(batch, weight_t, bias, keep_mask):
    if not isinstance(weight_t, torch.Tensor) or weight_t.dim() != 2:
        raise ValueError("sparse_input_layer: weight_t must be a 2-D tensor [n_items, hidden]")
    n_items, hidden = weight_t.shape
    device, dtype = weight_t.device, weight_t.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weight_t must be float16, bfloat16, float32 or float64, got {dtype}")
    check_batch(batch, None, n_items, device, "sparse_input_layer")
    if bias is not None and (bias.shape != (hidden,) or bias.dtype != dtype or bias.device != device):
        raise ValueError(
            f"bias must be [{hidden}] {dtype} on {device}, got {tuple(bias.shape)} {bias.dtype} on {bias.device}"
        )
    if batch.values.dtype != dtype:
        raise TypeError(f"batch.values has dtype {batch.values.dtype}, weight_t has {dtype}")
    if keep_mask is not None:
        if keep_mask.dtype != torch.bool or keep_mask.shape != (batch.nnz,) or keep_mask.device != device:
            raise ValueError(
                f"keep_mask must be bool [{batch.nnz}] (one per nonzero) on {device}, got "
                f"{keep_mask.dtype} {tuple(keep_mask.shape)} on {keep_mask.device}"
            )
    check_runs_here(device, "sparse_input_layer", "recvae_fast.ops.sparse_input_layer with impl \"cpp\" or \"torch\"")



def _sparse_rows(rows: torch.Tensor, values: torch.Tensor, n_items: int) -> torch.Tensor:
    size = (n_items, values.shape[1])
    try:
        return torch.sparse_coo_tensor(rows[None, :], values, size, is_coalesced=True, check_invariants=False)
    except TypeError:  # older torch: no is_coalesced argument
        return torch.sparse_coo_tensor(rows[None, :], values, size)._coalesced_(True)



# ----------------------------------------------------------------------------------------------
# Registered ops (torch.library.triton_op): visible by name to the profiler, checked by opcheck,
# traceable by torch.compile (the segment kernels through wrap_triton). The batch is passed as its
# three CSR tensors. The row-sparse gradient leaves the backward op as (rows, values) and becomes a
# sparse COO tensor in the autograd formula (registered ops return strided tensors).
# ----------------------------------------------------------------------------------------------
@triton_op("recvae_fast::triton_sparse_input_layer", mutates_args=())
def sparse_input_layer_op(
    weight_t: Tensor, bias: Tensor | None, indptr: Tensor, indices: Tensor, values: Tensor, p: float,
    keep_mask: Tensor | None, seed: int, write_aux: bool, sparse_grad: bool, grad_method: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(h1_pre [B, H]; c_ui [nnz] and the user of each nonzero [nnz] when write_aux, else empty).
    sparse_grad and grad_method only shape the backward."""
    out, coef, rows = forward(indptr, indices, values, weight_t, bias, p, keep_mask, seed, write_aux)
    if coef is None:
        acc_t = acc_dtypes(weight_t.dtype)[0]
        coef, rows = weight_t.new_empty(0, dtype=acc_t), weight_t.new_empty(0, dtype=torch.int32)
    return out, coef, rows


@sparse_input_layer_op.register_fake
def _(weight_t, bias, indptr, indices, values, p, keep_mask, seed, write_aux, sparse_grad, grad_method):
    nnz = indices.numel() if write_aux else 0
    return (weight_t.new_empty(indptr.numel() - 1, weight_t.shape[1]),
            weight_t.new_empty(nnz, dtype=acc_dtypes(weight_t.dtype)[0]), weight_t.new_empty(nnz, dtype=torch.int32))


@triton_op("recvae_fast::triton_sparse_input_layer_backward", mutates_args=())
def sparse_input_layer_backward_op(
    grad_out: Tensor, indptr: Tensor, indices: Tensor, coef: Tensor, rows: Tensor, n_items: int,
    dtype: torch.dtype, sparse_grad: bool, grad_method: str,
) -> tuple[Tensor, Tensor]:
    """dW1 as (item rows int64 [U], values [U, H]) when sparse_grad, else (empty, dense [I, H])."""
    g = grad_out.contiguous()
    if grad_method == "atomic":
        if sparse_grad:
            return sparse_input_backward_atomic.grad_weight_row_sparse(g, indptr, indices, coef, n_items, dtype)
        return indices.new_empty(0), sparse_input_backward_atomic.grad_weight_dense(g, indptr, indices, coef, n_items,
                                                                                    dtype)
    if sparse_grad:
        return sparse_input_backward.grad_weight_row_sparse(g, indices, coef, rows, n_items, dtype)
    return indices.new_empty(0), sparse_input_backward.grad_weight_dense(g, indices, coef, rows, n_items, dtype)


@sparse_input_layer_backward_op.register_fake
def _(grad_out, indptr, indices, coef, rows, n_items, dtype, sparse_grad, grad_method):
    hidden = grad_out.shape[1]
    if sparse_grad:  # U, the number of unique items, is known only when the op runs
        n_unique = torch.library.get_ctx().new_dynamic_size()
        return indices.new_empty(n_unique), grad_out.new_empty(n_unique, hidden, dtype=dtype)
    return indices.new_empty(0), grad_out.new_empty(n_items, hidden, dtype=dtype)


def _setup_context(ctx, inputs, output):
    weight_t, _, indptr, indices, _, _, _, _, _, sparse_grad, grad_method = inputs
    _, coef, rows = output
    ctx.mark_non_differentiable(coef, rows)
    ctx.save_for_backward(indptr, indices, coef, rows)
    ctx.n_items, ctx.dtype, ctx.sparse_grad, ctx.grad_method = weight_t.shape[0], weight_t.dtype, sparse_grad, grad_method


def _backward(ctx, grad_out, *_unused):
    indptr, indices, coef, rows = ctx.saved_tensors
    grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        item_rows, values = sparse_input_layer_backward_op(
            grad_out, indptr, indices, coef, rows, ctx.n_items, ctx.dtype, ctx.sparse_grad, ctx.grad_method)
        grad_w = _sparse_rows(item_rows, values, ctx.n_items) if ctx.sparse_grad else values
    if ctx.needs_input_grad[1]:
        grad_b = grad_out.sum(0)
    return (grad_w, grad_b) + (None,) * 9


sparse_input_layer_op.register_autograd(_backward, setup_context=_setup_context)


def sparse_input_layer(
    batch,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    dropout_rate: float = 0.0,
    keep_mask: torch.Tensor | None = None,
    seed: int | None = None,
    sparse_grad: bool = False,
    grad_method: str = "segment",
) -> torch.Tensor:
    """h1_pre [B, H] = b1 + Σ_{i∈nz(u)} c_ui·weight_t[i], c_ui = x_ui·m_ui / ((1 − p)·‖x_u‖).

    weight_t: [I, H] (I = batch.n_cols); bias: [H] (or None). Dropout (0 <= dropout_rate < 1) acts on
    the nonzeros: `keep_mask` (bool [nnz]) when given, else the Philox mask of `seed` (see
    `dropout_keep_mask`); seed None draws one from torch's default (CPU) generator, so
    torch.manual_seed makes runs reproducible. With dropout_rate == 0 no mask is applied. c_ui is
    computed per stored entry: on a canonical CSRBatch (no duplicate items in a row) that is the
    formula above; duplicates, if given, each contribute linearly.
    Gradients flow to weight_t and bias when they require grad; `sparse_grad=True` makes the
    weight_t gradient a coalesced sparse COO tensor holding only the rows of the batch's items.
    `grad_method` picks how dW1 is reduced (either layout): "segment" (default: item-sorted segment
    reduction, deterministic) or "atomic" (zero fill + atomic scatter; the summation order varies
    run to run), kept for tools/gpu_check_sparse_input_layer.py, which times both on a GPU.
    """
    if grad_method not in _GRAD_METHODS:
        raise ValueError(f"grad_method must be one of {_GRAD_METHODS}, got {grad_method!r}")
    p = check_dropout_rate(dropout_rate)
    _validate(batch, weight_t, bias, keep_mask)
    if p > 0.0 and keep_mask is None:
        seed = int(torch.randint(0, INT32_MAX, (1,)).item()) if seed is None else check_seed(seed)
    else:
        seed = 0 if seed is None else check_seed(seed)
    need_w = torch.is_grad_enabled() and weight_t.requires_grad  # c_ui is kept for dW1 only
    return sparse_input_layer_op(
        weight_t, bias, batch.indptr, batch.indices, batch.values, p, keep_mask, seed, need_w, bool(sparse_grad),
        grad_method,
    )[0]
