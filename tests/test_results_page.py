"""The bench records (benches/records.py, written by benches/conftest.py) and the page made from
them (tools/results_page.py → benches/RESULTS.md): fixed records give the expected tables, the
committed page is what the committed records give, and writing a record is one whole line, never a
failed bench."""
from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


page = load(ROOT / "tools" / "results_page.py", "results_page")
records = load(ROOT / "benches" / "records.py", "bench_records_module")

EPYC = {"cpu": "AMD EPYC", "cores": 2, "torch_threads": 2, "cpu_flags": ["avx2"], "load_avg": 1.5}
FIXED = {
    "bench_topk": [
        {"figure": "bench_topk.py::test_vs_torch[20108items]", "params": {}, "ratio": 4.34, "floor": 1.0,
         "machine": {"cpu": "Intel Xeon", "cores": 2, "torch_threads": 2}, "torch": "2.13.0", "commit": "aaaaaaa",
         "source": "transcribed", "note": "from an older page"},
        {"figure": "bench_topk.py::test_vs_torch[20108items]", "params": {}, "fast_s": 0.005, "reference_s": 0.0125,
         "ratio": 2.5, "floor": 1.0, "machine": EPYC, "torch": "2.13.0+cpu", "commit": "bbbbbbb+dirty",
         "source": "measured"},
        {"figure": "bench_topk.py::test_vs_torch[20108items]", "params": {}, "fast_s": 0.004, "reference_s": 0.03,
         "ratio": 7.5, "floor": 1.0, "machine": {**EPYC, "torch_threads": 1}, "torch": "2.13.0+cpu",
         "commit": "bbbbbbb", "source": "measured"},
        {"figure": "bench_topk.py::test_vs_numpy[1000000items]", "params": {}, "fast_s": 0.1, "reference_s": 2.5,
         "ratio": 25.0, "floor": 9.0, "machine": EPYC, "torch": "2.13.0+cpu", "commit": "bbbbbbb+dirty",
         "source": "measured"},
    ],
    "bench_scoring": [
        {"figure": "bench_scoring.py::test_scoring[20108]", "params": {},
         "values": {"speedup": 3.5, "ours_s": 0.0347, "ours_over_floor": 1.41, "block": 4096},
         "machine": EPYC, "torch": "2.13.0+cpu", "commit": "ccccccc", "source": "measured"},
    ],
    "bench_new": [
        {"figure": "bench_new.py::test_something", "params": {"N_ITEMS": 20108}, "values": {"peak_gib": 1.234},
         "machine": EPYC, "torch": "2.13.0+cpu", "commit": "ddddddd", "source": "measured"},
        {"figure": "bench_new.py::test_something", "params": {"N_ITEMS": 100000}, "values": {"peak_gib": 5.0},
         "machine": EPYC, "torch": "2.13.0+cpu", "commit": "ddddddd", "source": "measured"},
    ],
    "tune_ml100k": [
        {"commit": "eeeeeee", "machine": "x86_64, 2 CPUs, 2 torch threads, torch 2.13.0+cpu",
         "users": {"train": 752, "valid": 93, "test": 93}, "items": 1415, "space": ["n_epochs = {low = 10, high = 50}"],
         "study_wall_s": 597.2, "trials": {"complete": 15, "pruned": 15, "fail": 1}, "best_valid_ndcg@100": 0.49093,
         "test_ndcg@100_best": [0.42290, 0.42843, 0.41752], "mean_best": 0.42296,
         "test_ndcg@100_defaults": [0.41661, 0.43308, 0.43434], "mean_defaults": 0.42801},
        {"commit": "fffffff", "machine": "x86_64, 2 CPUs, 2 torch threads, torch 2.13.0+cpu",
         "users": {"train": 752, "valid": 93, "test": 93}, "items": 1415, "space": ["n_epochs = {low = 10, high = 50}"],
         "study_wall_s": 371.2, "trials": {"complete": 17, "pruned": 13, "fail": 2}, "best_valid_ndcg@100": 0.50054,
         "finalists": [{"trial": 24, "runs": [{"fold": 0, "seed": 1}, {"fold": 1, "seed": 1}, {"fold": 2, "seed": 1}]}],
         "test_ndcg@100_best": [0.42206, 0.42578, 0.43429], "mean_best": 0.42738,
         "test_ndcg@100_defaults": [0.41661, 0.43308, 0.43434], "mean_defaults": 0.42801,
         "paired_best_minus_defaults": {"users": 93, "mean": -0.00063, "standard_error": 0.00812}},
    ],
}
EXPECTED = """\
## Scoring and masked top-k

### bench_scoring

| figure | speedup | ours | ours / floor | block | records | at |
|---|---|---|---|---|---|---|
| test_scoring[20108] | 3.50× | 34.7 ms | 1.41 | 4,096 | 1 | a |

- a: AMD EPYC, 2 cores, 2 torch threads, flags avx2; torch 2.13.0+cpu; commit ccccccc; load 1.5

### bench_topk

| figure | fast | reference | ratio | floor | records | at |
|---|---|---|---|---|---|---|
| test_vs_torch[20108items] | 5.0 ms | 12.5 ms | 2.50× | 1× | 2: 2.50–4.34× | a |
| test_vs_torch[20108items] | 4.0 ms | 30.0 ms | 7.50× | 1× | 1 | b |
| test_vs_numpy[1000000items] | 100.0 ms | 2.50 s | 25.00× | 9× | 1 | a |

- a: AMD EPYC, 2 cores, 2 torch threads, flags avx2; torch 2.13.0+cpu; commit bbbbbbb+dirty; load 1.5
- b: AMD EPYC, 2 cores, 1 torch thread, flags avx2; torch 2.13.0+cpu; commit bbbbbbb; load 1.5

## Tuning

### tune_ml100k

| users train / valid / test | items | space | trials complete / pruned / failed | study wall | final selection \
| best valid NDCG@100 | test NDCG@100 of the chosen trial, per seed | mean \
| test NDCG@100 of the defaults, per seed | mean | chosen − defaults per test user (± SE) | at |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
| 752 / 93 / 93 | 1,415 | n_epochs = {low = 10, high = 50} | 15 / 15 / 1 | 597 s | best search score | 0.4909 \
| 0.4229 / 0.4284 / 0.4175 | 0.4230 | 0.4166 / 0.4331 / 0.4343 | 0.4280 | – | a |
| 752 / 93 / 93 | 1,415 | n_epochs = {low = 10, high = 50} | 17 / 13 / 2 | 371 s | 3 folds × 1 seed | 0.5005 \
| 0.4221 / 0.4258 / 0.4343 | 0.4274 | 0.4166 / 0.4331 / 0.4343 | 0.4280 | -0.0006 ± 0.0081 | b |

- a: x86_64, 2 CPUs, 2 torch threads, torch 2.13.0+cpu; commit eeeeeee
- b: x86_64, 2 CPUs, 2 torch threads, torch 2.13.0+cpu; commit fffffff

## Other records

### bench_new

| figure | N_ITEMS | peak | records | at |
|---|---|---|---|---|
| test_something | 20,108 | 1.23 GiB | 1 | a |
| test_something | 100,000 | 5.00 GiB | 1 | a |

- a: AMD EPYC, 2 cores, 2 torch threads, flags avx2; torch 2.13.0+cpu; commit ddddddd; load 1.5
"""


