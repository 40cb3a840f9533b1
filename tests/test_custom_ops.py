"""The registered ops (recvae_fast.ops, namespace recvae_fast::): torch.library.opcheck per
op on CPU tensors, in their "torch" and "cpp" forms (schema, fake implementation, autograd
registration, AOT dispatch), values and gradients against plain dense torch, the profiler sees them by name, and RecVAE's training loss
compiles with torch.compile(fullgraph=True) (Inductor, CPU) to the eager loss and gradients."""
from __future__ import annotations

import pytest
import torch
from helpers import model_pair, pinned_noise, random_ratings

from recvae_fast import RecVAE, optim
from recvae_fast.ops.multinomial_nll import multinomial_nll
from recvae_fast.ops.sparse_input_layer import sparse_input_layer
from recvae_fast.ops.topk_masked import topk_masked
from recvae_fast.sparse import as_csr_batch

N_USERS, N_ITEMS, HIDDEN, LATENT = 11, 37, 7, 5
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def csr_case(dtype=torch.float64, seed=0, n_users=N_USERS, n_items=N_ITEMS):
    """A canonical batch (row 0 empty, row 1 one item) and its dense matrix."""
    ratings = random_ratings(n_users, n_items, seed=seed, max_items=12)
    batch = as_csr_batch(ratings, n_items, dtype=dtype)
    return batch, torch.tensor(ratings.toarray(), dtype=dtype)


def leaf(*shape, dtype=torch.float64, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(requires_grad)


# ----------------------------------------------------------------------------- sparse input layer


# The registered "torch" and "cpp" forms of the ops that have both (a flag of the op).
CPP_FLAG = pytest.mark.parametrize("cpp", [True, False], ids=["cpp", "torch"])


def sparse_input_layer_args(dtype=torch.float64, sparse_grad=False, cpp=True):
    batch, _ = csr_case(dtype)
    coef = (batch.values / 3).requires_grad_()
    return (batch.indptr, batch.indices, coef, leaf(N_ITEMS, HIDDEN, dtype=dtype, seed=1),
            leaf(HIDDEN, dtype=dtype, seed=2), sparse_grad, cpp)


@CPP_FLAG
def test_opcheck_sparse_input_layer(cpp):
    torch.library.opcheck(torch.ops.recvae_fast.sparse_input_layer.default, sparse_input_layer_args(cpp=cpp))


@CPP_FLAG
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense_grad", "sparse_grad"])
def test_sparse_input_layer_matches_dense(dtype, sparse_grad, cpp):
    indptr, indices, coef, weight_t, bias, _, _ = sparse_input_layer_args(dtype, sparse_grad)
    out = torch.ops.recvae_fast.sparse_input_layer(indptr, indices, coef, weight_t, bias, sparse_grad, cpp)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (coef, weight_t, bias), upstream)
    # Dense reference: C (B × I, coefficients at the nonzeros) @ W + b.
    ref_leaves = [t.detach().double().requires_grad_() for t in (coef, weight_t, bias)]
    rows = torch.repeat_interleave(torch.arange(N_USERS), indptr[1:] - indptr[:-1])
    dense_coef = torch.zeros(N_USERS, N_ITEMS, dtype=torch.float64).index_put((rows, indices), ref_leaves[0])
    ref = dense_coef @ ref_leaves[1] + ref_leaves[2]
    ref_grads = torch.autograd.grad(ref, ref_leaves, upstream.double())
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    assert torch.equal(out[0], bias.detach())  # the empty user: h1_pre = b1
    assert grads[1].is_sparse == sparse_grad
    if sparse_grad:  # one row per distinct item of the batch, summed over its users
        assert grads[1].is_coalesced() and grads[1]._nnz() == indices.unique().numel()
    for got, want in zip(grads, ref_grads):
        got = got.to_dense() if got.is_sparse else got
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **TOL[dtype])


