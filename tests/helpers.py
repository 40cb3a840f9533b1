"""Shared test fixtures: random user × item data with the awkward cases every op must handle."""
from __future__ import annotations

import os
import signal

import numpy as np
import scipy.sparse as sp
import torch

from recvae_fast import RecVAE
from recvae_fast.testing.reference import VAE


def random_ratings(n_users: int, n_items: int, seed: int = 0, binary: bool = False, max_items: int = 40):
    """A users × items CSR matrix whose row 0 is empty, row 1 has one item, row 2 has an item of
    weight 3, and the other rows a random number of items, with non-binary weights unless
    `binary`."""
    rng = np.random.default_rng(seed)
    rows, cols, vals = [], [], []
    for u in range(n_users):
        if u == 0:
            continue
        count = 1 if u in (1, 2) else int(rng.integers(1, max_items))
        items = rng.choice(n_items, size=min(count, n_items), replace=False)
        weights = np.ones(len(items)) if binary else rng.integers(1, 5, size=len(items)).astype(float)
        if u == 2:
            weights[:] = 3.0
        rows += [u] * len(items)
        cols += list(items)
        vals += list(weights)
    return sp.csr_matrix((vals, (rows, cols)), shape=(n_users, n_items))


def write_taste_ratings(path, seed: int = 0, min_items: int = 6, ratings=(3.0, 4.0, 5.0),
                        timestamp: bool = True):
    """A MovieLens-style ratings CSV of 300 users (ids 1000 + u) in three taste groups: user u rates
    between min_items and 24 of the 60 items 5000 + [40 t, 40 t + 60) of taste t = u % 3."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        f.write("userId,movieId,rating" + (",timestamp" if timestamp else "") + "\n")
        for user in range(300):
            taste = user % 3
            items = rng.choice(np.arange(taste * 40, taste * 40 + 60), size=rng.integers(min_items, 25), replace=False)
            for item in items:
                f.write(f"{1000 + user},{5000 + item},{rng.choice(ratings)}" + (",978300760" if timestamp else "") + "\n")
    return path


def model_pair(hidden: int, latent: int, n_items: int, dtype=torch.float64, seed: int = 0, impl=None):
    """A RecVAE (with `impl`) and a reference VAE with identical weights (old encoder different
    from the new)."""
    torch.manual_seed(seed)
    fast = RecVAE(hidden, latent, n_items, impl=impl).to(dtype)
    with torch.no_grad():  # make the old encoder differ from the current one
        for p in fast.prior.encoder_old.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = VAE(hidden, latent, n_items).to(dtype)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def pinned_noise(fast: RecVAE, ratings: sp.csr_matrix, latent: int, dtype, p: float = 0.5, seed: int = 1):
    """The same dropout mask and ε for both models: a dense mask for the reference and its
    values at the canonical nonzeros for RecVAE."""
    gen = torch.Generator().manual_seed(seed)
    dense_mask = (torch.rand(ratings.shape, generator=gen) >= p).to(dtype)
    batch = fast.as_batch(ratings)
    keep = dense_mask[batch.row_ids(), batch.indices].bool()
    eps = torch.randn(ratings.shape[0], latent, generator=gen, dtype=dtype)
    return dense_mask, keep, eps


def grads_by_authors_name(model) -> dict:
    """Parameter gradients keyed and shaped as in the authors' state_dict."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if name.endswith("fc1.weight_t"):
            out[name[: -len("_t")]] = p.grad.t()
        else:
            out[name] = p.grad
    return out


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def triton_problem() -> str | None:
    """Why the Triton implementations cannot run here, or None."""
    if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA and TRITON_INTERPRET was not set before triton was imported (tests/conftest.py sets it)"
    try:
        from recvae_fast.kernels._common import interpreter_numpy_problem
    except ImportError as exc:
        return f"triton cannot be imported ({exc})"
    return interpreter_numpy_problem() if DEVICE.type == "cpu" else None


def default_sigint() -> None:
    """A Popen preexec_fn: a job started in the background by a non-interactive shell inherits SIGINT
    ignored, and so would its children; restore the default so that Python turns SIGINT into
    KeyboardInterrupt in the child, however the tests were started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
