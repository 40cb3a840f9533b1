"""Fused decoder + multinomial log-likelihood of RecVAE as Triton kernels.

    multinomial_nll(z, weight, bias, batch)[u] = n_u·LSE_u − Σ_{i∈nz(u)} x_ui·logit_ui
    logit = z·weightᵀ + bias,  n_u = Σ_i x_ui,  LSE_u = log Σ_i exp(logit_ui)

Nothing of size B × I is ever written to memory. The pieces:

- `_fwd_kernel`: grid (user tiles, item splits). Each program streams the item tiles of its
  split of Wd against its user tile of z, with an online max/sum (LSE). When z needs a gradient
  it also accumulates A_u = Σ_i softmax_ui·Wd[i] (rescaled online, as in flash attention). dz is
  linear in the upstream g: dz_u = g_u·(n_u·A_u − Σ_i x_ui·Wd[i]), so z's backward is a scaling,
  and the encoder phase costs two products (logits, P·Wd) over one pass of Wd instead of three
  (forward logits, recomputed logits, G·Wd) over two passes; this is why dz is prepared here
  and not in a backward kernel. The item splits exist because B ≈ 500 gives only ~8-16 user
  tiles: splitting the items fills the GPU; the per-split (max, sum, A) partials
  (n_splits × B × (K + 2) floats, n_splits ≈ 2·SMs / user tiles) are merged in torch.
- `_gather_kernel`: one program per user, the indexed dot over its nonzeros
  (Σ x·Wd[i], Σ x·bd[i], n_u) from the CSR batch.
- `_bwd_w_kernel`: one program per item tile, looping over all user tiles, so dWd and dbd
  need no atomics (and are deterministic). It recomputes the logits tile from the saved LSE,
  G = g·n·softmax, dWd_tile = Gᵀ·z, dbd_tile = Σ_u G; then it adds the sparse part
  −g_u·x_ui at the tile's nonzeros, read from a CSC copy of the batch (sorted in torch, O(nnz)),
  as a small one-hot product so that it stays in the tile's registers.
The forward and the backward are ops registered with torch.library.triton_op
(`recvae_fast::triton_multinomial_nll`, `recvae_fast::triton_multinomial_nll_backward`), with the
autograd formula registered on the forward; torch.compile sees the kernels through wrap_triton.
Gradients are computed only when needed: no A unless z requires grad (and grad mode is on), no
backward kernel unless Wd or bd needs a gradient, and inside it only dWd and/or dbd.

Under torch.autocast (bf16-mixed, recvae_fast.precision) the forward op runs on bf16 copies of
z, Wd and bd with fp32 LSE, NLL and gradients (`_nll_autocast`, registered for the autocast keys).

Precision: fp32 inputs follow torch.get_float32_matmul_precision(): "highest" → tl.dot with
input_precision="ieee" (exact fp32 products, FMA units), "high"/"medium" → tf32. bf16/fp16 use
tensor cores with fp32 accumulation, fp32 LSE and fp32 partials; fp64 computes in fp64.
Tensor-core paths dot over the whole (padded) K at once up to K = 256; the FMA paths ("ieee",
fp64), and the tensor-core paths at larger K, go over K in chunks of KC, because an FMA dot holds
its whole reduction dimension in registers and a whole-K tile at K = 1024 needs more shared memory
than a GPU has.

Supported K (MAX_K): 1 ≤ K ≤ 1024 for fp32, bf16 and fp16, K ≤ 512 for fp64. The [rows, K]
accumulator of dz (forward) and dWd (backward) stays in registers; at K = 1024 only 16-row fp32
tiles keep it within 64 registers per thread, and fp64 (two registers a value, no tensor cores)
spills there. Beyond the limit the op raises a ValueError naming it. benches/compile_check.py
compiles the configs the prune keeps for sm_90 and sm_80 and checks shared memory and spills
(every one with --level full; tests/test_kernel_compile.py runs a sample).

Tile sizes: autotuned on GPUs (a few configs, keyed on a power-of-two bucket of B, on I, K and the
flags, so the last, smaller batch of an epoch and evaluation batches reuse the tuning); one fixed
small config under TRITON_INTERPRET=1. All products of an index by a stride are done in int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from recvae_fast.precision import autocast_product_dtype, register_autocast_kernel

from ._common import INTERPRET, SUPPORTED_DTYPES, acc_dtypes, check_batch, check_runs_here, on_device, size_bucket
from ._common import config as _common_config

__all__ = ["multinomial_nll", "multinomial_nll_parts", "MAX_K"]

MAX_K = {torch.float16: 1024, torch.bfloat16: 1024, torch.float32: 1024, torch.float64: 512}
# Item splits are this many items apart at most tile-aligned (a multiple of every BLOCK_I).
_SPLIT_ALIGN = 256
# The CSC pointer of the backward sparse part is kept every _CSC_GRAN items (<= every BLOCK_I).
_CSC_GRAN = 16
# Register rule of the prune: per-thread registers of the [rows, K] accumulator (an fp64 value
# takes two) and of the [BLOCK_B, BLOCK_I] logits tile. Fit on the compile sweep of every config
# with triton 3.6 (benches/RESULTS.md): it keeps no config that spilled past the budget there.
# - fp64: accumulator ≤ 32 (its FMA logits tiles are fp64 too: at 64 it spilled);
# - fp32 "ieee" (FMA): accumulator ≤ 48 (at 64 the 64-row forward spilled 76–84 B and the
#   16-item dW backward 136 B on sm_90);
# - tensor cores on sm_90: accumulator ≤ 64 (wgmma reads its operands from shared memory);
# - tensor cores before sm_90: accumulator + 8 × logits tile ≤ 72 (mma.sync holds the tile's
#   operand fragments in registers too: the 32×64 whole-K forward at K 200 spilled 136/132 B tf32
#   and the 16×32 K-chunked one at K 600 76/44 B bf16, the 16×16 one did not).
def registers_fit(acc_regs: float, logits_regs: float, elem_size: int, fma: bool, arch: int) -> bool:
    if elem_size == 8:
        return acc_regs <= 32
    if fma:
        return acc_regs <= 48
    if arch >= 90:
        return acc_regs <= 64
    return acc_regs + 8 * logits_regs <= 72


# ----------------------------------------------------------------------------------------------
# Tile configurations. Autotuned on GPUs over a few configs keyed on the shape; the interpreter
# (tests on CPU) gets one small config so that autotune never benchmarks there.
# ----------------------------------------------------------------------------------------------
def _cfg(bb, bi, warps, stages, kc=0, **extra):
    return _common_config(warps, stages, BLOCK_B=bb, BLOCK_I=bi, KC=kc, **extra)


# Two config lists per kernel: tensor cores (tf32, bf16, fp16) and FMA (fp32 "ieee", fp64). Each
# list is autotuned on its own kernel object. KC = 0: whole-K dots; KC > 0: K chunks of KC.
# The prune (fitting_configs) keeps, for each K and dtype, the configs whose shared memory and
# accumulator registers fit; its rules were set from sm_90 compiles with triton 3.6 and 3.9
# (benches/compile_check.py; what was compiled and the figures are in benches/RESULTS.md).
GPU_CONFIGS = {
    ("fwd", False): [
        _cfg(64, 64, 8, 2),
        _cfg(64, 32, 8, 2),
        _cfg(64, 16, 8, 3),
        _cfg(32, 64, 8, 2),
        _cfg(32, 32, 4, 2),
        _cfg(128, 64, 8, 2),
        # large K: K chunks, 16-row accumulators (16 warps on a 16×16 tile spilled: not listed)
        _cfg(16, 32, 8, 2, kc=32),
        _cfg(16, 16, 8, 2, kc=32),
    ],
    ("fwd", True): [
        _cfg(64, 32, 8, 2, kc=16),
        _cfg(64, 16, 8, 2, kc=16),
        _cfg(32, 32, 8, 2, kc=16),
        _cfg(32, 16, 8, 2, kc=16),
        _cfg(32, 16, 4, 2, kc=16),
        _cfg(16, 16, 8, 2, kc=16),
        _cfg(16, 16, 16, 1, kc=16),
    ],
    ("bwd", False): [
        _cfg(32, 64, 8, 3, BLOCK_NZ=16),
        _cfg(16, 64, 8, 2, BLOCK_NZ=16),
        _cfg(32, 32, 8, 2, BLOCK_NZ=16),
        _cfg(32, 32, 4, 2, BLOCK_NZ=16),
        # (64, 64) and (32, 128) were dropped: they spill on triton 3.6 at K 200 (80 and 120 B)
        _cfg(32, 16, 8, 2, kc=32, BLOCK_NZ=16),
        _cfg(16, 16, 8, 2, kc=32, BLOCK_NZ=16),
    ],
    ("bwd", True): [
        _cfg(16, 16, 8, 2, kc=16, BLOCK_NZ=16),
        _cfg(32, 16, 8, 2, kc=16, BLOCK_NZ=16),
        # (32, 32, 8 warps, 1 stage) was dropped: with dW it spilled 316/244 B on sm_80 at K 200 (triton 3.9)
        _cfg(16, 64, 8, 1, kc=16, BLOCK_NZ=16),
        _cfg(16, 16, 16, 1, kc=16, BLOCK_NZ=16),
    ],
}
_INTERPRETER_CONFIGS = {
    ("fwd", False): [_cfg(32, 64, 4, 1)],
    ("fwd", True): [_cfg(32, 64, 4, 1, kc=16)],
    ("bwd", False): [_cfg(32, 64, 4, 1, BLOCK_NZ=16)],
    ("bwd", True): [_cfg(32, 64, 4, 1, kc=16, BLOCK_NZ=16)],
}
_CONFIGS = _INTERPRETER_CONFIGS if INTERPRET else GPU_CONFIGS


def _device_limits(device: torch.device) -> tuple[int, int]:
    """(shared memory per block in bytes, arch as 10·major + minor) of the GPU that runs the launch."""
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device.index)
        major, minor = torch.cuda.get_device_capability(device)
        return props["max_shared_mem"], 10 * major + minor
    except Exception:  # noqa: BLE001 - best effort: the smallest limits of the GPUs we target (sm_80)
        return 163 * 1024, 80


def fitting_configs(configs, block_k: int, elem_size: int, wide_acc: bool, stationary: str, streamed: str,
                    smem_limit: int, arch: int, fma: bool):
    """The configs whose tiles fit: shared memory for the resident and pipelined tiles, and at most
    registers that pass `registers_fit` when there is a [stationary rows, K] accumulator (rules set
    from sm_90 and sm_80 compiles with triton 3.6 and 3.9, benches/compile_check.py).
    Whole-K configs (KC = 0) are kept only up to K = 256: beyond, the whole-K tiles spill."""
    kept = []
    for c in configs:
        kc = c.kwargs["KC"]
        res, stream = c.kwargs[stationary], c.kwargs[streamed]
        stages = max(c.num_stages, 1)
        if kc == 0:
            if block_k > 256:
                continue
            smem = (res + stages * stream) * block_k * elem_size
        else:
            if kc > block_k:
                continue
            # chunks of both operands, pipelined, plus the whole-K operand of the accumulator's dot
            smem = (stages * (res + stream) * kc + (stream * block_k if wide_acc else 0)) * elem_size
        threads = 32 * c.num_warps
        acc_regs = res * block_k * max(elem_size, 4) // 4 // threads
        if kc == 0 and stationary == "BLOCK_B":
            # The forward's whole-K z tile stays in registers next to the accumulator: count it too
            # (triton 3.6, sm_90, K 200: a 64-row tile spilled 428/760 B tf32, 312/568 B bf16).
            acc_regs *= 2
        fits = not wide_acc or registers_fit(acc_regs, res * stream / threads, elem_size, fma, arch)
        # + 1 KB: triton reserves a little more than the tiles (measured: 512 B for reductions)
        if smem + 1024 <= smem_limit and fits:
            kept.append(c)
    return kept


def _prune(configs, named_args, kwargs, stationary, streamed, wide_acc):
    smem_limit, arch = _device_limits(named_args["W"].device)
    kept = fitting_configs(configs, kwargs["BLOCK_K"], named_args["W"].element_size(), wide_acc,
                           stationary, streamed, smem_limit, arch, fma=kwargs["DOT_PREC"] == "ieee")
    if not kept:  # _validate bounds K, so this means a config list that does not cover MAX_K
        dtype = named_args["W"].dtype
        raise ValueError(f"multinomial_nll: no tile config fits K = {named_args['K']} (BLOCK_K {kwargs['BLOCK_K']}) "
                         f"for {dtype}; supported: 1 <= K <= {MAX_K[dtype]}")
    return kept


def _prune_fwd(configs, named_args, **kwargs):
    return _prune(configs, named_args, kwargs, "BLOCK_B", "BLOCK_I", kwargs["COMPUTE_A"])


def _prune_bwd(configs, named_args, **kwargs):
    return _prune(configs, named_args, kwargs, "BLOCK_I", "BLOCK_B", kwargs["NEED_W"])


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
# The interpreter's tl.dot multiplies bf16 operands as raw integers (numpy has no bf16), so there
# the operands are widened to fp32 first: the same numbers a bf16 MMA with fp32 accumulation gives.
_WIDEN_BF16 = tl.constexpr(INTERPRET)


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    if _WIDEN_BF16 and a.dtype == tl.bfloat16:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


@triton.jit
def _logits_by_k_chunks(z_rows, w_rows, b_mask, i_mask, K, KC: tl.constexpr, BLOCK_B: tl.constexpr,
                        BLOCK_I: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr):
    """z·Wᵀ for a [BLOCK_B × BLOCK_I] tile, K in chunks of KC (keeps FMA-path registers bounded)."""
    logits = tl.zeros([BLOCK_B, BLOCK_I], dtype=ACC)
    for k0 in range(0, K, KC):
        offs_c = k0 + tl.arange(0, KC)
        c_mask = offs_c < K
        zc = tl.load(z_rows + offs_c[None, :], mask=b_mask[:, None] & c_mask[None, :], other=0.0)
        wc = tl.load(w_rows + offs_c[None, :], mask=i_mask[:, None] & c_mask[None, :], other=0.0)
        logits += _mm(zc, tl.trans(wc), DOT_PREC).to(ACC)
    return logits


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
            logits = _mm(z, tl.trans(w), DOT_PREC).to(ACC)
        else:
            logits = _logits_by_k_chunks(z_rows, w_rows, b_mask, i_mask, K, KC, BLOCK_B, BLOCK_I, ACC, DOT_PREC)
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
            acc = acc * rescale[:, None] + _mm(p.to(w.dtype), w, DOT_PREC).to(ACC)
        run_max = new_max

    part = pid_s.to(tl.int64) * B + offs_b
    tl.store(M_PART + part, run_max, mask=b_mask)
    tl.store(S_PART + part, run_sum, mask=b_mask)
    if COMPUTE_A:
        tl.store(A_PART + part[:, None] * K + offs_k[None, :], acc, mask=b_mask[:, None] & k_mask[None, :])


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
    KC as in _fwd_kernel (0: resident Wd tile, whole-K dot; > 0: K chunks). BIAS, DW, DB are None
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
            logits = _mm(z, tl.trans(w), DOT_PREC).to(ACC)
        else:
            logits = _logits_by_k_chunks(z_rows, w_rows, b_mask, i_mask, K, KC, BLOCK_B, BLOCK_I, ACC, DOT_PREC)
        if HAS_BIAS:
            logits += bias[None, :]
        lse = tl.load(LSE + offs_b, mask=b_mask, other=0.0)
        gn = tl.load(GN + offs_b, mask=b_mask, other=0.0)
        g = gn[:, None] * tl.exp(logits - lse[:, None])
        g = tl.where(b_mask[:, None] & i_mask[None, :], g, 0.0)
        if NEED_W:
            dw += _mm(tl.trans(g.to(z.dtype)), z, DOT_PREC).to(ACC)
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
            dw += _mm(sel, zr, DOT_PREC)
        if NEED_B:
            db += tl.sum(sel, axis=1)

    if NEED_W:
        tl.store(DW + offs_i.to(tl.int64)[:, None] * K + offs_k[None, :], dw.to(DW.dtype.element_ty),
                 mask=i_mask[:, None] & k_mask[None, :])
    if NEED_B:
        tl.store(DB + offs_i, db.to(DB.dtype.element_ty), mask=i_mask)


_FWD = {
    fma: triton.autotune(configs=_CONFIGS["fwd", fma], key=["B_BUCKET", "I", "K", "COMPUTE_A", "DOT_PREC"],
                         prune_configs_by={"early_config_prune": _prune_fwd})(_fwd_kernel)
    for fma in (False, True)
}
_BWD = {
    fma: triton.autotune(configs=_CONFIGS["bwd", fma], key=["B_BUCKET", "I", "K", "NEED_W", "NEED_B", "DOT_PREC"],
                         prune_configs_by={"early_config_prune": _prune_bwd})(_bwd_w_kernel)
    for fma in (False, True)
}


# ----------------------------------------------------------------------------------------------
# Launch logic
# ----------------------------------------------------------------------------------------------
def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "tf32"  # bf16/fp16: ignored by tl.dot (tensor cores, fp32 accumulation)


def _block_k(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def _gather_block_nz(block_k: int) -> int:
    """Nonzeros per step of the gather: a [BLOCK_NZ, BLOCK_K] tile of ≤ 4096 elements (32 fp32
    registers per thread at 4 warps), so that K = 1024 does not spill."""
    return max(1, min(16, 4096 // block_k))


def _n_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: a few splits, so that the tests exercise the merge


def _forward(z, weight, bias, indptr, indices, values, want_a, prec):
    """(lse, total, a, xdot, n, xw) per user, in the accumulation dtype: LSE_u; Σ_i e^{logit_ui − M_u}
    (M_u = LSE_u − log total_u); a_u = Σ_i e^{logit_ui − M_u}·Wd[i] (want_a, else None); Σ x·logit;
    n_u = Σ_i x_ui; Σ_i x_ui·Wd[i] (want_a, else None)."""
    n_users, k = z.shape
    n_items = weight.shape[0]
    acc_t, acc_tl = acc_dtypes(z.dtype)
    block_k = _block_k(k)
    has_bias = bias is not None

    # Split the items so that (user tiles × splits) ≈ 2 waves of programs, each split a
    # multiple of _SPLIT_ALIGN items (tile-aligned for every config).
    user_tiles = triton.cdiv(n_users, 64)
    n_splits = max(1, min(triton.cdiv(n_items, _SPLIT_ALIGN), triton.cdiv(2 * _n_sms(z.device), user_tiles)))
    items_per_split = triton.cdiv(triton.cdiv(n_items, n_splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    n_splits = triton.cdiv(n_items, items_per_split)  # no empty split

    m_part = torch.empty(n_splits, n_users, dtype=acc_t, device=z.device)
    s_part = torch.empty_like(m_part)
    a_part = torch.empty(n_splits, n_users, k, dtype=acc_t, device=z.device) if want_a else None
    grid = lambda meta: (triton.cdiv(n_users, meta["BLOCK_B"]), n_splits)  # noqa: E731
    wrap_triton(_FWD[prec == "ieee"])[grid](
        z, weight, bias, m_part, s_part, a_part,
        n_users, n_items, k, items_per_split, z.stride(0), weight.stride(0), size_bucket(n_users),
        HAS_BIAS=has_bias, COMPUTE_A=want_a, DOT_PREC=prec, ACC=acc_tl, BLOCK_K=block_k,
    )

    xdot = torch.empty(n_users, dtype=acc_t, device=z.device)
    n = torch.empty_like(xdot)
    xw = torch.empty(n_users, k, dtype=acc_t, device=z.device) if want_a else None
    wrap_triton(_gather_kernel)[(n_users,)](
        z, weight, bias, indptr, indices, values, xdot, n, xw,
        k, z.stride(0), weight.stride(0),
        HAS_BIAS=has_bias, STORE_XW=want_a, ACC=acc_tl, BLOCK_K=block_k, BLOCK_NZ=_gather_block_nz(block_k),
        num_warps=4,
    )

    # Merge the split partials: LSE = M + log Σ_s e^{m_s − M}·s_s (B × n_splits floats).
    big_m = m_part.amax(dim=0)
    scale = torch.exp(m_part - big_m)
    total = (scale * s_part).sum(dim=0)
    lse = big_m + torch.log(total)
    a = torch.einsum("sb,sbk->bk", scale, a_part) if want_a else None
    return lse, total, a, xdot, n, xw


def _backward_w(z, weight, bias, indptr, indices, values, lse, g_softmax, g_x, need_w, need_b, prec):
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
    n_gran = triton.cdiv(n_items, _CSC_GRAN)
    bounds = torch.arange(n_gran + 1, device=z.device, dtype=torch.int64) * _CSC_GRAN
    csc_ptr = torch.searchsorted(csc_item, bounds).to(torch.int64)

    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None
    db = torch.empty(n_items, dtype=bias.dtype, device=z.device) if need_b else None
    grid = lambda meta: (triton.cdiv(n_items, meta["BLOCK_I"]),)  # noqa: E731
    wrap_triton(_BWD[prec == "ieee"])[grid](
        z, weight, bias, lse, gn, dw, db,
        csc_ptr, csc_user, csc_item, csc_coef,
        n_users, n_items, k, n_gran, z.stride(0), weight.stride(0), size_bucket(n_users),
        HAS_BIAS=bias is not None, NEED_W=need_w, NEED_B=need_b,
        DOT_PREC=prec, ACC=acc_tl, GRAN=_CSC_GRAN, BLOCK_K=_block_k(k),
    )
    return dw, db


# ----------------------------------------------------------------------------------------------
# Registered ops (torch.library.triton_op): visible by name to the profiler, checked by opcheck,
# and traceable by torch.compile, which sees the kernels through wrap_triton. The batch is passed
# as its three CSR tensors. Autograd is registered on the forward op; its backward calls the
# backward op only when weight or bias need a gradient.
# ----------------------------------------------------------------------------------------------
@triton_op("recvae_fast::triton_multinomial_nll", mutates_args=())
def multinomial_nll_op(
    z: Tensor, weight: Tensor, bias: Tensor | None, indptr: Tensor, indices: Tensor, values: Tensor,
    want_dz: bool, prec: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(nll [B] in z's dtype; LSE [B], n [B] and dz/g [B, K] ([0, K] unless want_dz) in the
    accumulation dtype). Only nll is differentiable."""
    with on_device(z):
        lse, total, a, xdot, n, xw = _forward(z, weight, bias, indptr, indices, values, want_dz, prec)
    if want_dz:
        # dz_u / g_u = n_u·Σ_i softmax_ui·Wd[i] − Σ_i x_ui·Wd[i]
        dz_per_g = a.mul_((n / total)[:, None]).sub_(xw)
    else:
        dz_per_g = lse.new_empty(0, z.shape[1])
    return (n * lse - xdot).to(z.dtype), lse, n, dz_per_g


