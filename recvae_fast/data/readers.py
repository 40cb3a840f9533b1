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

import csv
import gzip
import math
import operator
import re
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from .errors import DataError
from .interactions import Interactions, from_triples

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
    return from_triples(users, items, values, binary)


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


