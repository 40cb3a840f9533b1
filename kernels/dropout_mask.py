"""The dropout keep-mask of the sparse encoder input layer: one Philox draw per nonzero,
`tl.rand(seed, k)` with k the nonzero's global index, so the mask depends only on (seed, nnz, p).
The forward kernel (sparse_input_forward) draws it with the same `keep` helper; the kernel here
returns it, for callers that apply the mask themselves.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INT32_MAX, check_runs_here, on_device


@triton.jit
def keep(seed, offs, p):
    """Dropout keep-mask of the nonzeros at global positions `offs` (int32): P(keep) = 1 − p."""
    return tl.rand(seed, offs) >= p


@triton.jit(do_not_specialize=["seed"])
def _keep_mask_kernel(OUT, n, seed, p, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(OUT + offs, keep(seed, offs, p).to(tl.int8), mask=m)


def check_dropout_rate(p: float) -> float:
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {p}")
    return p


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return seed


def dropout_keep_mask(seed: int, nnz: int, p: float, device) -> torch.Tensor:
    """The keep-mask (bool [nnz]) that `sparse_input_layer(..., dropout_rate=p, seed=seed)` applies to
    a batch with `nnz` nonzeros: the same Philox draw as the forward kernel (`keep`)."""
    seed, p, nnz = check_seed(seed), check_dropout_rate(p), int(nnz)
    if not 0 <= nnz <= INT32_MAX:
        raise ValueError(f"nnz must be in [0, 2**31), got {nnz}")
    device = torch.device(device)
    out = torch.empty(nnz, dtype=torch.uint8, device=device)
    if p == 0.0:
        return out.fill_(1).view(torch.bool)
    check_runs_here(device, "dropout_keep_mask", "sparse_input_layer's keep_mask argument with a torch mask")
    if nnz:
        block = 1024
        with on_device(out):
            _keep_mask_kernel[(triton.cdiv(nnz, block),)](out, nnz, seed, p, BLOCK=block)
    return out.view(torch.bool)
