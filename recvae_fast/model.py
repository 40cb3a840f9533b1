"""`RecVAE`: a drop-in for the authors' `VAE` that never builds a dense B × I tensor.

Same constructor, forward, losses, `update_prior()` and state_dict keys/shapes as the authors'
code. Inside, fc1 is stored I × H (`weight_t`) so that the sparse input layer gathers whole rows,
and the multinomial likelihood is computed fused with the decoder. The model calls only the ops of
recvae_fast.ops (each op's implementations live there); recvae_fast.testing.reference is the separate
dense oracle the tests compare against.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import nn

from .ops.composite_prior_kl import LOG_2PI, composite_prior_kl
from .ops.dispatch import check_model_impl, impl_for
from .ops.multinomial_nll import multinomial_nll
from .ops.sparse_input_layer import sparse_input_layer
from .ops.swish_layer_norm import swish_layer_norm
from .sparse import CSRBatch, as_csr_batch

MIXTURE_WEIGHTS = (3 / 20, 3 / 4, 1 / 10)


class SparseInputLinear(nn.Module):
    """fc1 of the encoder, applied to a CSR batch. Its weight lives as I × H (`weight_t`); the
    state_dict shows the authors' `weight` (H × I, a transposed view, no copy) and loading takes it."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features))
        # True: weight_t.grad is a sparse COO tensor of the rows the batch uses (see recvae_fast.optim).
        self.sparse_grad = False
        self.bias = nn.Parameter(torch.empty(out_features))
        # nn.Linear's default initialisation: both uniform in ±1/sqrt(fan_in).
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(self.weight_t, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()

    def forward(
        self, batch: CSRBatch, dropout_rate: float, keep_mask: torch.Tensor | None = None, impl: str | None = None
    ) -> torch.Tensor:
        return sparse_input_layer(batch, self.weight_t, self.bias, dropout_rate, keep_mask,
                                  sparse_grad=self.sparse_grad, impl=impl_for("sparse_input_layer", impl))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight_t = self.weight_t if keep_vars else self.weight_t.detach()
        destination[prefix + "weight"] = weight_t.t()
        destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        expected = {
            "weight": (self.weight_t, (self.out_features, self.in_features), True),
            "bias": (self.bias, (self.out_features,), False),
        }
        for name, (param, shape, transposed) in expected.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if tuple(value.shape) != shape:
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                    f"the model expects {shape}"
                )
                continue
            with torch.no_grad():
                param.copy_(value.t() if transposed else value)
        for key in state_dict:
            if key.startswith(prefix) and key[len(prefix):] not in expected and "." not in key[len(prefix):]:
                unexpected_keys.append(key)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features} (stored transposed)"


def check_posterior(name: str, posterior, shape: tuple, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, logvar), each of `shape` (batch × latent_dim) and of like's dtype and device, or a
    ValueError naming `name`."""
    if not (isinstance(posterior, (tuple, list)) and len(posterior) == 2
            and all(isinstance(t, torch.Tensor) for t in posterior)):
        raise ValueError(f"{name} must be a pair of tensors (mu, logvar), got {type(posterior).__name__}")
    for part, t in zip(("mu", "logvar"), posterior):
        if tuple(t.shape) != tuple(shape) or t.dtype != like.dtype or t.device != like.device:
            raise ValueError(f"{name}: {part} is {tuple(t.shape)} {t.dtype} on {t.device}, expected "
                             f"{tuple(shape)} {like.dtype} on {like.device} (batch × latent_dim)")
    return posterior[0], posterior[1]


def check_given_posterior(posterior, shape: tuple, like: torch.Tensor, dropout_rate: float, keep_mask):
    """check_posterior for loss_terms' `posterior`, which stands for the encoder's output without
    dropout: a ValueError too when the step asks for dropout."""
    if dropout_rate or keep_mask is not None:
        raise ValueError("posterior is the encoder's output without dropout: give dropout_rate 0 and no keep_mask "
                         "with it")
    return check_posterior("posterior", posterior, shape, like)


def log_norm_pdf(x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(x | mu, exp(logvar)), elementwise."""
    return -0.5 * (logvar + LOG_2PI + (x - mu).pow(2) / logvar.exp())


