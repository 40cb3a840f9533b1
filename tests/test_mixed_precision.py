"""bf16-mixed (torch.autocast with bfloat16, recvae_fast.precision): the fused ops and the drop-in
RecVAE against the float64 reference, with a tolerance earned from the reference's own error under
the same autocast: ‖ours − ref64‖ <= C·‖ref_autocast − ref64‖ + ATOL·scale (root mean square over each
tensor: the error of many roundings, not one), on odd
shapes with an empty user, one-item users and duplicate (user, item) entries. Also: parameters,
gradients and the loss stay float32; torch.compile and torch.export run under autocast."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from helpers import grads_by_authors_name, model_pair, pinned_noise, random_ratings, triton_problem

from recvae_fast import RecVAE, precision, recommend
from recvae_fast.ops.multinomial_nll import NLLOptions, multinomial_nll
from recvae_fast.ops.swish_layer_norm import swish_layer_norm
from recvae_fast.testing.reference import swish
from recvae_fast.sparse import as_csr_batch
from recvae_fast.training import TrainConfig

C = 3.0  # ours may be this many times as far from float64 as the reference under autocast ...
ATOL = 1e-5  # ... plus float32's own rounding (relative to each tensor's scale)


def autocast_bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def assert_earned(name: str, ours: torch.Tensor, ref_autocast: torch.Tensor, ref64: torch.Tensor) -> None:
    """ours within C times the reference's own autocast error of float64 (root mean square)."""
    scale = ref64.abs().max().item() or 1.0
    err_ours = (ours.double() - ref64).pow(2).mean().sqrt().item()
    err_ref = (ref_autocast.double() - ref64).pow(2).mean().sqrt().item()
    assert err_ours <= C * err_ref + ATOL * scale, (
        f"{name}: error {err_ours:.3g} against float64, the reference under autocast {err_ref:.3g} (scale {scale:.3g})")


def ratings_with_duplicates(n_users: int, n_items: int, seed: int) -> sp.csr_matrix:
    """random_ratings (row 0 empty, rows 1-2 one item) with duplicated (user, item) entries in a
    COO that sums them (as every input path does)."""
    base = random_ratings(n_users, n_items, seed=seed, max_items=15).tocoo()
    dup = slice(0, base.nnz, 3)
    rows = np.concatenate([base.row, base.row[dup]])
    cols = np.concatenate([base.col, base.col[dup]])
    vals = np.concatenate([base.data, np.ones(len(base.row[dup]))])
    return sp.coo_matrix((vals, (rows, cols)), shape=base.shape).tocsr()


# ----------------------------------------------------------------------------- the NLL op


def reference_nll(z, weight, bias, dense):
    """The authors' multinomial term per user: −Σ_i x_ui·log_softmax(z·Wᵀ + b)_ui."""
    return -(F.log_softmax(F.linear(z, weight, bias), dim=-1) * dense).sum(dim=-1)


def nll_values_and_grads(fn, z, weight, bias, upstream, autocast: bool):
    leaves = [t.detach().clone().requires_grad_() for t in (z, weight, bias)]
    if autocast:
        with autocast_bf16():
            out = fn(*leaves)
    else:
        out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
    return out.detach(), grads


