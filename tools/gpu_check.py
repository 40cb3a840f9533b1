"""The one GPU check: both Triton ops, then whole training steps, against the references.

    python tools/gpu_check.py            # on a CUDA machine (one call, a few minutes)
    python tools/gpu_check.py --tiny     # anywhere: tiny sizes, Triton interpreter on the CPU

0. Warm-up: every kernel variant the later parts launch is compiled (and autotuned) once on small
   inputs, with a progress line, so that the timed parts find them in the cache; then the
   precision checks: the multinomial NLL in fp32 ("highest" and tf32) and bf16 against a float64
   dense reference at K 200 and K 600, and the sparse input layer in bf16 and fp32, with
   tolerances that fit each precision.
1. kernels/multinomial_nll.py: float64 check at 1M items, timings at 20k / 1M / 3M items.
2. kernels/sparse_input_layer.py: checks at 1M and 4M items (rows past the 2^31 offset), timings at
   20k / 1M items, and the optimizer step (dense Adam vs the exact row-sparse Adam).
3. RecVAE: one encoder step (dense fc1 gradient, and row-sparse with RowSparseAdam) and one decoder
   step at the ML-20M shape (20,108 items, B 500, 75 items per user), recvae_fast.training.train_step
   against the authors' loop on the reference, after checking the Triton backend's loss against the
   reference's in float64.
4. torch.compile (CUDA only): RecVAE's loss in both phases with the Triton ops (registered with
   torch.library.triton_op, so Inductor sees the kernels through wrap_triton) compiled with
   fullgraph=True equals eager for the loss and every gradient (float64 and float32), and the
   compiled encoder and decoder steps are timed against eager.
5. bf16-mixed (torch.autocast with bf16, recvae_fast.precision): RecVAE's loss and every gradient with
   the Triton ops under autocast against float64, within 3x the reference's own error under the same
   autocast (+1e-5 of the scale); then the encoder and decoder steps (train_step, 32-true against
   bf16-mixed, same model and batch) and scoring + masked top-100 (recommend) at 20,108 and
   1,000,000 items, timed side by side, with their ratios.
Exits 1 when any correctness check failed (a summary line says which).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
TOOLS = os.path.dirname(os.path.abspath(__file__))
# Its sibling checks (gpu_check_*.py) and the benches' random batches (benches/batches.py).
sys.path[:0] = [TOOLS, os.path.join(os.path.dirname(TOOLS), "benches")]


def _median_ms(fn, reps: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


# Max error relative to the reference's largest magnitude, per input precision: tf32 rounds the dot
# operands to 11 significant bits (2^-11 ≈ 5e-4 per product), bf16 to 8 (≈ 4e-3), both with fp32
# accumulation; sums of hundreds of products land an order of magnitude above one product's error.
PRECISION_TOL = {"highest": 1e-4, "high": 1e-2, "bf16": 5e-2}


def _rel_err(got, want) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-300)).item()


def nll_precision_check(device, n_users, n_items, k, per_user, mode) -> tuple[float, dict]:
    """The fused NLL in `mode` ("highest", "high" = tf32, "bf16") against float64 dense autograd."""
    from gpu_check_multinomial_nll import dense_nll, make_batch, make_params

    from recvae_fast.kernels.multinomial_nll import multinomial_nll

    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if mode == "high" else "highest")
    try:
        batch = make_batch(n_users, n_items, per_user, dtype, device, seed=3)
        z, w, b, g = make_params(n_users, n_items, k, dtype, device, seed=3)
        leaves = [t.clone().requires_grad_() for t in (z, w, b)]
        out = multinomial_nll(*leaves, batch)
        grads = torch.autograd.grad(out, leaves, g)
    finally:
        torch.set_float32_matmul_precision(old)
    ref_leaves = [t.double().requires_grad_() for t in (z, w, b)]
    ref = dense_nll(*ref_leaves, batch.to_dense().double())
    ref_grads = torch.autograd.grad(ref, ref_leaves, g.double())
    errors = {name: _rel_err(got, want) for name, got, want in
              zip(("loss", "dz", "dWd", "dbd"), (out, *grads), (ref, *ref_grads))}
    return max(errors.values()), errors


def sil_precision_check(device, n_users, n_items, per_user, hidden, dtype) -> tuple[float, dict]:
    """The sparse input layer (dropout from a seed, dense dW1) against float64 dense autograd with
    the same keep mask."""
    from gpu_check_sparse_input_layer import make_batch

    from recvae_fast.kernels.sparse_input_layer import dropout_keep_mask, sparse_input_layer

    batch = make_batch(n_users, n_items, per_user, hidden, dtype, device, seed=4)
    gen = torch.Generator().manual_seed(4)
    w = (torch.randn(n_items, hidden, generator=gen) * 0.05).to(dtype).to(device)
    b = torch.randn(hidden, generator=gen).to(dtype).to(device)
    g = torch.randn(batch.n_rows, hidden, generator=gen).to(dtype).to(device)
    p, seed = 0.5, 11
    leaves = [t.clone().requires_grad_() for t in (w, b)]
    out = sparse_input_layer(batch, *leaves, dropout_rate=p, seed=seed)
    grads = torch.autograd.grad(out, leaves, g)
    keep = torch.zeros(batch.n_rows, batch.n_cols, dtype=torch.float64, device=device)
    keep[batch.row_ids(), batch.indices] = dropout_keep_mask(seed, batch.nnz, p, device).double()
    x = batch.to_dense().double()
    norm = x.norm(dim=1, keepdim=True)
    xn = x / torch.where(norm > 0, norm, torch.ones_like(norm)) * keep / (1 - p)
    ref_leaves = [t.double().requires_grad_() for t in (w, b)]
    ref = xn @ ref_leaves[0] + ref_leaves[1]
    ref_grads = torch.autograd.grad(ref, ref_leaves, g.double())
    errors = {name: _rel_err(got, want) for name, got, want in
              zip(("h1_pre", "dW1", "db1"), (out, *grads), (ref, *ref_grads))}
    return max(errors.values()), errors


def warm_up_and_check_precisions(tiny: bool) -> list[tuple]:
    """Part 0: compile every variant once (progress line per case), checking precision as it goes."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if tiny:
        nll_dims, sil_dims = dict(n_users=9, n_items=300, per_user=7), dict(n_users=9, n_items=300, per_user=7, hidden=24)
        ks = (24, 40)  # 40 stands in for K 600: a second BLOCK_K
    else:
        # The timed parts' batch shape (B 500, 20k items): triton specialises integer arguments on
        # divisibility by 16, so a different B would compile other variants than the ones timed.
        nll_dims = dict(n_users=500, n_items=20_000, per_user=75)
        sil_dims = dict(n_users=500, n_items=20_000, per_user=75, hidden=600)
        ks = (200, 600)
    cases = [("nll", k, mode) for k in ks for mode in ("highest", "high", "bf16")]
    if tiny:  # the interpreter is slow: the second K in one mode only
        cases = [c for c in cases if c[1] == ks[0] or c[2] == "high"]
    cases += [("sil", None, dtype) for dtype in (torch.float32, torch.bfloat16)]
    rows = [("ok", True)]
    start = time.perf_counter()
    for i, (op, k, mode) in enumerate(cases, 1):
        if op == "nll":
            worst, errors = nll_precision_check(device, k=k, mode=mode, **nll_dims)
            name, tol = f"multinomial NLL K={k} {mode}", PRECISION_TOL[mode]
        else:
            worst, errors = sil_precision_check(device, dtype=mode, **sil_dims)
            name = f"sparse input layer {str(mode).replace('torch.', '')}"
            tol = PRECISION_TOL["bf16" if mode == torch.bfloat16 else "highest"]
        sync()
        ok = worst <= tol
        rows[0] = ("ok", rows[0][1] and ok)
        rows.append((name, ok, errors))
        print(f"[{i}/{len(cases)} {time.perf_counter() - start:6.1f} s] {name}: "
              + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()) + f" (tol {tol:g}) {'OK' if ok else 'FAILED'}",
              flush=True)
    return rows


