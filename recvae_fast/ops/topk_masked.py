"""Top-k recommendation with seen-item masking: the best k items per user, excluding what the
user already has.

Semantics (shared by both implementations, "cpp" and "torch", and by the streaming accumulator):

- Ranking: higher score first; equal scores go to the lower item index. Results are sorted best
  first.
- Seen items (the structure of the seen CSR: every stored entry counts, whatever its value, and
  duplicate or unsorted column indices within a row are fine) are never returned.
- NaN scores are never returned. ``-inf`` is an ordinary score: an unseen item scored ``-inf`` is
  still eligible and ranks after every finite score (ties again by lower index).
- A row with fewer than k eligible items is padded with index -1 and score -inf. Padding is used
  only then, so a -1 index is the only way to tell padding from an eligible ``-inf`` item.
- The score matrix is read in place: never copied, never modified. Any strides are accepted
  (contiguous rows are the fast path; a row stride, e.g. a slice of a wider matrix, costs nothing).

Inputs: scores is a 2-D numpy array or torch tensor (float32, float64, float16; torch bfloat16
too). seen is a scipy.sparse matrix (any format, B rows, I columns), a torch sparse CSR/COO
tensor, an object with ``indptr`` and ``indices`` (e.g. ``CSRBatch``), an ``(indptr, indices)``
pair of arrays/tensors, or None (nothing seen). Outputs: numpy arrays for numpy input, CPU
tensors for CPU tensor input, tensors on the same device for CUDA input; scores keep the input
dtype, indices are int64.

Implementations (`impl=`, chosen as for every op: recvae_fast.ops.dispatch): "cpp", the C++ extension
``recvae_fast._topk`` on ``torch.get_num_threads()`` threads (or ``num_threads``) with the GIL
released, the default for CPU input; "torch", torch.topk on row chunks with an exact tie fix-up,
the default for CUDA tensors. Both give identical results. On CPU tensors "cpp" runs as the
registered op recvae_fast::topk_masked(scores, indptr, indices, k, num_threads) -> (scores, items)
(no autograd).
"""
from __future__ import annotations

import operator
import warnings
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

from torch import Tensor

from .dispatch import check_impl, resolve_impl

__all__ = ["TopK", "TopKAccumulator", "check_k", "topk_masked"]

_NUMPY_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64", np.dtype(np.float16): "float16"}
_TORCH_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16"}

# Elements per row chunk of the torch path (it holds ~25 bytes of temporaries per element).
_TORCH_CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------- argument checks


def check_k(k) -> int:
    """k as an int, checked: an integer >= 1 (the one `k` check of top-k, metrics and inference)."""
    if isinstance(k, bool):
        raise TypeError(f"k must be a positive integer, got {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be a positive integer, got {type(k).__name__}") from None
    if k <= 0:
        raise ValueError(f"k must be a positive integer, got {k}")
    return k


def _check_threads(num_threads) -> int:
    if num_threads is None:
        return max(1, torch.get_num_threads())
    n = operator.index(num_threads)
    if n < 1:
        raise ValueError(f"num_threads must be >= 1, got {n}")
    return n


def _score_buffer(scores, what: str = "scores"):
    """(buffer for the C++ kernel, dtype name, 'numpy' | 'torch', output dtype) for CPU scores."""
    if isinstance(scores, torch.Tensor):
        if scores.layout != torch.strided:
            raise TypeError(f"{what} must be a dense tensor, got layout {scores.layout}")
        if scores.device.type != "cpu":
            raise ValueError(f"{what} is on {scores.device}; the C++ kernel needs CPU tensors")
        name = _TORCH_DTYPES.get(scores.dtype)
        if name is None:
            raise TypeError(f"{what} must be float32, float64, float16 or bfloat16, got {scores.dtype}")
        if scores.dim() != 2:
            raise ValueError(f"{what} must be 2-D (users × items), got shape {tuple(scores.shape)}")
        t = scores.detach()
        if t.is_conj() or t.is_neg():
            raise TypeError(f"{what} has a lazy conj/neg bit; resolve it first")
        buf = t.view(torch.int16).numpy() if name == "bfloat16" else t.numpy()
        return buf, name, "torch", scores.dtype
    if isinstance(scores, np.ndarray):
        name = _NUMPY_DTYPES.get(scores.dtype)
        if name is None:
            raise TypeError(f"{what} must be float32, float64 or float16, got {scores.dtype}")
        if scores.ndim != 2:
            raise ValueError(f"{what} must be 2-D (users × items), got shape {scores.shape}")
        if not scores.dtype.isnative:
            raise TypeError(f"{what} must be in native byte order")
        return scores, name, "numpy", scores.dtype
    raise TypeError(f"{what} must be a numpy array or a torch tensor, got {type(scores).__name__}")


