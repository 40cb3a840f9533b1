"""Original ids of users and items, and the one map between ids and matrix positions.

An id array is int64 when every id is an integer (or a string that is exactly the decimal form of
one: '7', '-12'; not '007', '+7' or ' 7', which stay distinct strings), else a numpy StringDType
array: variable-width strings, so one long id costs its own length, not that length times the
number of ids (a fixed-width '<U' array would). Ids are at most MAX_ID_LENGTH characters.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from .errors import DataError

MAX_ID_LENGTH = 1000
STRING_IDS = np.dtypes.StringDType()
_INT64_DIGITS = 18  # every decimal of up to 18 digits fits in int64


def _as_strings(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == STRING_IDS:
        return arr
    if arr.dtype.kind == "O":
        return np.array([str(v) for v in arr.tolist()], dtype=STRING_IDS)
    return arr.astype(STRING_IDS)


def normalize_ids(ids) -> np.ndarray:
    """A 1-d id array as int64 when every id is an exact integer, else as StringDType."""
    arr = np.asarray(ids)
    if arr.dtype.kind == "O" and arr.size and all(isinstance(v, str) for v in arr.ravel().tolist()):
        arr = arr.astype(STRING_IDS)
    arr = arr.reshape(-1)
    if arr.dtype.kind in "iu":
        if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
            return arr.astype(STRING_IDS)
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "b":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        if arr.size and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)) \
                and np.all(np.abs(arr) < 2.0 ** 63):
            return arr.astype(np.int64)
        return arr.astype(STRING_IDS)
    if arr.dtype.kind == "O" and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                     for v in arr.tolist()):
        try:
            return arr.astype(np.int64)
        except OverflowError:
            pass
    return ints_if_exact(_as_strings(arr))


def ints_if_exact(strings: np.ndarray) -> np.ndarray:
    """StringDType ids -> int64 when every one is the canonical decimal form of an int64, else
    unchanged."""
    if strings.size == 0:
        return np.empty(0, dtype=np.int64)
    neg = np.strings.startswith(strings, "-")
    body = np.strings.lstrip(strings, "-")
    n_digits = np.strings.str_len(body)
    ascii_digits_only = np.strings.str_len(np.strings.strip(body, "0123456789")) == 0
    ok = (n_digits == np.strings.str_len(strings) - neg) & (n_digits >= 1) & ascii_digits_only
    first = np.strings.startswith(body, "0")
    ok &= ~first | ((n_digits == 1) & ~neg)  # no leading zeros, no '-0'
    if not ok.all():
        return strings
    short = n_digits <= _INT64_DIGITS
    if short.all():
        return strings.astype(np.int64)
    as_int = [int(s) for s in strings.tolist()]  # 19+ digits: exact Python ints, int64 if they fit
    if all(-(2 ** 63) <= v < 2 ** 63 for v in as_int) and all(str(v) == s for v, s in zip(as_int, strings.tolist())):
        return np.array(as_int, dtype=np.int64)
    return strings


def check_id_lengths(ids: np.ndarray, what: str) -> None:
    """DataError if a string id is longer than MAX_ID_LENGTH characters."""
    if ids.dtype.kind in "iu" or ids.size == 0:
        return
    lengths = np.strings.str_len(ids)
    k = int(np.argmax(lengths))
    if lengths[k] > MAX_ID_LENGTH:
        raise DataError(f"{what} id of {int(lengths[k])} characters (longer than {MAX_ID_LENGTH}): "
                        f"{str(ids[k])[:40]!r}...")


class IdMap:
    """Original ids <-> positions (matrix rows for users, columns for items).

    ids[position] is the original id (int64 or StringDType, unique); `index(query)` gives positions
    of original ids, vectorised. Queries may be ints, strings or arrays of them; a string query
    matches an int id when it is that id's decimal form ('20' finds 20).
    """

    def __init__(self, ids, what: str = "item"):
        self.what = what
        self.ids = normalize_ids(ids)
        check_id_lengths(self.ids, what)
        self._sorter = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[self._sorter]
        if sorted_ids.size > 1:
            dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
            if dup.size:
                raise DataError(f"duplicate {what} id {sorted_ids[dup[:1]].tolist()[0]!r} in the id map")
        self._sorted = sorted_ids

    def __len__(self) -> int:
        return int(self.ids.size)

    def __repr__(self) -> str:
        return f"IdMap({len(self)} {self.what} ids, {'int' if self.ids.dtype.kind == 'i' else 'str'})"

    def index(self, query, *, strict: bool = True):
        """Positions of `query` (array in, int64 array out; scalar in, int out); unknown ids raise
        DataError, or give -1 with strict=False."""
        scalar = np.ndim(query) == 0
        q = np.atleast_1d(np.asarray(query))
        q, valid = self._comparable(q)
        out = np.full(q.shape, -1, dtype=np.int64)
        if self.ids.size and q.size:
            pos = np.minimum(np.searchsorted(self._sorted, q), self.ids.size - 1)
            found = valid & (self._sorted[pos] == q)
            out[found] = self._sorter[pos[found]]
        if strict and (out < 0).any():
            missing = np.atleast_1d(np.asarray(query))[out < 0]
            shown = ", ".join(repr(v) for v in missing[:5].tolist())
            more = f" and {missing.size - 5} more" if missing.size > 5 else ""
            raise DataError(f"unknown {self.what} id(s): {shown}{more}")
        return int(out[0]) if scalar else out

    def _comparable(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The query in the ids' dtype, and which entries could match at all."""
        if self.ids.dtype.kind == "i":
            if q.dtype.kind in "iu":
                return q.astype(np.int64), np.ones(q.shape, dtype=bool)
            strings = _as_strings(q)
            valid = np.array([_int_or_none(s) is not None for s in strings.tolist()], dtype=bool)
            ints = np.array([_int_or_none(s) or 0 for s in strings.tolist()], dtype=np.int64)
            return ints, valid
        return _as_strings(q), np.ones(q.shape, dtype=bool)

    def to_list(self) -> list:
        """The ids as a JSON-ready list (ints or strings)."""
        return self.ids.tolist()

    def save_json(self, path) -> None:
        """Write the ids as a JSON list (position -> id), atomically."""
        atomic_write_text(path, json.dumps(self.to_list()))

    @classmethod
    def load_json(cls, path, what: str = "item") -> "IdMap":
        """Read a JSON list of ids written by `save_json`, validating it: a list of ints (int64) or
        of strings (at most MAX_ID_LENGTH characters), no duplicates."""
        path = Path(path)
        return cls.from_json_list(read_json(path), what, path.name)

    @classmethod
    def from_json_list(cls, payload, what: str, source: str) -> "IdMap":
        if not isinstance(payload, list):
            raise DataError(f"{source}: expected a JSON list of {what} ids, found {type(payload).__name__}")
        ints = all(type(v) is int for v in payload)
        if not ints and not all(type(v) is str for v in payload):
            k = next(k for k, v in enumerate(payload) if type(v) is not type(payload[0]) or type(v) not in (int, str))
            raise DataError(f"{source}: {what} id #{k} is {payload[k]!r}; ids must be all integers or all strings")
        if ints and any(not -(2 ** 63) <= v < 2 ** 63 for v in payload):
            raise DataError(f"{source}: a {what} id does not fit in 64 bits")
        if not ints:
            too_long = next((k for k, v in enumerate(payload) if len(v) > MAX_ID_LENGTH), None)
            if too_long is not None:
                raise DataError(f"{source}: {what} id #{too_long} is longer than {MAX_ID_LENGTH} characters")
        ids = np.array(payload, dtype=np.int64 if ints or not payload else STRING_IDS)
        try:
            return cls(ids, what)
        except DataError as exc:
            raise DataError(f"{source}: {exc}") from None


