"""The CPU multinomial NLL (recvae_fast.ops.multinomial_nll, impl "cpp" and "torch") streams item
blocks: values and every gradient against the dense reference −(log_softmax(z·Wᵀ + b)·X).sum(−1), at awkward block boundaries
(items not a multiple of the block, a last block of one item, one block larger than the
catalogue, one item per block), with empty and one-item users, in float32 and float64, with the
decoder-phase probabilities kept from forward and recomputed in backward."""
from __future__ import annotations

import pytest
import torch
from helpers import random_ratings

from recvae_fast.ops import multinomial_nll as nll_module
from recvae_fast.ops.multinomial_nll import NLLOptions, multinomial_nll
from recvae_fast.cache_blocks import nll_block_size
from recvae_fast.sparse import CSRBatch, as_csr_batch

N_USERS, N_ITEMS, LATENT = 9, 37, 5
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}
# The gradients each phase of training asks for: encoder (z), decoder (Wd, bd), and all three.
FLAGS = {"encoder": (True, False, False), "decoder": (False, True, True), "all": (True, True, True)}


def make_case(n_users, n_items, dtype, seed=0, z_scale=1.0):
    ratings = random_ratings(n_users, n_items, seed=seed, max_items=min(12, n_items))  # rows 0 / 1: empty / one item
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_users, LATENT, generator=gen, dtype=torch.float64) * z_scale
    w = torch.randn(n_items, LATENT, generator=gen, dtype=torch.float64) / LATENT**0.5
    b = torch.randn(n_items, generator=gen, dtype=torch.float64)
    g = torch.randn(n_users, generator=gen, dtype=torch.float64)
    x = torch.tensor(ratings.toarray(), dtype=torch.float64)
    return as_csr_batch(ratings, n_items, dtype=dtype), x, z, w, b, g


def run_both(batch, x, z, w, b, g, flags, dtype, nll):
    """(loss, grads) of `nll` in `dtype` and of the dense reference in float64, for the flagged inputs."""
    leaves = [t.detach().to(dtype, copy=True).requires_grad_(f) for t, f in zip((z, w, b), flags)]
    out = nll(*leaves, batch)
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], g.to(dtype))
    ref_leaves = [t.detach().clone().requires_grad_(f) for t, f in zip((z, w, b), flags)]
    ref = -(torch.log_softmax(torch.addmm(ref_leaves[2], ref_leaves[0], ref_leaves[1].T), dim=-1) * x).sum(-1)
    ref_grads = torch.autograd.grad(ref, [t for t in ref_leaves if t.requires_grad], g)
    return out, grads, ref, ref_grads


def assert_match(out, grads, ref, ref_grads, dtype):
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **TOL[dtype])


@pytest.fixture(params=["cpp", "torch"], ids=["cpp-blocks", "torch-blocks"])
def block_route(request):
    """The implementation: the per-block steps of forward and decoder backward in C++ (CPU
    default) or torch ops."""
    return request.param


