"""Threshold policies for pseudo-labels: pure functions returning thresholds and the figures behind them.

``count`` is the paper's rule: the one score threshold that makes the average number of pseudo objects per
unlabeled image equal the average number of labeled objects per labeled image. ``count-per-class`` matches
each class's own average, so that rare classes are not drowned by common ones. ``fixed:T`` keeps scores of
at least ``T``. An object is kept when ``score >= threshold``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

POLICIES = ("count", "count-per-class", "fixed:T")


@dataclass(frozen=True)
class Selection:
    """Per-class thresholds and the counts behind them.

    thresholds ``[C]``: keep an object of class c when its score >= thresholds[c] (``inf`` keeps none).
    target ``[C]`` and achieved ``[C]``: object counts over the unlabeled images (target is None for
    ``fixed``).
    """

    policy: str
    thresholds: np.ndarray
    target: np.ndarray | None
    achieved: np.ndarray

    def keep(self, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Boolean mask of kept objects."""
        return scores >= self.thresholds[labels]


def count_threshold(scores: np.ndarray, target: int) -> float:
    """The score threshold that keeps ``target`` of ``scores`` (those >= it), or as close as ties allow.

    With ties at the boundary the count that lands nearer the target wins (keeping the tie on an equal
    distance). ``target == 0`` gives ``inf`` (keep nothing); a target above ``len(scores)`` keeps all.
    """
    if target < 0:
        raise ValueError(f"target count must be >= 0, got {target}")
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if target == 0 or scores.size == 0:
        return math.inf
    if target >= scores.size:
        return float(scores.min())
    ordered = np.sort(scores)[::-1]
    t = ordered[target - 1]
    with_tie = int((scores >= t).sum())  # >= target
    above = ordered[ordered > t]
    without_tie = above.size  # < target
    if without_tie > 0 and (target - without_tie) < (with_tie - target):
        return float(above.min())
    return float(t)


def select_count(
    scores: np.ndarray, labels: np.ndarray, *, num_images: int, per_image: float, num_classes: int
) -> Selection:
    """The paper's rule: one threshold for all classes, ``per_image * num_images`` objects in all."""
    _check_inputs(scores, labels, num_images, num_classes)
    target = int(round(per_image * num_images))
    t = count_threshold(scores, target)
    thresholds = np.full(num_classes, t)
    achieved = np.bincount(labels[scores >= t], minlength=num_classes)
    return Selection("count", thresholds, np.array([target]), achieved)


def select_count_per_class(
    scores: np.ndarray, labels: np.ndarray, *, num_images: int, per_image: np.ndarray, num_classes: int
) -> Selection:
    """One threshold per class, each matching that class's mean count per labeled image."""
    _check_inputs(scores, labels, num_images, num_classes)
    per_image = np.asarray(per_image, dtype=np.float64)
    if per_image.shape != (num_classes,):
        raise ValueError(f"per_image must have shape [{num_classes}], got {per_image.shape}")
    targets = np.round(per_image * num_images).astype(np.int64)
    thresholds = np.array([count_threshold(scores[labels == c], int(targets[c])) for c in range(num_classes)])
    achieved = np.array([int((scores[labels == c] >= thresholds[c]).sum()) for c in range(num_classes)])
    return Selection("count-per-class", thresholds, targets, achieved)


def select_fixed(scores: np.ndarray, labels: np.ndarray, *, threshold: float, num_classes: int) -> Selection:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"fixed threshold must be in [0, 1], got {threshold}")
    _check_inputs(scores, labels, 1, num_classes)
    achieved = np.bincount(labels[scores >= threshold], minlength=num_classes)
    return Selection(f"fixed:{threshold:g}", np.full(num_classes, float(threshold)), None, achieved)


def parse_policy(text: str) -> tuple[str, float | None]:
    """``count``, ``count-per-class`` or ``fixed:T`` -> (name, T)."""
    if text in ("count", "count-per-class"):
        return text, None
    m = re.fullmatch(r"fixed:([0-9]*\.?[0-9]+)", text)
    if m:
        t = float(m.group(1))
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"fixed threshold must be in [0, 1], got {t}")
        return "fixed", t
    raise ValueError(f"unknown policy {text!r}: choose count, count-per-class or fixed:T (T in [0, 1])")


def parse_keypoint_policy(text: str) -> float | None:
    """``count`` -> 1.0, ``count:F`` -> F (mark F times the labeled mean of keypoints visible, the most
    confident ones), ``all`` -> None (every keypoint of a kept object)."""
    if text == "all":
        return None
    if text == "count":
        return 1.0
    m = re.fullmatch(r"count:([0-9]*\.?[0-9]+)", text)
    if m and 0.0 < float(m.group(1)) <= 1.0:
        return float(m.group(1))
    raise ValueError(f"must be count, count:F (F in (0, 1]) or all, got {text!r}")


