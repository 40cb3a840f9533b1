"""The `recvae-fast` argument parser: every command's flags, their help and defaults, and the
argparse types that check their values.

The hyperparameter flags are made from TrainConfig's fields (their metadata holds each flag's help,
and where it differs from the field's, its name, its default in words and its choices). They parse
to None when not given, so that --resume can tell them from the run's own settings.

A type's bad value is one line on stderr and exit code 2, as every expected failure of the command:
the types' messages start with FLAG, which the parser replaces by the flag's name.
"""
from __future__ import annotations

import argparse
import math
import os
import typing
from dataclasses import fields

import torch

from .. import __version__
from ..precision import PRECISIONS, check_precision
from ..training import SELECTION_K, TrainConfig
from ..tuning import FINALIST_FOLDS, FINALIST_SEEDS, FINALISTS
from .errors import UsageError

# The embedded synthetic dataset's epochs when --epochs is not given: its validation NDCG@100 peaks
# near epoch 9 of the authors' 50 (then slowly overfits), so 10 epochs keep the main job near a minute
# on a 2-core CPU. Other data: the authors' schedule (TrainConfig).
SYNTHETIC_EPOCHS = 10
EVAL_BATCH_SIZE = 500  # users scored at a time when --eval-batch-size is not given
# --threads above this many per CPU only oversubscribes; tens of thousands abort torch's thread pools.
MAX_THREADS_PER_CPU = 4
NEW_USER = "new"  # the user column of recommend --items' output
FLAG = "{flag}"  # a type's message starts with this; the parser puts the flag's name there

# argparse dest -> TrainConfig field, for every hyperparameter (saved in run.json, reused by --resume).
HYPER_FLAGS = {field.metadata.get("flag", field.name): field.name for field in fields(TrainConfig)}
# The flags whose values have names of their own (--fc1-grad row-sparse): dest -> {flag value: field value}.
FLAG_CHOICES = {dest: dict(field.metadata["choices"]) for field in fields(TrainConfig)
                for dest in [field.metadata.get("flag", field.name)] if "choices" in field.metadata}


def flag_name(dest: str) -> str:
    """The flag of an argparse dest: min_items -> --min-items."""
    return "--" + dest.replace("_", "-")


# ----------------------------------------------------------------------------- types


def int_at_least(minimum: int, words: str | None = None):
    """An argparse type: an integer >= minimum ("must be {words}", default ">= minimum")."""
    def check(text: str) -> int:
        value = int(text)  # a ValueError: argparse's own "invalid int value" message
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{FLAG} must be {words or f'>= {minimum}'}, got {value}")
        return value

    check.__name__ = "int"  # the name argparse's message gives the type
    return check


def finite_float(text: str) -> float:
    """An argparse type: a finite number."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{FLAG} must be a finite number, got {value}")
    return value


finite_float.__name__ = "float"


def metric_cutoffs(text: str) -> tuple[int, ...]:
    """An argparse type: --topk "10,20,50" -> (10, 20, 50, 100), distinct positive cut-offs, ascending,
    with the one that picks the best epoch."""
    try:
        ks = [int(part) for part in text.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) <= 0:
        raise argparse.ArgumentTypeError(f"{FLAG} must be positive integers separated by commas, e.g. 10,20,50,100; "
                                         f"got {text!r}")
    return tuple(sorted(set(ks) | {SELECTION_K}))


def thread_count(text: str) -> int:
    """An argparse type: torch's CPU threads, 1 to MAX_THREADS_PER_CPU per CPU."""
    value = int_at_least(1)(text)
    cpus = os.cpu_count() or 1
    if value > MAX_THREADS_PER_CPU * cpus:
        raise argparse.ArgumentTypeError(f"{FLAG} must be at most {MAX_THREADS_PER_CPU * cpus} ({MAX_THREADS_PER_CPU} "
                                         f"per CPU of the {cpus} here), got {value}")
    return value


thread_count.__name__ = "int"


