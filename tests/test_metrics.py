"""Ranking metrics against hand-computed examples and a per-user reference loop, and the
popularity baseline."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from recvae_fast.metrics import (
    hits_matrix,
    mean_over_users,
    ndcg_at_k,
    popularity_baseline,
    popularity_ranking,
    ranking_metrics,
    recall_at_k,
)


def csr(rows: list[list[int]], n_items: int, values=None) -> sp.csr_matrix:
    r = [u for u, items in enumerate(rows) for _ in items]
    c = [i for items in rows for i in items]
    v = np.ones(len(c)) if values is None else values
    return sp.csr_matrix((v, (r, c)), shape=(len(rows), n_items))


# Four users, five items.
RANKED = np.array([
    [3, 0, 1, 2],     # user 0: held-out {1, 3}: hits at ranks 1 and 3
    [0, 1, 4, 2],     # user 1: held-out {2}: hit at rank 4
    [0, 1, 2, 3],     # user 2: nothing held out -> skipped (NaN)
    [4, -1, -1, -1],  # user 3: held-out {0, 4}: hit at rank 1, then padding
])
HELDOUT = csr([[1, 3], [2], [], [0, 4]], 5)
L2, L3, L5 = math.log2(2), math.log2(3), math.log2(5)  # discounts of ranks 1, 2, 4 are 1/log2(rank+1)


def test_ndcg_by_hand():
    # user 0: DCG = 1/log2(2) + 1/log2(4) = 1.5; IDCG (2 items) = 1/log2(2) + 1/log2(3) = 1.6309...
    # user 1: DCG = 1/log2(5) = 0.4307; IDCG (1 item) = 1
    # user 3: DCG = 1; IDCG (2 items) = 1.6309...
    expected = [1.5 / (1 + 1 / L3), 1 / L5, np.nan, 1 / (1 + 1 / L3)]
    np.testing.assert_allclose(ndcg_at_k(RANKED, HELDOUT, 4), expected, rtol=1e-12)
    # top 2 only: user 0 keeps the hit at rank 1 (1 / 1.6309), user 1 has none
    np.testing.assert_allclose(ndcg_at_k(RANKED, HELDOUT, 2), [1 / (1 + 1 / L3), 0, np.nan, 1 / (1 + 1 / L3)])


def test_recall_by_hand():
    # user 0: 2 hits / min(4, 2); user 1: 1 / 1; user 3: 1 / 2
    np.testing.assert_allclose(recall_at_k(RANKED, HELDOUT, 4), [1.0, 1.0, np.nan, 0.5])
    # top 3: user 0 has items 3, 0, 1 -> 2 hits / 2; user 1 has 0, 1, 4 -> 0 hits
    np.testing.assert_allclose(recall_at_k(RANKED, HELDOUT, 3), [1.0, 0.0, np.nan, 0.5])
    # top 1: user 0 -> 1 hit / min(1, 2) = 1
    np.testing.assert_allclose(recall_at_k(RANKED, HELDOUT, 1), [1.0, 0.0, np.nan, 1.0])


def test_users_without_heldout_are_skipped_in_means():
    per_user = ndcg_at_k(RANKED, HELDOUT, 4)
    assert np.isnan(per_user[2])
    assert mean_over_users(per_user) == pytest.approx(np.mean(per_user[[0, 1, 3]]))
    assert math.isnan(mean_over_users([np.nan, np.nan]))
    assert math.isnan(mean_over_users([]))
    result = ranking_metrics(RANKED, HELDOUT, ndcg_ks=(4,), recall_ks=(1, 3))
    assert result["n_users"] == 3
    assert set(result) == {"ndcg@4", "recall@1", "recall@3", "n_users"}
    assert result["recall@3"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)


def test_k_larger_than_ranking_and_than_heldout():
    # One held-out item at rank 1, k = 100 > 4 columns > 1 held-out: IDCG over min(1, 100) = 1.
    ranked = np.array([[2, 0, 1, 3]])
    heldout = csr([[2]], 4)
    assert ndcg_at_k(ranked, heldout, 100)[0] == pytest.approx(1.0)
    assert recall_at_k(ranked, heldout, 100)[0] == pytest.approx(1.0)
    # 3 held-out, found at ranks 2 and 4 with k = 100: DCG = 1/log2(3) + 1/log2(5),
    # IDCG = 1 + 1/log2(3) + 1/log2(4); recall = 2 / min(100, 3).
    heldout = csr([[0, 3, 4]], 5)
    ranked = np.array([[2, 0, 1, 3]])
    idcg = 1 + 1 / L3 + 1 / math.log2(4)
    assert ndcg_at_k(ranked, heldout, 100)[0] == pytest.approx((1 / L3 + 1 / L5) / idcg)
    assert recall_at_k(ranked, heldout, 100)[0] == pytest.approx(2 / 3)


def test_more_heldout_than_k():
    # 5 held-out items, top 2 both hits: recall = 2 / min(2, 5) = 1 and NDCG = 1.
    heldout = csr([[0, 1, 2, 3, 4]], 6)
    ranked = np.array([[4, 2, 5]])
    assert recall_at_k(ranked, heldout, 2)[0] == 1.0
    assert ndcg_at_k(ranked, heldout, 2)[0] == pytest.approx(1.0)
    # k = 3: hits at ranks 1, 2, miss at 3 -> recall 2/3, NDCG (1 + 1/log2 3) / (1 + 1/log2 3 + 1/2)
    assert recall_at_k(ranked, heldout, 3)[0] == pytest.approx(2 / 3)
    assert ndcg_at_k(ranked, heldout, 3)[0] == pytest.approx((1 + 1 / L3) / (1 + 1 / L3 + 0.5))


def test_padding_is_never_a_hit_even_for_item_zero():
    heldout = csr([[0]], 3)
    assert not hits_matrix(np.array([[-1, -1, 1]]), heldout).any()
    assert recall_at_k(np.array([[-1, -1, 1]]), heldout, 3)[0] == 0.0
    assert recall_at_k(np.array([[-1, 0, 1]]), heldout, 3)[0] == 1.0


def test_heldout_values_are_binary_relevance():
    # weight 5 counts as one relevant item; an explicit zero is not relevant
    heldout = sp.csr_matrix((np.array([5.0, 0.0]), np.array([1, 2]), np.array([0, 2])), shape=(1, 4))
    ranked = np.array([[2, 1, 0, 3]])
    # relevant = {1}: hit at rank 2 -> NDCG 1/log2(3), recall 1
    assert ndcg_at_k(ranked, heldout, 4)[0] == pytest.approx(1 / L3)
    assert recall_at_k(ranked, heldout, 4)[0] == 1.0
    # duplicate entries in a non-canonical CSR count once
    dup = sp.csr_matrix((np.ones(2), np.array([1, 1]), np.array([0, 2])), shape=(1, 4))
    assert recall_at_k(ranked, dup, 4)[0] == 1.0


def reference_metrics(ranked, heldout, k):
    """Per-user loop, straight from the definitions."""
    dense = heldout.toarray() > 0
    ndcg, recall = [], []
    for u in range(dense.shape[0]):
        rel = set(np.flatnonzero(dense[u]).tolist())
        if not rel:
            ndcg.append(np.nan)
            recall.append(np.nan)
            continue
        top = [i for i in ranked[u, :k].tolist()]
        hits = [1.0 if i in rel else 0.0 for i in top]
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(rel), k)))
        ndcg.append(dcg / idcg)
        recall.append(sum(hits) / min(k, len(rel)))
    return np.array(ndcg), np.array(recall)


@pytest.mark.parametrize("k", [1, 5, 20, 50])
def test_matches_a_reference_loop_on_random_rankings(k):
    rng = np.random.default_rng(k)
    n_users, n_items = 60, 40
    heldout = sp.random(n_users, n_items, density=0.1, format="csr", random_state=rng)
    ranked = np.argsort(rng.random((n_users, n_items)), axis=1)[:, :30]
    ranked[rng.random(ranked.shape) < 0.05] = -1  # sprinkle padding (never a hit)
    want_ndcg, want_recall = reference_metrics(ranked, heldout, k)
    np.testing.assert_allclose(ndcg_at_k(ranked, heldout, k), want_ndcg, rtol=1e-12)
    np.testing.assert_allclose(recall_at_k(ranked, heldout, k), want_recall, rtol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rows"):
        ndcg_at_k(RANKED[:2], HELDOUT, 4)
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(np.array([[5]]), csr([[1]], 5), 1)
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(RANKED, HELDOUT, 0)
    with pytest.raises(TypeError):
        recall_at_k(RANKED.astype(float), HELDOUT, 2)


def test_matrices_are_checked_by_the_one_validator():
    bad = HELDOUT.copy().astype(np.float64)
    bad.data[0] = -1.0
    with pytest.raises(ValueError, match="heldout contains negative values"):
        ndcg_at_k(RANKED, bad, 2)
    bad.data[0] = np.nan
    with pytest.raises(ValueError, match="heldout contains non-finite values"):
        recall_at_k(RANKED, bad, 2)
    with pytest.raises(TypeError, match="heldout must be a scipy.sparse matrix"):
        recall_at_k(RANKED, HELDOUT.toarray(), 2)
    train = csr([[0, 1], [1, 2]], 5)
    with pytest.raises(ValueError, match="fold_in has 4 item columns, train has 5 items"):
        popularity_baseline(train, csr([[0]], 4), csr([[1]], 5))
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            popularity_baseline(train, csr([[0]], 5), csr([[1]], 5), ks=(k,))


def test_vectorised_on_many_users():
    rng = np.random.default_rng(0)
    heldout = sp.random(10_000, 5_000, density=0.004, format="csr", random_state=rng)
    ranked = rng.integers(0, 5_000, size=(10_000, 100))
    out = ndcg_at_k(ranked, heldout, 100)
    assert out.shape == (10_000,) and np.nanmax(out) <= 1.0


# ----------------------------------------------------------------------------- popularity


def test_popularity_ranking_by_hand():
    popularity = np.array([5.0, 9.0, 9.0, 1.0, 0.0])  # order: 1, 2 (tie -> lower index first), 0, 3, 4
    exclude = csr([[], [2], [0, 1, 2, 3]], 5)
    got = popularity_ranking(popularity, exclude, 3)
    np.testing.assert_array_equal(got, [[1, 2, 0], [1, 0, 3], [4, -1, -1]])


def test_popularity_ranking_handles_heavy_users_in_small_blocks():
    rng = np.random.default_rng(1)
    popularity = rng.integers(0, 20, size=300).astype(float)
    exclude = sp.random(50, 300, density=0.3, format="csr", random_state=rng)
    got = popularity_ranking(popularity, exclude, 10, max_block=64)  # forces one row per block
    order = np.argsort(-popularity, kind="stable")
    for u in range(50):
        seen = set(exclude[u].indices.tolist())
        np.testing.assert_array_equal(got[u], [i for i in order if i not in seen][:10])


def test_popularity_baseline_matches_a_dense_reference():
    rng = np.random.default_rng(2)
    n_items = 80
    train = sp.random(200, n_items, density=0.1, format="csr", random_state=rng)
    fold_in = sp.random(30, n_items, density=0.1, format="csr", random_state=rng)
    heldout = sp.random(30, n_items, density=0.05, format="csr", random_state=rng)
    heldout = heldout - heldout.multiply(fold_in > 0)  # disjoint from fold-in
    result = popularity_baseline(train, fold_in, heldout)
    assert {"ndcg@100", "recall@20", "recall@50", "n_users"} <= set(result)

    pop = (train.toarray() > 0).sum(axis=0).astype(float)
    scores = np.tile(pop, (30, 1))
    scores[fold_in.toarray() > 0] = -np.inf
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :100]
    ranked = np.where(np.take_along_axis(scores, ranked, 1) == -np.inf, -1, ranked)
    ndcg, _ = reference_metrics(ranked, heldout, 100)
    _, recall20 = reference_metrics(ranked, heldout, 20)
    assert result["ndcg@100"] == pytest.approx(np.nanmean(ndcg))
    assert result["recall@20"] == pytest.approx(np.nanmean(recall20))
    assert result["n_users"] == int(((heldout.toarray() > 0).sum(axis=1) > 0).sum())


def test_popularity_baseline_checks_shapes():
    train = csr([[0, 1]], 3)
    with pytest.raises(ValueError, match="item columns"):
        popularity_baseline(train, csr([[0]], 4), csr([[1]], 4))
    with pytest.raises(ValueError, match="users"):
        popularity_baseline(train, csr([[0], [1]], 3), csr([[1]], 3))


def test_metrics_at_cutoffs_and_their_checks():
    from recvae_fast.metrics import check_cutoffs, metric_cutoffs, metrics_at

    assert metrics_at(RANKED, HELDOUT) == ranking_metrics(RANKED, HELDOUT, ndcg_ks=(100,), recall_ks=(20, 50))
    at = metrics_at(RANKED, HELDOUT, [3, 1, 3])
    assert list(at) == ["ndcg@1", "ndcg@3", "recall@1", "recall@3", "n_users"]
    assert at == ranking_metrics(RANKED, HELDOUT, ndcg_ks=(1, 3), recall_ks=(1, 3))
    assert at["recall@1"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)  # by hand, test_recall_by_hand's top 1
    assert check_cutoffs((50, 10, 50)) == (10, 50)
    assert metric_cutoffs(None) == (20, 50, 100) and metric_cutoffs([7]) == (7,)
    with pytest.raises(ValueError, match="at least one"):
        check_cutoffs([])
    with pytest.raises(ValueError, match="positive"):
        metrics_at(RANKED, HELDOUT, [2, 0])
    with pytest.raises(TypeError, match="positive integer"):
        check_cutoffs([2.5])


def test_popularity_baseline_at_cutoffs_matches_its_ranking():
    train = csr([[0, 1], [0, 2], [0], [1, 3]], 5)  # popularity: item 0 (3 users), 1 (2), then 2, 3, 4
    fold_in, heldout = csr([[0], [3]], 5), csr([[1, 2], [4]], 5)
    ranked = popularity_ranking(np.array([3, 2, 1, 1, 0.0]), fold_in, 3)
    np.testing.assert_array_equal(ranked, [[1, 2, 3], [0, 1, 2]])
    assert popularity_baseline(train, fold_in, heldout, ks=(3, 1)) == ranking_metrics(
        ranked, heldout, ndcg_ks=(1, 3), recall_ks=(1, 3))
