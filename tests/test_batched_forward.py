"""The batched eval-time transform and post-processing (datadistill.models.batched) against torchvision's own
per-image code: the same tensors and the same detections."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from datadistill.models import batched
from datadistill.models.batched import BatchedRoIHeads, BatchedTransform, dense_detections
from datadistill.models.detector import BACKENDS, backend_module, load_detector
from datadistill.models.zoo import MODELS

# ----------------------------------------------------------------------------------------------------
# helpers


def _build(name: str, *, min_size: int = 64, max_size: int = 96) -> torch.nn.Module:
    """A seeded random ``name`` of the zoo at a small input size, cheap enough to run in a test (few RPN
    proposals and detections for the R50 models), with a score threshold low enough for random weights
    to give many detections."""
    spec = MODELS[name]
    torch.manual_seed(0)
    size = {"min_size": min_size, "max_size": min_size if spec.fixed_size else max_size}
    model = spec.builder(num_classes=3, num_keypoints=5 if spec.task == "keypoints" else 0, **size).eval()
    if hasattr(model, "rpn"):
        model.rpn._post_nms_top_n["testing"] = min(model.rpn._post_nms_top_n["testing"], 30)
        cap = 6 if spec.task == "keypoints" else 30  # the R50 keypoint head costs ~2 GFLOP per box
        model.roi_heads.detections_per_img = min(model.roi_heads.detections_per_img, cap)
        model.roi_heads.score_thresh = 0.01
    elif hasattr(model, "score_thresh"):
        model.score_thresh = 0.005
    return model


def _canonical(det: dict[str, Tensor]) -> dict[str, Tensor]:
    """A detection set with every field (boxes, scores, labels, keypoints) in one order whatever the order
    among equal scores: sorted by score, label, then box coordinates."""
    order = torch.arange(len(det["scores"]))
    keys = [det["boxes"][:, i] for i in reversed(range(4))] + [det["labels"].to(det["scores"].dtype), det["scores"]]
    for key in keys:
        order = order[torch.sort(key[order], stable=True).indices]
    return {k: v[order] for k, v in det.items()}


def _assert_same(ours: list[dict[str, Tensor]], theirs: list[dict[str, Tensor]]) -> None:
    """The same detections per image: identical sets (every field, bit for bit), and the same scores in the
    same (descending) order; equal scores may come in another order."""
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert set(a) == set(b)
        assert torch.equal(a["scores"], b["scores"]), f"image {i}: other scores or another order"
        a, b = _canonical(a), _canonical(b)
        for key in b:
            assert torch.equal(a[key], b[key]), f"image {i}: other {key}"


# ----------------------------------------------------------------------------------------------------
# the transform


@pytest.mark.parametrize("name", list(MODELS))
def test_transform_equals_torchvision_per_image(name: str) -> None:
    """One interpolate for the batch gives torchvision's per-image tensor bit for bit, and its sizes."""
    transform = _build(name).transform
    assert type(transform) is GeneralizedRCNNTransform
    images = list(torch.rand(3, 3, 75, 103, generator=torch.Generator().manual_seed(1)))
    theirs, _ = transform(images)
    batched.install_transform(transform)
    assert type(transform) is BatchedTransform
    transform.one_call = True  # batched on a CPU too (by default only on a GPU)
    ours, _ = transform(images)
    assert torch.equal(ours.tensors, theirs.tensors)
    assert ours.image_sizes == theirs.image_sizes
    expected = (64, 64) if MODELS[name].fixed_size else (64, 87)  # 75x103 -> 64x87.9, floored (SSD: a square)
    assert ours.image_sizes == [expected] * 3


