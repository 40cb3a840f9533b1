"""The Triton implementations registered with torch.library.triton_op (namespace recvae_fast::,
prefix triton_): torch.library.opcheck per op, on CUDA tensors on a GPU and on CPU tensors under
the Triton interpreter; the profiler sees them by name; the public entry points route through them.

Under the interpreter opcheck runs its schema, autograd-registration and FakeTensor checks but not
the AOT-dispatch one: that check traces the op's body, and under the interpreter wrap_triton hands
back the interpreted kernel, which cannot run on traced tensors. On a GPU every check runs."""
from __future__ import annotations

import pytest
import torch

from helpers import DEVICE, random_ratings, triton_problem
from recvae_fast.sparse import as_csr_batch

TRITON_PROBLEM = triton_problem()
pytestmark = [pytest.mark.interpreter] if TRITON_PROBLEM is None else [pytest.mark.skip(reason=TRITON_PROBLEM)]

if TRITON_PROBLEM is None:
    from recvae_fast.kernels import multinomial_nll as mnll
    from recvae_fast.kernels import row_sparse_adam as rsa
    from recvae_fast.kernels import sparse_input_layer as sil

N_USERS, N_ITEMS, HIDDEN, LATENT = 7, 45, 9, 5  # odd sizes; row 0 empty, row 1 one item
CHECKS = None if DEVICE.type == "cuda" else ("test_schema", "test_autograd_registration", "test_faketensor")


def opcheck(op, args):
    result = torch.library.opcheck(op, args, test_utils=CHECKS) if CHECKS else torch.library.opcheck(op, args)
    assert result and set(result.values()) == {"SUCCESS"}, result


def batch_case(dtype=torch.float64, seed=0):
    ratings = random_ratings(N_USERS, N_ITEMS, seed=seed, max_items=10)
    return as_csr_batch(ratings, N_ITEMS, dtype=dtype, device=DEVICE)


def leaf(*shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype).to(DEVICE).requires_grad_()


@pytest.mark.parametrize("want_dz", [True, False])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_opcheck_multinomial_nll(want_dz, with_bias):
    batch = batch_case()
    z, w = leaf(N_USERS, LATENT, seed=1), leaf(N_ITEMS, LATENT, seed=2)
    b = leaf(N_ITEMS, seed=3) if with_bias else None
    opcheck(torch.ops.recvae_fast.triton_multinomial_nll.default,
            (z, w, b, batch.indptr, batch.indices, batch.values, want_dz, "ieee"))


def test_opcheck_multinomial_nll_backward():
    batch = batch_case()
    z, w, b = (leaf(*s, seed=i).detach() for i, s in enumerate(((N_USERS, LATENT), (N_ITEMS, LATENT), (N_ITEMS,))))
    nll, lse, n, _ = torch.ops.recvae_fast.triton_multinomial_nll(
        z, w, b, batch.indptr, batch.indices, batch.values, False, "ieee")
    grad = torch.randn(N_USERS, dtype=torch.float64, device=DEVICE)
    for need_w, need_b in ((True, True), (True, False), (False, True)):
        opcheck(torch.ops.recvae_fast.triton_multinomial_nll_backward.default,
                (z, w, b, batch.indptr, batch.indices, batch.values, lse, grad * n, -grad, need_w, need_b, "ieee"))


@pytest.mark.parametrize("want_dz", [True, False])
def test_opcheck_multinomial_nll_parts(want_dz):
    batch = batch_case()
    z, w, b = leaf(N_USERS, LATENT, seed=1), leaf(N_ITEMS, LATENT, seed=2), leaf(N_ITEMS, seed=3)
    opcheck(torch.ops.recvae_fast.triton_multinomial_nll_parts.default,
            (z, w, b, batch.indptr, batch.indices, batch.values, want_dz, "ieee"))


@pytest.mark.parametrize("dropout", ["none", "seed", "mask"])
def test_opcheck_sparse_input_layer(dropout):
    batch = batch_case()
    weight_t, bias = leaf(N_ITEMS, HIDDEN, seed=1), leaf(HIDDEN, seed=2)
    p = 0.0 if dropout == "none" else 0.4
    keep = (torch.arange(batch.nnz, device=DEVICE) % 3 != 0) if dropout == "mask" else None
    for write_aux, sparse_grad in ((True, False), (True, True), (False, False)):
        opcheck(torch.ops.recvae_fast.triton_sparse_input_layer.default,
                (weight_t, bias, batch.indptr, batch.indices, batch.values, p, keep, 123, write_aux, sparse_grad,
                 "segment"))