@pytest.mark.parametrize("impl", ["cpp", "torch"], ids=["cpp_blocks", "torch_blocks"])
@pytest.mark.parametrize("keep_probs", [True, False], ids=["kept", "recomputed"])
@pytest.mark.parametrize("n_users,n_items,latent,block", [(13, 301, 7, 64), (4, 97, 5, 0), (29, 1031, 33, 257)])
def test_multinomial_nll_bf16_values_and_grads(impl, keep_probs, n_users, n_items, latent, block):
    ratings = ratings_with_duplicates(n_users, n_items, seed=n_items)
    batch = as_csr_batch(ratings, n_items, dtype=torch.float32)
    dense64 = torch.tensor(ratings.toarray(), dtype=torch.float64)
    gen = torch.Generator().manual_seed(n_items)
    z = torch.randn(n_users, latent, generator=gen)
    weight = torch.randn(n_items, latent, generator=gen) / math.sqrt(latent) * 2
    bias = torch.randn(n_items, generator=gen) * 0.5
    upstream = torch.rand(n_users, generator=gen, dtype=torch.float64) + 0.5

    def ours(z, w, b):
        return multinomial_nll(z, w, b, batch, impl=impl,
                               options=NLLOptions(item_block=block or 1 << 20, keep_probs=keep_probs))

    got, got_grads = nll_values_and_grads(ours, z, weight, bias, upstream, autocast=True)
    ref_ac, ref_ac_grads = nll_values_and_grads(
        lambda *t: reference_nll(*t, dense64.float()), z, weight, bias, upstream, autocast=True)
    ref64, ref64_grads = nll_values_and_grads(
        lambda *t: reference_nll(*t, dense64), z.double(), weight.double(), bias.double(), upstream, autocast=False)
    assert got.dtype == torch.float32 and all(g.dtype == torch.float32 for g in got_grads)
    assert_earned("nll", got, ref_ac, ref64)
    for name, g, g_ac, g64 in zip(("dz", "dW", "db"), got_grads, ref_ac_grads, ref64_grads):
        assert_earned(name, g, g_ac, g64)
    # and the products did run in bf16: the result is not the float32 one
    fp32, _ = nll_values_and_grads(ours, z, weight, bias, upstream, autocast=False)
    assert not torch.equal(got, fp32)


@pytest.mark.parametrize("impl", ["cpp", "torch"], ids=["cpp_blocks", "torch_blocks"])
def test_multinomial_nll_bf16_one_user(impl):
    """A batch of one one-item user (one rounding: no earned bound, bf16's): close to float32."""
    batch = as_csr_batch(random_ratings(3, 97, seed=1)[1:2], 97, dtype=torch.float32)
    z, weight, bias = torch.randn(1, 5), torch.randn(97, 5), torch.randn(97)
    with autocast_bf16():
        got = multinomial_nll(z, weight, bias, batch, impl=impl)
    want = multinomial_nll(z, weight, bias, batch, impl=impl)
    assert got.shape == (1,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0)


@pytest.mark.parametrize("cpp", [True, False], ids=["cpp", "torch"])
@pytest.mark.parametrize("case", ["encoder", "decoder_kept", "decoder_recomputed", "all"])
def test_opcheck_multinomial_nll_with_bf16_products(case, cpp):
    from test_custom_ops import NLL_CASES, nll_args

    want_grad_z, keep_probs, decoder_grad = NLL_CASES[case]
    args = nll_args(want_grad_z, keep_probs, 4, dtype=torch.float32, decoder_grad=decoder_grad, cpp=cpp)
    torch.library.opcheck(torch.ops.recvae_fast.multinomial_nll.default, (*args, torch.bfloat16))


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_multinomial_nll_autocast_keeps_float64(impl):
    """autocast leaves float64 alone (as torch's own ops do): the op then runs in float64."""
    ratings = random_ratings(5, 40, seed=3)
    batch = as_csr_batch(ratings, 40, dtype=torch.float64)
    z, weight, bias = torch.randn(5, 4, dtype=torch.float64), torch.randn(40, 4, dtype=torch.float64), torch.zeros(
        40, dtype=torch.float64)
    with autocast_bf16():
        got = multinomial_nll(z, weight, bias, batch, impl=impl)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, multinomial_nll(z, weight, bias, batch, impl=impl), rtol=0, atol=0)


# ----------------------------------------------------------------------------- swish + LayerNorm, KL


