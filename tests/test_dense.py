"""Dense scenes: no silent cap of 100 objects per image.

The caps read from the data (:mod:`datadistill.core.caps`), carried in the model meta, applied by every backend
(torchvision's detections and an R-CNN's proposals, Ultralytics' ``max_det``; a DETR with too few queries is a
warning, in test_hf.py), recorded in the labeling folder's signature; the dense synthetic shapes. The models here
are tiny and random, their heads set to fire at every location, so that the cap alone decides how many boxes come
out of one whole-image view.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from datadistill.core.caps import DEFAULT_MAX_DET, cap_for, objects_quantile
from datadistill.data import synth
from datadistill.data.coco import load_coco, objects_per_image
from datadistill.data.images import read_image
from datadistill.errors import UserError
from datadistill.models import torchvision as tvb
from datadistill.models.detector import ModelMeta, load_detector, resolve_max_det
from datadistill.stages.label import LabelConfig, label, read_shards

HAVE_ULTRALYTICS = importlib.util.find_spec("ultralytics") is not None


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two dense synthetic images of 256 px (164 and 177 objects)."""
    return synth.make_shapes(tmp_path_factory.mktemp("dense"), num_images=2, seed=0, size_px=256, dense=True)


@pytest.mark.parametrize(
    ("counts", "default", "p99", "cap"),
    [
        pytest.param([], 100, 0.0, 100, id="no-images-the-default"),
        pytest.param([3, 5, 8], 100, 7.94, 100, id="sparse-never-below-the-default"),
        pytest.param([150] * 10, 100, 150.0, 300, id="dense-twice-the-p99"),
        pytest.param([150] * 10, 300, 150.0, 300, id="at-the-default"),
        pytest.param(list(range(1, 101)), 20, 99.01, 199, id="interpolated-p99-rounded-up"),
    ],
)
def test_the_cap_is_twice_the_99th_percentile_never_below_the_default(
    counts: list[int], default: int, p99: float, cap: int
) -> None:
    got = objects_quantile(counts)
    assert got == pytest.approx(p99)
    assert cap_for(got, default=default) == cap


def test_the_meta_carries_the_training_datas_objects_per_image_and_old_checkpoints_read_as_unknown(
    dense: Path,
) -> None:
    data = load_coco(dense)
    counts = objects_per_image(data)
    assert counts == [len(data.labels[im.id]) for im in data.images] and min(counts) > 100
    meta = ModelMeta.for_dataset("small_fcos", data, min_size=128, max_size=128)
    assert meta.objects_p99 == pytest.approx(np.quantile(counts, 0.99))
    assert ModelMeta.from_dict(meta.to_dict()) == meta
    old = {k: v for k, v in meta.to_dict().items() if k not in ("objects_p99", "max_det")}
    legacy = ModelMeta.from_dict(old)
    assert (legacy.objects_p99, legacy.max_det) == (0.0, 0)
    assert resolve_max_det(legacy, default=100) == 100
    assert resolve_max_det(meta, default=100) == cap_for(meta.objects_p99) > 2 * 100
    assert resolve_max_det(dataclasses.replace(meta, max_det=500), default=100) == 500  # train --max-det
    assert resolve_max_det(meta, default=100, override=120) == 120  # label --max-det
    with pytest.raises(UserError, match="--max-det must be at least 1"):
        resolve_max_det(meta, default=100, override=0)


def test_dense_shapes_hold_100_to_300_objects_per_image_and_repeat_with_the_seed(tmp_path: Path, dense: Path) -> None:
    again = synth.make_shapes(tmp_path / "again", num_images=2, seed=0, size_px=256, dense=True)
    assert json.loads(again.read_text())["annotations"] == json.loads(dense.read_text())["annotations"]
    counts = objects_per_image(load_coco(dense))
    assert all(100 < c <= 300 for c in counts), counts
    plain = synth.make_shapes(tmp_path / "plain", num_images=2, seed=0, size_px=256)
    assert max(objects_per_image(load_coco(plain))) <= synth.MAX_SHAPES  # the default layout is untouched
    with pytest.raises(ValueError, match="choose one"):
        synth.make_shapes(tmp_path / "both", num_images=1, seed=0, size_px=256, dense=True, small_objects=True)


# ----------------------------------------------------------------------------------------------------
# torchvision: the detections and the proposals


