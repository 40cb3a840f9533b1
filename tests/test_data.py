"""Loaders (each layout, thresholds, duplicates, bad input), preprocessing, the
strong-generalisation split and the synthetic dataset."""
from __future__ import annotations

import gzip
import time

import numpy as np
import pytest
import scipy.sparse as sp

from recvae_fast import data
from recvae_fast.data.ids import STRING_IDS
from recvae_fast.data import (
    DataError,
    Interactions,
    load_id_maps,
    load_interactions,
    popularity_scores,
    preprocess,
    split_strong_generalization,
    synthetic_dataset,
)


def write(tmp_path, name: str, content: str):
    path = tmp_path / name
    path.write_text(content)
    return path


def value(inter: Interactions, user, item) -> float:
    return float(inter.matrix[inter.user_index(user), inter.item_index(item)])


# ----------------------------------------------------------------------------- loaders


def test_movielens_ratings_csv(tmp_path):
    path = write(tmp_path, "ratings.csv",
                 "userId,movieId,rating,timestamp\n"
                 "1,10,4.0,964982703\n"
                 "1,20,3.0,964981247\n"
                 "7,10,5.0,964982224\n"
                 "7,10,1.5,964982225\n")  # duplicate pair: summed
    inter = load_interactions(path)
    assert inter.matrix.shape == (2, 2) and inter.matrix.dtype == np.float32
    assert isinstance(inter.matrix, sp.csr_matrix)
    np.testing.assert_array_equal(inter.user_ids, [1, 7])
    np.testing.assert_array_equal(inter.item_ids, [10, 20])
    assert inter.user_ids.dtype == np.int64
    assert value(inter, 1, 10) == 4.0 and value(inter, 1, 20) == 3.0
    assert value(inter, 7, 10) == 6.5
    assert inter.nnz == 3


def test_rating_threshold_keeps_strictly_greater_as_one(tmp_path):
    path = write(tmp_path, "ratings.csv",
                 "userId,movieId,rating,timestamp\n"
                 "1,10,4.0,1\n1,20,3.5,1\n1,30,5,1\n"
                 "2,20,3.0,1\n"  # user 2 keeps nothing: not indexed
                 "3,10,4.5,1\n3,10,4.5,2\n")  # duplicate of a kept pair: still 1
    inter = load_interactions(path, rating_threshold=3.5)
    np.testing.assert_array_equal(inter.user_ids, [1, 3])
    np.testing.assert_array_equal(inter.item_ids, [10, 30])  # item 20 has no rating > 3.5
    np.testing.assert_array_equal(inter.matrix.toarray(), [[1, 1], [1, 0]])


def test_ml100k_u_data(tmp_path):
    path = write(tmp_path, "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t302\t1\t1\n")
    inter = load_interactions(path)
    np.testing.assert_array_equal(inter.user_ids, [186, 196])
    np.testing.assert_array_equal(inter.item_ids, [242, 302])
    assert value(inter, 196, 242) == 3.0 and value(inter, 196, 302) == 1.0
    assert load_interactions(path, rating_threshold=2).nnz == 2
    assert load_interactions(path, fmt="ml-100k").nnz == 3


def test_ml1m_ratings_dat(tmp_path):
    path = write(tmp_path, "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978300275\n")
    inter = load_interactions(path, rating_threshold=3.5)
    np.testing.assert_array_equal(inter.user_ids, [1, 2])
    np.testing.assert_array_equal(inter.item_ids, [1193])
    assert load_interactions(path, fmt="ml-1m").nnz == 3


def test_recbole_inter_with_string_ids(tmp_path):
    path = write(tmp_path, "ml.inter",
                 "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                 "u1\tm9\t4\t881250949\n"
                 "u2\tm9\t2\t891717742\n"
                 "u1\tm3\t5\t1\n")
    inter = load_interactions(path)
    assert inter.user_ids.dtype == STRING_IDS
    np.testing.assert_array_equal(inter.user_ids, ["u1", "u2"])
    np.testing.assert_array_equal(inter.item_ids, ["m3", "m9"])
    assert value(inter, "u1", "m3") == 5.0 and value(inter, "u2", "m9") == 2.0


