"""Offline GPU compile guard: the Triton kernels compile for sm_90 (and sm_80), fit shared memory
and stay under the spill budget (tools/compile_check.py says what is checked and why).

Runs tools/compile_check.py once per pytest run in a subprocess (the kernels must be compiled, not
interpreted, so TRITON_INTERPRET is removed there). Default level "quick": one variant per kernel,
its largest tiles; RECVAE_FAST_COMPILE_CHECK=sample or full runs more. Skipped only when the
installed triton has no ptxas. The triton 3.6 run: tools/compile_check_triton36.sh.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import recvae_fast.kernels.multinomial_nll as mnll
import recvae_fast.kernels.nll_configs as nll_configs
from recvae_fast.sparse import as_csr_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = ("nll_fwd", "nll_bwd", "nll_gather", "sil_fwd", "sil_bwd", "sil_bwd_atomic", "row_sparse_adam", "keep_mask")
LEVEL = os.environ.get("RECVAE_FAST_COMPILE_CHECK", "quick")


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return all(os.path.exists(get_ptxas(arch).path or "") for arch in (80, 90))
    except Exception:  # noqa: BLE001 - no nvidia backend in this triton
        return False


needs_ptxas = pytest.mark.skipif(not _ptxas_available(), reason="no ptxas in the installed triton wheel")


@pytest.fixture(scope="session")
def compile_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_check") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "compile_check.py"), "--level", LEVEL, "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=3600,
    )
    if not out.exists():
        pytest.fail(f"compile_check.py wrote no report (exit {run.returncode}):\n{run.stdout}\n{run.stderr[-3000:]}")
    report = json.loads(out.read_text())
    report["stdout"] = run.stdout
    return report


@needs_ptxas
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_compiles_fits_and_does_not_spill(compile_report, kernel):
    records = [r for r in compile_report["records"] if r["kernel"] == kernel]
    assert records, f"no variant of {kernel} was compiled"
    failed = [f"{r['name']}: {r['error']}" for r in records if not r["ok"]]
    assert not failed, "\n".join(failed)
    for r in records:  # the report holds real ptxas figures, not defaults
        assert r["registers"] > 0 and r["smem"] <= {90: 227 * 1024, 80: 163 * 1024}[r["arch"]]


@needs_ptxas
def test_every_checked_shape_has_a_fitting_config(compile_report):
    assert not compile_report["no_config"], "\n".join(compile_report["no_config"])


@pytest.mark.parametrize("smem_limit,arch", [(163 * 1024, 80), (227 * 1024, 90)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_prune_keeps_a_config_for_every_supported_k(kind, dtype, smem_limit, arch):
    """Every K up to MAX_K, both precisions of fp32, with and without the accumulator."""
    stationary, streamed = ("BLOCK_B", "BLOCK_I") if kind == "fwd" else ("BLOCK_I", "BLOCK_B")
    esize = torch.empty(0, dtype=dtype).element_size()
    fma_lists = (True, False) if dtype == torch.float32 else (dtype == torch.float64,)
    for fma in fma_lists:
        for k in (1, 16, 64, 200, 256, 257, 600, 1000, nll_configs.MAX_K[dtype]):
            if k > nll_configs.MAX_K[dtype]:
                continue
            for wide in (True, False):
                kept = nll_configs.fitting_configs(nll_configs.GPU_CONFIGS[kind, fma], nll_configs.block_k(k), esize, wide,
                                                   stationary, streamed, smem_limit, arch, fma)
                assert kept, f"{kind} {dtype} fma={fma} K={k} wide={wide}: no config fits sm_{arch}"


def test_k_beyond_the_limit_is_a_clear_error():
    for dtype, limit in mnll.MAX_K.items():
        z = torch.zeros(2, limit + 1, dtype=dtype)
        w = torch.zeros(3, limit + 1, dtype=dtype)
        batch = as_csr_batch(torch.ones(2, 3, dtype=dtype), 3, dtype=dtype)
        with pytest.raises(ValueError, match=f"K <= {limit}"):
            mnll.multinomial_nll(z, w, None, batch)
