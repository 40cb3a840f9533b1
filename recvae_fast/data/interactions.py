"""`Interactions`: a users × items matrix with the original ids of its rows and columns."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..atomic import atomic_write_text
from .errors import DataError
from .ids import IdMap, ids_from_arrays, ids_to_arrays, normalize_ids, read_json
from .npz import csr_from_arrays, open_npz, save_npz


def canonical_csr(matrix) -> sp.csr_matrix:
    """CSR, float32, sorted column indices and no duplicate entries (summed)."""
    m = sp.csr_matrix(matrix, dtype=np.float32)
    if not m.has_canonical_format:
        m = m.copy()
        m.sum_duplicates()
    return m


@dataclass(eq=False)
class Interactions:
    """A users × items matrix with the original ids of its rows and columns.

    matrix: scipy.sparse.csr_matrix, float32, canonical (sorted, no duplicate entries).
    user_ids[row] / item_ids[col]: original ids (int64 when all ids are integers, else numpy
    StringDType). `user_index(ids)` / `item_index(ids)` map original ids back to rows / columns.
    """

    matrix: sp.csr_matrix
    user_ids: np.ndarray
    item_ids: np.ndarray

    def __post_init__(self):
        if not sp.issparse(self.matrix):
            self.matrix = sp.csr_matrix(np.asarray(self.matrix))
        self.matrix = canonical_csr(self.matrix)
        self.user_ids = normalize_ids(self.user_ids)
        self.item_ids = normalize_ids(self.item_ids)
        n_users, n_items = self.matrix.shape
        if self.user_ids.shape != (n_users,):
            raise ValueError(f"user_ids has {self.user_ids.size} ids for {n_users} matrix rows")
        if self.item_ids.shape != (n_items,):
            raise ValueError(f"item_ids has {self.item_ids.size} ids for {n_items} matrix columns")

    @property
    def n_users(self) -> int:
        return self.matrix.shape[0]

    @property
    def n_items(self) -> int:
        return self.matrix.shape[1]

    @property
    def nnz(self) -> int:
        return self.matrix.nnz

    def __repr__(self) -> str:
        return f"Interactions({self.n_users} users × {self.n_items} items, {self.nnz} interactions)"

    @property
    def user_map(self) -> IdMap:
        return IdMap(self.user_ids, "user")

    @property
    def item_map(self) -> IdMap:
        return IdMap(self.item_ids, "item")

    def user_index(self, ids, *, strict: bool = True):
        """Rows of original user ids (array in, array out; scalar in, int out). Unknown ids
        raise DataError, or give -1 with strict=False."""
        return self.user_map.index(ids, strict=strict)

    def item_index(self, ids, *, strict: bool = True):
        """Columns of original item ids; see `user_index`."""
        return self.item_map.index(ids, strict=strict)

    @property
    def user_to_index(self) -> dict:
        """{original user id: row} (a dict built on each call; prefer `user_index` for arrays)."""
        return {u: r for r, u in enumerate(self.user_ids.tolist())}

    @property
    def item_to_index(self) -> dict:
        """{original item id: column}."""
        return {i: c for c, i in enumerate(self.item_ids.tolist())}

    def subset(self, rows=None, cols=None) -> "Interactions":
        """The interactions of some rows (users) and/or columns (items), ids kept."""
        m, users, items = self.matrix, self.user_ids, self.item_ids
        if rows is not None:
            rows = np.asarray(rows)
            m, users = m[rows], users[rows]
        if cols is not None:
            cols = np.asarray(cols)
            m, items = m[:, cols], items[cols]
        return Interactions(m, users, items)

    # -- persistence
    def save_id_maps(self, path) -> None:
        """Write {"user_ids": [...], "item_ids": [...]} as JSON, atomically (read with `load_id_maps`)."""
        payload = {"user_ids": self.user_ids.tolist(), "item_ids": self.item_ids.tolist()}
        atomic_write_text(path, json.dumps(payload))

    def save(self, path) -> None:
        """Matrix and ids in one .npz file, atomically, no pickle (read with `Interactions.load`)."""
        m = self.matrix  # its own index dtype (int32 below 2**31 entries): half the bytes of int64
        save_npz(path, {"indptr": m.indptr, "indices": m.indices, "data": m.data,
                        "shape": np.array(m.shape, dtype=np.int64), **ids_to_arrays(self.user_ids, "user"),
                        **ids_to_arrays(self.item_ids, "item")})

    @classmethod
    def load(cls, path) -> "Interactions":
        """Read a file written by `save`, validating it (DataError naming the file otherwise)."""
        path = Path(path)
        with open_npz(path) as z:
            m = csr_from_arrays(z, "", path.name)
            users = ids_from_arrays(z, "user", path.name)
            items = ids_from_arrays(z, "item", path.name)
        try:
            return cls(m, users, items)
        except ValueError as exc:
            raise DataError(f"{path.name}: {exc}") from None


def load_id_maps(path) -> tuple[np.ndarray, np.ndarray]:
    """(user_ids, item_ids) saved by `Interactions.save_id_maps`, validated."""
    path = Path(path)
    payload = read_json(path)
    if not isinstance(payload, dict) or set(payload) != {"user_ids", "item_ids"}:
        raise DataError(f"{path} is not an id map file (expected an object with user_ids and item_ids)")
    users = IdMap.from_json_list(payload["user_ids"], "user", path.name)
    items = IdMap.from_json_list(payload["item_ids"], "item", path.name)
    return users.ids, items.ids


def from_codes(rows: np.ndarray, cols: np.ndarray, values: np.ndarray | None, binary: bool,
               user_ids: np.ndarray, item_ids: np.ndarray) -> Interactions:
    """Interactions from row/column codes into id tables; duplicates summed (or 1 if binary)."""
    vals = np.ones(rows.size, dtype=np.float32) if binary or values is None else values.astype(np.float64)
    m = sp.csr_matrix((vals, (rows, cols)), shape=(user_ids.size, item_ids.size))
    m.sum_duplicates()
    if binary:
        m.data[:] = 1.0
    return Interactions(m if m.dtype == np.float32 else m.astype(np.float32), user_ids, item_ids)


def popularity_scores(train) -> np.ndarray:
    """Item popularity: the number of training users with a (nonzero) interaction, float64."""
    m = sp.csr_matrix(train)
    return np.bincount(m.indices[m.data != 0], minlength=m.shape[1]).astype(np.float64)
