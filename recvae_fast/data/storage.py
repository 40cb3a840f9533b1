"""A split in a run folder: three files, each written atomically, none needing pickle.

- split.npz: the five CSR matrices as plain numeric arrays (`<name>_indptr`, `<name>_indices`,
  `<name>_data`, `<name>_shape`) and `ids_sha256`, the SHA-256 of the two JSON files below as
  written together with it (so a split.npz next to another save's JSON files is detected);
- items.json: column -> original item id, a JSON list (the model's columns);
- users.json: {"train": [...], "valid": [...], "test": [...]}, the original user id of each row.

Loading validates everything before returning: array kinds and shapes, CSR structure (index
ranges, sorted unique columns per row), finite values, that all matrices share the item columns,
and that the id counts match the matrices. Every failure is a DataError naming the file.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..atomic import atomic_write, atomic_write_bytes
from .errors import DataError
from .ids import IdMap, read_json

SPLIT_NAME, ITEMS_NAME, USERS_NAME = "split.npz", "items.json", "users.json"
_USER_PARTS = {"train": "train_user_ids", "valid": "valid_user_ids", "test": "test_user_ids"}


def _ids_json(split) -> tuple[bytes, bytes]:
    items = json.dumps(split.item_ids.tolist()).encode("utf-8")
    users = json.dumps({part: getattr(split, attr).tolist() for part, attr in _USER_PARTS.items()}).encode("utf-8")
    return items, users


def _sha256(*blobs: bytes) -> str:
    h = hashlib.sha256()
    for b in blobs:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def save_split(split, folder) -> None:
    """Write split.npz, items.json and users.json into `folder` (which must exist), each atomically.
    split.npz is written last and names the JSON files' hash."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"cannot save the split: {folder} is not a folder")
    items, users = _ids_json(split)
    arrays = {"ids_sha256": np.frombuffer(bytes.fromhex(_sha256(items, users)), dtype=np.uint8)}
    for name in split.MATRICES:
        m = getattr(split, name)
        arrays.update({f"{name}_indptr": m.indptr.astype(np.int64), f"{name}_indices": m.indices.astype(np.int64),
                       f"{name}_data": m.data.astype(np.float32), f"{name}_shape": np.array(m.shape, dtype=np.int64)})
    atomic_write_bytes(folder / ITEMS_NAME, items)
    atomic_write_bytes(folder / USERS_NAME, users)
    atomic_write(folder / SPLIT_NAME, lambda f: np.savez(f, **arrays))


@contextmanager
def open_npz(path: Path):
    """np.load of an .npz without pickle; DataError naming the file when it is missing or not a
    readable archive."""
    if not path.is_file():
        raise DataError(f"{path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            yield _CheckedArchive(z, path.name)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{path} is not a readable .npz archive (truncated or corrupt: {exc})") from None


