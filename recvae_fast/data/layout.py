"""The layout of a delimited text file, detected from its first lines: separator, header,
and which columns hold the user, the item and the rating.

Known column names (userId, user_id:token, movieId, rating, ...) are matched case-insensitively,
ignoring RecBole type suffixes and punctuation; without a header the columns are user, item
[, rating] by position. Explicit names or 0-based indices override the detection.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

WHITESPACE = " "  # separator meaning "runs of whitespace"

USER_NAMES = ("user_id", "userid", "user", "uid", "users", "customer_id", "customerid", "visitorid",
               "visitor_id", "member_id", "reviewerid", "reviewer_id", "session_id")
ITEM_NAMES = ("item_id", "itemid", "item", "iid", "items", "movie_id", "movieid", "movie", "product_id",
               "productid", "track_id", "trackid", "song_id", "songid", "business_id", "asin", "book_id",
               "isbn", "anime_id", "article_id", "recipe_id", "game_id", "artist_id", "venue_id", "poi_id")
RATING_NAMES = ("rating", "ratings", "score", "stars", "value", "weight", "count", "play_count", "playcount",
                 "plays", "preference", "rating_value", "overall", "clicks", "frequency", "label")
_TIME_NAMES = ("timestamp", "time", "ts", "datetime", "date", "unixreviewtime")
_KNOWN = set(USER_NAMES) | set(ITEM_NAMES) | set(RATING_NAMES) | set(_TIME_NAMES)

FORMATS = {
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
    "parquet": (None, None),
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


def parse_sep(sep) -> str | None:
    if sep is None:
        return None
    if not isinstance(sep, str) or sep == "":
        raise DataError(f"sep must be a non-empty string, got {sep!r}")
    aliases = {"\\t": "\t", "tab": "\t", "\\s+": WHITESPACE, "space": WHITESPACE, "whitespace": WHITESPACE, "comma": ",",
               "semicolon": ";", "pipe": "|"}
    sep = aliases.get(sep.lower(), sep)
    if sep.isspace() and sep != "\t":
        return WHITESPACE
    return sep


def _detect_sep(first_line: str, path: Path) -> str:
    name = re.sub(r"\.(gz|bz2|zst)$", "", path.name.lower())
    if name.endswith(".inter"):
        return "\t"
    for candidate in ("::", "\t", ",", ";", "|"):
        if candidate in first_line:
            return candidate
    if len(first_line.split()) >= 2:
        return WHITESPACE
    raise DataError(
        f"cannot detect the field separator of {path.name} from its first line {first_line[:80]!r}; "
        "pass sep= (--sep)"
    )


def split_line(line: str, sep: str) -> list[str]:
    if sep == WHITESPACE:
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


def resolve_column(spec, header: list[str] | None, n_fields: int, candidates: tuple[str, ...],
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


@dataclass
class Layout:
    sep: str
    n_fields: int
    header: list[str] | None
    user: int
    item: int
    rating: int | None

    def column_name(self, j: int) -> str:
        return repr(self.header[j]) if self.header is not None else str(j)


def detect_layout(lines: list[str], path: Path, rating_threshold, *, sep, has_header, user_col, item_col,
                   rating_col) -> Layout:
    """Separator, header and columns from the first (non-blank) lines."""
    first = lines[0]
    if sep is None:
        sep = _detect_sep(first, path)
    first_fields = split_line(first, sep)
    second_fields = split_line(lines[1], sep) if len(lines) > 1 else None
    if has_header is None:
        has_header = _detect_header(first_fields, second_fields, user_col, item_col, rating_col)
    n_fields = len(first_fields)
    header = [f.strip() for f in first_fields] if has_header else None

    u, i, r = choose_columns(header, n_fields, path, rating_threshold, user_col=user_col, item_col=item_col,
                             rating_col=rating_col)
    return Layout(sep, n_fields, header, u, i, r)



def choose_columns(header: list[str] | None, n_fields: int, path: Path, rating_threshold, *, user_col, item_col,
                   rating_col) -> tuple[int, int, int | None]:
    """(user, item, rating or None) column indices from explicit choices or the header's names."""
    u = resolve_column(user_col, header, n_fields, USER_NAMES, "user", path, True, 0)
    i = resolve_column(item_col, header, n_fields, ITEM_NAMES, "item", path, True, 1)
    no_rating = rating_col is False or (isinstance(rating_col, str) and rating_col.strip().lower() in ("", "none"))
    if no_rating:
        r = None
    else:
        r = resolve_column(rating_col, header, n_fields, RATING_NAMES, "rating", path, False, 2)
        if rating_col is None and header is None and r in (u, i):
            r = None  # the positional default collides with explicitly chosen columns
    if u == i:
        raise DataError(f"user and item columns are the same column ({u}) of {path.name}")
    if r is not None and r in (u, i):
        raise DataError(f"the rating column ({r}) of {path.name} is also the user or item column")
    if rating_threshold is not None and r is None:
        raise DataError(f"rating_threshold given but {path.name} has no rating column; pass rating_col")
    return u, i, r
