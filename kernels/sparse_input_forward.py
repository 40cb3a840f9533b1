"""The forward kernel of the sparse encoder input layer: h1_pre[u] = b1 + Σ_{i∈nz(u)} c_ui·W1[i].

`_fwd_kernel`: grid (users, H tiles). A program reads its user's nonzeros twice: once for the
squared L2 norm (values only), once for the gather, where it folds the norm, the inverted dropout
and the bias into c_ui on the fly. Dropout draws the Philox mask of dropout_mask.keep. When a
gradient of W1 is wanted, the H-tile-0 program also writes c_ui and the user of each nonzero
(nnz floats + nnz int32): the backward reuses the exact coefficients, so it sees the same mask by
construction and needs no RNG, norm or repeat_interleave.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import acc_dtypes, on_device, size_bucket
from .dropout_mask import keep
from .sparse_input_configs import CONFIGS


@triton.jit(do_not_specialize=["seed"])
def _fwd_kernel(
    OUT, W, BIAS, INDPTR, INDICES, VALUES, KEEP, SCALE, COEF, ROWS,
    H, stride_w0, stride_w1, stride_out, seed, p, USERS_BUCKET, NNZ_BUCKET,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, WRITE_AUX: tl.constexpr,
    ACC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_NZ: tl.constexpr,
):
    """h1_pre[u, h-tile] for one user. DROPOUT: 0 none, 1 mask from `seed`, 2 mask from KEEP.
    BIAS (HAS_BIAS), KEEP (DROPOUT 2), SCALE (DROPOUT != 0), COEF and ROWS (WRITE_AUX) are None
    when unused. USERS_BUCKET and NNZ_BUCKET are only autotuning keys."""
    u = tl.program_id(0)
    pid_h = tl.program_id(1)
    start = tl.load(INDPTR + u).to(tl.int64)
    end = tl.load(INDPTR + u + 1).to(tl.int64)

    # Pass 1: ‖x_u‖² over the values (a user has tens of nonzeros: cheap, and keeps the op one launch).
    sq = tl.zeros([BLOCK_NZ], dtype=ACC)
    for k0 in range(start, end, BLOCK_NZ):
        offs = k0 + tl.arange(0, BLOCK_NZ)
        v = tl.load(VALUES + offs, mask=offs < end, other=0.0).to(ACC)
        sq += v * v
    norm = tl.sqrt(tl.sum(sq, axis=0))
    # An empty (or all-zero) user: every c_ui is 0, so h1_pre = b1 and never 0/0.
    inv = 1.0 / tl.where(norm > 0, norm, 1.0)
    if DROPOUT != 0:
        inv = inv * tl.load(SCALE).to(ACC)  # 1 / (1 − p), in the accumulation dtype

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    col = offs_h.to(tl.int64) * stride_w1
    acc = tl.zeros([BLOCK_H], dtype=ACC)
    # Pass 2: the gather. Row offsets in int64: item × H passes 2³¹ at 3.6M items.
    for k0 in range(start, end, BLOCK_NZ):
        offs = k0 + tl.arange(0, BLOCK_NZ)
        m = offs < end
        item = tl.load(INDICES + offs, mask=m, other=0).to(tl.int64)
        c = tl.load(VALUES + offs, mask=m, other=0.0).to(ACC) * inv
        if DROPOUT == 1:
            c = tl.where(keep(seed, offs.to(tl.int32), p), c, 0.0)
        elif DROPOUT == 2:
            c = tl.where(tl.load(KEEP + offs, mask=m, other=0) != 0, c, 0.0)
        if WRITE_AUX:
            row = tl.zeros([BLOCK_NZ], dtype=tl.int32) + u
            aux_mask = m & ((row * 0 + pid_h) == 0)
            tl.store(COEF + offs, c, mask=aux_mask)
            tl.store(ROWS + offs, row, mask=aux_mask)
        w = tl.load(W + item[:, None] * stride_w0 + col[None, :], mask=m[:, None] & h_mask[None, :], other=0.0)
        acc += tl.sum(c[:, None] * w.to(ACC), axis=0)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_h, mask=h_mask, other=0.0).to(ACC)
    tl.store(OUT + u.to(tl.int64) * stride_out + offs_h, acc.to(OUT.dtype.element_ty), mask=h_mask)


_fwd = triton.autotune(configs=CONFIGS["fwd"], key=["H", "USERS_BUCKET", "NNZ_BUCKET"])(_fwd_kernel)


def forward(indptr, indices, values, weight_t, bias, p, keep_mask, seed, write_aux):
    """(h1_pre [B, H]; c_ui [nnz] and the user of each nonzero [nnz] when write_aux, else None)."""
    n_users, hidden = indptr.numel() - 1, weight_t.shape[1]
    nnz = indices.numel()
    device = weight_t.device
    acc_torch, acc_tl = acc_dtypes(weight_t.dtype)
    out = torch.empty(n_users, hidden, dtype=weight_t.dtype, device=device)
    coef = torch.empty(nnz, dtype=acc_torch, device=device) if write_aux else None
    rows = torch.empty(nnz, dtype=torch.int32, device=device) if write_aux else None
    keep_bytes = scale = None
    if p == 0.0:
        mode = 0
    else:
        scale = torch.full((1,), 1.0 / (1.0 - p), dtype=acc_torch, device=device)
        mode = 1 if keep_mask is None else 2
        if keep_mask is not None:
            keep_bytes = keep_mask.view(torch.uint8)
    if n_users and hidden:
        grid = lambda meta: (n_users, triton.cdiv(hidden, meta["BLOCK_H"]))  # noqa: E731
        with on_device(weight_t):
            wrap_triton(_fwd)[grid](
                out, weight_t, bias, indptr, indices, values, keep_bytes, scale, coef, rows,
                hidden, weight_t.stride(0), weight_t.stride(1), out.stride(0), seed, p,
                size_bucket(n_users), size_bucket(nnz // n_users),
                HAS_BIAS=bias is not None, DROPOUT=mode, WRITE_AUX=write_aux, ACC=acc_tl,
            )
    return out, coef, rows
