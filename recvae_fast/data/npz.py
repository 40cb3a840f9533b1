"""CSR matrices in .npz archives: plain numeric arrays only (no pickle, read or written), each file
written atomically, and every array checked on reading (a DataError naming the file otherwise).

A matrix is four arrays under a prefix: `<prefix>indptr`, `<prefix>indices`, `<prefix>data` and
`<prefix>shape`. `Interactions.save` and `Split.save` use this module for their matrices.
"""
from __future__ import annotations

import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..atomic import atomic_write
from .errors import DataError


def save_npz(path, arrays: dict[str, np.ndarray]) -> None:
    """Write the arrays into the .npz file `path`, atomically (its folder must exist)."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def csr_to_arrays(m: sp.csr_matrix, prefix: str = "") -> dict[str, np.ndarray]:
    """The four arrays of a CSR matrix under `prefix`: int64 row pointers, column indices and shape,
    float32 values (read back by `csr_from_arrays`)."""
    return {f"{prefix}indptr": m.indptr.astype(np.int64), f"{prefix}indices": m.indices.astype(np.int64),
            f"{prefix}data": m.data.astype(np.float32), f"{prefix}shape": np.array(m.shape, dtype=np.int64)}


@contextmanager
def open_npz(path: Path):
    """np.load of an .npz without pickle; DataError naming the file when it is missing or not a
    readable archive."""
    if not path.is_file():
        raise DataError(f"{path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            yield _CheckedArchive(z, path.name)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{path} is not a readable .npz archive (truncated or corrupt: {exc})") from None


class _CheckedArchive:
    """Read access to an npz archive whose member errors name the file."""

    def __init__(self, z, source: str):
        self._z, self.source = z, source

    def __contains__(self, key: str) -> bool:
        return key in self._z.files

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._z.files:
            raise DataError(f"{self.source}: missing array {key!r}")
        try:
            return self._z[key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{self.source}: array {key!r} is truncated or corrupt ({exc})") from None


def csr_from_arrays(z, prefix: str, source: str) -> sp.csr_matrix:
    """A validated canonical float32 CSR matrix from `<prefix>indptr`, `indices`, `data`, `shape`."""
    what = prefix.rstrip("_") or "matrix"
    indptr, indices, data, shape = (np.asarray(z[f"{prefix}{k}"]) for k in ("indptr", "indices", "data", "shape"))
    if shape.shape != (2,) or shape.dtype.kind not in "iu" or (shape < 0).any():
        raise DataError(f"{source}: {what} shape is not two non-negative integers")
    n_rows, n_cols = (int(v) for v in shape)
    if indptr.ndim != 1 or indptr.dtype.kind not in "iu" or indptr.size != n_rows + 1:
        raise DataError(f"{source}: {what} row pointers are not {n_rows + 1} integers")
    if indices.ndim != 1 or indices.dtype.kind not in "iu" or data.ndim != 1 or data.dtype.kind != "f" \
            or indices.size != data.size:
        raise DataError(f"{source}: {what} indices and values are not two 1-d arrays of one length")
    if indptr[0] != 0 or indptr[-1] != indices.size or np.any(np.diff(indptr.astype(np.int64)) < 0):
        raise DataError(f"{source}: {what} row pointers are not non-decreasing from 0 to {indices.size}")
    if indices.size and (indices.min() < 0 or indices.max() >= n_cols):
        raise DataError(f"{source}: {what} has a column index outside 0..{n_cols - 1}")
    if not np.all(np.isfinite(data)) or (data.size and np.abs(data).max() > np.finfo(np.float32).max):
        raise DataError(f"{source}: {what} has a non-finite value (or one beyond float32)")
    m = sp.csr_matrix((data.astype(np.float32), indices.astype(np.int64), indptr.astype(np.int64)),
                      shape=(n_rows, n_cols))
    if not m.has_canonical_format:
        raise DataError(f"{source}: {what} has unsorted or repeated columns within a row")
    return m
