"""Training a ShardedRecVAE: one step, the mesh's EpochRunner, and `fit_sharded`, which trains
with it in recvae_fast.training's epoch loop (the one loop of recvae_fast.fit).

Data parallelism: each global batch of users is cut into contiguous parts, one per rank of the
"data" dimension. Each part's loss is its users' sum divided by the global batch size, so summing
the gradients over the data group gives the gradient of the global batch mean exactly, uneven parts
included. Replicated parameters have the same gradient on every rank of an item group, so summing
over the data group gives every rank the full gradient; a shard's rows are summed over its data
group, the ranks that hold the same rows. A row-sparse fc1 gradient is summed by gathering each
rank's rows and values.

Random draws: every rank of every group draws the whole global batch's dropout mask and ε from one
torch generator (seeded alike everywhere), in RecVAE's order, and keeps its users' part: any mesh
then trains exactly as one device with the same seed.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import posterior_cache
from ..runfolder import RunFolderBusy, RunFolderError, RunLock, fingerprint
from ..training import (FitInputs, TrainConfig, TrainState, check_fit_inputs, check_progress, fc1_grad_is_row_sparse,
                        make_optimizers, run_epochs, set_phase)
from ..validation import check_train_state
from . import checkpoint
from .inference import evaluate_sharded
from .mesh import collective_device, item_layout, make_item_mesh
from .model import INITS, ShardView, ShardedRecVAE


def sharded_backward(model: ShardedRecVAE, view: ShardView, n_batch_users: int, beta=None, gamma=1,
                     dropout_rate: float = 0.5, *, with_kl: bool = True, keep_mask=None, eps=None,
                     posterior=None, old_posterior=None) -> dict:
    """Backward of this rank's part of a global batch of n_batch_users users; returns the global
    batch's {"mll", "kld" (with_kl), "loss"} as floats (means over all its users)."""
    nll, kl = model.user_terms(view, beta, gamma, dropout_rate, with_kl=with_kl, keep_mask=keep_mask, eps=eps,
                               posterior=posterior, old_posterior=old_posterior)
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
        if param is model.encoder.fc1.weight_t and model.encoder.fc1.sparse_grad:
            param.grad = _summed_row_sparse(param.grad, param, layout)
            continue
        if param.grad is None:  # a rank whose part of the batch is empty still joins the sum
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, group=layout.data_group)


def _summed_row_sparse(grad: torch.Tensor | None, param: torch.Tensor, layout) -> torch.Tensor:
    """The sum over the data group of row-sparse gradients (sparse COO, rows of `param`), as one
    uncoalesced COO tensor: each rank's rows and values, gathered (padded to the largest count)."""
    if grad is None:
        grad = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.int64, device=param.device),
                                       param.new_zeros((0,) + tuple(param.shape[1:])), param.shape)
    grad = grad.coalesce()
    rows, values = grad.indices()[0], grad.values()
    counts = [torch.zeros(1, dtype=torch.int64, device=rows.device) for _ in range(layout.data_size)]
    dist.all_gather(counts, torch.tensor([rows.numel()], device=rows.device), group=layout.data_group)
    width = int(max(c.item() for c in counts))
    padded_rows = rows.new_zeros(width)
    padded_rows[: rows.numel()] = rows
    padded_values = values.new_zeros((width,) + tuple(values.shape[1:]))
    padded_values[: rows.numel()] = values
    all_rows = [torch.empty_like(padded_rows) for _ in counts]
    all_values = [torch.empty_like(padded_values) for _ in counts]
    dist.all_gather(all_rows, padded_rows, group=layout.data_group)
    dist.all_gather(all_values, padded_values, group=layout.data_group)
    n = [int(c.item()) for c in counts]
    rows = torch.cat([r[:k] for r, k in zip(all_rows, n)])
    values = torch.cat([v[:k] for v, k in zip(all_values, n)])
    return torch.sparse_coo_tensor(rows[None], values, param.shape)


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


def one_device_noise(model: ShardedRecVAE, full: ShardView, dropout_rate: float):
    """The dropout keep mask (over the batch's nonzeros, when dropout_rate > 0) and ε (B × K) that
    RecVAE.loss_terms draws for this batch, in its order, from torch's generator: every rank draws
    those of the whole global batch and keeps its users' part, so that any mesh trains as one device."""
    keep_mask = None
    if dropout_rate > 0:
        keep_mask = torch.rand(full.full.nnz, device=full.full.device) >= dropout_rate
    param = model.decoder.weight
    eps = torch.randn(full.full.n_rows, model.latent_dim, dtype=param.dtype, device=param.device)
    return keep_mask, eps


