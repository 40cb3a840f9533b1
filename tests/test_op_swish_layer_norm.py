"""recvae_fast::swish_layer_norm (csrc/swish_layer_norm.cpp): y = LayerNorm(swish(pre + linear_bias +
residual)) in one pass per row, against the same composition of torch ops in float64, for the value
and the gradient of each of its five inputs: odd widths (1, under and over one vector), 0 and 1
rows, with and without linear_bias and residual, several threads, large |s| (the sigmoid's both
branches, no overflow); opcheck; a gradient asked of an op run without keep_s; bad input refused;
the entry point (recvae_fast.ops.swish_layer_norm) in both implementations against the same."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recvae_fast import _swish_layer_norm
from recvae_fast.ops.swish_layer_norm import swish_layer_norm

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}
EPS = 0.1


def inputs(n_rows, width, dtype, with_linear_bias, with_residual, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(dtype).requires_grad_()

    pre = leaf(n_rows, width, s=scale)
    linear_bias = leaf(width) if with_linear_bias else None
    residual = leaf(n_rows, width) if with_residual else None
    return pre, linear_bias, residual, leaf(width), leaf(width)


def reference(pre, linear_bias, residual, weight, bias):
    s = pre.double()
    if linear_bias is not None:
        s = s + linear_bias.double()
    if residual is not None:
        s = s + residual.double()
    return F.layer_norm(F.silu(s), (s.shape[-1],), weight.double(), bias.double(), EPS)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_rows,width", [(5, 1), (3, 7), (4, 17), (9, 600), (1, 33), (0, 5)])
@pytest.mark.parametrize("parts", ["pre", "pre+bias", "pre+residual", "all"])
@pytest.mark.parametrize("threads", [1, 3])
def test_value_and_every_gradient(dtype, n_rows, width, parts, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    args = inputs(n_rows, width, dtype, "bias" in parts or parts == "all", "residual" in parts or parts == "all",
                  seed=n_rows * 100 + width)
    y, s, mean, rstd = torch.ops.recvae_fast.swish_layer_norm(*args, EPS, True)
    want = reference(*args)
    assert y.dtype == dtype and s.shape == (n_rows, width) and mean.shape == rstd.shape == (n_rows,)
    torch.testing.assert_close(y.double(), want, **TOL[dtype])
    leaves = [t for t in args if t is not None]
    g = torch.randn(n_rows, width, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = torch.autograd.grad(y, leaves, g.to(dtype))
    wanted = torch.autograd.grad(want, leaves, g)
    for name, a, b in zip(("pre", "first optional", "second optional", "weight", "bias"), got, wanted):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b.double(), **TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_arguments_stay_finite(dtype):
    """|s| up to 200: exp(−|s|) underflows to 0 instead of exp(|s|) overflowing."""
    args = inputs(6, 40, dtype, True, True, scale=200.0, seed=3)
    y, *_ = torch.ops.recvae_fast.swish_layer_norm(*args, EPS, True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), reference(*args), **TOL[dtype])
    grads = torch.autograd.grad(y.sum(), [t for t in args if t is not None])
    assert all(torch.isfinite(t).all() for t in grads)


def test_without_keep_s_gives_the_same_value_and_refuses_a_gradient():
    args = inputs(4, 9, torch.float64, True, True)
    kept, *_ = torch.ops.recvae_fast.swish_layer_norm(*args, EPS, True)
    y, s, _, _ = torch.ops.recvae_fast.swish_layer_norm(*args, EPS, False)
    assert torch.equal(y, kept) and s.numel() == 0
    with pytest.raises(RuntimeError, match="keep_s=False"):
        y.sum().backward()


@pytest.mark.parametrize("impl", ["cpp", "torch"])
@pytest.mark.parametrize("with_linear", [True, False], ids=["linear+residual", "alone"])
def test_entry_point_value_and_every_gradient(impl, with_linear):
    """swish_layer_norm(pre, norm, linear, residual, impl=...): norm(swish(linear(pre) + residual))."""
    torch.manual_seed(11)
    width = 19
    norm = torch.nn.LayerNorm(width, eps=EPS).double()
    linear = torch.nn.Linear(width, width).double() if with_linear else None
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    pre = torch.randn(7, width, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(7, width, dtype=torch.float64, requires_grad=True) if with_linear else None
    y = swish_layer_norm(pre, norm, linear, residual, impl=impl)
    if with_linear:
        want = reference(pre @ linear.weight.T, linear.bias, residual, norm.weight, norm.bias)
    else:
        want = reference(pre, None, None, norm.weight, norm.bias)
    torch.testing.assert_close(y, want, **TOL[torch.float64])
    leaves = [pre, norm.weight, norm.bias] + ([residual, linear.weight, linear.bias] if with_linear else [])
    g = torch.randn(7, width, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    ran_cpp = "recvae_fast_swish_layer_norm" in type(y.grad_fn).__name__
    assert ran_cpp == (impl == "cpp")


def test_entry_point_refuses_what_cpp_cannot_run():
    pre = torch.randn(3, 5)
    with pytest.raises(ValueError, match="elementwise_affine"):
        swish_layer_norm(pre, torch.nn.LayerNorm(5, elementwise_affine=False), impl="cpp")
    plain = swish_layer_norm(pre, torch.nn.LayerNorm(5, elementwise_affine=False))  # the default: torch ops
    torch.testing.assert_close(plain, torch.nn.functional.layer_norm(torch.nn.functional.silu(pre), (5,)))
    with pytest.raises(TypeError, match="float32 or float64"):
        swish_layer_norm(pre.half(), torch.nn.LayerNorm(5).half(), impl="cpp")


def test_opcheck():
    args = inputs(5, 13, torch.float64, True, True)
    torch.library.opcheck(torch.ops.recvae_fast.swish_layer_norm.default, (*args, EPS, True))
    torch.library.opcheck(torch.ops.recvae_fast.swish_layer_norm.default, (args[0], None, None, *args[3:], EPS, True))


def test_bad_input_is_refused():
    x = np.zeros((3, 4))
    h, b = np.ones(4), np.zeros(3)

    def forward(pre=x, residual=None, gamma=h, y=None, mean=b):
        beta = np.zeros(pre.shape[-1]) if pre.ndim == 2 else h
        _swish_layer_norm.forward(pre, None, residual, gamma, beta, EPS, np.zeros_like(x) if y is None else y, None,
                                  mean, b.copy(), 1)

    with pytest.raises(TypeError, match="float32 or float64"):
        forward(pre=x.astype(np.float16))
    with pytest.raises(ValueError, match="pre must be 2-D"):
        forward(pre=np.zeros(3))
    with pytest.raises(ValueError, match="residual has the wrong shape"):
        forward(residual=np.zeros((3, 5)))
    with pytest.raises(TypeError, match="gamma has a different dtype"):
        forward(gamma=h.astype(np.float32))
    with pytest.raises(ValueError, match="mean has the wrong shape"):
        forward(mean=np.zeros(4))
    with pytest.raises(ValueError, match="y must be writable"):
        frozen = np.zeros_like(x)
        frozen.flags.writeable = False
        forward(y=frozen)
    with pytest.raises(ValueError, match="rows must not be empty"):
        forward(pre=np.zeros((3, 0)), gamma=np.ones(0), y=np.zeros((3, 0)))
    with pytest.raises(ValueError, match="ds has the wrong shape"):
        _swish_layer_norm.backward(x, x, b, b, h, np.zeros((3, 5)), h.copy(), h.copy(), h.copy(), 1)
