"""Geometric transforms that own their inverses (detectron2's ``Transform.inverse()``, batched in torch).

Each transform maps images, boxes, points and keypoint heatmaps from one frame into another, and
:meth:`~Transform.inverse` gives the transform that maps them back:

- :class:`HFlip`: mirror about the vertical centre line of a frame ``width`` px wide;
- :class:`Resize`: scale a ``height x width`` frame to ``new_height x new_width`` px;
- :class:`Crop`: keep the part ``[x0, x1) x [y0, y1)`` of a ``height x width`` frame (a tile); its inverse
  is :class:`Pad`, which puts that part back at its offset.

:class:`Transforms` composes them, first to last; its inverse undoes them last to first. A test-time view
is such a composition (:meth:`datadistill.core.views.View.transforms`), and so is the flip of training
augmentation (:func:`datadistill.data.dataset.apply_augmentation`): the flip math is written once, here.

Shapes: images ``[..., H, W]`` (``[C, H, W]`` or a batch ``[B, C, H, W]``), boxes ``[N, 4]`` xyxy, points
``[..., 2]`` (x, y), keypoints ``[N, K, C]`` (x, y, then C - 2 columns that travel unchanged, e.g.
visibility or score), heatmaps ``[N, K, M, M]``. Coordinates are continuous pixels: pixel ``i`` covers
``[i, i + 1)``, so a flip maps ``x`` to ``width - x`` for box corners and keypoints alike.

Keypoints carry sides: a mirrored figure's left hand is the original's right hand, so every transform that
mirrors (``flips``) also swaps the keypoint channels with the data set's flip map (``flip_index[i]`` is the
mirror of keypoint ``i``, from the data set's metadata, never a constant here).

Heatmaps here are box-relative (a keypoint head's ``M x M`` map over each box): a crop or a resize moves
and scales the box, not the map over it, so only a flip acts on them (mirrored along ``M``, channels swapped).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F


def swap_sides(keypoints: Tensor, flip_index: Sequence[int], *, dim: int = 1, inverse: bool = False) -> Tensor:
    """Keypoints or heatmaps with their left/right channels (along ``dim``, the ``K`` axis) swapped:
    ``out[:, i] = in[:, flip_index[i]]``, or with ``inverse`` the swap that undoes it (the same one for a
    flip map made of pairs, as a data set's is). Raises ``ValueError`` unless ``flip_index`` is a
    permutation of ``0..K-1``."""
    k = keypoints.shape[dim]
    if len(flip_index) != k:
        raise ValueError(f"flip_index has {len(flip_index)} entries but keypoints have K={k}")
    if sorted(flip_index) != list(range(k)):
        raise ValueError(f"flip_index must be a permutation of 0..{k - 1}, got {tuple(flip_index)}")
    order = list(flip_index)
    if inverse:
        for i, j in enumerate(flip_index):
            order[j] = i
    return keypoints.index_select(dim, torch.as_tensor(order, dtype=torch.int64, device=keypoints.device))


class Transform:
    """What every transform offers; subclasses define ``apply_image``, ``apply_coords``, ``apply_box`` and
    ``inverse`` (and ``flips`` when they mirror)."""

    flips: bool = False  # whether this transform mirrors (keypoints swap sides)

    def apply_image(self, image: Tensor) -> Tensor:
        """Image ``[..., H, W]`` in the new frame."""
        raise NotImplementedError

    def apply_coords(self, coords: Tensor) -> Tensor:
        """Points ``[..., 2]`` (x, y) px in the new frame."""
        raise NotImplementedError

    def apply_box(self, boxes: Tensor) -> Tensor:
        """Boxes ``[N, 4]`` xyxy px in the new frame (still x0 <= x1)."""
        raise NotImplementedError

    def inverse(self) -> Transform:
        """The transform that maps this one's output frame back to its input frame."""
        raise NotImplementedError

    def apply_keypoints(self, keypoints: Tensor, *, flip_index: Sequence[int] = ()) -> Tensor:
        """Keypoints ``[N, K, C]`` in the new frame: x, y through :meth:`apply_coords`, the other columns
        unchanged, left/right channels swapped with ``flip_index`` if the transform mirrors."""
        out = torch.cat([self.apply_coords(keypoints[..., :2]), keypoints[..., 2:]], dim=-1)
        return self.swap_sides(out, flip_index) if self.flips else out

    def swap_sides(self, keypoints: Tensor, flip_index: Sequence[int], *, dim: int = 1) -> Tensor:
        """The left/right swap of a mirroring transform (:func:`swap_sides`)."""
        return swap_sides(keypoints, flip_index, dim=dim)

    def apply_heatmap(self, heatmaps: Tensor, *, flip_index: Sequence[int] = ()) -> Tensor:
        """Box-relative heatmaps ``[N, K, M, M]`` in the new frame: unchanged but for a flip."""
        return heatmaps


def _per_row(value: float | Tensor, like: Tensor) -> float | Tensor:
    """``value`` as is, or a ``[N]`` tensor (one per row) shaped to broadcast against ``like`` ``[N, ...]``."""
    if not isinstance(value, Tensor):
        return value
    value = value.to(like.dtype)
    return value.reshape(value.shape + (1,) * (like.dim() - value.dim()))


@dataclass(frozen=True)
class HFlip(Transform):
    """Mirror a frame ``width`` px wide: ``x -> width - x``, keypoints' left/right swapped with the flip map.
    ``width`` may be a ``[N]`` tensor, one width per row of boxes or keypoints (rows from images of several
    widths); images need a number. ``undo``: the inverse, whose swap undoes the forward one (the same swap
    for a flip map made of pairs; the geometry is its own inverse)."""

    width: float | Tensor
    undo: bool = False
    flips = True

    def apply_image(self, image: Tensor) -> Tensor:
        if not isinstance(self.width, Tensor) and image.shape[-1] != self.width:
            raise ValueError(f"HFlip of a frame {self.width} px wide got an image {image.shape[-1]} px wide")
        return image.flip(-1)

    def apply_coords(self, coords: Tensor) -> Tensor:
        x = coords[..., 0]
        return torch.stack([_per_row(self.width, x) - x, coords[..., 1]], dim=-1)

    def apply_box(self, boxes: Tensor) -> Tensor:
        w = _per_row(self.width, boxes[:, 0])
        return torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)

    def apply_heatmap(self, heatmaps: Tensor, *, flip_index: Sequence[int] = ()) -> Tensor:
        """Mirrored along their own width ``M`` (a heatmap covers its box, and the box is mirrored), with
        the left/right channels swapped."""
        return self.swap_sides(heatmaps, flip_index).flip(-1)

    def swap_sides(self, keypoints: Tensor, flip_index: Sequence[int], *, dim: int = 1) -> Tensor:
        return swap_sides(keypoints, flip_index, dim=dim, inverse=self.undo)

    def inverse(self) -> HFlip:
        return HFlip(self.width, undo=not self.undo)


