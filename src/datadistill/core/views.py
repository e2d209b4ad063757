"""The views of multi-transform inference (step 2 of data distillation) and their exact inverses.

A :class:`View` is a horizontal flip, a scale, or both. ``prepare`` turns an image into the view's input,
``invert`` maps the view's predictions back to the original image frame.

Scales are *not* applied to the image: torchvision detectors resize every input so that its short side
is ``min_size`` (capped by ``max_size``), which would undo any resize we made. A scale view instead runs
the model with ``min_size * scale`` and ``max_size * scale`` (see :func:`datadistill.models.torchvision.input_size`),
and the model's own post-processing maps boxes back to the input frame. Only the flip needs inverting.

Coordinates are continuous pixels: a pixel ``i`` covers ``[i, i + 1)``, so a flip maps ``x`` to
``width - x`` for box corners and keypoints alike.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from datadistill.core.types import Detections

# The paper's 18 views: short side 400 to 1200 in steps of 100 (relative to 800), each with and without flip.
PAPER_SCALES = tuple(s / 800 for s in range(400, 1201, 100))
# Our CPU default keeps the paper's structure (every scale with and without flip) with four of its scales,
# 0.75 to 1.5: scales below 0.75 lose small objects at 128 px inputs, and each scale costs a forward pass.
# Measured against held-back labels on the tuning seed of bench/accuracy.py (see the README): adding 1.5 to
# 0.75-1.25 raised the box pseudo-labels' AP from 49.4 to 53.4 (precision at the count rule 61.0% -> 64.2%)
# and the keypoint pseudo-labels' keypoint AP from 56.1 to 56.7, for 1.7x the pixels through the model.
DEFAULT_SCALES = (0.75, 1.0, 1.25, 1.5)
MIN_SCALE, MAX_SCALE = 0.05, 8.0


@dataclass(frozen=True)
class View:
    """One test-time transform: an optional horizontal flip and a scale relative to the model's input size."""

    hflip: bool = False
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, int | float) and math.isfinite(self.scale)):
            raise ValueError(f"view scale must be a finite number, got {self.scale!r}")
        if not MIN_SCALE <= self.scale <= MAX_SCALE:
            raise ValueError(f"view scale must be in [{MIN_SCALE}, {MAX_SCALE}], got {self.scale}")

    @property
    def name(self) -> str:
        parts = (["hflip"] if self.hflip else []) + ([f"scale:{self.scale:g}"] if self.scale != 1.0 else [])
        return "+".join(parts) or "identity"

    def input_size(self, min_size: int, max_size: int) -> tuple[int, int]:
        """The model's ``(min_size, max_size)`` under this view."""
        return max(1, round(min_size * self.scale)), max(1, round(max_size * self.scale))

    def prepare(self, image: Tensor) -> Tensor:
        """The view's input for an image ``[C, H, W]`` (a flip; the scale is the model's business)."""
        return image.flip(-1) if self.hflip else image

    def invert_boxes(self, boxes: Tensor, *, width: int) -> Tensor:
        """Boxes ``[N, 4]`` xyxy predicted in the view, in the original frame of an image ``width`` px wide."""
        if not self.hflip:
            return boxes
        return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)

    def forward_boxes(self, boxes: Tensor, *, width: int) -> Tensor:
        """Original-frame boxes mapped into the view (a flip is its own inverse)."""
        return self.invert_boxes(boxes, width=width)

    def invert_keypoints(self, keypoints: Tensor, *, width: int, flip_index: tuple[int, ...]) -> Tensor:
        """Keypoints ``[N, K, 3]`` from the view, in the original frame.

        On a flip, x becomes ``width - x`` and the left/right channels are swapped with ``flip_index``
        (``flip_index[i]`` is the mirror of keypoint i, from the data set's metadata): the view's
        "left hand" of a mirrored figure is the original's right hand.
        """
        if not self.hflip:
            return keypoints
        k = keypoints.shape[1]
        if len(flip_index) != k:
            raise ValueError(f"flip_index has {len(flip_index)} entries but keypoints have K={k}")
        out = keypoints[:, list(flip_index)].clone()
        out[..., 0] = width - out[..., 0]
        return out

    def invert_heatmaps(self, heatmaps: Tensor, *, flip_index: tuple[int, ...]) -> Tensor:
        """Keypoint heatmaps ``[N, K, M, M]`` over boxes mapped into the view, back in the original frame.

        A heatmap covers its box; the box of a flipped view is the mirror of the original box, so the
        heatmap is mirrored along its width and its channels swapped with ``flip_index``.
        """
        if not self.hflip:
            return heatmaps
        return heatmaps[:, list(flip_index)].flip(-1)

    def invert(self, detections: Detections, *, width: int, flip_index: tuple[int, ...] = ()) -> Detections:
        """A view's detections in the original frame (boxes, and keypoints with left/right swapped)."""
        keypoints = detections.keypoints
        if keypoints is not None:
            keypoints = self.invert_keypoints(keypoints, width=width, flip_index=flip_index)
        return Detections(
            boxes=self.invert_boxes(detections.boxes, width=width),
            scores=detections.scores,
            labels=detections.labels,
            keypoints=keypoints,
            agreement=detections.agreement,
        )


def resized_size(height: int, width: int, *, min_size: int, max_size: int) -> tuple[int, int]:
    """``(H, W)`` that a torchvision detector resizes an image of ``height x width`` px to (eval mode): the
    short side to ``min_size`` unless the long side would pass ``max_size``, then each side rounded down
    (``GeneralizedRCNNTransform``). A side of 0 means the model cannot take the image: torch raises. That
    happens to images whose long side is more than ``max_size`` times their short side (a 4000 x 1 px
    strip); callers skip or refuse them up front."""
    if min(height, width) < 1:
        raise ValueError(f"image sides must be at least 1 px, got {height}x{width}")
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return int(height * scale), int(width * scale)


_TOKEN = re.compile(r"^(identity|hflip|scale:([0-9]*\.?[0-9]+(?:e-?[0-9]+)?))$")


def parse_view(text: str) -> View:
    """``identity``, ``hflip``, ``scale:F`` or a ``+`` composition such as ``hflip+scale:0.75``."""
    hflip, scale = False, None
    for token in text.strip().split("+"):
        m = _TOKEN.match(token.strip())
        if not m:
            raise ValueError(f"unknown view {text!r}: expected identity, hflip, scale:F or a + composition of them")
        if m.group(1) == "hflip":
            if hflip:
                raise ValueError(f"view {text!r} flips twice")
            hflip = True
        elif m.group(2) is not None:
            if scale is not None:
                raise ValueError(f"view {text!r} has two scales")
            scale = float(m.group(2))
    return View(hflip=hflip, scale=1.0 if scale is None else scale)


def views_for_scales(scales: tuple[float, ...]) -> tuple[View, ...]:
    """Every scale with and without flip, identity first."""
    return tuple(View(hflip=f, scale=s) for s in sorted(scales, key=lambda s: (s != 1.0, s)) for f in (False, True))


def parse_views(text: str) -> tuple[View, ...]:
    """A comma list of views, or ``default`` (4 scales x flip) or ``paper`` (18 views)."""
    text = text.strip()
    if text == "default":
        return views_for_scales(DEFAULT_SCALES)
    if text == "paper":
        return views_for_scales(PAPER_SCALES)
    views = tuple(parse_view(t) for t in text.split(",") if t.strip())
    if not views:
        raise ValueError("--views needs at least one view")
    if len(set(views)) != len(views):
        raise ValueError(f"--views lists a view twice: {text!r}")
    return views
