"""training.run_epochs, the one epoch loop of every fit, driven by a scripted EpochRunner: the
schedule, validation and early stopping, best weights, checkpoints and resume, who writes; and the
one-device and item-sharded fits both train through it."""
from __future__ import annotations

import copy
import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from helpers import random_ratings

from recvae_fast import api, training
from recvae_fast.distributed import gather_full_state_dict
from recvae_fast.distributed import training as sharded_training
from recvae_fast.training import EpochRunner, FitInputs, TrainConfig, TrainState, run_epochs

N_USERS = 10
TIMES = ("time_s", "train_time_s", "users_per_s")


class Model(torch.nn.Module):
    """What the loop touches of a model: encoder, decoder (frozen by phase), update_prior, train/eval."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        self.prior_updates = 0

    def update_prior(self):
        self.prior_updates += 1


class ScriptedRunner:
    """An EpochRunner whose steps return a loss drawn from the runner's own generator (so that a
    resume that loses any random state shows), whose validation NDCG@100 comes from `ndcgs`, and
    whose checkpoints and 'weights' (a number bumped by every step) live in the dict `disk`."""

    def __init__(self, cfg: TrainConfig, ndcgs, disk: dict | None, *, patience=None, is_writer=True):
        self.inputs = FitInputs(cfg, sp.csr_matrix(np.ones((N_USERS, 3), dtype=np.float32)),
                                "valid_in", "valid_out", patience)
        self.model = Model()
        self.encoder_opt, self.decoder_opt = "encoder_opt", "decoder_opt"
        self.rng = np.random.default_rng(cfg.seed)
        self.noise = np.random.default_rng(cfg.seed + 1)
        self.posterior_cache = None
        self.state = TrainState()
        self.epoch_fields = {"fc1_grad": "scripted"}
        self.is_writer = is_writer
        self.ndcgs, self.disk = iter(ndcgs), disk
        self.weights, self.best = 0, None
        self.steps, self.losses, self.events = [], [], []

    def step(self, rows, phase, optimizers, fill):
        training.set_phase(self.model, phase != "decoder", phase != "encoder")  # as the real steps do
        self.steps.append((phase, tuple(rows), tuple(optimizers), self.model.training))
        self.weights += 1
        loss = float(self.noise.random())
        self.losses.append((phase, loss))
        return {"loss": loss}

    def batch_posterior(self, rows, source):
        raise AssertionError("no cache: never refilled")

    def evaluate(self):
        self.events.append("evaluate")
        return {"ndcg@100": next(self.ndcgs), "n_users": 3}

    def snapshot_best(self):
        self.best = self.weights

    def restore_best(self):
        self.events.append(("restore", self.best))
        if self.best is not None:
            self.weights = self.best

    def save_checkpoint(self):
        self.events.append(("save", self.state.epoch))
        if self.disk is not None:
            self.disk["checkpoint"] = copy.deepcopy((self.state, self.weights, self.best, self.rng.bit_generator.state,
                                                     self.noise.bit_generator.state))

    def load_checkpoint(self):
        state, self.weights, self.best, rng, noise = copy.deepcopy(self.disk["checkpoint"])
        self.state, self.rng.bit_generator.state, self.noise.bit_generator.state = state, rng, noise
        return "the checkpoint"


def _untimed(history):
    return [{k: v for k, v in record.items() if k not in TIMES} for record in history]


def test_the_runners_implement_every_member_of_the_protocol():
    methods = {name for name, value in vars(EpochRunner).items() if inspect.isfunction(value) and name[0] != "_"}
    assert methods == {"step", "batch_posterior", "evaluate", "snapshot_best", "restore_best", "save_checkpoint",
                       "load_checkpoint"}
    for runner in (training.OneDeviceRunner, sharded_training.ShardedRunner):
        assert all(inspect.isfunction(getattr(runner, name, None)) for name in methods), runner
        init = inspect.getsource(runner)  # every attribute is set by the runner (or is a class attribute)
        for name in set(EpochRunner.__annotations__):
            assert f"self.{name}" in init or f"{name} =" in init, (runner.__name__, name)


@pytest.mark.parametrize("not_alternating", [False, True])
def test_the_schedule_phases_and_records(not_alternating):
    cfg = TrainConfig(n_epochs=2, batch_size=4, n_enc_epochs=2, n_dec_epochs=1, not_alternating=not_alternating)
    runner = ScriptedRunner(cfg, [0.1, 0.2], None)
    history = run_epochs(runner, resume=False, log_path=None, progress=False, callback=None)
    phases = [("both", 1)] if not_alternating else [("encoder", 2), ("decoder", 1)]
    optimizers = {"both": ("encoder_opt", "decoder_opt"), "encoder": ("encoder_opt",), "decoder": ("decoder_opt",)}
    expected_phases = [phase for phase, passes in phases for _ in range(passes) for _ in range(3)] * 2  # 3 batches
    assert [step[0] for step in runner.steps] == expected_phases
    for phase, rows, opts, in_training in runner.steps:
        assert opts == optimizers[phase] and in_training
        assert list(rows) == sorted(rows) and len(rows) <= 4
    for start in range(0, len(runner.steps), 3):  # every pass sees every user once
        assert sorted(u for step in runner.steps[start:start + 3] for u in step[1]) == list(range(N_USERS))
    assert runner.model.prior_updates == (0 if not_alternating else 2)
    assert runner.model.encoder.weight.requires_grad and runner.model.decoder.weight.requires_grad  # unfrozen
    assert not runner.model.training  # eval mode at the end
    losses = [f"{phase}_loss" for phase, _ in phases]
    assert [list(r) for r in history] == [["epoch", "fc1_grad", *losses, "train_time_s", "users_per_s",
                                           "valid_ndcg@100", "valid_n_users", "time_s"]] * 2
    assert [r["valid_ndcg@100"] for r in history] == [0.1, 0.2] and history[0]["fc1_grad"] == "scripted"
    per_epoch = len(runner.losses) // 2
    for epoch, record in enumerate(history):  # each phase's loss: the mean over its batches of the epoch
        losses = runner.losses[epoch * per_epoch : (epoch + 1) * per_epoch]
        for phase, _ in phases:
            assert record[f"{phase}_loss"] == pytest.approx(np.mean([v for p, v in losses if p == phase]))


def test_early_stop_checkpoints_then_the_log_and_restores_the_best(tmp_path, capsys):
    cfg = TrainConfig(n_epochs=8, batch_size=4)
    ndcgs = [0.1, 0.3, 0.2, 0.25, 0.29, 0.5]  # best at epoch 2, then 3 epochs without improvement
    runner = ScriptedRunner(cfg, ndcgs, {}, patience=3)
    seen = []
    log = tmp_path / "logs" / "metrics.jsonl"
    history = run_epochs(runner, resume=False, log_path=log, progress="epochs", callback=seen.append)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5] and seen == history
    assert runner.state.best_epoch == 2 and runner.state.best_ndcg == 0.3 and runner.state.epoch == 5
    steps_per_epoch = len(runner.steps) // 5
    assert runner.best == 2 * steps_per_epoch  # the weights after epoch 2 were kept...
    assert runner.events[-1] == ("restore", runner.best) and runner.weights == runner.best  # ...and put back
    assert [e for e in runner.events if e != "evaluate"][:-1] == [("save", epoch) for epoch in range(1, 6)]
    assert [json.loads(line) for line in log.read_text().splitlines()] == json.loads(json.dumps(history))
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" | ")[0] for line in lines] == [f"epoch {e}/8" for e in range(1, 6)]
    assert lines[-1].endswith("| early stop: no better validation NDCG@100 for 3 epochs (best epoch 2)")
    assert all("early stop" not in line for line in lines[:-1])


def test_a_resumed_run_goes_on_as_the_uninterrupted_one(tmp_path):
    ndcgs = [0.1, 0.3, 0.2, 0.4, 0.35]
    full = ScriptedRunner(TrainConfig(n_epochs=5, batch_size=3), ndcgs, {})
    full_history = run_epochs(full, resume=False, log_path=None, progress=False, callback=None)

    disk = {}
    cut = ScriptedRunner(TrainConfig(n_epochs=2, batch_size=3), ndcgs[:2], disk)
    run_epochs(cut, resume=False, log_path=tmp_path / "log", progress=False, callback=None)
    resumed = ScriptedRunner(TrainConfig(n_epochs=5, batch_size=3, seed=7), ndcgs[2:], disk)  # seed: restored
    seen = []
    history = run_epochs(resumed, resume=True, log_path=tmp_path / "log", progress=False, callback=seen.append)
    assert _untimed(history) == _untimed(full_history) and seen == history[2:]
    assert resumed.steps == full.steps[len(cut.steps):]  # the same users in the same order
    assert resumed.weights == full.weights == full.best and resumed.state.best_epoch == 4
    assert len((tmp_path / "log").read_text().splitlines()) == 5


def test_a_stopped_run_stays_stopped_when_resumed():
    disk = {}
    stopped = ScriptedRunner(TrainConfig(n_epochs=6, batch_size=5), [0.5, 0.1, 0.2], disk, patience=2)
    assert len(run_epochs(stopped, resume=False, log_path=None, progress=False, callback=None)) == 3
    again = ScriptedRunner(TrainConfig(n_epochs=9, batch_size=5), [], disk, patience=2)
    history = run_epochs(again, resume=True, log_path=None, progress=False, callback=None)
    assert len(history) == 3 and again.steps == [] and again.weights == again.best == stopped.best


def test_only_the_writer_writes_the_log_and_the_lines(tmp_path, capsys):
    seen = []
    runner = ScriptedRunner(TrainConfig(n_epochs=2, batch_size=5), [0.1, 0.2], {}, is_writer=False)
    history = run_epochs(runner, resume=False, log_path=tmp_path / "logs" / "log", progress=True, callback=seen.append)
    assert not (tmp_path / "logs").exists() and capsys.readouterr() == ("", "")
    assert seen == history and ("save", 2) in runner.events  # every rank checkpoints and calls back


def test_one_device_and_sharded_fit_train_through_the_one_loop(monkeypatch, tmp_path):
    import torch.distributed as dist

    assert sharded_training.run_epochs is training.run_epochs
    runners = []

    def spy(runner, **options):
        runners.append(type(runner))
        return real(runner, **options)

    real = training.run_epochs
    monkeypatch.setattr(training, "run_epochs", spy)
    monkeypatch.setattr(sharded_training, "run_epochs", spy)
    train = random_ratings(12, 9, seed=3).astype(np.float32)
    options = dict(hidden_dim=4, latent_dim=2, batch_size=5, n_epochs=1, sparse_fc1_grad=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        one = api.fit(train, progress=False, **options)
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
        try:
            sharded = sharded_training.fit_sharded(train, item_shards=1, **options)
            full = gather_full_state_dict(sharded)
        finally:
            dist.destroy_process_group()
    finally:
        torch.set_default_dtype(default)
    assert runners == [training.OneDeviceRunner, sharded_training.ShardedRunner]
    assert _untimed(sharded.history) == [{**record, "item_shards": 1, "data_parallel": 1}
                                         for record in _untimed(one.history)]
    for key, value in one.model.state_dict().items():
        torch.testing.assert_close(full[key], value, rtol=1e-9, atol=1e-11, msg=key)


def test_the_one_device_fit_refuses_a_process_group(monkeypatch):
    """Inside a group, recvae_fast.fit trains the sharded model; training.fit, one device's, says so
    rather than train one copy per process."""
    monkeypatch.setattr(training, "process_group_size", lambda: 2)
    with pytest.raises(ValueError, match="inside a torch.distributed group .* train with recvae_fast.fit"):
        training.fit(random_ratings(12, 9, seed=3), n_epochs=1, progress=False)


def test_one_device_fit_evaluate_recommend_leave_distributed_unimported():
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from helpers import random_ratings
import recvae_fast
train = random_ratings(12, 9, seed=3)
model = recvae_fast.fit(train, hidden_dim=4, latent_dim=2, n_epochs=1, progress=False).model
recvae_fast.evaluate(model, train, train)
recvae_fast.recommend(model, train, k=3)
print(sorted(m for m in sys.modules if m.startswith("recvae_fast.distributed")))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
