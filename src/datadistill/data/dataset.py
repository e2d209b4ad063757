"""Training data: a detection Dataset with augmentation, its collate function, and the mixing sampler.

A sample is ``(image, target)``: image float32 ``[3, H, W]`` in [0, 1] RGB; target a dict with
``boxes`` ``[N, 4]`` float32 xyxy px, ``labels`` ``[N]`` int64 class indices (0-based, into
``CocoDataset.categories``), ``keypoints`` ``[N, K, 3]`` float32 (x, y, v) when the data set has
keypoints, and ``image_id`` (int). Crowd annotations are never targets.

Augmentation is split into a policy (:func:`draw_augmentation`: random parameters from a generator seeded
by ``(seed, epoch, index)``, so the augmented sample is a pure function of them, whatever the DataLoader
workers) and an operation (:func:`apply_augmentation`: exact geometry through torchvision.transforms.v2
on ``tv_tensors`` for the scale and crop, the views' flip: :mod:`datadistill.core.transforms`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from datadistill.core.transforms import HFlip
from datadistill.data.coco import CocoDataset
from datadistill.data.images import read_image, resolve_image_path
from datadistill.data.label_table import FlatLabels
from datadistill.errors import DataError

MIN_BOX_SIDE_PX = 1.0  # boxes thinner than this after augmentation are dropped, with their keypoints

Target = dict[str, Any]
_CROWD = -1  # the label a crowd region carries through augmentation (no class has it)


def _rng(*keys: int) -> np.random.Generator:
    """A numpy generator that is a pure function of ``keys`` (non-negative ints)."""
    return np.random.default_rng(np.random.SeedSequence([k % 2**64 for k in keys]))


# ----------------------------------------------------------------------------------------------------
# augmentation: policy and operation


@dataclass(frozen=True)
class Augmentation:
    """One draw of the training augmentation.

    The image is resized by ``scale`` (to ``round(H * scale) x round(W * scale)``), then cut back to its
    original ``H x W`` canvas at ``(top, left)`` of the resized image: a crop when it grew, zero padding at
    the bottom and right when it shrank. So objects change size relative to the canvas (the model's own
    resize to ``min_size`` does not undo it). Then, if ``flip``, a horizontal flip.
    """

    scale: float = 1.0
    flip: bool = False
    top: int = 0
    left: int = 0


IDENTITY = Augmentation()


def draw_augmentation(
    rng: np.random.Generator,
    *,
    height: int,
    width: int,
    min_scale: float,
    max_scale: float,
    flip_prob: float,
) -> Augmentation:
    """Random parameters: scale uniform in ``[min_scale, max_scale]``, flip with ``flip_prob``, crop offset."""
    scale = float(rng.uniform(min_scale, max_scale)) if max_scale > min_scale else float(min_scale)
    flip = bool(rng.random() < flip_prob)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    top = int(rng.integers(0, new_h - height + 1)) if new_h > height else 0
    left = int(rng.integers(0, new_w - width + 1)) if new_w > width else 0
    return Augmentation(scale=scale, flip=flip, top=top, left=left)


def apply_augmentation(
    image: Tensor,
    boxes: Tensor,
    keypoints: Tensor | None,
    aug: Augmentation,
    *,
    flip_index: Sequence[int] | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Apply ``aug`` to an image ``[3, H, W]``, boxes ``[N, 4]`` xyxy px and keypoints ``[N, K, 3]``.

    Returns the image (same ``H x W``), boxes and keypoints in the new frame; rows are kept (the caller
    sanitizes). The flip is the views' :class:`~datadistill.core.transforms.HFlip`: ``x -> W - x`` for boxes
    and keypoints alike (continuous pixel coordinates; torchvision's KeyPoints flip uses ``W - 1 - x``, the
    pixel-index convention) and the left/right keypoint channels swapped with ``flip_index``
    (``new[i] = old[flip_index[i]]``).
    Keypoint visibilities travel with their channel and are left to the caller.
    """
    height, width = image.shape[-2:]
    canvas = (int(height), int(width))
    img = tv_tensors.Image(image)
    bxs = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=canvas)
    kps = None if keypoints is None else tv_tensors.KeyPoints(keypoints[..., :2], canvas_size=canvas)
    if aug.scale != 1.0:
        size = [max(1, round(height * aug.scale)), max(1, round(width * aug.scale))]
        if size == [1, 1]:  # torch's uint8 resize fails an internal assert when it makes a 1 x 1 image
            img = tv_tensors.Image(img.float().mean(dim=(-2, -1), keepdim=True).round().to(img.dtype))
        else:
            img = F.resize(img, size, antialias=True)
        bxs = F.resize(bxs, size)
        kps = None if kps is None else F.resize(kps, size)
        img = F.crop(img, aug.top, aug.left, canvas[0], canvas[1])
        bxs = F.crop(bxs, aug.top, aug.left, canvas[0], canvas[1])
        kps = None if kps is None else F.crop(kps, aug.top, aug.left, canvas[0], canvas[1])
    out_img = img.as_subclass(Tensor)
    out_boxes = bxs.as_subclass(Tensor).clone()
    out_kps = None
    if keypoints is not None and kps is not None:
        out_kps = torch.cat([kps.as_subclass(Tensor), keypoints[..., 2:]], dim=-1).clone()
    if aug.flip:  # the views' flip (one copy of the flip math), on the canvas
        if out_kps is not None and (flip_index is None or len(flip_index) != out_kps.shape[1]):
            raise ValueError(
                f"a flip needs a flip_index with one entry per keypoint ({out_kps.shape[1]}), got {flip_index!r}"
            )
        flip = HFlip(int(width))
        out_img, out_boxes = flip.apply_image(out_img), flip.apply_box(out_boxes)
        out_kps = None if out_kps is None else flip.apply_keypoints(out_kps, flip_index=flip_index or ())
    return out_img, out_boxes, out_kps


