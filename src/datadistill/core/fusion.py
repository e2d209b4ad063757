"""Fusion of the detections of several views of one image into one set: NMS, soft-NMS, box voting, WBF.

Multi-transform inference gives one set of detections per view (identity, flip, scales), each already
mapped back to the original image frame. Fusion merges them into one set per image. Four box methods:

- ``nms``: the union of all views, then greedy non-maximum suppression per class (the paper's way).
- ``soft_nms``: the union, then soft-NMS per class (Bodla et al. 2017): overlapping boxes are decayed,
  not removed.
- ``box_voting``: non-maximum weighted (Zhou et al. 2017, "CAD"): each cluster's highest scored box keeps
  its score and takes the IoU x score weighted mean of its cluster's coordinates.
- ``wbf``: weighted boxes fusion (Solovyev et al. 2021): clusters grow around a running score-weighted mean
  box; the fused score is the mean score rescaled by how many views could have contributed.

Each gives ensemble-boxes' results (``ensemble_boxes.nms``, ``soft_nms``, ``non_maximum_weighted``,
``weighted_boxes_fusion``, version 1.0.9) on the same inputs in [0, 1], except where noted in the
function's docstring. Unlike ensemble-boxes, coordinates are absolute pixels and are never clipped, bad
input raises :class:`ValueError` naming the offending shape or value, and no score leaves [0, 1].

Common rules. Boxes are xyxy with ``x2 >= x1`` and ``y2 >= y1``; a box of zero width or height carries no
object and is dropped (as ensemble-boxes does). Boxes whose (unweighted) score is below ``skip_box_thr``
are dropped. Two boxes match when their IoU is strictly greater than ``iou_thr``. Candidates are ranked
by weighted score, ties by input order (view, then row). Outputs are sorted by score, highest first.
The clustering loops are compiled with numba (cached on disk: the first call after install compiles for a
few seconds, later processes load the cache) and release the GIL, so that the labeling stage fuses one batch
in its writer thread while the next batch runs.

:func:`fuse` is the entry point of the labeling stage: it takes per-view :class:`Detections`, runs one of
the methods by name, and also returns how many distinct views agreed on each fused object and the
score-weighted mean keypoints of each cluster (:func:`fuse_keypoints_mean`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numba
import numpy as np
import torch
from torch import Tensor

from datadistill.core.types import Detections

__all__ = ["box_voting", "fuse", "fuse_images", "fuse_keypoints_mean", "nms", "soft_nms", "wbf"]

ConfType = Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"]
Decay = Literal["gaussian", "linear"]
Weights = Sequence[float] | Tensor | np.ndarray | None


# ---------------------------------------------------------------------------------------------------------
# Compiled loops. Inputs are float64 boxes [M, 4] grouped by label: rows starts[g]:starts[g + 1] share one
# label. Clusters are numbered in order of creation.


@numba.njit(cache=True, nogil=True)
def _iou(a: np.ndarray, i: int, b: np.ndarray, j: int) -> float:
    """IoU of boxes a[i] and b[j] (xyxy, positive areas), written as ensemble-boxes writes it."""
    w = min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0])
    h = min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1])
    if w <= 0.0 or h <= 0.0:
        return 0.0
    inter = w * h
    area_a = (a[i, 2] - a[i, 0]) * (a[i, 3] - a[i, 1])
    area_b = (b[j, 2] - b[j, 0]) * (b[j, 3] - b[j, 1])
    return inter / (area_a + area_b - inter)


# Below this sum of weights a weighted mean is no mean: the products of weights under about 1e-308 with the
# coordinates are subnormal and keep a few bits (a lone box of score 4.9e-324 came out 1.5 -> 2.0), so the
# clusters fall back to the unweighted mean. No detector's score is that small unless it is 0.
MIN_WEIGHT_SUM = 1e-100


@numba.njit(cache=True, nogil=True)
def _cluster_loop(
    boxes: np.ndarray, ws: np.ndarray, starts: np.ndarray, iou_thr: float, follow_mean: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The clustering of WBF and box voting. boxes sorted by weighted score ``ws`` (descending) within each
    label group.

    Each box joins the cluster whose reference box overlaps it most (IoU > iou_thr, the first of equals),
    else starts a cluster with itself as the reference box. Box voting keeps that first (main) box as the
    reference; WBF (``follow_mean``) moves it to the ws-weighted mean of the members so far (the plain mean
    while their ws sum to at most :data:`MIN_WEIGHT_SUM`): WBF's fused box.
    Returns cluster [M], first [C] (the row that started each cluster: its highest ws), iou [M] (each row's
    IoU with the reference box it joined; 1 for the first row) and the reference boxes [C, 4].
    """
    m = boxes.shape[0]
    cluster = np.empty(m, np.int64)
    first = np.empty(m, np.int64)
    iou = np.empty(m)
    reference = np.empty((m, 4))
    sum_wb = np.zeros((m, 4))
    sum_b = np.zeros((m, 4))
    sum_w = np.zeros(m)
    count = np.zeros(m, np.int64)
    c = 0
    for g in range(starts.shape[0] - 1):
        group_first = c
        for j in range(starts[g], starts[g + 1]):
            best = -1
            best_iou = iou_thr
            for k in range(group_first, c):
                overlap = _iou(reference, k, boxes, j)
                if overlap > best_iou:
                    best_iou = overlap
                    best = k
            if best < 0:
                best = c
                best_iou = 1.0
                first[c] = j
                for d in range(4):  # exactly the box, so that IoU ties with it are exact
                    reference[c, d] = boxes[j, d]
                c += 1
            cluster[j] = best
            iou[j] = best_iou
            if follow_mean:
                sum_w[best] += ws[j]
                count[best] += 1
                for d in range(4):
                    sum_wb[best, d] += ws[j] * boxes[j, d]
                    sum_b[best, d] += boxes[j, d]
                if count[best] > 1:
                    for d in range(4):
                        if sum_w[best] > MIN_WEIGHT_SUM:
                            reference[best, d] = sum_wb[best, d] / sum_w[best]
                        else:
                            reference[best, d] = sum_b[best, d] / count[best]
    return cluster, first[:c].copy(), iou, reference[:c].copy()


