"""RecVAE (sparse, fused) against the dense reference, through each implementation of its ops
("cpp", "torch", and "triton" under the interpreter), and the reference against hand values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from helpers import grads_by_authors_name, model_pair, pinned_noise, random_ratings

from recvae_fast import RecVAE, model
from recvae_fast.ops import swish_layer_norm as swish_layer_norm_module
from recvae_fast.testing import reference
from recvae_fast.testing.reference import VAE, log_norm_pdf, swish

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}

# (users, items, hidden, latent): odd sizes, smaller under the (slow) Triton interpreter.
SHAPES = {"cpp": (37, 1001, 31, 13), "torch": (37, 1001, 31, 13), "triton": (9, 77, 13, 5)}


@pytest.fixture(params=["cpp", "torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def impl(request):
    """The model's impl: "cpp" (the CPU default: every op's C++ code), "torch" (torch ops only),
    "triton" (its two Triton ops; the layer tails and the KL keep their CPU default, C++)."""
    if request.param == "triton":
        pytest.importorskip("triton")
    return request.param


# --- the reference against values computed by hand -------------------------------------------


def test_reference_primitives_by_hand():
    assert swish(torch.tensor(1.0)).item() == pytest.approx(1 / (1 + math.exp(-1)))
    assert swish(torch.tensor(-2.0)).item() == pytest.approx(-2 / (1 + math.exp(2)))
    # log N(0 | 0, e^0) = -½ log 2π ; log N(1 | 0, e^2) = -½ (2 + log 2π + 1/e²)
    assert log_norm_pdf(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0)).item() == pytest.approx(
        -0.5 * math.log(2 * math.pi)
    )
    assert log_norm_pdf(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(2.0)).item() == pytest.approx(
        -0.5 * (2 + math.log(2 * math.pi) + math.exp(-2))
    )


def _constant_head_model(n_items: int, mu: float, logvar: float, bias: list[float]) -> VAE:
    """A reference model whose encoders output constant (mu, logvar) and whose decoder gives
    logits = bias, so the losses have closed forms."""
    model = VAE(4, 1, n_items).double()
    with torch.no_grad():
        for enc in (model.encoder, model.prior.encoder_old):
            enc.fc_mu.weight.zero_()
            enc.fc_mu.bias.fill_(mu)
            enc.fc_logvar.weight.zero_()
            enc.fc_logvar.bias.fill_(logvar)
        model.decoder.weight.zero_()
        model.decoder.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return model.eval()


def test_reference_losses_by_hand():
    # logits = [0, ln 2, ln 3] -> softmax = [1/6, 2/6, 3/6]; x = [1, 0, 2]
    model = _constant_head_model(3, mu=0.5, logvar=-1.0, bias=[0.0, math.log(2), math.log(3)])
    x = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)
    gamma = 0.01
    (mll, kld), loss = model(x, gamma=gamma)
    expected_mll = math.log(1 / 6) + 2 * math.log(3 / 6)
    # eval mode: z = mu = 0.5. log q(z) = log N(0.5 | 0.5, e^-1) = -½(-1 + log 2π)
    log_q = -0.5 * (-1 + math.log(2 * math.pi))
    components = [
        math.log(3 / 20) - 0.5 * (math.log(2 * math.pi) + 0.25),  # N(0, 1)
        math.log(3 / 4) + log_q,  # N(mu_old = 0.5, e^-1)
        math.log(1 / 10) - 0.5 * (10 + math.log(2 * math.pi) + 0.25 / math.exp(10)),  # N(0, e^10)
    ]
    log_prior = math.log(sum(math.exp(c) for c in components))
    expected_kld = gamma * 3.0 * (log_q - log_prior)  # gamma · n_u, n_u = 3, one latent dim
    assert mll.item() == pytest.approx(expected_mll, rel=1e-12)
    assert kld.item() == pytest.approx(expected_kld, rel=1e-12)
    assert loss.item() == pytest.approx(-(expected_mll - expected_kld), rel=1e-12)
    (_, kld_beta), _ = model(x, beta=0.2, gamma=None)
    assert kld_beta.item() == pytest.approx(0.2 * (log_q - log_prior), rel=1e-12)


def test_reference_needs_gamma_or_beta():
    model = VAE(4, 2, 5)
    with pytest.raises(ValueError, match="gamma"):
        model(torch.ones(2, 5), beta=None, gamma=None)


# --- RecVAE against the reference -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kl", [dict(gamma=0.005), dict(beta=0.2, gamma=None)])
def test_eval_mode_matches_reference(dtype, kl, impl):
    n_users, n_items, hidden, latent = SHAPES[impl]
    x = random_ratings(n_users, n_items, seed=3)
    fast, ref = model_pair(hidden, latent, n_items, dtype, impl=impl)
    fast.eval()
    ref.eval()
    (mll, kld), loss = fast(x, **kl)
    (mll_r, kld_r), loss_r = ref(torch.tensor(x.toarray(), dtype=dtype), **kl)
    for a, b in ((mll, mll_r), (kld, kld_r), (loss, loss_r)):
        torch.testing.assert_close(a, b, **TOL[dtype])
    scores = fast(x, calculate_loss=False)
    scores_r = ref(torch.tensor(x.toarray(), dtype=dtype), calculate_loss=False)
    torch.testing.assert_close(scores, scores_r, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dropout", [0.5, 0.0])
def test_training_mode_values_and_every_gradient(dtype, dropout, impl):
    n_users, n_items, hidden, latent = SHAPES[impl]
    x = random_ratings(n_users, n_items, seed=4)
    fast, ref = model_pair(hidden, latent, n_items, dtype, impl=impl)
    dense_mask, keep, eps = pinned_noise(fast, x, latent, dtype, p=dropout if dropout else 0.5)
    (mll, kld), loss = fast(x, gamma=0.005, dropout_rate=dropout, keep_mask=keep, eps=eps)
    (mll_r, kld_r), loss_r = ref(
        torch.tensor(x.toarray(), dtype=dtype), gamma=0.005, dropout_rate=dropout, dropout_mask=dense_mask, eps=eps
    )
    for a, b in ((mll, mll_r), (kld, kld_r), (loss, loss_r)):
        torch.testing.assert_close(a, b, **TOL[dtype])
    loss.backward()
    loss_r.backward()
    grads, grads_r = grads_by_authors_name(fast), grads_by_authors_name(ref)
    assert set(grads) == set(grads_r) and len(grads) == 26  # encoder 22 + decoder 2 + nothing of the prior
    for name in grads_r:
        scale = grads_r[name].abs().max().item() + 1e-12
        torch.testing.assert_close(grads[name] / scale, grads_r[name] / scale, **TOL[dtype], msg=name)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_frozen_parts_cost_no_gradient_and_match(impl):
    """Encoder phase (decoder frozen) and decoder phase (encoder frozen) give the reference's
    gradients for the part being trained, and none for the rest."""
    n_users, n_items, hidden, latent = SHAPES[impl]
    x = random_ratings(n_users, n_items, seed=5)
    dtype = torch.float64
    fast, ref = model_pair(hidden, latent, n_items, dtype, impl=impl)
    _, keep, eps = pinned_noise(fast, x, latent, dtype)
    dense_mask, _, _ = pinned_noise(fast, x, latent, dtype)
    xd = torch.tensor(x.toarray(), dtype=dtype)
    ref(xd, gamma=0.005, dropout_rate=0.5, dropout_mask=dense_mask, eps=eps)[1].backward()
    grads_r = grads_by_authors_name(ref)

    fast.decoder.requires_grad_(False)
    fast(x, gamma=0.005, dropout_rate=0.5, keep_mask=keep, eps=eps)[1].backward()
    grads = grads_by_authors_name(fast)
    assert not any(name.startswith("decoder") for name in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_r[name], rtol=1e-8, atol=1e-10, msg=name)

    fast.zero_grad(set_to_none=True)
    fast.decoder.requires_grad_(True)
    fast.encoder.requires_grad_(False)
    mll, kld = fast.loss_terms(fast.as_batch(x), None, 0.005, 0.5, with_kl=False, keep_mask=keep, eps=eps)
    assert kld is None
    (-mll).backward()
    grads = grads_by_authors_name(fast)
    assert set(grads) == {"decoder.weight", "decoder.bias"}
    for name, g in grads.items():  # the KL does not touch the decoder, so skipping it is exact
        torch.testing.assert_close(g, grads_r[name], rtol=1e-8, atol=1e-10, msg=name)


def test_empty_users_give_finite_outputs(impl):
    x = sp.csr_matrix(([1.0], ([1], [3])), shape=(4, 50))
    fast = RecVAE(8, 3, 50, impl=impl).double()
    (mll, kld), loss = fast(x, gamma=0.005)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(mll) and torch.isfinite(kld)
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)
    fast.eval()
    # an empty user's first layer is the bias alone
    h1_pre = fast.encoder.fc1(fast.as_batch(x), 0.0, impl=impl)
    torch.testing.assert_close(h1_pre[0], fast.encoder.fc1.bias)


# --- inputs ------------------------------------------------------------------------------------


def test_all_input_kinds_agree():
    x = random_ratings(11, 97, seed=6)
    fast, _ = model_pair(9, 4, 97)
    fast.eval()
    dense = torch.tensor(x.toarray())
    inputs = [x, x.tocoo(), dense, dense.to_sparse_csr(), dense.to_sparse(), x.toarray()]
    results = [fast(inp, gamma=0.005)[1] for inp in inputs]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-12, atol=1e-12)


def test_duplicate_ids_are_summed_like_dense_input(impl):
    # user 0 has item 5 twice (1 + 2) and item 7 once; user 1 has item 2 three times
    rows = np.array([0, 0, 0, 1, 1, 1])
    cols = np.array([5, 7, 5, 2, 2, 2])
    vals = np.array([1.0, 1.0, 2.0, 1.0, 1.0, 1.0])
    dup_coo = torch.sparse_coo_tensor(torch.tensor(np.stack([rows, cols])), torch.tensor(vals), (2, 10))
    dup_csr = sp.csr_matrix((vals, cols, np.array([0, 3, 6])), shape=(2, 10))  # duplicates kept
    assert not dup_csr.has_canonical_format
    fast, ref = model_pair(6, 3, 10, impl=impl)
    ref.eval()
    fast.eval()
    expected = ref(torch.tensor([[0, 0, 0, 0, 0, 3, 0, 1, 0, 0], [0, 0, 3, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float64),
                   gamma=0.005)[1]
    for x in (dup_coo, dup_csr):
        torch.testing.assert_close(fast(x, gamma=0.005)[1], expected, rtol=1e-12, atol=1e-12)
    batch = fast.as_batch(dup_csr)
    assert batch.indices.tolist() == [5, 7, 2] and batch.values.tolist() == [3.0, 1.0, 3.0]


def test_bad_input_raises_clear_errors():
    fast = RecVAE(8, 3, 20)
    good = sp.random(4, 20, density=0.2, format="csr", dtype=np.float32, random_state=0)
    with pytest.raises(ValueError, match="columns"):
        fast(sp.random(4, 21, density=0.2, format="csr", dtype=np.float32))
    with pytest.raises(ValueError, match="columns"):
        fast(torch.ones(4, 19))
    with pytest.raises(ValueError, match="negative"):
        bad = good.copy()
        bad.data[0] = -1
        fast(bad)
    with pytest.raises(ValueError, match="non-finite"):
        bad = good.copy()
        bad.data[0] = np.nan
        fast(bad)
    with pytest.raises(ValueError, match="non-finite"):
        fast(torch.full((2, 20), float("inf")))
    with pytest.raises(IndexError, match="outside"):
        crow = torch.tensor([0, 1, 2])
        col = torch.tensor([3, 25])
        fast(torch.sparse_csr_tensor(crow, col, torch.ones(2), size=(2, 20), check_invariants=False))
    with pytest.raises(TypeError, match="dtype"):
        fast(torch.ones(2, 20, dtype=torch.float64))
    with pytest.raises(ValueError, match="on meta"):
        fast(torch.ones(2, 20, device="meta"))
    with pytest.raises(ValueError, match="2-D"):
        fast(torch.ones(20))
    with pytest.raises(TypeError, match="scipy"):
        fast([[1.0] * 20])
    with pytest.raises(ValueError, match="gamma"):
        fast(good, beta=None, gamma=None)
    with pytest.raises(ValueError, match="dropout"):
        fast(good, dropout_rate=1.0)
    with pytest.raises(ValueError, match="keep_mask"):
        fast(good, keep_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="positive"):
        RecVAE(600, 200, 0)


def test_impl_choice_and_its_errors(monkeypatch):
    x = random_ratings(5, 30, seed=7)
    with pytest.raises(ValueError, match="no implementation 'bogus'"):
        RecVAE(8, 3, 30, impl="bogus")
    with pytest.raises(ValueError, match="no implementation 'gpu'"):
        RecVAE(8, 3, 30).encoder(RecVAE(8, 3, 30).as_batch(x), 0.0, impl="gpu")  # the layers check it too
    assert RecVAE(8, 3, 30, impl="cpp").impl == "cpp"
    fast = RecVAE(8, 3, 30).double()
    with pytest.raises(ValueError, match="no implementation"):
        fast.impl = "gpu"
    assert fast.impl is None
    monkeypatch.setenv("RECVAE_FAST_IMPL", "bogus")
    with pytest.raises(ValueError, match="RECVAE_FAST_IMPL"):
        fast(x)
    # The variable changes the default (here to Triton, which cannot run on CPU tensors without
    # the interpreter) but never an explicit impl.
    monkeypatch.setenv("RECVAE_FAST_IMPL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fast(x)
    fast.impl = "torch"
    assert torch.isfinite(fast(x)[1])
    fast.impl = "triton"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fast(x)


def test_model_is_built_apart_from_its_oracle():
    """RecVAE shares no class with the reference (so the comparisons above compare two codes),
    and building it makes no dense input_dim × hidden_dim layer."""
    fast = RecVAE(16, 4, 5000)
    for module in fast.modules():
        for cls in type(module).__mro__:
            assert cls.__module__ != reference.__name__, type(module)
    assert not any(
        isinstance(m, torch.nn.Linear) and m.in_features == 5000 for m in fast.modules()
    )
    assert fast.encoder.fc1.weight_t.shape == (5000, 16)
    swish = swish_layer_norm_module.swish
    assert swish is not reference.swish and model.log_norm_pdf is not reference.log_norm_pdf
    z, mu, logvar = torch.randn(3, 3, 4, dtype=torch.float64).unbind(0)
    torch.testing.assert_close(model.log_norm_pdf(z, mu, logvar), reference.log_norm_pdf(z, mu, logvar))
    torch.testing.assert_close(swish(z), reference.swish(z))


# --- checkpoints -------------------------------------------------------------------------------


def test_state_dict_round_trips_both_ways():
    n_items, hidden, latent = 101, 12, 5
    fast, ref = model_pair(hidden, latent, n_items, torch.float32)
    sd, sd_r = fast.state_dict(), ref.state_dict()
    assert list(sd) == list(sd_r)  # the authors' keys, in the authors' order
    for key in sd_r:
        assert sd[key].shape == sd_r[key].shape, key
        torch.testing.assert_close(sd[key], sd_r[key], rtol=0, atol=0)
    assert sd["encoder.fc1.weight"].shape == (hidden, n_items)
    assert sd["prior.encoder_old.fc1.weight"].shape == (hidden, n_items)
    assert sd["decoder.weight"].shape == (n_items, latent)

    # authors' checkpoint -> RecVAE -> authors' model, through torch.save/load
    import io

    torch.manual_seed(11)
    authors = VAE(hidden, latent, n_items)
    buf = io.BytesIO()
    torch.save(authors.state_dict(), buf)
    buf.seek(0)
    loaded = RecVAE(hidden, latent, n_items)
    loaded.load_state_dict(torch.load(buf))
    buf = io.BytesIO()
    torch.save(loaded.state_dict(), buf)
    buf.seek(0)
    back = VAE(hidden, latent, n_items)
    back.load_state_dict(torch.load(buf))
    for key, value in authors.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)
    x = random_ratings(6, n_items, seed=8)
    authors.eval()
    loaded.eval()
    torch.testing.assert_close(
        loaded(x, gamma=0.005)[1], authors(torch.tensor(x.toarray(), dtype=torch.float32), gamma=0.005)[1]
    )


def test_load_state_dict_rejects_wrong_shapes_and_keys():
    fast = RecVAE(12, 5, 101)
    sd = VAE(12, 5, 100).state_dict()
    with pytest.raises(RuntimeError, match="encoder.fc1.weight"):
        fast.load_state_dict(sd)
    sd = fast.state_dict()
    sd["encoder.fc1.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected"):
        fast.load_state_dict(sd)
    sd = dict(fast.state_dict())
    del sd["encoder.fc1.bias"]
    with pytest.raises(RuntimeError, match="Missing"):
        fast.load_state_dict(sd)


def test_update_prior_copies_the_encoder():
    fast, ref = model_pair(12, 5, 40)
    fast.update_prior()
    ref.update_prior()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[key], value, rtol=0, atol=0)
    for p in fast.prior.encoder_old.parameters():
        assert not p.requires_grad


def test_a_loss_on_an_empty_batch_is_refused_not_nan():
    fast = RecVAE(8, 4, 10)
    empty = sp.csr_matrix((0, 10), dtype=np.float32)
    with pytest.raises(ValueError, match="the batch has no users"):
        fast(empty)
    with pytest.raises(ValueError, match="the batch has no users"):
        fast(torch.zeros(0, 10))
    assert fast(empty, calculate_loss=False).shape == (0, 10)  # scoring no users is fine


@pytest.mark.parametrize("args, name", [((8, 4, 2.5), "input_dim"), ((8.0, 4, 10), "hidden_dim"),
                                        ((8, "4", 10), "latent_dim"), ((8, 4, 0), "input_dim"),
                                        ((8, 4, None), "input_dim")])
def test_bad_sizes_are_named(args, name):
    with pytest.raises(ValueError, match=f"{name} must be a positive integer, got {args[['hidden_dim', 'latent_dim', 'input_dim'].index(name)]!r}"):
        RecVAE(*args)
