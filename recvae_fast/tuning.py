"""Hyperparameter search on Optuna: `tune(split, out, n_trials)`, which `recvae-fast tune` runs.

Every trial trains on the same strong-generalisation split, stored in `out` once, and is scored by
its best validation NDCG@100 (the test users are never touched here). Each epoch's validation
NDCG@100 goes to the pruner, which stops a trial that trails the median of the finished trials at
the same epoch. The first trial of a new study is the default configuration, where the space holds it.

The study lives in a database (a SQLite file in `out` by default, any Optuna RDB URL otherwise),
so a study that was killed resumes with the same call, and several processes (or machines sharing
a database server) can work on it at once. A running trial records a heartbeat; a trial whose
process died (no heartbeat for a grace period) is marked failed and run again with the same
parameters, so the study still ends with n_trials finished (complete or pruned) trials.

The best of many single-seed validation scores overstates its trial: its seed was lucky, and its
few validation users happened to suit it, as often as its configuration was good. So the search's
winner is not taken as it is: the best few complete trials (the default configuration always among
them) are trained again with fresh seeds on each fold of a cross-validation over the non-test users
(each user is a validation user in one fold), and the one with the best mean validation NDCG@100
over those runs is chosen. Each of those runs is stored in the study (a study user attribute) once
it ends, so a study killed during that stage resumes with the runs still missing.

Optuna is an optional extra (pip install "recvae_fast[tune]"); it is imported when a search
starts, never with the package.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import multiprocessing
import os
import socket
import sys
import time
import tomllib
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .api import fit
from .atomic import atomic_write
from .data import Split, cross_validation_fold
from .runfolder import SPLIT_NAME, RunLock
from .training import SELECTION_K, TrainConfig, check_fit_inputs

STUDY_DB_NAME = "study.db"  # the default storage, a SQLite file in the study folder
TRIALS_NAME = "trials.csv"  # every trial, best first
PLOT_NAMES = {"history": "optimization_history.png", "importances": "param_importances.png",
              "parallel": "parallel_coordinate.png"}
HEARTBEAT_S = 10  # a trial records that it runs this often; silent for twice as long, it counts as dead
LOCK_WAIT_S = 600.0  # how long a process waits for another to finish writing the study folder
OBJECTIVE = f"valid_ndcg@{SELECTION_K}"
SELECTION_MEAN = f"{OBJECTIVE}_selection_mean"  # trials.csv's column of the final selection's means

INT_PARAMS = ("hidden_dim", "latent_dim", "batch_size", "n_epochs", "n_enc_epochs", "n_dec_epochs")
FLOAT_PARAMS = ("lr", "gamma", "beta", "dropout_rate")
# Set on the command line (--seed, --device), never by the space: the split depends on the seed.
NOT_IN_SPACE = ("seed", "device")
SPACE_PARAMS = tuple(name for name in TrainConfig.__dataclass_fields__ if name not in NOT_IN_SPACE)
RANGE_KEYS = {"low", "high", "log", "step"}

# Each parameter: a range {low, high[, log][, step]}, {choices: [...]}, or a fixed value. The
# ranges hold the defaults (TrainConfig), which the first trial of a new study runs.
DEFAULT_SPACE = {
    "gamma": {"low": 5e-4, "high": 5e-2, "log": True},
    "latent_dim": {"low": 50, "high": 400, "log": True},
    "hidden_dim": {"low": 150, "high": 1200, "log": True},
    "lr": {"low": 1e-4, "high": 5e-3, "log": True},
    "dropout_rate": {"low": 0.1, "high": 0.8},
    "n_epochs": {"low": 10, "high": 50},
}
# The final selection's defaults: the best complete trials retrained (the defaults' trial added), on
# each of the cross-validation folds of the non-test users, with each of the fresh training seeds (the
# trial's own seed + 1, + 2, ...).
FINALISTS = 3
FINALIST_FOLDS = 5
FINALIST_SEEDS = 1
# Study user attribute of one finished selection run -> its scores: "finalist:TRIAL:SEED" on the
# study's own split (one fold), "finalist:TRIAL:fold F of K:SEED" on fold F of K.
FINALIST_PREFIX = "finalist:"

# The median pruner's defaults: it prunes once this many trials have completed, and never before a
# trial's fifth epoch (a slow start is not yet a bad trial).
PRUNER_STARTUP_TRIALS = 5
PRUNER_WARMUP_EPOCHS = 5


def import_optuna():
    """Optuna, or an ImportError that says how to install it."""
    try:
        import optuna
    except ImportError as exc:
        raise ImportError(f"tune needs Optuna: pip install \"recvae_fast[tune]\" ({exc})") from None
    return optuna


# ----------------------------------------------------------------------------- the search space


def _check_number(where: str, name: str, value, integer: bool):
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or \
            not math.isfinite(value):
        raise ValueError(f"{where}: {name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    return value


def _parse_param(where: str, name: str, spec) -> dict:
    """One parameter's entry as {"low", "high", "log", "step"}, {"choices"} or {"value"}."""
    if not isinstance(spec, dict):
        if isinstance(spec, list):
            raise ValueError(f"{where}: {name} is a list; give {{\"choices\": [...]}}, a range "
                             "{\"low\": ..., \"high\": ...} or one fixed value")
        return {"value": spec}
    unknown = set(spec) - RANGE_KEYS - {"choices"}
    if unknown:
        raise ValueError(f"{where}: {name} has unknown key(s) {', '.join(sorted(unknown))} (a range takes low, "
                         "high, log, step; or give choices)")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"}:
            raise ValueError(f"{where}: {name}: give choices or a range, not both")
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"{where}: {name}: choices must be a non-empty list, got {choices!r}")
        return {"choices": list(choices)}
    if "low" not in spec or "high" not in spec:
        raise ValueError(f"{where}: {name}: a range needs low and high")
    if name not in INT_PARAMS + FLOAT_PARAMS:
        raise ValueError(f"{where}: {name} cannot take a range; give choices or a fixed value")
    integer = name in INT_PARAMS
    low, high = (_check_number(where, f"{name}.{key}", spec[key], integer) for key in ("low", "high"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ValueError(f"{where}: {name}.log must be true or false, got {log!r}")
    if low > high:
        raise ValueError(f"{where}: {name} has an empty range: low {low} > high {high}")
    if log and low <= 0:
        raise ValueError(f"{where}: {name}: a log range needs low > 0, got {low}")
    parsed = {"low": low, "high": high, "log": log}
    if "step" in spec:
        step = _check_number(where, f"{name}.step", spec["step"], integer)
        if step <= 0 or log:
            raise ValueError(f"{where}: {name}.step must be > 0, and a log range takes no step")
        parsed["step"] = step
    return parsed


def _candidates(spec: dict) -> list:
    """The values of a parameter entry that are checked against TrainConfig: ends of a range, each choice."""
    if "value" in spec:
        return [spec["value"]]
    return list(spec["choices"]) if "choices" in spec else [spec["low"], spec["high"]]


def parse_space(overrides: dict | None = None, where: str = "space") -> dict:
    """DEFAULT_SPACE with `overrides` (name -> range, choices or fixed value) applied, checked.
    Giving beta (and not gamma) drops gamma: the KL weight is then beta's. Every value a range
    ends at, every choice and fixed value must make a valid TrainConfig; otherwise a ValueError
    names `where`, the parameter and the problem."""
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise ValueError(f"{where} must be a table of parameters, got {type(overrides).__name__}")
    for name in overrides:
        if name not in SPACE_PARAMS:
            extra = " (set on the command line or as tune's config)" if name in NOT_IN_SPACE else ""
            raise ValueError(f"{where}: unknown parameter {name!r}{extra}; known: {', '.join(SPACE_PARAMS)}")
    entries = {**DEFAULT_SPACE, **overrides}
    if "beta" in overrides and "gamma" not in overrides:
        entries["gamma"] = None
    space = {name: _parse_param(where, name, spec) for name, spec in entries.items()}
    searched_kl = [name for name in ("gamma", "beta") if name in space and "value" not in space[name]]
    if len(searched_kl) == 2:
        raise ValueError(f"{where}: search gamma or beta, not both (fix the other one, e.g. \"beta\": null)")
    typical = {name: _candidates(spec)[0] for name, spec in space.items()}
    for name, spec in space.items():
        for value in _candidates(spec):
            if name == "not_alternating" and not isinstance(value, bool):
                raise ValueError(f"{where}: not_alternating must be true or false, got {value!r}")
            try:
                TrainConfig(**{**typical, name: value}).validate()
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}: {name} {value!r}: {exc}") from None
    return space


def load_space(path: str | os.PathLike) -> dict:
    """A space file (.json, .toml, or .yaml/.yml) read and checked by parse_space."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"space file not found: {path}")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".json":
            overrides = json.loads(text)
        elif suffix == ".toml":
            overrides = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml  # PyYAML comes with Optuna

            overrides = yaml.safe_load(text)
        else:
            raise ValueError(f"space file {path} must end in .json, .toml, .yaml or .yml")
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"space file {path} is not valid {suffix[1:].upper()}: {exc}") from None
    except ImportError:
        raise ValueError(f"space file {path}: reading YAML needs PyYAML (pip install pyyaml)") from None
    except Exception as exc:  # yaml.YAMLError, without importing yaml for a JSON or TOML file
        if type(exc).__module__.startswith("yaml"):
            raise ValueError(f"space file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
        raise
    return parse_space(overrides, where=f"space file {path}")


def suggest(trial, space: dict) -> dict:
    """The trial's TrainConfig fields: fixed values as given, the others asked of the trial."""
    params = {}
    for name, spec in space.items():
        if "value" in spec:
            params[name] = spec["value"]
        elif "choices" in spec:
            params[name] = trial.suggest_categorical(name, spec["choices"])
        elif name in INT_PARAMS:
            params[name] = trial.suggest_int(name, spec["low"], spec["high"], step=spec.get("step", 1), log=spec["log"])
        else:
            params[name] = trial.suggest_float(name, spec["low"], spec["high"], step=spec.get("step"), log=spec["log"])
    return params


def _default_params(space: dict) -> dict:
    """The default configuration's values of the searched parameters, where the space holds them
    all (None otherwise): the first trial of a new study."""
    defaults = asdict(TrainConfig())
    params = {}
    for name, spec in space.items():
        if "value" in spec:
            continue
        value = defaults[name]
        inside = value in spec["choices"] if "choices" in spec else (
            value is not None and spec["low"] <= value <= spec["high"]
            and ("step" not in spec or (value - spec["low"]) % spec["step"] == 0))
        if not inside:
            return None
        params[name] = value
    return params


# ----------------------------------------------------------------------------- the study


@dataclass
class TuneResult:
    """What `tune` returns. best_config: every TrainConfig field of the best trial, to pass to `fit`."""

    study_name: str
    storage: str  # the URL, without its password
    n_trials: int
    states: dict  # trial state -> count
    best_trial: int
    best_value: float  # its best validation NDCG@100
    best_config: dict
    table: str  # the trials, best first, as printed
    files: dict = field(default_factory=dict)  # what was written: trials.csv, the plots
    notes: list = field(default_factory=list)  # plots that could not be drawn, and why
    wall_time_s: float = 0.0
    # The final selection (empty without one): each finalist's trial, search score, runs (fold, seed,
    # validation NDCG@100) and their mean, best mean first; best_trial is the first.
    finalists: list = field(default_factory=list)
    search_best_trial: int | None = None  # the trial with the best single-seed score of the search
    best_mean: float | None = None  # the chosen trial's mean validation NDCG@100 over the selection's runs

    def record(self) -> dict:
        """The JSON-friendly summary (the table left out)."""
        return {key: value for key, value in asdict(self).items() if key != "table"}


def _hidden_password(url: str) -> str:
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: shown as given, it holds no recognisable password
        return url


def _storage(optuna, url: str, heartbeat_s: int):
    """An Optuna RDBStorage on `url` with heartbeats, failed trials retried once; a ValueError in one
    line when it cannot be opened."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    except Exception as exc:  # SQLAlchemy's many errors (bad URL, missing driver, unreachable server, ...)
        message = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ValueError(f"storage {_hidden_password(url)} cannot be opened: {message}") from None


def _check_study(optuna, storage, study_name: str, identity: dict, where: str) -> None:
    """A ValueError when the study exists with another split, space or config (or was not made here)."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # no such study yet
        return
    attrs = study.user_attrs
    if "split_fingerprint" not in attrs:
        if study.trials:
            raise ValueError(f"study {study_name!r} in {where} was not made by recvae_fast tune; choose another "
                             "study name")
        return
    if attrs["split_fingerprint"] != identity["split_fingerprint"]:
        raise ValueError(f"study {study_name!r} in {where} was run on another split than this one (other data, "
                         "data flags or seed); use another study name or storage")
    differ = [key for key in ("space", "config") if attrs.get(key) != identity[key]]
    if differ:
        raise ValueError(f"study {study_name!r} in {where} was run with another {' and '.join(differ)}; keep them, "
                         "or use another study name")


def _finished(study) -> tuple[int, int]:
    """(complete or pruned trials, running trials) of the study now."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return len(trials) - running, running


@dataclass
class _Search:
    """Everything a worker process needs to work on the study."""

    split: Split
    storage_url: str
    study_name: str
    n_trials: int
    space: dict
    config: dict  # TrainConfig fields the space does not set
    eval_batch_size: int
    heartbeat_s: int
    pruner_startup_trials: int
    pruner_warmup_epochs: int
    sampler_seed: int


def _objective(search: _Search, optuna):
    split = search.split

    def objective(trial) -> float:
        config = {**search.config, **suggest(trial, search.space)}
        trial.set_user_attr("config", config)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")

        def report(record: dict) -> None:
            trial.report(record[OBJECTIVE], record["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {record['epoch']}")

        _, history = fit(split.train, split.valid_in, split.valid_out, progress=False, callback=report,
                         eval_batch_size=search.eval_batch_size, **config)
        best = max(history, key=lambda r: r[OBJECTIVE])
        trial.set_user_attr("best_epoch", best["epoch"])
        return best[OBJECTIVE]

    return objective


def _trial_line(trial, best) -> str:
    from optuna.trial import TrialState

    params = " ".join(f"{k} {_short(v)}" for k, v in trial.params.items())
    if trial.state == TrialState.COMPLETE:
        what = f"valid NDCG@100 {trial.value:.4f}"
    elif trial.state == TrialState.PRUNED:
        last = max(trial.intermediate_values, default=None)
        what = f"pruned after epoch {last}"
        if last is not None:
            what += f" (valid NDCG@100 {trial.intermediate_values[last]:.4f})"
    else:
        what = trial.state.name.lower()
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    best_text = f" | best {best.value:.4f} (trial {best.number})" if best is not None else ""
    return f"trial {trial.number}: {what} | {params} | {seconds:.1f} s{best_text}"


@contextlib.contextmanager
def _quiet(optuna):
    """Optuna's own INFO lines off (a line per trial comes from here instead), restored after."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


def _best_or_none(study):
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def _work(search: _Search, worker: int, progress: bool | str, threads: int | None) -> None:
    """Run trials until the study holds n_trials finished ones: stale trials of dead processes are
    failed and retried; trials running in other live processes are waited for."""
    optuna = import_optuna()
    if threads is not None:
        torch.set_num_threads(threads)
    storage = _storage(optuna, search.storage_url, search.heartbeat_s)
    finished_before = _finished(optuna.load_study(study_name=search.study_name, storage=storage))[0]
    # Distinct streams for each worker and each restart, reproducible for a fresh one-process study.
    sampler = optuna.samplers.TPESampler(seed=search.sampler_seed + 1000 * worker + finished_before)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=search.pruner_startup_trials,
                                         n_warmup_steps=search.pruner_warmup_epochs)
    study = optuna.load_study(study_name=search.study_name, storage=storage, sampler=sampler, pruner=pruner)
    objective = _objective(search, optuna)
    bar = tqdm(total=search.n_trials, initial=min(finished_before, search.n_trials), desc="trials", unit="trial",
               file=sys.stderr, dynamic_ncols=True, disable=progress is not True)

    def after_trial(study, trial) -> None:
        if progress is True:
            bar.n = min(_finished(study)[0], search.n_trials)
            bar.refresh()
            tqdm.write(_trial_line(trial, _best_or_none(study)), file=sys.stderr)
        elif progress == "trials":
            print(_trial_line(trial, _best_or_none(study)), file=sys.stderr, flush=True)

    # Stops this process once the study has n_trials finished or running: others' trials count.
    enough = optuna.study.MaxTrialsCallback(search.n_trials, states=(
        optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING))
    try:
        with _quiet(optuna), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat's
            while True:
                optuna.storages.fail_stale_trials(study)
                finished, running = _finished(study)
                remaining = search.n_trials - finished - running
                if remaining > 0:
                    study.optimize(objective, n_trials=remaining, callbacks=[after_trial, enough])
                elif running:
                    time.sleep(search.heartbeat_s)  # finished by their process, or failed once stale
                else:
                    break
    finally:
        bar.close()

