"""core.uncertainty: the views' score and box spread of each fused object, against hand-computed numbers and a
slow loop-per-object reference; and its agreement with fusion's own count of the views."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datadistill.core import fusion
from datadistill.core.types import Detections
from datadistill.core.uncertainty import match_views, view_spread
from datadistill.data.label_folder import object_values
from datadistill.models import torchvision as models
from datadistill.stages.label import LabelConfig, label, read_shards, shard_detections


def _det(boxes: list[list[float]], scores: list[float], labels: list[int] | None = None) -> Detections:
    n = len(scores)
    return Detections(
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
        scores=torch.tensor(scores, dtype=torch.float32),
        labels=torch.tensor(labels if labels is not None else [0] * n, dtype=torch.int64),
    )


def _iou(a: list[float], b: list[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _reference(fused: Detections, views: list[Detections], iou_thr: float) -> tuple[list[float], list[float]]:
    """One object at a time, in plain Python floats: the module docstring's definitions."""
    score_spread, box_spread = [], []
    for i in range(len(fused)):
        fb = [float(v) for v in fused.boxes[i]]
        scores, matched = [], []
        for view in views:
            best, best_iou = None, -1.0
            for j in range(len(view)):
                if int(view.labels[j]) != int(fused.labels[i]):
                    continue
                iou = _iou(fb, [float(v) for v in view.boxes[j]])
                if iou > iou_thr and iou > best_iou:
                    best, best_iou = j, iou
            scores.append(0.0 if best is None else float(view.scores[best]))
            if best is not None:
                matched.append([float(v) for v in view.boxes[best]])
        mean = sum(scores) / len(scores)
        score_spread.append(math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores)))
        if len(matched) < 2:
            box_spread.append(0.0)
            continue
        size = [fb[2] - fb[0], fb[3] - fb[1]] * 2
        stds = []
        for c in range(4):
            col = [b[c] for b in matched]
            m = sum(col) / len(col)
            stds.append(math.sqrt(sum((x - m) ** 2 for x in col) / len(col)) / size[c])
        box_spread.append(sum(stds) / 4)
    return score_spread, box_spread


def test_hand_computed_object() -> None:
    fused = _det([[0, 0, 10, 10]], [0.9])
    views = [
        _det([[0, 0, 10, 10]], [0.9]),
        _det([[1, 1, 11, 11], [0, 0, 10, 10]], [0.5, 0.3], [0, 1]),  # the class-1 twin is not a match
        _det([[30, 30, 40, 40]], [0.8]),  # elsewhere: a miss
    ]
    out = view_spread(fused, views, iou_thr=0.5)
    # scores 0.9, 0.5, 0 -> mean 0.4667, population std sqrt((0.4333^2 + 0.0333^2 + 0.4667^2) / 3)
    assert float(out.score_spread[0]) == pytest.approx(math.sqrt((0.4333333**2 + 0.0333333**2 + 0.4666667**2) / 3))
    # matched x1 0 and 1 (std 0.5) over width 10, the same for every coordinate
    assert float(out.box_spread[0]) == pytest.approx(0.05)
    assert out.boxes is fused.boxes and out.score_spread.dtype == torch.float32


@pytest.mark.parametrize(
    ("view_box", "matched"),
    [([0.0, 0.0, 10.0, 5.0], False),  # IoU exactly 0.5: fusion matches on IoU > thr, so does this
     ([0.0, 0.0, 10.0, 5.01], True)],  # just above
)  # fmt: skip
def test_iou_threshold_is_strict(view_box: list[float], matched: bool) -> None:
    fused = _det([[0, 0, 10, 10]], [0.8])
    seen, scores, boxes = match_views(fused, [_det([view_box], [0.6])], iou_thr=0.5)
    assert bool(seen[0, 0]) is matched
    assert float(scores[0, 0]) == pytest.approx(0.6 if matched else 0.0)
    assert bool(torch.isnan(boxes[0, 0]).all()) is not matched