@dataclass(frozen=True)
class Resize(Transform):
    """Scale a ``height x width`` px frame to ``new_height x new_width`` px (x by ``new_width / width``, y by
    ``new_height / height``); images bilinearly (half-pixel centres)."""

    height: int
    width: int
    new_height: int
    new_width: int

    def __post_init__(self) -> None:
        if min(self.height, self.width, self.new_height, self.new_width) < 1:
            raise ValueError(
                f"Resize needs sides of at least 1 px, got {self.height}x{self.width} -> "
                f"{self.new_height}x{self.new_width}"
            )

    @property
    def factors(self) -> tuple[float, float]:
        """``(sx, sy)``: how much x and y grow."""
        return self.new_width / self.width, self.new_height / self.height

    def apply_image(self, image: Tensor) -> Tensor:
        if tuple(image.shape[-2:]) != (self.height, self.width):
            raise ValueError(f"Resize of a {self.height}x{self.width} frame got an image {tuple(image.shape[-2:])}")
        batch = image.reshape(-1, *image.shape[-3:]) if image.dim() >= 3 else image[None, None]
        out = F.interpolate(batch.float(), size=(self.new_height, self.new_width), mode="bilinear", align_corners=False)
        return out.to(image.dtype).reshape(*image.shape[:-2], self.new_height, self.new_width)

    def apply_coords(self, coords: Tensor) -> Tensor:
        return coords * coords.new_tensor(self.factors)

    def apply_box(self, boxes: Tensor) -> Tensor:
        sx, sy = self.factors
        return boxes * boxes.new_tensor([sx, sy, sx, sy])

    def inverse(self) -> Resize:
        return Resize(self.new_height, self.new_width, self.height, self.width)


