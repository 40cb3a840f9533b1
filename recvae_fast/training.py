"""Training RecVAE: the authors' schedule in one epoch loop, with checkpoints that resume exactly.

Alternating mode (default), per epoch: n_enc_epochs shuffled passes that step only the encoder
(dropout 0.5), update_prior(), then n_dec_epochs passes that step only the decoder (dropout 0).
Non-alternating mode: one pass per epoch stepping both (dropout 0.5), as in the authors' code.
Unlike the authors' loop, the part not being trained is frozen (requires_grad False), so no
gradient is computed for it, and a decoder pass skips the KL, which does not touch the decoder.
The prior's old-encoder posterior of each user is computed once per epoch, not in every encoder
step (recvae_fast.posterior_cache).

`run_epochs` is that loop, for one device and for the item-sharded mesh alike: it drives an
EpochRunner (steps, validation, best weights, checkpoints, who writes). Here: the one-device
runner and `fit`, which trains with it; recvae_fast.distributed.training holds the mesh's runner,
and recvae_fast.api.fit (recvae_fast.fit) chooses between the two.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from . import posterior_cache, workspace
from . import precision as precision_mod
from .atomic import atomic_write_text
from .metrics import check_cutoffs
from .model import RecVAE, check_memory
from .optim import RowSparseAdam
from .runfolder import CHECKPOINT_NAME, RunFolderError, RunLock, fingerprint, load_tensors, save_tensors
from .validation import check_finite_weights, check_optimizer_moments, check_train_state, check_weights_like

# 2 adds the data fingerprint that resume checks; load_model still reads format 1's weights.
CHECKPOINT_FORMAT = 2
SELECTION_K = 100  # validation NDCG@100 picks the best epoch (and drives early stopping)


@dataclass
class TrainConfig:
    """fit's hyperparameters. Each field's metadata describes it for the command line, which makes a
    flag of every field: "help" (what it does), and where they differ from the field's, "flag" (the
    flag's name), "default_help" (the default in words) and "choices" (flag value -> field value)."""
    hidden_dim: int = field(default=600, metadata={"help": "encoder hidden layer width"})
    latent_dim: int = field(default=200, metadata={"help": "latent dimension"})
    batch_size: int = field(default=500, metadata={"help": "training users per step"})
    n_epochs: int = field(default=50, metadata={"help": "epochs to train; with --resume: train up to this",
                                                "flag": "epochs", "default_help": "50, the authors'"})
    n_enc_epochs: int = field(default=3, metadata={"help": "encoder passes over the users per epoch"})
    n_dec_epochs: int = field(default=1, metadata={"help": "decoder passes over the users per epoch"})
    lr: float = field(default=5e-4, metadata={"help": "Adam learning rate"})
    gamma: float | None = field(default=0.005, metadata={"help": "KL weight gamma * n_u"})
    beta: float | None = field(default=None, metadata={"help": "constant KL weight, replacing gamma",
                                                       "default_help": "none, gamma is used"})
    dropout_rate: float = field(default=0.5, metadata={"help": "input dropout of the encoder passes"})
    not_alternating: bool = field(default=False, metadata={
        "help": "step encoder and decoder together, one pass per epoch", "default_help": "off, they alternate"})
    # fc1's gradient layout: True row-sparse + exact RowSparseAdam (recvae_fast.optim), False dense +
    # fused Adam, None chooses by measurement (see fc1_grad_is_row_sparse).
    sparse_fc1_grad: bool | None = field(default=None, metadata={
        "help": "fc1 gradient layout: row-sparse (with an exact row-sparse Adam) or dense; auto picks row-sparse "
                "on the CPU for large catalogues",
        "flag": "fc1_grad", "default_help": "auto", "choices": {"auto": None, "dense": False, "row-sparse": True}})
    seed: int = field(default=0, metadata={"help": "split and training seed, >= 0"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, ..."})
    # "32-true" or "bf16-mixed" (recvae_fast.precision): the steps' and validation's autocast.
    precision: str = field(default=precision_mod.DEFAULT_PRECISION, metadata={
        "help": "32-true (float32) or bf16-mixed (bf16 products with float32 accumulation, float32 softmax, KL, "
                "LayerNorm statistics, weights and optimiser; fast only with AMX, AVX512-BF16 or a GPU's tensor "
                "cores, slower elsewhere)"})

    def validate(self) -> None:
        for name in ("hidden_dim", "latent_dim", "batch_size", "n_epochs", "n_enc_epochs", "n_dec_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "gamma", "beta", "dropout_rate"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if not self.gamma and not self.beta:
            raise ValueError("give gamma (KL weight gamma * n_u) or beta (constant KL weight), one of them > 0")
        if (self.gamma is not None and self.gamma < 0) or (self.beta is not None and self.beta < 0):
            raise ValueError("gamma and beta must be >= 0")
        if self.sparse_fc1_grad not in (None, True, False):
            raise ValueError(f"sparse_fc1_grad must be True, False or None (automatic), got {self.sparse_fc1_grad!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        check_device(self.device)
        precision_mod.check_precision(self.precision)


def check_device(device) -> torch.device:
    """The torch.device for `device`, or a ValueError when it is not a name or not on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a device name ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: recvae_fast trains on 'cpu' or 'cuda[:N]'")
    return dev


def fc1_grad_is_row_sparse(cfg: TrainConfig, train) -> bool:
    """The fc1 gradient layout fit uses: cfg.sparse_fc1_grad when set; else (None) row-sparse on the
    CPU when the catalogue has at least twice as many items as a batch has nonzeros on average.

    Measured on the CPU (benches/bench_fc1_optimizer.py, B 500, ~75 items per user): fc1 backward +
    Adam step 1.6x faster row-sparse at 1M items, the same speed at 20k items, where a batch touches
    most rows. On CUDA the dense layout stays the default until a GPU run of tools/gpu_check.py
    measures both.
    """
    if cfg.sparse_fc1_grad is not None:
        return cfg.sparse_fc1_grad
    if torch.device(cfg.device).type != "cpu":
        return False
    n_users, n_items = train.shape
    batch_nonzeros = min(cfg.batch_size, n_users) * train.nnz / max(n_users, 1)
    return n_items >= 2 * batch_nonzeros


@dataclass
class TrainState:
    """Everything a resumed run needs to continue exactly where it stopped."""

    epoch: int = 0  # epochs completed
    best_ndcg: float = float("-inf")
    best_epoch: int = 0
    history: list = field(default_factory=list)
    # The pass that filled the old-posterior cache (posterior_cache.fill_record), or None.
    posterior_fill: dict | None = None


def set_phase(model, train_encoder: bool, train_decoder: bool) -> None:
    """Freeze the part of `model` (a RecVAE or a ShardedRecVAE) that a phase does not train."""
    model.encoder.requires_grad_(train_encoder)
    model.decoder.requires_grad_(train_decoder)


def make_optimizers(model, lr: float, sparse_fc1_grad: bool = False):
    """One Adam for the encoder and one for the decoder (the authors' setup), for a RecVAE or a
    ShardedRecVAE (its fc1 and decoder hold this rank's item rows). The fused implementation does
    the same arithmetic in one pass over each tensor. With sparse_fc1_grad, fc1's gradient holds
    only the batch's rows and the encoder's Adam is RowSparseAdam (exact)."""
    fused = model.decoder.weight.device.type in ("cpu", "cuda")
    model.encoder.fc1.sparse_grad = sparse_fc1_grad
    if sparse_fc1_grad:
        encoder_opt = RowSparseAdam(model.encoder.parameters(), lr=lr)
    else:
        encoder_opt = torch.optim.Adam(model.encoder.parameters(), lr=lr, fused=fused)
    decoder_opt = torch.optim.Adam(model.decoder.parameters(), lr=lr, fused=fused)
    return encoder_opt, decoder_opt


def train_step(model: RecVAE, batch, optimizers, cfg: TrainConfig, phase: str, *, posterior=None,
               old_posterior=None) -> dict:
    """One optimisation step on a canonical batch. phase: "encoder", "decoder" or "both".
    posterior (decoder phase) and old_posterior: as RecVAE.loss_terms, when the caller has them."""
    dropout_rate = 0.0 if phase == "decoder" else cfg.dropout_rate
    set_phase(model, phase != "decoder", phase != "encoder")
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    with precision_mod.autocast(cfg.precision, cfg.device):  # parameters, gradients and Adam stay float32
        mll, kld = model.loss_terms(batch, cfg.beta, cfg.gamma, dropout_rate, with_kl=phase != "decoder",
                                    posterior=posterior, old_posterior=old_posterior)
    loss = -mll if kld is None else kld - mll
    loss.backward()
    for opt in optimizers:
        opt.step()
    out = {"mll": mll.item(), "loss": loss.item()}
    if kld is not None:
        out["kld"] = kld.item()
    return out


class FitResult(NamedTuple):
    """What `fit` returns: the best model (the last one without validation data, in eval mode)
    and one record per epoch trained, resumed epochs included."""

    model: RecVAE
    history: list


# ----------------------------------------------------------------------------- checkpoints


def _rng_states(rng: np.random.Generator) -> dict:
    # A dict of ints and strings (numpy) and uint8 tensors (torch): loadable with weights_only.
    states = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict, rng: np.random.Generator) -> None:
    rng.bit_generator.state = states["numpy"]
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _state_dict_from(obj, path) -> dict:
    if isinstance(obj, dict) and obj.get("format") in (1, CHECKPOINT_FORMAT) and isinstance(obj.get("model"), dict):
        return obj["best_model"] or obj["model"]
    if isinstance(obj, dict) and obj.get("format") is not None:
        raise RunFolderError(f"{path} is a checkpoint of format {obj.get('format')!r}; this version reads "
                             f"format {CHECKPOINT_FORMAT} (retrain, or load it with the version that wrote it)")
    if isinstance(obj, dict) and "decoder.weight" in obj:
        return obj
    raise RunFolderError(f"{path} is neither a recvae_fast checkpoint nor a RecVAE state_dict")


def load_model(path, device: str | torch.device = "cpu") -> RecVAE:
    """A RecVAE from a checkpoint written by fit (its best model), or from a bare state_dict
    in the authors' format (input size and dims are read off the weights). The file is read
    with torch.load(weights_only=True): it cannot run code."""
    state_dict = _state_dict_from(load_tensors(path, map_location=device), path)
    try:
        n_items, latent_dim = state_dict["decoder.weight"].shape
        hidden_dim = state_dict["encoder.fc1.weight"].shape[0]
        model = RecVAE(hidden_dim, latent_dim, n_items).to(device)
        model.load_state_dict(state_dict)
    except (KeyError, AttributeError, ValueError, RuntimeError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunFolderError(f"{path} does not hold RecVAE weights ({first_line[:200]})") from None
    check_finite_weights(state_dict, path)
    model.eval()
    return model


# ----------------------------------------------------------------------------- inputs


def _check_matrix(name: str, matrix, n_items: int | None) -> sp.csr_matrix:
    if not sp.issparse(matrix):
        raise TypeError(f"{name} must be a scipy.sparse matrix (users × items), got {type(matrix).__name__}")
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    if n_items is not None and matrix.shape[1] != n_items:
        raise ValueError(f"{name} has {matrix.shape[1]} item columns, train has {n_items}")
    if matrix.nnz and (not np.isfinite(matrix.data).all() or (matrix.data < 0).any()):
        raise ValueError(f"{name} has negative or non-finite values")
    return matrix


class FitInputs(NamedTuple):
    cfg: TrainConfig
    train: sp.csr_matrix
    valid_in: sp.csr_matrix | None
    valid_out: sp.csr_matrix | None
    patience: int | None
    metric_ks: tuple[int, ...] | None = None  # validation cut-offs, 100 among them; None: the paper's
    eval_batch_size: int = 500


def check_fit_inputs(train, valid_in=None, valid_out=None, *, patience=None, metric_ks=None, eval_batch_size=500,
                     item_shards: int = 1, **hyperparameters) -> FitInputs:
    """Validate fit's data and hyperparameters without training or writing anything (the CLI
    calls it before it writes a run folder), the memory training needs (this process's part of
    item_shards) included; returns them in the form fit uses."""
    unknown = set(hyperparameters) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown hyperparameter(s): {', '.join(sorted(unknown))}")
    cfg = TrainConfig(**hyperparameters)
    cfg.validate()
    train = _check_matrix("train", train, None)
    if train.shape[0] == 0 or train.nnz == 0:
        raise ValueError("train has no interactions")
    n_items = train.shape[1]
    check_memory(cfg.hidden_dim, cfg.latent_dim, n_items, device=cfg.device, training=True, item_shards=item_shards)
    if (valid_in is None) != (valid_out is None):
        raise ValueError("give both valid_in and valid_out, or neither")
    if valid_in is not None:
        valid_in = _check_matrix("valid_in", valid_in, n_items)
        valid_out = _check_matrix("valid_out", valid_out, n_items)
        if valid_in.shape[0] != valid_out.shape[0]:
            raise ValueError(f"valid_in has {valid_in.shape[0]} users, valid_out has {valid_out.shape[0]}")
    if patience is not None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience <= 0:
            raise ValueError(f"patience must be a positive integer or None, got {patience!r}")
        if valid_in is None:
            raise ValueError("patience (early stopping) needs validation data: give valid_in and valid_out")
    if metric_ks is not None:  # NDCG@100 picks the best epoch, so 100 is always among the cut-offs
        metric_ks = tuple(sorted(set(check_cutoffs(metric_ks, n_items)) | {SELECTION_K}))
    if isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, int) or eval_batch_size <= 0:
        raise ValueError(f"eval_batch_size must be a positive integer, got {eval_batch_size!r}")
    return FitInputs(cfg, train, valid_in, valid_out, patience, metric_ks, eval_batch_size)


def check_progress(progress) -> None:
    if progress not in (True, False, "epochs"):
        raise ValueError(f"progress must be True, False or 'epochs', got {progress!r}")


def process_group_size() -> int:
    """The number of processes of the initialised torch.distributed group, 1 without one."""
    import torch.distributed as dist  # only when asked: most runs never need it

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# ----------------------------------------------------------------------------- the epoch loop


class EpochRunner(Protocol):
    """What `run_epochs`, the one epoch loop, needs from a way of training: one device
    (OneDeviceRunner, below) or the item-sharded mesh (recvae_fast.distributed.training).

    The loop owns the schedule (passes, phases, update_prior, the old-posterior cache's reset),
    validation bookkeeping (best epoch, early stop), the history, the log and epoch lines and the
    order of the writes; a runner owns its model, its steps and its files. Every rank of a mesh
    runs the loop; `is_writer` (rank 0 there) alone writes the log, the bars and the epoch lines."""

    inputs: FitInputs
    model: torch.nn.Module  # has encoder, decoder and update_prior(), as RecVAE
    encoder_opt: torch.optim.Optimizer
    decoder_opt: torch.optim.Optimizer
    rng: np.random.Generator  # the user order of every pass and the cache's fill records
    posterior_cache: posterior_cache.PosteriorCache | None
    state: TrainState
    epoch_fields: dict  # what every epoch record holds after its number (fc1_grad, the mesh's shape)
    is_writer: bool

    def step(self, rows: np.ndarray, phase: str, optimizers: list, fill) -> dict:
        """One optimisation step on the batch of users `rows` (sorted); fill: the pass's cache fill
        (posterior_cache.pass_fill); returns the batch's losses as floats (train_step's)."""

    def batch_posterior(self, rows: np.ndarray, source: str):
        """(rows, (mu, logvar) of those users from `source`): a resumed run refills its cache with it."""

    def evaluate(self) -> dict:
        """The validation metrics of the model now (inputs.valid_in / valid_out)."""

    def snapshot_best(self) -> None:
        """Keep the weights now as the best so far (written with the next checkpoint)."""

    def restore_best(self) -> None:
        """Put the kept best weights back into the model, if any were kept."""

    def save_checkpoint(self) -> None:
        """Write everything a resume needs (nothing without a checkpoint folder)."""

    def load_checkpoint(self) -> Path:
        """Restore model, optimisers, rng, state and best weights from the newest checkpoint after
        checking it was written for the same data and hyperparameters; returns the path read."""


def passes_per_epoch(cfg: TrainConfig) -> int:
    return 1 if cfg.not_alternating else cfg.n_enc_epochs + cfg.n_dec_epochs


def run_passes(runner: EpochRunner, phase: str, n_passes: int, optimizers: list, desc: str, bars) -> dict:
    """n_passes shuffled passes over the users (every rank draws the same order: one seed); returns
    the phase's losses averaged over all batches. bars: the run's overall progress bar (advanced per
    batch; each pass gets a bar beneath it), or None for no bars. An empty old-posterior cache is
    filled by the first of these passes: from the encoder in a decoder phase (right after
    update_prior), else from the old encoder."""
    cfg, rng, cache = runner.inputs.cfg, runner.rng, runner.posterior_cache
    sums: dict[str, float] = {}
    n_batches = 0
    runner.model.train()
    for k in range(n_passes):
        fill = posterior_cache.pass_fill(cache, phase)
        if fill is not None:
            runner.state.posterior_fill = posterior_cache.fill_record(fill, rng)
        users = rng.permutation(runner.inputs.train.shape[0])
        starts = range(0, len(users), cfg.batch_size)
        pass_bar = tqdm(starts, desc=f"{desc} {phase} {k + 1}/{n_passes}", leave=False, position=1,
                        disable=bars is None, file=sys.stderr)
        for start in pass_bar:
            step = runner.step(np.sort(users[start : start + cfg.batch_size]), phase, optimizers, fill)
            for key, value in step.items():
                sums[key] = sums.get(key, 0.0) + value
            n_batches += 1
            if bars is not None:
                bars.update(1)
    workspace.release()  # the phase's recycled step buffers (see recvae_fast.workspace)
    return {f"{phase}_{key}": value / n_batches for key, value in sums.items()}


def train_epoch(runner: EpochRunner, epoch: int, bars) -> dict:
    """One epoch of the schedule (see the module docstring); returns its record without metrics.
    bars: the overall progress bar, or None (see run_passes)."""
    cfg, model = runner.inputs.cfg, runner.model
    t0 = time.perf_counter()
    record: dict = {"epoch": epoch + 1, **runner.epoch_fields}
    desc = f"epoch {epoch + 1}"
    if cfg.not_alternating:
        record.update(run_passes(runner, "both", 1, [runner.encoder_opt, runner.decoder_opt], desc, bars))
    else:
        record.update(run_passes(runner, "encoder", cfg.n_enc_epochs, [runner.encoder_opt], desc, bars))
        model.update_prior()
        if runner.posterior_cache is not None:  # the old encoder changed: the next pass refills the cache
            runner.posterior_cache.clear()
            runner.state.posterior_fill = None
        record.update(run_passes(runner, "decoder", cfg.n_dec_epochs, [runner.decoder_opt], desc, bars))
    users_seen = runner.inputs.train.shape[0] * passes_per_epoch(cfg)
    set_phase(model, True, True)
    record["train_time_s"] = time.perf_counter() - t0
    record["users_per_s"] = users_seen / record["train_time_s"]
    return record


def resume_run(runner: EpochRunner) -> None:
    """Load the runner's checkpoint, then refill the old-posterior cache as the uninterrupted run
    holds it (recomputed from the same batches)."""
    path = runner.load_checkpoint()
    cache, fill, cfg = runner.posterior_cache, runner.state.posterior_fill, runner.inputs.cfg
    if cache is not None and fill is not None:
        try:
            posterior_cache.refill(cache, fill, runner.inputs.train.shape[0], cfg.batch_size, runner.batch_posterior)
        except ValueError as exc:
            raise RunFolderError(f"{path} is an inconsistent checkpoint ({exc})") from None


def write_log(path: Path, history: list) -> None:
    """The whole log, regenerated from the history atomically: after a kill it is the checkpoint's
    history or that history less its last epoch (then restored by the next write)."""
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in history))


def stopped_early(state: TrainState, patience: int | None) -> bool:
    """No validation improvement in the last `patience` epochs."""
    return patience is not None and state.epoch - state.best_epoch >= patience


def run_epochs(runner: EpochRunner, *, resume: bool, log_path, progress, callback) -> list:
    """The training loop of every fit: resume (when asked), then each epoch left trained, validated
    (the best weights kept by NDCG@100), checkpointed, logged, shown and passed to `callback`, until
    n_epochs or an early stop; the best weights restored at the end, the model in eval mode.
    Returns the history (one record per epoch, resumed epochs included)."""
    if resume:
        resume_run(runner)
    inputs, cfg, state = runner.inputs, runner.inputs.cfg, runner.state
    log_path = Path(log_path) if log_path is not None and runner.is_writer else None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        write_log(log_path, state.history)  # a fresh log, or the checkpoint's (repairs a kill)
    batches_per_epoch = passes_per_epoch(cfg) * math.ceil(inputs.train.shape[0] / cfg.batch_size)
    # The overall bar counts every batch of the epochs left; early stopping closes it short of its total.
    bars = tqdm(total=max(0, cfg.n_epochs - state.epoch) * batches_per_epoch, desc="training", unit="batch",
                position=0, file=sys.stderr, dynamic_ncols=True) if progress is True and runner.is_writer else None
    started = time.perf_counter()
    try:
        for epoch in range(state.epoch, cfg.n_epochs):
            if stopped_early(state, inputs.patience):
                break
            t0 = time.perf_counter()
            record = train_epoch(runner, epoch, bars)
            if inputs.valid_in is not None:
                metrics = runner.evaluate()
                record.update({f"valid_{k}": v for k, v in metrics.items()})
                if metrics["ndcg@100"] > state.best_ndcg:
                    state.best_ndcg, state.best_epoch = metrics["ndcg@100"], record["epoch"]
                    runner.snapshot_best()
            record["time_s"] = time.perf_counter() - t0
            state.epoch = epoch + 1
            state.history.append(record)
            runner.save_checkpoint()  # the checkpoint first: the log follows it, never leads it
            if log_path is not None:
                write_log(log_path, state.history)
            if progress and runner.is_writer:
                write_epoch_line(record, cfg.n_epochs, started, state, inputs.patience)
            if callback is not None:
                callback(record)
    finally:
        if bars is not None:
            bars.close()
    runner.restore_best()
    runner.model.eval()
    return state.history


def epoch_line(record: dict, n_epochs: int, elapsed_s: float) -> str:
    """One epoch's record as one line: losses, validation metrics, the epoch's time, time so far."""
    parts = [f"epoch {record['epoch']}/{n_epochs}"]
    parts += [f"{key.removesuffix('_loss')} loss {value:.4g}" for key, value in record.items() if key.endswith("_loss")]
    valid = [f"{key.removeprefix('valid_')} {value:.4f}" for key, value in record.items()
             if key.startswith("valid_") and key != "valid_n_users"]
    if valid:
        parts.append("valid " + " ".join(valid))
    parts.append(f"{record['time_s']:.1f} s (elapsed {timedelta_text(elapsed_s)})")
    return " | ".join(parts)


def write_epoch_line(record: dict, n_epochs: int, started: float, state: TrainState, patience: int | None) -> None:
    """epoch_line on stderr (above any progress bar), with the early stop when this epoch made it."""
    line = epoch_line(record, n_epochs, time.perf_counter() - started)
    if stopped_early(state, patience):
        line += (f" | early stop: no better validation NDCG@100 for {patience} epochs "
                 f"(best epoch {state.best_epoch})")
    tqdm.write(line, file=sys.stderr)


def timedelta_text(seconds: float) -> str:
    """12.3 s, 4:05 or 1:02:03 (h:mm:ss)."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ----------------------------------------------------------------------------- one device


class OneDeviceRunner:
    """The EpochRunner of one device: a RecVAE, its checkpoint one file (CHECKPOINT_NAME) that
    torch.load reads with weights_only."""

    is_writer = True

    def __init__(self, inputs: FitInputs, checkpoint_path: Path | None):
        cfg, train = inputs.cfg, inputs.train
        precision_mod.warn_if_slow(cfg.precision, cfg.device)
        torch.manual_seed(cfg.seed)  # the seed, the numpy generator, then the model's draws
        self.rng = np.random.default_rng(cfg.seed)
        self.model = RecVAE(cfg.hidden_dim, cfg.latent_dim, train.shape[1]).to(check_device(cfg.device))
        row_sparse_fc1 = fc1_grad_is_row_sparse(cfg, train)
        self.encoder_opt, self.decoder_opt = make_optimizers(self.model, cfg.lr, row_sparse_fc1)
        self.epoch_fields = {"fc1_grad": "row-sparse" if row_sparse_fc1 else "dense"}
        self.data_fingerprint = fingerprint(train, inputs.valid_in, inputs.valid_out)
        self.posterior_cache = posterior_cache.PosteriorCache.for_model(self.model, train.shape[0])
        self.inputs, self.checkpoint_path = inputs, checkpoint_path
        self.state = TrainState()
        self.best_state: dict | None = None

    def step(self, rows, phase, optimizers, fill) -> dict:
        model, cfg = self.model, self.inputs.cfg
        batch = model.as_batch(self.inputs.train[rows])
        with precision_mod.autocast(cfg.precision, cfg.device):
            posterior, old_posterior = posterior_cache.step_posteriors(
                self.posterior_cache, fill, phase, rows,
                lambda source: posterior_cache.posterior_of(model, batch, source))
        return train_step(model, batch, optimizers, cfg, phase, posterior=posterior, old_posterior=old_posterior)

    def batch_posterior(self, rows, source):
        cfg = self.inputs.cfg
        with precision_mod.autocast(cfg.precision, cfg.device):  # as the run filled it
            batch = self.model.as_batch(self.inputs.train[rows])
            return rows, posterior_cache.posterior_of(self.model, batch, source)

    def evaluate(self) -> dict:
        from .inference import evaluate  # scoring pulls in the top-k extension

        inputs = self.inputs
        return evaluate(self.model, inputs.valid_in, inputs.valid_out, batch_size=inputs.eval_batch_size,
                        ks=inputs.metric_ks, precision=inputs.cfg.precision)

    def snapshot_best(self) -> None:
        self.best_state = deepcopy(self.model.state_dict())

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is None:
            return
        save_tensors({
            "format": CHECKPOINT_FORMAT,
            "config": asdict(self.inputs.cfg),
            "data_fingerprint": self.data_fingerprint,
            "model": self.model.state_dict(),
            "optimizers": [self.encoder_opt.state_dict(), self.decoder_opt.state_dict()],
            "rng": _rng_states(self.rng),
            "state": asdict(self.state),
            "best_model": self.best_state,
        }, self.checkpoint_path)

    def load_checkpoint(self) -> Path:
        """See EpochRunner; n_epochs may differ from the checkpoint's."""
        path = self.checkpoint_path
        ckpt = load_tensors(path, map_location=self.model.decoder.weight.device)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
            raise RunFolderError(f"{path} is not a recvae_fast training checkpoint of format {CHECKPOINT_FORMAT} "
                                 f"(found {found!r})")
        saved_cfg = {k: v for k, v in ckpt["config"].items() if k != "n_epochs"}
        saved_cfg.setdefault("precision", precision_mod.DEFAULT_PRECISION)  # written before precision existed
        now_cfg = {k: v for k, v in asdict(self.inputs.cfg).items() if k != "n_epochs"}
        if saved_cfg != now_cfg:
            diff = sorted(k for k in now_cfg.keys() | saved_cfg.keys() if saved_cfg.get(k) != now_cfg.get(k))
            raise ValueError(f"{path} was written with other hyperparameters: "
                             + ", ".join(f"{k} {saved_cfg.get(k)!r} (now {now_cfg.get(k)!r})" for k in diff))
        if ckpt.get("data_fingerprint") != self.data_fingerprint:
            raise ValueError(f"{path} was trained on other data: train/validation matrices differ from the "
                             "checkpoint's (another file, other ids, or another split)")
        try:
            state = check_train_state(ckpt["state"], path)
            expected = self.model.state_dict()
            check_weights_like(ckpt["model"], expected, "model", path)
            best = ckpt["best_model"]
            if best is not None:
                check_weights_like(best, expected, "best_model", path)
            self.model.load_state_dict(ckpt["model"])
            self.encoder_opt.load_state_dict(ckpt["optimizers"][0])
            self.decoder_opt.load_state_dict(ckpt["optimizers"][1])
            check_optimizer_moments(self.encoder_opt, "encoder optimiser", path)
            check_optimizer_moments(self.decoder_opt, "decoder optimiser", path)
            self.state = TrainState(**state)
            self.best_state = best
            _restore_rng(ckpt["rng"], self.rng)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            if isinstance(exc, RunFolderError):
                raise
            raise RunFolderError(f"{path} is an inconsistent checkpoint ({str(exc).splitlines()[0][:200]})") from None
        return path


def fit(
    train,
    valid_in=None,
    valid_out=None,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    log_path: str | os.PathLike | None = None,
    patience: int | None = None,
    progress: bool | str = True,
    callback=None,
    metric_ks=None,
    eval_batch_size: int = 500,
    **hyperparameters,
) -> FitResult:
    """recvae_fast.fit on one device (recvae_fast.api.fit, which documents the arguments, calls it
    outside a torch.distributed group): a RecVAE trained by run_epochs with a OneDeviceRunner;
    checkpoint_dir holds one checkpoint file, locked against other writers."""
    check_progress(progress)
    if process_group_size() > 1:
        raise ValueError("inside a torch.distributed group of more than one process, train with recvae_fast.fit "
                         "(the item-sharded model); recvae_fast.training.fit trains on one device")
    inputs = check_fit_inputs(train, valid_in, valid_out, patience=patience, metric_ks=metric_ks,
                              eval_batch_size=eval_batch_size, **hyperparameters)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if resume and (ckpt_path is None or not ckpt_path.is_file()):
        raise FileNotFoundError(f"resume asked for, but there is no checkpoint at {ckpt_path}")
    with RunLock(checkpoint_dir) if checkpoint_dir is not None else contextlib.nullcontext():
        runner = OneDeviceRunner(inputs, ckpt_path)
        history = run_epochs(runner, resume=resume, log_path=log_path, progress=progress, callback=callback)
    return FitResult(runner.model, history)
