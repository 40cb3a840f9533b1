"""recvae_fast: a fast, faithful RecVAE (Shenbin et al., WSDM 2020) for catalogues of millions of items.

The C++ extensions load on first use (top-k, the row-sparse Adam step), the Triton kernels when
an op runs with impl "triton"; importing the package loads neither.
"""
from importlib.metadata import PackageNotFoundError, version

from .inference import evaluate, recommend
from .model import RecVAE
from .optim import RowSparseAdam
from .runs import TrainedRun, load_run, recommend_for_items
from .topk import TopK, TopKAccumulator, topk_masked
from .training import fit, load_model
from .tune import tune  # the function; the module stays importable as `from recvae_fast.tune import ...`

__all__ = [
    "RecVAE", "fit", "load_model", "evaluate", "recommend", "load_run", "TrainedRun", "recommend_for_items",
    "tune",
    "topk_masked", "TopK", "TopKAccumulator", "RowSparseAdam",
]

try:
    __version__ = version("recvae_fast")  # the one version number is setup.py's
except PackageNotFoundError:  # a source tree that was never installed (the C++ extensions need an install)
    __version__ = "unknown"
