"""The strong-generalisation split (Liang et al. 2018, as RecVAE uses it): held-out users for
validation and test, items restricted to those seen in training, each held-out user's items split
into fold-in and held-out parts.

`Split.save` stores it in a run folder as three files, each written atomically, none needing pickle:
- split.npz: the five CSR matrices as plain numeric arrays (`<name>_indptr`, `<name>_indices`,
  `<name>_data`, `<name>_shape`, see npz.py) and `ids_sha256`, the SHA-256 of the two JSON files
  below as written together with it (so a split.npz next to another save's JSON files is detected);
- items.json: column -> original item id, a JSON list (the model's columns);
- users.json: {"train": [...], "valid": [...], "test": [...]}, the original user id of each row.

`Split.load` validates everything before returning: array kinds and shapes, CSR structure (index
ranges, sorted unique columns per row), finite values, that all matrices share the item columns,
and that the id counts match the matrices. Every failure is a DataError naming the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..atomic import atomic_write_bytes
from ..hashing import Digest
from .errors import DataError
from .ids import IdMap, read_json
from .interactions import Interactions, canonical_csr
from .npz import csr_from_arrays, csr_to_arrays, open_npz, save_npz

SPLIT_NAME, ITEMS_NAME, USERS_NAME = "split.npz", "items.json", "users.json"
_USER_PARTS = {"train": "train_user_ids", "valid": "valid_user_ids", "test": "test_user_ids"}


@dataclass(eq=False)
class Split:
    """Strong-generalisation split. All matrices are CSR float32 over the same item columns
    (the items seen in training, original ids in item_ids). valid_in/valid_out (and test_*)
    have one row per user of valid_user_ids (test_user_ids), fold-in and held-out parts."""

    train: sp.csr_matrix
    valid_in: sp.csr_matrix
    valid_out: sp.csr_matrix
    test_in: sp.csr_matrix
    test_out: sp.csr_matrix
    item_ids: np.ndarray
    train_user_ids: np.ndarray
    valid_user_ids: np.ndarray
    test_user_ids: np.ndarray

    MATRICES = ("train", "valid_in", "valid_out", "test_in", "test_out")

    @property
    def n_items(self) -> int:
        return self.train.shape[1]

    @property
    def item_map(self) -> IdMap:
        """The map between original item ids and the split's (and the model's) columns."""
        return IdMap(self.item_ids, "item")

    def save(self, folder) -> None:
        """Write the split into `folder` (which must exist): items.json, users.json, then
        split.npz, which names the JSON files' hash; each file atomically, no pickle.
        `Split.load(folder)` reads it back."""
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"cannot save the split: {folder} is not a folder")
        items, users = self._ids_json()
        arrays = {"ids_sha256": np.frombuffer(bytes.fromhex(ids_hash(items, users)), dtype=np.uint8)}
        for name in self.MATRICES:
            arrays.update(csr_to_arrays(getattr(self, name), f"{name}_"))
        atomic_write_bytes(folder / ITEMS_NAME, items)
        atomic_write_bytes(folder / USERS_NAME, users)
        save_npz(folder / SPLIT_NAME, arrays)

    @classmethod
    def load(cls, folder) -> "Split":
        """Read a split written by `save`, validating every array and id (DataError naming the
        file and the problem otherwise; see the module docstring)."""
        folder = Path(folder)
        split_path, items_path, users_path = folder / SPLIT_NAME, folder / ITEMS_NAME, folder / USERS_NAME
        with open_npz(split_path) as z:
            matrices = {name: csr_from_arrays(z, f"{name}_", split_path.name) for name in cls.MATRICES}
            stored_hash = np.asarray(z["ids_sha256"])
        _check_ids_files_exist(folder)
        items = IdMap.load_json(items_path, "item")
        users = read_json(users_path)
        if not isinstance(users, dict) or set(users) != set(_USER_PARTS):
            raise DataError(f"{users_path}: expected an object with the keys train, valid and test")
        user_maps = {part: IdMap.from_json_list(users[part], "user", f"{users_path.name} ({part})")
                     for part in _USER_PARTS}
        _check_ids_hash(folder, stored_hash)

        n_items = len(items)
        for name, m in matrices.items():
            if m.shape[1] != n_items:
                raise DataError(f"{split_path.name}: {name} has {m.shape[1]} columns but {items_path.name} "
                                f"has {n_items} item ids")
        for part, names in (("train", ("train",)), ("valid", ("valid_in", "valid_out")),
                            ("test", ("test_in", "test_out"))):
            for name in names:
                if matrices[name].shape[0] != len(user_maps[part]):
                    raise DataError(f"{split_path.name}: {name} has {matrices[name].shape[0]} rows but "
                                    f"{users_path.name} has {len(user_maps[part])} {part} user ids")
        all_users = np.concatenate([user_maps[p].ids.astype(object) for p in _USER_PARTS])
        if len(set(all_users.tolist())) != all_users.size:
            raise DataError(f"{users_path}: a user is in more than one of train, valid and test")
        return cls(**matrices, item_ids=items.ids, **{attr: user_maps[part].ids for part, attr in _USER_PARTS.items()})

    def fingerprint(self) -> str:
        """A short stable hash of the matrices (shapes, structure, values) and all ids: equal
        for equal splits, different when any of them differs (for resume checks). 16 hex digits
        of SHA-256 over every matrix (shape, indptr, indices, float32 values) and the ids as JSON:
        stable across runs and machines, independent of index dtypes."""
        digest = Digest()
        for name in self.MATRICES:
            m = getattr(self, name)
            for arr in (np.array(m.shape, dtype="<i8"), m.indptr.astype("<i8"), m.indices.astype("<i8"),
                        m.data.astype("<f4")):
                digest.sized(arr.tobytes(), arr.size)
        for blob in self._ids_json():
            digest.sized(blob)
        return digest.hexdigest()[:16]

    def _ids_json(self) -> tuple[bytes, bytes]:
        """items.json's and users.json's bytes."""
        items = json.dumps(self.item_ids.tolist()).encode("utf-8")
        users = json.dumps({part: getattr(self, attr).tolist() for part, attr in _USER_PARTS.items()})
        return items, users.encode("utf-8")

    def __repr__(self) -> str:
        return (f"Split({self.n_items} items; train {self.train.shape[0]} users, valid "
                f"{self.valid_in.shape[0]}, test {self.test_in.shape[0]})")


def _fold_in_heldout(m: sp.csr_matrix, fraction: float, min_items: int, rng: np.random.Generator):
    """Per row: a random floor(fraction·n) of the n items held out when n >= min_items (at
    least one item stays in fold-in), else all in fold-in."""
    n_rows = m.shape[0]
    counts = np.diff(m.indptr)
    n_out = np.where(counts >= min_items, np.floor(fraction * counts).astype(np.int64), 0)
    n_out = np.minimum(n_out, np.maximum(counts - 1, 0))
    row_of = np.repeat(np.arange(n_rows), counts)
    keys = rng.random(m.nnz)
    order = np.lexsort((keys, row_of))
    rank = np.empty(m.nnz, dtype=np.int64)
    rank[order] = np.arange(m.nnz) - m.indptr[row_of[order]]
    out_mask = rank < n_out[row_of]

    def part(mask):
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(row_of[mask], minlength=n_rows), out=indptr[1:])
        return sp.csr_matrix((m.data[mask], m.indices[mask], indptr), shape=m.shape)

    return part(~out_mask), part(out_mask)


def split_strong_generalization(
    interactions: Interactions,
    *,
    n_heldout_users: int,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    min_items_for_heldout: int = 5,
) -> Split:
    """Strong generalisation (Liang et al. 2018, RecVAE): a seeded permutation of users gives
    n_heldout_users validation and n_heldout_users test users, the rest train. Items are
    restricted to those with an interaction in training (columns re-indexed, in original order).
    For each validation/test user with >= min_items_for_heldout items (after that
    restriction), a random floor(heldout_fraction · n) of them are held out, the rest are the
    fold-in; users with fewer items keep them all as fold-in (and have nothing held out)."""
    if not isinstance(n_heldout_users, (int, np.integer)) or isinstance(n_heldout_users, bool) \
            or n_heldout_users < 0:
        raise ValueError(f"n_heldout_users must be a non-negative integer, got {n_heldout_users!r}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if sp.issparse(interactions):  # a bare matrix: ids are the row / column numbers
        interactions = Interactions(interactions, np.arange(interactions.shape[0]), np.arange(interactions.shape[1]))
    m = interactions.matrix
    n_users = m.shape[0]
    n_train = n_users - 2 * n_heldout_users
    if n_train < 1:
        raise DataError(f"cannot hold out 2 × {n_heldout_users} users from {n_users}: no training user "
                        "would be left; use fewer held-out users")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_users)
    train_rows = np.sort(perm[:n_train])
    valid_rows = np.sort(perm[n_train:n_train + n_heldout_users])
    test_rows = np.sort(perm[n_train + n_heldout_users:])

    train = m[train_rows]
    seen = np.bincount(train.indices[train.data != 0], minlength=m.shape[1]) > 0
    items = np.flatnonzero(seen)
    if items.size == 0:
        raise DataError("empty dataset: the training users have no interactions")
    train = canonical_csr(train[:, items])
    valid = canonical_csr(m[valid_rows][:, items])
    test = canonical_csr(m[test_rows][:, items])
    valid_in, valid_out = _fold_in_heldout(valid, heldout_fraction, min_items_for_heldout, rng)
    test_in, test_out = _fold_in_heldout(test, heldout_fraction, min_items_for_heldout, rng)
    return Split(
        train=train, valid_in=valid_in, valid_out=valid_out, test_in=test_in, test_out=test_out,
        item_ids=interactions.item_ids[items],
        train_user_ids=interactions.user_ids[train_rows],
        valid_user_ids=interactions.user_ids[valid_rows],
        test_user_ids=interactions.user_ids[test_rows],
    )


@dataclass(eq=False)
class Fold:
    """One cross-validation fold of a split's non-test users: train (full rows) and validation
    users (fold-in and held-out parts), over the split's item columns."""

    train: sp.csr_matrix
    valid_in: sp.csr_matrix
    valid_out: sp.csr_matrix


