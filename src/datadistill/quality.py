"""How good pseudo-labels are, against held-back true labels: precision and recall at a score threshold.

A pseudo object is a true positive when it matches a still-unmatched true object of the same class with
box IoU >= ``iou_thr``, greedily in order of decreasing score (COCO's matching at one IoU threshold).
Crowd annotations are left out on both sides (a pseudo-label file's are ignore regions, not objects).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from datadistill.coco import Category, CocoDataset, ImageLabels, ImageRecord


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
    precision and recall can be read at any threshold."""
    from datadistill.label import read_shards

    table = read_shards(labels_dir, columns=["file_name", "width", "height", "boxes", "scores", "labels", "error"])
    rows = [r for r in table.to_pylist() if r["error"] is None]
    images, labels = [], {}
    for i, r in enumerate(rows, 1):
        n = len(r["scores"])
        images.append(ImageRecord(id=i, file_name=r["file_name"], width=max(1, r["width"]), height=max(1, r["height"])))
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


def match_pseudo_labels(pseudo: CocoDataset, truth: CocoDataset, *, iou_thr: float = 0.5) -> MatchedScores:
    """Match the pseudo-labels (a data set whose annotations carry ``score``) to the true labels; images are
    paired by ``file_name`` and classes by name. True objects of images missing from ``pseudo`` count as
    missed."""
    truth_by_name = {im.file_name: im.id for im in truth.images}
    class_map = {i: truth.class_names.index(n) for i, n in enumerate(pseudo.class_names) if n in truth.class_names}
    all_scores, all_tp = [], []
    num_truth = 0
    paired: set[int] = set()
    for im in pseudo.images:
        tid = truth_by_name.get(im.file_name)
        if tid is None:
            continue
        paired.add(tid)
        p, t = pseudo.labels[im.id], truth.labels[tid]
        if p.iscrowd.any():
            p = dataclasses.replace(
                p,
                **{
                    k: getattr(p, k)[~p.iscrowd]
                    for k in ("ids", "boxes", "labels", "iscrowd", "area", "keypoints", "scores", "agreement")
                    if getattr(p, k) is not None
                },  # fmt: skip
            )
        t_keep = ~t.iscrowd
        t_boxes, t_labels = torch.from_numpy(t.boxes[t_keep]), t.labels[t_keep]
        num_truth += int(t_keep.sum())
        scores = p.scores if p.scores is not None else np.ones(len(p), np.float32)
        order = np.argsort(-scores, kind="stable")
        labels = np.array([class_map.get(int(c), -1) for c in p.labels], np.int64)
        tp = np.zeros(len(p), bool)
        if len(p) and len(t_boxes):
            iou = box_iou(torch.from_numpy(p.boxes), t_boxes).numpy()
            used = np.zeros(len(t_boxes), bool)
            for j in order:
                cand = (t_labels == labels[j]) & ~used & (iou[j] >= iou_thr)
                if cand.any():
                    k = int(np.argmax(np.where(cand, iou[j], -1)))
                    used[k] = True
                    tp[j] = True
        all_scores.append(scores)
        all_tp.append(tp)
    # true objects on images the pseudo file left out (dropped as empty, or skipped) count as missed
    num_truth += sum(int((~lab.iscrowd).sum()) for tid, lab in truth.labels.items() if tid not in paired)
    return MatchedScores(
        scores=np.concatenate(all_scores) if all_scores else np.zeros(0, np.float32),
        true_positive=np.concatenate(all_tp) if all_tp else np.zeros(0, bool),
        num_truth=num_truth,
    )
