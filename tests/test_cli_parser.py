"""The parser: a flag for every TrainConfig field, with the field's help and default, parsed into
the field's value; a flag's bad value is one line and exit code 2 before any command runs."""
from __future__ import annotations

import argparse
import re
from dataclasses import MISSING, fields

import pytest

from recvae_fast.cli import build_parser, main
from recvae_fast.cli.parser import FLAG_CHOICES, HYPER_FLAGS, SYNTHETIC_EPOCHS
from recvae_fast.cli.settings import given_hyperparameters, new_run_settings
from recvae_fast.training import TrainConfig

# A value other than the default for each field, as typed on the command line and as parsed.
OTHER_VALUES = {
    "hidden_dim": ("64", 64), "latent_dim": ("16", 16), "batch_size": ("32", 32), "n_epochs": ("7", 7),
    "n_enc_epochs": ("2", 2), "n_dec_epochs": ("3", 3), "lr": ("0.01", 0.01), "gamma": ("0.02", 0.02),
    "beta": ("0.3", 0.3), "dropout_rate": ("0.25", 0.25), "not_alternating": (None, True),
    "sparse_fc1_grad": ("row-sparse", True), "seed": ("9", 9), "device": ("cuda:1", "cuda:1"),
    "precision": ("bf16-mixed", "bf16-mixed"),
}


def _subparser(name: str) -> argparse.ArgumentParser:
    actions = build_parser()._actions
    return next(a for a in actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def _help_of(parser: argparse.ArgumentParser, flag: str) -> str:
    """The flag's help as --help prints it (wrapping undone)."""
    text = parser.format_help()
    start = re.search(rf"^  {re.escape(flag)}\b.*$", text, re.MULTILINE).start()
    entry = [text[start:].splitlines()[0]]
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("   "):
            break
        entry.append(line.strip())
    return " ".join(part.strip() for part in entry)


def test_every_trainconfig_field_has_its_flag_with_its_help_and_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    train = _subparser("train")
    by_dest = {action.dest: action for action in train._actions}
    assert set(OTHER_VALUES) == {field.name for field in fields(TrainConfig)}, "a new field: add a value here"
    assert sorted(HYPER_FLAGS.values()) == sorted(OTHER_VALUES)
    for field in fields(TrainConfig):
        dest = field.metadata.get("flag", field.name)
        assert HYPER_FLAGS[dest] == field.name
        action = by_dest[dest]
        assert action.default is None, f"{dest}: not given must parse to None (--resume tells it from the run's)"
        assert field.default is not MISSING
        help_text = _help_of(train, action.option_strings[0])
        assert field.metadata["help"] in help_text, (dest, help_text)
        shown = field.metadata.get("default_help", field.default)
        assert f"(default: {shown}" in help_text, (dest, help_text)
    # A new run with no flag: TrainConfig's defaults, but for the synthetic dataset's shorter schedule.
    config = new_run_settings(build_parser().parse_args(["train", "--out", "x"])).config
    assert config == {**{field.name: field.default for field in fields(TrainConfig)}, "n_epochs": SYNTHETIC_EPOCHS}


@pytest.mark.parametrize("name", list(OTHER_VALUES))
def test_each_hyperparameter_flag_parses_into_its_field(name):
    field = TrainConfig.__dataclass_fields__[name]
    dest = field.metadata.get("flag", name)
    text, value = OTHER_VALUES[name]
    assert value != field.default
    argv = ["train", "--out", "x", "--" + dest.replace("_", "-"), *([text] if text is not None else [])]
    given = given_hyperparameters(build_parser().parse_args(argv))
    assert given[name] == value
    assert set(given) - {name} == ({"gamma"} if name == "beta" else set())  # --beta replaces the default gamma


def test_flag_choices_name_every_value_of_their_field():
    assert FLAG_CHOICES == {"fc1_grad": {"auto": None, "dense": False, "row-sparse": True}}
    parser = build_parser()
    for text, value in FLAG_CHOICES["fc1_grad"].items():
        assert given_hyperparameters(parser.parse_args(["train", "--out", "x", "--fc1-grad", text])) == \
            {"sparse_fc1_grad": value}


@pytest.mark.parametrize("argv, line", [
    (["evaluate", "run", "--k", "0"], None),  # evaluate has no --k: argparse's own error
    (["recommend", "run", "--output", "o.csv", "--k", "0"], "--k must be positive, got 0"),
    (["export", "run", "--output", "o.pt2", "--k", "-3"], "--k must be positive, got -3"),
    (["evaluate", "run", "--eval-batch-size", "0"], "--eval-batch-size must be >= 1, got 0"),
    (["train", "--out", "x", "--data-seed", "-1"], "--data-seed must be >= 0, got -1"),
    (["train", "--out", "x", "--rating-threshold", "inf"], "--rating-threshold must be a finite number, got inf"),
    (["train", "--out", "x", "--item-shards", "0"], "--item-shards must be >= 1, got 0"),
    (["tune", "--out", "x", "--heartbeat", "0"], "--heartbeat must be >= 1, got 0"),
    (["evaluate", "run", "--topk", "5,x"], "--topk must be positive integers separated by commas, e.g. "
                                           "10,20,50,100; got '5,x'"),
    (["evaluate", "run", "--precision", "fp8"], "--precision: unknown precision 'fp8'; choose one of 32-true, "
                                                "bf16-mixed"),
])
def test_a_bad_flag_value_is_one_line_and_exit_2_before_the_command(argv, line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if line is None:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and "usage:" in capsys.readouterr().err
        return
    assert main(argv) == 2
    assert capsys.readouterr().err == f"recvae-fast: error: {line}\n"
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_argparse_own_errors_keep_their_usage_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--out", "x", "--hidden-dim", "wide"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "usage: recvae-fast train" in err and "argument --hidden-dim: invalid int value: 'wide'" in err


def test_topk_parses_into_sorted_distinct_cutoffs_with_100():
    args = build_parser().parse_args(["evaluate", "run", "--topk", "50,10,10"])
    assert args.topk == (10, 50, 100)