def test_transform_falls_back_to_torchvision() -> None:
    """Images of several sizes, targets, or training mode: torchvision's own path, the same result."""
    theirs = _build("small_fcos").transform
    ours = batched.install_transform(copy.deepcopy(theirs))
    ours.one_call = True
    g = torch.Generator().manual_seed(2)
    same = list(torch.rand(2, 3, 70, 90, generator=g))
    mixed = [torch.rand(3, 70, 90, generator=g), torch.rand(3, 90, 70, generator=g)]
    targets = [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    for training, images, given in [(False, mixed, None), (False, same, targets), (True, same, targets)]:
        theirs.train(training), ours.train(training)
        a, a_targets = ours(images, given)
        b, b_targets = theirs(images, given)
        assert torch.equal(a.tensors, b.tensors) and a.image_sizes == b.image_sizes
        assert a_targets is not None if given else a_targets is None
        for x, y in zip(a_targets or [], b_targets or [], strict=True):
            assert torch.equal(x["boxes"], y["boxes"])
    assert a.image_sizes == [(64, 82)] * 2  # 70x90 -> 64x82.3, floored


# ----------------------------------------------------------------------------------------------------
# whole models


@pytest.mark.parametrize("name", list(MODELS))
def test_model_equals_torchvision(name: str) -> None:
    """A zoo model with the batched transform and post-processing gives torchvision's detections (boxes,
    scores, labels, keypoints) bit for bit, on a batch of one size and on one of two sizes."""
    model = _build(name)
    g = torch.Generator().manual_seed(3)
    same = list(torch.rand(3, 3, 75, 103, generator=g))
    mixed = [torch.rand(3, 70, 90, generator=g), torch.rand(3, 90, 70, generator=g)]
    with torch.no_grad():
        theirs = [model(same), model(mixed)]
        batched.configure(batched.install(model), one_call=True, per_image_nms=True)
        ours = [model(same), model(mixed)]
    for a, b in zip(ours, theirs, strict=True):
        assert sum(len(d["scores"]) for d in b) >= 10
        _assert_same(a, b)


# ----------------------------------------------------------------------------------------------------
# post-processing on made-up head outputs: clusters of overlapping boxes, pairs exactly on the IoU
# threshold, and many equal scores


def _cluster_boxes(count: int, g: torch.Generator, *, size: tuple[int, int]) -> Tensor:
    """``[count, 4]`` integer xyxy boxes inside ``size`` (H, W) px, in a few clusters of near copies (some
    exact copies, some pairs with an IoU of exactly 0.5 or 0.7), so that NMS has much to suppress and its
    decisions sit on the threshold; integers keep every IoU exact in float32 and float64 alike."""
    h, w = size
    centres = torch.stack([torch.randint(8, w - 8, (4,), generator=g), torch.randint(8, h - 8, (4,), generator=g)], 1)
    pick = centres[torch.randint(0, 4, (count,), generator=g)]
    half = torch.randint(2, 6, (count, 2), generator=g)
    shift = torch.randint(-2, 3, (count, 2), generator=g)
    boxes = torch.cat([pick - half + shift, pick + half + shift], 1)
    return boxes.clamp(min=0).minimum(torch.tensor([w, h, w, h])).float()


RCNN_CASES = {
    "few boxes per image (torchvision's coordinate trick)": (40, 0, 25),
    "many boxes per image (torchvision's loop over classes)": (420, 380, 5),
}


@pytest.mark.parametrize("counts", list(RCNN_CASES.values()), ids=list(RCNN_CASES))
@pytest.mark.parametrize("one_call", [False, True], ids=["per-image NMS", "one NMS"])
def test_rcnn_postprocess_equals_torchvision(counts: tuple[int, ...], one_call: bool) -> None:
    heads = _build("small_frcnn").roi_heads
    heads.detections_per_img = 15
    g = torch.Generator().manual_seed(4)
    shapes = [(60, 80), (50, 90), (60, 80)]
    proposals = [_cluster_boxes(n, g, size=s) for n, s in zip(counts, shapes, strict=True)]
    rows = sum(counts)
    class_logits = torch.randint(-2, 3, (rows, 4), generator=g).float()  # few distinct scores: many ties
    box_regression = torch.zeros(rows, 16)  # decoded boxes are the proposals, exactly
    args = (class_logits, box_regression, proposals, shapes)
    theirs = RoIHeads.postprocess_detections(heads, *args)
    heads.__class__, heads.one_call, heads.per_image_nms = BatchedRoIHeads, True, not one_call
    ours = heads.postprocess_detections(*args)
    as_dicts = [
        [dict(zip(("boxes", "scores", "labels"), d, strict=True)) for d in zip(*r, strict=True)] for r in (ours, theirs)
    ]
    kept = [len(d["scores"]) for d in as_dicts[1]]
    assert kept[0] == 15 and (kept[1] == 0) == (counts[1] == 0)  # the cap is reached; an image without boxes
    assert len(theirs[1][0].unique()) < kept[0]  # equal scores among the kept
    _assert_same(*as_dicts)


def _dense_outputs(
    model: torch.nn.Module, g: torch.Generator, *, images: int, levels: tuple[int, ...]
) -> tuple[dict[str, list[Tensor]], list[list[Tensor]]]:
    """Made-up FCOS/RetinaNet head outputs per level (``levels``: locations per level, 3 classes) with few
    distinct logits, and the anchors: integer boxes in clusters, the same for every image."""
    outputs: dict[str, list[Tensor]] = {"cls_logits": [], "bbox_regression": [], "bbox_ctrness": []}
    anchors = []
    for n in levels:
        outputs["cls_logits"].append(torch.randint(-4, 2, (images, n, 3), generator=g).float())
        if isinstance(model, FCOS):
            regression = torch.randint(1, 9, (images, n, 4), generator=g).float() / 4  # in anchor sizes
        else:
            regression = torch.randint(-2, 3, (images, n, 4), generator=g).float() / 8
        outputs["bbox_regression"].append(regression)
        outputs["bbox_ctrness"].append(torch.randint(-1, 2, (images, n, 1), generator=g).float())
        anchors.append(_cluster_boxes(n, g, size=(60, 80)))
    if not isinstance(model, FCOS):
        del outputs["bbox_ctrness"]
    return outputs, [anchors] * images


DENSE_CASES = {
    # topk_candidates, logits: few distinct values (many equal scores) or distinct ones
    "top-k cuts the candidates, distinct scores": (20, False),
    "many equal scores, top-k keeps all candidates": (1000, True),
}


@pytest.mark.parametrize("case", list(DENSE_CASES.values()), ids=list(DENSE_CASES))
@pytest.mark.parametrize("name", ["small_fcos", "retinanet_resnet50_fpn_v2"])
@pytest.mark.parametrize("one_call", [False, True], ids=["per-image NMS", "one NMS"])
def test_dense_postprocess_equals_torchvision(case: tuple[int, bool], name: str, one_call: bool) -> None:
    """FCOS's and RetinaNet's per-level top-k, NMS and cap of 25, batched, against torchvision's loops over
    images and levels. (Where equal scores straddle the top-k cut, either of them may be kept: not tested.)"""
    topk, ties = case
    model = _build(name)
    model.score_thresh, model.topk_candidates, model.detections_per_img = 0.05, topk, 25
    g = torch.Generator().manual_seed(5)
    outputs, anchors = _dense_outputs(model, g, images=3, levels=(60, 15, 4))
    if not ties:
        outputs["cls_logits"] = [x + torch.rand(x.shape, generator=g) / 4 for x in outputs["cls_logits"]]
    shapes = [(60, 80), (40, 70), (60, 80)]
    theirs = type(model).postprocess_detections(model, outputs, anchors, shapes)
    model.per_image_nms = not one_call
    ours = dense_detections(model, outputs, anchors, shapes)
    assert [len(d["scores"]) for d in theirs] == [25, 25, 25]
    assert all(len(d["scores"].unique()) < 25 for d in theirs) == ties
    if isinstance(model, FCOS):
        _assert_same(ours, theirs)
        return
    # RetinaNet: a CPU's vectorised sigmoid and exp compute the last elements of each image's tensor with
    # the scalar formula: the batched scores and boxes may differ by an ulp or two
    # (and equal scores, equal no longer, may come in another order: with ties only the scores are compared)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a["scores"], b["scores"], rtol=3e-7, atol=0)
        if not ties:
            assert torch.equal(a["labels"], b["labels"])
            torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# load-time options


@pytest.mark.slow  # inductor compiles the backbone on a CPU in about 35 s
def test_compiled_small_fcos_gives_the_eager_detections(checkpoint: Path) -> None:
    """``load_detector(compile=True)``: torch.compile's CPU backend (inductor, gcc) gives the eager model's
    detections within 1e-4 px and score."""
    images = list(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6)))
    eager = load_detector(str(checkpoint)).predict(images)
    compiled = load_detector(str(checkpoint), compile=True)
    assert compiled.module.backbone._compiled_call_impl is not None
    for a, b in zip(compiled.predict(images), eager, strict=True):
        assert len(b.scores) > 0 and torch.equal(a.labels, b.labels)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-4)
        torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=1e-4)


