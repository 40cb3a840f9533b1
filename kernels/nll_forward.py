"""The forward kernel of the fused multinomial NLL: per user, the log-sum-exp of the logits over all
items (and, when z needs a gradient, the softmax-weighted sum of Wd's rows), without the B × I
logits ever being written.

`_fwd_kernel`: grid (user tiles, item splits). Each program streams the item tiles of its split of
Wd against its user tile of z, with an online max/sum (LSE). When z needs a gradient it also
accumulates A_u = Σ_i softmax_ui·Wd[i] (rescaled online, as in flash attention). dz is linear in
the upstream g: dz_u = g_u·(n_u·A_u − Σ_i x_ui·Wd[i]), so z's backward is a scaling, and the
encoder phase costs two products (logits, P·Wd) over one pass of Wd instead of three (forward
logits, recomputed logits, G·Wd) over two passes; this is why dz is prepared here and not in a
backward kernel. The item splits exist because B ≈ 500 gives only ~8-16 user tiles: splitting the
items fills the GPU; the per-split (max, sum, A) partials (n_splits × B × (K + 2) floats,
n_splits ≈ 2·SMs / user tiles) are merged in torch by `forward_lse`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import acc_dtypes, logits_by_k_chunks, mm, size_bucket
from .nll_configs import CONFIGS, SPLIT_ALIGN, block_k, prune_fwd


@triton.jit
def _fwd_kernel(
    Z, W, BIAS, M_PART, S_PART, A_PART,
    B, I, K, items_per_split, stride_z, stride_w, B_BUCKET,
    HAS_BIAS: tl.constexpr, COMPUTE_A: tl.constexpr, DOT_PREC: tl.constexpr, ACC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr, KC: tl.constexpr,
):
    """Partial (max, sum[, A]) of one user tile over one split of the items. BIAS and A_PART are
    None when unused (HAS_BIAS, COMPUTE_A); B_BUCKET is only an autotuning key.

    KC == 0 (tensor-core paths): the user tile of z is loaded once and each logits tile is one
    dot over the whole (padded) K. KC > 0 (fp32 "ieee" and fp64, FMA paths): the logits are
    accumulated over K chunks of KC (an FMA dot holds its whole reduction dimension in registers;
    whole-K tiles at large K do not fit shared memory)."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    z_rows = Z + offs_b.to(tl.int64)[:, None] * stride_z
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    if KC == 0:
        z = tl.load(z_rows + offs_k[None, :], mask=b_mask[:, None] & k_mask[None, :], other=0.0)

    i_start = pid_s * items_per_split
    i_end = tl.minimum(i_start + items_per_split, I)
    run_max = tl.full([BLOCK_B], float("-inf"), dtype=ACC)
    run_sum = tl.zeros([BLOCK_B], dtype=ACC)
    if COMPUTE_A:
        acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=ACC)
    for i0 in range(i_start, i_end, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        i_mask = offs_i < i_end
        w_rows = W + offs_i.to(tl.int64)[:, None] * stride_w
        if KC == 0:
            w = tl.load(w_rows + offs_k[None, :], mask=i_mask[:, None] & k_mask[None, :], other=0.0)
            logits = mm(z, tl.trans(w), DOT_PREC).to(ACC)
        else:
            logits = logits_by_k_chunks(z_rows, w_rows, b_mask, i_mask, K, KC, BLOCK_B, BLOCK_I, ACC, DOT_PREC)
        if HAS_BIAS:
            logits += tl.load(BIAS + offs_i, mask=i_mask, other=0.0).to(ACC)[None, :]
        logits = tl.where(i_mask[None, :], logits, float("-inf"))
        # Every tile holds >= 1 valid item, so new_max is finite and exp(-inf - new_max) = 0.
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        rescale = tl.exp(run_max - new_max)
        p = tl.exp(logits - new_max[:, None])
        run_sum = run_sum * rescale + tl.sum(p, axis=1)
        if COMPUTE_A:
            if KC != 0:  # the same rows again, now whole (they were just read: L1/L2 hits)
                w = tl.load(w_rows + offs_k[None, :], mask=i_mask[:, None] & k_mask[None, :], other=0.0)
            acc = acc * rescale[:, None] + mm(p.to(w.dtype), w, DOT_PREC).to(ACC)
        run_max = new_max

    part = pid_s.to(tl.int64) * B + offs_b
    tl.store(M_PART + part, run_max, mask=b_mask)
    tl.store(S_PART + part, run_sum, mask=b_mask)
    if COMPUTE_A:
        tl.store(A_PART + part[:, None] * K + offs_k[None, :], acc, mask=b_mask[:, None] & k_mask[None, :])


_FWD = {
    fma: triton.autotune(configs=CONFIGS["fwd", fma], key=["B_BUCKET", "I", "K", "COMPUTE_A", "DOT_PREC"],
                         prune_configs_by={"early_config_prune": prune_fwd})(_fwd_kernel)
    for fma in (False, True)
}


def _n_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: a few splits, so that the tests exercise the merge


def forward_lse(z, weight, bias, want_a, prec):
    """(lse, total, a) per user, in the accumulation dtype: LSE_u; Σ_i e^{logit_ui − M_u}
    (M_u = LSE_u − log total_u); a_u = Σ_i e^{logit_ui − M_u}·Wd[i] (want_a, else None)."""
    n_users, k = z.shape
    n_items = weight.shape[0]
    acc_t, acc_tl = acc_dtypes(z.dtype)

    # Split the items so that (user tiles × splits) ≈ 2 waves of programs, each split a
    # multiple of SPLIT_ALIGN items (tile-aligned for every config).
    user_tiles = triton.cdiv(n_users, 64)
    n_splits = max(1, min(triton.cdiv(n_items, SPLIT_ALIGN), triton.cdiv(2 * _n_sms(z.device), user_tiles)))
    items_per_split = triton.cdiv(triton.cdiv(n_items, n_splits), SPLIT_ALIGN) * SPLIT_ALIGN
    n_splits = triton.cdiv(n_items, items_per_split)  # no empty split

    m_part = torch.empty(n_splits, n_users, dtype=acc_t, device=z.device)
    s_part = torch.empty_like(m_part)
    a_part = torch.empty(n_splits, n_users, k, dtype=acc_t, device=z.device) if want_a else None
    grid = lambda meta: (triton.cdiv(n_users, meta["BLOCK_B"]), n_splits)  # noqa: E731
    wrap_triton(_FWD[prec == "ieee"])[grid](
        z, weight, bias, m_part, s_part, a_part,
        n_users, n_items, k, items_per_split, z.stride(0), weight.stride(0), size_bucket(n_users),
        HAS_BIAS=bias is not None, COMPUTE_A=want_a, DOT_PREC=prec, ACC=acc_tl, BLOCK_K=block_k(k),
    )

    # Merge the split partials: LSE = M + log Σ_s e^{m_s − M}·s_s (B × n_splits floats).
    big_m = m_part.amax(dim=0)
    scale = torch.exp(m_part - big_m)
    total = (scale * s_part).sum(dim=0)
    lse = big_m + torch.log(total)
    a = torch.einsum("sb,sbk->bk", scale, a_part) if want_a else None
    return lse, total, a
