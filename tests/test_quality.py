"""Pseudo-label quality against held-back labels: greedy matching, precision/recall, keypoint errors in bins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datadistill.data.coco import load_coco
from datadistill.stages.quality import keypoint_errors, match_pseudo_labels

CATS = [{"id": 1, "name": "a", "keypoints": ["p", "q"]}, {"id": 2, "name": "b", "keypoints": ["p", "q"]}]


def _write(path: Path, images: list[str], anns: list[dict]) -> Path:
    imgs = [{"id": i, "file_name": n, "width": 100, "height": 100} for i, n in enumerate(images, 1)]
    for i, a in enumerate(anns, 1):
        a.setdefault("iscrowd", 0)
        a["id"] = i
    path.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": CATS}))
    return path


def _ann(image_id: int, box: list[float], cat: int = 1, **extra) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": box, "keypoints": [0.0] * 6, **extra}


@pytest.fixture
def truth(tmp_path: Path):
    kp = [12.0, 14.0, 2, 20.0, 30.0, 1]
    return load_coco(_write(tmp_path / "truth.json", ["x.png", "y.png", "z.png"], [
        _ann(1, [10, 10, 28, 28], keypoints=kp), _ann(1, [60, 60, 20, 20]),
        _ann(2, [0, 0, 50, 50], cat=2), _ann(2, [70, 0, 30, 30], iscrowd=1),  # the crowd one is no object
        _ann(3, [5, 5, 10, 10]),  # z.png is missing from the pseudo-labels: its object counts as missed
    ]))  # fmt: skip


def test_matching_counts_class_iou_and_missing_images(tmp_path: Path, truth) -> None:
    pseudo = load_coco(_write(tmp_path / "p.json", ["y.png", "x.png"], [
        _ann(2, [10, 10, 28, 28], score=0.9), _ann(2, [11, 10, 28, 28], score=0.8),  # the 2nd: a duplicate
        _ann(2, [60, 60, 20, 20], cat=2, score=0.7),  # wrong class
        _ann(1, [0, 0, 50, 50], cat=2, score=0.6), _ann(1, [0, 0, 20, 50], cat=2, score=0.95),  # IoU 0.4: no
    ]))  # fmt: skip
    m = match_pseudo_labels(pseudo, truth)
    assert m.num_truth == 4
    assert m.at(0.0) == {"threshold": 0.0, "kept": 5, "precision": pytest.approx(2 / 5), "recall": 2 / 4}
    assert m.at(0.85) == {"threshold": 0.85, "kept": 2, "precision": 1 / 2, "recall": 1 / 4}
    assert match_pseudo_labels(pseudo, truth, iou_thr=0.3).at(0.0)["kept"] == 5


def test_keypoint_errors_are_in_bins_of_the_true_box(tmp_path: Path, truth) -> None:
    # the true box is 28 px wide and high: one heatmap bin of 28 is one pixel; with bins=7 it is 4 px
    pseudo = load_coco(_write(tmp_path / "p.json", ["x.png"], [
        _ann(1, [10, 10, 28, 28], score=0.9, keypoints=[15.0, 12.0, 2, 0.0, 0.0, 0]),  # q unlabeled: left out
        _ann(1, [60, 60, 20, 20], score=0.8, keypoints=[70.0, 70.0, 2, 71.0, 71.0, 2]),  # truth has none
    ]))  # fmt: skip
    np.testing.assert_allclose(keypoint_errors(pseudo, truth), [[3.0, -2.0]])
    np.testing.assert_allclose(keypoint_errors(pseudo, truth, bins=7), [[0.75, -0.5]])
    assert keypoint_errors(load_coco(_write(tmp_path / "none.json", ["x.png"], [])), truth).shape == (0, 2)
