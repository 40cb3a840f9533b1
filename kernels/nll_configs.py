"""Tile configurations of the fused multinomial NLL kernels (nll_forward, nll_backward, nll_gather)
and the rule that prunes them for a shape, a dtype and a GPU.

Tile sizes: autotuned on GPUs (a few configs, keyed on a power-of-two bucket of B, on I, K and the
flags, so the last, smaller batch of an epoch and evaluation batches reuse the tuning); one fixed
small config under TRITON_INTERPRET=1. Two config lists per kernel: tensor cores (tf32, bf16,
fp16) and FMA (fp32 "ieee", fp64). Tensor-core paths dot over the whole (padded) K at once up to
K = 256; the FMA paths, and the tensor-core paths at larger K, go over K in chunks of KC, because
an FMA dot holds its whole reduction dimension in registers and a whole-K tile at K = 1024 needs
more shared memory than a GPU has.

Supported K (MAX_K): 1 ≤ K ≤ 1024 for fp32, bf16 and fp16, K ≤ 512 for fp64. The [rows, K]
accumulator of dz (forward) and dWd (backward) stays in registers; at K = 1024 only 16-row fp32
tiles keep it within 64 registers per thread, and fp64 (two registers a value, no tensor cores)
spills there. tools/compile_check.py compiles the configs the prune keeps for sm_90 and sm_80
and checks shared memory and spills (every one with --level full; tests/test_kernel_compile.py
runs a sample).
"""
from __future__ import annotations

import torch
import triton

from ._common import INTERPRET
from ._common import config as _common_config

MAX_K = {torch.float16: 1024, torch.bfloat16: 1024, torch.float32: 1024, torch.float64: 512}
# Item splits of the forward are this many items apart at most tile-aligned (a multiple of every BLOCK_I).
SPLIT_ALIGN = 256
# The CSC pointer of the backward's sparse part is kept every CSC_GRAN items (<= every BLOCK_I).
CSC_GRAN = 16

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
# (tools/compile_check.py).
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
INTERPRETER_CONFIGS = {
    ("fwd", False): [_cfg(32, 64, 4, 1)],
    ("fwd", True): [_cfg(32, 64, 4, 1, kc=16)],
    ("bwd", False): [_cfg(32, 64, 4, 1, BLOCK_NZ=16)],
    ("bwd", True): [_cfg(32, 64, 4, 1, kc=16, BLOCK_NZ=16)],
}
CONFIGS = INTERPRETER_CONFIGS if INTERPRET else GPU_CONFIGS


def device_limits(device: torch.device) -> tuple[int, int]:
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
    from sm_90 and sm_80 compiles with triton 3.6 and 3.9, tools/compile_check.py).
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
    smem_limit, arch = device_limits(named_args["W"].device)
    kept = fitting_configs(configs, kwargs["BLOCK_K"], named_args["W"].element_size(), wide_acc,
                           stationary, streamed, smem_limit, arch, fma=kwargs["DOT_PREC"] == "ieee")
    if not kept:  # multinomial_nll checks K first, so this means a config list that does not cover MAX_K
        dtype = named_args["W"].dtype
        raise ValueError(f"multinomial_nll: no tile config fits K = {named_args['K']} (BLOCK_K {kwargs['BLOCK_K']}) "
                         f"for {dtype}; supported: 1 <= K <= {MAX_K[dtype]}")
    return kept


def prune_fwd(configs, named_args, **kwargs):
    """early_config_prune of the forward kernel (its accumulator: A, when COMPUTE_A)."""
    return _prune(configs, named_args, kwargs, "BLOCK_B", "BLOCK_I", kwargs["COMPUTE_A"])


def prune_bwd(configs, named_args, **kwargs):
    """early_config_prune of the backward kernel (its accumulator: dWd, when NEED_W)."""
    return _prune(configs, named_args, kwargs, "BLOCK_I", "BLOCK_B", kwargs["NEED_W"])


def block_k(k: int) -> int:
    """BLOCK_K: K padded to a power of two, at least 16 (tl.dot's smallest)."""
    return max(16, triton.next_power_of_2(k))


def gather_block_nz(block_k: int) -> int:
    """Nonzeros per step of the gather: a [BLOCK_NZ, BLOCK_K] tile of ≤ 4096 elements (32 fp32
    registers per thread at 4 warps), so that K = 1024 does not spill."""
    return max(1, min(16, 4096 // block_k))