def write_records(folder: Path, found: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, rows in found.items():
        (folder / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_fixed_records_give_the_expected_tables(tmp_path):
    write_records(tmp_path, FIXED)
    assert page.render(page.read_records(tmp_path)) == page.INTRO + "\n" + EXPECTED


def test_latest_record_of_a_figure_is_shown(tmp_path):
    rows = [dict(FIXED["bench_topk"][1], ratio=r, fast_s=1.0, reference_s=r) for r in (2.0, 9.0, 3.0)]
    write_records(tmp_path, {"bench_topk": rows})
    text = page.render(page.read_records(tmp_path))
    assert "| 1.00 s | 3.00 s | 3.00× | 1× | 3: 2.00–9.00× |" in text
    assert "9.00 s" not in text


def test_the_committed_page_is_what_the_committed_records_give():
    assert page.PAGE.read_text(encoding="utf-8") == page.render(page.read_records(page.RECORDS)), \
        "benches/RESULTS.md is out of date: run python tools/results_page.py"


def test_the_page_speaks_of_no_dates_or_sessions():
    text = page.PAGE.read_text(encoding="utf-8").lower()
    for word in ("session", "2026-", "2025-", "yesterday", "today"):
        assert word not in text


def test_check_and_write(tmp_path, capsys):
    write_records(tmp_path / "records", FIXED)
    out = tmp_path / "RESULTS.md"
    assert page.main(["--records", str(tmp_path / "records"), "--out", str(out), "--check"]) == 1
    assert "not what the records give" in capsys.readouterr().err
    assert page.main(["--records", str(tmp_path / "records"), "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == page.INTRO + "\n" + EXPECTED
    assert page.main(["--records", str(tmp_path / "records"), "--out", str(out), "--check"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md", "records"]  # no temporary left


def test_a_broken_line_is_named(tmp_path, capsys):
    write_records(tmp_path, FIXED)
    with open(tmp_path / "bench_topk.jsonl", "a", encoding="utf-8") as f:
        f.write('{"figure": "cut sh\n')
    out = tmp_path / "RESULTS.md"
    assert page.main(["--records", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bench_topk.jsonl:5: not a JSON record" in err
    assert not out.exists()


def test_a_record_holds_the_machine_torch_and_commit():
    record = records.make_record("bench_x.py::test_y[3]", {"N": 3}, ratio=2.0, values={"peak_gib": 1.0})
    assert record["figure"] == "bench_x.py::test_y[3]" and record["params"] == {"N": 3}
    assert record["ratio"] == 2.0 and record["values"] == {"peak_gib": 1.0} and record["source"] == "measured"
    machine = record["machine"]
    assert machine["cores"] == os.cpu_count() and isinstance(machine["cpu"], str) and machine["cpu"]
    assert isinstance(machine["cpu_flags"], list)
    assert all(flag.startswith(("avx2", "avx512", "amx")) for flag in machine["cpu_flags"])
    assert machine["torch_threads"] >= 1 and isinstance(machine["load_avg"], float)
    import torch

    assert record["torch"] == torch.__version__
    json.dumps(record)  # JSON all through


def test_commit_is_the_checkout_or_unknown(monkeypatch, tmp_path):
    records.commit.cache_clear()
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        if head.returncode == 0:
            assert records.commit().split("+")[0] == head.stdout.strip()
            assert records.commit().endswith(("+dirty", head.stdout.strip()))
        records.commit.cache_clear()
        monkeypatch.setenv("PATH", str(tmp_path))  # no git to be found
        assert records.commit() == "unknown"
    finally:
        records.commit.cache_clear()


def test_records_off_or_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setenv(records.ENV, "off")
    assert records.records_dir() is None
    assert records.append({"figure": "x"}, "bench_x") is None
    monkeypatch.setenv(records.ENV, str(tmp_path / "elsewhere"))
    path = records.append({"figure": "x"}, "bench_x")
    assert path == tmp_path / "elsewhere" / "bench_x.jsonl"
    assert json.loads(path.read_text(encoding="utf-8")) == {"figure": "x"}
    monkeypatch.delenv(records.ENV)
    assert records.records_dir() == ROOT / "benches" / "results"


def test_numpy_and_torch_scalars_are_written_as_numbers(tmp_path):
    import numpy as np
    import torch

    path = records.append({"values": {"block": np.int64(4096), "ratio": torch.tensor(2.5)}}, "bench_x", tmp_path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"values": {"block": 4096, "ratio": 2.5}}


def test_an_unwritable_folder_is_a_warning(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="bench record not written"):
        assert records.append({"figure": "x"}, "bench_x", blocker) is None


def _append_many(folder: str, writer: int) -> None:
    for k in range(40):
        records.append({"writer": writer, "k": k, "padding": "x" * 20_000}, "bench_x", Path(folder))


def test_concurrent_writers_never_split_a_line(tmp_path):
    processes = [multiprocessing.get_context("fork").Process(target=_append_many, args=(str(tmp_path), w))
                 for w in range(4)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
        assert p.exitcode == 0
    lines = (tmp_path / "bench_x.jsonl").read_text(encoding="utf-8").splitlines()
    written = sorted((r["writer"], r["k"]) for r in map(json.loads, lines))
    assert written == [(w, k) for w in range(4) for k in range(40)]


def test_a_bench_run_writes_its_record(tmp_path):
    """benches/conftest.py: the compare_speed bench's figures, parameters, machine and commit in one
    line of benches/results/<bench module>.jsonl (here redirected)."""
    pytest.importorskip("pytest_benchmark")
    env = dict(os.environ, **{records.ENV: str(tmp_path)})
    run = subprocess.run([sys.executable, "-m", "pytest", "benches/bench_csr_transpose.py", "-q", "--benchmark-disable",
                          "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (line,) = (tmp_path / "bench_csr_transpose.jsonl").read_text(encoding="utf-8").splitlines()
    record = json.loads(line)
    assert record["figure"] == "bench_csr_transpose.py::test_group_by_item_vs_torch_sort"
    assert record["ratio"] == pytest.approx(record["reference_s"] / record["fast_s"])
    assert record["floor"] == 1.3 and record["params"]["N_ITEMS"] == 20_108
    assert record["source"] == "measured" and record["commit"]
    assert not (tmp_path / "runs.jsonl").exists()  # one file is not the whole run
