"""Ignore regions in training: boxes that are neither an object nor background.

COCO marks such regions ``iscrowd: 1`` (a crowd that no single box can label), and COCO evaluation neither
rewards nor penalises detections there. Training should treat them alike: a location, anchor or proposal
that falls on an ignore region is left out of the classification loss, instead of being taught that it is
background. ``select --ignore-band`` writes the pseudo-labels that score just below the threshold as such
regions, so that the objects a teacher was unsure of are not taught to the student as background.

torchvision's detectors have no notion of ignore regions; this module adds it without changing their
weights or outputs. :func:`datadistill.models.torchvision.losses` appends the ignore boxes of a target to its
``boxes`` with the label :data:`IGNORE_LABEL` (so torchvision's transform resizes them with the others),
and the detector's loss code, made ignore-aware by :func:`make_ignore_aware`, reads that label:

- FCOS: a location matched to an ignore box (inside it, near its centre, at its scale) is neither
  foreground nor background: no classification, box or centre-ness loss.
- RetinaNet: an anchor whose best box is an ignore box is discarded, as anchors between the IoU
  thresholds already are.
- Faster / Keypoint R-CNN: an RPN anchor or a box-head proposal matched to an ignore box gets label -1,
  which the positive/negative samplers leave out (the box head does this by itself: an ignore box's label
  is -1 once matched).
- SSD: a default box matched to an ignore box is neither a positive nor a (hard-mined) negative: no
  classification or box loss.

Without ignore boxes every loss is exactly torchvision's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.ssd import SSD

# The label of an ignore box among a torchvision target's boxes (after the R-CNN family's +1 offset).
IGNORE_LABEL = -1
# A classification logit whose sigmoid focal loss against "background" underflows to exactly 0 in float32
# (and float16): an ignored location's logits are replaced by it, so that it adds no loss and no gradient.
_SILENT_LOGIT = -100.0


def _on_ignore_box(targets: dict[str, Tensor], matched_idxs: Tensor) -> Tensor:
    """``[A]`` bool: the anchors matched (index >= 0) to a box labelled :data:`IGNORE_LABEL`."""
    labels = targets["labels"]
    if labels.numel() == 0:
        return torch.zeros_like(matched_idxs, dtype=torch.bool)
    return (matched_idxs >= 0) & (labels[matched_idxs.clamp(min=0)] == IGNORE_LABEL)


_Named = dict[str, Tensor]  # head outputs, losses
_Targets = list[dict[str, Tensor]]
_Ts = list[Tensor]


def _silent_sigmoid(logits: Tensor) -> Tensor:
    """Sigmoid class logits ``[N, A, C]`` whose focal loss against "background" is exactly 0."""
    return torch.full_like(logits, _SILENT_LOGIT)


def _silent_softmax(logits: Tensor) -> Tensor:
    """Softmax logits ``[N, A, 1 + C]`` (background first) whose cross-entropy against background is exactly 0."""
    background = torch.full_like(logits, _SILENT_LOGIT)
    background[..., 0] = 0.0
    return background


def _leave_out_ignored(
    compute_loss: Callable[[_Targets, _Named, _Ts, _Ts], _Named],
    targets: _Targets,
    head_outputs: _Named,
    anchors: _Ts,
    matched_idxs: _Ts,
    *,
    silence: Callable[[Tensor], Tensor],
) -> _Named:
    """``compute_loss`` (torchvision's) with the anchors matched to an ignore box left out: unmatched (-1, no
    box loss) and their class logits replaced by ``silence(logits)``, which adds no loss and no gradient.
    Without ignore boxes, exactly ``compute_loss``."""
    ignored = [_on_ignore_box(t, m) for t, m in zip(targets, matched_idxs, strict=True)]
    if not any(bool(i.any()) for i in ignored):
        return compute_loss(targets, head_outputs, anchors, matched_idxs)
    mask = torch.stack(ignored)  # [N, A]
    matched = [torch.where(i, torch.full_like(m, -1), m) for i, m in zip(ignored, matched_idxs, strict=True)]
    logits = head_outputs["cls_logits"]
    silent = torch.where(mask[..., None], silence(logits), logits)
    return compute_loss(targets, {**head_outputs, "cls_logits": silent}, anchors, matched)


class IgnoreAwareFCOSHead(FCOSHead):
    """FCOS's head; its loss leaves out the locations that FCOS's matching gave to an ignore box."""

    def compute_loss(self, targets: _Targets, head_outputs: _Named, anchors: _Ts, matched_idxs: _Ts) -> _Named:
        return _leave_out_ignored(super().compute_loss, targets, head_outputs, anchors, matched_idxs,
                                 silence=_silent_sigmoid)  # fmt: skip


class IgnoreAwareRetinaNetHead(RetinaNetHead):
    """RetinaNet's head; anchors whose best box is an ignore box are discarded like those between the IoU
    thresholds (no classification or box loss)."""

    def compute_loss(self, targets: _Targets, head_outputs: _Named, anchors: _Ts, matched_idxs: _Ts) -> _Named:
        discard = self.classification_head.BETWEEN_THRESHOLDS
        matched = [
            torch.where(_on_ignore_box(t, m), torch.full_like(m, discard), m)
            for t, m in zip(targets, matched_idxs, strict=True)
        ]
        return super().compute_loss(targets, head_outputs, anchors, matched)


class IgnoreAwareSSD(SSD):
    """SSD, whose loss (a method of the model, not of its head) leaves out the default boxes matched to an
    ignore box: no box loss, and softmax logits that give exactly zero loss against the background, so
    that hard negative mining ranks them last and they add nothing."""

    def compute_loss(self, targets: _Targets, head_outputs: _Named, anchors: _Ts, matched_idxs: _Ts) -> _Named:
        return _leave_out_ignored(super().compute_loss, targets, head_outputs, anchors, matched_idxs,
                                 silence=_silent_softmax)  # fmt: skip


class IgnoreAwareRPN(RegionProposalNetwork):
    """The R-CNN region proposal network; anchors matched to an ignore box get label -1 (not sampled)."""

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        labels, matched_boxes = super().assign_targets_to_anchors(anchors, targets)
        for i, (anchors_i, target) in enumerate(zip(anchors, targets, strict=True)):
            if not bool((target["labels"] == IGNORE_LABEL).any()):
                continue
            matched_idxs = self.proposal_matcher(self.box_similarity(target["boxes"], anchors_i))
            labels[i] = torch.where(_on_ignore_box(target, matched_idxs), torch.full_like(labels[i], -1.0), labels[i])
        return labels, matched_boxes


# torchvision part -> its ignore-aware subclass (methods only, no new state: the weights are unchanged)
_IGNORE_AWARE: dict[type[nn.Module], type[nn.Module]] = {
    FCOSHead: IgnoreAwareFCOSHead,
    RetinaNetHead: IgnoreAwareRetinaNetHead,
    RegionProposalNetwork: IgnoreAwareRPN,
    SSD: IgnoreAwareSSD,
}


def _upgrade(part: nn.Module) -> None:
    subclass = _IGNORE_AWARE.get(type(part))
    if subclass is not None:
        part.__class__ = subclass  # the subclass only overrides loss methods, so the swap is safe


def make_ignore_aware(model: nn.Module) -> nn.Module:
    """Make a torchvision FCOS, RetinaNet, SSD or (Faster/Keypoint) R-CNN honour ignore boxes in training
    (in place; returns it). The R-CNN box head needs nothing: it already leaves label -1 out."""
    if isinstance(model, FCOS | RetinaNet):
        _upgrade(model.head)
    elif isinstance(model, GeneralizedRCNN):
        _upgrade(model.rpn)
    elif isinstance(model, SSD):
        _upgrade(model)
    return model


def supports_ignore(model: nn.Module) -> bool:
    """Whether a detector's training honours ignore boxes."""
    if isinstance(model, FCOS | RetinaNet):
        return isinstance(model.head, IgnoreAwareFCOSHead | IgnoreAwareRetinaNetHead)
    if isinstance(model, GeneralizedRCNN):
        return isinstance(model.rpn, IgnoreAwareRPN)
    if isinstance(model, SSD):
        return isinstance(model, IgnoreAwareSSD)
    return False