def model_steps(tiny: bool) -> list[tuple]:
    from batches import user_item_batch

    from recvae_fast import RecVAE
    from recvae_fast.testing.reference import VAE
    from recvae_fast.training import TrainConfig, make_optimizers, train_step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n_items, n_users, per_user, hidden, latent = (20_108, 500, 75, 600, 200) if not tiny else (97, 9, 5, 16, 8)
    ratings = user_item_batch(n_users, n_items, per_user)
    os.environ["RECVAE_FAST_IMPL"] = "triton"

    torch.manual_seed(0)
    fast64 = RecVAE(hidden, latent, n_items).double().to(device).eval()
    ref64 = VAE(hidden, latent, n_items).double().to(device).eval()
    ref64.load_state_dict(fast64.state_dict())
    loss = fast64(ratings, gamma=0.005)[1].item()
    loss_ref = ref64(torch.tensor(ratings.toarray(), dtype=torch.float64, device=device), gamma=0.005)[1].item()
    ok = abs(loss - loss_ref) <= 1e-9 * max(1.0, abs(loss_ref))
    out = [("model loss fp64 matches reference", ok, f"{loss:.12g} vs {loss_ref:.12g}")]
    del fast64, ref64

    fast = RecVAE(hidden, latent, n_items).to(device)
    ref = VAE(hidden, latent, n_items).to(device)
    ref.load_state_dict(fast.state_dict())
    cfg = TrainConfig(hidden_dim=hidden, latent_dim=latent)
    dense = torch.tensor(ratings.toarray(), device=device)
    reps = 3 if tiny else 20
    for case, module, dropout in (("encoder", ref.encoder, 0.5), ("encoder-sparse-fc1", ref.encoder, 0.5),
                                  ("decoder", ref.decoder, 0.0)):
        phase = case.split("-")[0]
        enc_opt, dec_opt = make_optimizers(fast, cfg.lr, sparse_fc1_grad=case == "encoder-sparse-fc1")
        opt = enc_opt if phase == "encoder" else dec_opt
        ref_opt = torch.optim.Adam(module.parameters(), lr=cfg.lr)

        def fast_step():
            train_step(fast, fast.as_batch(ratings), [opt], cfg, phase)

        def ref_step():
            ref_opt.zero_grad()
            ref(dense, gamma=cfg.gamma, dropout_rate=dropout)[1].backward()
            ref_opt.step()

        f_ms, r_ms = _median_ms(fast_step, reps, sync), _median_ms(ref_step, reps, sync)
        out.append((f"{case} step at {n_items} items (ms)", f"fast {f_ms:.2f}", f"reference {r_ms:.2f}",
                    f"{r_ms / f_ms:.2f}x"))
    for row in out:
        print(" | ".join(str(c) for c in row))
    return out


