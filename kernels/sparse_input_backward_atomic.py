"""The atomic backward kernel of the sparse encoder input layer (grad_method "atomic"): dW1 by a
zero fill and an atomic scatter.

`_bwd_atomic_kernel`: grid (users, H tiles), like the forward; a program loads dh1_pre[u, h-tile]
once and walks its user's nonzeros in CSR order, `tl.atomic_add`-ing c_ui·dh1_pre[u] into the
output row of each (the item id for the dense gradient, zero-filled I × H first; the item's
position among the batch's unique items for the row-sparse one, U × H). fp16/bf16 parameters
accumulate in an fp32 buffer cast at the end. The order of the additions, hence the rounding of
dW1, varies from run to run. sparse_input_layer's docstring says why this is not the default.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INT32_MAX, acc_dtypes, on_device, size_bucket
from .sparse_input_configs import CONFIGS


@triton.jit
def _bwd_atomic_kernel(
    DW, DH, INDPTR, OUTROW, COEF,
    H, stride_dw, stride_dh, USERS_BUCKET, NNZ_BUCKET, R_BUCKET,
    BLOCK_H: tl.constexpr, BLOCK_NZ: tl.constexpr,
):
    """Adds c_ui·dh1_pre[u, h-tile] into DW[OUTROW[k], h-tile] for every nonzero k of user u.

    Grid (users, H tiles), the nonzeros in CSR order (INDPTR of the batch; COEF and OUTROW per
    nonzero). DW must be zero-filled by the caller and is accumulated in its own dtype (fp32 or
    fp64: the atomics' precision), so the order of the additions, hence the rounding, varies.
    The *_BUCKET arguments are only autotuning keys."""
    u = tl.program_id(0)
    pid_h = tl.program_id(1)
    start = tl.load(INDPTR + u).to(tl.int64)
    end = tl.load(INDPTR + u + 1).to(tl.int64)
    acc_ty = DW.dtype.element_ty
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    # dh1_pre[u, h-tile] is read once and reused for every nonzero of the user.
    g = tl.load(DH + u.to(tl.int64) * stride_dh + offs_h, mask=h_mask, other=0.0).to(acc_ty)
    for k0 in range(start, end, BLOCK_NZ):
        offs = k0 + tl.arange(0, BLOCK_NZ)
        m = offs < end
        # Row offsets in int64: item × H passes 2³¹ at 3.6M items.
        row = tl.load(OUTROW + offs, mask=m, other=0).to(tl.int64)
        c = tl.load(COEF + offs, mask=m, other=0.0).to(acc_ty)
        # Relaxed: nothing reads DW until the kernel ends, only the sums must be complete.
        tl.atomic_add(
            DW + row[:, None] * stride_dw + offs_h[None, :], c[:, None] * g[None, :],
            mask=m[:, None] & h_mask[None, :], sem="relaxed",
        )


# No reset_to_zero: the autotuner would time the zero fill with every trial (see launch).
_bwd_atomic = triton.autotune(configs=CONFIGS["bwd_atomic"], key=["H", "USERS_BUCKET", "NNZ_BUCKET", "R_BUCKET"])(
    _bwd_atomic_kernel)


def launch(out, grad_out, indptr, out_rows, coef):
    """Adds the scatter into the zero-filled `out`. When this launch autotunes (a new key, several
    configs), every trial adds into `out` and only the kernel is timed (no zero fill per trial);
    `out` is then zeroed once and the chosen config launched again on it. That check of the
    autotuner's cache needs the kernel itself, so this launch is not wrapped with wrap_triton:
    grad_method="atomic" (a measured alternative, see sparse_input_layer) runs eager only, not under torch.compile."""
    n_users, hidden = grad_out.shape
    if n_users == 0 or hidden == 0 or out.shape[0] == 0:
        return out
    grid = lambda meta: (n_users, triton.cdiv(hidden, meta["BLOCK_H"]))  # noqa: E731
    args = (out, grad_out, indptr, out_rows, coef, hidden, out.stride(0), grad_out.stride(0),
            size_bucket(n_users), size_bucket(out_rows.numel() // n_users), size_bucket(out.shape[0]))
    with on_device(out):
        n_tuned = len(_bwd_atomic.cache)
        _bwd_atomic[grid](*args)
        if len(_bwd_atomic.cache) != n_tuned:  # this call ran the trials: out holds their sum
            out.zero_()
            _bwd_atomic[grid](*args)
    return out


def grad_weight_dense(grad_out, indptr, indices, coef, n_items, dtype):
    # Output row = the item id. The I × H zero fill is part of this method's cost (2.4 GB at 1M
    # items). Atomics add in the buffer's dtype: fp16/bf16 parameters get an fp32 buffer, cast at
    # the end (one more I × H pass); for fp32/fp64 the cast is a no-op.
    acc_torch = acc_dtypes(dtype)[0]
    out = torch.zeros(n_items, grad_out.shape[1], dtype=acc_torch, device=grad_out.device)
    launch(out, grad_out, indptr, indices, coef)
    return out.to(dtype)


def grad_weight_row_sparse(grad_out, indptr, indices, coef, n_items, dtype):
    # Output row = the item's position among the batch's unique items (sorted). torch.unique sorts
    # (int32 keys when they fit, as sparse_input_backward's sort) and syncs once: U sizes the result.
    keys = indices.to(torch.int32) if n_items <= INT32_MAX else indices
    uniq, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    acc_torch = acc_dtypes(dtype)[0]
    values = torch.zeros(uniq.numel(), grad_out.shape[1], dtype=acc_torch, device=grad_out.device)
    launch(values, grad_out, indptr, inverse, coef)
    return uniq.to(torch.int64), values.to(dtype)

