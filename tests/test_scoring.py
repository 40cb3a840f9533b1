"""Blocked scoring (recvae_fast.scoring.blocked_topk) against the dense path: the whole score
matrix z·Wᵀ + b, then `topk_masked`, and a plain torch sort with the same rules. Integer-valued
inputs make every score exact whatever the blocking, so ties (equal items) must come out in the
same order: lower item index first."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from helpers import random_ratings

from recvae_fast.scoring import blocked_topk
from recvae_fast.ops.topk_masked import topk_masked

N_USERS, N_ITEMS, LATENT = 8, 41, 3


def integer_case(dtype, seed=0, n_users=N_USERS, n_items=N_ITEMS):
    """Small integer scores with many ties; rows 0 / 1 of seen: empty / one item; the last row sees
    every item but two."""
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randint(-2, 3, (n_users, LATENT), generator=gen).to(dtype)
    weight = torch.randint(-1, 2, (n_items, LATENT), generator=gen).to(dtype)
    bias = torch.randint(0, 2, (n_items,), generator=gen).to(dtype)
    seen = random_ratings(n_users, n_items, seed=seed, binary=True, max_items=n_items // 3).tolil()
    seen[n_users - 1, :] = 1
    seen[n_users - 1, [3, n_items - 1]] = 0
    return mu, weight, bias, sp.csr_matrix(seen)


def sorted_reference(scores: torch.Tensor, seen: sp.csr_matrix, k: int):
    """Stable sort by score over the item order (ties to the lower index), seen items dropped, padded."""
    out_s = np.full((scores.shape[0], k), -np.inf, np.float32)
    out_i = np.full((scores.shape[0], k), -1, np.int64)
    for u in range(scores.shape[0]):
        keep = np.setdiff1d(np.arange(scores.shape[1]), seen[u].indices)
        row = scores[u, keep].float().numpy()
        order = np.argsort(-row, kind="stable")[:k]
        out_s[u, : len(order)], out_i[u, : len(order)] = row[order], keep[order]
    return out_s, out_i


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [1, 6, N_ITEMS - 1, N_ITEMS, N_ITEMS + 9, None], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("k", [1, 5, N_ITEMS + 3])
def test_equals_dense_scoring_ties_and_padding(dtype, block, k):
    mu, weight, bias, seen = integer_case(dtype)
    got = blocked_topk(mu, weight, bias, seen, k, item_block=block)
    assert got.scores.dtype == np.float32 and got.items.dtype == np.int64
    assert got.scores.shape == got.items.shape == (N_USERS, k)
    dense = torch.addmm(bias, mu, weight.T)
    want = topk_masked(dense.float(), seen, k)
    np.testing.assert_array_equal(got.items, want.items.numpy())
    np.testing.assert_array_equal(got.scores, want.scores.numpy())
    ref_s, ref_i = sorted_reference(dense, seen, k)
    np.testing.assert_array_equal(got.items, ref_i)
    np.testing.assert_array_equal(got.scores, ref_s)
    assert (got.items[N_USERS - 1, 2:] == -1).all() and np.isneginf(got.scores[N_USERS - 1, 2:]).all()


def test_random_floats_match_the_dense_scores():
    """Non-integer scores: the same items, scores equal up to float32 rounding of the blocked products."""
    gen = torch.Generator().manual_seed(5)
    n_users, n_items = 37, 1_003
    mu = torch.randn(n_users, 16, generator=gen)
    weight = torch.randn(n_items, 16, generator=gen)
    bias = torch.randn(n_items, generator=gen)
    seen = random_ratings(n_users, n_items, seed=5, binary=True)
    got = blocked_topk(mu, weight, bias, seen, 20, item_block=97)
    want = topk_masked(torch.addmm(bias, mu, weight.T), seen, 20)
    np.testing.assert_allclose(got.scores, want.scores.numpy(), rtol=1e-5, atol=1e-5)
    assert (got.items == want.items.numpy()).mean() > 0.99  # only near-equal neighbours may swap


def test_no_users_and_no_seen():
    mu, weight, bias, _ = integer_case(torch.float32)
    empty = blocked_topk(mu[:0], weight, bias, None, 4)
    assert empty.scores.shape == (0, 4) and empty.items.shape == (0, 4)
    got = blocked_topk(mu, weight, bias, None, 4, item_block=5)
    want = topk_masked(torch.addmm(bias, mu, weight.T), None, 4)
    np.testing.assert_array_equal(got.items, want.items.numpy())


def test_bad_inputs_raise_clear_errors():
    mu, weight, bias, seen = integer_case(torch.float32)
    with pytest.raises(ValueError, match="item_block must be >= 1"):
        blocked_topk(mu, weight, bias, seen, 3, item_block=0)
    with pytest.raises(ValueError, match="shapes do not match"):
        blocked_topk(mu, weight[:, :2], bias, seen, 3)
    with pytest.raises(TypeError, match="share one dtype"):
        blocked_topk(mu, weight, bias.double(), seen, 3)
    with pytest.raises(ValueError, match="seen has 40 columns"):
        blocked_topk(mu, weight, bias, seen[:, :40], 3)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        blocked_topk(mu, weight, bias, seen, 0)
    with pytest.raises(TypeError, match="CPU tensor"):
        blocked_topk(mu.numpy(), weight, bias, seen, 3)

