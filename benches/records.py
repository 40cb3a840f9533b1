"""Machine-readable bench records: one JSON object per line, appended to
benches/results/<bench module>.jsonl (the whole-run summaries to benches/results/runs.jsonl).
`python tools/results_page.py` rebuilds benches/RESULTS.md from them.

A record:
- figure: the bench's pytest id ("bench_topk.py::test_topk_masked_vs_torch_topk[20108items]") or,
  for figures not written by a bench, a name of its own;
- params: the bench's parametrisation (pytest's callspec) and the shape constants of its module
  (its upper-case int, float, str and bool globals);
- fast_s, reference_s, ratio, floor: a side-by-side comparison (median seconds of each side, the
  ratio reference / fast, the floor it is judged against), where the bench makes one;
- values: the bench's other figures by name (seconds end in _s, memory in _gib / _mib, rates in
  _gflops, speed-ups in _speedup; a_over_b is one time over another, such as a step over its floor);
- machine: cpu (the kernel's model name), cores, torch_threads (when written), cpu_flags (avx2,
  avx512*, amx*), cpu_capability (torch's), load_avg (1-minute load average when written);
- torch, python: versions;
- commit: `git rev-parse --short HEAD`, "+dirty" when the work tree differs from it outside
  benches/results; "unknown" without git;
- source: "measured" (written by the bench when it ran) or "transcribed" (a figure measured
  before the records existed, converted from the text that quoted it; its note says from where).

RECVAE_FAST_BENCH_RECORDS=off writes no records; RECVAE_FAST_BENCH_RECORDS=DIR writes them to DIR
instead of benches/results. A record that cannot be written is a warning, never a failed bench.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ENV = "RECVAE_FAST_BENCH_RECORDS"
SCHEMA = 1
FLAG_PREFIXES = ("avx2", "avx512", "amx")


def records_dir() -> Path | None:
    """Where records go: benches/results, RECVAE_FAST_BENCH_RECORDS's folder, or None when it is 'off'."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() == "off":
        return None
    return Path(value) if value else RESULTS_DIR


@functools.cache
def commit() -> str:
    """The checked-out commit, '+dirty' when files outside benches/results differ from it (the
    records themselves must not make the next run's commit dirty); 'unknown' without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", ".", f":(exclude){RESULTS_DIR.relative_to(ROOT)}")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if changed else "")


def _cpuinfo() -> tuple[str, list[str]]:
    """(model name, the avx2/avx512*/amx* flags) from /proc/cpuinfo; the platform's processor name
    and no flags where it cannot be read."""
    model, flags = "", []
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = sorted(flag for flag in value.split() if flag.startswith(FLAG_PREFIXES))
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def machine() -> dict:
    model, flags = _cpuinfo()
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu_flags": flags,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_avg": round(os.getloadavg()[0], 2)}


def make_record(figure: str, params: dict | None = None, **figures) -> dict:
    """A measured record of `figure` on this machine and commit; `figures` are the record's
    fast_s / reference_s / ratio / floor and its values (a dict)."""
    return {"schema": SCHEMA, "figure": figure, "params": params or {}, **figures, "machine": machine(),
            "torch": torch.__version__, "python": platform.python_version(), "commit": commit(),
            "source": "measured"}


def append(record: dict, name: str, folder: Path | None = None) -> Path | None:
    """Appends `record` as one line to FOLDER/name.jsonl (default: records_dir()) with a single
    O_APPEND write, so that concurrent writers never interleave within a line. Returns the file,
    or None when records are off or the write failed (a warning says why)."""
    folder = records_dir() if folder is None else folder
    if folder is None:
        return None
    line = (json.dumps(record, ensure_ascii=False, default=_plain) + "\n").encode("utf-8")
    path = folder / f"{name}.jsonl"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            written = os.write(fd, line)
        finally:
            os.close(fd)
        if written != len(line):
            raise OSError(f"wrote {written} of {len(line)} bytes")
    except OSError as exc:
        warnings.warn(f"bench record not written to {path}: {exc}", stacklevel=2)
        return None
    return path


def _plain(value):
    """numpy and torch scalars as Python numbers (json knows neither); anything else as its text."""
    return value.item() if hasattr(value, "item") else str(value)


def module_constants(module) -> dict:
    """The upper-case scalar globals of a bench module: its shapes and settings."""
    return {name: value for name, value in vars(module).items()
            if name.isupper() and isinstance(value, (int, float, str, bool))}


def jsonable(params: dict) -> dict:
    """The JSON-representable scalar entries of a parametrisation (fixtures' objects left out)."""
    return {key: value for key, value in params.items()
            if value is None or isinstance(value, (int, float, str, bool))}


if __name__ == "__main__":  # prints this machine's record fields, to check what a bench would write
    json.dump(make_record("example"), sys.stdout, indent=1)
    print()
