"""recvae_fast: a fast, faithful RecVAE (Shenbin et al., WSDM 2020) for catalogues of millions of items."""
from .model import RecVAE
from .sparse import CSRBatch, as_csr_batch

__all__ = ["RecVAE", "CSRBatch", "as_csr_batch"]
__version__ = "0.1.0"