def compile_check(tiny: bool) -> list[tuple]:
    """Part 4: compiled (fullgraph) vs eager loss and gradients with impl "triton", then step times."""
    from batches import user_item_batch

    from recvae_fast import RecVAE

    if not torch.cuda.is_available():
        print("skipped: Inductor runs Triton kernels on CUDA only")
        return [("compile: skipped (no CUDA)", True)]
    device, sync = torch.device("cuda"), torch.cuda.synchronize
    n_items, n_users, per_user, hidden, latent = (20_108, 500, 75, 600, 200) if not tiny else (97, 9, 5, 16, 8)
    ratings = user_item_batch(n_users, n_items, per_user)

    def phase_loss(model, batch, phase, keep_mask, eps):
        mll, kld = model.loss_terms(batch, None, 0.005, 0.5 if phase == "encoder" else 0.0,
                                    with_kl=phase == "encoder", keep_mask=keep_mask, eps=eps)
        return -mll if kld is None else kld - mll

    def loss_and_grads(fn, model, batch, phase, keep_mask, eps):
        model.zero_grad(set_to_none=True)
        loss = fn(model, batch, phase, keep_mask, eps)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out, all_ok = [], True
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-3)):
        with _highest_fp32_precision():
            for phase in ("encoder", "decoder"):
                torch.manual_seed(0)
                model = RecVAE(hidden, latent, n_items, impl="triton").to(dtype).to(device).train()
                model.encoder.requires_grad_(phase == "encoder")
                model.decoder.requires_grad_(phase == "decoder")
                batch = model.as_batch(ratings)
                keep = torch.rand(batch.nnz, device=device) >= 0.5
                eps = torch.randn(n_users, latent, dtype=dtype, device=device)
                want_loss, want = loss_and_grads(phase_loss, model, batch, phase, keep, eps)
                torch._dynamo.reset()
                compiled = torch.compile(phase_loss, fullgraph=True)
                got_loss, got = loss_and_grads(compiled, model, batch, phase, keep, eps)
                err = max([_rel_err(got_loss, want_loss)] + [_rel_err(got[n], w) for n, w in want.items()])
                ok = got.keys() == want.keys() and err <= tol
                all_ok &= ok
                row = [f"compile {phase} {str(dtype)[6:]}: loss and {len(want)} grads vs eager", ok, f"rel err {err:.1e}"]
                if dtype == torch.float32:
                    reps = 3 if tiny else 20
                    c_ms = _median_ms(lambda: compiled(model, batch, phase, keep, eps).backward(), reps, sync)
                    e_ms = _median_ms(lambda: phase_loss(model, batch, phase, keep, eps).backward(), reps, sync)
                    row += [f"compiled {c_ms:.2f} ms", f"eager {e_ms:.2f} ms", f"{e_ms / c_ms:.2f}x"]
                out.append(tuple(row))
                print(" | ".join(str(c) for c in row))
    return [("compile", all_ok)] + out


