"""How much the views disagree on each fused object: the spread of its score and of its box across the views.

Multi-transform labeling runs ``V`` views of an image; fusion merges their detections (already mapped back
to the original frame) into one set. For every fused object, each view's *match* is that view's box of the
same class that overlaps the fused box most, among those with IoU > ``iou_thr`` (the IoU that fusion
clusters with; strictly greater, as fusion counts a match). A view without such a box *missed* the object
(a tile view that does not cover the object misses it, as it does for ``agreement``).

- ``score_spread`` ``[N]``: the standard deviation (population, over all ``V`` views) of the views' scores
  for the object, a view that missed it counting 0 (its score was below the detector's floor). 0 when every
  view gave the same score; at most 0.5, when half of the views scored it 1 and half missed it. It says how
  far the score swings between views: an object whose score swings around the threshold is kept or dropped
  by chance.
- ``box_spread`` ``[N]``: how far the matched boxes' edges wander, in units of the fused box's size: for
  each of the four coordinates, the standard deviation (population, over the views that matched) of the
  matched boxes' coordinate, divided by the fused box's width (``x1``, ``x2``) or height (``y1``, ``y2``);
  the mean of the four. 0 when fewer than two views matched or all matched boxes coincide; 0.05 reads as
  "the views put the edges about 5% of the box's size apart". Drawn as a band of +- that fraction around
  the box, it shows where the views placed the edges.

No model pass: everything comes from the per-view detections that fusion consumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numba
import numpy as np
import torch
from torch import Tensor

from datadistill.core.types import Detections, concat

__all__ = ["match_views", "view_spread", "view_spread_images"]


def match_views(fused: Detections, per_view: Sequence[Detections], *, iou_thr: float) -> tuple[Tensor, Tensor, Tensor]:
    """Each view's match of each fused object.

    Returns ``seen`` ``[N, V]`` bool (the view has a same-class box with IoU > ``iou_thr``), ``scores``
    ``[N, V]`` float64 (the match's score, 0 where missed) and ``boxes`` ``[N, V, 4]`` float64 (the match's
    xyxy px, NaN where missed), on the device of ``fused``. Ties of IoU go to the view's earlier box. The
    IoUs are computed on the CPU by a compiled loop that releases the GIL (the labeling stage runs it in a
    thread beside the model).
    """
    one_image = [torch.zeros(len(view), dtype=torch.int64) for view in per_view]
    return _match(fused, torch.zeros(len(fused), dtype=torch.int64), per_view, one_image, 1, iou_thr=iou_thr)


def _match(
    fused: Detections,
    fused_images: Tensor,
    per_view: Sequence[Detections],
    images: Sequence[Tensor],
    num_images: int,
    *,
    iou_thr: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`match_views` for the objects of ``num_images`` images: ``fused_images`` ``[N]`` the image of
    each fused object, ``images[v]`` ``[N_v]`` the image of each row of view v (non-decreasing)."""
    if not per_view:
        raise ValueError("per_view must hold the detections of at least one view, got none")
    if not 0.0 <= iou_thr < 1.0:
        raise ValueError(f"iou_thr must be in [0, 1), got {iou_thr}")
    device = fused.boxes.device
    bounds = np.arange(num_images + 1)
    starts, offset = [], 0
    for v, (view, image) in enumerate(zip(per_view, images, strict=True)):
        image = image.detach().cpu().numpy()
        if image.shape != (len(view),) or (image.size and (np.diff(image) < 0).any()):
            raise ValueError(f"the images of view {v}'s rows must be [{len(view)}] and in order")
        starts.append(offset + np.searchsorted(image, bounds, side="left"))
        offset += len(view)
    cat = [torch.cat([getattr(view, name).detach().cpu() for view in per_view]) for name in ("boxes", "scores",
                                                                                          "labels")]  # fmt: skip
    seen, scores, boxes = _match_loop(
        fused.boxes.detach().cpu().double().numpy().reshape(-1, 4),
        fused.labels.detach().cpu().numpy().astype(np.int64),
        fused_images.detach().cpu().numpy().astype(np.int64),
        cat[0].double().numpy().reshape(-1, 4),
        cat[1].double().numpy(),
        cat[2].numpy().astype(np.int64),
        np.stack(starts).astype(np.int64),
        float(iou_thr),
    )
    return (torch.from_numpy(seen).to(device), torch.from_numpy(scores).to(device),
            torch.from_numpy(boxes).to(device))  # fmt: skip


