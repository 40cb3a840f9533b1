"""The one GPU check: both Triton ops, then whole training steps, against the references.

    python benches/gpu_check.py            # on a CUDA machine (one call, a few minutes)
    python benches/gpu_check.py --tiny     # anywhere: tiny sizes, Triton interpreter on the CPU

1. kernels/multinomial_nll.py: float64 check at 1M items, timings at 20k / 1M / 3M items.
2. kernels/sparse_input_layer.py: checks at 1M and 4M items (rows past the 2^31 offset), timings at
   20k / 1M items, and the optimizer step (dense Adam vs the exact row-sparse Adam).
3. RecVAE: one encoder step (dense fc1 gradient, and row-sparse with RowSparseAdam) and one decoder
   step at the ML-20M shape (20,108 items, B 500, 75 items per user), recvae_fast.training.train_step
   against the authors' loop on the reference, after checking the Triton backend's loss against the
   reference's in float64.
Exits 1 when any correctness check of the three parts failed (a summary line says which).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


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


def model_steps(tiny: bool) -> list[tuple]:
    from batches import user_item_batch

    from recvae_fast import RecVAE
    from recvae_fast.reference import VAE
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


def main(tiny: bool = False) -> int:
    import gpu_check_multinomial_nll
    import gpu_check_sparse_input_layer

    print(f"torch {torch.__version__}, device: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (interpreter)'}")
    print("\n== multinomial NLL ==")
    nll_ok = gpu_check_multinomial_nll.main(tiny=tiny)[0][1]
    print("\n== sparse input layer ==")
    sil_ok = gpu_check_sparse_input_layer.main(tiny=tiny)[0][1]
    print("\n== RecVAE training steps ==")
    model_ok = model_steps(tiny)[0][1]
    verdicts = {"multinomial NLL": nll_ok, "sparse input layer": sil_ok, "RecVAE loss": model_ok}
    print("\ncorrectness: " + ", ".join(f"{k} {'OK' if v else 'FAILED'}" for k, v in verdicts.items()))
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes; runs on the CPU under the Triton interpreter")
    sys.exit(main(parser.parse_args().tiny))
