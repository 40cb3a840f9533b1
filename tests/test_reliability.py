"""Hostile and careless input to run folders, checkpoints, outputs and resource sizes: each case ends
with one clear error (in the CLI one line on stderr, exit 2), runs no code from a file, and leaves
every file that is not the command's to write as it was."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import stat

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from recvae_fast import RecVAE
from recvae_fast.cli import main
from recvae_fast.distributed.checkpoint import load_into_recvae, read_metadata
from recvae_fast.runfolder import LOCK_NAME, RunFolderError, RunLock

from helpers import default_sigint

TINY = ["--epochs", "1", "--hidden-dim", "8", "--latent-dim", "4", "--batch-size", "64", "--no-progress",
        "--heldout-users", "30"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recvae-fast: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A finished tiny run on the synthetic data (never modified: tests copy it)."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "synthetic", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture
def run_copy(run_folder, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_folder, copy)
    (copy / LOCK_NAME).unlink(missing_ok=True)
    return copy


# --- a sharded checkpoint's metadata admits tensors only -------------------------------------


class _WritesMarker:
    """A pickle payload: unpickled with an unrestricted loader, it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _checkpoint_routing_a_tensor_to_a_pickle(folder, marker):
    """A valid DCP checkpoint of a RecVAE whose metadata was edited: the decoder weight is declared a
    bytes entry stored in a pickle file the attacker wrote, which DCP's bytes path would torch.load
    with weights_only=False."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    torch.manual_seed(0)
    model = RecVAE(6, 3, 11).double()
    folder.mkdir(parents=True)
    state = {f"model.{name}": p.detach() for name, p in model.named_parameters()}
    dcp.save(state, checkpoint_id=folder, no_dist=True)
    (folder / "payload.pkl").write_bytes(pickle.dumps(_WritesMarker(marker)))
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    key = "model.decoder.weight"
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    metadata.storage_data = {index: info for index, info in metadata.storage_data.items() if index.fqn != key}
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo("payload.pkl", 0, (folder / "payload.pkl").stat().st_size)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    return model


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_crafted_sharded_checkpoint_never_unpickles_its_payload(tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "sharded" / "step-000001"
    _checkpoint_routing_a_tensor_to_a_pickle(folder, marker)
    pickle.loads((folder / "payload.pkl").read_bytes())  # the payload works: it makes the marker
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match=r"\.metadata is not a torch.distributed.checkpoint metadata file") as info:
        load_into_recvae(folder)
    assert "\n" not in str(info.value) and "BytesStorageMetadata" in str(info.value)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_checkpoint_data_must_be_its_own_tensor_files(tmp_path):
    """A tensor entry routed to a file outside the checkpoint, or with transforms, is refused."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    folder = tmp_path / "step-000001"
    torch.manual_seed(0)
    model = RecVAE(6, 3, 11).double()
    folder.mkdir()
    dcp.save({f"model.{n}": p.detach() for n, p in model.named_parameters()}, checkpoint_id=folder, no_dist=True)
    good = (folder / ".metadata").read_bytes()
    loaded = load_into_recvae(folder)  # the untouched checkpoint loads
    torch.testing.assert_close(loaded.decoder.weight, model.decoder.weight, rtol=0, atol=0)
    for edit, message in (
        (lambda info: _StorageInfo("../../elsewhere.distcp", info.offset, info.length), "not in a data file"),
        (lambda info: _StorageInfo(info.relative_path, info.offset, info.length, ["zstd"]), "transforms"),
        (lambda info: _StorageInfo(info.relative_path, -1, info.length), "offset or length"),
    ):
        metadata = pickle.loads(good)
        index = next(iter(metadata.storage_data))
        metadata.storage_data[index] = edit(metadata.storage_data[index])
        (folder / ".metadata").write_bytes(pickle.dumps(metadata))
        with pytest.raises(ValueError, match=message):
            read_metadata(folder)
    metadata = pickle.loads(good)  # a chunk list that leaves part of a tensor unread
    entry = metadata.state_dict_metadata["model.decoder.weight"]
    entry.chunks = []
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ValueError, match="do not cover the tensor"):
        read_metadata(folder)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_crafted_sharded_checkpoint_under_torchrun_resume_runs_nothing(tmp_path, capsys, monkeypatch):
    """train --resume under torchrun (a group of one) with a crafted LATEST checkpoint: one error line,
    exit 2, no marker."""
    marker = tmp_path / "marker"
    out = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
    assert main(["train", "synthetic", "--out", str(out), "--item-shards", "1", *TINY]) == 0
    capsys.readouterr()
    step = next((out / "sharded").glob("step-*"))
    train_state = (step / "train_state.json").read_bytes()
    shutil.rmtree(step)
    _checkpoint_routing_a_tensor_to_a_pickle(step, marker)
    (step / "train_state.json").write_bytes(train_state)
    assert main(["train", "--out", str(out), "--resume", "--item-shards", "1", "--epochs", "2", "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "metadata" in line and not marker.exists()


# --- the run folder's lock never writes through a link ---------------------------------------


def test_lock_symlink_is_refused_and_its_target_kept(tmp_path, run_copy, capsys):
    important = tmp_path / "important.txt"
    important.write_text("keep me\n")
    (run_copy / LOCK_NAME).symlink_to(important)
    with pytest.raises(RunFolderError, match="symbolic link"):
        with RunLock(run_copy):
            pass
    assert main(["train", "--out", str(run_copy), "--resume", "--epochs", "2", "--no-progress"]) == 2
    assert "symbolic link" in _one_error_line(capsys)
    assert important.read_text() == "keep me\n"
    (run_copy / LOCK_NAME).unlink()
    os.link(important, run_copy / LOCK_NAME)  # a hard link: another file's second name
    with pytest.raises(RunFolderError, match="hard link"):
        with RunLock(run_copy):
            pass
    assert important.read_text() == "keep me\n"
    (run_copy / LOCK_NAME).unlink()
    os.mkfifo(run_copy / LOCK_NAME)
    with pytest.raises(RunFolderError, match="not a regular file"):
        with RunLock(run_copy):
            pass


def test_lock_file_is_never_truncated(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text("x" * 300)
    with RunLock(tmp_path):
        during = lock.read_bytes()
    assert during.startswith(f"pid {os.getpid()} on host ".encode()) and len(during) == 300
    assert lock.stat().st_size == 300


# --- --output respects files that are not regular ---------------------------------------------


def test_output_to_a_device_or_fifo_is_written_into_not_replaced(run_copy, tmp_path, capsys):
    assert main(["recommend", str(run_copy), "--k", "3", "--output", os.devnull]) == 0
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    fifo = tmp_path / "recs.fifo"
    os.mkfifo(fifo)
    import threading

    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo, "rb").read()))
    reader.start()
    assert main(["recommend", str(run_copy), "--k", "3", "--output", str(fifo)]) == 0
    reader.join(timeout=60)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert received and received[0].startswith(b"user,item,rank,score")
    assert len(received[0].splitlines()) > 10


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_output_to_a_full_device_is_one_clear_line(run_copy, capsys):
    for argv in (["recommend", str(run_copy), "--k", "3", "--output", "/dev/full"],
                 ["export", str(run_copy), "--k", "3", "--output", "/dev/full"]):
        assert main(argv) == 2
        line = _one_error_line(capsys)
        assert "/dev/full" in line and "No space left on device" in line
        assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_output_through_a_symlink_writes_its_target(run_copy, tmp_path):
    target = tmp_path / "target.csv"
    target.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    assert main(["recommend", str(run_copy), "--k", "2", "--output", str(link)]) == 0
    assert link.is_symlink() and target.read_text().startswith("user,item,rank,score")


