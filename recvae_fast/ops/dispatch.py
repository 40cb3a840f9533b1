"""Which implementation of each op runs, decided by one rule; imports no op.

    op                    torch (plain torch)   triton (kernels/)   cpp (csrc/ extensions)
    sparse_input_layer    yes                   yes                 yes
    multinomial_nll       yes                   yes                 yes
    topk_masked           yes                   -                   yes
    row_sparse_adam       yes                   yes                 yes
    swish_layer_norm      yes                   -                   yes
    composite_prior_kl    yes                   -                   yes

Every op's entry point takes `impl=None | "torch" | "triton" | "cpp"`, the one switch: "torch" runs
torch ops only, "cpp" the C++ code where it has any, "triton" the Triton kernels. None means the
default for the tensors' device: on CUDA "triton" where the op has it, else "torch"; on the CPU
"cpp" where the C++ code takes the dtype (float32/float64; top-k: bfloat16 and float16 too; under
autocast the dtype an op computes in, float32 for low-precision inputs), else "torch"; on any other
device "torch". The environment variable RECVAE_FAST_IMPL changes only that default: set to an
implementation name, it is used by every op that has one of that name (the others keep their
device default); unset, empty or "auto" leaves the device default. An explicit `impl=` always
wins. An implementation that cannot run on the given tensors is an error, never a silent
fallback: "triton" on CPU tensors needs TRITON_INTERPRET=1 (set before triton is imported), "cpp"
needs CPU tensors of a dtype its C++ code takes.

A RecVAE's `impl` follows the environment variable's rule: each of its ops runs that
implementation if it has one of that name, else its default (`impl_for`).
"""
from __future__ import annotations

import importlib
import os

import torch

IMPLS = ("torch", "triton", "cpp")
ENV_VAR = "RECVAE_FAST_IMPL"

OP_IMPLS = {
    "sparse_input_layer": ("torch", "triton", "cpp"),
    "multinomial_nll": ("torch", "triton", "cpp"),
    "topk_masked": ("torch", "cpp"),
    "row_sparse_adam": ("torch", "triton", "cpp"),
    "swish_layer_norm": ("torch", "cpp"),
    "composite_prior_kl": ("torch", "cpp"),
}

FLOAT32_64 = (torch.float32, torch.float64)
# Dtypes the C++ code of each op takes; other dtypes default to "torch" on the CPU.
CPP_DTYPES = {
    "sparse_input_layer": FLOAT32_64,
    "multinomial_nll": FLOAT32_64,
    "topk_masked": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "row_sparse_adam": FLOAT32_64,
    "swish_layer_norm": FLOAT32_64,
    "composite_prior_kl": FLOAT32_64,
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


def check_model_impl(impl: str | None) -> str | None:
    """`impl` if it names an implementation (or is None), else a ValueError: a model's choice."""
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"no implementation {impl!r} (unknown implementation); choose one of {', '.join(IMPLS)} "
                         "or None")
    return impl


def impl_for(op: str, impl: str | None) -> str | None:
    """A model's `impl` for its op `op`: `impl` if the op has one of that name, else None (its
    default); a ValueError for a name that is no implementation."""
    return impl if check_model_impl(impl) in OP_IMPLS[op] else None


def _env_impl() -> str | None:
    """The implementation named by RECVAE_FAST_IMPL, or None (unset, empty or "auto")."""
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if name in ("", "auto"):
        return None
    if name not in IMPLS:
        raise ValueError(f"{ENV_VAR} must be one of auto, {', '.join(IMPLS)}; got {name!r}")
    return name


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype an op that widens low-precision inputs under autocast computes in for `t`."""
    low = t.dtype in (torch.float16, torch.bfloat16)
    if low and t.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(t.device.type):
        return torch.float32
    return t.dtype


def _default_impl(op: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The implementation `op` uses on `device` when none is asked for (see the module docstring)."""
    preferred = _env_impl()
    if preferred in OP_IMPLS[op]:
        return preferred
    if device.type == "cuda":
        return "triton" if "triton" in OP_IMPLS[op] else "torch"
    if device.type == "cpu" and "cpp" in OP_IMPLS[op] and (dtype is None or dtype in CPP_DTYPES[op]):
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
    if impl == "cpp" and dtype is not None and dtype not in CPP_DTYPES[op]:
        names = [str(d).removeprefix("torch.") for d in CPP_DTYPES[op]]
        names = ", ".join(names[:-1]) + " or " + names[-1]
        raise TypeError(f"{op}: impl 'cpp' takes {names}, got {dtype}; use impl 'torch'")
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