def test_the_best_overlap_of_a_view_is_its_match() -> None:
    fused = _det([[0, 0, 10, 10]], [0.8])
    seen, scores, _ = match_views(fused, [_det([[0, 0, 10, 8], [0, 0, 10, 9.5]], [0.9, 0.2])], iou_thr=0.5)
    assert bool(seen[0, 0]) and float(scores[0, 0]) == pytest.approx(0.2)  # IoU 0.95 beats 0.8, not the score


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.uniform(20, 180, (6, 2))
    views = []
    for _ in range(5):
        keep = rng.random(6) < 0.7
        c = centres[keep] + rng.normal(0, 2.0, (int(keep.sum()), 2))
        half = rng.uniform(6, 12, (len(c), 2))
        boxes = np.concatenate([c - half, c + half], 1).tolist()
        views.append(_det(boxes, rng.uniform(0.05, 1, len(c)).tolist(), rng.integers(0, 2, len(c)).tolist()))
    fused = fusion.fuse(views, method="nms", iou_thr=0.5, skip_box_thr=0.0)
    out = view_spread(fused, views, iou_thr=0.5)
    score_ref, box_ref = _reference(fused, views, 0.5)
    np.testing.assert_allclose(out.score_spread.numpy(), score_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.box_spread.numpy(), box_ref, rtol=1e-5, atol=1e-7)
    assert len(fused) > 3 and float(out.box_spread.max()) > 0


def test_seen_views_are_fusions_agreement_for_separated_objects() -> None:
    rng = np.random.default_rng(7)
    centres = np.array([[30.0, 30.0], [100.0, 40.0], [60.0, 120.0]])
    views = []
    for v in range(4):
        c = centres[: v + 1 if v < 3 else 3] + rng.normal(0, 1.0, (min(v + 1, 3), 2))
        views.append(_det(np.concatenate([c - 10, c + 10], 1).tolist(), rng.uniform(0.3, 1, len(c)).tolist()))
    fused = fusion.fuse(views, method="nms", iou_thr=0.5, skip_box_thr=0.0)
    seen, _, _ = match_views(fused, views, iou_thr=0.5)
    assert fused.agreement is not None
    np.testing.assert_array_equal(seen.sum(1).numpy(), fused.agreement.numpy())
    assert sorted(fused.agreement.tolist()) == [2, 3, 4]


def test_one_view_and_no_objects() -> None:
    fused = _det([[0, 0, 10, 10]], [0.9])
    alone = view_spread(fused, [_det([[0, 0, 10, 10]], [0.9])], iou_thr=0.5)
    assert alone.score_spread.tolist() == [0.0] and alone.box_spread.tolist() == [0.0]
    empty = view_spread(Detections.empty(), [Detections.empty(), _det([[0, 0, 5, 5]], [0.4])], iou_thr=0.5)
    assert empty.score_spread.shape == (0,) and empty.box_spread.shape == (0,)
    missed = view_spread(fused, [Detections.empty(), Detections.empty()], iou_thr=0.5)
    assert missed.score_spread.tolist() == [0.0] and missed.box_spread.tolist() == [0.0]
    kept = view_spread(fused, [fused, Detections.empty()], iou_thr=0.5)
    assert kept.select(torch.tensor([True])).score_spread.tolist() == pytest.approx([0.45])  # select carries it


@pytest.mark.parametrize(
    ("call", "message"),
    [(lambda f: view_spread(f, [], iou_thr=0.5), "at least one view"),
     (lambda f: view_spread(f, [f], iou_thr=1.0), "iou_thr must be in"),
     (lambda f: Detections(f.boxes, f.scores, f.labels, score_spread=torch.zeros(2)), r"score_spread must have "
      r"shape \[1\]"),
     (lambda f: Detections(f.boxes, f.scores, f.labels, box_spread=torch.zeros(1, 1)), "box_spread must have")],
)  # fmt: skip
def test_bad_input(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call(_det([[0, 0, 10, 10]], [0.9]))


# ---------------------------------------------------------------------------------------------------------
# End to end: `label` stores the spreads (multiview.fuse_views calls view_spread after fusion).


def test_label_stores_the_views_spread(tmp_path: Path) -> None:
    torch.manual_seed(0)
    meta = models.ModelMeta(model="small_fcos", task="boxes", class_names=("blob",), category_ids=(1,),
                            keypoint_names=(), flip_index=(), skeleton=(), sigmas=(), min_size=64, max_size=64)  # fmt: skip
    models.save_checkpoint(tmp_path / "checkpoint.pt", model=models.build_model(meta), meta=meta)
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    cfg = LabelConfig(checkpoint=str(tmp_path / "checkpoint.pt"), images=str(tmp_path / "images"),
                      out=str(tmp_path / "labels"), views="identity,hflip,scale:0.75", workers=0, device="cpu",
                      allow_weak_teacher=True)  # fmt: skip
    label(cfg)
    table = read_shards(tmp_path / "labels")
    score_spread, box_spread = object_values(table, "score_spread"), object_values(table, "box_spread")
    assert len(score_spread) > 0 and np.isfinite(score_spread).all() and np.isfinite(box_spread).all()
    assert (score_spread >= 0).all() and (score_spread <= 0.5).all() and (box_spread >= 0).all()
    assert shard_detections(table.to_pylist()[0], 0).score_spread is not None