# ----------------------------------------------------------------------------- the final selection


def _finalist_trials(study, finalists: int) -> list:
    """The `finalists` best complete trials by search score (ties: the earlier trial), and the
    defaults' trial when it completed and is not among them."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    chosen = sorted(complete, key=lambda t: (-t.value, t.number))[:finalists]
    defaults = [t for t in complete if t.user_attrs.get("default_config")][:1]
    return chosen + [t for t in defaults if t not in chosen]


def _run_key(trial: int, fold: int | None, n_folds: int, seed: int) -> str:
    where = "" if fold is None else f"fold {fold} of {n_folds}:"
    return f"{FINALIST_PREFIX}{trial}:{where}{seed}"


def _selection_score(job: tuple) -> tuple[int, float, int]:
    """(job index, best validation NDCG@100, its epoch) of one training of a finalist's config, on
    the study's split (fold None) or on a cross-validation fold of its non-test users."""
    index, split, fold, n_folds, fold_seed, config, eval_batch_size, threads = job
    if threads is not None:
        torch.set_num_threads(threads)
    data = split if fold is None else cross_validation_fold(split, fold, n_folds, fold_seed)
    _, history = fit(data.train, data.valid_in, data.valid_out, progress=False, eval_batch_size=eval_batch_size,
                     **config)
    best = max(history, key=lambda r: r[OBJECTIVE])
    return index, best[OBJECTIVE], best["epoch"]


