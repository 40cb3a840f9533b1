"""RowSparseAdam with a row-sparse fc1 gradient against torch.optim.Adam with the dense one."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import model_pair, random_ratings

from recvae_fast.optim import RowSparseAdam
from recvae_fast.training import TrainConfig, make_optimizers, train_step


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sparse_fc1_training_equals_dense(monkeypatch, backend):
    """Three encoder steps on different batches (so rows go untouched for a while, and must still
    move as Adam moves them) give the same weights with either gradient layout."""
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("RECVAE_FAST_BACKEND", backend)
    n_items = 61
    batches = [random_ratings(7, n_items, seed=40 + k, max_items=6) for k in range(3)]
    dense_model, _ = model_pair(11, 4, n_items)
    sparse_model, _ = model_pair(11, 4, n_items)
    cfg = TrainConfig(hidden_dim=11, latent_dim=4, dropout=0.0)
    dense_opts = make_optimizers(dense_model, cfg.lr)
    sparse_opts = make_optimizers(sparse_model, cfg.lr, sparse_fc1_grad=True)
    assert isinstance(sparse_opts[0], RowSparseAdam)
    for ratings in batches:
        torch.manual_seed(1)
        train_step(dense_model, dense_model.as_batch(ratings), [dense_opts[0]], cfg, "encoder")
        torch.manual_seed(1)
        train_step(sparse_model, sparse_model.as_batch(ratings), [sparse_opts[0]], cfg, "encoder")
        assert sparse_model.encoder.fc1.weight_t.grad.is_sparse
    touched = set(np.concatenate([b.indices for b in batches]).tolist())
    assert len(touched) < n_items  # some rows never had a gradient, yet moved after the first step
    for key, value in dense_model.state_dict().items():
        torch.testing.assert_close(sparse_model.state_dict()[key], value, rtol=1e-10, atol=1e-12, msg=key)


def test_row_sparse_adam_matches_torch_adam_on_dense_and_sparse_grads():
    torch.manual_seed(0)
    p_ref = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    p_dense = p_ref.detach().clone().requires_grad_()
    p_sparse = p_ref.detach().clone().requires_grad_()
    ref = torch.optim.Adam([p_ref], lr=0.01)
    dense, sparse = RowSparseAdam([p_dense], lr=0.01), RowSparseAdam([p_sparse], lr=0.01)
    for step in range(4):
        rows = torch.tensor([step % 9, (3 * step + 1) % 9])
        values = torch.randn(2, 5, dtype=torch.float64)
        grad = torch.zeros(9, 5, dtype=torch.float64).index_add_(0, rows, values)
        p_ref.grad, p_dense.grad = grad.clone(), grad.clone()
        p_sparse.grad = torch.sparse_coo_tensor(rows[None], values, (9, 5))
        ref.step(), dense.step(), sparse.step()
        torch.testing.assert_close(p_dense, p_ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(p_sparse, p_ref, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="lr"):
        RowSparseAdam([p_ref], lr=0)