def _int_or_none(s: str):
    try:
        v = int(s)
    except ValueError:
        return None
    return v if str(v) == s and -(2 ** 63) <= v < 2 ** 63 else None


def read_json(path: Path):
    """A JSON file's content; DataError naming the file when it is missing or malformed."""
    if not path.is_file():
        raise DataError(f"{path} not found")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except (OSError, RecursionError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def ids_to_arrays(ids: np.ndarray, prefix: str) -> dict[str, np.ndarray]:
    """Numeric arrays that hold an id array without pickle or fixed width: int ids as int64,
    string ids as their UTF-8 bytes plus int64 offsets (Arrow's layout)."""
    if ids.dtype.kind == "i":
        return {f"{prefix}_int": ids}
    encoded = [s.encode("utf-8") for s in ids.tolist()]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return {f"{prefix}_utf8": np.frombuffer(b"".join(encoded), dtype=np.uint8),
            f"{prefix}_offsets": offsets}


def ids_from_arrays(arrays, prefix: str, source: str) -> np.ndarray:
    """The inverse of `ids_to_arrays`, validating offsets and UTF-8."""
    if f"{prefix}_int" in arrays:
        ids = np.asarray(arrays[f"{prefix}_int"])
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise DataError(f"{source}: {prefix}_int is not a 1-d integer array")
        return ids.astype(np.int64)
    try:
        raw, offsets = np.asarray(arrays[f"{prefix}_utf8"]), np.asarray(arrays[f"{prefix}_offsets"])
    except KeyError:
        raise DataError(f"{source}: no {prefix} ids") from None
    if raw.ndim != 1 or raw.dtype != np.uint8 or offsets.ndim != 1 or offsets.dtype.kind not in "iu" \
            or offsets.size == 0 or offsets[0] != 0 or offsets[-1] != raw.size or np.any(np.diff(offsets) < 0):
        raise DataError(f"{source}: the {prefix} id offsets do not describe its byte buffer")
    data = raw.tobytes()
    try:
        strings = [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    except UnicodeDecodeError:
        raise DataError(f"{source}: the {prefix} ids are not valid UTF-8") from None
    return np.array(strings, dtype=STRING_IDS)
