"""CompositePrior.kl: Σ_k [log q(z|x) − log p(z)] per user with its gradients in mu and logvar
written out (model._KLPerUser), against the reference's (recvae_fast.reference) log_norm_pdf and
CompositePrior through autograd, on odd shapes; every test on both routes of its forward (the C++
recvae_fast::composite_prior_kl, the CPU default, and torch ops). Also the C++ op alone: non-finite
inputs as torch ops give them, thread counts, bad input refused by name, opcheck."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from recvae_fast import _composite_prior_kl, reference
from recvae_fast import model as model_module
from recvae_fast.model import CompositePrior


@pytest.fixture(autouse=True, params=[True, False], ids=["cpp-kl", "torch-kl"])
def kl_route(request, monkeypatch):
    """The KL's forward: C++ (CPU default) or torch ops (elsewhere)."""
    monkeypatch.setattr(model_module, "USE_CPP_KL", request.param)
    return request.param


def _prior(latent: int, dtype) -> CompositePrior:
    torch.manual_seed(0)
    prior = CompositePrior(4, latent, 5).to(dtype)
    with torch.no_grad():  # priors other than the default zeros and 10 too
        prior.mu_prior.normal_()
        prior.logvar_prior.uniform_(-1, 1)
        prior.logvar_uniform_prior.add_(torch.rand_like(prior.logvar_uniform_prior))
    return prior


def _inputs(n_users: int, latent: int, dtype, seed: int = 1, spread: float = 1.0):
    gen = torch.Generator().manual_seed(seed)

    def rand(scale=1.0):
        return (torch.randn(n_users, latent, generator=gen) * scale).to(dtype)

    mu, logvar = rand(spread).requires_grad_(), rand(spread).requires_grad_()
    return mu, logvar, rand(), (rand(spread), rand(spread))


class _GivenOldPosterior(torch.nn.Module):
    """Stands for the reference prior's encoder_old: returns the given (mu_old, logvar_old)."""

    def __init__(self, old):
        super().__init__()
        self.old = old

    def forward(self, x, dropout_rate):
        return self.old


def _expression(prior, mu, logvar, eps, old):
    """The authors' loss terms (recvae_fast.reference), sharing `prior`'s parameters: the
    reparameterised z, then log q − log p summed over k."""
    ref = reference.CompositePrior(4, mu.shape[-1], 5)
    ref.mu_prior, ref.logvar_prior = prior.mu_prior, prior.logvar_prior
    ref.logvar_uniform_prior = prior.logvar_uniform_prior
    ref.encoder_old = _GivenOldPosterior(old)
    z = eps * torch.exp(0.5 * logvar) + mu
    return (reference.log_norm_pdf(z, mu, logvar) - ref(None, z)).sum(dim=-1)


def _value_and_grads(fn, mu, logvar, weights):
    mu.grad = logvar.grad = None
    out = fn()
    (out * weights).sum().backward()
    return out.detach(), mu.grad, logvar.grad


