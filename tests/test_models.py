"""models.py: builders, losses()/predict() around torchvision, input_size, heatmaps, checkpoints, weights."""

from __future__ import annotations

import json
import logging
import urllib.error
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import detection as tv_detection
from torchvision.models import get_weight
from torchvision.models._api import WeightsEnum
from torchvision.ops import FrozenBatchNorm2d

from datadistill.data.coco import Category, CocoDataset, ImageLabels, ImageRecord
from datadistill.errors import UserError
from datadistill.models import torchvision as models
from datadistill.models.detector import DEFAULT_MODELS
from datadistill.models.ignore import supports_ignore
from datadistill.models.torchvision import MODELS, ModelMeta

SMALL = [name for name, spec in MODELS.items() if not spec.pretrained]
SMALL_BOXES = [name for name in SMALL if MODELS[name].task == "boxes"]
RESNET50 = [name for name in MODELS if "resnet50" in name]
# torchvision's light COCO-pretrained detectors -> their torchvision weights
LIGHT = {
    "fasterrcnn_mobilenet_v3_large_fpn": "FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1",
    "ssdlite320_mobilenet_v3_large": "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1",
}
KEYPOINT_NAMES = ("head", "left_hand", "right_hand", "foot")


def _dataset(*, keypoints: bool) -> CocoDataset:
    if keypoints:
        cats = (
            Category(
                id=7, name="figure", keypoints=KEYPOINT_NAMES, skeleton=((1, 2), (1, 3)),
                flip_index=(0, 2, 1, 3), sigmas=(0.05, 0.06, 0.06, 0.07),
            ),
        )  # fmt: skip
    else:
        cats = (Category(id=3, name="circle"), Category(id=5, name="square"), Category(id=9, name="star"))
    image = ImageRecord(id=1, file_name="a.png", width=64, height=64)
    return CocoDataset(images=(image,), labels={1: ImageLabels.empty(len(KEYPOINT_NAMES) if keypoints else 0)},
                       categories=cats)  # fmt: skip


def _meta(name: str) -> ModelMeta:
    spec = MODELS[name]
    if spec.pretrained:
        return ModelMeta.from_dataset(name, _dataset(keypoints=spec.task == "keypoints"))
    return ModelMeta.from_dataset(name, _dataset(keypoints=spec.task == "keypoints"), min_size=64, max_size=96)


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build_model(_meta(name))


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 64, 64, generator=g), torch.rand(3, 72, 90, generator=g)]


def _targets(task: str) -> list[dict[str, torch.Tensor]]:
    k = len(KEYPOINT_NAMES)
    boxes = torch.tensor([[8.0, 10.0, 40.0, 50.0], [30.0, 5.0, 60.0, 30.0]])
    one = {"boxes": boxes, "labels": torch.tensor([0, 0] if task == "keypoints" else [2, 1])}
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
    if task == "keypoints":
        frac = torch.tensor([[0.5, 0.1], [0.1, 0.5], [0.9, 0.5], [0.5, 0.9]])
        xy = boxes[:, None, :2] + frac[None] * (boxes[:, None, 2:] - boxes[:, None, :2])
        vis = torch.tensor([[2.0, 2.0, 1.0, 0.0], [2.0, 0.0, 2.0, 2.0]])[..., None]
        one["keypoints"] = torch.cat([xy, vis], dim=-1)
        empty["keypoints"] = torch.zeros((0, k, 3))
    return [one, empty]


# ----------------------------------------------------------------------------------------------------
# registry and metadata


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_builds_for_its_task(name: str) -> None:
    spec = MODELS[name]
    model = _model(name)
    assert spec.name == name and spec.description and "\n" not in spec.description
    assert sum(p.numel() for p in model.parameters()) > 0
    assert models._is_keypoint_model(model) == (spec.task == "keypoints")
    assert tuple(model.transform.min_size) == (_meta(name).min_size,)
    if spec.pretrained and name in RESNET50:  # torchvision's recipe: frozen backbone norm, stem and layer1 fixed
        body = model.backbone.body
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
        assert not body.conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad
    elif not spec.pretrained:  # (the light pretrained ones are compared with torchvision's build below)
        assert sum(p.numel() for p in model.parameters()) < 4_000_000


