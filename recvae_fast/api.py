"""The public `fit`, `evaluate` and `recommend` (recvae_fast.fit, ...): each runs the one-device
function (recvae_fast.training, recvae_fast.inference) or, inside a torch.distributed group of more
than one process or for a ShardedRecVAE, the item-sharded one (recvae_fast.distributed).

This module sits above both: training and inference never import recvae_fast.distributed, and
torch.distributed is imported only when a group or a sharded model is in play.
"""
from __future__ import annotations

import os

from . import inference, training
from . import precision as precision_mod
from .model import RecVAE
from .ops.topk_masked import TopK


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
) -> training.FitResult:
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
    training.check_progress(progress)
    world_size = training.process_group_size()
    if world_size > 1:
        from .distributed import fit_sharded

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
        return training.FitResult(model, model.history)
    if item_shards not in (None, 1):
        raise ValueError(f"item_shards={item_shards!r} needs an initialised torch.distributed group of a multiple of "
                         "that many processes (e.g. torchrun --nproc-per-node N); without one, leave it None")
    return training.fit(train, valid_in, valid_out, checkpoint_dir=checkpoint_dir, resume=resume, log_path=log_path,
                        patience=patience, progress=progress, callback=callback, metric_ks=metric_ks,
                        eval_batch_size=eval_batch_size, **hyperparameters)


def _is_sharded(model) -> bool:
    if isinstance(model, RecVAE):
        return False
    from .distributed import ShardedRecVAE  # torch.distributed is imported only for another model

    return isinstance(model, ShardedRecVAE)


def recommend(
    model: RecVAE,
    interactions,
    k: int = 100,
    exclude_seen: bool = True,
    batch_size: int = 500,
    precision: str = precision_mod.DEFAULT_PRECISION,
    exclude=None,
) -> TopK:
    """Top-k items per user (rows of `interactions`, a users × items scipy matrix).

    Returns TopK(scores float32 U × k, items int64 U × k), numpy arrays in torch.topk's order (as
    topk_masked), best first, ties to the lower item index. With exclude_seen, a user's own items
    are never returned; a user with fewer than k eligible items gets −inf / −1 padding.
    A ShardedRecVAE (from fit in a process group) is scored on every rank of its group, which all
    pass the same users and all get the whole result (recvae_fast.distributed.recommend_sharded).
    precision: "32-true" or "bf16-mixed" (recvae_fast.precision: the encoder under autocast, the
    scores' products with bf16 operands, the top-k exact on the float32 scores they give).
    exclude: a users × items scipy matrix of more items never returned, its stored entries whatever
    their values (e.g. every item a user rated, where `interactions` holds only the liked ones).
    """
    if _is_sharded(model):
        from .distributed import recommend_sharded

        if exclude is not None:
            raise ValueError("exclude is not supported for an item-sharded model")
        if precision_mod.autocast_dtype(precision) is not None:
            raise ValueError("precision 'bf16-mixed' is not supported for an item-sharded model; use '32-true'")
        return recommend_sharded(model, interactions, k, exclude_seen, batch_size)
    return inference.recommend(model, interactions, k, exclude_seen, batch_size, precision, exclude)


def evaluate(
    model: RecVAE,
    fold_in,
    heldout,
    batch_size: int = 500,
    ks=None,
    precision: str = precision_mod.DEFAULT_PRECISION,
) -> dict:
    """Strong-generalisation metrics: {"ndcg@100", "recall@20", "recall@50", "n_users"}, or with
    `ks` (metric cut-offs) "ndcg@k" and "recall@k" for every k in ks, then "n_users".

    Users are scored from their fold-in items, which are excluded from the ranking; users with
    no held-out items are skipped (and not counted in n_users). A ShardedRecVAE is evaluated on
    every rank of its group, each getting the metrics (recvae_fast.distributed.evaluate_sharded).
    precision: as in `recommend`.
    """
    precision_mod.check_precision(precision)
    if _is_sharded(model):
        if precision != precision_mod.DEFAULT_PRECISION:
            raise ValueError("precision 'bf16-mixed' is not supported for an item-sharded model; use '32-true'")
        from .distributed import evaluate_sharded

        return evaluate_sharded(model, fold_in, heldout, batch_size, ks)
    return inference.evaluate(model, fold_in, heldout, batch_size, ks, precision)