def cross_validation_fold(split: Split, fold: int, n_folds: int, seed: int, *, heldout_fraction: float = 0.2,
                          min_items_for_heldout: int = 5) -> Fold:
    """Fold `fold` of `n_folds` over the split's training and validation users together (its test
    users are left out): a seeded permutation of those users cut into n_folds near-equal parts;
    part `fold` are the validation users, each split into fold-in and held-out items as
    `split_strong_generalization` does, the others train on their whole rows. The same arguments
    give the same fold; the n_folds folds' validation users partition the non-test users."""
    for name, value, least in (("n_folds", n_folds, 2), ("fold", fold, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    valid = (split.valid_in + split.valid_out).tocsr()  # the parts are disjoint: the whole rows again
    pool = canonical_csr(sp.vstack([split.train, valid], format="csr"))
    if fold >= n_folds or n_folds > pool.shape[0] - 1:
        raise ValueError(f"fold {fold} of {n_folds}: needs fold < n_folds <= {pool.shape[0] - 1} (the training "
                         "and validation users less one)")
    rng = np.random.default_rng(seed)
    parts = np.array_split(rng.permutation(pool.shape[0]), n_folds)
    valid_rows = np.sort(parts[fold])
    train_rows = np.sort(np.concatenate([p for i, p in enumerate(parts) if i != fold]))
    valid_in, valid_out = _fold_in_heldout(pool[valid_rows], heldout_fraction, min_items_for_heldout, rng)
    return Fold(pool[train_rows], valid_in, valid_out)


def ids_hash(items_json: bytes, users_json: bytes) -> str:
    """The SHA-256 that split.npz stores (`ids_sha256`) of the items.json and users.json written with it."""
    return Digest().sized(items_json).sized(users_json).hexdigest()


def _check_ids_files_exist(folder: Path) -> None:
    for path in (folder / ITEMS_NAME, folder / USERS_NAME):
        if not path.is_file():
            raise DataError(f"{path} not found (a split needs {SPLIT_NAME}, {ITEMS_NAME} and {USERS_NAME})")


def _check_ids_hash(folder: Path, stored_hash: np.ndarray) -> None:
    items_path, users_path = folder / ITEMS_NAME, folder / USERS_NAME
    _check_ids_files_exist(folder)
    try:
        items_bytes, users_bytes = items_path.read_bytes(), users_path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the split's id files in {folder}: {exc}") from None
    if stored_hash.dtype != np.uint8 or stored_hash.tobytes().hex() != ids_hash(items_bytes, users_bytes):
        raise DataError(f"{items_path.name} / {users_path.name} in {folder} were not written with its "
                        f"{SPLIT_NAME} (changed, or from another save)")


def check_ids_files(folder) -> None:
    """items.json and users.json in `folder` are the ones written with its split.npz (the hash that
    split.npz names), without reading the matrices; a DataError naming the files otherwise."""
    folder = Path(folder)
    with open_npz(folder / SPLIT_NAME) as z:
        stored_hash = np.asarray(z["ids_sha256"])
    _check_ids_hash(folder, stored_hash)