def sharded_train_step(model: ShardedRecVAE, rows, optimizers, cfg: TrainConfig, phase: str, *,
                       given_posteriors=None) -> dict:
    """One optimisation step on a global batch (`rows`: the batch's users × items scipy matrix, the
    same on every rank). phase: "encoder", "decoder" or "both". given_posteriors(view, part) gives
    (posterior, old_posterior) for this rank's view of the batch (its rows `part` of the batch),
    as RecVAE.loss_terms takes them (None: the step computes them)."""
    layout = model.layout
    dropout = 0.0 if phase == "decoder" else cfg.dropout_rate
    set_phase(model, phase != "decoder", phase != "encoder")
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    full = model.view(rows)
    keep_mask, eps = one_device_noise(model, full, dropout)
    part = np.array_split(np.arange(rows.shape[0]), layout.data_size)[layout.data_rank]
    if layout.data_size == 1:
        view = full
    else:  # this data rank's contiguous part of the users, with their mask entries and ε
        first, last = (int(full.full.indptr[i]) for i in (part[0], part[-1] + 1)) if len(part) else (0, 0)
        view = model.view(rows[part])
        keep_mask = keep_mask[first:last] if keep_mask is not None else None
        eps = eps[part]
    posterior, old_posterior = given_posteriors(view, part) if given_posteriors is not None else (None, None)
    out = sharded_backward(model, view, rows.shape[0], cfg.beta, cfg.gamma, dropout, with_kl=phase != "decoder",
                           keep_mask=keep_mask, eps=eps, posterior=posterior, old_posterior=old_posterior)
    reduce_gradients(model)
    for opt in optimizers:
        opt.step()
    return out


def _batch_posterior(layout, batch_rows: np.ndarray, part_posterior):
    """(batch_rows, the whole batch's (mu, logvar)) from this data rank's part of it: the parts of
    the data group gathered (each padded to the largest part), in the batch's order."""
    if layout.data_size == 1:
        return batch_rows, part_posterior
    sizes = [len(p) for p in np.array_split(np.arange(len(batch_rows)), layout.data_size)]
    mine = torch.stack(part_posterior, dim=1)  # part × 2 × K
    padded = mine.new_zeros((sizes[0],) + tuple(mine.shape[1:]))
    padded[: len(mine)] = mine
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=layout.data_group)
    whole = torch.cat([part[:size] for part, size in zip(parts, sizes)])
    return batch_rows, (whole[:, 0], whole[:, 1])


class ShardedRunner:
    """The mesh's EpochRunner (see recvae_fast.training.EpochRunner): this rank's ShardedRecVAE and
    its steps, DCP checkpoints (recvae_fast.distributed.checkpoint) that every rank writes and
    reads, and rank 0 the one writer of the log, the bars and the epoch lines."""

    def __init__(self, inputs: FitInputs, item_shards: int, checkpoint_dir, initial_state: dict | None, init: str,
                 dtype: torch.dtype | None):
        cfg, train = inputs.cfg, inputs.train
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:  # one GPU per process: torchrun's LOCAL_RANK
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        layout = item_layout(make_item_mesh(item_shards, device.type), train.shape[1])
        # As recvae_fast.training: seed, the numpy generator, then the model's draws; training draws follow.
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        model = ShardedRecVAE(layout, cfg.hidden_dim, cfg.latent_dim, seed=cfg.seed, init=init)
        self.model = model.to(device=device, dtype=dtype or torch.get_default_dtype())
        if initial_state is not None:
            self.model.load_full_state_dict(initial_state)
        row_sparse_fc1 = fc1_grad_is_row_sparse(cfg, train)
        self.encoder_opt, self.decoder_opt = make_optimizers(self.model, cfg.lr, row_sparse_fc1)
        self.epoch_fields = {"fc1_grad": "row-sparse" if row_sparse_fc1 else "dense",
                             "item_shards": layout.n_shards, "data_parallel": layout.data_size}
        self.config = {k: v for k, v in asdict(cfg).items() if k != "n_epochs"}
        self.data_fingerprint = fingerprint(train, inputs.valid_in, inputs.valid_out)
        # The old-posterior cache (recvae_fast.posterior_cache): every rank keeps all users, its data
        # group's parts of each batch gathered, so that each rank's cache fills in one pass.
        self.posterior_cache = posterior_cache.PosteriorCache.for_model(self.model, train.shape[0])
        self.inputs, self.checkpoint_dir = inputs, checkpoint_dir
        self.state = TrainState()
        self.best_state: dict | None = None
        self.is_writer = dist.get_rank() == 0

    def step(self, rows, phase, optimizers, fill) -> dict:
        model, cache = self.model, self.posterior_cache

        def given_posteriors(view, part):
            return posterior_cache.step_posteriors(
                cache, fill, phase, rows[part], lambda source: posterior_cache.posterior_of(model, view, source),
                lambda _, posterior: cache.put(*_batch_posterior(model.layout, rows, posterior)))

        return sharded_train_step(model, self.inputs.train[rows], optimizers, self.inputs.cfg, phase,
                                  given_posteriors=given_posteriors)

    def batch_posterior(self, rows, source):
        """As a step computes its part, then the data group's parts gathered."""
        layout = self.model.layout
        part = np.array_split(np.arange(len(rows)), layout.data_size)[layout.data_rank]
        view = self.model.view(self.inputs.train[rows[part]])
        return _batch_posterior(layout, rows, posterior_cache.posterior_of(self.model, view, source))

    def evaluate(self) -> dict:
        inputs = self.inputs
        return evaluate_sharded(self.model, inputs.valid_in, inputs.valid_out, inputs.eval_batch_size, inputs.metric_ks)

    def snapshot_best(self) -> None:
        self.best_state = {name: p.detach().clone() for name, p in self.model.named_parameters()}

    def restore_best(self) -> None:
        if self.best_state is not None:
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    p.copy_(self.best_state[name])

    def save_checkpoint(self) -> None:
        if self.checkpoint_dir is None:
            return
        train_state = {"config": self.config, "data_fingerprint": self.data_fingerprint, "state": asdict(self.state),
                       "numpy_rng": self.rng.bit_generator.state}
        checkpoint.save_checkpoint(self.checkpoint_dir, self.state.epoch, self.model,
                                   (self.encoder_opt, self.decoder_opt), train_state, self.best_state)

    def load_checkpoint(self) -> Path:
        """The newest complete checkpoint; n_epochs may differ from its own."""
        path = checkpoint.latest_checkpoint(self.checkpoint_dir)
        saved, self.best_state = checkpoint.load_checkpoint(path, self.model, (self.encoder_opt, self.decoder_opt),
                                                            with_best=True, with_rng=True)
        if not isinstance(saved, dict) or saved.get("config") != self.config:
            raise ValueError(f"{path} was written with other hyperparameters")
        if saved.get("data_fingerprint", self.data_fingerprint) != self.data_fingerprint:
            raise ValueError(f"{path} was trained on other data: train/validation matrices differ from the "
                             "checkpoint's")
        self.state = TrainState(**check_train_state(saved.get("state"), path / checkpoint.TRAIN_STATE_NAME))
        try:
            self.rng.bit_generator.state = saved["numpy_rng"]
        except (KeyError, TypeError, ValueError) as exc:
            raise RunFolderError(f"{path / checkpoint.TRAIN_STATE_NAME}: numpy_rng is not a generator state "
                                 f"({exc})") from None
        return path


