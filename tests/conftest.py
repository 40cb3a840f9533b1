import os
import sys

import pytest
import torch

# Kernel tests run Triton on the CPU through its interpreter; it must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _recycle_every_size(monkeypatch):
    """Every test runs the ops with their big outputs in recycled memory (recvae_fast.workspace),
    as large catalogues do, although its tensors are small: aliasing bugs show up everywhere."""
    from recvae_fast import workspace

    monkeypatch.setattr(workspace, "MIN_RECYCLED_BYTES", 0)
    yield
    workspace.release()