@CPP_FLAG
@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense_grad", "sparse_grad"])
def test_sparse_input_layer_with_no_nonzeros(sparse_grad, cpp):
    """Every user empty: h1_pre = b1, and the weight gradient is zero (no rows at all when sparse)."""
    weight_t, bias = leaf(N_ITEMS, HIDDEN, seed=1), leaf(HIDDEN, seed=2)
    coef = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    indptr, indices = torch.zeros(4, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    out = torch.ops.recvae_fast.sparse_input_layer(indptr, indices, coef, weight_t, bias, sparse_grad, cpp)
    assert torch.equal(out, bias.detach().expand(3, HIDDEN))
    grad_coef, grad_weight, grad_bias = torch.autograd.grad(out.sum(), (coef, weight_t, bias))
    assert grad_coef.shape == (0,) and torch.equal(grad_bias, torch.full((HIDDEN,), 3.0, dtype=torch.float64))
    if sparse_grad:
        assert grad_weight.is_sparse and grad_weight._nnz() == 0
    assert torch.equal(grad_weight.to_dense(), torch.zeros_like(weight_t))


# ----------------------------------------------------------------------------- multinomial NLL


def nll_args(want_grad_z, keep_probs, block, dtype=torch.float64, decoder_grad=True, cpp=True):
    """Arguments of recvae_fast::multinomial_nll; z requires grad iff want_grad_z, Wd and bd iff
    decoder_grad (as the op's entry point, recvae_fast.ops.multinomial_nll, sets the flags)."""
    batch, _ = csr_case(dtype)
    return (leaf(N_USERS, LATENT, dtype=dtype, seed=3, requires_grad=want_grad_z),
            leaf(N_ITEMS, LATENT, dtype=dtype, seed=4, requires_grad=decoder_grad),
            leaf(N_ITEMS, dtype=dtype, seed=5, requires_grad=decoder_grad),
            batch.indptr, batch.indices, batch.values, block, want_grad_z, keep_probs, cpp)


# (want_grad_z, keep_probs, decoder_grad): the encoder phase, the decoder phase with the
# probabilities kept or recomputed, every gradient, and no gradient.
NLL_CASES = {"encoder": (True, False, False), "decoder_kept": (False, True, True),
             "decoder_recomputed": (False, False, True), "all": (True, True, True), "none": (False, False, False)}


@CPP_FLAG
@pytest.mark.parametrize("block", [0, 4, N_ITEMS, N_ITEMS + 3])
@pytest.mark.parametrize("case", list(NLL_CASES))
def test_opcheck_multinomial_nll(block, case, cpp):
    want_grad_z, keep_probs, decoder_grad = NLL_CASES[case]
    args = nll_args(want_grad_z, keep_probs, block, decoder_grad=decoder_grad, cpp=cpp)
    torch.library.opcheck(torch.ops.recvae_fast.multinomial_nll.default, args)


@CPP_FLAG
@pytest.mark.parametrize("keep_probs", [True, False], ids=["kept", "recomputed"])
def test_opcheck_multinomial_nll_decoder_backward(keep_probs, cpp):
    args = nll_args(False, keep_probs, 4, cpp=cpp)
    with torch.no_grad():
        _, lse, _, kept, kept_max, block_used = torch.ops.recvae_fast.multinomial_nll(*args)
    z, weight, bias, indptr, indices, values = (t.detach() for t in args[:6])
    grad_nll = leaf(N_USERS, seed=6, requires_grad=False)
    torch.library.opcheck(
        torch.ops.recvae_fast.multinomial_nll_decoder_backward.default,
        (grad_nll, z, weight, bias, indptr, indices, values, lse, kept, kept_max, block_used, cpp),
    )


@CPP_FLAG
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_multinomial_nll_matches_dense(dtype, cpp):
    z, weight, bias, indptr, indices, values, block, _, _, _ = nll_args(True, True, 4, dtype)
    nll, lse, *_ = torch.ops.recvae_fast.multinomial_nll(z, weight, bias, indptr, indices, values, block, True, True,
                                                         cpp)
    upstream = leaf(N_USERS, seed=7, requires_grad=False)
    grads = torch.autograd.grad(nll, (z, weight, bias), upstream.to(dtype))
    _, x = csr_case(torch.float64)
    ref_leaves = [t.detach().double().requires_grad_() for t in (z, weight, bias)]
    logits = torch.addmm(ref_leaves[2], ref_leaves[0], ref_leaves[1].T)
    ref = -(torch.log_softmax(logits, dim=-1) * x).sum(-1)
    ref_grads = torch.autograd.grad(ref, ref_leaves, upstream)
    torch.testing.assert_close(nll.double(), ref, **TOL[dtype])
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, dim=-1).detach(), **TOL[dtype])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, **TOL[dtype])


@CPP_FLAG
def test_multinomial_nll_without_grad_z_refuses_a_z_gradient(cpp):
    args = (leaf(N_USERS, LATENT),) + nll_args(False, False, 4, cpp=cpp)[1:]
    nll = torch.ops.recvae_fast.multinomial_nll(*args)[0]
    with pytest.raises(RuntimeError, match="want_grad_z=False"):
        nll.sum().backward()


# ----------------------------------------------------------------------------- C++ ops


def topk_args(dtype):
    batch, _ = csr_case()
    scores = leaf(N_USERS, N_ITEMS, seed=8, requires_grad=False).to(dtype)
    scores[3, 5] = float("nan")
    scores[4, :3] = scores[4, 3]  # ties
    return scores, batch.indptr, batch.indices, 6, 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_opcheck_topk_masked(dtype):
    args = topk_args(dtype)
    torch.library.opcheck(torch.ops.recvae_fast.topk_masked.default, args)
    got = torch.ops.recvae_fast.topk_masked(*args)
    want = topk_masked(args[0], (args[1], args[2]), args[3], impl="torch")
    assert torch.equal(got[0], want.scores) and torch.equal(got[1], want.items)


