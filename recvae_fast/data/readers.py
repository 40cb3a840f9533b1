"""Reading interaction files into `Interactions`, with pyarrow.

Delimited text goes through pyarrow's multi-threaded CSV reader: CSV/TSV and other one-character
separators directly; ``::`` (MovieLens ratings.dat), other multi-character separators and runs of
whitespace through a stream that rewrites them, line by line, into one separator character.
Compressed files (.gz, .bz2, .zst) are decompressed on the fly; a gzip/bzip2/zstd file is
recognised by its first bytes whatever its name. Parquet files are read with pyarrow.parquet.

The user and item columns are read as strings (Arrow's variable-width layout, so one long id costs
its own length). A column whose every value is the canonical decimal form of an int64 becomes int64
ids, coded by direct indexing into the range they span (by hashing when that range is sparse); other ids are hashed into a table of
distinct ids (pyarrow's dictionary encoding) that is checked, trimmed and normalised. The distinct
ids are sorted, and rows and columns follow that order. The rating filter is applied before
coding, so users and items left without an interaction are not indexed.

Problems are located for the user: a failing row is found again in the text, streaming, to name
its line number (only when something is wrong, so the fast path never counts lines).
"""
from __future__ import annotations

import io
import math
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from .errors import DataError
from .ids import MAX_ID_LENGTH, STRING_IDS, ints_if_exact
from .interactions import Interactions, from_codes
from .layout import FORMATS, WHITESPACE, Layout, choose_columns, detect_layout, parse_sep, split_line

_BLOCK_BYTES = 1 << 22  # pyarrow's CSV block; a longer line is rejected (ids are at most 1,000 characters)
_SCAN_CHUNK = 1 << 20  # bytes read at a time when streaming through lines
_FIELD_SEP = b"\x1f"  # ASCII unit separator: what multi-character separators are rewritten to
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_COMPRESSION_SUFFIXES = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
_COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\x28\xb5\x2f\xfd": "zstd"}
_PARQUET_SUFFIXES = (".parquet", ".pq")


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
    MovieLens ratings.csv, u.data, ratings.dat (``::``), RecBole ``.inter``, Parquet; .gz, .bz2 and
    .zst compressed text too. fmt: "auto", "csv", "tsv", "movielens", "ml-100k", "ml-1m",
    "ml-10m", "ml-20m", "inter", "parquet". Columns (user_col, item_col, rating_col) are header
    names or 0-based indices; None detects them (known names such as userId/user_id/movieId/
    item_id/rating, or positions 0, 1, 2 without a header); rating_col=False (or "none") means no
    rating column.

    Values: with rating_threshold, rows with rating > threshold become 1 (the paper: 3.5);
    without one, the rating when there is a rating column (duplicate user–item pairs summed,
    zero ratings dropped, negative ones rejected), else 1. Ratings must be finite and within
    float32. Ids are at most MAX_ID_LENGTH characters, surrounding whitespace removed. Users and
    items that keep no interaction are not indexed. Rows and columns are in sorted order of the
    original ids.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown fmt {fmt!r}; expected one of: {', '.join(FORMATS)}")
    rating_threshold = _parse_threshold(rating_threshold)
    source = _Source.open(path)
    columns = dict(user_col=user_col, item_col=item_col, rating_col=rating_col)
    if fmt == "parquet" or (fmt == "auto" and source.is_parquet):
        table = _read_parquet(source, rating_threshold, **columns)
    else:
        fmt_sep, fmt_header = FORMATS[fmt]
        table = _read_text(source, rating_threshold, sep=parse_sep(sep) or fmt_sep,
                           has_header=fmt_header if has_header is None else has_header, **columns)
    return table.to_interactions(rating_threshold)


def has_rating_column(path, *, fmt: str = "auto", sep: str | None = None, user_col=None, item_col=None,
                      rating_col=None, has_header: bool | None = None) -> bool:
    """Whether `load_interactions` with these arguments reads a rating column from `path` (the
    same layout detection; only the first lines of a text file, or a Parquet file's schema, are
    read). Without one, every row is an interaction of value 1 and no rating threshold applies."""
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown fmt {fmt!r}; expected one of: {', '.join(FORMATS)}")
    source = _Source.open(path)
    columns = dict(user_col=user_col, item_col=item_col, rating_col=rating_col)
    if fmt == "parquet" or (fmt == "auto" and source.is_parquet):
        _, _, (_, _, rating) = _parquet_columns(source, None, **columns)
        return rating is not None
    fmt_sep, fmt_header = FORMATS[fmt]
    layout, _ = _text_layout(source, None, sep=parse_sep(sep) or fmt_sep,
                             has_header=fmt_header if has_header is None else has_header, **columns)
    return layout.rating is not None


