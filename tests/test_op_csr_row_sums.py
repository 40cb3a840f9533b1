"""recvae_fast::csr_row_sums (csrc/sparse_rows.cpp): out[r] = Σ weights·table[cols] over CSR row r,
against the dense product, at odd sizes (rows wider than one vector, empty rows, repeated cols,
rows past the prefetch distance), in float32 and float64; bad input is refused before anything
is written."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recvae_fast import _sparse_rows
from recvae_fast.ops.sparse_rows import csr_row_sums, csr_transpose

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def csr_case(n_rows, n_table, width, dtype, seed=0, max_per_row=9):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, max_per_row + 1, size=n_rows)
    counts[0] = 0  # an empty row
    if n_rows > 1:
        counts[1] = 1
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    cols = rng.integers(0, n_table, size=int(indptr[-1])).astype(np.int64)
    if len(cols) > 3:
        cols[1] = cols[2]  # a repeated col within a row
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(len(cols), generator=gen, dtype=torch.float64).to(dtype)
    table = torch.randn(n_table, width, generator=gen, dtype=torch.float64).to(dtype)
    return torch.from_numpy(indptr), torch.from_numpy(cols), weights, table


def dense_reference(indptr, cols, weights, table):
    n_rows = indptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n_rows), indptr[1:] - indptr[:-1])
    matrix = torch.zeros(n_rows, table.shape[0], dtype=torch.float64)
    matrix.index_put_((rows, cols), weights.double(), accumulate=True)
    return matrix @ table.double()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_rows,n_table,width", [(1, 1, 1), (13, 7, 33), (41, 300, 17), (5, 3, 600)])
@pytest.mark.parametrize("threads", [1, 3])
def test_matches_the_dense_product(dtype, n_rows, n_table, width, threads):
    indptr, cols, weights, table = csr_case(n_rows, n_table, width, dtype, seed=n_rows + width)
    out = csr_row_sums(indptr, cols, weights, table, "test", threads)
    assert out.shape == (n_rows, width) and out.dtype == dtype
    torch.testing.assert_close(out.double(), dense_reference(indptr, cols, weights, table), **TOL[dtype])
    assert torch.equal(out[0], torch.zeros(width, dtype=dtype))  # the empty row


def test_no_rows_and_no_nonzeros():
    table = torch.randn(4, 3, dtype=torch.float64)
    empty = torch.zeros(1, dtype=torch.int64)
    out = csr_row_sums(empty, empty[:0], table[:0, 0], table, "test", 2)
    assert out.shape == (0, 3)
    zeros = torch.zeros(4, dtype=torch.int64)
    out = csr_row_sums(zeros, zeros[:0], table[:0, 0], table, "test", 2)
    assert torch.equal(out, torch.zeros(3, 3, dtype=torch.float64))


def test_bad_input_is_refused_and_nothing_written():
    indptr, cols, weights, table = csr_case(6, 5, 4, torch.float64)
    out = np.full((6, 4), 7.0)
    args = dict(indptr=indptr.numpy(), cols=cols.numpy(), weights=weights.numpy(), table=table.numpy(), out=out,
                n_threads=2)
    bad_cols = cols.numpy().copy()
    bad_cols[-1] = 5
    cases = [
        (dict(cols=bad_cols), ValueError, r"col 5 outside \[0, 5\)"),
        (dict(cols=-1 - bad_cols), ValueError, "outside"),
        (dict(indptr=indptr.numpy()[::-1].copy()), ValueError, "indptr must start at 0"),
        (dict(indptr=np.array([0, 3, 1, 2, 2, 2, len(cols)], dtype=np.int64)), ValueError, "non-decreasing"),
        (dict(weights=weights.numpy()[:-1]), ValueError, "one entry per col"),
        (dict(weights=weights.numpy().astype(np.float32)), TypeError, "different dtype"),
        (dict(table=table.numpy().astype(np.float16), weights=weights.numpy().astype(np.float16),
              out=out.astype(np.float16)), TypeError, "float32 or float64"),
        (dict(out=np.zeros((5, 4))), ValueError, r"out must have shape \(6, 4\)"),
        (dict(table=np.asfortranarray(table.numpy())), ValueError, "C-contiguous"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            _sparse_rows.weighted_row_sums(**{**args, **change})
        assert (out == 7.0).all(), change


def test_opcheck():
    indptr, cols, weights, table = csr_case(9, 11, 5, torch.float64)
    torch.library.opcheck(torch.ops.recvae_fast.csr_row_sums.default, (indptr, cols, weights, table, "", 2),
                          test_utils=("test_schema", "test_faketensor"))


# recvae_fast::csr_transpose: the batch grouped by column (item) for fc1's dense weight gradient.

def transpose_reference(indptr, cols, weights, n_cols):
    """(col_ptr, rows, weights) by torch's stable sort on the column."""
    rows = torch.repeat_interleave(torch.arange(indptr.numel() - 1), indptr[1:] - indptr[:-1])
    order = torch.argsort(cols, stable=True)
    col_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(cols, minlength=n_cols).cumsum(0)])
    return col_ptr, rows[order], weights[order]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_rows,n_cols", [(1, 1), (13, 7), (41, 300), (5, 3), (0, 4)])
