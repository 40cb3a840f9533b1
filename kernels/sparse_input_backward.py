"""The segment backward kernel of the sparse encoder input layer (grad_method "segment", the
default): dW1[i] = Σ_u c_ui·dh1_pre[u], as a segment reduction over the nonzeros sorted by item
(torch.sort, O(nnz)).

`_bwd_kernel`: grid (row tiles, H tiles); a program owns BLOCK_R output rows and reads the
contiguous run of sorted nonzeros that falls in them (two loads of a segment pointer), gathers
dh1_pre[u] for each, scales it by c_ui and adds it to its rows with a one-hot [BLOCK_R × BLOCK_NZ]
product (exact: the one-hot entries are 0/1 and the dot is "ieee"/fp64). Every output row is
written exactly once, and the result is deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import INT32_MAX, acc_dtypes, on_device, size_bucket
from .sparse_input_configs import CONFIGS


@triton.jit
def _bwd_kernel(
    DW, DH, PERM, SEG, COEF, ROWS, SEGPTR,
    R, H, stride_dw, stride_dh, R_BUCKET, NNZ_BUCKET,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_NZ: tl.constexpr,
):
    """Rows [r0, r0 + BLOCK_R) of dW (R rows: all items, or the unique items of the batch).

    The nonzeros sorted by output row: PERM[k] is the original position of the k-th, SEG[k] its
    output row, and the rows [a, b) own the sorted nonzeros [SEGPTR[a], SEGPTR[b]). Rows with no
    nonzero are written as zeros. R_BUCKET and NNZ_BUCKET are only autotuning keys."""
    pid_r = tl.program_id(0)
    pid_h = tl.program_id(1)
    r0 = pid_r.to(tl.int64) * BLOCK_R
    r_end = tl.minimum(r0 + BLOCK_R, R)
    lo = tl.load(SEGPTR + r0).to(tl.int64)
    hi = tl.load(SEGPTR + r_end).to(tl.int64)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    acc = tl.zeros([BLOCK_R, BLOCK_H], dtype=ACC)
    for k0 in range(lo, hi, BLOCK_NZ):
        offs = k0 + tl.arange(0, BLOCK_NZ)
        m = offs < hi
        src = tl.load(PERM + offs, mask=m, other=0).to(tl.int64)
        seg = tl.load(SEG + offs, mask=m, other=-1).to(tl.int64)
        c = tl.load(COEF + src, mask=m, other=0.0).to(ACC)
        user = tl.load(ROWS + src, mask=m, other=0).to(tl.int64)
        g = tl.load(DH + user[:, None] * stride_dh + offs_h[None, :], mask=m[:, None] & h_mask[None, :], other=0.0)
        contrib = c[:, None] * g.to(ACC)
        # Segment sum into the tile's rows: a 0/1 matrix times the contributions (exact).
        onehot = (offs_r[:, None] == seg[None, :]).to(ACC)
        acc += tl.dot(onehot, contrib, input_precision="ieee", out_dtype=ACC)
    out_mask = (offs_r < R)[:, None] & h_mask[None, :]
    tl.store(DW + offs_r[:, None] * stride_dw + offs_h[None, :], acc.to(DW.dtype.element_ty), mask=out_mask)


_bwd = triton.autotune(configs=CONFIGS["bwd"], key=["H", "R_BUCKET", "NNZ_BUCKET"])(_bwd_kernel)


def _sorted_nonzeros(indices: torch.Tensor, n_items: int):
    """The nonzeros sorted by item: (sorted items, permutation). int32 keys when they fit (half the
    radix passes); stable, so the summation order, hence the gradient, is deterministic."""
    keys = indices.to(torch.int32) if n_items <= INT32_MAX else indices
    return torch.sort(keys, stable=True)


def _launch_bwd(out, grad_out, perm, seg, coef, rows, segptr, n_out_rows, acc_tl):
    hidden = grad_out.shape[1]
    if n_out_rows == 0 or hidden == 0:
        return out
    grid = lambda meta: (triton.cdiv(n_out_rows, meta["BLOCK_R"]), triton.cdiv(hidden, meta["BLOCK_H"]))  # noqa: E731
    with on_device(out):
        wrap_triton(_bwd)[grid](
            out, grad_out, perm, seg, coef, rows, segptr,
            n_out_rows, hidden, out.stride(0), grad_out.stride(0),
            size_bucket(n_out_rows), size_bucket(perm.numel() // n_out_rows),
            ACC=acc_tl,
        )
    return out


def grad_weight_dense(grad_out, indices, coef, rows, n_items, dtype):
    sorted_items, perm = _sorted_nonzeros(indices, n_items)
    # segptr[i] = first sorted nonzero of item i, for all I + 1 boundaries (no sync; O(I) ints).
    boundaries = torch.arange(n_items + 1, device=indices.device, dtype=sorted_items.dtype)
    segptr = torch.searchsorted(sorted_items, boundaries)
    out = torch.empty(n_items, grad_out.shape[1], dtype=dtype, device=grad_out.device)
    return _launch_bwd(out, grad_out, perm, sorted_items, coef, rows, segptr, n_items, acc_dtypes(dtype)[1])


def grad_weight_row_sparse(grad_out, indices, coef, rows, n_items, dtype):
    sorted_items, perm = _sorted_nonzeros(indices, n_items)
    # One sync here: the number of unique items sizes the result.
    uniq, seg, counts = torch.unique_consecutive(sorted_items, return_inverse=True, return_counts=True)
    segptr = torch.zeros(uniq.numel() + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, 0, out=segptr[1:])
    values = torch.empty(uniq.numel(), grad_out.shape[1], dtype=dtype, device=grad_out.device)
    _launch_bwd(values, grad_out, perm, seg, coef, rows, segptr, uniq.numel(), acc_dtypes(dtype)[1])
    return uniq.to(torch.int64), values