@pytest.mark.parametrize("name", ["small_fcos", "fcos_resnet50_fpn"])
def test_fcos_box_regression_starts_alive(name: str) -> None:
    # torchvision's FCOS puts a ReLU on the regressed distances; started at 0, some seeds killed it for good
    # (GIoU loss stuck at 1.0, AP 0). Every location must regress a positive distance at the start.
    torch.manual_seed(1)
    model = _model(name).eval()
    features = list(model.backbone(torch.rand(1, 3, 128, 128)).values())
    regression, _ = model.head.regression_head(features)
    alive = (regression > 0).float().mean().item()
    assert regression.shape[-1] == 4 and alive > 0.99  # with a bias of 0: about 0.2 for the R50


def test_small_models_are_the_defaults() -> None:
    for task, name in DEFAULT_MODELS.items():
        assert MODELS[name].task == task and not MODELS[name].pretrained


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(UserError) as exc:
        models.get_spec("yolo9000")
    assert "yolo9000" in str(exc.value) and all(name in str(exc.value) for name in MODELS)
    with pytest.raises(UserError, match="small_fcos"):
        ModelMeta.from_dataset("nope", _dataset(keypoints=False))


@pytest.mark.parametrize(
    "model, keypoints, task",
    [
        ("small_fcos", False, "boxes"),
        ("small_frcnn", False, "boxes"),
        ("small_keypointrcnn", True, "keypoints"),
    ],
)
def test_meta_task_follows_the_data(model: str, keypoints: bool, task: str) -> None:
    data = _dataset(keypoints=keypoints)
    meta = ModelMeta.from_dataset(model, data)
    assert meta.task == task
    assert meta.class_names == data.class_names and meta.category_ids == tuple(c.id for c in data.categories)
    assert (meta.min_size, meta.max_size) == (MODELS[model].min_size, MODELS[model].max_size)
    if keypoints:
        assert meta.keypoint_names == KEYPOINT_NAMES and meta.flip_index == (0, 2, 1, 3)
        assert meta.skeleton == ((1, 2), (1, 3)) and meta.sigmas == (0.05, 0.06, 0.06, 0.07)


@pytest.mark.parametrize(
    "model, keypoints",
    [
        ("small_fcos", True),  # a box model for keypoint data
        ("small_keypointrcnn", False),  # a keypoint model for box data
        ("fasterrcnn_mobilenet_v3_large_fpn", True),
        ("fasterrcnn_mobilenet_v3_large_320_fpn", True),
        ("ssdlite320_mobilenet_v3_large", True),
    ],
)
def test_meta_refuses_a_model_of_the_other_task(model: str, keypoints: bool) -> None:
    with pytest.raises(UserError) as exc:
        ModelMeta.from_dataset(model, _dataset(keypoints=keypoints))
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name", ["small_fcos", "small_keypointrcnn"])
def test_meta_dict_round_trip_is_plain_json(name: str) -> None:
    meta = _meta(name)
    d = meta.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert ModelMeta.from_dict(d) == meta
    with pytest.raises(UserError, match="malformed model meta"):
        ModelMeta.from_dict({k: v for k, v in d.items() if k != "class_names"})


# ----------------------------------------------------------------------------------------------------
# losses and predictions