def test_recbole_inter_without_rating(tmp_path):
    path = write(tmp_path, "x.inter", "user_id:token\titem_id:token\ttimestamp:float\n5\t1\t10\n5\t1\t11\n6\t2\t3\n")
    inter = load_interactions(path)
    np.testing.assert_array_equal(inter.matrix.toarray(), [[1, 0], [0, 1]])  # no rating: 1, duplicates too


def test_headerless_csv_and_two_columns(tmp_path):
    inter = load_interactions(write(tmp_path, "a.csv", "alice,matrix,5\nbob,matrix,3\n"))
    np.testing.assert_array_equal(inter.user_ids, ["alice", "bob"])
    assert value(inter, "bob", "matrix") == 3.0
    inter = load_interactions(write(tmp_path, "b.txt", "1 2\n1 3\n2 2\n1 2\n"))  # whitespace, no rating
    np.testing.assert_array_equal(inter.matrix.toarray(), [[1, 1], [1, 0]])


def test_explicit_columns_separator_and_header(tmp_path):
    path = write(tmp_path, "events.txt", "when;item;who;stars\n1;a;x;2\n2;b;x;4\n3;a;y;1\n")
    inter = load_interactions(path, user_col="who", item_col="item", rating_col="stars")
    np.testing.assert_array_equal(inter.user_ids, ["x", "y"])
    assert value(inter, "x", "b") == 4.0
    inter = load_interactions(path, sep=";", user_col=2, item_col=1, rating_col=3, has_header=True)
    assert value(inter, "y", "a") == 1.0
    # by index on a headerless file
    path = write(tmp_path, "plain.tsv", "9\t1\t100\n9\t2\t101\n")
    inter = load_interactions(path, user_col=2, item_col=0, has_header=False)
    np.testing.assert_array_equal(inter.user_ids, [100, 101])
    inter = load_interactions(path, has_header=False, rating_col=False)
    assert (inter.matrix.data == 1).all()
    inter = load_interactions(path, user_col=2, item_col=0, has_header=False, rating_col="none")
    np.testing.assert_array_equal(inter.user_ids, [100, 101])


def test_gzip_crlf_blank_lines_and_spaces(tmp_path):
    path = tmp_path / "ratings.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("userId, movieId, rating, timestamp\r\n1, 10, 4.0, 1\r\n\r\n2, 10, 5.0, 2\r\n   \r\n")
    inter = load_interactions(path)
    np.testing.assert_array_equal(inter.user_ids, [1, 2])
    np.testing.assert_array_equal(inter.matrix.toarray().ravel(), [4, 5])


def test_quoted_csv(tmp_path):
    inter = load_interactions(write(tmp_path, "q.csv", 'user,item,rating\n"a, b",x,1\n"c",x,2\n'))
    np.testing.assert_array_equal(inter.user_ids, ["a, b", "c"])


