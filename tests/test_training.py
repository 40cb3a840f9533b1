"""fit: schedule, reproducibility, best-epoch selection, checkpoints that resume exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from helpers import random_ratings

import recvae_fast
from recvae_fast import training
from recvae_fast.api import fit
from recvae_fast.training import load_model

SMALL = dict(hidden_dim=16, latent_dim=6, batch_size=16, n_enc_epochs=2, n_dec_epochs=1, progress=False)


@pytest.fixture(scope="module")
def small_data():
    train = random_ratings(60, 41, seed=20, binary=True, max_items=12).astype(np.float32)
    valid = random_ratings(12, 41, seed=21, binary=True, max_items=12).astype(np.float32).tolil()
    valid_out = sp.lil_matrix(valid.shape, dtype=np.float32)
    for u in range(valid.shape[0]):  # move one item of each user to the held-out part
        items = valid.rows[u]
        if len(items) > 1:
            valid_out[u, items[-1]] = 1.0
            valid[u, items[-1]] = 0.0
    valid_in = sp.csr_matrix(valid)
    valid_in.eliminate_zeros()
    return train.tocsr(), valid_in, valid_out.tocsr()


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_seeded_runs_are_reproducible_and_seeds_matter(small_data):
    train, _, _ = small_data
    a = _weights(fit(train, n_epochs=2, seed=3, **SMALL).model)
    b = _weights(fit(train, n_epochs=2, seed=3, **SMALL).model)
    c = _weights(fit(train, n_epochs=2, seed=4, **SMALL).model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert any(not torch.equal(a[key], c[key]) for key in a)


def test_schedule_updates_the_prior_and_both_parts(small_data):
    train, _, _ = small_data
    torch.manual_seed(0)
    model, history = fit(train, n_epochs=1, seed=0, **SMALL)
    for old, new in zip(model.prior.encoder_old.parameters(), model.encoder.parameters()):
        torch.testing.assert_close(old, new, rtol=0, atol=0)  # update_prior ran after the encoder passes
    untrained = recvae_fast.RecVAE(16, 6, train.shape[1])
    torch.manual_seed(0)
    untrained = recvae_fast.RecVAE(16, 6, train.shape[1])
    assert not torch.equal(model.decoder.weight, untrained.decoder.weight)
    assert not torch.equal(model.encoder.fc1.weight_t, untrained.encoder.fc1.weight_t)
    for key, value in history[0].items():
        if isinstance(value, float):
            assert np.isfinite(value), key
    assert {"encoder_loss", "encoder_kld", "decoder_mll", "users_per_s"} <= set(history[0])


def test_not_alternating_mode_runs(small_data):
    train, _, _ = small_data
    history = fit(train, n_epochs=1, not_alternating=True, beta=0.2, gamma=None, **SMALL).history
    assert "both_loss" in history[0]


def test_returns_the_best_validation_epoch(small_data, tmp_path):
    train, valid_in, valid_out = small_data
    log = tmp_path / "log.jsonl"
    model, history = fit(train, valid_in, valid_out, n_epochs=3, log_path=log, **SMALL)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records == json.loads(json.dumps(history))
    best = max(records, key=lambda r: r["valid_ndcg@100"])
    assert recvae_fast.evaluate(model, valid_in, valid_out)["ndcg@100"] == pytest.approx(best["valid_ndcg@100"])


def test_resume_ends_with_the_same_weights(small_data, tmp_path):
    train, valid_in, valid_out = small_data
    full = fit(train, valid_in, valid_out, n_epochs=3, checkpoint_dir=tmp_path / "full", **SMALL).model
    fit(train, valid_in, valid_out, n_epochs=1, checkpoint_dir=tmp_path / "cut", **SMALL)  # "crash" after epoch 1
    resumed = fit(train, valid_in, valid_out, n_epochs=3, checkpoint_dir=tmp_path / "cut", resume=True, **SMALL).model
    for key, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    ckpt_full = torch.load(tmp_path / "full" / training.CHECKPOINT_NAME, weights_only=True)
    ckpt_cut = torch.load(tmp_path / "cut" / training.CHECKPOINT_NAME, weights_only=True)
    for key, value in ckpt_full["model"].items():  # the last epoch's weights too, not only the best
        torch.testing.assert_close(ckpt_cut["model"][key], value, rtol=0, atol=0, msg=key)
    assert ckpt_cut["state"]["epoch"] == 3


def test_resume_refuses_other_hyperparameters(small_data, tmp_path):
    train, _, _ = small_data
    fit(train, n_epochs=1, checkpoint_dir=tmp_path, **SMALL)
    with pytest.raises(ValueError, match="lr"):
        fit(train, n_epochs=2, checkpoint_dir=tmp_path, resume=True, **{**SMALL, "lr": 1e-3})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fit(train, n_epochs=2, checkpoint_dir=tmp_path / "nothing", resume=True, **SMALL)


def test_a_crash_while_saving_keeps_the_last_good_checkpoint(small_data, tmp_path, monkeypatch):
    train, _, _ = small_data
    fit(train, n_epochs=1, checkpoint_dir=tmp_path, **SMALL)
    path = tmp_path / training.CHECKPOINT_NAME
    good = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.write(b"half")  # some bytes reached the disk...
        raise KeyboardInterrupt("killed while saving")  # ...then the process died

    monkeypatch.setattr(training.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        fit(train, n_epochs=2, checkpoint_dir=tmp_path, resume=True, **SMALL)
    assert path.read_bytes() == good
    # no temporary left behind (.lock is the writers' lock file)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", training.CHECKPOINT_NAME]
    monkeypatch.setattr(training.torch, "save", real_save)
    assert torch.load(path, weights_only=True)["state"]["epoch"] == 1


def test_load_model_reads_checkpoints_and_authors_state_dicts(small_data, tmp_path):
    train, valid_in, valid_out = small_data
    model = fit(train, valid_in, valid_out, n_epochs=2, checkpoint_dir=tmp_path, **SMALL).model
    from_ckpt = load_model(tmp_path / training.CHECKPOINT_NAME)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    from_plain = load_model(tmp_path / "plain.pt")
    for loaded in (from_ckpt, from_plain):
        for key, value in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    torch.save({"something": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="neither"):
        load_model(tmp_path / "bad.pt")


def test_bad_arguments(small_data):
    train, valid_in, valid_out = small_data
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        fit(train, n_epoch=3)
    with pytest.raises(ValueError, match="batch_size"):
        fit(train, batch_size=0)
    with pytest.raises(ValueError, match="dropout_rate"):
        fit(train, dropout_rate=1.0)
    with pytest.raises(ValueError, match="gamma"):
        fit(train, gamma=None, beta=None)
    with pytest.raises(ValueError, match="both"):
        fit(train, valid_in)
    with pytest.raises(ValueError, match="item columns"):
        fit(train, valid_in[:, :-1], valid_out[:, :-1])
    with pytest.raises(TypeError, match="scipy"):
        fit(train.toarray())
    with pytest.raises(ValueError, match="no interactions"):
        fit(sp.csr_matrix((5, 7), dtype=np.float32))


def test_fc1_gradient_layout_choice():
    cfg = training.TrainConfig(batch_size=16)
    wide = random_ratings(30, 400, seed=3, binary=True, max_items=5)  # a batch touches few of 400 rows
    narrow = random_ratings(30, 20, seed=3, binary=True, max_items=12)  # a batch touches most rows
    assert training.fc1_grad_is_row_sparse(cfg, wide)
    assert not training.fc1_grad_is_row_sparse(cfg, narrow)
    assert not training.fc1_grad_is_row_sparse(training.TrainConfig(batch_size=16, device="cuda"), wide)
    assert training.fc1_grad_is_row_sparse(training.TrainConfig(sparse_fc1_grad=True), narrow)
    assert not training.fc1_grad_is_row_sparse(training.TrainConfig(sparse_fc1_grad=False), wide)
    with pytest.raises(ValueError, match="sparse_fc1_grad"):
        training.TrainConfig(sparse_fc1_grad="yes").validate()


def test_row_sparse_fc1_fit_equals_dense_fit():
    """The automatic choice takes the row-sparse layout on a wide catalogue, and an epoch trained
    with it ends where the dense layout's does (same Adam, rounding apart)."""
    train = random_ratings(40, 400, seed=4, binary=True, max_items=6).astype(np.float32).tocsr()
    auto = fit(train, n_epochs=1, **SMALL)
    dense = fit(train, n_epochs=1, sparse_fc1_grad=False, **SMALL)
    assert auto.history[0]["fc1_grad"] == "row-sparse" and dense.history[0]["fc1_grad"] == "dense"
    for key, value in dense.model.state_dict().items():
        torch.testing.assert_close(auto.model.state_dict()[key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("bad, message", [
    (dict(lr=float("inf")), "lr must be a finite"),
    (dict(gamma=float("nan")), "gamma must be a finite"),
    (dict(beta=float("inf"), gamma=None), "beta must be a finite"),
    (dict(dropout_rate=float("nan")), "dropout_rate must be a finite"),
    (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(device="foo"), "not a device name"),
    (dict(device="cuda:99" if torch.cuda.is_available() else "cuda"), "CUDA"),
    (dict(n_epochs=0), "n_epochs must be a positive"),
])
def test_rejects_non_finite_and_impossible_settings_before_writing(small_data, tmp_path, bad, message):
    train, _, _ = small_data
    with pytest.raises(ValueError, match=message):
        fit(train, checkpoint_dir=tmp_path / "run", log_path=tmp_path / "run" / "log.jsonl", **{**SMALL, **bad})
    assert not (tmp_path / "run").exists()  # nothing written


def test_resume_refuses_other_data_of_the_same_shape(small_data, tmp_path):
    train, valid_in, valid_out = small_data
    fit(train, valid_in, valid_out, n_epochs=1, checkpoint_dir=tmp_path, **SMALL)
    before = (tmp_path / training.CHECKPOINT_NAME).read_bytes()
    permuted = train[:, np.random.default_rng(0).permutation(train.shape[1])]  # other ids, same item count
    with pytest.raises(ValueError, match="other data"):
        fit(permuted, valid_in, valid_out, n_epochs=2, checkpoint_dir=tmp_path, resume=True, **SMALL)
    with pytest.raises(ValueError, match="other data"):  # another split: the validation users differ
        fit(train, valid_in[1:], valid_out[1:], n_epochs=2, checkpoint_dir=tmp_path, resume=True, **SMALL)
    assert (tmp_path / training.CHECKPOINT_NAME).read_bytes() == before


def test_the_readme_call_creates_the_run_folder_for_its_log(small_data, tmp_path):
    """fit(checkpoint_dir=X, log_path=X/metrics.jsonl) on a folder that does not exist yet."""
    train, valid_in, valid_out = small_data
    run = tmp_path / "runs" / "ml20m"
    result = fit(train, valid_in, valid_out, n_epochs=1, checkpoint_dir=run, log_path=run / "metrics.jsonl", **SMALL)
    assert isinstance(result, training.FitResult) and isinstance(result.model, recvae_fast.RecVAE)
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_resume_rewrites_a_log_that_lags_its_checkpoint(small_data, tmp_path):
    """A kill between the checkpoint and the log: the next writer restores the log from the
    checkpoint's history."""
    train, _, _ = small_data
    log = tmp_path / "metrics.jsonl"
    history = fit(train, n_epochs=2, checkpoint_dir=tmp_path, log_path=log, **SMALL).history
    log.write_text(log.read_text().splitlines()[0] + "\n")  # the last epoch's line lost
    again = fit(train, n_epochs=2, checkpoint_dir=tmp_path, log_path=log, resume=True, **SMALL).history
    assert again == history
    assert [json.loads(line) for line in log.read_text().splitlines()] == json.loads(json.dumps(history))


def _scripted_validation(monkeypatch, ndcgs):
    """Validation NDCG@100 per epoch taken from `ndcgs` (the real metric is not what is tested)."""
    from recvae_fast import inference

    calls = iter(ndcgs)
    monkeypatch.setattr(inference, "evaluate", lambda model, a, b, **options: {"ndcg@100": next(calls)})


def test_early_stopping_stops_at_the_right_epoch_and_resumes(small_data, tmp_path, monkeypatch):
    train, valid_in, valid_out = small_data
    ndcgs = [0.1, 0.3, 0.2, 0.25, 0.29, 0.5, 0.6, 0.7]  # best at epoch 2, then 3 epochs without improvement
    _scripted_validation(monkeypatch, ndcgs)
    stopped = fit(train, valid_in, valid_out, n_epochs=8, patience=3, checkpoint_dir=tmp_path / "cut", **SMALL)
    assert [r["epoch"] for r in stopped.history] == [1, 2, 3, 4, 5]
    best_weights = _weights(stopped.model)
    # Resumed with the same patience: nothing more to train, the same best model (epoch 2).
    _scripted_validation(monkeypatch, [])
    again = fit(train, valid_in, valid_out, n_epochs=8, patience=3, checkpoint_dir=tmp_path / "cut", resume=True,
                **SMALL)
    assert len(again.history) == 5
    for key, value in best_weights.items():
        torch.testing.assert_close(again.model.state_dict()[key], value, rtol=0, atol=0)
    # Resumed without patience: it trains on, and ends exactly where an uninterrupted run ends.
    _scripted_validation(monkeypatch, ndcgs[5:])
    resumed = fit(train, valid_in, valid_out, n_epochs=8, checkpoint_dir=tmp_path / "cut", resume=True, **SMALL)
    _scripted_validation(monkeypatch, ndcgs)
    full = fit(train, valid_in, valid_out, n_epochs=8, checkpoint_dir=tmp_path / "full", **SMALL)
    assert [r["epoch"] for r in resumed.history] == list(range(1, 9))
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    with pytest.raises(ValueError, match="validation data"):
        fit(train, patience=2, **SMALL)
    with pytest.raises(ValueError, match="patience"):
        fit(train, valid_in, valid_out, patience=0, **SMALL)


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_load_model_never_unpickles_and_names_corrupt_files(small_data, tmp_path):
    import pickle

    from recvae_fast.runfolder import RunFolderError

    marker = tmp_path / "pwned"
    torch.save({"decoder.weight": _Payload(marker)}, tmp_path / "evil.pt")
    pickle.loads(pickle.dumps(_Payload(tmp_path / "live")))  # the payload works when unpickled...
    assert (tmp_path / "live").exists()
    with pytest.raises(RunFolderError, match="evil.pt"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()  # ...and load_model never unpickles it
    model = fit(small_data[0], n_epochs=1, **SMALL).model
    torch.save(model.state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunFolderError, match="cut.pt is corrupt, truncated"):
        load_model(tmp_path / "cut.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(RunFolderError, match="empty.pt"):
        load_model(tmp_path / "empty.pt")
    torch.save({"decoder.weight": torch.zeros(3, 2)}, tmp_path / "partial.pt")
    with pytest.raises(RunFolderError, match="partial.pt does not hold RecVAE weights"):
        load_model(tmp_path / "partial.pt")


def test_a_second_writer_is_refused_naming_the_holder(small_data, tmp_path):
    import fcntl
    import os

    from recvae_fast.runfolder import LOCK_NAME, RunFolderBusy

    (tmp_path / LOCK_NAME).write_text("pid 4242 on host elsewhere\n")
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR)  # another open file: flock conflicts as between processes
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(RunFolderBusy, match="pid 4242 on host elsewhere"):
            fit(small_data[0], n_epochs=1, checkpoint_dir=tmp_path, **SMALL)
    finally:
        os.close(fd)
    assert not (tmp_path / training.CHECKPOINT_NAME).exists()
    fit(small_data[0], n_epochs=1, checkpoint_dir=tmp_path, **SMALL)  # free again


def test_the_lock_holder_removes_stale_temporaries(small_data, tmp_path):
    stale = tmp_path / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    fit(small_data[0], n_epochs=1, checkpoint_dir=tmp_path, **SMALL)
    assert not stale.exists()


def test_load_model_on_random_bytes_and_mutations_gives_a_model_or_one_clean_error(tmp_path):
    """Fuzz: random bytes, truncations and byte flips of a valid model.pt load as a RecVAE or raise
    RunFolderError naming the file, never another exception."""
    from recvae_fast.runfolder import RunFolderError

    torch.manual_seed(0)
    torch.save(recvae_fast.RecVAE(8, 3, 13).state_dict(), tmp_path / "good.pt")
    good = (tmp_path / "good.pt").read_bytes()
    rng = np.random.default_rng(7)
    cases = [rng.bytes(int(n)) for n in rng.integers(0, 3000, 10)]
    cases += [good[: int(n)] for n in rng.integers(0, len(good), 15)]
    for _ in range(40):
        mutated = bytearray(good)
        for pos in rng.integers(0, len(good), int(rng.integers(1, 8))):
            mutated[pos] = int(rng.integers(0, 256))
        cases.append(bytes(mutated))
    outcomes = {"model": 0, "error": 0}
    for k, blob in enumerate(cases):
        path = tmp_path / f"case{k}.pt"
        path.write_bytes(blob)
        try:
            model = load_model(path)
        except RunFolderError as exc:
            assert f"case{k}.pt" in str(exc) and "\n" not in str(exc)
            outcomes["error"] += 1
        else:
            assert isinstance(model, recvae_fast.RecVAE) and model.input_dim == 13
            outcomes["model"] += 1
    assert outcomes["error"] >= 25  # random bytes and truncations are refused


def test_progress_modes_of_fit(small_data, capsys):
    """False prints nothing; "epochs" one line per epoch on stderr; True also the bars (stderr). The
    training is the same in every mode."""
    train, valid_in, valid_out = small_data
    quiet = fit(train, valid_in, valid_out, n_epochs=2, **SMALL)
    assert capsys.readouterr() == ("", "")
    lines = fit(train, valid_in, valid_out, n_epochs=2, **{**SMALL, "progress": "epochs"})
    out, err = capsys.readouterr()
    assert out == "" and [line.split(" | ")[0] for line in err.splitlines()] == ["epoch 1/2", "epoch 2/2"]
    assert "valid ndcg@100 " in err and "elapsed" in err and "\r" not in err
    bars = fit(train, valid_in, valid_out, n_epochs=2, **{**SMALL, "progress": True})
    out, err = capsys.readouterr()
    assert out == "" and "training: 100%" in err and "epoch 2 decoder 1/1" in err and "epoch 2/2 | " in err
    for run in (lines, bars):
        assert [r["valid_ndcg@100"] for r in run.history] == [r["valid_ndcg@100"] for r in quiet.history]


def test_progress_line_marks_an_early_stop(small_data, monkeypatch, capsys):
    train, valid_in, valid_out = small_data
    _scripted_validation(monkeypatch, [0.3, 0.2, 0.1])
    fit(train, valid_in, valid_out, n_epochs=5, patience=2, **{**SMALL, "progress": "epochs"})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and "early stop" not in lines[1]
    assert lines[2].endswith("| early stop: no better validation NDCG@100 for 2 epochs (best epoch 1)")


def test_epoch_line_and_durations():
    record = {"epoch": 3, "fc1_grad": "dense", "encoder_mll": -1.0, "encoder_loss": 512.345, "decoder_loss": 498.0,
              "valid_ndcg@100": 0.33631, "valid_recall@20": 0.25, "valid_n_users": 40, "time_s": 4.25}
    assert training.epoch_line(record, 10, 75.4) == ("epoch 3/10 | encoder loss 512.3 | decoder loss 498 | "
                                                     "valid ndcg@100 0.3363 recall@20 0.2500 | 4.2 s (elapsed 1:15)")
    assert [training.timedelta_text(s) for s in (0.04, 59.94, 60, 3725)] == ["0.0 s", "59.9 s", "1:00", "1:02:05"]


def test_metric_cutoffs_and_eval_batch_size_of_validation(small_data):
    """metric_ks adds NDCG@k / Recall@k, 100 always among them, without changing the training or the
    NDCG@100 that picks the best epoch; the validation batch size changes no figure."""
    train, valid_in, valid_out = small_data
    paper = fit(train, valid_in, valid_out, n_epochs=2, **SMALL)
    cut = fit(train, valid_in, valid_out, n_epochs=2, metric_ks=[5, 1, 5], eval_batch_size=3, **SMALL)
    assert [k for k in cut.history[0] if k.startswith("valid_")] == [
        "valid_ndcg@1", "valid_ndcg@5", "valid_ndcg@100", "valid_recall@1", "valid_recall@5", "valid_recall@100",
        "valid_n_users"]
    for a, b in zip(paper.history, cut.history):
        assert a["valid_ndcg@100"] == pytest.approx(b["valid_ndcg@100"], abs=1e-12)
    expected = recvae_fast.evaluate(cut.model, valid_in, valid_out, ks=(1, 5, 100))
    assert expected == pytest.approx(recvae_fast.evaluate(cut.model, valid_in, valid_out, batch_size=1,
                                                          ks=(100, 5, 1)))


@pytest.mark.parametrize("bad, message", [
    (dict(progress="bars"), "progress must be True, False or 'epochs'"),
    (dict(metric_ks=[10, 0]), "k must be a positive integer"),
    (dict(metric_ks=[]), "at least one metric cut-off"),
    (dict(eval_batch_size=0), "eval_batch_size must be a positive integer"),
])
def test_bad_progress_cutoffs_and_eval_batch_size_are_refused_before_writing(small_data, tmp_path, bad, message):
    train, valid_in, valid_out = small_data
    with pytest.raises(ValueError, match=message):
        fit(train, valid_in, valid_out, checkpoint_dir=tmp_path / "run", **{**SMALL, **bad})
    assert not (tmp_path / "run").exists()
