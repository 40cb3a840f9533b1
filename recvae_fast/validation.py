"""Checks of what is read back from a run folder, before any of it is used: the training state of a
checkpoint, saved weights and optimiser moments, and run.json's fields. Every failure is a
RunFolderError naming the file and the field, in one line.
"""
from __future__ import annotations

import math
import os

import torch

from .runfolder import RunFolderError


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value) -> str:
    return f"{value!r:.80}"


# ----------------------------------------------------------------------------- checkpoint state


TRAIN_STATE_FIELDS = ("epoch", "best_ndcg", "best_epoch", "history", "posterior_fill")


def check_train_state(state, path) -> dict:
    """A checkpoint's `state` (training.TrainState as a dict) with every field checked: epoch an
    integer >= 0, best_ndcg a number in [0, 1] or -inf, best_epoch an integer in [0, epoch],
    history a list of `epoch` records numbered 1..epoch, posterior_fill a dict or None."""
    where = f"{path} is an inconsistent checkpoint (training state)"
    if not isinstance(state, dict):
        raise RunFolderError(f"{where} is a {type(state).__name__}, not a table")
    unknown, missing = set(state) - set(TRAIN_STATE_FIELDS), set(TRAIN_STATE_FIELDS[:4]) - set(state)
    if unknown or missing:
        raise RunFolderError(f"{where} has unknown or missing fields: {', '.join(sorted(map(str, unknown | missing)))}")
    epoch, best_ndcg, best_epoch, history = (state[k] for k in TRAIN_STATE_FIELDS[:4])
    if not _is_int(epoch) or epoch < 0:
        raise RunFolderError(f"{where}: epoch must be an integer >= 0, got {_shown(epoch)}")
    if not _is_number(best_ndcg) or not (best_ndcg == -math.inf or 0 <= best_ndcg <= 1):
        raise RunFolderError(f"{where}: best_ndcg must be a number in [0, 1] (or -inf), got {_shown(best_ndcg)}")
    if not _is_int(best_epoch) or not 0 <= best_epoch <= epoch:
        raise RunFolderError(f"{where}: best_epoch must be an integer in [0, {epoch}], got {_shown(best_epoch)}")
    if not isinstance(history, list) or len(history) != epoch:
        raise RunFolderError(f"{where}: history must be a list of {epoch} epoch records, got {_shown(history)}")
    for number, record in enumerate(history, start=1):
        if not isinstance(record, dict) or record.get("epoch") != number or not _is_int(record.get("epoch")):
            raise RunFolderError(f"{where}: history record {number} is not the record of epoch {number}")
        if not all(isinstance(key, str) and (value is None or isinstance(value, (str, bool, int, float)))
                   for key, value in record.items()):
            raise RunFolderError(f"{where}: history record {number} holds something other than names and numbers")
    if state.get("posterior_fill") is not None and not isinstance(state["posterior_fill"], dict):
        raise RunFolderError(f"{where}: posterior_fill must be a table or null, got {_shown(state['posterior_fill'])}")
    return state


def check_weights_like(weights, expected: dict, what: str, path) -> dict:
    """`weights` (a state_dict read from a file) with exactly the keys of `expected` (the model's own
    state_dict), each a finite tensor of the same shape; returns it."""
    if not isinstance(weights, dict):
        raise RunFolderError(f"{path}: {what} is a {type(weights).__name__}, not a table of tensors")
    if set(weights) != set(expected):
        differ = sorted(map(str, set(weights) ^ set(expected)))
        raise RunFolderError(f"{path}: {what} has other parameters than the model ({', '.join(differ[:3])})")
    for name, value in weights.items():
        if not isinstance(value, torch.Tensor) or value.shape != expected[name].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise RunFolderError(f"{path}: {what}'s {name} is {shape}, the model's is {tuple(expected[name].shape)}")
    check_finite_weights(weights, path, what)
    return weights


def check_finite_weights(weights: dict, path, what: str = "the model") -> None:
    """A RunFolderError naming the first tensor of `weights` that is not floating point or holds a NaN
    or an infinity."""
    for name, value in weights.items():
        if not isinstance(value, torch.Tensor):
            continue
        if not value.is_floating_point():
            raise RunFolderError(f"{path}: {what}'s {name} holds {value.dtype} numbers, not floating-point weights")
        if not bool(torch.isfinite(value).all()):
            raise RunFolderError(f"{path}: {what}'s {name} holds NaN or infinite values (a diverged or corrupt "
                                 "model cannot score)")


