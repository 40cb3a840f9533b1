"""`write_report(run_dir)`: training curves (PNG) and a short markdown summary of a run folder.

Reads the run's metrics.jsonl (one JSON object per epoch, written by `fit`) and, when the run has
finished, its summary.json; writes report.png (validation NDCG@100 / Recall@20 / Recall@50 and the
training losses per epoch, best epoch marked) and report.md next to them, each atomically.
matplotlib is an optional dependency: `pip install 'recvae_fast[report]'`.
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

from .atomic import atomic_write_bytes, atomic_write_text

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
PNG_NAME = "report.png"
MARKDOWN_NAME = "report.md"

# The validation curves, in the order they are plotted and tabulated.
VALID_METRICS = ("valid_ndcg@100", "valid_recall@20", "valid_recall@50")
LOSS_SUFFIX = "_loss"  # encoder_loss, decoder_loss (alternating) or both_loss (not alternating)

_LOSS_LABELS = {
    "encoder_loss": "encoder phase: −ELBO",
    "decoder_loss": "decoder phase: −log-likelihood",
    "both_loss": "joint steps: −ELBO",
}

FIGURE_SIZE_IN = (12.0, 4.5)
FIGURE_DPI = 100  # 1200 × 450 pixels


class ReportError(ValueError):
    """A run folder that cannot be reported on: the message names the file, the line and the cause."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The per-epoch records of a metrics.jsonl, validated: each line a JSON object with a positive
    integer `epoch` (strictly increasing), numbers for the validation metrics and losses."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path}: not found (is this a run folder written by `recvae-fast train`?)")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ReportError(f"{where}: not valid JSON ({exc.msg}); the file is corrupt or truncated") from None
            except RecursionError:
                raise ReportError(f"{where}: JSON nested too deeply to be an epoch record") from None
            if not isinstance(record, dict):
                raise ReportError(f"{where}: expected a JSON object, got {type(record).__name__}")
            epoch = record.get("epoch")
            if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
                raise ReportError(f"{where}: 'epoch' must be a positive integer, got {epoch!r}")
            if records and epoch <= records[-1]["epoch"]:
                raise ReportError(f"{where}: epoch {epoch} follows epoch {records[-1]['epoch']} (epochs must increase)")
            for key, value in record.items():
                if (key in VALID_METRICS or key.endswith(LOSS_SUFFIX)) and not _is_number(value):
                    raise ReportError(f"{where}: {key!r} must be a number, got {value!r}")
            records.append(record)
    if not records:
        raise ReportError(f"{path}: no epochs recorded")
    return records


def read_summary(path: str | os.PathLike) -> dict | None:
    """summary.json as a dict, or None when the run has not finished (no file)."""
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_file():
        raise ReportError(f"{path}: not a regular file")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ReportError(f"{path}: JSON nested too deeply to be a run summary") from None
    if not isinstance(summary, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    return summary


def best_epoch(records: list[dict], summary: dict | None) -> int | None:
    """The run's best epoch: summary.json's `best_epoch` (the model the run kept) when the run has
    finished, else the first epoch with the highest validation NDCG@100 (fit's rule); None without
    validation."""
    epochs = [r["epoch"] for r in records]
    if summary is not None and summary.get("best_epoch") is not None:
        best = summary["best_epoch"]
        if best not in epochs or isinstance(best, bool):
            raise ReportError(f"summary.json: best_epoch {best!r} is not an epoch of {METRICS_NAME}")
        return best
    scored = [(r["valid_ndcg@100"], -r["epoch"]) for r in records if _finite(r.get("valid_ndcg@100"))]
    return -max(scored)[1] if scored else None


def _finite(value) -> bool:
    return _is_number(value) and math.isfinite(value)


def _loss_keys(records: list[dict]) -> list[str]:
    keys = []
    for record in records:
        keys += [k for k in record if k.endswith(LOSS_SUFFIX) and k not in keys]
    return keys


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["epoch"], r[key]) for r in records if _is_number(r.get(key))]
    return [p[0] for p in points], [float(p[1]) for p in points]


def _load_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            f"the training report needs matplotlib ({exc}); install it with: pip install 'recvae_fast[report]'"
        ) from exc
    return Figure, FigureCanvasAgg


