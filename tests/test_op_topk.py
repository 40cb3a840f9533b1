"""The masked top-k op (recvae_fast.ops.topk_masked), each implementation ("cpp", "torch") against a
brute-force numpy reference.

Scores are drawn from a handful of values so that ties are everywhere (the lower item index must
win), with NaNs (never returned), -inf (eligible, ranked last), rows where everything is seen,
unsorted and duplicate seen indices, k >= I, chunked accumulation, both input kinds, strided
inputs and bad inputs. The "torch" implementation (the default for CUDA tensors) runs here on CPU
tensors and numpy arrays.
"""
from __future__ import annotations

import functools
import threading

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import recvae_fast.ops.topk_masked as topk_mod
from recvae_fast.ops.topk_masked import TopKAccumulator, topk_masked

NEG_INF = float("-inf")


@pytest.fixture(params=["cpp", "torch"])
def impl(request):
    return request.param


@pytest.fixture
def topk(impl):
    """topk_masked with the implementation under test."""
    return functools.partial(topk_masked, impl=impl)


@pytest.fixture
def accumulator(impl):
    """TopKAccumulator with the implementation under test."""
    return functools.partial(TopKAccumulator, impl=impl)


# ----------------------------------------------------------------------------- helpers


def reference(scores, indptr, indices, k):
    """Brute force: per row, eligible = not seen and not NaN; order by (score desc, index asc)."""
    s = np.asarray(scores, dtype=np.float64)
    n_rows, n_items = s.shape
    vals = np.full((n_rows, k), -np.inf)
    idx = np.full((n_rows, k), -1, np.int64)
    for r in range(n_rows):
        ok = ~np.isnan(s[r])
        ok[indices[indptr[r] : indptr[r + 1]]] = False
        items = np.nonzero(ok)[0]
        order = items[np.lexsort((items, -s[r, items]))][:k]
        vals[r, : order.size] = s[r, order]
        idx[r, : order.size] = order
    return vals, idx


