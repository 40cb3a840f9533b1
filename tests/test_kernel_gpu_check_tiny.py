"""tools/gpu_check.py (the one prepared GPU check) runs end to end on the CPU with --tiny, under
the Triton interpreter: a broken script would otherwise be found only on a GPU machine, where each
minute counts."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from recvae_fast.kernels._common import interpreter_numpy_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run tools/gpu_check.py itself"),
    pytest.mark.skipif(interpreter_numpy_problem() is not None, reason=str(interpreter_numpy_problem())),
]


def test_gpu_check_tiny_runs_and_passes_on_the_cpu():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--tiny"],
                         env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    out = run.stdout
    assert "[1/6" in out and "[6/6" in out, "the warm-up pass did not report its progress"
    assert "multinomial NLL K=24 high:" in out and "multinomial NLL K=24 bf16:" in out and "K=40 high" in out
    assert "sparse input layer bfloat16:" in out
    assert "correctness: precisions OK, multinomial NLL OK, sparse input layer OK, RecVAE loss OK" in out
    assert "bf16-mixed OK" in out and "scoring + top-100 at 97 items" in out
