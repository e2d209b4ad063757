"""Per-image caps on detections, read from the data: how many objects one image may give.

Every detection library caps its output per image, and COCO's evaluation counts at most 100 detections per
image: torchvision's ``detections_per_img`` (100), Ultralytics' ``max_det``, a DETR-family model's number of
queries (100 for DETR, 300 for RT-DETR). On dense scenes (shelves, tree crowns, cells, crowds) the cap, not
the objects, then decides how many a teacher finds, and a student learns that the missing objects are
background. A cap read from the data is :data:`FACTOR` times the 99th percentile of the labeled set's
objects per image, never below the library's own default (:func:`cap_for`).
Pure arithmetic: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

DEFAULT_MAX_DET = 100  # torchvision's and COCO's detections per image
FACTOR = 2.0  # the cap over the 99th percentile of the labeled objects per image
QUANTILE = 0.99


def objects_quantile(counts: Iterable[int], *, q: float = QUANTILE) -> float:
    """The ``q`` quantile (linear interpolation, numpy's default) of objects per image; 0.0 for no images."""
    values = np.asarray(list(counts), dtype=np.float64)
    if values.size == 0:
        return 0.0
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    return float(np.quantile(values, q))


def cap_for(objects_p99: float, *, default: int = DEFAULT_MAX_DET) -> int:
    """The detections to keep per image: ``FACTOR * objects_p99`` rounded up, never below ``default`` (the
    library's own cap); ``objects_p99`` 0 (unknown) gives ``default``."""
    if not math.isfinite(objects_p99) or objects_p99 < 0:
        raise ValueError(f"objects_p99 must be a finite number >= 0, got {objects_p99}")
    return max(int(default), math.ceil(FACTOR * objects_p99))
