"""Training a ShardedRecVAE: one step, and `fit_sharded`, the authors' schedule as recvae_fast.fit.

Data parallelism: each global batch of users is cut into contiguous parts, one per rank of the
"data" dimension. Each part's loss is its users' sum divided by the global batch size, so summing
the gradients over the data group gives the gradient of the global batch mean exactly, uneven parts
included. Replicated parameters have the same gradient on every rank of an item group, so summing
over the data group gives every rank the full gradient; a shard's rows are summed over its data
group, the ranks that hold the same rows.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist

from ..training import TrainConfig
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .inference import evaluate_sharded
from .mesh import collective_device, item_layout, make_item_mesh
from .model import ShardView, ShardedRecVAE


def sharded_backward(model: ShardedRecVAE, view: ShardView, n_batch_users: int, beta=None, gamma=1,
                     dropout_rate: float = 0.5, *, with_kl: bool = True, keep_mask=None, eps=None) -> dict:
    """Backward of this rank's part of a global batch of n_batch_users users; returns the global
    batch's {"mll", "kld" (with_kl), "loss"} as floats (means over all its users)."""
    nll, kl = model.user_terms(view, beta, gamma, dropout_rate, with_kl=with_kl, keep_mask=keep_mask, eps=eps)
    loss = nll.sum() if kl is None else nll.sum() + kl.sum()
    (loss / n_batch_users).backward()
    sums = torch.stack([nll.sum(), kl.sum() if kl is not None else nll.new_zeros(())]).detach()
    if model.layout.data_size > 1:
        dist.all_reduce(sums, group=model.layout.data_group)
    mll, kld = (-sums[0] / n_batch_users).item(), (sums[1] / n_batch_users).item()
    out = {"mll": mll, "loss": kld - mll if with_kl else -mll}
    if with_kl:
        out["kld"] = kld
    return out


def reduce_gradients(model: ShardedRecVAE) -> None:
    """Sum every trainable parameter's gradient over the data group (see the module docstring)."""
    layout = model.layout
    if layout.data_size == 1:
        return
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:  # a rank whose part of the batch is empty still joins the sum
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, group=layout.data_group)


def agree(error: BaseException | None) -> None:
    """Every rank calls this after a step that may fail on some ranks only (reading, validating data).
    If any rank failed, every rank raises: the failing ones their own error, the others an error
    naming the failing ranks. Without it, the healthy ranks would wait in their next collective."""
    if not dist.is_initialized():
        if error is not None:
            raise error
        return
    failed = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=collective_device())
    failed[dist.get_rank()] = int(error is not None)
    dist.all_reduce(failed)
    if error is not None:
        raise error
    if failed.any():
        ranks = failed.nonzero().flatten().tolist()
        raise RuntimeError(f"rank(s) {ranks} failed (see their error); every rank stops")


def make_sharded_optimizers(model: ShardedRecVAE, lr: float):
    """One Adam for the encoder and one for the decoder (the authors' setup), fused where available,
    as recvae_fast.training.make_optimizers with dense gradients."""
    fused = model.decoder.weight.device.type in ("cpu", "cuda")
    encoder_opt = torch.optim.Adam(model.encoder.parameters(), lr=lr, fused=fused)
    decoder_opt = torch.optim.Adam(model.decoder.parameters(), lr=lr, fused=fused)
    return encoder_opt, decoder_opt


def _set_phase(model: ShardedRecVAE, train_encoder: bool, train_decoder: bool) -> None:
    model.encoder.requires_grad_(train_encoder)
    model.decoder.requires_grad_(train_decoder)


def sharded_train_step(model: ShardedRecVAE, rows, optimizers, cfg: TrainConfig, phase: str) -> dict:
    """One optimisation step on a global batch (`rows`: the batch's users × items scipy matrix, the
    same on every rank). phase: "encoder", "decoder" or "both"."""
    layout = model.layout
    dropout = 0.0 if phase == "decoder" else cfg.dropout_rate
    _set_phase(model, phase != "decoder", phase != "encoder")
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    part = np.array_split(np.arange(rows.shape[0]), layout.data_size)[layout.data_rank]
    view = model.view(rows[part])
    out = sharded_backward(model, view, rows.shape[0], cfg.beta, cfg.gamma, dropout, with_kl=phase != "decoder")
    reduce_gradients(model)
    for opt in optimizers:
        opt.step()
    return out


def _run_passes(model, train, optimizers, cfg, phase, n_passes, rng) -> dict:
    """As recvae_fast.training: shuffled passes (the same order on every rank: one seed), the phase's
    losses averaged over all batches."""
    sums: dict[str, float] = {}
    n_batches = 0
    model.train()
    for _ in range(n_passes):
        users = rng.permutation(train.shape[0])
        for start in range(0, len(users), cfg.batch_size):
            rows = np.sort(users[start : start + cfg.batch_size])
            for key, value in sharded_train_step(model, train[rows], optimizers, cfg, phase).items():
                sums[key] = sums.get(key, 0.0) + value
            n_batches += 1
    return {f"{phase}_{key}": value / n_batches for key, value in sums.items()}


