"""COCO evaluation: our metrics against pycocotools (the oracle) on real COCO files and seeded synthetic data."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datadistill.core.types import Detections
from datadistill.data.coco import CocoDataset, ImageLabels, load_coco, parse_coco, to_coco_dict
from datadistill.errors import DataError, UserError
from datadistill.stages.evaluate import (
    BBOX_KEYS,
    KEYPOINT_KEYS,
    evaluate_predictions,
    evaluate_results,
    format_metrics,
    load_predictions,
    results_from_predictions,
    write_metrics,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cocoapi"
BOX_GT = FIXTURES / "instances_val2014_100.json"
BOX_DT = FIXTURES / "instances_val2014_fakebbox100_results.json"
KP_GT = FIXTURES / "keypoints_gt.json"
KP_DT = FIXTURES / "keypoints_dt.json"

# faster-coco-eval computes precision as tp / (tp + fp), pycocotools as tp / (tp + fp + np.spacing(1)). The
# two differ only where tp + fp == 1 (1.0 against 1 - 2**-52), which moves a mean of precisions by at most
# one machine epsilon (seen: AP50 of the box fixture, 1 ulp). Anything real moves a summary by far more.
# Comparisons that must be bit-identical pass max_abs=0.
EVALUATOR_ULP = float(np.spacing(1.0))


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def pycocotools_stats(
    gt: Path | dict[str, Any], results: list[dict[str, Any]], iou_type: str, *, sigmas: Any = None
) -> list[float]:
    """COCOeval.stats for ``results`` against ``gt`` (a file, or a COCO dict)."""
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(gt, Path):
            coco_gt = COCO(str(gt))
        else:
            coco_gt = COCO()
            coco_gt.dataset = copy.deepcopy(gt)
            coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if sigmas is not None:
            evaluator.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def assert_same_stats(ours: dict[str, float | None], stats: list[float], keys: tuple[str, ...], *, max_abs: float):
    assert tuple(ours) == keys
    assert len(stats) == len(keys)
    for key, want in zip(keys, stats, strict=True):
        got = ours[key]
        if want == -1:
            assert got is None, f"{key}: COCO says -1 (nothing to average), we say {got!r}"
        else:
            assert got is not None and abs(got - want) <= max_abs, f"{key}: ours {got!r}, pycocotools {want!r}"


def _detections(boxes: Any, scores: Any, labels: Any, keypoints: Any = None) -> Detections:
    return Detections(
        boxes=torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4)),
        scores=torch.as_tensor(np.asarray(scores, np.float32)),
        labels=torch.as_tensor(np.asarray(labels, np.int64)),
        keypoints=None if keypoints is None else torch.as_tensor(np.asarray(keypoints, np.float32)),
    )


def _gt_as_predictions(gt: CocoDataset, *, shift: float = 0.0, need_keypoints: bool = False) -> dict[int, Detections]:
    """Every non-crowd ground-truth object as a detection with score 1, moved right by ``shift`` box widths."""
    predictions = {}
    for iid, lab in gt.labels.items():
        keep = ~lab.iscrowd
        if need_keypoints:
            keep &= (lab.keypoints[:, :, 2] > 0).any(axis=1)
        boxes = lab.boxes[keep].copy()
        widths = boxes[:, 2] - boxes[:, 0]
        boxes[:, [0, 2]] += shift * widths[:, None]
        kps = None
        if lab.keypoints is not None:
            kps = lab.keypoints[keep].copy()
            kps[:, :, 0] += shift * widths[:, None]
        predictions[iid] = _detections(boxes, np.ones(len(boxes)), lab.labels[keep], kps)
    return predictions


def _keypoint_dataset(*, num_images: int = 12, sigmas: list[float] | None = None, seed: int = 0) -> CocoDataset:
    """People-like objects with 5 keypoints each, in images of 200x160 px."""
    rng = np.random.default_rng(seed)
    names = ["head", "left_hand", "right_hand", "left_foot", "right_foot"]
    category: dict[str, Any] = {"id": 3, "name": "figure", "keypoints": names, "skeleton": [[1, 2], [1, 3]]}
    if sigmas is not None:
        category["sigmas"] = sigmas
    images, annotations = [], []
    for i in range(num_images):
        images.append({"id": 100 + i, "file_name": f"im{i}.png", "width": 200, "height": 160})
        for _ in range(rng.integers(1, 4)):
            w, h = rng.uniform(20, 90), rng.uniform(30, 100)
            x, y = rng.uniform(0, 200 - w), rng.uniform(0, 160 - h)
            kx, ky = x + rng.uniform(0, w, 5), y + rng.uniform(0, h, 5)
            kps = np.stack([kx, ky, np.full(5, 2.0)], axis=1).reshape(-1).tolist()
            annotations.append(
                {"id": len(annotations) + 1, "image_id": 100 + i, "category_id": 3, "bbox": [x, y, w, h],
                 "area": w * h, "iscrowd": 0, "keypoints": kps, "num_keypoints": 5}
            )  # fmt: skip
    dataset, problems = parse_coco({"images": images, "annotations": annotations, "categories": [category]})
    assert not problems
    return dataset


# ----------------------------------------------------------------------------------------------------
# parity with pycocotools on real COCO files


def test_fixture_path_is_the_shared_cocoapi_folder():
    assert FIXTURES.is_dir(), FIXTURES
    assert {p.name for p in FIXTURES.glob("*.json")} >= {BOX_GT.name, BOX_DT.name, KP_GT.name, KP_DT.name}


def test_box_fixture_matches_pycocotools_on_the_loaded_ground_truth():
    gt = load_coco(BOX_GT)
    results = load_predictions(BOX_DT, gt)
    metrics = evaluate_results(gt, results)
    assert set(metrics) == {"bbox"}
    expected = pycocotools_stats(to_coco_dict(gt), results, "bbox")
    assert_same_stats(metrics["bbox"], expected, BBOX_KEYS, max_abs=EVALUATOR_ULP)
    assert metrics["bbox"]["AP"] == pytest.approx(0.504, abs=1e-3)  # the number cocoapi's demo prints


def test_box_fixture_matches_pycocotools_on_the_file():
    gt = load_coco(BOX_GT)
    metrics = evaluate_results(gt, load_predictions(BOX_DT, gt))
    assert_same_stats(
        metrics["bbox"], pycocotools_stats(BOX_GT, _read(BOX_DT), "bbox"), BBOX_KEYS, max_abs=EVALUATOR_ULP
    )


def test_keypoint_fixture_matches_pycocotools_exactly():
    gt = load_coco(KP_GT)
    results = load_predictions(KP_DT, gt)
    metrics = evaluate_results(gt, results)
    assert set(metrics) == {"bbox", "keypoints"}
    assert_same_stats(
        metrics["keypoints"], pycocotools_stats(KP_GT, _read(KP_DT), "keypoints"), KEYPOINT_KEYS, max_abs=0
    )
    assert_same_stats(metrics["bbox"], pycocotools_stats(KP_GT, _read(KP_DT), "bbox"), BBOX_KEYS, max_abs=0)
    assert metrics["keypoints"]["AP"] > 0.5


def test_faster_coco_eval_matches_pycocotools_on_seeded_random_boxes():
    rng = np.random.default_rng(20180601)
    images, annotations, results = [], [], []
    for i in range(40):
        width, height = int(rng.integers(200, 640)), int(rng.integers(200, 480))
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": width, "height": height})
        for _ in range(int(rng.integers(0, 8))):
            w = float(rng.uniform(4, width / 2))
            h = float(rng.uniform(4, height / 2))
            x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
            cid = int(rng.integers(1, 4))
            crowd = int(rng.random() < 0.05)
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i + 1, "category_id": cid, "bbox": [x, y, w, h],
                 "area": w * h, "iscrowd": crowd}
            )  # fmt: skip
            if rng.random() < 0.85:  # a jittered detection
                jx, jy, jw, jh = rng.normal(0, 0.08, 4) * [w, h, w, h]
                box = [x + jx, y + jy, max(w + jw, 1.0), max(h + jh, 1.0)]
                label = cid if rng.random() < 0.9 else int(rng.integers(1, 4))
                results.append({"image_id": i + 1, "category_id": label, "bbox": box, "score": float(rng.random())})
        for _ in range(int(rng.integers(0, 3))):  # false positives
            w, h = float(rng.uniform(4, 100)), float(rng.uniform(4, 100))
            box = [float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), w, h]
            results.append({"image_id": i + 1, "category_id": int(rng.integers(1, 4)), "bbox": box,
                            "score": float(rng.random())})  # fmt: skip
    categories = [{"id": c, "name": f"class{c}"} for c in (1, 2, 3)]
    gt_dict = {"images": images, "annotations": annotations, "categories": categories}
    gt, problems = parse_coco(copy.deepcopy(gt_dict))
    assert not problems
    metrics = evaluate_results(gt, results)
    assert_same_stats(
        metrics["bbox"], pycocotools_stats(to_coco_dict(gt), results, "bbox"), BBOX_KEYS, max_abs=EVALUATOR_ULP
    )
    assert 0.2 < metrics["bbox"]["AP"] < 0.9  # a case with hits and misses, not a degenerate one


# ----------------------------------------------------------------------------------------------------
# numeric oracles on constructed predictions


@pytest.mark.parametrize(
    ("gt_path", "task"),
    [(BOX_GT, "bbox"), (KP_GT, "keypoints")],
    ids=["boxes: all non-crowd objects", "keypoints: all objects with a visible keypoint"],
)
def test_perfect_predictions_score_one(gt_path: Path, task: str):
    gt = load_coco(gt_path)
    metrics = evaluate_predictions(gt, _gt_as_predictions(gt, need_keypoints=task == "keypoints"))
    assert metrics[task]["AP"] == 1.0
    assert metrics[task]["AP50"] == 1.0
    # AR1 and AR10 cap the detections per image below the objects some images hold
    assert all(v in (1.0, None) for k, v in metrics[task].items() if k not in ("AR1", "AR10"))


@pytest.mark.parametrize("gt_path", [BOX_GT, KP_GT], ids=["boxes", "keypoints"])
def test_empty_predictions_score_zero(gt_path: Path):
    gt = load_coco(gt_path)
    for metrics in (evaluate_predictions(gt, {}), evaluate_results(gt, [])):
        assert set(metrics) == ({"bbox", "keypoints"} if gt.num_keypoints else {"bbox"})
        for values in metrics.values():
            assert values["AP"] == 0.0
            assert all(v in (0.0, None) for v in values.values())


def test_half_box_shift_lowers_ap50():
    gt = load_coco(BOX_GT)
    metrics = evaluate_predictions(gt, _gt_as_predictions(gt, shift=0.5))  # IoU 1/3 with its object
    assert metrics["bbox"]["AP50"] < 1.0
    assert metrics["bbox"]["AP"] < 0.1


def test_images_without_ground_truth_or_predictions_are_fine():
    gt = _keypoint_dataset(num_images=3)
    empty = replace(gt.images[0], id=999, file_name="empty.png")
    gt = replace(gt, images=(*gt.images, empty), labels={**gt.labels, 999: ImageLabels.empty(num_keypoints=5)})
    predictions = _gt_as_predictions(gt)
    predictions[999] = Detections.empty(num_keypoints=5)
    metrics = evaluate_predictions(gt, predictions)
    assert metrics["bbox"]["AP"] == 1.0 and metrics["keypoints"]["AP"] == 1.0


def test_size_ranges_without_ground_truth_are_none_not_minus_one():
    gt = _keypoint_dataset(num_images=4)  # every object is between 20x30 and 90x100 px: no small, no large
    metrics = evaluate_predictions(gt, _gt_as_predictions(gt))
    assert metrics["bbox"]["APl"] is None and metrics["bbox"]["ARl"] is None
    assert metrics["keypoints"]["APl"] is None and metrics["keypoints"]["ARl"] is None
    assert metrics["bbox"]["APm"] == 1.0
    assert json.loads(json.dumps(metrics)) == metrics


def test_custom_sigmas_change_keypoint_ap_and_match_pycocotools():
    narrow, wide = [0.02] * 5, [0.2] * 5
    ap = {}
    for name, sigmas in (("narrow", narrow), ("wide", wide)):
        gt = _keypoint_dataset(sigmas=sigmas)
        assert gt.keypoint_category.sigmas == tuple(sigmas)
        rng = np.random.default_rng(7)
        predictions = {}
        for iid, lab in gt.labels.items():
            kps = lab.keypoints.copy()
            kps[:, :, :2] += rng.normal(0, 3.0, kps[:, :, :2].shape).astype(np.float32)  # 3 px jitter
            kps[:, :, 2] = 0.9
            predictions[iid] = _detections(lab.boxes, rng.uniform(0.5, 1.0, len(lab)), lab.labels, kps)
        metrics = evaluate_predictions(gt, predictions)
        results = results_from_predictions(gt, predictions)
        expected = pycocotools_stats(to_coco_dict(gt), results, "keypoints", sigmas=sigmas)
        assert_same_stats(metrics["keypoints"], expected, KEYPOINT_KEYS, max_abs=EVALUATOR_ULP)
        ap[name] = metrics["keypoints"]["AP"]
    assert ap["narrow"] < ap["wide"] - 0.1


# ----------------------------------------------------------------------------------------------------
# conversions and files


def test_results_from_predictions_gives_xywh_category_ids_and_flat_keypoints():
    gt = _keypoint_dataset(num_images=1)
    iid = gt.images[0].id
    det = _detections([[10, 20, 40, 70]], [0.75], [0], [[[1, 2, 0.5]] * 5])
    (rec,) = results_from_predictions(gt, {iid: det})
    assert rec == {"image_id": iid, "category_id": 3, "bbox": [10.0, 20.0, 30.0, 50.0], "score": 0.75,
                   "keypoints": [1.0, 2.0, 0.5] * 5}  # fmt: skip


@pytest.mark.parametrize(
    ("predictions", "message"),
    [
        ({12345: _detections([[0, 0, 5, 5]], [1.0], [0])}, "image id 12345"),
        ({100: _detections([[0, 0, 5, 5]], [1.0], [1])}, "label 1"),
        ({100: _detections([[0, 0, 5, 5]], [1.0], [0], np.zeros((1, 4, 3)))}, "K=4"),
        ({100: _detections([[0, 0, float("nan"), 5]], [1.0], [0])}, "finite"),
    ],
    ids=["image not in gt", "label out of range", "wrong keypoint count", "NaN box"],
)
def test_bad_predictions_raise_value_error(predictions: dict[int, Detections], message: str):
    with pytest.raises(ValueError, match=message):
        evaluate_predictions(_keypoint_dataset(num_images=1), predictions)


def _pseudo_label_file(gt_path: Path, results: list[dict[str, Any]], *, cat_offset: int = 0) -> dict[str, Any]:
    """The results as a scored COCO data set, with other image ids, another order and an image gt lacks."""
    raw = _read(gt_path)
    new_id = {im["id"]: 7_000_000 + n for n, im in enumerate(reversed(raw["images"]))}
    images = [{**im, "id": new_id[im["id"]]} for im in reversed(raw["images"])]
    images.append({"id": 1, "file_name": "not_in_gt.jpg", "width": 10, "height": 10})
    annotations = [
        {"id": n + 1, "image_id": new_id[r["image_id"]], "category_id": r["category_id"] + cat_offset,
         "bbox": r["bbox"], "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0, "score": r["score"]}
        for n, r in enumerate(results)
    ]  # fmt: skip
    annotations.append({"id": 10**6, "image_id": 1, "category_id": results[0]["category_id"] + cat_offset,
                        "bbox": [1, 1, 5, 5], "iscrowd": 0, "score": 0.9})  # fmt: skip
    categories = [{**c, "id": c["id"] + cat_offset} for c in raw["categories"]]
    return {"images": images, "annotations": annotations, "categories": categories}


@pytest.mark.parametrize("cat_offset", [0, 1000], ids=["categories by id", "categories by name"])
def test_pseudo_label_file_matched_by_file_name_gives_the_same_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cat_offset: int
):
    gt = load_coco(BOX_GT)
    results = _read(BOX_DT)
    path = tmp_path / "pseudo.json"
    path.write_text(json.dumps(_pseudo_label_file(BOX_GT, results, cat_offset=cat_offset)))
    with caplog.at_level(logging.WARNING, logger="datadistill.stages.evaluate"):
        loaded = load_predictions(path, gt)
    assert "1 of 101 images are not in the ground truth" in caplog.text
    assert sorted(map(json.dumps, loaded)) == sorted(map(json.dumps, results))
    assert evaluate_results(gt, loaded) == evaluate_results(gt, results)


def test_pseudo_label_file_with_no_matching_image_is_a_data_error(tmp_path: Path):
    gt = load_coco(BOX_GT)
    raw = _pseudo_label_file(BOX_GT, _read(BOX_DT))
    for im in raw["images"]:
        im["file_name"] = "x/" + im["file_name"]
    path = tmp_path / "pseudo.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"none of its 101 images is in the ground truth") as info:
        load_predictions(path, gt)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def _result(**changes: Any) -> dict[str, Any]:
    return {"image_id": 100, "category_id": 3, "bbox": [1, 2, 10, 20], "score": 0.5, **changes}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[{", "invalid json at line 1"),
        ("3", "expected a COCO results list or a COCO data set"),
        ('{"images": []}', "expected a COCO results list or a COCO data set"),
        (json.dumps([_result(), "x"]), "result #1: must be an object"),
        (json.dumps([_result(image_id=5)]), "result #0 (image 5): image_id 5 is not in the ground truth"),
        (json.dumps([_result(category_id=9)]), "category_id 9 is not in the ground truth"),
        (json.dumps([{k: v for k, v in _result().items() if k != "score"}]), "'score' must be a finite number"),
        (json.dumps([_result(score="high")]), "'score' must be a finite number"),
        (json.dumps([_result(bbox=[1, 2, 3])]), "'bbox' must be 4 finite numbers"),
        (json.dumps([_result(bbox=[1, 2, -3, 4])]), "'bbox' must be 4 finite numbers"),
        ('[{"image_id": 100, "category_id": 3, "bbox": [NaN, 1, 2, 3], "score": 1}]', "'bbox' must be 4 finite"),
        (json.dumps([_result(keypoints=[1, 2, 3])]), "'keypoints' must be 15 finite numbers"),
        (json.dumps([{"image_id": 100, "category_id": 3, "score": 1, "segmentation": {}}]), "segmentation results"),
        (json.dumps([_result(), {"image_id": 100, "category_id": 3, "score": 1, "keypoints": [0] * 15}]),
         "result #1 (image 100): has no 'bbox' but the first record does"),
        (json.dumps({"images": [{"id": 1, "file_name": "im0.png", "width": 200, "height": 160}],
                     "annotations": [{"id": 4, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5],
                                      "keypoints": [0] * 15}],
                     "categories": [{"id": 3, "name": "figure", "keypoints": ["a", "b", "c", "d", "e"]}]}),
         "annotation 4 (image 1): no 'score'"),
        (json.dumps({"images": [{"id": 1, "file_name": "im0.png", "width": 200, "height": 160}],
                     "annotations": [{"id": 4, "image_id": 1, "category_id": 8, "bbox": [1, 1, 5, 5], "score": 1}],
                     "categories": [{"id": 8, "name": "dog"}]}),
         "annotation 4 (image 1): category 8 ('dog') matches no ground-truth category"),
        (json.dumps({"images": [{"id": 1, "file_name": "im0.png", "width": 200, "height": 160}],
                     "annotations": [{"id": 4, "image_id": 1, "category_id": 3, "bbox": [1, 1, 500, 5], "score": 1}],
                     "categories": [{"id": 3, "name": "figure"}]}),
         re.compile(r"annotation 4 \(image 1\): box \[1, 1, 500, 5\] lies outside")),
    ],
    ids=[
        "broken json", "a number", "an object without annotations", "a record that is no object",
        "unknown image", "unknown category", "no score", "score not a number", "bbox of 3 numbers",
        "negative width", "NaN in bbox", "wrong keypoint count", "segmentation only", "bbox in some records only",
        "pseudo-labels without score", "pseudo-label category unknown", "pseudo-label box outside the image",
    ],
)  # fmt: skip
def test_bad_prediction_files_raise_one_line_data_error(tmp_path: Path, content: str, message: str | re.Pattern):
    gt = _keypoint_dataset(num_images=1)
    path = tmp_path / "predictions.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message if isinstance(message, re.Pattern) else re.escape(message)) as info:
        load_predictions(path, gt)
    text = str(info.value)
    assert "\n" not in text and str(path) in text


def test_evaluator_prints_nothing(capsys: pytest.CaptureFixture[str]):
    gt = load_coco(KP_GT)
    evaluate_results(gt, load_predictions(KP_DT, gt))
    assert capsys.readouterr().out == ""


def test_format_and_write_metrics(tmp_path: Path):
    gt = load_coco(KP_GT)
    metrics = evaluate_results(gt, load_predictions(KP_DT, gt))
    table = format_metrics(metrics)
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["task", *BBOX_KEYS] and lines[2].split() == ["task", *KEYPOINT_KEYS]
    assert lines[3].split()[0] == "keypoints" and lines[3].split()[1] == f"{metrics['keypoints']['AP']:.3f}"
    path = tmp_path / "out" / "metrics.json"
    write_metrics(path, metrics)
    assert json.loads(path.read_text()) == metrics


def test_format_metrics_shows_none_as_a_dash():
    values = dict.fromkeys(BBOX_KEYS, 0.5) | {"APs": None, "ARs": None}
    (header, row) = format_metrics({"bbox": values}).splitlines()
    assert header.split() == ["task", *BBOX_KEYS]
    assert row.split() == ["bbox", "0.500", "0.500", "0.500", "-", *["0.500"] * 5, "-", "0.500", "0.500"]


def test_written_metrics_say_null_not_minus_one(tmp_path: Path):
    gt = _keypoint_dataset(num_images=4)
    metrics = evaluate_predictions(gt, _gt_as_predictions(gt))
    path = tmp_path / "metrics.json"
    write_metrics(path, metrics)
    text = path.read_text()
    assert "null" in text and "-1" not in text


@pytest.mark.parametrize(
    ("gt_file", "dt_file", "iou_type", "keys"),
    [
        (BOX_GT, BOX_DT, "bbox", BBOX_KEYS),
        (KP_GT, KP_DT, "keypoints", KEYPOINT_KEYS),
    ],
    ids=["bbox", "keypoints"],
)
def test_pycocotools_evaluator_equals_pycocotools_bit_for_bit(gt_file, dt_file, iou_type, keys):
    gt = load_coco(gt_file)
    metrics = evaluate_results(gt, load_predictions(dt_file, gt), evaluator="pycocotools")
    assert_same_stats(metrics[iou_type], pycocotools_stats(gt_file, _read(dt_file), iou_type), keys, max_abs=0)


def test_unknown_evaluator_is_a_one_line_error():
    gt = load_coco(KP_GT)
    with pytest.raises(UserError, match="unknown evaluator 'cocoapi'"):
        evaluate_results(gt, load_predictions(KP_DT, gt), evaluator="cocoapi")


def test_pycocotools_evaluator_scores_empty_predictions_zero():
    gt = load_coco(KP_GT)
    metrics = evaluate_results(gt, [], evaluator="pycocotools")
    assert metrics["bbox"]["AP"] == 0.0 and metrics["keypoints"]["AP"] == 0.0
