"""recvae_fast::composite_prior_kl (csrc/composite_prior_kl.cpp), the KL's forward on the CPU (impl "cpp"):
its values and gradients against the expression are in test_kl_terms.py (both implementations);
here, inf and NaN inputs give what impl "torch" gives, the result does not depend on the thread count,
bad input is refused by name before anything is written, and opcheck."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_kl_terms import _inputs, _prior

from recvae_fast import _composite_prior_kl


def _op_args(n_users: int, latent: int, dtype, spread: float = 1.0):
    prior = _prior(latent, dtype)
    mu, logvar, eps, (old_mu, old_logvar) = _inputs(n_users, latent, dtype, spread=spread)
    log_weights = [math.log(w) for w in prior.mixture_weights]
    return [mu.detach(), logvar.detach(), eps, prior.mu_prior.detach(), prior.logvar_prior.detach(), old_mu,
            old_logvar, prior.logvar_uniform_prior.detach(), log_weights]


def test_non_finite_inputs_give_what_torch_ops_give():
    """inf and NaN in mu, logvar, eps or the old posterior: the C++ pass gives the torch ops' kl and
    gradients (NaN where they give NaN, ±inf where they do)."""
    prior = _prior(5, torch.float64)
    mu, logvar, eps, (old_mu, old_logvar) = _inputs(6, 5, torch.float64)
    with torch.no_grad():
        mu[0, 1], logvar[1, 2], eps[2, 3] = math.inf, math.nan, -math.inf
        old_mu[3, 0], old_logvar[4, 4] = math.nan, math.inf
        mu[5, 0] = 1e200  # z so far out that every component's log density is −inf
    got = []
    for impl in ("cpp", "torch"):
        mu.grad = logvar.grad = None
        out = prior.kl(None, mu, logvar, eps, impl=impl, old_posterior=(old_mu, old_logvar))
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
        (dict(dz=good["eps"]), ValueError, "must not overlap the inputs"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            call(**change)
        assert (good["kl"] == 7.0).all(), change  # nothing written


def test_op_opcheck():
    args = _op_args(5, 4, torch.float64)
    torch.library.opcheck(torch.ops.recvae_fast.composite_prior_kl.default, (*args, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_entry_point_refuses_what_it_cannot_differentiate_or_run():
    """The op's entry point: differentiable in mu and logvar only, "cpp" on one CPU dtype; the
    default then takes torch ops for mixed dtypes, and gives the same value as "cpp" on one."""
    from recvae_fast.ops.composite_prior_kl import composite_prior_kl

    args = _op_args(6, 4, torch.float64)
    want = composite_prior_kl(*args, impl="cpp")
    torch.testing.assert_close(composite_prior_kl(*args, impl="torch"), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="differentiable in mu and logvar only"):
        composite_prior_kl(*args[:2], args[2].clone().requires_grad_(), *args[3:])
    mixed = [*args[:5], args[5].float(), *args[6:]]
    with pytest.raises(TypeError, match="one device in one dtype"):
        composite_prior_kl(*mixed, impl="cpp")
    torch.testing.assert_close(composite_prior_kl(*mixed), composite_prior_kl(*mixed, impl="torch"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="composite_prior_kl has no implementation 'triton'"):
        composite_prior_kl(*args, impl="triton")
