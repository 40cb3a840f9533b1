"""`recvae-fast export RUN --output F.pt2`: the scoring path (fold-in items -> masked top-k) as a
torch.export program."""
from __future__ import annotations

from pathlib import Path

from ..export import export_scorer
from ..runs import load_run
from .errors import UsageError
from .run_folder import RUN_FILES
from .settings import check_output, scoring_precision


def run(args) -> dict:
    trained = load_run(args.run)
    if args.k > len(trained.items):
        raise UsageError(f"--k {args.k} is larger than the catalogue ({len(trained.items)} items)")
    precision = scoring_precision(args, trained.description)
    output = Path(args.output)
    check_output(output, [trained.folder / name for name in RUN_FILES])
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: folder {output.parent} does not exist")
    export_scorer(trained.model, output, k=args.k, precision=precision)
    return {"output": str(output), "k": args.k, "items": len(trained.items), "precision": precision,
            "note": "columns are the run's items.json positions; load with recvae_fast.export.load_scorer "
                    "or torch.export.load"}