class Encoder(nn.Module):
    """q(z|x): fc1 on the CSR batch, then four residual blocks (block k adds every earlier block's
    output to its linear layer's), each swish then LayerNorm (eps 0.1), and the mu / logvar heads.
    Modules are named fc1..fc5, ln1..ln5, fc_mu, fc_logvar, as in the authors' checkpoints.
    `impl` as a RecVAE's (recvae_fast.ops.dispatch.impl_for): "torch" keeps every op in torch ops."""

    N_LAYERS = 5

    def __init__(self, hidden_dim: int, latent_dim: int, input_dim: int, eps: float = 1e-1, *, fc1=None):
        super().__init__()
        # fc1 may be given (the item-sharded model passes its shard of the input layer).
        self.fc1 = SparseInputLinear(input_dim, hidden_dim) if fc1 is None else fc1
        self.ln1 = nn.LayerNorm(hidden_dim, eps=eps)
        for k in range(2, self.N_LAYERS + 1):
            setattr(self, f"fc{k}", nn.Linear(hidden_dim, hidden_dim))
            setattr(self, f"ln{k}", nn.LayerNorm(hidden_dim, eps=eps))
        self.fc_mu = nn.Linear(hidden_dim, latent_dim)
        self.fc_logvar = nn.Linear(hidden_dim, latent_dim)

    def forward(self, batch: CSRBatch, dropout_rate: float, keep_mask: torch.Tensor | None = None, impl=None):
        rate = dropout_rate if self.training else 0.0
        tail_impl = impl_for("swish_layer_norm", impl)
        h = swish_layer_norm(self.fc1(batch, rate, keep_mask, impl=impl), self.ln1, impl=tail_impl)
        earlier_sum = h  # h1 + ... + h(k-1), kept as a running sum: one add per block, not k - 1
        for k in range(2, self.N_LAYERS + 1):
            h = swish_layer_norm(h, getattr(self, f"ln{k}"), getattr(self, f"fc{k}"), earlier_sum, impl=tail_impl)
            if k < self.N_LAYERS:
                earlier_sum = earlier_sum + h
        # Under autocast the heads' products come out in bf16: the posterior goes on in h's dtype
        # (float32), since the KL terms and the reparameterisation must not run in bf16.
        return self.fc_mu(h).to(h.dtype), self.fc_logvar(h).to(h.dtype)


class CompositePrior(nn.Module):
    """p(z) = 3/20·N(0, 1) + 3/4·N(mu_old, var_old) + 1/10·N(0, e^10): the middle component is the
    posterior of a frozen copy of the encoder (`encoder_old`, refreshed by RecVAE.update_prior)."""

    def __init__(self, hidden_dim: int, latent_dim: int, input_dim: int, mixture_weights=MIXTURE_WEIGHTS, *,
                 encoder_old: Encoder | None = None):
        super().__init__()
        self.mixture_weights = list(mixture_weights)
        # Parameters (not buffers) without grad: the authors' checkpoints hold them as parameters.
        self.mu_prior = nn.Parameter(torch.zeros(1, latent_dim), requires_grad=False)
        self.logvar_prior = nn.Parameter(torch.zeros(1, latent_dim), requires_grad=False)
        self.logvar_uniform_prior = nn.Parameter(torch.full((1, latent_dim), 10.0), requires_grad=False)
        self.encoder_old = Encoder(hidden_dim, latent_dim, input_dim) if encoder_old is None else encoder_old
        self.encoder_old.requires_grad_(False)

    @torch.no_grad()  # frozen copy: no parameter of it, nor its input, needs a gradient
    def old_posterior(self, batch: CSRBatch, impl=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_old, logvar_old): the frozen encoder's posterior for the batch, without dropout."""
        return self.encoder_old(batch, 0.0, impl=impl)

    def kl(self, batch: CSRBatch, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor, impl=None,
           old_posterior=None) -> torch.Tensor:
        """Σ_k [log q(z|x) − log p(z)] per user [B], for z = mu + eps·exp(logvar/2) (eps zeros: z = mu)
        and q(z|x) = N(mu, exp(logvar)); old_posterior as in forward. Differentiable in mu and
        logvar through the op composite_prior_kl's written-out gradients, or through the plain
        expression when anything else needs a gradient (the prior's parameters, the old posterior, eps)."""
        if old_posterior is None:
            old_posterior = self.old_posterior(batch, impl)
        post_mu, post_logvar = check_posterior("old_posterior", old_posterior, mu.shape, mu)
        others = (eps, post_mu, post_logvar, self.mu_prior, self.logvar_prior, self.logvar_uniform_prior)
        if torch.is_grad_enabled() and any(t.requires_grad for t in others):
            z = eps * torch.exp(0.5 * logvar) + mu
            return (log_norm_pdf(z, mu, logvar) - self(batch, z, impl, (post_mu, post_logvar))).sum(dim=-1)
        log_weights = [math.log(w) for w in self.mixture_weights]
        return composite_prior_kl(mu, logvar, eps, self.mu_prior, self.logvar_prior, post_mu, post_logvar,
                                  self.logvar_uniform_prior, log_weights, impl=impl_for("composite_prior_kl", impl))

    def forward(self, batch: CSRBatch, z: torch.Tensor, impl=None, old_posterior=None) -> torch.Tensor:
        """log p(z) per user. old_posterior: old_posterior(batch) when the caller already has it
        (recvae_fast.fit keeps it per user while encoder_old is unchanged); None computes it."""
        if old_posterior is None:
            old_posterior = self.old_posterior(batch, impl)
        post_mu, post_logvar = check_posterior("old_posterior", old_posterior, z.shape, z)
        log_components = torch.stack([
            log_norm_pdf(z, self.mu_prior, self.logvar_prior),
            log_norm_pdf(z, post_mu, post_logvar),
            log_norm_pdf(z, self.mu_prior, self.logvar_uniform_prior),
        ], dim=-1)
        log_weights = torch.tensor([math.log(w) for w in self.mixture_weights], dtype=z.dtype, device=z.device)
        return torch.logsumexp(log_components + log_weights, dim=-1)


