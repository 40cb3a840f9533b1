"""Recycled step memory (recvae_fast.workspace): a buffer is handed out again only when nothing
holds it any more, and the ops that recycle their big outputs (the decoder's kept probabilities
and weight gradient, fc1's weight gradient) stay exact when graphs are kept alive, gradients
accumulate, or users hold on to what a step returned."""
from __future__ import annotations

import threading

import pytest
import torch
from helpers import random_ratings

from recvae_fast import workspace
from recvae_fast.ops.multinomial_nll import NLLOptions, multinomial_nll
from recvae_fast.ops.sparse_input_layer import sparse_input_layer
from recvae_fast.sparse import as_csr_batch


@pytest.fixture
def recycle_everything(monkeypatch):
    """Recycle every size (the tests' tensors are far below the real threshold), from an empty cache."""
    monkeypatch.setattr(workspace, "MIN_RECYCLED_BYTES", 0)
    workspace.release()
    yield
    workspace.release()


def test_memory_comes_back_only_when_nothing_holds_it(recycle_everything):
    a = workspace.recycled_empty("k", (3, 5), torch.float32)
    assert a.shape == (3, 5) and a.is_contiguous() and a.dtype == torch.float32
    ptr = a.data_ptr()
    held = [
        ("a view", lambda t: t[1:]),
        ("a numpy array", lambda t: t.numpy()),
        ("a gradient", lambda t: setattr(p, "grad", t) or p),
        ("a saved tensor", lambda t: (t.requires_grad_() * 2).grad_fn),
    ]
    p = torch.nn.Parameter(torch.zeros(3, 5))
    for what, hold in held:
        keeper = hold(a)
        del a
        b = workspace.recycled_empty("k", (3, 5), torch.float32)
        assert b.data_ptr() != ptr, f"handed out again while {what} held it"
        del keeper, b
        p.grad = None
        a = workspace.recycled_empty("k", (3, 5), torch.float32)  # the newest buffer, now free
        ptr = a.data_ptr()
    del a
    again = workspace.recycled_empty("k", (5, 3), torch.float32)
    assert again.data_ptr() == ptr and again.shape == (5, 3)  # any shape that fits
    del again
    bigger = workspace.recycled_empty("k", (4, 5), torch.float64)
    assert bigger.data_ptr() != ptr  # too small: a new buffer replaces it
    other_key = workspace.recycled_empty("other", (2,), torch.float32)
    assert other_key.data_ptr() != bigger.data_ptr()
    assert workspace.cached_bytes() == 4 * 5 * 8 + 2 * 4
    workspace.release()
    assert workspace.cached_bytes() == 0
    bigger.fill_(1.0)  # still valid after release: the tensor keeps its memory
    assert bigger.sum() == 20


def test_small_and_non_cpu_requests_are_plain_allocations(monkeypatch):
    monkeypatch.setattr(workspace, "MIN_RECYCLED_BYTES", 4 << 20)  # the real threshold (conftest lowers it)
    workspace.release()
    small = workspace.recycled_empty("k", (4,), torch.float32)
    assert workspace.cached_bytes() == 0 and small.shape == (4,)
    monkeypatch.setattr(workspace, "MIN_RECYCLED_BYTES", 0)
    meta = workspace.recycled_empty("k", (2, 3), torch.float32, device="meta")
    assert meta.device.type == "meta" and workspace.cached_bytes() == 0


def test_threads_never_share_a_buffer(recycle_everything):
    """Many threads asking at once: the buffers in use at the same time are all distinct."""
    held, errors = [], []
    barrier = threading.Barrier(8)

    def take():
        try:
            barrier.wait()
            for _ in range(50):
                t = workspace.recycled_empty("shared", (64,), torch.float32)
                held.append(t)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({t.data_ptr() for t in held}) == len(held) == 400


def _dense_nll(z, w, b, x):
    return -(torch.log_softmax(torch.addmm(b, z, w.T), dim=-1) * x).sum(-1)


@pytest.mark.parametrize("impl", ["cpp", "torch"])
@pytest.mark.parametrize("keep_probs", [True, False], ids=["kept", "recomputed"])
def test_nll_with_two_graphs_alive_and_accumulated_gradients(recycle_everything, keep_probs, impl):
    """Decoder phase: two forwards before either backward (the first graph's kept probabilities must
    survive the second forward), then both backwards into the same, never zeroed, gradient."""
    n_users, n_items, latent = 6, 29, 4
    ratings = random_ratings(n_users, n_items, seed=5, max_items=8)
    batch = as_csr_batch(ratings, n_items, dtype=torch.float64)
    x = torch.tensor(ratings.toarray())
    gen = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(n_users, latent, generator=gen, dtype=torch.float64) for _ in range(2))
    w = torch.randn(n_items, latent, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(n_items, generator=gen, dtype=torch.float64).requires_grad_()
    options = NLLOptions(item_block=5, keep_probs=keep_probs)
    out1 = multinomial_nll(z1, w, b, batch, impl=impl, options=options)
    out2 = multinomial_nll(z2, w, b, batch, impl=impl, options=options)
    out1.sum().backward()
    grad_after_first = w.grad.clone()
    out2.sum().backward()
    w_ref, b_ref = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref1 = _dense_nll(z1, w_ref, b_ref, x)
    gw1, = torch.autograd.grad(ref1.sum(), w_ref, retain_graph=True)
    (ref1.sum() + _dense_nll(z2, w_ref, b_ref, x).sum()).backward()
    torch.testing.assert_close(out1, ref1.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_after_first, gw1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["cpp", "torch"])
@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense", "row-sparse"])
def test_fc1_gradient_held_by_the_user_is_not_overwritten(recycle_everything, sparse_grad, impl):
    n_users, n_items, hidden = 7, 23, 6
    ratings = random_ratings(n_users, n_items, seed=9, max_items=9)
    batch = as_csr_batch(ratings, n_items, dtype=torch.float64)
    x = torch.tensor(ratings.toarray())
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(n_items, hidden, generator=gen, dtype=torch.float64).requires_grad_()
    bias = torch.zeros(hidden, dtype=torch.float64)
    g1, g2 = (torch.randn(n_users, hidden, generator=gen, dtype=torch.float64) for _ in range(2))
    norm = x.norm(dim=1, keepdim=True).clamp_min(1e-30)
    sparse_input_layer(batch, w, bias, sparse_grad=sparse_grad, impl=impl).backward(g1)
    first = w.grad  # the user keeps the first step's gradient
    w.grad = None
    sparse_input_layer(batch, w, bias, sparse_grad=sparse_grad, impl=impl).backward(g2)
    second = w.grad
    for got, g in ((first, g1), (second, g2)):
        got = got.to_dense() if sparse_grad else got
        torch.testing.assert_close(got, (x / norm).T @ g, rtol=1e-10, atol=1e-12)
