"""Side-by-side speed comparisons for `pytest benches/`.

Each bench times the fast path and the reference in the same process, alternating them
round by round so that machine noise hits both alike, and fails when the speed-up (reference
median / fast median) falls below its floor. The floors guard against regressions, they are not
the goal; each is half the lowest ratio recorded for it in benches/RESULTS.md, runs on a loaded
machine included (the spread measured between runs on this shared 2-core CPU reached 2.5x; see
RESULTS.md), so that noise alone does not fail them. On a loaded machine (1-minute load average
above the core count) a ratio below its floor is reported as a skip, not judged, unless
RECVAE_FAST_BENCH_STRICT=1: at load ~11 on 2 cores ratios fell to a third of their quiet values.

Memory: by default `pytest benches/` keeps its host memory under 8 GiB (measured peak in
RESULTS.md). Shapes that need more are marked `@pytest.mark.big_shape(gib=N)` (N: the host memory
they need, from their tensor sizes) and skipped unless `--big-shapes` or RECVAE_FAST_BENCH_BIG=1 is
given; the skip message says how much memory they need.

Every skip's reason is printed in the summary (as with `-rs`). `pytest benches/ -m quick` runs the
QUICK subset: one side-by-side bench per CPU op at the 20k-item (ML-20M) shape, under three minutes
on the 2-core development machine (measured in RESULTS.md).

Records: every bench's figures are written as one JSON line when it ends (the `bench_record`
fixture; compare_speed fills it), and the whole run and the quick subset each as one line in
benches/results/runs.jsonl; benches/records.py describes a record and where it goes
(RECVAE_FAST_BENCH_RECORDS=off writes none, =DIR writes them elsewhere).
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest
import records

DEFAULT_MEMORY_LIMIT_GIB = 8
_START = pytest.StashKey[float]()
# The quick subset (`-m quick`): bench file :: test id.
QUICK = (
    "bench_csr_transpose.py::test_group_by_item_vs_torch_sort",
    "bench_kl.py::test_kl_cpp_forward_vs_torch_ops",
    "bench_topk.py::test_topk_masked_vs_torch_topk[20108items]",
    "bench_topk.py::test_topk_masked_vs_numpy_argpartition[20108items]",
    "bench_fc1_optimizer.py::test_row_sparse_fc1_vs_dense[20108items-step]",
    "bench_fc1_optimizer.py::test_row_sparse_fc1_vs_dense[20108items-grad+step]",
    "bench_sparse_input_layer.py::test_sparse_input_layer_vs_dense_first_layer[20108items-dense]",
    "bench_sparse_input_layer.py::test_sparse_input_layer_vs_dense_first_layer[20108items-row_sparse]",
)


def pytest_addoption(parser):
    parser.addoption("--big-shapes", action="store_true", default=False,
                     help="also run the bench shapes that need more than 8 GiB of host memory")


@pytest.hookimpl(tryfirst=True)  # before the terminal reporter reads the report characters
def pytest_configure(config):
    config.stash[_START] = time.perf_counter()
    config.addinivalue_line("markers", "big_shape(gib): needs more host memory than the default 8 GiB budget")
    config.addinivalue_line("markers", "quick: the quick subset of the benches (pytest benches/ -m quick)")
    # A skipped ratio (loaded machine, missing CUDA, memory budget) says why in the summary, even under -q.
    if "s" not in config.option.reportchars and "a" not in config.option.reportchars:
        config.option.reportchars += "s"


def _mark_quick(items) -> None:
    """Mark the QUICK benches; an entry whose file was collected but that matches no bench is an
    error (a renamed bench must not drop out of the subset unnoticed)."""
    collected_files = {item.nodeid.split("::")[0].rsplit("/", 1)[-1] for item in items}
    matched = set()
    for item in items:
        name = item.nodeid.rsplit("/", 1)[-1]
        if name in QUICK:
            item.add_marker(pytest.mark.quick)
            matched.add(name)
    stale = [entry for entry in QUICK if entry.split("::")[0] in collected_files and entry not in matched]
    if stale:
        raise pytest.UsageError(f"benches/conftest.py QUICK names benches that do not exist: {', '.join(stale)}")


def pytest_collection_modifyitems(config, items):
    _mark_quick(items)
    if config.getoption("--big-shapes") or os.environ.get("RECVAE_FAST_BENCH_BIG") == "1":
        return
    for item in items:
        marker = item.get_closest_marker("big_shape")
        if marker is not None:
            gib = marker.kwargs.get("gib", "?")
            item.add_marker(pytest.mark.skip(
                reason=f"needs ~{gib} GiB of host memory (default budget {DEFAULT_MEMORY_LIMIT_GIB} GiB); "
                       "run with --big-shapes or RECVAE_FAST_BENCH_BIG=1"))

_RESULTS: list[tuple[str, float, float, float, float]] = []


def _median_times(fns, rounds: int, warmup: int, sync) -> list[float]:
    for _ in range(warmup):
        for fn in fns:
            fn()
            sync()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _machine_is_loaded() -> bool:
    """More runnable processes than cores: other jobs take CPU time from both sides unevenly (on
    the 2-core development machine at load ~11, ratios fell to a third of their quiet values)."""
    return os.getloadavg()[0] > (os.cpu_count() or 1)


class BenchFigures:
    """What one bench measured: `comparison` (fast_s, reference_s, ratio, floor, set by
    compare_speed) and named `values`, added by calling it: bench_record(encoder_step_s=...)."""

    def __init__(self):
        self.comparison: dict = {}
        self.values: dict = {}

    def __call__(self, **values) -> None:
        self.values.update(values)


@pytest.fixture
def bench_record(request):
    """The bench's figures, written as one record (benches/records.py) when the bench ends: after
    a failed or skipped judgement too, since the figure was measured."""
    figures = BenchFigures()
    yield figures
    if not (figures.comparison or figures.values):
        return
    callspec = getattr(request.node, "callspec", None)
    params = {**records.module_constants(request.module), **records.jsonable(callspec.params if callspec else {})}
    found = dict(figures.comparison, **({"values": figures.values} if figures.values else {}))
    record = records.make_record(request.node.nodeid.rsplit("/", 1)[-1], params, **found)
    records.append(record, request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture
def compare_speed(benchmark, request, bench_record):
    """compare_speed(fast, reference, floor, rounds=5, warmup=1, sync=None) -> speed-up.

    Records both medians and the ratio in the pytest-benchmark table (extra_info), in the
    summary printed at the end of the run and in the bench's record; asserts the ratio >= floor.
    """

    def run(fast, reference, floor: float, rounds: int = 5, warmup: int = 1, sync=None):
        sync = sync or (lambda: None)
        fast_s, ref_s = _median_times([fast, reference], rounds, warmup, sync)
        ratio = ref_s / fast_s
        benchmark.extra_info.update(fast_s=fast_s, reference_s=ref_s, speedup=ratio, floor=floor)
        # One extra timed call so that the pytest-benchmark table has the fast path's row.
        benchmark.pedantic(fast, rounds=1, iterations=1)
        _RESULTS.append((request.node.name, fast_s, ref_s, ratio, floor))
        bench_record.comparison.update(fast_s=fast_s, reference_s=ref_s, ratio=ratio, floor=floor)
        if ratio < floor and _machine_is_loaded() and os.environ.get("RECVAE_FAST_BENCH_STRICT") != "1":
            pytest.skip(f"speed-up {ratio:.2f}x below its floor {floor}x, not judged: the machine is loaded "
                        f"(1-minute load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
                        "RECVAE_FAST_BENCH_STRICT=1 judges anyway)")
        assert ratio >= floor, f"speed-up {ratio:.2f}x fell below its floor {floor}x"
        return ratio

    return run


def pytest_terminal_summary(terminalreporter):
    import resource

    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    terminalreporter.write_line(f"peak host memory of this run (ru_maxrss): {peak_gib:.2f} GiB")
    _record_run(terminalreporter, peak_gib)
    if not _RESULTS:
        return
    terminalreporter.section("speed-ups against the reference (median seconds)")
    terminalreporter.write_line(f"{'bench':60s} {'fast':>10s} {'reference':>10s} {'ratio':>7s} {'floor':>6s}")
    for name, fast_s, ref_s, ratio, floor in _RESULTS:
        terminalreporter.write_line(f"{name:60s} {fast_s:10.4f} {ref_s:10.4f} {ratio:6.2f}x {floor:5.1f}x")


def _run_selection(config) -> str | None:
    """'all' for `pytest benches/`, 'quick' for `pytest benches/ -m quick`; None for any other
    selection (a file, -k, another marker), whose run is not recorded."""
    benches = Path(__file__).resolve().parent
    paths = [Path(arg.split("::")[0]).resolve() for arg in config.args]
    if config.option.keyword or paths != [benches] or config.option.collectonly:
        return None
    return {"": "all", "quick": "quick"}.get(config.option.markexpr)


def _record_run(terminalreporter, peak_gib: float) -> None:
    """One record of a whole run or quick subset: wall time, outcome counts, peak memory."""
    config = terminalreporter.config
    selection = _run_selection(config)
    if selection is None:
        return
    counts = {outcome: len(terminalreporter.stats.get(outcome, []))
              for outcome in ("passed", "skipped", "failed", "error")}
    if not any(counts.values()):
        return
    params = {"selection": selection, "big_shapes": bool(config.getoption("--big-shapes"))
              or os.environ.get("RECVAE_FAST_BENCH_BIG") == "1",
              "strict": os.environ.get("RECVAE_FAST_BENCH_STRICT") == "1"}
    values = {"wall_s": round(time.perf_counter() - config.stash[_START], 1), **counts, "peak_gib": round(peak_gib, 2)}
    figure = "pytest benches/" + (" -m quick" if selection == "quick" else "")
    records.append(records.make_record(figure, params, values=values), "runs")