@numba.njit(cache=True, nogil=True)
def _match_loop(
    fused: np.ndarray, fused_labels: np.ndarray, fused_images: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
    labels: np.ndarray, starts: np.ndarray, iou_thr: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """:func:`match_views` over view k's rows of image g, ``starts[k, g]:starts[k, g + 1]``, IoU as
    torchvision's ``box_iou``."""
    n, v = fused.shape[0], starts.shape[0]
    seen = np.zeros((n, v), np.bool_)
    out_scores = np.zeros((n, v), np.float64)
    out_boxes = np.full((n, v, 4), np.nan, np.float64)
    for i in range(n):
        area_i = (fused[i, 2] - fused[i, 0]) * (fused[i, 3] - fused[i, 1])
        g = fused_images[i]
        for k in range(v):
            best, best_iou = -1, -1.0
            for j in range(starts[k, g], starts[k, g + 1]):
                if labels[j] != fused_labels[i]:
                    continue
                w = min(fused[i, 2], boxes[j, 2]) - max(fused[i, 0], boxes[j, 0])
                h = min(fused[i, 3], boxes[j, 3]) - max(fused[i, 1], boxes[j, 1])
                inter = max(w, 0.0) * max(h, 0.0)
                union = area_i + (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1]) - inter
                iou = inter / union if union > 0.0 else 0.0
                if iou > best_iou:
                    best, best_iou = j, iou
            if best >= 0 and best_iou > iou_thr:
                seen[i, k] = True
                out_scores[i, k] = scores[best]
                out_boxes[i, k, :] = boxes[best, :]
    return seen, out_scores, out_boxes


def view_spread(fused: Detections, per_view: Sequence[Detections], *, iou_thr: float) -> Detections:
    """``fused`` with ``score_spread`` and ``box_spread`` (``[N]`` float32, see the module docstring) from
    ``per_view``: the ``V`` views' detections of the same image in the original frame, as fusion got them."""
    one_image = [torch.zeros(len(view), dtype=torch.int64) for view in per_view]
    (out,) = view_spread_images([fused], per_view, one_image, iou_thr=iou_thr)
    return out


def view_spread_images(
    fused: Sequence[Detections], per_view: Sequence[Detections], images: Sequence[Tensor], *, iou_thr: float
) -> list[Detections]:
    """:func:`view_spread` for a batch of images in one call: ``fused[i]`` the fused objects of image i,
    ``per_view[v]`` view v's detections of every image and ``images[v]`` ``[N_v]`` the image of each of its
    rows (in image order, as :func:`datadistill.core.fusion.fuse_images` takes them). The same values as
    image by image."""
    if not fused:
        return []
    everything = concat([Detections(boxes=f.boxes, scores=f.scores, labels=f.labels) for f in fused])
    fused_images = torch.repeat_interleave(torch.arange(len(fused)), torch.tensor([len(f) for f in fused]))
    seen, scores, boxes = _match(everything, fused_images, per_view, images, len(fused), iou_thr=iou_thr)
    score_spread = ((scores - scores.mean(dim=1, keepdim=True)) ** 2).mean(dim=1).sqrt()
    count = seen.sum(dim=1)  # [N]
    filled = torch.where(seen[..., None], boxes, torch.zeros_like(boxes))
    mean = filled.sum(dim=1) / count.clamp_min(1)[:, None]  # [N, 4]
    sq = torch.where(seen[..., None], (boxes - mean[:, None, :]) ** 2, torch.zeros_like(boxes))
    coord_std = (sq.sum(dim=1) / count.clamp_min(1)[:, None]).sqrt()  # [N, 4]
    fb = everything.boxes.double()
    tiny = torch.finfo(torch.float64).tiny
    size = torch.stack([fb[:, 2] - fb[:, 0], fb[:, 3] - fb[:, 1]] * 2, dim=1).clamp_min(tiny)  # [N, 4]: w h w h
    box_spread = torch.where(count >= 2, (coord_std / size).mean(dim=1), torch.zeros_like(fb[:, 0]))
    parts = [len(f) for f in fused]
    return [replace(f, score_spread=s.float(), box_spread=b.float())
            for f, s, b in zip(fused, score_spread.split(parts), box_spread.split(parts), strict=True)]  # fmt: skip