@numba.njit(cache=True, nogil=True)
def _vote_means(
    boxes: np.ndarray, ws: np.ndarray, iou: np.ndarray, cluster: np.ndarray, num_clusters: int
) -> np.ndarray:
    """Box voting's fused boxes [C, 4]: the mean of each cluster's boxes weighted by ws x IoU with its main
    box (by IoU alone while those weights sum to at most :data:`MIN_WEIGHT_SUM`)."""
    sum_wb = np.zeros((num_clusters, 4))
    sum_w = np.zeros(num_clusters)
    sum_ib = np.zeros((num_clusters, 4))
    sum_i = np.zeros(num_clusters)
    for j in range(boxes.shape[0]):
        k = cluster[j]
        weight = ws[j] * iou[j]
        sum_w[k] += weight
        sum_i[k] += iou[j]
        for d in range(4):
            sum_wb[k, d] += weight * boxes[j, d]
            sum_ib[k, d] += iou[j] * boxes[j, d]
    fused = np.empty((num_clusters, 4))
    for k in range(num_clusters):
        for d in range(4):
            if sum_w[k] > MIN_WEIGHT_SUM:
                fused[k, d] = sum_wb[k, d] / sum_w[k]
            else:
                fused[k, d] = sum_ib[k, d] / sum_i[k]
    return fused


