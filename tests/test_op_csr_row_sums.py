"""recvae_fast::csr_row_sums (csrc/sparse_rows.cpp): out[r] = Σ weights·table[cols] over CSR row r,
against the dense product, at odd sizes (rows wider than one vector, empty rows, repeated cols,
rows past the prefetch distance), in float32 and float64; bad input is refused before anything
is written."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recvae_fast import _sparse_rows
from recvae_fast import custom_ops  # noqa: F401 - registers recvae_fast::csr_row_sums

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
    out = torch.ops.recvae_fast.csr_row_sums(indptr, cols, weights, table, "test", threads)
    assert out.shape == (n_rows, width) and out.dtype == dtype
    torch.testing.assert_close(out.double(), dense_reference(indptr, cols, weights, table), **TOL[dtype])
    assert torch.equal(out[0], torch.zeros(width, dtype=dtype))  # the empty row


def test_no_rows_and_no_nonzeros():
    table = torch.randn(4, 3, dtype=torch.float64)
    empty = torch.zeros(1, dtype=torch.int64)
    out = torch.ops.recvae_fast.csr_row_sums(empty, empty[:0], table[:0, 0], table, "test", 2)
    assert out.shape == (0, 3)
    zeros = torch.zeros(4, dtype=torch.int64)
    out = torch.ops.recvae_fast.csr_row_sums(zeros, zeros[:0], table[:0, 0], table, "test", 2)
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
