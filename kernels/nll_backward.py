"""The backward kernel of the fused multinomial NLL: the decoder's gradients dWd and dbd.

`_bwd_w_kernel`: one program per item tile, looping over all user tiles, so dWd and dbd need no
atomics (and are deterministic). It recomputes the logits tile from the saved LSE,
G = g·n·softmax, dWd_tile = Gᵀ·z, dbd_tile = Σ_u G; then it adds the sparse part −g_u·x_ui at the
tile's nonzeros, read from a CSC copy of the batch (sorted in torch, O(nnz)), as a small one-hot
product so that it stays in the tile's registers. Only dWd and/or dbd are computed, as asked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import acc_dtypes, logits_by_k_chunks, mm, size_bucket
from .nll_configs import CONFIGS, CSC_GRAN, block_k, prune_bwd


@triton.jit
def _bwd_w_kernel(
    Z, W, BIAS, LSE, GN, DW, DB, CSC_PTR, CSC_USER, CSC_ITEM, CSC_COEF,
    B, I, K, n_gran, stride_z, stride_w, B_BUCKET,
    HAS_BIAS: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    DOT_PREC: tl.constexpr, ACC: tl.constexpr, GRAN: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_NZ: tl.constexpr,
    KC: tl.constexpr,
):
    """One item tile: dWd = Σ_users Gᵀ·z + sparse part, dbd = Σ_users G + sparse part, with
    G = GN·softmax recomputed from the saved LSE (GN = g·n) and the sparse part −g_u·x_ui.
    KC as in nll_forward._fwd_kernel (0: resident Wd tile, whole-K dot; > 0: K chunks). BIAS, DW, DB are None
    when unused (HAS_BIAS, NEED_W, NEED_B); B_BUCKET is only an autotuning key."""
    pid = tl.program_id(0)
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    i_mask = offs_i < I
    w_rows = W + offs_i.to(tl.int64)[:, None] * stride_w
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    if KC == 0:
        w = tl.load(w_rows + offs_k[None, :], mask=i_mask[:, None] & k_mask[None, :], other=0.0)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_i, mask=i_mask, other=0.0).to(ACC)
    if NEED_W:
        dw = tl.zeros([BLOCK_I, BLOCK_K], dtype=ACC)
    db = tl.zeros([BLOCK_I], dtype=ACC)

    for u0 in range(0, B, BLOCK_B):
        offs_b = u0 + tl.arange(0, BLOCK_B)
        b_mask = offs_b < B
        z_rows = Z + offs_b.to(tl.int64)[:, None] * stride_z
        if KC == 0 or NEED_W:
            z = tl.load(z_rows + offs_k[None, :], mask=b_mask[:, None] & k_mask[None, :], other=0.0)
        if KC == 0:
            logits = mm(z, tl.trans(w), DOT_PREC).to(ACC)
        else:
            logits = logits_by_k_chunks(z_rows, w_rows, b_mask, i_mask, K, KC, BLOCK_B, BLOCK_I, ACC, DOT_PREC)
        if HAS_BIAS:
            logits += bias[None, :]
        lse = tl.load(LSE + offs_b, mask=b_mask, other=0.0)
        gn = tl.load(GN + offs_b, mask=b_mask, other=0.0)
        g = gn[:, None] * tl.exp(logits - lse[:, None])
        g = tl.where(b_mask[:, None] & i_mask[None, :], g, 0.0)
        if NEED_W:
            dw += mm(tl.trans(g.to(z.dtype)), z, DOT_PREC).to(ACC)
        if NEED_B:
            db += tl.sum(g, axis=0)

    # Sparse part: the nonzeros with items in this tile are CSC[p0:p1] (pointer every GRAN items);
    # scattered into the tile's rows as a one-hot product (fp32/fp64 operands; tf32 on TC paths).
    j0 = pid * (BLOCK_I // GRAN)
    p0 = tl.load(CSC_PTR + j0)
    p1 = tl.load(CSC_PTR + tl.minimum(j0 + BLOCK_I // GRAN, n_gran))
    tile_start = pid.to(tl.int64) * BLOCK_I
    rows = tl.arange(0, BLOCK_I)
    for q0 in range(p0, p1, BLOCK_NZ):
        offs_q = q0 + tl.arange(0, BLOCK_NZ)
        q_mask = offs_q < p1
        item = tl.load(CSC_ITEM + offs_q, mask=q_mask, other=0)
        coef = tl.load(CSC_COEF + offs_q, mask=q_mask, other=0.0)
        local = (item - tile_start).to(tl.int32)
        sel = tl.where((rows[:, None] == local[None, :]) & q_mask[None, :], coef[None, :], 0.0)
        if NEED_W:
            user = tl.load(CSC_USER + offs_q, mask=q_mask, other=0)
            zr = tl.load(Z + user[:, None] * stride_z + offs_k[None, :],
                         mask=q_mask[:, None] & k_mask[None, :], other=0.0).to(ACC)
            dw += mm(sel, zr, DOT_PREC)
        if NEED_B:
            db += tl.sum(sel, axis=1)

    if NEED_W:
        tl.store(DW + offs_i.to(tl.int64)[:, None] * K + offs_k[None, :], dw.to(DW.dtype.element_ty),
                 mask=i_mask[:, None] & k_mask[None, :])
    if NEED_B:
        tl.store(DB + offs_i, db.to(DB.dtype.element_ty), mask=i_mask)


_BWD = {
    fma: triton.autotune(configs=CONFIGS["bwd", fma], key=["B_BUCKET", "I", "K", "NEED_W", "NEED_B", "DOT_PREC"],
                         prune_configs_by={"early_config_prune": prune_bwd})(_bwd_w_kernel)
    for fma in (False, True)
}


def backward_w(z, weight, bias, indptr, indices, values, lse, g_softmax, g_x, need_w, need_b, prec):
    """dWd, dbd for the logits' gradient G_ui = g_softmax_u·softmax_ui + g_x_u·x_ui (the NLL's:
    g_softmax = g·n, g_x = −g), g_softmax and g_x [B] in the accumulation dtype."""
    n_users, k = z.shape
    n_items = weight.shape[0]
    acc_t, acc_tl = acc_dtypes(z.dtype)
    gn = g_softmax.contiguous()

    # CSC copy of the batch (O(nnz)): the nonzeros of an item tile become one contiguous range.
    row_ids = torch.repeat_interleave(torch.arange(n_users, device=z.device), indptr[1:] - indptr[:-1],
                                      output_size=indices.numel())
    csc_item, perm = torch.sort(indices, stable=True)
    csc_user = row_ids[perm].contiguous()
    csc_coef = (g_x[row_ids] * values.to(acc_t))[perm].contiguous()
    n_gran = triton.cdiv(n_items, CSC_GRAN)
    bounds = torch.arange(n_gran + 1, device=z.device, dtype=torch.int64) * CSC_GRAN
    csc_ptr = torch.searchsorted(csc_item, bounds).to(torch.int64)

    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None
    db = torch.empty(n_items, dtype=bias.dtype, device=z.device) if need_b else None
    grid = lambda meta: (triton.cdiv(n_items, meta["BLOCK_I"]),)  # noqa: E731
    wrap_triton(_BWD[prec == "ieee"])[grid](
        z, weight, bias, lse, gn, dw, db,
        csc_ptr, csc_user, csc_item, csc_coef,
        n_users, n_items, k, n_gran, z.stride(0), weight.stride(0), size_bucket(n_users),
        HAS_BIAS=bias is not None, NEED_W=need_w, NEED_B=need_b,
        DOT_PREC=prec, ACC=acc_tl, GRAN=CSC_GRAN, BLOCK_K=block_k(k),
    )
    return dw, db

