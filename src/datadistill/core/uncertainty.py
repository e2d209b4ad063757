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

import torch
from torch import Tensor
from torchvision.ops import box_iou

from datadistill.core.types import Detections

__all__ = ["match_views", "view_spread"]


def match_views(fused: Detections, per_view: Sequence[Detections], *, iou_thr: float) -> tuple[Tensor, Tensor, Tensor]:
    """Each view's match of each fused object.

    Returns ``seen`` ``[N, V]`` bool (the view has a same-class box with IoU > ``iou_thr``), ``scores``
    ``[N, V]`` float64 (the match's score, 0 where missed) and ``boxes`` ``[N, V, 4]`` float64 (the match's
    xyxy px, NaN where missed). Ties of IoU go to the view's earlier box.
    """
    if not per_view:
        raise ValueError("per_view must hold the detections of at least one view, got none")
    if not 0.0 <= iou_thr < 1.0:
        raise ValueError(f"iou_thr must be in [0, 1), got {iou_thr}")
    n, v = len(fused), len(per_view)
    device = fused.boxes.device
    seen = torch.zeros((n, v), dtype=torch.bool, device=device)
    scores = torch.zeros((n, v), dtype=torch.float64, device=device)
    boxes = torch.full((n, v, 4), float("nan"), dtype=torch.float64, device=device)
    if n == 0:
        return seen, scores, boxes
    fused_boxes = fused.boxes.double()
    for k, view in enumerate(per_view):
        if len(view) == 0:
            continue
        view = view.to(device)
        iou = box_iou(fused_boxes, view.boxes.double())  # [N, M]
        iou = torch.where(fused.labels[:, None] == view.labels[None, :], iou, torch.full_like(iou, -1.0))
        best_iou = iou.max(dim=1).values
        best = (iou == best_iou[:, None]).to(torch.uint8).argmax(dim=1)  # the first of equal IoUs
        hit = best_iou > iou_thr
        seen[:, k] = hit
        scores[:, k] = torch.where(hit, view.scores.double()[best], torch.zeros_like(best_iou))
        boxes[hit, k] = view.boxes.double()[best[hit]]
    return seen, scores, boxes


def view_spread(fused: Detections, per_view: Sequence[Detections], *, iou_thr: float) -> Detections:
    """``fused`` with ``score_spread`` and ``box_spread`` (``[N]`` float32, see the module docstring) from
    ``per_view``: the ``V`` views' detections of the same image in the original frame, as fusion got them."""
    seen, scores, boxes = match_views(fused, per_view, iou_thr=iou_thr)
    score_spread = ((scores - scores.mean(dim=1, keepdim=True)) ** 2).mean(dim=1).sqrt()
    count = seen.sum(dim=1)  # [N]
    filled = torch.where(seen[..., None], boxes, torch.zeros_like(boxes))
    mean = filled.sum(dim=1) / count.clamp_min(1)[:, None]  # [N, 4]
    sq = torch.where(seen[..., None], (boxes - mean[:, None, :]) ** 2, torch.zeros_like(boxes))
    coord_std = (sq.sum(dim=1) / count.clamp_min(1)[:, None]).sqrt()  # [N, 4]
    fb = fused.boxes.double()
    tiny = torch.finfo(torch.float64).tiny
    size = torch.stack([fb[:, 2] - fb[:, 0], fb[:, 3] - fb[:, 1]] * 2, dim=1).clamp_min(tiny)  # [N, 4]: w h w h
    box_spread = torch.where(count >= 2, (coord_std / size).mean(dim=1), torch.zeros_like(fb[:, 0]))
    return replace(fused, score_spread=score_spread.float(), box_spread=box_spread.float())
