"""Threshold policies on hand-made score lists."""

from __future__ import annotations

import math

import numpy as np
import pytest

from datadistill.core import selection
from datadistill.core.selection import (
    count_threshold,
    keypoint_threshold,
    parse_policy,
    select_count,
    select_count_per_class,
    select_fixed,
)


@pytest.mark.parametrize(
    ("scores", "target", "threshold", "kept"),
    [
        pytest.param([0.9, 0.8, 0.7, 0.6], 2, 0.8, 2, id="exact"),
        pytest.param([0.9, 0.8, 0.7, 0.6], 4, 0.6, 4, id="all"),
        pytest.param([0.9, 0.8, 0.7, 0.6], 9, 0.6, 4, id="more-than-there-are"),
        pytest.param([0.9, 0.8, 0.7, 0.6], 0, math.inf, 0, id="none"),
        pytest.param([], 3, math.inf, 0, id="no-candidates"),
        pytest.param([0.9, 0.5, 0.5, 0.5, 0.1], 3, 0.5, 4, id="tie-nearer-with-it"),
        pytest.param([0.9, 0.5, 0.5, 0.5, 0.1], 2, 0.9, 1, id="tie-nearer-without-it"),
        pytest.param([0.9, 0.7, 0.5, 0.5, 0.1], 3, 0.5, 4, id="tie-equal-distance-keeps"),
        pytest.param([0.5, 0.5, 0.5], 1, 0.5, 3, id="all-tied"),
        pytest.param([0.3, 0.9, 0.1, 0.6, 0.8], 3, 0.6, 3, id="unsorted"),
    ],
)
def test_count_threshold(scores: list[float], target: int, threshold: float, kept: int) -> None:
    t = count_threshold(np.array(scores), target)
    assert t == threshold
    assert int((np.array(scores) >= t).sum()) == kept


def test_count_threshold_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="target count must be >= 0, got -1"):
        count_threshold(np.array([0.5]), -1)
    with pytest.raises(ValueError, match="NaN"):
        count_threshold(np.array([0.5, np.nan]), 1)


def test_count_policy_matches_labeled_mean() -> None:
    # 4 unlabeled images, labeled data has 1.5 objects per image -> 6 objects kept.
    scores = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.65, 0.6, 0.3, 0.2, 0.1])
    labels = np.array([0, 1, 0, 0, 1, 0, 1, 0, 1, 0])
    sel = select_count(scores, labels, num_images=4, per_image=1.5, num_classes=2)
    assert sel.thresholds.tolist() == [0.65, 0.65]
    assert int(sel.keep(scores, labels).sum()) == 6 and sel.achieved.tolist() == [4, 2]


def test_count_per_class_gives_rare_classes_their_share() -> None:
    # Class 1 is rare and scores low: one global threshold would keep none of it.
    scores = np.array([0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.4, 0.3, 0.2])
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1])
    glob = select_count(scores, labels, num_images=2, per_image=3.0, num_classes=2)
    assert glob.achieved.tolist() == [6, 0]
    sel = select_count_per_class(scores, labels, num_images=2, per_image=np.array([2.0, 1.0]), num_classes=2)
    assert sel.thresholds.tolist() == [0.96, 0.3] and sel.achieved.tolist() == [4, 2]
    assert sel.target.tolist() == [4, 2]


def test_fixed_policy() -> None:
    scores = np.array([0.5, 0.49, 0.51])
    sel = select_fixed(scores, np.zeros(3, np.int64), threshold=0.5, num_classes=1)
    assert sel.keep(scores, np.zeros(3, np.int64)).tolist() == [True, False, True]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("count", ("count", None)), ("count-per-class", ("count-per-class", None)), ("fixed:0.7", ("fixed", 0.7))],
)
def test_parse_policy(text: str, expected: tuple[str, float | None]) -> None:
    assert parse_policy(text) == expected


@pytest.mark.parametrize("text", ["fixed:1.5", "fixed:", "top-k", "COUNT"])
def test_parse_policy_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="policy|threshold"):
        parse_policy(text)


def test_bad_labels_rejected() -> None:
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\), got values in \[0, 5\]"):
        select_count(np.array([0.5, 0.6]), np.array([0, 5]), num_images=1, per_image=1.0, num_classes=2)