def fit_sharded(train, valid_in=None, valid_out=None, *, item_shards: int, checkpoint_dir=None, resume: bool = False,
                log_path=None, patience: int | None = None, progress: bool | str = False, callback=None,
                initial_state: dict | None = None, init: str = "one-device", dtype: torch.dtype | None = None,
                **hyperparameters) -> ShardedRecVAE:
    """recvae_fast.fit for an item-sharded model, inside an initialised process group (torchrun): every
    rank passes the same data; `item_shards` must divide the world size (the rest is data parallel).
    recvae_fast.fit calls this when it runs in a group of more than one process.

    hyperparameters: those of recvae_fast.training.TrainConfig, sparse_fc1_grad included (fc1's gradient
    is then this rank's rows of the batch's items, stepped by RowSparseAdam; None chooses as one device
    does, see fc1_grad_is_row_sparse). patience, progress, callback and log_path as recvae_fast.fit
    (rank 0 alone shows the progress bar and the epoch lines on stderr and writes the log, rewritten
    atomically from the history every epoch).

    The same seed gives the same training as one device, on any mesh: init "one-device" (default)
    draws the weights RecVAE would (see ShardedRecVAE), and every step draws the whole global batch's
    dropout mask and ε from the one torch generator, in RecVAE's order, each rank keeping its part.
    init "blocked" draws fc1 and the decoder in parallel blocks instead (see
    ShardedRecVAE.reset_item_parameters): faster at huge catalogues, not one device's weights.
    initial_state: an authors'-format state_dict of a whole model to start from instead. dtype: of the
    parameters (None: torch's default dtype, as RecVAE gets).

    checkpoint_dir: locked by rank 0 against other runs (as recvae_fast.fit locks it); a DCP checkpoint
    after every epoch (recvae_fast.distributed.checkpoint). resume continues from the newest complete
    one after checking the hyperparameters (n_epochs aside) and the data fingerprint; the same mesh
    continues with exactly the numbers of an uninterrupted run. A run that stopped early stays stopped.
    Returns the model at its best validation epoch (the last one without validation data), in eval
    mode, with .history (one record per epoch, as recvae_fast.fit's, plus item_shards and data_parallel).
    """
    with contextlib.ExitStack() as lock:
        error = None
        try:
            check_progress(progress)
            inputs = check_fit_inputs(train, valid_in, valid_out, patience=patience, item_shards=item_shards,
                                      **hyperparameters)
            if init not in INITS:
                raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
            if resume and (checkpoint_dir is None or checkpoint.latest_checkpoint(checkpoint_dir) is None):
                raise FileNotFoundError(f"resume asked for, but there is no complete checkpoint in {checkpoint_dir}")
            if checkpoint_dir is not None and dist.is_initialized() and dist.get_rank() == 0:
                lock.enter_context(RunLock(checkpoint_dir))  # one run per folder, as recvae_fast.fit
        except (TypeError, ValueError, OSError, RunFolderBusy) as exc:
            error = exc
        agree(error)
        runner = ShardedRunner(inputs, item_shards, checkpoint_dir, initial_state, init, dtype)
        runner.model.history = run_epochs(runner, resume=resume, log_path=log_path, progress=progress,
                                          callback=callback)
        return runner.model
