"""`fit`: the authors' training schedule around RecVAE, with checkpoints that resume exactly.

Alternating mode (default), per epoch: n_enc_epochs shuffled passes that step only the encoder
(dropout 0.5), update_prior(), then n_dec_epochs passes that step only the decoder (dropout 0).
Non-alternating mode: one pass per epoch stepping both (dropout 0.5), as in the authors' code.
Unlike the authors' loop, the part not being trained is frozen (requires_grad False), so no
gradient is computed for it, and a decoder pass skips the KL, which does not touch the decoder.
"""
from __future__ import annotations

import json
import os
import time
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from .atomic import atomic_write
from .model import RecVAE
from .optim import RowSparseAdam

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    hidden_dim: int = 600
    latent_dim: int = 200
    batch_size: int = 500
    n_epochs: int = 50
    n_enc_epochs: int = 3
    n_dec_epochs: int = 1
    lr: float = 5e-4
    gamma: float | None = 0.005
    beta: float | None = None
    dropout: float = 0.5
    not_alternating: bool = False
    # fc1's gradient layout: True row-sparse + exact RowSparseAdam (recvae_fast.optim), False dense +
    # fused Adam, None chooses by measurement (see fc1_grad_is_row_sparse).
    sparse_fc1_grad: bool | None = None
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        for name in ("hidden_dim", "latent_dim", "batch_size", "n_epochs", "n_enc_epochs", "n_dec_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.gamma and not self.beta:
            raise ValueError("give gamma (KL weight gamma * n_u) or beta (constant KL weight)")
        if (self.gamma is not None and self.gamma < 0) or (self.beta is not None and self.beta < 0):
            raise ValueError("gamma and beta must be >= 0")
        if self.sparse_fc1_grad not in (None, True, False):
            raise ValueError(f"sparse_fc1_grad must be True, False or None (automatic), got {self.sparse_fc1_grad!r}")


def fc1_grad_is_row_sparse(cfg: TrainConfig, train) -> bool:
    """The fc1 gradient layout fit uses: cfg.sparse_fc1_grad when set; else (None) row-sparse on the
    CPU when the catalogue has at least twice as many items as a batch has nonzeros on average.

    Measured on the CPU (benches/bench_fc1_optimizer.py, B 500, ~75 items per user): fc1 backward +
    Adam step 3.6x faster row-sparse at 1M items, 0.6x (slower) at 20k items, where a batch touches
    most rows and the row-sparse gradient (one row per nonzero) is larger than the dense one. On
    CUDA the dense layout stays the default until a GPU run of benches/gpu_check.py measures both.
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


def _set_phase(model: RecVAE, train_encoder: bool, train_decoder: bool) -> None:
    model.encoder.requires_grad_(train_encoder)
    model.decoder.requires_grad_(train_decoder)


def make_optimizers(model: RecVAE, lr: float, sparse_fc1_grad: bool = False):
    """One Adam for the encoder and one for the decoder (the authors' setup). The fused
    implementation does the same arithmetic in one pass over each tensor. With sparse_fc1_grad,
    fc1's gradient holds only the batch's rows and the encoder's Adam is RowSparseAdam (exact)."""
    fused = model.decoder.weight.device.type in ("cpu", "cuda")
    model.encoder.fc1.sparse_grad = sparse_fc1_grad
    if sparse_fc1_grad:
        encoder_opt = RowSparseAdam(model.encoder.parameters(), lr=lr)
    else:
        encoder_opt = torch.optim.Adam(model.encoder.parameters(), lr=lr, fused=fused)
    decoder_opt = torch.optim.Adam(model.decoder.parameters(), lr=lr, fused=fused)
    return encoder_opt, decoder_opt


def train_step(model: RecVAE, batch, optimizers, cfg: TrainConfig, phase: str) -> dict:
    """One optimisation step on a canonical batch. phase: "encoder", "decoder" or "both"."""
    dropout = 0.0 if phase == "decoder" else cfg.dropout
    _set_phase(model, phase != "decoder", phase != "encoder")
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    mll, kld = model.loss_terms(batch, cfg.beta, cfg.gamma, dropout, with_kl=phase != "decoder")
    loss = -mll if kld is None else kld - mll
    loss.backward()
    for opt in optimizers:
        opt.step()
    out = {"mll": mll.item(), "loss": loss.item()}
    if kld is not None:
        out["kld"] = kld.item()
    return out


def _run_passes(model, train, optimizers, cfg, phase, n_passes, rng, desc, progress) -> dict:
    """n_passes shuffled passes over the users; returns the phase's losses averaged over all batches."""
    sums: dict[str, float] = {}
    n_batches = 0
    model.train()
    for k in range(n_passes):
        users = rng.permutation(train.shape[0])
        starts = range(0, len(users), cfg.batch_size)
        for start in tqdm(starts, desc=f"{desc} {phase} {k + 1}", leave=False, disable=not progress):
            rows = np.sort(users[start : start + cfg.batch_size])
            batch = model.as_batch(train[rows])
            for key, value in train_step(model, batch, optimizers, cfg, phase).items():
                sums[key] = sums.get(key, 0.0) + value
            n_batches += 1
    return {f"{phase}_{key}": value / n_batches for key, value in sums.items()}


def _atomic_save(obj, path: Path) -> None:
    """torch.save through recvae_fast.atomic: a crash leaves the old checkpoint or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f))


def _rng_states(rng: np.random.Generator) -> dict:
    states = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict, rng: np.random.Generator) -> None:
    rng.bit_generator.state = states["numpy"]
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path, model, optimizers, cfg, state, rng, best_state) -> None:
    _atomic_save(
        {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(cfg),
            "model": model.state_dict(),
            "optimizers": [opt.state_dict() for opt in optimizers],
            "rng": _rng_states(rng),
            "state": asdict(state),
            "best_model": best_state,
        },
        Path(path),
    )


def load_model(path, device: str | torch.device = "cpu") -> RecVAE:
    """A RecVAE from a checkpoint written by fit (its best model), or from a bare state_dict
    in the authors' format (input size and dims are read off the weights)."""
    obj = torch.load(path, map_location=device, weights_only=False)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        state_dict = obj["best_model"] or obj["model"]
    elif isinstance(obj, dict) and "decoder.weight" in obj:
        state_dict = obj
    else:
        raise ValueError(f"{path} is neither a recvae_fast checkpoint nor a RecVAE state_dict")
    n_items, latent_dim = state_dict["decoder.weight"].shape
    hidden_dim = state_dict["encoder.fc1.weight"].shape[0]
    model = RecVAE(hidden_dim, latent_dim, n_items).to(device)
    model.load_state_dict(state_dict)
    model.eval()
    return model


def _check_matrix(name: str, matrix, n_items: int | None) -> sp.csr_matrix:
    if not sp.issparse(matrix):
        raise TypeError(f"{name} must be a scipy.sparse matrix (users × items), got {type(matrix).__name__}")
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    if n_items is not None and matrix.shape[1] != n_items:
        raise ValueError(f"{name} has {matrix.shape[1]} item columns, train has {n_items}")
    if matrix.nnz and (not np.isfinite(matrix.data).all() or (matrix.data < 0).any()):
        raise ValueError(f"{name} has negative or non-finite values")
    return matrix


def fit(
    train,
    valid_in=None,
    valid_out=None,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    log_path: str | os.PathLike | None = None,
    progress: bool = True,
    callback=None,
    **hyperparameters,
) -> RecVAE:
    """Train RecVAE on a users × items scipy CSR matrix; return the best model.

    Hyperparameters (TrainConfig): hidden_dim 600, latent_dim 200, batch_size 500, n_epochs 50,
    n_enc_epochs 3, n_dec_epochs 1, lr 5e-4, gamma 0.005 (or beta), dropout 0.5,
    not_alternating False, sparse_fc1_grad None (automatic: see fc1_grad_is_row_sparse), seed 0,
    device "cpu".
    With valid_in/valid_out (fold-in and held-out parts of validation users), the model of the
    epoch with the best validation NDCG@100 is returned; without, the last.
    checkpoint_dir: a checkpoint is written there atomically after every epoch; resume=True
    continues from it (the hyperparameters must match). log_path: one JSON line per epoch.
    """
    unknown = set(hyperparameters) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown hyperparameter(s): {', '.join(sorted(unknown))}")
    cfg = TrainConfig(**hyperparameters)
    cfg.validate()
    train = _check_matrix("train", train, None)
    if train.shape[0] == 0 or train.nnz == 0:
        raise ValueError("train has no interactions")
    n_items = train.shape[1]
    if (valid_in is None) != (valid_out is None):
        raise ValueError("give both valid_in and valid_out, or neither")
    if valid_in is not None:
        valid_in = _check_matrix("valid_in", valid_in, n_items)
        valid_out = _check_matrix("valid_out", valid_out, n_items)
        if valid_in.shape[0] != valid_out.shape[0]:
            raise ValueError(f"valid_in has {valid_in.shape[0]} users, valid_out has {valid_out.shape[0]}")

    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = RecVAE(cfg.hidden_dim, cfg.latent_dim, n_items).to(device)
    row_sparse_fc1 = fc1_grad_is_row_sparse(cfg, train)
    encoder_opt, decoder_opt = make_optimizers(model, cfg.lr, row_sparse_fc1)
    state = TrainState()
    best_state = None
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None

    if resume:
        if ckpt_path is None or not ckpt_path.exists():
            raise FileNotFoundError(f"resume asked for, but there is no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{ckpt_path} is not a recvae_fast training checkpoint")
        saved_cfg = {k: v for k, v in ckpt["config"].items() if k != "n_epochs"}
        now_cfg = {k: v for k, v in asdict(cfg).items() if k != "n_epochs"}
        if saved_cfg != now_cfg:
            diff = sorted(k for k in now_cfg if saved_cfg.get(k) != now_cfg[k])
            raise ValueError(f"the checkpoint was written with other hyperparameters: {', '.join(diff)}")
        model.load_state_dict(ckpt["model"])
        encoder_opt.load_state_dict(ckpt["optimizers"][0])
        decoder_opt.load_state_dict(ckpt["optimizers"][1])
        state = TrainState(**ckpt["state"])
        best_state = ckpt["best_model"]
        _restore_rng(ckpt["rng"], rng)

    log_file = open(log_path, "a", encoding="utf-8") if log_path is not None else None
    try:
        for epoch in range(state.epoch, cfg.n_epochs):
            t0 = time.perf_counter()
            record: dict = {"epoch": epoch + 1, "fc1_grad": "row-sparse" if row_sparse_fc1 else "dense"}
            desc = f"epoch {epoch + 1}"
            if cfg.not_alternating:
                record.update(_run_passes(model, train, [encoder_opt, decoder_opt], cfg, "both", 1, rng, desc, progress))
                users_seen = train.shape[0]
            else:
                record.update(_run_passes(model, train, [encoder_opt], cfg, "encoder", cfg.n_enc_epochs, rng, desc,
                                          progress))
                model.update_prior()
                record.update(_run_passes(model, train, [decoder_opt], cfg, "decoder", cfg.n_dec_epochs, rng, desc,
                                          progress))
                users_seen = train.shape[0] * (cfg.n_enc_epochs + cfg.n_dec_epochs)
            train_time = time.perf_counter() - t0
            _set_phase(model, True, True)
            record["train_time_s"] = train_time
            record["users_per_s"] = users_seen / train_time
            if valid_in is not None:
                from .inference import evaluate  # scoring pulls in the top-k extension

                metrics = evaluate(model, valid_in, valid_out)
                record.update({f"valid_{k}": v for k, v in metrics.items()})
                if metrics["ndcg@100"] > state.best_ndcg:
                    state.best_ndcg, state.best_epoch = metrics["ndcg@100"], epoch + 1
                    best_state = deepcopy(model.state_dict())
            record["time_s"] = time.perf_counter() - t0
            state.epoch = epoch + 1
            state.history.append(record)
            if ckpt_path is not None:
                save_checkpoint(ckpt_path, model, (encoder_opt, decoder_opt), cfg, state, rng, best_state)
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if progress:
                shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
                tqdm.write(json.dumps(shown))
            if callback is not None:
                callback(record)
    finally:
        if log_file is not None:
            log_file.close()

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    model.history = state.history
    return model
