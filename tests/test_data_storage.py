"""The id map and the split's storage in a run folder: round trips, fingerprints, and a clear
DataError for every kind of damaged or mismatched file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from recvae_fast.data import (
    MAX_ID_LENGTH,
    DataError,
    IdMap,
    Interactions,
    Split,
    preprocess,
    split_strong_generalization,
    synthetic_dataset,
)
from recvae_fast.data.ids import STRING_IDS
from recvae_fast.data.split import ids_hash


@pytest.fixture(scope="module")
def split():
    return split_strong_generalization(preprocess(synthetic_dataset(n_users=300, n_items=97, seed=4)),
                                       n_heldout_users=37, seed=1)


def string_id_split() -> Split:
    rng = np.random.default_rng(0)
    m = sp.random(41, 13, density=0.4, random_state=1, format="csr", dtype=np.float32)
    m.data[:] = rng.integers(1, 6, m.nnz)
    inter = Interactions(m, [f"user-{k}" for k in range(41)], [f"é{k}" * (k + 1) for k in range(13)])
    return split_strong_generalization(preprocess(inter, min_items_per_user=1), n_heldout_users=5, seed=0)


def assert_same_split(a: Split, b: Split):
    for name in Split.MATRICES:
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and (x != y).nnz == 0 and y.dtype == np.float32
    for attr in ("item_ids", "train_user_ids", "valid_user_ids", "test_user_ids"):
        np.testing.assert_array_equal(getattr(a, attr), getattr(b, attr))
        assert getattr(a, attr).dtype == getattr(b, attr).dtype


@pytest.mark.parametrize("make", ["ints", "strings"])
def test_split_round_trip_and_fingerprint(tmp_path, split, make):
    s = split if make == "ints" else string_id_split()
    s.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"split.npz", "items.json", "users.json"}
    back = Split.load(tmp_path)
    assert_same_split(s, back)
    assert back.fingerprint() == s.fingerprint() and len(s.fingerprint()) == 16
    assert json.loads((tmp_path / "items.json").read_text()) == s.item_ids.tolist()
    with np.load(tmp_path / "split.npz", allow_pickle=False) as z:  # no object arrays anywhere
        assert all(z[k].dtype != object for k in z.files)


def test_fingerprint_sees_every_part(split):
    base = split.fingerprint()
    changed = [
        Split(**{**vars(split), "item_ids": split.item_ids[::-1].copy()}),
        Split(**{**vars(split), "test_user_ids": split.test_user_ids + 1}),
        Split(**{**vars(split), "valid_out": split.valid_out * 2}),
        Split(**{**vars(split), "train": split.train[:-1]}),
    ]
    fingerprints = {s.fingerprint() for s in changed}
    assert base not in fingerprints and len(fingerprints) == len(changed)
    same = Split(**{**vars(split), "train": sp.csr_matrix(split.train, dtype=np.float64)})  # dtypes don't matter
    assert same.fingerprint() == base


def rewrite_npz(path, **changes):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del arrays[k]
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "items.json").write_text("[1, 2,"), ["items.json", "not valid JSON"]),
    (lambda d: (d / "items.json").write_bytes(b"\xff\xfe[\x00"), ["items.json", "UTF-8"]),
    (lambda d: (d / "users.json").unlink(), ["users.json", "not found"]),
    (lambda d: (d / "split.npz").write_bytes((d / "split.npz").read_bytes()[:500]), ["split.npz", "truncated"]),
    (lambda d: (d / "split.npz").write_bytes(b"PK\x03\x04garbage"), ["split.npz"]),
    (lambda d: rewrite_npz(d / "split.npz", train_indices=None), ["split.npz", "train_indices"]),
])
def test_damaged_split_files_give_one_clear_error(tmp_path, split, damage, words):
    split.save(tmp_path)
    damage(tmp_path)
    assert_load_fails(tmp_path, words)


def assert_load_fails(folder, words):
    with pytest.raises(DataError) as info:
        Split.load(folder)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_id_files_from_another_save_are_detected(tmp_path, split):
    other = split_strong_generalization(preprocess(synthetic_dataset(n_users=300, n_items=97, seed=4)),
                                        n_heldout_users=37, seed=2)
    (tmp_path / "a").mkdir()
    split.save(tmp_path / "a")
    other.save(tmp_path)
    (tmp_path / "users.json").write_bytes((tmp_path / "a" / "users.json").read_bytes())
    with pytest.raises(DataError, match="not written with its split.npz"):
        Split.load(tmp_path)


def forge(folder, split, items=None, users=None, **arrays):
    """Write a split folder whose JSON files and hash agree, with some arrays replaced: what an
    attacker (or a buggy tool) could produce."""
    split.save(folder)
    items_bytes = json.dumps(split.item_ids.tolist() if items is None else items).encode()
    users_obj = {"train": split.train_user_ids.tolist(), "valid": split.valid_user_ids.tolist(),
                 "test": split.test_user_ids.tolist()} if users is None else users
    users_bytes = json.dumps(users_obj).encode()
    (folder / "items.json").write_bytes(items_bytes)
    (folder / "users.json").write_bytes(users_bytes)
    digest = np.frombuffer(bytes.fromhex(ids_hash(items_bytes, users_bytes)), dtype=np.uint8)
    rewrite_npz(folder / "split.npz", ids_sha256=digest, **arrays)


@pytest.mark.parametrize("kind, words", [
    ("index_range", ["train", "column index outside"]),
    ("nan", ["test_out", "non-finite"]),
    ("huge", ["valid_in", "float32"]),
    ("indptr", ["valid_out", "row pointers"]),
    ("unsorted", ["train", "unsorted or repeated"]),
    ("pickle", ["split.npz"]),
    ("item_count", ["items.json", "item ids"]),
    ("user_count", ["users.json", "test user ids"]),
    ("items_mixed", ["items.json", "all integers or all strings"]),
    ("items_dup", ["items.json", "duplicate item id"]),
    ("items_long", ["items.json", f"longer than {MAX_ID_LENGTH}"]),
    ("items_dict", ["items.json", "expected a JSON list"]),
    ("users_overlap", ["users.json", "more than one"]),
    ("users_keys", ["users.json", "train, valid and test"]),
])
def test_forged_split_contents_are_rejected(tmp_path, split, kind, words):
    items = users = None
    arrays = {}
    user_lists = {"train": split.train_user_ids.tolist(), "valid": split.valid_user_ids.tolist(),
                  "test": split.test_user_ids.tolist()}
    if kind == "index_range":
        arrays["train_indices"] = split.train.indices.astype(np.int64) + split.n_items
    elif kind == "nan":
        arrays["test_out_data"] = split.test_out.data.copy()
        arrays["test_out_data"][0] = np.nan
    elif kind == "huge":
        arrays["valid_in_data"] = np.full(split.valid_in.nnz, 1e300)
    elif kind == "indptr":
        arrays["valid_out_indptr"] = split.valid_out.indptr[::-1].astype(np.int64)
    elif kind == "unsorted":
        arrays["train_indices"] = split.train.indices[::-1].astype(np.int64)
    elif kind == "pickle":
        arrays["train_data"] = np.array([object()] * split.train.nnz, dtype=object)
    elif kind == "item_count":
        items = split.item_ids.tolist()[:-1]
    elif kind == "user_count":
        users = {**user_lists, "test": user_lists["test"][:-1]}
    elif kind == "items_mixed":
        items = [1, "2"] + split.item_ids.tolist()[2:]
    elif kind == "items_dup":
        items = [split.item_ids[1].item()] + split.item_ids.tolist()[1:]
    elif kind == "items_long":
        items = ["x" * (MAX_ID_LENGTH + 1)] + [str(v) for v in split.item_ids.tolist()[1:]]
    elif kind == "items_dict":
        items = {"0": 1}
    elif kind == "users_overlap":
        users = {**user_lists, "test": [user_lists["train"][0]] + user_lists["test"][1:]}
    elif kind == "users_keys":
        users = {"train": user_lists["train"]}
    if kind == "pickle":
        split.save(tmp_path)
        rewrite_npz(tmp_path / "split.npz", **arrays)  # np.savez stores an object array as a pickle
    else:
        forge(tmp_path, split, items=items, users=users, **arrays)
    assert_load_fails(tmp_path, words)


def test_save_needs_an_existing_folder(tmp_path, split):
    with pytest.raises(DataError, match="not a folder"):
        split.save(tmp_path / "missing")


# ----------------------------------------------------------------------------- IdMap


def test_id_map_lookups_and_json(tmp_path):
    ints = IdMap([30, 10, 20], "user")
    np.testing.assert_array_equal(ints.index([10, 20, 30]), [1, 2, 0])
    assert ints.index("20") == 2 and ints.index(np.int64(30)) == 0
    np.testing.assert_array_equal(ints.index(["10", "010", "x", "99999999999999999999"], strict=False),
                                  [1, -1, -1, -1])
    with pytest.raises(DataError, match="unknown user id"):
        ints.index([11])
    strings = IdMap(["b", "a", "7x"])
    assert strings.ids.dtype == STRING_IDS
    np.testing.assert_array_equal(strings.index(["a", "7x", "c"], strict=False), [1, 2, -1])
    assert IdMap(["7", "-3", "0"]).ids.dtype == np.int64  # exact decimal forms become ints
    assert IdMap(["7", "007"]).ids.dtype == STRING_IDS
    with pytest.raises(DataError, match="duplicate item id 'a'"):
        IdMap(["a", "b", "a"])
    with pytest.raises(DataError, match="longer than"):
        IdMap(["a", "x" * (MAX_ID_LENGTH + 1)])
    for m in (ints, strings):
        m.save_json(tmp_path / "ids.json")
        back = IdMap.load_json(tmp_path / "ids.json", m.what)
        np.testing.assert_array_equal(back.ids, m.ids)
        assert back.ids.dtype == m.ids.dtype


def test_string_ids_have_no_fixed_width():
    """One long id among many short ones costs its own length, not length × number of ids."""
    ids = np.array([str(k) for k in range(100_000)] + ["x" * MAX_ID_LENGTH], dtype=object)
    inter = Interactions(sp.csr_matrix((ids.size, 1), dtype=np.float32), ids, [0])
    assert inter.user_ids.dtype == STRING_IDS
    assert inter.user_ids.nbytes < 4 * 1024 * 1024  # '<U1000' would need 400 MB
    assert inter.user_index("x" * MAX_ID_LENGTH) == ids.size - 1


def test_interactions_file_round_trip_without_pickle(tmp_path):
    inter = Interactions(sp.csr_matrix(np.eye(3, dtype=np.float32)), ["ü", "b", "c"], [5, 6, 7])
    inter.save(tmp_path / "i.npz")
    back = Interactions.load(tmp_path / "i.npz")
    np.testing.assert_array_equal(back.user_ids, inter.user_ids)
    assert (back.matrix != inter.matrix).nnz == 0
    (tmp_path / "bad.npz").write_bytes((tmp_path / "i.npz").read_bytes()[:200])
    with pytest.raises(DataError, match="bad.npz"):
        Interactions.load(tmp_path / "bad.npz")
