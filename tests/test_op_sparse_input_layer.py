"""The sparse input layer op (recvae_fast.ops.sparse_input_layer), each implementation ("cpp",
"torch", and "triton" under the interpreter) against a dense torch reference.

Reference: x dense B × I, x / ‖x‖ (row-wise), times the same keep mask / (1 − p), @ W1 + b1, with
autograd for dW1 and db1, in float64. The first part tests the op's contract through
`sparse_input_layer(..., impl=impl)`; the second part what only the Triton implementation has
(the seeded Philox mask, grad_method="atomic", half precision accumulated in float32, bias=None,
its own validation, autotuning). Without CUDA the kernels run in the Triton interpreter (numpy on
the CPU), so the shapes are small.
"""
from __future__ import annotations

import functools
import importlib

import pytest
import torch

from recvae_fast.ops.sparse_input_layer import sparse_input_layer
from recvae_fast.sparse import CSRBatch, as_csr_batch

from helpers import DEVICE, triton_problem

TRITON_PROBLEM = triton_problem()
sil = None if TRITON_PROBLEM else importlib.import_module("recvae_fast.kernels.sparse_input_layer")
sil_forward = None if TRITON_PROBLEM else importlib.import_module("recvae_fast.kernels.sparse_input_forward")
sil_backward = None if TRITON_PROBLEM else importlib.import_module("recvae_fast.kernels.sparse_input_backward")
sil_atomic = None if TRITON_PROBLEM else importlib.import_module("recvae_fast.kernels.sparse_input_backward_atomic")
# Marks of every Triton test: run under the interpreter, skipped (with the reason) where it cannot.
TRITON_MARKS = [pytest.mark.interpreter, pytest.mark.skipif(TRITON_PROBLEM is not None, reason=str(TRITON_PROBLEM))]
triton_only = pytest.mark.interpreter if TRITON_PROBLEM is None else pytest.mark.skip(reason=TRITON_PROBLEM)

TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


@pytest.fixture(params=["cpp", "torch", pytest.param("triton", marks=TRITON_MARKS)])
def impl(request):
    return request.param


@pytest.fixture
def layer(impl):
    """sparse_input_layer with the implementation under test."""
    return functools.partial(sparse_input_layer, impl=impl)


# The op with each way of computing dW1: C++, torch, and Triton's default ("segment") and "atomic".
GRAD_METHODS = [
    pytest.param("cpp", "segment", id="cpp"),
    pytest.param("torch", "segment", id="torch"),
    pytest.param("triton", "segment", marks=TRITON_MARKS, id="triton-segment"),
    pytest.param("triton", "atomic", marks=TRITON_MARKS, id="triton-atomic"),
]


def layer_with(impl, grad_method):
    if grad_method == "segment":
        return functools.partial(sparse_input_layer, impl=impl)
    return functools.partial(sil.sparse_input_layer, grad_method=grad_method)  # a Triton-only option


def make_case(n_users=9, n_items=1001, hidden=37, dtype=torch.float64, density=0.02, seed=0):
    """Weighted interactions (values ≠ 1) with an empty user (row 1), a one-item user (row 2) and
    a user holding the first and last items (row 3)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_users, n_items, generator=gen) < density
    x = mask.double() * (0.5 + 2.5 * torch.rand(n_users, n_items, generator=gen, dtype=torch.float64))
    x[1] = 0
    x[2] = 0
    x[2, n_items // 2] = 1.7
    x[3, 0], x[3, n_items - 1] = 2.0, 0.25
    w = torch.randn(n_items, hidden, generator=gen, dtype=torch.float64)
    b = torch.randn(hidden, generator=gen, dtype=torch.float64)
    g = torch.randn(n_users, hidden, generator=gen, dtype=torch.float64)
    batch = as_csr_batch(x.to(dtype).to(DEVICE), n_items, dtype=dtype, device=DEVICE)
    return x.to(DEVICE), batch, w.to(dtype).to(DEVICE), b.to(dtype).to(DEVICE), g.to(dtype).to(DEVICE)


def random_keep_mask(nnz, p, seed):
    """A keep mask drawn from a torch generator (what any caller may pass as keep_mask)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(nnz, generator=gen) >= p).to(DEVICE)