@pytest.mark.parametrize("grad_method", ["segment", "atomic"])
def test_opcheck_sparse_input_layer_backward_dense(grad_method):
    batch = batch_case()
    weight_t = leaf(N_ITEMS, HIDDEN, seed=1).detach()
    _, coef, rows = torch.ops.recvae_fast.triton_sparse_input_layer(
        weight_t, None, batch.indptr, batch.indices, batch.values, 0.0, None, 0, True, False, grad_method)
    grad_out = torch.randn(N_USERS, HIDDEN, dtype=torch.float64, device=DEVICE)
    args = (grad_out, batch.indptr, batch.indices, coef, rows, N_ITEMS, torch.float64, False, grad_method)
    opcheck(torch.ops.recvae_fast.triton_sparse_input_layer_backward.default, args)
    # the gradient itself: dW1[i] = Σ_u c_ui·grad_out[u], from the CSR batch
    item_rows, dense = torch.ops.recvae_fast.triton_sparse_input_layer_backward(*args)
    users = batch.row_ids()
    want = torch.zeros(N_ITEMS, HIDDEN, dtype=torch.float64, device=DEVICE).index_add_(
        0, batch.indices, coef[:, None] * grad_out[users])
    assert item_rows.numel() == 0
    torch.testing.assert_close(dense, want, rtol=1e-12, atol=1e-12)


def test_sparse_input_layer_row_sparse_backward_returns_the_batch_rows():
    """The row-sparse backward's output size (the batch's unique items) is data-dependent, which the
    FakeTensor check of opcheck cannot follow without a shape environment: the values are checked
    here against the dense backward instead, and its fake shapes under a shape environment."""
    batch = batch_case()
    weight_t = leaf(N_ITEMS, HIDDEN, seed=1).detach()
    _, coef, rows = torch.ops.recvae_fast.triton_sparse_input_layer(
        weight_t, None, batch.indptr, batch.indices, batch.values, 0.0, None, 0, True, True, "segment")
    grad_out = torch.randn(N_USERS, HIDDEN, dtype=torch.float64, device=DEVICE)
    op = torch.ops.recvae_fast.triton_sparse_input_layer_backward
    item_rows, values = op(grad_out, batch.indptr, batch.indices, coef, rows, N_ITEMS, torch.float64, True, "segment")
    _, dense = op(grad_out, batch.indptr, batch.indices, coef, rows, N_ITEMS, torch.float64, False, "segment")
    assert torch.equal(item_rows, torch.unique(batch.indices))
    torch.testing.assert_close(values, dense[item_rows], rtol=0, atol=0)
    assert dense[~torch.isin(torch.arange(N_ITEMS, device=DEVICE), item_rows)].abs().max() == 0
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fake = [mode.from_tensor(t) for t in (grad_out, batch.indptr, batch.indices, coef, rows)]
        fake_rows, fake_values = op(*fake, N_ITEMS, torch.float64, True, "segment")
    assert isinstance(fake_rows.shape[0], torch.SymInt) and str(fake_values.shape[0]) == str(fake_rows.shape[0])
    assert fake_values.shape[1] == HIDDEN and fake_values.dtype == torch.float64 and fake_rows.dtype == torch.int64


def test_opcheck_row_sparse_adam_step():
    param = torch.randn(11, HIDDEN, dtype=torch.float64, device=DEVICE)
    exp_avg, exp_avg_sq = torch.randn_like(param), torch.rand_like(param)
    rows = torch.tensor([0, 4, 10], device=DEVICE)
    grad_values = torch.randn(3, HIDDEN, dtype=torch.float64, device=DEVICE)
    hyper = rsa.adam_hyperparameters(1e-3, (0.9, 0.999), 1e-8, 0.0, 2, torch.float64, DEVICE)
    opcheck(torch.ops.recvae_fast.triton_row_sparse_adam_step.default,
            (param, exp_avg, exp_avg_sq, rows, grad_values, hyper))


def test_public_entry_points_route_through_the_registered_ops_and_the_profiler_sees_them():
    batch = batch_case()
    z, w, b = leaf(N_USERS, LATENT, seed=1), leaf(N_ITEMS, LATENT, seed=2), leaf(N_ITEMS, seed=3)
    weight_t = leaf(N_ITEMS, HIDDEN, seed=4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        h = sil.sparse_input_layer(batch, weight_t, None, 0.3, seed=5, sparse_grad=True)
        nll = mnll.multinomial_nll(z, w, b, batch)
        lse, x_logit = mnll.multinomial_nll_parts(z, w, b, batch)
        (nll.sum() + h.sum() + lse.sum() - x_logit.sum()).backward()
        param = weight_t.detach().clone()
        rsa.adam_step_row_sparse_(param, weight_t.grad, torch.zeros_like(param), torch.zeros_like(param), 1)
    assert "triton_sparse_input_layer" in type(h.grad_fn).__name__
    assert "triton_multinomial_nll" in type(nll.grad_fn).__name__
    names = {event.key for event in prof.key_averages()}
    for op in ("triton_sparse_input_layer", "triton_sparse_input_layer_backward", "triton_multinomial_nll",
               "triton_multinomial_nll_parts", "triton_multinomial_nll_backward", "triton_row_sparse_adam_step"):
        assert f"recvae_fast::{op}" in names, op
    assert weight_t.grad.is_sparse and z.grad is not None and w.grad is not None and b.grad is not None
