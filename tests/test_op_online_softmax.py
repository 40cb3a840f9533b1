"""csrc/online_softmax.cpp: one in-place step of the row-wise online softmax the CPU NLL runs per item
block, against torch (exp, max, sum in float64), at odd widths (1, under and over one vector,
not a multiple of 16), first and later blocks, rows given as a view of a wider buffer; its exp over
the whole range an NLL meets (down to underflow) in float32 and float64; NaN and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recvae_fast import _online_softmax

# exp's error: under 2 ulp of the result (polynomial and 2^n scaling), the sums' rounding on top.
TOL = {torch.float64: dict(rtol=1e-14, atol=0), torch.float32: dict(rtol=4e-7, atol=0)}


def step(logits, run_max, run_sum, threads=2):
    rescale = torch.empty_like(run_max)
    _online_softmax.online_softmax_block(logits.numpy(), run_max.numpy(), run_sum.numpy(), rescale.numpy(), threads)
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


def test_bad_input_is_refused():
    block = np.zeros((3, 4))
    vec = np.zeros(3)
    call = _online_softmax.online_softmax_block
    with pytest.raises(ValueError, match="one entry per row"):
        call(block, np.zeros(2), vec.copy(), vec.copy(), 1)
    with pytest.raises(TypeError, match="different dtype"):
        call(block, np.zeros(3, np.float32), vec.copy(), vec.copy(), 1)
    with pytest.raises(TypeError, match="float32 or float64"):
        call(block.astype(np.float16), vec, vec, vec, 1)
    with pytest.raises(ValueError, match="contiguous rows"):
        call(np.zeros((3, 8))[:, ::2], vec.copy(), vec.copy(), vec.copy(), 1)
    with pytest.raises(ValueError, match="2-D"):
        call(np.zeros(3), vec.copy(), vec.copy(), vec.copy(), 1)