def dense_mask(batch: CSRBatch, keep: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(batch.n_rows, batch.n_cols, dtype=torch.float64, device=keep.device)
    out[batch.row_ids(), batch.indices] = keep.double()
    return out


def dense_reference(x, w, b, g, p=0.0, keep_dense=None):
    """(h1_pre, dW1, db1) of the dense first layer, float64."""
    w = w.detach().double().requires_grad_(True)
    b = b.detach().double().requires_grad_(True)
    norm = x.norm(dim=1, keepdim=True)
    xn = x / torch.where(norm > 0, norm, torch.ones_like(norm))
    if p > 0:
        xn = xn * keep_dense / (1 - p)
    out = xn @ w + b
    dw, db = torch.autograd.grad(out, (w, b), g.double())
    return out.detach(), dw, db


def run(op, batch, w, b, g, **kw):
    """(h1_pre, dW1, db1) of `op` with upstream gradient g."""
    w = w.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    out = op(batch, w, b, **kw)
    out.backward(g)
    return out.detach(), w.grad, b.grad


def assert_close(actual, expected, rtol):
    """Error relative to the largest magnitude of the expected tensor (sums of many terms)."""
    scale = expected.abs().max().item() + 1e-30
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:g} × {scale:.3g}"


def assert_dropped_only_rows_zero(batch, keep, dw):
    """Rows of items whose every occurrence was dropped get exactly zero gradient."""
    dropped_only = torch.zeros(batch.n_cols, dtype=torch.bool, device=DEVICE)
    dropped_only[batch.indices[~keep]] = True
    dropped_only[batch.indices[keep]] = False
    assert dropped_only.any() and (dw[dropped_only] == 0).all()


# ============================================================ the op's contract, every implementation


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_no_dropout_matches_dense(dtype, layer):
    x, batch, w, b, g = make_case(dtype=dtype, seed=1)
    out, dw, db = run(layer, batch, w, b, g)
    ref, ref_dw, ref_db = dense_reference(x, w, b, g)
    assert out.shape == (9, 37) and out.dtype == dtype and dw.dtype == dtype and dw.layout == torch.strided
    assert_close(out, ref, TOL[dtype])
    assert_close(dw, ref_dw, TOL[dtype])
    assert_close(db, ref_db, TOL[dtype])
    assert torch.equal(out[1], b)  # the empty user gets the bias, exactly
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_keep_mask_dropout_matches_dense(dtype, layer):
    # A caller's own masks (a random one, and keep-only-even-positions) are honoured in forward and
    # backward, with the 1/(1 − p) scale.
    x, batch, w, b, g = make_case(dtype=dtype, seed=2, density=0.04)
    p = 0.4
    for keep in (random_keep_mask(batch.nnz, p, seed=1234), torch.arange(batch.nnz, device=DEVICE) % 2 == 0):
        assert 0 < int(keep.sum()) < batch.nnz
        out, dw, db = run(layer, batch, w, b, g, dropout_rate=p, keep_mask=keep)
        ref, ref_dw, ref_db = dense_reference(x, w, b, g, p, dense_mask(batch, keep))
        assert_close(out, ref, TOL[dtype])
        assert_close(dw, ref_dw, TOL[dtype])
        assert_close(db, ref_db, TOL[dtype])
        no_drop, _, _ = dense_reference(x, w, b, g)
        assert (out - no_drop).abs().max() > 1e-3
        assert_dropped_only_rows_zero(batch, keep, dw)


def test_no_mask_follows_torch_manual_seed(layer):
    _, batch, w, b, _ = make_case(seed=4, density=0.04)
    torch.manual_seed(5)
    a = layer(batch, w, b, dropout_rate=0.5)
    torch.manual_seed(5)
    c = layer(batch, w, b, dropout_rate=0.5)
    d = layer(batch, w, b, dropout_rate=0.5)
    assert torch.equal(a, c)
    assert not torch.equal(a, d)


