"""The gather kernel of the fused multinomial NLL: per user, the indexed dot over its nonzeros
(Σ x·Wd[i], Σ x·bd[i], n_u) from the CSR batch, one program per user.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import acc_dtypes
from .nll_configs import block_k, gather_block_nz


@triton.jit
def _gather_kernel(
    Z, W, BIAS, INDPTR, INDICES, VALUES, XDOT, NSUM, XW,
    K, stride_z, stride_w,
    HAS_BIAS: tl.constexpr, STORE_XW: tl.constexpr, ACC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_NZ: tl.constexpr,
):
    """Per user u: XDOT[u] = Σ_j x_j·(z_u·Wd[i_j] + bd[i_j]), NSUM[u] = Σ_j x_j, XW[u] = Σ_j x_j·Wd[i_j].
    BIAS and XW are None when unused (HAS_BIAS, STORE_XW)."""
    u = tl.program_id(0).to(tl.int64)
    start = tl.load(INDPTR + u)
    end = tl.load(INDPTR + u + 1)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    xw = tl.zeros([BLOCK_K], dtype=ACC)
    xb = tl.zeros([BLOCK_NZ], dtype=ACC)
    xn = tl.zeros([BLOCK_NZ], dtype=ACC)
    for j0 in range(start, end, BLOCK_NZ):
        offs = j0 + tl.arange(0, BLOCK_NZ)
        mask = offs < end
        idx = tl.load(INDICES + offs, mask=mask, other=0).to(tl.int64)
        x = tl.load(VALUES + offs, mask=mask, other=0.0).to(ACC)
        w = tl.load(W + idx[:, None] * stride_w + offs_k[None, :], mask=mask[:, None] & k_mask[None, :], other=0.0)
        xw += tl.sum(x[:, None] * w.to(ACC), axis=0)
        if HAS_BIAS:
            xb += x * tl.load(BIAS + idx, mask=mask, other=0.0).to(ACC)
        xn += x
    z = tl.load(Z + u * stride_z + offs_k, mask=k_mask, other=0.0).to(ACC)
    tl.store(XDOT + u, tl.sum(xw * z, axis=0) + tl.sum(xb, axis=0))
    tl.store(NSUM + u, tl.sum(xn, axis=0))
    if STORE_XW:
        tl.store(XW + u * K + offs_k, xw, mask=k_mask)



def gather(z, weight, bias, indptr, indices, values, want_xw):
    """(xdot, n, xw) per user, in the accumulation dtype: Σ_{i∈nz(u)} x_ui·logit_ui; n_u = Σ_i x_ui;
    Σ_i x_ui·Wd[i] (want_xw, else None)."""
    n_users, k = z.shape
    acc_t, acc_tl = acc_dtypes(z.dtype)
    bk = block_k(k)
    xdot = torch.empty(n_users, dtype=acc_t, device=z.device)
    n = torch.empty_like(xdot)
    xw = torch.empty(n_users, k, dtype=acc_t, device=z.device) if want_xw else None
    wrap_triton(_gather_kernel)[(n_users,)](
        z, weight, bias, indptr, indices, values, xdot, n, xw,
        k, z.stride(0), weight.stride(0),
        HAS_BIAS=bias is not None, STORE_XW=want_xw, ACC=acc_tl, BLOCK_K=bk, BLOCK_NZ=gather_block_nz(bk),
        num_warps=4,
    )
    return xdot, n, xw
