"""The op contract: which implementation of each fast op runs, decided by one rule.

Four ops have more than one implementation, all computing the same result:

    op                    torch (plain torch ops)   triton (kernels/)   cpp (csrc/ extensions)
    sparse_input_layer    yes                       yes                 -
    multinomial_nll       yes                       yes                 -
    topk_masked           yes                       -                   yes
    row_sparse_adam       yes                       yes                 yes

Every op takes `impl=None | "torch" | "triton" | "cpp"`. None means the default for the tensors'
device: on CUDA "triton" (top-k: "torch", it has no Triton kernel); on the CPU "torch" for the two
model ops and "cpp" for top-k and the Adam step (the Adam step's C++ code takes float32/float64;
other CPU dtypes default to "torch"); on any other device "torch". The environment variable
RECVAE_FAST_IMPL changes only that default: set to an implementation name, it is used by every op
that has one of that name (the others keep their device default); unset, empty or "auto" leaves
the device default. An explicit `impl=` always wins. An implementation that cannot run on the given tensors is an error, never a
silent fallback: "triton" on CPU tensors needs TRITON_INTERPRET=1 (set before triton is imported),
"cpp" needs CPU tensors.

The two model ops' entry points live here; `recvae_fast.topk.topk_masked` and
`recvae_fast.optim.adam_step_row_sparse_` are the other two, resolved by the same `resolve_impl`.
Every implementation runs as an op registered with PyTorch under `recvae_fast::` (profiler
names, torch.library.opcheck, torch.compile): the "torch" and "cpp" ones with
torch.library.custom_op in recvae_fast.custom_ops, the Triton ones with torch.library.triton_op
next to their kernels (`recvae_fast::triton_multinomial_nll`, `..._parts`, `..._backward`,
`triton_sparse_input_layer`, `..._backward`, `triton_row_sparse_adam_step`), so that
torch.compile sees into the kernels through wrap_triton.
"""
from __future__ import annotations

import importlib
import os

import torch

from .sparse import CSRBatch

IMPLS = ("torch", "triton", "cpp")
ENV_VAR = "RECVAE_FAST_IMPL"

OP_IMPLS = {
    "sparse_input_layer": ("torch", "triton"),
    "multinomial_nll": ("torch", "triton"),
    "topk_masked": ("torch", "cpp"),
    "row_sparse_adam": ("torch", "triton", "cpp"),
}

# Dtypes the C++ code of each op takes; other dtypes default to "torch" on the CPU.
_CPP_DTYPES = {
    "topk_masked": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "row_sparse_adam": (torch.float32, torch.float64),
}


def check_impl(op: str, impl: str | None) -> str | None:
    """`impl` if it names an implementation of `op` (or is None), else a ValueError."""
    if impl is None:
        return None
    choices = OP_IMPLS[op]
    if impl not in choices:
        known = "" if impl in IMPLS else " (unknown implementation)"
        raise ValueError(f"{op} has no implementation {impl!r}{known}; choose one of {', '.join(choices)} or None")
    return impl


def _env_impl() -> str | None:
    """The implementation named by RECVAE_FAST_IMPL, or None (unset, empty or "auto")."""
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if name in ("", "auto"):
        return None
    if name not in IMPLS:
        raise ValueError(f"{ENV_VAR} must be one of auto, {', '.join(IMPLS)}; got {name!r}")
    return name


def _default_impl(op: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The implementation `op` uses on `device` when none is asked for (see the module docstring)."""
    preferred = _env_impl()
    if preferred in OP_IMPLS[op]:
        return preferred
    if device.type == "cuda":
        return "triton" if "triton" in OP_IMPLS[op] else "torch"
    if device.type == "cpu" and op in _CPP_DTYPES and (dtype is None or dtype in _CPP_DTYPES[op]):
        return "cpp"
    return "torch"  # also any other device (mps, meta, ...)


def resolve_impl(op: str, impl: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The implementation of `op` to run on tensors of `device` (and `dtype`): `impl` if given,
    else the default; an error if it cannot run there."""
    impl = check_impl(op, impl) or _default_impl(op, device, dtype)
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"{op}: impl 'triton' on {device} tensors needs TRITON_INTERPRET=1 (set before triton is "
            f"imported); use CUDA tensors or impl 'torch'"
        )
    if impl == "cpp" and device.type != "cpu":
        raise ValueError(f"{op}: impl 'cpp' runs on CPU tensors, got tensors on {device}; use impl 'torch'")
    return impl


def import_kernel(module: str, name: str):
    """`name` from recvae_fast.kernels.<module>, with a clear error when Triton is missing."""
    try:
        return getattr(importlib.import_module(f"recvae_fast.kernels.{module}"), name)
    except ImportError as exc:
        raise RuntimeError(
            f"impl 'triton' needs the Triton kernels, which cannot be imported ({exc}); install triton "
            "(pip install 'recvae_fast[triton]') or use impl 'torch'"
        ) from exc


def sparse_input_layer(
    batch: CSRBatch,
    weight_t: torch.Tensor,
    bias: torch.Tensor,
    dropout_rate: float = 0.0,
    keep_mask: torch.Tensor | None = None,
    *,
    sparse_grad: bool = False,
    impl: str | None = None,
) -> torch.Tensor:
    """fc1 over the nonzeros of `batch`: h1_pre [B, H] = bias + Σ_{i∈nz(u)} c_ui·weight_t[i], with
    c_ui = x_ui·m_ui / ((1 − dropout_rate)·‖x_u‖); weight_t is W1 stored I × H. sparse_grad=True makes
    weight_t's gradient a sparse COO tensor of the rows the batch uses (the torch implementation
    skips the nonzeros dropout drops, so their rows may be absent: RowSparseAdam steps an absent row
    as a zero one)."""
    if resolve_impl("sparse_input_layer", impl, weight_t.device) == "triton":
        op = import_kernel("sparse_input_layer", "sparse_input_layer")
    else:
        from .torch_ops import sparse_input_layer as op
    # The kernels' 4th argument is the dropout rate, whatever its name: passed by position.
    return op(batch, weight_t, bias, dropout_rate, keep_mask, sparse_grad=sparse_grad)


def multinomial_nll(
    z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, batch: CSRBatch, *, impl: str | None = None
) -> torch.Tensor:
    """−mll per user [B]: n_u·logsumexp(z_u·Wᵀ + b) − Σ_{i∈nz(u)} x_ui·(z_u·W[i] + b[i]), never
    building B × I; differentiable in z, weight and bias."""
    if resolve_impl("multinomial_nll", impl, z.device) == "triton":
        op = import_kernel("multinomial_nll", "multinomial_nll")
    else:
        from .torch_ops import multinomial_nll as op
    return op(z, weight, bias, batch)