@pytest.mark.parametrize("impl", ["cpp", "torch"], ids=["cpp_tail", "torch_tail"])
@pytest.mark.parametrize("n_rows,width", [(1, 7), (17, 33)])
def test_swish_layer_norm_bf16_values_and_grads(impl, n_rows, width):
    torch.manual_seed(width)
    linear, norm = torch.nn.Linear(width, width), torch.nn.LayerNorm(width, eps=0.1)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    pre, residual = torch.randn(n_rows, width), torch.randn(n_rows, width)
    upstream = torch.randn(n_rows, width, dtype=torch.float64)

    def run(fn, dtype, autocast):
        lin, ln = (torch.nn.Linear(width, width), torch.nn.LayerNorm(width, eps=0.1))
        lin.load_state_dict(linear.state_dict())
        ln.load_state_dict(norm.state_dict())
        lin, ln = lin.to(dtype), ln.to(dtype)
        x, r = pre.to(dtype).requires_grad_(), residual.to(dtype).requires_grad_()
        if autocast:
            with autocast_bf16():
                y = fn(x, ln, lin, r)
        else:
            y = fn(x, ln, lin, r)
        leaves = [x, r, lin.weight, lin.bias, ln.weight, ln.bias]
        return y.detach(), torch.autograd.grad(y, leaves, upstream.to(y.dtype))

    def reference(x, ln, lin, r):
        return ln(swish(lin(x) + r))

    def ours(x, ln, lin, r):
        return swish_layer_norm(x, ln, lin, r, impl=impl)

    got, got_grads = run(ours, torch.float32, True)
    ref_ac, ref_ac_grads = run(reference, torch.float32, True)
    ref64, ref64_grads = run(reference, torch.float64, False)
    assert got.dtype == torch.float32
    assert_earned("y", got, ref_ac, ref64)
    names = ("dpre", "dresidual", "dW", "dlinear_bias", "dln_weight", "dln_bias")
    for name, g, g_ac, g64 in zip(names, got_grads, ref_ac_grads, ref64_grads):
        assert g.dtype == torch.float32
        assert_earned(name, g, g_ac, g64)


def test_swish_layer_norm_op_widens_bf16_under_autocast():
    """The op itself declares float32 under autocast: bf16 inputs are widened, the output is float32
    (this is what failed with 'Got unsupported ScalarType BFloat16')."""
    torch.manual_seed(0)
    pre = torch.randn(4, 6).bfloat16()
    weight, bias = torch.ones(6), torch.zeros(6)
    with autocast_bf16():
        y, *_ = torch.ops.recvae_fast.swish_layer_norm(pre, None, None, weight, bias, 0.1, False)
    expected = F.layer_norm(F.silu(pre.float()), (6,), weight, bias, 0.1)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the whole drop-in


def loss_and_grads(model, ratings, dropout_mask, keep, eps, *, reference: bool, autocast: bool, gamma=0.005):
    model.zero_grad(set_to_none=True)
    model.train()
    if reference:
        x = torch.tensor(ratings.toarray(), dtype=next(model.parameters()).dtype)
        kwargs = dict(dropout_mask=dropout_mask.to(x.dtype), eps=eps.to(x.dtype))
    else:
        x, kwargs = ratings, dict(keep_mask=keep, eps=eps.to(next(model.parameters()).dtype))
    if autocast:
        with autocast_bf16():
            (mll, kld), loss = model(x, gamma=gamma, dropout_rate=0.5, **kwargs)
    else:
        (mll, kld), loss = model(x, gamma=gamma, dropout_rate=0.5, **kwargs)
    loss.backward()
    return {"mll": mll.detach(), "kld": kld.detach()}, grads_by_authors_name(model)


