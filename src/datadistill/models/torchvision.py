"""torchvision detectors behind datadistill's loop and :class:`~datadistill.models.detector.Detector`.

torchvision's detection models return losses in train mode and detections in eval mode, count classes
from 1 (0 is the background of the R-CNN family) and resize every input to ``min_size``. This module
wraps that once: callers give images as float32 ``[3, H, W]`` in [0, 1] and labels as contiguous class
indices ``0..C-1``; :func:`losses` gives the training losses and :func:`predict`
:class:`~datadistill.core.types.Detections` in the original image frame.

The architectures are :mod:`datadistill.models.zoo`'s; :func:`init_weights` loads pretrained ones by
torchvision weight name or from a local file; checkpoints are :mod:`datadistill.models.checkpoints`' (only
tensors and plain types, always read with ``torch.load(..., weights_only=True)``). :data:`LOOP` is what
datadistill's training loop (:mod:`datadistill.stages.train`) takes from this backend.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import get_weight
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import heatmaps_to_keypoints as _tv_heatmaps_to_keypoints
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.transform import resize_boxes, resize_keypoints

from datadistill.core.caps import DEFAULT_MAX_DET
from datadistill.core.types import Detections
from datadistill.core.views import resized_size
from datadistill.data.coco import CocoDataset
from datadistill.errors import UserError
from datadistill.models.batched import channels_last
from datadistill.models.batched import install as install_batched
from datadistill.models.checkpoints import is_checkpoint, load_torch_file, read_checkpoint, save_checkpoint, unwrap
from datadistill.models.detector import LoopBackend, ModelFiles, ModelMeta, resolve_max_det, single_file
from datadistill.models.ignore import IGNORE_LABEL, make_ignore_aware, supports_ignore
from datadistill.models.zoo import MODELS, get_spec, list_models

# reached from here too (tests, benchmarks): the zoo and the checkpoint files of this backend
__all__ = ["MODELS", "ModelMeta", "get_spec", "list_models", "read_checkpoint", "save_checkpoint"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# metadata


def meta_for(
    model: str, dataset: CocoDataset, *, min_size: int | None = None, max_size: int | None = None
) -> ModelMeta:
    """The meta of architecture ``model`` trained on ``dataset``; the task follows from the data (keypoint
    categories make it ``keypoints``), and a model of the other task is a UserError. The input size
    defaults to the architecture's; a fixed-size model (SSD) takes a square, so its ``max_size`` is its
    ``min_size``."""
    spec = get_spec(model)
    task = dataset.task
    if not dataset.categories:
        raise UserError("the data set has no categories; a detector needs at least one class")
    if spec.task != task:
        other = [n for n, s in MODELS.items() if s.task == task]
        raise UserError(
            f"model {model!r} detects {spec.task} but the data set has {task}; choose one of: {', '.join(other)}"
        )
    min_size = spec.min_size if min_size is None else int(min_size)
    if spec.fixed_size:
        if max_size is not None and int(max_size) != min_size:
            raise UserError(
                f"model {model!r} resizes every image to a {min_size}x{min_size} px square: --max-size "
                f"({max_size}) must equal --min-size, or be left out"
            )
        max_size = min_size
    max_size = max(min_size, spec.max_size) if max_size is None else int(max_size)
    return ModelMeta.for_dataset(model, dataset, min_size=min_size, max_size=max_size)


def build_model(meta: ModelMeta) -> nn.Module:
    """A randomly initialised detector for ``meta`` (seed torch first for reproducibility), with the batched
    eval-time transform and post-processing of :mod:`datadistill.models.batched` (training is torchvision's)."""
    spec = get_spec(meta.model)
    if spec.task != meta.task:
        raise UserError(f"model {meta.model!r} detects {spec.task}, but the meta says {meta.task}")
    if meta.task == "keypoints" and not meta.keypoint_names:
        raise UserError(f"model {meta.model!r} needs keypoint names in its meta")
    model = spec.builder(
        num_classes=meta.num_classes,
        num_keypoints=meta.num_keypoints,
        min_size=meta.min_size,
        max_size=meta.max_size,
    )
    return install_batched(make_ignore_aware(model))


def _label_offset(model: nn.Module) -> int:
    """1 for the R-CNN family and SSD (softmax over background + classes), 0 for the sigmoid heads (FCOS,
    RetinaNet), which need no background class."""
    return 1 if isinstance(unwrap(model), GeneralizedRCNN | SSD) else 0


def _is_keypoint_model(model: nn.Module) -> bool:
    inner = unwrap(model)
    return isinstance(inner, GeneralizedRCNN) and inner.roi_heads.has_keypoint()


def _device_of(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


# ----------------------------------------------------------------------------------------------------
# losses and predictions


def losses(model: nn.Module, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The training losses of a batch (sets train mode).

    images: float32 ``[3, H, W]`` in [0, 1]. targets: one dict per image with ``boxes`` ``[N, 4]`` xyxy px
    in that image's frame, ``labels`` ``[N]`` int64 class indices ``0..C-1``, for keypoint models
    ``keypoints`` ``[N, K, 3]`` (x, y, visibility), and optionally ``ignore`` ``[M, 4]`` xyxy px: regions
    that are neither objects nor background (:mod:`datadistill.models.ignore`). ``N = 0`` (and no ignore region)
    makes the image a negative. Ignore regions for a model whose training cannot honour them
    (:func:`~datadistill.models.ignore.supports_ignore`) are a UserError, as torchvision's loss would teach
    them as objects; so is a single image for SSDlite (its batch norm, trained as in torchvision's recipe,
    cannot take one image's 1 x 1 feature map).
    Returns torchvision's named scalar losses (sum them for the total); works with DDP-wrapped models.
    """
    if len(images) != len(targets):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    _check_ignore_support(model, targets)
    model.train()
    device = _device_of(model)
    offset = _label_offset(model)
    keypoints = _is_keypoint_model(model)
    tv_targets = []
    for i, t in enumerate(targets):
        boxes = t["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
        labels = t["labels"].to(device=device, dtype=torch.int64).reshape(-1)
        labels = labels + offset
        ignore = t.get("ignore")
        ignore = torch.zeros((0, 4)) if ignore is None else ignore
        ignore = ignore.to(device=device, dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": torch.cat([boxes, ignore]),
            "labels": torch.cat([labels, labels.new_full((len(ignore),), IGNORE_LABEL)]),
        }
        if keypoints:
            kps = t.get("keypoints")
            if kps is None:
                raise ValueError(f"target {i}: a keypoint model needs 'keypoints' [N, K, 3] in every target")
            kps = kps.to(device=device, dtype=torch.float32)
            target["keypoints"] = torch.cat([kps, kps.new_zeros((len(ignore), *kps.shape[1:]))])
        tv_targets.append(target)
    tv_images = [im.to(device) for im in images]
    try:
        return model(tv_images, tv_targets)
    except ValueError as exc:  # SSDlite trains its batch norm, down to a 1 x 1 feature map below ~600 px
        if "more than 1 value per channel" not in str(exc):
            raise
        raise UserError(
            f"{type(unwrap(model)).__name__} trains its batch norm, which needs more than one image per batch "
            f"(per process) at this input size; got {len(images)}: raise --batch-size"
        ) from exc


def _check_ignore_support(model: nn.Module, targets: Sequence[Mapping[str, Tensor]]) -> None:
    """A one-line UserError when a target has ignore regions that ``model``'s loss cannot leave out."""
    inner = unwrap(model)
    if supports_ignore(inner):
        return
    for i, t in enumerate(targets):
        ignore = t.get("ignore")
        if ignore is not None and ignore.numel() > 0:
            raise UserError(
                f"target {i} has {ignore.reshape(-1, 4).shape[0]} ignore region(s) (iscrowd annotations, or "
                f"select --ignore-band), which {type(inner).__name__}'s training cannot leave out of its loss; "
                "drop them from the data or train another model"
            )


def _to_detections(out: Mapping[str, Tensor], offset: int, device: torch.device) -> Detections:
    keypoints = None
    if "keypoints" in out:
        keypoints = torch.cat([out["keypoints"][..., :2], out["keypoints_scores"][..., None]], dim=-1)
        keypoints = keypoints.to(device)
    return Detections(
        boxes=out["boxes"].to(device),
        scores=out["scores"].to(device),
        labels=(out["labels"] - offset).to(device),
        keypoints=keypoints,
    )


def predict(model: nn.Module, images: Sequence[Tensor]) -> list[Detections]:
    """Detections for each image (sets eval mode, no gradients), in the original image frame.

    images: float32 ``[3, H, W]`` in [0, 1], any sizes (the model resizes them to its ``min_size``).
    Labels come back as class indices ``0..C-1``; keypoint models give keypoints ``[N, K, 3]`` with
    x, y and the keypoint's heatmap logit (unbounded, as in torchvision) in the third column.
    Outputs live on the device of the first image.
    """
    if len(images) == 0:
        return []
    model.eval()
    device = _device_of(model)
    offset = _label_offset(model)
    with torch.no_grad():
        outputs = model([im.to(device) for im in images])
    return [_to_detections(o, offset, images[0].device) for o in outputs]


@contextmanager
def input_size(model: nn.Module, min_size: int, max_size: int) -> Iterator[nn.Module]:
    """Temporarily resize inputs to ``min_size`` (shorter side) and at most ``max_size`` (longer side).

    torchvision resizes every input to the model's ``min_size``, so a scale view of test-time
    augmentation changes this target, not the image. A fixed-size model (SSD) runs at a ``min_size`` x
    ``min_size`` square instead of its own.
    """
    transform = unwrap(model).transform
    saved = (transform.min_size, transform.max_size, transform.fixed_size)
    transform.min_size = (int(min_size),)
    transform.max_size = int(max_size)
    if transform.fixed_size is not None:
        transform.fixed_size = (int(min_size), int(min_size))
    try:
        yield model
    finally:
        transform.min_size, transform.max_size, transform.fixed_size = saved


# ----------------------------------------------------------------------------------------------------
# keypoint heatmaps (for heatmap fusion across views)


def keypoint_heatmaps(model: nn.Module, images: Sequence[Tensor], boxes: Sequence[Tensor]) -> list[Tensor]:
    """The keypoint head's heatmap logits for given boxes: one ``[N, K, M, M]`` tensor per image.

    boxes: ``[N, 4]`` xyxy px in each image's frame. Each heatmap spans its box (``M`` bins on each side,
    28 for the small model, 56 for the large one). Runs in eval mode without gradients, with the model's
    current input size (so it composes with :func:`input_size` for scale views).
    """
    inner = unwrap(model)
    if not _is_keypoint_model(inner):
        raise ValueError(f"{type(inner).__name__} has no keypoint head")
    if len(images) != len(boxes):
        raise ValueError(f"got {len(images)} images but {len(boxes)} box tensors")
    if len(images) == 0:
        return []
    inner.eval()
    device = _device_of(inner)
    with torch.no_grad():
        tv_images = [im.to(device) for im in images]
        original_sizes = [tuple(im.shape[-2:]) for im in tv_images]
        image_list, _ = inner.transform(tv_images)
        features = inner.backbone(image_list.tensors)
        rois = [
            resize_boxes(b.to(device=device, dtype=torch.float32).reshape(-1, 4), orig, new)
            for b, orig, new in zip(boxes, original_sizes, image_list.image_sizes, strict=True)
        ]
        heads = inner.roi_heads
        x = heads.keypoint_roi_pool(features, rois, image_list.image_sizes)
        x = heads.keypoint_predictor(heads.keypoint_head(x))
    return [h.to(images[0].device) for h in x.split([len(r) for r in rois])]


def _resized_size(model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
    """The ``(H, W)`` that the model's transform resizes an image of ``image_size`` to (eval mode; by
    torchvision's own resize, so a fixed-size model gives its square)."""
    transform = unwrap(model).transform
    was_training = transform.training
    transform.eval()
    try:
        resized, _ = transform.resize(torch.zeros((1, *image_size)), None)
    finally:
        transform.train(was_training)
    return (int(resized.shape[-2]), int(resized.shape[-1]))


def heatmaps_to_keypoints(
    heatmaps: Tensor,
    boxes: Tensor,
    *,
    model: nn.Module | None = None,
    image_size: tuple[int, int] | None = None,
) -> Tensor:
    """Keypoints ``[N, K, 3]`` (x, y px, heatmap logit at the peak) from heatmaps ``[N, K, M, M]`` that
    span ``boxes`` ``[N, 4]`` xyxy px.

    With ``model`` and ``image_size`` ``(H, W)`` the decoding happens in the frame the model resizes that
    image to, then is scaled back: exactly what :func:`predict` does, so the heatmaps of predict()'s own
    boxes give its keypoints. Without them, it decodes in the boxes' frame (the same when the model does
    not resize the image; otherwise within a resized pixel).
    """
    if heatmaps.ndim != 4 or boxes.ndim != 2 or boxes.shape[0] != heatmaps.shape[0]:
        raise ValueError(
            f"need heatmaps [N, K, M, M] and boxes [N, 4], got {tuple(heatmaps.shape)} and {tuple(boxes.shape)}"
        )
    if (model is None) != (image_size is None):
        raise ValueError("give both model and image_size, or neither")
    n, k = heatmaps.shape[:2]
    if n == 0:
        return heatmaps.new_zeros((0, k, 3))
    boxes = boxes.to(device=heatmaps.device, dtype=torch.float32)
    if model is None or image_size is None:
        xy, scores = _tv_heatmaps_to_keypoints(heatmaps, boxes)
    else:
        size = (int(image_size[0]), int(image_size[1]))
        resized = _resized_size(model, size)
        xy, scores = _tv_heatmaps_to_keypoints(heatmaps, resize_boxes(boxes, size, resized))
        xy = resize_keypoints(xy, resized, size)
    return torch.cat([xy[..., :2], scores[..., None]], dim=-1)


# ----------------------------------------------------------------------------------------------------
# files: safe loading, checkpoints, pretrained weights


def load_checkpoint(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelMeta, dict[str, Any]]:
    """``(model in eval mode on device, meta, extra)`` from a checkpoint written by :func:`save_checkpoint`."""
    content = read_checkpoint(path)
    try:
        meta = ModelMeta.from_dict(content["meta"])
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from exc
    model = build_model(meta)
    try:
        model.load_state_dict(content["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{path}: weights do not fit model {meta.model!r}: {first}") from exc
    model.to(device).eval()
    return model, meta, content["extra"]


# Tensors whose meaning depends on the class list or the keypoint list, by architecture: the last conv of
# RetinaNet's and FCOS's class branch, the last (1x1) conv of each of SSDlite's per-level class branches
# (the depthwise conv before it, like RetinaNet's conv tower, loads), the R-CNN box predictor (class
# scores and per-class boxes), the keypoint predictor.
_CLASS_HEAD = re.compile(r"head\.classification_head\.(cls_logits|module_list\.\d+\.1)\.|roi_heads\.box_predictor\.")
_KEYPOINT_HEAD = re.compile(r"roi_heads\.keypoint_predictor\.")
# Where a backbone-only state dict (a torchvision classifier) may sit inside a detector.
_PREFIXES = ("", "backbone.body.", "backbone.")


@dataclass(frozen=True)
class LoadReport:
    """What :func:`init_weights` did: source tensors loaded, skipped for a shape or meaning mismatch
    (class/keypoint heads of another label set), with no counterpart in the model; model tensors left
    at their random init."""

    loaded: int
    mismatched: int
    unmatched: int
    missing: int


def _source_state(spec: str) -> tuple[dict[str, Tensor], tuple[str, ...] | None, tuple[str, ...] | None]:
    """``(state dict, its class names or None if unknown, its keypoint names or None)`` for ``spec``."""
    if spec.startswith("weights:"):
        name = spec.removeprefix("weights:")
        try:
            weights = get_weight(name)
        except (ValueError, KeyError, AttributeError):
            raise UserError(
                f"unknown torchvision weights {name!r} (e.g. FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1, "
                "ResNet50_Weights.IMAGENET1K_V2)"
            ) from None
        try:
            state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
        except Exception as exc:  # urllib/http/socket/hash errors: all mean "cannot get the file"
            reason = " ".join(str(exc).split())[:120]
            raise UserError(
                f"cannot download torchvision weights {name} ({type(exc).__name__}: {reason}); "
                "this needs internet, or pass a local weights file instead (a path, not weights:NAME)"
            ) from exc
        categories = weights.meta.get("categories")
        classes = tuple(c for c in categories if c != "__background__") if categories else None
        if categories and "__background__" not in categories:
            classes = None  # a classifier's categories (ImageNet), not detection classes
        kp = weights.meta.get("keypoint_names")
        return state, classes, tuple(kp) if kp else None
    content = load_torch_file(spec, "weights")
    if is_checkpoint(content):
        src_meta = ModelMeta.from_dict(content["meta"])
        return content["state_dict"], src_meta.class_names, src_meta.keypoint_names
    if isinstance(content, dict):
        for key in ("state_dict", "model"):
            if isinstance(content.get(key), dict):
                content = content[key]
                break
    if not (isinstance(content, dict) and content and all(isinstance(v, Tensor) for v in content.values())):
        raise UserError(f"{spec}: not a state dict (a mapping of names to tensors) nor a datadistill checkpoint")
    return dict(content), None, None


def init_weights(model: nn.Module, spec: str, *, meta: ModelMeta) -> LoadReport:
    """Load pretrained weights into ``model``, partially and honestly.

    ``spec`` is ``"weights:NAME"`` (a torchvision weights enum name, downloaded by torchvision's cache)
    or a local file: a plain state dict, ``{"model"|"state_dict": state dict}``, or a datadistill
    checkpoint. Tensors load where the name (possibly under ``backbone.body.`` for a classifier's
    weights) and the shape match; when the source names its classes (torchvision weights, our
    checkpoints), class heads load only if those equal ``meta.class_names`` (keypoint heads likewise),
    since equal shapes can hide another label order; a plain state dict's heads load by shape (warned).
    Logs and returns the counts; a UserError when nothing matches.
    """
    source, src_classes, src_keypoints = _source_state(spec)
    source = {k.removeprefix("module."): v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    target = unwrap(model).state_dict()
    skip: list[re.Pattern[str]] = []
    if src_classes is not None and src_classes != meta.class_names:
        skip.append(_CLASS_HEAD)
    if src_keypoints is not None and src_keypoints != meta.keypoint_names:
        skip.append(_KEYPOINT_HEAD)

    best: tuple[int, str] = (-1, "")
    for prefix in _PREFIXES:
        hits = sum(1 for k in source if prefix + k in target)
        if hits > best[0]:
            best = (hits, prefix)
    prefix = best[1]
    update: dict[str, Tensor] = {}
    mismatched = unmatched = 0
    for key, value in source.items():
        name = prefix + key
        if name not in target:
            unmatched += 1
        elif any(p.match(name) for p in skip) or target[name].shape != value.shape:
            mismatched += 1
        else:
            update[name] = value
    if not update:
        raise UserError(
            f"no tensor in {spec} fits model {meta.model!r} ({len(source)} tensors, {mismatched} with "
            f"another shape or label set, {unmatched} with no counterpart)"
        )
    if src_classes is None and any(_CLASS_HEAD.match(k) for k in update):
        log.warning("%s does not name its classes: its class head loads because the shapes fit", spec)
    unwrap(model).load_state_dict(update, strict=False)
    report = LoadReport(
        loaded=len(update),
        mismatched=mismatched,
        unmatched=unmatched,
        missing=sum(1 for k in target if k not in update and not k.endswith("num_batches_tracked")),
    )
    log.info(
        "init %s from %s: loaded %d tensors, skipped %d (other shape or label set) and %d (no counterpart); "
        "%d model tensors keep their random init",
        meta.model,
        spec,
        report.loaded,
        report.mismatched,
        report.unmatched,
        report.missing,
    )
    return report


# ----------------------------------------------------------------------------------------------------
# the Detector of datadistill.models.detector


def built_max_det(model: nn.Module) -> int:
    """The detections per image ``model`` was built with (torchvision's ``detections_per_img``: 100; 20 for
    the small Keypoint R-CNN), remembered the first time it is asked so that a raised cap does not move it; 100
    for a module that has none (a stand-in of a test)."""
    inner = unwrap(model)
    if not hasattr(inner, "built_max_det"):
        heads = inner.roi_heads if isinstance(inner, GeneralizedRCNN) else inner
        if not hasattr(heads, "detections_per_img"):
            return DEFAULT_MAX_DET
        inner.built_max_det = int(heads.detections_per_img)
    return int(inner.built_max_det)


def set_max_det(model: nn.Module, max_det: int) -> None:
    """Keep at most ``max_det`` detections per image at test time: the detections (``detections_per_img``),
    and the candidates before them, never fewer than built: the top-k per level of the one-stage heads
    (``topk_candidates``), an R-CNN's RPN proposals per level before NMS and in all after it (its
    ``pre/post_nms_top_n`` at test time: the small Faster R-CNN's 100 proposals would cap it at 100)."""
    inner = unwrap(model)
    built_max_det(inner)
    if not hasattr(inner, "built_max_det"):
        return  # not a torchvision detector
    if isinstance(inner, GeneralizedRCNN):
        inner.roi_heads.detections_per_img = int(max_det)
        rpn = inner.rpn
        for top_n in (rpn._pre_nms_top_n, rpn._post_nms_top_n):
            top_n["testing"] = max(int(top_n["testing"]), int(max_det))
    else:
        inner.detections_per_img = int(max_det)
        inner.topk_candidates = max(int(inner.topk_candidates), int(max_det))


class TorchvisionDetector:
    """A torchvision detector (or its DDP wrapper) behind :class:`datadistill.models.detector.Detector`;
    it keeps at most ``max_det`` detections per image (:func:`~datadistill.models.detector.resolve_max_det`:
    None reads it from ``meta``, never below the model's built cap)."""

    def __init__(self, module: nn.Module, meta: ModelMeta, *, spec: str = "", max_det: int | None = None) -> None:
        self.module, self.meta, self.spec = module, meta, spec or meta.model
        self.max_det = resolve_max_det(meta, default=built_max_det(module), override=max_det)
        set_max_det(module, self.max_det)

    def predict(self, images: Sequence[Tensor]) -> list[Detections]:
        return predict(self.module, images)

    @contextmanager
    def input_size(self, min_size: int, max_size: int) -> Iterator[None]:
        with input_size(self.module, min_size, max_size):
            yield

    @property
    def has_heatmaps(self) -> bool:
        return _is_keypoint_model(self.module)

    def heatmaps(self, images: Sequence[Tensor], boxes: Sequence[Tensor]) -> list[Tensor] | None:
        return keypoint_heatmaps(self.module, images, boxes) if self.has_heatmaps else None

    def keypoints_from_heatmaps(self, heatmaps: Tensor, boxes: Tensor, *, image_size: tuple[int, int]) -> Tensor:
        return heatmaps_to_keypoints(heatmaps, boxes, model=self.module, image_size=image_size)

    def unfit_reason(self, height: int, width: int, *, min_size: int, max_size: int) -> str | None:
        """torchvision resizes the shorter side to ``min_size`` (the longer at most ``max_size``): an image
        so elongated that a side would become 0 px cannot run (torch would raise mid-run). A fixed-size
        model (SSD) resizes any image to a ``min_size`` square, so every image fits it."""
        if isinstance(unwrap(self.module), SSD):
            return None
        h, w = resized_size(height, width, min_size=min_size, max_size=max_size)
        return None if h >= 1 and w >= 1 else f"would resize it to {w}x{h} px"


def load(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    min_score: float | None = None,
    max_det: int | None = None,
    compile: bool = False,
) -> TorchvisionDetector:
    """The detector of a datadistill checkpoint file (``spec`` is its path). Its score threshold is the
    architecture's (0.05; SSDlite's 0.001), below any labeling floor worth using: ``min_score`` changes
    nothing. ``max_det``: :class:`TorchvisionDetector`. On a GPU the model and its input batch are channels-last
    (faster convolutions on tensor cores; on a CPU not measured faster, so not there). ``compile``:
    ``torch.compile`` the backbone and FPN (the first batch of each input size takes longer)."""
    del min_score
    if spec in MODELS:
        raise UserError(
            f"--model {spec} names an architecture, not a trained model: give a checkpoint.pt written by "
            "`datadistill train` (or its output folder)"
        )
    model, meta, _ = load_checkpoint(spec, device=device)
    if torch.device(device).type == "cuda":
        channels_last(model)
    if compile:
        model.backbone.compile()
    return TorchvisionDetector(model, meta, spec=spec, max_det=max_det)


def model_file(spec: str) -> Path:
    """The checkpoint file of ``spec``."""
    return Path(spec).expanduser()


def model_files(spec: str) -> ModelFiles:
    """What another machine needs to load ``spec``: its checkpoint file, the only file it reads."""
    return single_file(spec, model_file(spec))


def default_lr(model: str, optimizer: str) -> float:
    """The peak learning rate when none is given. AdamW: 2e-3 for the small models trained from scratch
    (the best of the rates tried on the synthetic sets), 1e-4 to fine-tune pretrained ones; SGD: 0.01."""
    if optimizer == "adamw":
        return 1e-4 if get_spec(model).pretrained else 2e-3
    return 0.01


def save_final(out: Path, *, model: nn.Module, meta: ModelMeta, extra: Mapping[str, Any]) -> None:
    """``out/checkpoint.pt``, the trained model of a finished run (:func:`save_checkpoint`)."""
    save_checkpoint(out / "checkpoint.pt", model=model, meta=meta, extra=extra)


# What datadistill's training loop (datadistill.stages.train) takes from this backend: data, no loop.
LOOP = LoopBackend(meta_for=meta_for, default_lr=default_lr, build_model=build_model, init_weights=init_weights,
                   losses=losses, detector=TorchvisionDetector, save_final=save_final,
                   final_name="checkpoint.pt")  # fmt: skip
