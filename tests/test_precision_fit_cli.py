"""precision in fit and the CLI: bf16-mixed trains to the float32 quality on synthetic data, the run
folder records it, resume keeps it, scoring commands take it, and an unknown name is one line."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from recvae_fast import data as data_mod
from recvae_fast import evaluate, fit, precision
from recvae_fast.cli import main
from recvae_fast.metrics import popularity_baseline

TINY = ["--epochs", "2", "--hidden-dim", "16", "--latent-dim", "8", "--batch-size", "128", "--no-progress"]


@pytest.fixture(autouse=True)
def _quiet_slow_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", precision.SlowPrecisionWarning)
        yield


def test_fit_bf16_mixed_matches_float32_ndcg():
    """Mean test NDCG@100 over 3 seeds within 0.005 of float32's (a smaller synthetic set than the
    CLI's, with fewer items and clearer tastes, so that 6 short fits learn well past popularity;
    tools/quality_mixed_precision.py runs the CLI's main job)."""
    interactions = data_mod.synthetic_dataset(n_users=2000, n_items=300, seed=0, n_topics=8, noise=0.1,
                                              mean_items_per_user=30)
    ndcg = {name: [] for name in precision.PRECISIONS}
    popularity = []
    for seed in (0, 1, 2):
        split = data_mod.split_strong_generalization(interactions, n_heldout_users=300, seed=seed)
        popularity.append(popularity_baseline(split.train, split.test_in, split.test_out)["ndcg@100"])
        for name in precision.PRECISIONS:
            model, _ = fit(split.train, split.valid_in, split.valid_out, progress=False, n_epochs=3, n_enc_epochs=2,
                           lr=3e-3, hidden_dim=64, latent_dim=32, batch_size=250, seed=seed, precision=name)
            assert all(p.dtype == torch.float32 for p in model.parameters())
            ndcg[name].append(evaluate(model, split.test_in, split.test_out, precision=name)["ndcg@100"])
    fp32, bf16 = np.mean(ndcg["32-true"]), np.mean(ndcg["bf16-mixed"])
    assert fp32 > np.mean(popularity) + 0.05, (ndcg, popularity)  # it learned more than popularity
    assert abs(bf16 - fp32) <= 0.005, ndcg
    assert ndcg["bf16-mixed"] != ndcg["32-true"]  # and bf16 did change the arithmetic


@pytest.mark.parametrize("command", ["train", "evaluate", "recommend", "export"])
def test_unknown_precision_is_one_line_listing_the_choices(command, tmp_path, capsys):
    out = tmp_path / "run"
    argv = {"train": ["train", "synthetic", "--out", str(out)],
            "evaluate": ["evaluate", str(out)],
            "recommend": ["recommend", str(out), "--output", str(tmp_path / "r.csv")],
            "export": ["export", str(out), "--output", str(tmp_path / "s.pt2")]}[command]
    assert main([*argv, "--precision", "bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--precision" in err[0] and "32-true, bf16-mixed" in err[0], err
    assert not out.exists()


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", precision.SlowPrecisionWarning)
        assert main(["train", "synthetic", "--out", str(out), "--precision", "bf16-mixed", *TINY]) == 0
    return out


def test_run_folder_records_bf16_and_resume_keeps_it(bf16_run, tmp_path, capsys):
    description = json.loads((bf16_run / "run.json").read_text())
    assert description["config"]["precision"] == "bf16-mixed"
    summary = json.loads((bf16_run / "summary.json").read_text())
    assert summary["config"]["precision"] == "bf16-mixed"
    # resume without the flag keeps bf16; asking for another precision is refused by name
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(bf16_run, run)
    assert main(["train", "--out", str(run), "--resume", "--precision", "32-true", "--epochs", "3"]) == 2
    assert "--precision 32-true (the run's: bf16-mixed)" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--no-progress"]) == 0
    resumed = json.loads((run / "run.json").read_text())
    assert resumed["config"]["precision"] == "bf16-mixed" and resumed["config"]["n_epochs"] == 3
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_scoring_commands_take_the_runs_precision(bf16_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(bf16_run)]) == 0
    default = json.loads(capsys.readouterr().out)["test"]["ndcg@100"]
    summary = json.loads((bf16_run / "summary.json").read_text())
    assert default == pytest.approx(summary["test"]["ndcg@100"], abs=1e-12)  # scored as in training: bf16
    assert main(["evaluate", str(bf16_run), "--precision", "32-true"]) == 0
    fp32 = json.loads(capsys.readouterr().out)["test"]["ndcg@100"]
    assert abs(fp32 - default) < 0.01
    assert main(["recommend", str(bf16_run), "--k", "5", "--output", str(tmp_path / "r.csv")]) == 0
    assert (tmp_path / "r.csv").read_text().startswith("user,item,rank,score")
    capsys.readouterr()
    assert main(["export", str(bf16_run), "--k", "5", "--output", str(tmp_path / "s.pt2")]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "bf16-mixed"


def test_train_warns_on_a_cpu_without_bf16_products(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_products", lambda: False)
    monkeypatch.setattr(precision, "_warned", False)
    with pytest.warns(precision.SlowPrecisionWarning, match="slower"):
        assert main(["train", "synthetic", "--out", str(tmp_path / "w"), "--precision", "bf16-mixed",
                     "--data-seed", "1", "--epochs", "1", *TINY[2:]]) == 0