def sanitize(
    boxes: Tensor, labels: Tensor, keypoints: Tensor | None, *, height: int, width: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Clip boxes to the image, drop those with a side under ``MIN_BOX_SIDE_PX`` (with their labels and
    keypoints), and mark keypoints outside ``[0, W] x [0, H]`` or with ``v <= 0`` as ``(0, 0, 0)``."""
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIDE_PX) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIDE_PX)
    boxes, labels = boxes[keep], labels[keep]
    if keypoints is not None:
        keypoints = keypoints[keep].clone()
        x, y, v = keypoints[..., 0], keypoints[..., 1], keypoints[..., 2]
        gone = (v <= 0) | (x < 0) | (x > width) | (y < 0) | (y > height)
        keypoints[gone] = 0.0
    return boxes, labels, keypoints


# ----------------------------------------------------------------------------------------------------
# the dataset


class DetectionDataset(Dataset[tuple[Tensor, Target]]):
    """The images of a :class:`CocoDataset` or a :class:`FlatLabels` with their annotations as detection
    targets: ``boxes``,
    ``labels`` (and ``keypoints``) of the objects, and ``ignore`` ``[M, 4]``, the crowd regions
    (``iscrowd: 1``), where the image has any: neither objects nor background in training
    (:mod:`datadistill.models.ignore`).

    ``train=True`` augments each sample (scale jitter in ``[min_scale, max_scale]`` with crop or pad back
    to the original size, horizontal flip with ``flip_prob`` that swaps left/right keypoints with the data
    set's flip map); the draw is a pure function of ``(seed, epoch, index)``: call :meth:`set_epoch` before
    each epoch (before the DataLoader iterator is made, so that worker processes get it). Annotation
    ``score`` (pseudo-labels) is ignored: every annotation is a hard label. The keypoint third column is
    passed through (detectors treat ``> 0`` as labeled), except that it becomes 0 when the keypoint leaves
    the image.

    A :class:`CocoDataset` is read into a :class:`FlatLabels` first: the samples come from flat arrays, which
    DataLoader workers share without copies (memory-mapped ones too: :func:`cache_label_table`).
    """

    def __init__(
        self,
        dataset: CocoDataset | FlatLabels,
        image_root: str | os.PathLike[str],  # a folder, or an object-store prefix (s3://bucket/prefix)
        *,
        train: bool,
        min_scale: float = 0.8,
        max_scale: float = 1.25,
        flip_prob: float = 0.5,
        seed: int = 0,
    ) -> None:
        if not (0 < min_scale <= max_scale and math.isfinite(max_scale)):
            raise ValueError(f"need 0 < min_scale <= max_scale, got min_scale={min_scale}, max_scale={max_scale}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.labels = dataset if isinstance(dataset, FlatLabels) else FlatLabels.from_coco(dataset)
        self.image_root = image_root
        self.train = train
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.flip_prob = float(flip_prob)
        self.seed = int(seed)
        self.epoch = 0
        category = self.labels.keypoint_category
        self.num_keypoints = self.labels.num_keypoints
        self.flip_index: tuple[int, ...] | None = category.flip_index if category is not None else None

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        rec = self.labels.image_record(index)
        path = resolve_image_path(self.image_root, rec.file_name)
        image = read_image(path)
        if tuple(image.shape[-2:]) != (rec.height, rec.width):
            raise DataError(
                f"{path}: image is {image.shape[-1]}x{image.shape[-2]} but the json says {rec.width}x{rec.height}"
            )
        lab = self.labels.objects(index)
        crowd = np.asarray(lab.iscrowd, bool)
        boxes = torch.from_numpy(np.asarray(lab.boxes, np.float32)).reshape(-1, 4)
        # crowd regions travel with the objects through the augmentation, under a label no class has
        labels = torch.from_numpy(np.where(crowd, _CROWD, np.asarray(lab.labels, np.int64)))
        keypoints = None
        if self.num_keypoints:
            raw = lab.keypoints if lab.keypoints is not None else np.zeros((len(crowd), self.num_keypoints, 3))
            raw = np.where(crowd[:, None, None], 0.0, np.asarray(raw, np.float32))
            keypoints = torch.from_numpy(np.asarray(raw, np.float32)).reshape(-1, self.num_keypoints, 3)
        if self.train:
            aug = draw_augmentation(
                _rng(self.seed, self.epoch, index),
                height=rec.height,
                width=rec.width,
                min_scale=self.min_scale,
                max_scale=self.max_scale,
                flip_prob=self.flip_prob,
            )
            if aug != IDENTITY:
                image, boxes, keypoints = apply_augmentation(image, boxes, keypoints, aug, flip_index=self.flip_index)
        boxes, labels, keypoints = sanitize(boxes, labels, keypoints, height=rec.height, width=rec.width)
        is_object = labels != _CROWD
        target: Target = {"boxes": boxes[is_object], "labels": labels[is_object], "image_id": rec.id}
        if keypoints is not None:
            target["keypoints"] = keypoints[is_object]
        if crowd.any():
            target["ignore"] = boxes[~is_object]
        return F.to_dtype(image, torch.float32, scale=True), target


def collate(batch: Sequence[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """Detection batches stay lists: images differ in size and targets in length."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    return images, targets


# ----------------------------------------------------------------------------------------------------
# mixing real and pseudo-labeled images


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


class MixedBatchSampler(Sampler[list[int]]):
    """Batches of indices into ``ConcatDataset([real, pseudo])``, each with a fixed real:pseudo mix.

    Every batch holds ``p = round(batch_size * pseudo_ratio)`` pseudo images (rounded half up; the paper's
    6:4 is ``pseudo_ratio=0.4``) and ``batch_size - p`` real ones. One epoch is one pass over the real
    images in a random order. Pseudo images come from an endless stream of reshuffled passes over the pseudo
    set (without replacement within a pass), continued from epoch to epoch, so a pseudo set larger than an
    epoch's need is covered over several epochs and a smaller one is cycled. The batches are a pure function
    of ``(seed, epoch)``: call :meth:`set_epoch` before each epoch.

    A real set too small for one batch per rank (fewer than ``world_size * (batch_size - p)`` images) is
    cycled: an epoch is then one batch per rank, its real images drawn from reshuffled passes over the set
    (an image may appear more than once in a batch); :attr:`cycles_real` says so.

    Distributed: the epoch's batches are dealt round-robin to ``world_size`` ranks (``batch_size`` is per
    rank); their number is cut to a multiple of ``world_size`` so that every rank takes the same number
    of steps. Real images are disjoint across ranks; pseudo images too while the pseudo set is at least
    an epoch's need. With ``drop_last=False`` the last batch keeps its ``p`` pseudo images and has fewer
    real ones.
    """

    def __init__(
        self,
        num_real: int,
        num_pseudo: int,
        *,
        batch_size: int,
        pseudo_ratio: float = 0.4,
        seed: int = 0,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not (isinstance(pseudo_ratio, int | float) and 0.0 <= pseudo_ratio < 1.0):
            raise ValueError(f"pseudo_ratio must be in [0, 1), got {pseudo_ratio!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_real < 1 or num_pseudo < 0:
            raise ValueError(f"need at least one real image and num_pseudo >= 0, got {num_real} and {num_pseudo}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        pseudo_per_batch = _round_half_up(batch_size * pseudo_ratio) if pseudo_ratio > 0 else 0
        if pseudo_ratio > 0 and not 1 <= pseudo_per_batch < batch_size:
            raise ValueError(
                f"batch_size {batch_size} is too small for pseudo_ratio {pseudo_ratio}: a batch would hold "
                f"{pseudo_per_batch} pseudo and {batch_size - pseudo_per_batch} real images; it needs at "
                "least one of each (raise batch_size or change pseudo_ratio)"
            )
        if pseudo_per_batch and num_pseudo == 0:
            raise ValueError(f"pseudo_ratio {pseudo_ratio} needs pseudo images, got none")
        self.num_real = int(num_real)
        self.num_pseudo = int(num_pseudo)
        self.batch_size = int(batch_size)
        self.pseudo_ratio = float(pseudo_ratio)
        self.pseudo_per_batch = pseudo_per_batch
        self.real_per_batch = batch_size - pseudo_per_batch
        self.seed = int(seed)
        self.drop_last = drop_last
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0

    @property
    def cycles_real(self) -> bool:
        """Whether the real set is smaller than one batch per rank, and cycled (see the class docstring)."""
        return self.drop_last and self.num_real < self.real_per_batch * self.world_size

    @property
    def num_global_batches(self) -> int:
        """Batches per epoch over all ranks."""
        if self.cycles_real:
            return self.world_size
        n = self.num_real // self.real_per_batch if self.drop_last else -(-self.num_real // self.real_per_batch)
        return n - n % self.world_size

    def __len__(self) -> int:
        return self.num_global_batches // self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _pseudo_stream(self, start: int, count: int) -> np.ndarray:
        """Positions ``[start, start + count)`` of the endless stream of reshuffled pseudo passes."""
        if count == 0:
            return np.zeros((0,), np.int64)
        n = self.num_pseudo
        parts = []
        for cycle in range(start // n, (start + count - 1) // n + 1):
            perm = _rng(self.seed, 1, cycle).permutation(n)
            lo = max(start - cycle * n, 0)
            hi = min(start + count - cycle * n, n)
            parts.append(perm[lo:hi])
        return np.concatenate(parts)

    def __iter__(self) -> Iterator[list[int]]:
        nb = self.num_global_batches
        real = _rng(self.seed, 0, self.epoch).permutation(self.num_real)
        if self.cycles_real:  # more passes, each reshuffled, until the epoch's one batch per rank is full
            passes = -(-nb * self.real_per_batch // self.num_real)
            extra = [_rng(self.seed, 2, self.epoch, j).permutation(self.num_real) for j in range(1, passes)]
            real = np.concatenate([real, *extra])
        need = nb * self.pseudo_per_batch
        pseudo = self._pseudo_stream(self.epoch * need, need) + self.num_real
        r, p = self.real_per_batch, self.pseudo_per_batch
        for b in range(self.rank, nb, self.world_size):
            yield [int(i) for i in real[b * r : (b + 1) * r]] + [int(i) for i in pseudo[b * p : (b + 1) * p]]