def _select(study, search: _Search, finalists: int, finalist_folds: int, finalist_seeds: int, n_jobs: int,
            threads: int | None, progress: bool | str) -> list:
    """Train each finalist on each of `finalist_folds` cross-validation folds of the non-test users
    (1: the study's own split and validation users) with each of `finalist_seeds` fresh seeds (runs
    stored in the study are reused; each new one is stored when it ends) and return the finalists,
    best mean validation NDCG@100 over those runs first (ties: the earlier trial). The trial's own
    search score is left out of its mean: it is the score it was picked for."""
    candidates = _finalist_trials(study, finalists)
    base_seed = int(search.config.get("seed", 0))
    seeds = [base_seed + i for i in range(1, finalist_seeds + 1)]
    folds = [None] if finalist_folds == 1 else list(range(finalist_folds))
    runs = [(fold, seed) for fold in folds for seed in seeds]
    stored = study.user_attrs
    todo = [(t, fold, seed) for t in candidates for fold, seed in runs
            if _run_key(t.number, fold, finalist_folds, seed) not in stored]
    # The folds' partition follows the study's seed, so every finalist (and a resumed study) sees the same folds.
    jobs = [(i, search.split, fold, finalist_folds, base_seed,
             {**t.user_attrs["config"], "seed": seed, "device": search.config.get("device", "cpu")},
             search.eval_batch_size, threads) for i, (t, fold, seed) in enumerate(todo)]

    def store(result: tuple) -> None:
        index, value, epoch = result
        trial, fold, seed = todo[index]
        study.set_user_attr(_run_key(trial.number, fold, finalist_folds, seed), {OBJECTIVE: value, "best_epoch": epoch})
        if progress:
            where = "" if fold is None else f"fold {fold} of {finalist_folds}, "
            print(f"finalist trial {trial.number}, {where}seed {seed}: {OBJECTIVE.replace('_', ' ')} {value:.4f} "
                  f"(search: {trial.value:.4f})", file=sys.stderr, flush=True)

    if n_jobs > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(n_jobs, len(jobs))) as pool:
            for result in pool.imap_unordered(_selection_score, jobs):
                store(result)
    else:
        for job in jobs:
            store(_selection_score(job))
    stored = study.user_attrs  # as stored now, this process's runs and any other's
    rows = []
    for t in candidates:
        scores = [{"fold": fold, "seed": seed,
                   OBJECTIVE: stored[_run_key(t.number, fold, finalist_folds, seed)][OBJECTIVE]} for fold, seed in runs]
        rows.append({"trial": t.number, OBJECTIVE: t.value, "default_config": bool(t.user_attrs.get("default_config")),
                     "runs": scores, "mean": sum(r[OBJECTIVE] for r in scores) / len(scores)})
    return sorted(rows, key=lambda row: (-row["mean"], row["trial"]))


