"""Batched eval-time input transform and post-processing for torchvision's detectors.

torchvision's detectors loop over the images of a batch in Python at test time: its
``GeneralizedRCNNTransform`` normalises and resizes image by image (one ``F.interpolate`` each) before
padding them into a batch, and the R-CNN box head (``RoIHeads.postprocess_detections``), FCOS and
RetinaNet (``postprocess_detections``, per image and per level) threshold, keep the top-k and run NMS
image by image, with a host synchronisation at each ``torch.where``. On a GPU that costs more than the
arithmetic. The subclasses here do the same work for the whole batch at once in eval mode, on a GPU (on a
CPU, where a launch costs nothing and the per-image code is as fast or faster, they run torchvision's own;
:func:`configure` changes that):

- :class:`BatchedTransform`: when every image has one size (the views of a labeling batch), normalise and
  resize the stacked batch with one ``F.interpolate`` of torchvision's scale factor and flags, then pad as
  ``batch_images`` does: the same tensor as torchvision's per-image path. Anything else (training,
  targets, images of several sizes) is torchvision's own path.
- :class:`BatchedRoIHeads`, :class:`BatchedFCOS`, :class:`BatchedRetinaNet`: one score threshold, one
  top-k per level for all images, one NMS over all images (each (image, class) pair its own group), the
  first ``detections_per_img`` of each image. Only ``postprocess_detections`` is overridden, which
  torchvision calls in eval mode only: training and its losses are torchvision's.

Differences from torchvision's per-image post-processing (``tests/test_batched_forward.py`` checks the
rest): among equal scores at the edge of a top-k (``topk_candidates``, ``detections_per_img``) another of
the tied boxes may be kept, and equal scores may come in another order; on a GPU, where NMS runs once for
all images (:func:`nms_per_image`), a pair whose IoU lies within float32 rounding of ``nms_thresh`` may be
suppressed where torchvision keeps it, or the reverse; batched on a CPU (:func:`configure`), the one-stage
heads' scores and boxes may differ by an ulp (a CPU's vectorised sigmoid and exp take the scalar formula
for a tensor's last elements).

:func:`install` swaps these classes into a built model in place (methods only, no new state: the weights
and the state dict are unchanged), as :func:`datadistill.models.ignore.make_ignore_aware` does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops

# ----------------------------------------------------------------------------------------------------
# the input transform


def same_size_batch(images: list[Tensor]) -> bool:
    """Whether ``images`` are float ``[C, H, W]`` tensors of one shape, dtype and device (what
    :class:`BatchedTransform` batches)."""
    if not images:
        return False
    first = images[0]
    return (
        first.dim() == 3
        and first.is_floating_point()
        and all(im.shape == first.shape and im.dtype == first.dtype and im.device == first.device for im in images[1:])
    )


class BatchedTransform(GeneralizedRCNNTransform):
    """torchvision's transform; in eval mode a batch of same-size images is normalised, resized (one
    ``F.interpolate``) and padded at once, where ``one_call`` says so (None: on a GPU; on a CPU, torchvision's
    per-image path is faster: 8 ms against 24 ms for 8 images of 320 px on one thread, the stacked batch's
    fresh memory costing more than the launches it saves). ``memory_format``: the layout of the batch handed
    to the backbone (``torch.channels_last`` to go with a channels-last model on a GPU)."""

    memory_format: torch.memory_format = torch.contiguous_format
    one_call: bool | None = None  # batch the eval path (None: when the images are on a GPU; see below)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        images = list(images)
        simple = not self.training and targets is None and same_size_batch(images) and not torchvision._is_tracing()
        if not (simple and _one_call(self.one_call, images[0])):
            image_list, targets = super().forward(images, targets)
        else:
            image_list = self.batched(torch.stack(images))
        if self.memory_format != torch.contiguous_format:
            image_list.tensors = image_list.tensors.contiguous(memory_format=self.memory_format)
        return image_list, targets

    def batched(self, images: Tensor) -> ImageList:
        """``images`` ``[B, C, H, W]`` normalised, resized to the eval input size and padded to a multiple
        of ``size_divisible``: torchvision's ``normalize``, ``resize`` (``_resize_image_and_masks``: its
        scale factor and ``recompute_scale_factor``, or ``fixed_size``) and ``batch_images``, on the batch."""
        mean = torch.as_tensor(self.image_mean, dtype=images.dtype, device=images.device)
        std = torch.as_tensor(self.image_std, dtype=images.dtype, device=images.device)
        images = (images - mean[:, None, None]) / std[:, None, None]
        h, w = images.shape[-2:]
        size: list[int] | None = None
        scale: float | None = None
        recompute: bool | None = None
        if self.fixed_size is not None:
            size = [self.fixed_size[1], self.fixed_size[0]]
        else:
            scale = min(self.min_size[-1] / min(h, w), self.max_size / max(h, w))
            recompute = True
        images = F.interpolate(
            images,
            size=size,
            scale_factor=scale,
            mode="bilinear",
            recompute_scale_factor=recompute,
            align_corners=False,
        )
        b, c, h, w = images.shape
        stride = float(self.size_divisible)
        padded_h, padded_w = int(math.ceil(float(h) / stride) * stride), int(math.ceil(float(w) / stride) * stride)
        if (padded_h, padded_w) != (h, w):  # zeros at the bottom and right, as torchvision's batch_images
            images = F.pad(images, (0, padded_w - w, 0, padded_h - h))
        return ImageList(images, [(int(h), int(w))] * b)


# ----------------------------------------------------------------------------------------------------
# post-processing


def nms_per_image(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    image: Tensor,
    *,
    num_images: int,
    iou_thr: float,
    count: int,
    one_call: bool | None = None,
) -> list[Tensor]:
    """NMS per image and class, then the first ``count`` of each image: one tensor of kept indices per image,
    highest score first.

    boxes ``[N, 4]`` xyxy, scores ``[N]``, labels and image ``[N]`` int64, the entries of each image together
    and the images in order. ``one_call`` (default: on a GPU): one ``batched_nms`` for all images, each (image,
    class) pair its own group (torchvision's coordinate trick: the groups' boxes offset apart), equal scores
    in the order of their indices (torchvision's NMS kernel sorts stably). Else torchvision's own
    ``batched_nms`` image by image (what a CPU runs as fast): exactly torchvision's result. The two differ
    only where a pair's IoU lies within float32 rounding of ``iou_thr`` (the offsets of image and class round
    the coordinates otherwise than torchvision's offsets of class alone, by about 1e-7 of the offset: 1/64 px
    at 8 images of 91 classes at 1333 px), or where equal scores straddle ``count``."""
    if not _one_call(one_call, boxes):
        kept, start = [], 0
        for n in torch.bincount(image, minlength=num_images).tolist():
            part = slice(start, start + n)
            kept.append(box_ops.batched_nms(boxes[part], scores[part], labels[part], iou_thr)[:count] + start)
            start += n
        return kept
    groups = image * (int(labels.max()) + 1 if len(labels) else 1) + labels
    # in float32 whatever the autocast: the offsets of (image, class) groups overflow fp16 and round bf16
    # boxes by 32 px or more, where torchvision's offsets of class alone stay smaller
    keep = box_ops.batched_nms(boxes.float(), scores.float(), groups, iou_thr).sort().values
    keep = keep[torch.sort(scores[keep], descending=True, stable=True).indices]
    return first_per_image(keep, image, num_images=num_images, count=count)


def first_per_image(keep: Tensor, image: Tensor, *, num_images: int, count: int) -> list[Tensor]:
    """The first ``count`` entries of ``keep`` (indices, best first) of each image: one ``[<=count]`` tensor
    of indices per image, best first; ``image`` ``[N]`` gives the image of every index."""
    image_of = image[keep]
    order = torch.sort(image_of, stable=True).indices
    keep, image_of = keep[order], image_of[order]
    per_image = torch.bincount(image_of, minlength=num_images)
    starts = torch.cumsum(per_image, 0) - per_image
    rank = torch.arange(len(keep), device=keep.device) - starts[image_of]
    keep = keep[rank < count]
    return list(keep.split(per_image.clamp(max=count).tolist()))


def clip_to_images(boxes: Tensor, image_shapes: list[tuple[int, int]], image: Tensor) -> Tensor:
    """``box_ops.clip_boxes_to_image`` for boxes ``[N, ..., 4]`` of several images: box ``n`` of image
    ``image[n]`` clipped to ``image_shapes[image[n]]`` (``(H, W)`` px); the same values as torchvision's."""
    if len(set(image_shapes)) <= 1:
        return box_ops.clip_boxes_to_image(boxes, image_shapes[0]) if image_shapes else boxes
    shape = boxes.shape
    limits = torch.tensor(image_shapes, dtype=boxes.dtype, device=boxes.device)[image]  # [N, 2] (H, W)
    limits = limits.flip(-1).repeat(1, 2).reshape(-1, *([1] * (len(shape) - 2)), 4)  # (W, H, W, H)
    return torch.minimum(boxes.clamp(min=0), limits).reshape(shape)


