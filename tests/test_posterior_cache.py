"""The prior's old-encoder posterior kept per user by fit (recvae_fast.posterior_cache): the same
training as running the old encoder in every step, one old-encoder pass per run instead of
n_enc_epochs per epoch, exact resumes, and the loss's inputs for it checked."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import model_pair, pinned_noise, random_ratings

from recvae_fast import fit, posterior_cache, training
from recvae_fast.model import CompositePrior, Encoder
from recvae_fast.runfolder import RunFolderError

# 61 users in batches of 13: four full batches and a last one of 9.
SMALL = dict(hidden_dim=16, latent_dim=6, batch_size=13, n_enc_epochs=3, n_dec_epochs=1, progress=False)


@pytest.fixture(scope="module")
def train():
    return random_ratings(61, 43, seed=30, binary=True, max_items=12).astype(np.float32)


def _weights_close(a, b, exact: bool):
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, **tol, msg=key)


def _losses(history):
    return [{k: v for k, v in r.items() if k.endswith(("_loss", "_mll", "_kld"))} for r in history]


@pytest.mark.parametrize("not_alternating,n_dec_epochs", [(False, 1), (True, 1), (False, 2)])
def test_fit_with_the_cache_trains_as_without_it(train, monkeypatch, not_alternating, n_dec_epochs):
    """Cached and computed posteriors differ at most by the rounding of another batch mix."""
    kw = dict(SMALL, n_epochs=3, not_alternating=not_alternating, n_dec_epochs=n_dec_epochs)
    cached = fit(train, **kw)
    monkeypatch.setattr(posterior_cache, "MAX_BYTES", 0)  # no cache: the old encoder in every step
    computed = fit(train, **kw)
    _weights_close(cached.model, computed.model, exact=False)
    for a, b in zip(_losses(cached.history), _losses(computed.history), strict=True):
        assert a.keys() == b.keys() and a
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


@pytest.mark.parametrize("not_alternating", [False, True])
def test_the_old_encoder_runs_in_the_first_pass_only(train, monkeypatch, not_alternating):
    """With the cache the old encoder runs once per user in the whole run (the first pass): after
    that the decoder passes refill it (alternating) or it stays valid (encoder_old never changes)."""
    calls = []
    real = CompositePrior.old_posterior

    def counted(self, batch, impl=None):
        calls.append(batch.n_rows)
        return real(self, batch, impl)

    monkeypatch.setattr(CompositePrior, "old_posterior", counted)
    n_epochs, n_users = 3, train.shape[0]
    fit(train, **dict(SMALL, n_epochs=n_epochs, not_alternating=not_alternating))
    assert sum(calls) == n_users
    calls.clear()
    monkeypatch.setattr(posterior_cache, "MAX_BYTES", 0)
    fit(train, **dict(SMALL, n_epochs=n_epochs, not_alternating=not_alternating))
    passes_with_kl = n_epochs * (1 if not_alternating else SMALL["n_enc_epochs"])
    assert sum(calls) == passes_with_kl * n_users


def test_later_decoder_passes_read_the_encoder_posterior_from_the_cache(train, monkeypatch):
    """n_dec_epochs 2: the first decoder pass of an epoch fills the cache from the encoder, which is
    frozen through the decoder passes, so the second reads it: per epoch and user the encoder runs
    in the 3 encoder passes and the first decoder pass (and the old encoder in the run's first pass)."""
    rows_run = []
    real = Encoder.forward

    def counted(self, batch, *args, **kwargs):
        rows_run.append(batch.n_rows)
        return real(self, batch, *args, **kwargs)

    monkeypatch.setattr(Encoder, "forward", counted)
    n_epochs, n_users = 2, train.shape[0]
    fit(train, **dict(SMALL, n_epochs=n_epochs, n_dec_epochs=2))
    assert sum(rows_run) == n_users * (n_epochs * (SMALL["n_enc_epochs"] + 1) + 1)


@pytest.mark.parametrize("options", [dict(not_alternating=False), dict(not_alternating=True),
                                     dict(n_enc_epochs=1, n_dec_epochs=2)])
def test_resume_refills_the_cache_bit_for_bit(train, tmp_path, monkeypatch, options):
    """The cut run recomputes the cache from the recorded pass's batches: the same bits as the
    uninterrupted run, which kept it (from epoch 1's pass when not alternating), and the same
    record of that pass in its checkpoints."""
    kw = dict(SMALL, **options)
    full = fit(train, n_epochs=3, checkpoint_dir=tmp_path / "full", **kw).model
    fit(train, n_epochs=1, checkpoint_dir=tmp_path / "cut", **kw)
    state = torch.load(tmp_path / "cut" / training.CHECKPOINT_NAME, weights_only=True)["state"]
    assert state["posterior_fill"]["source"] == ("encoder_old" if options.get("not_alternating") else "encoder")
    calls = []
    real = CompositePrior.old_posterior
    monkeypatch.setattr(CompositePrior, "old_posterior", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    resumed = fit(train, n_epochs=3, checkpoint_dir=tmp_path / "cut", resume=True, **kw).model
    _weights_close(full, resumed, exact=True)
    if not options.get("not_alternating"):
        assert not calls  # refilled from the encoder, as the decoder pass before the cut filled it
    fills = [torch.load(tmp_path / run / training.CHECKPOINT_NAME, weights_only=True)["state"]["posterior_fill"]
             for run in ("full", "cut")]
    assert fills[0] == fills[1]


def test_a_checkpoint_from_before_the_cache_resumes(train, tmp_path):
    """A checkpoint without posterior_fill (written before the cache existed): the resumed run's
    first encoder pass fills the cache from the old encoder, and trains on as the uninterrupted run."""
    full = fit(train, n_epochs=3, checkpoint_dir=tmp_path / "full", **SMALL).model
    fit(train, n_epochs=1, checkpoint_dir=tmp_path / "cut", **SMALL)
    path = tmp_path / "cut" / training.CHECKPOINT_NAME
    ckpt = torch.load(path, weights_only=True)
    del ckpt["state"]["posterior_fill"]
    torch.save(ckpt, path)
    resumed = fit(train, n_epochs=3, checkpoint_dir=tmp_path / "cut", resume=True, **SMALL).model
    _weights_close(full, resumed, exact=False)


@pytest.mark.parametrize("fill, message", [
    ({"source": "decoder", "rng": {}}, "source"),
    ({"source": "encoder", "rng": {"bit_generator": "nothing"}}, "numpy generator state"),
    ("encoder", "posterior_fill"),
])
def test_a_checkpoint_with_a_bad_fill_record_is_refused_before_writing(train, tmp_path, fill, message):
    fit(train, n_epochs=1, checkpoint_dir=tmp_path, **SMALL)
    path = tmp_path / training.CHECKPOINT_NAME
    ckpt = torch.load(path, weights_only=True)
    ckpt["state"]["posterior_fill"] = fill
    torch.save(ckpt, path)
    before = path.read_bytes()
    with pytest.raises(RunFolderError, match=f"inconsistent checkpoint.*{message}"):
        fit(train, n_epochs=2, checkpoint_dir=tmp_path, resume=True, **SMALL)
    assert path.read_bytes() == before


def test_cache_rows_and_size_limit(monkeypatch):
    cache = posterior_cache.PosteriorCache(7, 3, torch.float64, torch.device("cpu"))
    assert cache.is_empty() and cache.get(np.array([0])) is None
    rows = np.array([1, 4, 6])
    mu, logvar = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    cache.put(rows, (mu, logvar))
    got = cache.get(np.array([4, 6]))
    torch.testing.assert_close(got[0], mu[1:], rtol=0, atol=0)
    torch.testing.assert_close(got[1], logvar[1:], rtol=0, atol=0)
    assert cache.get(np.array([1, 2])) is None  # row 2 was never filled
    cache.clear()
    assert cache.is_empty() and cache.get(rows) is None
    model, _ = model_pair(8, 3, 11, dtype=torch.float32)
    assert posterior_cache.PosteriorCache.for_model(model, 10) is not None
    monkeypatch.setattr(posterior_cache, "MAX_BYTES", 2 * 10 * 3 * 4 - 1)  # one byte short of 10 users
    assert posterior_cache.PosteriorCache.for_model(model, 10) is None


def test_loss_terms_with_given_posteriors_equal_the_computed_ones():
    """old_posterior = prior.old_posterior(batch) and posterior = the encoder without dropout give
    the same loss and the same gradients as letting loss_terms compute them."""
    latent = 5
    ratings = random_ratings(9, 23, seed=3)
    model, _ = model_pair(12, latent, 23)
    model.train()
    batch = model.as_batch(ratings)
    _, keep, eps = pinned_noise(model, ratings, latent, torch.float64)

    def run(**given):
        model.zero_grad(set_to_none=True)
        mll, kld = model.loss_terms(batch, None, 0.005, 0.5, keep_mask=keep, eps=eps, **given)
        (kld - mll).backward()
        return [mll, kld] + [p.grad.clone() for p in model.encoder.parameters()]

    for a, b in zip(run(), run(old_posterior=model.prior.old_posterior(batch)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        posterior = model.encoder(batch, 0.0)
    plain = model.loss_terms(batch, dropout_rate=0.0, with_kl=False, eps=eps)[0]
    given = model.loss_terms(batch, dropout_rate=0.0, with_kl=False, eps=eps, posterior=posterior)[0]
    torch.testing.assert_close(given, plain, rtol=1e-12, atol=1e-12)


def test_loss_terms_refuses_posteriors_that_do_not_fit():
    model, _ = model_pair(12, 5, 23)
    batch = model.as_batch(random_ratings(9, 23, seed=3))
    good = model.prior.old_posterior(batch)
    bad = [
        ((good[0][:8], good[1][:8]), "mu is \\(8, 5\\)"),
        ((good[0], good[1].float()), "logvar is .*float32"),
        (good[0], "pair of tensors"),
    ]
    for value, message in bad:
        with pytest.raises(ValueError, match=f"old_posterior.*{message}"):
            model.loss_terms(batch, dropout_rate=0.0, old_posterior=value)
        with pytest.raises(ValueError, match=f"posterior.*{message}"):
            model.loss_terms(batch, dropout_rate=0.0, with_kl=False, posterior=value)
    with pytest.raises(ValueError, match="without dropout"):
        model.loss_terms(batch, dropout_rate=0.5, with_kl=False, posterior=good)