def test_backends_take_compile() -> None:
    """Every backend's ``load`` takes ``compile`` (the keyword ``label --compile`` passes), off by default."""
    for backend in BACKENDS:
        load = backend_module(backend).load
        assert inspect.signature(load).parameters["compile"].default is False, backend
    assert inspect.signature(load_detector).parameters["compile"].kind is inspect.Parameter.KEYWORD_ONLY


def test_channels_last_gives_the_same_detections(checkpoint: Path) -> None:
    """What ``load`` does on a GPU, here on a CPU: weights and input batch channels-last, the same detections
    (within float rounding: the convolutions sum in another order)."""
    images = list(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(7)))
    detector = load_detector(str(checkpoint))
    assert detector.module.transform.memory_format == torch.contiguous_format  # a CPU: left as it is
    eager = detector.predict(images)
    batched.channels_last(detector.module)
    batch, _ = detector.module.transform(images)
    assert batch.tensors.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(detector.predict(images), eager, strict=True):
        assert len(b.scores) > 0 and torch.equal(a.labels, b.labels)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_one_call_nms_of_half_precision_boxes_keeps_the_fp32_result(dtype: torch.dtype) -> None:
    """8 images x 60 classes, a box and its near-duplicate in each (image, class): NMS keeps one of each pair.
    The one-call offsets of (image, class) groups overflow fp16 (no suppression after the first image) and
    round bf16 boxes by 32 px or more; the boxes go through NMS in float32."""
    num_images, classes = 8, 60
    pair = torch.tensor([[1000.0, 500.0, 1300.0, 800.0], [1002.0, 502.0, 1302.0, 802.0]])
    boxes = pair.repeat(num_images * classes, 1)
    scores = torch.tensor([0.9, 0.8]).repeat(num_images * classes)
    labels = torch.arange(classes).repeat_interleave(2).repeat(num_images)
    image = torch.arange(num_images).repeat_interleave(2 * classes)
    args = {"num_images": num_images, "iou_thr": 0.5, "count": 10_000, "one_call": True}
    kept = batched.nms_per_image(boxes.to(dtype), scores.to(dtype), labels, image, **args)
    assert [len(k) for k in kept] == [classes] * num_images
    reference = batched.nms_per_image(boxes, scores, labels, image, **args)
    assert all(torch.equal(a, b) for a, b in zip(kept, reference, strict=True))