@pytest.mark.parametrize("name", SMALL)
def test_losses_are_finite_scalars_with_a_negative_image(name: str) -> None:
    model = _model(name)
    terms = models.losses(model, _images(), _targets(MODELS[name].task))
    assert model.training
    assert terms and all(v.ndim == 0 and torch.isfinite(v) for v in terms.values())
    if MODELS[name].task == "keypoints":
        assert "loss_keypoint" in terms
    sum(terms.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    # an all-negative batch works too
    empty = _targets(MODELS[name].task)[1]
    terms = models.losses(model, _images()[:1], [empty])
    assert all(torch.isfinite(v) for v in terms.values())


def test_losses_need_keypoints_for_a_keypoint_model() -> None:
    target = {k: v for k, v in _targets("keypoints")[0].items() if k != "keypoints"}
    with pytest.raises(ValueError, match="keypoints"):
        models.losses(_model("small_keypointrcnn"), _images()[:1], [target])


def _force_class(model: torch.nn.Module, index: int) -> None:
    """Make every detection of ``model`` class ``index`` (0-based) whatever the image."""
    with torch.no_grad():
        if isinstance(model, models.GeneralizedRCNN):
            layer = model.roi_heads.box_predictor.cls_score
            target = index + 1  # torchvision's background is class 0
        else:
            layer = model.head.classification_head.cls_logits
            target = index
        layer.weight.zero_()
        layer.bias.fill_(-10.0)
        layer.bias[target] = 10.0


@pytest.mark.parametrize("name", SMALL)
def test_predict_gives_zero_based_labels_and_shapes(name: str) -> None:
    meta = _meta(name)
    model = _model(name)
    wanted = meta.num_classes - 1
    _force_class(model, wanted)
    images = _images()
    dets = models.predict(model, images)
    assert not model.training
    assert len(dets) == len(images)
    assert sum(len(d) for d in dets) > 0
    for d, img in zip(dets, images, strict=True):
        assert d.labels.dtype == torch.int64 and (d.labels == wanted).all()
        assert ((d.scores >= 0) & (d.scores <= 1)).all()
        h, w = img.shape[-2:]
        assert (d.boxes[:, 0::2] <= w).all() and (d.boxes[:, 1::2] <= h).all()  # the original frame
        if meta.task == "keypoints":
            assert d.keypoints is not None and d.keypoints.shape == (len(d), meta.num_keypoints, 3)
        else:
            assert d.keypoints is None
    assert models.predict(model, []) == []


def test_input_size_sets_and_restores_the_resize_target() -> None:
    model = _model("small_fcos")
    before = (model.transform.min_size, model.transform.max_size)
    with models.input_size(model, 48, 72):
        assert (model.transform.min_size, model.transform.max_size) == ((48,), 72)
        (det,) = models.predict(model, [torch.rand(3, 64, 64)])
        assert (det.boxes <= 64).all()  # predictions still come back in the original frame
    assert (model.transform.min_size, model.transform.max_size) == before
    with pytest.raises(RuntimeError), models.input_size(model, 32, 32):
        raise RuntimeError("boom")
    assert (model.transform.min_size, model.transform.max_size) == before


def test_heatmaps_of_predicted_boxes_decode_to_predicted_keypoints() -> None:
    model = _model("small_keypointrcnn")
    images = _images()  # 64x64 and 72x90: the second is resized by the model (min_size 64, max 96)
    dets = models.predict(model, images)
    assert all(len(d) > 0 for d in dets)
    heatmaps = models.keypoint_heatmaps(model, images, [d.boxes for d in dets])
    for img, d, h in zip(images, dets, heatmaps, strict=True):
        assert h.shape[:2] == (len(d), len(KEYPOINT_NAMES)) and h.shape[2] == h.shape[3]
        size = (int(img.shape[-2]), int(img.shape[-1]))
        kps = models.heatmaps_to_keypoints(h, d.boxes, model=model, image_size=size)
        torch.testing.assert_close(kps, d.keypoints, rtol=0, atol=1e-4)
    # without the model, decoding happens in the boxes' frame: equal when the image is not resized
    d0 = dets[0]
    torch.testing.assert_close(models.heatmaps_to_keypoints(heatmaps[0], d0.boxes), d0.keypoints, rtol=0, atol=1e-4)
    assert models.heatmaps_to_keypoints(heatmaps[0][:0], d0.boxes[:0]).shape == (0, len(KEYPOINT_NAMES), 3)


def test_keypoint_heatmaps_of_no_boxes() -> None:
    model = _model("small_keypointrcnn")
    one_box = torch.tensor([[4.0, 6.0, 40.0, 60.0]])
    heatmaps = models.keypoint_heatmaps(model, _images(), [torch.zeros((0, 4)), one_box])
    assert heatmaps[0].shape[:2] == (0, len(KEYPOINT_NAMES)) and heatmaps[1].shape[:2] == (1, len(KEYPOINT_NAMES))
    kps = models.heatmaps_to_keypoints(heatmaps[1], one_box, model=model, image_size=(72, 90))
    assert kps.shape == (1, len(KEYPOINT_NAMES), 3)
    inside = (kps[0, :, 0] >= 4.0) & (kps[0, :, 0] <= 40.0) & (kps[0, :, 1] >= 6.0) & (kps[0, :, 1] <= 60.0)
    assert inside.all()  # a heatmap spans its box


def test_keypoint_heatmaps_need_a_keypoint_model() -> None:
    with pytest.raises(ValueError, match="no keypoint head"):
        models.keypoint_heatmaps(_model("small_fcos"), _images(), [torch.zeros((0, 4))] * 2)


# ----------------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("name", ["small_fcos", "small_keypointrcnn"])
def test_checkpoint_round_trip_gives_identical_predictions(name: str, tmp_path: Path) -> None:
    model, meta = _model(name), _meta(name)
    models.losses(model, _images(), _targets(meta.task))  # leave train mode behind
    extra = {"epoch": 3, "config": {"lr": 0.01, "steps": [8, 11]}, "tensor": torch.arange(3)}
    path = tmp_path / "sub" / "checkpoint.pt"
    models.save_checkpoint(path, model=model, meta=meta, extra=extra)
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary file left
    loaded, loaded_meta, loaded_extra = models.load_checkpoint(path)
    assert loaded_meta == meta and not loaded.training
    assert loaded_extra["config"] == extra["config"] and torch.equal(loaded_extra["tensor"], extra["tensor"])
    content = models.read_checkpoint(path)
    assert content["format"] == "datadistill-checkpoint" and content["version"] == 1
    expected, got = models.predict(model, _images()), models.predict(loaded, _images())
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)
        assert (a.keypoints is None) == (b.keypoints is None)
        if a.keypoints is not None:
            assert torch.equal(a.keypoints, b.keypoints)