def adam_args(dtype=torch.float64):
    param = leaf(N_ITEMS, HIDDEN, dtype=dtype, seed=9, requires_grad=False)
    exp_avg = leaf(N_ITEMS, HIDDEN, dtype=dtype, seed=10, requires_grad=False) * 0.1
    exp_avg_sq = leaf(N_ITEMS, HIDDEN, dtype=dtype, seed=11, requires_grad=False).abs() * 0.01
    rows = torch.tensor([5, 0, 36, 5, 12])  # row 5 repeated: its values are summed
    values = leaf(5, HIDDEN, dtype=dtype, seed=12, requires_grad=False)
    return param, exp_avg, exp_avg_sq, rows, values, 3, 1e-3, 0.9, 0.999, 1e-8, 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck_row_sparse_adam_step(dtype):
    args = adam_args(dtype)
    torch.library.opcheck(torch.ops.recvae_fast.row_sparse_adam_step.default, args)
    param, exp_avg, exp_avg_sq, rows, values, step, lr, beta1, beta2, eps, threads = adam_args(dtype)
    want = [t.clone() for t in (param, exp_avg, exp_avg_sq)]
    grad = torch.sparse_coo_tensor(rows[None], values, param.shape)
    optim.adam_step_row_sparse_(*want[:1], grad, *want[1:], step, lr, (beta1, beta2), eps, impl="torch")
    torch.ops.recvae_fast.row_sparse_adam_step(param, exp_avg, exp_avg_sq, rows, values, step, lr, beta1, beta2,
                                               eps, threads)
    for got, ref in zip((param, exp_avg, exp_avg_sq), want):
        torch.testing.assert_close(got, ref, **TOL[dtype])


# ----------------------------------------------------------------------------- RecVAE's loss


def phase_loss(model, batch, phase, keep_mask, eps):
    """What a training step minimises: the encoder phase −ELBO (dropout 0.5), the decoder phase −mll."""
    mll, kld = model.loss_terms(batch, None, 0.005, 0.5 if phase == "encoder" else 0.0,
                                with_kl=phase == "encoder", keep_mask=keep_mask, eps=eps)
    return -mll if kld is None else kld - mll


def loss_and_grads(loss_fn, model, batch, phase, keep_mask, eps):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch, phase, keep_mask, eps)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def training_case(dtype, phase, impl="cpp"):
    ratings = random_ratings(N_USERS, N_ITEMS, seed=4, max_items=12)
    model, _ = model_pair(HIDDEN, LATENT, N_ITEMS, dtype=dtype, impl=impl)
    model.train()
    model.encoder.requires_grad_(phase == "encoder")
    model.decoder.requires_grad_(phase == "decoder")
    _, keep_mask, eps = pinned_noise(model, ratings, LATENT, dtype)
    return model, model.as_batch(ratings), keep_mask, eps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("phase", ["encoder", "decoder"])
def test_compiled_loss_equals_eager(dtype, phase, impl="cpp"):
    """fullgraph=True: no graph break anywhere in the loss; the loss and every gradient equal eager.
    (Dense fc1 gradient: with the row-sparse one, Inductor's backward fails, see recvae_fast.ops.)"""
    model, batch, keep_mask, eps = training_case(dtype, phase, impl)
    want_loss, want_grads = loss_and_grads(phase_loss, model, batch, phase, keep_mask, eps)
    torch._dynamo.reset()
    compiled = torch.compile(phase_loss, fullgraph=True, backend="inductor")
    got_loss, got_grads = loss_and_grads(compiled, model, batch, phase, keep_mask, eps)
    torch.testing.assert_close(got_loss, want_loss, **TOL[dtype])
    assert got_grads.keys() == want_grads.keys() and want_grads
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, **TOL[dtype], msg=name)


def test_profiler_sees_the_ops_by_name():
    model, batch, keep_mask, eps = training_case(torch.float64, "decoder")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        phase_loss(model, batch, "decoder", keep_mask, eps).backward()
        topk_masked(torch.randn(3, 9), None, 2)
    names = {event.key for event in prof.key_averages()}
    for op in ("sparse_input_layer", "multinomial_nll", "multinomial_nll_decoder_backward", "topk_masked",
               "swish_layer_norm"):
        assert f"recvae_fast::{op}" in names, op


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_the_model_ops_route_through_the_registered_ops(impl):
    batch, _ = csr_case()
    weight_t, bias = leaf(N_ITEMS, HIDDEN, seed=1), leaf(HIDDEN, seed=2)
    out = sparse_input_layer(batch, weight_t, bias, 0.0, impl=impl)
    assert "recvae_fast_sparse_input_layer" in type(out.grad_fn).__name__
    nll = multinomial_nll(leaf(N_USERS, LATENT), leaf(N_ITEMS, LATENT), leaf(N_ITEMS), batch, impl=impl)
    assert "recvae_fast_multinomial_nll" in type(nll.grad_fn).__name__
    encoder = RecVAE(HIDDEN, LATENT, N_ITEMS).double().encoder
    mu, _ = encoder(batch, 0.0, impl=impl)
    tails = [node for node in _graph_nodes(mu.grad_fn) if "recvae_fast_swish_layer_norm" in type(node).__name__]
    assert len(tails) == (5 if impl == "cpp" else 0)  # C++: one per encoder layer; torch: torch ops only


def _graph_nodes(node, seen=None):
    """Every autograd node reachable from node."""
    seen = set() if seen is None else seen
    if node is None or node in seen:
        return seen
    seen.add(node)
    for child, _ in node.next_functions:
        _graph_nodes(child, seen)
    return seen