def render_png(records: list[dict], best: int | None, title: str) -> bytes:
    """The two-panel figure as PNG bytes: validation metrics (left), training losses (right)."""
    Figure, FigureCanvasAgg = _load_matplotlib()
    fig = Figure(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no pyplot global state
    ax_valid, ax_loss = fig.subplots(1, 2)
    fig.suptitle(title)

    plotted_valid = False
    for key, marker in zip(VALID_METRICS, ("o", "s", "^")):
        epochs, values = _series(records, key)
        if epochs:
            ax_valid.plot(epochs, values, marker=marker, markersize=4, label=key.removeprefix("valid_"))
            plotted_valid = True
    ax_valid.set_title("Validation ranking metrics")
    ax_valid.set_xlabel("epoch")
    ax_valid.set_ylabel("metric (higher is better)")
    if not plotted_valid:
        ax_valid.text(0.5, 0.5, "no validation metrics in this run", ha="center", va="center",
                      transform=ax_valid.transAxes)

    for key in _loss_keys(records):
        epochs, values = _series(records, key)
        ax_loss.plot(epochs, values, marker="o", markersize=4, label=_LOSS_LABELS.get(key, key))
    ax_loss.set_title("Training loss (mean over the phase's batches)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss (lower is better)")

    for ax in (ax_valid, ax_loss):
        if best is not None:
            ax.axvline(best, color="0.3", linestyle="--", linewidth=1, label=f"best epoch ({best})")
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _fmt(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else "–"


def render_markdown(records: list[dict], summary: dict | None, best: int | None, run_name: str) -> str:
    lines = [f"# Training report: {run_name}", ""]
    n_epochs = len(records)
    train_time = sum(r["time_s"] for r in records if _is_number(r.get("time_s")))
    lines.append(f"- Epochs recorded: {n_epochs} (last: {records[-1]['epoch']}); "
                 f"time in epochs: {train_time:.1f} s")
    if best is None:
        lines.append("- Best epoch: none (the run has no validation metrics)")
    else:
        row = next(r for r in records if r["epoch"] == best)
        shown = ", ".join(f"{k.removeprefix('valid_')} {_fmt(row.get(k))}" for k in VALID_METRICS)
        lines.append(f"- **Best epoch: {best}** (validation {shown})")
    if summary is None:
        lines.append("- The run has not finished (no summary.json): no test metrics yet")
    else:
        config = summary.get("config")
        if isinstance(config, dict):
            keys = ("hidden_dim", "latent_dim", "batch_size", "n_epochs", "lr", "gamma", "beta", "dropout")
            lines.append("- Configuration: " + ", ".join(f"{k} {config[k]}" for k in keys if config.get(k) is not None))
        test, popularity = summary.get("test"), summary.get("popularity_test")
        if isinstance(test, dict):
            lines += ["", "## Test users (strong generalisation)", "",
                      "| model | NDCG@100 | Recall@20 | Recall@50 |", "|---|---|---|---|"]
            for name, metrics in (("RecVAE", test), ("popularity", popularity)):
                if isinstance(metrics, dict):
                    lines.append(f"| {name} | " + " | ".join(
                        _fmt(metrics.get(k)) for k in ("ndcg@100", "recall@20", "recall@50")) + " |")
    lines += ["", f"![training curves]({PNG_NAME})", "", "## Per epoch", ""]
    loss_keys = _loss_keys(records)
    header = ["epoch"] + [k.removeprefix("valid_") for k in VALID_METRICS] + loss_keys
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        mark = " (best)" if r["epoch"] == best else ""
        cells = [f"{r['epoch']}{mark}"] + [_fmt(r.get(k)) for k in VALID_METRICS] + [_fmt(r.get(k), 2) for k in loss_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | os.PathLike) -> dict:
    """Write report.png and report.md into `run_dir`; returns {"png": path, "markdown": path}.

    Everything is read and validated (and the figure rendered) before anything is written."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ReportError(f"run folder not found: {run}")
    records = read_metrics(run / METRICS_NAME)
    summary = read_summary(run / SUMMARY_NAME)
    best = best_epoch(records, summary)
    png = render_png(records, best, title=f"RecVAE training: {run.resolve().name}")
    markdown = render_markdown(records, summary, best, run.resolve().name)
    paths = {"png": run / PNG_NAME, "markdown": run / MARKDOWN_NAME}
    atomic_write_bytes(paths["png"], png)
    atomic_write_text(paths["markdown"], markdown)
    return paths