class _Evil:
    """Pickles to a call that creates a marker file: loading it must never run that call."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "datadistill-checkpoint", "version": 1, "payload": _Evil(marker)}, path)
    with pytest.raises(UserError) as exc:
        models.read_checkpoint(path)
    assert "unpickled" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(UserError, match="unpickled"):
        models.init_weights(_model("small_fcos"), str(path), meta=_meta("small_fcos"))
    assert not marker.exists()


def _truncated(tmp_path: Path) -> Path:
    good = tmp_path / "good.pt"
    models.save_checkpoint(good, model=_model("small_fcos"), meta=_meta("small_fcos"))
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return bad


def _plain_state_dict(tmp_path: Path) -> Path:
    path = tmp_path / "state.pt"
    torch.save(_model("small_fcos").state_dict(), path)
    return path


def _json_file(tmp_path: Path) -> Path:
    path = tmp_path / "x.json"
    path.write_text("{}")
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "missing.pt", "not found"),
        (lambda tmp: tmp, "is a folder"),
        (_truncated, "truncated or not a torch file"),
        (_json_file, "truncated or not a torch file"),
        (_plain_state_dict, "not a datadistill checkpoint"),
    ],
    ids=["missing", "folder", "truncated", "not-torch", "plain-state-dict"],
)
def test_bad_checkpoints_give_one_line_errors(tmp_path: Path, make, message: str) -> None:  # noqa: ANN001
    with pytest.raises(UserError) as exc:
        models.read_checkpoint(make(tmp_path))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_a_newer_checkpoint_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.pt"
    torch.save({"format": "datadistill-checkpoint", "version": 99, "meta": {}, "state_dict": {}}, path)
    with pytest.raises(UserError, match="newer"):
        models.read_checkpoint(path)


# ----------------------------------------------------------------------------------------------------
# pretrained weights


def _other_classes(meta: ModelMeta, count: int) -> ModelMeta:
    names = tuple(f"c{i}" for i in range(count))
    return replace(meta, class_names=names, category_ids=tuple(range(1, count + 1)))


# (source model, classes in source, tensors of the class head that cannot load)
INIT_CASES = [
    ("small_fcos", 5, 2),  # another class count: cls_logits weight and bias differ in shape
    ("small_frcnn", 5, 4),  # box_predictor cls_score and bbox_pred, weight and bias
    ("small_keypointrcnn", 2, 4),
]


@pytest.mark.parametrize("name, source_classes, head_tensors", INIT_CASES)
def test_init_from_a_state_dict_skips_class_heads(
    name: str, source_classes: int, head_tensors: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    meta = _meta(name)
    torch.manual_seed(1)
    source = models.build_model(_other_classes(meta, source_classes))
    path = tmp_path / "source.pt"
    torch.save(source.state_dict(), path)
    model = _model(name)
    total = len([k for k in model.state_dict() if not k.endswith("num_batches_tracked")])
    with caplog.at_level(logging.INFO, logger="datadistill.models.torchvision"):
        report = models.init_weights(model, str(path), meta=meta)
    assert "loaded" in caplog.text
    assert report == models.LoadReport(
        loaded=total - head_tensors, mismatched=head_tensors, unmatched=0, missing=head_tensors
    )
    state, src = model.state_dict(), source.state_dict()
    for key, value in state.items():
        if models._CLASS_HEAD.match(key):
            assert value.shape != src[key].shape
        else:
            assert torch.equal(value, src[key]), key


@pytest.mark.parametrize("same_classes", [True, False], ids=["same-classes", "other-class-names"])
def test_init_from_our_checkpoint_checks_class_names(same_classes: bool, tmp_path: Path) -> None:
    meta = _meta("small_keypointrcnn")
    source_meta = meta if same_classes else replace(meta, class_names=("person",))
    torch.manual_seed(1)
    source = models.build_model(source_meta)
    path = tmp_path / "teacher.pt"
    models.save_checkpoint(path, model=source, meta=source_meta)
    model = _model("small_keypointrcnn")
    report = models.init_weights(model, str(path), meta=meta)
    total = len(model.state_dict())
    head = 4  # roi_heads.box_predictor: cls_score and bbox_pred
    skipped = 0 if same_classes else head
    assert report == models.LoadReport(loaded=total - skipped, mismatched=skipped, unmatched=0, missing=skipped)
    assert torch.equal(
        model.roi_heads.keypoint_predictor.kps_score_lowres.weight,
        source.roi_heads.keypoint_predictor.kps_score_lowres.weight,
    )


def test_init_from_backbone_only_weights(tmp_path: Path) -> None:
    source = _model("small_fcos", seed=1)
    body = source.backbone.body.state_dict()  # a classifier's keys: "stem.0.weight", "layer1.0..."
    body["fc.weight"] = torch.zeros(10, 128)  # a classifier head with no counterpart
    path = tmp_path / "backbone.pt"
    torch.save({"model": body}, path)
    model = _model("small_fcos")
    report = models.init_weights(model, str(path), meta=_meta("small_fcos"))
    assert report.loaded == len(body) - 1 and report.unmatched == 1 and report.mismatched == 0
    for key, value in source.backbone.body.state_dict().items():
        assert torch.equal(model.backbone.body.state_dict()[key], value)


def test_init_with_nothing_matching_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="no tensor") as exc:
        models.init_weights(_model("small_fcos"), str(path), meta=_meta("small_fcos"))
    assert "\n" not in str(exc.value)
    path.write_bytes(b"")
    with pytest.raises(UserError):
        models.init_weights(_model("small_fcos"), str(path), meta=_meta("small_fcos"))
    torch.save({"lr": 0.1}, path)
    with pytest.raises(UserError, match="not a state dict"):
        models.init_weights(_model("small_fcos"), str(path), meta=_meta("small_fcos"))


def test_init_from_torchvision_weights_without_internet(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(UserError) as exc:
        models.init_weights(_model("small_fcos"), "weights:ResNet18_Weights.IMAGENET1K_V1", meta=_meta("small_fcos"))
    assert "internet" in str(exc.value) and "local weights file" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(UserError, match="unknown torchvision weights"):
        models.init_weights(_model("small_fcos"), "weights:NoSuch_Weights.V1", meta=_meta("small_fcos"))


def test_init_from_torchvision_weights_maps_the_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A detection checkpoint from torchvision (mocked download): the body loads, COCO's class head does
    not (its 91 classes are not ours), and the weights are read with weights_only."""
    model = _model("fcos_resnet50_fpn")
    coco = {k: v.clone() for k, v in model.state_dict().items()}
    coco["head.classification_head.cls_logits.weight"] = torch.zeros(91, 256, 3, 3)
    coco["head.classification_head.cls_logits.bias"] = torch.zeros(91)
    coco["backbone.body.layer4.2.conv3.weight"] += 1.0
    seen = {}

    def download(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.update(kwargs)
        return coco

    monkeypatch.setattr(WeightsEnum, "get_state_dict", download)
    report = models.init_weights(model, "weights:FCOS_ResNet50_FPN_Weights.COCO_V1", meta=_meta("fcos_resnet50_fpn"))
    assert seen.get("weights_only") is True
    assert report.mismatched == 2 and report.loaded == len(coco) - 2
    assert torch.equal(
        model.state_dict()["backbone.body.layer4.2.conv3.weight"], coco["backbone.body.layer4.2.conv3.weight"]
    )


# ----------------------------------------------------------------------------------------------------
# torchvision's light COCO-pretrained detectors (nothing downloaded: random weights, or a mocked download)

# class-head tensors another label set cannot reuse: Faster R-CNN's cls_score and bbox_pred (weight, bias);
# SSDlite's last 1x1 conv (weight, bias) of each of its 6 per-level class branches
LIGHT_HEAD_TENSORS = {
    "fasterrcnn_mobilenet_v3_large_fpn": 4,
    "fasterrcnn_mobilenet_v3_large_320_fpn": 4,
    "ssdlite320_mobilenet_v3_large": 12,
}
LIGHT_PX = 96  # a small input size keeps these tests fast on a CPU


def _light_meta(name: str, *, size: int = LIGHT_PX) -> ModelMeta:
    return ModelMeta.from_dataset(name, _dataset(keypoints=False), min_size=size)


def _coco_classes(name: str) -> tuple[str, ...]:
    return tuple(c for c in get_weight(LIGHT[name]).meta["categories"] if c != "__background__")


def _torchvision_coco_state(name: str) -> dict[str, torch.Tensor]:
    """The state dict of torchvision's own build of ``name`` for COCO's 91 classes, with random weights."""
    torch.manual_seed(1)
    return getattr(tv_detection, name)(weights=None, weights_backbone=None, num_classes=91).state_dict()


def _settings(model: torch.nn.Module) -> dict[str, object]:
    """Input size and the thresholds that decide what the model proposes and returns."""
    t = model.transform
    out: dict[str, object] = {"size": (t.min_size, t.max_size, t.fixed_size)}
    for part in ("", "rpn", "roi_heads"):
        obj = getattr(model, part, None) if part else model
        for attr in ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates", "_pre_nms_top_n",
                     "_post_nms_top_n"):  # fmt: skip
            out[f"{part}.{attr}"] = getattr(obj, attr, None)
    return out