# --- the run folder's files are checked before use --------------------------------------------


def _edit_checkpoint(run, edit):
    path = run / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)
    return path.read_bytes()


def _set_state(field, value):
    return lambda ckpt: ckpt["state"].__setitem__(field, value)


def _wrong_best_model(ckpt):
    ckpt["best_model"] = {k: v[..., :1] if v.dim() else v for k, v in ckpt["model"].items()}


@pytest.mark.parametrize("edit, message", [
    (_set_state("epoch", "1"), "epoch must be an integer"),
    (_set_state("epoch", 1.5), "epoch must be an integer"),
    (_set_state("epoch", -3), "epoch must be an integer >= 0"),
    (_set_state("best_ndcg", "high"), "best_ndcg must be a number"),
    (_set_state("history", "xyz"), "history must be a list of 1 epoch records"),
    (_set_state("history", [{"epoch": 1}, {"epoch": 1}]), "history must be a list of 1"),
    (_wrong_best_model, "best_model's"),
], ids=["epoch-string", "epoch-fraction", "epoch-negative", "best-ndcg-string", "history-string",
        "history-repeated", "best-model-shapes"])
def test_checkpoint_state_is_checked_before_resuming(run_copy, capsys, edit, message):
    checkpoint = _edit_checkpoint(run_copy, edit)
    log = (run_copy / "metrics.jsonl").read_bytes()
    assert main(["train", "--out", str(run_copy), "--resume", "--epochs", "2", "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "checkpoint.pt" in line and message in line
    assert (run_copy / "checkpoint.pt").read_bytes() == checkpoint  # nothing rewritten
    assert (run_copy / "metrics.jsonl").read_bytes() == log


def test_reordered_items_json_is_refused_by_recommend_and_export(run_copy, tmp_path, capsys):
    items = json.loads((run_copy / "items.json").read_text())
    (run_copy / "items.json").write_text(json.dumps(items[::-1]))
    for command in ("recommend", "export"):
        output = tmp_path / f"{command}.out"
        assert main([command, str(run_copy), "--k", "3", "--output", str(output)]) == 2
        assert "were not written with its split.npz" in _one_error_line(capsys)
        assert not output.exists()


def test_a_model_of_nans_is_refused(run_copy, tmp_path, capsys):
    weights = torch.load(run_copy / "model.pt", weights_only=True)
    weights["decoder.bias"] = torch.full_like(weights["decoder.bias"], float("nan"))
    torch.save(weights, run_copy / "model.pt")
    for argv in (["evaluate", str(run_copy)], ["recommend", str(run_copy), "--output", str(tmp_path / "r.csv")]):
        assert main(argv) == 2
        line = _one_error_line(capsys)
        assert "model.pt" in line and "decoder.bias holds NaN or infinite values" in line
    assert not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize("field, value, message", [
    ("data", [1, 2], "data and config must be tables"),
    ("data.min_items", "x", "data.min_items must be an integer >= 1"),
    ("data.rating_threshold", "nan", "data.rating_threshold must be a finite number"),
    ("source", 12, "source must be 'synthetic' or a data file's absolute path"),
    ("source", "relative/ratings.csv", "source must be 'synthetic' or a data file's absolute path"),
    ("item_shards", "2", "item_shards must be an integer"),
    ("config.hidden_dim", "8", "config: hidden_dim must be a positive integer"),
    ("training", [1], "training must be a table of patience, topk"),
    ("training.topk", "xyz", "training.topk must be a non-empty list of integers >= 1"),
    ("training.topk", [10, 2.5], "training.topk must be a non-empty list of integers >= 1"),
    ("training.patience", 1.5, "training.patience must be an integer >= 1 or null"),
])
def test_malformed_run_json_fields_are_one_line(run_copy, tmp_path, capsys, field, value, message):
    description = json.loads((run_copy / "run.json").read_text())
    parent, _, key = field.rpartition(".")
    (description[parent] if parent else description)[key] = value
    (run_copy / "run.json").write_text(json.dumps(description))
    before = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file() and p.name != LOCK_NAME}
    commands = [["train", "--out", str(run_copy), "--resume", "--epochs", "2", "--no-progress"]]
    if not field.startswith("config") and field != "item_shards":  # what recommend reads of run.json
        commands.append(["recommend", str(run_copy), "--k", "2", "--output", str(tmp_path / "r.csv")])
    for argv in commands:
        assert main(argv) == 2
        line = _one_error_line(capsys)
        assert "run.json" in line and message in line, line
    after = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file() and p.name != LOCK_NAME}
    assert after == before and not (tmp_path / "r.csv").exists()


