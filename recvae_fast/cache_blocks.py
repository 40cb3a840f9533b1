"""Item block sizes for the CPU paths that stream a catalogue: the multinomial NLL
(recvae_fast.ops.multinomial_nll) and blocked scoring (recvae_fast.scoring).

Each block is a B × block tile of logits (or scores) that every step of the per-block pipeline
(product, max, exp, sum, second product, or the top-k merge) reads again; the tile is sized to
stay in the machine's L2 cache between those steps. Rule: one tile takes half of the L2 of the
cores torch uses (the other half holds the Wd rows and z), rounded down to a multiple of 64 items.
benches/bench_cpu_floor.py measures this choice against a sweep of block sizes.
"""
from __future__ import annotations

import functools
import os

import torch

_MIN_BLOCK, _MAX_BLOCK = 64, 1 << 16
_DEFAULT_L2_PER_CORE = 1 << 20  # when the OS does not say


@functools.lru_cache(maxsize=1)
def l2_bytes_per_core() -> int:
    """The L2 cache size of one core, from sysconf or /sys; 1 MiB when neither tells."""
    try:
        size = os.sysconf("SC_LEVEL2_CACHE_SIZE")
        if size and size > 0:
            return int(size)
    except (ValueError, OSError):
        pass
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            text = f.read().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        return _DEFAULT_L2_PER_CORE


def item_block_size(n_rows: int, itemsize: int) -> int:
    """Items per block so that an n_rows × block tile of `itemsize`-byte values fills half of the L2
    of torch's threads (each thread works on its own part of the tile)."""
    if n_rows < 0 or itemsize <= 0:
        raise ValueError(f"n_rows must be >= 0 and itemsize > 0, got {n_rows} and {itemsize}")
    budget = l2_bytes_per_core() * max(1, torch.get_num_threads()) // 2
    block = budget // (max(1, n_rows) * itemsize)
    return int(min(_MAX_BLOCK, max(_MIN_BLOCK, block // 64 * 64)))


# The decoder phase's kept blocks go to memory anyway (they are read back in backward), so its
# blocks need not fit half of L2: twice the rule measured 1–16% faster there in every sweep at 20k
# items, while the encoder phase and recomputing keep the rule.
KEPT_BLOCK_FACTOR = 2


def nll_block_size(n_rows: int, itemsize: int, keep_probs: bool) -> int:
    """Items per block of the CPU multinomial NLL: item_block_size, times KEPT_BLOCK_FACTOR when the
    decoder phase keeps each block's probabilities for backward."""
    block = item_block_size(n_rows, itemsize)
    return min(_MAX_BLOCK, block * KEPT_BLOCK_FACTOR) if keep_probs else block
