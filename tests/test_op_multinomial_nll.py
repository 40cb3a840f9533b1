"""The multinomial NLL op (recvae_fast.ops.multinomial_nll), each implementation ("cpp", "torch",
and "triton" under the interpreter) against the dense reference.

The reference is logits = z·Wᵀ + b, −(log_softmax(logits)·X).sum(−1), with autograd, in float64.
The first part tests the op's contract through `multinomial_nll(..., impl=impl)`; the second
part what only the Triton implementation has (bias=None, which gradients its kernels prepare, its
validation, float32 dot precision, autotune keys, tensor-core configs). The cpp and torch
implementations' item blocking is tested in test_cpu_blocked_nll.py. Without CUDA the kernels run
in the Triton interpreter (numpy on the CPU), so the shapes here are small.
"""
from __future__ import annotations

import functools
import importlib

import pytest
import torch

from recvae_fast.ops.multinomial_nll import multinomial_nll
from recvae_fast.sparse import CSRBatch, as_csr_batch

from helpers import DEVICE, triton_problem

TRITON_PROBLEM = triton_problem()
mnll = None if TRITON_PROBLEM else importlib.import_module("recvae_fast.kernels.multinomial_nll")
nll_configs = None if TRITON_PROBLEM else importlib.import_module("recvae_fast.kernels.nll_configs")
nll_forward = None if TRITON_PROBLEM else importlib.import_module("recvae_fast.kernels.nll_forward")
nll_backward = None if TRITON_PROBLEM else importlib.import_module("recvae_fast.kernels.nll_backward")
# Marks of every Triton test: run under the interpreter, skipped (with the reason) where it cannot.
TRITON_MARKS = [pytest.mark.interpreter, pytest.mark.skipif(TRITON_PROBLEM is not None, reason=str(TRITON_PROBLEM))]
triton_only = pytest.mark.interpreter if TRITON_PROBLEM is None else pytest.mark.skip(reason=TRITON_PROBLEM)


@pytest.fixture(params=["cpp", "torch", pytest.param("triton", marks=TRITON_MARKS)])
def impl(request):
    return request.param


@pytest.fixture
def nll(impl):
    """multinomial_nll with the implementation under test."""
    return functools.partial(multinomial_nll, impl=impl)