@pytest.mark.parametrize("impl, grad_method", GRAD_METHODS)
def test_empty_batch_and_users_give_bias(impl, grad_method):
    op = layer_with(impl, grad_method)
    hidden, n_items = 37, 50
    w = torch.randn(n_items, hidden, dtype=torch.float64, device=DEVICE)
    b = torch.randn(hidden, dtype=torch.float64, device=DEVICE)
    empty = CSRBatch(
        torch.zeros(4, dtype=torch.int64, device=DEVICE), torch.zeros(0, dtype=torch.int64, device=DEVICE),
        torch.zeros(0, dtype=torch.float64, device=DEVICE), n_items,
    )
    g = torch.randn(3, hidden, dtype=torch.float64, device=DEVICE)
    for p in (0.0, 0.5):
        out, dw, db = run(op, empty, w, b, g, dropout_rate=p)
        assert torch.equal(out, b.expand(3, hidden))
        assert torch.equal(dw, torch.zeros_like(w))
        assert_close(db, g.sum(0), 1e-14)
        _, dws, _ = run(op, empty, w, b, g, dropout_rate=p, sparse_grad=True)
        assert dws._nnz() == 0 and dws.shape == w.shape
    # A user whose only entry is an explicit zero: norm 0, still the bias and no NaN.
    zero_val = CSRBatch(
        torch.tensor([0, 1], device=DEVICE), torch.tensor([3], device=DEVICE),
        torch.zeros(1, dtype=torch.float64, device=DEVICE), n_items,
    )
    assert torch.equal(op(zero_val, w, b), b[None])


def test_one_item_user_dropout_kept_or_dropped(layer):
    # One-item user: x/‖x‖ = 1 at its item, so h1_pre = b + W[i]/(1−p) if kept, else b.
    hidden, n_items = 37, 1001
    w = torch.randn(n_items, hidden, dtype=torch.float64, device=DEVICE)
    b = torch.randn(hidden, dtype=torch.float64, device=DEVICE)
    batch = CSRBatch(
        torch.tensor([0, 1, 2], device=DEVICE), torch.tensor([1000, 7], device=DEVICE),
        torch.tensor([3.0, 0.5], dtype=torch.float64, device=DEVICE), n_items,
    )
    keep = torch.tensor([True, False], device=DEVICE)
    out = layer(batch, w, b, dropout_rate=0.25, keep_mask=keep)
    torch.testing.assert_close(out[0], b + w[1000] / 0.75, rtol=1e-14, atol=1e-14)
    assert torch.equal(out[1], b)