@pytest.mark.parametrize("n_users, latent", [(0, 3), (1, 1), (7, 13), (33, 200)])
@pytest.mark.parametrize("spread", [1.0, 6.0])  # 6: logvar to ±20, components far apart
def test_kl_values_and_gradients_equal_the_expression(n_users, latent, spread):
    dtype = torch.float64
    prior = _prior(latent, dtype)
    mu, logvar, eps, old = _inputs(n_users, latent, dtype, spread=spread)
    weights = torch.rand(n_users, dtype=dtype)
    fused = _value_and_grads(lambda: prior.kl(None, mu, logvar, eps, old_posterior=old), mu, logvar, weights)
    plain = _value_and_grads(lambda: _expression(prior, mu, logvar, eps, old), mu, logvar, weights)
    assert fused[0].shape == (n_users,)
    for a, b, name in zip(fused, plain, ("kl", "grad mu", "grad logvar"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_kl_float32_stays_close_to_float64():
    prior64 = _prior(200, torch.float64)
    prior32 = copy.deepcopy(prior64).float()
    mu, logvar, eps, old = _inputs(50, 200, torch.float64)
    weights = torch.rand(50, dtype=torch.float64)
    exact = _value_and_grads(lambda: _expression(prior64, mu, logvar, eps, old), mu, logvar, weights)
    mu32, logvar32 = (t.detach().float().requires_grad_() for t in (mu, logvar))
    old32 = tuple(t.float() for t in old)
    got = _value_and_grads(lambda: prior32.kl(None, mu32, logvar32, eps.float(), old_posterior=old32), mu32, logvar32,
                           weights.float())
    for a, b, name in zip(got, exact, ("kl", "grad mu", "grad logvar"), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5, msg=name)


def test_kl_with_zero_noise_is_at_the_mean_and_without_grad_needs_no_slope():
    prior = _prior(9, torch.float64)
    mu, logvar, _, old = _inputs(5, 9, torch.float64)
    zeros = torch.zeros_like(mu)
    expected = _expression(prior, mu, logvar, zeros, old)
    torch.testing.assert_close(prior.kl(None, mu, logvar, zeros, old_posterior=old), expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(prior.kl(None, mu, logvar, zeros, old_posterior=old), expected, rtol=1e-12,
                                   atol=1e-12)


def test_kl_falls_back_to_the_expression_when_the_prior_needs_a_gradient():
    """The written-out gradients cover mu and logvar only: a prior parameter or an old posterior
    that requires grad takes the expression's autograd, so it gets its gradient."""
    prior = _prior(6, torch.float64)
    mu, logvar, eps, old = _inputs(4, 6, torch.float64)
    prior.mu_prior.requires_grad_(True)
    prior.kl(None, mu, logvar, eps, old_posterior=old).sum().backward()
    got = prior.mu_prior.grad.clone()
    prior.mu_prior.grad = None
    _expression(prior, mu, logvar, eps, old).sum().backward()
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, prior.mu_prior.grad, rtol=1e-12, atol=1e-12)
    prior.mu_prior.requires_grad_(False)
    old_mu = old[0].clone().requires_grad_()
    prior.kl(None, mu, logvar, eps, old_posterior=(old_mu, old[1])).sum().backward()
    assert old_mu.grad is not None and old_mu.grad.abs().sum() > 0


def _op_args(n_users: int, latent: int, dtype, spread: float = 1.0):
    prior = _prior(latent, dtype)
    mu, logvar, eps, (old_mu, old_logvar) = _inputs(n_users, latent, dtype, spread=spread)
    log_weights = [math.log(w) for w in prior.mixture_weights]
    return [mu.detach(), logvar.detach(), eps, prior.mu_prior.detach(), prior.logvar_prior.detach(), old_mu,
            old_logvar, prior.logvar_uniform_prior.detach(), log_weights]


def test_non_finite_inputs_give_what_torch_ops_give(kl_route, monkeypatch):
    """inf and NaN in mu, logvar, eps or the old posterior: the C++ pass gives the torch ops' kl and
    gradients (NaN where they give NaN, ±inf where they do)."""
    if not kl_route:
        pytest.skip("compares the C++ route with the torch one")
    prior = _prior(5, torch.float64)
    mu, logvar, eps, (old_mu, old_logvar) = _inputs(6, 5, torch.float64)
    with torch.no_grad():
        mu[0, 1], logvar[1, 2], eps[2, 3] = math.inf, math.nan, -math.inf
        old_mu[3, 0], old_logvar[4, 4] = math.nan, math.inf
        mu[5, 0] = 1e200  # z so far out that every component's log density is −inf
    got = []
    for route in (True, False):
        monkeypatch.setattr(model_module, "USE_CPP_KL", route)
        mu.grad = logvar.grad = None
        out = prior.kl(None, mu, logvar, eps, old_posterior=(old_mu, old_logvar))
        out.sum().backward()
        got.append((out.detach(), mu.grad, logvar.grad))
    for a, b, name in zip(*got, ("kl", "grad mu", "grad logvar"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True, msg=name)
    kl = got[0][0]  # the cases reach the result (an infinite old log-variance only drops its component)
    assert not torch.isfinite(kl[:4]).any() and torch.isfinite(kl[4]) and kl[5] == math.inf


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_op_result_does_not_depend_on_threads(dtype):
    args = _op_args(37, 29, dtype, spread=4.0)
    arrays = [a.contiguous().numpy() if isinstance(a, torch.Tensor) else a for a in args]
    arrays[3], arrays[4], arrays[7] = (arrays[i].reshape(-1) for i in (3, 4, 7))
    outs = []
    for threads in (1, 3):
        kl, slope, dz = np.empty(37, arrays[0].dtype), np.empty((37, 29), arrays[0].dtype), np.empty((37, 29), arrays[0].dtype)
        _composite_prior_kl.composite_prior_kl(*arrays, kl, slope, dz, threads)
        outs.append((kl, slope, dz))
    for a, b in zip(*outs):
        assert np.array_equal(a, b)


def test_op_refuses_bad_input():
    arrays = [a.contiguous().numpy() if isinstance(a, torch.Tensor) else a for a in _op_args(4, 3, torch.float64)]
    arrays[3], arrays[4], arrays[7] = (arrays[i].reshape(-1) for i in (3, 4, 7))
    names = ["mu", "logvar", "eps", "prior_mean", "prior_logvar", "old_mu", "old_logvar", "uniform_logvar", "log_weights"]
    good = dict(zip(names, arrays), kl=np.full(4, 7.0), slope=np.zeros((4, 3)), dz=np.zeros((4, 3)), n_threads=2)

    def call(**change):
        _composite_prior_kl.composite_prior_kl(**{**good, **change})

    cases = [
        (dict(logvar=np.zeros((4, 2))), ValueError, "logvar must be B × K like mu"),
        (dict(old_mu=np.zeros((3, 3))), ValueError, "old_mu must be B × K like mu"),
        (dict(prior_mean=np.zeros(4)), ValueError, "prior_mean must have K entries"),
        (dict(eps=np.zeros((4, 3), np.float32)), TypeError, "eps has a different dtype than mu"),
        (dict(mu=np.zeros((4, 3), np.float16)), TypeError, "float32 or float64"),
        (dict(mu=np.zeros(4)), ValueError, "mu must be 2-D"),
        (dict(old_logvar=np.zeros((3, 4)).T), ValueError, "old_logvar must be contiguous"),
        (dict(kl=np.zeros(3)), ValueError, "kl must have B entries"),
        (dict(dz=np.zeros((4, 3))[:, ::-1]), ValueError, "dz must be contiguous"),
        (dict(slope=None), ValueError, "slope and dz go together"),
        (dict(log_weights=[0.0, 0.0]), ValueError, "log_weights must have 3 entries"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            call(**change)
        assert (good["kl"] == 7.0).all(), change  # nothing written


def test_op_opcheck():
    args = _op_args(5, 4, torch.float64)
    torch.library.opcheck(torch.ops.recvae_fast.composite_prior_kl.default, (*args, True),
                          test_utils=("test_schema", "test_faketensor"))
