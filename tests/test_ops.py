"""The op contract (recvae_fast.ops.dispatch): one rule picks each op's implementation; the ops
package is laid out one module per op, each registering its own ops."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from recvae_fast.ops import dispatch as ops

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


@pytest.fixture(autouse=True)
def no_env_choice(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)


def test_defaults_by_device():
    assert {op: ops.resolve_impl(op, None, CUDA) for op in ops.OP_IMPLS} == {
        "sparse_input_layer": "triton", "multinomial_nll": "triton",
        "topk_masked": "torch", "row_sparse_adam": "triton",
        "swish_layer_norm": "torch", "composite_prior_kl": "torch",
    }
    # The CPU: every op's C++ code.
    assert {op: ops.resolve_impl(op, None, CPU, dtype) for op in ops.OP_IMPLS for dtype in (
        torch.float32, torch.float64)} == dict.fromkeys(ops.OP_IMPLS, "cpp")
    # The C++ code takes float32/float64 only (top-k: half precision too): other CPU dtypes default to torch.
    assert {op: ops.resolve_impl(op, None, CPU, torch.float16) for op in ops.OP_IMPLS} == {
        **dict.fromkeys(ops.OP_IMPLS, "torch"), "topk_masked": "cpp"}
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
    monkeypatch.setenv(ops.ENV_VAR, "cpp")
    assert ops.resolve_impl("multinomial_nll", None, CPU) == "cpp"
    with pytest.raises(TypeError, match="impl 'cpp' takes float32 or float64"):  # a choice, not a fallback
        ops.resolve_impl("multinomial_nll", None, CPU, torch.float16)
    monkeypatch.setenv(ops.ENV_VAR, "triton")  # ops without Triton code keep their device default
    assert ops.resolve_impl("topk_masked", None, CUDA) == "torch"
    assert ops.resolve_impl("swish_layer_norm", None, CPU) == "cpp"
    assert ops.resolve_impl("multinomial_nll", None, CUDA) == "triton"
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
    with pytest.raises(TypeError, match="composite_prior_kl: impl 'cpp' takes float32 or float64, got torch.bfloat16"):
        ops.resolve_impl("composite_prior_kl", "cpp", CPU, torch.bfloat16)
    with pytest.raises(ValueError, match="swish_layer_norm has no implementation 'triton'"):
        ops.resolve_impl("swish_layer_norm", "triton", CUDA)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.resolve_impl("sparse_input_layer", "triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.resolve_impl("sparse_input_layer", "triton", CPU) == "triton"


def test_a_models_impl_goes_to_each_op_that_has_it():
    assert ops.impl_for("multinomial_nll", "triton") == "triton"
    assert ops.impl_for("swish_layer_norm", "triton") is None  # no Triton code: its device default
    assert ops.impl_for("composite_prior_kl", "torch") == "torch"
    assert ops.impl_for("topk_masked", None) is None
    with pytest.raises(ValueError, match="no implementation 'fast'"):
        ops.impl_for("swish_layer_norm", "fast")


def test_low_precision_under_autocast_computes_in_float32():
    x = torch.zeros(2, dtype=torch.bfloat16)
    assert ops.compute_dtype(x) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.compute_dtype(x) == torch.float32
        assert ops.compute_dtype(x.double()) == torch.float64


def test_each_op_module_registers_its_ops_and_dispatch_imports_none():
    code = (
        "import sys, torch\n"
        "import recvae_fast.ops.dispatch\n"
        "assert not [m for m in sys.modules if m.startswith('recvae_fast.ops.') and m != 'recvae_fast.ops.dispatch']\n"
        "def registered(name):\n"
        "    return torch._C._dispatch_has_kernel(f'recvae_fast::{name}')\n"
        "assert not registered('multinomial_nll')\n"
        "import recvae_fast.ops.multinomial_nll\n"
        "assert registered('multinomial_nll') and registered('multinomial_nll_decoder_backward')\n"
        "assert not registered('swish_layer_norm') and not registered('topk_masked')\n"
        "for module, names in {'sparse_input_layer': ['sparse_input_layer', 'csr_row_sums', 'csr_transpose'],\n"
        "                      'swish_layer_norm': ['swish_layer_norm', 'swish_layer_norm_backward'],\n"
        "                      'composite_prior_kl': ['composite_prior_kl'], 'topk_masked': ['topk_masked'],\n"
        "                      'row_sparse_adam': ['row_sparse_adam_step']}.items():\n"
        "    __import__(f'recvae_fast.ops.{module}')\n"
        "    assert all(registered(n) for n in names), module\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "ok\n", out.stderr


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
