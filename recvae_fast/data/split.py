"""The strong-generalisation split (Liang et al. 2018, as RecVAE uses it): held-out users for
validation and test, items restricted to those seen in training, each held-out user's items split
into fold-in and held-out parts. `Split.save` / `Split.load` store it in a run folder (storage.py)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .errors import DataError
from .ids import IdMap
from .interactions import Interactions, canonical_csr

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
        """Write the split into `folder` (split.npz, items.json, users.json), each file atomically,
        no pickle; `Split.load(folder)` reads it back."""
        from .storage import save_split

        save_split(self, folder)

    @classmethod
    def load(cls, folder) -> "Split":
        """Read a split written by `save`, validating every array and id (DataError naming the
        file and the problem otherwise)."""
        from .storage import load_split

        return load_split(folder)

    def fingerprint(self) -> str:
        """A short stable hash of the matrices (shapes, structure, values) and all ids: equal
        for equal splits, different when any of them differs (for resume checks)."""
        from .storage import split_fingerprint

        return split_fingerprint(self)

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