def blocked(impl, item_block, keep_probs=None):
    """multinomial_nll with `impl` and an explicit item block (and kept probabilities forced or not)."""
    options = NLLOptions(item_block=item_block, keep_probs=keep_probs)

    def nll(z, w, b, batch):
        return multinomial_nll(z, w, b, batch, impl=impl, options=options)

    return nll


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("block", [1, 6, N_ITEMS - 1, N_ITEMS, N_ITEMS + 5], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("phase", list(FLAGS))
@pytest.mark.parametrize("keep_probs", [True, False], ids=["kept", "recomputed"])
def test_values_and_gradients_at_block_boundaries(dtype, block, phase, keep_probs, block_route):
    batch, x, z, w, b, g = make_case(N_USERS, N_ITEMS, dtype)
    assert batch.row_sums()[0] == 0 and batch.indptr[2] - batch.indptr[1] == 1  # an empty and a one-item user

    nll = blocked(block_route, block, keep_probs)
    assert_match(*run_both(batch, x, z, w, b, g, FLAGS[phase], dtype, nll), dtype)


@pytest.mark.parametrize("keep_probs", [True, False], ids=["kept", "recomputed"])
def test_large_logits_stay_finite_and_exact(keep_probs, block_route):
    """Logits of ±hundreds: the running max and the per-block exp(m − LSE) scale must not overflow."""
    batch, x, z, w, b, g = make_case(N_USERS, N_ITEMS, torch.float64, seed=3, z_scale=300.0)

    nll = blocked(block_route, 4, keep_probs)
    out, grads, ref, ref_grads = run_both(batch, x, z, w, b, g, FLAGS["all"], torch.float64, nll)
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in grads)
    assert_match(out, grads, ref, ref_grads, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("phase", list(FLAGS))
def test_default_block_rule_with_several_blocks(dtype, phase, block_route):
    """multinomial_nll with its default options (the machine's block size), on a batch wide enough
    for several blocks and a partial last one."""
    n_users = 700
    block = nll_block_size(n_users, torch.tensor([], dtype=dtype).element_size(), keep_probs=phase != "encoder")
    n_items = 2 * block + 3
    batch, x, z, w, b, g = make_case(n_users, n_items, dtype, seed=1)
    assert_match(*run_both(batch, x, z, w, b, g, FLAGS[phase], dtype, blocked(block_route, 0)), dtype)


def test_probabilities_kept_only_within_the_budget(block_route):
    """Within NLLOptions.kept_probs_bytes the decoder phase keeps each block's probabilities for
    backward; past it (budget 0 here) it keeps none and recomputes; both match the reference."""
    batch, x, z, w, b, g = make_case(N_USERS, N_ITEMS, torch.float64, seed=2)
    for budget, kept_values in ((1 << 30, N_USERS * N_ITEMS), (0, 0)):
        options = NLLOptions(kept_probs_bytes=budget)

        def nll(z, w, b, batch):
            return multinomial_nll(z, w, b, batch, impl=block_route, options=options)

        leaves = [t.clone().requires_grad_(f) for t, f in zip((z, w, b), FLAGS["decoder"])]
        assert saved_kept(nll(*leaves, batch)).numel() == kept_values
        assert_match(*run_both(batch, x, z, w, b, g, FLAGS["decoder"], torch.float64, nll), torch.float64)
    leaves = [t.clone().requires_grad_(f) for t, f in zip((z, w, b), FLAGS["encoder"])]
    out = multinomial_nll(*leaves, batch, impl=block_route, options=NLLOptions(kept_probs_bytes=1 << 30))
    assert saved_kept(out).numel() == 0  # encoder phase: nothing kept


def saved_kept(nll):
    """The probabilities recvae_fast::multinomial_nll saved for backward (autograd's node is its ctx)."""
    return nll.grad_fn.saved_tensors[8]


def test_no_grad_and_all_users_empty(block_route):
    batch, x, z, w, b, _ = make_case(N_USERS, N_ITEMS, torch.float64)
    with torch.no_grad():
        out = blocked(block_route, 5)(z, w, b, batch)
    ref = -(torch.log_softmax(z @ w.T + b, dim=-1) * x).sum(-1)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    empty = as_csr_batch(torch.zeros(4, N_ITEMS, dtype=torch.float64), N_ITEMS, dtype=torch.float64)
    zz = torch.randn(4, LATENT, dtype=torch.float64, requires_grad=True)
    ww = w.clone().requires_grad_()
    out = blocked(block_route, 8)(zz, ww, b, empty)
    assert torch.equal(out, torch.zeros(4, dtype=torch.float64))
    gz, gw = torch.autograd.grad(out.sum(), (zz, ww))
    assert torch.equal(gz, torch.zeros_like(gz)) and torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.parametrize("phase", list(FLAGS))
@pytest.mark.parametrize("keep_probs", [True, False], ids=["kept", "recomputed"])
def test_rows_not_sorted_by_item(phase, keep_probs, block_route):
    """The registered op called on CSR arrays that are not canonical (each row's items in reverse):
    the C++ route's walk over the blocks stops at the first item out of order, and what it did not
    visit is added afterwards; values and gradients still match the reference."""
    batch, x, z, w, b, g = make_case(N_USERS, N_ITEMS, torch.float64, seed=4)
    rows = [batch.indices[s:e].flip(0) for s, e in zip(batch.indptr[:-1].tolist(), batch.indptr[1:].tolist())]
    values = [batch.values[s:e].flip(0) for s, e in zip(batch.indptr[:-1].tolist(), batch.indptr[1:].tolist())]
    reversed_rows = CSRBatch(batch.indptr, torch.cat(rows), torch.cat(values), N_ITEMS)
    assert not torch.equal(reversed_rows.indices, batch.indices)

    def nll(z, w, b, _batch):
        return blocked(block_route, 6, keep_probs)(z, w, b, reversed_rows)

    assert_match(*run_both(batch, x, z, w, b, g, FLAGS[phase], torch.float64, nll), torch.float64)


@pytest.mark.parametrize("phase", list(FLAGS))
@pytest.mark.parametrize("keep_probs", [True, False], ids=["kept", "recomputed"])
def test_strided_inputs(phase, keep_probs, block_route):
    """z, Wd and bd given as views with gaps between their elements (a slice of a wider tensor):
    the C++ route reads them as the torch route does."""
    batch, x, z, w, b, g = make_case(N_USERS, N_ITEMS, torch.float64, seed=5)

    def widened(t):  # the same values, every other element of a tensor twice as wide
        return torch.stack([t, torch.full_like(t, 99.0)], dim=-1).flatten(-2)[..., ::2]

    def nll(z, w, b, batch):
        zs, ws, bs = widened(z), widened(w), widened(b)
        assert not (zs.is_contiguous() or ws.is_contiguous() or bs.is_contiguous())
        return blocked(block_route, 6, keep_probs)(zs, ws, bs, batch)

    assert_match(*run_both(batch, x, z, w, b, g, FLAGS[phase], torch.float64, nll), torch.float64)


def test_items_out_of_range_raise(block_route):
    batch, _, z, w, b, _ = make_case(N_USERS, N_ITEMS, torch.float64)
    bad = CSRBatch(batch.indptr, torch.where(batch.indices == batch.indices.max(), N_ITEMS + 3, batch.indices),
                   batch.values, N_ITEMS)
    with pytest.raises((IndexError, RuntimeError), match="out of range|out of bounds|idx < num_embeddings"):
        blocked(block_route, 6)(z, w, b, bad)


def test_bad_options_raise():
    for bad in (dict(item_block=-1), dict(item_block=2.5), dict(item_block=True), dict(keep_probs="yes"),
                dict(kept_probs_fraction=1.5), dict(kept_probs_bytes=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            NLLOptions(**bad)
    batch, _, z, w, b, _ = make_case(N_USERS, N_ITEMS, torch.float64)
    with pytest.raises(ValueError, match="impl 'triton' takes none"):
        multinomial_nll(z, w, b, batch, impl="triton", options=NLLOptions(item_block=4))


def test_block_rule_fills_half_of_l2(monkeypatch):
    import recvae_fast.cache_blocks as cb

    monkeypatch.setattr(cb, "l2_bytes_per_core", lambda: 2 << 20)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert cb.item_block_size(500, 4) == 1024  # 500 × 1024 × 4 B = 2 MiB: half of 2 × 2 MiB
    assert cb.item_block_size(500, 8) == 512
    assert cb.item_block_size(1, 4) == 1 << 16  # capped
    assert cb.item_block_size(100_000, 8) == 64  # floored
    with pytest.raises(ValueError):
        cb.item_block_size(10, 0)


def test_kept_probabilities_budget_is_an_eighth_of_memory(monkeypatch):
    monkeypatch.setattr(nll_module, "_memory_bytes", lambda device: 24 << 30)
    assert NLLOptions().kept_probs_budget(torch.device("cpu")) == 3 << 30
    assert NLLOptions(kept_probs_fraction=0.5).kept_probs_budget(torch.device("cpu")) == 12 << 30
    assert NLLOptions(kept_probs_bytes=12345).kept_probs_budget(torch.device("cpu")) == 12345


def test_memory_bytes_reads_the_machine():
    assert nll_module._memory_bytes(torch.device("cpu")) >= 1 << 30


def test_kept_blocks_are_twice_the_rule(monkeypatch):
    import recvae_fast.cache_blocks as cb

    monkeypatch.setattr(cb, "l2_bytes_per_core", lambda: 2 << 20)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert cb.nll_block_size(500, 4, keep_probs=False) == 1024
    assert cb.nll_block_size(500, 4, keep_probs=True) == 2048
    assert cb.nll_block_size(1, 4, keep_probs=True) == 1 << 16  # still capped
