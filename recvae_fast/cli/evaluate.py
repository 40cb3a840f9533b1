"""`recvae-fast evaluate RUN`: the metrics of a trained run on its saved split (JSON)."""
from __future__ import annotations

from .. import data as data_mod
from ..api import evaluate
from ..runfolder import MODEL_NAME, SPLIT_NAME, RunFolderError
from ..runs import load_run
from .settings import eval_batch_size, scoring_precision


def run(args) -> dict:
    trained = load_run(args.run)  # every file read safely
    # Validated: array kinds, CSR structure, ids (a DataError naming the file).
    split = data_mod.Split.load(trained.folder)
    if split.n_items != trained.model.input_dim:
        raise RunFolderError(f"{trained.folder / SPLIT_NAME} has {split.n_items} items, "
                             f"{trained.folder / MODEL_NAME} {trained.model.input_dim}")
    fold_in, heldout = (split.test_in, split.test_out) if args.split == "test" else (split.valid_in, split.valid_out)
    return {args.split: evaluate(trained.model, fold_in, heldout, batch_size=eval_batch_size(args), ks=args.topk,
                                 precision=scoring_precision(args, trained.description))}