def make_case(n_users, n_items, k, dtype=torch.float64, density=0.03, seed=0, z_scale=1.0, bias=True, special=True):
    """Weighted interactions with an empty user (row 1) and a one-item user (row 2)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_users, n_items, generator=gen) < density
    x = mask.double() * (0.5 + 2.5 * torch.rand(n_users, n_items, generator=gen, dtype=torch.float64))
    if special and n_users > 1:
        x[1] = 0
    if special and n_users > 2:
        x[2] = 0
        x[2, n_items // 2] = 1.7
    z = torch.randn(n_users, k, generator=gen, dtype=torch.float64) * z_scale
    w = torch.randn(n_items, k, generator=gen, dtype=torch.float64) / k**0.5
    b = torch.randn(n_items, generator=gen, dtype=torch.float64) if bias else None
    g = torch.randn(n_users, generator=gen, dtype=torch.float64)
    batch = as_csr_batch(x.to(dtype).to(DEVICE), n_items, dtype=dtype, device=DEVICE)
    cast = lambda t: None if t is None else t.to(dtype).to(DEVICE)  # noqa: E731
    return x.to(dtype).to(DEVICE), batch, cast(z), cast(w), cast(b), cast(g)


def dense_nll(z, w, b, x):
    logits = z @ w.T + (b if b is not None else 0)
    return -(torch.log_softmax(logits, dim=-1) * x).sum(-1)


def run_both(op, z, w, b, batch, x, g, flags=(True, True, True), ref_dtype=torch.float64):
    """(loss of `op`, its grads, reference loss, reference grads) for the inputs flagged."""
    leaves = [t.detach().clone().requires_grad_(f) if t is not None else None for t, f in zip((z, w, b), flags)]
    out = op(*leaves, batch)
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, wrt, g) if wrt else []

    ref_leaves = [
        t.detach().to(ref_dtype).requires_grad_(f) if t is not None else None for t, f in zip((z, w, b), flags)
    ]
    ref = dense_nll(*ref_leaves, x.to(ref_dtype))
    ref_wrt = [t for t in ref_leaves if t is not None and t.requires_grad]
    ref_grads = torch.autograd.grad(ref, ref_wrt, g.to(ref_dtype)) if ref_wrt else []
    return out, grads, ref, ref_grads


def assert_close(actual, expected, rtol):
    """Tolerance relative to the largest magnitude of the expected tensor (sums of many terms)."""
    scale = expected.abs().max().item() + 1e-30
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:g} × {scale:.3g}"


@pytest.fixture
def highest_precision():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


@pytest.fixture
def tf32_precision():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(old)


FLAGS = pytest.mark.parametrize(
    "flags", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)],
    ids=["z_only", "weight_only", "bias_only", "decoder_only"],
)


# ============================================================ the op's contract, every implementation


def test_float64_odd_shape_all_grads(nll):
    # B, I, K not multiples of any tile; several item splits; an empty and a one-item user.
    x, batch, z, w, b, g = make_case(37, 1001, 13, seed=1)
    out, grads, ref, ref_grads = run_both(nll, z, w, b, batch, x, g)
    assert out.shape == (37,) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert out[1].item() == 0.0  # empty user
    assert len(grads) == 3
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_float32_highest_matches(nll, highest_precision):
    x, batch, z, w, b, g = make_case(21, 333, 24, dtype=torch.float32, seed=2)
    out, grads, ref, ref_grads = run_both(nll, z, w, b, batch, x, g)
    assert out.dtype == torch.float32
    assert_close(out, ref, 1e-5)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        assert_close(got, want, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_logits_are_stable(dtype, nll, highest_precision):
    # z scaled so that the logits reach about ±80: exp would overflow without the running max.
    x, batch, z, w, b, g = make_case(9, 150, 16, dtype=dtype, seed=3, z_scale=20.0)
    logits = z.double() @ w.double().T + b.double()
    assert logits.abs().max() > 60
    out, grads, ref, ref_grads = run_both(nll, z, w, b, batch, x, g)
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in grads)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(out, ref, tol)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, tol)


@FLAGS
def test_each_gradient_alone(flags, nll):
    x, batch, z, w, b, g = make_case(11, 140, 8, seed=4)
    out, grads, ref, ref_grads = run_both(nll, z, w, b, batch, x, g, flags=flags)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert len(grads) == sum(flags)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_no_grad_mode(nll):
    x, batch, z, w, b, _ = make_case(7, 90, 5, seed=5)
    z = z.requires_grad_()
    with torch.no_grad():
        out = nll(z, w, b, batch)
    assert not out.requires_grad
    torch.testing.assert_close(out, dense_nll(z.detach(), w, b, x), rtol=1e-10, atol=1e-10)


def test_tiny_catalogue(nll):
    # I smaller than one tile (of the Triton kernels), and I = 1 (the loss is then 0).
    for n_items in (5, 1):
        x, batch, z, w, b, g = make_case(6, n_items, 3, density=0.5, seed=6)
        out, grads, ref, ref_grads = run_both(nll, z, w, b, batch, x, g)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_all_users_empty(nll):
    x, batch, z, w, b, g = make_case(4, 70, 6, density=0.0, seed=7, special=False)
    assert batch.nnz == 0
    out, grads, ref, ref_grads = run_both(nll, z, w, b, batch, x, g)
    assert (out == 0).all()
    assert len(grads) == 3
    for got in grads:
        assert (got == 0).all()


def test_non_contiguous_inputs(nll):
    x, batch, z, w, b, g = make_case(10, 120, 7, seed=8)
    z_nc = z.T.contiguous().T  # column-major view
    w_nc = w.T.contiguous().T
    b_nc = torch.stack([b, b], dim=1)[:, 0]  # stride 2
    assert not (z_nc.is_contiguous() or w_nc.is_contiguous() or b_nc.is_contiguous())
    out, grads, ref, ref_grads = run_both(nll, z_nc, w_nc, b_nc, batch, x, g)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_bfloat16_matches(nll, impl):
    x, batch, z, w, b, g = make_case(12, 200, 16, dtype=torch.bfloat16, seed=9)
    if impl == "cpp":  # the C++ block step takes float32/float64: refused, not run in another code
        with pytest.raises(TypeError, match="impl 'cpp' takes float32 or float64, got torch.bfloat16"):
            nll(z, w, b, batch)
        return
    out, grads, ref, ref_grads = run_both(nll, z, w, b, batch, x, g)
    assert out.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in grads)
    assert_close(out, ref, 2e-2)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, 2e-2)


def test_empty_batch(nll):
    w = torch.randn(30, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.zeros(30, dtype=torch.float64, device=DEVICE)
    z = torch.randn(0, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    batch = as_csr_batch(torch.zeros(0, 30, dtype=torch.float64, device=DEVICE), 30, dtype=torch.float64, device=DEVICE)
    out = nll(z, w, b, batch)
    assert out.shape == (0,)
    out.sum().backward()
    assert (w.grad == 0).all()


# ============================================================ Triton only


@triton_only
def test_float32_tf32_path_runs(tf32_precision):
    # "high" selects the tensor-core code path (whole-K dots, resident tiles); the interpreter
    # multiplies exactly, so here it must match like "highest" does.
    x, batch, z, w, b, g = make_case(21, 333, 24, dtype=torch.float32, seed=12)
    out, grads, ref, ref_grads = run_both(mnll.multinomial_nll, z, w, b, batch, x, g)
    assert_close(out, ref, 1e-5)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, 1e-5)


@triton_only
@FLAGS
def test_each_gradient_alone_prepares_only_what_is_needed(flags, monkeypatch):
    x, batch, z, w, b, g = make_case(11, 140, 8, seed=4)
    calls = {"forward_dz": [], "backward_w": []}
    real_forward, real_backward = mnll._forward, mnll.backward_w

    def spy_forward(*args):
        calls["forward_dz"].append(args[6])
        return real_forward(*args)

    def spy_backward(*args):
        calls["backward_w"].append(args[9:11])
        return real_backward(*args)

    monkeypatch.setattr(mnll, "_forward", spy_forward)
    monkeypatch.setattr(mnll, "backward_w", spy_backward)
    out, grads, ref, ref_grads = run_both(mnll.multinomial_nll, z, w, b, batch, x, g, flags=flags)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert len(grads) == sum(flags)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # Only the work that is needed: dz is prepared in the forward iff z needs it; the item-tile
    # backward runs iff weight or bias need a gradient, and computes only those.
    assert calls["forward_dz"] == [flags[0]]
    assert calls["backward_w"] == ([(flags[1], flags[2])] if (flags[1] or flags[2]) else [])


@triton_only
def test_no_grad_mode_skips_dz(monkeypatch):
    x, batch, z, w, b, _ = make_case(7, 90, 5, seed=5)
    z = z.requires_grad_()
    prepared = []
    real_forward = mnll._forward

    def spy_forward(*args):
        prepared.append(args[6])
        return real_forward(*args)

    monkeypatch.setattr(mnll, "_forward", spy_forward)
    with torch.no_grad():
        out = mnll.multinomial_nll(z, w, b, batch)
    assert not out.requires_grad
    assert prepared == [False]
    torch.testing.assert_close(out, dense_nll(z.detach(), w, b, x), rtol=1e-10, atol=1e-10)


@triton_only
def test_tiny_catalogue_and_no_bias():
    # I smaller than one tile, I = 1 (the loss is then exactly 0), and bias=None.
    for n_items in (5, 1):
        x, batch, z, w, _, g = make_case(6, n_items, 3, density=0.5, seed=6, bias=False)
        out, grads, ref, ref_grads = run_both(mnll.multinomial_nll, z, w, None, batch, x, g, flags=(True, True, False))
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@triton_only
def test_dot_precision_follows_torch_setting():
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert mnll._dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert mnll._dot_precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("medium")
        assert mnll._dot_precision(torch.float32) == "tf32"
        assert mnll._dot_precision(torch.float64) == "ieee"
    finally:
        torch.set_float32_matmul_precision(old)


@triton_only
def test_validation_errors():
    # (The torch implementation checks none of these itself: torch's own errors name them.)
    x, batch, z, w, b, _ = make_case(5, 40, 4, seed=10)
    with pytest.raises(TypeError, match="CSRBatch"):
        mnll.multinomial_nll(z, w, b, x)
    with pytest.raises(ValueError, match="K="):
        mnll.multinomial_nll(z, w[:, :3], b, batch)
    with pytest.raises(ValueError, match="bias"):
        mnll.multinomial_nll(z, w, b[:-1], batch)
    with pytest.raises(ValueError, match="users"):
        mnll.multinomial_nll(z[:-1], w, b, batch)
    with pytest.raises(ValueError, match="items"):
        mnll.multinomial_nll(z, w[:-1], b[:-1], batch)
    with pytest.raises(ValueError, match="2-D"):
        mnll.multinomial_nll(z[0], w, b, batch)
    with pytest.raises(TypeError, match="share a dtype"):
        mnll.multinomial_nll(z.float(), w, b, batch)
    with pytest.raises(TypeError, match="dtype"):
        mnll.multinomial_nll(z.to(torch.int64), w.to(torch.int64), b.to(torch.int64), batch)
    bad = CSRBatch(batch.indptr.to(torch.int32), batch.indices, batch.values, batch.n_cols)
    with pytest.raises(TypeError, match="int64"):
        mnll.multinomial_nll(z, w, b, bad)


@triton_only
def test_autotune_keys_bucket_the_batch_size():
    """B enters the keys as a power-of-two bucket: the last, smaller batch of an epoch and the
    evaluation batches reuse the tuning instead of re-tuning for each new size."""
    for tuner in (*nll_forward._FWD.values(), *nll_backward._BWD.values()):
        assert "B_BUCKET" in tuner.keys and "B" not in tuner.keys
    from recvae_fast.kernels._common import size_bucket

    assert size_bucket(500) == size_bucket(300) != size_bucket(600)


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_core_large_k_configs(dtype, monkeypatch, tf32_precision):
    """The K-chunked 16-row tensor-core configs that GPUs use for K > 256, forced here (the
    interpreter otherwise runs one whole-K config): K = 70 (three chunks of 32, the last partial),
    odd B and I, all gradients."""
    fwd_cfg = [c for c in nll_configs.GPU_CONFIGS["fwd", False] if c.kwargs["KC"]][-1]
    bwd_cfg = [c for c in nll_configs.GPU_CONFIGS["bwd", False] if c.kwargs["KC"]][-1]
    assert fwd_cfg.kwargs["BLOCK_B"] == 16 and bwd_cfg.kwargs["BLOCK_I"] == 16
    monkeypatch.setattr(nll_forward._FWD[False], "configs", [fwd_cfg])
    monkeypatch.setattr(nll_backward._BWD[False], "configs", [bwd_cfg])
    x, batch, z, w, b, g = make_case(19, 301, 70, dtype=dtype, seed=21)
    out, grads, ref, ref_grads = run_both(mnll.multinomial_nll, z, w, b, batch, x, g)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(out, ref, tol)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, tol)