@pytest.mark.parametrize("n_users,n_items,hidden,latent", [(13, 203, 23, 7), (3, 61, 9, 4), (31, 517, 37, 11)])
def test_drop_in_bf16_mixed_loss_and_grads(n_users, n_items, hidden, latent):
    ratings = ratings_with_duplicates(n_users, n_items, seed=hidden)
    fast, ref = model_pair(hidden, latent, n_items, dtype=torch.float32, seed=latent)
    _, ref64 = model_pair(hidden, latent, n_items, dtype=torch.float64, seed=latent)
    ref64.load_state_dict(ref.state_dict())  # the same float32 weights, widened
    dropout_mask, keep, eps = pinned_noise(fast, ratings, latent, torch.float32)
    got, got_grads = loss_and_grads(fast, ratings, dropout_mask, keep, eps, reference=False, autocast=True)
    ref_ac, ref_ac_grads = loss_and_grads(ref, ratings, dropout_mask, keep, eps, reference=True, autocast=True)
    exact, exact_grads = loss_and_grads(ref64, ratings, dropout_mask, keep, eps, reference=True, autocast=False)
    for name in ("mll", "kld"):
        assert got[name].dtype == torch.float32
        assert_earned(name, got[name], ref_ac[name], exact[name])
    assert set(got_grads) == set(exact_grads)
    for name, grad in got_grads.items():
        assert grad.dtype == torch.float32, name
        assert_earned(name, grad, ref_ac_grads[name], exact_grads[name])
    assert all(p.dtype == torch.float32 for p in fast.parameters())


def test_drop_in_bf16_runs_with_row_sparse_fc1_and_eval_scores():
    ratings = random_ratings(6, 50, seed=5)
    model = RecVAE(11, 4, 50)
    model.encoder.fc1.sparse_grad = True
    with autocast_bf16():
        (_, _), loss = model(ratings, gamma=0.005)
    loss.backward()
    assert model.encoder.fc1.weight_t.grad.is_sparse and torch.isfinite(loss)
    model.eval()
    with torch.no_grad(), autocast_bf16():
        scores = model(ratings, calculate_loss=False)
    assert scores.shape == (6, 50) and torch.isfinite(scores).all()


@pytest.mark.interpreter
@pytest.mark.skipif(triton_problem() is not None, reason=str(triton_problem()))
def test_triton_drop_in_bf16_mixed_loss_and_grads():
    """impl "triton" under autocast: the NLL kernels on bf16 copies of z, Wd and bd (fp32 LSE and
    NLL), on the CPU under the Triton interpreter here."""
    n_users, n_items, hidden, latent = 7, 45, 9, 5
    ratings = ratings_with_duplicates(n_users, n_items, seed=2)
    fast, ref = model_pair(hidden, latent, n_items, dtype=torch.float32, seed=3, impl="triton")
    _, ref64 = model_pair(hidden, latent, n_items, dtype=torch.float64, seed=3)
    ref64.load_state_dict(ref.state_dict())
    dropout_mask, keep, eps = pinned_noise(fast, ratings, latent, torch.float32)
    got, got_grads = loss_and_grads(fast, ratings, dropout_mask, keep, eps, reference=False, autocast=True)
    ref_ac, ref_ac_grads = loss_and_grads(ref, ratings, dropout_mask, keep, eps, reference=True, autocast=True)
    exact, exact_grads = loss_and_grads(ref64, ratings, dropout_mask, keep, eps, reference=True, autocast=False)
    for name in ("mll", "kld"):
        assert_earned(name, got[name], ref_ac[name], exact[name])
    for name, grad in got_grads.items():
        assert grad.dtype == torch.float32, name
        assert_earned(name, grad, ref_ac_grads[name], exact_grads[name])
    fp32, _ = loss_and_grads(fast, ratings, dropout_mask, keep, eps, reference=False, autocast=False)
    assert fp32["mll"] != got["mll"]  # the kernels did take bf16 operands


# ----------------------------------------------------------------------------- compile and export under autocast


