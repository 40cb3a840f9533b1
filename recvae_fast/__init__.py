"""recvae_fast: a fast, faithful RecVAE (Shenbin et al., WSDM 2020) for catalogues of millions of items."""
from .inference import evaluate, recommend
from .model import RecVAE
from .sparse import CSRBatch, as_csr_batch
from .topk import TopKAccumulator, topk_masked, topk_masked_torch
from .training import fit, load_model

__all__ = [
    "RecVAE", "fit", "evaluate", "recommend", "load_model",
    "topk_masked", "topk_masked_torch", "TopKAccumulator", "CSRBatch", "as_csr_batch",
]
__version__ = "0.1.0"
