"""Steps 2 and 3 of data distillation for a batch of images: every view through the detector, the
predictions mapped back to the original frame, and fused (boxes by :func:`datadistill.core.fusion.fuse`,
keypoints by averaging the heatmaps of every view on the fused boxes, as in the paper; a tile view gives
heatmaps only for the boxes inside its tile)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from datadistill.core import fusion, uncertainty
from datadistill.core.types import Detections, concat
from datadistill.core.views import View
from datadistill.models.detector import Detector
from datadistill.runtime.devices import autocast


@dataclass
class LabelTimer:
    """Seconds spent in the model's forward passes vs. in the fusion (for the labeling benchmark).

    On a GPU the forward passes are timed with CUDA events (:meth:`model_start`, :meth:`model_stop`), which
    wait for nothing: :attr:`model_s` reads them once they have completed, so that the timing neither
    misses queued work nor stalls the pipeline."""

    fusion_s: float = 0.0
    cpu_model_s: float = 0.0
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)

    def model_start(self, device: torch.device) -> Any:
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return start
        return time.perf_counter()

    def model_stop(self, token: Any) -> None:
        if isinstance(token, float):
            self.cpu_model_s += time.perf_counter() - token
            return
        stop = torch.cuda.Event(enable_timing=True)
        stop.record()
        self.events.append((token, stop))

    @property
    def model_s(self) -> float:
        """Seconds in the forward passes (waits for the recorded GPU work to finish)."""
        gpu = 0.0
        for start, stop in self.events:
            stop.synchronize()
            gpu += start.elapsed_time(stop) / 1000.0
        return self.cpu_model_s + gpu


@dataclass(frozen=True)
class ImageBatch:
    """A batch's images on one device, stacked by size so that each view is prepared in one call per size
    (usually one size: one call). ``groups[g]``: the images of one ``H x W``, ``[B_g, 3, H, W]`` float in
    [0, 1]; ``members[g]``: their positions in the batch, ascending. Sizes are grouped in order of first
    appearance; :meth:`images` and :meth:`prepare` give the images back in batch order, which is the order
    the model sees (a batch's composition changes its floating-point results: the model pads to the largest)."""

    groups: tuple[torch.Tensor, ...]
    members: tuple[tuple[int, ...], ...]

    @staticmethod
    def stack(images: Sequence[torch.Tensor], *, device: torch.device | str | None = None) -> ImageBatch:
        """The images ``[3, H, W]`` (uint8 in 0..255, or float in [0, 1]) grouped by size, each group moved
        to ``device`` (default: the first image's) and stacked there; a uint8 group becomes float in [0, 1]
        in one op (the values of ``image.float().div_(255)`` image by image, bit for bit)."""
        if not images:
            raise ValueError("ImageBatch.stack needs at least one image")
        for i, image in enumerate(images):
            if image.dim() != 3:
                raise ValueError(f"image {i} must have shape [C, H, W], got {tuple(image.shape)}")
        where = torch.device(device) if device is not None else images[0].device
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault((int(image.shape[-2]), int(image.shape[-1])), []).append(i)
        groups = []
        for members in by_size.values():
            moved = [images[i].to(where, non_blocking=True) for i in members]
            group = moved[0][None] if len(moved) == 1 else torch.stack(moved)
            groups.append(group.float().div_(255) if group.dtype == torch.uint8 else group)
        return ImageBatch(groups=tuple(groups), members=tuple(tuple(m) for m in by_size.values()))

    def __len__(self) -> int:
        return sum(len(m) for m in self.members)

    @property
    def device(self) -> torch.device:
        return self.groups[0].device

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """``(height, width)`` of each image, in batch order."""
        out: list[tuple[int, int]] = [(0, 0)] * len(self)
        for group, members in zip(self.groups, self.members, strict=True):
            for i in members:
                out[i] = (int(group.shape[-2]), int(group.shape[-1]))
        return tuple(out)

    def images(self) -> list[torch.Tensor]:
        """Each image ``[3, H, W]`` (a view into its group), in batch order."""
        return self._in_order(self.groups)

    def prepare(self, view: View) -> list[torch.Tensor]:
        """The view's input of each image, in batch order: the view's transforms
        (:meth:`View.transforms <datadistill.core.views.View.transforms>`: the tile's crop, the flip) applied
        to each whole group ``[B_g, 3, H, W]`` in one call; the values of :meth:`View.prepare
        <datadistill.core.views.View.prepare>` image by image. The scale is the model's input size."""
        prepared = tuple(view.transforms(height=g.shape[-2], width=g.shape[-1]).apply_image(g) for g in self.groups)
        return self._in_order(prepared)

    def _in_order(self, groups: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(self)
        for group, members in zip(groups, self.members, strict=True):
            for image, i in zip(group.unbind(0), members, strict=True):
                out[i] = image
        return out  # type: ignore[return-value]


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


def predict(detector: Detector, images: list[torch.Tensor], *, precision: str = "fp32") -> list[Detections]:
    """``detector.predict(images)`` under autocast at ``precision`` (resolved: fp32, bf16 or fp16), with the
    boxes, scores and keypoints back in fp32 (and on the images' device) before any inverse or fusion."""
    if not images:
        return []
    with autocast(images[0].device, precision):
        return [fp32(det) for det in detector.predict(images)]


def fp32(det: Detections) -> Detections:
    """``det`` with its floating point fields in float32 (an autocast forward pass gives bf16 or fp16)."""
    floats = [det.boxes, det.scores] + ([] if det.keypoints is None else [det.keypoints])
    if all(t.dtype == torch.float32 for t in floats):
        return det
    return replace(det, boxes=det.boxes.float(), scores=det.scores.float(),
                   keypoints=None if det.keypoints is None else det.keypoints.float())  # fmt: skip


@dataclass(frozen=True)
class ViewOutputs:
    """Every view's raw predictions (in each view's own frame) for a batch of ``B`` images, packed into
    one set of tensors on the CPU, so that a GPU batch needs one copy and no wait: the copy is queued
    without blocking, and :meth:`invert` waits for it (``ready``, a CUDA event) when the CPU needs it.

    ``counts[v * B + i]``: the objects of view ``v`` on image ``i``; boxes ``[M, 4]``, scores ``[M]``,
    labels ``[M]``, keypoints ``[M, K, 3]`` or None, rows ordered by view, then image."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    keypoints: torch.Tensor | None
    counts: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]  # (height, width) of each original image
    ready: torch.cuda.Event | None

    def invert(self, views: tuple[View, ...], flip_index: tuple[int, ...]) -> ViewRows:
        """Every view's detections of the whole batch mapped back to the original frames (on the CPU), one
        set per view, as :meth:`View.invert <datadistill.core.views.View.invert>` maps each image's."""
        if self.ready is not None:
            self.ready.synchronize()
        num = len(self.sizes)
        per_view, images = [], []
        ends = [0, *torch.tensor(self.counts, dtype=torch.int64).cumsum(0).tolist()]
        for v, view in enumerate(views):
            lo, hi = ends[v * num], ends[(v + 1) * num]
            counts = torch.tensor(self.counts[v * num : (v + 1) * num], dtype=torch.int64)
            image = torch.repeat_interleave(torch.arange(num), counts)
            det = Detections(boxes=self.boxes[lo:hi], scores=self.scores[lo:hi], labels=self.labels[lo:hi],
                             keypoints=None if self.keypoints is None else self.keypoints[lo:hi])  # fmt: skip
            if view.tile is None:
                widths = det.boxes.new_tensor([w for _, w in self.sizes])[image]
                per_view.append(view.invert_rows(det, widths=widths, flip_index=flip_index))
                images.append(image)
                continue
            # A tile's crop depends on each image's size: image by image.
            starts = [0, *counts.cumsum(0).tolist()]
            inverted = [view.invert(det.select(torch.arange(starts[i], starts[i + 1])), width=w, height=h,
                                    flip_index=flip_index) for i, (h, w) in enumerate(self.sizes)]  # fmt: skip
            per_view.append(concat(inverted))
            images.append(torch.repeat_interleave(torch.arange(num), torch.tensor([len(d) for d in inverted])))
        crops = None
        if any(view.tile is not None for view in views):
            crops = torch.tensor([[view.crop(height=h, width=w) for h, w in self.sizes] for view in views])
        return ViewRows(per_view=tuple(per_view), images=tuple(images), num_images=num, crops=crops)


@dataclass(frozen=True)
class ViewRows:
    """A batch's detections in the original frames: ``per_view[v]`` holds view v's detections of every
    image, ``images[v]`` ``[N_v]`` the image of each of its rows (``0..num_images - 1``), rows in image order."""

    per_view: tuple[Detections, ...]
    images: tuple[torch.Tensor, ...]
    num_images: int
    crops: torch.Tensor | None = None  # [V, num_images, 4]: the part of each image each view saw, with tiles


def run_views(
    detector: Detector,
    images: Sequence[torch.Tensor] | ImageBatch,
    *,
    views: tuple[View, ...],
    precision: str = "fp32",
    timer: LabelTimer | None = None,
) -> ViewOutputs:
    """Every view of each image ``[3, H, W]`` (float in [0, 1], on the model's device; or an
    :class:`ImageBatch`, each view prepared in one call per image size) through ``detector``, back to back,
    the outputs kept on the device until one copy of them all to the CPU. Nothing here waits for the GPU
    beyond what the model's own post-processing does."""
    timer = timer or LabelTimer()
    meta = detector.meta
    batch = images if isinstance(images, ImageBatch) else ImageBatch.stack(images)
    device = batch.device
    token = timer.model_start(device)
    dets: list[Detections] = []
    for view in views:
        prepared = batch.prepare(view)
        with detector.input_size(*view.input_size(meta.min_size, meta.max_size)):
            dets += predict(detector, prepared, precision=precision)
    timer.model_stop(token)
    blocking = device.type != "cuda"
    keypoints = None
    if dets and all(d.keypoints is not None for d in dets):
        keypoints = torch.cat([d.keypoints for d in dets]).to("cpu", non_blocking=not blocking)  # type: ignore[misc]
    packed = {
        name: torch.cat([getattr(d, name) for d in dets]).to("cpu", non_blocking=not blocking)
        for name in ("boxes", "scores", "labels")
    }
    ready = None
    if device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record()
    return ViewOutputs(**packed, keypoints=keypoints, counts=tuple(len(d) for d in dets), sizes=batch.sizes,
                       ready=ready)  # fmt: skip


def fuse_views(
    rows: ViewRows, *, fuse: str, iou_thr: float, score_floor: float, timer: LabelTimer | None
) -> list[Detections]:
    """Step 3 for each image of a batch: its views' detections (original frame) fused, objects below
    ``score_floor`` dropped, with how much each object's score and box vary across the views
    (:func:`datadistill.core.uncertainty.view_spread`). One call for the batch
    (:func:`datadistill.core.fusion.fuse_images`): the same objects as image by image, with a fraction of
    the Python work, which matters when a thread does it beside the model's own Python."""
    t0 = time.perf_counter()
    fused = fusion.fuse_images(rows.per_view, rows.images, rows.num_images, method=fuse, iou_thr=iou_thr,
                               skip_box_thr=0.0, crops=rows.crops, score_floor=score_floor)  # fmt: skip
    fused = uncertainty.view_spread_images(fused, rows.per_view, rows.images, iou_thr=iou_thr)
    if timer is not None:
        timer.fusion_s += time.perf_counter() - t0
    return fused


def label_images(
    detector: Detector,
    images: Sequence[torch.Tensor] | ImageBatch,
    *,
    views: tuple[View, ...],
    fuse: str = "nms",
    keypoint_fuse: str = "heatmap",
    iou_thr: float = 0.5,
    score_floor: float = 0.05,
    timer: LabelTimer | None = None,
    precision: str = "fp32",
    flip_index: tuple[int, ...] | None = None,
) -> list[Detections]:
    """Run ``detector`` on every view of each image ``[3, H, W]`` (float in [0, 1]; or an :class:`ImageBatch`),
    map the predictions back to the original frame and fuse them. Returns one :class:`Detections` per image
    (on the CPU), with ``agreement`` and keypoints (``[N, K, 3]`` x, y, score) for keypoint models; objects
    below ``score_floor`` dropped. ``precision``: of the forward passes (resolved: fp32, bf16 or fp16).
    ``flip_index``: the keypoint flip map (default: the detector's own; a Ray actor gets the driver's).
    """
    timer = timer or LabelTimer()
    meta = detector.meta
    if meta.task == "keypoints" and keypoint_fuse == "heatmap" and not detector.has_heatmaps:
        raise ValueError(f"{meta.model} gives no keypoint heatmaps: use keypoint_fuse='mean'")
    flip = meta.flip_index if flip_index is None else tuple(flip_index)
    batch = images if isinstance(images, ImageBatch) else ImageBatch.stack(images)
    outputs = run_views(detector, batch, views=views, precision=precision, timer=timer)
    fused = fuse_views(outputs.invert(views, flip), fuse=fuse, iou_thr=iou_thr, score_floor=score_floor, timer=timer)
    if meta.task == "keypoints" and keypoint_fuse == "heatmap":
        fused = fuse_heatmaps(detector, batch.images(), fused, views, timer=timer, precision=precision, flip_index=flip)
    return fused


def view_heatmaps(
    detector: Detector,
    images: list[torch.Tensor],
    dets: list[Detections],
    view: View,
    *,
    precision: str = "fp32",
    flip_index: tuple[int, ...] | None = None,
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
    with detector.input_size(*view.input_size(meta.min_size, meta.max_size)), autocast(images[0].device, precision):
        heats = detector.heatmaps(prepared, boxes)
    if heats is None:
        raise ValueError(f"{meta.model} gives no keypoint heatmaps")
    flip = meta.flip_index if flip_index is None else flip_index
    return {i: view.invert_heatmaps(h.float().cpu(), flip_index=flip) for i, h in zip(todo, heats, strict=True)}


def fuse_heatmaps(
    detector: Detector,
    images: list[torch.Tensor],
    dets: list[Detections],
    views: tuple[View, ...],
    *,
    timer: LabelTimer,
    precision: str = "fp32",
    flip_index: tuple[int, ...] | None = None,
) -> list[Detections]:
    """The paper's keypoint fusion: the keypoint head runs on the fused boxes under every view (one batch
    per view); heatmaps are mapped back, averaged, then decoded in the original frame.

    A tile view contributes only to the boxes wholly inside its tile, so each box's heatmaps are averaged
    over the views that contributed to it (every view, without tiles). A box that no view contributed
    to (a fused box reaching out of every tile, with tile views alone) keeps its fused mean keypoints."""
    totals: dict[int, torch.Tensor] = {}
    counts: dict[int, torch.Tensor] = {}
    for view in views:
        token = timer.model_start(images[0].device)
        heats = view_heatmaps(detector, images, dets, view, precision=precision, flip_index=flip_index)
        timer.model_stop(token)
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
        out[i] = replace(d, keypoints=keypoints)
    return out


def _covered(view: View, image: torch.Tensor, dets: Detections) -> torch.Tensor:
    """``[N]`` bool: the boxes of ``dets`` that lie wholly in ``view`` of ``image`` ``[C, H, W]``."""
    return view.covers(dets.boxes, width=image.shape[-1], height=image.shape[-2])
