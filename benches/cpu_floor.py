"""The CPU floor of the multinomial NLL, of a training step and of scoring: the products they
cannot avoid, each done in the best item block of a sweep (the B × block output stays in cache),
one exp over B × I, and for a step the encoder MLP's products and one Adam step; each part timed
alone, in the same rounds as what it is the floor of (interleaved_best); beside a step's floor, a
square product, the machine's GEMM rate that the floor's products are read against. Shared by
bench_cpu_floor.py and bench_scoring.py."""
from __future__ import annotations

import os
import time

import torch

SWEEP = (256, 512, 1024, 2048, 4096)
SQUARE_SIDE = 1536  # square_product's n


def best_time(fn, repeats: int) -> float:
    """The fastest of `repeats` calls after one warm-up (the cores are shared: the minimum is the
    least disturbed run)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _blocks(n_items: int, block: int):
    return [(s, min(n_items, s + block)) for s in range(0, n_items, block)]


def logits_product(z, weight, bias, block: int):
    """z·Wdᵀ + bd block by block into one reused B × block buffer."""
    out = torch.empty(z.shape[0], block, dtype=z.dtype)

    def run():
        for s, e in _blocks(weight.shape[0], block):
            torch.addmm(bias[s:e], z, weight[s:e].t(), out=out[:, : e - s] if e - s == block else None)

    return run


def probs_times_weight(z, weight, block: int):
    """Σ_blocks P_block·Wd_block into B × K (the encoder phase's second product)."""
    tile = torch.rand(z.shape[0], block, dtype=z.dtype)
    acc = torch.zeros_like(z)

    def run():
        for s, e in _blocks(weight.shape[0], block):
            acc.addmm_(tile[:, : e - s], weight[s:e])

    return run


def grad_weight_product(z, weight, block: int, grad=None):
    """dWd_block = G_blockᵀ·z for every block (the decoder phase's second product), into `grad`
    (I × K; one shared by all block sizes of a sweep: at 1M items it is 800 MB)."""
    tile = torch.rand(z.shape[0], block, dtype=z.dtype)
    grad = torch.empty_like(weight) if grad is None else grad

    def run():
        for s, e in _blocks(weight.shape[0], block):
            torch.mm(tile[:, : e - s].t(), z, out=grad[s:e])

    return run


def exp_pass(n_rows: int, n_items: int, block: int, dtype=torch.float32):
    """One exp over B × I, a cache-resident B × block tile at a time."""
    src = torch.randn(n_rows, block, dtype=dtype)
    dst = torch.empty_like(src)

    def run():
        for s, e in _blocks(n_items, block):
            torch.exp(src[:, : e - s], out=dst[:, : e - s])

    return run


def square_product(n: int = SQUARE_SIDE, dtype=torch.float32):
    """One n × n · n × n product: the machine's dense GEMM rate, to read the floor's products
    against (their shapes have a short inner dimension, K, and stream the item weights)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)

    def run():
        torch.mm(a, b, out=out)

    return run


def interleaved_best(fns: dict, rounds: int) -> dict:
    """Best seconds of each callable in `fns` (same keys) over `rounds` rounds, after one warm-up call
    of each; every round calls each once, in turn. A disturbance of the shared cores then costs one
    round of everything rather than every repeat of one thing, and floors timed with the steps
    see the same machine as the steps."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def nll_floor_parts(z, weight, bias, phase: str, blocks=SWEEP) -> dict:
    """The NLL floor's parts to time, keyed (part, block): the logits product, the phase's second
    product (encoder: probs·Wd for dz; decoder: Gᵀz for dWd) and one exp, at each block size."""
    n_rows, n_items = z.shape[0], weight.shape[0]
    grad = torch.empty_like(weight) if phase == "decoder" else None
    parts = {}
    for b in blocks:
        parts["logits", b] = logits_product(z, weight, bias, b)
        if phase == "encoder":
            parts["second product", b] = probs_times_weight(z, weight, b)
        else:
            parts["second product", b] = grad_weight_product(z, weight, b, grad)
        parts["exp", b] = exp_pass(n_rows, n_items, b, z.dtype)
    return parts


def encoder_products(n_rows: int, hidden: int, latent: int, phase: str, dtype=torch.float32):
    """The encoder MLP's dense products a training step of `phase` cannot avoid, timed as bare GEMMs
    on random inputs of the same shapes: per encoder forward, fc2..fc5 (B × H · H × H) and the two
    heads (B × H · H × K). Encoder phase: the forward and its backward (dX and dW of each of those
    layers); decoder phase: the forward only, which is also what the prior's old encoder costs
    when an encoder step runs it."""
    x_h, x_k = torch.randn(n_rows, hidden, dtype=dtype), torch.randn(n_rows, latent, dtype=dtype)
    w_hh, w_kh = torch.randn(hidden, hidden, dtype=dtype), torch.randn(latent, hidden, dtype=dtype)
    out_bh, out_bk = torch.empty(n_rows, hidden, dtype=dtype), torch.empty(n_rows, latent, dtype=dtype)
    out_hh, out_kh = torch.empty(hidden, hidden, dtype=dtype), torch.empty(latent, hidden, dtype=dtype)

    def run():
        for _ in range(4):
            torch.mm(x_h, w_hh.t(), out=out_bh)
        for _ in range(2):
            torch.mm(x_h, w_kh.t(), out=out_bk)
        if phase == "encoder":
            for _ in range(4):
                torch.mm(x_h, w_hh, out=out_bh)  # dX
                torch.mm(x_h.t(), x_h, out=out_hh)  # dW
            for _ in range(2):
                torch.mm(x_k, w_kh, out=out_bh)
                torch.mm(x_k.t(), x_h, out=out_kh)

    return run


def adam_step(shapes, dtype=torch.float32):
    """One torch.optim.Adam(fused=True) step over parameters of these shapes, gradients given."""
    params = [torch.zeros(shape, dtype=dtype, requires_grad=True) for shape in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, dtype=dtype)
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    return opt.step


def step_floor_parts(z, weight, bias, hidden: int, phase: str, blocks=SWEEP) -> dict:
    """The parts of a whole training step's floor (the encoder or the decoder half) to time:
    nll_floor_parts, then keyed (part, 0): the encoder MLP's products (encoder_products), in the
    encoder phase the prior's old-encoder forward products apart, and one fused Adam step over the
    phase's parameters."""
    n_rows, latent = z.shape
    n_items = weight.shape[0]
    parts = nll_floor_parts(z, weight, bias, phase, blocks)
    parts["MLP products", 0] = encoder_products(n_rows, hidden, latent, phase, z.dtype)
    if phase == "encoder":
        parts["prior's products", 0] = encoder_products(n_rows, hidden, latent, "decoder", z.dtype)
        shapes = [(n_items, hidden), (hidden,)] + [(hidden, hidden), (hidden,)] * 4 + [(latent, hidden), (latent,)] * 2
        shapes += [(hidden,)] * 10  # the five LayerNorms
    else:
        shapes = [(n_items, latent), (n_items,)]
    parts["Adam", 0] = adam_step(shapes, z.dtype)
    parts["square product", 0] = square_product(dtype=z.dtype)  # not part of the floor: its GEMM rate
    return parts


def floors(times: dict) -> dict:
    """Seconds of each floor part, from `times` of the (part, block) keys of nll_floor_parts or
    step_floor_parts (other keys are ignored): each part at its best block, "floor" the NLL floor
    (logits + second product + exp) and, where step parts were timed, "step floor" (plus the MLP
    products, the prior's products if any, and Adam) and in the encoder phase "cached step floor",
    without the prior's products (the step as fit runs it, the old posterior read from its cache).
    A timed "square product" is passed through, outside every sum."""
    parts: dict = {}
    for key, seconds in times.items():
        if isinstance(key, tuple):
            parts[key[0]] = min(parts.get(key[0], float("inf")), seconds)
    out = dict(parts)
    out["floor"] = parts["logits"] + parts["second product"] + parts["exp"]
    if "MLP products" in parts:
        without_prior = out["floor"] + parts["MLP products"] + parts["Adam"]
        out["step floor"] = without_prior + parts.get("prior's products", 0.0)
        if "prior's products" in parts:
            out["cached step floor"] = without_prior
    return out


def apply_bench_threads() -> None:
    """RECVAE_BENCH_THREADS=n: run on n torch threads (default: torch's own). On an overloaded
    machine one thread gives steadier figures than OpenMP teams waiting on descheduled threads."""
    threads = os.environ.get("RECVAE_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
