"""recommend and evaluate against brute force over the dense scores of the reference model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import model_pair, random_ratings

from recvae_fast import evaluate, inference, recommend
from recvae_fast.metrics import ndcg_at_k, recall_at_k


def brute_force_topk(scores: np.ndarray, seen, k: int):
    scores = scores.copy()
    if seen is not None:
        for u in range(scores.shape[0]):
            scores[u, seen.indices[seen.indptr[u] : seen.indptr[u + 1]]] = -np.inf
    order = np.lexsort((np.tile(np.arange(scores.shape[1]), (scores.shape[0], 1)), -scores), axis=1)
    return order[:, :k]


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_recommend_matches_brute_force_chunked_or_not(exclude_seen, monkeypatch):
    n_items = 211
    x = random_ratings(23, n_items, seed=30).astype(np.float32)
    fast, ref = model_pair(12, 5, n_items, torch.float32)
    ref.eval()
    dense_scores = ref(torch.tensor(x.toarray()), calculate_loss=False).detach().numpy()
    expected = brute_force_topk(dense_scores, x if exclude_seen else None, 10)
    scores, ids = recommend(fast, x, k=10, exclude_seen=exclude_seen, batch_size=7)
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(dense_scores, expected, 1), rtol=1e-5, atol=1e-5)
    if exclude_seen:
        for u in range(x.shape[0]):
            assert not set(ids[u]) & set(x.indices[x.indptr[u] : x.indptr[u + 1]])
    monkeypatch.setattr(inference, "SCORES_PER_BLOCK", 7 * 50)  # item chunks of 50: 5 chunks
    scores_chunked, ids_chunked = recommend(fast, x, k=10, exclude_seen=exclude_seen, batch_size=7)
    np.testing.assert_array_equal(ids_chunked, ids)
    # A product over an item chunk may round differently from the full product (BLAS blocking).
    np.testing.assert_allclose(scores_chunked, scores, rtol=1e-6, atol=1e-6)
    assert fast.training  # the model's mode is restored


def test_evaluate_matches_metrics_on_brute_force_ranking():
    n_items = 150
    fold_in = random_ratings(30, n_items, seed=31).astype(np.float32)
    heldout = random_ratings(30, n_items, seed=32, binary=True).astype(np.float32)
    heldout = heldout - heldout.multiply(fold_in > 0)  # held-out items are not fold-in items
    heldout.eliminate_zeros()
    fast, ref = model_pair(12, 5, n_items, torch.float32)
    ref.eval()
    ranked = brute_force_topk(ref(torch.tensor(fold_in.toarray()), calculate_loss=False).detach().numpy(), fold_in, 100)
    got = evaluate(fast, fold_in, heldout)
    assert got["ndcg@100"] == pytest.approx(np.nanmean(ndcg_at_k(ranked, heldout, 100)))
    assert got["recall@20"] == pytest.approx(np.nanmean(recall_at_k(ranked, heldout, 20)))
    assert got["recall@50"] == pytest.approx(np.nanmean(recall_at_k(ranked, heldout, 50)))
    assert got["n_users"] == int((np.diff(heldout.indptr) > 0).sum()) < 30  # row 0 has no held-out items


def test_bad_arguments():
    fast, _ = model_pair(8, 3, 40, torch.float32)
    x = random_ratings(5, 40, seed=33).astype(np.float32)
    with pytest.raises(ValueError, match="larger than the catalogue"):
        recommend(fast, x, k=41)
    for k in (0, -3):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            recommend(fast, x, k=k)
    with pytest.raises(TypeError, match="k must be a positive integer"):
        recommend(fast, x, k=2.5)
    for batch_size in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            recommend(fast, x, k=5, batch_size=batch_size)
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            evaluate(fast, x, x, batch_size=batch_size)
    with pytest.raises(ValueError, match="negative"):
        recommend(fast, -x, k=5)
    with pytest.raises(ValueError, match="columns"):
        recommend(fast, x[:, :39], k=5)
    with pytest.raises(ValueError, match="users"):
        evaluate(fast, x, x[:4])
    with pytest.raises(TypeError, match="scipy"):
        evaluate(fast, x.toarray(), x)
