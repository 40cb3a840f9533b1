"""User × item batches in CSR form: conversion, validation and canonicalisation.

Every fast op takes a `CSRBatch`. Building one checks the input once (shape, dtype, device,
finite non-negative values, indices in range) and sums duplicate (user, item) entries, so
the ops can rely on a canonical CSR: rows sorted by item, no repeated item within a row.
Summing duplicates matters beyond the linear layer: the row L2 norm and the dropout mask of
the dense input see one entry per (user, item), and so must we.

`as_user_matrix` is the one check of a users × items scipy matrix (fit, recommend, evaluate,
metrics): scipy.sparse, 2-D, the expected number of item columns, finite values >= 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch


@dataclass(frozen=True)
class CSRBatch:
    """A canonical CSR matrix of B users × n_cols items, as torch tensors on one device."""

    indptr: torch.Tensor  # int64 [B + 1]
    indices: torch.Tensor  # int64 [nnz], sorted within each row, no duplicates
    values: torch.Tensor  # float [nnz], finite and >= 0
    n_cols: int

    @property
    def n_rows(self) -> int:
        return self.indptr.numel() - 1

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def row_ids(self) -> torch.Tensor:
        """The user (row) of each nonzero, int64 [nnz]."""
        counts = self.indptr[1:] - self.indptr[:-1]
        # output_size: the length is known (nnz), so no device sync, and torch.compile sees a
        # static shape instead of a data-dependent one (which broke the graph at every call).
        return torch.repeat_interleave(torch.arange(self.n_rows, device=self.device), counts, output_size=self.nnz)

    def row_sums(self) -> torch.Tensor:
        """n_u = Σ_i x_ui for each user, [B]."""
        out = torch.zeros(self.n_rows, dtype=self.dtype, device=self.device)
        return out.index_add_(0, self.row_ids(), self.values)

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(self.n_rows, self.n_cols, dtype=self.dtype, device=self.device)
        out[self.row_ids(), self.indices] = self.values
        return out


def _check_values(values: torch.Tensor, name: str = "user_ratings") -> None:
    if values.numel() == 0:
        return
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    if bool((values < 0).any()):
        raise ValueError(f"{name} contains negative values; implicit feedback must be >= 0")


def as_user_matrix(name: str, matrix, n_items: int | None = None, items_of: str = "the model") -> sp.csr_matrix:
    """`matrix` (users × items, any scipy.sparse format) as a CSR matrix, checked: 2-D, `n_items`
    columns when given (`items_of` names what fixes that number in the error), finite values
    >= 0. The one validator of user matrices for fit, recommend, evaluate and the metrics."""
    if not sp.issparse(matrix):
        raise TypeError(f"{name} must be a scipy.sparse matrix (users × items), got {type(matrix).__name__}")
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be 2-D (users × items), got shape {matrix.shape}")
    if n_items is not None and matrix.shape[1] != n_items:
        raise ValueError(f"{name} has {matrix.shape[1]} item columns, {items_of} has {n_items} items")
    matrix = sp.csr_matrix(matrix)
    if matrix.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {matrix.dtype}")
    _check_values(torch.from_numpy(np.ascontiguousarray(matrix.data)), name)
    return matrix


def _canonical(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n_cols: int) -> CSRBatch:
    """Sort items within rows and sum duplicates; a cheap O(nnz) check skips the work when
    the input is already canonical (the common case for scipy and torch CSR)."""
    n_rows = indptr.numel() - 1
    nnz = indices.numel()
    if nnz > 1:
        counts = indptr[1:] - indptr[:-1]
        rows = torch.repeat_interleave(torch.arange(n_rows, device=indices.device), counts)
        key = rows * n_cols + indices
        if not bool((key[1:] > key[:-1]).all()):
            unique_key, inverse = torch.unique(key, sorted=True, return_inverse=True)
            summed = torch.zeros(unique_key.numel(), dtype=values.dtype, device=values.device)
            summed.index_add_(0, inverse, values)
            rows = torch.div(unique_key, n_cols, rounding_mode="floor")
            indices = unique_key - rows * n_cols
            values = summed
            new_counts = torch.bincount(rows, minlength=n_rows)
            indptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=indices.device)
            indptr[1:] = torch.cumsum(new_counts, 0)
    return CSRBatch(indptr.contiguous(), indices.contiguous(), values.contiguous(), n_cols)


def as_csr_batch(
    x,
    n_cols: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> CSRBatch:
    """Convert user ratings to a validated, canonical `CSRBatch`.

    Accepts a scipy.sparse matrix (any format), a torch sparse CSR or COO tensor, a dense torch
    tensor or a numpy array, each of shape B × n_cols. Dense and torch inputs must already be on
    `device` (no silent transfers of the caller's tensors); scipy and numpy inputs are moved there.
    Floating inputs must have `dtype`; integer and bool inputs are converted.
    """
    if isinstance(x, CSRBatch):
        if x.n_cols != n_cols:
            raise ValueError(f"user_ratings has {x.n_cols} columns, the model has {n_cols} items")
        return x
    device = torch.device(device) if device is not None else None
    dtype = dtype or torch.get_default_dtype()

    if sp.issparse(x):
        csr = as_user_matrix("user_ratings", x, n_cols)
        indptr = torch.from_numpy(np.asarray(csr.indptr, dtype=np.int64))
        indices = torch.from_numpy(np.asarray(csr.indices, dtype=np.int64))
        values = torch.from_numpy(np.asarray(csr.data)).to(dtype)
        if device is not None:
            indptr, indices, values = indptr.to(device), indices.to(device), values.to(device)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n_cols):
            raise IndexError(f"user_ratings has an item index outside [0, {n_cols})")
        _check_values(values)  # again after the cast: a float64 value may overflow float32
        return _canonical(indptr, indices, values, n_cols)

    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
        if device is not None:
            x = x.to(device)
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            "user_ratings must be a torch tensor (dense or sparse CSR/COO), a scipy.sparse matrix "
            f"or a numpy array, got {type(x).__name__}"
        )
    if x.dim() != 2:
        raise ValueError(f"user_ratings must be 2-D (users × items), got shape {tuple(x.shape)}")
    if x.shape[1] != n_cols:
        raise ValueError(f"user_ratings has {x.shape[1]} columns, the model has {n_cols} items")
    if device is not None and x.device != device:
        raise ValueError(f"user_ratings is on {x.device}, the model is on {device}; move it first")
    if x.is_floating_point() and x.dtype != dtype:
        raise TypeError(f"user_ratings has dtype {x.dtype}, the model has {dtype}; convert it first")
    if x.is_complex():
        raise TypeError("user_ratings must be real, got a complex tensor")

    if x.layout == torch.sparse_csr:
        indptr = x.crow_indices().to(torch.int64)
        indices = x.col_indices().to(torch.int64)
        values = x.values().to(dtype)
    elif x.layout == torch.sparse_coo:
        x = x.coalesce()
        rows, indices = x.indices()[0], x.indices()[1]
        values = x.values().to(dtype)
        indptr = torch.zeros(x.shape[0] + 1, dtype=torch.int64, device=x.device)
        indptr[1:] = torch.cumsum(torch.bincount(rows, minlength=x.shape[0]), 0)
    elif x.layout == torch.strided:
        dense = x.to(dtype)
        _check_values(dense)
        rows, indices = torch.nonzero(dense, as_tuple=True)
        values = dense[rows, indices]
        indptr = torch.zeros(x.shape[0] + 1, dtype=torch.int64, device=x.device)
        indptr[1:] = torch.cumsum(torch.bincount(rows, minlength=x.shape[0]), 0)
    else:
        raise TypeError(f"unsupported tensor layout {x.layout}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n_cols):
        raise IndexError(f"user_ratings has an item index outside [0, {n_cols})")
    _check_values(values)
    return _canonical(indptr, indices, values, n_cols)

