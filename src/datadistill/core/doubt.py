"""How doubtful a labeling is about each candidate and each image: what ``review`` ranks by. Pure functions.

For a fused candidate j with score ``s``, seen by ``a`` of the ``V`` views (the manifest's ``views``), whose
class has the selection threshold ``t``, with the views' score spread ``ss`` and box spread ``bs`` measured
by ``label`` (:mod:`datadistill.core.uncertainty`):

- disagreement ``d = 1 - a / V``: 0 when every view saw the object, ``1 - 1/V`` when one view alone did;
  the views disagree on whether it is there.
- closeness ``c = max(0, 1 - |s - t| / max(t, 1 - t))``: 1 on the threshold, 0 as far from it as a score
  can be (0 for a class without a threshold); a small change of threshold flips whether it is kept.
- score swing ``w = min(1, 2 ss)``: the standard deviation of the views' scores (a view that missed the
  object counting 0) over its largest possible value, 0.5; the views disagree on how sure to be.
- box wander ``b = min(1, bs / 0.1)``: how far the views put the box's edges apart, in units of its size,
  over 0.1 (two views whose boxes just still match, IoU 0.5, are about 0.09 apart); the views disagree on
  where the object is.
- object doubt: the mean of ``d, c, w, b``, in [0, 1]. Shards written before the spreads were measured
  (or by a labeling that did not measure them) hold none: their doubt is ``(d + c) / 2``.

An image's doubt is the largest doubt of its candidates (0 without any): one doubtful object is enough to
send an image to a person, and a crowded image is not preferred for its crowd. Equal doubts are ordered by
the sum of the objects' doubts, then by labeling order.
"""

from __future__ import annotations

import numpy as np

BOX_SPREAD_FULL = 0.1  # the box spread that counts as full doubt (two views matched at IoU 0.5: about 0.09)
FORMULA = (
    "object doubt = mean of the terms measured: 1 - agreement / views; max(0, 1 - |score - t| / max(t, 1 - t)); "
    f"min(1, 2 * score_spread); min(1, box_spread / {BOX_SPREAD_FULL:g}); image doubt = max over its objects "
    "(ties: sum)"
)


def object_doubt(
    scores: np.ndarray,
    agreement: np.ndarray,
    thresholds: np.ndarray,
    *,
    num_views: int,
    score_spread: np.ndarray | None = None,
    box_spread: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate ``[N]``: the doubt (the mean of ``d, c, w, b``) and the closeness ``c`` (see the module
    docstring).

    ``thresholds`` ``[N]`` is the threshold of each candidate's class (``inf``: the class keeps nothing).
    ``score_spread`` and ``box_spread`` ``[N]``: NaN (or None for all) where not measured; such a candidate's
    doubt is the mean of the terms it has.
    """
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    scores = np.asarray(scores, np.float64)
    t = np.asarray(thresholds, np.float64)
    disagreement = np.clip(1.0 - np.asarray(agreement, np.float64) / num_views, 0.0, 1.0)
    finite = np.isfinite(t)
    tf = np.where(finite, t, 0.5)
    closeness = np.where(finite, np.clip(1.0 - np.abs(scores - tf) / np.maximum(tf, 1.0 - tf), 0.0, 1.0), 0.0)
    nan = np.full(len(scores), np.nan)
    swing = np.minimum(1.0, 2.0 * (nan if score_spread is None else np.asarray(score_spread, np.float64)))
    wander = np.minimum(1.0, (nan if box_spread is None else np.asarray(box_spread, np.float64)) / BOX_SPREAD_FULL)
    terms = np.stack([disagreement, closeness, swing, wander])  # [4, N]
    measured = ~np.isnan(terms)
    doubt = np.where(measured, terms, 0.0).sum(axis=0) / measured.sum(axis=0)
    return doubt, closeness


def image_doubts(doubt: np.ndarray, image: np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row ``[R]``: the largest and the sum of its objects' ``doubt`` ``[N]`` (objects on rows ``image``)."""
    image_max = np.zeros(num_rows)
    np.maximum.at(image_max, image, doubt)
    return image_max, np.bincount(image, weights=doubt, minlength=num_rows)


def order_images(image_max: np.ndarray, image_sum: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """The ``ok`` rows, by ``image_max`` (largest first), then ``image_sum``, then row."""
    rows = np.flatnonzero(ok)
    return rows[np.lexsort((rows, -image_sum[rows], -image_max[rows]))]