def _parse_threshold(rating_threshold) -> float | None:
    if rating_threshold is None:
        return None
    try:
        value = float(rating_threshold)
    except (TypeError, ValueError):
        raise DataError(f"rating_threshold must be a number, got {rating_threshold!r}") from None
    if math.isnan(value):
        raise DataError("rating_threshold must be a number, got nan")
    return value


# ----------------------------------------------------------------------------- the file


@dataclass
class _Source:
    """A data file and how to decompress it."""

    path: Path
    compression: str | None
    note: str  # said in errors when the compression came from the content, not the name
    is_parquet: bool

    @classmethod
    def open(cls, path: Path) -> "_Source":
        if not path.exists():
            raise DataError(f"data file not found: {path}")
        if path.is_dir():
            raise DataError(f"{path} is a directory, not a data file")
        if not path.is_file():  # a FIFO, device or socket: opening or reading it could block forever
            raise DataError(f"{path} is not a regular file (a FIFO, device or socket), not a data file")
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc}") from None
        by_content = next((c for m, c in _COMPRESSION_MAGIC.items() if magic.startswith(m)), None)
        suffix = path.suffix.lower()
        by_name = _COMPRESSION_SUFFIXES.get(suffix)
        if by_name and by_content != by_name:
            raise DataError(f"{path} ends in {suffix} but is not {by_name}-compressed (its first bytes are {magic!r})")
        note = f" (read as {by_content}: its first bytes are {by_content}'s magic number)" \
            if by_content and not by_name else ""
        return cls(path, by_content, note, suffix in _PARQUET_SUFFIXES or magic == b"PAR1")

    def stream(self):
        """The decompressed bytes, as a pyarrow input stream."""
        try:
            return pa.input_stream(str(self.path), compression=self.compression)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"cannot read {self.path}: {exc}") from None

    def lines(self, chunk_bytes: int = _SCAN_CHUNK) -> Iterator[tuple[int, bytes]]:
        """(line number, bytes) of every line (ends: \\n, \\r\\n or \\r), streaming. A line longer
        than _BLOCK_BYTES ends the iteration (cut there), so memory stays bounded."""
        carry, lineno = b"", 0
        with self.stream() as f:
            while True:
                try:
                    chunk = f.read(chunk_bytes)
                except (OSError, pa.ArrowException) as exc:
                    raise DataError(f"cannot read {self.path}{self.note}: {exc}") from None
                buf = carry + chunk
                if not chunk:
                    if buf:
                        yield lineno + 1, buf
                    return
                hold_cr = buf.endswith(b"\r")  # it may be the first half of \r\n
                parts = re.split(rb"\r\n|\r|\n", buf[:-1] if hold_cr else buf)
                carry = parts.pop() + (b"\r" if hold_cr else b"")
                for line in parts:
                    lineno += 1
                    yield lineno, line
                if len(carry) > _BLOCK_BYTES:
                    yield lineno + 1, carry[:_BLOCK_BYTES]
                    return


# ----------------------------------------------------------------------------- the columns read