def encoder_parameter_count(hidden_dim: int, latent_dim: int, input_dim: int) -> int:
    """Numbers in an Encoder: fc1 (I × H + H), five LayerNorms, fc2..fc5, and the mu / logvar heads."""
    h, k = hidden_dim, latent_dim
    return input_dim * h + h + 5 * 2 * h + 4 * (h * h + h) + 2 * (h * k + k)


def parameter_count(hidden_dim: int, latent_dim: int, input_dim: int) -> int:
    """Numbers in a RecVAE: the encoder, the prior's frozen copy of it and its three K-vectors, the decoder."""
    return (2 * encoder_parameter_count(hidden_dim, latent_dim, input_dim) + 3 * latent_dim
            + latent_dim * input_dim + input_dim)


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes that `device` can still give: for the CPU, Linux's MemAvailable plus free swap (else the
    physical memory); for a CUDA device, its free memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        return fields["MemAvailable"] + fields.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_dims(hidden_dim, latent_dim, input_dim) -> None:
    """A ValueError naming the first of the three sizes that is not a positive integer."""
    for name, value in (("hidden_dim", hidden_dim), ("latent_dim", latent_dim), ("input_dim", input_dim)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_memory(hidden_dim: int, latent_dim: int, input_dim: int, *, itemsize: int = 4,
                 device: str | torch.device = "cpu", training: bool = False, item_shards: int = 1) -> None:
    """A ValueError, before anything is allocated, when a RecVAE of these sizes (training: with its
    gradients and Adam's two moments; item_shards: this process's part of the items) needs more bytes
    than `device` has available. It names the size that costs the most and both byte counts."""
    check_dims(hidden_dim, latent_dim, input_dim)
    dims = {"hidden_dim": int(hidden_dim), "latent_dim": int(latent_dim), "input_dim": int(input_dim)}
    items = -(-dims["input_dim"] // item_shards)

    def needed(h, k, i):
        trained = encoder_parameter_count(h, k, i) + k * i + i  # encoder and decoder
        frozen = encoder_parameter_count(h, k, i) + 3 * k
        return itemsize * ((4 if training else 1) * trained + frozen)

    total = needed(dims["hidden_dim"], dims["latent_dim"], items)
    available = available_memory(device)
    if total <= available:
        return
    # the size whose reduction to 1 saves the most
    costly = max(dims, key=lambda name: total - needed(*({**dims, "input_dim": items, name: 1}).values()))
    what = "training (weights, gradients, Adam's moments)" if training else "the weights"
    raise ValueError(f"{costly}={dims[costly]:,} is too large: {what} need {_bytes_text(total)}, "
                     f"{device} has {_bytes_text(available)} available "
                     f"(hidden_dim {dims['hidden_dim']:,}, latent_dim {dims['latent_dim']:,}, "
                     f"input_dim {dims['input_dim']:,} items)")


def _bytes_text(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"


class RecVAE(nn.Module):
    """RecVAE(hidden_dim, latent_dim, input_dim), call-compatible with the authors' `VAE`.

    `user_ratings` may be a torch sparse CSR (or COO) tensor, a scipy.sparse matrix, a dense
    tensor, or a `CSRBatch`. `impl` picks the implementation of its ops ("torch": torch ops only,
    "cpp", "triton", or None: each op's default for the parameters' device); each op runs it if it
    has one of that name, else its default (recvae_fast.ops.dispatch). It can be changed at any time
    (`model.impl = "torch"`). Parameters that do not require grad cost no
    gradient work: freeze the decoder in encoder phases and the encoder in decoder phases
    (recvae_fast.fit does).
    """

    def __init__(self, hidden_dim: int = 600, latent_dim: int = 200, input_dim: int | None = None, impl: str | None = None):
        super().__init__()
        check_memory(hidden_dim, latent_dim, input_dim, itemsize=torch.empty(0).element_size())
        hidden_dim, latent_dim, input_dim = int(hidden_dim), int(latent_dim), int(input_dim)
        self.hidden_dim, self.latent_dim, self.input_dim = hidden_dim, latent_dim, input_dim
        self.impl = impl
        self.encoder = Encoder(hidden_dim, latent_dim, input_dim)
        self.prior = CompositePrior(hidden_dim, latent_dim, input_dim)
        self.decoder = nn.Linear(latent_dim, input_dim)

    @property
    def impl(self) -> str | None:
        return self._impl

    @impl.setter
    def impl(self, impl: str | None) -> None:
        self._impl = check_model_impl(impl)

    def as_batch(self, user_ratings) -> CSRBatch:
        """Validate and convert user ratings to this model's canonical CSR batch."""
        param = self.decoder.weight
        return as_csr_batch(user_ratings, self.input_dim, dtype=param.dtype, device=param.device)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """z = mu + ε·exp(logvar / 2) in training (ε ~ N(0, 1) unless given), mu in eval."""
        if not self.training:
            return mu
        std = torch.exp(0.5 * logvar)
        if eps is None:
            eps = torch.randn_like(std)
        return eps * std + mu

    def encode(self, user_ratings, dropout_rate: float = 0.0, keep_mask: torch.Tensor | None = None):
        """(mu, logvar) of q(z|x) for a batch of users (dropout only in training mode)."""
        return self.encoder(self.as_batch(user_ratings), dropout_rate, keep_mask, impl=self.impl)

    def forward(
        self,
        user_ratings,
        beta: float | None = None,
        gamma: float | None = 1,
        dropout_rate: float = 0.5,
        calculate_loss: bool = True,
        *,
        keep_mask: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
    ):
        """As the authors' forward: ((mll, kld), negative_elbo), or the B × I scores when
        calculate_loss is False. `keep_mask` (bool per nonzero of the canonical batch) and `eps`
        (B × K) pin the randomness; left as None they are drawn from torch's generator."""
        batch = self.as_batch(user_ratings)
        if not calculate_loss:
            mu, logvar = self.encoder(batch, dropout_rate, keep_mask, impl=self.impl)
            return self.decoder(self.reparameterize(mu, logvar, eps))
        mll, kld = self.loss_terms(batch, beta, gamma, dropout_rate, keep_mask=keep_mask, eps=eps)
        negative_elbo = -(mll - kld)
        return (mll, kld), negative_elbo

    def loss_terms(
        self,
        batch: CSRBatch,
        beta: float | None = None,
        gamma: float | None = 1,
        dropout_rate: float = 0.5,
        *,
        with_kl: bool = True,
        keep_mask: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
        posterior=None,
        old_posterior=None,
    ):
        """(mll, kld) for a canonical batch. with_kl=False skips the prior and returns kld None:
        a decoder phase needs no KL, since the KL term does not touch the decoder.
        Computed parts a caller may pass in (recvae_fast.fit keeps them per user): posterior, the
        encoder's (mu, logvar) for the batch, computed without dropout and without gradient (the
        encoder is then not run: only for a step that does not train it); old_posterior, the
        prior's prior.old_posterior(batch)."""
        if batch.n_rows == 0:  # a mean over no users is NaN, not a loss
            raise ValueError("the batch has no users (0 rows): a loss needs at least one user")
        if with_kl:
            if gamma:
                kl_weight = gamma * batch.row_sums()
            elif beta:
                kl_weight = beta
            else:
                raise ValueError("give gamma (KL weight gamma * n_u) or beta (constant KL weight)")
        if posterior is None:
            mu, logvar = self.encoder(batch, dropout_rate, keep_mask, impl=self.impl)
        else:
            shape = (batch.n_rows, self.latent_dim)
            mu, logvar = check_given_posterior(posterior, shape, self.decoder.weight, dropout_rate, keep_mask)
        if eps is None and self.training:
            eps = torch.randn_like(mu)  # what reparameterize would draw
        z = self.reparameterize(mu, logvar, eps)
        mll = -multinomial_nll(z, self.decoder.weight, self.decoder.bias, batch,
                               impl=impl_for("multinomial_nll", self.impl)).mean()
        if not with_kl:
            return mll, None
        noise = eps if self.training else torch.zeros_like(mu)  # in eval z = mu
        kld = self.prior.kl(batch, mu, logvar, noise, self.impl, old_posterior).mul(kl_weight).mean()
        return mll, kld

    @torch.no_grad()
    def update_prior(self):
        """Copy the encoder's weights into the prior's frozen old encoder."""
        for old, new in zip(self.prior.encoder_old.parameters(), self.encoder.parameters()):
            old.copy_(new)