def _rms_err(got, want) -> float:
    return (got.double() - want.double()).pow(2).mean().sqrt().item()


def mixed_precision_check(tiny: bool) -> list[tuple]:
    """Part 5: bf16-mixed loss and gradients (Triton ops under autocast) against float64 with the
    tolerance the reference earns under the same autocast, then step and scoring times, fp32 vs bf16."""
    from batches import user_item_batch

    from recvae_fast import RecVAE, recommend
    from recvae_fast.testing.reference import VAE
    from recvae_fast.training import TrainConfig, make_optimizers, train_step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n_items, n_users, per_user, hidden, latent = (20_108, 500, 75, 600, 200) if not tiny else (97, 9, 5, 16, 8)
    ratings = user_item_batch(n_users, n_items, per_user)
    dense = torch.tensor(ratings.toarray(), device=device)

    def loss_and_grads(model, x, autocast, **kwargs):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            (mll, kld), loss = model(x, gamma=0.005, dropout_rate=0.5, **kwargs)
        loss.backward()
        grads = {n.replace("weight_t", "weight"): (p.grad.t() if n.endswith("weight_t") else p.grad)
                 for n, p in model.named_parameters() if p.grad is not None}
        return {"mll": mll.detach(), "kld": kld.detach(), **grads}

    torch.manual_seed(0)
    fast = RecVAE(hidden, latent, n_items, impl="triton").to(device).train()
    ref, ref64 = VAE(hidden, latent, n_items).to(device).train(), VAE(hidden, latent, n_items).double().to(device)
    ref.load_state_dict(fast.state_dict())
    ref64.load_state_dict(fast.state_dict())
    ref64.train()
    gen = torch.Generator().manual_seed(1)
    mask = (torch.rand(ratings.shape, generator=gen) >= 0.5).float().to(device)
    eps = torch.randn(n_users, latent, generator=gen).to(device)
    batch = fast.as_batch(ratings)
    keep = mask[batch.row_ids(), batch.indices].bool()
    got = loss_and_grads(fast, ratings, True, keep_mask=keep, eps=eps)
    ref_ac = loss_and_grads(ref, dense.float(), True, dropout_mask=mask, eps=eps)
    exact = loss_and_grads(ref64, dense.double(), False, dropout_mask=mask.double(), eps=eps.double())
    ok, ratios = got.keys() == exact.keys(), {}
    for name, want in exact.items():
        scale = want.abs().max().item() or 1.0
        err, err_ref = _rms_err(got[name], want), _rms_err(ref_ac[name], want)
        ok &= got[name].dtype == torch.float32 and err <= 3 * err_ref + 1e-5 * scale
        ratios[name] = err / max(err_ref, 1e-30)
    worst = max(ratios, key=ratios.get)
    out = [("bf16-mixed loss and grads vs float64 (earned bound)", ok, f"{len(exact)} tensors, largest ours/ref "
            f"error ratio {ratios[worst]:.2f} ({worst})")]

    reps = 3 if tiny else 20
    for case_items in ((n_items,) if tiny else (n_items, 1_000_000)):
        case_ratings = ratings if case_items == n_items else user_item_batch(n_users, case_items, per_user)
        torch.manual_seed(0)
        model = RecVAE(hidden, latent, case_items, impl="triton").to(device).train()
        case_batch = model.as_batch(case_ratings)
        for phase in ("encoder", "decoder"):
            ms = {}
            for precision in ("32-true", "bf16-mixed"):
                cfg = TrainConfig(hidden_dim=hidden, latent_dim=latent, precision=precision, device=str(device))
                enc_opt, dec_opt = make_optimizers(model, cfg.lr)
                opt = enc_opt if phase == "encoder" else dec_opt
                ms[precision] = _median_ms(lambda: train_step(model, case_batch, [opt], cfg, phase), reps, sync)
            out.append((f"{phase} step at {case_items} items (ms)", f"32-true {ms['32-true']:.2f}",
                        f"bf16-mixed {ms['bf16-mixed']:.2f}", f"{ms['32-true'] / ms['bf16-mixed']:.2f}x"))
        model.eval()
        ms = {p: _median_ms(lambda p=p: recommend(model, case_ratings, k=min(100, case_items), precision=p), reps, sync)
              for p in ("32-true", "bf16-mixed")}
        out.append((f"scoring + top-100 at {case_items} items (ms)", f"32-true {ms['32-true']:.2f}",
                    f"bf16-mixed {ms['bf16-mixed']:.2f}", f"{ms['32-true'] / ms['bf16-mixed']:.2f}x"))
        del model
    for row in out:
        print(" | ".join(str(c) for c in row))
    return out


