"""Data: interaction files, the paper's preprocessing and strong-generalisation split, and the
embedded synthetic dataset.

- `load_interactions(path)` reads user–item(–rating) files: CSV/TSV with or without a header,
  MovieLens ``ratings.csv`` (``userId,movieId,rating,timestamp``), MovieLens 100k ``u.data``
  (tab separated, no header), MovieLens 1M/10M ``ratings.dat`` (``::`` separated) and RecBole
  atomic ``.inter`` files (typed header fields such as ``user_id:token``); ``.gz`` files too.
- `preprocess` drops users with too few items; `split_strong_generalization` picks held-out
  users for validation and test, restricts items to those seen in training and splits each
  held-out user's items 80/20 into fold-in / held-out (Liang et al. 2018, as RecVAE uses it).
- `synthetic_dataset` generates a seeded dataset with planted tastes and Zipf popularity.

Every problem with the input raises `DataError` (a ValueError) with one line that names it.
"""
from __future__ import annotations

import csv
import gzip
import json
import math
import operator
import re
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import scipy.sparse as sp

__all__ = [
    "DataError",
    "Interactions",
    "Split",
    "load_interactions",
    "load_id_maps",
    "preprocess",
    "split_strong_generalization",
    "synthetic_dataset",
    "popularity_scores",
]


class DataError(ValueError):
    """Bad input data (missing file, unknown columns, unparsable values, nothing left)."""


# ----------------------------------------------------------------------------- ids


