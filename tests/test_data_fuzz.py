"""Fuzzing the loaders: random bytes and random mutations of valid files (every layout,
compressed too) give either a correct-looking result or one clean DataError/ValueError line,
never another exception, with bounded memory. Seeded, a few seconds."""
from __future__ import annotations

import gzip
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from recvae_fast.data import Interactions, load_interactions

VALID = {
    "ratings.csv": b"userId,movieId,rating,timestamp\n1,10,4.0,9\n1,20,3.5,9\n7,10,5,9\n8,30,1,9\n",
    "ratings.dat": b"1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978300275\n",
    "u.data": b"196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t302\t1\t1\n",
    "ml.inter": b"user_id:token\titem_id:token\trating:float\nu1\tm9\t4\nu2\tm9\t2\nu1\tm3\t5\n",
    "events.txt": b"a b\nc  d\n\ta e\n",
    "quoted.csv": b'user,item,rating\n"a, b",x,1\n"c",x,2\n',
}
TOKENS = [b",", b"::", b":", b"\t", b" ", b"\n", b"\r", b"\r\n", b'"', b"\x00", b"\xff", b"\xef\xbb\xbf", b"-",
          b"nan", b"inf", b"1e39", b"-1", b"0", b"\x1f", b"userId", b"rating", b"x" * 1500, b"9" * 25]


def mutate(content: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(content)
    for _ in range(int(rng.integers(1, 6))):
        op = rng.integers(0, 5)
        pos = int(rng.integers(0, len(data) + 1))
        if op == 0 and data:  # flip a byte
            data[min(pos, len(data) - 1)] = int(rng.integers(0, 256))
        elif op == 1:  # insert a token that means something to a parser
            data[pos:pos] = TOKENS[int(rng.integers(0, len(TOKENS)))]
        elif op == 2:  # delete a span
            del data[pos:pos + int(rng.integers(1, 8))]
        elif op == 3:  # truncate
            del data[pos:]
        else:  # repeat a span
            data[pos:pos] = data[pos:pos + int(rng.integers(1, 30))] * int(rng.integers(1, 4))
    return bytes(data)


def check_result(inter: Interactions):
    m = inter.matrix
    assert isinstance(m, sp.csr_matrix) and m.dtype == np.float32 and m.has_canonical_format
    assert np.isfinite(m.data).all() and (m.data > 0).all()
    assert inter.user_ids.shape == (m.shape[0],) and inter.item_ids.shape == (m.shape[1],)
    assert np.unique(inter.user_ids).size == m.shape[0] and np.unique(inter.item_ids).size == m.shape[1]
    assert (np.diff(m.indptr) > 0).all() and (np.bincount(m.indices, minlength=m.shape[1]) > 0).all()


def cases(n_random: int, n_mutations: int):
    rng = np.random.default_rng(20261128)
    for k in range(n_random):
        yield f"random{k}.csv", rng.bytes(int(rng.integers(0, 400)))
    names = list(VALID)
    for k in range(n_mutations):
        name = names[k % len(names)]
        content = mutate(VALID[name], rng)
        if k % 7 == 0:  # compressed, then mutated (a damaged archive) or mutated, then compressed
            content = mutate(gzip.compress(VALID[name]), rng) if k % 2 else gzip.compress(content)
            name += ".gz"
        yield name, content


def test_loaders_on_random_and_mutated_files(tmp_path):
    outcomes = {"ok": 0, "error": 0}
    pool = pa.default_memory_pool()
    arrow_peak_before = pool.max_memory()
    tracemalloc.start()
    try:
        for k, (name, content) in enumerate(cases(n_random=60, n_mutations=300)):
            path = tmp_path / f"{k}-{name}"
            path.write_bytes(content)
            try:
                inter = load_interactions(path)
            except ValueError as exc:  # DataError is a ValueError
                message = str(exc)
                assert message and "\n" not in message, (name, content, message)
                outcomes["error"] += 1
            else:
                check_result(inter)
                outcomes["ok"] += 1
            path.unlink()
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert python_peak < 64 * 2 ** 20  # numpy and Python objects
    assert pool.max_memory() <= max(arrow_peak_before, 64 * 2 ** 20)  # pyarrow's buffers
    assert outcomes["ok"] > 20 and outcomes["error"] > 100, outcomes  # both paths exercised


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_files_behind_the_fuzz_load(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(VALID[name])
    check_result(load_interactions(path))
