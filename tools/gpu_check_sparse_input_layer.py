"""GPU check of the sparse encoder input layer (kernels/sparse_input_layer.py).

    python tools/gpu_check_sparse_input_layer.py            # on a CUDA machine
    python tools/gpu_check_sparse_input_layer.py --tiny     # anywhere: tiny sizes (interpreter on CPU)

1. Correctness, dropout 0.5 with the mask from `dropout_keep_mask`, weighted input with an empty
   and a one-item user and popular (power-law) items:
   - 1M items: the op (float64 and float32) against the dense path in float64
     (x/‖x‖ · mask/(1−p) @ W1 + b1, autograd): h1_pre, dense dW1, row-sparse dW1, db1; dW1 with
     both grad methods (segment reduction, the default, and atomic scatter: "... atomic" keys).
   - 4M items (W1 float32 is 9.6 GB; a dense B × I input would be 8 GB): against a float64
     reference that gathers only the nonzeros' rows (index_add), with items past the 2³¹-element
     offset (item > 2³¹/H) in the batch; checks their rows separately, and that dense dW1 is
     exactly zero outside the batch's items; both grad methods.
2. Speed, B = 500, H = 600, ~75 items per user, float32, at 20k and 1M items (ms, median):
     fused fwd          forward only, dropout 0, no grad (the prior's old encoder)
     fused dense dW     forward + backward, dropout 0.5, dense I × H dW1 (+ db1), segment reduction
     fused sparse dW    forward + backward, dropout 0.5, row-sparse dW1 (torch sparse COO), segment
     fused ... atomic   the same two with grad_method="atomic" (zero fill + atomic scatter)
     torch_ops          recvae_fast.ops.sparse_input_layer, impl "torch" (embedding_bag) forward + backward
     dense torch        x dense → normalise → dropout → addmm → backward (x given, not timed)
   Goal (H100): fused forward + backward under 0.3 ms at 1M items, optimizer excluded.
   Per layout, the faster grad method is printed ("dense dW: segment … ms vs atomic … ms → …"):
   the op's default (segment) must follow that measurement.
3. Optimizer step at 1M items: torch.optim.Adam (foreach, fused) on the dense grad vs
   adam_step_row_sparse_ (exact Adam, one pass over param and moments) on the row-sparse grad.
The first call at each shape includes Triton's autotuning (warm-up, not timed).
`main(tiny)` is the entry point for tools/gpu_check.py; it returns the rows it printed, and
`main(...)[0]` is ("ok", bool) — False when a correctness check failed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

N_USERS, HIDDEN, ITEMS_PER_USER, P = 500, 600, 75, 0.5
SPEED_SIZES = (20_000, 1_000_000)
GOAL_MS = 0.3


def _prepare_interpreter(device: torch.device) -> None:
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        raise RuntimeError("no CUDA: set TRITON_INTERPRET=1 before triton is imported to run --tiny on the CPU")
    os.environ["TRITON_INTERPRET"] = "1"


def make_batch(n_users, n_items, per_user, hidden, dtype, device, seed=0, weighted=True):
    """A CSRBatch, ~per_user items per user: half of the draws power-law popular (a head of items
    shared by many users), half uniform over all ids; user 1 empty, user 2 one item; users 0 and 3
    hold the last items and the first item whose row starts at or past element 2³¹ of W1."""
    import numpy as np
    import scipy.sparse as sp

    from recvae_fast.sparse import as_csr_batch

    rng = np.random.default_rng(seed)
    counts = rng.integers(max(1, per_user // 2), max(2, 3 * per_user // 2), n_users)
    if n_users > 3:
        counts[1], counts[2] = 0, 1
    rows = np.repeat(np.arange(n_users), counts)
    n = rows.size
    popular = np.minimum((n_items * rng.random(n) ** 3).astype(np.int64), n_items - 1)
    popular = (popular * 7919 + 13) % n_items  # scatter the head over the id range
    cols = np.where(rng.random(n) < 0.5, popular, rng.integers(0, n_items, n))
    extra_r, extra_c = [0, 0], [n_items - 1, n_items - 2]
    first_big = -(-(2**31) // hidden)  # ceil(2³¹ / H): its row offset is >= 2³¹
    if n_users > 3 and first_big < n_items:
        extra_r += [3, 3]
        extra_c += [first_big, max(first_big - 1, 0)]
    rows = np.concatenate([rows, extra_r])
    cols = np.concatenate([cols, extra_c])
    vals = (1 + 2 * rng.random(rows.size)) if weighted else np.ones(rows.size)
    x = sp.csr_matrix((vals, (rows, cols)), shape=(n_users, n_items))
    return as_csr_batch(x, n_items, dtype=dtype, device=device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return (a - b).abs().max().item() / (b.abs().max().item() + 1e-300) if b.numel() else 0.0


# ----------------------------------------------------------------------------------------------
# 1. Correctness
# ----------------------------------------------------------------------------------------------
def _run_op(sil, batch, w, b, g, seed, sparse_grad, grad_method="segment"):
    w = w.detach().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    out = sil.sparse_input_layer(batch, w, b, dropout_rate=P, seed=seed, sparse_grad=sparse_grad,
                                 grad_method=grad_method)
    out.backward(g)
    grad_w, w.grad = w.grad, None
    return out.detach(), grad_w, b.grad


def check_vs_dense(device, n_users, n_items, per_user, hidden, seed=1):
    """Errors (relative to the largest reference magnitude) at a size where x can be dense."""
    import recvae_fast.kernels.sparse_input_layer as sil

    batch64 = make_batch(n_users, n_items, per_user, hidden, torch.float64, device, seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w64 = (torch.rand(n_items, hidden, generator=gen, dtype=torch.float64) * 2 - 1).to(device)
    b64 = torch.randn(hidden, generator=gen, dtype=torch.float64).to(device)
    g64 = torch.randn(n_users, hidden, generator=gen, dtype=torch.float64).to(device)
    keep = sil.dropout_keep_mask(seed, batch64.nnz, P, device)

    # The dense path, float64.
    x = batch64.to_dense()
    mask = torch.zeros_like(x)
    mask[batch64.row_ids(), batch64.indices] = keep.double()
    norm = x.norm(dim=1, keepdim=True)
    xd = x / torch.where(norm > 0, norm, torch.ones_like(norm)) * mask / (1 - P)
    del x, mask
    wr, br = w64.clone().requires_grad_(True), b64.clone().requires_grad_(True)
    ref = torch.addmm(br, xd, wr)
    ref.backward(g64)
    del xd
    ref_out, ref_dw, ref_db = ref.detach(), wr.grad, br.grad
    del wr

    errors = {}
    for dtype in (torch.float64, torch.float32):
        from recvae_fast.sparse import CSRBatch

        batch = CSRBatch(batch64.indptr, batch64.indices, batch64.values.to(dtype), n_items)
        w, b, g = w64.to(dtype), b64.to(dtype), g64.to(dtype)
        name = "fp64" if dtype == torch.float64 else "fp32"
        out, dw, db = _run_op(sil, batch, w, b, g, seed, False)
        errors[f"{name} h1_pre"] = _rel(out, ref_out)
        errors[f"{name} db1"] = _rel(db, ref_db)
        del dw
        for method, suffix in (("segment", ""), ("atomic", " atomic")):
            _, dw, _ = _run_op(sil, batch, w, b, g, seed, False, method)
            errors[f"{name} dW1 dense{suffix}"] = _rel(dw, ref_dw)
            del dw
            _, dws, _ = _run_op(sil, batch, w, b, g, seed, True, method)
            dws = dws.coalesce()
            same_rows = torch.equal(dws.indices()[0], torch.unique(batch.indices))
            errors[f"{name} dW1 row-sparse{suffix}"] = max(_rel(dws.values(), ref_dw[dws.indices()[0]]),
                                                           0.0 if same_rows else 1.0)
            del dws
        del w
        _sync(device)
    return errors


def check_by_gather(device, n_users, n_items, per_user, hidden, seed=2):
    """Errors against a float64 reference built from the gathered rows only (no dense B × I)."""
    import recvae_fast.kernels.sparse_input_layer as sil

    batch = make_batch(n_users, n_items, per_user, hidden, torch.float32, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.empty(n_items, hidden, device=device).uniform_(-1, 1, generator=gen)
    b = torch.randn(hidden, device=device, generator=gen)
    g = torch.randn(n_users, hidden, device=device, generator=gen)
    keep = sil.dropout_keep_mask(seed, batch.nnz, P, device)

    rows, items, vals = batch.row_ids(), batch.indices, batch.values.double()
    sq = torch.zeros(n_users, dtype=torch.float64, device=device).index_add_(0, rows, vals * vals)
    norm = sq.sqrt()
    c = vals / torch.where(norm > 0, norm, torch.ones_like(norm))[rows] * keep.double() / (1 - P)
    ref_out = b.double() + torch.zeros(n_users, hidden, dtype=torch.float64, device=device).index_add_(
        0, rows, c[:, None] * w[items].double())
    uniq, inverse = torch.unique(items, return_inverse=True)
    ref_rows = torch.zeros(uniq.numel(), hidden, dtype=torch.float64, device=device).index_add_(
        0, inverse, c[:, None] * g[rows].double())
    big = uniq * hidden >= 2**31
    n_big = int(big.sum())

    errors = {}
    for method, suffix in (("segment", ""), ("atomic", " atomic")):
        out, dw, db = _run_op(sil, batch, w, b, g, seed, False, method)
        if method == "segment":
            errors["h1_pre"] = _rel(out, ref_out)
            errors["db1"] = _rel(db, g.double().sum(0))
        got_rows = dw[uniq]
        errors[f"dW1 dense{suffix} (batch rows)"] = _rel(got_rows, ref_rows)
        if n_big:
            errors[f"dW1 dense{suffix} (rows past 2^31, {n_big})"] = _rel(got_rows[big], ref_rows[big])
            if method == "segment":
                users_big = torch.unique(rows[big[inverse]])
                errors["h1_pre (users with such rows)"] = _rel(out[users_big], ref_out[users_big])
        dw.index_fill_(0, uniq, 0)
        errors[f"dW1 dense{suffix} nonzeros elsewhere"] = float(torch.count_nonzero(dw).item())
        del dw, got_rows
        _, dws, _ = _run_op(sil, batch, w, b, g, seed, True, method)
        dws = dws.coalesce()
        same_rows = torch.equal(dws.indices()[0], uniq)
        errors[f"dW1 row-sparse{suffix}"] = _rel(dws.values(), ref_rows) if same_rows else float("inf")
        del dws
        _sync(device)
    return errors, n_big


# ----------------------------------------------------------------------------------------------
# 2./3. Speed
# ----------------------------------------------------------------------------------------------
def timed(fn, device, reps, warmup=2):
    """Median seconds per call (CUDA events on a GPU); 'OOM' when memory runs out."""
    try:
        for _ in range(warmup):
            fn()
        _sync(device)
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"


def bench_size(device, n_items, reps, n_users=N_USERS, hidden=HIDDEN, per_user=ITEMS_PER_USER, with_adam=False):
    import recvae_fast.kernels.sparse_input_layer as sil
    from recvae_fast.ops.sparse_input_layer import sparse_input_layer

    batch = make_batch(n_users, n_items, per_user, hidden, torch.float32, device, seed=3, weighted=False)
    gen = torch.Generator(device=device).manual_seed(3)
    w = torch.empty(n_items, hidden, device=device).uniform_(-1e-3, 1e-3, generator=gen).requires_grad_(True)
    b = torch.zeros(hidden, device=device, requires_grad=True)
    g = torch.randn(n_users, hidden, device=device, generator=gen)
    rows = []

    def fused_fwd():
        with torch.no_grad():
            sil.sparse_input_layer(batch, w, b, 0.0)

    def fused(sparse, method="segment"):
        def run():
            w.grad = b.grad = None
            sil.sparse_input_layer(batch, w, b, P, sparse_grad=sparse, grad_method=method).backward(g)
        return run

    def torch_op():
        w.grad = b.grad = None
        sparse_input_layer(batch, w, b, P, impl="torch").backward(g)

    rows.append(("fused fwd", timed(fused_fwd, device, reps)))
    rows.append(("fused dense dW", timed(fused(False), device, reps)))
    rows.append(("fused dense dW atomic", timed(fused(False, "atomic"), device, reps)))
    rows.append(("fused sparse dW", timed(fused(True), device, reps)))
    rows.append(("fused sparse dW atomic", timed(fused(True, "atomic"), device, reps)))
    rows.append(("torch_ops", timed(torch_op, device, reps)))

    try:
        x = batch.to_dense()
        norm = x.norm(dim=1, keepdim=True).clamp_min_(1e-30)
        x_ok = True
    except torch.cuda.OutOfMemoryError:
        x_ok = False
    if x_ok:
        def dense():
            w.grad = b.grad = None
            mask = torch.rand_like(x) >= P
            xd = x / norm * mask / (1 - P)
            torch.addmm(b, xd, w).backward(g)
        rows.append(("dense torch", timed(dense, device, max(3, reps // 4), warmup=1)))
        del x, norm
    else:
        rows.append(("dense torch", "OOM"))

    adam_rows = []
    if with_adam:
        # The same touched rows as a training step; moments start non-zero as mid-training.
        w.grad = None
        sil.sparse_input_layer(batch, w, b, P, sparse_grad=True).backward(g)
        sparse_grad = w.grad.coalesce()
        dense_grad = sparse_grad.to_dense()
        for kind in ("foreach", "fused"):
            param = w.detach().clone().requires_grad_(True)
            try:
                opt = torch.optim.Adam([param], lr=5e-4, **{kind: True})
            except (RuntimeError, TypeError, ValueError) as exc:  # e.g. fused unsupported here
                adam_rows.append((f"torch Adam {kind} (dense grad)", f"n/a ({type(exc).__name__})"))
                continue
            param.grad = dense_grad
            opt.step()  # creates the moments
            adam_rows.append((f"torch Adam {kind} (dense grad)", timed(opt.step, device, reps)))
            del opt, param
        param = w.detach().clone()
        m, v = torch.zeros_like(param), torch.zeros_like(param)
        step = [1]

        from recvae_fast.kernels.row_sparse_adam import adam_step_row_sparse_

        def sparse_adam():
            adam_step_row_sparse_(param, sparse_grad, m, v, step[0], lr=5e-4)
            step[0] += 1

        adam_rows.append(("adam_step_row_sparse_ (sparse grad)", timed(sparse_adam, device, reps)))
        del param, m, v, dense_grad
    del w
    return rows, adam_rows


def _fmt_t(t) -> str:
    return f"{t * 1e3:10.3f}" if isinstance(t, float) else f"{t:>10s}"


def method_verdicts(rows) -> list[tuple]:
    """Per gradient layout: (layout, segment time, atomic time, the faster grad method)."""
    by = dict(rows)
    out = []
    for layout, path in (("dense dW", "fused dense dW"), ("sparse dW", "fused sparse dW")):
        seg, atom = by[path], by[f"{path} atomic"]
        if isinstance(seg, float) and isinstance(atom, float):
            best = "segment" if seg <= atom else "atomic"
        elif isinstance(seg, float) or isinstance(atom, float):  # the other ran out of memory
            best = "segment" if isinstance(seg, float) else "atomic"
        else:
            best = "n/a"
        out.append((layout, seg, atom, best))
    return out


def _fmt_verdict(layout, seg, atom, best) -> str:
    def ms(t):
        return f"{t * 1e3:.3f} ms" if isinstance(t, float) else str(t)
    return f"{layout}: segment {ms(seg)} vs atomic {ms(atom)} → {best}"


def main(tiny: bool = False, sizes=None, reps=None) -> list[tuple]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not tiny:
        raise SystemExit("no CUDA device: run with --tiny (Triton interpreter on the CPU, tiny sizes)")
    _prepare_interpreter(device)
    old_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # exact fp32 products in the dense references
    table: list[tuple] = [("ok", True)]
    ok = True
    try:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
        print(f"device: {name}; torch {torch.__version__}")

        # 1. Correctness.
        if tiny:
            dense_chk = dict(n_users=12, n_items=3000, per_user=8, hidden=37)
            gather_chk = dict(n_users=12, n_items=5000, per_user=8, hidden=37)
        else:
            dense_chk = dict(n_users=N_USERS, n_items=1_000_000, per_user=ITEMS_PER_USER, hidden=HIDDEN)
            gather_chk = dict(n_users=N_USERS, n_items=4_000_000, per_user=ITEMS_PER_USER, hidden=HIDDEN)
        tol = {"fp64": 1e-10, "fp32": 1e-5}
        print(f"\ncorrectness vs the dense float64 path, B={dense_chk['n_users']} I={dense_chk['n_items']:,} "
              f"H={dense_chk['hidden']}, dropout {P} (mask from dropout_keep_mask)")
        for key, err in check_vs_dense(device, **dense_chk).items():
            good = err <= tol[key[:4]]
            ok &= good
            print(f"  {key:33s} rel err {err:.2e}  {'OK' if good else 'FAILED'}")
            table.append(("check_dense", dense_chk["n_items"], key, err, good))
        errors, n_big = check_by_gather(device, **gather_chk)
        print(f"\ncorrectness vs a float64 gather reference, B={gather_chk['n_users']} I={gather_chk['n_items']:,} "
              f"H={gather_chk['hidden']}, {n_big} batch items with row offset >= 2^31 (float32 op)")
        if not tiny and n_big == 0:
            ok = False
            print("  FAILED: the batch has no item past the 2^31 element offset")
        for key, err in errors.items():
            good = err == 0 if "elsewhere" in key else err <= 1e-5
            ok &= good
            print(f"  {key:43s} {'count' if 'elsewhere' in key else 'rel err'} {err:.2e}  {'OK' if good else 'FAILED'}")
            table.append(("check_gather", gather_chk["n_items"], key, err, good))

        # 2./3. Speed.
        sizes = sizes or ((500,) if tiny else SPEED_SIZES)
        reps = reps or (2 if tiny else 20)
        dims = dict(n_users=8, hidden=37, per_user=6) if tiny else {}
        if device.type != "cuda":
            print("\n(the CPU runs the kernels in the Triton interpreter: these timings only show that the script works)")
        print(f"\nforward + backward, B={dims.get('n_users', N_USERS)}, H={dims.get('hidden', HIDDEN)}, "
              f"~{dims.get('per_user', ITEMS_PER_USER)} items/user, float32 (matmul precision 'highest'); "
              f"ms = median of {reps} (dense: fewer)")
        header = f"{'items':>10s} {'path':>22s} {'ms':>10s} {'vs dense':>9s}"
        print(header)
        print("-" * len(header))
        adam_rows, verdicts = [], []
        for n_items in sizes:
            rows, adam = bench_size(device, n_items, reps, with_adam=(n_items == max(sizes)), **dims)
            adam_rows += [(n_items, *r) for r in adam]
            dense_t = dict(rows)["dense torch"]
            for path, t in rows:
                ratio = (f"{dense_t / t:8.1f}x" if isinstance(t, float) and isinstance(dense_t, float) and path != "dense torch"
                         else f"{'':>9s}")
                print(f"{n_items:>10,d} {path:>22s} {_fmt_t(t)} {ratio}")
                table.append(("speed", n_items, path, t))
            if n_items == max(sizes):
                by = dict(rows)
                for path in ("fused dense dW", "fused dense dW atomic", "fused sparse dW", "fused sparse dW atomic"):
                    t = by[path]
                    if isinstance(t, float):
                        verdict = "meets" if t * 1e3 < GOAL_MS else "misses"
                        print(f"{'':>10s} {'goal':>22s} {path}: {t * 1e3:.3f} ms ({verdict} the {GOAL_MS} ms goal)")
            for verdict in method_verdicts(rows):
                print(f"{'':>10s} {'grad method':>22s} {_fmt_verdict(*verdict)}")
                verdicts.append((n_items, *verdict))
                table.append(("grad_method", n_items, *verdict))
            print()
        print(f"optimizer step on fc1 ({max(sizes):,} × {dims.get('hidden', HIDDEN)}, float32)")
        header = f"{'items':>10s} {'step':>38s} {'ms':>10s}"
        print(header)
        print("-" * len(header))
        for n_items, path, t in adam_rows:
            print(f"{n_items:>10,d} {path:>38s} {_fmt_t(t)}")
            table.append(("adam", n_items, path, t))
        print("\ndW1 grad method, forward + backward (the op's default is segment; it must follow this):")
        for n_items, *verdict in verdicts:
            print(f"  {n_items:>10,d} items  {_fmt_verdict(*verdict)}")
    finally:
        torch.set_float32_matmul_precision(old_precision)
    table[0] = ("ok", ok)
    print(f"\ncorrectness: {'all OK' if ok else 'FAILED'}")
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes; runs on the CPU under the Triton interpreter")
    parser.add_argument("--sizes", type=lambda s: tuple(int(float(x)) for x in s.split(",")), default=None,
                        help="comma-separated item counts for the timings (default 20000,1e6)")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    result = main(tiny=args.tiny, sizes=args.sizes, reps=args.reps)
    sys.exit(0 if result[0][1] else 1)
