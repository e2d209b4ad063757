"""Steps 2 and 3 of data distillation for a batch of images: every view through the detector, the
predictions mapped back to the original frame, and fused (boxes by :func:`datadistill.core.fusion.fuse`,
keypoints by averaging the heatmaps of every view on the fused boxes, as in the paper; a tile view gives
heatmaps only for the boxes inside its tile)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from datadistill.core import fusion
from datadistill.core.types import Detections
from datadistill.core.views import View
from datadistill.models.detector import Detector


@dataclass
class LabelTimer:
    """Seconds spent in the model's forward passes vs. in the fusion (for the labeling benchmark)."""

    model_s: float = 0.0
    fusion_s: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)


def unfit_reason(detector: Detector, height: int, width: int, *, views: tuple[View, ...]) -> str | None:
    """Why ``detector`` cannot label an image of ``height x width`` px under one of ``views`` (e.g. its
    resize would leave a side of 0 px, and torch would raise mid-run), or None when it can. A tile view is
    checked on its crop, which is what the model gets."""
    meta = detector.meta
    for view in views:
        low, high = view.input_size(meta.min_size, meta.max_size)
        h, w = view.frame_size(height=height, width=width)
        reason = detector.unfit_reason(h, w, min_size=low, max_size=high)
        if reason is not None:
            crop = f" (its {w}x{h} px tile)" if view.tile is not None else ""
            return f"{width}x{height} px is too elongated for the model: view {view.name}{crop} {reason}"
    return None


def label_images(
    detector: Detector,
    images: list[torch.Tensor],
    *,
    views: tuple[View, ...],
    fuse: str = "nms",
    keypoint_fuse: str = "heatmap",
    iou_thr: float = 0.5,
    score_floor: float = 0.05,
    timer: LabelTimer | None = None,
) -> list[Detections]:
    """Run ``detector`` on every view of each image ``[3, H, W]`` (float in [0, 1]), map the predictions
    back to the original frame and fuse them. Returns one :class:`Detections` per image, with ``agreement``
    and keypoints (``[N, K, 3]`` x, y, score) for keypoint models; objects below ``score_floor`` dropped.
    """
    timer = timer or LabelTimer()
    meta = detector.meta
    if meta.task == "keypoints" and keypoint_fuse == "heatmap" and not detector.has_heatmaps:
        raise ValueError(f"{meta.model} gives no keypoint heatmaps: use keypoint_fuse='mean'")
    per_image: list[list[Detections]] = [[] for _ in images]
    for view in views:
        prepared = [view.prepare(img) for img in images]
        t0 = time.perf_counter()
        with detector.input_size(*view.input_size(meta.min_size, meta.max_size)):
            predictions = detector.predict(prepared)
        timer.model_s += time.perf_counter() - t0
        for i, (img, det) in enumerate(zip(images, predictions, strict=True)):
            per_image[i].append(
                view.invert(det.to("cpu"), width=img.shape[-1], height=img.shape[-2], flip_index=meta.flip_index)
            )
    t0 = time.perf_counter()
    fused = [fusion.fuse(dets, method=fuse, iou_thr=iou_thr, skip_box_thr=0.0) for dets in per_image]
    fused = [f.select(f.scores >= score_floor) for f in fused]
    timer.fusion_s += time.perf_counter() - t0
    if meta.task == "keypoints" and keypoint_fuse == "heatmap":
        fused = fuse_heatmaps(detector, images, fused, views, timer=timer)
    return fused


def view_heatmaps(
    detector: Detector, images: list[torch.Tensor], dets: list[Detections], view: View
) -> dict[int, torch.Tensor]:
    """The keypoint head's heatmap logits ``[N, K, M, M]`` on the boxes of ``dets`` under ``view``, back in
    the original frame (mirrored, left/right channels swapped on a flip), for every image ``i`` with boxes;
    one batch for all images. A tile view runs only on the boxes that lie wholly in its tile
    (:meth:`~datadistill.core.views.View.covers`: ``N`` counts those) and skips images with none."""
    inside = {i: _covered(view, images[i], d) for i, d in enumerate(dets) if len(d)}
    todo = [i for i, m in inside.items() if bool(m.any())]
    if not todo:
        return {}
    meta = detector.meta
    prepared = [view.prepare(images[i]) for i in todo]
    boxes = [
        view.forward_boxes(dets[i].boxes[inside[i]], width=images[i].shape[-1], height=images[i].shape[-2])
        for i in todo
    ]
    with detector.input_size(*view.input_size(meta.min_size, meta.max_size)):
        heats = detector.heatmaps(prepared, boxes)
    if heats is None:
        raise ValueError(f"{meta.model} gives no keypoint heatmaps")
    return {i: view.invert_heatmaps(h.cpu(), flip_index=meta.flip_index) for i, h in zip(todo, heats, strict=True)}


def fuse_heatmaps(
    detector: Detector,
    images: list[torch.Tensor],
    dets: list[Detections],
    views: tuple[View, ...],
    *,
    timer: LabelTimer,
) -> list[Detections]:
    """The paper's keypoint fusion: the keypoint head runs on the fused boxes under every view (one batch
    per view); heatmaps are mapped back, averaged, then decoded in the original frame.

    A tile view contributes only to the boxes wholly inside its tile, so each box's heatmaps are averaged
    over the views that contributed to it (every view, without tiles). A box that no view contributed
    to (a fused box reaching out of every tile, with tile views alone) keeps its fused mean keypoints."""
    totals: dict[int, torch.Tensor] = {}
    counts: dict[int, torch.Tensor] = {}
    for view in views:
        t0 = time.perf_counter()
        heats = view_heatmaps(detector, images, dets, view)
        timer.model_s += time.perf_counter() - t0
        for i, heat in heats.items():
            inside = _covered(view, images[i], dets[i])
            if not bool(inside.all()):
                heat = heat.new_zeros((len(inside), *heat.shape[1:])).index_put_((inside,), heat)
            totals[i] = heat if i not in totals else totals[i] + heat
            counts[i] = inside.to(heat.dtype) if i not in counts else counts[i] + inside.to(heat.dtype)
    out = list(dets)
    for i, total in totals.items():
        d, image = dets[i], images[i]
        seen = counts[i] > 0
        mean = total / counts[i].clamp_min(1.0)[:, None, None, None]
        keypoints = detector.keypoints_from_heatmaps(mean, d.boxes, image_size=(image.shape[-2], image.shape[-1]))
        if not bool(seen.all()) and d.keypoints is not None:
            keypoints = torch.where(seen[:, None, None], keypoints, d.keypoints.to(keypoints))
        out[i] = Detections(boxes=d.boxes, scores=d.scores, labels=d.labels, keypoints=keypoints, agreement=d.agreement)
    return out


def _covered(view: View, image: torch.Tensor, dets: Detections) -> torch.Tensor:
    """``[N]`` bool: the boxes of ``dets`` that lie wholly in ``view`` of ``image`` ``[C, H, W]``."""
    return view.covers(dets.boxes, width=image.shape[-1], height=image.shape[-2])