class _CheckedArchive:
    """Read access to an npz archive whose member errors name the file."""

    def __init__(self, z, source: str):
        self._z, self.source = z, source

    def __contains__(self, key: str) -> bool:
        return key in self._z.files

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._z.files:
            raise DataError(f"{self.source}: missing array {key!r}")
        try:
            return self._z[key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{self.source}: array {key!r} is truncated or corrupt ({exc})") from None


def csr_from_arrays(z, prefix: str, source: str) -> sp.csr_matrix:
    """A validated canonical float32 CSR matrix from `<prefix>indptr`, `indices`, `data`, `shape`."""
    what = prefix.rstrip("_") or "matrix"
    indptr, indices, data, shape = (np.asarray(z[f"{prefix}{k}"]) for k in ("indptr", "indices", "data", "shape"))
    if shape.shape != (2,) or shape.dtype.kind not in "iu" or (shape < 0).any():
        raise DataError(f"{source}: {what} shape is not two non-negative integers")
    n_rows, n_cols = (int(v) for v in shape)
    if indptr.ndim != 1 or indptr.dtype.kind not in "iu" or indptr.size != n_rows + 1:
        raise DataError(f"{source}: {what} row pointers are not {n_rows + 1} integers")
    if indices.ndim != 1 or indices.dtype.kind not in "iu" or data.ndim != 1 or data.dtype.kind != "f" \
            or indices.size != data.size:
        raise DataError(f"{source}: {what} indices and values are not two 1-d arrays of one length")
    if indptr[0] != 0 or indptr[-1] != indices.size or np.any(np.diff(indptr.astype(np.int64)) < 0):
        raise DataError(f"{source}: {what} row pointers are not non-decreasing from 0 to {indices.size}")
    if indices.size and (indices.min() < 0 or indices.max() >= n_cols):
        raise DataError(f"{source}: {what} has a column index outside 0..{n_cols - 1}")
    if not np.all(np.isfinite(data)) or (data.size and np.abs(data).max() > np.finfo(np.float32).max):
        raise DataError(f"{source}: {what} has a non-finite value (or one beyond float32)")
    m = sp.csr_matrix((data.astype(np.float32), indices.astype(np.int64), indptr.astype(np.int64)),
                      shape=(n_rows, n_cols))
    if not m.has_canonical_format:
        raise DataError(f"{source}: {what} has unsorted or repeated columns within a row")
    return m


def _check_ids_hash(folder: Path, stored_hash: np.ndarray) -> None:
    items_path, users_path = folder / ITEMS_NAME, folder / USERS_NAME
    for path in (items_path, users_path):
        if not path.is_file():
            raise DataError(f"{path} not found (a split needs {SPLIT_NAME}, {ITEMS_NAME} and {USERS_NAME})")
    try:
        items_bytes, users_bytes = items_path.read_bytes(), users_path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the split's id files in {folder}: {exc}") from None
    if stored_hash.dtype != np.uint8 or stored_hash.tobytes().hex() != _sha256(items_bytes, users_bytes):
        raise DataError(f"{items_path.name} / {users_path.name} in {folder} were not written with its "
                        f"{SPLIT_NAME} (changed, or from another save)")


def check_ids_files(folder) -> None:
    """items.json and users.json in `folder` are the ones written with its split.npz (the hash that
    split.npz names), without reading the matrices; a DataError naming the files otherwise."""
    folder = Path(folder)
    with open_npz(folder / SPLIT_NAME) as z:
        stored_hash = np.asarray(z["ids_sha256"])
    _check_ids_hash(folder, stored_hash)


def load_split(folder):
    """The split saved in `folder` by `save_split`, validated (see the module docstring)."""
    from .split import Split

    folder = Path(folder)
    split_path, items_path, users_path = folder / SPLIT_NAME, folder / ITEMS_NAME, folder / USERS_NAME
    with open_npz(split_path) as z:
        matrices = {name: csr_from_arrays(z, f"{name}_", split_path.name) for name in Split.MATRICES}
        stored_hash = np.asarray(z["ids_sha256"])
    for path in (items_path, users_path):
        if not path.is_file():
            raise DataError(f"{path} not found (a split needs {SPLIT_NAME}, {ITEMS_NAME} and {USERS_NAME})")
    items = IdMap.load_json(items_path, "item")
    users = read_json(users_path)
    if not isinstance(users, dict) or set(users) != set(_USER_PARTS):
        raise DataError(f"{users_path}: expected an object with the keys train, valid and test")
    user_maps = {part: IdMap.from_json_list(users[part], "user", f"{users_path.name} ({part})") for part in _USER_PARTS}
    _check_ids_hash(folder, stored_hash)

    n_items = len(items)
    for name, m in matrices.items():
        if m.shape[1] != n_items:
            raise DataError(f"{split_path.name}: {name} has {m.shape[1]} columns but {items_path.name} "
                            f"has {n_items} item ids")
    for part, names in (("train", ("train",)), ("valid", ("valid_in", "valid_out")), ("test", ("test_in", "test_out"))):
        for name in names:
            if matrices[name].shape[0] != len(user_maps[part]):
                raise DataError(f"{split_path.name}: {name} has {matrices[name].shape[0]} rows but "
                                f"{users_path.name} has {len(user_maps[part])} {part} user ids")
    all_users = np.concatenate([user_maps[p].ids.astype(object) for p in _USER_PARTS])
    if len(set(all_users.tolist())) != all_users.size:
        raise DataError(f"{users_path}: a user is in more than one of train, valid and test")
    return Split(**matrices, item_ids=items.ids,
                 **{attr: user_maps[part].ids for part, attr in _USER_PARTS.items()})


def split_fingerprint(split) -> str:
    """16 hex digits of SHA-256 over every matrix (shape, indptr, indices, float32 values) and the
    ids as JSON: stable across runs and machines, independent of index dtypes."""
    h = hashlib.sha256()
    for name in split.MATRICES:
        m = getattr(split, name)
        for arr in (np.array(m.shape, dtype="<i8"), m.indptr.astype("<i8"), m.indices.astype("<i8"),
                    m.data.astype("<f4")):
            h.update(arr.size.to_bytes(8, "little"))
            h.update(arr.tobytes())
    for blob in _ids_json(split):
        h.update(len(blob).to_bytes(8, "little"))
        h.update(blob)
    return h.hexdigest()[:16]