def _write_table(study, space: dict, path: Path, finalists: list) -> str:
    """trials.csv (every trial, best first: the finalists by their mean over the selection's runs,
    then the others by their search score) and the same as a text table."""
    from optuna.trial import TrialState

    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2, TrialState.WAITING: 3,
             TrialState.FAIL: 4}
    searched = [name for name, spec in space.items() if "value" not in spec]

    means = {f["trial"]: f["mean"] for f in finalists}
    chosen = finalists[0]["trial"] if finalists else None

    def key(t):
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else -1.0
        return (t.number not in means, -means.get(t.number, 0.0), order[t.state],
                -(t.value if t.state == TrialState.COMPLETE else last), t.number)

    header = ["trial", "state", OBJECTIVE, "epochs", "seconds", *searched, SELECTION_MEAN, "note"]
    trials = study.get_trials(deepcopy=False)
    rerun = {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}
    rows = []
    for t in sorted(trials, key=key):
        epochs = t.user_attrs.get("config", {}).get("n_epochs")
        reported = max(t.intermediate_values, default=0)
        note = f"rerun of trial {t.system_attrs['failed_trial']}" if "failed_trial" in t.system_attrs else ""
        if t.state == TrialState.FAIL:
            note = "process died or failed; rerun" if t.number in rerun else "failed"
        elif t.user_attrs.get("default_config"):
            note = "the defaults"
        if t.number in means:
            note = "; ".join(filter(None, ["chosen" if t.number == chosen else "finalist", note]))
        rows.append([t.number, t.state.name.lower(), f"{t.value:.4f}" if t.value is not None else "",
                     f"{reported}/{epochs}" if epochs else str(reported),
                     f"{t.duration.total_seconds():.1f}" if t.duration else "",
                     *(_short(t.params[name]) if name in t.params else "" for name in searched),
                     f"{means[t.number]:.4f}" if t.number in means else "", note])

    def write(f):
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        csv.writer(text).writerows([header, *rows])
        text.flush()
        text.detach()

    atomic_write(path, write)
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _write_plots(optuna, study, out: Path) -> tuple[dict, list]:
    """The optimisation history, parameter importances and parallel coordinates as PNG files
    (Optuna's matplotlib plots); returns (name -> path, notes on plots that could not be drawn)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as plots
    except ImportError as exc:
        return {}, [f"no plots: matplotlib is missing ({exc}); pip install \"recvae_fast[tune]\""]
    drawers = {"history": plots.plot_optimization_history, "importances": plots.plot_param_importances,
               "parallel": plots.plot_parallel_coordinate}
    files, notes = {}, []
    for name, draw in drawers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks these plots experimental
                axes = draw(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. too few complete trials
            notes.append(f"no {name} plot: {' '.join(str(exc).split())}")
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.set_size_inches(max(figure.get_size_inches()[0], 8), max(figure.get_size_inches()[1], 5))
        figure.tight_layout()
        path = out / PLOT_NAMES[name]
        atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100))
        plt.close(figure)
        files[name] = str(path)
    return files, notes


def tune(split: Split, out: str | os.PathLike, n_trials: int = 30, *, space: dict | str | os.PathLike | None = None,
         config: dict | None = None, storage: str | None = None, study_name: str = "recvae", n_jobs: int = 1,
         eval_batch_size: int = 500, progress: bool | str = True, heartbeat_s: int = HEARTBEAT_S,
         pruner_startup_trials: int = PRUNER_STARTUP_TRIALS, pruner_warmup_epochs: int = PRUNER_WARMUP_EPOCHS,
         finalists: int = FINALISTS, finalist_folds: int = FINALIST_FOLDS,
         finalist_seeds: int = FINALIST_SEEDS) -> TuneResult:
    """Search RecVAE's hyperparameters on `split` (a data.Split) until the study holds n_trials
    finished (complete or pruned) trials; return the best one (TuneResult.best_config: pass it to
    `fit`, then evaluate on the test users once).

    space: overrides of DEFAULT_SPACE (a dict, or a .json/.toml/.yaml file): name -> {low, high,
    log, step}, {choices} or a fixed value. config: the TrainConfig fields the space does not set
    (seed: every trial's training seed, device, ...). The study (`study_name` in `storage`, an
    Optuna RDB URL; default SQLite `out`/study.db) is created or continued; one made on another
    split, space or config is refused. `out` receives the split (once; another split there is
    refused), trials.csv (every trial, best first) and the plots. n_jobs: worker processes
    (each trains on torch.get_num_threads() // n_jobs threads); more can join from elsewhere by
    calling tune on the same storage. progress: True, a bar over the trials and a line per trial
    (stderr); "trials", the lines only; False, nothing. heartbeat_s: a running trial records a
    heartbeat this often, and counts as dead after twice as long without one. Every input is
    checked before anything is written.

    finalists, finalist_folds, finalist_seeds: the final selection. The `finalists` best complete
    trials, and the defaults' trial, are each trained again on each of `finalist_folds` folds of a
    cross-validation over the split's training and validation users (data.cross_validation_fold,
    its partition seeded by the config's seed; 1: the split itself, its validation users) with each
    of `finalist_seeds` fresh seeds (the config's seed + 1, + 2, ...); the best mean validation
    NDCG@100 over those runs wins (TuneResult.finalists). finalists=0: no such stage, the best
    single-seed search score wins.
    """
    t0 = time.perf_counter()
    optuna = import_optuna()
    for name, value, least in (("n_trials", n_trials, 1), ("n_jobs", n_jobs, 1), ("heartbeat_s", heartbeat_s, 1),
                               ("pruner_startup_trials", pruner_startup_trials, 0),
                               ("pruner_warmup_epochs", pruner_warmup_epochs, 0), ("finalists", finalists, 0),
                               ("finalist_folds", finalist_folds, 1), ("finalist_seeds", finalist_seeds, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if progress not in (True, False, "trials"):
        raise ValueError(f"progress must be True, False or 'trials', got {progress!r}")
    if not isinstance(study_name, str) or not study_name:
        raise ValueError(f"study_name must be a non-empty string, got {study_name!r}")
    space = load_space(space) if isinstance(space, (str, os.PathLike)) else parse_space(space)
    config = {**{k: v for k, v in asdict(TrainConfig()).items() if k not in space}, **(config or {})}
    unknown = set(config) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"config: unknown TrainConfig field(s) {', '.join(sorted(unknown))}")
    config = {k: v for k, v in config.items() if k not in space}
    check_fit_inputs(split.train, split.valid_in, split.valid_out, eval_batch_size=eval_batch_size,
                     **{**config, **{name: _candidates(spec)[0] for name, spec in space.items()}})
    n_pool = split.train.shape[0] + split.valid_in.shape[0]  # the users the folds are cut from
    if finalists and finalist_folds > 1 and finalist_folds > n_pool // 2:
        raise ValueError(f"too many cross-validation folds for the final selection: {finalist_folds}, at most "
                         f"{n_pool // 2} (half of the {n_pool} training and validation users)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    split_fp = split.fingerprint()
    if (out / SPLIT_NAME).is_file() and Split.load(out).fingerprint() != split_fp:
        raise ValueError(f"{out} holds another split (other data, data flags or seed); use another folder")
    url = storage or f"sqlite:///{(out / STUDY_DB_NAME).resolve()}"
    shown = _hidden_password(url)
    # As stored in the study (JSON); any device may work on a study.
    identity = json.loads(json.dumps({"split_fingerprint": split_fp, "space": space,
                                      "config": {k: v for k, v in config.items() if k != "device"}}))
    if storage is not None or (out / STUDY_DB_NAME).is_file():  # else nothing to check yet, nor to create
        _check_study(optuna, _storage(optuna, url, heartbeat_s), study_name, identity, shown)

    # Everything is checked: write the split, create (or continue) the study.
    with RunLock(out, wait_s=LOCK_WAIT_S):
        if not (out / SPLIT_NAME).is_file():
            split.save(out)
        rdb = _storage(optuna, url, heartbeat_s)
        _check_study(optuna, rdb, study_name, identity, shown)
        with _quiet(optuna):
            study = optuna.create_study(study_name=study_name, storage=rdb, direction="maximize", load_if_exists=True)
        if "split_fingerprint" not in study.user_attrs:
            for key, value in identity.items():
                study.set_user_attr(key, value)
            defaults = _default_params(space)
            if defaults is not None:
                study.enqueue_trial(defaults, user_attrs={"default_config": True})
    search = _Search(split, url, study_name, n_trials, space, config, eval_batch_size, heartbeat_s,
                     pruner_startup_trials, pruner_warmup_epochs, sampler_seed=int(config.get("seed", 0)))
    threads = max(1, torch.get_num_threads() // n_jobs) if n_jobs > 1 else None
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch threads
    helpers = [context.Process(target=_work, args=(search, worker, progress and "trials", threads))
               for worker in range(1, n_jobs)]
    for process in helpers:
        process.start()
    try:
        _work(search, 0, progress, threads)
    finally:
        for process in helpers:
            process.join()
    failed = [p.exitcode for p in helpers if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} worker process(es) failed (exit codes {failed}); see their errors above")

    study = optuna.load_study(study_name=study_name, storage=_storage(optuna, url, heartbeat_s))
    search_best = _best_or_none(study)
    if search_best is None:
        raise ValueError(f"study {study_name!r} has no complete trial (every trial was pruned or failed)")
    chosen = _select(study, search, finalists, finalist_folds, finalist_seeds, n_jobs, threads, progress) \
        if finalists else []
    best = study.trials[chosen[0]["trial"]] if chosen else search_best
    with RunLock(out, wait_s=LOCK_WAIT_S):
        table = _write_table(study, space, out / TRIALS_NAME, chosen)
        plots, notes = _write_plots(optuna, study, out)
    states = {}
    for trial in study.get_trials(deepcopy=False):
        states[trial.state.name.lower()] = states.get(trial.state.name.lower(), 0) + 1
    best_config = {**best.user_attrs["config"], "device": config.get("device", TrainConfig().device)}
    return TuneResult(study_name, shown, n_trials, states, best.number, best.value, best_config, table,
                      {"trials": str(out / TRIALS_NAME), **plots}, notes, time.perf_counter() - t0, chosen,
                      search_best.number, chosen[0]["mean"] if chosen else None)