def _firing_checkpoint(name: str, meta: ModelMeta, path: Path) -> Path:
    """A random ``name`` whose head scores every location (FCOS) or every anchor's proposal (R-CNN) near 1
    with boxes of the anchors' size: many more boxes than 100 survive NMS on a 128 px input."""
    torch.manual_seed(0)
    model = tvb.build_model(meta)
    with torch.no_grad():
        if name == "small_fcos":
            head = model.head
            for conv in (head.classification_head.cls_logits, head.regression_head.bbox_ctrness):
                conv.weight.zero_()
                conv.bias.fill_(8.0)
            head.regression_head.bbox_reg.weight.zero_()
        else:
            rpn = model.rpn.head
            rpn.cls_logits.weight.zero_()
            rpn.cls_logits.bias.fill_(8.0)
            rpn.bbox_pred.weight.zero_()
            rpn.bbox_pred.bias.zero_()
            box = model.roi_heads.box_predictor
            box.cls_score.weight.zero_()
            box.cls_score.bias.copy_(torch.tensor([0.0] + [8.0] * meta.num_classes))
            box.bbox_pred.weight.zero_()
            box.bbox_pred.bias.zero_()
    tvb.save_checkpoint(path, model=model, meta=meta)
    return path


@pytest.mark.parametrize("name", ["small_fcos", "small_frcnn"])
def test_one_whole_image_view_of_a_torchvision_model_gives_more_than_100_boxes_on_a_dense_image(
    name: str, dense: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The cap comes from the checkpoint (the training data's objects per image): more than 100 boxes on an
    image of more than 100 objects; ``--max-det 100`` gives back the former cap (for the small Faster R-CNN its
    100 proposals were a second cap of 100)."""
    torch.set_num_threads(1)
    data = load_coco(dense)
    meta = tvb.meta_for(name, data)
    checkpoint = _firing_checkpoint(name, meta, tmp_path / "checkpoint.pt")
    image = read_image(dense.parent / "images" / data.images[0].file_name).float().div(255)
    assert len(data.labels[data.images[0].id]) > 100
    with caplog.at_level(logging.INFO, logger="datadistill.models.detector"):
        detector = load_detector(str(checkpoint))
    assert detector.max_det == cap_for(meta.objects_p99) > 300
    assert "99th percentile" in caplog.text and f"at most {detector.max_det} detections" in caplog.text
    (found,) = detector.predict([image])
    assert 150 < len(found) <= detector.max_det
    (capped,) = load_detector(str(checkpoint), max_det=DEFAULT_MAX_DET).predict([image])
    assert len(capped) == DEFAULT_MAX_DET
    built = tvb.build_model(dataclasses.replace(meta))  # as the library builds it: 100 detections
    built.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    (library,) = tvb.predict(built, [image])
    assert len(library) == DEFAULT_MAX_DET


# ----------------------------------------------------------------------------------------------------
# Ultralytics: max_det


@pytest.mark.skipif(not HAVE_ULTRALYTICS, reason="needs the yolo extra (ultralytics)")
def test_one_whole_image_view_of_a_yolo_model_gives_more_than_100_boxes_on_a_dense_image(
    ultralytics_home: Path, dense: Path, tmp_path: Path
) -> None:
    """A random yolo11n whose class branch scores every anchor near 1 and whose box branch gives boxes of two
    strides: with datadistill's meta (the dense data's objects per image) in its .pt, one view gives more
    than 100 boxes; ``max_det=100`` gives 100."""
    from datadistill.models import ultralytics as ub

    torch.set_num_threads(1)
    yolo = ub.import_ultralytics().YOLO("yolo11n.yaml")
    head = yolo.model.model[-1]
    with torch.no_grad():
        for branch in head.cv3:
            branch[-1].weight.zero_()
            branch[-1].bias.fill_(8.0)
        for branch in head.cv2:
            branch[-1].weight.zero_()
            bias = torch.zeros(4 * head.reg_max)
            bias[1 :: head.reg_max] = 10.0  # each side one stride from the anchor
            branch[-1].bias.copy_(bias)
    path = tmp_path / "fire.pt"
    yolo.save(str(path))
    data = load_coco(dense)
    meta = ModelMeta.for_dataset("yolo:yolo11n.yaml", data, min_size=128, max_size=128)
    names = tuple(data.class_names) + tuple(f"x{i}" for i in range(head.nc - data.num_classes))
    meta = dataclasses.replace(meta, class_names=names, category_ids=tuple(range(1, head.nc + 1)))
    ckpt = torch.load(path, weights_only=False)
    ckpt[ub.CHECKPOINT_KEY] = {"meta": meta.to_dict(), "config": {}}
    torch.save(ckpt, path)
    image = read_image(dense.parent / "images" / data.images[0].file_name).float().div(255)
    detector = load_detector(f"yolo:{path}")
    assert detector.max_det == cap_for(meta.objects_p99)
    (found,) = detector.predict([image])
    assert 150 < len(found) <= detector.max_det
    (capped,) = load_detector(f"yolo:{path}", max_det=DEFAULT_MAX_DET).predict([image])
    assert len(capped) == DEFAULT_MAX_DET


# ----------------------------------------------------------------------------------------------------
# label: the cap in the folder's signature


def test_label_keeps_more_than_100_per_image_and_records_the_cap_in_its_signature(dense: Path, tmp_path: Path) -> None:
    """One identity view of the firing FCOS: the shards hold more than 100 candidates per image, the manifest
    records the cap; another ``--max-det`` is refused as another signature, and a folder labeled before the key
    existed counts as labeled with 100."""
    torch.set_num_threads(1)
    data = load_coco(dense)
    checkpoint = _firing_checkpoint("small_fcos", tvb.meta_for("small_fcos", data), tmp_path / "checkpoint.pt")
    options = {"model": str(checkpoint), "images": str(dense), "views": "identity", "score_floor": 0.05,
               "workers": 0, "device": "cpu", "batch_size": 2}  # fmt: skip
    out = tmp_path / "labels"
    manifest = label(LabelConfig(out=str(out), **options))
    config = json.loads(manifest.read_text())["config"]
    assert config["max_det"] == cap_for(tvb.meta_for("small_fcos", data).objects_p99)
    per_image = [len(scores) for scores in read_shards(out, columns=["scores"]).column("scores").to_pylist()]
    assert len(per_image) == 2 and min(per_image) > 150
    with pytest.raises(UserError, match="another max_det"):
        label(LabelConfig(out=str(out), max_det=100, **options))
    old = json.loads(manifest.read_text())
    del old["config"]["max_det"]
    manifest.write_text(json.dumps(old))
    label(LabelConfig(out=str(out), max_det=100, **options))  # resumes: the legacy folder kept 100
    with pytest.raises(UserError, match="another max_det"):
        label(LabelConfig(out=str(out), **options))


# ----------------------------------------------------------------------------------------------------
# evaluate: maxDets from the data


def _grid_coco(n: int) -> dict:
    """One 400 px image with ``n`` disjoint 20 px boxes on a grid, one class."""
    boxes = [[float(25 * (i % 16)), float(25 * (i // 16)), 20.0, 20.0] for i in range(n)]
    return {"images": [{"id": 1, "file_name": "a.png", "width": 400, "height": 400}],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": 400.0, "iscrowd": 0}
                            for i, b in enumerate(boxes)]}  # fmt: skip


@pytest.mark.parametrize("evaluator", ["faster-coco-eval", "pycocotools"])
def test_evaluate_counts_the_detections_the_data_needs(evaluator: str, tmp_path: Path) -> None:
    """150 true objects on one image, predicted perfectly: AP 1.0 when the evaluation counts what the data
    needs (300, the default read from the data), about 100/150 when it counts COCO's 100."""
    if evaluator == "pycocotools":
        pytest.importorskip("pycocotools")
    from datadistill.cli import main
    from datadistill.data.coco import parse_coco
    from datadistill.stages.evaluate import evaluate_results, max_dets_for

    raw = _grid_coco(150)
    gt, _ = parse_coco(raw)
    results = [{"image_id": 1, "category_id": 1, "bbox": a["bbox"], "score": 1.0 - 0.001 * i}
               for i, a in enumerate(raw["annotations"])]  # fmt: skip
    assert max_dets_for(gt) == 300
    full = evaluate_results(gt, results, evaluator=evaluator)["bbox"]
    assert full["max_dets"] == 300 and full["AP"] == pytest.approx(1.0) and full["AR100"] == pytest.approx(1.0)
    coco = evaluate_results(gt, results, evaluator=evaluator, max_dets=100)["bbox"]
    assert "max_dets" not in coco and coco["AR100"] == pytest.approx(100 / 150)
    assert 0.6 < coco["AP"] < 0.7
    sparse, _ = parse_coco(_grid_coco(40))
    assert max_dets_for(sparse) == 100  # never below COCO's 100
    (tmp_path / "gt.json").write_text(json.dumps(raw))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    args = ["evaluate", "--data", str(tmp_path / "gt.json"), "--predictions", str(tmp_path / "dt.json"),
            "--evaluator", evaluator, "--out"]  # fmt: skip
    assert main([*args, str(tmp_path / "m300.json")]) == 0
    assert main([*args, str(tmp_path / "m100.json"), "--max-dets", "100"]) == 0
    m300, m100 = (json.loads((tmp_path / f"m{n}.json").read_text())["bbox"] for n in (300, 100))
    assert m300["max_dets"] == 300 and "max_dets" not in m100 and m300["AP"] > m100["AP"]
