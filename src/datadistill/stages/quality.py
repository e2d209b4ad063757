"""How good pseudo-labels are, against held-back true labels: precision and recall at a score threshold.

A pseudo object is a true positive when it matches a still-unmatched true object of the same class with
box IoU >= ``iou_thr``, greedily in order of decreasing score (COCO's matching at one IoU threshold).
Crowd annotations are left out on both sides (a pseudo-label file's are ignore regions, not objects).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from datadistill.data.coco import Category, CocoDataset, ImageLabels, ImageRecord


@dataclass(frozen=True)
class MatchedScores:
    """Every candidate's score and whether it is a true positive, plus the number of true objects."""

    scores: np.ndarray
    true_positive: np.ndarray
    num_truth: int

    def at(self, threshold: float) -> dict[str, float]:
        keep = self.scores >= threshold
        tp = int(self.true_positive[keep].sum())
        kept = int(keep.sum())
        return {
            "threshold": float(threshold),
            "kept": kept,
            "precision": tp / kept if kept else 1.0,
            "recall": tp / self.num_truth if self.num_truth else 1.0,
        }

    def curve(self, thresholds: np.ndarray) -> list[dict[str, float]]:
        return [self.at(float(t)) for t in thresholds]


def match_shards(
    labels_dir: str | Path, truth: CocoDataset, *, class_names: tuple[str, ...], iou_thr: float = 0.5
) -> MatchedScores:
    """Match every candidate of a labeling folder (all scores above the floor) to the true labels, so that
    precision and recall can be read at any threshold. The shards are read one at a time and only the images
    that ``truth`` holds are kept (the others have nothing to match), so memory follows the truth's size."""
    from datadistill.data.label_folder import iter_shards, open_label_folder

    wanted = {im.file_name for im in truth.images}
    images, labels = [], {}
    columns = ["file_name", "width", "height", "boxes", "scores", "labels", "error"]
    for _, table in iter_shards(open_label_folder(labels_dir, complete=False), columns):
        names = table["file_name"].to_pylist()
        ok = table["error"].is_null().to_numpy(zero_copy_only=False)
        rows = [i for i, name in enumerate(names) if ok[i] and name in wanted]
        for r in table.take(rows).to_pylist() if rows else []:
            n, i = len(r["scores"]), len(images) + 1
            images.append(
                ImageRecord(id=i, file_name=r["file_name"], width=max(1, r["width"]), height=max(1, r["height"]))
            )
            labels[i] = ImageLabels(
                ids=np.arange(n, dtype=np.int64),
                boxes=np.asarray(r["boxes"], np.float32).reshape(n, 4),
                labels=np.asarray(r["labels"], np.int64),
                iscrowd=np.zeros(n, bool),
                area=np.zeros(n, np.float32),
                scores=np.asarray(r["scores"], np.float32),
            )
    categories = tuple(Category(id=i + 1, name=n) for i, n in enumerate(class_names))
    pseudo = CocoDataset(images=tuple(images), labels=labels, categories=categories)
    return match_pseudo_labels(pseudo, truth, iou_thr=iou_thr)


def match_objects(
    pseudo: CocoDataset, truth: CocoDataset, iou_thr: float
) -> Iterator[tuple[int, ImageLabels, ImageLabels, np.ndarray, np.ndarray]]:
    """Per paired image: the pseudo and true labels without crowd, and for each pseudo object the index of
    the true object it matched (-1: none), greedily by decreasing score within the same class."""
    truth_by_name = {im.file_name: im.id for im in truth.images}
    class_map = {i: truth.class_names.index(n) for i, n in enumerate(pseudo.class_names) if n in truth.class_names}
    for im in pseudo.images:
        tid = truth_by_name.get(im.file_name)
        if tid is None:
            continue
        p, t = _without_crowd(pseudo.labels[im.id]), _without_crowd(truth.labels[tid])
        scores = p.scores if p.scores is not None else np.ones(len(p), np.float32)
        labels = np.array([class_map.get(int(c), -1) for c in p.labels], np.int64)
        match = np.full(len(p), -1, np.int64)
        if len(p) and len(t):
            iou = box_iou(torch.from_numpy(p.boxes), torch.from_numpy(t.boxes)).numpy()
            used = np.zeros(len(t), bool)
            for j in np.argsort(-scores, kind="stable"):
                cand = (t.labels == labels[j]) & ~used & (iou[j] >= iou_thr)
                if cand.any():
                    k = int(np.argmax(np.where(cand, iou[j], -1)))
                    used[k] = True
                    match[j] = k
        yield tid, p, t, scores, match


def _without_crowd(lab: ImageLabels) -> ImageLabels:
    if not lab.iscrowd.any():
        return lab
    keep = ~lab.iscrowd
    fields = ("ids", "boxes", "labels", "iscrowd", "area", "keypoints", "scores", "agreement")
    return dataclasses.replace(lab, **{k: getattr(lab, k)[keep] for k in fields if getattr(lab, k) is not None})


def match_pseudo_labels(pseudo: CocoDataset, truth: CocoDataset, *, iou_thr: float = 0.5) -> MatchedScores:
    """Match the pseudo-labels (a data set whose annotations carry ``score``) to the true labels; images are
    paired by ``file_name`` and classes by name. True objects of images missing from ``pseudo`` count as
    missed."""
    all_scores, all_tp = [], []
    num_truth = 0
    paired: set[int] = set()
    for tid, _, t, scores, match in match_objects(pseudo, truth, iou_thr):
        paired.add(tid)
        num_truth += len(t)
        all_scores.append(scores)
        all_tp.append(match >= 0)
    # true objects on images the pseudo file left out (dropped as empty, or skipped) count as missed
    num_truth += sum(int((~lab.iscrowd).sum()) for tid, lab in truth.labels.items() if tid not in paired)
    return MatchedScores(
        scores=np.concatenate(all_scores) if all_scores else np.zeros(0, np.float32),
        true_positive=np.concatenate(all_tp) if all_tp else np.zeros(0, bool),
        num_truth=num_truth,
    )


def keypoint_errors(pseudo: CocoDataset, truth: CocoDataset, *, iou_thr: float = 0.5, bins: int = 28) -> np.ndarray:
    """The position errors of the pseudo keypoints, in heatmap bins: for every keypoint labeled (v > 0) in
    both a pseudo object and the true object it matches (:func:`match_pseudo_labels`' matching), the signed
    error ``(dx, dy)`` divided by the true box's width and height over ``bins`` (the student's heatmap spans
    its box with ``bins`` bins a side; 28 for ``small_keypointrcnn``). Returns ``[M, 2]``."""
    out = []
    for _, p, t, _, match in match_objects(pseudo, truth, iou_thr):
        if p.keypoints is None or t.keypoints is None:
            continue
        for j in np.flatnonzero(match >= 0):
            kp, kt = p.keypoints[j], t.keypoints[match[j]]
            both = (kp[:, 2] > 0) & (kt[:, 2] > 0)
            x1, y1, x2, y2 = t.boxes[match[j]]
            size = np.array([max(x2 - x1, 1e-9), max(y2 - y1, 1e-9)]) / bins
            out.append((kp[both, :2] - kt[both, :2]) / size)
    return np.concatenate(out) if out else np.zeros((0, 2))