@dataclass
class _Columns:
    """The user, item (dictionary-encoded) and rating columns read from a file, and how to name
    the place of a row in it."""

    source: _Source
    users: pa.ChunkedArray
    items: pa.ChunkedArray
    ratings: pa.ChunkedArray | None
    labels: tuple[str, str, str | None]  # the columns as the user knows them
    where: Callable[[int], str]  # row -> "line 12 of ratings.csv"
    had_header: bool

    def to_interactions(self, rating_threshold: float | None) -> Interactions:
        name = self.source.path.name
        n_rows = len(self.users)
        if n_rows == 0:
            what = "has a header but no data rows" if self.had_header else "has no data"
            raise DataError(f"empty dataset: {name} {what}")
        values = keep = None
        if self.ratings is not None:
            values = self._ratings()
            if rating_threshold is not None:
                keep = values > rating_threshold
            else:
                negative = np.flatnonzero(values < 0)
                if negative.size:
                    k = int(negative[0])
                    raise DataError(f"negative rating '{values[k]:g}' on {self.where(k)}: interaction weights must "
                                    "be >= 0 (pass rating_threshold to binarise ratings)")
                keep = values > 0
            if keep.all():
                keep = None
            else:
                values = values[keep]
        if values is not None and values.size == 0:
            if rating_threshold is not None:
                what = f" after keeping ratings > {rating_threshold:g}"
            else:
                what = " after dropping zero ratings"
            raise DataError(f"empty dataset: no interactions left in {name}{what} ({n_rows} rows read)")
        # Ids are checked on every row, coded on the rows kept: ids of no kept row are not indexed.
        rows, user_ids = self._codes(self.users, "user", self.labels[0], keep)
        cols, item_ids = self._codes(self.items, "item", self.labels[1], keep)
        binary = rating_threshold is not None or values is None
        return from_codes(rows, cols, None if binary else values, binary, user_ids, item_ids)

    def _codes(self, column: pa.ChunkedArray, role: str, label: str,
               keep: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(code of each kept row, sorted distinct ids of the kept rows) of an id column, the ids of
        every row checked and normalised."""
        name = self.source.path.name
        value_type = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
        if not (pa.types.is_string(value_type) or pa.types.is_large_string(value_type)
                or pa.types.is_integer(value_type)):
            raise DataError(f"the {role} column {label} of {name} holds {column.type}, not integers or strings")
        if column.null_count:
            k = _first_true(pc.is_null(column))
            raise DataError(f"missing {role} id (column {label}) on {self.where(k)}")
        if pa.types.is_uint64(value_type):
            beyond = pc.greater(column if value_type == column.type else column.cast(value_type),
                                pa.scalar(np.iinfo(np.int64).max, pa.uint64()))
            if pc.any(beyond).as_py():
                k = _first_true(beyond)
                raise DataError(f"{role} id {column[k].as_py()} (column {label}) on {self.where(k)} is beyond the "
                                "int64 range of integer ids")
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            ints = _exact_ints(column)
            if ints is not None:
                return _int_codes(ints if keep is None else ints[keep])
        elif pa.types.is_integer(column.type):
            ints = column.cast(pa.int64()).to_numpy()
            return _int_codes(ints if keep is None else ints[keep])
        if not pa.types.is_dictionary(column.type):
            column = pc.dictionary_encode(column)  # hashes the ids: codes into a table of distinct ids
        column = pa.table({"c": column}).unify_dictionaries().column("c")
        dictionary = column.chunk(0).dictionary if column.num_chunks else pa.array([], pa.string())
        codes = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in column.chunks])

        def row_of(entry: int) -> int:
            return int(np.flatnonzero(codes == entry)[0])

        if pa.types.is_string(dictionary.type) or pa.types.is_large_string(dictionary.type):
            lengths = pc.utf8_length(dictionary).to_numpy(zero_copy_only=False)
            if lengths.size and lengths.max() > MAX_ID_LENGTH:
                entry = int(np.argmax(lengths))
                raise DataError(f"{role} id of {int(lengths[entry])} characters (column {label}) on "
                                f"{self.where(row_of(entry))}: ids are at most {MAX_ID_LENGTH} characters")
            nul = np.flatnonzero(pc.match_substring(dictionary, "\x00").to_numpy(zero_copy_only=False))
            if nul.size:
                raise DataError(f"{role} id with a NUL byte (column {label}) on {self.where(row_of(int(nul[0])))}")
            dictionary = pc.utf8_trim_whitespace(dictionary)
            empty = np.flatnonzero(pc.equal(dictionary, "").to_numpy(zero_copy_only=False))
            if empty.size:
                raise DataError(f"empty {role} id (column {label}) on {self.where(row_of(int(empty[0])))}")
            ids = ints_if_exact(np.array(dictionary.to_pylist(), dtype=STRING_IDS))
        elif pa.types.is_integer(dictionary.type):
            ids = dictionary.cast(pa.int64()).to_numpy()
        else:
            raise DataError(f"the {role} column {label} of {self.source.path.name} holds {dictionary.type}, "
                            "not integers or strings")
        distinct, inverse = np.unique(ids, return_inverse=True)  # sorts, and merges ids equal after trimming
        return _drop_unused(inverse.reshape(-1)[codes if keep is None else codes[keep]], distinct)

    def _ratings(self) -> np.ndarray:
        label = self.labels[2]
        column = self.ratings
        if column.null_count:
            raise DataError(f"missing rating (column {label}) on {self.where(_first_true(pc.is_null(column)))}")
        try:
            values = column.cast(pa.float64()).to_numpy()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(f"the rating column {label} of {self.source.path.name} is not numeric ({exc})") from None
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            k = int(bad[0])
            raise DataError(f"non-finite rating '{values[k]:g}' (column {label}) on {self.where(k)}: "
                            "ratings must be finite numbers")
        huge = np.flatnonzero(np.abs(values) > _FLOAT32_MAX)
        if huge.size:
            k = int(huge[0])
            raise DataError(f"rating {values[k]:g} (column {label}) on {self.where(k)} is beyond the float32 "
                            f"range (±{_FLOAT32_MAX:.4g})")
        return values


def _exact_ints(column: pa.ChunkedArray) -> np.ndarray | None:
    """The column as int64 when every value is the canonical decimal form of an int64 ('7',
    '-12'; not '007', '+7', ' 7' or '0x7'), else None. pyarrow's cast rejects signs, spaces and
    non-digits but accepts leading zeros ('007', '0x7', '-0'): those are caught by looking at the
    first two bytes of each string."""
    try:
        ints = pc.cast(column, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    for chunk in column.chunks:
        if len(chunk) == 0:
            continue
        offsets_type = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        offsets = np.frombuffer(chunk.buffers()[1], dtype=offsets_type)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)
        starts = offsets[:-1]
        first = data[starts]
        zero, minus = first == ord("0"), first == ord("-")
        if zero.any() and (np.diff(offsets)[zero] > 1).any():
            return None
        if minus.any() and (data[starts[minus] + 1] == ord("0")).any():
            return None
    return ints.to_numpy()


def _int_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-row code, sorted distinct ids) of int64 ids: by direct indexing when the ids span a
    range not much larger than their count (the usual case: O(n), no hashing, no sorting),
    else by hashing (pyarrow) and sorting the distinct ids."""
    if values.size == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    lo, hi = int(values.min()), int(values.max())
    if hi - lo < 4 * values.size + 1024:
        offset = values - lo
        present = np.zeros(hi - lo + 1, dtype=bool)
        present[offset] = True
        rank = np.cumsum(present, dtype=np.int64) - 1
        return rank[offset], np.flatnonzero(present) + lo
    encoded = pc.dictionary_encode(pa.array(values))
    distinct, inverse = np.unique(encoded.dictionary.to_numpy(), return_inverse=True)
    return inverse.reshape(-1)[encoded.indices.to_numpy()], distinct


def _first_true(mask) -> int:
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False)))[0])


