"""csrc/nll_blocks.cpp, the CPU NLL's per-item-block steps, against torch in float64:
- online_softmax_block (forward): the in-place online softmax step at odd widths (1, under and over
  one vector, not a multiple of 16), first and later blocks, rows given as a view of a wider buffer;
  its exp over the whole range an NLL meets (down to underflow) in float32 and float64; NaN; the
  bias added and the nonzeros' logits gathered in the same call, walked over several blocks.
- decoder_grad_block (backward): G from kept probabilities or recomputed logits (in place), the
  nonzeros' −g·x, the column sums, at odd widths, 0 rows and several threads.
- the nonzero walk (CsrCursor): empty rows, one-item rows, repeated items, rows not sorted by item
  and items out of range (the walk stops short and says where); bad input refused by name."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recvae_fast import _nll_blocks

# exp's error: under 2 ulp of the result (polynomial and 2^n scaling), the sums' rounding on top.
TOL = {torch.float64: dict(rtol=1e-14, atol=0), torch.float32: dict(rtol=4e-7, atol=0)}


def step(logits, run_max, run_sum, threads=2, bias=None, cursor=None, start=0, target=None):
    rescale = torch.empty_like(run_max)
    _nll_blocks.online_softmax_block(
        logits.numpy(), None if bias is None else bias.numpy(), run_max.numpy(), run_sum.numpy(), rescale.numpy(),
        cursor, start, None if target is None else target.numpy(), threads,
    )
    return rescale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_rows,width", [(1, 1), (3, 15), (7, 17), (5, 1023), (0, 9)])
@pytest.mark.parametrize("threads", [1, 3])
def test_two_blocks_match_torch(dtype, n_rows, width, threads):
    gen = torch.Generator().manual_seed(width)
    first = torch.randn(n_rows, width, generator=gen, dtype=torch.float64) * 5
    second = torch.randn(n_rows, width + 2, generator=gen, dtype=torch.float64) * 5 + 3
    first, second = (t.to(dtype).double() for t in (first, second))  # exactly representable in dtype
    run_max = torch.full((n_rows,), -math.inf, dtype=dtype)
    run_sum = torch.zeros(n_rows, dtype=dtype)
    buffer = torch.full((n_rows, width + 7), 123.0, dtype=dtype)  # rows of the block are a view
    block = buffer[:, :width].copy_(first)
    rescale = step(block, run_max, run_sum, threads)
    assert torch.equal(rescale, torch.zeros(n_rows, dtype=dtype))  # nothing to rescale on the first block
    max1 = first.amax(1)
    torch.testing.assert_close(run_max.double(), max1, rtol=0, atol=0)
    # the difference is rounded to dtype before exp, as in any dtype pipeline
    torch.testing.assert_close(block.double(), torch.exp((first - max1[:, None]).to(dtype).double()), **TOL[dtype])
    assert (buffer[:, width:] == 123.0).all()  # nothing written past the block's width
    rescale = step(second.to(dtype, copy=True), run_max, run_sum, threads)
    max2 = torch.maximum(max1, second.amax(1))
    torch.testing.assert_close(rescale.double(), torch.exp((max1 - max2).to(dtype).double()), **TOL[dtype])
    lse = max2 + torch.log(torch.exp(first - max2[:, None]).sum(1) + torch.exp(second - max2[:, None]).sum(1))
    lse_tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-14, atol=1e-13)
    torch.testing.assert_close(run_max.double() + torch.log(run_sum.double()), lse, **lse_tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exp_over_the_whole_range(dtype):
    """With run_max 0 and logits ≤ 0 the block becomes exp(logits): compared to torch.exp from 0
    down past underflow (flushed to 0 below the smallest normal result)."""
    smallest_normal = torch.finfo(dtype).tiny
    floor = math.log(smallest_normal)
    x = torch.cat([torch.linspace(floor + 1e-3, 0.0, 20001, dtype=torch.float64), torch.tensor([-1e-30, -0.0])])
    block = x.to(dtype)[None].clone()
    run_max, run_sum = torch.zeros(1, dtype=dtype), torch.zeros(1, dtype=dtype)
    step(block, run_max, run_sum)
    torch.testing.assert_close(block[0].double(), torch.exp(x.to(dtype).double()), **TOL[dtype])
    below = torch.tensor([[floor - 1.0, -1e4, -math.inf, 0.0]], dtype=dtype)
    run_max, run_sum = torch.zeros(1, dtype=dtype), torch.zeros(1, dtype=dtype)
    step(below, run_max, run_sum)
    assert below.tolist() == [[0.0, 0.0, 0.0, 1.0]] and run_sum.item() == 1.0


def test_nan_logits_give_a_nan_sum():
    block = torch.tensor([[0.5, float("nan"), -1.0], [0.5, 0.25, -1.0]], dtype=torch.float32)
    run_max, run_sum = torch.full((2,), -math.inf), torch.zeros(2)
    step(block, run_max, run_sum)
    assert math.isnan(run_sum[0].item()) and math.isfinite(run_sum[1].item())


# Rows of nonzero items for the walk tests: empty, one item, a repeated item (kept as given: the
# walk sums both), items in every block, one past a block edge. Widths below: 5, 17, 1, 9.
ROWS = [[], [4], [3, 3, 6], [0, 5, 21, 22, 31], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [22]]
WIDTHS = [5, 17, 1, 9]


def csr(rows, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    indptr = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    indices = torch.tensor([i for r in rows for i in r], dtype=torch.int64)
    values = (torch.rand(len(indices), generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    return indptr, indices, values


def cursor_of(indptr, indices, values):
    return _nll_blocks.CsrCursor(indptr.numpy(), indices.numpy(), values.numpy())


def dense_x(rows, values, n_items):
    x = torch.zeros(len(rows), n_items, dtype=torch.float64)
    k = 0
    for r, items in enumerate(rows):
        for i in items:
            x[r, i] += values[k].double()
            k += 1
    return x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("threads", [1, 3])
def test_bias_and_targets_over_blocks(dtype, threads):
    """Blocks of widths 5, 17, 1, 9 walked in turn: each gets its bias added before the max, and
    target = Σ x·(logit + bias) over the nonzeros, each visited once; the softmax state as without."""
    indptr, indices, values = csr(ROWS, dtype)
    n_rows, n_items = len(ROWS), sum(WIDTHS)
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(n_rows, n_items, generator=gen, dtype=torch.float64) * 3).to(dtype)
    bias = torch.randn(n_items, generator=gen, dtype=torch.float64).to(dtype)
    cursor = cursor_of(indptr, indices, values)
    run_max = torch.full((n_rows,), -math.inf, dtype=dtype)
    run_sum, target = torch.zeros(n_rows, dtype=dtype), torch.zeros(n_rows, dtype=dtype)
    start = 0
    for width in WIDTHS:
        assert not cursor.complete()
        block = logits[:, start : start + width].clone()
        step(block, run_max, run_sum, threads, bias[start : start + width], cursor, start, target)
        # the block holds exp(logit + bias − running max), the sum and difference rounded to dtype
        want = torch.exp((logits[:, start : start + width] + bias[start : start + width] - run_max[:, None]).double())
        torch.testing.assert_close(block.double(), want, **TOL[dtype])
        start += width
    assert cursor.complete() and cursor.positions().tolist() == indptr[1:].tolist()
    full = (logits + bias).double()
    x = dense_x(ROWS, values, n_items)
    tol = dict(rtol=1e-6, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(target.double(), (x * full).sum(1), **tol)
    torch.testing.assert_close(run_max.double() + torch.log(run_sum.double()), torch.logsumexp(full, 1), **tol)
    cursor.rewind()
    assert cursor.positions().tolist() == indptr[:-1].tolist()


def test_walk_stops_at_unsorted_rows_and_items_out_of_range():
    """A row not sorted by item, or with an item past the catalogue, stops the walk there: what it
    passed is gathered correctly, the rest is left to the caller (positions)."""
    rows = [[5, 3], [2, 9], [1, 2]]  # blocks [0, 4) and [4, 8): 3 comes after 5; 9 is out of range
    indptr, indices, values = csr(rows, torch.float64)
    cursor = cursor_of(indptr, indices, values)
    logits = torch.randn(3, 8, dtype=torch.float64)
    run_max, run_sum, target = torch.full((3,), -math.inf, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for start in (0, 4):
        step(logits[:, start : start + 4].clone(), run_max, run_sum, 1, None, cursor, start, target)
    assert not cursor.complete()
    assert cursor.positions().tolist() == [1, 3, 6]  # row 0 stopped at 3, row 1 at 9, row 2 done
    v = values.tolist()
    torch.testing.assert_close(target, torch.tensor([v[0] * logits[0, 5], v[2] * logits[1, 2], v[4] * logits[2, 1] + v[5] * logits[2, 2]]))


def grad_reference(block, bias, shift, scale, row_grad, x_block):
    """G in float64: scale·P (no shift) or scale·exp(L + bias − shift), minus g·x; and its column sums."""
    base = block.double()
    if shift is not None:
        base = torch.exp(base + (0 if bias is None else bias.double()) - shift.double()[:, None])
    g = base * scale.double()[:, None] - row_grad.double()[:, None] * x_block
    return g, g.sum(0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("mode", ["kept", "recomputed", "recomputed-no-bias"])
def test_decoder_grad_blocks(dtype, threads, mode):
    """Backward's step over blocks of widths 5, 17, 1, 9: G and dbd against float64. Recomputed
    blocks are written in place (block and G the same memory), as backward does."""
    indptr, indices, values = csr(ROWS, dtype)
    n_rows, n_items = len(ROWS), sum(WIDTHS)
    gen = torch.Generator().manual_seed(2)
    scale = (torch.rand(n_rows, generator=gen, dtype=torch.float64) + 0.1).to(dtype)
    row_grad = torch.randn(n_rows, generator=gen, dtype=torch.float64).to(dtype)
    logits = torch.randn(n_rows, n_items, generator=gen, dtype=torch.float64).to(dtype)
    bias = None if mode != "recomputed" else torch.randn(n_items, generator=gen, dtype=torch.float64).to(dtype)
    shift = None if mode == "kept" else (torch.logsumexp(logits.double(), 1) + 2).to(dtype)  # arguments ≤ 0
    x = dense_x(ROWS, values, n_items)
    cursor = cursor_of(indptr, indices, values)
    start = 0
    for width in WIDTHS:
        block = logits[:, start : start + width].clone()
        out = block if mode != "kept" else torch.full((n_rows, width), 7.0, dtype=dtype)
        grad_bias = torch.full((width,), 99.0, dtype=dtype)
        b = None if bias is None else bias[start : start + width]
        _nll_blocks.decoder_grad_block(
            block.numpy(), out.numpy(), None if b is None else b.numpy(), None if shift is None else shift.numpy(),
            scale.numpy(), row_grad.numpy(), cursor, start, grad_bias.numpy(), threads,
        )
        want_g, want_sums = grad_reference(logits[:, start : start + width], b, shift, scale, row_grad, x[:, start : start + width])
        tol = dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(out.double(), want_g, **tol)
        torch.testing.assert_close(grad_bias.double(), want_sums, **tol)
        start += width
    assert cursor.complete()


def test_decoder_grad_block_without_rows_zeroes_the_bias_gradient():
    empty = np.zeros((0, 4), np.float32)
    cursor = _nll_blocks.CsrCursor(np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    grad_bias = np.full(4, 5.0, np.float32)
    vec = np.zeros(0, np.float32)
    _nll_blocks.decoder_grad_block(empty, empty.copy(), None, None, vec, vec, cursor, 0, grad_bias, 2)
    assert grad_bias.tolist() == [0.0] * 4


def test_bad_input_is_refused():
    block = np.zeros((3, 4))
    vec = np.zeros(3)
    indptr, indices, values = (t.numpy() for t in csr([[0], [], [1, 2]], torch.float64))
    cursor = _nll_blocks.CsrCursor(indptr, indices, values)

    def softmax(logits=block, bias=None, run_max=vec, nonzeros=None, target=None):
        others = np.zeros_like(run_max)
        _nll_blocks.online_softmax_block(logits, bias, run_max, others, others.copy(), nonzeros, 0, target, 1)

    with pytest.raises(ValueError, match="run_max must be 1-D with 3 entries"):
        softmax(run_max=np.zeros(2))
    with pytest.raises(TypeError, match="run_max has a different dtype"):
        softmax(run_max=np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        softmax(logits=block.astype(np.float16))
    with pytest.raises(ValueError, match="contiguous rows"):
        softmax(logits=np.zeros((3, 8))[:, ::2])
    with pytest.raises(ValueError, match="2-D"):
        softmax(logits=np.zeros(3))
    with pytest.raises(ValueError, match="bias must be 1-D with 4 entries"):
        softmax(bias=np.zeros(3))
    with pytest.raises(ValueError, match="need a target"):
        softmax(nonzeros=cursor)
    with pytest.raises(ValueError, match="one CSR row per block row"):
        softmax(logits=np.zeros((2, 4)), run_max=np.zeros(2), nonzeros=cursor)
    with pytest.raises(TypeError, match="values have a different dtype"):
        softmax(logits=block.astype(np.float32), run_max=np.zeros(3, np.float32), nonzeros=cursor)

    with pytest.raises(ValueError, match="indptr must run from 0 to nnz"):
        _nll_blocks.CsrCursor(indptr + 1, indices, values)
    with pytest.raises(ValueError, match="indptr must not decrease"):
        _nll_blocks.CsrCursor(np.array([0, 2, 1, 3]), indices, values)
    with pytest.raises(ValueError, match="one per index"):
        _nll_blocks.CsrCursor(indptr, indices, values[:2])
    with pytest.raises(ValueError, match="int64"):
        _nll_blocks.CsrCursor(indptr.astype(np.int32), indices, values)
    with pytest.raises(TypeError, match="float32 or float64"):
        _nll_blocks.CsrCursor(indptr, indices, values.astype(np.float16))

    def grad(g_out=block.copy(), row_scale=vec, grad_bias=np.zeros(4)):
        _nll_blocks.decoder_grad_block(block, g_out, None, None, row_scale, vec, cursor, 0, grad_bias, 1)

    with pytest.raises(ValueError, match="g_out must have the block's shape"):
        grad(g_out=np.zeros((3, 5)))
    with pytest.raises(ValueError, match="row_scale must be 1-D with 3 entries"):
        grad(row_scale=np.zeros(4))
    with pytest.raises(ValueError, match="grad_bias must be 1-D with 4 entries"):
        grad(grad_bias=np.zeros(3))
    with pytest.raises(ValueError, match="g_out must be writable"):
        frozen = block.copy()
        frozen.flags.writeable = False
        grad(g_out=frozen)
