"""The scoring path of a trained RecVAE as a standalone `torch.export` program (.pt2).

    export_scorer(model, "model.pt2", k=100)
    # anywhere with torch only (no recvae_fast needed):
    program = torch.export.load("model.pt2").module()
    scores, items = program(indptr, indices, values)

The program takes one batch of users as the three parts of a CSR matrix (users × the model's
items): indptr int64 [B + 1], indices int64 [nnz], values [nnz] in the model's dtype. B and nnz
are dynamic (any batch, empty users and empty batches included); duplicate (user, item) entries
are summed, as `recommend` does. It computes what `recvae_fast.recommend(model, x, k)` computes:
fold-in z = mu(x), scores = z·Wdᵀ + bd, the user's own items (every stored entry) and NaN scores
excluded, and the best k items, best first, ties to the lower item index, padded with −1 / −inf
when a user has fewer than k eligible items. It returns (scores float32 B × k, items int64 B × k).

With precision "bf16-mixed" the program runs the encoder under torch.autocast (bf16 products,
float32 LayerNorm) and scores with bf16 operands (the decoder's weight is stored in bf16), the
top-k exact on the float32 scores that product gives, as `recommend(..., precision="bf16-mixed")`.

The program does not check its input (a standalone graph cannot raise a readable error): indices
must lie in [0, n_items), values be finite and >= 0. `load_scorer` returns a wrapper that checks
scipy input as `recommend` does before calling the program.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from . import precision as precision_mod
from .model import Encoder
from .atomic import write_output
from .ops.topk_masked import TopK, check_k

SCORER_FORMAT = "recvae_fast.scorer/1"
METADATA_FILE = "recvae_fast_scorer.json"  # stored in the .pt2 archive's extra files


class _ScorerMetadata(NamedTuple):
    k: int
    n_items: int
    dtype: str


class _GivenInputLayer(nn.Module):
    """Stands in for the encoder's fc1: the scorer computes fc1's output itself (below)."""

    def forward(self, h1_pre, dropout_rate, keep_mask=None, impl=None):
        return h1_pre


class FoldInScorer(nn.Module):
    """fold-in CSR batch → masked top-k, in plain tensor ops that torch.export traces whole.

    Built from a RecVAE state_dict (the authors' keys), so it depends only on the stored weights.
    """

    LAYER_IMPL = "torch"  # the layer tails in torch ops: the program must not call recvae_fast's own ops

    def __init__(self, state_dict: dict, k: int, product_dtype: torch.dtype | None = None):
        super().__init__()
        self.product_dtype = product_dtype
        hidden_dim, n_items = state_dict["encoder.fc1.weight"].shape
        latent_dim = state_dict["encoder.fc_mu.weight"].shape[0]
        self.k = k
        # fc1 is stored I × H so that the input layer gathers whole rows (embedding_bag).
        self.register_buffer("fc1_weight_t", state_dict["encoder.fc1.weight"].t().contiguous())
        self.register_buffer("fc1_bias", state_dict["encoder.fc1.bias"].clone())
        # The authors' residual stack after fc1 and its heads (scoring uses z = mu).
        dtype = state_dict["decoder.weight"].dtype
        # In the model's dtype before loading (loading into float32 layers would round float64 weights).
        self.layers = Encoder(hidden_dim, latent_dim, 0, fc1=_GivenInputLayer()).to(dtype)
        self.layers.load_state_dict({
            name[len("encoder."):]: value for name, value in state_dict.items()
            if name.startswith("encoder.") and not name.startswith("encoder.fc1.")
        })
        self.layers.requires_grad_(False)
        decoder_weight = state_dict["decoder.weight"]
        self.register_buffer("decoder_weight", decoder_weight.to(product_dtype or decoder_weight.dtype, copy=True))
        self.register_buffer("decoder_bias", state_dict["decoder.bias"].clone())

    def forward(self, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor):
        n_users = indptr.shape[0] - 1
        n_items = self.decoder_weight.shape[0]
        row_of = torch.searchsorted(indptr, torch.arange(indices.shape[0], device=indptr.device), right=True) - 1
        # Duplicate (user, item) entries are summed before the row norm, as in a canonical CSR;
        # `copies` counts them, so that each distinct item adds its summed value squared once.
        dense = values.new_zeros(n_users, n_items)
        summed = dense.index_put((row_of, indices), values, accumulate=True)
        copies = dense.index_put((row_of, indices), torch.ones_like(values), accumulate=True)
        entry_sum = summed[row_of, indices]
        sq_norm = values.new_zeros(n_users).index_add(0, row_of, entry_sum * entry_sum / copies[row_of, indices])
        norm = sq_norm.sqrt()
        norm = torch.where(norm > 0, norm, torch.ones_like(norm))  # an empty user keeps fc1's bias
        coef = values / norm[row_of]
        h1_pre = F.embedding_bag(indices, self.fc1_weight_t, indptr, mode="sum", per_sample_weights=coef,
                                 include_last_offset=True) + self.fc1_bias
        if self.product_dtype is None:
            mu, _ = self.layers(h1_pre, 0.0, impl=self.LAYER_IMPL)
            scores = torch.addmm(self.decoder_bias, mu, self.decoder_weight.t()).float()
        else:
            with torch.autocast("cpu", dtype=self.product_dtype):
                mu, _ = self.layers(h1_pre, 0.0, impl=self.LAYER_IMPL)
            scores = torch.mm(mu.to(self.product_dtype), self.decoder_weight.t()).float() + self.decoder_bias
        ineligible = (copies > 0) | torch.isnan(scores)
        return masked_topk(scores, ineligible, self.k)


def masked_topk(scores: torch.Tensor, ineligible: torch.Tensor, k: int):
    """The best k eligible items per row (k <= items), best first, ties to the lower index, padded
    with −1 / −inf; static shapes only (export-friendly), exactly topk_masked's semantics.

    The k-th largest value is the threshold: items strictly above it are in, and the places left
    go to the eligible items equal to it, lowest index first (an eligible item may score −inf, so
    eligibility is tracked apart from the value)."""
    n_items = scores.shape[1]
    work = scores.masked_fill(ineligible, float("-inf"))
    threshold = torch.topk(work, k, dim=1).values[:, k - 1 :]
    above = work > threshold
    at_threshold = (work == threshold) & ~ineligible
    places_left = k - above.sum(dim=1, keepdim=True)
    chosen = above | (at_threshold & (torch.cumsum(at_threshold.int(), dim=1) <= places_left))
    position = torch.where(chosen, torch.arange(n_items, device=scores.device), n_items)
    items = torch.topk(position, k, dim=1, largest=False).values  # chosen items, ascending; n_items = none
    valid = items < n_items
    best = torch.gather(work, 1, items.clamp(max=n_items - 1)).masked_fill(~valid, float("-inf"))
    # A stable sort by score keeps equal scores in ascending item order, padding after eligible −inf.
    best, order = torch.sort(best, dim=1, descending=True, stable=True)
    items = torch.where(torch.gather(valid, 1, order), torch.gather(items, 1, order), -1)
    return best, items


def _check_k(k, n_items: int) -> int:
    k = check_k(k)
    if k > n_items:
        raise ValueError(f"k must be in [1, {n_items}] (the catalogue), got {k}")
    return k


def csr_inputs(interactions, n_items: int, dtype: torch.dtype = torch.float32):
    """(indptr, indices, values) tensors of a users × items scipy matrix, checked as `recommend`
    checks its input: n_items columns, indices in range, finite values >= 0."""
    if not sp.issparse(interactions):
        raise TypeError(f"interactions must be a scipy.sparse matrix (users × items), got {type(interactions).__name__}")
    if interactions.shape[1] != n_items:
        raise ValueError(f"interactions has {interactions.shape[1]} item columns, the scorer has {n_items} items")
    csr = sp.csr_matrix(interactions)
    if csr.nnz and (csr.indices.min() < 0 or csr.indices.max() >= n_items):
        raise ValueError(f"interactions has an item index outside [0, {n_items})")
    values = np.asarray(csr.data, dtype=np.float64)
    if values.size and (not np.isfinite(values).all() or (values < 0).any()):
        raise ValueError("interactions has negative or non-finite values")
    return (torch.from_numpy(np.asarray(csr.indptr, dtype=np.int64)),
            torch.from_numpy(np.asarray(csr.indices, dtype=np.int64)),
            torch.from_numpy(values).to(dtype))


@contextlib.contextmanager
def _weights_only_loads():
    """Make every torch.load inside refuse pickled objects: torch.export.load falls back to
    weights_only=False for some payloads, and a .pt2 from elsewhere is untrusted."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def export_scorer(model, path: str | os.PathLike, k: int = 100,
                  precision: str = precision_mod.DEFAULT_PRECISION) -> torch.export.ExportedProgram:
    """Write the scoring path of `model` (a RecVAE, or anything with its state_dict) to `path` (.pt2;
    a regular file atomically, see recvae_fast.atomic.write_output) as a torch.export program with a
    dynamic batch; returns the program. precision: "32-true" or "bf16-mixed" (see the module docstring)."""
    product_dtype = precision_mod.autocast_dtype(precision)
    state_dict = {name: value.detach().cpu() for name, value in model.state_dict().items()}
    if "decoder.weight" not in state_dict or "encoder.fc1.weight" not in state_dict:
        raise ValueError("model must be a RecVAE (its state_dict has no decoder.weight / encoder.fc1.weight)")
    n_items = state_dict["decoder.weight"].shape[0]
    k = _check_k(k, n_items)
    dtype = state_dict["decoder.weight"].dtype
    if product_dtype is not None and dtype != torch.float32:
        raise ValueError(f"precision {precision!r} needs a float32 model, got {dtype}")
    scorer = FoldInScorer(state_dict, k, product_dtype).eval()
    # Sample batch: 3 users, one of them empty (sizes 0 and 1 would be specialised).
    sample = (torch.tensor([0, 2, 2, 4]), torch.tensor([0, n_items - 1, 0, n_items - 1]), torch.ones(4, dtype=dtype))
    users, nonzeros = torch.export.Dim("users", min=0), torch.export.Dim("nonzeros", min=0)
    # backed_size_oblivious: the program must also serve batches of 0 or 1 users (or nonzeros),
    # which export would otherwise exclude by a guard.
    from torch.fx.experimental import _config as fx_config

    # The program's precision is `precision` alone: a caller's autocast region is switched off
    # while tracing (the bf16 scorer opens its own, inside its forward).
    with fx_config.patch(backed_size_oblivious=True), torch.no_grad(), torch.autocast("cpu", enabled=False):
        program = torch.export.export(
            scorer, sample, dynamic_shapes=({0: users + 1}, {0: nonzeros}, {0: nonzeros}), strict=False
        )
    metadata = {"format": SCORER_FORMAT, "k": k, "n_items": n_items, "dtype": str(dtype).removeprefix("torch."),
                "precision": precision}
    extra_files = {METADATA_FILE: json.dumps(metadata)}

    def write(f):
        # The archive is built in memory, then written: torch's archive writer aborts the process when
        # a write fails (e.g. a full disk), where f.write raises an OSError.
        buffer = io.BytesIO()
        torch.export.save(program, buffer, extra_files=extra_files)
        f.write(buffer.getbuffer())

    write_output(path, write)
    return program


