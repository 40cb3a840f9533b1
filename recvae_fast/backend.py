"""Which implementation of the fused ops runs: `RECVAE_FAST_BACKEND` = auto | torch | triton.

auto (the default) uses the Triton kernels on CUDA tensors and the torch ops otherwise; triton
forces the kernels, also on CPU tensors when TRITON_INTERPRET=1 is set (tests); torch forces
the plain torch ops everywhere. The variable is read at each call, so it can change at run time.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from . import torch_ops

BACKENDS = ("auto", "torch", "triton")


def _triton_ops() -> SimpleNamespace:
    try:
        from .kernels.multinomial_nll import multinomial_nll
        from .kernels.sparse_input_layer import sparse_input_layer
    except ImportError as exc:  # triton missing, or a kernel module missing from the install
        raise RuntimeError(
            f"RECVAE_FAST_BACKEND asks for the Triton kernels, but they cannot be imported ({exc}); "
            "install triton (pip install 'recvae_fast[triton]') or use RECVAE_FAST_BACKEND=torch"
        ) from exc
    return SimpleNamespace(name="triton", sparse_input_layer=sparse_input_layer, multinomial_nll=multinomial_nll)


_TORCH_OPS = SimpleNamespace(
    name="torch", sparse_input_layer=torch_ops.sparse_input_layer, multinomial_nll=torch_ops.multinomial_nll
)


def requested_backend() -> str:
    name = os.environ.get("RECVAE_FAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"RECVAE_FAST_BACKEND must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def ops_for(device: torch.device) -> SimpleNamespace:
    """The op set (sparse_input_layer, multinomial_nll) to use for tensors on `device`."""
    name = requested_backend()
    if name == "torch":
        return _TORCH_OPS
    if name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"RECVAE_FAST_BACKEND=triton on {device} tensors needs TRITON_INTERPRET=1 "
                "(set before triton is imported); use a CUDA device or RECVAE_FAST_BACKEND=torch"
            )
        return _triton_ops()
    return _triton_ops() if device.type == "cuda" else _TORCH_OPS
