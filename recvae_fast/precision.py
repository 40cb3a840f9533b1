"""Training and scoring precision: "32-true" (float32 throughout) or "bf16-mixed" (PyTorch
Lightning's names).

bf16-mixed is `torch.autocast(device_type, dtype=torch.bfloat16)` around the model: the products
(the decoder's logits in item blocks, dz and dWd, the encoder's MLP) take bf16 operands with float32
accumulation, while the log-sum-exp, softmax, KL terms, LayerNorm statistics, losses, parameter
gradients and the Adam state stay float32, and the parameters stay float32 master weights. The
fused ops declare that behaviour to torch (`register_autocast_kernel`), so the same holds under
torch.compile and torch.export.

bf16 products are fast only where the hardware multiplies bf16 (CPU: AMX or AVX512-BF16; CUDA:
tensor cores). Elsewhere torch emulates them, and bf16-mixed is slower than float32: on a 2-core
AMD EPYC (Zen 3, AVX2 only) benches/bench_mixed_precision.py measured, on one thread, the 20k-item
encoder step at 17× the float32 step's time, the decoder step at 5.5× and scoring at 8.8×
(benches/RESULTS.md). `warn_if_slow` says so once per process.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

PRECISIONS = ("32-true", "bf16-mixed")
DEFAULT_PRECISION = "32-true"
_AUTOCAST_DTYPES = {"32-true": None, "bf16-mixed": torch.bfloat16}


class SlowPrecisionWarning(UserWarning):
    """bf16-mixed asked for on hardware that emulates bf16 products (slower than float32)."""


def check_precision(precision) -> str:
    """`precision` if it names a precision, else a ValueError listing the choices."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype of the products under `precision` (None: float32, no autocast)."""
    return _AUTOCAST_DTYPES[check_precision(precision)]


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """The autocast region of `precision` on `device` (a no-op context for 32-true)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16_products() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16), by torch's own
    check (torch.cpu) or the kernel's flags (amx_bf16, avx512_bf16)."""
    checks = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    if any(check is not None and check() for check in checks):
        return True
    return bool(_cpuinfo_flags() & {"amx_bf16", "avx512_bf16"})


def cpu_flags_text() -> str:
    """torch's CPU capability and the bf16-related flags of this CPU, for benchmark records."""
    flags = sorted(f for f in _cpuinfo_flags() if f.startswith(("avx", "amx", "fma")))
    return f"torch capability {torch.backends.cpu.get_cpu_capability()}; flags {' '.join(flags) or 'unknown'}"


_warned = False


def warn_if_slow(precision: str, device) -> None:
    """A SlowPrecisionWarning (once per process) when bf16 is asked for on a CPU without bf16
    products: it runs, correctly, but slower than 32-true."""
    global _warned
    if autocast_dtype(precision) is None or torch.device(device).type != "cpu" or _warned:
        return
    if not cpu_has_bf16_products():
        _warned = True
        warnings.warn(
            f"precision {precision!r} on a CPU without bf16 matrix units (no AMX, no AVX512-BF16; "
            f"{cpu_flags_text()}): torch emulates the bf16 products, so training and scoring run slower than "
            "'32-true' (5-17x the time at 20k items on an AVX2 CPU, benches/RESULTS.md), not faster",
            SlowPrecisionWarning, stacklevel=3)


# ----------------------------------------------------------------------------- products


def lowp_mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b with operands in `dtype` (bf16) and a float32 (a's dtype) result, in `out` if given.
    CUDA: one product with float32 output (torch.mm's out_dtype); CPU: torch's bf16 product
    (oneDNN: AMX / AVX512-BF16 where present), rounded to bf16, then widened — the same numbers
    autocast's matmuls give."""
    result_dtype = a.dtype if out is None else out.dtype
    a_low, b_low = a.to(dtype), b.to(dtype)
    if a.device.type == "cuda":
        product = torch.mm(a_low, b_low, out_dtype=result_dtype)
    else:
        product = torch.mm(a_low, b_low)
    if out is None:
        return product.to(result_dtype)
    return out.copy_(product)


# ----------------------------------------------------------------------------- autocast registration


def _is_low(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16)


def widen_low(args) -> tuple:
    """args with every float16/bfloat16 tensor as float32 (float32/float64 and the rest unchanged):
    what an op that keeps its arithmetic in float32 under autocast takes."""
    return tuple(t.float() if _is_low(t) else t for t in args)


def register_autocast_kernel(qualname: str, kernel, device_types=("cpu", "cuda")) -> None:
    """Declare what op `qualname` does under autocast: kernel(device_type, *args) runs in its
    place, with autocast off for `device_types` (it usually calls the op again). As
    torch.library.register_autocast does, both for the C++ dispatcher and for the Python one
    (the one torch.compile and torch.export trace with)."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    lib = torch.library.Library(namespace, "FRAGMENT")
    _LIBRARIES.append(lib)  # a registration lasts as long as its Library object
    for device_type in device_types:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def run(*args, _key=key, _device_type=device_type, **kwargs):
            if kwargs:  # the registered ops are called with positional arguments only
                raise TypeError(f"{qualname}: keyword arguments are not supported under autocast")
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return kernel(_device_type, *args)

        if op.has_kernel_for_dispatch_key(key):
            op.py_kernels.pop(key, None)
        op.py_impl(key)(run)
        lib.impl(name, lambda _keyset, *args, _run=run: _run(*args), key_name, with_keyset=True)


_LIBRARIES: list = []


def register_float32_autocast(qualname: str, device_types=("cpu", "cuda")) -> None:
    """Declare that op `qualname` computes in float32 under autocast (bf16/fp16 inputs widened)."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default

    def kernel(device_type, *args):
        return op(*widen_low(args))

    register_autocast_kernel(qualname, kernel, device_types)


def autocast_product_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype of `device_type` when it is a lower precision (bf16/fp16), else None."""
    dtype = torch.get_autocast_dtype(device_type)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None
