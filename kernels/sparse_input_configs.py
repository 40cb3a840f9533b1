"""Tile configurations of the sparse encoder input layer's kernels (sparse_input_forward,
sparse_input_backward, sparse_input_backward_atomic).

Autotuning (GPU only): the keys are what changes the best tile: H, and power-of-two buckets of the
number of users or output rows (I for the dense gradient, U for the row-sparse one) and of the
nonzeros per user or per row.
"""
from __future__ import annotations

from ._common import INTERPRET
from ._common import config as _cfg

# ----------------------------------------------------------------------------------------------
# Tile configurations: a few, autotuned on GPUs; one small config in the interpreter so that the
# autotuner never benchmarks there. The forward and the segment backward write each of their
# outputs completely (nothing is accumulated into a caller's buffer), so autotuning's repeated
# launches are harmless; the atomic backward is handled in
# sparse_input_backward_atomic.launch.
# ----------------------------------------------------------------------------------------------
GPU_CONFIGS = {
    # H = 600 → 5 tiles of 128 (6.7 % padding) or 10 of 64; B ≈ 500 users → 2500–5000 programs.
    "fwd": [
        _cfg(4, 2, BLOCK_H=128, BLOCK_NZ=16),
        _cfg(4, 3, BLOCK_H=128, BLOCK_NZ=32),
        _cfg(2, 2, BLOCK_H=64, BLOCK_NZ=32),
        _cfg(4, 2, BLOCK_H=256, BLOCK_NZ=16),
        _cfg(8, 2, BLOCK_H=256, BLOCK_NZ=32),
    ],
    # Dense gradients are dominated by writing I × H (mostly zero rows: wide tiles, fewer programs);
    # row-sparse ones by the gather of dh1_pre (narrow row tiles, less one-hot waste).
    "bwd": [
        _cfg(4, 2, BLOCK_R=16, BLOCK_H=128, BLOCK_NZ=16),
        _cfg(4, 2, BLOCK_R=32, BLOCK_H=128, BLOCK_NZ=16),
        _cfg(8, 2, BLOCK_R=64, BLOCK_H=128, BLOCK_NZ=16),
        _cfg(4, 2, BLOCK_R=16, BLOCK_H=256, BLOCK_NZ=16),
        # 4 warps, not 2: with 2 the row-sparse gather hit 255 registers and spilled 84–100 B
        # (bf16 / fp16, triton 3.6, sm_90 and sm_80)
        _cfg(4, 2, BLOCK_R=16, BLOCK_H=64, BLOCK_NZ=32),
    ],
    # Atomic scatter: one program per (user, H tile), like the forward.
    "bwd_atomic": [
        _cfg(4, 1, BLOCK_H=128, BLOCK_NZ=16),
        _cfg(4, 1, BLOCK_H=128, BLOCK_NZ=32),
        _cfg(2, 1, BLOCK_H=64, BLOCK_NZ=32),
        _cfg(8, 1, BLOCK_H=256, BLOCK_NZ=16),
    ],
}
INTERPRETER_CONFIGS = {
    "fwd": [_cfg(4, 1, BLOCK_H=64, BLOCK_NZ=16)],
    "bwd": [_cfg(4, 1, BLOCK_R=16, BLOCK_H=64, BLOCK_NZ=16)],
    "bwd_atomic": [_cfg(4, 1, BLOCK_H=64, BLOCK_NZ=16)],
}
CONFIGS = INTERPRETER_CONFIGS if INTERPRET else GPU_CONFIGS
