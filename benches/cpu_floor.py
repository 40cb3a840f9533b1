"""The CPU floor of the multinomial NLL and of scoring: the products it cannot avoid, each done in
the best item block of a sweep (the B × block output stays in cache), and one exp over B × I,
each timed alone. Shared by bench_cpu_floor.py and bench_scoring.py."""
from __future__ import annotations

import os
import time

import torch

SWEEP = (256, 512, 1024, 2048, 4096)


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


def grad_weight_product(z, weight, block: int):
    """dWd_block = G_blockᵀ·z for every block (the decoder phase's second product)."""
    tile = torch.rand(z.shape[0], block, dtype=z.dtype)
    grad = torch.empty_like(weight)

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


def best_over_blocks(make, repeats: int, blocks=SWEEP) -> tuple[float, int]:
    """(best time, its block) of make(block)() over the block sweep."""
    return min((best_time(make(b), repeats), b) for b in blocks)


def nll_floor(z, weight, bias, phase: str, repeats: int, blocks=SWEEP) -> dict:
    """Seconds of the floor parts for one phase: logits product, the phase's second product
    (encoder: probs·Wd for dz; decoder: Gᵀz for dWd), one exp; and their sum under "floor"."""
    n_rows, n_items = z.shape[0], weight.shape[0]
    logits, _ = best_over_blocks(lambda b: logits_product(z, weight, bias, b), repeats, blocks)
    if phase == "encoder":
        second, _ = best_over_blocks(lambda b: probs_times_weight(z, weight, b), repeats, blocks)
    else:
        second, _ = best_over_blocks(lambda b: grad_weight_product(z, weight, b), repeats, blocks)
    exp, _ = best_over_blocks(lambda b: exp_pass(n_rows, n_items, b, z.dtype), repeats, blocks)
    return {"logits": logits, "second product": second, "exp": exp, "floor": logits + second + exp}


def encoder_products(n_rows: int, hidden: int, latent: int, phase: str, dtype=torch.float32, prior_forward=True):
    """The encoder MLP's dense products a training step of `phase` cannot avoid, timed as bare GEMMs
    on random inputs of the same shapes: per encoder forward, fc2..fc5 (B × H · H × H) and the two
    heads (B × H · H × K). Encoder phase: the encoder forward, its backward (dX and dW of each of
    those layers) and, with prior_forward, the prior's old encoder forward (fit reads it from its
    cache instead). Decoder phase: the encoder forward only."""
    x_h, x_k = torch.randn(n_rows, hidden, dtype=dtype), torch.randn(n_rows, latent, dtype=dtype)
    w_hh, w_kh = torch.randn(hidden, hidden, dtype=dtype), torch.randn(latent, hidden, dtype=dtype)
    out_bh, out_bk = torch.empty(n_rows, hidden, dtype=dtype), torch.empty(n_rows, latent, dtype=dtype)
    out_hh, out_kh = torch.empty(hidden, hidden, dtype=dtype), torch.empty(latent, hidden, dtype=dtype)
    forwards = 2 if phase == "encoder" and prior_forward else 1  # the encoder, and maybe the prior's copy

    def run():
        for _ in range(forwards):
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


def step_floor(z, weight, bias, hidden: int, phase: str, repeats: int, blocks=SWEEP) -> dict:
    """The floor of a whole training step of `phase` (the encoder or decoder half): the NLL floor
    (nll_floor), the encoder MLP's products (encoder_products) and one fused Adam step over the
    phase's parameters, each timed alone; their sum under "step floor". Encoder phase: also
    "cached step floor", without the prior's old-encoder products (the step as fit runs it)."""
    n_rows, latent = z.shape
    n_items = weight.shape[0]
    parts = nll_floor(z, weight, bias, phase, repeats, blocks)
    parts["MLP products"] = best_time(encoder_products(n_rows, hidden, latent, phase, z.dtype), repeats)
    if phase == "encoder":
        parts["MLP products, prior cached"] = best_time(
            encoder_products(n_rows, hidden, latent, phase, z.dtype, prior_forward=False), repeats)
        shapes = [(n_items, hidden), (hidden,)] + [(hidden, hidden), (hidden,)] * 4 + [(latent, hidden), (latent,)] * 2
        shapes += [(hidden,)] * 10  # the five LayerNorms
    else:
        shapes = [(n_items, latent), (n_items,)]
    parts["Adam"] = best_time(adam_step(shapes, z.dtype), repeats)
    parts["step floor"] = parts["floor"] + parts["MLP products"] + parts["Adam"]
    if phase == "encoder":
        parts["cached step floor"] = parts["floor"] + parts["MLP products, prior cached"] + parts["Adam"]
    return parts


def apply_bench_threads() -> None:
    """RECVAE_BENCH_THREADS=n: run on n torch threads (default: torch's own). On an overloaded
    machine one thread gives steadier figures than OpenMP teams waiting on descheduled threads."""
    threads = os.environ.get("RECVAE_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