def test_transpose_matches_a_stable_sort_by_column(dtype, n_rows, n_cols):
    if n_rows:
        indptr, cols, weights, _ = csr_case(n_rows, n_cols, 1, dtype, seed=n_rows + n_cols)  # empty rows, repeats
    else:
        indptr, cols, weights = torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=dtype)
    out = csr_transpose(indptr, cols, weights, n_cols)
    for got, want in zip(out, transpose_reference(indptr, cols, weights, n_cols)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    # transposing back gives the same matrix (each row's entries then sorted by column)
    col_ptr, rows, weights_t = out
    back = csr_transpose(col_ptr, rows, weights_t, n_rows)
    dense = torch.zeros(n_rows, n_cols, dtype=torch.float64)
    dense_back = torch.zeros(n_rows, n_cols, dtype=torch.float64)
    row_ids = torch.repeat_interleave(torch.arange(n_rows), indptr[1:] - indptr[:-1])
    dense.index_put_((row_ids, cols), weights.double(), accumulate=True)
    back_rows = torch.repeat_interleave(torch.arange(n_rows), back[0][1:] - back[0][:-1])
    dense_back.index_put_((back_rows, back[1]), back[2].double(), accumulate=True)
    assert torch.equal(dense, dense_back)


def test_transpose_refuses_bad_input_and_writes_nothing():
    indptr, cols, weights, _ = csr_case(6, 5, 1, torch.float64)
    nnz = len(cols)
    outs = dict(col_ptr=np.full(6, 7, dtype=np.int64), rows=np.full(nnz, 7, dtype=np.int64), weights_t=np.full(nnz, 7.0))
    args = dict(indptr=indptr.numpy(), cols=cols.numpy(), weights=weights.numpy(), **outs)
    bad_cols = cols.numpy().copy()
    bad_cols[-1] = 5
    cases = [
        (dict(cols=bad_cols), ValueError, r"col 5 outside \[0, 5\)"),
        (dict(cols=-1 - bad_cols), ValueError, "outside"),
        (dict(indptr=np.array([0, 3, 1, 2, 2, 2, nnz], dtype=np.int64)), ValueError, "non-decreasing"),
        (dict(indptr=indptr.numpy()[::-1].copy()), ValueError, "indptr must start at 0"),
        (dict(weights=weights.numpy()[:-1]), ValueError, "one entry per col"),
        (dict(weights=weights.numpy().astype(np.float16)), TypeError, "float32 or float64"),
        (dict(weights_t=np.zeros(nnz, dtype=np.float32)), TypeError, "weights' dtype"),
        (dict(rows=np.zeros(nnz - 1, dtype=np.int64)), ValueError, "one entry per col"),
        (dict(rows=np.zeros(nnz, dtype=np.int32)), TypeError, "col_ptr and rows must be int64"),
        (dict(col_ptr=np.zeros(12, dtype=np.int64)[::2]), ValueError, "col_ptr and rows must be contiguous"),
        (dict(weights_t=weights.numpy()), ValueError, "must not overlap the inputs"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            _sparse_rows.csr_transpose(**{**args, **change})
        for name, out in outs.items():
            assert (out == 7).all(), (change, name)


def test_transpose_opcheck():
    indptr, cols, weights, _ = csr_case(9, 11, 1, torch.float64)
    torch.library.opcheck(torch.ops.recvae_fast.csr_transpose.default, (indptr, cols, weights, 11),
                          test_utils=("test_schema", "test_faketensor"))