@pytest.mark.parametrize("impl, grad_method", GRAD_METHODS)
def test_duplicate_ids_are_linear(impl, grad_method):
    # A non-canonical batch: item 5 twice in user 0, item 9 twice in user 1. Each stored entry
    # contributes c_e·W[i_e], c_e = v_e·m_e / ((1−p)·sqrt(Σ_e v_e²)); dW sums every entry (for the
    # atomic method: two atomic adds on the same row from one program).
    op = layer_with(impl, grad_method)
    hidden, n_items = 37, 20
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(n_items, hidden, generator=gen, dtype=torch.float64).to(DEVICE)
    b = torch.randn(hidden, generator=gen, dtype=torch.float64).to(DEVICE)
    g = torch.randn(2, hidden, generator=gen, dtype=torch.float64).to(DEVICE)
    indptr = torch.tensor([0, 3, 6], device=DEVICE)
    indices = torch.tensor([5, 2, 5, 9, 9, 19], device=DEVICE)
    values = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.5, 3.0], dtype=torch.float64, device=DEVICE)
    batch = CSRBatch(indptr, indices, values, n_items)
    keep = torch.tensor([True, True, False, True, True, True], device=DEVICE)
    rows = batch.row_ids()
    norms = torch.zeros(2, dtype=torch.float64, device=DEVICE).index_add_(0, rows, values * values).sqrt()
    for p, mask in ((0.0, None), (0.5, keep)):
        c = values / norms[rows]
        if mask is not None:
            c = c * mask / (1 - p)
        ref = b + torch.zeros(2, hidden, dtype=torch.float64, device=DEVICE).index_add_(0, rows, c[:, None] * w[indices])
        ref_dw = torch.zeros_like(w).index_add_(0, indices, c[:, None] * g[rows])
        out, dw, db = run(op, batch, w, b, g, dropout_rate=p, keep_mask=mask)
        assert_close(out, ref, 1e-14)
        assert_close(dw, ref_dw, 1e-14)
        assert_close(db, g.sum(0), 1e-14)
        _, dws, _ = run(op, batch, w, b, g, dropout_rate=p, keep_mask=mask, sparse_grad=True)
        # (torch's gradient has one entry per nonzero, Triton's one per row: the same after coalescing.)
        assert torch.equal(dws.coalesce().indices()[0], torch.tensor([2, 5, 9, 19], device=DEVICE))
        if impl == "triton":
            assert torch.equal(dws._indices()[0], torch.tensor([2, 5, 9, 19], device=DEVICE))
        assert_close(dws.to_dense(), ref_dw, 1e-14)
    # The canonical form (what the model passes) equals the dense reference with summed duplicates.
    x = torch.zeros(2, n_items, dtype=torch.float64, device=DEVICE)
    x.index_put_((rows, indices), values, accumulate=True)
    canon = as_csr_batch(x, n_items, dtype=torch.float64, device=DEVICE)
    out, dw, _ = run(op, canon, w, b, g)
    ref, ref_dw, _ = dense_reference(x, w, b, g)
    assert_close(out, ref, 1e-14)
    assert_close(dw, ref_dw, 1e-14)


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_row_sparse_grad_equals_dense(p, layer, impl):
    x, batch, w, b, g = make_case(seed=7, density=0.05)
    keep = random_keep_mask(batch.nnz, p, seed=3)
    _, dense_dw, dense_db = run(layer, batch, w, b, g, dropout_rate=p, keep_mask=keep)
    out, sparse_dw, sparse_db = run(layer, batch, w, b, g, dropout_rate=p, keep_mask=keep, sparse_grad=True)
    assert sparse_dw.layout == torch.sparse_coo and sparse_dw.shape == w.shape
    # Sorted rows, once each after coalescing (the Triton part checks that its gradient holds each
    # row once already): the batch's items for Triton; for torch, the items of the nonzeros that
    # dropout kept (it skips the dropped ones; an absent row and a zero row step alike in Adam); so
    # for C++.
    skips_dropped = impl in ("cpp", "torch") and p > 0
    used = batch.indices[keep] if skips_dropped else batch.indices
    assert not skips_dropped or used.numel() < batch.nnz
    assert torch.equal(sparse_dw.coalesce().indices()[0], torch.unique(used))
    assert_close(sparse_dw.to_dense(), dense_dw, 1e-14)
    assert torch.equal(sparse_db, dense_db)
    ref, ref_dw, _ = dense_reference(x, w, b, g, p, dense_mask(batch, keep))
    assert_close(sparse_dw.to_dense(), ref_dw, 1e-12)


def test_no_grad_paths_and_partial_grads(layer):
    # The prior's old encoder: dropout 0, under no_grad / frozen weights; and one of two grads.
    x, batch, w, b, g = make_case(seed=8)
    ref, ref_dw, ref_db = dense_reference(x, w, b, g)
    with torch.no_grad():
        out = layer(batch, w.requires_grad_(True), b)
    assert out.grad_fn is None
    assert_close(out, ref, 1e-12)
    w.requires_grad_(False)
    frozen = layer(batch, w, b)
    assert frozen.grad_fn is None and torch.equal(frozen, out)
    bb = b.clone().requires_grad_(True)
    layer(batch, w, bb).backward(g)
    assert_close(bb.grad, ref_db, 1e-14)
    ww = w.clone().requires_grad_(True)
    layer(batch, ww, b).backward(g)
    assert_close(ww.grad, ref_dw, 1e-12)


def test_strided_weight_view(layer):
    # weight_t as the transposed view of an H × I weight (rows not contiguous) still works.
    x, batch, w, b, g = make_case(n_items=101, seed=9, density=0.1)
    w_hi = w.t().contiguous()
    wt = w_hi.t().requires_grad_(True)  # a view: stride (1, I)
    out = layer(batch, wt, b)
    out.backward(g)
    ref, ref_dw, _ = dense_reference(x, w, b, g)
    assert_close(out, ref, 1e-12)
    assert_close(wt.grad, ref_dw, 1e-12)