@pytest.mark.parametrize("name", LIGHT)
def test_light_model_is_built_as_torchvision_builds_it_with_its_coco_weights(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision freezes batch norm and first stages only when it builds with weights; we build without
    (no download) and load them later, so our build must equal torchvision's build with the weights that
    the description names: the same tensors, norm layers (type and eps), trainable parameters, input size
    and thresholds. The mocked download hands torchvision our own random weights."""
    spec, weights = MODELS[name], get_weight(LIGHT[name])
    assert spec.pretrained and f"init weights:{LIGHT[name]}" in spec.description
    assert (name, "boxes", spec.description) in models.list_models()
    ours = spec.builder(
        num_classes=len(_coco_classes(name)), num_keypoints=0, min_size=spec.min_size, max_size=spec.max_size
    )
    state = ours.state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *args, **kwargs: state)
    reference = getattr(tv_detection, name)(weights=weights)

    def norms(model: torch.nn.Module) -> dict[str, tuple[str, float]]:
        kinds = (torch.nn.BatchNorm2d, FrozenBatchNorm2d)
        return {n: (type(m).__name__, m.eps) for n, m in model.named_modules() if isinstance(m, kinds)}

    assert state.keys() == reference.state_dict().keys()
    assert norms(ours) == norms(reference) and norms(ours)
    trainable = {n: p.requires_grad for n, p in ours.named_parameters()}
    assert trainable == {n: p.requires_grad for n, p in reference.named_parameters()}
    assert _settings(ours) == _settings(reference)
    if name.startswith("fasterrcnn"):  # batch norm frozen, the first 3 of the body's 6 stages fixed
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ours.backbone.body.modules())
        assert 0 < sum(trainable.values()) < len(trainable)
    else:  # SSDlite's recipe trains everything, batch norm included
        assert all(trainable.values())


def _force_light_class(model: torch.nn.Module, index: int) -> None:
    """Make every detection of ``model`` class ``index`` (0-based) whatever the image."""
    if not isinstance(model, models.SSD):
        _force_class(model, index)
        return
    head = model.head.classification_head
    with torch.no_grad():
        for branch in head.module_list:  # channels: anchor-major, then background + classes
            conv = branch[1]
            conv.weight.zero_()
            conv.bias.fill_(-10.0)
            conv.bias.view(-1, head.num_columns)[:, index + 1] = 10.0


@pytest.mark.parametrize("name", LIGHT)
def test_light_model_trains_and_predicts_zero_based_labels(name: str) -> None:
    meta = _light_meta(name)
    torch.manual_seed(0)
    model = models.build_model(meta)
    terms = models.losses(model, _images(), _targets("boxes"))
    assert terms and all(v.ndim == 0 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    empty = _targets("boxes")[1]
    assert all(torch.isfinite(v) for v in models.losses(model, _images(), [empty, empty]).values())

    wanted = meta.num_classes - 1
    _force_light_class(model, wanted)
    dets = models.predict(model, _images())
    assert not model.training and all(len(d) > 0 for d in dets)
    for d, img in zip(dets, _images(), strict=True):
        assert d.labels.dtype == torch.int64 and (d.labels == wanted).all() and d.keypoints is None
        assert ((d.scores >= 0) & (d.scores <= 1)).all()
        h, w = img.shape[-2:]
        assert (d.boxes[:, 0::2] <= w).all() and (d.boxes[:, 1::2] <= h).all()  # the original frame


@pytest.mark.parametrize("name", LIGHT)
def test_light_model_inits_from_a_coco_state_dict_file(name: str, tmp_path: Path) -> None:
    """A plain state dict names no classes: COCO's class head (91 classes) is left out by its shape."""
    source = _torchvision_coco_state(name)
    path = tmp_path / "coco.pt"
    torch.save(source, path)
    model = models.build_model(_light_meta(name))
    report = models.init_weights(model, str(path), meta=_light_meta(name))
    head = LIGHT_HEAD_TENSORS[name]
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert report == models.LoadReport(loaded=len(state) - head, mismatched=head, unmatched=0, missing=head)
    for key, value in state.items():
        if models._CLASS_HEAD.match(key):
            assert value.shape != source[key].shape, key
        else:
            assert torch.equal(value, source[key]), key


@pytest.mark.parametrize("coco_names", [True, False], ids=["coco-classes", "other-90-classes"])
@pytest.mark.parametrize("name", LIGHT)
def test_light_model_inits_from_torchvision_weights_by_class_names(
    name: str, coco_names: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """weights:NAME without internet (mocked download): the class head loads only for COCO's own class
    names, and is left out for 90 other names although its shapes fit."""
    source = _torchvision_coco_state(name)
    seen: dict[str, object] = {}

    def download(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.update(kwargs, weights=str(self))
        return source

    monkeypatch.setattr(WeightsEnum, "get_state_dict", download)
    names = _coco_classes(name) if coco_names else tuple(f"c{i}" for i in range(90))
    meta = replace(_light_meta(name), class_names=names, category_ids=tuple(range(1, 91)))
    model = models.build_model(meta)
    report = models.init_weights(model, f"weights:{LIGHT[name]}", meta=meta)
    assert seen["weights_only"] is True and seen["weights"] == LIGHT[name]
    head = 0 if coco_names else LIGHT_HEAD_TENSORS[name]
    total = len([k for k in model.state_dict() if not k.endswith("num_batches_tracked")])
    assert report == models.LoadReport(loaded=total - head, mismatched=head, unmatched=0, missing=head)
    classifier = next(k for k in source if models._CLASS_HEAD.match(k) and k.endswith("weight"))
    assert torch.equal(model.state_dict()[classifier], source[classifier]) == coco_names


@pytest.mark.parametrize("same_classes", [True, False], ids=["same-classes", "other-class-names"])
@pytest.mark.parametrize("name", LIGHT)
def test_light_model_inits_from_our_checkpoint_by_class_names(name: str, same_classes: bool, tmp_path: Path) -> None:
    meta = _light_meta(name)
    source_meta = meta if same_classes else replace(meta, class_names=("a", "b", "c"))
    torch.manual_seed(1)
    source = models.build_model(source_meta)
    path = tmp_path / "teacher.pt"
    models.save_checkpoint(path, model=source, meta=source_meta)
    model = models.build_model(meta)
    report = models.init_weights(model, str(path), meta=meta)
    head = 0 if same_classes else LIGHT_HEAD_TENSORS[name]
    total = len([k for k in model.state_dict() if not k.endswith("num_batches_tracked")])
    assert report == models.LoadReport(loaded=total - head, mismatched=head, unmatched=0, missing=head)


@pytest.mark.parametrize(
    "name, plain, doubled",
    [
        ("fasterrcnn_mobilenet_v3_large_fpn", (48, 60), (76, 96)),  # short side to 48; at 96 the long side caps
        ("fasterrcnn_mobilenet_v3_large_320_fpn", (48, 60), (76, 96)),
        ("ssdlite320_mobilenet_v3_large", (48, 48), (96, 96)),  # a fixed square whatever the image's shape
    ],
)
def test_light_model_runs_a_scale_view_at_the_new_size(
    name: str, plain: tuple[int, int], doubled: tuple[int, int]
) -> None:
    s = 48
    model = models.build_model(_light_meta(name, size=s))
    before = _settings(model)
    seen: list[tuple[int, int]] = []
    model.transform.register_forward_hook(lambda module, args, out: seen.append(tuple(out[0].image_sizes[0])))
    image = torch.rand(3, 64, 80)
    assert models._resized_size(model, (64, 80)) == plain
    dets = models.predict(model, [image])
    with models.input_size(model, 2 * s, 2 * s):
        assert models._resized_size(model, (64, 80)) == doubled
        dets += models.predict(model, [image])
    assert seen == [plain, doubled] and _settings(model) == before
    for d in dets:  # predictions come back in the original frame
        assert len(d) > 0 and (d.boxes[:, 0::2] <= 80).all() and (d.boxes[:, 1::2] <= 64).all()


@pytest.mark.parametrize(
    "name, fits",
    [("fasterrcnn_mobilenet_v3_large_320_fpn", False), ("ssdlite320_mobilenet_v3_large", True)],
    ids=["keeps-aspect", "fixed-square"],
)
def test_unfit_reason_tells_the_truth_for_a_strip(name: str, fits: bool) -> None:
    """A 4000 x 1 px strip: resizing its short side to 64 px (long side at most 640) leaves 0 px, but a
    fixed-size model squeezes any image into its square."""
    meta = _light_meta(name, size=64)
    detector = models.TorchvisionDetector(models.build_model(meta), meta)
    reason = detector.unfit_reason(1, 4000, min_size=meta.min_size, max_size=meta.max_size)
    assert (reason is None) == fits
    if fits:
        assert models._resized_size(detector.module, (1, 4000)) == (64, 64)
        assert len(detector.predict([torch.rand(3, 1, 4000)])) == 1
    else:
        assert reason == "would resize it to 640x0 px"


def test_a_fixed_size_model_takes_a_square() -> None:
    name, data = "ssdlite320_mobilenet_v3_large", _dataset(keypoints=False)
    assert ModelMeta.from_dataset(name, data).min_size == ModelMeta.from_dataset(name, data).max_size == 320
    meta = ModelMeta.from_dataset(name, data, min_size=256)
    assert (meta.min_size, meta.max_size) == (256, 256)
    assert models.build_model(meta).transform.fixed_size == (256, 256)
    assert ModelMeta.from_dataset(name, data, min_size=256, max_size=256) == meta
    with pytest.raises(UserError, match="must equal --min-size") as exc:
        ModelMeta.from_dataset(name, data, max_size=400)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name", LIGHT)
def test_light_model_ignore_regions_are_honoured_or_refused(name: str) -> None:
    """Faster R-CNN leaves ignore regions out of its loss; SSD cannot, and says so rather than teach them."""
    model = models.build_model(_light_meta(name))
    one, empty = _targets("boxes")
    with_ignore = [{**one, "ignore": torch.tensor([[40.0, 40.0, 60.0, 62.0]])}, empty]
    no_ignore = [{**one, "ignore": torch.zeros((0, 4))}, empty]
    assert all(torch.isfinite(v) for v in models.losses(model, _images(), no_ignore).values())
    if supports_ignore(model):
        assert all(torch.isfinite(v) for v in models.losses(model, _images(), with_ignore).values())
    else:
        assert name.startswith("ssdlite")
        with pytest.raises(UserError, match="1 ignore region") as exc:
            models.losses(model, _images(), with_ignore)
        assert "\n" not in str(exc.value)


def test_ssdlite_needs_two_images_per_training_batch() -> None:
    """torchvision's SSDlite recipe trains its batch norm, down to a 1 x 1 feature map: one image cannot."""
    model = models.build_model(_light_meta("ssdlite320_mobilenet_v3_large"))
    with pytest.raises(UserError, match="raise --batch-size") as exc:
        models.losses(model, _images()[:1], _targets("boxes")[:1])
    assert "\n" not in str(exc.value)
    assert len(models.predict(model, _images()[:1])) == 1  # inference uses the running statistics


def test_speed_bench_runs() -> None:
    """bench/model_speed.py's measure() on a tiny batch (the table itself is for humans)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "model_speed.py"
    spec = importlib.util.spec_from_file_location("model_speed", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    train_its, predict_ips, params = bench.measure("small_fcos", batch_size=2, size_px=64, iters=1)
    assert train_its > 0 and predict_ips > 0 and params > 0
    assert np.isfinite([train_its, predict_ips]).all()
