"""The torchvision architectures that ``train --model NAME`` builds (``datadistill models`` lists them).

:data:`MODELS` holds small models that train from scratch on a CPU in minutes at 128 px, torchvision's light
COCO-pretrained MobileNetV3 detectors to fine-tune on a laptop, and its standard large models for real work,
all built with no weights (:func:`datadistill.models.torchvision.init_weights` loads pretrained ones by
torchvision weight name or from a local file). Building a model is all this module does; how it trains and
predicts is :mod:`datadistill.models.torchvision`'s.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn
from torchvision.models.detection import (
    fasterrcnn_mobilenet_v3_large_320_fpn,
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet50_fpn_v2,
    fcos_resnet50_fpn,
    keypointrcnn_resnet50_fpn,
    retinanet_resnet50_fpn_v2,
    ssdlite320_mobilenet_v3_large,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNN, KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.resnet import BasicBlock
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from datadistill.errors import UserError
from datadistill.models.detector import Task


@dataclass(frozen=True)
class ModelSpec:
    """One entry of :data:`MODELS`.

    ``builder(num_classes=C, num_keypoints=K, min_size=..., max_size=...)`` returns a randomly initialised
    torchvision detector; ``num_classes`` excludes any background class (the builder adds it where the
    architecture needs it). ``pretrained`` marks the models that are meant to start from pretrained
    weights (built as torchvision builds them with weights: backbone batch norm frozen and first stages
    fixed where its recipe does so). ``fixed_size``: the model resizes every image to a ``min_size`` x
    ``min_size`` square whatever its aspect ratio (SSD), so its ``max_size`` is ``min_size``.
    """

    name: str
    task: Task
    builder: Callable[..., nn.Module]
    min_size: int
    max_size: int
    pretrained: bool
    description: str
    fixed_size: bool = False


# ----------------------------------------------------------------------------------------------------
# small models that train from scratch on a CPU


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


def _small_resnet(widths: Sequence[int], blocks: Sequence[int]) -> nn.Sequential:
    """A ResNet-style body with few channels and GroupNorm (batch-size independent, for training from
    scratch): a stride-4 stem of two 3x3 convs, then ``len(widths)`` stages of BasicBlocks, strides
    4, 8, 16, 32. Children are named ``stem, layer1, ...`` for :class:`BackboneWithFPN`."""
    stem_width = widths[0]
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["stem"] = nn.Sequential(
        nn.Conv2d(3, stem_width // 2, 3, stride=2, padding=1, bias=False),
        _group_norm(stem_width // 2),
        nn.ReLU(inplace=True),
        nn.Conv2d(stem_width // 2, stem_width, 3, stride=2, padding=1, bias=False),
        _group_norm(stem_width),
        nn.ReLU(inplace=True),
    )
    in_ch = stem_width
    for i, (width, n) in enumerate(zip(widths, blocks, strict=True)):
        stride = 1 if i == 0 else 2
        stage: list[nn.Module] = []
        for j in range(n):
            downsample = None
            if j == 0 and (stride != 1 or in_ch != width):
                downsample = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride=stride, bias=False), _group_norm(width))
            stage.append(BasicBlock(in_ch, width, stride if j == 0 else 1, downsample, norm_layer=_group_norm))
            in_ch = width
        layers[f"layer{i + 1}"] = nn.Sequential(*stage)
    body = nn.Sequential(layers)
    for m in body.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return body


def _small_fpn_backbone(
    *, widths: Sequence[int], blocks: Sequence[int], channels: int, levels: Sequence[int], extra: str
) -> BackboneWithFPN:
    """The small body (stage ``widths``, BasicBlocks per stage) with an FPN of ``channels`` over the
    stages in ``levels`` (1 = stride 4 ... 4 = stride 32), plus P6/P7 convs (``extra="p6p7"``) or a
    max-pooled level (``"pool"``)."""
    body = _small_resnet(widths[: max(levels)], blocks[: max(levels)])
    extra_blocks = LastLevelP6P7(channels, channels) if extra == "p6p7" else LastLevelMaxPool()
    return BackboneWithFPN(
        body,
        return_layers={f"layer{i}": str(k) for k, i in enumerate(levels)},
        in_channels_list=[widths[i - 1] for i in levels],
        out_channels=channels,
        extra_blocks=extra_blocks,
        norm_layer=_group_norm,
    )


def _build_small_fcos(*, num_classes: int, num_keypoints: int, min_size: int, max_size: int) -> nn.Module:
    """FCOS over P3-P7 (strides 8..128; at 128 px nearly every object is learnt on P3), 3 head convs."""
    del num_keypoints
    backbone = _small_fpn_backbone(
        widths=(32, 64, 128, 256), blocks=(1, 2, 2, 1), channels=96, levels=(2, 3, 4), extra="p6p7"
    )
    strides = (8, 16, 32, 64, 128)
    anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    model = FCOS(
        backbone,
        num_classes=num_classes,
        min_size=min_size,
        max_size=max_size,
        anchor_generator=anchors,
        head=FCOSHead(backbone.out_channels, 1, num_classes, num_convs=3),
        score_thresh=0.05,
        detections_per_img=100,
        topk_candidates=300,
    )
    return _live_fcos_regression(model)


def _live_fcos_regression(model: FCOS) -> FCOS:
    """Start FCOS's box regression above zero.

    torchvision's FCOS head puts a ReLU on the regressed distances, initialised around 0: with some seeds
    an early step pushes them below zero everywhere, the ReLU passes no gradient, and the boxes stay empty
    for the whole run (GIoU loss stuck at 1.0, AP 0). Distances are in anchor-size units (about 1 for an
    object of the anchor's size), so a bias of 1 keeps every location alive at the start.
    """
    nn.init.constant_(model.head.regression_head.bbox_reg.bias, 1.0)
    return model


def _small_rcnn_backbone() -> BackboneWithFPN:
    """P2-P6 (strides 4..64) over a narrow body: the R-CNN heads pool small objects from P2."""
    return _small_fpn_backbone(
        widths=(32, 64, 96, 128), blocks=(1, 1, 1, 1), channels=64, levels=(1, 2, 3, 4), extra="pool"
    )


def _small_rcnn_kwargs(backbone: BackboneWithFPN, num_classes: int, *, detections: int) -> dict[str, Any]:
    """Faster R-CNN parts sized for 128-256 px images: few proposals and sampled ROIs, a small box head."""
    c = backbone.out_channels
    anchors = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 5)
    return dict(
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(c, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=128,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=1),
        box_head=TwoMLPHead(c * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, num_classes + 1),
        box_batch_size_per_image=64,
        box_score_thresh=0.05,
        box_detections_per_img=detections,
    )


def _build_small_frcnn(*, num_classes: int, num_keypoints: int, min_size: int, max_size: int) -> nn.Module:
    del num_keypoints
    backbone = _small_rcnn_backbone()
    return FasterRCNN(
        backbone,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        **_small_rcnn_kwargs(backbone, num_classes, detections=100),
    )


def _build_small_keypointrcnn(*, num_classes: int, num_keypoints: int, min_size: int, max_size: int) -> nn.Module:
    backbone = _small_rcnn_backbone()
    c = backbone.out_channels
    head_width = 64
    return KeypointRCNN(
        backbone,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        **_small_rcnn_kwargs(backbone, num_classes, detections=20),
        # 7x7 ROI features -> 4 convs -> deconv to 14 -> bilinear x2: 28x28 heatmaps
        keypoint_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=1),
        keypoint_head=KeypointRCNNHeads(c, (head_width,) * 4),
        keypoint_predictor=KeypointRCNNPredictor(head_width, num_keypoints),
    )


# ----------------------------------------------------------------------------------------------------
# torchvision's pretrained models: its light MobileNetV3 detectors and its standard large ones, built
# without weights (init_weights loads them) the way torchvision builds them with weights


def _freeze_norm(module: nn.Module) -> None:
    """Replace every BatchNorm2d under ``module`` by a FrozenBatchNorm2d of torchvision's default eps (1e-5),
    as torchvision's builders do when they pass ``norm_layer=FrozenBatchNorm2d``: ResNet's own eps, while
    MobileNetV3's batch norm has 1e-3, its frozen one in torchvision's detectors 1e-5."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features))
        else:
            _freeze_norm(child)


def _freeze_backbone_norm(model: nn.Module) -> nn.Module:
    """torchvision's pretrained recipe: the ResNet body's batch norm frozen, its stem and first stage fixed.

    torchvision builds with trainable BatchNorm when no weights are given; this module never downloads at
    build time, so the freezing is applied here, the same way whether weights are loaded later or not.
    """
    body = model.backbone.body
    _freeze_norm(body)
    for name, param in body.named_parameters():
        if not name.startswith(("layer2", "layer3", "layer4")):
            param.requires_grad_(False)
    return model


def _freeze_mobilenet_backbone(model: nn.Module, *, trainable_stages: int = 3) -> nn.Module:
    """torchvision's pretrained recipe for its MobileNetV3 Faster R-CNNs: the body's batch norm frozen, the
    blocks before its last ``trainable_stages`` stages (of 6: the stem, each strided block, the last
    block) fixed, as ``backbone_utils._mobilenet_extractor`` does (applied after building, as
    :func:`_freeze_backbone_norm`)."""
    body = model.backbone.body
    blocks = list(body.children())
    starts = [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
    _freeze_norm(body)
    for block in blocks[: starts[len(starts) - trainable_stages]]:
        block.requires_grad_(False)
    return model


def _build_pretrained(
    build: Callable[..., nn.Module],
    *,
    num_classes: int,
    num_keypoints: int,
    min_size: int,
    max_size: int,
    background: int,
    steps: tuple[Callable[[nn.Module], nn.Module], ...],
) -> nn.Module:
    """torchvision's builder ``build`` with no weights, ``background`` (1 for the softmax heads of the R-CNN
    family, 0 for the sigmoid heads) added to ``num_classes``, keypoints where the model has them; then
    ``steps`` (the live FCOS regression, the frozen parts of the pretrained recipe), in order."""
    keypoints = {"num_keypoints": num_keypoints} if build is keypointrcnn_resnet50_fpn else {}
    model = build(weights=None, weights_backbone=None, num_classes=num_classes + background, min_size=min_size,
                  max_size=max_size, **keypoints)  # fmt: skip
    for step in steps:
        model = step(model)
    return model


def _pretrained(
    build: Callable[..., nn.Module], background: int, *steps: Callable[[nn.Module], nn.Module]
) -> Callable[..., nn.Module]:
    return partial(_build_pretrained, build, background=background, steps=steps)


def _build_ssdlite(*, num_classes: int, num_keypoints: int, min_size: int, max_size: int) -> nn.Module:
    """SSDlite resizes every image to a fixed square (``min_size`` px; ``max_size`` is ``min_size``). Its
    pretrained recipe trains every layer and its batch norm, so nothing is frozen; its default boxes are
    fractions of the input, so another size works with the same weights."""
    del num_keypoints
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes + 1)
    transform = model.transform
    transform.min_size, transform.max_size, transform.fixed_size = (min_size,), max_size, (min_size, min_size)
    return model


_R50, _MOBILE = "(torchvision); init weights:", "(torchvision, light{}); init weights:"
# fmt: off
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    # name, task, builder, min_size, max_size, pretrained, description
    ModelSpec("small_fcos", "boxes", _build_small_fcos, 128, 128, False,
              "FCOS, small GroupNorm ResNet-FPN (2.6M), trains from scratch on a CPU (default)"),
    ModelSpec("small_frcnn", "boxes", _build_small_frcnn, 128, 128, False,
              "Faster R-CNN, small GroupNorm ResNet-FPN (1.6M), trains from scratch on a CPU"),
    ModelSpec("small_keypointrcnn", "keypoints", _build_small_keypointrcnn, 128, 128, False,
              "Keypoint R-CNN, small GroupNorm ResNet-FPN (1.7M), trains from scratch on a CPU (default)"),
    ModelSpec("fasterrcnn_resnet50_fpn_v2", "boxes", _pretrained(fasterrcnn_resnet50_fpn_v2, 1, _freeze_backbone_norm),
              800, 1333, True, f"Faster R-CNN R50-FPN v2 {_R50}FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1"),
    ModelSpec("retinanet_resnet50_fpn_v2", "boxes", _pretrained(retinanet_resnet50_fpn_v2, 0, _freeze_backbone_norm),
              800, 1333, True, f"RetinaNet R50-FPN v2 {_R50}RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1"),
    ModelSpec("fcos_resnet50_fpn", "boxes",
              _pretrained(fcos_resnet50_fpn, 0, _live_fcos_regression, _freeze_backbone_norm),
              800, 1333, True, f"FCOS R50-FPN {_R50}FCOS_ResNet50_FPN_Weights.COCO_V1"),
    ModelSpec("keypointrcnn_resnet50_fpn", "keypoints",
              _pretrained(keypointrcnn_resnet50_fpn, 1, _freeze_backbone_norm), 800, 1333, True,
              f"Keypoint R-CNN R50-FPN {_R50}KeypointRCNN_ResNet50_FPN_Weights.COCO_V1"),
    ModelSpec("fasterrcnn_mobilenet_v3_large_fpn", "boxes",
              _pretrained(fasterrcnn_mobilenet_v3_large_fpn, 1, _freeze_mobilenet_backbone), 800, 1333, True,
              "Faster R-CNN MobileNetV3-Large FPN " + _MOBILE.format("")
              + "FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1"),
    # torchvision's low-resolution settings (fewer proposals)
    ModelSpec("fasterrcnn_mobilenet_v3_large_320_fpn", "boxes",
              _pretrained(fasterrcnn_mobilenet_v3_large_320_fpn, 1, _freeze_mobilenet_backbone), 320, 640, True,
              "Faster R-CNN MobileNetV3-Large FPN at 320 px " + _MOBILE.format(", fast on a CPU")
              + "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1"),
    ModelSpec("ssdlite320_mobilenet_v3_large", "boxes", _build_ssdlite, 320, 320, True,
              "SSDlite MobileNetV3-Large, 320x320 px " + _MOBILE.format("est, fast on a CPU")
              + "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1", fixed_size=True),
)}
# fmt: on


def list_models() -> list[tuple[str, str, str]]:
    """``(name, task, description)`` of each architecture in :data:`MODELS`."""
    return [(name, spec.task, spec.description) for name, spec in MODELS.items()]


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` called ``name``; a one-line UserError lists the valid names."""
    try:
        return MODELS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None