@triton_op("recvae_fast::triton_multinomial_nll_parts", mutates_args=())
def multinomial_nll_parts_op(
    z: Tensor, weight: Tensor, bias: Tensor | None, indptr: Tensor, indices: Tensor, values: Tensor,
    want_dz: bool, prec: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(LSE [B], Σ x·logit [B], Σ_i softmax_ui·Wd[i] [B, K], Σ_i x_ui·Wd[i] [B, K]; the last two [0, K]
    unless want_dz), all in the accumulation dtype. The first two are differentiable."""
    with on_device(z):
        lse, total, a, xdot, _, xw = _forward(z, weight, bias, indptr, indices, values, want_dz, prec)
    if want_dz:
        return lse, xdot, a.div_(total[:, None]), xw
    return lse, xdot, lse.new_empty(0, z.shape[1]), lse.new_empty(0, z.shape[1])


@triton_op("recvae_fast::triton_multinomial_nll_backward", mutates_args=())
def multinomial_nll_backward_op(
    z: Tensor, weight: Tensor, bias: Tensor | None, indptr: Tensor, indices: Tensor, values: Tensor,
    lse: Tensor, g_softmax: Tensor, g_x: Tensor, need_w: bool, need_b: bool, prec: str,
) -> tuple[Tensor, Tensor]:
    """(dWd, dbd) for the logits' gradient g_softmax_u·softmax_ui + g_x_u·x_ui (both ops above);
    an empty tensor for a gradient that is not needed."""
    with on_device(z):
        dw, db = _backward_w(z, weight, bias, indptr, indices, values, lse, g_softmax, g_x, need_w, need_b, prec)
    return (dw if dw is not None else weight.new_empty(0),
            db if db is not None else weight.new_empty(0))


# Shapes for FakeTensor tracing. triton_op derives them by tracing the body, except under the
# interpreter, where wrap_triton hands back the interpreted kernel, which would run on fake tensors.
@multinomial_nll_op.register_fake
def _(z, weight, bias, indptr, indices, values, want_dz, prec):
    acc_t = acc_dtypes(z.dtype)[0]
    n_users, k = z.shape
    return (z.new_empty(n_users), z.new_empty(n_users, dtype=acc_t), z.new_empty(n_users, dtype=acc_t),
            z.new_empty((n_users if want_dz else 0, k), dtype=acc_t))


@multinomial_nll_parts_op.register_fake
def _(z, weight, bias, indptr, indices, values, want_dz, prec):
    acc_t = acc_dtypes(z.dtype)[0]
    n_users, k = z.shape
    rows = n_users if want_dz else 0
    return (z.new_empty(n_users, dtype=acc_t), z.new_empty(n_users, dtype=acc_t),
            z.new_empty((rows, k), dtype=acc_t), z.new_empty((rows, k), dtype=acc_t))


@multinomial_nll_backward_op.register_fake
def _(z, weight, bias, indptr, indices, values, lse, g_softmax, g_x, need_w, need_b, prec):
    return (torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else weight.new_empty(0),
            weight.new_empty(weight.shape[0]) if need_b else weight.new_empty(0))


def _decoder_grads(ctx, z, weight, bias, indptr, indices, values, lse, g_softmax, g_x):
    need_w, need_b = ctx.needs_input_grad[1:3]
    if not (need_w or need_b):
        return None, None
    grad_w, grad_b = multinomial_nll_backward_op(
        z, weight, bias, indptr, indices, values, lse, g_softmax, g_x, need_w, need_b, ctx.prec)
    return grad_w if need_w else None, grad_b if need_b else None


def _nll_setup_context(ctx, inputs, output):
    z, weight, bias, indptr, indices, values, _, prec = inputs
    _, lse, n, dz_per_g = output
    ctx.mark_non_differentiable(lse, n, dz_per_g)
    # Saved: LSE and n (B floats each) and, only when z needs a gradient, dz/g (B × K).
    ctx.save_for_backward(z, weight, bias, indptr, indices, values, lse, n, dz_per_g)
    ctx.prec = prec


def _nll_backward(ctx, grad_nll, *_unused):
    z, weight, bias, indptr, indices, values, lse, n, dz_per_g = ctx.saved_tensors
    grad_z = None
    if ctx.needs_input_grad[0]:
        if dz_per_g.numel() != z.numel():  # cannot happen through multinomial_nll(); guard anyway
            raise RuntimeError("multinomial_nll: z needs a gradient but the forward ran without grad mode")
        grad_z = (grad_nll.to(dz_per_g.dtype)[:, None] * dz_per_g).to(z.dtype)
    g = grad_nll.to(lse.dtype)
    grad_w, grad_b = _decoder_grads(ctx, z, weight, bias, indptr, indices, values, lse, g * n, -g)
    return (grad_z, grad_w, grad_b) + (None,) * 5


def _parts_setup_context(ctx, inputs, output):
    z, weight, bias, indptr, indices, values, _, prec = inputs
    lse, _, expected_w, xw = output
    ctx.mark_non_differentiable(expected_w, xw)
    ctx.save_for_backward(z, weight, bias, indptr, indices, values, lse, expected_w, xw)
    ctx.prec = prec


def _parts_backward(ctx, grad_lse, grad_x_logit, *_unused):
    z, weight, bias, indptr, indices, values, lse, expected_w, xw = ctx.saved_tensors
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(lse.dtype)
    grad_x_logit = torch.zeros_like(lse) if grad_x_logit is None else grad_x_logit.to(lse.dtype)
    grad_z = None
    if ctx.needs_input_grad[0]:
        if expected_w.numel() != z.numel():  # cannot happen through multinomial_nll_parts(); guard anyway
            raise RuntimeError("multinomial_nll_parts: z needs a gradient but the forward ran without grad mode")
        # dLSE_u/dz_u = Σ_i softmax_ui·Wd[i]; d(Σ x·logit)_u/dz_u = Σ_i x_ui·Wd[i]
        grad_z = (grad_lse[:, None] * expected_w + grad_x_logit[:, None] * xw).to(z.dtype)
    grad_w, grad_b = _decoder_grads(ctx, z, weight, bias, indptr, indices, values, lse, grad_lse, grad_x_logit)
    return (grad_z, grad_w, grad_b) + (None,) * 5


multinomial_nll_op.register_autograd(_nll_backward, setup_context=_nll_setup_context)
multinomial_nll_parts_op.register_autograd(_parts_backward, setup_context=_parts_setup_context)


def _nll_autocast(device_type, z, weight, bias, indptr, indices, values, want_dz, prec):
    """recvae_fast::triton_multinomial_nll under autocast (bf16-mixed): the kernels run on bf16
    copies of z, Wd and bd (tensor cores, fp32 accumulation), through the parts op, whose LSE and
    Σ x·logit come back in fp32, so the NLL n·LSE − Σ x·logit is formed in fp32; the casts are
    differentiable, so z, Wd and bd get fp32 gradients. float64 inputs run as they are."""
    dtype = autocast_product_dtype(device_type)
    tensors = (z, weight) + ((bias,) if bias is not None else ())
    if dtype is None or any(t.dtype == torch.float64 for t in tensors):
        return multinomial_nll_op(z, weight, bias, indptr, indices, values, want_dz, prec)
    low_bias = bias.to(dtype) if bias is not None else None
    lse, x_logit, _, _ = multinomial_nll_parts_op(z.to(dtype), weight.to(dtype), low_bias, indptr, indices, values,
                                                  want_dz, _dot_precision(dtype))
    rows = torch.repeat_interleave(torch.arange(z.shape[0], device=z.device), indptr[1:] - indptr[:-1],
                                   output_size=indices.shape[0])
    n = torch.zeros_like(lse).index_add_(0, rows, values.to(lse.dtype))
    return n * lse - x_logit, lse.detach(), n, lse.new_empty(0, z.shape[1])


register_autocast_kernel("recvae_fast::triton_multinomial_nll", _nll_autocast)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
def _validate(z, weight, bias, batch) -> None:
    for name, t in (("z", z), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D [B, K], got shape {tuple(z.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [I, K], got shape {tuple(weight.shape)}")
    n_users, k = z.shape
    n_items = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"weight has K={weight.shape[1]} columns, z has K={k}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n_items):
        raise ValueError(f"bias must have shape [{n_items}], got {tuple(bias.shape)}")
    check_batch(batch, n_users, n_items, z.device, "multinomial_nll")
    if z.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"z has dtype {z.dtype}; supported: float16, bfloat16, float32, float64")
    if n_items == 0 or not 1 <= k <= MAX_K[z.dtype]:
        raise ValueError(f"multinomial_nll needs at least one item and 1 <= K <= {MAX_K[z.dtype]} for {z.dtype} "
                         f"(MAX_K: the dz and dWd accumulators stay in registers), got I={n_items}, K={k}")
    if weight.dtype != z.dtype or (bias is not None and bias.dtype != z.dtype):
        raise TypeError(
            f"z, weight and bias must share a dtype, got {z.dtype}, {weight.dtype}, "
            f"{bias.dtype if bias is not None else None}"
        )
    devices = {z.device, weight.device} | ({bias.device} if bias is not None else set())
    if len(devices) != 1:
        raise ValueError(f"z, weight, bias and the batch must be on one device, got {sorted(map(str, devices))}")
    check_runs_here(z.device, "multinomial_nll", "recvae_fast.torch_ops.multinomial_nll")


def multinomial_nll(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, batch) -> torch.Tensor:
    """−mll per user, shape [B], dtype of z; differentiable in z, weight and bias, and only the
    gradients that are needed are computed (z's is prepared in the forward pass, see above)."""
    _validate(z, weight, bias, batch)
    if z.shape[0] == 0:
        return (z.sum(dim=1) + weight.sum() * 0 + (bias.sum() * 0 if bias is not None else 0))[:0]
    want_dz = torch.is_grad_enabled() and z.requires_grad
    return multinomial_nll_op(
        z.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else None,
        batch.indptr, batch.indices, batch.values, want_dz, _dot_precision(z.dtype),
    )[0]


def multinomial_nll_parts(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, batch):
    """(LSE_u = log Σ_i exp(logit_ui), Σ_{i∈nz(u)} x_ui·logit_ui), both [B] in z's dtype, so that
    multinomial_nll = n_u·LSE_u − Σ x·logit. The same kernels as multinomial_nll, for item shards
    that combine their parts (the LSEs by a log-sum-exp, the sums by a sum); differentiable in z,
    weight and bias (dlogit_ui = g_lse_u·softmax_ui + g_x_u·x_ui). A user with no items has LSE over
    all items and a sum of 0; with no items at all (I = 0) the op refuses, as multinomial_nll does."""
    _validate(z, weight, bias, batch)
    if z.shape[0] == 0:
        empty = (z.sum(dim=1) + weight.sum() * 0 + (bias.sum() * 0 if bias is not None else 0))[:0]
        return empty, empty.clone()
    want_dz = torch.is_grad_enabled() and z.requires_grad
    lse, x_logit, _, _ = multinomial_nll_parts_op(
        z.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else None,
        batch.indptr, batch.indices, batch.values, want_dz, _dot_precision(z.dtype),
    )
    return lse.to(z.dtype), x_logit.to(z.dtype)