def _detections(boxes: Tensor, scores: Tensor, labels: Tensor, kept: list[Tensor]) -> list[dict[str, Tensor]]:
    return [{"boxes": boxes[k], "scores": scores[k], "labels": labels[k]} for k in kept]


class BatchedRoIHeads(RoIHeads):
    """The R-CNN box head whose eval post-processing (softmax, clip, score threshold, small boxes, NMS per
    class, ``detections_per_img``) runs on all images at once where ``one_call`` says so (None: on a GPU; on a
    CPU torchvision's own loop)."""

    one_call: bool | None = None
    per_image_nms: bool = False  # torchvision's batched_nms image by image (the tests' exact reference)

    def postprocess_detections(
        self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        if not _one_call(self.one_call, class_logits):
            return super().postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        device = class_logits.device
        num_classes = class_logits.shape[-1]
        per_image = [len(p) for p in proposals]
        image = torch.repeat_interleave(torch.arange(len(proposals), device=device),
                                        torch.tensor(per_image, device=device))  # fmt: skip
        boxes = clip_to_images(self.box_coder.decode(box_regression, proposals), image_shapes, image)  # [R, C, 4]
        scores = F.softmax(class_logits, -1)
        labels = torch.arange(num_classes, device=device).view(1, -1).expand_as(scores)
        boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
        image = image[:, None].expand(-1, num_classes - 1).reshape(-1)
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels, image = boxes[keep], scores[keep], labels[keep], image[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels, image = boxes[keep], scores[keep], labels[keep], image[keep]
        kept = nms_per_image(boxes, scores, labels, image, num_images=len(proposals), iou_thr=self.nms_thresh,
                             count=self.detections_per_img, one_call=not self.per_image_nms)  # fmt: skip
        return [boxes[k] for k in kept], [scores[k] for k in kept], [labels[k] for k in kept]


def dense_detections(
    model: FCOS | RetinaNet,
    head_outputs: dict[str, list[Tensor]],
    anchors: list[list[Tensor]],
    image_shapes: list[tuple[int, int]],
) -> list[dict[str, Tensor]]:
    """FCOS's or RetinaNet's ``postprocess_detections`` on all images at once: per level the scores (FCOS:
    ``sqrt(sigmoid(class) * sigmoid(centre-ness))``), those above ``score_thresh``, the top
    ``topk_candidates`` of each image, decoded and clipped; then NMS per image and class and the first
    ``detections_per_img`` of each image.

    head_outputs: per level ``cls_logits`` ``[B, A_l, C]``, ``bbox_regression`` ``[B, A_l, 4]`` (FCOS also
    ``bbox_ctrness`` ``[B, A_l, 1]``); anchors: per image, per level ``[A_l, 4]`` xyxy px.
    """
    num_images = len(image_shapes)
    centerness = head_outputs.get("bbox_ctrness")
    found_boxes, found_scores, found_labels = [], [], []
    for level, (logits, regression) in enumerate(
        zip(head_outputs["cls_logits"], head_outputs["bbox_regression"], strict=True)
    ):
        num_classes = logits.shape[-1]
        scores = torch.sigmoid(logits)
        if centerness is not None:
            scores = torch.sqrt(scores * torch.sigmoid(centerness[level]))
        scores = scores.flatten(1)  # [B, A_l * C]
        masked = scores.masked_fill(~(scores > model.score_thresh), -math.inf)
        top_scores, top = masked.topk(min(int(model.topk_candidates), masked.shape[1]), dim=1)  # [B, k]
        anchor_idx = torch.div(top, num_classes, rounding_mode="floor")
        level_anchors = torch.stack([a[level] for a in anchors])  # [B, A_l, 4]
        rel = regression.gather(1, anchor_idx[..., None].expand(-1, -1, 4)).reshape(-1, 4)
        ref = level_anchors.gather(1, anchor_idx[..., None].expand(-1, -1, 4)).reshape(-1, 4)
        if isinstance(model, FCOS):
            boxes = model.box_coder.decode(rel, ref)
        else:
            boxes = model.box_coder.decode_single(rel, ref)
        found_boxes.append(boxes.reshape(num_images, -1, 4))
        found_scores.append(top_scores)
        found_labels.append(top % num_classes)
    scores = torch.cat(found_scores, 1)  # [B, K]
    image = torch.arange(num_images, device=scores.device)[:, None].expand_as(scores)
    valid = torch.where((scores > model.score_thresh).reshape(-1))[0]
    image = image.reshape(-1)[valid]
    boxes = clip_to_images(torch.cat(found_boxes, 1).reshape(-1, 4)[valid], image_shapes, image)
    scores, labels = scores.reshape(-1)[valid], torch.cat(found_labels, 1).reshape(-1)[valid]
    one_nms = not getattr(model, "per_image_nms", False)
    kept = nms_per_image(boxes, scores, labels, image, num_images=num_images, iou_thr=model.nms_thresh,
                         count=model.detections_per_img, one_call=one_nms)  # fmt: skip
    return _detections(boxes, scores, labels, kept)


class DenseBatched:
    """The eval post-processing of a one-stage detector (FCOS, RetinaNet) on all images and levels at once
    (:func:`dense_detections`) where ``one_call`` says so (None: on a GPU). On a CPU torchvision's own loop
    is as fast, and exact: a CPU's vectorised sigmoid and exp compute the last elements of a tensor with the
    scalar formula, so a batched sigmoid can differ from the per-image one by an ulp. Mixed in before the
    torchvision class."""

    one_call: bool | None = None
    per_image_nms: bool = False  # torchvision's batched_nms image by image (the tests' exact reference)

    def postprocess_detections(
        self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        if _one_call(self.one_call, head_outputs["cls_logits"][0]):
            return dense_detections(self, head_outputs, anchors, image_shapes)  # type: ignore[arg-type]
        return super().postprocess_detections(head_outputs, anchors, image_shapes)  # type: ignore[misc]


class BatchedFCOS(DenseBatched, FCOS):
    """FCOS with :class:`DenseBatched`'s post-processing."""


class BatchedRetinaNet(DenseBatched, RetinaNet):
    """RetinaNet with :class:`DenseBatched`'s post-processing."""


def _one_call(setting: bool | None, tensor: Tensor) -> bool:
    return tensor.device.type == "cuda" if setting is None else setting


# ----------------------------------------------------------------------------------------------------
# installing them


def _swap(part: nn.Module, base: type[nn.Module], batched: type[nn.Module]) -> None:
    """Give ``part`` the batched subclass of its class when its class is exactly torchvision's ``base``, or
    a subclass adding only methods (one made ignore-aware keeps its own class: FCOS's and RetinaNet's
    ignore-aware parts are their heads, not the model)."""
    if type(part) is base:
        part.__class__ = batched


def install_transform(transform: nn.Module) -> nn.Module:
    """Give torchvision's ``GeneralizedRCNNTransform`` the batched eval path (in place; returns it)."""
    _swap(transform, GeneralizedRCNNTransform, BatchedTransform)
    return transform


def install(model: nn.Module) -> nn.Module:
    """Give a torchvision detector the batched transform and, for the R-CNN family, FCOS and RetinaNet, the
    batched post-processing (in place; returns it). SSD keeps torchvision's post-processing (per image and
    class); other modules are returned as they are."""
    if isinstance(model, GeneralizedRCNN | FCOS | RetinaNet | SSD):
        install_transform(model.transform)
    if isinstance(model, GeneralizedRCNN):
        _swap(model.roi_heads, RoIHeads, BatchedRoIHeads)
    _swap(model, FCOS, BatchedFCOS)
    _swap(model, RetinaNet, BatchedRetinaNet)
    return model


def configure(model: nn.Module, *, one_call: bool | None = None, per_image_nms: bool = False) -> nn.Module:
    """Set where an installed model batches (``one_call``; None: on a GPU, True: everywhere, False: never) and
    whether its NMS runs image by image (torchvision's exact result; the tests' reference). In place."""
    for part in (getattr(model, "transform", None), getattr(model, "roi_heads", None), model):
        if isinstance(part, BatchedTransform | BatchedRoIHeads | DenseBatched):
            part.one_call = one_call
            if not isinstance(part, BatchedTransform):
                part.per_image_nms = per_image_nms
    return model


def uninstall(model: nn.Module) -> nn.Module:
    """Undo :func:`install` (in place; returns it): torchvision's own classes again (what
    ``bench/batched_forward.py`` compares against)."""
    for part, batched, base in (
        (getattr(model, "transform", None), BatchedTransform, GeneralizedRCNNTransform),
        (getattr(model, "roi_heads", None), BatchedRoIHeads, RoIHeads),
        (model, BatchedFCOS, FCOS),
        (model, BatchedRetinaNet, RetinaNet),
    ):
        if part is not None and type(part) is batched:
            part.__class__ = base
    return model


def channels_last(model: nn.Module) -> nn.Module:
    """``model`` (a torchvision detector, in place) with its weights and its input batch in
    ``torch.channels_last``: faster convolutions on a GPU's tensor cores (not on a CPU)."""
    model.to(memory_format=torch.channels_last)
    transform: Any = getattr(model, "transform", None)
    if isinstance(transform, BatchedTransform):
        transform.memory_format = torch.channels_last
    return model
