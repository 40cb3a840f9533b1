"""`RecVAE`: a drop-in for the authors' `VAE` that never builds a dense B × I tensor.

Same constructor, forward, losses, `update_prior()` and state_dict keys/shapes as the authors'
code (recvae_fast.reference). Inside, fc1 is stored I × H (`weight_t`) so that the sparse input
layer gathers whole rows, and the multinomial likelihood is computed fused with the decoder.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import reference
from .backend import ops_for
from .reference import log_norm_pdf
from .sparse import CSRBatch, as_csr_batch


class SparseInputLinear(nn.Module):
    """fc1 of the encoder, applied to a CSR batch. Its weight lives as I × H (`weight_t`); the
    state_dict shows the authors' `weight` (H × I, a transposed view, no copy) and loading takes it."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features))
        # True: weight_t.grad is a sparse COO tensor of the batch's rows (see recvae_fast.optim).
        self.sparse_grad = False
        self.bias = nn.Parameter(torch.empty(out_features))
        # nn.Linear's default initialisation: both uniform in ±1/sqrt(fan_in).
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(self.weight_t, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()

    def forward(self, batch: CSRBatch, dropout_p: float, keep_mask: torch.Tensor | None = None) -> torch.Tensor:
        ops = ops_for(self.weight_t.device)
        return ops.sparse_input_layer(batch, self.weight_t, self.bias, dropout_p, keep_mask, sparse_grad=self.sparse_grad)

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


class Encoder(reference.Encoder):
    """The authors' encoder with fc1 replaced by the sparse input layer."""

    def __init__(self, hidden_dim: int, latent_dim: int, input_dim: int, eps: float = 1e-1):
        super().__init__(hidden_dim, latent_dim, 1, eps)
        self.fc1 = SparseInputLinear(input_dim, hidden_dim)

    def forward(self, batch: CSRBatch, dropout_rate: float, keep_mask: torch.Tensor | None = None):
        p = dropout_rate if self.training else 0.0
        return self.from_first_layer(self.fc1(batch, p, keep_mask))


class CompositePrior(reference.CompositePrior):
    """The authors' three-component prior; its old encoder reads the same CSR batch, with no grad."""

    def __init__(self, hidden_dim: int, latent_dim: int, input_dim: int, mixture_weights=reference.MIXTURE_WEIGHTS):
        super().__init__(hidden_dim, latent_dim, 1, mixture_weights)
        self.encoder_old = Encoder(hidden_dim, latent_dim, input_dim)
        self.encoder_old.requires_grad_(False)

    def forward(self, batch: CSRBatch, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # frozen copy: no parameter of it, nor its input, needs a gradient
            post_mu, post_logvar = self.encoder_old(batch, 0.0)
        return self.log_density(z, post_mu, post_logvar)


class RecVAE(nn.Module):
    """RecVAE(hidden_dim, latent_dim, input_dim), call-compatible with the authors' `VAE`.

    `user_ratings` may be a torch sparse CSR (or COO) tensor, a scipy.sparse matrix, a dense
    tensor, or a `CSRBatch`. Parameters that do not require grad cost no gradient work: freeze
    the decoder in encoder phases and the encoder in decoder phases (recvae_fast.fit does).
    """

    def __init__(self, hidden_dim: int = 600, latent_dim: int = 200, input_dim: int | None = None):
        super().__init__()
        if input_dim is None or input_dim <= 0 or hidden_dim <= 0 or latent_dim <= 0:
            raise ValueError(
                f"hidden_dim, latent_dim and input_dim must be positive, got {hidden_dim}, {latent_dim}, {input_dim}"
            )
        self.hidden_dim, self.latent_dim, self.input_dim = hidden_dim, latent_dim, input_dim
        self.encoder = Encoder(hidden_dim, latent_dim, input_dim)
        self.prior = CompositePrior(hidden_dim, latent_dim, input_dim)
        self.decoder = nn.Linear(latent_dim, input_dim)

    def as_batch(self, user_ratings) -> CSRBatch:
        """Validate and convert user ratings to this model's canonical CSR batch."""
        param = self.decoder.weight
        return as_csr_batch(user_ratings, self.input_dim, dtype=param.dtype, device=param.device)

    reparameterize = reference.VAE.reparameterize  # z = mu + ε·exp(logvar / 2) in training, mu in eval

    def encode(self, user_ratings, dropout_rate: float = 0.0, keep_mask: torch.Tensor | None = None):
        """(mu, logvar) of q(z|x) for a batch of users."""
        return self.encoder(self.as_batch(user_ratings), dropout_rate, keep_mask)

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
            mu, logvar = self.encoder(batch, dropout_rate, keep_mask)
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
    ):
        """(mll, kld) for a canonical batch. with_kl=False skips the prior and returns kld None:
        a decoder phase needs no KL, since the KL term does not touch the decoder."""
        if with_kl:
            if gamma:
                kl_weight = gamma * batch.row_sums()
            elif beta:
                kl_weight = beta
            else:
                raise ValueError("give gamma (KL weight gamma * n_u) or beta (constant KL weight)")
        mu, logvar = self.encoder(batch, dropout_rate, keep_mask)
        z = self.reparameterize(mu, logvar, eps)
        ops = ops_for(z.device)
        mll = -ops.multinomial_nll(z, self.decoder.weight, self.decoder.bias, batch).mean()
        if not with_kl:
            return mll, None
        kld = (log_norm_pdf(z, mu, logvar) - self.prior(batch, z)).sum(dim=-1).mul(kl_weight).mean()
        return mll, kld

    @torch.no_grad()
    def update_prior(self):
        """Copy the encoder's weights into the prior's frozen old encoder."""
        for old, new in zip(self.prior.encoder_old.parameters(), self.encoder.parameters()):
            old.copy_(new)
