"""The row-sparse Adam step (recvae_fast.optim), each implementation ("cpp", "torch", and
"triton" under the interpreter) against torch.optim.Adam on the same gradient made dense, and
RowSparseAdam in training against the dense fc1 gradient."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import model_pair, random_ratings

from recvae_fast.optim import RowSparseAdam, adam_step_row_sparse_
from recvae_fast.training import TrainConfig, make_optimizers, train_step


@pytest.fixture(params=["cpp", "torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def impl(request):
    if request.param == "triton":
        pytest.importorskip("triton")
    return request.param


TOL = {
    (torch.float64, "cpp"): 1e-13, (torch.float64, "torch"): 1e-13, (torch.float64, "triton"): 1e-13,
    (torch.float32, "cpp"): 2e-6, (torch.float32, "torch"): 2e-6, (torch.float32, "triton"): 2e-6,
}


@pytest.mark.parametrize("model_impl", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_sparse_fc1_training_equals_dense(model_impl):
    """Three encoder steps on different batches (so rows go untouched for a while, and must still
    move as Adam moves them) give the same weights with either gradient layout."""
    if model_impl == "triton":
        pytest.importorskip("triton")
    n_items = 61
    batches = [random_ratings(7, n_items, seed=40 + k, max_items=6) for k in range(3)]
    dense_model, _ = model_pair(11, 4, n_items, impl=model_impl)
    sparse_model, _ = model_pair(11, 4, n_items, impl=model_impl)
    cfg = TrainConfig(hidden_dim=11, latent_dim=4, dropout_rate=0.0)
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


def test_row_sparse_adam_matches_torch_adam_on_dense_and_sparse_grads(impl):
    torch.manual_seed(0)
    p_ref = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    p_dense = p_ref.detach().clone().requires_grad_()
    p_sparse = p_ref.detach().clone().requires_grad_()
    ref = torch.optim.Adam([p_ref], lr=0.01)
    dense, sparse = RowSparseAdam([p_dense], lr=0.01, impl=impl), RowSparseAdam([p_sparse], lr=0.01, impl=impl)
    tol = TOL[torch.float64, impl]
    for step in range(4):
        rows = torch.tensor([step % 9, (3 * step + 1) % 9])
        values = torch.randn(2, 5, dtype=torch.float64)
        grad = torch.zeros(9, 5, dtype=torch.float64).index_add_(0, rows, values)
        p_ref.grad, p_dense.grad = grad.clone(), grad.clone()
        p_sparse.grad = torch.sparse_coo_tensor(rows[None], values, (9, 5), check_invariants=True)
        ref.step(), dense.step(), sparse.step()
        torch.testing.assert_close(p_dense, p_ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(p_sparse, p_ref, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="lr"):
        RowSparseAdam([p_ref], lr=0)


def _adam_pair(n_rows, hidden, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(n_rows, hidden, generator=gen, dtype=dtype)
    p_ref = start.clone().requires_grad_()
    p_fast = start.clone().requires_grad_()
    return p_ref, p_fast, gen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hidden", [1, 7, 37])
def test_row_sparse_step_matches_torch_adam(dtype, hidden, impl):
    """The step against torch.optim.Adam on the same gradient made dense: odd widths (vector
    tails), the first and last rows, a step with no gradient rows at all, an uncoalesced gradient
    with a duplicated row (its values sum), rows untouched for many steps."""
    n_rows = 13
    tol = TOL[dtype, impl]
    p_ref, p_fast, gen = _adam_pair(n_rows, hidden, dtype)
    ref = torch.optim.Adam([p_ref], lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    fast = RowSparseAdam([p_fast], lr=0.01, betas=(0.8, 0.99), eps=1e-6, impl=impl)
    row_sets = [[0, n_rows - 1], [], [5, 2, 5], [12], [3, 4, 6, 7, 8, 9, 10, 11], [1]]
    for rows in row_sets:
        rows = torch.tensor(rows, dtype=torch.int64)
        values = torch.randn(rows.numel(), hidden, generator=gen, dtype=dtype)
        p_ref.grad = torch.zeros(n_rows, hidden, dtype=dtype).index_add_(0, rows, values)
        p_fast.grad = torch.sparse_coo_tensor(rows[None], values, (n_rows, hidden), check_invariants=True)
        ref.step()
        fast.step()
        torch.testing.assert_close(p_fast, p_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(fast.state[p_fast]["exp_avg"], ref.state[p_ref]["exp_avg"], rtol=tol, atol=tol)
        torch.testing.assert_close(fast.state[p_fast]["exp_avg_sq"], ref.state[p_ref]["exp_avg_sq"], rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- the C++ code itself


def test_cpu_row_sparse_step_threads_agree():
    """Rows are independent, so the thread count cannot change a bit."""
    from recvae_fast import _row_sparse_adam

    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(301, 19, generator=gen) for _ in range(3)]
    rows = torch.tensor([0, 17, 150, 300])
    values = torch.randn(4, 19, generator=gen)
    outs = []
    for threads in (1, 2, 3):
        p, m, v = (t.clone() for t in start)
        m.abs_(), v.abs_()
        _row_sparse_adam.adam_step_row_sparse(p.numpy(), m.numpy(), v.numpy(), rows.numpy(), values.numpy(),
                                              1e-3, 0.9, 0.999, 1e-8, 3, threads)
        outs.append((p, m, v))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_cpu_row_sparse_step_sums_repeated_rows():
    """An uncoalesced gradient (a row listed twice) steps as its coalesced form does."""
    from recvae_fast import _row_sparse_adam

    gen = torch.Generator().manual_seed(5)
    values = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    start = [torch.rand(4, 9, generator=gen, dtype=torch.float64) for _ in range(3)]  # param, moments
    states = [[t.clone() for t in start], [t.clone() for t in start]]
    for (p, m, v), rows, vals in ((states[0], [2, 0, 2], values),
                                  (states[1], [0, 2], torch.stack([values[1], values[0] + values[2]]))):
        _row_sparse_adam.adam_step_row_sparse(p.numpy(), m.numpy(), v.numpy(), torch.tensor(rows).numpy(),
                                              vals.contiguous().numpy(), 1e-2, 0.9, 0.999, 1e-8, 2, 1)
    for a, b in zip(*states):
        assert torch.equal(a, b)


def test_cpu_row_sparse_step_rejects_bad_input():
    from recvae_fast import _row_sparse_adam

    p, m, v = (torch.zeros(5, 3) for _ in range(3))
    values = torch.ones(2, 3)

    def call(rows=(0, 1), values=values, p=p, m=m, v=v, step=1):
        _row_sparse_adam.adam_step_row_sparse(p.numpy(), m.numpy(), v.numpy(), torch.tensor(rows).numpy(),
                                              values.numpy(), 1e-3, 0.9, 0.999, 1e-8, step, 1)

    with pytest.raises(ValueError, match="row 5 outside"):
        call(rows=(0, 5))
    with pytest.raises(ValueError, match="row -1 outside"):
        call(rows=(-1, 0))
    with pytest.raises(TypeError, match="dtype"):
        call(values=values.double())
    with pytest.raises(ValueError, match="shape"):
        call(values=torch.ones(2, 4))
    with pytest.raises(ValueError, match="C-contiguous"):
        call(m=torch.zeros(3, 5).t())
    with pytest.raises(ValueError, match="step"):
        call(step=0)
    with pytest.raises(TypeError, match="float32 or float64"):
        call(p=torch.zeros(5, 3, dtype=torch.float16))
    assert not p.any() and not m.any() and not v.any()  # a refused call writes nothing


# ----------------------------------------------------------------------------- choice and errors


def test_row_sparse_adam_rejects_fully_sparse_grad(impl):
    p = torch.zeros(4, 3, requires_grad=True)
    opt = RowSparseAdam([p], impl=impl)
    p.grad = torch.zeros(4, 3).to_sparse()  # sparse in both dimensions
    with pytest.raises(ValueError, match="sparse_dim"):
        opt.step()
    assert opt.state[p]["step"] == 0  # a refused step is not counted


def test_half_and_strided_cpu_params(impl):
    """A transposed parameter steps with every implementation; float16 (the C++ code takes
    float32/float64) defaults to "torch" and is refused by an explicit "cpp" (eps 1e-4: 1e-8 is 0
    in float16)."""
    for start in (torch.randn(6, 4).half(), torch.randn(4, 6).t()):
        p_ref = start.clone().requires_grad_()
        p = start.clone().requires_grad_()
        rows, values = torch.tensor([1, 4]), torch.randn(2, 4).to(start.dtype)
        p_ref.grad = torch.zeros(6, 4, dtype=start.dtype).index_add_(0, rows, values)
        p.grad = torch.sparse_coo_tensor(rows[None], values, (6, 4), check_invariants=True)
        torch.optim.Adam([p_ref], lr=0.01, eps=1e-4).step()
        opt = RowSparseAdam([p], lr=0.01, eps=1e-4, impl=None if p.dtype == torch.float16 else impl)
        opt.step()
        assert not p.is_contiguous() or p.dtype == torch.float16
        tol = 2e-3 if p.dtype == torch.float16 else 1e-6
        torch.testing.assert_close(p, p_ref, rtol=tol, atol=tol)
        assert not torch.equal(p, start)
    half = torch.zeros(6, 4, dtype=torch.float16)
    grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 4, dtype=torch.float16), (6, 4))
    with pytest.raises(TypeError, match="float32 or float64"):
        adam_step_row_sparse_(half, grad, torch.zeros_like(half), torch.zeros_like(half), 1, impl="cpp")


def test_impl_errors(monkeypatch):
    p = torch.zeros(5, 3)
    grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 3), (5, 3))
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    with pytest.raises(ValueError, match="no implementation 'gpu'"):
        RowSparseAdam([p], impl="gpu")
    with pytest.raises(ValueError, match="no implementation 'gpu'"):
        adam_step_row_sparse_(p, grad, m, v, 1, impl="gpu")
    meta = torch.zeros(5, 3, device="meta")
    with pytest.raises(ValueError, match="CPU tensors"):
        adam_step_row_sparse_(meta, grad.to("meta"), torch.zeros_like(meta), torch.zeros_like(meta), 1, impl="cpp")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        adam_step_row_sparse_(p, grad, m, v, 1, impl="triton")
    with pytest.raises(ValueError, match="exp_avg must match"):
        adam_step_row_sparse_(p, grad, m.double(), v, 1, impl="torch")
    with pytest.raises(ValueError, match="dense"):
        adam_step_row_sparse_(p, grad.to_dense(), m, v, 1, impl="torch")
    with pytest.raises(ValueError, match="step"):
        adam_step_row_sparse_(p, grad, m, v, 0, impl="torch")
    assert not p.any() and not m.any() and not v.any()  # a refused call writes nothing
