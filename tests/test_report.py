"""write_report on a real run folder (a tiny `recvae-fast train synthetic`) and on every bad input."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from recvae_fast import report
from recvae_fast.cli import main

TINY_SYNTHETIC = ["train", "synthetic", "--epochs", "2", "--hidden-dim", "8", "--latent-dim", "4",
                  "--batch-size", "2000", "--n-enc-epochs", "1", "--no-progress"]


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_run")
    assert main([*TINY_SYNTHETIC, "--out", str(out)]) == 0
    return out


def _copy_run(run, tmp_path):
    """A copy of the run's report inputs, so that a test may change them."""
    copy = tmp_path / "run"
    copy.mkdir()
    for name in (report.METRICS_NAME, report.SUMMARY_NAME):
        shutil.copy(run / name, copy / name)
    return copy


def _write_metrics(folder, records):
    folder.mkdir(exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (folder / report.METRICS_NAME).write_text("\n".join(lines) + "\n")
    return folder


def _color_pixels(png: Image.Image, hex_color: str, tol: int = 30) -> int:
    """How many pixels are within `tol` (per channel) of a colour."""
    rgb = np.asarray(png.convert("RGB")).astype(int)
    target = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - target).max(axis=2) <= tol).sum())


def test_report_of_a_real_run_is_a_readable_png_and_markdown(synthetic_run, tmp_path):
    run = _copy_run(synthetic_run, tmp_path)
    paths = report.write_report(run)
    assert paths == {"png": run / "report.png", "markdown": run / "report.md"}

    with Image.open(paths["png"]) as png:
        assert png.format == "PNG"
        width, height = png.size
        assert (width, height) == (report.FIGURE_SIZE_IN[0] * report.FIGURE_DPI,
                                   report.FIGURE_SIZE_IN[1] * report.FIGURE_DPI)
        png.load()
        # Not blank: the curves' colours (matplotlib's first three) are drawn, and a fair share
        # of the image is not background.
        rgb = np.asarray(png.convert("RGB"))
        assert (rgb.min(axis=2) < 200).mean() > 0.01
        for color in ("#1f77b4", "#ff7f0e", "#2ca02c"):
            assert _color_pixels(png, color) > 200, color
    import matplotlib.image

    assert matplotlib.image.imread(paths["png"]).shape[:2] == (height, width)

    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = summary["best_epoch"]
    best_record = next(r for r in records if r["epoch"] == best)
    text = paths["markdown"].read_text()
    assert f"**Best epoch: {best}**" in text
    assert f"| {best} (best) |" in text
    assert f"ndcg@100 {best_record['valid_ndcg@100']:.4f}" in text
    assert f"| RecVAE | {summary['test']['ndcg@100']:.4f} |" in text
    assert f"| popularity | {summary['popularity_test']['ndcg@100']:.4f} |" in text
    assert "![training curves](report.png)" in text
    for r in records:  # one table row per epoch, with its losses
        assert f"{r['encoder_loss']:.2f} | {r['decoder_loss']:.2f} |" in text
    assert not list(run.glob(".*.tmp"))


def test_a_second_report_replaces_the_first(synthetic_run, tmp_path):
    run = _copy_run(synthetic_run, tmp_path)
    (run / "report.md").write_text("old")
    report.write_report(run)
    assert (run / "report.md").read_text().startswith("# Training report")


def test_unfinished_run_takes_the_first_highest_ndcg_as_best(tmp_path):
    records = [
        {"epoch": 1, "encoder_loss": 10.0, "decoder_loss": 9.0, "valid_ndcg@100": 0.1, "valid_recall@20": 0.1,
         "valid_recall@50": 0.2},
        {"epoch": 2, "encoder_loss": 8.0, "decoder_loss": 7.0, "valid_ndcg@100": 0.3, "valid_recall@20": 0.2,
         "valid_recall@50": 0.3},
        {"epoch": 3, "encoder_loss": 7.0, "decoder_loss": 6.0, "valid_ndcg@100": 0.3, "valid_recall@20": 0.25,
         "valid_recall@50": 0.35},
        {"epoch": 4, "encoder_loss": 6.0, "decoder_loss": 5.0, "valid_ndcg@100": 0.2, "valid_recall@20": 0.2,
         "valid_recall@50": 0.3},
    ]
    run = _write_metrics(tmp_path / "run", records)
    paths = report.write_report(run)
    text = paths["markdown"].read_text()
    assert "**Best epoch: 2**" in text and "| 2 (best) |" in text
    assert "has not finished" in text
    assert Image.open(paths["png"]).size == (1200, 450)


