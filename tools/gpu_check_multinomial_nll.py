"""GPU check of the fused multinomial NLL (kernels/multinomial_nll.py).

    python tools/gpu_check_multinomial_nll.py            # on a CUDA machine
    python tools/gpu_check_multinomial_nll.py --tiny     # anywhere: tiny sizes (interpreter on CPU)

1. Correctness: the Triton op against the dense path in float64 at 1M items (loss, dz, dWd, dbd).
2. Speed and memory, B = 500, K = 200, ~75 items per user, at 20k / 1M / 3M items, per float32
   matmul precision ("highest" = exact fp32 products, "high" = tf32) and optionally bf16:
     fused all      fused op forward + backward, gradients of z, Wd and bd
     fused z        encoder phase (only z needs a gradient)
     fused Wd,bd    decoder phase (only the decoder needs gradients)
     dense          logits -> log_softmax -> ·X -> backward (torch, all gradients)
     3 products     z·Wdᵀ [B×I], G·Wd [B×K], Gᵀ·z [I×K] with cuBLAS (the floor of a fwd+bwd)
   Goal: fused all within 1.3x of the three products; extra peak memory (max_memory_allocated
   over what was allocated before the call) under 1% of the dense path's.
The first call at each shape includes Triton's autotuning (warm-up, not timed).
`main(tiny)` is the entry point for tools/gpu_check.py; it returns the rows it printed, and
`main(...)[0]` is ("ok", bool) — False when the float64 check failed (as in the sparse-input script).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

SIZES = (20_000, 1_000_000, 3_000_000)
N_USERS, LATENT, ITEMS_PER_USER = 500, 200, 75


def _prepare_interpreter(device: torch.device) -> None:
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        raise RuntimeError("no CUDA: set TRITON_INTERPRET=1 before triton is imported to run --tiny on the CPU")
    os.environ["TRITON_INTERPRET"] = "1"


def make_batch(n_users, n_items, per_user, dtype, device, seed=0):
    """A CSRBatch with about per_user items per user, weights in [1, 3) (duplicates summed)."""
    import numpy as np
    import scipy.sparse as sp

    from recvae_fast.sparse import as_csr_batch

    rng = np.random.default_rng(seed)
    counts = rng.integers(max(1, per_user // 2), max(2, 3 * per_user // 2), n_users)
    rows = np.repeat(np.arange(n_users), counts)
    cols = rng.integers(0, n_items, rows.size)
    vals = 1 + 2 * rng.random(rows.size)
    x = sp.csr_matrix((vals, (rows, cols)), shape=(n_users, n_items))
    return as_csr_batch(x, n_items, dtype=dtype, device=device)


def make_params(n_users, n_items, k, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = (torch.randn(n_users, k, generator=gen) * 2).to(dtype).to(device)
    w = (torch.randn(n_items, k, generator=gen) / k**0.5).to(dtype).to(device)
    b = (torch.randn(n_items, generator=gen) * 0.1).to(dtype).to(device)
    g = torch.randn(n_users, generator=gen).to(dtype).to(device)
    return z, w, b, g


def dense_nll(z, w, b, x_dense):
    return -(torch.log_softmax(torch.addmm(b, z, w.T), dim=-1) * x_dense).sum(-1)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps, warmup):
    """(median seconds, extra peak bytes or None); 'OOM' strings instead when memory runs out."""
    try:
        for _ in range(warmup):
            fn()
        _sync(device)
        peak = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), peak
    except torch.cuda.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return "OOM", "OOM"


def check_float64(device, n_users, n_items, k, per_user):
    """Max relative errors of the fused op against the dense path, all in float64."""
    from recvae_fast.kernels.multinomial_nll import multinomial_nll

    batch = make_batch(n_users, n_items, per_user, torch.float64, device, seed=1)
    z, w, b, g = make_params(n_users, n_items, k, torch.float64, device, seed=1)
    leaves = [t.clone().requires_grad_() for t in (z, w, b)]
    out = multinomial_nll(*leaves, batch)
    grads = torch.autograd.grad(out, leaves, g)
    del leaves
    ref_leaves = [t.clone().requires_grad_() for t in (z, w, b)]
    ref = dense_nll(*ref_leaves, batch.to_dense())
    ref_grads = torch.autograd.grad(ref, ref_leaves, g)
    errors = {}
    for name, got, want in zip(("loss", "dz", "dWd", "dbd"), (out, *grads), (ref, *ref_grads)):
        errors[name] = ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()
    return errors


def bench_size(device, n_items, mode, reps, n_users=N_USERS, k=LATENT, per_user=ITEMS_PER_USER):
    """Rows (name, seconds, extra peak bytes) for one catalogue size and one precision mode."""
    from recvae_fast.kernels.multinomial_nll import multinomial_nll

    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    torch.set_float32_matmul_precision("high" if mode == "high" else "highest")
    batch = make_batch(n_users, n_items, per_user, dtype, device)
    z, w, b, g = make_params(n_users, n_items, k, dtype, device)
    zg, wg, bg = (t.clone().requires_grad_() for t in (z, w, b))

    def fused(leaves):
        def run():
            out = multinomial_nll(*leaves, batch)
            torch.autograd.grad(out, [t for t in leaves if t.requires_grad], g)
        return run

    rows = []
    warm = 2
    rows.append(("fused all", *timed(fused((zg, wg, bg)), device, reps, warm)))
    rows.append(("fused z", *timed(fused((zg, w, b)), device, reps, warm)))
    rows.append(("fused Wd,bd", *timed(fused((z, wg, bg)), device, reps, warm)))

    try:
        x_dense = batch.to_dense()

        def dense():
            out = dense_nll(zg, wg, bg, x_dense)
            torch.autograd.grad(out, [zg, wg, bg], g)

        rows.append(("dense", *timed(dense, device, reps, 1)))
        del x_dense
    except torch.cuda.OutOfMemoryError:
        rows.append(("dense", "OOM", "OOM"))
    if device.type == "cuda":
        torch.cuda.empty_cache()

    try:
        big = torch.randn(n_users, n_items, device=device).to(dtype)

        def products():
            torch.mm(z, w.T)
            torch.mm(big, w)
            torch.mm(big.T, z)

        rows.append(("3 products", *timed(products, device, reps, 1)))
        del big
    except torch.cuda.OutOfMemoryError:
        rows.append(("3 products", "OOM", "OOM"))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _fmt_t(t):
    return f"{t * 1e3:10.2f}" if isinstance(t, float) else f"{t:>10s}"


def _fmt_m(m):
    if m is None:
        return f"{'-':>11s}"
    return f"{m / 2**20:11.1f}" if isinstance(m, int) else f"{m:>11s}"


def main(tiny: bool = False, sizes=None, modes=None, reps=None) -> list[tuple]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not tiny:
        raise SystemExit("no CUDA device: run with --tiny (Triton interpreter on the CPU, tiny sizes)")
    _prepare_interpreter(device)
    old_precision = torch.get_float32_matmul_precision()
    table: list[tuple] = [("ok", True)]
    try:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
        print(f"device: {name}; torch {torch.__version__}")

        if tiny:
            chk = dict(n_users=9, n_items=700, k=24, per_user=12)
        else:
            chk = dict(n_users=256, n_items=1_000_000, k=LATENT, per_user=ITEMS_PER_USER)
        errors = check_float64(device, **chk)
        ok = all(e < 1e-9 for e in errors.values())
        print(f"\nfloat64 check, B={chk['n_users']} I={chk['n_items']:,} K={chk['k']}: "
              + ", ".join(f"{k} rel err {v:.2e}" for k, v in errors.items()) + ("  OK" if ok else "  FAILED"))
        table[0] = ("ok", ok)
        table.append(("check_float64", chk["n_items"], errors, ok))

        sizes = sizes or ((300,) if tiny else SIZES)
        modes = modes or ("highest", "high")
        reps = reps or (2 if tiny else 5)
        dims = dict(n_users=8, k=16, per_user=6) if tiny else {}
        if device.type != "cuda":
            print("\n(the CPU runs the kernels in the Triton interpreter: these timings only show that the script works)")
        print(f"\nforward + backward, B={dims.get('n_users', N_USERS)}, K={dims.get('k', LATENT)}, "
              f"~{dims.get('per_user', ITEMS_PER_USER)} items/user; ms = median of {reps}; "
              "extra MiB = peak over the inputs")
        header = f"{'items':>10s} {'mode':>8s} {'path':>12s} {'ms':>10s} {'extra MiB':>11s} {'vs 3 prod':>10s} {'mem vs dense':>13s}"
        print(header)
        print("-" * len(header))
        for n_items in sizes:
            for mode in modes:
                rows = bench_size(device, n_items, mode, reps, **dims)
                by = {r[0]: r for r in rows}
                prod_t = by["3 products"][1]
                dense_m = by["dense"][2]
                for path, t, m in rows:
                    ratio = f"{t / prod_t:9.2f}x" if isinstance(t, float) and isinstance(prod_t, float) else f"{'-':>10s}"
                    rel = (f"{100 * m / dense_m:12.2f}%" if isinstance(m, int) and isinstance(dense_m, int) and dense_m > 0
                           else f"{'-':>13s}")
                    print(f"{n_items:>10,d} {mode:>8s} {path:>12s} {_fmt_t(t)} {_fmt_m(m)} {ratio} {rel}")
                    table.append((n_items, mode, path, t, m))
                fused_t = by["fused all"][1]
                if isinstance(fused_t, float) and isinstance(prod_t, float):
                    verdict = "meets" if fused_t <= 1.3 * prod_t else "misses"
                    print(f"{'':>10s} {'':>8s} {'goal':>12s} fused all / 3 products = {fused_t / prod_t:.2f}x "
                          f"({verdict} the 1.3x goal)")
                print()
    finally:
        torch.set_float32_matmul_precision(old_precision)
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes; runs on the CPU under the Triton interpreter")
    parser.add_argument("--sizes", type=lambda s: tuple(int(float(x)) for x in s.split(",")), default=None,
                        help="comma-separated item counts (default 20000,1e6,3e6)")
    parser.add_argument("--modes", type=lambda s: tuple(s.split(",")), default=None,
                        help="comma-separated from highest,high,bf16 (default highest,high)")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    result = main(tiny=args.tiny, sizes=args.sizes, modes=args.modes, reps=args.reps)
    sys.exit(0 if result[0][1] else 1)
