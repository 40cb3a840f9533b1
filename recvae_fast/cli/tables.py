"""Plain-text tables of metrics, as train and tune print them."""
from __future__ import annotations


def _metric_label(key: str) -> str:
    name, _, k = key.partition("@")
    return {"ndcg": "NDCG", "recall": "Recall"}.get(name, name) + "@" + k


def metrics_table(rows: dict[str, dict], columns: list[str] | None = None) -> str:
    """A plain-text table: one row per model, a column per metric in `columns` (default: those of
    the first row, n_users left out)."""
    columns = columns or [key for key in next(iter(rows.values())) if key != "n_users"]
    lines = [["model", *map(_metric_label, columns)]]
    for name, metrics in rows.items():
        lines.append([name, *(f"{metrics[c]:.4f}" if isinstance(metrics.get(c), float) else "-" for c in columns)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    # The model names left-aligned, the figures right-aligned.
    return "\n".join("  ".join([line[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(line[1:], widths[1:]))])
                     for line in lines)