def keypoint_threshold(keypoint_scores: np.ndarray, *, visible_per_instance: float) -> float:
    """The keypoint score threshold that makes the mean number of visible keypoints per pseudo instance
    equal ``visible_per_instance`` (the labeled data's mean). ``keypoint_scores`` is ``[N, K]``.

    The paper matched the average number of labeled keypoints in the same way it matched the objects.
    """
    n, k = keypoint_scores.shape if keypoint_scores.ndim == 2 else (0, 0)
    if n == 0:
        return math.inf
    return count_threshold(keypoint_scores.reshape(-1), int(round(visible_per_instance * n)))


def _check_inputs(scores: np.ndarray, labels: np.ndarray, num_images: int, num_classes: int) -> None:
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores and labels must be 1-d of equal length, got {scores.shape} and {labels.shape}")
    if num_images <= 0:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got values in [{labels.min()}, {labels.max()}]")


# ----------------------------------------------------------------------------------------------------
# the count rule in bounded memory: exact thresholds from two histograms over float32 score bits
#
# A float32 score's bits, mapped to a uint32 key that sorts as the scores do (:func:`float32_keys`), split
# into a coarse part (the top 16 bits) and a fine part (the low 16). A first pass over the scores counts the
# coarse buckets of each group; the target-th largest score lies in one known bucket. A second pass counts
# that bucket's fine values, each of which is one float32 value, so the counts of every distinct score near
# the boundary are exact and :func:`count_threshold`'s answer follows without holding the scores: memory is
# 65,536 counters per group and pass, whatever the number of scores.

FINE_BITS = 16
BUCKETS = 1 << (32 - FINE_BITS)
SMALL_COUNTS = 64 * BUCKETS  # counters that a bincount may fill whole on each call (32 MiB)


def float32_keys(scores: np.ndarray) -> np.ndarray:
    """``[N]`` uint32 keys that order as the float32 ``scores`` do (``-0.0`` as ``0.0``). A ValueError
    for NaN or for a value that is not a float32 (scores are float32 in the label shards)."""
    values = np.asarray(scores)
    single = values.astype(np.float32)
    if np.isnan(single).any():
        raise ValueError("scores contain NaN")
    if values.dtype != np.float32 and not np.array_equal(single.astype(values.dtype), values):
        raise ValueError("scores must be float32 values to be counted in bounded memory")
    bits = (single + np.float32(0.0)).view(np.uint32)  # -0.0 + 0.0 is 0.0
    return np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(1 << 31)).astype(np.uint32)


def _key_value(key: int) -> float:
    bits = key ^ (1 << 31) if key >> 31 else ~key & 0xFFFFFFFF
    return float(np.array([bits], np.uint32).view(np.float32)[0])


@dataclass
class ScoreCounts:
    """What one pass over the scores of ``G`` groups leaves: ``total`` ``[G]``, ``minimum`` ``[G]`` (inf for
    an empty group), ``coarse`` ``[G, 65536]`` counts by the keys' top 16 bits and, on a second pass
    (:meth:`add` with ``buckets``), for the groups with a bucket (``buckets[g] >= 0``), ``fine`` ``[R, 65536]``
    the counts by the low 16 bits inside it (row ``rows[g]``) and ``min_above`` ``[G]`` the smallest score in
    a higher bucket. Counts are added where they fall (no ``[G, 65536]`` temporary per call). Mutable: it
    accumulates."""

    num_groups: int
    buckets: np.ndarray | None = None
    total: np.ndarray = field(init=False)
    minimum: np.ndarray = field(init=False)
    coarse: np.ndarray = field(init=False)
    rows: np.ndarray = field(init=False)
    fine: np.ndarray = field(init=False)
    min_above: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        g = self.num_groups
        self.total, self.minimum = np.zeros(g, np.int64), np.full(g, np.inf)
        self.coarse = np.zeros((g if self.buckets is None else 0, BUCKETS), np.int64)
        self.rows = np.full(g, -1, np.int64)
        if self.buckets is not None:
            refined = np.flatnonzero(self.buckets >= 0)
            self.rows[refined] = np.arange(len(refined))
        self.fine = np.zeros((int((self.rows >= 0).sum()), BUCKETS), np.int64)
        self.min_above = np.full(g, np.inf)

    def add(self, scores: np.ndarray, groups: np.ndarray) -> None:
        """Count ``scores`` ``[N]`` (float32 values) of ``groups`` ``[N]`` (ints in ``[0, G)``)."""
        if scores.size == 0:
            return
        keys = float32_keys(scores)
        groups = np.asarray(groups, np.int64)
        if self.buckets is None:
            self.total += np.bincount(groups, minlength=self.num_groups)
            np.minimum.at(self.minimum, groups, np.asarray(scores, np.float64))
            _count_into(self.coarse, groups * BUCKETS + (keys >> FINE_BITS))
            return
        bucket = (keys >> FINE_BITS).astype(np.int64)
        mine = self.buckets[groups]
        inside = (bucket == mine) & (mine >= 0)
        _count_into(self.fine, self.rows[groups[inside]] * BUCKETS + (keys[inside] & (BUCKETS - 1)))
        higher = (bucket > mine) & (mine >= 0)
        np.minimum.at(self.min_above, groups[higher], np.asarray(scores, np.float64)[higher])


