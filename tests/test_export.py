"""The exported scorer (torch.export .pt2) against recommend: values, items, ties, padding, odd batches."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from helpers import random_ratings

from recvae_fast import RecVAE, recommend, topk_masked
from recvae_fast.export import (
    METADATA_FILE, _weights_only_loads, csr_inputs, export_scorer, load_scorer, masked_topk,
)

N_ITEMS = 37  # not a multiple of anything; k = 30 leaves heavy users fewer than k unseen items
TIED_ITEMS = (3, 11, 12, 29)  # identical decoder rows: these items always score exactly the same


def _model(dtype, seed):
    torch.manual_seed(seed)
    model = RecVAE(13, 7, N_ITEMS).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():  # weights that use the dtype's full precision
            p.add_(1e-3 * torch.randn_like(p))
        for item in TIED_ITEMS[1:]:
            model.decoder.weight[item] = model.decoder.weight[TIED_ITEMS[0]]
            model.decoder.bias[item] = model.decoder.bias[TIED_ITEMS[0]]
    return model


_EXPORTS: dict = {}


def _exported(dtype, k, tmp_path_factory):
    """(model, .pt2 path, k), exported once per test session (an export takes seconds)."""
    if (dtype, k) not in _EXPORTS:
        model = _model(dtype, seed=k)
        path = tmp_path_factory.mktemp("scorer") / "model.pt2"
        export_scorer(model, path, k=k)
        _EXPORTS[dtype, k] = (model, path, k)
    return _EXPORTS[dtype, k]


@pytest.fixture(params=[(torch.float32, 30), (torch.float64, N_ITEMS)], ids=["f32-k30", "f64-kall"])
def exported(request, tmp_path_factory):
    return _exported(*request.param, tmp_path_factory)


@pytest.fixture
def exported_f32(tmp_path_factory):
    return _exported(torch.float32, 30, tmp_path_factory)


def _users(seed: int = 3) -> sp.csr_matrix:
    """Odd batch: an empty user, one-item users, users with more seen items than I − k."""
    return random_ratings(29, N_ITEMS, seed=seed, max_items=N_ITEMS - 1)


def _assert_same(got, want, dtype):
    np.testing.assert_array_equal(got.items, want.items)
    assert got.scores.dtype == np.float32 and got.items.dtype == np.int64
    finite = np.isfinite(want.scores)
    np.testing.assert_array_equal(np.isfinite(got.scores), finite)
    assert np.all(got.scores[~finite] == -np.inf)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(got.scores[finite], want.scores[finite], rtol=tol, atol=tol)


@pytest.mark.parametrize("batch_size", [500, 1, 7])
def test_exported_scorer_equals_recommend(exported, batch_size):
    model, path, k = exported
    x = _users()
    want = recommend(model, x, k)
    got = load_scorer(path)(x, batch_size=batch_size)
    _assert_same(got, want, model.decoder.weight.dtype)
    padded = (want.items == -1).sum(axis=1)
    assert padded[0] == 0 and padded.max() > 0  # the empty user is full; heavy users are padded
    # The tied items come out in ascending order wherever two of them are returned.
    for row in got.items:
        tied = [i for i in row if i in TIED_ITEMS]
        assert tied == sorted(tied)
    assert any(sum(i in TIED_ITEMS for i in row) >= 2 for row in got.items)


def test_duplicates_and_explicit_zeros_are_treated_as_recommend_does(exported):
    """Duplicate (user, item) entries are summed before the row norm; an explicitly stored zero is
    a seen item (every stored entry counts)."""
    model, path, k = exported
    indptr = np.array([0, 4, 6, 6, 9])
    indices = np.array([5, 2, 5, 30, 7, 7, 0, 36, 0])
    values = np.array([1.0, 2.0, 3.0, 0.0, 1.0, 1.0, 2.0, 1.0, 0.5])
    x = sp.csr_matrix((values, indices, indptr), shape=(4, N_ITEMS))
    assert not x.has_canonical_format
    want = recommend(model, x.copy(), k)
    got = load_scorer(path)(x)
    _assert_same(got, want, model.decoder.weight.dtype)
    assert 30 not in got.items[0]  # stored with value 0: seen


def test_the_program_runs_with_torch_alone_on_any_batch_size(exported_f32, tmp_path):
    """A fresh interpreter that cannot import recvae_fast loads the .pt2 and scores batches of
    0, 1, 2 and 29 users, as recommend does."""
    model, path, k = exported_f32
    x = _users(seed=5)
    dtype = model.decoder.weight.dtype
    inputs = tmp_path / "inputs.pt"
    batches = {n: csr_inputs(x[:n], N_ITEMS, dtype) for n in (0, 1, 2, 29)}
    batches["empty_users"] = csr_inputs(sp.csr_matrix((3, N_ITEMS)), N_ITEMS, dtype)
    torch.save(batches, inputs)
    out = tmp_path / "outputs.pt"
    script = (
        "import sys; sys.modules['recvae_fast'] = None\n"  # any import of the package fails
        "import torch\n"
        f"program = torch.export.load({str(path)!r}).module()\n"
        f"batches = torch.load({str(inputs)!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        "    out = {n: program(*b) for n, b in batches.items()}\n"
        f"torch.save(out, {str(out)!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    results = torch.load(out, weights_only=True)
    for n in (0, 1, 2, 29):
        scores, items = results[n]
        assert scores.shape == items.shape == (n, k)
        want = recommend(model, x[:n], k) if n else None
        if want is not None:
            _assert_same(type(want)(scores.numpy(), items.numpy()), want, dtype)
    scores, items = results["empty_users"]
    want = recommend(model, sp.csr_matrix((3, N_ITEMS)), k)
    _assert_same(type(want)(scores.numpy(), items.numpy()), want, dtype)


def test_empty_batch_in_process(exported):
    model, path, k = exported
    scores, items = load_scorer(path).module(*csr_inputs(_users()[:0], N_ITEMS, model.decoder.weight.dtype))
    assert scores.shape == items.shape == (0, k)
    assert load_scorer(path)(_users()[:0]).items.shape == (0, k)


@pytest.mark.parametrize("n_rows, n_items, k", [(17, 23, 5), (9, 40, 40), (1, 7, 3), (0, 5, 2), (31, 129, 17)])
def test_masked_topk_equals_topk_masked(n_rows, n_items, k):
    """masked_topk (the program's top-k) against the C++ topk_masked on hard scores: many exact
    ties, NaN, −inf items that are eligible, rows with fewer than k eligible items."""
    gen = torch.Generator().manual_seed(n_rows * 1000 + n_items)
    scores = torch.randint(-3, 4, (n_rows, n_items), generator=gen).float()  # few distinct values
    scores[torch.rand(n_rows, n_items, generator=gen) < 0.1] = float("nan")
    scores[torch.rand(n_rows, n_items, generator=gen) < 0.1] = float("-inf")
    seen_prob = torch.rand(n_rows, 1, generator=gen)  # from nearly nothing to nearly everything seen
    seen = (torch.rand(n_rows, n_items, generator=gen) < seen_prob).numpy()
    want = topk_masked(scores, sp.csr_matrix(seen), k)
    got_scores, got_items = masked_topk(scores, torch.from_numpy(seen) | torch.isnan(scores), k)
    torch.testing.assert_close(got_items, want.items, rtol=0, atol=0)
    torch.testing.assert_close(got_scores, want.scores, rtol=0, atol=0, equal_nan=False)


def test_export_argument_errors(tmp_path):
    model = _model(torch.float32, seed=0)
    for k, error in ((0, ValueError), (N_ITEMS + 1, ValueError), (True, TypeError), (2.5, TypeError)):
        with pytest.raises(error, match="k must"):
            export_scorer(model, tmp_path / "m.pt2", k=k)
    with pytest.raises(ValueError, match="must be a RecVAE"):
        export_scorer(torch.nn.Linear(3, 4), tmp_path / "m.pt2", k=2)
    assert not list(tmp_path.iterdir())  # nothing written


def test_loaded_scorer_checks_its_input(exported):
    model, path, _ = exported
    scorer = load_scorer(path)
    with pytest.raises(TypeError, match="scipy.sparse"):
        scorer(np.zeros((2, N_ITEMS)))
    with pytest.raises(ValueError, match="36 item columns"):
        scorer(sp.csr_matrix((2, N_ITEMS - 1)))
    for bad in (-1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="negative or non-finite"):
            scorer(sp.csr_matrix(([1.0, bad], [0, 1], [0, 2]), shape=(1, N_ITEMS)))
    out_of_range = sp.csr_matrix((1, N_ITEMS))
    out_of_range.indices, out_of_range.data, out_of_range.indptr = np.array([N_ITEMS]), np.ones(1), np.array([0, 1])
    with pytest.raises(ValueError, match="item index outside"):
        scorer(out_of_range)


def test_load_scorer_refuses_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="scorer file not found"):
        load_scorer(tmp_path / "none.pt2")
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="not a loadable torch.export program"):
        load_scorer(garbage)
    other = tmp_path / "other.pt2"
    program = torch.export.export(torch.nn.Linear(3, 2), (torch.ones(2, 3),))
    torch.export.save(program, other, extra_files={METADATA_FILE: json.dumps({"format": "something else"})})
    with pytest.raises(ValueError, match="not a recvae_fast scorer"):
        load_scorer(other)


def test_loading_refuses_pickled_objects():
    """Inside load_scorer's guard, a torch.load that asks for full unpickling still refuses it."""
    buffer = io.BytesIO()
    torch.save({"a": np.float64(1.0).__class__}, buffer)  # a pickled class: not weights-only
    with _weights_only_loads():
        buffer.seek(0)
        with pytest.raises(Exception, match="[Ww]eights only"):
            torch.load(buffer, weights_only=False)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False)["a"] is np.float64  # the guard is undone after