def _check_inputs(train, valid_in, valid_out):
    """The matrices as float32 CSR, with a clear error for what does not fit."""
    if not sp.issparse(train):
        raise TypeError(f"train must be a scipy.sparse matrix (users × items), got {type(train).__name__}")
    train = sp.csr_matrix(train, dtype=np.float32)
    if train.nnz and (not np.isfinite(train.data).all() or (train.data < 0).any()):
        raise ValueError("train has non-finite or negative values; implicit feedback must be finite and >= 0")
    if (valid_in is None) != (valid_out is None):
        raise ValueError("give both valid_in and valid_out, or neither")
    if valid_in is not None:
        for name, matrix in (("valid_in", valid_in), ("valid_out", valid_out)):
            if not sp.issparse(matrix) or matrix.shape[1] != train.shape[1]:
                raise ValueError(f"{name} must be a scipy.sparse matrix with train's {train.shape[1]} item columns")
        if valid_in.shape[0] != valid_out.shape[0]:
            raise ValueError(f"valid_in has {valid_in.shape[0]} users, valid_out has {valid_out.shape[0]}")
    return train


def fit_sharded(train, valid_in=None, valid_out=None, *, item_shards: int, checkpoint_dir=None, resume: bool = False,
                log_path=None, initial_state: dict | None = None, dtype: torch.dtype = torch.float32,
                callback=None, **hyperparameters) -> ShardedRecVAE:
    """recvae_fast.fit for an item-sharded model, inside an initialised process group (torchrun): every
    rank passes the same data; `item_shards` must divide the world size (the rest is data parallel).

    hyperparameters: those of recvae_fast.training.TrainConfig (dense fc1 gradients only). The sharded
    rows start from a layout-independent initialisation (ShardedRecVAE.reset_item_parameters), or from
    `initial_state`, an authors'-format state_dict of a whole model. With checkpoint_dir, a DCP
    checkpoint after every epoch (recvae_fast.distributed.checkpoint); resume continues from the
    newest complete one, on the same mesh. Only rank 0 writes the JSON-lines log. Returns the model
    at its best validation epoch (the last one without validation data), in eval mode, with .history.
    """
    cfg = TrainConfig(**hyperparameters)
    error = None
    try:
        cfg.validate()
        if cfg.sparse_fc1_grad:
            raise ValueError("sparse_fc1_grad is not supported with item shards; the fc1 gradient is dense")
        train = _check_inputs(train, valid_in, valid_out)
    except (TypeError, ValueError) as exc:
        error = exc
    agree(error)

    device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is None:  # one GPU per process: torchrun's LOCAL_RANK
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    mesh = make_item_mesh(item_shards, device.type)
    layout = item_layout(mesh, train.shape[1])
    torch.manual_seed(cfg.seed)
    model = ShardedRecVAE(layout, cfg.hidden_dim, cfg.latent_dim, seed=cfg.seed).to(device=device, dtype=dtype)
    if initial_state is not None:
        model.load_full_state_dict(initial_state)
    # The training draws (dropout masks, ε): one stream per data rank, shared by its item group.
    torch.manual_seed(cfg.seed + 7919 * layout.data_rank)
    rng = np.random.default_rng(cfg.seed)
    encoder_opt, decoder_opt = make_sharded_optimizers(model, cfg.lr)
    state = {"epoch": 0, "best_ndcg": float("-inf"), "best_epoch": 0, "history": []}
    best_state = None
    if resume:
        path = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
        if path is None:
            raise FileNotFoundError(f"resume asked for, but there is no complete checkpoint in {checkpoint_dir}")
        saved, best = load_checkpoint(path, model, (encoder_opt, decoder_opt), with_best=True, with_rng=True)
        if saved["config"] != {k: v for k, v in asdict(cfg).items() if k != "n_epochs"}:
            raise ValueError(f"{path} was written with other hyperparameters")
        state = saved["state"]
        rng.bit_generator.state = saved["numpy_rng"]
        best_state = best

    log_file = open(log_path, "a", encoding="utf-8") if log_path is not None and dist.get_rank() == 0 else None
    try:
        for epoch in range(state["epoch"], cfg.n_epochs):
            t0 = time.perf_counter()
            record: dict = {"epoch": epoch + 1, "item_shards": layout.n_shards, "data_parallel": layout.data_size}
            if cfg.not_alternating:
                record.update(_run_passes(model, train, [encoder_opt, decoder_opt], cfg, "both", 1, rng))
            else:
                record.update(_run_passes(model, train, [encoder_opt], cfg, "encoder", cfg.n_enc_epochs, rng))
                model.update_prior()
                record.update(_run_passes(model, train, [decoder_opt], cfg, "decoder", cfg.n_dec_epochs, rng))
            _set_phase(model, True, True)
            record["train_time_s"] = time.perf_counter() - t0
            if valid_in is not None:
                metrics = evaluate_sharded(model, valid_in, valid_out, batch_size=cfg.batch_size)
                record.update({f"valid_{k}": v for k, v in metrics.items()})
                if metrics["ndcg@100"] > state["best_ndcg"]:
                    state["best_ndcg"], state["best_epoch"] = metrics["ndcg@100"], epoch + 1
                    best_state = {name: p.detach().clone() for name, p in model.named_parameters()}
            record["time_s"] = time.perf_counter() - t0
            state["epoch"] = epoch + 1
            state["history"].append(record)
            if checkpoint_dir is not None:
                train_state = {
                    "config": {k: v for k, v in asdict(cfg).items() if k != "n_epochs"},
                    "state": state,
                    "numpy_rng": rng.bit_generator.state,
                }
                save_checkpoint(checkpoint_dir, epoch + 1, model, (encoder_opt, decoder_opt), train_state, best_state)
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if callback is not None:
                callback(record)
    finally:
        if log_file is not None:
            log_file.close()

    if best_state is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(best_state[name])
    model.eval()
    model.history = state["history"]
    return model
