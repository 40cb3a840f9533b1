"""A plain, dense PyTorch RecVAE: the oracle for every test and benchmark.

It stands alone: recvae_fast.model writes its own layers, and the tests compare the two.

It computes what the authors' public code computes (encoder with residual sums, swish,
LayerNorm eps 0.1; composite prior 3/20·N(0,1) + 3/4·N(mu_old, var_old) + 1/10·N(0, e^10);
KL weight gamma·n_u or constant beta; reparameterisation) with the same module and parameter
names, so its state_dict is the authors' checkpoint format. It is deliberately boring.

Two deliberate differences, both outside the authors' defined behaviour:
- a user with no items is normalised by 1 instead of dividing 0 by 0 (the authors get NaN);
- `forward` takes optional `dropout_mask` (B × I, 0/1) and `eps` (B × K) so that tests can pin
  the randomness; left as None, the draws are the authors' (F.dropout, randn_like).
"""
from __future__ import annotations

import math
from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import nn

MIXTURE_WEIGHTS = (3 / 20, 3 / 4, 1 / 10)
LOG_2PI = math.log(2 * math.pi)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def log_norm_pdf(x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (logvar + LOG_2PI + (x - mu).pow(2) / logvar.exp())


class Encoder(nn.Module):
    def __init__(self, hidden_dim: int, latent_dim: int, input_dim: int, eps: float = 1e-1):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.ln1 = nn.LayerNorm(hidden_dim, eps=eps)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.ln2 = nn.LayerNorm(hidden_dim, eps=eps)
        self.fc3 = nn.Linear(hidden_dim, hidden_dim)
        self.ln3 = nn.LayerNorm(hidden_dim, eps=eps)
        self.fc4 = nn.Linear(hidden_dim, hidden_dim)
        self.ln4 = nn.LayerNorm(hidden_dim, eps=eps)
        self.fc5 = nn.Linear(hidden_dim, hidden_dim)
        self.ln5 = nn.LayerNorm(hidden_dim, eps=eps)
        self.fc_mu = nn.Linear(hidden_dim, latent_dim)
        self.fc_logvar = nn.Linear(hidden_dim, latent_dim)

    def forward(self, x: torch.Tensor, dropout_rate: float, dropout_mask: torch.Tensor | None = None):
        norm = x.pow(2).sum(dim=-1).sqrt()
        norm = torch.where(norm > 0, norm, torch.ones_like(norm))  # empty user: 0 / 1, not 0 / 0
        x = x / norm[:, None]
        if dropout_mask is not None and self.training and dropout_rate > 0:
            x = x * dropout_mask / (1 - dropout_rate)
        else:
            x = F.dropout(x, p=dropout_rate, training=self.training)
        h1 = self.ln1(swish(self.fc1(x)))
        h2 = self.ln2(swish(self.fc2(h1) + h1))
        h3 = self.ln3(swish(self.fc3(h2) + h1 + h2))
        h4 = self.ln4(swish(self.fc4(h3) + h1 + h2 + h3))
        h5 = self.ln5(swish(self.fc5(h4) + h1 + h2 + h3 + h4))
        return self.fc_mu(h5), self.fc_logvar(h5)


class CompositePrior(nn.Module):
    def __init__(self, hidden_dim: int, latent_dim: int, input_dim: int, mixture_weights=MIXTURE_WEIGHTS):
        super().__init__()
        self.mixture_weights = list(mixture_weights)
        self.mu_prior = nn.Parameter(torch.zeros(1, latent_dim), requires_grad=False)
        self.logvar_prior = nn.Parameter(torch.zeros(1, latent_dim), requires_grad=False)
        self.logvar_uniform_prior = nn.Parameter(torch.full((1, latent_dim), 10.0), requires_grad=False)
        self.encoder_old = Encoder(hidden_dim, latent_dim, input_dim)
        self.encoder_old.requires_grad_(False)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        post_mu, post_logvar = self.encoder_old(x, 0)
        stnd_prior = log_norm_pdf(z, self.mu_prior, self.logvar_prior)
        post_prior = log_norm_pdf(z, post_mu, post_logvar)
        unif_prior = log_norm_pdf(z, self.mu_prior, self.logvar_uniform_prior)
        gaussians = [stnd_prior, post_prior, unif_prior]
        gaussians = [g + math.log(w) for g, w in zip(gaussians, self.mixture_weights)]
        return torch.logsumexp(torch.stack(gaussians, dim=-1), dim=-1)


class VAE(nn.Module):
    """The authors' `VAE`: same constructor, forward, losses and parameter names."""

    def __init__(self, hidden_dim: int, latent_dim: int, input_dim: int):
        super().__init__()
        self.encoder = Encoder(hidden_dim, latent_dim, input_dim)
        self.prior = CompositePrior(hidden_dim, latent_dim, input_dim)
        self.decoder = nn.Linear(latent_dim, input_dim)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None):
        if not self.training:
            return mu
        std = torch.exp(0.5 * logvar)
        if eps is None:
            eps = torch.randn_like(std)
        return eps * std + mu

    def forward(
        self,
        user_ratings: torch.Tensor,
        beta: float | None = None,
        gamma: float | None = 1,
        dropout_rate: float = 0.5,
        calculate_loss: bool = True,
        *,
        dropout_mask: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
    ):
        mu, logvar = self.encoder(user_ratings, dropout_rate=dropout_rate, dropout_mask=dropout_mask)
        z = self.reparameterize(mu, logvar, eps)
        x_pred = self.decoder(z)
        if not calculate_loss:
            return x_pred
        if gamma:
            kl_weight = gamma * user_ratings.sum(dim=-1)
        elif beta:
            kl_weight = beta
        else:
            raise ValueError("give gamma (KL weight gamma * n_u) or beta (constant KL weight)")
        mll = (F.log_softmax(x_pred, dim=-1) * user_ratings).sum(dim=-1).mean()
        kld = (log_norm_pdf(z, mu, logvar) - self.prior(user_ratings, z)).sum(dim=-1).mul(kl_weight).mean()
        negative_elbo = -(mll - kld)
        return (mll, kld), negative_elbo

    def update_prior(self):
        self.prior.encoder_old.load_state_dict(deepcopy(self.encoder.state_dict()))
