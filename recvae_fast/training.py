"""`fit`: the authors' training schedule around RecVAE, with checkpoints that resume exactly.

Alternating mode (default), per epoch: n_enc_epochs shuffled passes that step only the encoder
(dropout 0.5), update_prior(), then n_dec_epochs passes that step only the decoder (dropout 0).
Non-alternating mode: one pass per epoch stepping both (dropout 0.5), as in the authors' code.
Unlike the authors' loop, the part not being trained is frozen (requires_grad False), so no
gradient is computed for it, and a decoder pass skips the KL, which does not touch the decoder.
The prior's old-encoder posterior of each user is computed once per epoch, not in every encoder
step (recvae_fast.posterior_cache).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

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
    most rows. On CUDA the dense layout stays the default until a GPU run of benches/gpu_check.py
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


def _set_phase(model: RecVAE, train_encoder: bool, train_decoder: bool) -> None:
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
    _set_phase(model, phase != "decoder", phase != "encoder")
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


def _run_passes(run: _Training, train, optimizers, phase, n_passes, desc, bars) -> dict:
    """n_passes shuffled passes over the users; returns the phase's losses averaged over all batches.
    bars: the run's overall progress bar (advanced per batch; each pass gets a bar beneath it), or
    None for no bars. An empty old-posterior cache is filled by the first of these passes: from
    the encoder in a decoder phase (right after update_prior), else from the old encoder."""
    model, cfg, rng, cache = run.model, run.cfg, run.rng, run.posterior_cache
    sums: dict[str, float] = {}
    n_batches = 0
    model.train()
    for k in range(n_passes):
        fill = posterior_cache.pass_fill(cache, phase)
        if fill is not None:
            run.state.posterior_fill = posterior_cache.fill_record(fill, rng)
        users = rng.permutation(train.shape[0])
        starts = range(0, len(users), cfg.batch_size)
        pass_bar = tqdm(starts, desc=f"{desc} {phase} {k + 1}/{n_passes}", leave=False, position=1,
                        disable=bars is None, file=sys.stderr)
        for start in pass_bar:
            rows = np.sort(users[start : start + cfg.batch_size])
            batch = model.as_batch(train[rows])
            with precision_mod.autocast(cfg.precision, cfg.device):
                posterior, old_posterior = posterior_cache.step_posteriors(
                    cache, fill, phase, rows, lambda source: posterior_cache.posterior_of(model, batch, source))
            step = train_step(model, batch, optimizers, cfg, phase, posterior=posterior, old_posterior=old_posterior)
            for key, value in step.items():
                sums[key] = sums.get(key, 0.0) + value
            n_batches += 1
            if bars is not None:
                bars.update(1)
    workspace.release()  # the phase's recycled step buffers (see recvae_fast.workspace)
    return {f"{phase}_{key}": value / n_batches for key, value in sums.items()}


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


# ----------------------------------------------------------------------------- fit in parts


@dataclass
class _Training:
    """The state of one training run: what a checkpoint saves and a resume restores."""

    cfg: TrainConfig
    model: RecVAE
    encoder_opt: torch.optim.Optimizer
    decoder_opt: torch.optim.Optimizer
    rng: np.random.Generator
    row_sparse_fc1: bool
    data_fingerprint: str
    posterior_cache: posterior_cache.PosteriorCache | None
    state: TrainState = field(default_factory=TrainState)
    best_state: dict | None = None


def _start(inputs: FitInputs) -> _Training:
    cfg, train = inputs.cfg, inputs.train
    precision_mod.warn_if_slow(cfg.precision, cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = RecVAE(cfg.hidden_dim, cfg.latent_dim, train.shape[1]).to(check_device(cfg.device))
    row_sparse_fc1 = fc1_grad_is_row_sparse(cfg, train)
    encoder_opt, decoder_opt = make_optimizers(model, cfg.lr, row_sparse_fc1)
    data_fp = fingerprint(train, inputs.valid_in, inputs.valid_out)
    cache = posterior_cache.PosteriorCache.for_model(model, train.shape[0])
    return _Training(cfg, model, encoder_opt, decoder_opt, rng, row_sparse_fc1, data_fp, cache)


def _checkpoint(run: _Training) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "config": asdict(run.cfg),
        "data_fingerprint": run.data_fingerprint,
        "model": run.model.state_dict(),
        "optimizers": [run.encoder_opt.state_dict(), run.decoder_opt.state_dict()],
        "rng": _rng_states(run.rng),
        "state": asdict(run.state),
        "best_model": run.best_state,
    }


def _resume(run: _Training, path: Path) -> None:
    """Restore `run` from the checkpoint at `path` after checking that it was written for the same
    data (fingerprint of train and validation) and hyperparameters (n_epochs may differ)."""
    ckpt = load_tensors(path, map_location=run.model.decoder.weight.device)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise RunFolderError(f"{path} is not a recvae_fast training checkpoint of format {CHECKPOINT_FORMAT} "
                             f"(found {found!r})")
    saved_cfg = {k: v for k, v in ckpt["config"].items() if k != "n_epochs"}
    saved_cfg.setdefault("precision", precision_mod.DEFAULT_PRECISION)  # written before precision existed
    now_cfg = {k: v for k, v in asdict(run.cfg).items() if k != "n_epochs"}
    if saved_cfg != now_cfg:
        diff = sorted(k for k in now_cfg.keys() | saved_cfg.keys() if saved_cfg.get(k) != now_cfg.get(k))
        raise ValueError(f"{path} was written with other hyperparameters: "
                         + ", ".join(f"{k} {saved_cfg.get(k)!r} (now {now_cfg.get(k)!r})" for k in diff))
    if ckpt.get("data_fingerprint") != run.data_fingerprint:
        raise ValueError(f"{path} was trained on other data: train/validation matrices differ from the "
                         "checkpoint's (another file, other ids, or another split)")
    try:
        state = check_train_state(ckpt["state"], path)
        expected = run.model.state_dict()
        check_weights_like(ckpt["model"], expected, "model", path)
        best = ckpt["best_model"]
        if best is not None:
            check_weights_like(best, expected, "best_model", path)
        run.model.load_state_dict(ckpt["model"])
        run.encoder_opt.load_state_dict(ckpt["optimizers"][0])
        run.decoder_opt.load_state_dict(ckpt["optimizers"][1])
        check_optimizer_moments(run.encoder_opt, "encoder optimiser", path)
        check_optimizer_moments(run.decoder_opt, "decoder optimiser", path)
        run.state = TrainState(**state)
        run.best_state = best
        _restore_rng(ckpt["rng"], run.rng)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        if isinstance(exc, RunFolderError):
            raise
        raise RunFolderError(f"{path} is an inconsistent checkpoint ({str(exc).splitlines()[0][:200]})") from None


def _passes_per_epoch(cfg: TrainConfig) -> int:
    return 1 if cfg.not_alternating else cfg.n_enc_epochs + cfg.n_dec_epochs


def _train_epoch(run: _Training, train: sp.csr_matrix, epoch: int, bars) -> dict:
    """One epoch of the schedule (see the module docstring); returns its record without metrics.
    bars: the overall progress bar, or None (see _run_passes)."""
    cfg, model = run.cfg, run.model
    t0 = time.perf_counter()
    record: dict = {"epoch": epoch + 1, "fc1_grad": "row-sparse" if run.row_sparse_fc1 else "dense"}
    desc = f"epoch {epoch + 1}"
    if cfg.not_alternating:
        record.update(_run_passes(run, train, [run.encoder_opt, run.decoder_opt], "both", 1, desc, bars))
    else:
        record.update(_run_passes(run, train, [run.encoder_opt], "encoder", cfg.n_enc_epochs, desc, bars))
        model.update_prior()
        if run.posterior_cache is not None:  # the old encoder changed: the next pass refills the cache
            run.posterior_cache.clear()
            run.state.posterior_fill = None
        record.update(_run_passes(run, train, [run.decoder_opt], "decoder", cfg.n_dec_epochs, desc, bars))
    users_seen = train.shape[0] * _passes_per_epoch(cfg)
    _set_phase(model, True, True)
    record["train_time_s"] = time.perf_counter() - t0
    record["users_per_s"] = users_seen / record["train_time_s"]
    return record


def _validate_epoch(run: _Training, inputs: FitInputs, record: dict) -> None:
    """Add the validation metrics to `record`; keep the weights when NDCG@100 is the best so far."""
    from .inference import evaluate  # scoring pulls in the top-k extension

    metrics = evaluate(run.model, inputs.valid_in, inputs.valid_out, batch_size=inputs.eval_batch_size,
                       ks=inputs.metric_ks, precision=run.cfg.precision)
    record.update({f"valid_{k}": v for k, v in metrics.items()})
    if metrics["ndcg@100"] > run.state.best_ndcg:
        run.state.best_ndcg, run.state.best_epoch = metrics["ndcg@100"], record["epoch"]
        run.best_state = deepcopy(run.model.state_dict())


def _write_log(path: Path, history: list) -> None:
    """The whole log, regenerated from the history atomically: after a kill it is the checkpoint's
    history or that history less its last epoch (then restored by the next write)."""
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in history))


def _stopped_early(state: TrainState, patience: int | None) -> bool:
    """No validation improvement in the last `patience` epochs."""
    return patience is not None and state.epoch - state.best_epoch >= patience


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
    item_shards: int | None = None,
    **hyperparameters,
) -> FitResult:
    """Train RecVAE on a users × items scipy CSR matrix; return FitResult(model, history).

    Hyperparameters (TrainConfig): hidden_dim 600, latent_dim 200, batch_size 500, n_epochs 50,
    n_enc_epochs 3, n_dec_epochs 1, lr 5e-4, gamma 0.005 (or beta), dropout_rate 0.5,
    not_alternating False, sparse_fc1_grad None (automatic: see fc1_grad_is_row_sparse), seed 0,
    device "cpu", precision "32-true" (or "bf16-mixed": bf16 products under torch.autocast, float32
    parameters, gradients, Adam state, softmax, KL and LayerNorm statistics; recvae_fast.precision;
    on a CPU without AMX or AVX512-BF16 it runs slower than "32-true" and says so in a warning).
    With valid_in/valid_out (fold-in and held-out parts of validation users), the model of the
    epoch with the best validation NDCG@100 is returned; without, the last. patience=N stops
    when validation NDCG@100 has not improved for N epochs (needs validation data).
    Validation metrics: NDCG@100, Recall@20, Recall@50, or with metric_ks (cut-offs) NDCG@k and
    Recall@k for every k in metric_ks and 100; scored eval_batch_size users at a time.
    progress: True, an overall bar for the run (every batch of every epoch, with an ETA) with a bar
    for each pass beneath it, and one line per epoch (losses, validation metrics, time); "epochs",
    that line per epoch only; False, nothing. All of it goes to stderr; `callback(record)` gets each
    epoch's record (the metrics.jsonl line) in any case.
    checkpoint_dir: created if needed and locked against other writers; a checkpoint (with the
    history) is written there atomically after every epoch; resume=True continues from it, after
    checking the data fingerprint and the hyperparameters (n_epochs and patience may change).
    log_path: one JSON line per epoch, rewritten atomically from the history.
    Everything is validated before anything is written.
    The prior's old-encoder posterior is kept per user while the old encoder is unchanged
    (recvae_fast.posterior_cache: n_users × 2 × latent_dim numbers, up to 2 GiB), so encoder steps
    do not run the old encoder again.

    Called on every rank of an initialised torch.distributed group of more than one process (e.g.
    under torchrun), with the same arguments, fit trains the item-sharded model instead
    (recvae_fast.distributed.fit_sharded): item_shards (None: the world size) ranks split the items,
    world size / item_shards is the data-parallel size; the same seed gives the weights and history
    of one device. The returned model is then a ShardedRecVAE (this rank's rows; `evaluate` and
    `recommend` take it, on every rank), and checkpoint_dir holds torch.distributed.checkpoint
    checkpoints. Without a group, or in a group of one, item_shards must be None or 1.
    """
    import torch.distributed as dist

    if progress not in (True, False, "epochs"):
        raise ValueError(f"progress must be True, False or 'epochs', got {progress!r}")
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world_size > 1:
        from .distributed.training import fit_sharded

        if hyperparameters.get("precision", precision_mod.DEFAULT_PRECISION) != precision_mod.DEFAULT_PRECISION:
            precision_mod.check_precision(hyperparameters["precision"])
            raise ValueError("precision 'bf16-mixed' is not supported by the item-sharded fit (inside a "
                             "torch.distributed group): leave it at '32-true'")
        if metric_ks is not None or eval_batch_size != 500:
            raise ValueError("metric_ks and eval_batch_size are not supported by the item-sharded fit (inside a "
                             "torch.distributed group): leave them at their defaults")
        model = fit_sharded(train, valid_in, valid_out, item_shards=world_size if item_shards is None else item_shards,
                            checkpoint_dir=checkpoint_dir, resume=resume, log_path=log_path, patience=patience,
                            progress=progress, callback=callback, **hyperparameters)
        return FitResult(model, model.history)
    if item_shards not in (None, 1):
        raise ValueError(f"item_shards={item_shards!r} needs an initialised torch.distributed group of a multiple of "
                         "that many processes (e.g. torchrun --nproc-per-node N); without one, leave it None")
    inputs = check_fit_inputs(train, valid_in, valid_out, patience=patience, metric_ks=metric_ks,
                              eval_batch_size=eval_batch_size, **hyperparameters)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if resume and (ckpt_path is None or not ckpt_path.is_file()):
        raise FileNotFoundError(f"resume asked for, but there is no checkpoint at {ckpt_path}")
    if ckpt_path is None:
        return _fit(inputs, None, resume, log_path, progress, callback)
    with RunLock(checkpoint_dir):
        return _fit(inputs, ckpt_path, resume, log_path, progress, callback)


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
    if _stopped_early(state, patience):
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


def _fit(inputs: FitInputs, ckpt_path: Path | None, resume: bool, log_path, progress, callback) -> FitResult:
    run = _start(inputs)
    if resume:
        _resume(run, ckpt_path)
        if run.posterior_cache is not None and run.state.posterior_fill is not None:
            def batch_posterior(rows, source):
                with precision_mod.autocast(inputs.cfg.precision, inputs.cfg.device):  # as the run filled it
                    batch = run.model.as_batch(inputs.train[rows])
                    return rows, posterior_cache.posterior_of(run.model, batch, source)

            try:  # the cache as the uninterrupted run holds it: recomputed from the same batches
                posterior_cache.refill(run.posterior_cache, run.state.posterior_fill, inputs.train.shape[0],
                                       inputs.cfg.batch_size, batch_posterior)
            except ValueError as exc:
                raise RunFolderError(f"{ckpt_path} is an inconsistent checkpoint ({exc})") from None
    log_path = Path(log_path) if log_path is not None else None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        _write_log(log_path, run.state.history)  # a fresh log, or the checkpoint's (repairs a kill)
    cfg = inputs.cfg
    batches_per_epoch = _passes_per_epoch(cfg) * math.ceil(inputs.train.shape[0] / cfg.batch_size)
    # The overall bar counts every batch of the epochs left; early stopping closes it short of its total.
    bars = tqdm(total=max(0, cfg.n_epochs - run.state.epoch) * batches_per_epoch, desc="training", unit="batch",
                position=0, file=sys.stderr, dynamic_ncols=True) if progress is True else None
    started = time.perf_counter()
    try:
        for epoch in range(run.state.epoch, cfg.n_epochs):
            if _stopped_early(run.state, inputs.patience):
                break
            t0 = time.perf_counter()
            record = _train_epoch(run, inputs.train, epoch, bars)
            if inputs.valid_in is not None:
                _validate_epoch(run, inputs, record)
            record["time_s"] = time.perf_counter() - t0
            run.state.epoch = epoch + 1
            run.state.history.append(record)
            if ckpt_path is not None:  # the checkpoint first: the log follows it, never leads it
                save_tensors(_checkpoint(run), ckpt_path)
            if log_path is not None:
                _write_log(log_path, run.state.history)
            if progress:
                write_epoch_line(record, cfg.n_epochs, started, run.state, inputs.patience)
            if callback is not None:
                callback(record)
    finally:
        if bars is not None:
            bars.close()
    if run.best_state is not None:
        run.model.load_state_dict(run.best_state)
    run.model.eval()
    return FitResult(run.model, run.state.history)
