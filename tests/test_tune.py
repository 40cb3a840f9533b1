"""`recvae-fast tune` and recvae_fast.tune on a tiny ratings file: the space file's checks, the
study in SQLite (resumed after a SIGKILL mid-trial, shared by two processes), pruning, and the best
trial's run folder."""
from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

optuna = pytest.importorskip("optuna")

from recvae_fast import data  # noqa: E402
from recvae_fast.cli import main  # noqa: E402
from recvae_fast.tuning import load_space, parse_space, tune  # noqa: E402

from helpers import write_taste_ratings  # noqa: E402

# Tiny models and few epochs: a trial takes well under a second.
TINY_SPACE = {"latent_dim": {"low": 4, "high": 12}, "hidden_dim": {"low": 8, "high": 24},
              "n_epochs": {"low": 2, "high": 4}, "batch_size": 64}
# One torch thread: the trials of a tiny model are fastest so, on a shared machine too.
TINY = ["--heldout-users", "40", "--rating-threshold", "3.5", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def ratings_file(tmp_path_factory):
    """300 users in three taste groups of 60 items; integer ids, ratings 3-5."""
    return write_taste_ratings(tmp_path_factory.mktemp("data") / "ratings.csv")


def _space_file(folder, space: dict, name="space.json"):
    path = folder / name
    path.write_text(json.dumps(space))
    return path


def _load(out, study_name="recvae"):
    return optuna.load_study(study_name=study_name, storage=f"sqlite:///{out / 'study.db'}")


def _states(study) -> dict:
    states = {}
    for t in study.get_trials():
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return states


def _tune_command(ratings_file, out, space, trials, *extra):
    return [sys.executable, "-m", "recvae_fast", "tune", str(ratings_file), "--out", str(out), "--trials",
            str(trials), "--space", str(space), *TINY, *extra]


def test_importing_the_package_does_not_import_optuna():
    code = "import sys, recvae_fast\nprint(callable(recvae_fast.tune), 'optuna' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]


# ----------------------------------------------------------------------------- a study, end to end


@pytest.fixture(scope="module")
def study_dir(ratings_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    space = _space_file(folder, TINY_SPACE)
    out = folder / "out"
    assert main(["tune", str(ratings_file), "--out", str(out), "--trials", "5", "--space", str(space), *TINY]) == 0
    return out


def test_tune_writes_the_study_the_table_plots_and_the_best_run(study_dir, capsys):
    study = _load(study_dir)
    assert sum(t.state.is_finished() for t in study.trials) == 5
    record = json.loads((study_dir / "tune.json").read_text())
    # The chosen trial: the finalist with the best mean over its runs (five cross-validation folds by default).
    assert [(r["fold"], r["seed"]) for r in record["finalists"][0]["runs"]] == [(fold, 1) for fold in range(5)]
    assert record["search_best_trial"] == study.best_trial.number
    assert record["best_trial"] == record["finalists"][0]["trial"]
    assert record["best_mean"] == pytest.approx(record["finalists"][0]["mean"])
    chosen = study.trials[record["best_trial"]]
    assert record["best_value"] == pytest.approx(chosen.value)
    # The table: every trial, best first (the finalists by their mean, then the others).
    with open(study_dir / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(study.trials)
    assert int(rows[0]["trial"]) == chosen.number and rows[0]["note"] == "chosen"
    finalists = rows[:len(record["finalists"])]
    assert [int(r["trial"]) for r in finalists] == [f["trial"] for f in record["finalists"]]
    assert [float(r["valid_ndcg@100_selection_mean"]) for r in finalists] == \
        [round(f["mean"], 4) for f in record["finalists"]]
    values = [float(r["valid_ndcg@100"]) for r in rows[len(finalists):] if r["state"] == "complete"]
    assert values == sorted(values, reverse=True)
    assert not any(r["valid_ndcg@100_selection_mean"] for r in rows[len(finalists):])
    for name in ("optimization_history.png", "param_importances.png", "parallel_coordinate.png"):
        assert (study_dir / name).stat().st_size > 1000, name
    # The best trial's run folder is a normal run folder, trained with the trial's settings.
    best = study_dir / f"trial-{record['best_trial']}"
    run = json.loads((best / "run.json").read_text())
    assert {k: run["config"][k] for k in chosen.params} == chosen.params
    assert data.Split.load(best).fingerprint() == data.Split.load(study_dir).fingerprint()
    summary = json.loads((best / "summary.json").read_text())
    assert summary["test"] == record["test"]
    # Its retrained best epoch scores what the trial scored on the validation users.
    history = [json.loads(line) for line in (best / "metrics.jsonl").read_text().splitlines()]
    assert max(r["valid_ndcg@100"] for r in history) == pytest.approx(chosen.value, rel=1e-4)


def test_best_run_folder_works_with_evaluate_and_recommend(study_dir, ratings_file, tmp_path, capsys):
    best = study_dir / f"trial-{json.loads((study_dir / 'tune.json').read_text())['best_trial']}"
    capsys.readouterr()
    assert main(["evaluate", str(best)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["test"]["ndcg@100"] == pytest.approx(json.loads((best / "summary.json").read_text())
                                                        ["test"]["ndcg@100"])
    output = tmp_path / "recs.csv"
    assert main(["recommend", str(best), "--k", "5", "--output", str(output)]) == 0
    with open(output) as f:
        rows = list(csv.DictReader(f))
    users = {r["user"] for r in rows}
    assert len(users) == 300 and len(rows) == 5 * 300
    seen = {}
    with open(ratings_file) as f:
        for r in csv.DictReader(f):
            seen.setdefault(r["userId"], set()).add(r["movieId"])
    assert not any(r["item"] in seen[r["user"]] for r in rows)


def test_the_same_command_again_adds_no_trial(study_dir, ratings_file, capsys):
    before = len(_load(study_dir).trials)
    space = study_dir.parent / "space.json"
    assert main(["tune", str(ratings_file), "--out", str(study_dir), "--trials", "5", "--space", str(space),
                 *TINY]) == 0
    assert len(_load(study_dir).trials) == before
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["trial", "state", "valid_ndcg@100"]
    record = json.loads((study_dir / "tune.json").read_text())
    assert (f"chosen: trial {record['best_trial']}, mean valid NDCG@100 {record['best_mean']:.4f} over the final "
            f"selection's runs (search {record['best_value']:.4f}); its run folder") in out, out


def test_without_a_final_selection_the_best_search_score_chooses(ratings_file, tmp_path, capsys):
    out = tmp_path / "out"
    space = _space_file(tmp_path, TINY_SPACE)
    assert main(["tune", str(ratings_file), "--out", str(out), "--trials", "3", "--space", str(space),
                 "--finalists", "0", *TINY]) == 0
    record = json.loads((out / "tune.json").read_text())
    assert record["finalists"] == [] and record["best_mean"] is None
    assert record["best_trial"] == record["search_best_trial"] == _load(out).best_trial.number
    assert not [key for key in _load(out).user_attrs if key.startswith("finalist:")]
    assert (f"chosen: trial {record['best_trial']}, valid NDCG@100 {record['best_value']:.4f}; its run folder"
            in capsys.readouterr().out)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("space, message", [
    ({"gama": {"low": 0.001, "high": 0.01}}, "unknown parameter 'gama'"),
    ({"lr": {"low": 0.01, "high": 0.001}}, "lr has an empty range: low 0.01 > high 0.001"),
    ({"latent_dim": {"low": 4.5, "high": 16}}, "latent_dim.low must be an integer"),
    ({"lr": {"low": "small", "high": 0.01}}, "lr.low must be a number"),
    ({"dropout_rate": {"low": 0.2, "high": 1.0}}, "dropout_rate 1.0: dropout_rate must be in [0, 1)"),
    ({"gamma": {"low": 0, "high": 0.01, "log": True}}, "a log range needs low > 0"),
    ({"hidden_dim": {"low": 8, "hi": 24}}, "unknown key(s) hi"),
    ({"beta": {"low": 0.1, "high": 0.5}, "gamma": {"low": 0.001, "high": 0.01}}, "search gamma or beta, not both"),
    ({"seed": 3}, "unknown parameter 'seed' (set on the command line"),
    ({"latent_dim": {"choices": []}}, "choices must be a non-empty list"),
    ([1, 2], "must be a table of parameters"),
])
def test_bad_space_file_is_one_line_and_writes_nothing(space, message, ratings_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["tune", str(ratings_file), "--out", str(out), "--space", str(_space_file(tmp_path, space)), *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_toml_and_yaml_space_files_read_as_json(tmp_path):
    (tmp_path / "s.toml").write_text('beta = {low = 0.1, high = 0.5, log = true}\nlatent_dim = {choices = [8, 16]}\n'
                                     'n_epochs = 3\n')
    (tmp_path / "s.yaml").write_text("beta: {low: 0.1, high: 0.5, log: true}\nlatent_dim: {choices: [8, 16]}\n"
                                     "n_epochs: 3\n")
    space = load_space(_space_file(tmp_path, {"beta": {"low": 0.1, "high": 0.5, "log": True},
                                              "latent_dim": {"choices": [8, 16]}, "n_epochs": 3}))
    assert load_space(tmp_path / "s.toml") == space == load_space(tmp_path / "s.yaml")
    assert space["gamma"] == {"value": None}  # beta searched: gamma dropped
    assert space["n_epochs"] == {"value": 3}
    (tmp_path / "bad.toml").write_text("lr = {low = \n")
    with pytest.raises(ValueError, match="is not valid TOML"):
        load_space(tmp_path / "bad.toml")
    with pytest.raises(ValueError, match="must end in .json, .toml"):
        load_space(_space_file(tmp_path, {}, name="space.txt"))


def test_default_space_holds_the_defaults():
    from recvae_fast.tuning import _default_params

    params = _default_params(parse_space())
    assert params == {"gamma": 0.005, "latent_dim": 200, "hidden_dim": 600, "lr": 5e-4, "dropout_rate": 0.5,
                      "n_epochs": 50}


@pytest.mark.parametrize("storage", ["sqlite:////nonexistent-folder/sub/study.db", "nosuchdb://host/x"])
def test_storage_that_cannot_be_opened(storage, ratings_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["tune", str(ratings_file), "--out", str(out), "--storage", storage,
                 "--space", str(_space_file(tmp_path, TINY_SPACE)), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be opened" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_study_or_folder_with_another_split_is_refused(study_dir, ratings_file, tmp_path, capsys):
    space = str(study_dir.parent / "space.json")
    # The study folder's own split, made from other flags:
    code = main(["tune", str(ratings_file), "--out", str(study_dir), "--space", space, "--trials", "5",
                 *TINY, "--heldout-users", "30"])
    err = capsys.readouterr().err
    assert code == 2 and "holds another split" in err and len(err.strip().splitlines()) == 1, err
    # The study (shared storage) with another split than this new folder's:
    out = tmp_path / "other"
    code = main(["tune", str(ratings_file), "--out", str(out), "--space", space, "--trials", "5", *TINY,
                 "--storage", f"sqlite:///{study_dir / 'study.db'}", "--seed", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "was run on another split" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    # ... and with another search space:
    code = main(["tune", str(ratings_file), "--out", str(study_dir), "--trials", "5", *TINY,
                 "--space", str(_space_file(tmp_path, {**TINY_SPACE, "batch_size": 32}))])
    err = capsys.readouterr().err
    assert code == 2 and "was run with another space" in err, err


def test_without_optuna_tune_says_how_to_install_it(ratings_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    code = main(["tune", str(ratings_file), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and 'pip install "recvae_fast[tune]"' in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_bad_counts(ratings_file, tmp_path, capsys):
    for flag, value, message in (("--trials", "0", ">= 1"), ("--jobs", "0", ">= 1"), ("--heartbeat", "0", ">= 1"),
                                 ("--finalist-seeds", "0", ">= 1"), ("--finalists", "-1", ">= 0"),
                                 ("--finalist-folds", "0", ">= 1")):
        assert main(["tune", str(ratings_file), "--out", str(tmp_path / "out"), flag, value]) == 2
        err = capsys.readouterr().err
        assert f"{flag} must be {message}, got {value}" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as exited:  # argparse's own refusal
        main(["tune", str(ratings_file), "--out", str(tmp_path / "out"), "--finalists", "two"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--finalists: invalid int value: 'two'" in err, err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- pruning


def test_the_pruner_stops_trials_that_trail(ratings_file, tmp_path, monkeypatch):
    """Learning rates from 1e-6 (nothing learnt in a few epochs) to 1e-2: with the pruner active
    after two completed trials and from the second epoch, the trials that trail are stopped early."""
    inter = data.preprocess(data.load_interactions(str(ratings_file), rating_threshold=3.5), min_items_per_user=5)
    split = data.split_strong_generalization(inter, n_heldout_users=40, seed=0)
    space = {**TINY_SPACE, "n_epochs": 6, "lr": {"low": 1e-6, "high": 1e-2, "log": True}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = tune(split, tmp_path, 10, space=space, progress=False, pruner_startup_trials=2,
                      pruner_warmup_epochs=1, finalists=0)
    finally:
        torch.set_num_threads(threads)
    study = _load(tmp_path)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert pruned and len(pruned) + len(complete) == 10
    for t in pruned:  # stopped before its last epoch, below the median of the complete trials there
        last = max(t.intermediate_values)
        assert last < 6
        earlier = [c.intermediate_values[last] for c in complete if c.number < t.number]
        assert t.intermediate_values[last] < np.median(earlier)
    assert result.states == {"complete": len(complete), "pruned": len(pruned)}
    assert result.best_value == max(c.value for c in complete)  # finalists=0: the search's best wins
    assert result.finalists == [] and result.best_trial == result.search_best_trial == study.best_trial.number


# ----------------------------------------------------------------------------- the final selection

# Small fixed sizes; lr and gamma searched around their defaults: the space holds the default
# configuration (its lr and gamma), which the study's first trial runs.
DEFAULTS_SPACE = {"latent_dim": 8, "hidden_dim": 16, "n_epochs": 3, "batch_size": 64,
                  "lr": {"low": 1e-4, "high": 1e-2, "log": True}, "gamma": {"low": 1e-3, "high": 5e-2, "log": True},
                  "dropout_rate": 0.5}


@pytest.fixture(scope="module")
def tiny_split(ratings_file):
    inter = data.preprocess(data.load_interactions(str(ratings_file), rating_threshold=3.5), min_items_per_user=5)
    return data.split_strong_generalization(inter, n_heldout_users=40, seed=0)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _valid_score(split, config: dict) -> float:
    from recvae_fast import fit

    _, history = fit(split.train, split.valid_in, split.valid_out, progress=False, **config)
    return max(r["valid_ndcg@100"] for r in history)


def test_finalists_are_the_best_trials_and_the_defaults_retrained_with_fresh_seeds(tiny_split, tmp_path,
                                                                                   one_thread):
    result = tune(tiny_split, tmp_path, 6, space=DEFAULTS_SPACE, config={"seed": 5}, progress=False,
                  finalists=2, finalist_folds=1, finalist_seeds=2)
    study = _load(tmp_path)
    complete = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
                      key=lambda t: -t.value)
    defaults = study.trials[0]
    assert defaults.user_attrs["default_config"] and defaults.params == {"lr": 5e-4, "gamma": 0.005}
    expected = {t.number for t in complete[:2]} | {defaults.number}
    assert {f["trial"] for f in result.finalists} == expected
    for finalist in result.finalists:
        trial = study.trials[finalist["trial"]]
        # fresh seeds (the study's is 5), on the study's own split (one fold)
        assert [(r["fold"], r["seed"]) for r in finalist["runs"]] == [(None, 6), (None, 7)]
        assert finalist["valid_ndcg@100"] == trial.value
        assert finalist["default_config"] == (trial.number == defaults.number)
        assert finalist["mean"] == pytest.approx(np.mean([r["valid_ndcg@100"] for r in finalist["runs"]]))
        for run in finalist["runs"]:
            assert study.user_attrs[f"finalist:{trial.number}:{run['seed']}"]["valid_ndcg@100"] == run["valid_ndcg@100"]
    # Each score is a training of the trial's configuration with that seed (checked for one run).
    last = result.finalists[-1]
    config = {**study.trials[last["trial"]].user_attrs["config"], "seed": 7}
    assert _valid_score(tiny_split, config) == pytest.approx(last["runs"][1]["valid_ndcg@100"], rel=1e-5)
    # The best mean wins; its configuration (with the study's seed) is the result.
    means = [f["mean"] for f in result.finalists]
    assert means == sorted(means, reverse=True)
    assert result.best_trial == result.finalists[0]["trial"] and result.best_mean == means[0]
    assert result.search_best_trial == complete[0].number
    assert result.best_config == {**study.trials[result.best_trial].user_attrs["config"], "device": "cpu"}
    assert result.best_config["seed"] == 5


def test_finalists_are_scored_on_cross_validation_folds_of_the_non_test_users(tiny_split, tmp_path, one_thread):
    result = tune(tiny_split, tmp_path, 4, space=DEFAULTS_SPACE, config={"seed": 5}, progress=False,
                  finalists=1, finalist_folds=3, finalist_seeds=1)
    study = _load(tmp_path)
    assert result.finalists and all(len(f["runs"]) == 3 for f in result.finalists)
    for finalist in result.finalists:
        assert [(r["fold"], r["seed"]) for r in finalist["runs"]] == [(0, 6), (1, 6), (2, 6)]
        assert finalist["mean"] == pytest.approx(np.mean([r["valid_ndcg@100"] for r in finalist["runs"]]))
        for run in finalist["runs"]:
            key = f"finalist:{finalist['trial']}:fold {run['fold']} of 3:6"
            assert study.user_attrs[key]["valid_ndcg@100"] == run["valid_ndcg@100"]
    # A score is a training on that fold (its partition seeded by the study's seed) with that seed.
    last = result.finalists[-1]
    fold = data.cross_validation_fold(tiny_split, 2, 3, 5)
    config = {**study.trials[last["trial"]].user_attrs["config"], "seed": 6}
    assert _valid_score(fold, config) == pytest.approx(last["runs"][2]["valid_ndcg@100"], rel=1e-5)
    # Folds that differ from the study's split: other validation users, so other scores.
    assert _valid_score(tiny_split, config) != pytest.approx(last["runs"][2]["valid_ndcg@100"], rel=1e-5)
    # The choice is the best mean over the folds.
    means = [f["mean"] for f in result.finalists]
    assert means == sorted(means, reverse=True)
    assert result.best_trial == result.finalists[0]["trial"] and result.best_mean == means[0]


def test_a_final_selection_cut_short_resumes_with_the_missing_runs(tiny_split, tmp_path, one_thread, monkeypatch):
    """A process that dies during the final selection leaves the runs it finished in the study; the
    same call again trains only the others, and ends as an uninterrupted selection would."""
    from recvae_fast import tuning

    real = tuning._selection_score
    calls = []
    selection = {"finalists": 2, "finalist_folds": 2, "finalist_seeds": 2}  # four runs per finalist

    def dies_after_two(job):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill: nothing after this run is stored
        calls.append(job[2])
        return real(job)

    monkeypatch.setattr(tuning, "_selection_score", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        tune(tiny_split, tmp_path / "a", 5, space=DEFAULTS_SPACE, progress=False, **selection)
    stored = [key for key in _load(tmp_path / "a").user_attrs if key.startswith("finalist:")]
    assert len(stored) == 2
    monkeypatch.setattr(tuning, "_selection_score", lambda job: calls.append(job[2]) or real(job))
    resumed = tune(tiny_split, tmp_path / "a", 5, space=DEFAULTS_SPACE, progress=False, **selection)
    n_finalists = len(resumed.finalists)
    assert n_finalists in (2, 3) and len(calls) == 4 * n_finalists  # two before the kill, the rest after
    assert len(_load(tmp_path / "a").trials) == 5  # no trial added
    monkeypatch.setattr(tuning, "_selection_score", real)
    whole = tune(tiny_split, tmp_path / "b", 5, space=DEFAULTS_SPACE, progress=False, **selection)
    assert [f["trial"] for f in whole.finalists] == [f["trial"] for f in resumed.finalists]
    for a, b in zip(whole.finalists, resumed.finalists):
        assert [(r["fold"], r["seed"]) for r in a["runs"]] == [(0, 1), (0, 2), (1, 1), (1, 2)]
        assert [(r["fold"], r["seed"]) for r in b["runs"]] == [(0, 1), (0, 2), (1, 1), (1, 2)]
        assert [r["valid_ndcg@100"] for r in a["runs"]] == pytest.approx([r["valid_ndcg@100"] for r in b["runs"]],
                                                                          rel=1e-5)
    assert whole.best_trial == resumed.best_trial


@pytest.mark.parametrize("name, value", [("finalists", -1), ("finalists", 1.5), ("finalists", True),
                                         ("finalist_seeds", 0), ("finalist_seeds", "3"), ("finalist_folds", 0),
                                         ("finalist_folds", 2.0)])
def test_bad_finalist_counts_are_refused_before_anything_is_written(name, value, tiny_split, tmp_path):
    with pytest.raises(ValueError, match=f"^{name} must be an integer >= {0 if name == 'finalists' else 1}, got"):
        tune(tiny_split, tmp_path / "out", 3, space=TINY_SPACE, progress=False, **{name: value})
    assert not (tmp_path / "out").exists()


def test_more_folds_than_half_the_users_are_refused_before_anything_is_written(tiny_split, tmp_path, ratings_file,
                                                                               capsys):
    n_pool = tiny_split.train.shape[0] + tiny_split.valid_in.shape[0]
    with pytest.raises(ValueError, match=rf"^too many cross-validation folds for the final selection: "
                                         rf"{n_pool // 2 + 1}, at most {n_pool // 2} \(half of the {n_pool} "):
        tune(tiny_split, tmp_path / "out", 3, space=TINY_SPACE, progress=False, finalist_folds=n_pool // 2 + 1)
    assert not (tmp_path / "out").exists()
    assert main(["tune", str(ratings_file), "--out", str(tmp_path / "out"), "--finalist-folds", "100000", *TINY]) == 2
    err = capsys.readouterr().err
    assert "too many cross-validation folds for the final selection: 100000" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- kills and several processes


def _running_trial(out):
    """The number of a trial that runs and has reported at least one epoch, or None. The study file is
    read read-only: a reader that opened it through Optuna would create the schema itself, racing the
    tune process that is creating it."""
    try:
        with sqlite3.connect(f"file:{out / 'study.db'}?mode=ro", uri=True, timeout=60) as db:
            row = db.execute("SELECT number FROM trials WHERE state = 'RUNNING' AND EXISTS (SELECT 1 FROM "
                             "trial_intermediate_values v WHERE v.trial_id = trials.trial_id) "
                             "ORDER BY number LIMIT 1").fetchone()
    except sqlite3.OperationalError:  # no file or no tables yet
        return None
    return None if row is None else row[0]


def _wait_for_running_trial(process, out, stderr_path, timeout=120.0):
    """The number of a trial that runs and has reported at least one epoch; an AssertionError with
    the tune process's errors when it ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        number = _running_trial(out)
        if number is not None:
            return number
        assert process.poll() is None, f"tune ended (exit {process.returncode}) before a trial was seen " \
                                       f"running: {stderr_path.read_text()[-2000:]}"
        time.sleep(0.05)
    raise AssertionError("no trial started")


def test_a_study_killed_mid_trial_resumes_with_all_trials(ratings_file, tmp_path):
    # 40 epochs: a trial lasts long enough (seconds) to be stopped in the middle of it.
    space = _space_file(tmp_path, {**TINY_SPACE, "n_epochs": 40})
    out = tmp_path / "out"
    # One finalist run: the final selection is tested on its own below.
    command = _tune_command(ratings_file, out, space, 3, "--heartbeat", "1", "--finalists", "1",
                            "--finalist-seeds", "1")
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    while True:  # stop the process while a trial runs (a trial may finish before the stop lands: then go on)
        killed = _wait_for_running_trial(process, out, stderr_path)
        process.send_signal(signal.SIGSTOP)
        if _running_trial(out) == killed:
            break
        process.send_signal(signal.SIGCONT)
    process.send_signal(signal.SIGKILL)
    process.wait()
    study = _load(out)
    assert study.trials[killed].state == optuna.trial.TrialState.RUNNING  # killed mid-trial
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    study = _load(out)
    states = _states(study)
    assert states["COMPLETE"] + states.get("PRUNED", 0) == 3
    assert states["FAIL"] == 1 and study.trials[killed].state == optuna.trial.TrialState.FAIL
    rerun = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert len(rerun) == 1 and rerun[0].state.is_finished() and rerun[0].params == study.trials[killed].params
    assert "process died or failed; rerun" in (out / "trials.csv").read_text()
    record = json.loads((out / "tune.json").read_text())
    assert record["search_best_trial"] == study.best_trial.number
    assert record["best_trial"] == record["finalists"][0]["trial"]


def test_two_processes_share_one_sqlite_study(ratings_file, tmp_path):
    space = _space_file(tmp_path, {**TINY_SPACE, "n_epochs": 8})
    out = tmp_path / "out"
    command = _tune_command(ratings_file, out, space, 6, "--finalists", "1", "--finalist-seeds", "1")
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    results = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err for _, err in results]
    study = _load(out)
    finished = [t for t in study.trials if t.state.is_finished()]
    # Each process stops once the study holds 6 finished or running trials: at most one more.
    assert 6 <= len(finished) <= 7 and len(finished) == len(study.trials)
    workers = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in finished}
    assert workers == {str(p.pid) for p in processes}
    record = json.loads((out / "tune.json").read_text())
    assert record["search_best_trial"] == study.best_trial.number
    assert all(f"trial-{record['best_trial']}" in out_text for out_text, _ in results)


def test_jobs_runs_worker_processes(ratings_file, tmp_path, capsys):
    out = tmp_path / "out"
    # 40 epochs a trial: the first trial outlasts the spawned worker's start (a fresh interpreter's
    # imports), so both workers take trials.
    space = _space_file(tmp_path, {**TINY_SPACE, "n_epochs": 40})
    assert main(["tune", str(ratings_file), "--out", str(out), "--trials", "4", "--jobs", "2", "--space", str(space),
                 "--finalists", "1", "--finalist-folds", "2", *TINY]) == 0
    study = _load(out)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == len(study.trials) and 4 <= len(finished) <= 5  # one study, shared out
    assert len({t.user_attrs["worker"] for t in finished}) == 2
    # The final selection's two runs (one finalist on two folds; the defaults' trial is not in this space)
    # are stored.
    assert len([key for key in study.user_attrs if key.startswith("finalist:")]) == 2


def test_run_lock_waits_for_its_holder_when_asked(tmp_path):
    """Workers of one study take the study folder's lock in turn: RunLock(wait_s=...) waits for the
    holder (here another open file of the lock, as another process holds it) instead of refusing."""
    import fcntl
    import threading

    from recvae_fast.runfolder import LOCK_NAME, RunFolderBusy, RunLock

    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    with pytest.raises(RunFolderBusy):
        with RunLock(tmp_path, wait_s=0.3):
            pass
    threading.Timer(0.6, os.close, args=(fd,)).start()  # closing the file releases its lock
    t0 = time.monotonic()
    with RunLock(tmp_path, wait_s=30):
        waited = time.monotonic() - t0
    assert 0.5 < waited < 10


def test_ctrl_c_says_the_same_command_continues_the_study(ratings_file, tmp_path, monkeypatch, capsys):
    from recvae_fast import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.tune, "run", interrupted)
    assert main(["tune", str(ratings_file), "--out", str(tmp_path / "out")]) == 130
    assert "the same command continues it" in capsys.readouterr().err