def _check_tensor_scores(scores, what: str = "scores") -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{what} must be a torch tensor, got {type(scores).__name__}")
    if scores.layout != torch.strided:
        raise TypeError(f"{what} must be a dense tensor, got layout {scores.layout}")
    if scores.dtype not in _TORCH_DTYPES:
        raise TypeError(f"{what} must be float32, float64, float16 or bfloat16, got {scores.dtype}")
    if scores.dim() != 2:
        raise ValueError(f"{what} must be 2-D (users × items), got shape {tuple(scores.shape)}")


def _int_array(x, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{what} must hold integers, got {x.dtype}")
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {x.shape}")
    if x.size and not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{what} must hold integers, got {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.int64)


def _seen_csr(seen, n_rows: int, n_items: int | None):
    """(indptr int64 [n_rows + 1], indices int64, n_cols or None) from any accepted seen form,
    validated: B rows, indptr consistent, every index in [0, n_items)."""
    n_cols = None
    if seen is None:
        return np.zeros(n_rows + 1, np.int64), np.zeros(0, np.int64), None
    if sp.issparse(seen):
        if seen.ndim != 2:
            raise ValueError(f"seen must be 2-D, got shape {seen.shape}")
        csr = seen if seen.format == "csr" else seen.tocsr()
        rows, n_cols = csr.shape
        if rows != n_rows:
            raise ValueError(f"seen has {rows} rows, scores have {n_rows}")
        indptr, indices = _int_array(csr.indptr, "seen indptr"), _int_array(csr.indices, "seen indices")
    elif isinstance(seen, torch.Tensor):
        if seen.layout == torch.sparse_coo:
            seen = seen.coalesce().to_sparse_csr()
        if seen.layout != torch.sparse_csr:
            raise TypeError(f"seen tensor must be sparse CSR or COO, got layout {seen.layout}")
        rows, n_cols = seen.shape
        if rows != n_rows:
            raise ValueError(f"seen has {rows} rows, scores have {n_rows}")
        indptr = _int_array(seen.crow_indices(), "seen indptr")
        indices = _int_array(seen.col_indices(), "seen indices")
    elif hasattr(seen, "indptr") and hasattr(seen, "indices"):
        indptr, indices = _int_array(seen.indptr, "seen indptr"), _int_array(seen.indices, "seen indices")
        n_cols = getattr(seen, "n_cols", None)
    elif isinstance(seen, (tuple, list)) and len(seen) == 2:
        indptr, indices = _int_array(seen[0], "seen indptr"), _int_array(seen[1], "seen indices")
    else:
        raise TypeError(
            "seen must be a scipy.sparse matrix, a torch sparse CSR/COO tensor, an object with indptr and "
            f"indices, an (indptr, indices) pair, or None; got {type(seen).__name__}"
        )
    if indptr.size != n_rows + 1:
        raise ValueError(f"seen has {indptr.size - 1} rows (indptr of length {indptr.size}), scores have {n_rows}")
    if n_cols is not None and n_items is not None and n_cols != n_items:
        raise ValueError(f"seen has {n_cols} columns, scores have {n_items} items")
    if indptr[0] < 0 or indptr[-1] > indices.size or (n_rows and np.any(np.diff(indptr) < 0)):
        raise ValueError("seen indptr is invalid (must be non-decreasing within [0, len(indices)])")
    used = indices[indptr[0] : indptr[-1]]
    if used.size:
        lo, hi = int(used.min()), int(used.max())
        if lo < 0:
            raise ValueError(f"seen indices out of range: found {lo} (must be >= 0)")
        limit = n_items if n_items is not None else n_cols
        if limit is not None and hi >= limit:
            raise ValueError(f"seen indices out of range: found {hi}, the catalogue has {limit} items")
    return indptr, indices, n_cols


class TopK(NamedTuple):
    """A top-k result, in torch.topk's order: `scores` (B × k) and the item indices `items` (B × k),
    best first; padding is -inf / -1."""

    scores: Any
    items: Any


def _ext():
    from .. import _topk  # the C++ extension, loaded on first use, not when the package is imported

    return _topk


def _scores_input(scores, impl: str | None, what: str):
    """Validate `scores` and pick the implementation: (impl, form, data). form = (input type
    "numpy" | "torch", device, dtype) says what the result must look like; data is (buffer, dtype
    name) for the C++ code, a tensor for the torch code."""
    device = scores.device if isinstance(scores, torch.Tensor) else torch.device("cpu")
    impl = resolve_impl("topk_masked", impl, device)
    if impl == "cpp" or not isinstance(scores, torch.Tensor):
        buf, name, kind, dtype = _score_buffer(scores, what)
        if impl == "cpp":
            return impl, (kind, device, dtype), (buf, name)
        # torch code on numpy scores: a tensor view (a copy only for layouts torch cannot view)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only array: the torch code only reads it
            tensor = torch.from_numpy(np.ascontiguousarray(buf))
        return impl, (kind, device, dtype), tensor
    _check_tensor_scores(scores, what)
    return impl, ("torch", device, scores.dtype), scores.detach()


def _as_output(vals, idx, form) -> TopK:
    """A result in the input's form: numpy arrays for numpy scores, tensors on the scores' device
    otherwise; scores in the input dtype, items int64."""
    kind, _, dtype = form
    if kind == "numpy":
        if isinstance(vals, torch.Tensor):
            vals, idx = vals.cpu().numpy(), idx.cpu().numpy()
        return TopK(vals.astype(dtype, copy=False), idx)
    if isinstance(vals, np.ndarray):
        vals, idx = torch.from_numpy(vals), torch.from_numpy(idx)
    return TopK(vals.to(dtype), idx)


# ----------------------------------------------------------------------------- public API


def topk_masked(scores, seen, k: int, *, impl: str | None = None, num_threads: int | None = None) -> TopK:
    """The best k unseen items per row of `scores` (B × I): TopK(scores, items), B × k, best first,
    ties to the lower index, NaN never returned, short rows padded with -inf / -1.

    impl: "cpp" (default for CPU input; `num_threads` threads, default torch.get_num_threads()),
    "torch" (default for CUDA tensors), or None (see recvae_fast.ops.dispatch). See the module docstring
    for the accepted input forms.
    """
    k = check_k(k)
    impl, form, data = _scores_input(scores, impl, "scores")
    n_rows, n_items = data.shape if impl == "torch" else data[0].shape
    indptr, indices, _ = _seen_csr(seen, n_rows, n_items)
    if impl == "torch":
        vals, idx = _topk_torch(data, indptr, torch.from_numpy(indices).to(data.device), k, 0)
        return _as_output(vals, idx, form)
    nt = _check_threads(num_threads)
    if form[0] == "torch":  # tensors go through the registered op (below)
        return TopK(*torch.ops.recvae_fast.topk_masked(
            scores.detach(), torch.from_numpy(indptr), torch.from_numpy(indices), k, nt
        ))
    return topk_masked_cpp(scores, indptr, indices, k, nt)


def topk_masked_cpp(scores, indptr: np.ndarray, indices: np.ndarray, k: int, num_threads: int) -> TopK:
    """The C++ masked top-k on validated inputs (seen as int64 CSR arrays, indices in range)."""
    buf, name, kind, dtype = _score_buffer(scores)
    state = _ext().State(buf.shape[0], k, min(k, buf.shape[1]))
    state.push(buf, name, 0, indptr, indices, num_threads)
    return _as_output(*state.result(num_threads), (kind, torch.device("cpu"), dtype))


@torch.library.custom_op("recvae_fast::topk_masked", mutates_args=(), device_types="cpu")
def _topk_masked_op(scores: Tensor, indptr: Tensor, indices: Tensor, k: int, num_threads: int) -> tuple[Tensor, Tensor]:
    return tuple(topk_masked_cpp(scores, indptr.numpy(), indices.numpy(), k, num_threads))


@_topk_masked_op.register_fake
def _(scores, indptr, indices, k, num_threads):
    n_rows = scores.shape[0]
    return scores.new_empty(n_rows, k), scores.new_empty(n_rows, k, dtype=torch.int64)


def _topk_torch(scores: torch.Tensor, indptr: np.ndarray, indices: torch.Tensor, k: int, item_offset: int):
    """Validated inputs: indptr a CPU int64 array, indices an int64 tensor on scores.device."""
    device = scores.device
    n_rows, n_items = scores.shape
    kk = min(k, n_items)
    out_v = torch.full((n_rows, k), float("-inf"), dtype=scores.dtype, device=device)
    out_i = torch.full((n_rows, k), -1, dtype=torch.int64, device=device)
    if n_rows == 0 or kk == 0:
        return out_v, out_i
    work_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    neg_inf = float("-inf")
    step = max(1, _TORCH_CHUNK_ELEMENTS // n_items)
    cols_all = torch.arange(n_items, device=device)
    with torch.no_grad():
        for r0 in range(0, n_rows, step):
            r1 = min(n_rows, r0 + step)
            # A private working copy: ineligible items (NaN, seen) become -inf there, and `elig`
            # remembers them, since an eligible item may itself score -inf.
            work = scores[r0:r1].to(work_dtype, copy=True)
            elig = ~torch.isnan(work)
            work.masked_fill_(~elig, neg_inf)
            a, b = int(indptr[r0]), int(indptr[r1])
            if b > a:
                counts = torch.from_numpy(np.diff(indptr[r0 : r1 + 1])).to(device)
                rows = torch.repeat_interleave(torch.arange(r1 - r0, device=device), counts)
                cols = indices[a:b] - item_offset
                keep = (cols >= 0) & (cols < n_items)
                rows, cols = rows[keep], cols[keep]
                work[rows, cols] = neg_inf
                elig[rows, cols] = False
            # Threshold = the kk-th largest value; everything strictly above it is in, and the
            # remaining places go to the eligible items equal to it, lowest index first.
            thr = torch.topk(work, kk, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
            above = work > thr
            tie = (work == thr) & elig
            need = kk - above.sum(dim=1, keepdim=True)
            sel = above | (tie & (torch.cumsum(tie, dim=1) <= need))
            pos = torch.where(sel, cols_all, n_items)
            idx = torch.topk(pos, kk, dim=1, largest=False, sorted=True).values  # ascending item index
            valid = idx < n_items
            vals = torch.gather(work, 1, idx.clamp(max=n_items - 1)).masked_fill_(~valid, neg_inf)
            # Stable sort by score: equal scores keep ascending index; padding (-inf, past the end)
            # stays behind eligible -inf items.
            vals, order = torch.sort(vals, dim=1, descending=True, stable=True)
            idx = torch.gather(idx, 1, order)
            valid = torch.gather(valid, 1, order)
            out_v[r0:r1, :kk] = vals.to(scores.dtype)
            out_i[r0:r1, :kk] = torch.where(valid, idx + item_offset, -1)
    return out_v, out_i


def _merge_torch(v1, i1, v2, i2, k: int):
    """Merge two best-first (scores, indices) lists (padding -1 / -inf) into the best k."""
    v = torch.cat([v1, v2], dim=1)
    i = torch.cat([i1, i2], dim=1)
    key = torch.where(i < 0, torch.iinfo(torch.int64).max, i)
    key, order = torch.sort(key, dim=1, stable=True)
    v = torch.gather(v, 1, order)
    i = torch.gather(i, 1, order)
    v, order = torch.sort(v, dim=1, descending=True, stable=True)
    return v[:, :k].contiguous(), torch.gather(i, 1, order)[:, :k].contiguous()


class TopKAccumulator:
    """Streaming masked top-k over item chunks, for catalogues too large to score at once.

        acc = TopKAccumulator(n_rows, k, seen=seen_csr)        # seen: the full-catalogue CSR
        for start in range(0, n_items, chunk):
            acc.push(score_chunk(start), item_offset=start)    # B × chunk scores of items start...
        scores, items = acc.result()

    Each push merges the chunk's masked top-k (items numbered item_offset + column) into a running
    top-k, so only one chunk of B × chunk scores need exist. The running top-k ("cpp") holds up to
    k + max(k, 64) candidates of 16 bytes per row. The result equals `topk_masked` on
    the concatenated scores exactly, ties included, whatever the chunk sizes or their order.
    Chunks must not overlap; all must share one input type, device and dtype. `seen` may be given
    once here or with each push; `n_items` (optional; taken from a scipy seen matrix's shape if not
    given) bounds the offsets and the seen indices. `impl` as for `topk_masked` (the default is
    resolved from the first chunk's device).
    """

    def __init__(
        self,
        n_rows: int,
        k: int,
        *,
        n_items: int | None = None,
        seen=None,
        num_threads: int | None = None,
        impl: str | None = None,
    ):
        self.impl = check_impl("topk_masked", impl)
        self.n_rows = operator.index(n_rows)
        if self.n_rows < 0:
            raise ValueError(f"n_rows must be >= 0, got {self.n_rows}")
        self.k = check_k(k)
        if n_items is None and sp.issparse(seen):
            n_items = seen.shape[1]
        self.n_items = None if n_items is None else operator.index(n_items)
        if self.n_items is not None and self.n_items < 0:
            raise ValueError(f"n_items must be >= 0, got {self.n_items}")
        self._num_threads = num_threads
        self._seen = None if seen is None else self._parse_seen(seen)
        self._seen_device = None  # the constructor's seen indices, copied to the chunks' device once
        self._cap = self.k if self.n_items is None else min(self.k, self.n_items)
        self._form = None  # (impl, (input type, device, dtype)) of the first chunk
        self._state = None  # the running top-k: C++ state ("cpp") or (scores, items) tensors ("torch")
        self._ranges: list[tuple[int, int]] = []

    def _parse_seen(self, seen):
        return _seen_csr(seen, self.n_rows, self.n_items)[:2]

    def _claim(self, start: int, stop: int) -> None:
        if self.n_items is not None and stop > self.n_items:
            raise ValueError(f"chunk items [{start}, {stop}) run past the catalogue's {self.n_items} items")
        for a, b in self._ranges:
            if start < b and a < stop:
                raise ValueError(f"chunk items [{start}, {stop}) overlap an earlier chunk [{a}, {b})")
        if stop > start:
            self._ranges.append((start, stop))

    def push(self, scores_chunk, item_offset: int, seen=None) -> None:
        """Merge the masked top-k of `scores_chunk` (n_rows × c, column j = item item_offset + j)."""
        item_offset = operator.index(item_offset)
        if item_offset < 0:
            raise ValueError(f"item_offset must be >= 0, got {item_offset}")
        indptr, indices = self._parse_seen(seen) if seen is not None else (self._seen or self._parse_seen(None))
        impl, form, data = _scores_input(scores_chunk, self.impl, "scores_chunk")
        n_rows, n_cols = data.shape if impl == "torch" else data[0].shape
        if n_rows != self.n_rows:
            raise ValueError(f"scores_chunk has {n_rows} rows, the accumulator has {self.n_rows}")
        if self._form is None:
            self._form = (impl, form)
        elif (impl, form) != self._form:
            raise TypeError(f"every chunk must have the same input type, device and dtype: first {self._form[1]}, "
                            f"now {form}")
        self._claim(item_offset, item_offset + n_cols)
        if impl == "cpp":
            if self._state is None:
                self._state = _ext().State(self.n_rows, self._cap, self._cap)
            self._state.push(*data, item_offset, indptr, indices, _check_threads(self._num_threads))
            return
        if seen is None and self._seen is not None:
            if self._seen_device is None:
                self._seen_device = torch.from_numpy(indices).to(data.device)
            indices_on_device = self._seen_device
        else:
            indices_on_device = torch.from_numpy(indices).to(data.device)
        v, i = _topk_torch(data, indptr, indices_on_device, self._cap, item_offset)
        self._state = (v, i) if self._state is None else _merge_torch(*self._state, v, i, self._cap)

    def result(self) -> TopK:
        """TopK(scores, items), n_rows × k, best first, padded with -inf / -1 (see topk_masked).
        Before any push: all padding, float32 numpy."""
        if self._form is None:
            return TopK(np.full((self.n_rows, self.k), -np.inf, np.float32), np.full((self.n_rows, self.k), -1, np.int64))
        impl, form = self._form
        if impl == "cpp":
            vals, idx = (torch.from_numpy(a) for a in self._state.result(_check_threads(self._num_threads)))
        else:
            vals, idx = self._state
        pad = self.k - vals.shape[1]  # capacity was min(k, n_items)
        if pad:
            vals = torch.cat([vals, vals.new_full((self.n_rows, pad), float("-inf"))], dim=1)
            idx = torch.cat([idx, idx.new_full((self.n_rows, pad), -1)], dim=1)
        return _as_output(vals, idx, form)