def test_validation_errors_of_every_implementation(layer):
    _, batch, w, b, _ = make_case(n_items=30, seed=10, density=0.2)
    with pytest.raises(ValueError, match="dropout_rate"):
        layer(batch, w, b, dropout_rate=1.0)
    with pytest.raises(ValueError, match="dropout_rate"):
        layer(batch, w, b, dropout_rate=-0.1)
    with pytest.raises(ValueError, match="keep_mask"):
        layer(batch, w, b, dropout_rate=0.5, keep_mask=torch.ones(batch.nnz + 1, dtype=torch.bool, device=DEVICE))


# ============================================================ Triton only


@triton_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_seeded_dropout_matches_dense_with_extracted_mask(dtype):
    # The mask from dropout_keep_mask is the one forward and backward both used: the dense
    # reference built from it matches h1_pre and dW1.
    x, batch, w, b, g = make_case(dtype=dtype, seed=2, density=0.04)
    p, seed = 0.4, 1234
    keep = sil.dropout_keep_mask(seed, batch.nnz, p, DEVICE)
    assert keep.dtype == torch.bool and keep.shape == (batch.nnz,)
    assert 0 < int(keep.sum()) < batch.nnz
    out, dw, db = run(sil.sparse_input_layer, batch, w, b, g, dropout_rate=p, seed=seed)
    ref, ref_dw, ref_db = dense_reference(x, w, b, g, p, dense_mask(batch, keep))
    assert_close(out, ref, TOL[dtype])
    assert_close(dw, ref_dw, TOL[dtype])
    assert_close(db, ref_db, TOL[dtype])
    # ... and not the complementary or an all-kept mask.
    no_drop, _, _ = dense_reference(x, w, b, g)
    assert (out - no_drop).abs().max() > 1e-3
    assert_dropped_only_rows_zero(batch, keep, dw)


@triton_only
def test_keep_mask_argument_equals_seeded_mask():
    x, batch, w, b, g = make_case(seed=3, density=0.04)
    keep = sil.dropout_keep_mask(77, batch.nnz, 0.5, DEVICE)
    a = run(sil.sparse_input_layer, batch, w, b, g, dropout_rate=0.5, seed=77)
    c = run(sil.sparse_input_layer, batch, w, b, g, dropout_rate=0.5, keep_mask=keep)
    for got, want in zip(a, c):
        assert torch.equal(got, want)
    # A caller's own mask (here: keep only even positions) is honoured in forward and backward.
    own = torch.arange(batch.nnz, device=DEVICE) % 2 == 0
    out, dw, db = run(sil.sparse_input_layer, batch, w, b, g, dropout_rate=0.5, keep_mask=own)
    ref, ref_dw, ref_db = dense_reference(x, w, b, g, 0.5, dense_mask(batch, own))
    assert_close(out, ref, 1e-12)
    assert_close(dw, ref_dw, 1e-12)


@triton_only
def test_seed_none_follows_torch_manual_seed():
    _, batch, w, b, _ = make_case(seed=4, density=0.04)
    torch.manual_seed(5)
    a = sil.sparse_input_layer(batch, w, b, dropout_rate=0.5)
    torch.manual_seed(5)
    c = sil.sparse_input_layer(batch, w, b, dropout_rate=0.5)
    d = sil.sparse_input_layer(batch, w, b, dropout_rate=0.5)
    assert torch.equal(a, c)
    assert not torch.equal(a, d)


@triton_only
def test_keep_mask_rate_and_seeds():
    keep = sil.dropout_keep_mask(9, 20000, 0.3, DEVICE)
    assert abs(keep.float().mean().item() - 0.7) < 0.02
    assert torch.equal(keep, sil.dropout_keep_mask(9, 20000, 0.3, DEVICE))
    assert not torch.equal(keep, sil.dropout_keep_mask(10, 20000, 0.3, DEVICE))
    # The mask of the first n nonzeros does not depend on the batch size.
    assert torch.equal(keep[:500], sil.dropout_keep_mask(9, 500, 0.3, DEVICE))
    assert sil.dropout_keep_mask(9, 100, 0.0, DEVICE).all()
    assert sil.dropout_keep_mask(9, 0, 0.5, DEVICE).shape == (0,)