@numba.njit(cache=True, nogil=True)
def _wbf_loop(
    boxes: np.ndarray, ws: np.ndarray, starts: np.ndarray, iou_thr: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """WBF's clusters (:func:`_cluster_loop` with ``follow_mean``): cluster [M], first [C] and fused [C, 4]."""
    cluster, first, _, fused = _cluster_loop(boxes, ws, starts, iou_thr, True)
    return cluster, first, fused


@numba.njit(cache=True, nogil=True)
def _vote_loop(
    boxes: np.ndarray, ws: np.ndarray, starts: np.ndarray, iou_thr: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box voting's clusters (:func:`_cluster_loop`): cluster [M], main [C] (row of each main box) and the
    fused boxes [C, 4] (:func:`_vote_means`)."""
    cluster, main, iou, _ = _cluster_loop(boxes, ws, starts, iou_thr, False)
    return cluster, main, _vote_means(boxes, ws, iou, cluster, main.shape[0])


@numba.njit(cache=True, nogil=True)
def _nms_loop(boxes: np.ndarray, starts: np.ndarray, iou_thr: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy NMS. boxes sorted by score (descending) within each label group.

    Returns cluster [M]: for a kept box its own cluster, for a suppressed box the cluster of the first kept
    box (in score order) that overlaps it with IoU > iou_thr, the one that suppressed it; and keep [C], the
    row of each kept box.
    """
    m = boxes.shape[0]
    cluster = np.full(m, -1, np.int64)
    keep = np.empty(m, np.int64)
    c = 0
    for g in range(starts.shape[0] - 1):
        for i in range(starts[g], starts[g + 1]):
            if cluster[i] >= 0:
                continue
            cluster[i] = c
            keep[c] = i
            for j in range(i + 1, starts[g + 1]):
                if cluster[j] < 0 and _iou(boxes, i, boxes, j) > iou_thr:
                    cluster[j] = c
            c += 1
    return cluster, keep[:c].copy()


@numba.njit(cache=True, nogil=True)
def _soft_nms_loop(
    boxes: np.ndarray, scores: np.ndarray, starts: np.ndarray, iou_thr: float, sigma: float, linear: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Soft-NMS within each label group, rows in input order.

    At step i the highest remaining score (the first of equals; the current row stays on a tie) is swapped
    to position i and decays every later score: by ``1 - IoU`` where IoU > iou_thr (linear) or by
    ``exp(-IoU^2 / sigma)`` (gaussian). Returns order [M] (row selected at each position) and decayed [M]
    (the decayed score at each position).
    """
    m = boxes.shape[0]
    order = np.arange(m)
    decayed = scores.copy()
    for g in range(starts.shape[0] - 1):
        end = starts[g + 1]
        for i in range(starts[g], end):
            best = i
            for k in range(i + 1, end):
                if decayed[k] > decayed[best]:
                    best = k
            if best != i:
                order[i], order[best] = order[best], order[i]
                decayed[i], decayed[best] = decayed[best], decayed[i]
            for k in range(i + 1, end):
                iou = _iou(boxes, order[i], boxes, order[k])
                if linear:
                    if iou > iou_thr:
                        decayed[k] = (1.0 - iou) * decayed[k]
                elif iou > 0.0:  # exp(-0) is exactly 1: no change
                    decayed[k] = math.exp(-(iou * iou) / sigma) * decayed[k]
    return order, decayed


@numba.njit(cache=True, nogil=True)
def _soft_nms_walk(
    boxes: np.ndarray,
    order: np.ndarray,
    kept: np.ndarray,
    starts: np.ndarray,
    iou_thr: float,
    members: np.ndarray,
    clusters: np.ndarray,
) -> int:
    """Writes the (member, cluster) pairs of :func:`_soft_nms_members` into members and clusters when
    they are long enough; returns how many pairs there are."""
    fill = members.shape[0] > 0
    n = 0
    c = 0
    for g in range(starts.shape[0] - 1):
        for p in range(starts[g], starts[g + 1]):
            if not kept[p]:
                continue
            if fill:
                members[n] = order[p]
                clusters[n] = c
            n += 1
            for q in range(p + 1, starts[g + 1]):
                if _iou(boxes, order[p], boxes, order[q]) > iou_thr:
                    if fill:
                        members[n] = order[q]
                        clusters[n] = c
                    n += 1
            c += 1
    return n


def _soft_nms_members(
    boxes: np.ndarray, order: np.ndarray, kept: np.ndarray, starts: np.ndarray, iou_thr: float
) -> tuple[np.ndarray, np.ndarray]:
    """Clusters after soft-NMS: a kept position p holds itself and every later position of its label group
    whose box overlaps it with IoU > iou_thr (the boxes it decayed as duplicates, kept or not). Clusters
    may overlap. Returns members [P] (rows) and clusters [P] (index among kept positions)."""
    none = np.empty(0, np.int64)
    n = _soft_nms_walk(boxes, order, kept, starts, iou_thr, none, none)
    members = np.empty(n, np.int64)
    clusters = np.empty(n, np.int64)
    if n:
        _soft_nms_walk(boxes, order, kept, starts, iou_thr, members, clusters)
    return members, clusters


# ---------------------------------------------------------------------------------------------------------
# Inputs, checks and results.


@dataclass(frozen=True)
class _Inputs:
    """All views concatenated, on the CPU, in float64; ``views[i]`` is the view of row i."""

    boxes: np.ndarray  # [M, 4]
    scores: np.ndarray  # [M]
    labels: np.ndarray  # [M] int64
    views: np.ndarray  # [M] int64
    num_views: int
    dtype: torch.dtype  # of the returned boxes and scores
    device: torch.device  # of the returned tensors
    # With fuse_images' crops: the part of each image each view saw [V, I, 4] xyxy, and the (image, label)
    # pair of each label group [G, 2]; WBF counts the views that could have seen a fused box.
    crops: np.ndarray | None = None
    pairs: np.ndarray | None = None


@dataclass(frozen=True)
class _Fused:
    """Fused objects and their clusters: input row ``members[p]`` belongs to fused object ``clusters[p]``;
    ``row_weights[i]`` is input row i's weighted score, its weight in keypoint fusion. The clusters come
    free with the clustering except for soft-NMS, which draws them only when asked (``with_clusters``)."""

    boxes: np.ndarray  # [C, 4]
    scores: np.ndarray  # [C]
    labels: np.ndarray  # [C] int64
    members: np.ndarray  # [P] int64
    clusters: np.ndarray  # [P] int64
    row_weights: np.ndarray  # [M]


def _locate(inputs_rows: np.ndarray, view_sizes: list[int]) -> str:
    """'view v, row r' of the first flagged row of the concatenation."""
    i = int(np.flatnonzero(inputs_rows)[0])
    ends = np.cumsum(view_sizes)
    v = int(np.searchsorted(ends, i, side="right"))
    return f"view {v}, row {i - (int(ends[v - 1]) if v else 0)}"


def _gather(boxes_list: Sequence[Tensor], scores_list: Sequence[Tensor], labels_list: Sequence[Tensor]) -> _Inputs:
    num_views = len(boxes_list)
    if len(scores_list) != num_views or len(labels_list) != num_views:
        raise ValueError(
            "boxes_list, scores_list and labels_list need one entry per view, got lengths "
            f"{num_views}, {len(scores_list)} and {len(labels_list)}"
        )
    boxes, scores, labels, sizes = [], [], [], []
    dtype = None
    device = torch.device("cpu")
    for v in range(num_views):
        b = torch.as_tensor(boxes_list[v])
        s = torch.as_tensor(scores_list[v])
        lab = torch.as_tensor(labels_list[v])
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes of view {v} must have shape [N, 4], got {tuple(b.shape)}")
        n = b.shape[0]
        if tuple(s.shape) != (n,) or tuple(lab.shape) != (n,):
            raise ValueError(
                f"scores and labels of view {v} must have shape [{n}] like its boxes, got "
                f"{tuple(s.shape)} and {tuple(lab.shape)}"
            )
        if lab.dtype.is_floating_point or lab.dtype.is_complex or lab.dtype == torch.bool:
            raise ValueError(f"labels of view {v} must be integers, got dtype {lab.dtype}")
        if v == 0:
            device = b.device
        dtype = b.dtype if dtype is None else torch.promote_types(dtype, b.dtype)
        boxes.append(b.detach().to("cpu", torch.float64))
        scores.append(s.detach().to("cpu", torch.float64))
        labels.append(lab.detach().to("cpu", torch.int64))
        sizes.append(n)
    if dtype is None or not dtype.is_floating_point:
        dtype = torch.float32
    if num_views:
        box_arr = torch.cat(boxes).numpy()
        score_arr = torch.cat(scores).numpy()
        label_arr = torch.cat(labels).numpy()
    else:
        box_arr, score_arr, label_arr = np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
    bad = ~np.isfinite(box_arr).all(axis=1)
    if bad.any():
        at = _locate(bad, sizes)
        raise ValueError(f"boxes must be finite, got {box_arr[bad][0].tolist()} ({at})")
    bad = ~((score_arr >= 0.0) & (score_arr <= 1.0))
    if bad.any():
        raise ValueError(f"scores must be in [0, 1], got {score_arr[bad][0]} ({_locate(bad, sizes)})")
    bad = (box_arr[:, 2] < box_arr[:, 0]) | (box_arr[:, 3] < box_arr[:, 1])
    if bad.any():
        at = _locate(bad, sizes)
        raise ValueError(f"boxes must be xyxy with x2 >= x1 and y2 >= y1, got {box_arr[bad][0].tolist()} ({at})")
    views = np.repeat(np.arange(num_views, dtype=np.int64), sizes)
    return _Inputs(box_arr, score_arr, label_arr, views, num_views, dtype, device)


def _view_weights(weights: Weights, num_views: int) -> np.ndarray:
    """Per-view weights [V] float64, ones when None."""
    if weights is None:
        return np.ones(num_views)
    if isinstance(weights, Tensor):
        weights = weights.detach().cpu().numpy()
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (num_views,):
        raise ValueError(f"weights need one entry per view ({num_views}), got shape {w.shape}")
    if not (np.isfinite(w) & (w >= 0.0)).all():
        raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
    if num_views and not (w > 0.0).any():
        raise ValueError(f"weights must not all be zero, got {w.tolist()}")
    return w


def _check_unit(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _candidates(inputs: _Inputs, skip_box_thr: float) -> np.ndarray:
    """Rows kept for fusion: score >= skip_box_thr and positive area (also as a float64 product: sides of
    1e-300 px multiply to 0, and IoU would divide 0 by 0)."""
    b = inputs.boxes
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    ok = (inputs.scores >= skip_box_thr) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]) & (area > 0.0)
    return np.flatnonzero(ok)


def _by_label_then_score(rows: np.ndarray, labels: np.ndarray, ws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by label, then weighted score descending, then input order; and the label group bounds."""
    rows = rows[np.lexsort((-ws[rows], labels[rows]))]
    return rows, _group_starts(labels[rows])


def _group_starts(sorted_labels: np.ndarray) -> np.ndarray:
    inner = np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 1
    return np.concatenate(([0], inner, [len(sorted_labels)])).astype(np.int64)


def _nothing(row_weights: np.ndarray) -> _Fused:
    empty = np.empty(0, np.int64)
    return _Fused(np.empty((0, 4)), np.empty(0), empty, empty, empty, row_weights)


def _ranked(fused: _Fused) -> _Fused:
    """Fused objects sorted by score descending (stable), clusters renumbered to match."""
    order = np.argsort(-fused.scores, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return _Fused(
        fused.boxes[order],
        fused.scores[order],
        fused.labels[order],
        fused.members,
        rank[fused.clusters],
        fused.row_weights,
    )


def _as_tensors(fused: _Fused, inputs: _Inputs) -> tuple[Tensor, Tensor, Tensor]:
    boxes = torch.from_numpy(np.ascontiguousarray(fused.boxes).reshape(-1, 4))
    return (
        boxes.to(inputs.device, inputs.dtype),
        torch.from_numpy(np.ascontiguousarray(fused.scores)).to(inputs.device, inputs.dtype),
        torch.from_numpy(np.ascontiguousarray(fused.labels)).to(inputs.device, torch.int64),
    )


# ---------------------------------------------------------------------------------------------------------
# The four methods over concatenated inputs, run through :func:`_run` (which checks the thresholds they share).


def _nms(
    inputs: _Inputs, weights: Weights, *, iou_thr: float, skip_box_thr: float, with_clusters: bool = False
) -> _Fused:
    w = _view_weights(weights, inputs.num_views)
    ws = inputs.scores if weights is None else inputs.scores * w[inputs.views] / w.sum()
    rows, starts = _by_label_then_score(_candidates(inputs, skip_box_thr), inputs.labels, ws)
    cluster, keep = _nms_loop(inputs.boxes[rows], starts, iou_thr)
    kept = rows[keep]
    fused = _Fused(inputs.boxes[kept], ws[kept], inputs.labels[kept], rows, cluster, ws)
    return _ranked(fused)


def _soft_nms(
    inputs: _Inputs,
    weights: Weights,
    *,
    iou_thr: float,
    skip_box_thr: float,
    sigma: float = 0.5,
    decay: Decay = "gaussian",
    min_score: float = 0.001,
    decayed_scores: bool = True,
    with_clusters: bool = False,
) -> _Fused:
    min_score = _check_unit("min_score", min_score)
    if decay not in ("gaussian", "linear"):
        raise ValueError(f"decay must be 'gaussian' or 'linear', got {decay!r}")
    if not (math.isfinite(sigma) and sigma > 0.0):
        raise ValueError(f"sigma must be finite and > 0, got {sigma}")
    w = _view_weights(weights, inputs.num_views)
    ws = inputs.scores if weights is None else inputs.scores * w[inputs.views] / w.sum()
    rows = _candidates(inputs, skip_box_thr)
    rows = rows[np.argsort(inputs.labels[rows], kind="stable")]
    starts = _group_starts(inputs.labels[rows])
    boxes = inputs.boxes[rows]
    order, decayed = _soft_nms_loop(boxes, ws[rows], starts, iou_thr, float(sigma), decay == "linear")
    kept_pos = decayed > min_score
    if with_clusters:
        members, clusters = _soft_nms_members(boxes, order, kept_pos, starts, iou_thr)
    else:
        members = clusters = np.empty(0, np.int64)
    kept = rows[order[kept_pos]]
    scores = decayed[kept_pos] if decayed_scores else ws[kept]
    fused = _Fused(inputs.boxes[kept], scores, inputs.labels[kept], rows[members], clusters, ws)
    return _ranked(fused)


def _vote(
    inputs: _Inputs, weights: Weights, *, iou_thr: float, skip_box_thr: float, with_clusters: bool = False
) -> _Fused:
    w = _view_weights(weights, inputs.num_views)
    ws = inputs.scores * (w / w.max())[inputs.views] if inputs.num_views else inputs.scores
    rows, starts = _by_label_then_score(_candidates(inputs, skip_box_thr), inputs.labels, ws)
    cluster, main, boxes = _vote_loop(inputs.boxes[rows], ws[rows], starts, iou_thr)
    mains = rows[main]
    fused = _Fused(boxes, ws[mains], inputs.labels[mains], rows, cluster, ws)
    return _ranked(fused)


def _could_see(
    inputs: _Inputs, boxes: np.ndarray, groups: np.ndarray, present: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray | int, np.ndarray | float]:
    """How many views could have seen each fused box (of label group ``groups``) and their summed weight:
    every view, without crops; with crops, the views whose crop holds the box wholly, and those with a
    member in its cluster (``present``: cluster * V + view pairs)."""
    v = inputs.num_views
    if inputs.crops is None or inputs.pairs is None:
        return v, w.sum()
    crops = inputs.crops[:, inputs.pairs[groups, 0]]  # [V, C, 4]
    could = (boxes[None, :, 0] >= crops[..., 0]) & (boxes[None, :, 1] >= crops[..., 1])
    could &= (boxes[None, :, 2] <= crops[..., 2]) & (boxes[None, :, 3] <= crops[..., 3])
    could = could.T.copy()  # [C, V]
    could[present // v, present % v] = True
    return could.sum(axis=1), could.astype(np.float64) @ w


def _wbf(
    inputs: _Inputs,
    weights: Weights,
    *,
    iou_thr: float,
    skip_box_thr: float,
    conf_type: ConfType = "avg",
    with_clusters: bool = False,
) -> _Fused:
    if conf_type not in ("avg", "max", "box_and_model_avg", "absent_model_aware_avg"):
        raise ValueError(
            f"conf_type must be 'avg', 'max', 'box_and_model_avg' or 'absent_model_aware_avg', got {conf_type!r}"
        )
    w = _view_weights(weights, inputs.num_views)
    wv = w[inputs.views]
    ws = inputs.scores * wv
    rows, starts = _by_label_then_score(_candidates(inputs, skip_box_thr), inputs.labels, ws)
    if not len(rows):
        return _nothing(ws)
    cluster, first, boxes = _wbf_loop(inputs.boxes[rows], ws[rows], starts, iou_thr)
    c = len(boxes)
    count = np.bincount(cluster, minlength=c)
    sum_ws = np.bincount(cluster, weights=ws[rows], minlength=c)
    v = inputs.num_views
    pairs = np.unique(cluster * v + inputs.views[rows])
    present_w = np.bincount(pairs // v, weights=w[pairs % v], minlength=c)
    could_n, could_w = _could_see(inputs, boxes, inputs.labels[rows[first]], pairs, w)
    if conf_type == "avg":
        scores = np.minimum(sum_ws / count * np.minimum(could_n, count) / could_w, 1.0)
    elif conf_type == "max":
        scores = ws[rows[first]] / w.max()
    else:
        sum_w = np.bincount(cluster, weights=wv[rows], minlength=c)
        if conf_type == "box_and_model_avg":
            safe = np.where(sum_w > 0.0, sum_w, 1.0)
            scores = np.where(sum_w > 0.0, sum_ws / safe * present_w / could_w, 0.0)
        else:
            scores = sum_ws / (sum_w + (could_w - present_w))
    fused = _Fused(boxes, scores, inputs.labels[rows[first]], rows, cluster, ws)
    return _ranked(fused)


def _run(method: Callable[..., _Fused], inputs: _Inputs, weights: Weights, *, iou_thr: float, skip_box_thr: float,
         **options: Any) -> _Fused:  # fmt: skip
    """``method`` (one of the four above) with its thresholds checked."""
    iou_thr = _check_unit("iou_thr", iou_thr)
    skip_box_thr = _check_unit("skip_box_thr", skip_box_thr)
    return method(inputs, weights, iou_thr=iou_thr, skip_box_thr=skip_box_thr, **options)


# ---------------------------------------------------------------------------------------------------------
# Public functions.

Views = Sequence[Tensor]  # one tensor per view
FusedBoxes = tuple[Tensor, Tensor, Tensor]  # boxes [N, 4], scores [N], labels [N]


def _apply(method: Callable[..., _Fused], boxes_list: Views, scores_list: Views, labels_list: Views,
           **options: Any) -> FusedBoxes:  # fmt: skip
    """``method`` (one of the four over concatenated inputs) on the views' union, as tensors."""
    inputs = _gather(boxes_list, scores_list, labels_list)
    return _as_tensors(_run(method, inputs, **options), inputs)


def nms(boxes_list: Views, scores_list: Views, labels_list: Views, *, weights: Weights = None, iou_thr: float = 0.5,
        skip_box_thr: float = 0.0) -> FusedBoxes:  # fmt: skip
    """Union of all views, then greedy NMS per class: a box is dropped when a higher scored box of its class
    that was kept overlaps it with IoU > ``iou_thr``.

    boxes_list: per view ``[N_v, 4]`` xyxy (any unit); scores_list: per view ``[N_v]`` in [0, 1];
    labels_list: per view ``[N_v]`` integer classes. weights: ``[V]`` per-view weights, >= 0, not all 0.
    Returns boxes ``[N, 4]``, scores ``[N]`` (the dtype of the input boxes, float32 for integer boxes),
    labels ``[N]`` int64, sorted by score descending, on the device of the first view.

    With weights, scores become ``s * w_v / sum(w)`` as in ensemble-boxes (so equal weights divide every
    score by V, which changes no decision). Gives ``ensemble_boxes.nms`` and, on the union with
    ``weights=None``, ``torchvision.ops.batched_nms``.
    """
    return _apply(_nms, boxes_list, scores_list, labels_list, weights=weights, iou_thr=iou_thr,
                  skip_box_thr=skip_box_thr)  # fmt: skip


def soft_nms(boxes_list: Views, scores_list: Views, labels_list: Views, *, weights: Weights = None,
             iou_thr: float = 0.5, skip_box_thr: float = 0.0, sigma: float = 0.5, decay: Decay = "gaussian",
             min_score: float = 0.001, decayed_scores: bool = False) -> FusedBoxes:  # fmt: skip
    """Union of all views, then soft-NMS per class (Bodla et al. 2017).

    Repeatedly takes the highest (decayed) score of a class and decays the scores of the rest of that
    class: ``gaussian`` multiplies by ``exp(-IoU^2 / sigma)`` (``iou_thr`` then only draws the clusters of
    :func:`fuse`), ``linear`` by
    ``1 - IoU`` where IoU > ``iou_thr``. Boxes whose decayed score ends at or below ``min_score`` are
    dropped. Shapes, weights and ordering as :func:`nms`.

    By default this returns the kept boxes' undecayed scores, as ensemble-boxes' ``soft_nms`` does (and
    then its exact results). ``decayed_scores=True`` returns the decayed scores, as the soft-NMS paper
    does (the point of the method: duplicates survive with lower scores); :func:`fuse` with
    ``method="soft-nms"`` (the labeling stage) uses the decayed scores unless told otherwise.
    """
    return _apply(_soft_nms, boxes_list, scores_list, labels_list, weights=weights, iou_thr=iou_thr,
                  skip_box_thr=skip_box_thr, sigma=sigma, decay=decay, min_score=min_score,
                  decayed_scores=decayed_scores)  # fmt: skip


def box_voting(boxes_list: Views, scores_list: Views, labels_list: Views, *, weights: Weights = None,
               iou_thr: float = 0.55, skip_box_thr: float = 0.0) -> FusedBoxes:  # fmt: skip
    """Box voting as non-maximum weighted (ensemble-boxes' ``non_maximum_weighted``).

    Boxes are taken by weighted score ``s * w_v / max(w)``; each joins the cluster whose main (highest
    scored) box overlaps it most with IoU > ``iou_thr``, or becomes a main box. A fused box keeps its main
    box's score, label and the mean of its members' coordinates weighted by score x IoU with the main box.
    Shapes and ordering as :func:`nms`.
    """
    return _apply(_vote, boxes_list, scores_list, labels_list, weights=weights, iou_thr=iou_thr,
                  skip_box_thr=skip_box_thr)  # fmt: skip


def wbf(boxes_list: Views, scores_list: Views, labels_list: Views, *, weights: Weights = None, iou_thr: float = 0.55,
        skip_box_thr: float = 0.0, conf_type: ConfType = "avg") -> FusedBoxes:  # fmt: skip
    """Weighted boxes fusion (ensemble-boxes' ``weighted_boxes_fusion``).

    Boxes are taken by weighted score ``s * w_v``; each joins the cluster whose current fused box (the
    weighted-score mean of its members) overlaps it most with IoU > ``iou_thr``, or starts one. The fused
    score of a cluster of n boxes, over V views with weights w:

    - ``avg``: ``sum(s * w_v) / n * min(V, n) / sum(w)``, capped at 1 (ensemble-boxes lets it exceed 1
      when weights differ; it is at most 1 without weights);
    - ``max``: ``max(s * w_v) / max(w)``;
    - ``box_and_model_avg``: ``sum(s * w_v) / sum(w_v) * sum(w of the views present) / sum(w)``;
    - ``absent_model_aware_avg``: ``sum(s * w_v) / (sum(w_v) + sum(w of the views absent))``.

    ensemble-boxes' ``allows_overflow`` (scores above 1) is not offered. Shapes and ordering as :func:`nms`.
    """
    return _apply(_wbf, boxes_list, scores_list, labels_list, weights=weights, iou_thr=iou_thr,
                  skip_box_thr=skip_box_thr, conf_type=conf_type)  # fmt: skip


def fuse_keypoints_mean(
    keypoints: Tensor, weights: Tensor, members: Tensor, clusters: Tensor, num_clusters: int
) -> Tensor:
    """Keypoints of fused objects as the weighted mean of their cluster members' keypoints.

    keypoints: ``[M, K, 3]`` (x, y, score) of the input detections; weights: ``[M]`` >= 0, typically their
    (weighted) box scores; members, clusters: ``[P]`` int64 pairs, input ``members[p]`` belongs to fused
    object ``clusters[p]`` (an input may belong to several objects, or none). Returns
    ``[num_clusters, K, 3]``: x, y and score each averaged with the members' weights; equal weights where
    all of a cluster's weights are 0; zeros for a cluster without members. This is the fusion for models
    that give no heatmaps.
    """
    if keypoints.ndim != 3 or keypoints.shape[2] != 3:
        raise ValueError(f"keypoints must have shape [M, K, 3], got {tuple(keypoints.shape)}")
    m = keypoints.shape[0]
    if tuple(weights.shape) != (m,):
        raise ValueError(f"weights must have shape [{m}], got {tuple(weights.shape)}")
    if members.shape != clusters.shape or members.ndim != 1:
        raise ValueError(
            f"members and clusters must have one shape [P], got {tuple(members.shape)} and {tuple(clusters.shape)}"
        )
    if members.numel() and (int(members.min()) < 0 or int(members.max()) >= m):
        raise ValueError(
            f"members must index the {m} keypoint rows, got range [{int(members.min())}, {int(members.max())}]"
        )
    if clusters.numel() and (int(clusters.min()) < 0 or int(clusters.max()) >= num_clusters):
        raise ValueError(
            f"clusters must index {num_clusters} fused objects, got range "
            f"[{int(clusters.min())}, {int(clusters.max())}]"
        )
    k = keypoints.shape[1]
    kps = keypoints.to(torch.float64)[members]  # [P, K, 3]
    w = weights.to(torch.float64)[members]
    out_shape = (num_clusters, k, 3)
    weighted = torch.zeros(out_shape, dtype=torch.float64, device=kps.device).index_add_(
        0, clusters, kps * w[:, None, None]
    )
    plain = torch.zeros(out_shape, dtype=torch.float64, device=kps.device).index_add_(0, clusters, kps)
    wsum = torch.zeros(num_clusters, dtype=torch.float64, device=kps.device).index_add_(0, clusters, w)
    count = torch.zeros(num_clusters, dtype=torch.float64, device=kps.device).index_add_(
        0, clusters, torch.ones_like(w)
    )
    fused = torch.where(
        (wsum > 0)[:, None, None],
        weighted / wsum.clamp_min(torch.finfo(torch.float64).tiny)[:, None, None],
        plain / count.clamp_min(1.0)[:, None, None],
    )
    return fused.to(keypoints.dtype)


_METHODS: dict[str, Callable[..., _Fused]] = {"nms": _nms, "soft-nms": _soft_nms, "vote": _vote, "wbf": _wbf}
_OPTIONS: dict[str, tuple[str, ...]] = {
    "nms": (),
    "soft-nms": ("sigma", "decay", "min_score", "decayed_scores"),
    "vote": (),
    "wbf": ("conf_type",),
}


def _cluster_keypoints(
    views: Sequence[Detections], fused: _Fused, *, num_clusters: int, device: torch.device
) -> Tensor | None:
    """``[C, K, 3]`` keypoints of each fused cluster (:func:`fuse_keypoints_mean`, weighted by the members'
    weighted box scores), or None when no view has keypoints. Every view with detections must have
    keypoints of one shape."""
    num_keypoints = {tuple(d.keypoints.shape[1:]) for d in views if d.keypoints is not None}
    if len(num_keypoints) > 1:
        raise ValueError(f"views must have the same number of keypoints, got shapes {sorted(num_keypoints)}")
    if not num_keypoints:
        return None
    (shape,) = num_keypoints
    missing = [i for i, d in enumerate(views) if d.keypoints is None and len(d) > 0]
    if missing:
        raise ValueError(f"views {missing} have detections without keypoints while others have keypoints")
    all_kps = torch.cat(
        [(d.keypoints if d.keypoints is not None else torch.zeros((0, *shape))).detach().cpu().float() for d in views]
    )
    return fuse_keypoints_mean(
        all_kps,
        torch.from_numpy(fused.row_weights),
        torch.from_numpy(fused.members),
        torch.from_numpy(fused.clusters),
        num_clusters,
    ).to(device)


def fuse(
    views: Sequence[Detections],
    *,
    method: str,
    iou_thr: float,
    skip_box_thr: float,
    weights: Weights = None,
    crops: Tensor | np.ndarray | None = None,
    **options: object,
) -> Detections:
    """Fuse the detections of several views of one image (all in the original image frame) into one.

    method: ``nms``, ``soft-nms``, ``vote`` (:func:`box_voting`) or ``wbf``; options go to that method
    (``sigma``, ``decay``, ``min_score``, ``decayed_scores`` for soft-NMS, ``conf_type`` for WBF).
    weights: ``[V]`` per-view weights. Returns float32 boxes ``[N, 4]``, scores ``[N]``, int64 labels
    ``[N]`` sorted by score descending, and:

    - ``agreement [N]`` int64: how many distinct views have a box in each object's cluster;
    - ``keypoints [N, K, 3]`` when the views have keypoints: :func:`fuse_keypoints_mean` of the cluster,
      weighted by the members' weighted box scores.

    Clusters: the boxes merged into a fused box (``wbf``, ``vote``); for ``nms`` a kept box and the boxes
    it suppressed (IoU > iou_thr, same class); for ``soft-nms`` a kept box and every box of its class
    ranked after it with IoU > iou_thr (the duplicates it decayed, kept or not: clusters may overlap).

    crops: ``[V, 4]``, the part of the image each view saw (see :func:`fuse_images`; WBF only).
    """
    one_image = [torch.zeros(len(v), dtype=torch.int64) for v in views]
    if crops is not None:
        crops = torch.as_tensor(crops)[:, None]
    (fused,) = fuse_images(views, one_image, 1, method=method, iou_thr=iou_thr, skip_box_thr=skip_box_thr,
                           weights=weights, crops=crops, **options)  # fmt: skip
    return fused


def fuse_images(
    views: Sequence[Detections],
    images: Sequence[Tensor],
    num_images: int,
    *,
    method: str,
    iou_thr: float,
    skip_box_thr: float,
    weights: Weights = None,
    crops: Tensor | np.ndarray | None = None,
    score_floor: float = 0.0,
    **options: object,
) -> list[Detections]:
    """:func:`fuse` for a batch of images in one call: ``views[v]`` holds view v's detections of every
    image (original frames) and ``images[v]`` ``[N_v]`` the image (``0..num_images - 1``) of each of its
    rows. Returns one :class:`Detections` per image, the same as :func:`fuse` on that image's rows of every
    view (same values, same order): the classes of different images never meet, and the compiled loops
    and the bookkeeping run once for the batch instead of once per image.

    ``crops`` ``[V, num_images, 4]``: the part (xyxy px) of each image that each view saw, when some saw only
    a part (tiles). WBF then rescales a fused box's score by the views that could have seen it (those whose
    crop holds it wholly, or that have a member in its cluster) instead of by every view: a box seen by the
    whole-image views and the one tile that holds it is not marked down for the tiles that never saw it.
    The other methods' scores take no view count. ``score_floor``: fused objects scoring below it are dropped."""
    try:
        chosen = _METHODS[method]
    except KeyError:
        raise ValueError(f"method must be one of {sorted(_METHODS)}, got {method!r}") from None
    unknown = sorted(set(options) - set(_OPTIONS[method]))
    if unknown:
        raise ValueError(f"method {method!r} takes the options {list(_OPTIONS[method])}, got {unknown}")
    inputs = _gather([v.boxes for v in views], [v.scores for v in views], [v.labels for v in views])
    image = _image_of_rows(views, images, num_images)
    # Fusion works within label groups: a group per (image, class), numbered in (image, class) order, so
    # that each image's groups come in its classes' order, as they would alone.
    pairs, group = _groups(image, inputs.labels, num_images)
    grouped = _Inputs(inputs.boxes, inputs.scores, group.reshape(-1).astype(np.int64), inputs.views,
                      inputs.num_views, inputs.dtype, inputs.device, _crops(crops, len(views), num_images),
                      pairs)  # fmt: skip
    fused = _run(chosen, grouped, weights, iou_thr=iou_thr, skip_box_thr=skip_box_thr, with_clusters=True, **options)
    boxes, scores, _ = _as_tensors(fused, inputs)
    c = len(fused.scores)
    v = max(inputs.num_views, 1)
    cluster_pairs = np.unique(fused.clusters * v + inputs.views[fused.members])
    agreement = torch.from_numpy(np.bincount(cluster_pairs // v, minlength=c).astype(np.int64)).to(inputs.device)
    out = Detections(
        boxes=boxes.float(),
        scores=scores.float(),
        labels=torch.from_numpy(pairs[fused.labels, 1].copy()).to(inputs.device),
        keypoints=_cluster_keypoints(views, fused, num_clusters=c, device=inputs.device),
        agreement=agreement,
    )
    # A box thinner than float32 resolves at its place (1e-6 px at x = 100) has no width left: drop it, as
    # boxes of zero size are dropped on the way in (a zero-size pseudo-label would fail the student's data).
    solid = (out.boxes[:, 2] > out.boxes[:, 0]) & (out.boxes[:, 3] > out.boxes[:, 1])
    kept = np.flatnonzero((solid & (out.scores >= score_floor)).cpu().numpy())
    image_of_object = pairs[fused.labels[kept], 0]
    order = kept[np.argsort(image_of_object, kind="stable")]  # by image, each in score order
    counts = np.bincount(image_of_object, minlength=num_images).tolist()
    return out.select(torch.from_numpy(order).to(inputs.device)).split(counts)


def _groups(image: np.ndarray, labels: np.ndarray, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (image, label) pairs ``[G, 2]`` in (image, label) order, and each row's pair ``[M]``."""
    if not labels.size:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    low, span = int(labels.min()), int(labels.max()) - int(labels.min()) + 1
    if num_images * span < 2**62:  # one int64 key per row: a 1-D unique is far faster than one over rows
        keys, group = np.unique(image * span + (labels - low), return_inverse=True)
        return np.stack([keys // span, keys % span + low], axis=1), group.reshape(-1)
    pairs, group = np.unique(np.stack([image, labels], axis=1), axis=0, return_inverse=True)
    return pairs.reshape(-1, 2), group.reshape(-1)


def _crops(crops: Tensor | np.ndarray | None, num_views: int, num_images: int) -> np.ndarray | None:
    if crops is None:
        return None
    arr = crops.detach().cpu().double().numpy() if isinstance(crops, Tensor) else np.asarray(crops, np.float64)
    if arr.shape != (num_views, num_images, 4):
        raise ValueError(f"crops must have shape [{num_views}, {num_images}, 4] (views, images, xyxy), got {arr.shape}")
    return arr


def _image_of_rows(views: Sequence[Detections], images: Sequence[Tensor], num_images: int) -> np.ndarray:
    """``[M]`` int64: the image of every row of the views' concatenation, checked."""
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if len(images) != len(views):
        raise ValueError(f"images needs one entry per view ({len(views)}), got {len(images)}")
    parts = []
    for v, (det, img) in enumerate(zip(views, images, strict=True)):
        img = torch.as_tensor(img)
        if tuple(img.shape) != (len(det),) or img.dtype.is_floating_point:
            raise ValueError(f"images of view {v} must be [{len(det)}] integers, got {tuple(img.shape)} {img.dtype}")
        parts.append(img.detach().cpu().numpy().astype(np.int64))
    image = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if image.size and (image.min() < 0 or image.max() >= num_images):
        raise ValueError(f"images must be in 0..{num_images - 1}, got {int(image.min())}..{int(image.max())}")
    return image
