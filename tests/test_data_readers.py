"""The pyarrow readers: compressed and Parquet files, and the loader defects of the issue tracker
(long ids, ratings beyond float32, UTF-16 input, gzip without .gz), each case failing on the old
hand-written reader. The fuzz test is in test_data_fuzz.py."""
from __future__ import annotations

import bz2
import gzip
import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recvae_fast.data import MAX_ID_LENGTH, DataError, load_interactions
from recvae_fast.data.ids import STRING_IDS

RATINGS = "userId,movieId,rating,timestamp\n1,10,4.0,1\n1,20,3.0,2\n7,10,5.0,3\n7,30,2.0,4\n"


def same(a, b) -> bool:
    return (a.matrix != b.matrix).nnz == 0 and np.array_equal(a.user_ids, b.user_ids) \
        and np.array_equal(a.item_ids, b.item_ids)


@pytest.mark.parametrize("name, compress", [
    ("ratings.csv.gz", gzip.compress),
    ("ratings.csv.bz2", bz2.compress),
    ("ratings.csv.zst", None),
    ("ratings.csv", gzip.compress),  # gzip without .gz: recognised by its magic number
])
def test_compressed_files(tmp_path, name, compress):
    plain = tmp_path / "plain.csv"
    plain.write_text(RATINGS)
    path = tmp_path / name
    if compress is None:
        with pa.output_stream(str(path), compression="zstd") as f:
            f.write(RATINGS.encode())
    else:
        path.write_bytes(compress(RATINGS.encode()))
    assert same(load_interactions(path), load_interactions(plain))


def test_damaged_compressed_files(tmp_path):
    fake = tmp_path / "ratings.csv.gz"
    fake.write_text(RATINGS)
    with pytest.raises(DataError, match=r"ratings.csv.gz ends in .gz but is not gzip-compressed"):
        load_interactions(fake)
    truncated = tmp_path / "ratings.csv"  # gzip content, no .gz, cut short
    truncated.write_bytes(gzip.compress((RATINGS * 2000).encode())[:300])
    with pytest.raises(DataError) as info:
        load_interactions(truncated)
    assert "read as gzip" in str(info.value) and "ratings.csv" in str(info.value)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le"])
def test_utf16_input_is_named(tmp_path, encoding):
    path = tmp_path / "ratings.csv"
    path.write_bytes(RATINGS.encode(encoding))
    with pytest.raises(DataError, match="UTF-16"):
        load_interactions(path)


