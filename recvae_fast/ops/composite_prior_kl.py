"""The composite prior's KL term per user, Σ_k [log q(z|x) − log p(z)], with its gradients in mu and
logvar written out.

    impl "torch"   torch ops, some 30 elementwise ops on B × K (the expression's autograd graph is
                   about 60: 8.0 against 3.3 ms, forward + backward, at B 500, K 200 on 2 CPU threads)
    impl "cpp"     the forward in one C++ pass per row (csrc/composite_prior_kl.cpp): forward +
                   backward 3.5 → 1.6 ms at that shape

"cpp" runs as the registered op

    recvae_fast::composite_prior_kl(mu, logvar, eps, prior_mean, prior_logvar, old_mu, old_logvar,
                                    uniform_logvar, log_weights, keep_slope) -> (kl, slope, dz)
        the KL per user, and with keep_slope the slope and dz its written-out gradients need; no
        autograd of its own (the autograd Function below carries both implementations). Under
        torch.autocast it computes in float32.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..precision import register_float32_autocast
from .dispatch import FLOAT32_64, resolve_impl

LOG_2PI = math.log(2 * math.pi)


def composite_prior_kl(mu: Tensor, logvar: Tensor, eps: Tensor, prior_mean: Tensor, prior_logvar: Tensor,
                       old_mu: Tensor, old_logvar: Tensor, uniform_logvar: Tensor, log_weights: list[float], *,
                       impl: str | None = None) -> Tensor:
    """Σ_k [log q(z|x) − log p(z)] per user [B] for z = mu + eps·σ (σ = exp(logvar/2)),
    q(z|x) = N(mu, exp(logvar)) and p the mixture of N(prior_mean, e^prior_logvar),
    N(old_mu, e^old_logvar) and N(prior_mean, e^uniform_logvar) with weights exp(log_weights).
    Differentiable in mu and logvar only (the other inputs must not need a gradient).
    impl: see recvae_fast.ops.dispatch ("cpp": every tensor on the CPU in one dtype, float32/float64)."""
    tensors = (mu, logvar, eps, prior_mean, prior_logvar, old_mu, old_logvar, uniform_logvar)
    grad_on = torch.is_grad_enabled()
    if grad_on and any(t.requires_grad for t in tensors[2:]):
        raise ValueError("composite_prior_kl is differentiable in mu and logvar only; eps, the prior's tensors and "
                         "the old posterior must not need a gradient")
    one_kind = all(t.device == mu.device and t.dtype == mu.dtype for t in tensors)
    if impl is None and not one_kind:
        impl = "torch"
    impl = resolve_impl("composite_prior_kl", impl, mu.device, mu.dtype)
    if impl == "cpp" and not one_kind:
        raise TypeError("composite_prior_kl: impl 'cpp' needs every tensor on one device in one dtype; use impl "
                        "'torch'")
    keep_slope = grad_on and (mu.requires_grad or logvar.requires_grad)
    return _KLPerUser.apply(*tensors, list(log_weights), keep_slope, impl == "cpp")


def _forward_torch(mu, logvar, eps, prior_mean, prior_logvar, old_mu, old_logvar, uniform_logvar, log_weights,
                   keep_slope):
    """(kl, slope S or None, dz = z − mu or None), in torch ops."""
    dz = torch.exp(logvar * 0.5).mul_(eps)  # z − mu
    z = mu + dz
    log_q = (logvar + eps * eps).sum(-1).mul_(-0.5)  # without its −K·log(2π)/2, added below
    components, slopes = [], []
    gaussians = ((prior_mean, prior_logvar), (old_mu, old_logvar), (prior_mean, uniform_logvar))
    for c, (mean, log_var) in enumerate(gaussians):
        d = z - mean
        slope = d * torch.exp(-log_var)
        components.append(torch.addcmul(log_var, d, slope).mul_(-0.5).add_(log_weights[c] - 0.5 * LOG_2PI))
        slopes.append(slope)
    components = torch.stack(components)
    log_p = torch.logsumexp(components, 0)
    kl = log_q.sub_(log_p.sum(-1)).sub_(0.5 * LOG_2PI * mu.shape[-1])
    if not keep_slope:
        return kl, None, None
    responsibilities = components.sub_(log_p).exp_()
    return kl, (responsibilities * torch.stack(slopes)).sum(0), dz


class _KLPerUser(torch.autograd.Function):
    """The KL per user with the gradients in mu and logvar written out:
    - log q(z|x) = −(logvar + log 2π + eps²)/2 exactly, since z − mu = eps·σ.
    - With r_c the components' responsibilities and S = Σ_c r_c·(z − m_c)/exp(lv_c) = −d log p/dz:
      d/dmu = S (log q's terms in mu cancel) and d/dlogvar = (eps·σ·S − 1)/2.
    keep_slope: compute S for backward (False when no gradient is wanted); cpp: the forward in C++."""

    @staticmethod
    def forward(ctx, mu, logvar, eps, prior_mean, prior_logvar, old_mu, old_logvar, uniform_logvar, log_weights,
                keep_slope: bool, cpp: bool):
        args = (mu, logvar, eps, prior_mean, prior_logvar, old_mu, old_logvar, uniform_logvar, log_weights,
                keep_slope)
        if cpp:
            kl, slope, dz = torch.ops.recvae_fast.composite_prior_kl(*args)
        else:
            kl, slope, dz = _forward_torch(*args)
        if keep_slope:
            ctx.save_for_backward(slope, dz)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        slope, dz = ctx.saved_tensors
        g = grad_kl[:, None]
        return (g * slope, (dz * slope - 1).mul_(0.5).mul_(g)) + (None,) * 9


# ----------------------------------------------------------------------------- the registered op


@torch.library.custom_op("recvae_fast::composite_prior_kl", mutates_args=(), device_types="cpu")
def _composite_prior_kl_op(
    mu: Tensor, logvar: Tensor, eps: Tensor, prior_mean: Tensor, prior_logvar: Tensor, old_mu: Tensor,
    old_logvar: Tensor, uniform_logvar: Tensor, log_weights: list[float], keep_slope: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from .. import _composite_prior_kl  # loaded on first use, not when the package is imported

    if mu.dtype not in FLOAT32_64:
        raise TypeError(f"recvae_fast::composite_prior_kl takes float32/float64 tensors, got {mu.dtype}")
    n_rows, latent = mu.shape
    kl = mu.new_empty(n_rows)
    kept = (n_rows, latent) if keep_slope else (0,)
    slope, dz = mu.new_empty(kept), mu.new_empty(kept)  # two tensors: outputs must not alias

    def array(t: Tensor, flat: bool = False):
        t = t.detach()
        return (t.reshape(-1) if flat else t).contiguous().numpy()

    _composite_prior_kl.composite_prior_kl(
        array(mu), array(logvar), array(eps), array(prior_mean, True), array(prior_logvar, True), array(old_mu),
        array(old_logvar), array(uniform_logvar, True), log_weights, kl.numpy(),
        slope.numpy() if keep_slope else None, dz.numpy() if keep_slope else None, torch.get_num_threads(),
    )
    return kl, slope, dz


@_composite_prior_kl_op.register_fake
def _(mu, logvar, eps, prior_mean, prior_logvar, old_mu, old_logvar, uniform_logvar, log_weights, keep_slope):
    kept = mu.shape if keep_slope else (0,)
    return mu.new_empty(mu.shape[0]), mu.new_empty(kept), mu.new_empty(kept)


register_float32_autocast("recvae_fast::composite_prior_kl", ("cpu",))
