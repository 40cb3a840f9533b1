"""The op contract (recvae_fast.ops): one rule picks each op's implementation."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from recvae_fast import ops

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


@pytest.fixture(autouse=True)
def no_env_choice(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)


def test_defaults_by_device():
    assert {op: ops.resolve_impl(op, None, CUDA) for op in ops.OP_IMPLS} == {
        "sparse_input_layer": "triton", "multinomial_nll": "triton",
        "topk_masked": "torch", "row_sparse_adam": "triton",
    }
    assert {op: ops.resolve_impl(op, None, CPU, torch.float32) for op in ops.OP_IMPLS} == {
        "sparse_input_layer": "torch", "multinomial_nll": "torch",
        "topk_masked": "cpp", "row_sparse_adam": "cpp",
    }
    # The C++ Adam step takes float32/float64 only: other CPU dtypes default to torch.
    assert ops.resolve_impl("row_sparse_adam", None, CPU, torch.float16) == "torch"
    assert ops.resolve_impl("topk_masked", None, CPU, torch.bfloat16) == "cpp"
    # Any other device: the plain torch ops.
    assert all(ops.resolve_impl(op, None, torch.device("meta")) == "torch" for op in ops.OP_IMPLS)


@pytest.mark.parametrize("value", ["", "auto", " AUTO "])
def test_env_unset_or_auto_keeps_the_device_default(monkeypatch, value):
    monkeypatch.setenv(ops.ENV_VAR, value)
    assert ops.resolve_impl("topk_masked", None, CPU) == "cpp"
    assert ops.resolve_impl("multinomial_nll", None, CUDA) == "triton"


def test_env_changes_only_the_default(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    assert all(ops.resolve_impl(op, None, dev) == "torch" for op in ops.OP_IMPLS for dev in (CPU, CUDA))
    assert ops.resolve_impl("topk_masked", "cpp", CPU) == "cpp"  # an explicit impl wins
    monkeypatch.setenv(ops.ENV_VAR, "cpp")  # ops without a C++ code keep their device default
    assert ops.resolve_impl("multinomial_nll", None, CPU) == "torch"
    assert ops.resolve_impl("row_sparse_adam", None, CPU) == "cpp"
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    assert ops.resolve_impl("topk_masked", None, CUDA) == "torch"
    monkeypatch.setenv(ops.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="RECVAE_FAST_IMPL must be one of"):
        ops.resolve_impl("topk_masked", None, CPU)


def test_errors_name_the_problem(monkeypatch):
    with pytest.raises(ValueError, match="topk_masked has no implementation 'triton'"):
        ops.resolve_impl("topk_masked", "triton", CUDA)
    with pytest.raises(ValueError, match=r"no implementation 'fast' \(unknown implementation\)"):
        ops.resolve_impl("multinomial_nll", "fast", CPU)
    with pytest.raises(ValueError, match="'cpp' runs on CPU tensors"):
        ops.resolve_impl("row_sparse_adam", "cpp", CUDA)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.resolve_impl("sparse_input_layer", "triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.resolve_impl("sparse_input_layer", "triton", CPU) == "triton"


def test_importing_the_package_loads_no_extension_nor_oracle():
    code = (
        "import sys, recvae_fast\n"
        "loaded = [m for m in ('recvae_fast._topk', 'recvae_fast._row_sparse_adam', 'recvae_fast.testing.reference',"
        " 'triton') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "import numpy as np\n"
        "recvae_fast.topk_masked(np.zeros((2, 3), np.float32), None, 1)\n"
        "assert 'recvae_fast._topk' in sys.modules\n"
        "print('ok', recvae_fast.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ") and out.stdout.split()[1] != "unknown"


def test_public_names():
    import recvae_fast

    assert sorted(recvae_fast.__all__) == sorted([
        "RecVAE", "fit", "load_model", "evaluate", "recommend", "load_run", "TrainedRun", "recommend_for_items",
        "tune",
        "topk_masked", "TopK", "TopKAccumulator", "RowSparseAdam",
    ])
    assert all(hasattr(recvae_fast, name) for name in recvae_fast.__all__)