def precision_name(text: str) -> str:
    """An argparse type: a precision's name (one line listing the choices otherwise)."""
    try:
        return check_precision(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{FLAG}: {exc}") from None


# ----------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose types' messages become a UsageError: one line, exit code 2. argparse's
    own errors (an unknown flag, an invalid int) keep its usage line."""

    def error(self, message: str):
        argument, _, text = message.partition(": ")
        if argument.startswith("argument ") and text.startswith(FLAG):
            raise UsageError(argument.removeprefix("argument ") + text.removeprefix(FLAG))
        super().error(message)


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default. Flags whose parsed default is None ("not given",
    which --resume tells from the run's own settings) state their default in their help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required and action.option_strings:
            return text + " (required)"
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS):
            return text
        if action.default is False:
            return text + " (default: off)"
        return text + " (default: %(default)s)"


def _field_type(name: str):
    """The argparse type of a TrainConfig field: its annotation without None."""
    hint = typing.get_type_hints(TrainConfig)[name]
    return next(arg for arg in typing.get_args(hint) or (hint,) if arg is not type(None))


def _help(field, default_note: str = "", default: str | None = None) -> str:
    """A hyperparameter flag's help: the field's, then its default (in words where the field says)."""
    default = default or field.metadata.get("default_help", field.default)
    return f"{field.metadata['help']} (default: {default}{default_note})"


def add_hyperparameter_flags(p: argparse.ArgumentParser, names=None, default_notes: dict | None = None) -> None:
    """A flag for each TrainConfig field in `names` (default: all), in the fields' order, parsed to
    None when not given; default_notes: field -> words added after its default in the help."""
    for field in fields(TrainConfig):
        if names is not None and field.name not in names:
            continue
        dest, note = field.metadata.get("flag", field.name), (default_notes or {}).get(field.name, "")
        kind = _field_type(field.name)
        if field.name == "precision":
            add_precision_flag(p, _help(field, note))
        elif dest in FLAG_CHOICES:
            p.add_argument(flag_name(dest), choices=sorted(FLAG_CHOICES[dest]), default=None, help=_help(field, note))
        elif kind is bool:
            p.add_argument(flag_name(dest), action="store_true", default=None, help=_help(field, note))
        else:
            p.add_argument(flag_name(dest), type=None if kind is str else kind, default=None, help=_help(field, note))


def add_precision_flag(p: argparse.ArgumentParser, help_text: str | None = None) -> None:
    """--precision, checked by its type (one line listing the choices), not by argparse's choices;
    help_text: train's help with another default (the scoring commands: the run's own)."""
    field = TrainConfig.__dataclass_fields__["precision"]
    p.add_argument("--precision", type=precision_name, default=None, metavar="{" + ",".join(PRECISIONS) + "}",
                   help=help_text or _help(field, default="the run's own"))


def _add_data_options(p: argparse.ArgumentParser, *, detected: str = "detected",
                      threshold_default: str = "keep every interaction, with its value") -> None:
    p.add_argument("--sep", default=None, help=f"field separator of the ratings file (default: {detected})")
    p.add_argument("--user-col", default=None, help=f"user column name (default: {detected})")
    p.add_argument("--item-col", default=None, help=f"item column name (default: {detected})")
    p.add_argument("--rating-col", default=None,
                   help=f"rating column name, or none for a file without one (default: {detected})")
    p.add_argument("--rating-threshold", type=finite_float, default=None,
                   help=f"keep ratings > this, as 1 (the paper uses 3.5) (default: {threshold_default})")
    p.add_argument("--data-seed", type=int_at_least(0), default=None, help="seed of the synthetic dataset (default: 0)")


def _add_evaluation_options(p: argparse.ArgumentParser, *, topk: bool = True) -> None:
    if topk:
        p.add_argument("--topk", type=metric_cutoffs, default=None, metavar="K[,K...]",
                       help="metric cut-offs, e.g. 10,20,50,100: NDCG@k and Recall@k at each k; 100 is always "
                            "added, since validation NDCG@100 picks the best epoch (default: the paper's "
                            "NDCG@100, Recall@20, Recall@50)")
    p.add_argument("--eval-batch-size", type=int_at_least(1), default=None,
                   help=f"users scored at a time (default: {EVAL_BATCH_SIZE})")
    p.add_argument("--threads", type=thread_count, default=None,
                   help=f"CPU threads for torch, torch.set_num_threads (default: torch's choice, "
                        f"{torch.get_num_threads()} on this machine)")


def _add_split_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-items", type=int_at_least(1), default=None,
                   help="drop users with fewer items than this (default: 5)")
    p.add_argument("--min-users-per-item", type=int_at_least(0), default=None,
                   help="first drop items with fewer users than this, then users with fewer than --min-items "
                        "items (default: 0: keep every item)")
    p.add_argument("--heldout-users", type=int_at_least(1), default=None,
                   help="validation users, and as many test users (default: 10%% of the users)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="recvae-fast", description="Train, evaluate and use RecVAE.", formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_command(name: str, help_text: str):
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)

    p = add_command("train", "train on a dataset (default: the embedded synthetic one), then print its test "
                             "metrics next to the popularity baseline's")
    p.add_argument("data", nargs="?", default=None,
                   help="'synthetic' or a ratings file (CSV/TSV/.inter/Parquet) (default: synthetic, or with "
                        "--resume the run's own)")
    p.add_argument("--out", required=True, help="run folder for the model, split, checkpoint and logs")
    _add_data_options(p)
    _add_split_options(p)
    add_hyperparameter_flags(p, default_notes={"n_epochs": f"; {SYNTHETIC_EPOCHS} on the synthetic dataset",
                                               "precision": ", or with --resume the run's own"})
    p.add_argument("--patience", type=int_at_least(1), default=None,
                   help="stop when validation NDCG@100 has not improved for this many epochs (default: off)")
    _add_evaluation_options(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out with its data and settings (--epochs may raise its epochs)")
    p.add_argument("--force", action="store_true",
                   help="with --resume: accept a --patience or --topk other than the run's (its data and "
                        "hyperparameters cannot change)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars; one line per epoch still goes to stderr")
    p.add_argument("--json", action="store_true", help="print summary.json's content instead of the table")
    p.add_argument("--item-shards", type=int_at_least(1), default=None,
                   help="split the model by items over this many processes; launch with torchrun --nproc-per-node "
                        "N -m recvae_fast train ... (S must divide N; N / S is the data-parallel size). "
                        "Default: without torchrun one process, not sharded; under torchrun N (every process "
                        "holds a shard)")

    p = add_command("evaluate", "metrics of a trained run on its saved split (JSON)")
    p.add_argument("run", help="run folder written by train")
    p.add_argument("--split", choices=["test", "valid"], default="test", help="the users to score")
    _add_evaluation_options(p)
    add_precision_flag(p)

    p = add_command("recommend", "top-k items per user to CSV, with original ids: for the users of a file "
                                 "(user,item[,rating]), or for one new user given by --items")
    p.add_argument("run", help="run folder written by train")
    p.add_argument("data", nargs="?", default=None,
                   help="the users' interactions, 'synthetic' or a file of user,item[,rating] rows "
                        "(default: the run's own data)")
    p.add_argument("--items", default=None, metavar="ID[,ID...]",
                   help=f"instead of a file: the item ids of one new user (written as user {NEW_USER!r}); "
                        "ids the run does not know are counted and left out (default: none, the users of the "
                        "data file)")
    _add_data_options(p, detected="the run's for its own file, else detected",
                      threshold_default="the run's; it applies only to a file with a rating column, "
                                        "never to --items or a file of user,item pairs")
    p.add_argument("--k", type=int_at_least(1, "positive"), default=100, help="items per user")
    p.add_argument("--output", required=True, help="CSV file to write (user,item,rank,score); not an input")
    p.add_argument("--include-seen", action="store_true",
                   help="also recommend items the user already has (seen: any rating in the data)")
    p.add_argument("--skip-users-without-items", action="store_true",
                   help="leave out (and count) the users left with no item the model knows, instead of refusing "
                        "the file")
    _add_evaluation_options(p, topk=False)
    add_precision_flag(p)

    p = add_command("report", "report.png (validation metrics and losses per epoch) and report.md in RUN")
    p.add_argument("run", help="run folder written by train")

    p = add_command("export", "the scoring path (fold-in items -> masked top-k) as a torch.export .pt2")
    p.add_argument("run", help="run folder written by train")
    p.add_argument("--output", required=True, help="the .pt2 file to write (its folder must exist)")
    p.add_argument("--k", type=int_at_least(1, "positive"), default=100, help="items returned per user")
    add_precision_flag(p)

    p = add_command("tune", "search hyperparameters with Optuna on one stored split (validation users), then train "
                            "the best trial into a run folder and print its test metrics (pip install -e \".[tune]\")")
    p.add_argument("data", nargs="?", default="synthetic", help="'synthetic' or a ratings file, as for train")
    p.add_argument("--out", required=True, help="study folder: split, study.db, trials.csv, plots, best trial's run")
    p.add_argument("--trials", type=int_at_least(1), default=30,
                   help="finished (complete or pruned) trials the study ends with")
    p.add_argument("--space", default=None, help="JSON/TOML/YAML file overriding the search space (default: "
                                                 "recvae_fast.tuning.DEFAULT_SPACE)")
    p.add_argument("--storage", default=None, help="Optuna RDB URL of the study (default: sqlite:///OUT/study.db)")
    p.add_argument("--study-name", default="recvae", help="the study's name in the storage")
    p.add_argument("--jobs", type=int_at_least(1), default=1,
                   help="worker processes; more may join with the same command")
    p.add_argument("--heartbeat", type=int_at_least(1), default=10,
                   help="seconds between a running trial's heartbeats; a trial silent for twice as long is rerun")
    p.add_argument("--finalists", type=int_at_least(0), default=FINALISTS,
                   help="the best trials, and the trial of train's configuration, trained again on cross-validation "
                        "folds of the non-test users with fresh seeds; the best mean wins; 0: the best single "
                        "search score wins")
    p.add_argument("--finalist-folds", type=int_at_least(1), default=FINALIST_FOLDS,
                   help="cross-validation folds each finalist is trained on (1: the split's own validation users)")
    p.add_argument("--finalist-seeds", type=int_at_least(1), default=FINALIST_SEEDS,
                   help="fresh seeds for each finalist on each fold")
    _add_data_options(p)
    _add_split_options(p)
    # The search space sets the other hyperparameters. A hyperparameter flag of train added here
    # reaches every trial through settings.new_run_settings.
    add_hyperparameter_flags(p, ["seed", "device", "precision"])
    _add_evaluation_options(p, topk=False)
    p.add_argument("--no-progress", action="store_true", help="no progress bars; one line per trial still")
    p.add_argument("--json", action="store_true", help="print tune.json's content instead of the tables")
    # train's other flags, unset: the run folder code of train reads them.
    p.set_defaults(patience=None, topk=None, **{dest: None for dest, name in HYPER_FLAGS.items()
                                                if name not in ("seed", "device", "precision")})
    return parser
