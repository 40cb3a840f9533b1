"""CompositePrior.kl: Σ_k [log q(z|x) − log p(z)] per user with its gradients in mu and logvar
written out (the op recvae_fast.ops.composite_prior_kl), against the reference's
(recvae_fast.testing.reference) log_norm_pdf and CompositePrior through autograd, on odd shapes; every test on both implementations of its forward
(impl "cpp": recvae_fast::composite_prior_kl, the CPU default, and impl "torch"; the C++ op alone:
test_op_composite_prior_kl.py)."""
from __future__ import annotations

import copy

import pytest
import torch

from recvae_fast.testing import reference
from recvae_fast.model import CompositePrior


@pytest.fixture(params=["cpp", "torch"], ids=["cpp-kl", "torch-kl"])
def kl_route(request):
    """The KL's implementation: C++ (CPU default) or torch ops."""
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
    """The authors' loss terms (recvae_fast.testing.reference), sharing `prior`'s parameters: the
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
def test_kl_values_and_gradients_equal_the_expression(n_users, latent, spread, kl_route):
    dtype = torch.float64
    prior = _prior(latent, dtype)
    mu, logvar, eps, old = _inputs(n_users, latent, dtype, spread=spread)
    weights = torch.rand(n_users, dtype=dtype)
    fused = _value_and_grads(lambda: prior.kl(None, mu, logvar, eps, impl=kl_route, old_posterior=old), mu, logvar,
                             weights)
    plain = _value_and_grads(lambda: _expression(prior, mu, logvar, eps, old), mu, logvar, weights)
    assert fused[0].shape == (n_users,)
    for a, b, name in zip(fused, plain, ("kl", "grad mu", "grad logvar"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_kl_float32_stays_close_to_float64(kl_route):
    prior64 = _prior(200, torch.float64)
    prior32 = copy.deepcopy(prior64).float()
    mu, logvar, eps, old = _inputs(50, 200, torch.float64)
    weights = torch.rand(50, dtype=torch.float64)
    exact = _value_and_grads(lambda: _expression(prior64, mu, logvar, eps, old), mu, logvar, weights)
    mu32, logvar32 = (t.detach().float().requires_grad_() for t in (mu, logvar))
    old32 = tuple(t.float() for t in old)
    got = _value_and_grads(lambda: prior32.kl(None, mu32, logvar32, eps.float(), impl=kl_route, old_posterior=old32),
                           mu32, logvar32, weights.float())
    for a, b, name in zip(got, exact, ("kl", "grad mu", "grad logvar"), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5, msg=name)


def test_kl_with_zero_noise_is_at_the_mean_and_without_grad_needs_no_slope(kl_route):
    prior = _prior(9, torch.float64)
    mu, logvar, _, old = _inputs(5, 9, torch.float64)
    zeros = torch.zeros_like(mu)
    expected = _expression(prior, mu, logvar, zeros, old)
    torch.testing.assert_close(prior.kl(None, mu, logvar, zeros, impl=kl_route, old_posterior=old), expected,
                               rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(prior.kl(None, mu, logvar, zeros, impl=kl_route, old_posterior=old), expected,
                                   rtol=1e-12, atol=1e-12)


def test_kl_falls_back_to_the_expression_when_the_prior_needs_a_gradient(kl_route):
    """The written-out gradients cover mu and logvar only: a prior parameter or an old posterior
    that requires grad takes the expression's autograd, so it gets its gradient."""
    prior = _prior(6, torch.float64)
    mu, logvar, eps, old = _inputs(4, 6, torch.float64)
    prior.mu_prior.requires_grad_(True)
    prior.kl(None, mu, logvar, eps, impl=kl_route, old_posterior=old).sum().backward()
    got = prior.mu_prior.grad.clone()
    prior.mu_prior.grad = None
    _expression(prior, mu, logvar, eps, old).sum().backward()
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, prior.mu_prior.grad, rtol=1e-12, atol=1e-12)
    prior.mu_prior.requires_grad_(False)
    old_mu = old[0].clone().requires_grad_()
    prior.kl(None, mu, logvar, eps, impl=kl_route, old_posterior=(old_mu, old[1])).sum().backward()
    assert old_mu.grad is not None and old_mu.grad.abs().sum() > 0