class LoadedScorer:
    """An exported scorer, loaded: `module` is the plain torch program (indptr, indices, values) →
    (scores, items); calling the wrapper with a scipy matrix checks it and returns TopK (numpy)."""

    def __init__(self, program: torch.export.ExportedProgram, metadata: _ScorerMetadata):
        self.program = program
        self.module = program.module()
        self.k, self.n_items = metadata.k, metadata.n_items
        self.dtype = getattr(torch, metadata.dtype)

    def __call__(self, interactions, batch_size: int = 500) -> TopK:
        indptr, indices, values = csr_inputs(interactions, self.n_items, self.dtype)
        n_users = indptr.numel() - 1
        out_scores = np.empty((n_users, self.k), np.float32)
        out_items = np.empty((n_users, self.k), np.int64)
        for start in range(0, n_users, batch_size):
            stop = min(n_users, start + batch_size)
            lo, hi = int(indptr[start]), int(indptr[stop])
            with torch.no_grad():
                scores, items = self.module(indptr[start : stop + 1] - lo, indices[lo:hi], values[lo:hi])
            out_scores[start:stop], out_items[start:stop] = scores.numpy(), items.numpy()
        return TopK(out_scores, out_items)


def load_scorer(path: str | os.PathLike) -> LoadedScorer:
    """Load a scorer written by `export_scorer` (torch.export.load, with every pickle refused)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scorer file not found: {path}")
    extra_files = {METADATA_FILE: ""}
    try:
        with _weights_only_loads():
            program = torch.export.load(path, extra_files=extra_files)
    except Exception as exc:
        raise ValueError(f"{path}: not a loadable torch.export program ({type(exc).__name__}: {exc})") from exc
    try:
        metadata = json.loads(extra_files[METADATA_FILE])
        if metadata.get("format") != SCORER_FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}")
        meta = _ScorerMetadata(int(metadata["k"]), int(metadata["n_items"]), str(metadata["dtype"]))
        if not isinstance(getattr(torch, meta.dtype, None), torch.dtype):
            raise ValueError(f"dtype {meta.dtype!r}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: a torch.export program, but not a recvae_fast scorer ({exc})") from None
    return LoadedScorer(program, meta)