def _normalize_ids(ids) -> np.ndarray:
    """An id array as int64 when every id is an integer (or a string that is exactly the
    decimal form of one), else as str."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "b":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        if arr.size and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            return arr.astype(np.int64)
        return arr.astype(str)
    if arr.dtype.kind == "O":
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in arr):
            return arr.astype(np.int64)
        arr = arr.astype(str)
    if arr.dtype.kind == "U":
        return _ints_if_exact(arr)
    return arr.astype(str)


def _ints_if_exact(arr: np.ndarray) -> np.ndarray:
    """'U' array -> int64 if every string is the canonical decimal form of an int64 ('7',
    '-12'; not '007', '+7', ' 7' or '1_000', which are kept as distinct string ids)."""
    if arr.size == 0:
        return arr.astype(np.int64)
    width = arr.dtype.itemsize // 4
    if width > 18:  # could overflow int64: the slow, exact way
        try:
            ints = arr.astype(np.int64)
        except (ValueError, OverflowError):
            return arr
        return ints if np.array_equal(ints.astype("U21"), arr) else arr
    codes = np.ascontiguousarray(arr).view(np.uint32).reshape(arr.size, width)
    neg = codes[:, 0] == 45  # '-'
    ok = np.ones(arr.size, dtype=bool)
    mag = np.zeros(arr.size, dtype=np.int64)
    n_digits = np.zeros(arr.size, dtype=np.int64)
    for j in range(width):  # Horner, one character column at a time (ids are short)
        c = codes[:, j]
        digit = (c - 48) <= 9  # unsigned: below '0' wraps around
        ok &= digit | (neg if j == 0 else (c == 0))
        mag = np.where(digit, mag * 10 + (c.astype(np.int64) - 48), mag)
        n_digits += digit
    lead = np.where(neg, codes[:, 1] if width > 1 else 0, codes[:, 0])
    ok &= n_digits >= 1
    ok &= (lead != 48) | ((n_digits == 1) & ~neg)  # no leading zeros, no '-0'
    if not ok.all():
        return arr
    return np.where(neg, -mag, mag)


def _jsonable_ids(ids: np.ndarray) -> list:
    return ids.tolist()


def _lookup(ids: np.ndarray, query, what: str, strict: bool) -> np.ndarray:
    """Positions of `query` in `ids` (vectorised; -1 for unknown ids unless strict)."""
    scalar = np.ndim(query) == 0
    q = np.atleast_1d(np.asarray(query))
    if ids.dtype.kind in "iu":
        if q.dtype.kind not in "iu":
            qs = q.astype(str)
            try:
                qi = qs.astype(np.int64)
                valid = qi.astype("U21") == qs
            except (ValueError, OverflowError):
                qi = np.array([_int_or_none(s) for s in qs.tolist()], dtype=object)
                valid = np.array([v is not None for v in qi], dtype=bool)
                qi = np.where(valid, qi, 0).astype(np.int64)
            q = qi
        else:
            valid = np.ones(q.shape, dtype=bool)
    else:
        q = q.astype(str)
        valid = np.ones(q.shape, dtype=bool)
    out = np.full(q.shape, -1, dtype=np.int64)
    if ids.size:
        sorter = np.argsort(ids, kind="stable")
        pos = np.searchsorted(ids, q, sorter=sorter)
        pos = np.minimum(pos, ids.size - 1)
        found = valid & (ids[sorter[pos]] == q)
        out[found] = sorter[pos[found]]
    if strict and (out < 0).any():
        missing = np.atleast_1d(np.asarray(query))[out < 0]
        shown = ", ".join(repr(v) for v in missing[:5].tolist())
        more = f" and {missing.size - 5} more" if missing.size > 5 else ""
        raise DataError(f"unknown {what} id(s): {shown}{more}")
    return out[0] if scalar else out


def _int_or_none(s: str):
    try:
        v = int(s)
    except ValueError:
        return None
    return v if str(v) == s else None


def load_id_maps(path) -> tuple[np.ndarray, np.ndarray]:
    """(user_ids, item_ids) saved by `Interactions.save_id_maps` (JSON)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"id map file not found: {path}")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        return _normalize_ids(payload["user_ids"]), _normalize_ids(payload["item_ids"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not an id map file ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------- Interactions


def _canonical_csr(matrix) -> sp.csr_matrix:
    m = sp.csr_matrix(matrix, dtype=np.float32)
    if not m.has_canonical_format:
        m = m.copy()
        m.sum_duplicates()
    return m


@dataclass(eq=False)
class Interactions:
    """A users × items matrix with the original ids of its rows and columns.

    matrix: scipy.sparse.csr_matrix, float32, canonical (sorted, no duplicate entries).
    user_ids[row] / item_ids[col]: original ids (int64 array when all ids are integers, else
    str array). `user_index(ids)` / `item_index(ids)` map original ids back to rows / columns.
    """

    matrix: sp.csr_matrix
    user_ids: np.ndarray
    item_ids: np.ndarray

    def __post_init__(self):
        if not sp.issparse(self.matrix):
            self.matrix = sp.csr_matrix(np.asarray(self.matrix))
        self.matrix = _canonical_csr(self.matrix)
        self.user_ids = _normalize_ids(self.user_ids)
        self.item_ids = _normalize_ids(self.item_ids)
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

    def user_index(self, ids, *, strict: bool = True):
        """Rows of original user ids (array in, array out; scalar in, int out). Unknown ids
        raise DataError, or give -1 with strict=False."""
        return _lookup(self.user_ids, ids, "user", strict)

    def item_index(self, ids, *, strict: bool = True):
        """Columns of original item ids; see `user_index`."""
        return _lookup(self.item_ids, ids, "item", strict)

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
        """Write {"user_ids": [...], "item_ids": [...]} as JSON (read with `load_id_maps`)."""
        payload = {"user_ids": _jsonable_ids(self.user_ids), "item_ids": _jsonable_ids(self.item_ids)}
        Path(path).write_text(json.dumps(payload), encoding="utf-8")

    def save(self, path) -> None:
        """Matrix and ids in one .npz file (read with `Interactions.load`)."""
        m = self.matrix
        with open(path, "wb") as f:
            np.savez(f, indptr=m.indptr, indices=m.indices, data=m.data, shape=np.array(m.shape),
                     user_ids=self.user_ids, item_ids=self.item_ids)

    @classmethod
    def load(cls, path) -> "Interactions":
        path = Path(path)
        if not path.exists():
            raise DataError(f"interactions file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                m = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
                return cls(m, z["user_ids"], z["item_ids"])
        except (KeyError, ValueError, OSError) as exc:
            raise DataError(f"{path} is not a saved Interactions file ({exc})") from None


def _from_triples(users: np.ndarray, items: np.ndarray, values: np.ndarray | None,
                  binary: bool) -> Interactions:
    """Interactions from parallel id/value arrays; duplicates summed (or set to 1 if binary)."""
    user_ids, rows = np.unique(users, return_inverse=True)
    item_ids, cols = np.unique(items, return_inverse=True)
    vals = np.ones(rows.size, dtype=np.float64) if values is None else values.astype(np.float64)
    m = sp.csr_matrix((vals, (rows.reshape(-1), cols.reshape(-1))), shape=(user_ids.size, item_ids.size))
    m.sum_duplicates()
    if binary:
        m.data[:] = 1.0
    return Interactions(m.astype(np.float32), user_ids, item_ids)


# ----------------------------------------------------------------------------- file reading

_WS = " "  # separator meaning "runs of whitespace"

_USER_NAMES = ("user_id", "userid", "user", "uid", "users", "customer_id", "customerid", "visitorid",
               "visitor_id", "member_id", "reviewerid", "reviewer_id", "session_id")
_ITEM_NAMES = ("item_id", "itemid", "item", "iid", "items", "movie_id", "movieid", "movie", "product_id",
               "productid", "track_id", "trackid", "song_id", "songid", "business_id", "asin", "book_id",
               "isbn", "anime_id", "article_id", "recipe_id", "game_id", "artist_id", "venue_id", "poi_id")
_RATING_NAMES = ("rating", "ratings", "score", "stars", "value", "weight", "count", "play_count", "playcount",
                 "plays", "preference", "rating_value", "overall", "clicks", "frequency", "label")
_TIME_NAMES = ("timestamp", "time", "ts", "datetime", "date", "unixreviewtime")
_KNOWN = set(_USER_NAMES) | set(_ITEM_NAMES) | set(_RATING_NAMES) | set(_TIME_NAMES)

_FORMATS = {
    # fmt: (sep, has_header)
    "auto": (None, None),
    "csv": (",", None),
    "tsv": ("\t", None),
    "movielens": (None, None),  # ratings.csv, u.data or ratings.dat, detected
    "ml-latest": (",", True),  # ratings.csv
    "ml-20m": (",", True),
    "ml-100k": ("\t", False),  # u.data
    "u.data": ("\t", False),
    "ml-1m": ("::", False),  # ratings.dat
    "ml-10m": ("::", False),
    "dat": ("::", False),
    "inter": ("\t", True),  # RecBole atomic file
    "recbole": ("\t", True),
}


def _norm_name(name: str) -> str:
    """'user_id:token' -> 'user_id'; '"UserId"' -> 'userid'."""
    return name.strip().strip('"').strip("'").split(":")[0].strip().lower()


def _squash(name: str) -> str:
    return re.sub(r"[\s_\-.]", "", _norm_name(name))


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


_BLOCK_CHARS = 1 << 24  # characters parsed at a time (whole lines), to bound memory on big files


def _open_text(path: Path):
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a data file")
    try:
        if path.name.lower().endswith(".gz"):
            return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace", newline="")
        return open(path, "r", encoding="utf-8-sig", errors="replace", newline="")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _read_blocks(f, block_chars: int):
    """Blocks of whole lines ('\n'-terminated except perhaps the last), '\r\n' and '\r'
    turned into '\n'."""
    leftover = ""
    while True:
        chunk = f.read(block_chars)
        if not chunk:
            break
        buf = leftover + chunk
        cut = buf.rfind("\n")
        if cut < 0:
            leftover = buf
            continue
        leftover = buf[cut + 1:]
        yield _fix_newlines(buf[: cut + 1])
    if leftover:
        yield _fix_newlines(leftover)


def _fix_newlines(text: str) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _parse_sep(sep) -> str | None:
    if sep is None:
        return None
    if not isinstance(sep, str) or sep == "":
        raise DataError(f"sep must be a non-empty string, got {sep!r}")
    aliases = {"\\t": "\t", "tab": "\t", "\\s+": _WS, "space": _WS, "whitespace": _WS, "comma": ",",
               "semicolon": ";", "pipe": "|"}
    sep = aliases.get(sep.lower(), sep)
    if sep.isspace() and sep != "\t":
        return _WS
    return sep


def _detect_sep(first_line: str, path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".inter"):
        return "\t"
    for candidate in ("::", "\t", ",", ";", "|"):
        if candidate in first_line:
            return candidate
    if len(first_line.split()) >= 2:
        return _WS
    raise DataError(
        f"cannot detect the field separator of {path.name} from its first line {first_line[:80]!r}; "
        "pass sep= (--sep)"
    )


def _split_line(line: str, sep: str) -> list[str]:
    if sep == _WS:
        return line.split()
    if '"' in line and len(sep) == 1:
        return next(csv.reader([line], delimiter=sep, skipinitialspace=True))
    return [t.strip() for t in line.split(sep)]


def _detect_header(first: list[str], second: list[str] | None, user_col, item_col, rating_col) -> bool:
    names = {_norm_name(t) for t in first} | {_squash(t) for t in first}
    if names & _KNOWN:
        return True
    if any(re.fullmatch(r"[^:]+:(token|float|token_seq|float_seq)", t.strip()) for t in first):
        return True  # RecBole typed header
    given = {str(c).strip().lower() for c in (user_col, item_col, rating_col) if isinstance(c, str)}
    if given & {t.strip().lower() for t in first} - {str(i) for i in range(len(first))}:
        return True
    if second is not None:
        # a name where the data has numbers
        for a, b in zip(first, second):
            if not _is_number(a) and _is_number(b):
                return True
    return False


def _tokenize(lines: list[str], linenos: np.ndarray, sep: str, n_fields: int, quoted: bool,
              path: Path) -> tuple[list[str], np.ndarray]:
    """All fields of `lines` as one flat list (n_fields per line) and the line numbers of the
    lines kept, after checking that every line has n_fields fields (whitespace-only lines are
    dropped)."""
    def check(found: np.ndarray):
        nonlocal lines, linenos
        bad = np.flatnonzero(found != n_fields)
        if bad.size == 0:
            return False
        for k in bad:
            if lines[k] and not lines[k].isspace():
                shown = "whitespace" if sep == _WS else repr(sep)
                raise DataError(
                    f"line {int(linenos[k])} of {path.name} has {int(found[k])} field(s) separated by {shown}, "
                    f"expected {n_fields} (like the first line): {lines[k][:80]!r}"
                )
        keep = np.ones(len(lines), dtype=bool)
        keep[bad] = False
        lines = [line for line, kept in zip(lines, keep) if kept]
        linenos = linenos[keep]
        return True

    if sep != _WS and not quoted:
        counts = np.fromiter(map(operator.methodcaller("count", sep), lines), dtype=np.int64, count=len(lines))
        check(counts + 1)
        return (sep.join(lines).split(sep) if lines else []), linenos
    if sep == _WS:
        rows = [line.split() for line in lines]
    elif len(sep) == 1:
        rows = list(csv.reader(lines, delimiter=sep, skipinitialspace=True))
    else:
        rows = [[t.strip().strip('"') for t in line.split(sep)] for line in lines]
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    if check(lengths):
        rows = [row for row, n in zip(rows, lengths) if n == n_fields]
    return list(chain.from_iterable(rows)), linenos


def _resolve_column(spec, header: list[str] | None, n_fields: int, candidates: tuple[str, ...],
                    role: str, path: Path, required: bool, default_pos: int | None) -> int | None:
    """Column index of `role` from a user spec (name or 0-based index) or the known names."""
    shown = ", ".join(repr(h) for h in header) if header is not None else None
    if spec is not None:
        if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
            if not 0 <= spec < n_fields:
                raise DataError(f"{role} column index {spec} is out of range: {path.name} has {n_fields} columns")
            return int(spec)
        spec = str(spec)
        if header is not None:
            for j, h in enumerate(header):
                if h.strip().strip('"') == spec:
                    return j
            for j, h in enumerate(header):
                if _norm_name(h) == _norm_name(spec):
                    return j
        if spec.strip().isdigit() and int(spec) < n_fields:
            return int(spec)
        if header is None:
            raise DataError(
                f"{role} column {spec!r} not found: {path.name} has no header, give a 0-based column "
                f"index (0..{n_fields - 1}) instead"
            )
        raise DataError(f"{role} column {spec!r} not found in {path.name}; its columns are: {shown}")
    if header is None:
        if default_pos is not None and default_pos < n_fields:
            return default_pos
        if required:
            raise DataError(f"{path.name} has {n_fields} column(s); need at least user and item columns")
        return None
    norms = [_norm_name(h) for h in header]
    squashed = [_squash(h) for h in header]
    for name in candidates:
        if name in norms:
            return norms.index(name)
    for name in candidates:
        sq = name.replace("_", "")
        if sq in squashed:
            return squashed.index(sq)
    if required:
        flag = {"user": "user_col (--user-col)", "item": "item_col (--item-col)"}[role]
        raise DataError(f"no {role} column found in the header of {path.name} (columns: {shown}); pass {flag}")
    return None


def load_interactions(
    path,
    *,
    fmt: str = "auto",
    sep: str | None = None,
    user_col=None,
    item_col=None,
    rating_col=None,
    rating_threshold: float | None = None,
    has_header: bool | None = None,
) -> Interactions:
    """Read a user–item(–rating) file into `Interactions`.

    Layouts (detected from the extension and the first lines unless given): CSV/TSV with or
    without a header (columns user, item[, rating][, timestamp] by position without one),
    MovieLens ratings.csv, u.data, ratings.dat (``::``), RecBole ``.inter``; ``.gz`` allowed.
    fmt: "auto", "csv", "tsv", "movielens", "ml-100k", "ml-1m", "ml-10m", "ml-20m", "inter".
    Columns (user_col, item_col, rating_col) are header names or 0-based indices; None
    detects them (known names such as userId/user_id/movieId/item_id/rating, or positions
    0, 1, 2 without a header); rating_col=False (or "none") means no rating column.

    Values: with rating_threshold, rows with rating > threshold become 1 (the paper: 3.5);
    without one, the rating when there is a rating column (duplicate user–item pairs summed,
    zero ratings dropped, negative ones rejected), else 1. Users and items that keep no
    interaction are not indexed. Rows and columns are in sorted order of the original ids.
    """
    path = Path(path)
    if fmt not in _FORMATS:
        raise DataError(f"unknown fmt {fmt!r}; expected one of: {', '.join(_FORMATS)}")
    if rating_threshold is not None:
        try:
            rating_threshold = float(rating_threshold)
        except (TypeError, ValueError):
            raise DataError(f"rating_threshold must be a number, got {rating_threshold!r}") from None
        if math.isnan(rating_threshold):
            raise DataError("rating_threshold must be a number, got nan")
    fmt_sep, fmt_header = _FORMATS[fmt]
    options = dict(sep=_parse_sep(sep) or fmt_sep, has_header=fmt_header if has_header is None else has_header,
                   user_col=user_col, item_col=item_col, rating_col=rating_col)

    layout = None
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
    n_rows = 0
    next_lineno = 1
    try:
        with _open_text(path) as f:
            for block in _read_blocks(f, _BLOCK_CHARS):
                lines = block.split("\n")
                if lines[-1] == "":
                    lines.pop()
                linenos = np.arange(next_lineno, next_lineno + len(lines))
                next_lineno += len(lines)
                # Blank lines are skipped (whitespace-only ones elsewhere are dropped by _tokenize).
                if "\n\n" in block or block.startswith("\n"):
                    keep = [k for k, line in enumerate(lines) if line and not line.isspace()]
                    if len(keep) < len(lines):
                        lines = [lines[k] for k in keep]
                        linenos = linenos[keep]
                if not lines:
                    continue
                if layout is None:
                    layout = _detect_layout(lines, path, rating_threshold, **options)
                    if layout.header is not None:
                        lines, linenos = lines[1:], linenos[1:]
                        if not lines:
                            continue
                part, n = _parse_lines(lines, linenos, layout, path, rating_threshold)
                n_rows += n
                if part[0].size:
                    parts.append(part)
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None

    if layout is None:
        raise DataError(f"empty dataset: {path.name} has no data")
    if n_rows == 0:
        raise DataError(f"empty dataset: {path.name} has a header but no data rows")
    if not parts:
        if rating_threshold is not None:
            what = f" after keeping ratings > {rating_threshold:g}"
        else:
            what = " after dropping zero ratings" if layout.rating is not None else ""
        raise DataError(f"empty dataset: no interactions left in {path.name}{what} ({n_rows} rows read)")
    users = _concat_ids([p[0] for p in parts])
    items = _concat_ids([p[1] for p in parts])
    binary = rating_threshold is not None or layout.rating is None
    values = None if binary else np.concatenate([p[2] for p in parts])
    return _from_triples(users, items, values, binary)


@dataclass
class _Layout:
    sep: str
    n_fields: int
    header: list[str] | None
    user: int
    item: int
    rating: int | None

    def column_name(self, j: int) -> str:
        return repr(self.header[j]) if self.header is not None else str(j)


def _detect_layout(lines: list[str], path: Path, rating_threshold, *, sep, has_header, user_col, item_col,
                   rating_col) -> _Layout:
    """Separator, header and columns from the first (non-blank) lines."""
    first = lines[0]
    if sep is None:
        sep = _detect_sep(first, path)
    first_fields = _split_line(first, sep)
    second_fields = _split_line(lines[1], sep) if len(lines) > 1 else None
    if has_header is None:
        has_header = _detect_header(first_fields, second_fields, user_col, item_col, rating_col)
    n_fields = len(first_fields)
    header = [f.strip() for f in first_fields] if has_header else None

    u = _resolve_column(user_col, header, n_fields, _USER_NAMES, "user", path, True, 0)
    i = _resolve_column(item_col, header, n_fields, _ITEM_NAMES, "item", path, True, 1)
    no_rating = rating_col is False or (isinstance(rating_col, str) and rating_col.strip().lower() in ("", "none"))
    if no_rating:
        r = None
    else:
        r = _resolve_column(rating_col, header, n_fields, _RATING_NAMES, "rating", path, False, 2)
        if rating_col is None and header is None and r in (u, i):
            r = None  # the positional default collides with explicitly chosen columns
    if u == i:
        raise DataError(f"user and item columns are the same column ({u}) of {path.name}")
    if r is not None and r in (u, i):
        raise DataError(f"the rating column ({r}) of {path.name} is also the user or item column")
    if rating_threshold is not None and r is None:
        raise DataError(f"rating_threshold given but {path.name} has no rating column; pass rating_col")
    return _Layout(sep, n_fields, header, u, i, r)


def _parse_lines(lines: list[str], linenos: np.ndarray, layout: _Layout, path: Path, rating_threshold):
    """((users, items, values), rows read) of data lines, filtered by the threshold (or zero
    ratings); ids as int64 when exact, else str."""
    sep, n_fields = layout.sep, layout.n_fields
    joined = "".join(lines)
    quoted = sep != _WS and '"' in joined
    spaced = sep != _WS and not quoted and " " in joined
    del joined
    tokens, linenos = _tokenize(lines, linenos, sep, n_fields, quoted, path)
    if not tokens:
        return (np.empty(0, np.int64), np.empty(0, np.int64), None), 0
    if spaced:
        tokens = [t.strip() for t in tokens]

    def where(k: int) -> str:
        return f"line {int(linenos[k])} of {path.name}"

    users = np.array(tokens[layout.user::n_fields])
    items = np.array(tokens[layout.item::n_fields])
    n_rows = users.size
    for ids, role, j in ((users, "user", layout.user), (items, "item", layout.item)):
        empty = np.flatnonzero(ids == "")
        if empty.size:
            raise DataError(f"empty {role} id (column {layout.column_name(j)}) on {where(int(empty[0]))}")

    values = None
    r = layout.rating
    if r is not None:
        raw = tokens[r::n_fields]
        try:
            values = np.array(raw, dtype=np.float64)
        except ValueError:
            for k, t in enumerate(raw):
                try:
                    float(t)
                except ValueError:
                    raise DataError(
                        f"unparsable rating {t!r} (column {layout.column_name(r)}) on {where(k)}"
                    ) from None
            raise  # pragma: no cover - numpy and float() disagree
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            k = int(bad[0])
            raise DataError(f"non-finite rating {raw[k]!r} (column {layout.column_name(r)}) on {where(k)}: "
                            "ratings must be finite numbers")
        if rating_threshold is not None:
            keep = values > rating_threshold
        else:
            neg = np.flatnonzero(values < 0)
            if neg.size:
                k = int(neg[0])
                raise DataError(f"negative rating {raw[k]!r} on {where(k)}: interaction weights must be >= 0 "
                                "(pass rating_threshold to binarise ratings)")
            keep = values > 0
        if not keep.all():
            users, items, values = users[keep], items[keep], values[keep]
    return (_ints_if_exact(users), _ints_if_exact(items), values), n_rows


def _concat_ids(parts: list[np.ndarray]) -> np.ndarray:
    """Blocks of ids: int64 when every block is, else all as str (exact ints print back
    as the original text)."""
    if all(p.dtype.kind == "i" for p in parts):
        return np.concatenate(parts)
    return np.concatenate([p.astype(str) if p.dtype.kind == "i" else p for p in parts])


# ----------------------------------------------------------------------------- preprocessing


def preprocess(interactions: Interactions, *, min_items_per_user: int = 5,
               min_users_per_item: int = 0) -> Interactions:
    """The paper's preprocessing (Liang et al.): optionally drop items with fewer than
    min_users_per_item users, then drop users with fewer than min_items_per_user items.
    Items left with no user are dropped too; restricting items to those seen in training is
    done by the split. Raises DataError when nothing is left."""
    if min_items_per_user < 0 or min_users_per_item < 0:
        raise ValueError("min_items_per_user and min_users_per_item must be >= 0")
    m = interactions.matrix
    structure = m.copy()
    structure.data = (structure.data != 0).astype(np.float32)
    cols = np.arange(m.shape[1])
    if min_users_per_item > 0:
        item_counts = np.asarray(structure.sum(axis=0)).ravel()
        cols = np.flatnonzero(item_counts >= min_users_per_item)
        structure = structure[:, cols]
    user_counts = np.asarray(structure.sum(axis=1)).ravel()
    rows = np.flatnonzero(user_counts >= min_items_per_user)
    if rows.size == 0:
        raise DataError(
            f"empty dataset after preprocessing: no user has >= {min_items_per_user} items "
            f"({interactions.n_users} users, at most {int(user_counts.max(initial=0))} items each)"
        )
    kept_items = np.asarray(structure[rows].sum(axis=0)).ravel() > 0
    cols = cols[kept_items]
    return interactions.subset(rows=rows, cols=cols)


# ----------------------------------------------------------------------------- split


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

    @property
    def n_items(self) -> int:
        return self.train.shape[1]

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
    train = _canonical_csr(train[:, items])
    valid = _canonical_csr(m[valid_rows][:, items])
    test = _canonical_csr(m[test_rows][:, items])
    valid_in, valid_out = _fold_in_heldout(valid, heldout_fraction, min_items_for_heldout, rng)
    test_in, test_out = _fold_in_heldout(test, heldout_fraction, min_items_for_heldout, rng)
    return Split(
        train=train, valid_in=valid_in, valid_out=valid_out, test_in=test_in, test_out=test_out,
        item_ids=interactions.item_ids[items],
        train_user_ids=interactions.user_ids[train_rows],
        valid_user_ids=interactions.user_ids[valid_rows],
        test_user_ids=interactions.user_ids[test_rows],
    )


# ----------------------------------------------------------------------------- synthetic data


def synthetic_dataset(
    n_users: int = 8000,
    n_items: int = 3000,
    seed: int = 0,
    *,
    n_topics: int = 40,
    mean_items_per_user: float = 45.0,
    activity_sigma: float = 0.8,
    min_items: int = 5,
    max_items: int | None = None,
    zipf_exponent: float = 1.1,
    topic_concentration: float = 0.8,
    topic_popularity_exponent: float = 0.8,
    noise: float = 0.2,
) -> Interactions:
    """A seeded synthetic implicit-feedback dataset with planted tastes (< 0.5 s by default).

    Items: a Zipf popularity (weight ∝ 1/(rank + 10)^zipf_exponent, ranks in random order)
    and one home topic each. Topic t is a distribution over items: topic_concentration of its
    mass on its home items (∝ popularity^topic_popularity_exponent), the rest ∝ popularity over
    all items. Users: 1–4 of the n_topics topics (more for heavier users) with Dirichlet(1)
    weights; a fraction `noise` of each user's draws comes from global popularity. Activity
    n_u is log-normal (median 0.8 · mean_items_per_user, log-sd activity_sigma), clipped to
    [min_items, max_items] (max_items default n_items // 5); items are drawn without
    replacement (draws with replacement, duplicates dropped, the first n_u kept, so a few
    users end slightly short). Values are 1; user and item ids are 0..n-1.

    Defaults: 8,000 users × 3,000 items, ≈387k interactions (mean 48, median 36, 5 to ~400
    per user). On its strong-generalisation split, most-popular scores NDCG@100 ≈ 0.18 and a
    linear item-item model (EASE) ≈ 0.37.
    """
    if n_users < 1 or n_items < 2:
        raise ValueError("synthetic_dataset needs n_users >= 1 and n_items >= 2")
    if not 1 <= n_topics <= n_items:
        raise ValueError(f"n_topics must be in [1, n_items], got {n_topics}")
    rng = np.random.default_rng(seed)
    max_items = min(max_items or n_items // 5, n_items)
    min_items = min(min_items, max_items)

    # Item popularity: Zipf over a random ranking of the items.
    rank = rng.permutation(n_items)
    pop = 1.0 / (rank + 10.0) ** zipf_exponent
    pop /= pop.sum()
    home = rng.integers(0, n_topics, size=n_items)
    # topic × item distributions
    phi = np.zeros((n_topics, n_items))
    phi[home, np.arange(n_items)] = pop ** topic_popularity_exponent
    phi /= np.maximum(phi.sum(axis=1, keepdims=True), 1e-300)
    phi = topic_concentration * phi + (1 - topic_concentration) * pop[None, :]
    cdf_topic = np.cumsum(phi, axis=1)
    cdf_topic /= cdf_topic[:, -1:]
    cdf_pop = np.cumsum(pop)
    cdf_pop /= cdf_pop[-1]

    # User activity and tastes.
    median = 0.8 * mean_items_per_user
    n_u = np.round(np.exp(np.log(median) + activity_sigma * rng.standard_normal(n_users))).astype(np.int64)
    n_u = np.clip(n_u, min_items, max_items)
    n_user_topics = np.minimum(1 + rng.poisson(np.log1p(n_u / 20.0)), min(4, n_topics))
    max_t = int(n_user_topics.max())
    user_topics = np.argsort(rng.random((n_users, n_topics)), axis=1)[:, :max_t]
    weights = rng.gamma(1.0, size=(n_users, max_t)) * (np.arange(max_t)[None, :] < n_user_topics[:, None])
    weights /= weights.sum(axis=1, keepdims=True)
    cdf_w = np.cumsum(weights, axis=1)

    # Draws with replacement, oversampled so that after removing duplicates n_u usually remain.
    n_draws = np.ceil(n_u * 1.6 + 8).astype(np.int64)
    draw_user = np.repeat(np.arange(n_users), n_draws)
    total = draw_user.size
    from_pop = rng.random(total) < noise
    slot = (rng.random(total)[:, None] > cdf_w[draw_user]).sum(axis=1)
    slot = np.minimum(slot, max_t - 1)
    topic = user_topics[draw_user, slot]
    u01 = rng.random(total)
    item = np.empty(total, dtype=np.int64)
    # inverse-CDF sampling per topic (grouped to use searchsorted on one CDF at a time)
    t_idx = np.flatnonzero(~from_pop)
    order = t_idx[np.argsort(topic[t_idx], kind="stable")]
    bounds = np.searchsorted(topic[order], np.arange(n_topics + 1))
    for t in range(n_topics):
        sel = order[bounds[t]:bounds[t + 1]]
        item[sel] = np.searchsorted(cdf_topic[t], u01[sel], side="right")
    p_idx = np.flatnonzero(from_pop)
    item[p_idx] = np.searchsorted(cdf_pop, u01[p_idx], side="right")
    np.minimum(item, n_items - 1, out=item)

    # Without replacement: first occurrence of each (user, item), then the first n_u per user.
    key = draw_user * n_items + item
    _, first = np.unique(key, return_index=True)
    first.sort()  # draw order (users are contiguous in it)
    users, items = draw_user[first], item[first]
    starts = np.searchsorted(users, np.arange(n_users))
    pos = np.arange(users.size) - starts[users]
    keep = pos < n_u[users]
    users, items = users[keep], items[keep]
    m = sp.csr_matrix((np.ones(users.size, dtype=np.float32), (users, items)), shape=(n_users, n_items))
    return Interactions(m, np.arange(n_users), np.arange(n_items))


def popularity_scores(train) -> np.ndarray:
    """Item popularity: the number of training users with a (nonzero) interaction, float64."""
    m = sp.csr_matrix(train)
    return np.bincount(m.indices[m.data != 0], minlength=m.shape[1]).astype(np.float64)
