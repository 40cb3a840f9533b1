"""Item-sharded RecVAE (recvae_fast.distributed) on gloo, 2–4 CPU processes, against one device."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from helpers import grads_by_authors_name, model_pair, pinned_noise, random_ratings, triton_problem

from recvae_fast import RecVAE, evaluate, fit, recommend
from recvae_fast.distributed import ItemLayout, ShardedRecVAE, item_layout, make_item_mesh, shard_bounds
from recvae_fast.distributed.model import SHARDED_KEYS
from recvae_fast.distributed.checkpoint import (
    gather_full_state_dict, latest_checkpoint, load_checkpoint, load_into_recvae, save_checkpoint,
)
from recvae_fast.distributed.inference import merge_candidates
from recvae_fast.distributed.training import fit_sharded, sharded_train_step
from recvae_fast.ops.topk_masked import topk_masked
from recvae_fast.training import TrainConfig, make_optimizers, train_step

TIGHT = dict(rtol=1e-10, atol=1e-12)
H, K = 12, 5
TRITON_PROBLEM = triton_problem()
# The Triton implementation's tests run under the interpreter (tests/conftest.py), or are skipped with the reason.
TRITON_MARKS = [pytest.mark.interpreter, pytest.mark.skipif(TRITON_PROBLEM is not None, reason=str(TRITON_PROBLEM))]


def spawn(worker, world_size: int, tmp_path, *args, timeout_s: float = 60) -> None:
    """Run worker(rank, *args) in world_size gloo processes; any worker's exception fails the test.
    Forked, not spawned: a fresh interpreter importing torch costs seconds per process."""
    # torch.optim's first Adam imports torch._dynamo (seconds): pay it once here, not in every fork
    torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True)
    init_file = tmp_path / f"pg_init_{worker.__name__}"
    mp.start_processes(_bootstrap, args=(world_size, str(init_file), timeout_s, worker, args), nprocs=world_size,
                       join=True, start_method="fork")


def _bootstrap(rank, world_size, init_file, timeout_s, worker, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def awkward_ratings(n_users: int, n_items: int, n_shards: int, seed: int = 0) -> sp.csr_matrix:
    """random_ratings (an empty user, one-item users, weights) plus a user whose items all sit on the
    first shard and one whose items all sit on the last."""
    base = random_ratings(n_users, n_items, seed=seed, max_items=n_items // 2).tolil()
    bounds = shard_bounds(n_items, n_shards)
    for user, (lo, hi) in ((3, bounds[0]), (4, bounds[-1])):
        base.rows[user], base.data[user] = list(range(lo, hi)), [2.0] * (hi - lo)
    return base.tocsr()


# --- loss terms and every gradient ------------------------------------------------------------


def _gradient_worker(rank, n_items, item_shards, n_users, impl=None):
    from recvae_fast.distributed import model as sharded_model
    from recvae_fast.distributed.training import reduce_gradients, sharded_backward

    kernels_used, import_kernel = [], sharded_model.import_kernel
    # the shard's ops fetch their kernels there; patched in this process only
    sharded_model.import_kernel = lambda module, name: kernels_used.append(name) or import_kernel(module, name)
    single, _ = model_pair(H, K, n_items)
    ratings = awkward_ratings(n_users, n_items, item_shards)
    dense_mask, keep, eps = pinned_noise(single, ratings, K, torch.float64)
    single.train()
    mll, kld = single.loss_terms(single.as_batch(ratings), gamma=0.01, dropout_rate=0.5, keep_mask=keep, eps=eps)
    (kld - mll).backward()
    expected = grads_by_authors_name(single)

    layout = item_layout(make_item_mesh(item_shards), n_items)
    model = ShardedRecVAE(layout, H, K, impl=impl).double()
    model.load_full_state_dict(single.state_dict())
    model.train()
    # this data rank's users: a contiguous part of the batch, with their mask entries and ε
    users = np.array_split(np.arange(n_users), layout.data_size)[layout.data_rank]
    view = model.view(ratings[users])
    sub_keep = dense_mask[users][view.full.row_ids(), view.full.indices].bool()
    terms = sharded_backward(model, view, n_users, gamma=0.01, dropout_rate=0.5, keep_mask=sub_keep, eps=eps[users])
    reduce_gradients(model)
    torch.testing.assert_close(terms["mll"], mll.item(), **TIGHT)
    torch.testing.assert_close(terms["kld"], kld.item(), **TIGHT)
    lo, hi = layout.lo, layout.hi
    for key, param in model.shard_tensors().items():
        if key.startswith("prior."):
            continue  # the old encoder takes no gradient
        full = expected[key].t() if SHARDED_KEYS[key] == 1 else expected[key]
        torch.testing.assert_close(param.grad, full[lo:hi], **TIGHT, msg=f"rank {rank}: {key}")
    for key, param in model.replicated_tensors().items():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[key], **TIGHT, msg=f"rank {rank}: {key}")

    # an encoder step (decoder frozen) takes the likelihood's one-pass dz path: same encoder gradients
    model.zero_grad(set_to_none=True)
    model.decoder.requires_grad_(False)
    sharded_backward(model, view, n_users, gamma=0.01, dropout_rate=0.5, keep_mask=sub_keep, eps=eps[users])
    reduce_gradients(model)
    assert model.decoder.weight.grad is None
    torch.testing.assert_close(model.encoder.fc1.weight_t.grad, expected["encoder.fc1.weight"].t()[lo:hi], **TIGHT)
    torch.testing.assert_close(model.encoder.fc_mu.weight.grad, expected["encoder.fc_mu.weight"], **TIGHT)
    if impl == "triton":  # the shard's ops did go to the kernels
        assert {"multinomial_nll_parts", "sparse_input_layer"} <= set(kernels_used)


@pytest.mark.parametrize("world_size,item_shards,n_items", [(2, 2, 23), (3, 3, 31), (4, 2, 19)],
                         ids=["2 shards", "3 uneven shards", "2x2 mesh"])
def test_loss_terms_and_gradients_equal_one_device(tmp_path, world_size, item_shards, n_items):
    spawn(_gradient_worker, world_size, tmp_path, n_items, item_shards, 9)


@pytest.mark.parametrize("world_size,item_shards,n_items", [(2, 2, 23), (4, 2, 19)], ids=["2 shards", "2x2 mesh"])
@pytest.mark.parametrize("impl", [pytest.param("triton", marks=TRITON_MARKS)])
def test_triton_impl_loss_terms_and_gradients_equal_one_device(tmp_path, world_size, item_shards, n_items, impl):
    """impl "triton" on each shard (fc1's kernel on the shard's slice, the NLL kernels' per-shard parts)
    against the one-device torch model: loss terms and every gradient, float64."""
    spawn(_gradient_worker, world_size, tmp_path, n_items, item_shards, 9, impl, timeout_s=120)


@pytest.mark.parametrize("impl", ["cpp", "torch", pytest.param("triton", marks=TRITON_MARKS)])
def test_shard_parts_equal_dense_parts(impl):
    """The per-shard parts of the likelihood and fc1's per-shard gather, each implementation, against
    dense float64 autograd: values and the gradients of z, Wd, bd (likelihood; encoder-phase path with
    only z needing one too) and of W1 (dense and row-sparse). A shard of 37 items with users that have
    no item in it, one item, weights and duplicates across users."""
    from recvae_fast.distributed.model import ShardView, shard_input_gather, shard_likelihood_parts
    from recvae_fast.ops.dispatch import import_kernel

    gen = torch.Generator().manual_seed(4)
    n_users, n_items, lo, hi, hidden = 11, 83, 20, 57, 9
    ratings = awkward_ratings(n_users, n_items, 3, seed=2)
    view = ShardView(RecVAE(hidden, K, n_items).double().as_batch(ratings), lo, hi)
    local = view.local
    x = torch.zeros(n_users, hi - lo, dtype=torch.float64)
    x[local.row_ids(), local.indices] = local.values
    parts = (import_kernel("multinomial_nll", "multinomial_nll_parts") if impl == "triton"
             else shard_likelihood_parts)
    g_lse, g_x = torch.randn(n_users, generator=gen, dtype=torch.float64), torch.randn(n_users, generator=gen, dtype=torch.float64)
    for decoder_grad in (True, False):
        z = torch.randn(n_users, K, generator=gen, dtype=torch.float64, requires_grad=True)
        w = torch.randn(hi - lo, K, generator=gen, dtype=torch.float64, requires_grad=decoder_grad)
        b = torch.randn(hi - lo, generator=gen, dtype=torch.float64, requires_grad=decoder_grad)
        lse, x_logit = parts(z, w, b, local)
        logits = z @ w.t() + b
        want_lse, want_x = torch.logsumexp(logits, dim=1), (x * logits).sum(dim=1)
        torch.testing.assert_close(lse, want_lse, **TIGHT)
        torch.testing.assert_close(x_logit, want_x, **TIGHT)
        inputs = (z, w, b) if decoder_grad else (z,)
        ours = torch.autograd.grad((lse * g_lse).sum() + (x_logit * g_x).sum(), inputs)
        dense = torch.autograd.grad((want_lse * g_lse).sum() + (want_x * g_x).sum(), inputs)
        for name, a, d in zip("zwb", ours, dense):
            torch.testing.assert_close(a, d, **TIGHT, msg=f"d{name}")

    coef = torch.rand(local.nnz, generator=gen, dtype=torch.float64) + 0.5
    coef[::3] = 0.0  # dropped nonzeros: a user may keep none on the shard
    dense_c = torch.zeros(n_users, hi - lo, dtype=torch.float64)
    dense_c[local.row_ids(), local.indices] = coef
    g_out = torch.randn(n_users, hidden, generator=gen, dtype=torch.float64)
    for sparse_grad in (False, True):
        w1 = torch.randn(hi - lo, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
        h = shard_input_gather(local, coef, w1, sparse_grad, impl)
        torch.testing.assert_close(h, dense_c @ w1, **TIGHT)
        (h * g_out).sum().backward()
        grad = w1.grad.to_dense() if sparse_grad else w1.grad
        assert w1.grad.is_sparse == sparse_grad
        torch.testing.assert_close(grad, dense_c.t() @ g_out, **TIGHT)


# --- training, scoring and checkpoints ----------------------------------------------------------

FIT = dict(hidden_dim=H, latent_dim=K, batch_size=7, n_epochs=2, n_enc_epochs=2, n_dec_epochs=1, gamma=0.005,
           seed=3)
# Stops early: validation NDCG@100 is best at epoch 2 of 8, patience 2 ends the run after epoch 4.
EARLY = dict(hidden_dim=H, latent_dim=K, batch_size=7, n_epochs=8, n_enc_epochs=1, n_dec_epochs=1, gamma=0.005,
             lr=1e-2, seed=3, sparse_fc1_grad=True, patience=2)
TIMES = ("train_time_s", "users_per_s", "time_s")


def _data(n_items: int):
    """(train, valid_in, valid_out, test_in, test_out): awkward users on both shards, float32 as read."""
    train = awkward_ratings(30, n_items, 2, seed=5).astype(np.float32)
    return (train, awkward_ratings(10, n_items, 2, seed=6), random_ratings(10, n_items, seed=7),
            awkward_ratings(11, n_items, 2, seed=8), random_ratings(11, n_items, seed=9))


def _one_device_fit(out_dir: Path, name: str, n_items: int, **kwargs) -> None:
    """Single-device recvae_fast.fit in float64 (torch's default dtype while it runs), in this process,
    without a group; saves its weights, history, test metrics and top-k under out_dir/name.*."""
    train, valid_in, valid_out, test_in, test_out = _data(n_items)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        validation = (valid_in, valid_out) if "patience" in kwargs else (None, None)
        model, history = fit(train, *validation, progress=False, **kwargs)
    finally:
        torch.set_default_dtype(default)
    top = recommend(model, test_in, k=9, batch_size=4)
    torch.save({"state": model.state_dict(), "history": [{k: v for k, v in r.items() if k not in TIMES} for r in history],
                "metrics": evaluate(model, test_in, test_out, batch_size=4), "items": torch.from_numpy(top.items),
                "scores": torch.from_numpy(top.scores)}, out_dir / f"{name}.pt")


def _check_equal_to_one_device(model, history, out_dir: Path, name: str, n_items: int) -> dict:
    """The sharded fit's gathered weights (float64 tight), history (losses tight, the rest equal), and
    the plain-name evaluate / recommend (metrics and items equal) against _one_device_fit's; every rank
    checks. Returns the gathered state_dict."""
    expected = torch.load(out_dir / f"{name}.pt", weights_only=True)
    full = gather_full_state_dict(model)
    if dist.get_rank() == 0:
        for key, value in expected["state"].items():
            torch.testing.assert_close(full[key], value, rtol=1e-9, atol=1e-11, msg=key)
    assert len(history) == len(expected["history"])
    for ours, theirs in zip(history, expected["history"]):
        ours = {k: v for k, v in ours.items() if k not in TIMES + ("item_shards", "data_parallel")}
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            if isinstance(value, float):
                assert ours[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (ours["epoch"], key)
            else:
                assert ours[key] == value, (ours["epoch"], key)
    *_, test_in, test_out = _data(n_items)
    assert evaluate(model, test_in, test_out, batch_size=4) == expected["metrics"]
    top = recommend(model, test_in, k=9, batch_size=4)
    np.testing.assert_array_equal(top.items, expected["items"].numpy())
    np.testing.assert_allclose(top.scores, expected["scores"].numpy(), rtol=1e-6)
    return full


def _plain_fit_worker(rank, n_items, out_dir):
    """recvae_fast.fit, evaluate and recommend, unchanged, inside the group: row-sparse fc1 gradient,
    validation, early stopping, DCP checkpoints, then a resume after the early stop."""
    out_dir = Path(out_dir)
    torch.set_default_dtype(torch.float64)
    train, valid_in, valid_out, *_ = _data(n_items)
    with pytest.raises(ValueError, match=r"item_shards=3 must be a positive divisor of the number of processes \(2\)"):
        fit(train, item_shards=3, progress=False, **FIT)
    model, history = fit(train, valid_in, valid_out, checkpoint_dir=out_dir / "early", progress=False, **EARLY)
    assert isinstance(model, ShardedRecVAE) and model.layout.n_shards == 2 and not model.training
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]  # stopped early, as one device did
    assert all(r["fc1_grad"] == "row-sparse" for r in history)
    full = _check_equal_to_one_device(model, history, out_dir, "early", n_items)

    # cut after 2 epochs and resumed (RowSparseAdam's state through DCP): the same run, the same early stop;
    # resumed again after the early stop, with more epochs allowed: still stopped, the same best weights
    untimed = lambda records: [{k: v for k, v in r.items() if k not in TIMES} for r in records]  # noqa: E731
    fit(train, valid_in, valid_out, checkpoint_dir=out_dir / "cut", progress=False, **{**EARLY, "n_epochs": 2})
    for n_epochs in (EARLY["n_epochs"], 10):
        resumed, resumed_history = fit(train, valid_in, valid_out, checkpoint_dir=out_dir / "cut", resume=True,
                                       progress=False, **{**EARLY, "n_epochs": n_epochs})
        assert untimed(resumed_history) == untimed(history)
        resumed_full = gather_full_state_dict(resumed)
        if rank == 0:
            for key, value in full.items():
                torch.testing.assert_close(resumed_full[key], value, rtol=0, atol=0, msg=f"resumed {key}")


def test_plain_fit_evaluate_recommend_in_a_group_equal_one_device(tmp_path):
    _one_device_fit(tmp_path, "early", 23, **EARLY)
    spawn(_plain_fit_worker, 2, tmp_path, 23, str(tmp_path))


def test_item_shards_without_a_group_is_refused():
    with pytest.raises(ValueError, match="item_shards=2 needs an initialised torch.distributed group"):
        fit(random_ratings(9, 13), item_shards=2, progress=False, **FIT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_device_init_draws_recvaes_weights_on_any_layout(monkeypatch, dtype):
    """init "one-device": each shard holds its rows of the weights RecVAE(H, K, I) draws after the same
    seed, in torch's default dtype, and leaves torch's generator where RecVAE's constructor leaves it;
    blocks of the stream cut across rows and shards."""
    monkeypatch.setattr("recvae_fast.distributed.model.STREAM_BLOCK_NUMBERS", 50)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(5)
        one = RecVAE(H, K, 23).state_dict()
        after = torch.get_rng_state()
        for n_shards in (1, 2, 3):
            for shard in range(n_shards):
                torch.manual_seed(5)
                model = ShardedRecVAE(ItemLayout(23, n_shards, shard, 1, 0), H, K, init="one-device")
                assert torch.equal(torch.get_rng_state(), after)
                lo, hi = model.layout.lo, model.layout.hi
                for key, rows in model.shard_tensors().items():
                    full = one[key].t() if SHARDED_KEYS[key] == 1 else one[key]
                    assert rows.dtype == dtype and torch.equal(rows, full[lo:hi]), (n_shards, shard, key)
                for key, value in model.replicated_tensors().items():
                    assert torch.equal(value, one[key]), key
    finally:
        torch.set_default_dtype(default)


def _training_worker(rank, n_items, out_dir):
    out_dir = Path(out_dir)
    torch.set_default_dtype(torch.float64)  # as _one_device_fit: the initial draws are float64 ones
    train = _data(n_items)[0]
    model = fit_sharded(train, item_shards=2, checkpoint_dir=out_dir / "run",
                        sparse_fc1_grad=False, **FIT)
    full = _check_equal_to_one_device(model, model.history, out_dir, "dense", n_items)
    if rank == 0:
        torch.save(full, out_dir / "after_2_shards.pt")
    dist.barrier()
    full = torch.load(out_dir / "after_2_shards.pt", weights_only=True)

    # the same run stopped after one epoch and resumed ends at the same weights
    fit_sharded(train, item_shards=2, checkpoint_dir=out_dir / "cut", sparse_fc1_grad=False, **{**FIT, "n_epochs": 1})
    resumed = fit_sharded(train, item_shards=2, checkpoint_dir=out_dir / "cut", resume=True,
                          sparse_fc1_grad=False, **FIT)
    resumed_full = gather_full_state_dict(resumed)
    if rank == 0:
        for key, value in full.items():
            torch.testing.assert_close(resumed_full[key], value, rtol=0, atol=0, msg=f"resumed {key}")


def test_sharded_fit_resume_and_scoring_equal_one_device(tmp_path):
    _one_device_fit(tmp_path, "dense", 23, sparse_fc1_grad=False, **FIT)
    spawn(_training_worker, 2, tmp_path, 23, str(tmp_path))


def _posterior_cache_worker(rank, n_items, out_dir, item_shards, not_alternating):
    """The sharded fit's old-posterior cache: the old encoder runs in the first pass only, on each
    rank for its part of each batch (the data group's parts are gathered), not at all on a resume
    of an alternating run (the cache is refilled from the encoder, as the cut run's decoder pass
    filled it), and the resumed run ends at the uninterrupted run's weights."""
    from recvae_fast.model import CompositePrior

    out_dir = Path(out_dir)
    torch.set_default_dtype(torch.float64)
    train = _data(n_items)[0]
    calls = []
    real = CompositePrior.old_posterior
    CompositePrior.old_posterior = lambda self, *a, **k: calls.append(a[0].full.n_rows) or real(self, *a, **k)
    options = dict(FIT, n_epochs=3, not_alternating=not_alternating)
    full = gather_full_state_dict(fit_sharded(train, item_shards=item_shards, checkpoint_dir=out_dir / "run",
                                              **options))
    n_batches = -(-train.shape[0] // options["batch_size"])
    assert len(calls) == n_batches  # without the cache: n_epochs × n_enc_epochs × n_batches
    if item_shards == 4:  # no data parallelism: this rank's part is the whole batch
        assert sum(calls) == train.shape[0]
    fit_sharded(train, item_shards=item_shards, checkpoint_dir=out_dir / "cut", **{**options, "n_epochs": 1})
    calls.clear()
    resumed = gather_full_state_dict(fit_sharded(train, item_shards=item_shards, checkpoint_dir=out_dir / "cut",
                                                 resume=True, **options))
    assert len(calls) == (n_batches if not_alternating else 0)  # the refill, from epoch 1's batches
    if rank == 0:
        for key, value in full.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=f"resumed {key}")


@pytest.mark.parametrize("item_shards, not_alternating", [(4, False), (4, True), (2, False), (2, True)])
def test_sharded_fit_keeps_the_old_posterior_per_user(tmp_path, item_shards, not_alternating):
    spawn(_posterior_cache_worker, 4, tmp_path, 23, str(tmp_path), item_shards, not_alternating)


def _one_step(model, ratings, optimizers, cfg):
    """One pinned encoder step (same mask and ε everywhere) on a RecVAE or a ShardedRecVAE."""
    torch.manual_seed(11)
    if isinstance(model, RecVAE):
        train_step(model, model.as_batch(ratings), optimizers, cfg, "encoder")
    else:
        sharded_train_step(model, ratings, optimizers, cfg, "encoder")


def _write_checkpoint_worker(rank, n_items, folder):
    layout = item_layout(make_item_mesh(2), n_items)
    torch.manual_seed(0)
    initial = RecVAE(H, K, n_items).double().state_dict()
    model = ShardedRecVAE(layout, H, K).double()
    model.load_full_state_dict(initial)
    optimizers = make_optimizers(model, 1e-3)
    _one_step(model, awkward_ratings(9, n_items, 2), optimizers[:1], TrainConfig(**FIT))
    save_checkpoint(folder, 1, model, optimizers, {"note": "2 shards"})
    full = gather_full_state_dict(model)
    if rank == 0:
        torch.save(full, Path(folder) / "expected.pt")


def _reshard_checkpoint_worker(rank, n_items, folder):
    layout = item_layout(make_item_mesh(3), n_items)
    model = ShardedRecVAE(layout, H, K, seed=99).double()  # other weights, overwritten by the load
    optimizers = make_optimizers(model, 1e-3)
    train_state, _ = load_checkpoint(latest_checkpoint(folder), model, optimizers)
    assert train_state == {"note": "2 shards"}
    expected = torch.load(Path(folder) / "expected.pt", weights_only=True)
    model_full = gather_full_state_dict(model)
    if rank == 0:
        for key, value in expected.items():
            torch.testing.assert_close(model_full[key], value, rtol=0, atol=0, msg=key)
    # Adam's moments were resharded too: they are those of the same step on one device
    torch.manual_seed(0)
    one = RecVAE(H, K, n_items).double()
    one_opts = make_optimizers(one, 1e-3, sparse_fc1_grad=False)
    _one_step(one, awkward_ratings(9, n_items, 2), one_opts[:1], TrainConfig(**FIT))
    lo, hi = layout.lo, layout.hi
    one_fc1 = one_opts[0].state[one.encoder.fc1.weight_t]
    ours_fc1 = optimizers[0].state[model.encoder.fc1.weight_t]
    for moment in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(ours_fc1[moment], one_fc1[moment][lo:hi], **TIGHT)
    torch.testing.assert_close(ours_fc1["step"], one_fc1["step"].to(ours_fc1["step"].dtype))
    save_checkpoint(folder, 2, model, optimizers, {"note": "3 shards"})


def test_checkpoint_2_shards_to_3_shards_to_one_device(tmp_path):
    folder = tmp_path / "ckpt"
    spawn(_write_checkpoint_worker, 2, tmp_path, 23, str(folder))
    spawn(_reshard_checkpoint_worker, 3, tmp_path, 23, str(folder))
    expected = torch.load(folder / "expected.pt", weights_only=True)
    assert latest_checkpoint(folder).name == "step-000002"
    assert not (folder / "step-000001").exists()  # replaced once the new one was complete
    one = load_into_recvae(latest_checkpoint(folder))
    for key, value in one.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_incomplete_checkpoint_is_never_used(tmp_path):
    folder = tmp_path / "ckpt"
    torch.manual_seed(0)
    model = RecVAE(H, K, 13).double()
    state = {f"model.{name}": p.detach() for name, p in model.named_parameters()}
    (folder / "step-000001").mkdir(parents=True)
    dcp.save(state, checkpoint_id=folder / "step-000001", no_dist=True)
    (folder / "step-000001" / "train_state.json").write_text("{}")
    (folder / "LATEST").write_text("step-000001\n")
    # a crash during the next save leaves a partial folder, and LATEST untouched
    (folder / "step-000002").mkdir()
    (folder / "step-000002" / "__0_0.distcp").write_bytes(b"partial")
    assert latest_checkpoint(folder).name == "step-000001"
    loaded = load_into_recvae(latest_checkpoint(folder))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    (folder / "LATEST").write_text("step-000002\n")  # a pointer to an incomplete folder is refused
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        latest_checkpoint(folder)
    (folder / "LATEST").write_text("../../etc\n")
    with pytest.raises(ValueError, match="step-NNNNNN"):
        latest_checkpoint(folder)


def _mesh_2x2_fit_worker(rank, n_items, out_dir):
    """fit(item_shards=2) on 4 processes: 2 item shards × 2 data-parallel ranks, row-sparse fc1 gradient
    summed over the data group, validation and early stopping: one device's run, and replicas in step."""
    torch.set_default_dtype(torch.float64)
    train, valid_in, valid_out, *_ = _data(n_items)
    model, history = fit(train, valid_in, valid_out, item_shards=2, progress=False, **EARLY)
    assert model.layout.data_size == 2 and model.layout.n_shards == 2
    assert all(r["data_parallel"] == 2 and r["fc1_grad"] == "row-sparse" for r in history)
    _check_equal_to_one_device(model, history, Path(out_dir), "mesh", n_items)
    # every rank of a shard ends with the same rows; every rank with the same replicated weights
    for name, param in model.named_parameters():
        copies = [torch.empty_like(param) for _ in range(4)]  # even shards: one shape on every rank
        dist.all_gather(copies, param.detach().contiguous())
        same_rows_as = {0: 2, 1: 3, 2: 0, 3: 1} if name in _sharded_param_names(model) else {r: (r + 1) % 4 for r in range(4)}
        torch.testing.assert_close(copies[rank], copies[same_rows_as[rank]], rtol=0, atol=0, msg=name)


def _sharded_param_names(model):
    ids = {id(t) for t in model.shard_tensors().values()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_2x2_mesh_fit_equals_one_device_and_keeps_replicas_in_step(tmp_path):
    _one_device_fit(tmp_path, "mesh", 22, **EARLY)
    spawn(_mesh_2x2_fit_worker, 4, tmp_path, 22, str(tmp_path))


# --- the top-k merge: exact, ties included -----------------------------------------------------


@pytest.mark.parametrize("n_shards", [1, 2, 3, 5])
def test_merge_of_shard_topks_equals_one_topk(n_shards):
    """Per-shard masked top-k, ids offset, merged: equal to topk_masked over all items, with many ties
    (scores from a few values, across shard borders), eligible −inf items, NaN, seen items, and k larger
    than a shard."""
    rng = np.random.default_rng(n_shards)
    n_users, n_items, k = 13, 17, 7
    scores = rng.integers(0, 4, size=(n_users, n_items)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.1] = -np.inf
    scores[rng.random(scores.shape) < 0.05] = np.nan
    scores[0] = -np.inf  # every item −inf: still eligible, ranked by index
    seen = sp.random(n_users, n_items, density=0.3, format="lil", random_state=1)
    seen[1, :] = 1.0  # a user who has seen everything: all padding
    seen = sp.csr_matrix(seen)
    expected = topk_masked(scores, seen, k)
    scores_t = torch.from_numpy(scores)
    parts_scores, parts_items = [], []
    for lo, hi in shard_bounds(n_items, n_shards):
        local = topk_masked(scores_t[:, lo:hi].contiguous(), sp.csr_matrix(seen[:, lo:hi]), k)
        parts_scores.append(local.scores)
        parts_items.append(torch.where(local.items >= 0, local.items + lo, local.items))
    merged = merge_candidates(torch.cat(parts_scores, 1), torch.cat(parts_items, 1), k)
    np.testing.assert_array_equal(merged.items.numpy(), expected.items)
    np.testing.assert_array_equal(merged.scores.numpy(), expected.scores)


def test_shard_bounds():
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(3, 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="cannot be split"):
        shard_bounds(2, 3)
    with pytest.raises(ValueError, match="positive"):
        shard_bounds(5, 0)


# --- faults: every rank stops, with a clear error, in bounded time ------------------------------


def _record_outcome(folder, rank, action):
    """Run action(); write how it ended (and after how long) to folder/rank<r>.txt, then exit normally."""
    start = time.monotonic()
    try:
        action()
        outcome = "finished"
    except Exception as exc:  # noqa: BLE001 - the test inspects every rank's error
        outcome = f"{type(exc).__name__}: {exc}"
    (Path(folder) / f"rank{rank}.txt").write_text(f"{time.monotonic() - start:.1f}\n{outcome}")


def _bad_data_worker(rank, n_items, folder):
    train = awkward_ratings(20, n_items, 2).astype(np.float32)
    if rank == 1:
        train.data[3] = np.nan  # this rank read a corrupt file
    _record_outcome(folder, rank, lambda: fit_sharded(train, item_shards=2, **{**FIT, "n_epochs": 1}))


def _vanishing_rank_worker(rank, n_items, folder):
    train = awkward_ratings(20, n_items, 2).astype(np.float32)
    if rank == 1:
        os._exit(0)  # killed without a word before training starts
    _record_outcome(folder, rank, lambda: fit_sharded(train, item_shards=2, **{**FIT, "n_epochs": 1}))


def test_bad_data_on_one_rank_stops_every_rank(tmp_path):
    spawn(_bad_data_worker, 2, tmp_path, 23, str(tmp_path))
    for rank, message in ((0, "rank(s) [1] failed"), (1, "non-finite")):
        seconds, outcome = (tmp_path / f"rank{rank}.txt").read_text().split("\n", 1)
        assert message in outcome and float(seconds) < 30


def test_a_vanished_rank_stops_the_others_in_bounded_time(tmp_path):
    spawn(_vanishing_rank_worker, 2, tmp_path, 23, str(tmp_path), timeout_s=10)
    seconds, outcome = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert outcome != "finished" and float(seconds) < 30


def _busy_folder_worker(rank, n_items, folder):
    train = awkward_ratings(20, n_items, 2).astype(np.float32)
    _record_outcome(folder, rank, lambda: fit(train, checkpoint_dir=Path(folder) / "run", progress=False, **FIT))


def test_a_checkpoint_folder_in_use_stops_every_rank(tmp_path):
    """Another process writes the folder (holds its lock): rank 0 cannot lock it, and every rank stops
    before training, with an error naming the holder or the failed rank."""
    from recvae_fast.runfolder import LOCK_NAME

    (tmp_path / "run").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "os.write(fd, b'pid of the holder'); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
         str(tmp_path / "run" / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        spawn(_busy_folder_worker, 2, tmp_path, 23, str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    for rank, message in ((0, "is being written by another process (pid of the holder)"), (1, "rank(s) [0] failed")):
        seconds, outcome = (tmp_path / f"rank{rank}.txt").read_text().split("\n", 1)
        assert message in outcome and float(seconds) < 30
    assert not (tmp_path / "run" / "LATEST").exists()


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_crafted_checkpoint_metadata_is_refused(tmp_path):
    folder = tmp_path / "step-000001"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(ValueError, match="is not a torch.distributed.checkpoint metadata file"):
        load_into_recvae(folder)
