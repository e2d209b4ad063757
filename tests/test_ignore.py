"""ignore.py: ignore regions (crowd, uncertain pseudo-labels) leave the losses as if their anchors were not there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.ssd import SSD

from datadistill.data.coco import Category, CocoDataset, ImageLabels, ImageRecord
from datadistill.data.dataset import DetectionDataset
from datadistill.models import ignore
from datadistill.models import torchvision as models
from datadistill.models.torchvision import MODELS, ModelMeta

NUM_CLASSES = 3


def _anchors(n_side: int = 8, stride: float = 8.0) -> torch.Tensor:
    """A grid of square anchors ``[n_side**2, 4]`` of side ``stride``."""
    c = (torch.arange(n_side, dtype=torch.float32) + 0.5) * stride
    y, x = torch.meshgrid(c, c, indexing="ij")
    half = stride / 2
    return torch.stack([x - half, y - half, x + half, y + half], dim=-1).reshape(-1, 4)


def _head_case(seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor], list[torch.Tensor]]:
    """One image with an object (label 1), an ignore box and a second object (label 0), anchors on an 8 x 8
    grid, and random head outputs that need gradients."""
    g = torch.Generator().manual_seed(seed)
    a = _anchors()
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 28.0, 30.0], [36.0, 34.0, 60.0, 62.0], [40.0, 2.0, 62.0, 20.0]]),
         "labels": torch.tensor([1, ignore.IGNORE_LABEL, 0])},
    ]  # fmt: skip
    outputs = {
        "cls_logits": torch.randn(1, len(a), NUM_CLASSES, generator=g).requires_grad_(),
        "bbox_regression": torch.rand(1, len(a), 4, generator=g).requires_grad_(),
        "bbox_ctrness": torch.randn(1, len(a), 1, generator=g).requires_grad_(),
    }
    return targets, outputs, [a]


def _matches(targets: list[dict[str, torch.Tensor]], anchors: list[torch.Tensor]) -> list[torch.Tensor]:
    """FCOS-like matching for the tests: an anchor matches the smallest box that holds its centre."""
    out = []
    for t, a in zip(targets, anchors, strict=True):
        centres = (a[:, :2] + a[:, 2:]) / 2
        b = t["boxes"]
        inside = (centres[:, None, 0] > b[None, :, 0]) & (centres[:, None, 0] < b[None, :, 2])
        inside &= (centres[:, None, 1] > b[None, :, 1]) & (centres[:, None, 1] < b[None, :, 3])
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        best, idx = torch.where(inside, 1e8 - area[None, :], torch.zeros(())).max(dim=1)
        out.append(torch.where(best > 0, idx, torch.full_like(idx, -1)))
    return out


@pytest.mark.parametrize(
    ("head_class", "aware_class"),
    [(FCOSHead, ignore.IgnoreAwareFCOSHead), (RetinaNetHead, ignore.IgnoreAwareRetinaNetHead)],
)
def test_an_ignore_box_is_as_if_its_anchors_were_not_there(head_class: type, aware_class: type) -> None:
    targets, outputs, anchors = _head_case()
    if head_class is RetinaNetHead:
        del outputs["bbox_ctrness"]
    matched = _matches(targets, anchors)
    ignored = (matched[0] >= 0) & (targets[0]["labels"][matched[0].clamp(min=0)] == ignore.IGNORE_LABEL)
    assert int(ignored.sum()) >= 4 and int((matched[0] >= 0).sum()) > int(ignored.sum())
    head = head_class(in_channels=32, num_anchors=1, num_classes=NUM_CLASSES)
    keep = ~ignored  # the oracle: torchvision's own loss without the ignored anchors
    want = head.compute_loss(targets, {k: v[:, keep] for k, v in outputs.items()}, [anchors[0][keep]],
                             [matched[0][keep]])  # fmt: skip
    head.__class__ = aware_class
    got = head.compute_loss(targets, outputs, anchors, matched)
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0.0)
    sum(got.values()).backward()
    for key, value in outputs.items():  # nothing reaches the ignored anchors
        assert value.grad is not None and torch.count_nonzero(value.grad[0][ignored]) == 0, key
    assert torch.count_nonzero(outputs["cls_logits"].grad[0][keep]) > 0


@pytest.mark.parametrize(
    ("head_class", "aware_class"),
    [(FCOSHead, ignore.IgnoreAwareFCOSHead), (RetinaNetHead, ignore.IgnoreAwareRetinaNetHead)],
)
def test_without_ignore_boxes_the_loss_is_torchvision_exactly(head_class: type, aware_class: type) -> None:
    targets, outputs, anchors = _head_case()
    if head_class is RetinaNetHead:
        del outputs["bbox_ctrness"]
    targets[0] = {"boxes": targets[0]["boxes"][[0, 2]], "labels": targets[0]["labels"][[0, 2]]}
    matched = _matches(targets, anchors)
    head = head_class(in_channels=32, num_anchors=1, num_classes=NUM_CLASSES)
    want = head.compute_loss(targets, outputs, anchors, matched)
    head.__class__ = aware_class
    got = head.compute_loss(targets, outputs, anchors, matched)
    assert {k: v.item() for k, v in got.items()} == {k: v.item() for k, v in want.items()}


def _ssd() -> torch.nn.Module:
    torch.manual_seed(0)
    meta = ModelMeta.from_dataset("ssdlite320_mobilenet_v3_large", _boxes_dataset(), min_size=64)
    model = models.build_model(meta)
    model.__class__ = SSD  # torchvision's own loss, as the oracle
    return model


def test_ssd_ignores_the_default_boxes_of_an_ignore_box_as_if_they_were_not_there() -> None:
    targets, outputs, anchors = _head_case()
    targets[0]["labels"] = torch.tensor([2, ignore.IGNORE_LABEL, 1])  # SSD's background is class 0
    del outputs["bbox_ctrness"]
    g = torch.Generator().manual_seed(1)
    outputs["cls_logits"] = torch.randn(1, len(anchors[0]), NUM_CLASSES + 1, generator=g).requires_grad_()
    matched = _matches(targets, anchors)
    ignored = (matched[0] >= 0) & (targets[0]["labels"][matched[0].clamp(min=0)] == ignore.IGNORE_LABEL)
    assert int(ignored.sum()) >= 4 and int((matched[0] >= 0).sum()) > int(ignored.sum())
    model = _ssd()
    keep = ~ignored  # the oracle: torchvision's own loss without the ignored default boxes
    want = model.compute_loss(targets, {k: v[:, keep] for k, v in outputs.items()}, [anchors[0][keep]],
                              [matched[0][keep]])  # fmt: skip
    model.__class__ = ignore.IgnoreAwareSSD
    got = model.compute_loss(targets, outputs, anchors, matched)
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0.0)
    sum(got.values()).backward()
    for key, value in outputs.items():  # nothing reaches the ignored default boxes
        assert value.grad is not None and torch.count_nonzero(value.grad[0][ignored]) == 0, key
    assert torch.count_nonzero(outputs["cls_logits"].grad[0][keep]) > 0
    # without ignore boxes, exactly torchvision's loss
    plain = [{"boxes": targets[0]["boxes"][[0, 2]], "labels": targets[0]["labels"][[0, 2]]}]
    matched = _matches(plain, anchors)
    want = _ssd().compute_loss(plain, outputs, anchors, matched)
    got = model.compute_loss(plain, outputs, anchors, matched)
    assert {k: v.item() for k, v in got.items()} == {k: v.item() for k, v in want.items()}


def _rpn(aware: bool) -> RegionProposalNetwork:
    torch.manual_seed(0)
    model = models.build_model(ModelMeta.from_dataset("small_frcnn", _boxes_dataset(), min_size=64, max_size=64))
    rpn = model.rpn
    if not aware:
        rpn.__class__ = RegionProposalNetwork
    return rpn


def test_rpn_leaves_out_anchors_on_ignore_boxes() -> None:
    anchors = [_anchors(n_side=8, stride=8.0)]
    target = {"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0], [32.0, 32.0, 40.0, 40.0]]), "labels": torch.tensor([2, -1])}
    plain, _ = _rpn(aware=False).assign_targets_to_anchors(anchors, [target])
    aware, _ = _rpn(aware=True).assign_targets_to_anchors(anchors, [target])
    on_object, on_ignore = 0, 4 * 8 + 4  # the anchors that are exactly those boxes
    assert plain[0][on_object] == aware[0][on_object] == 1.0
    assert plain[0][on_ignore] == 1.0 and aware[0][on_ignore] == -1.0
    changed = torch.nonzero(plain[0] != aware[0]).flatten()
    assert changed.tolist() == [on_ignore]


def test_rcnn_box_head_leaves_out_proposals_on_ignore_boxes() -> None:
    model = models.build_model(ModelMeta.from_dataset("small_frcnn", _boxes_dataset(), min_size=64, max_size=64))
    proposals = [torch.tensor([[0.0, 0.0, 8.0, 8.0], [32.0, 32.0, 40.0, 40.0], [48.0, 0.0, 60.0, 12.0]])]
    target = {"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0], [32.0, 32.0, 40.0, 40.0]]), "labels": torch.tensor([3, -1])}
    _, labels = model.roi_heads.assign_targets_to_proposals(proposals, [target["boxes"]], [target["labels"]])
    assert labels[0].tolist() == [3, -1, 0]  # object, ignored, background


def _boxes_dataset(crowd: bool = False) -> CocoDataset:
    cats = (Category(id=1, name="a"), Category(id=2, name="b"), Category(id=3, name="c"))
    n = 3 if crowd else 2
    lab = ImageLabels(
        ids=np.arange(n), boxes=np.array([[4, 4, 20, 24], [30, 10, 50, 40], [10, 40, 30, 60]][:n], np.float32),
        labels=np.array([0, 2, 1][:n]), iscrowd=np.array([False, False, True][:n]), area=np.zeros(n, np.float32),
    )  # fmt: skip
    image = ImageRecord(id=1, file_name="a.png", width=64, height=64)
    return CocoDataset(images=(image,), labels={1: lab}, categories=cats)


@pytest.mark.parametrize("name", [n for n, s in MODELS.items() if not s.pretrained])
def test_losses_with_ignore_regions(name: str) -> None:
    """Every small model trains with ignore regions; an empty ``ignore`` is no ignore at all."""
    keypoints = MODELS[name].task == "keypoints"
    names = ("head", "left_hand", "right_hand")
    cat = (
        Category(id=1, name="figure", keypoints=names, skeleton=((1, 2),), flip_index=(0, 2, 1)) if keypoints else None
    )
    ds = _boxes_dataset() if not keypoints else CocoDataset(
        images=(ImageRecord(id=1, file_name="a.png", width=64, height=64),), labels={1: ImageLabels.empty(3)},
        categories=(cat,))  # fmt: skip
    meta = ModelMeta.from_dataset(name, ds, min_size=64, max_size=64)
    image = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))]
    target = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 34.0]]), "labels": torch.tensor([0])}
    if keypoints:
        target["keypoints"] = torch.tensor([[[10.0, 8.0, 2.0], [6.0, 20.0, 2.0], [26.0, 20.0, 2.0]]])

    def run(t: dict[str, torch.Tensor]) -> dict[str, float]:
        torch.manual_seed(0)
        model = models.build_model(meta)
        torch.manual_seed(1)
        return {k: v.item() for k, v in models.losses(model, image, [t]).items()}

    plain = run(target)
    assert run({**target, "ignore": torch.zeros((0, 4))}) == plain
    with_ignore = run({**target, "ignore": torch.tensor([[36.0, 30.0, 60.0, 62.0]])})
    assert all(np.isfinite(v) for v in with_ignore.values())
    assert with_ignore != plain


def test_every_torchvision_detector_is_built_ignore_aware() -> None:
    for name, spec in MODELS.items():
        ds = _boxes_dataset() if spec.task == "boxes" else CocoDataset(
            images=(), labels={}, categories=(Category(id=1, name="p", keypoints=("l", "r"), skeleton=(),
                                                       flip_index=(1, 0)),))  # fmt: skip
        meta = ModelMeta.from_dataset(name, ds, min_size=64, max_size=64)
        assert ignore.supports_ignore(models.build_model(meta)), name


def test_dataset_gives_crowd_regions_as_ignore_boxes_through_the_flip(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    plain = DetectionDataset(_boxes_dataset(crowd=False), tmp_path, train=False)
    _, target = plain[0]
    assert "ignore" not in target and target["labels"].tolist() == [0, 2]
    flipped = DetectionDataset(_boxes_dataset(crowd=True), tmp_path, train=True, min_scale=1.0, max_scale=1.0,
                               flip_prob=1.0)  # fmt: skip
    _, target = flipped[0]
    assert target["labels"].tolist() == [0, 2]
    torch.testing.assert_close(target["boxes"], torch.tensor([[44.0, 4.0, 60.0, 24.0], [14.0, 10.0, 34.0, 40.0]]))
    torch.testing.assert_close(target["ignore"], torch.tensor([[34.0, 40.0, 54.0, 60.0]]))