@contextlib.contextmanager
def _highest_fp32_precision():
    """fp32 products in full precision for the comparison (tf32 rounding would differ between paths)."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def main(tiny: bool = False) -> int:
    import gpu_check_multinomial_nll
    import gpu_check_sparse_input_layer

    print(f"torch {torch.__version__}, device: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (interpreter)'}")
    print("\n== warm-up compile and precision checks ==")
    precision_ok = warm_up_and_check_precisions(tiny)[0][1]
    print("\n== multinomial NLL ==")
    nll_ok = gpu_check_multinomial_nll.main(tiny=tiny)[0][1]
    print("\n== sparse input layer ==")
    sil_ok = gpu_check_sparse_input_layer.main(tiny=tiny)[0][1]
    print("\n== RecVAE training steps ==")
    model_ok = model_steps(tiny)[0][1]
    print("\n== torch.compile with the Triton ops ==")
    compile_ok = compile_check(tiny)[0][1]
    print("\n== bf16-mixed ==")
    mixed_ok = mixed_precision_check(tiny)[0][1]
    verdicts = {"precisions": precision_ok, "multinomial NLL": nll_ok, "sparse input layer": sil_ok,
                "RecVAE loss": model_ok, "compile": compile_ok, "bf16-mixed": mixed_ok}
    print("\ncorrectness: " + ", ".join(f"{k} {'OK' if v else 'FAILED'}" for k, v in verdicts.items()))
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes; runs on the CPU under the Triton interpreter")
    sys.exit(main(parser.parse_args().tiny))
