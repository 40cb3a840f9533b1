"""recommend(exclude=...): more items never returned, in one masked top-k, equal to brute force over
the dense scores and to the top-k of every item filtered row by row."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from helpers import model_pair, random_ratings

from recvae_fast import inference, recommend

N_USERS, N_ITEMS, K = 23, 211, 10


def _brute_force(dense_scores: np.ndarray, masks, k: int):
    scores = dense_scores.copy()
    for mask in masks:
        for u in range(scores.shape[0]):
            scores[u, mask.indices[mask.indptr[u] : mask.indptr[u + 1]]] = -np.inf
    order = np.lexsort((np.tile(np.arange(scores.shape[1]), (scores.shape[0], 1)), -scores), axis=1)
    return order[:, :k]


def _filtered_row_by_row(model, x, exclude, k: int, batch_size: int):
    """Every item ranked, then each row's excluded items dropped: what recommend(exclude=) replaces."""
    full = recommend(model, x, k=N_ITEMS, exclude_seen=True, batch_size=batch_size)
    scores, items = np.full((x.shape[0], k), -np.inf, np.float32), np.full((x.shape[0], k), -1, np.int64)
    for u in range(x.shape[0]):
        own = set(exclude.indices[exclude.indptr[u] : exclude.indptr[u + 1]].tolist())
        keep = [j for j in range(N_ITEMS) if full.items[u, j] >= 0 and full.items[u, j] not in own][:k]
        scores[u, : len(keep)], items[u, : len(keep)] = full.scores[u, keep], full.items[u, keep]
    return scores, items


@pytest.fixture(scope="module")
def case():
    x = random_ratings(N_USERS, N_ITEMS, seed=31).astype(np.float32)
    rng = np.random.default_rng(5)
    extra = sp.random(N_USERS, N_ITEMS, density=0.08, random_state=rng, format="csr", dtype=np.float32)
    extra.data[::3] = 0.0  # stored zeros are excluded too
    extra.data[1::3] *= -2.0  # and any value
    fast, ref = model_pair(12, 5, N_ITEMS, torch.float32)
    ref.eval()
    dense = ref(torch.tensor(x.toarray()), calculate_loss=False).detach().numpy()
    return x, extra, fast, dense


@pytest.mark.parametrize("chunked", [False, True])
def test_exclude_matches_brute_force_and_the_row_by_row_filter(case, chunked, monkeypatch):
    x, extra, fast, dense = case
    if chunked:
        monkeypatch.setattr(inference, "SCORES_PER_BLOCK", 7 * 50)
    scores, ids = recommend(fast, x, k=K, exclude=extra, batch_size=7)
    expected = _brute_force(dense, [x, extra], K)
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(dense, expected, 1), rtol=1e-5, atol=1e-5)
    for u in range(N_USERS):
        assert not set(ids[u]) & set(extra.indices[extra.indptr[u] : extra.indptr[u + 1]])
    seen = (x + abs(extra)).tocsr()  # as the command line's: every item of the user, x's among them
    filtered_scores, filtered_ids = _filtered_row_by_row(fast, x, sp.csr_matrix(
        (np.ones(seen.nnz), seen.indices, seen.indptr), shape=seen.shape), K, 7)
    scores, ids = recommend(fast, x, k=K, exclude=seen, batch_size=7)
    np.testing.assert_array_equal(ids, filtered_ids)
    np.testing.assert_array_equal(scores, filtered_scores)


def test_exclude_without_exclude_seen_masks_only_its_own_items(case):
    x, extra, fast, dense = case
    scores, ids = recommend(fast, x, k=K, exclude_seen=False, exclude=extra, batch_size=5)
    np.testing.assert_array_equal(ids, _brute_force(dense, [extra], K))


def test_a_user_with_fewer_eligible_items_than_k_is_padded(case):
    x, _, fast, _ = case
    everything_but_three = sp.csr_matrix(np.ones((N_USERS, N_ITEMS), np.float32))
    everything_but_three[0, [4, 50, 200]] = 0
    everything_but_three.eliminate_zeros()
    scores, ids = recommend(fast, x, k=K, exclude_seen=False, exclude=everything_but_three, batch_size=8)
    assert sorted(ids[0, :3].tolist()) == [4, 50, 200]
    assert (ids[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()
    assert (ids[1:] == -1).all()


def test_exclude_of_another_shape_is_refused(case):
    x, extra, fast, _ = case
    with pytest.raises(ValueError, match="exclude must be a scipy.sparse matrix of the interactions' shape"):
        recommend(fast, x, k=K, exclude=extra[:5])
    with pytest.raises(ValueError, match="exclude must be a scipy.sparse matrix"):
        recommend(fast, x, k=K, exclude=extra.toarray())