@dataclass(frozen=True)
class Window(Transform):
    """The part ``[x0, x1) x [y0, y1)`` (integer px) of a ``height x width`` px frame: what :class:`Crop`
    keeps and :class:`Pad` puts back."""

    x0: int
    y0: int
    x1: int
    y1: int
    height: int
    width: int

    def __post_init__(self) -> None:
        if not (0 <= self.x0 < self.x1 <= self.width and 0 <= self.y0 < self.y1 <= self.height):
            raise ValueError(
                f"part ({self.x0}, {self.y0}, {self.x1}, {self.y1}) is not inside a {self.height}x{self.width} frame"
            )

    def _check(self, image: Tensor, size: tuple[int, int]) -> None:
        if tuple(image.shape[-2:]) != size:
            name = type(self).__name__
            raise ValueError(f"{name} of a {size[0]}x{size[1]} frame got an image {tuple(image.shape[-2:])}")

    def _shift(self, t: Tensor, sign: int) -> Tensor:
        """Points ``[..., 2]`` or boxes ``[N, 4]`` moved by ``sign * (x0, y0)``."""
        offset = [self.x0, self.y0] * (t.shape[-1] // 2)
        return t - t.new_tensor(offset) if sign < 0 else t + t.new_tensor(offset)


@dataclass(frozen=True)
class Crop(Window):
    """Keep ``[x0, x1) x [y0, y1)`` of a ``height x width`` px frame: coordinates move by ``-(x0, y0)``."""

    def apply_image(self, image: Tensor) -> Tensor:
        self._check(image, (self.height, self.width))
        return image[..., self.y0 : self.y1, self.x0 : self.x1]

    def apply_coords(self, coords: Tensor) -> Tensor:
        return self._shift(coords, -1)

    def apply_box(self, boxes: Tensor) -> Tensor:
        return self._shift(boxes, -1)

    def inverse(self) -> Pad:
        return Pad(self.x0, self.y0, self.x1, self.y1, self.height, self.width)


@dataclass(frozen=True)
class Pad(Window):
    """Put a ``(y1 - y0) x (x1 - x0)`` px frame at ``(x0, y0)`` of a ``height x width`` px frame (zeros
    around it): coordinates move by ``+(x0, y0)``. The inverse of :class:`Crop` with the same fields."""

    def apply_image(self, image: Tensor) -> Tensor:
        self._check(image, (self.y1 - self.y0, self.x1 - self.x0))
        out = image.new_zeros((*image.shape[:-2], self.height, self.width))
        out[..., self.y0 : self.y1, self.x0 : self.x1] = image
        return out

    def apply_coords(self, coords: Tensor) -> Tensor:
        return self._shift(coords, 1)

    def apply_box(self, boxes: Tensor) -> Tensor:
        return self._shift(boxes, 1)

    def inverse(self) -> Crop:
        return Crop(self.x0, self.y0, self.x1, self.y1, self.height, self.width)


@dataclass(frozen=True)
class Transforms(Transform):
    """A composition: ``steps`` applied first to last. Empty is the identity (inputs come back as they are)."""

    steps: tuple[Transform, ...] = ()

    @property
    def flips(self) -> bool:  # type: ignore[override]
        return sum(t.flips for t in self.steps) % 2 == 1

    def apply_image(self, image: Tensor) -> Tensor:
        for t in self.steps:
            image = t.apply_image(image)
        return image

    def apply_coords(self, coords: Tensor) -> Tensor:
        for t in self.steps:
            coords = t.apply_coords(coords)
        return coords

    def apply_box(self, boxes: Tensor) -> Tensor:
        for t in self.steps:
            boxes = t.apply_box(boxes)
        return boxes

    def apply_keypoints(self, keypoints: Tensor, *, flip_index: Sequence[int] = ()) -> Tensor:
        for t in self.steps:
            keypoints = t.apply_keypoints(keypoints, flip_index=flip_index)
        return keypoints

    def apply_heatmap(self, heatmaps: Tensor, *, flip_index: Sequence[int] = ()) -> Tensor:
        for t in self.steps:
            heatmaps = t.apply_heatmap(heatmaps, flip_index=flip_index)
        return heatmaps

    def inverse(self) -> Transforms:
        return Transforms(tuple(t.inverse() for t in reversed(self.steps)))