def test_compiled_loss_under_autocast_equals_eager():
    torch._dynamo.reset()
    ratings = random_ratings(9, 47, seed=2)
    model = RecVAE(13, 5, 47)
    batch = model.as_batch(ratings)
    eps = torch.randn(9, 5, generator=torch.Generator().manual_seed(0))
    keep = torch.rand(batch.nnz, generator=torch.Generator().manual_seed(1)) >= 0.5

    def loss_fn(batch, keep, eps):
        with autocast_bf16():
            mll, kld = model.loss_terms(batch, None, 0.005, 0.5, keep_mask=keep, eps=eps)
        return kld - mll

    def run(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(batch, keep, eps)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.encoder.parameters()] + [model.decoder.weight.grad.clone()]

    eager_loss, eager_grads = run(loss_fn)
    compiled_loss, compiled_grads = run(torch.compile(loss_fn, fullgraph=True, backend="inductor"))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-3, atol=1e-3)
    for got, want in zip(compiled_grads, eager_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_export_scorer_under_autocast_and_bf16(tmp_path):
    from recvae_fast.export import export_scorer, load_scorer

    ratings = random_ratings(8, 40, seed=4)
    model = RecVAE(12, 5, 40).eval()
    with autocast_bf16():  # a caller's autocast around export: the program is the float32 one
        export_scorer(model, tmp_path / "caller_autocast.pt2", k=5)
    plain = load_scorer(tmp_path / "caller_autocast.pt2")(ratings)
    want32 = recommend(model, ratings, k=5)
    torch.testing.assert_close(torch.from_numpy(plain.scores), torch.from_numpy(want32.scores), rtol=1e-4,
                               atol=1e-5)
    export_scorer(model, tmp_path / "bf16.pt2", k=5, precision="bf16-mixed")
    got = load_scorer(tmp_path / "bf16.pt2")(ratings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", precision.SlowPrecisionWarning)
        want = recommend(model, ratings, k=5, precision="bf16-mixed")
    torch.testing.assert_close(torch.from_numpy(got.scores), torch.from_numpy(want.scores), rtol=2e-2, atol=2e-2)
    assert (got.items == want.items).mean() >= 0.9
    assert (got.items[0] >= 0).all()  # the empty user still gets k items


# ----------------------------------------------------------------------------- scoring


def test_recommend_bf16_is_exact_topk_of_bf16_scores():
    """Scores come from bf16 operands (float32 result); the top-k over them is exact, and close to
    the float32 one."""
    ratings = ratings_with_duplicates(11, 300, seed=7)
    model = RecVAE(16, 6, 300).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", precision.SlowPrecisionWarning)
        got = recommend(model, ratings, k=20, precision="bf16-mixed")
    with torch.no_grad(), autocast_bf16():
        mu, _ = model.encode(ratings)
    scores = (mu.bfloat16() @ model.decoder.weight.detach().bfloat16().t()).float() + model.decoder.bias.detach()
    scores[torch.tensor(ratings.toarray()) > 0] = float("-inf")
    best = torch.topk(scores, 20, dim=1)
    torch.testing.assert_close(torch.from_numpy(got.scores), best.values, rtol=1e-6, atol=1e-6)
    ranked_scores = scores.gather(1, torch.from_numpy(got.items))
    torch.testing.assert_close(ranked_scores, best.values, rtol=0, atol=0)


# ----------------------------------------------------------------------------- names and warnings


def test_check_precision_lists_the_choices():
    assert precision.check_precision("bf16-mixed") == "bf16-mixed"
    with pytest.raises(ValueError, match="choose one of 32-true, bf16-mixed"):
        precision.check_precision("bf16")
    with pytest.raises(ValueError, match="unknown precision"):  # the same check guards fit's hyperparameters
        TrainConfig(precision="16-mixed").validate()


def test_warns_once_without_bf16_products(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_products", lambda: False)
    monkeypatch.setattr(precision, "_warned", False)
    with pytest.warns(precision.SlowPrecisionWarning, match="slower"):
        precision.warn_if_slow("bf16-mixed", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.warn_if_slow("bf16-mixed", "cpu")  # once per process
        monkeypatch.setattr(precision, "_warned", False)
        precision.warn_if_slow("32-true", "cpu")
        monkeypatch.setattr(precision, "cpu_has_bf16_products", lambda: True)
        precision.warn_if_slow("bf16-mixed", "cpu")


def test_cpu_detection_reads_the_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: {"avx2", "fma"})
    assert not precision.cpu_has_bf16_products()
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: {"avx2", "amx_bf16"})
    assert precision.cpu_has_bf16_products()
