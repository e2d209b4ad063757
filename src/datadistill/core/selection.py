"""Threshold policies for pseudo-labels: pure functions returning thresholds and the figures behind them.

``count`` is the paper's rule: the one score threshold that makes the average number of pseudo objects per
unlabeled image equal the average number of labeled objects per labeled image. ``count-per-class`` matches
each class's own average, so that rare classes are not drowned by common ones. ``fixed:T`` keeps scores of
at least ``T``. An object is kept when ``score >= threshold``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

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
