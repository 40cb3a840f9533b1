"""The Triton row-sparse Adam step against torch.optim.Adam with the dense gradient."""
from __future__ import annotations

import os

import pytest
import torch

from recvae_fast.kernels._common import interpreter_numpy_problem
import recvae_fast.kernels.row_sparse_adam as rsa

pytestmark = pytest.mark.interpreter

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "no CUDA and TRITON_INTERPRET was not set before triton was imported (tests/conftest.py sets it)",
        allow_module_level=True,
    )
if DEVICE.type == "cpu" and interpreter_numpy_problem():
    pytest.skip(interpreter_numpy_problem(), allow_module_level=True)

HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)


def rel_err(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("n_items,hidden", [(40, 37), (1, 1), (19, 130)])
def test_float64_steps_match_torch_adam(n_items, hidden):
    """Three steps with different touched rows (untouched rows keep decaying and moving, as in
    Adam; one step touches no row at all); fp64 agrees with torch.optim.Adam to 1e-12."""
    gen = torch.Generator().manual_seed(11)
    p0 = torch.randn(n_items, hidden, generator=gen, dtype=torch.float64).to(DEVICE)
    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], **HYPER)
    param = p0.clone()
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    touched = ([0, n_items - 1], [], [n_items // 2, 0], [n_items - 1])
    for step, rows in enumerate(touched, start=1):
        rows = torch.tensor(rows, dtype=torch.int64, device=DEVICE)
        vals = torch.randn(rows.numel(), hidden, generator=gen, dtype=torch.float64).to(DEVICE)
        grad = torch.sparse_coo_tensor(rows[None], vals, (n_items, hidden), check_invariants=True).coalesce()
        ref.grad = grad.to_dense()
        opt.step()
        rsa.adam_step_row_sparse_(param, grad, m, v, step, **HYPER)
    assert rel_err(param - p0, ref.detach() - p0) <= 1e-12
    assert rel_err(m, opt.state[ref]["exp_avg"]) <= 1e-12
    assert rel_err(v, opt.state[ref]["exp_avg_sq"]) <= 1e-12


def test_float32_step_matches_torch_adam():
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(23, 45, generator=gen).to(DEVICE)
    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], **HYPER)
    param, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    rows = torch.tensor([2, 5, 22], device=DEVICE)
    grad = torch.sparse_coo_tensor(rows[None], torch.randn(3, 45, generator=gen).to(DEVICE), p0.shape, check_invariants=True).coalesce()
    ref.grad = grad.to_dense()
    opt.step()
    rsa.adam_step_row_sparse_(param, grad, m, v, 1, **HYPER)
    # fp32 rounding of p (|p| ~ 1) dominates: compare the values, not the ~0.01 updates.
    assert rel_err(param, ref.detach()) <= 1e-6
    assert rel_err(v, opt.state[ref]["exp_avg_sq"]) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_receives_hyperparameters_in_accumulation_dtype(dtype, monkeypatch):
    """Triton compiles Python float arguments as fp32 on GPUs (the interpreter keeps them fp64, so
    the comparison above cannot see it): no float may reach the kernel as a Python scalar, and the
    hyper-parameter tensor holds the float64 values of 1 − β1, 1 − β2, ... in the parameter's
    accumulation dtype. Checked on the launch arguments."""
    launches = []

    class Capture:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(args)

    monkeypatch.setattr(rsa, "_adam_kernel", Capture())
    monkeypatch.setattr(rsa, "wrap_triton", lambda kernel: kernel)  # it accepts only real kernels
    param = torch.zeros(4, 3, dtype=dtype, device=DEVICE)
    grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 3, dtype=dtype), (4, 3), check_invariants=True).to(DEVICE)
    rsa.adam_step_row_sparse_(param, grad, torch.zeros_like(param), torch.zeros_like(param), 3, **HYPER)
    (args,) = launches
    assert not any(isinstance(a, float) for a in args)
    (hyper,) = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() == 1]
    assert hyper.dtype == dtype
    beta1, beta2 = HYPER["betas"]
    expected = [1 - beta1, beta2, 1 - beta2, HYPER["weight_decay"], HYPER["lr"] / (1 - beta1**3),
                (1 - beta2**3) ** 0.5, HYPER["eps"]]
    assert hyper.cpu().tolist() == torch.tensor(expected, dtype=dtype).tolist()
    if dtype == torch.float64:
        assert hyper[2].item() == 1 - 0.999  # not fp32's 0.00099998713


def test_validation_errors():
    param = torch.zeros(4, 3, dtype=torch.float64, device=DEVICE)
    grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 3, dtype=torch.float64), (4, 3), check_invariants=True).to(DEVICE)
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    with pytest.raises(ValueError, match="step counts from 1"):
        rsa.adam_step_row_sparse_(param, grad, m, v, 0)
    with pytest.raises(ValueError, match="sparse COO"):
        rsa.adam_step_row_sparse_(param, grad.to_dense(), m, v, 1)
    with pytest.raises(ValueError, match="shaped like param"):
        rsa.adam_step_row_sparse_(param, grad, m[:2], v, 1)
