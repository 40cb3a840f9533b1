"""The C++ sparse-rows helpers (csrc/sparse_rows.cpp), registered as recvae_fast:: ops: the two
pieces of the sparse input layer's "cpp" weight gradient. CPU only, float32/float64, no autograd.

    recvae_fast::csr_row_sums(indptr, cols, weights, table, recycle_key, num_threads) -> out
        out[r] = Σ weights·table[cols] over CSR row r.
    recvae_fast::csr_transpose(indptr, cols, weights, n_cols) -> (col_ptr, rows, weights)
        the CSR matrix's transpose by a counting sort.

Both live in one module because they are one C++ extension's two halves of one job (the batch
grouped by item, then each item's weighted sum of gradient rows).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..precision import register_float32_autocast
from ..workspace import recycled_empty


@torch.library.custom_op("recvae_fast::csr_row_sums", mutates_args=(), device_types="cpu")
def csr_row_sums(indptr: Tensor, cols: Tensor, weights: Tensor, table: Tensor, recycle_key: str, num_threads: int) -> Tensor:
    """out[r] = Σ_{n ∈ row r} weights[n]·table[cols[n]] (csrc/sparse_rows.cpp), float32/float64; the
    output's memory is recycled under recycle_key (recvae_fast.workspace)."""
    from .. import _sparse_rows  # loaded on first use, not when the package is imported

    out = recycled_empty(recycle_key, (indptr.numel() - 1, table.shape[1]), table.dtype)
    _sparse_rows.weighted_row_sums(indptr.numpy(), cols.numpy(), weights.contiguous().numpy(),
                                   table.contiguous().numpy(), out.numpy(), num_threads)
    return out


@csr_row_sums.register_fake
def _(indptr, cols, weights, table, recycle_key, num_threads):
    return table.new_empty(indptr.shape[0] - 1, table.shape[1])


@torch.library.custom_op("recvae_fast::csr_transpose", mutates_args=(), device_types="cpu")
def csr_transpose(indptr: Tensor, cols: Tensor, weights: Tensor, n_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """(col_ptr [n_cols + 1], rows [nnz], weights [nnz]) of the CSR matrix's transpose, each column's
    entries in row order (csrc/sparse_rows.cpp's counting sort), float32/float64 weights."""
    from .. import _sparse_rows

    col_ptr = torch.empty(n_cols + 1, dtype=torch.int64)
    rows, weights_t = torch.empty_like(cols), torch.empty_like(weights)
    _sparse_rows.csr_transpose(indptr.contiguous().numpy(), cols.contiguous().numpy(),
                               weights.detach().contiguous().numpy(), col_ptr.numpy(), rows.numpy(), weights_t.numpy())
    return col_ptr, rows, weights_t


@csr_transpose.register_fake
def _(indptr, cols, weights, n_cols):
    return cols.new_empty(n_cols + 1), torch.empty_like(cols), torch.empty_like(weights)


register_float32_autocast("recvae_fast::csr_row_sums", ("cpu",))
