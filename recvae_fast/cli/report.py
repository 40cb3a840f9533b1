"""`recvae-fast report RUN`: report.png (validation metrics and losses per epoch) and report.md."""
from __future__ import annotations

from .errors import UsageError


def run(args) -> dict:
    try:
        from ..report import write_report
    except ImportError as exc:  # matplotlib is an optional extra
        raise UsageError(f"report needs matplotlib: pip install 'recvae_fast[report]' ({exc})") from exc
    return {name: str(path) for name, path in write_report(args.run).items()}
