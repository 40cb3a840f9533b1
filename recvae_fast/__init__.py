"""recvae_fast: a fast, faithful RecVAE (Shenbin et al., WSDM 2020) for catalogues of millions of items.

The C++ extensions load on first use (top-k, the row-sparse Adam step), the Triton kernels when
an op runs with impl "triton"; importing the package loads neither. The names below are imported
on first access (PEP 562), so that `recvae-fast` can take Ctrl-C before torch is imported
(recvae_fast.entry).
"""
from importlib import import_module

# public name -> the module that defines it
_EXPORTS = {
    "RecVAE": "model", "fit": "api", "load_model": "training", "evaluate": "api", "recommend": "api",
    "topk_masked": "ops.topk_masked", "TopK": "ops.topk_masked", "TopKAccumulator": "ops.topk_masked",
    "RowSparseAdam": "optim", "load_run": "runs", "TrainedRun": "runs", "recommend_for_items": "runs",
    "tune": "tuning",
}
__all__ = list(_EXPORTS)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # a third of a second: only when asked

    try:
        return version("recvae_fast")  # the one version number is setup.py's
    except PackageNotFoundError:  # a source tree that was never installed (the C++ extensions need an install)
        return "unknown"


def __getattr__(name: str):
    if name == "__version__":
        value = _version()
    elif name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | {"__version__"})