@triton_only
def test_empty_batch_with_seed_for_each_grad_method():
    hidden, n_items = 37, 50
    w = torch.randn(n_items, hidden, dtype=torch.float64, device=DEVICE)
    b = torch.randn(hidden, dtype=torch.float64, device=DEVICE)
    empty = CSRBatch(
        torch.zeros(4, dtype=torch.int64, device=DEVICE), torch.zeros(0, dtype=torch.int64, device=DEVICE),
        torch.zeros(0, dtype=torch.float64, device=DEVICE), n_items,
    )
    g = torch.randn(3, hidden, dtype=torch.float64, device=DEVICE)
    for p in (0.0, 0.5):
        for method in ("segment", "atomic"):
            op = functools.partial(sil.sparse_input_layer, seed=1, grad_method=method)
            out, dw, db = run(op, empty, w, b, g, dropout_rate=p)
            assert torch.equal(out, b.expand(3, hidden))
            assert torch.equal(dw, torch.zeros_like(w))
            assert_close(db, g.sum(0), 1e-14)
            _, dws, _ = run(op, empty, w, b, g, dropout_rate=p, sparse_grad=True)
            assert dws._nnz() == 0 and dws.shape == w.shape


@triton_only
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_row_sparse_grad_has_each_row_once(p):
    x, batch, w, b, g = make_case(seed=7, density=0.05)
    _, dense_dw, dense_db = run(sil.sparse_input_layer, batch, w, b, g, dropout_rate=p, seed=3)
    out, sparse_dw, sparse_db = run(sil.sparse_input_layer, batch, w, b, g, dropout_rate=p, seed=3, sparse_grad=True)
    assert sparse_dw.layout == torch.sparse_coo and sparse_dw.shape == w.shape
    # (AccumulateGrad drops the coalesced flag of a sparse .grad; the rows are unique all the same.)
    assert torch.equal(sparse_dw._indices()[0], torch.unique(batch.indices))  # the batch's items, sorted
    ww = w.clone().requires_grad_(True)
    (direct,) = torch.autograd.grad(sil.sparse_input_layer(batch, ww, b, dropout_rate=p, seed=3, sparse_grad=True), ww, g)
    assert direct.is_coalesced() and torch.equal(direct.indices()[0], torch.unique(batch.indices))
    assert_close(sparse_dw.to_dense(), dense_dw, 1e-14)
    assert torch.equal(sparse_db, dense_db)
    if p == 0.0:
        _, ref_dw, _ = dense_reference(x, w, b, g)
        assert_close(sparse_dw.to_dense(), ref_dw, 1e-12)


@triton_only
@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense", "row_sparse"])
@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_atomic_grad_matches_dense(dtype, p, sparse_grad):
    # grad_method="atomic" (zero fill + atomic scatter) against the float64 dense reference, on the
    # odd-sized case with an empty user, a one-item user, weighted values and dropout (mask
    # reproduced from the seed); h1_pre and db1 do not depend on the method.
    x, batch, w, b, g = make_case(dtype=dtype, seed=13, density=0.04)
    keep = sil.dropout_keep_mask(21, batch.nnz, p, DEVICE)
    ref, ref_dw, ref_db = dense_reference(x, w, b, g, p, dense_mask(batch, keep))
    op = functools.partial(sil.sparse_input_layer, seed=21, grad_method="atomic")
    out, dw, db = run(op, batch, w, b, g, dropout_rate=p, sparse_grad=sparse_grad)
    assert dw.dtype == dtype
    if sparse_grad:
        assert dw.layout == torch.sparse_coo and dw.shape == w.shape
        assert torch.equal(dw._indices()[0], torch.unique(batch.indices))
        dw = dw.to_dense()
    else:
        assert dw.layout == torch.strided
    assert_close(out, ref, TOL[dtype])
    assert_close(dw, ref_dw, TOL[dtype])
    assert_close(db, ref_db, TOL[dtype])
    if p > 0 and not sparse_grad:
        assert_dropped_only_rows_zero(batch, keep, dw)


@triton_only
def test_no_bias():
    x, batch, w, b, g = make_case(seed=8)
    ref, _, _ = dense_reference(x, w, b, g)
    nb = sil.sparse_input_layer(batch, w, None)
    assert_close(nb, ref - b, 1e-12)


