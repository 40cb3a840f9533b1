"""Where a CPU training step's time goes, by op (torch.profiler), for benches/RESULTS.md.

    python tools/profile_cpu_steps.py --items 20108 --phase encoder [--nll-only] [--threads 1]

One warm-up step, then one profiled step: the whole train_step (the other half frozen, fc1's
gradient layout as fit chooses it; in the encoder phase with the prior's old posterior from fit's
cache, as fit runs it after its first pass, unless --prior-computed) or, with --nll-only, the multinomial NLL forward + backward for
the phase's gradients (B 500, ~75 items per user, H 600, K 200, float32). Prints the ops with the
most self CPU time. Not a pass/fail bench: the side-by-side figures are in bench_cpu_floor.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))  # the benches' step builders
from bench_cpu_floor import model_step, nll_inputs, nll_step  # noqa: E402


def profiled(fn, rows: int) -> str:
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_108)
    parser.add_argument("--phase", choices=["encoder", "decoder"], default="encoder")
    parser.add_argument("--nll-only", action="store_true", help="profile only the multinomial NLL forward + backward")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--prior-computed", action="store_true",
                        help="encoder phase: run the prior's old encoder in the step instead of reading fit's cache")
    parser.add_argument("--rows", type=int, default=12, help="ops to list")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.nll_only:
        batch, z, weight, bias = nll_inputs(args.items)
        fn = nll_step(batch, z, weight, bias, args.phase)
    else:
        steps = model_step(args.items, args.phase, with_authors=False)
        fn = steps["ours" if args.phase == "decoder" or args.prior_computed else "ours, prior cached"]
    what = "NLL fwd+bwd" if args.nll_only else "train_step"
    print(f"{what}, {args.phase} phase, {args.items} items, {torch.get_num_threads()} threads")
    print(profiled(fn, args.rows))


if __name__ == "__main__":
    main()
