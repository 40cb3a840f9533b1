"""The composite prior's KL term, forward + backward in mu and logvar, B 500, K 200, float32, CPU:
CompositePrior.kl (the op recvae_fast.ops.composite_prior_kl; impl "cpp", the CPU default: its
forward is one C++ pass per row, recvae_fast::composite_prior_kl) against the authors' expression
through autograd (recvae_fast.testing.reference: log_norm_pdf minus the reference prior's log-density,
summed over k), and against its impl "torch" (torch ops: what CUDA runs). Correctness:
tests/test_kl_terms.py and tests/test_op_composite_prior_kl.py.
"""
from __future__ import annotations

import pytest
import torch

from recvae_fast.testing import reference
from recvae_fast.model import CompositePrior

N_USERS, LATENT = 500, 200
# Measured on the 2-core CPU, three runs: 4.39–5.84× and 1.81–2.51× (benches/results/bench_kl.jsonl);
# floors at half the lowest (benches/conftest.py).
FLOOR_VS_AUTHORS, FLOOR_VS_TORCH_OPS = 2.2, 0.9


class _GivenOld(torch.nn.Module):
    def __init__(self, old):
        super().__init__()
        self.old = old

    def forward(self, x, dropout_rate):
        return self.old


@pytest.fixture(scope="module")
def case():
    gen = torch.Generator().manual_seed(0)
    prior = CompositePrior(8, LATENT, 5)
    mu, logvar, eps, old_mu, old_logvar = (torch.randn(N_USERS, LATENT, generator=gen) for _ in range(5))
    mu.requires_grad_()
    logvar.requires_grad_()
    ref = reference.CompositePrior(8, LATENT, 5)
    ref.mu_prior, ref.logvar_prior = prior.mu_prior, prior.logvar_prior
    ref.logvar_uniform_prior = prior.logvar_uniform_prior
    ref.encoder_old = _GivenOld((old_mu, old_logvar))
    weights = torch.rand(N_USERS, generator=gen)
    return prior, ref, mu, logvar, eps, (old_mu, old_logvar), weights


def _ours(case, impl: str):
    prior, _, mu, logvar, eps, old, weights = case

    def run():
        mu.grad = logvar.grad = None
        (prior.kl(None, mu, logvar, eps, impl=impl, old_posterior=old) * weights).sum().backward()

    return run


def _authors(case):
    _, ref, mu, logvar, eps, _, weights = case

    def run():
        mu.grad = logvar.grad = None
        z = eps * torch.exp(0.5 * logvar) + mu
        ((reference.log_norm_pdf(z, mu, logvar) - ref(None, z)).sum(dim=-1) * weights).sum().backward()

    return run


def test_kl_vs_the_authors_expression(compare_speed, case):
    compare_speed(_ours(case, "cpp"), _authors(case), FLOOR_VS_AUTHORS, rounds=20, warmup=3)


def test_kl_cpp_forward_vs_torch_ops(compare_speed, case):
    compare_speed(_ours(case, "cpp"), _ours(case, "torch"), FLOOR_VS_TORCH_OPS, rounds=20, warmup=3)
