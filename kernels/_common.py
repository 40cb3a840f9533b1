"""Helpers shared by the Triton ops: dtypes, tile configs, the CUDA device guard, batch checks, and
the JIT helpers that several kernels call (the tile product, the K-chunked logits tile)."""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from recvae_fast.sparse import CSRBatch

# Read once, at import, as triton itself does: TRITON_INTERPRET must be set before triton loads.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT32_MAX = 2**31 - 1


def acc_dtypes(dtype: torch.dtype):
    """(torch, triton) accumulation dtype: fp64 for fp64 data, fp32 for everything narrower."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def config(warps: int, stages: int, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=warps, num_stages=stages)


def size_bucket(n: int) -> int:
    """An autotuning key for a size: its bit length (one bucket per power of two), so that a new
    batch size re-tunes only when it changes the order of magnitude."""
    return max(int(n), 0).bit_length()


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device for the launch."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def check_runs_here(device: torch.device, op: str, cpu_alternative: str) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter (tests)."""
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"the Triton {op} runs on CUDA tensors (got {device}); on the CPU use {cpu_alternative}, "
            "or set TRITON_INTERPRET=1 before importing triton"
        )


def check_batch(batch, n_users: int | None, n_items: int, device: torch.device, op: str) -> None:
    """The CSR batch: its type, int64 indices on `device`, n_items columns (and n_users rows)."""
    if not isinstance(batch, CSRBatch):
        raise TypeError(f"{op}: batch must be a recvae_fast.sparse.CSRBatch, got {type(batch).__name__}")
    ip, ind, val = batch.indptr, batch.indices, batch.values
    if ip.dtype != torch.int64 or ind.dtype != torch.int64:
        raise TypeError(f"{op}: batch.indptr and batch.indices must be int64, got {ip.dtype} and {ind.dtype} "
                        "(build the batch with as_csr_batch)")
    if ip.dim() != 1 or ip.numel() < 1:
        raise ValueError(f"{op}: batch.indptr must be [B + 1], got shape {tuple(ip.shape)}")
    if ind.dim() != 1 or val.shape != ind.shape:
        raise ValueError(f"{op}: batch.indices and batch.values must be [nnz], got {tuple(ind.shape)} and "
                         f"{tuple(val.shape)}")
    if not val.is_floating_point():
        raise TypeError(f"{op}: batch.values must be floating point, got {val.dtype}")
    if n_users is not None and batch.n_rows != n_users:
        raise ValueError(f"{op}: the batch has {batch.n_rows} users, the input has {n_users} rows")
    if batch.n_cols != n_items:
        raise ValueError(f"{op}: the batch has {batch.n_cols} items (columns), the weight has {n_items} rows")
    for name, t in (("indptr", ip), ("indices", ind), ("values", val)):
        if t.device != device:
            raise ValueError(f"{op}: batch.{name} is on {t.device}, the weight is on {device}")
    if ind.numel() > INT32_MAX or ip.numel() - 1 > INT32_MAX:
        raise ValueError(f"{op}: batches with 2**31 or more nonzeros or users are not supported")
    if device.type != "cuda" and ind.numel():
        # On CUDA this would cost a sync: CSRBatch validated the indices when it was built. The
        # interpreter does not catch out-of-bounds reads, so check here where it is cheap.
        if int(ind.min()) < 0 or int(ind.max()) >= n_items:
            raise IndexError(f"{op}: batch.indices has an item outside [0, {n_items})")


def interpreter_numpy_problem() -> str | None:
    """Why the Triton interpreter cannot run here, or None: triton < 3.7's interpreter fails with
    numpy >= 2.4 (40 of 46 kernel tests failed with triton 3.6 + numpy 2.4; all pass with 2.3.5).
    Install numpy<2.4 next to triton 3.6."""
    import numpy

    def major_minor(version: str):
        return tuple(int(part) for part in version.split(".")[:2])

    if major_minor(triton.__version__) < (3, 7) and major_minor(numpy.__version__) >= (2, 4):
        return (f"the Triton {triton.__version__} interpreter needs numpy<2.4 (found {numpy.__version__}); "
                "pip install 'numpy<2.4' or use triton>=3.7")
    return None


# ----------------------------------------------------------------------------------------------
# JIT helpers called from several kernels
# ----------------------------------------------------------------------------------------------
# The interpreter's tl.dot multiplies bf16 operands as raw integers (numpy has no bf16), so there
# the operands are widened to fp32 first: the same numbers a bf16 MMA with fp32 accumulation gives.
_WIDEN_BF16 = tl.constexpr(INTERPRET)


@triton.jit
def mm(a, b, PREC: tl.constexpr):
    """tl.dot(a, b) with input_precision PREC ("ieee" or "tf32"), bf16 widened under the interpreter."""
    if _WIDEN_BF16 and a.dtype == tl.bfloat16:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


@triton.jit
def logits_by_k_chunks(z_rows, w_rows, b_mask, i_mask, K, KC: tl.constexpr, BLOCK_B: tl.constexpr,
                        BLOCK_I: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr):
    """z·Wᵀ for a [BLOCK_B × BLOCK_I] tile, K in chunks of KC (keeps FMA-path registers bounded)."""
    logits = tl.zeros([BLOCK_B, BLOCK_I], dtype=ACC)
    for k0 in range(0, K, KC):
        offs_c = k0 + tl.arange(0, KC)
        c_mask = offs_c < K
        zc = tl.load(z_rows + offs_c[None, :], mask=b_mask[:, None] & c_mask[None, :], other=0.0)
        wc = tl.load(w_rows + offs_c[None, :], mask=i_mask[:, None] & c_mask[None, :], other=0.0)
        logits += mm(zc, tl.trans(wc), DOT_PREC).to(ACC)
    return logits
