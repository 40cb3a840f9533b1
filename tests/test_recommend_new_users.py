"""Recommendations for new users: histories from a file (with or without ratings), from --items and
from Python, by original item ids; histories the model cannot use are refused, never answered
with the generic list."""
from __future__ import annotations

import csv
import json

import pytest
import scipy.sparse as sp

import recvae_fast
from recvae_fast.cli import build_parser, main

from helpers import write_taste_ratings

# write_taste_ratings: user u likes the 60 items of taste u % 3, items 5000 + [40 t, 40 t + 60)


@pytest.fixture(scope="module")
def ratings_file(tmp_path_factory):
    return write_taste_ratings(tmp_path_factory.mktemp("data") / "ratings.csv", seed=1, min_items=8,
                               ratings=(4.0, 5.0), timestamp=False)


@pytest.fixture(scope="module")
def run(ratings_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", str(ratings_file), "--rating-threshold", "3.5", "--out", str(out), "--epochs", "4",
                 "--lr", "0.005", "--hidden-dim", "32", "--latent-dim", "16", "--batch-size", "64", "--no-progress",
                 "--heldout-users", "30"]) == 0
    return out


def _taste_items(taste: int, n: int) -> list[int]:
    return [5000 + 40 * taste + j for j in range(10, 10 + n)]


def _recs(path) -> dict:
    out = {}
    for r in csv.DictReader(open(path)):
        out.setdefault(r["user"], []).append(int(r["item"]))
    return out


def test_python_two_histories_get_different_recommendations_from_their_tastes(run):
    first, last = _taste_items(0, 8), _taste_items(2, 8)
    recs = recvae_fast.recommend_for_items(run, [first, last, [str(i) for i in first]], k=10, include_seen=True)
    ids = [[item for item, _ in r] for r in recs]
    assert ids[0] != ids[1]
    assert ids[2] == ids[0]  # '5010' finds item 5010
    # The model read the histories: most of each list lies in its taste's items.
    assert sum(5000 <= i < 5060 for i in ids[0]) >= 7 and sum(5080 <= i < 5140 for i in ids[1]) >= 7
    scores = [s for _, s in recs[0]]
    assert scores == sorted(scores, reverse=True) and all(isinstance(s, float) for s in scores)
    # Without include_seen the history's own items never come back.
    for history, rec in zip((first, last), recvae_fast.recommend_for_items(run, [first, last], k=20)):
        assert len(rec) == 20 and not set(history) & {item for item, _ in rec}


def test_python_refuses_unknown_and_empty_histories_by_name(run):
    trained = recvae_fast.load_run(run)
    with pytest.raises(ValueError, match=r"history 1 has item ids the run does not know: 'nope'"):
        recvae_fast.recommend_for_items(trained, [_taste_items(0, 3), [5010, "nope"]], k=5)
    with pytest.raises(ValueError, match=r"history 0 has only item ids the run does not know \(1, 2\)"):
        recvae_fast.recommend_for_items(trained, [[1, 2]], k=5, ignore_unknown=True)
    with pytest.raises(ValueError, match="history 1 has no item ids"):
        recvae_fast.recommend_for_items(trained, [[5010], []], k=5)
    with pytest.raises(ValueError, match="not a list of item ids"):
        recvae_fast.recommend_for_items(trained, ["5010"], k=5)
    skipped = recvae_fast.recommend_for_items(trained, [[5010, "nope"]], k=5, ignore_unknown=True)
    assert skipped == recvae_fast.recommend_for_items(trained, [[5010]], k=5)
    # item_ids maps recommend()'s columns to the original ids.
    matrix = sp.csr_matrix(([1.0], ([0], [trained.items.index(5010)])), shape=(1, len(trained.item_ids)))
    top = recvae_fast.recommend(trained.model, matrix, k=5)
    assert trained.item_ids[top.items[0]].tolist() == [item for item, _ in skipped[0]]


def test_cli_file_without_ratings_is_read_whole_despite_the_runs_threshold(run, tmp_path, capsys):
    """A user,item file (no rating column): the run's --rating-threshold 3.5 does not apply, so no
    item is dropped and two users of other tastes get other recommendations."""
    new = tmp_path / "new_users.csv"
    new.write_text("user_id,item_id\n" + "".join(f"a,{i}\n" for i in _taste_items(0, 6))
                   + "".join(f"b,{i}\n" for i in _taste_items(2, 6)) + "b,999999\nc,5010\nc,999999\n")
    out = tmp_path / "recs.csv"
    assert main(["recommend", str(run), str(new), "--k", "10", "--output", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["users"] == 3 and result["rating_threshold"] is None
    assert result["interactions_at_or_below_threshold"] == 0
    assert result["unknown_items"] == 1 and result["unknown_item_interactions"] == 2  # items vs rows, counted apart
    recs = _recs(out)
    assert recs["a"] != recs["b"] and len(recs["a"]) == 10
    assert sum(5000 <= i < 5060 for i in recs["a"]) >= 7 and sum(5080 <= i < 5140 for i in recs["b"]) >= 7


def test_cli_file_with_ratings_applies_the_runs_threshold_and_refuses_users_left_without_items(run, tmp_path, capsys):
    rated = tmp_path / "rated.csv"
    rated.write_text("userId,movieId,rating\n" + "".join(f"a,{i},5\n" for i in _taste_items(0, 5))
                     + "b,5010,2\nb,5011,3\n")
    out = tmp_path / "recs.csv"
    assert main(["recommend", str(run), str(rated), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("recvae-fast: error: 1 of 2 users have no item the model can use (every item unknown to the run "
                   "or rated at or below --rating-threshold 3.5): 'b'; leave them out, or pass "
                   "--skip-users-without-items")
    assert not out.exists()
    assert main(["recommend", str(run), str(rated), "--output", str(out), "--skip-users-without-items"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["users"] == 1 and result["users_without_items_skipped"] == 1
    assert result["rating_threshold"] == 3.5 and result["interactions_at_or_below_threshold"] == 2
    assert set(_recs(out)) == {"a"}
    # A lower threshold given now keeps b's 3, and b's recommendations leave out both of b's items.
    assert main(["recommend", str(run), str(rated), "--output", str(out), "--rating-threshold", "2.5"]) == 0
    assert not {5010, 5011} & set(_recs(out)["b"])


def test_cli_items_for_one_new_user(run, tmp_path, capsys):
    out = tmp_path / "recs.csv"
    items = ",".join(map(str, _taste_items(2, 6)))
    assert main(["recommend", str(run), "--items", items + ",unknown-id", "--k", "5", "--output", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["users"] == 1 and result["unknown_items"] == 1 and result["unknown_item_ids"] == ["unknown-id"]
    recs = _recs(out)
    want = recvae_fast.recommend_for_items(run, [_taste_items(2, 6)], k=5)[0]
    assert recs == {"new": [item for item, _ in want]}
    assert main(["recommend", str(run), "--items", "x,y", "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip() == ("recvae-fast: error: --items has only item ids the run does not "
                                               "know: x, y; nothing to recommend from")
    assert main(["recommend", str(run), "--items", ",", "--output", str(out)]) == 2
    assert "--items has no item ids" in capsys.readouterr().err
    assert main(["recommend", str(run), str(out), "--items", "5010", "--output", str(tmp_path / "o.csv")]) == 2
    assert "either a data file or --items" in capsys.readouterr().err


def test_recommend_help_tells_where_the_threshold_applies():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["recommend"]
    text = " ".join(sub.format_help().split())
    assert "it applies only to a file with a rating column, never to --items or a file of user,item pairs" in text
    assert "keep every interaction" not in text