def _drop_unused(codes: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes and ids without the ids that no kept row uses (order kept)."""
    used = np.bincount(codes, minlength=ids.size) > 0
    if used.all():
        return codes, ids
    new_code = np.cumsum(used) - 1
    return new_code[codes], ids[used]


# ----------------------------------------------------------------------------- delimited text


def _read_text(source: _Source, rating_threshold, *, sep, has_header, user_col, item_col, rating_col) -> _Columns:
    """The columns of a delimited text file (layout detected from its first lines)."""
    layout, skip = _text_layout(source, rating_threshold, sep=sep, has_header=has_header, user_col=user_col,
                                item_col=item_col, rating_col=rating_col)
    names = [f"f{j}" for j in range(layout.n_fields)]
    wanted = [layout.user, layout.item] + ([layout.rating] if layout.rating is not None else [])
    one_char = len(layout.sep) == 1 and layout.sep != WHITESPACE
    bad_rows: list = []

    def on_invalid_row(row) -> str:
        if not row.text.strip():
            return "skip"  # whitespace-only lines are blank lines
        bad_rows.append(row)
        return "error"

    read_options = pa_csv.ReadOptions(use_threads=True, block_size=_BLOCK_BYTES, skip_rows=skip, column_names=names)
    parse_options = pa_csv.ParseOptions(
        delimiter=layout.sep if one_char else _FIELD_SEP.decode(), quote_char='"' if one_char else False,
        invalid_row_handler=on_invalid_row)
    convert_options = pa_csv.ConvertOptions(
        include_columns=[names[j] for j in wanted],
        column_types={names[layout.user]: pa.string(), names[layout.item]: pa.string(),
                      **({names[layout.rating]: pa.float64()} if layout.rating is not None else {})},
        null_values=[], strings_can_be_null=False, quoted_strings_can_be_null=False)
    stream = source.stream()
    try:
        with _undecodable_rows_as_errors(bad_rows):
            table = pa_csv.read_csv(stream if one_char else _SeparatorStream(stream, layout.sep),
                                    read_options=read_options, parse_options=parse_options,
                                    convert_options=convert_options)
    except (pa.ArrowException, OSError) as exc:
        raise _text_error(source, layout, skip, exc, bad_rows) from None
    finally:
        stream.close()
    labels = tuple(layout.column_name(j) if j is not None else None for j in (layout.user, layout.item, layout.rating))
    return _Columns(source, table.column(names[layout.user]), table.column(names[layout.item]),
                    table.column(names[layout.rating]) if layout.rating is not None else None,
                    labels, lambda k: _line_of_row(source, skip, k), layout.header is not None)


def _text_layout(source: _Source, rating_threshold, *, sep, has_header, user_col, item_col,
                 rating_col) -> tuple[Layout, int]:
    """(layout detected from the first lines, lines before the first data row)."""
    head, skip = _first_lines(source)
    if not head:
        raise DataError(f"empty dataset: {source.path.name} has no data")
    layout = detect_layout(head, source.path, rating_threshold, sep=sep, has_header=has_header, user_col=user_col,
                           item_col=item_col, rating_col=rating_col)
    return layout, skip + (layout.header is not None)


@contextmanager
def _undecodable_rows_as_errors(bad_rows: list):
    """pyarrow decodes an invalid row's text before calling the row handler, and reports a row
    that is not UTF-8 as an 'exception ignored'; record it as a bad row instead."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if isinstance(unraisable.exc_value, UnicodeDecodeError):
            bad_rows.append(None)
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def _first_lines(source: _Source) -> tuple[list[str], int]:
    """The first two non-blank lines (text, for detecting the layout) and the number of blank
    lines before them. DataError for UTF-16 or binary content."""
    lines: list[str] = []
    n_blank = 0
    for lineno, raw in source.lines(min(_SCAN_CHUNK, 1 << 16)):
        if lineno == 1:
            if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                raise DataError(f"{source.path} is UTF-16 text (it starts with a UTF-16 byte-order mark); "
                                "convert it to UTF-8, e.g. iconv -f UTF-16 -t UTF-8")
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
        if b"\x00" in raw:
            raise DataError(f"line {lineno} of {source.path.name} contains NUL bytes: the file is UTF-16 or binary, "
                            f"not UTF-8 text{source.note}")
        text = raw.decode("utf-8", errors="replace")
        if not text.strip():
            if not lines:
                n_blank += 1
            continue
        lines.append(text)
        if len(lines) == 2:
            break
    return lines, n_blank


def _line_of_row(source: _Source, skip: int, row: int) -> str:
    """'line N of NAME' of data row `row` (blank lines are not rows), found by streaming."""
    k = -1
    for lineno, raw in source.lines():
        if lineno > skip and raw.strip():
            k += 1
            if k == row:
                return f"line {lineno} of {source.path.name}"
    return f"data row {row + 1} of {source.path.name}"


def _text_error(source: _Source, layout: Layout, skip: int, exc: Exception, bad_rows: list) -> DataError:
    """The DataError for a failed pyarrow read, naming the line where it can be found."""
    name = source.path.name
    message = str(exc)
    if "invalid UTF8" in message or (bad_rows and bad_rows[0] is None):
        found = _find_line(source, skip, None, utf8=True)
        at = f"line {found[0]}" if found else "a line"
        return DataError(f"{at} of {name} is not valid UTF-8 text{source.note}")
    if bad_rows:
        row = bad_rows[0]
        shown = "whitespace" if layout.sep == WHITESPACE else repr(layout.sep)
        one_char = len(layout.sep) == 1 and layout.sep != WHITESPACE
        as_read = (lambda text: text) if one_char else \
            (lambda text: _rewrite(text.encode("utf-8"), layout.sep).decode("utf-8", errors="replace"))
        found = _find_line(source, skip, lambda text: as_read(text) == row.text.rstrip("\r"))
        at = f"line {found[0]}" if found else "a line"
        text = found[1] if found else row.text
        return DataError(f"{at} of {name} has {row.actual_columns} field(s) separated by {shown}, expected "
                         f"{layout.n_fields} (like the first line): {text[:80]!r}")
    if "straddling" in message:
        found = _find_line(source, 0, None)
        return DataError(f"line {found[0] if found else '?'} of {name} is longer than {_BLOCK_BYTES:,} bytes: not an "
                         f"interaction record (ids are at most {MAX_ID_LENGTH} characters)")
    conversion = re.search(r"CSV conversion error to (\w+): invalid value '(.*)'", message)
    if conversion and layout.rating is not None:
        value = conversion.group(2)
        found = _find_line(source, skip, lambda text: _field(text, layout, layout.rating) == value.strip())
        at = f"line {found[0]}" if found else "a line"
        return DataError(f"unparsable rating {value!r} (column {layout.column_name(layout.rating)}) on {at} of {name}")
    return DataError(f"cannot read {source.path}{source.note}: {message.splitlines()[0] if message else exc!r}")


def _find_line(source: _Source, skip: int, matches: Callable[[str], bool] | None,
               utf8: bool = False) -> tuple[int, str] | None:
    """(number, text) of the first line after `skip` that `matches`, or that is not UTF-8
    (utf8=True), or (matches None) that is longer than _BLOCK_BYTES."""
    for lineno, raw in source.lines():
        if matches is None and not utf8:
            if len(raw) >= _BLOCK_BYTES:
                return lineno, ""
            continue
        if lineno <= skip:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            if utf8:
                return lineno, ""
            continue
        if matches is not None and matches(text):
            return lineno, text
    return None


def _field(text: str, layout: Layout, j: int) -> str | None:
    fields = split_line(text, layout.sep)
    return fields[j].strip() if len(fields) > j else None


class _SeparatorStream(io.RawIOBase):
    """A byte stream with `sep` (a multi-character separator, or WHITESPACE for runs of spaces
    and tabs) rewritten to _FIELD_SEP, one whole line at a time, for pyarrow's CSV reader."""

    def __init__(self, raw, sep: str):
        super().__init__()
        self._raw, self._sep = raw, sep
        self._carry = self._out = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while not self._eof and (n < 0 or len(self._out) < n):
            chunk = self._raw.read(_SCAN_CHUNK)
            if chunk:
                buf = self._carry + chunk
                cut = max(buf.rfind(b"\n"), buf.rfind(b"\r")) + 1
                if cut == 0 and len(buf) > _BLOCK_BYTES:
                    cut = len(buf)  # an overlong line: pass it on and let the reader reject it
                data, self._carry = buf[:cut], buf[cut:]
            else:
                self._eof = True
                data, self._carry = self._carry, b""
            self._out += _rewrite(data, self._sep)
        if n < 0:
            out, self._out = self._out, b""
        else:
            out, self._out = self._out[:n], self._out[n:]
        return out



def _rewrite(data: bytes, sep: str) -> bytes:
    """Whole lines with `sep` (or runs of whitespace) turned into _FIELD_SEP."""
    if sep == WHITESPACE:
        return b"\n".join(_FIELD_SEP.join(line.split()) for line in data.split(b"\n"))
    return data.replace(sep.encode("utf-8"), _FIELD_SEP)


# ----------------------------------------------------------------------------- Parquet


def _read_parquet(source: _Source, rating_threshold, *, user_col, item_col, rating_col) -> _Columns:
    """The columns of a Parquet file, chosen by name (or index) like a text file's header."""
    path = source.path
    parquet, names, (u, i, r) = _parquet_columns(source, rating_threshold, user_col=user_col, item_col=item_col,
                                                 rating_col=rating_col)
    wanted = [names[j] for j in (u, i, r) if j is not None]
    try:
        table = parquet.read(columns=wanted, use_threads=True)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read {path} (Parquet): {exc}") from None
    return _Columns(source, table.column(names[u]), table.column(names[i]),
                    table.column(names[r]) if r is not None else None,
                    tuple(repr(names[j]) if j is not None else None for j in (u, i, r)),
                    lambda k: f"row {k + 1} of {path.name}", True)


def _parquet_columns(source: _Source, rating_threshold, *, user_col, item_col, rating_col):
    """(the open ParquetFile, its column names, the (user, item, rating or None) column indices)."""
    try:
        parquet = pq.ParquetFile(source.path)
        names = parquet.schema_arrow.names
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{source.path} is not a readable Parquet file ({exc})") from None
    return parquet, names, choose_columns(names, len(names), source.path, rating_threshold, user_col=user_col,
                                          item_col=item_col, rating_col=rating_col)