def test_a_fifo_as_the_runs_data_is_refused_without_hanging(run_copy, tmp_path):
    import subprocess
    import sys

    fifo = tmp_path / "ratings.fifo"
    os.mkfifo(fifo)
    description = json.loads((run_copy / "run.json").read_text())
    description["source"] = str(fifo)
    (run_copy / "run.json").write_text(json.dumps(description))
    for argv in (["recommend", str(run_copy), "--output", str(tmp_path / "r.csv")],
                 ["train", "--out", str(run_copy), "--resume", "--epochs", "2", "--no-progress"]):
        done = subprocess.run([sys.executable, "-m", "recvae_fast", *argv], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "not a regular file" in done.stderr


# --- resource sizes are bounded before anything is allocated or written ----------------------


def test_cutoffs_beyond_the_catalogue_are_refused(run_copy, tmp_path, capsys):
    from recvae_fast import evaluate, fit, load_model
    from recvae_fast.data import Split

    assert main(["evaluate", str(run_copy), "--topk", "3000000000"]) == 2
    assert "metric cut-off k=3000000000 is larger than the catalogue" in _one_error_line(capsys)
    out = tmp_path / "new"
    assert main(["train", "synthetic", "--out", str(out), "--topk", str(10**12), *TINY]) == 2
    assert "metric cut-off k=1000000000000 is larger than the catalogue" in _one_error_line(capsys)
    assert not out.exists()
    split = Split.load(run_copy)
    model = load_model(run_copy / "model.pt")
    with pytest.raises(ValueError, match="larger than the catalogue"):
        evaluate(model, split.test_in, split.test_out, ks=[10, 10**9])
    with pytest.raises(ValueError, match="larger than the catalogue"):
        fit(split.train, split.valid_in, split.valid_out, metric_ks=[10**9], n_epochs=1, hidden_dim=8, latent_dim=4)
    n_items = split.n_items
    assert set(evaluate(model, split.test_in, split.test_out, ks=[n_items])) == {  # the catalogue itself is fine
        f"ndcg@{n_items}", f"recall@{n_items}", "n_users"}


def test_threads_are_bounded(run_copy, tmp_path, capsys):
    for argv in (["evaluate", str(run_copy), "--threads", "100000"],
                 ["train", "synthetic", "--out", str(tmp_path / "new"), "--threads", "100000", *TINY]):
        assert main(argv) == 2
        assert "--threads must be at most" in _one_error_line(capsys)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("flag, value, name", [("--hidden-dim", 10**9, "hidden_dim"),
                                               ("--hidden-dim", 3 * 10**7, "hidden_dim"),
                                               ("--latent-dim", 2**31, "latent_dim")])
def test_huge_dims_are_refused_before_anything_is_written(tmp_path, capsys, flag, value, name):
    out = tmp_path / "new"
    argv = ["train", "synthetic", "--out", str(out), *TINY, flag, str(value)]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert f"{name}={value:,} is too large" in line and "available" in line
    assert not out.exists()


def test_api_sizes_are_checked_by_name():
    import scipy.sparse as sp

    from recvae_fast import fit

    with pytest.raises(ValueError, match=r"hidden_dim=1,000,000,000 is too large: the weights need .* available"):
        RecVAE(10**9, 4, 40)
    with pytest.raises(ValueError, match="input_dim=1,000,000,000,000 is too large"):
        RecVAE(8, 4, 10**12)
    with pytest.raises(ValueError, match="input_dim must be a positive integer, got 2.5"):
        RecVAE(8, 4, 2.5)
    with pytest.raises(ValueError, match="latent_dim must be a positive integer, got True"):
        RecVAE(8, True, 4)
    train = sp.random(20, 30, density=0.3, format="csr", random_state=0)
    with pytest.raises(ValueError, match=r"hidden_dim=1,000,000,000 is too large: training .* need"):
        fit(train, hidden_dim=10**9, n_epochs=1, progress=False)
    assert RecVAE(8, 4, np.int64(30)).input_dim == 30


# --- Ctrl-C at any moment ----------------------------------------------------------------------


@pytest.mark.parametrize("delay_s", [0.3, 1.0])
def test_ctrl_c_while_importing_is_one_line_and_130(tmp_path, delay_s):
    """SIGINT while `python -m recvae_fast` is still importing torch (or, later, training): one line, 130."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "recvae_fast", "train", "synthetic", "--out", str(tmp_path / "run"),
                             "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    time.sleep(delay_s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1 and "interrupted" in lines[0], (proc.returncode, err)


# --- found by attacking the finished work ------------------------------------------------------


class _PicklePayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_checkpoint_is_one_line_without_torch_warnings(run_copy, tmp_path, capsys):
    marker = tmp_path / "marker"
    (run_copy / "checkpoint.pt").write_bytes(pickle.dumps(_PicklePayload(marker), protocol=4))
    assert main(["train", "--out", str(run_copy), "--resume", "--epochs", "2", "--no-progress"]) == 2
    assert "checkpoint.pt is corrupt, truncated or not a safe tensor file" in _one_error_line(capsys)
    assert not marker.exists()


def test_integer_weights_are_refused(run_copy, capsys):
    weights = torch.load(run_copy / "model.pt", weights_only=True)
    weights["decoder.bias"] = weights["decoder.bias"].long()
    torch.save(weights, run_copy / "model.pt")
    assert main(["evaluate", str(run_copy)]) == 2
    assert "decoder.bias holds torch.int64 numbers, not floating-point weights" in _one_error_line(capsys)


@pytest.mark.parametrize("name", ["checkpoint.pt", "metrics.jsonl"])
def test_a_run_file_that_is_a_folder_is_refused_before_writing(run_copy, capsys, name):
    (run_copy / name).unlink()
    (run_copy / name).mkdir()
    before = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file() and p.name != LOCK_NAME}
    assert main(["train", "--out", str(run_copy), "--resume", "--epochs", "2", "--no-progress"]) == 2
    assert f"{name} is not a regular file" in _one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file() and p.name != LOCK_NAME} == before
