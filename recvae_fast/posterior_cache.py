"""The prior's old-encoder posterior per user, kept while the old encoder does not change.

The composite prior needs (mu_old, logvar_old) = encoder_old(x_u) for every user of every encoder
step. encoder_old changes only at update_prior(), so within an epoch's n_enc_epochs encoder passes
it gives the same numbers each pass; and right after update_prior() the encoder equals it, so the
decoder pass that follows (which runs the encoder without dropout anyway) computes exactly what the
next encoder phase's prior needs. `fit` keeps these numbers here: the decoder pass fills the cache,
and the encoder steps read it instead of running the old encoder. In the first epoch, and in the
non-alternating schedule (where encoder_old never changes), the first encoder pass fills it from
the old encoder itself.

Whether two users share a batch changes their numbers only by float rounding (a product's blocking
may depend on the batch). So that a resumed run continues bit for bit, the pass that filled the
cache is recorded (its kind and the numpy generator's state before its shuffle, TrainState's
posterior_fill) and a resumed run recomputes the cache from the same batches (`refill`).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

# n_users × 2 × latent_dim numbers on the model's device (ML-20M, 136,677 users: 219 MB in float32).
# Above this the cache is not kept and every encoder step runs the old encoder, as the authors' code.
MAX_BYTES = 2 * 2**30

SOURCES = ("encoder", "encoder_old")


def posterior_of(model, batch, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, logvar) for the batch, without dropout or gradient, of model.encoder ("encoder": in a
    decoder pass, where it equals encoder_old) or of the prior's encoder_old ("encoder_old")."""
    if source == "encoder":
        with torch.no_grad():
            return model.encoder(batch, 0.0, impl=model.impl)
    return model.prior.old_posterior(batch, impl=model.impl)


class PosteriorCache:
    """(mu, logvar) of every user for one fixed encoder, on the model's device."""

    def __init__(self, n_users: int, latent_dim: int, dtype: torch.dtype, device: torch.device):
        self.mu = torch.empty(n_users, latent_dim, dtype=dtype, device=device)
        self.logvar = torch.empty_like(self.mu)
        self.filled = np.zeros(n_users, dtype=bool)

    @classmethod
    def for_model(cls, model, n_users: int) -> PosteriorCache | None:
        """A cache for n_users users of this model, or None when it would exceed MAX_BYTES."""
        param = model.decoder.weight
        if 2 * n_users * model.latent_dim * param.element_size() > MAX_BYTES:
            return None
        return cls(n_users, model.latent_dim, param.dtype, param.device)

    def is_empty(self) -> bool:
        return not self.filled.any()

    def clear(self) -> None:
        self.filled[:] = False

    def get(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rows' (mu, logvar), or None unless every row is filled."""
        if not self.filled[rows].all():
            return None
        index = torch.from_numpy(rows).to(self.mu.device)
        return self.mu.index_select(0, index), self.logvar.index_select(0, index)

    def put(self, rows: np.ndarray, posterior: tuple[torch.Tensor, torch.Tensor]) -> None:
        index = torch.from_numpy(rows).to(self.mu.device)
        self.mu.index_copy_(0, index, posterior[0].detach())
        self.logvar.index_copy_(0, index, posterior[1].detach())
        self.filled[rows] = True


def pass_fill(cache: PosteriorCache | None, phase: str) -> str | None:
    """The source a pass of `phase` fills an empty cache from ("encoder" in a decoder phase: it
    runs right after update_prior; else "encoder_old"), or None when there is nothing to fill."""
    if cache is None or not cache.is_empty():
        return None
    return "encoder" if phase == "decoder" else "encoder_old"


def step_posteriors(cache: PosteriorCache | None, fill: str | None, phase: str, rows: np.ndarray, compute,
                    store=None):
    """(posterior, old_posterior) to give a step of `phase` on the users `rows` (None: the step
    computes it), filling the cache on the way. A decoder pass after the one that filled the cache
    reads its posterior from it: the encoder is frozen through the decoder passes. compute(source)
    gives posterior_of's value for the step's batch; store(rows, posterior) puts it in the cache
    (default cache.put; the sharded fit gathers the other data ranks' users first)."""
    store = store or (lambda r, posterior: cache.put(r, posterior))
    if fill == "encoder":
        posterior = compute(fill)
        store(rows, posterior)
        return posterior, None
    if cache is None:
        return None, None
    if phase == "decoder":  # a later decoder pass (n_dec_epochs > 1): the encoder has not changed since the fill
        return cache.get(rows), None
    old_posterior = cache.get(rows)
    if old_posterior is None:
        old_posterior = compute("encoder_old")
        store(rows, old_posterior)
    return None, old_posterior


def fill_record(source: str, rng: np.random.Generator) -> dict:
    """What TrainState keeps of a filling pass: its kind, and the generator's state before its shuffle."""
    return {"source": source, "rng": copy.deepcopy(rng.bit_generator.state)}


def refill(cache: PosteriorCache, record: dict, n_users: int, batch_size: int, batch_posterior) -> None:
    """Recompute the cache as the pass that `record` describes filled it: the same shuffle, the same
    batches, the same encoder (a resumed run's weights are those the pass ran with).
    batch_posterior(rows, source) gives (the users it computed, posterior_of's value for them) for a
    batch of users `rows`, as the pass's steps computed it. ValueError when the record is not one
    that fill_record writes."""
    if not isinstance(record, dict) or record.get("source") not in SOURCES:
        raise ValueError(f"posterior_fill must be a dict with source one of {SOURCES}, got {record!r:.200}")
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = record["rng"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"posterior_fill holds no numpy generator state ({exc})") from None
    cache.clear()
    users = rng.permutation(n_users)
    for start in range(0, len(users), batch_size):
        cache.put(*batch_posterior(np.sort(users[start : start + batch_size]), record["source"]))