def _count_into(counts: np.ndarray, flat: np.ndarray) -> None:
    """Add one to ``counts`` (any shape, C order) at each flat index of ``flat``: by a bincount of its size
    for a few groups, by the distinct indices for many (no temporary of 64 groups' counters or more)."""
    if counts.size <= SMALL_COUNTS:
        counts.reshape(-1)[:] += np.bincount(flat, minlength=counts.size)
        return
    where, how_many = np.unique(flat, return_counts=True)
    counts.reshape(-1)[where] += how_many


def boundary_buckets(first: ScoreCounts, targets: np.ndarray) -> np.ndarray:
    """``[G]`` the coarse bucket holding each group's ``targets[g]``-th largest score, -1 where no second
    pass is needed (a target of 0, or at least the group's size)."""
    out = np.full(first.num_groups, -1, np.int64)
    for g in range(first.num_groups):
        target = int(targets[g])
        if 0 < target < first.total[g]:
            from_top = np.cumsum(first.coarse[g, ::-1])
            out[g] = BUCKETS - 1 - int(np.searchsorted(from_top, target, side="left"))
    return out


def thresholds_from_counts(first: ScoreCounts, second: ScoreCounts | None, targets: np.ndarray) -> np.ndarray:
    """``[G]``: for each group, :func:`count_threshold` of its scores and ``targets[g]``, from the counts of
    the first and second passes (``second`` may be None when :func:`boundary_buckets` needs none)."""
    out = np.empty(first.num_groups)
    for g in range(first.num_groups):
        target, total = int(targets[g]), int(first.total[g])
        if target < 0:
            raise ValueError(f"target count must be >= 0, got {target}")
        if target == 0 or total == 0:
            out[g] = math.inf
        elif target >= total:
            out[g] = float(first.minimum[g])
        else:
            assert second is not None and second.buckets is not None
            out[g] = _boundary_threshold(first, second, g, target)
    return out


def _boundary_threshold(first: ScoreCounts, second: ScoreCounts, g: int, target: int) -> float:
    bucket = int(second.buckets[g])  # type: ignore[index]
    above_bucket = int(first.coarse[g, bucket + 1 :].sum())
    fine = second.fine[second.rows[g]]
    from_top = above_bucket + np.cumsum(fine[::-1])
    sub = BUCKETS - 1 - int(np.searchsorted(from_top, target, side="left"))
    t = _key_value((bucket << FINE_BITS) | sub)
    with_tie = int(from_top[BUCKETS - 1 - sub])
    without_tie = with_tie - int(fine[sub])
    if without_tie > 0 and (target - without_tie) < (with_tie - target):
        higher = np.flatnonzero(fine[sub + 1 :])
        return (
            _key_value((bucket << FINE_BITS) | (sub + 1 + int(higher[0])))
            if higher.size
            else float(second.min_above[g])
        )
    return t


def count_thresholds_streamed(
    chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    targets: np.ndarray | Callable[[ScoreCounts], np.ndarray],
    *,
    num_groups: int | None = None,
) -> np.ndarray:
    """``[G]`` per group, :func:`count_threshold` of its scores and ``targets[g]``, exactly, in bounded
    memory: ``chunks()`` yields ``(scores [n], groups [n])`` and is called once or twice (two passes).
    ``targets`` may be a function of the first pass's counts (a target that depends on how many scores there
    are), with ``num_groups`` then given."""
    first = ScoreCounts(len(targets) if num_groups is None else num_groups)  # type: ignore[arg-type]
    for scores, groups in chunks():
        first.add(scores, groups)
    targets = np.asarray(targets(first) if callable(targets) else targets, np.int64)
    buckets = boundary_buckets(first, targets)
    second = None
    if (buckets >= 0).any():
        second = ScoreCounts(first.num_groups, buckets=buckets)
        for scores, groups in chunks():
            second.add(scores, groups)
    return thresholds_from_counts(first, second, targets)
