"""Detections: the one record of predictions and labels inside datadistill.

Convention everywhere: boxes are absolute pixel ``xyxy`` floats in the original image frame; labels are
contiguous class indices ``0..C-1`` into the data set's categories (not COCO category ids); keypoints are
``(N, K, 3)`` with ``x, y`` in pixels and a third column that is a COCO visibility (0, 1, 2) for labels
or a per-keypoint score for predictions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class Detections:
    """Predictions (or labels) for one image.

    boxes: ``[N, 4]`` float32 xyxy pixels. scores: ``[N]`` float32 in [0, 1] (1 for labels).
    labels: ``[N]`` int64 class indices. keypoints: ``[N, K, 3]`` float32 or None.
    agreement: ``[N]`` int64, how many views predicted each object (fused outputs), or None.
    score_spread, box_spread: ``[N]`` float32, how much each fused object's score and box vary across the
    views (:func:`datadistill.core.uncertainty.view_spread`), or None.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    keypoints: Tensor | None = None
    agreement: Tensor | None = None
    score_spread: Tensor | None = None
    box_spread: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.boxes.shape[0]
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape [N, 4], got {tuple(self.boxes.shape)}")
        if tuple(self.scores.shape) != (n,) or tuple(self.labels.shape) != (n,):
            raise ValueError(
                f"scores and labels must have shape [{n}], got {tuple(self.scores.shape)} and "
                f"{tuple(self.labels.shape)}"
            )
        if self.keypoints is not None and (
            self.keypoints.ndim != 3 or self.keypoints.shape[0] != n or self.keypoints.shape[2] != 3
        ):
            raise ValueError(f"keypoints must have shape [{n}, K, 3], got {tuple(self.keypoints.shape)}")
        if self.agreement is not None and tuple(self.agreement.shape) != (n,):
            raise ValueError(f"agreement must have shape [{n}], got {tuple(self.agreement.shape)}")
        for name in ("score_spread", "box_spread"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (n,):
                raise ValueError(f"{name} must have shape [{n}], got {tuple(value.shape)}")

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @staticmethod
    def empty(num_keypoints: int | None = None) -> Detections:
        kps = None if num_keypoints is None else torch.zeros((0, num_keypoints, 3))
        return Detections(
            boxes=torch.zeros((0, 4)),
            scores=torch.zeros((0,)),
            labels=torch.zeros((0,), dtype=torch.int64),
            keypoints=kps,
        )

    def select(self, index: Tensor) -> Detections:
        """A subset by boolean mask or integer index."""
        return Detections(
            boxes=self.boxes[index],
            scores=self.scores[index],
            labels=self.labels[index],
            keypoints=None if self.keypoints is None else self.keypoints[index],
            agreement=None if self.agreement is None else self.agreement[index],
            score_spread=None if self.score_spread is None else self.score_spread[index],
            box_spread=None if self.box_spread is None else self.box_spread[index],
        )

    def to(self, device: torch.device | str) -> Detections:
        return replace(
            self,
            boxes=self.boxes.to(device),
            scores=self.scores.to(device),
            labels=self.labels.to(device),
            keypoints=None if self.keypoints is None else self.keypoints.to(device),
            agreement=None if self.agreement is None else self.agreement.to(device),
            score_spread=None if self.score_spread is None else self.score_spread.to(device),
            box_spread=None if self.box_spread is None else self.box_spread.to(device),
        )

    def split(self, counts: list[int]) -> list[Detections]:
        """Consecutive parts of ``counts[i]`` rows each (views of this one's tensors, one split per field)."""
        fields = {f: getattr(self, f) for f in FIELDS}
        parts = {f: (None if t is None else t.split(counts)) for f, t in fields.items()}
        return [Detections(**{f: (None if p is None else p[i]) for f, p in parts.items()}) for i in range(len(counts))]


FIELDS = ("boxes", "scores", "labels", "keypoints", "agreement", "score_spread", "box_spread")


def concat(parts: list[Detections]) -> Detections:
    """The rows of ``parts`` one after the other; a field is kept when every part has it (no parts: empty)."""
    if not parts:
        return Detections.empty()
    out = {}
    for f in FIELDS:
        values = [getattr(p, f) for p in parts]
        out[f] = None if any(v is None for v in values) else torch.cat(values)
    return Detections(**out)