def check_optimizer_moments(optimizer: torch.optim.Optimizer, what: str, path) -> None:
    """After load_state_dict (which checks the groups, not the moments): each parameter's state
    tensors other than its step count have the parameter's shape, and are finite."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            if value.shape != param.shape or not bool(torch.isfinite(value).all()):
                raise RunFolderError(f"{path}: {what}'s {key} is {tuple(value.shape)} or not finite, its parameter "
                                     f"is {tuple(param.shape)}")


# ----------------------------------------------------------------------------- run.json


def _optional(check):
    return lambda value: value is None or check(value)


def _column(value) -> bool:
    return (isinstance(value, str) and value != "") or (_is_int(value) and value >= 0)


# The data options a run.json records (the CLI's data flags), each with its rule and the rule in words.
DATA_OPTION_RULES = {
    "sep": (_optional(lambda v: isinstance(v, str) and v != ""), "a non-empty string or null"),
    "user_col": (_optional(_column), "a column name or index, or null"),
    "item_col": (_optional(_column), "a column name or index, or null"),
    "rating_col": (_optional(lambda v: v is False or _column(v)), "a column name or index, false or null"),
    "rating_threshold": (_optional(lambda v: _is_number(v) and math.isfinite(v)), "a finite number or null"),
    "data_seed": (_optional(lambda v: _is_int(v) and v >= 0), "an integer >= 0 or null"),
    "min_items": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "min_users_per_item": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "heldout_users": (_optional(lambda v: _is_int(v) and v >= 1), "an integer >= 1 or null"),
}


# The settings besides the data and the hyperparameters that shape a run (run.json's "training").
TRAINING_OPTION_RULES = {
    "patience": (_optional(lambda v: _is_int(v) and v >= 1), "an integer >= 1 or null"),
    "topk": (_optional(lambda v: isinstance(v, list) and v != [] and all(_is_int(k) and k >= 1 for k in v)),
             "a non-empty list of integers >= 1, or null"),
}


def check_run_description(saved, path, run_format: int, config_fields) -> tuple[str, dict, dict]:
    """(source, data options, config) of a run.json, every field checked: the format, `source`
    ("synthetic" or an absolute path), `data` (DATA_OPTION_RULES), `config` (a table of known
    hyperparameter names; their values are checked by TrainConfig.validate), `split_fingerprint`
    (a string), `item_shards` (null or an integer >= 1) and `training` (TRAINING_OPTION_RULES)."""
    if not isinstance(saved, dict) or saved.get("format") != run_format:
        raise RunFolderError(f"{path} is not a run description of format {run_format}")
    source, options, config = saved.get("source"), saved.get("data"), saved.get("config")
    if not isinstance(source, str) or "\0" in source or not (source == "synthetic" or os.path.isabs(source)):
        raise RunFolderError(f"{path}: source must be 'synthetic' or a data file's absolute path, got {_shown(source)}")
    if not isinstance(options, dict) or not isinstance(config, dict):
        raise RunFolderError(f"{path} lacks source, data or config (data and config must be tables)")
    options = {"min_users_per_item": 0, **options}  # a run.json written before the flag existed kept every item
    unknown = (set(options) - set(DATA_OPTION_RULES)) | (set(config) - set(config_fields))
    missing = {"min_items"} - set(options)
    if unknown or missing:
        raise RunFolderError(f"{path} has unknown or missing settings: {', '.join(sorted(map(str, unknown | missing)))}")
    for name, (rule, words) in DATA_OPTION_RULES.items():
        if name in options and not rule(options[name]):
            raise RunFolderError(f"{path}: data.{name} must be {words}, got {_shown(options[name])}")
    if not isinstance(saved.get("split_fingerprint", ""), str):
        raise RunFolderError(f"{path}: split_fingerprint must be a string")
    shards = saved.get("item_shards")
    if shards is not None and not (_is_int(shards) and shards >= 1):
        raise RunFolderError(f"{path}: item_shards must be an integer >= 1 or null, got {_shown(shards)}")
    training = saved.get("training")  # absent in a run.json written before it was saved
    if training is not None:
        if not isinstance(training, dict) or set(training) != set(TRAINING_OPTION_RULES):
            raise RunFolderError(f"{path}: training must be a table of {', '.join(TRAINING_OPTION_RULES)}")
        for name, (rule, words) in TRAINING_OPTION_RULES.items():
            if not rule(training[name]):
                raise RunFolderError(f"{path}: training.{name} must be {words}, got {_shown(training[name])}")
    return source, options, dict(config)