def test_ids_are_ints_only_when_exact(tmp_path):
    inter = load_interactions(write(tmp_path, "z.csv", "user,item\n007,1\n7,1\n-3,2\n"))
    # '007' and '7' are different users: kept as strings
    assert inter.user_ids.dtype == STRING_IDS and set(inter.user_ids) == {"007", "7", "-3"}
    assert inter.item_ids.dtype == np.int64


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "name, content, kwargs, words",
    [
        ("a.csv", "a,b,c\n1,2,3\n", {"user_col": "user"}, ["user column 'user' not found", "'a', 'b', 'c'"]),
        ("a.csv", "a,b,c\n1,2,3\n", {}, ["no user column", "'a', 'b', 'c'", "user_col"]),
        ("a.csv", "userId,movieId,stars\n1,2,3\n", {"rating_col": "rating"}, ["rating column 'rating'"]),
        ("a.csv", "1,2,3\n", {"user_col": "user"}, ["no header", "index"]),
        ("a.csv", "userId,movieId,rating\n1,2,4\n1,3,abc\n", {}, ["unparsable rating 'abc'", "line 3"]),
        ("a.csv", "userId,movieId,rating\n1,2,nan\n", {}, ["non-finite", "'nan'", "line 2"]),
        ("a.csv", "userId,movieId,rating\n1,2,inf\n", {}, ["non-finite", "finite"]),
        ("a.csv", "userId,movieId,rating\n1,2,1\n1,3,1\n", {"rating_threshold": 3.5}, ["empty", "> 3.5"]),
        ("a.csv", "userId,movieId,rating\n", {}, ["empty", "no data rows"]),
        ("a.csv", "", {}, ["empty"]),
        ("a.csv", "userId,movieId,rating\n1,2,3\n1,2\n", {}, ["line 3", "2 field(s)", "expected 3"]),
        ("a.csv", "userId,movieId,rating\n1,2,-1\n", {}, ["negative rating", "line 2"]),
        ("a.csv", "userId,movieId\n1,2\n", {"rating_threshold": 3.5}, ["no rating column"]),
        ("a.csv", "userId,movieId\n1,\n", {}, ["empty item id", "line 2"]),
        ("a.csv", "userId,movieId\n1,2\n", {"fmt": "xlsx"}, ["unknown fmt"]),
        ("a.csv", "userId,movieId\n1,2\n", {"fmt": "parquet"}, ["a.csv", "not a readable Parquet file"]),
    ],
)
def test_bad_input_raises_one_clear_data_error(tmp_path, name, content, kwargs, words):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as info:
        load_interactions(path, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_interactions(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="directory"):
        load_interactions(tmp_path)


# ----------------------------------------------------------------------------- id maps


def test_id_lookups_and_persistence(tmp_path):
    inter = Interactions(sp.csr_matrix(np.eye(3)), np.array([30, 10, 20]), np.array(["x", "y", "z"]))
    np.testing.assert_array_equal(inter.user_index([10, 20, 30]), [1, 2, 0])
    assert inter.user_index("20") == 2  # a string that is an int id
    np.testing.assert_array_equal(inter.item_index(["z", "nope"], strict=False), [2, -1])
    with pytest.raises(DataError, match="unknown item id"):
        inter.item_index(["nope"])
    assert inter.user_to_index == {30: 0, 10: 1, 20: 2}
    assert inter.item_to_index["y"] == 1

    inter.save_id_maps(tmp_path / "ids.json")
    users, items = load_id_maps(tmp_path / "ids.json")
    np.testing.assert_array_equal(users, inter.user_ids)
    np.testing.assert_array_equal(items, inter.item_ids)
    assert users.dtype == np.int64 and items.dtype == STRING_IDS

    inter.save(tmp_path / "inter.npz")
    back = Interactions.load(tmp_path / "inter.npz")
    assert (back.matrix != inter.matrix).nnz == 0
    np.testing.assert_array_equal(back.item_ids, inter.item_ids)
    with pytest.raises(DataError, match="not found"):
        load_id_maps(tmp_path / "none.json")


def test_interactions_checks_id_lengths():
    with pytest.raises(ValueError, match="user_ids"):
        Interactions(sp.csr_matrix((2, 3)), np.arange(3), np.arange(3))


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_drops_light_users_and_unused_items():
    rows = [[0, 1, 2, 3, 4], [0, 1, 2, 3], [5, 6, 7, 8, 9, 0]]
    m = sp.csr_matrix((np.ones(15), ([u for u, r in enumerate(rows) for _ in r], sum(rows, []))), shape=(3, 11))
    inter = Interactions(m, np.array([100, 200, 300]), np.arange(11) + 1000)
    out = preprocess(inter, min_items_per_user=5)
    np.testing.assert_array_equal(out.user_ids, [100, 300])
    np.testing.assert_array_equal(out.item_ids, np.arange(10) + 1000)  # item 1010 unused
    assert out.nnz == 11
    assert preprocess(inter, min_items_per_user=4).n_users == 3
    # items with < 2 users dropped first, then users: 100 keeps {0}, 200 keeps {0}, 300 keeps {0}
    assert preprocess(inter, min_items_per_user=1, min_users_per_item=3).n_items == 1
    with pytest.raises(DataError, match="no user has >= 7 items"):
        preprocess(inter, min_items_per_user=7)


# ----------------------------------------------------------------------------- split


@pytest.fixture(scope="module")
def small():
    return preprocess(synthetic_dataset(n_users=1200, n_items=400, seed=3))


def rows_of(m: sp.csr_matrix, r: int) -> set:
    return set(m.indices[m.indptr[r]:m.indptr[r + 1]].tolist())


def test_split_invariants(small):
    split = split_strong_generalization(small, n_heldout_users=150, seed=0)
    users = [split.train_user_ids, split.valid_user_ids, split.test_user_ids]
    assert [len(u) for u in users] == [900, 150, 150]
    all_users = np.concatenate(users)
    assert len(set(all_users.tolist())) == small.n_users  # disjoint and complete

    # items: exactly those seen in training, in original order
    train_items = set(small.item_ids[np.unique(small.matrix[small.user_index(split.train_user_ids)].indices)].tolist())
    assert set(split.item_ids.tolist()) == train_items
    assert (np.diff(np.searchsorted(small.item_ids, split.item_ids)) > 0).all()
    assert (np.bincount(split.train.indices, minlength=split.n_items) > 0).all()
    col_of = {item: c for c, item in enumerate(split.item_ids.tolist())}

    total_in = total_out = 0
    for ids, fold_in, heldout in ((split.valid_user_ids, split.valid_in, split.valid_out),
                                  (split.test_user_ids, split.test_in, split.test_out)):
        assert fold_in.shape == heldout.shape == (len(ids), split.n_items)
        for r, user in enumerate(ids.tolist()):
            orig = small.matrix[small.user_index(user)]
            expected = {col_of[i] for i in small.item_ids[orig.indices].tolist() if i in col_of}
            a, b = rows_of(fold_in, r), rows_of(heldout, r)
            assert a | b == expected and not a & b
            n = len(expected)
            assert len(b) == (int(0.2 * n) if n >= 5 else 0)
            assert len(a) >= 1 or n == 0
            total_in, total_out = total_in + len(a), total_out + len(b)
    assert 0.17 < total_out / (total_in + total_out) <= 0.2

    # train rows are the training users' rows restricted to the split's items
    expected_train = small.matrix[small.user_index(split.train_user_ids)][:, small.item_index(split.item_ids)]
    assert (split.train != expected_train).nnz == 0


def test_split_is_seeded(small):
    a = split_strong_generalization(small, n_heldout_users=100, seed=5)
    b = split_strong_generalization(small, n_heldout_users=100, seed=5)
    c = split_strong_generalization(small, n_heldout_users=100, seed=6)
    for name in ("train", "valid_in", "valid_out", "test_in", "test_out"):
        assert (getattr(a, name) != getattr(b, name)).nnz == 0
    np.testing.assert_array_equal(a.test_user_ids, b.test_user_ids)
    assert not np.array_equal(a.test_user_ids, c.test_user_ids)


def test_split_with_few_items_and_values_kept():
    # users 0-3 train; held-out users have 6, 4 and 3 items (one item unseen in training)
    rows = [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3], [3, 4, 5], [0, 5],
            [0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 6], [0, 1, 2, 3, 4, 5]]
    rng = np.random.default_rng(0)
    vals = rng.integers(1, 5, sum(map(len, rows))).astype(float)
    m = sp.csr_matrix((vals, ([u for u, r in enumerate(rows) for _ in r], sum(rows, []))), shape=(7, 7))
    inter = Interactions(m, np.arange(7), np.arange(7))
    split = split_strong_generalization(inter, n_heldout_users=1, seed=1, heldout_fraction=0.5)
    assert split.n_items in (6, 7)
    for fold_in, heldout in ((split.valid_in, split.valid_out), (split.test_in, split.test_out)):
        n = fold_in[0].nnz + heldout[0].nnz
        assert heldout[0].nnz == (n // 2 if n >= 5 else 0)
        # values survive the split
        both = (fold_in + heldout).toarray()[0]
        user = inter.user_index(split.valid_user_ids[0] if fold_in is split.valid_in else split.test_user_ids[0])
        orig = inter.matrix[user][:, inter.item_index(split.item_ids)].toarray()[0]
        np.testing.assert_array_equal(both, orig)


def test_split_accepts_a_bare_matrix(small):
    split = split_strong_generalization(small.matrix, n_heldout_users=50, seed=0)
    assert split.train_user_ids.dtype == np.int64 and len(split.test_user_ids) == 50
    assert split.item_ids.max() < small.n_items


def test_split_rejects_too_many_heldout_users(small):
    with pytest.raises(DataError, match="no training user"):
        split_strong_generalization(small, n_heldout_users=small.n_users // 2, seed=0)
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_strong_generalization(small, n_heldout_users=10, heldout_fraction=1.0)


def _row_sets(m: sp.csr_matrix) -> list:
    rows = (slice(m.indptr[r], m.indptr[r + 1]) for r in range(m.shape[0]))
    return [frozenset(zip(m.indices[row].tolist(), m.data[row].tolist())) for row in rows]


def test_cross_validation_folds_partition_the_non_test_users(small):
    split = split_strong_generalization(small, n_heldout_users=150, seed=0)
    # The non-test users' whole rows (items and values), as the folds must see them.
    pool = _row_sets(split.train) + _row_sets(split.valid_in + split.valid_out)
    test_rows = set(_row_sets(split.test_in + split.test_out))
    n_pool, n_folds = len(pool), 7  # 1050 users: folds of 150, not a multiple of anything
    seen_valid = []
    for fold in range(n_folds):
        f = data.cross_validation_fold(split, fold, n_folds, seed=3)
        assert f.train.shape[1] == f.valid_in.shape[1] == f.valid_out.shape[1] == split.n_items
        assert f.valid_in.shape == f.valid_out.shape and f.train.has_canonical_format
        valid = _row_sets(f.valid_in + f.valid_out)
        assert f.train.shape[0] + len(valid) == n_pool and len(valid) in (n_pool // n_folds, n_pool // n_folds + 1)
        # every row is one of the pool's (no test user), train and validation rows together are the pool
        assert sorted(_row_sets(f.train) + valid, key=sorted) == sorted(pool, key=sorted)
        assert not (set(valid) | set(_row_sets(f.train))) & (test_rows - set(pool))
        # each validation user: fold-in and held-out parts as the split makes them
        for r in range(f.valid_in.shape[0]):
            a, b = rows_of(f.valid_in, r), rows_of(f.valid_out, r)
            n = len(a) + len(b)
            assert not a & b and len(b) == (int(0.2 * n) if n >= 5 else 0) and (len(a) >= 1 or n == 0)
        seen_valid += valid
        # the same arguments, the same fold
        again = data.cross_validation_fold(split, fold, n_folds, seed=3)
        for name in ("train", "valid_in", "valid_out"):
            assert (getattr(f, name) != getattr(again, name)).nnz == 0
    # the folds' validation users partition the pool
    assert sorted(seen_valid, key=sorted) == sorted(pool, key=sorted)
    # another seed, another partition
    first, other = (data.cross_validation_fold(split, 0, n_folds, seed=seed) for seed in (3, 4))
    assert set(_row_sets(first.valid_in + first.valid_out)) != set(_row_sets(other.valid_in + other.valid_out))


@pytest.mark.parametrize("fold, n_folds, message", [(0, 1, "n_folds must be an integer >= 2"),
                                                    (-1, 3, "fold must be an integer >= 0"),
                                                    (3, 3, "fold 3 of 3: needs fold < n_folds"),
                                                    (0, True, "n_folds must be an integer"),
                                                    (0, 10_000, "fold 0 of 10000: needs")])
def test_cross_validation_fold_refuses_bad_counts(small, fold, n_folds, message):
    split = split_strong_generalization(small, n_heldout_users=150, seed=0)
    with pytest.raises(ValueError, match=message):
        data.cross_validation_fold(split, fold, n_folds, seed=0)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_default_is_deterministic_and_shaped():
    start = time.perf_counter()
    a = synthetic_dataset()
    elapsed = time.perf_counter() - start
    b = synthetic_dataset()
    assert elapsed < 5.0  # < 0.5 s on a laptop core; generous for loaded CI machines
    assert (a.matrix != b.matrix).nnz == 0
    assert a.matrix.shape == (8000, 3000) and a.matrix.dtype == np.float32
    assert (a.matrix.data == 1).all()
    counts = np.diff(a.matrix.indptr)
    assert counts.min() >= 5 and 30 <= counts.mean() <= 80
    assert (counts <= 10).sum() > 100 and (counts >= 200).sum() > 20
    # power-law popularity: the top 10% of items hold a large share, yet every item is used
    pop = np.sort(popularity_scores(a.matrix))[::-1]
    assert pop[: len(pop) // 10].sum() > 0.35 * pop.sum()
    assert pop[-1] > 0
    assert preprocess(a).n_users == a.n_users


def test_synthetic_seeds_and_sizes():
    a = synthetic_dataset(n_users=300, n_items=120, seed=1)
    b = synthetic_dataset(n_users=300, n_items=120, seed=2)
    assert a.matrix.shape == b.matrix.shape == (300, 120)
    assert (a.matrix != b.matrix).nnz > 0
    np.testing.assert_array_equal(a.user_ids, np.arange(300))


def test_synthetic_tastes_beat_popularity():
    """Planted structure: a user's fold-in predicts their held-out items far better than global
    popularity does (item-item co-occurrence vs most-popular, on the held-out users)."""
    from recvae_fast.metrics import popularity_baseline, popularity_ranking, ranking_metrics

    inter = synthetic_dataset(n_users=2000, n_items=600, seed=0)
    split = split_strong_generalization(inter, n_heldout_users=200, seed=0)
    pop = popularity_baseline(split.train, split.test_in, split.test_out)
    x = (split.train > 0).astype(np.float64)
    cooc = (x.T @ x).toarray()
    np.fill_diagonal(cooc, 0)
    cooc /= np.maximum(cooc.sum(axis=0, keepdims=True), 1)  # damp popular items
    scores = split.test_in @ cooc
    scores[split.test_in.toarray() > 0] = -np.inf
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :100]
    knn = ranking_metrics(ranked, split.test_out)
    assert 0.05 < pop["ndcg@100"] < knn["ndcg@100"] - 0.05
    assert popularity_ranking(popularity_scores(split.train), split.test_in, 5).shape == (200, 5)


def test_popularity_scores():
    m = sp.csr_matrix(np.array([[1, 0, 2], [1, 0, 0], [0, 0, 5.0]]))
    np.testing.assert_array_equal(popularity_scores(m), [2, 0, 2])
    assert data.popularity_scores(sp.csr_matrix((2, 4))).shape == (4,)


@pytest.mark.parametrize("sep", [",", "::", "whitespace"])
def test_big_files_are_read_in_blocks_with_the_same_result(tmp_path, monkeypatch, sep):
    rng = np.random.default_rng(0)
    join = {"whitespace": " \t "}.get(sep, sep)
    rows = [join.join(map(str, (rng.integers(1, 30), rng.integers(1, 50), rng.integers(1, 6), k))) for k in range(400)]
    rows[150] = ""  # a blank line
    rows[390] = join.join(["x9", "7", "5", "1"])  # a string user id only in the last block: every id becomes a string
    header = join.join(["userId", "movieId", "rating", "timestamp"])
    path = write(tmp_path, "ratings.txt", "\n\n" + header + "\r\n" + "\n".join(rows) + "\n")
    whole = load_interactions(path, rating_threshold=2)
    monkeypatch.setattr(data.readers, "_BLOCK_BYTES", 64)  # pyarrow blocks of a few lines
    monkeypatch.setattr(data.readers, "_SCAN_CHUNK", 7)  # lines and separators cut across reads
    blocks = load_interactions(path, rating_threshold=2)
    assert (whole.matrix != blocks.matrix).nnz == 0
    np.testing.assert_array_equal(whole.user_ids, blocks.user_ids)
    np.testing.assert_array_equal(whole.item_ids, blocks.item_ids)
    assert whole.user_ids.dtype == STRING_IDS and "x9" in set(whole.user_ids.tolist())
    assert whole.item_ids.dtype == np.int64
    assert whole.nnz == len({(r.split()[0] if sep == "whitespace" else r.split(sep)[0],
                              r.split()[1] if sep == "whitespace" else r.split(sep)[1])
                             for r in rows if r and int((r.split() if sep == "whitespace" else r.split(sep))[2]) > 2})
    # line numbers stay right across blocks and blank lines (header on line 3, rows[k] on line k + 4)
    rows[300] = join.join(["1", "2", "oops", "3"])
    path = write(tmp_path, "bad.txt", "\n\n" + header + "\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match="'oops' .* line 304 of bad.txt"):
        load_interactions(path)
    rows[300] = join.join(["1", "2", "1e39", "3"])
    path = write(tmp_path, "huge.txt", "\n\n" + header + "\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match="1e.39 .* line 304 of huge.txt is beyond the float32 range"):
        load_interactions(path)