def make_case(rng, n_rows, n_items, n_levels=4, nan_frac=0.05, ninf_frac=0.03, seen_per_row=None):
    """Tie-heavy scores plus a messy seen CSR (unsorted, duplicates, empty and full rows)."""
    scores = rng.integers(0, n_levels, (n_rows, n_items)).astype(np.float64) / 2 - 1
    scores[rng.random((n_rows, n_items)) < nan_frac] = np.nan
    scores[rng.random((n_rows, n_items)) < ninf_frac] = -np.inf
    rows = []
    for r in range(n_rows):
        mode = r % 5
        if mode == 0:
            row = np.zeros(0, np.int64)  # nothing seen
        elif mode == 1 and n_items:
            row = rng.permutation(n_items)  # everything seen, unsorted
        else:
            m = seen_per_row if seen_per_row is not None else rng.integers(0, max(1, n_items // 3) + 1)
            row = rng.integers(0, max(n_items, 1), m) if n_items else np.zeros(0, np.int64)
            if row.size:
                row = np.concatenate([row, row[: row.size // 3]])  # duplicates
                rng.shuffle(row)  # unsorted
        rows.append(row.astype(np.int64))
    indptr = np.zeros(n_rows + 1, np.int64)
    indptr[1:] = np.cumsum([r.size for r in rows])
    indices = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return scores, indptr, indices


def assert_same(got, want, check_dtype=None):
    gv, gi = (x.double().numpy() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in got)
    gi = gi.numpy() if isinstance(gi, torch.Tensor) else gi
    wv, wi = want
    np.testing.assert_array_equal(gi, wi)
    np.testing.assert_array_equal(np.asarray(gv, dtype=np.float64), wv)
    if check_dtype is not None:
        assert got[0].dtype == check_dtype


# ----------------------------------------------------------------------------- the C++ kernel


@pytest.mark.parametrize("n_rows,n_items", [(37, 1), (37, 9), (23, 150), (12, 3000), (5, 40_000)])
@pytest.mark.parametrize("k", [1, 7, 100])
def test_matches_reference_numpy_float64(n_rows, n_items, k, topk):
    rng = np.random.default_rng(n_rows * 1000 + n_items + k)
    scores, indptr, indices = make_case(rng, n_rows, n_items)
    vals, idx = topk(scores, (indptr, indices), k)
    assert vals.shape == idx.shape == (n_rows, k)
    assert vals.dtype == np.float64 and idx.dtype == np.int64
    assert_same((vals, idx), reference(scores, indptr, indices, k))


@pytest.mark.parametrize("layout", ["c", "fortran", "float16"])
@pytest.mark.parametrize("k", [1, 10, 64, 250])
def test_many_ties_larger_rows_and_warmup_paths(k, layout, topk):
    # Few distinct values, sparse seen rows: exercises the warm-up bound (ties at the bound must
    # be collected), the running threshold and the tail of rows longer than the warm-up segment.
    rng = np.random.default_rng(k)
    scores = rng.integers(0, 6, (6, 70_001)).astype(np.float32)
    scores[:, ::97] = np.nan
    scores[3] = 1.0  # a row that is one big tie
    scores[4, -5:] = 9.0  # the best items at the very end, past the warm-up segment
    _, indptr, indices = make_case(rng, 6, 70_001, seen_per_row=80)
    if layout == "fortran":  # strided columns: the generic element path
        scores = np.asfortranarray(scores)
    elif layout == "float16":  # converted blocks
        scores = scores.astype(np.float16)
    want = reference(scores, indptr, indices, k)
    for nt in (1, 2):
        got = topk(scores, (indptr, indices), k, num_threads=nt)
        assert_same(got, want, scores.dtype)


@pytest.mark.parametrize("k", [1, 5, 40])
def test_seen_items_hold_the_best_scores(k, topk):
    # The user has already seen every top-scored item, spread over the row: bounds taken from
    # group maxima must not count seen items as candidates.
    rng = np.random.default_rng(k)
    n_rows, n_items = 8, 50_000
    scores = rng.integers(0, 4, (n_rows, n_items)).astype(np.float32)
    rows = [np.sort(rng.choice(n_items, 300, replace=False)) for _ in range(n_rows)]
    for r, cols in enumerate(rows):
        scores[r, cols] = 100.0 + rng.integers(0, 3, cols.size)
    indptr = np.arange(0, 300 * n_rows + 1, 300)
    indices = np.concatenate(rows)
    got = topk(scores, (indptr, indices), k)
    assert np.all(got[0] < 100)
    assert_same(got, reference(scores, indptr, indices, k))


def test_infinities_nan_and_padding(topk):
    s = np.array(
        [
            [NEG_INF, 1.0, np.nan, NEG_INF, 2.0, np.inf],
            [np.nan, np.nan, np.nan, np.nan, np.nan, np.nan],
            [NEG_INF, NEG_INF, NEG_INF, np.nan, 0.0, -0.0],
        ],
        dtype=np.float32,
    )
    seen = sp.csr_matrix(([1, 1], ([0, 2], [0, 4])), shape=(3, 6))
    vals, idx = topk(s, seen, 5)
    # -inf items are eligible and come after the finite ones (ties by index), padding after them.
    np.testing.assert_array_equal(idx, [[5, 4, 1, 3, -1], [-1] * 5, [5, 0, 1, 2, -1]])
    np.testing.assert_array_equal(vals[0], [np.inf, 2, 1, NEG_INF, NEG_INF])
    assert np.all(vals[1] == NEG_INF)
    assert vals[2, 0] == 0 and np.signbit(vals[2, 0]) and np.all(vals[2, 1:] == NEG_INF)


def test_float64_precision_is_kept(topk):
    # Values that collapse to one float32: float64 scores must be ranked and returned as float64.
    s = np.array([[1.0, 1.0 + 1e-12, 1.0 + 3e-12, 1.0 + 2e-12]])
    vals, idx = topk(s, None, 4)
    np.testing.assert_array_equal(idx, [[2, 3, 1, 0]])
    np.testing.assert_array_equal(vals, s[:, [2, 3, 1, 0]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_signed_zeros_tie_and_keep_their_sign(dtype, topk):
    s = np.array([[1.0, 0.0, -0.0, 0.0, -0.0, -1.0]], dtype=dtype)
    vals, idx = topk(s, None, 6)
    np.testing.assert_array_equal(idx, [[0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(np.signbit(vals), [[False, False, True, False, True, True]])


@pytest.mark.parametrize("k", [5, 6, 50])
def test_k_at_least_n_items(k, topk):
    rng = np.random.default_rng(1)
    scores, indptr, indices = make_case(rng, 20, 6)
    got = topk(scores.astype(np.float32), (indptr, indices), k)
    assert got[0].shape == (20, k)
    assert_same(got, reference(scores.astype(np.float32), indptr, indices, k))


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_float16_and_seen_forms(topk):
    rng = np.random.default_rng(2)
    scores, indptr, indices = make_case(rng, 30, 500)
    s16 = scores.astype(np.float16)
    s16[0, :5] = np.float16(6e-8)  # subnormal halves must round-trip exactly
    want = reference(s16, indptr, indices, 20)
    csr = sp.csr_matrix((np.ones(indices.size), indices, indptr), shape=(30, 500))
    coo = csr.tocoo()
    for seen in [
        (indptr, indices),
        (indptr.astype(np.int32), indices.astype(np.int32)),
        (torch.from_numpy(indptr), torch.from_numpy(indices)),
        csr,
        coo,
        sp.csr_array(csr),
        torch.sparse_csr_tensor(
            torch.from_numpy(indptr), torch.from_numpy(indices), torch.ones(indices.size), (30, 500),
            check_invariants=False,
        ),
    ]:
        assert_same(topk(s16, seen, 20), want, np.float16)


def test_empty_seen_and_no_seen(topk):
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 3, (9, 40)).astype(np.float32)
    empty = (np.zeros(10, np.int64), np.zeros(0, np.int64))
    want = reference(scores, *empty, 8)
    assert_same(topk(scores, empty, 8), want)
    assert_same(topk(scores, None, 8), want)
    assert_same(topk(scores, sp.csr_matrix((9, 40)), 8), want)


def test_empty_shapes(topk):
    v, i = topk(np.zeros((0, 10), np.float32), None, 3)
    assert v.shape == i.shape == (0, 3)
    v, i = topk(np.zeros((4, 0), np.float32), sp.csr_matrix((4, 0)), 3)
    assert np.all(i == -1) and np.all(v == NEG_INF) and v.shape == (4, 3)


# ----------------------------------------------------------------------------- torch inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_torch_input_types(dtype, topk):
    rng = np.random.default_rng(4)
    scores, indptr, indices = make_case(rng, 25, 300)
    t = torch.from_numpy(scores).to(dtype)
    want = reference(t.double().numpy(), indptr, indices, 12)
    got = topk(t, (indptr, indices), 12)
    assert isinstance(got[0], torch.Tensor) and isinstance(got[1], torch.Tensor)
    assert got[1].dtype == torch.int64
    assert_same(got, want, dtype)


def test_torch_requires_grad_and_not_modified(topk):
    rng = np.random.default_rng(5)
    scores, indptr, indices = make_case(rng, 10, 200)
    t = torch.from_numpy(scores).float().requires_grad_()
    before = t.detach().clone()
    got = topk(t, (indptr, indices), 9)
    assert_same(got, reference(before.numpy(), indptr, indices, 9))
    assert torch.equal(torch.nan_to_num(t.detach(), 7.0), torch.nan_to_num(before, 7.0))


@pytest.mark.parametrize("k", [1, 13, 300, 400])
def test_torch_impl_equals_cpp_bit_for_bit(k, monkeypatch):
    monkeypatch.setattr(topk_mod, "_TORCH_CHUNK_ELEMENTS", 3000)  # several row chunks
    rng = np.random.default_rng(k)
    scores, indptr, indices = make_case(rng, 41, 300)
    t = torch.from_numpy(scores).float()
    want = topk_masked(t, (indptr, indices), k, impl="cpp")
    got = topk_masked(t, (indptr, indices), k, impl="torch")
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0], want[0])
    assert_same(got, reference(t.numpy(), indptr, indices, k))


# ----------------------------------------------------------------------------- strides


@pytest.mark.parametrize("view", ["column slice", "row step", "reversed rows", "column step", "fortran order"])
def test_strided_inputs_are_read_in_place(view, topk):
    rng = np.random.default_rng(6)
    n = 300
    big, indptr, indices = make_case(rng, 40, n)  # seen indices are in view coordinates
    big = np.concatenate([big, big[:, ::-1]], axis=1).astype(np.float32)  # 40 × 600
    big.setflags(write=False)  # nothing may be written
    v = {
        "column slice": big[:, :n],  # row stride 600, contiguous rows
        "row step": big[::2, :n],
        "reversed rows": big[::-1, :n],  # negative row stride
        "column step": big[:, ::2],  # strided columns: the generic path
        "fortran order": np.asfortranarray(big[:, :n]),
    }[view]
    ip = indptr[: v.shape[0] + 1]
    want = reference(v, ip, indices, 15)
    assert_same(topk(v, (ip, indices), 15), want)
    if view in ("column slice", "column step"):  # the same view of a torch tensor
        t = torch.from_numpy(big.copy()).as_strided(v.shape, [st // 4 for st in v.strides])
        assert_same(topk(t, (ip, indices), 15), want)


def test_torch_strided_tensor(topk):
    rng = np.random.default_rng(7)
    scores, indptr, indices = make_case(rng, 30, 200)
    t = torch.from_numpy(scores).float()
    wide = torch.full((30, 260), 99.0)
    wide[:, 30:230] = t
    view = wide[:, 30:230]
    assert not view.is_contiguous()
    want = reference(t.numpy(), indptr, indices, 11)
    assert_same(topk(view, (indptr, indices), 11), want)
    assert_same(topk(t.t().contiguous().t(), (indptr, indices), 11), want)
    bf = wide.to(torch.bfloat16)[:, 30:230]
    assert_same(topk(bf, (indptr, indices), 11), reference(bf.double().numpy(), indptr, indices, 11))


# ----------------------------------------------------------------------------- streaming


def _chunks(rng, n_items, n_chunks):
    cuts = np.sort(rng.choice(np.arange(1, n_items), n_chunks - 1, replace=False))
    bounds = [0, *cuts.tolist(), n_items]
    return list(zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("k", [1, 9, 120])
def test_accumulator_equals_one_shot(k, topk, accumulator):
    rng = np.random.default_rng(10 + k)
    scores, indptr, indices = make_case(rng, 33, 2000)
    scores = scores.astype(np.float32)
    seen = sp.csr_matrix((np.ones(indices.size), indices, indptr), shape=(33, 2000))
    want = topk(scores, seen, k)
    assert_same(want, reference(scores, indptr, indices, k))
    for shuffled in (False, True):
        chunks = _chunks(rng, 2000, 7)
        if shuffled:  # any push order gives the same answer, ties included
            rng.shuffle(chunks)
        acc = accumulator(33, k, seen=seen)
        for a, b in chunks:
            acc.push(scores[:, a:b], a)
        got = acc.result()
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
        # seen given per push, torch chunks, no n_items
        acc = accumulator(33, k)
        for a, b in chunks:
            acc.push(torch.from_numpy(scores[:, a:b]), a, seen=(indptr, indices))
        got = acc.result()
        assert isinstance(got[0], torch.Tensor)
        np.testing.assert_array_equal(got[1].numpy(), want[1])


@pytest.mark.parametrize("k,dtype", [(4, torch.float32), (150, torch.float32), (30, torch.bfloat16)])
def test_accumulator_torch_impl_equals_cpp(k, dtype):
    rng = np.random.default_rng(20 + k)
    scores, indptr, indices = make_case(rng, 21, 1500)
    t = torch.from_numpy(scores).to(dtype)
    want = topk_masked(t, (indptr, indices), k, impl="cpp")
    chunks = _chunks(rng, 1500, 5)
    rng.shuffle(chunks)
    acc = TopKAccumulator(21, k, n_items=1500, seen=(indptr, indices), impl="torch")
    for a, b in chunks:
        acc.push(t[:, a:b], a)
    got = acc.result()
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_accumulator_item_offsets_past_2_to_the_32(topk, accumulator):
    rng = np.random.default_rng(40)
    scores, indptr, indices = make_case(rng, 10, 600)
    scores = scores.astype(np.float32)
    want_v, want_i = topk(scores, (indptr, indices), 25)
    base = 2**32 - 300  # the catalogue straddles 2^32
    acc = accumulator(10, 25, seen=(indptr, indices + base))
    for a, b in [(300, 600), (0, 300)]:
        acc.push(scores[:, a:b], base + a)
    got_v, got_i = acc.result()
    np.testing.assert_array_equal(got_i, np.where(want_i >= 0, want_i + base, -1))
    np.testing.assert_array_equal(got_v, want_v)


def test_accumulator_small_catalogue_pads(accumulator):
    s = np.array([[3.0, np.nan], [1.0, 2.0]], dtype=np.float32)
    acc = accumulator(2, 4, n_items=3)
    acc.push(s, 0)
    acc.push(np.array([[3.0], [np.nan]], dtype=np.float32), 2)
    v, i = acc.result()
    np.testing.assert_array_equal(i, [[0, 2, -1, -1], [1, 0, -1, -1]])
    np.testing.assert_array_equal(v, [[3, 3, NEG_INF, NEG_INF], [2, 1, NEG_INF, NEG_INF]])
    v, i = accumulator(2, 3).result()
    assert np.all(i == -1) and v.shape == (2, 3)


def test_accumulator_errors(accumulator):
    acc = accumulator(3, 2, n_items=10)
    acc.push(np.zeros((3, 4), np.float32), 0)
    with pytest.raises(ValueError, match="overlap"):
        acc.push(np.zeros((3, 2), np.float32), 3)
    with pytest.raises(ValueError, match="past the catalogue"):
        acc.push(np.zeros((3, 4), np.float32), 8)
    with pytest.raises(TypeError, match="same input type, device and dtype"):
        acc.push(np.zeros((3, 2), np.float64), 4)
    with pytest.raises(ValueError, match="rows"):
        acc.push(np.zeros((2, 2), np.float32), 4)
    with pytest.raises(ValueError, match="item_offset"):
        acc.push(np.zeros((3, 2), np.float32), -1)
    with pytest.raises(ValueError, match="out of range"):
        acc.push(np.zeros((3, 2), np.float32), 4, seen=(np.array([0, 1, 1, 1]), np.array([10])))
    with pytest.raises(TypeError, match="same input type"):
        acc.push(torch.zeros((3, 2)), 4)


def test_impl_errors():
    s = np.zeros((3, 5), np.float32)
    with pytest.raises(ValueError, match="no implementation 'gpu'"):
        TopKAccumulator(3, 2, impl="gpu")
    with pytest.raises(ValueError, match="no implementation 'triton'"):
        topk_masked(s, None, 2, impl="triton")
    # A tensor that is not on the CPU (meta: no GPU needed) cannot go to the C++ code.
    with pytest.raises(ValueError, match="CPU tensors"):
        topk_masked(torch.zeros(3, 5, device="meta"), None, 2, impl="cpp")
    with pytest.raises(ValueError, match="CPU tensors"):
        TopKAccumulator(3, 2, impl="cpp").push(torch.zeros(3, 5, device="meta"), 0)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs(topk):
    s = np.zeros((3, 5), np.float32)
    seen = (np.array([0, 1, 1, 2]), np.array([0, 4]))
    for k, exc in [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError), ("3", TypeError)]:
        with pytest.raises(exc, match="k must"):
            topk(s, seen, k)
    with pytest.raises(ValueError, match="2-D"):
        topk(np.zeros(5, np.float32), None, 1)
    with pytest.raises(ValueError, match="2-D"):
        topk(torch.zeros(2, 2, 2), None, 1)
    with pytest.raises(TypeError, match="float32"):
        topk(np.zeros((3, 5), np.int64), seen, 1)
    with pytest.raises(TypeError, match="float32"):
        topk(torch.zeros(3, 5, dtype=torch.int32), seen, 1)
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        topk([[1.0, 2.0]], None, 1)
    with pytest.raises(ValueError, match="rows"):
        topk(s, sp.csr_matrix((4, 5)), 1)
    with pytest.raises(ValueError, match="columns"):
        topk(s, sp.csr_matrix((3, 6)), 1)
    with pytest.raises(ValueError, match="rows"):
        topk(s, (np.array([0, 1, 2]), np.array([0, 1])), 1)
    with pytest.raises(ValueError, match="out of range"):
        topk(s, (np.array([0, 1, 1, 2]), np.array([0, 5])), 1)
    with pytest.raises(ValueError, match="out of range"):
        topk(s, (np.array([0, 1, 1, 2]), np.array([-1, 2])), 1)
    with pytest.raises(ValueError, match="indptr"):
        topk(s, (np.array([0, 2, 1, 2]), np.array([0, 1])), 1)
    with pytest.raises(ValueError, match="indptr"):
        topk(s, (np.array([0, 1, 1, 9]), np.array([0, 1])), 1)
    with pytest.raises(TypeError, match="integers"):
        topk(s, (np.array([0, 1, 1, 2]), np.array([0.0, 1.0])), 1)
    with pytest.raises(TypeError, match="seen must be"):
        topk(s, "nope", 1)
    with pytest.raises(ValueError, match="out of range"):
        topk(torch.zeros(3, 5), (np.array([0, 1, 1, 2]), np.array([0, 7])), 1)


def test_threads_and_gil():
    rng = np.random.default_rng(30)
    scores, indptr, indices = make_case(rng, 64, 5000)
    scores = scores.astype(np.float32)
    want = reference(scores, indptr, indices, 10)
    for nt in (1, 2, 5):
        assert_same(topk_masked(scores, (indptr, indices), 10, num_threads=nt), want)
    # Concurrent calls from Python threads (the GIL is released inside) agree.
    out = [None] * 4

    def work(i):
        out[i] = topk_masked(scores, (indptr, indices), 10)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for o in out:
        assert_same(o, want)


# ----------------------------------------------------------------------------- the C++ running state
# recvae_fast.scoring pushes many cache-sized chunks into one State with the bias added in the
# push; these tests drive the State directly: chunk streams against the reference, the bias, chunks
# of mixed dtypes (exact comparison across float32 / float64), and bad bias input.


def _state_stream(chunks, n_rows, k, indptr, indices, n_threads=2):
    """result() of one State fed (scores chunk, dtype name, item offset, bias or None) in order."""
    state = topk_mod._ext().State(n_rows, k, k)
    for buf, name, offset, bias in chunks:
        state.push(buf, name, offset, indptr, indices, n_threads, bias)
    return state.result(n_threads)


def _as_buffer(scores: np.ndarray, dtype: str, layout: str):
    """scores (float64, exact in dtype) as the State's buffer of that dtype, contiguous or strided."""
    if layout == "strided":  # every other column of a wider array: read through the column stride
        wide = np.full((scores.shape[0], 2 * scores.shape[1]), np.nan)
        wide[:, ::2] = scores
        return _as_buffer(wide, dtype, "c")[0][:, ::2], dtype
    t = torch.from_numpy(np.ascontiguousarray(scores)).to(getattr(torch, dtype))
    return (t.view(torch.int16).numpy() if dtype == "bfloat16" else t.numpy()), dtype


@pytest.mark.parametrize("layout", ["c", "strided"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("k", [1, 6, 70])
def test_state_bias_equals_scores_plus_bias(k, dtype, layout):
    """push(..., bias) ranks score + bias computed in the compared type (float64 for float64
    scores, else float32), streamed over chunks of odd widths (1 item, 33, 500, the rest)."""
    rng = np.random.default_rng(40 + k)
    n_rows, n_items = 19, 1_203
    scores, indptr, indices = make_case(rng, n_rows, n_items, n_levels=9)
    bias = (rng.integers(0, 7, n_items) / 4 - 0.5).astype(np.float64)
    bias[rng.random(n_items) < 0.02] = np.nan  # a NaN bias makes the item's scores NaN: never returned
    bias[rng.random(n_items) < 0.02] = -np.inf  # eligible, ranked last
    bias_array = bias if dtype == "float64" else bias.astype(np.float32)
    compared = np.float64 if dtype == "float64" else np.float32
    # the scores as the State reads them, then the sum in the compared type
    read = torch.from_numpy(scores).to(getattr(torch, dtype)).double().numpy()
    want = reference(read.astype(compared) + bias_array.astype(compared), indptr, indices, k)
    bounds = [0, 1, 34, 534, n_items]
    chunks = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        buf, name = _as_buffer(scores[:, a:b], dtype, layout)
        chunks.append((buf, name, a, bias_array[a:b]))
    assert_same(_state_stream(chunks, n_rows, k, indptr, indices), want)
    rng.shuffle(chunks)  # any push order
    assert_same(_state_stream(chunks, n_rows, k, indptr, indices, n_threads=1), want)


def test_state_mixed_dtypes_compare_exactly():
    """A float32 score just above a float64 threshold is kept: the screen compares against the
    threshold rounded down to float32 (float32(0.1) > 0.1 as a double, and rounding the threshold
    to nearest would give float32(0.1) itself, which a strict screen would reject)."""
    n_rows, k = 2, 1
    indptr, indices = np.zeros(n_rows + 1, np.int64), np.zeros(0, np.int64)
    # 100 ties at 0.1: more candidates than a row's buffer holds, so it is compacted and the
    # threshold becomes (0.1, item 0), which later items must beat strictly
    first = np.full((n_rows, 100), 0.1)
    second = np.full((n_rows, 40), -1.0, np.float32)
    second[:, 5] = np.float32(0.1)  # 0.100000001490116... > 0.1
    second[1, 5] = np.nextafter(np.float32(0.1), np.float32(0))  # 0.0999999940... < 0.1
    got = _state_stream([(first, "float64", 0, None), (second, "float32", 100, None)], n_rows, k, indptr, indices)
    np.testing.assert_array_equal(got[1], [[105], [0]])
    np.testing.assert_array_equal(got[0], [[float(np.float32(0.1))], [0.1]])


@pytest.mark.parametrize("k", [1, 5, 33, 150])
def test_state_many_small_chunks(k):
    """Chunks of 1 to 70 items, out of order, mixing float64 and float32 chunks: each row's candidates
    stay in its buffer across pushes (selected only when the buffer is full, and in result())."""
    rng = np.random.default_rng(50 + k)
    n_rows, n_items = 23, 2_111
    scores, indptr, indices = make_case(rng, n_rows, n_items, n_levels=40)
    scores += rng.integers(0, 3, scores.shape) * 1e-9  # float64 values that float32 cannot hold
    cuts = np.unique(np.concatenate([[0, n_items], np.cumsum(rng.integers(1, 71, n_items))]))
    cuts = cuts[cuts <= n_items]
    chunks, exact = [], scores.copy()
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        if i % 2:  # float32 chunk: compared as its float32 values
            exact[:, a:b] = scores[:, a:b].astype(np.float32)
            chunks.append((scores[:, a:b].astype(np.float32), "float32", int(a), None))
        else:
            chunks.append((scores[:, a:b], "float64", int(a), None))
    want = reference(exact, indptr, indices, k)
    rng.shuffle(chunks)
    state = topk_mod._ext().State(n_rows, k, k)
    for buf, name, offset, _ in chunks[: len(chunks) // 2]:
        state.push(buf, name, offset, indptr, indices, 2)
    state.result(2)  # a result midway selects each row's best; pushing on from there is fine
    for buf, name, offset, _ in chunks[len(chunks) // 2 :]:
        state.push(buf, name, offset, indptr, indices, 2)
    assert_same(state.result(2), want)
    assert_same(state.result(1), want)  # result() again: the same


@pytest.mark.parametrize("first_width", [24, 40, 61, 100, 257])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_state_small_first_chunk_bound(first_width, dtype):
    """The first chunk's lower bound from group maxima, down to groups of 2 items (widths where
    fewer than 8 items per group are possible), with ties, NaN and -inf in the groups."""
    rng = np.random.default_rng(first_width)
    n_rows, n_items, k = 29, 900, 7
    scores, indptr, indices = make_case(rng, n_rows, n_items, n_levels=5, seen_per_row=3)
    scores = scores.astype(dtype)
    want = reference(scores, indptr, indices, k)
    bounds = [0, first_width, first_width + 3, n_items]
    for layout in ("c", "strided"):
        chunks = [(*_as_buffer(scores[:, a:b].astype(np.float64), dtype, layout), a, None)
                  for a, b in zip(bounds[:-1], bounds[1:])]
        assert_same(_state_stream(chunks, n_rows, k, indptr, indices), want)


def test_state_bad_bias_is_refused_by_name_and_changes_nothing():
    rng = np.random.default_rng(60)
    n_rows, n_items, k = 6, 80, 4
    scores, indptr, indices = make_case(rng, n_rows, n_items)
    scores = scores.astype(np.float32)
    bias = rng.random(n_items).astype(np.float32)
    want = reference(scores + bias, indptr, indices, k)
    state = topk_mod._ext().State(n_rows, k, k)
    state.push(scores[:, :40], "float32", 0, indptr, indices, 2, bias[:40])
    bad = [
        (TypeError, "float32 array for float32 scores", bias[40:].astype(np.float64)),
        (TypeError, "float32 array for float32 scores", [0.5] * 40),
        (ValueError, "one per score column", bias[40:79]),
        (ValueError, "one per score column", bias[40:].reshape(2, 20)),
        (ValueError, "one per score column", np.repeat(bias[40:], 2)[::2]),  # not contiguous
    ]
    for error, message, b in bad:
        with pytest.raises(error, match=f"bias must be .*{message}"):
            state.push(scores[:, 40:], "float32", 40, indptr, indices, 2, b)
    with pytest.raises(TypeError, match="float64 array for float64 scores"):
        state.push(scores[:, 40:].astype(np.float64), "float64", 40, indptr, indices, 2, bias[40:])
    state.push(scores[:, 40:], "float32", 40, indptr, indices, 2, bias[40:])
    assert_same(state.result(2), want)