@triton_only
def test_validation_errors():
    _, batch, w, b, _ = make_case(n_items=30, seed=10, density=0.2)
    with pytest.raises(ValueError, match="dropout_rate"):
        sil.sparse_input_layer(batch, w, b, dropout_rate=1.0)
    with pytest.raises(ValueError, match="dropout_rate"):
        sil.sparse_input_layer(batch, w, b, dropout_rate=-0.1)
    with pytest.raises(ValueError, match="rows"):
        sil.sparse_input_layer(batch, w[:-1], b)
    with pytest.raises(ValueError, match="bias"):
        sil.sparse_input_layer(batch, w, b[:-1])
    with pytest.raises(TypeError, match="dtype"):
        sil.sparse_input_layer(batch, w.float(), b.float())
    with pytest.raises(ValueError, match="keep_mask"):
        sil.sparse_input_layer(batch, w, b, dropout_rate=0.5, keep_mask=torch.ones(batch.nnz + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep_mask"):
        sil.sparse_input_layer(batch, w, b, dropout_rate=0.5, keep_mask=torch.ones(batch.nnz, device=DEVICE))
    with pytest.raises(ValueError, match="seed"):
        sil.sparse_input_layer(batch, w, b, dropout_rate=0.5, seed=-1)
    with pytest.raises(TypeError, match="CSRBatch"):
        sil.sparse_input_layer(batch.to_dense(), w, b)
    with pytest.raises(ValueError, match="grad_method.*'segment', 'atomic'.*'atomics'"):
        sil.sparse_input_layer(batch, w.requires_grad_(True), b, grad_method="atomics")
    bad = CSRBatch(batch.indptr, batch.indices.clone().fill_(30), batch.values, 30)
    if DEVICE.type == "cpu":
        with pytest.raises(IndexError):
            sil.sparse_input_layer(bad, w, b)


@triton_only
@pytest.mark.parametrize("grad_method", ["segment", "atomic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_float32(dtype, grad_method):
    # (atomic: dW1 is accumulated in an fp32 buffer, then cast.)
    x, batch, w, b, g = make_case(dtype=dtype, seed=12)
    op = functools.partial(sil.sparse_input_layer, seed=4, grad_method=grad_method)
    out, dw, db = run(op, batch, w, b, g, dropout_rate=0.3)
    keep = sil.dropout_keep_mask(4, batch.nnz, 0.3, DEVICE)
    x_rounded = batch.to_dense().double()  # the values as the op sees them
    ref, ref_dw, ref_db = dense_reference(x_rounded, w, b, g, 0.3, dense_mask(batch, keep))
    assert out.dtype == dw.dtype == db.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # one rounding of the result
    assert_close(out, ref, tol)
    assert_close(dw, ref_dw, tol)
    assert_close(db, ref_db, tol)


@triton_only
def test_atomic_launch_discards_the_autotuning_trials(monkeypatch):
    """When a launch autotunes, its trial launches all add into the output (no zero fill between
    them, so that the fill is not timed); the launch must then zero it and add once more."""

    class TuningScatter:
        cache = {}

        def __getitem__(self, grid):
            return self.launch

        def launch(self, out, *args):
            if not self.cache:  # a new key: three trials, then the choice is cached
                out += 3.0
                self.cache["key"] = "config"
            else:
                out += 1.0

    monkeypatch.setattr(sil_atomic, "_bwd_atomic", TuningScatter())
    grad_out = torch.ones(2, 3)
    indptr, rows, coef = torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.ones(2)
    for _ in range(2):  # the tuning call and a cached one give the same result
        out = sil_atomic.launch(torch.zeros(4, 3), grad_out, indptr, rows, coef)
        assert torch.equal(out, torch.ones(4, 3))


@triton_only
def test_autotune_keys_are_layout_and_size_buckets():
    assert sil_forward._fwd.keys == ["H", "USERS_BUCKET", "NNZ_BUCKET"]
    assert sil_backward._bwd.keys == ["H", "R_BUCKET", "NNZ_BUCKET"]
    assert sil_atomic._bwd_atomic.keys == ["H", "USERS_BUCKET", "NNZ_BUCKET", "R_BUCKET"]