def test_keypoint_threshold_matches_visible_mean() -> None:
    # 2 instances x 4 keypoints; the labeled data shows 2.5 visible keypoints per instance -> 5 kept.
    kp_scores = np.array([[0.9, 0.8, 0.2, 0.1], [0.7, 0.6, 0.5, 0.05]])
    t = keypoint_threshold(kp_scores, visible_per_instance=2.5)
    assert t == 0.5 and int((kp_scores >= t).sum()) == 5


# ----------------------------------------------------------------------------------------------------
# the count rule in bounded memory (two histogram passes) against count_threshold on the whole array

STREAM_CASES = {
    "uniform": lambda rng, n: rng.random(n).astype(np.float32),
    "few values, many ties": lambda rng, n: rng.choice(np.float32([0.1, 0.3, 0.5, 0.5000001, 0.9]), n),
    "a grid of 20": lambda rng, n: (rng.integers(0, 20, n) / 19).astype(np.float32),
    "negative and positive": lambda rng, n: rng.normal(0, 3, n).astype(np.float32),
    "adjacent float32s in one fine bucket": lambda rng, n: (
        np.float32(0.5) + (rng.integers(-3, 4, n) * np.float32(6e-8)).astype(np.float32)
    ),
    "signed zeros": lambda rng, n: rng.choice(np.float32([-0.0, 0.0, 0.25]), n),
}


@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_streamed_count_thresholds_equal_count_threshold(case):
    rng = np.random.default_rng(list(STREAM_CASES).index(case))
    for _ in range(300):
        n = int(rng.integers(0, 200))
        scores = STREAM_CASES[case](rng, n).astype(np.float64)
        groups_n = int(rng.integers(1, 4))
        groups = rng.integers(0, groups_n, n)
        targets = rng.integers(0, n + 3, groups_n)
        chunk = int(rng.integers(1, 50))

        def chunks(scores=scores, groups=groups, chunk=chunk):
            return ((scores[i : i + chunk], groups[i : i + chunk]) for i in range(0, len(scores), chunk))

        got = selection.count_thresholds_streamed(chunks, targets)
        want = [selection.count_threshold(scores[groups == g], int(targets[g])) for g in range(groups_n)]
        assert got.tolist() == want, (case, targets)


def test_streamed_count_threshold_on_a_million_scores_reads_twice():
    rng = np.random.default_rng(3)
    scores = rng.beta(2, 5, 1_000_000).astype(np.float32).astype(np.float64)
    calls = []

    def chunks():
        calls.append(1)
        return (
            (scores[i : i + 65536], np.zeros(min(65536, len(scores) - i), np.int64))
            for i in range(0, len(scores), 65536)
        )

    got = selection.count_thresholds_streamed(chunks, np.array([123_457]))
    assert got[0] == selection.count_threshold(scores, 123_457)
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        (np.array([0.5, np.nan]), "NaN"),
        (np.array([0.1]), "float32"),  # 0.1 as float64 is not a float32 value: it was not read from a shard
    ],
)
def test_streamed_count_threshold_refuses(scores, message):
    with pytest.raises(ValueError, match=message):
        selection.count_thresholds_streamed(lambda: [(scores, np.zeros(len(scores), np.int64))], np.array([1]))


def test_streamed_count_thresholds_with_many_groups_count_by_distinct_indices():
    """More than 64 groups: the counts are added at their distinct indices, not by a whole-size bincount."""
    rng = np.random.default_rng(7)
    groups_n = 100
    assert groups_n * selection.BUCKETS > selection.SMALL_COUNTS
    scores = (rng.integers(0, 50, 20_000) / 49).astype(np.float32).astype(np.float64)  # ties
    groups = rng.integers(0, groups_n, 20_000)
    targets = rng.integers(0, 260, groups_n)

    def chunks():
        return ((scores[i : i + 3000], groups[i : i + 3000]) for i in range(0, len(scores), 3000))

    got = selection.count_thresholds_streamed(chunks, targets)
    assert got.tolist() == [selection.count_threshold(scores[groups == g], int(targets[g])) for g in range(groups_n)]