def test_a_run_without_validation_or_with_joint_steps_still_reports(tmp_path):
    records = [{"epoch": e, "both_loss": 10.0 - e, "both_mll": -9.0} for e in (1, 2, 3)]
    run = _write_metrics(tmp_path / "run", records)
    paths = report.write_report(run)
    text = paths["markdown"].read_text()
    assert "Best epoch: none" in text
    assert "| 3 | – | – | – | 7.00 |" in text
    with Image.open(paths["png"]) as png:
        assert _color_pixels(png, "#1f77b4") > 100  # the loss curve


def test_summary_best_epoch_is_what_the_run_kept(synthetic_run, tmp_path):
    run = _copy_run(synthetic_run, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["best_epoch"] = 1
    (run / "summary.json").write_text(json.dumps(summary))
    assert "**Best epoch: 1**" in report.write_report(run)["markdown"].read_text()
    summary["best_epoch"] = 7
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(report.ReportError, match="best_epoch 7 is not an epoch"):
        report.write_report(run)


GOOD = {"epoch": 1, "encoder_loss": 1.0, "valid_ndcg@100": 0.1}


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "no epochs recorded"),
        ([GOOD, '{"epoch": 2, "encoder_lo'], r"line 2: not valid JSON .*corrupt or truncated"),
        (["[1, 2]"], "line 1: expected a JSON object, got list"),
        ([{"encoder_loss": 1.0}], "line 1: 'epoch' must be a positive integer, got None"),
        ([{"epoch": "1"}], "line 1: 'epoch' must be a positive integer"),
        ([{"epoch": 0}], "line 1: 'epoch' must be a positive integer, got 0"),
        ([GOOD, GOOD], "line 2: epoch 1 follows epoch 1"),
        ([{"epoch": 1, "valid_ndcg@100": "0.3"}], "line 1: 'valid_ndcg@100' must be a number"),
        ([{"epoch": 1, "decoder_loss": True}], "line 1: 'decoder_loss' must be a number"),
    ],
)
def test_bad_metrics_file_is_named_with_line_and_cause(tmp_path, lines, message):
    run = _write_metrics(tmp_path / "run", lines)
    with pytest.raises(report.ReportError, match=message) as info:
        report.write_report(run)
    assert "metrics.jsonl" in str(info.value)
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]  # nothing written


def test_deeply_nested_json_is_one_clear_error(synthetic_run, tmp_path, capsys):
    deep = "[" * 200_000 + "]" * 200_000
    run = _write_metrics(tmp_path / "run", ['{"epoch": 1, "x": ' + deep + "}"])
    with pytest.raises(report.ReportError, match="metrics.jsonl, line 1: JSON nested too deeply"):
        report.write_report(run)
    (tmp_path / "second").mkdir()
    run = _copy_run(synthetic_run, tmp_path / "second")
    (run / report.SUMMARY_NAME).write_text(deep)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "summary.json: JSON nested too deeply" in err[0]
    assert not (run / report.PNG_NAME).exists()


def test_missing_run_folder_and_files(tmp_path):
    with pytest.raises(report.ReportError, match="run folder not found"):
        report.write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(report.ReportError, match="metrics.jsonl: not found"):
        report.write_report(tmp_path / "empty")


@pytest.mark.parametrize("content, message", [("{not json", "not valid JSON"), ("[1]", "expected a JSON object")])
def test_corrupt_summary_is_an_error(tmp_path, content, message):
    run = _write_metrics(tmp_path / "run", [GOOD])
    (run / "summary.json").write_text(content)
    with pytest.raises(report.ReportError, match=f"summary.json: {message}"):
        report.write_report(run)
    assert not (run / "report.png").exists()


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    run = _write_metrics(tmp_path / "run", [GOOD])
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'recvae_fast\[report\]'"):
        report.write_report(run)
    assert not (run / "report.md").exists()
