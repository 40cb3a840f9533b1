"""Test NDCG@100 of bf16-mixed against 32-true: the CLI's main job (`recvae-fast train`, its
defaults) per seed and precision, the same seed giving both precisions the same split, weights
and batches, so that only the arithmetic differs. Prints each run and the means.

    python tools/quality_mixed_precision.py                  # embedded synthetic data, seeds 0 1 2
    python tools/quality_mixed_precision.py ml-100k.inter --rating-threshold 3.5 --epochs 20 --hidden-dim 64
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import warnings

from recvae_fast import cli
from recvae_fast.precision import PRECISIONS, SlowPrecisionWarning, cpu_flags_text


def test_ndcg(data: str, seed: int, precision: str, epochs: int | None, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        argv = ["train", data, "--out", out, "--seed", str(seed), "--precision", precision, "--json", "--no-progress",
                *extra] + (["--epochs", str(epochs)] if epochs else [])
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", SlowPrecisionWarning)
            code = cli.main(argv)
        if code != 0:
            raise SystemExit(f"train failed ({code}): {' '.join(argv)}")
        summary = json.loads(stdout.getvalue())
    return {"ndcg@100": summary["test"]["ndcg@100"], "wall_s": summary["wall_time_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default="synthetic")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--hidden-dim", type=int, default=None)
    parser.add_argument("--latent-dim", type=int, default=None)
    parser.add_argument("--rating-threshold", type=float, default=None)
    parser.add_argument("--lr", type=float, default=None)
    args = parser.parse_args()
    extra = []
    for flag in ("hidden_dim", "latent_dim", "rating_threshold", "lr"):
        if getattr(args, flag) is not None:
            extra += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    print(f"# data {args.data}, seeds {args.seeds}, flags {' '.join(extra) or 'none'}, epochs {args.epochs or 'default'}; "
          f"{cpu_flags_text()}")
    ndcg: dict = {precision: [] for precision in PRECISIONS}
    for seed in args.seeds:  # both precisions per seed, so that a cut-short run still has pairs
        for precision in PRECISIONS:
            run = test_ndcg(args.data, seed, precision, args.epochs, extra)
            ndcg[precision].append(run["ndcg@100"])
            print(f"{precision:>10}  seed {seed}  test NDCG@100 {run['ndcg@100']:.4f}  ({run['wall_s']:.0f} s)",
                  flush=True)
    means = {precision: sum(values) / len(values) for precision, values in ndcg.items()}
    print(f"mean test NDCG@100: 32-true {means['32-true']:.4f}, bf16-mixed {means['bf16-mixed']:.4f}, "
          f"difference {means['bf16-mixed'] - means['32-true']:+.4f}")


if __name__ == "__main__":
    main()