def test_utf8_byte_order_mark_and_invalid_utf8(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + RATINGS.encode())
    assert load_interactions(path).nnz == 4
    path = tmp_path / "latin1.csv"
    path.write_bytes(RATINGS.encode() + "9,caf\u00e9,5,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="line 6 of latin1.csv is not valid UTF-8"):
        load_interactions(path)


def test_ids_up_to_the_maximum_length(tmp_path):
    ok, too_long = "u" * MAX_ID_LENGTH, "v" * (MAX_ID_LENGTH + 1)
    path = tmp_path / "ids.csv"
    path.write_text(f"user,item\n{ok},1\n{ok},2\nx,1\n")
    inter = load_interactions(path)
    assert inter.user_ids.dtype == STRING_IDS and inter.user_index(ok) == 0
    path.write_text(f"user,item\n{ok},1\nx,{too_long}\n")
    with pytest.raises(DataError, match=f"item id of {MAX_ID_LENGTH + 1} characters .* line 3 of ids.csv"):
        load_interactions(path)


def test_one_huge_id_fails_fast_with_bounded_memory(tmp_path):
    """A 5 MB id: the old reader built a fixed-width array of the file's longest token (88 GiB
    for this file). Run in a fresh interpreter so that its peak RSS is this load alone."""
    path = tmp_path / "ratings.csv"
    with open(path, "w") as f:
        f.write("userId,movieId,rating\n")
        f.writelines(f"{u},{u % 97},4\n" for u in range(20_000))
        f.write("x" * 5_000_000 + ",1,4\n")
        f.writelines(f"{u},{u % 97},4\n" for u in range(20_000))
    script = textwrap.dedent(f"""
        import json, resource, time
        from recvae_fast.data import DataError, load_interactions
        import pyarrow  # imported before the baseline
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        try:
            load_interactions({str(path)!r})
            message = None
        except DataError as exc:
            message = str(exc)
        print(json.dumps(dict(message=message, seconds=time.perf_counter() - start,
                              extra_mib=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["message"] is not None and "line 20002 of ratings.csv" in result["message"], result
    assert result["extra_mib"] < 200, result  # a few blocks of the file, not a table of 5 MB strings
    assert result["seconds"] < 20, result


def test_ratings_beyond_float32_are_rejected_with_their_line(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("userId,movieId,rating\n1,2,4\n1,3,3.5e38\n")
    with pytest.raises(DataError, match=r"rating 3.5e\+38 \(column 'rating'\) on line 3 of ratings.csv .* float32"):
        load_interactions(path)
    path.write_text("userId,movieId,rating\n1,2,4\n1,3,3.4e38\n")  # within float32: kept
    assert np.isfinite(load_interactions(path).matrix.data).all()


def test_fields_and_quotes_with_separators(tmp_path):
    path = tmp_path / "ratings.dat"
    path.write_text("1::1193::5::978300760\n\n1::661::3::978302109\n2:: 1193 ::4::978300275\n")
    inter = load_interactions(path)
    np.testing.assert_array_equal(inter.item_ids, [661, 1193])
    assert inter.nnz == 3
    path.write_text("1::1193::5::978300760\n1::661::3\n")
    with pytest.raises(DataError, match="line 2 of ratings.dat has 3 field.s. separated by '::', expected 4"):
        load_interactions(path)


# ----------------------------------------------------------------------------- Parquet


def test_parquet_matches_csv(tmp_path):
    csv_path = tmp_path / "ratings.csv"
    csv_path.write_text(RATINGS)
    table = pa.table({"userId": [1, 1, 7, 7], "movieId": [10, 20, 10, 30], "rating": [4.0, 3.0, 5.0, 2.0],
                      "timestamp": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "ratings.parquet")
    for threshold in (None, 3.5):
        assert same(load_interactions(tmp_path / "ratings.parquet", rating_threshold=threshold),
                    load_interactions(csv_path, rating_threshold=threshold))
    strings = pa.table({"who": ["a", "b", "a"], "what": pa.array(["x", "y", "y"]).dictionary_encode()})
    pq.write_table(strings, tmp_path / "events.pq")
    inter = load_interactions(tmp_path / "events.pq", user_col="who", item_col="what")
    np.testing.assert_array_equal(inter.matrix.toarray(), [[1, 1], [0, 1]])
    pq.write_table(strings, tmp_path / "no_suffix")
    assert same(load_interactions(tmp_path / "no_suffix", user_col="who", item_col="what"), inter)


@pytest.mark.parametrize("table, kwargs, words", [
    (pa.table({"userId": [1, None], "movieId": [1, 2]}), {}, ["missing user id", "row 2 of x.parquet"]),
    (pa.table({"userId": [1, 2], "movieId": [1, 2], "rating": [1.0, np.inf]}), {}, ["non-finite", "row 2"]),
    (pa.table({"userId": [1, 2], "movieId": [1, 2], "rating": ["4", "five"]}), {}, ["rating column", "not numeric"]),
    (pa.table({"a": [1], "b": [2]}), {}, ["no user column", "'a', 'b'"]),
    (pa.table({"userId": [1.5], "movieId": [1]}), {}, ["user column", "double"]),
    (pa.table({"userId": [[1, 2], [3]], "movieId": [1, 2]}), {}, ["user column 'userId' of x.parquet", "list"]),
    (pa.table({"userId": [1, 2], "movieId": [{"a": 1}, {"a": 2}]}), {}, ["item column 'movieId' of x.parquet",
                                                                       "struct"]),
    (pa.table({"userId": pa.array([1, 2**64 - 1], pa.uint64()), "movieId": [1, 2]}), {},
     ["user id 18446744073709551615 (column 'userId') on row 2 of x.parquet", "int64 range"]),
])
def test_bad_parquet(tmp_path, table, kwargs, words):
    pq.write_table(table, tmp_path / "x.parquet")
    with pytest.raises(DataError) as info:
        load_interactions(tmp_path / "x.parquet", **kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_uint64_parquet_ids_within_int64_are_read(tmp_path):
    pq.write_table(pa.table({"userId": pa.array([2**63 - 1, 1], pa.uint64()), "movieId": [1, 2]}),
                   tmp_path / "x.parquet")
    assert load_interactions(tmp_path / "x.parquet").user_ids.tolist() == [1, 2**63 - 1]


def test_nul_byte_in_a_csv_id_is_named_with_its_line_and_column(tmp_path):
    (tmp_path / "ratings.csv").write_bytes(b"userId,movieId\n1,2\n3,4\x005\n")
    with pytest.raises(DataError, match=r"item id with a NUL byte \(column 'movieId'\) on line 3 of ratings.csv"):
        load_interactions(tmp_path / "ratings.csv")


def test_a_fifo_is_refused_without_opening_it(tmp_path):
    import os

    os.mkfifo(tmp_path / "ratings.csv")
    with pytest.raises(DataError, match="is not a regular file"):
        load_interactions(tmp_path / "ratings.csv")


def test_reading_is_not_slower_than_a_second_for_a_small_file(tmp_path):
    """Not a benchmark (benches/bench_load.py is): a guard against a per-row Python loop."""
    rng = np.random.default_rng(0)
    n = 200_000
    lines = "\n".join(f"{u}::{i}::{r}::0" for u, i, r in zip(rng.integers(0, 5000, n), rng.integers(0, 3000, n),
                                                              rng.integers(1, 6, n)))
    path = tmp_path / "ratings.dat"
    path.write_text(lines + "\n")
    start = time.perf_counter()
    inter = load_interactions(path, rating_threshold=3.5)
    assert time.perf_counter() - start < 10.0 and inter.nnz > 0


@pytest.mark.parametrize("content, kwargs, rated", [
    (RATINGS, {}, True),
    ("user_id,item_id\n1,10\n7,20\n", {}, False),
    ("user_id,item_id,timestamp\n1,10,5\n", {}, False),  # a timestamp is not a rating
    ("1,10\n7,20\n", {}, False),  # no header: positions user, item[, rating]
    ("1,10,4\n7,20,5\n", {}, True),
    (RATINGS, {"rating_col": "none"}, False),
    ("u\ti\tr\n1\t10\t4\n", {"user_col": "u", "item_col": "i", "rating_col": "r"}, True),
])
def test_has_rating_column_says_what_load_interactions_reads(tmp_path, content, kwargs, rated):
    from recvae_fast.data import has_rating_column

    path = tmp_path / "data.csv"
    path.write_text(content)
    assert has_rating_column(path, **kwargs) is rated
    inter = load_interactions(path, **kwargs)
    if rated:  # the threshold is accepted exactly when there is a rating column
        load_interactions(path, rating_threshold=0.5, **kwargs)
    else:
        assert set(inter.matrix.data.tolist()) == {1.0}
        with pytest.raises(DataError, match="no rating column"):
            load_interactions(path, rating_threshold=0.5, **kwargs)


def test_has_rating_column_of_a_parquet_file(tmp_path):
    from recvae_fast.data import has_rating_column

    with_rating, without = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": [3, 4], "rating": [5.0, 4.0]}), with_rating)
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": [3, 4]}), without)
    assert has_rating_column(with_rating) and not has_rating_column(without)
