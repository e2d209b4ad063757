"""The views of multi-transform inference (step 2 of data distillation) and their exact inverses.

A :class:`View` is a horizontal flip, a scale, a tile, or a composition of them: a list of transforms
that own their inverses (:meth:`View.transforms`, :mod:`datadistill.core.transforms`). ``prepare`` turns an
image into the view's input, ``invert`` maps the view's predictions back to the original image frame
through the composition's inverse.

Scales are *not* applied to the image: torchvision detectors resize every input so that its short side
is ``min_size`` (capped by ``max_size``), which would undo any resize we made. A scale view instead runs
the model with ``min_size * scale`` and ``max_size * scale`` (see :func:`datadistill.models.torchvision.input_size`),
and the model's own post-processing maps boxes back to the input frame. Only the flip needs inverting.

A tile view (sliced inference, as SAHI does, but as one more exact view) crops one cell of an ``R x C``
grid of overlapping tiles (:class:`Tile`) and gives the crop to the model, which resizes it to its input
size like any image: a tile runs at full resolution, its objects magnified ``C - (C - 1) * overlap`` times
(1.75 for 2 columns, 2.5 for 3 at the default overlap) against the whole image at the same input size (a
scale composes as a factor on the input size, as without tiles).
``prepare`` crops, then flips; ``invert`` un-flips within the tile and adds the tile's offset. The crop
is computed from the image's ``H x W`` (:func:`tile_spans`), so ``invert`` takes the height as well.
Keypoint heatmaps are box-relative, so only the flip matters to them; a tile view gives them only for the
boxes wholly inside its tile (:meth:`View.covers`, :func:`datadistill.stages.multiview.fuse_heatmaps`).

Objects cut by a tile edge would come out as fragments, and twice. The rule: a tile view drops every
prediction whose box comes within :data:`TILE_EDGE_MARGIN` of the tile side of an *inner* tile edge (one
that is not the image border). Thanks to the overlap, an object up to ``(overlap - 2 * margin)`` of the tile
side lies clear of the inner edges of at least one tile that holds it, so it is seen whole there, and
fusion merges the copies that several overlapping tiles see. The limit: an object larger than that is
cut in every tile that holds it and seen only by the full-image views, so tiles are meant to be combined
with them (``--views default,tile:2x2``), not to replace them.

Coordinates are continuous pixels: a pixel ``i`` covers ``[i, i + 1)``, so a flip maps ``x`` to
``width - x`` for box corners and keypoints alike (``tile width - x`` inside a tile).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from datadistill.core.transforms import Crop, HFlip, Resize, Transform, Transforms
from datadistill.core.types import Detections

# The paper's 18 views: short side 400 to 1200 in steps of 100 (relative to 800), each with and without flip.
PAPER_SCALES = tuple(s / 800 for s in range(400, 1201, 100))
# Our CPU default keeps the paper's structure (every scale with and without flip) with four of its scales,
# 0.75 to 1.5: scales below 0.75 lose small objects at 128 px inputs, and each scale costs a forward pass.
# Measured against held-back labels on the tuning seed of bench/accuracy.py (see the README): adding 1.5 to
# 0.75-1.25 raised the box pseudo-labels' AP from 49.4 to 53.4 (precision at the count rule 61.0% -> 64.2%)
# and the keypoint pseudo-labels' keypoint AP from 56.1 to 56.7, for 1.7x the pixels through the model.
DEFAULT_SCALES = (0.75, 1.0, 1.25, 1.5)
MIN_SCALE, MAX_SCALE = 0.05, 8.0

# Overlap of neighbouring tiles, as a fraction of the tile side (SAHI's default is 0.2). With the edge
# margin below, objects up to 0.25 - 2 * 0.02 = 21% of the tile side are seen whole by some tile; a 2x2 grid
# of a 512 px image has tiles of 293 px (1.31x the pixels of the whole image).
DEFAULT_TILE_OVERLAP = 0.25
MAX_TILE_OVERLAP = 0.5  # beyond it tiles mostly repeat each other: more rows or columns are the better buy
MAX_TILES_PER_SIDE = 16
# A tile view drops predictions within this fraction of the tile side of an inner tile edge: the box of an
# object cut by the edge ends on it, give or take the detector's box error.
TILE_EDGE_MARGIN = 0.02


def tile_spans(length: int, n: int, overlap: float) -> tuple[tuple[int, int], ...]:
    """``n`` spans ``[start, end)`` of one size that cover ``[0, length)`` px, neighbours sharing at least
    ``floor(overlap * size)`` px: size ``ceil(length / (n - (n - 1) * overlap))``, starts spread evenly
    (rounded down) from 0 to ``length - size``, so the first starts at 0 and the last ends at ``length``."""
    if length < 1 or n < 1:
        raise ValueError(f"need a length and a count of at least 1, got length={length}, n={n}")
    size = min(length, math.ceil(length / (n - (n - 1) * overlap) - 1e-9))
    if n == 1:
        return ((0, length),)
    return tuple(((j * (length - size)) // (n - 1), (j * (length - size)) // (n - 1) + size) for j in range(n))


def _number(x: float) -> str:
    """``x`` written so that ``float()`` reads it back exactly, as short as that allows."""
    s = f"{x:g}"
    return s if float(s) == x else repr(float(x))


@dataclass(frozen=True)
class Tile:
    """Cell ``(row, col)`` of a ``rows x cols`` grid of tiles overlapping by ``overlap`` of the tile side."""

    rows: int
    cols: int
    row: int
    col: int
    overlap: float = DEFAULT_TILE_OVERLAP

    def __post_init__(self) -> None:
        grid = f"{self.rows}x{self.cols}"
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.rows, self.cols, self.row, self.col)):
            raise ValueError(
                f"tile rows, columns and position must be integers, got tile:{grid}:r{self.row}c{self.col}"
            )
        if not (1 <= self.rows <= MAX_TILES_PER_SIDE and 1 <= self.cols <= MAX_TILES_PER_SIDE):
            raise ValueError(f"tile rows and columns must be in 1..{MAX_TILES_PER_SIDE}, got tile:{grid}")
        if self.rows * self.cols == 1:
            raise ValueError("tile:1x1 is the whole image: use identity")
        if not (isinstance(self.overlap, int | float) and math.isfinite(self.overlap)):
            raise ValueError(f"tile overlap must be a finite number, got {self.overlap!r}")
        if not 0.0 <= self.overlap <= MAX_TILE_OVERLAP:
            raise ValueError(
                f"tile overlap must be in [0, {MAX_TILE_OVERLAP}] (a fraction of the tile side), got {self.overlap}"
            )
        if not (0 <= self.row < self.rows and 0 <= self.col < self.cols):
            raise ValueError(f"tile r{self.row}c{self.col} is outside a {grid} grid (rows r0.., columns c0..)")

    @property
    def name(self) -> str:
        overlap = "" if self.overlap == DEFAULT_TILE_OVERLAP else f"@{_number(self.overlap)}"
        return f"tile:{self.rows}x{self.cols}{overlap}:r{self.row}c{self.col}"

    def box(self, *, height: int, width: int) -> tuple[int, int, int, int]:
        """The tile's crop ``(x0, y0, x1, y1)`` in integer px of an image ``height x width`` px."""
        x0, x1 = tile_spans(width, self.cols, self.overlap)[self.col]
        y0, y1 = tile_spans(height, self.rows, self.overlap)[self.row]
        return x0, y0, x1, y1

    def grid(self) -> tuple[Tile, ...]:
        """Every tile of this tile's grid (same overlap), row by row."""
        return tuple(Tile(self.rows, self.cols, r, c, self.overlap) for r in range(self.rows) for c in range(self.cols))


@dataclass(frozen=True)
class View:
    """One test-time transform: an optional tile (a crop), an optional horizontal flip (within the tile)
    and a scale relative to the model's input size."""

    hflip: bool = False
    scale: float = 1.0
    tile: Tile | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, int | float) and math.isfinite(self.scale)):
            raise ValueError(f"view scale must be a finite number, got {self.scale!r}")
        if not MIN_SCALE <= self.scale <= MAX_SCALE:
            raise ValueError(f"view scale must be in [{MIN_SCALE}, {MAX_SCALE}], got {self.scale}")

    @property
    def name(self) -> str:
        parts = (
            (["hflip"] if self.hflip else [])
            + ([self.tile.name] if self.tile is not None else [])
            + ([f"scale:{self.scale:g}"] if self.scale != 1.0 else [])
        )
        return "+".join(parts) or "identity"

    def input_size(self, min_size: int, max_size: int) -> tuple[int, int]:
        """The model's ``(min_size, max_size)`` under this view."""
        return max(1, round(min_size * self.scale)), max(1, round(max_size * self.scale))

    def crop(self, *, height: int, width: int) -> tuple[int, int, int, int]:
        """The part ``(x0, y0, x1, y1)`` px of an image ``height x width`` px that the view shows the model:
        its tile, or the whole image."""
        if self.tile is None:
            return 0, 0, width, height
        return self.tile.box(height=height, width=width)

    def transforms(self, *, height: int, width: int) -> Transforms:
        """The view's geometry on an image ``height x width`` px: its tile's :class:`Crop`, then an
        :class:`HFlip` within the tile (or the image). The scale is not among them: it is the model's input
        size (:meth:`input_size`), whose resize the model undoes itself (:func:`model_resize`)."""
        steps: list[Transform] = []
        if self.tile is not None:
            steps.append(Crop(*self.crop(height=height, width=width), height=height, width=width))
        if self.hflip:
            steps.append(HFlip(self.frame_size(height=height, width=width)[1]))
        return Transforms(tuple(steps))

    def prepare(self, image: Tensor) -> Tensor:
        """The view's input for an image ``[C, H, W]``: the tile's crop, flipped (the scale is the model's
        business)."""
        return self.transforms(height=image.shape[-2], width=image.shape[-1]).apply_image(image)

    def invert_boxes(self, boxes: Tensor, *, width: int, height: int) -> Tensor:
        """Boxes ``[N, 4]`` xyxy predicted in the view, in the original frame of an image ``height x width`` px."""
        return self.transforms(height=height, width=width).inverse().apply_box(boxes)

    def forward_boxes(self, boxes: Tensor, *, width: int, height: int) -> Tensor:
        """Original-frame boxes ``[N, 4]`` mapped into the view (into the tile, then mirrored)."""
        return self.transforms(height=height, width=width).apply_box(boxes)

    def invert_keypoints(self, keypoints: Tensor, *, width: int, height: int, flip_index: tuple[int, ...]) -> Tensor:
        """Keypoints ``[N, K, 3]`` from the view, in the original frame.

        On a flip, x becomes ``w - x`` (``w``: the width of the tile, or of the image) and the left/right
        channels are swapped with ``flip_index`` (``flip_index[i]`` is the mirror of keypoint i, from the
        data set's metadata): the view's "left hand" of a mirrored figure is the original's right hand.
        A tile then adds its offset.
        """
        inverse = self.transforms(height=height, width=width).inverse()
        return inverse.apply_keypoints(keypoints, flip_index=flip_index)

    def forward_keypoints(self, keypoints: Tensor, *, width: int, height: int, flip_index: tuple[int, ...]) -> Tensor:
        """Original-frame keypoints ``[N, K, 3]`` mapped into the view (the inverse of :meth:`invert_keypoints`)."""
        return self.transforms(height=height, width=width).apply_keypoints(keypoints, flip_index=flip_index)

    def invert_heatmaps(self, heatmaps: Tensor, *, flip_index: tuple[int, ...]) -> Tensor:
        """Keypoint heatmaps ``[N, K, M, M]`` over boxes mapped into the view, back in the original frame.

        A heatmap covers its box; the box of a flipped view is the mirror of the original box, so the
        heatmap is mirrored along its width and its channels swapped with ``flip_index``. A tile only moves
        the box: heatmaps are box-relative (:meth:`Transform.apply_heatmap
        <datadistill.core.transforms.Transform.apply_heatmap>`), so the image size does not matter.
        """
        if not self.hflip:
            return heatmaps
        return HFlip(heatmaps.shape[-1]).inverse().apply_heatmap(heatmaps, flip_index=flip_index)

    def frame_size(self, *, height: int, width: int) -> tuple[int, int]:
        """``(H, W)`` px of the view's input for an image ``height x width`` px (the tile's, or the image's)."""
        x0, y0, x1, y1 = self.crop(height=height, width=width)
        return y1 - y0, x1 - x0

    def covers(self, boxes: Tensor, *, width: int, height: int) -> Tensor:
        """``[N]`` bool: which original-frame boxes ``[N, 4]`` lie wholly in the view (all of them but for a tile)."""
        if self.tile is None:
            return torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
        x0, y0, x1, y1 = self.crop(height=height, width=width)
        return (boxes[:, 0] >= x0) & (boxes[:, 1] >= y0) & (boxes[:, 2] <= x1) & (boxes[:, 3] <= y1)

    def clear_of_cuts(self, boxes: Tensor, *, width: int, height: int) -> Tensor:
        """``[N]`` bool: which original-frame boxes ``[N, 4]`` predicted in the view stay more than
        :data:`TILE_EDGE_MARGIN` of the tile side away from every inner tile edge (an edge that is not the
        image border), i.e. are not fragments of an object the tile cuts (all of them but for a tile)."""
        keep = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
        if self.tile is None:
            return keep
        x0, y0, x1, y1 = self.crop(height=height, width=width)
        mx, my = TILE_EDGE_MARGIN * (x1 - x0), TILE_EDGE_MARGIN * (y1 - y0)
        if x0 > 0:
            keep &= boxes[:, 0] >= x0 + mx
        if x1 < width:
            keep &= boxes[:, 2] <= x1 - mx
        if y0 > 0:
            keep &= boxes[:, 1] >= y0 + my
        if y1 < height:
            keep &= boxes[:, 3] <= y1 - my
        return keep

    def invert(
        self, detections: Detections, *, width: int, height: int, flip_index: tuple[int, ...] = ()
    ) -> Detections:
        """A view's detections in the original frame of an image ``height x width`` px (boxes, and
        keypoints with left/right swapped); a tile view drops the fragments on its inner edges
        (:meth:`clear_of_cuts`)."""
        keypoints = detections.keypoints
        if keypoints is not None:
            keypoints = self.invert_keypoints(keypoints, width=width, height=height, flip_index=flip_index)
        out = Detections(
            boxes=self.invert_boxes(detections.boxes, width=width, height=height),
            scores=detections.scores,
            labels=detections.labels,
            keypoints=keypoints,
            agreement=detections.agreement,
        )
        if self.tile is None:
            return out
        return out.select(self.clear_of_cuts(out.boxes, width=width, height=height))

    def invert_rows(self, detections: Detections, *, widths: Tensor, flip_index: tuple[int, ...] = ()) -> Detections:
        """:meth:`invert` for the rows of several images at once, ``widths`` ``[N]`` the width of each row's
        image (a flip mirrors within it); for a view without a tile (a tile's crop depends on each image's
        size). The same values as :meth:`invert` image by image."""
        if self.tile is not None:
            raise ValueError(f"view {self.name}: a tile view maps back one image at a time (invert)")
        if not self.hflip:
            return detections
        b = detections.boxes
        if tuple(widths.shape) != (len(b),):
            raise ValueError(f"widths must have shape [{len(b)}], one per row, got {tuple(widths.shape)}")
        unflip = HFlip(widths).inverse()
        keypoints = detections.keypoints
        if keypoints is not None:
            keypoints = unflip.apply_keypoints(keypoints, flip_index=flip_index)
        boxes = unflip.apply_box(b)
        return replace(detections, boxes=boxes, keypoints=keypoints)


def resized_size(height: int, width: int, *, min_size: int, max_size: int) -> tuple[int, int]:
    """``(H, W)`` that a torchvision detector resizes an image of ``height x width`` px to (eval mode): the
    short side to ``min_size`` unless the long side would pass ``max_size``, then each side rounded down
    (``GeneralizedRCNNTransform``). A side of 0 means the model cannot take the image: torch raises. That
    happens to images whose long side is more than ``max_size`` times their short side (a 4000 x 1 px
    strip); callers skip or refuse them up front."""
    if min(height, width) < 1:
        raise ValueError(f"image sides must be at least 1 px, got {height}x{width}")
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return int(height * scale), int(width * scale)


def model_resize(height: int, width: int, *, min_size: int, max_size: int) -> Resize:
    """The :class:`~datadistill.core.transforms.Resize` a torchvision detector makes of an input of
    ``height x width`` px at ``(min_size, max_size)`` (:func:`resized_size`; a scale view's
    :meth:`View.input_size`); its post-processing maps boxes back with the inverse."""
    return Resize(height, width, *resized_size(height, width, min_size=min_size, max_size=max_size))


_NUMBER = r"[0-9]*\.?[0-9]+(?:e-?[0-9]+)?"
_TOKEN = re.compile(
    rf"^(identity|hflip|scale:({_NUMBER})|tile:([0-9]+)x([0-9]+)(?:@({_NUMBER}))?(?::r([0-9]+)c([0-9]+))?)$"
)
_SYNTAX = "identity, hflip, scale:F, tile:RxC[@OVERLAP][:rIcJ] or a + composition of them"


def _parse_tokens(text: str) -> tuple[bool, float, tuple[int, int, float, tuple[int, int] | None] | None]:
    """``(hflip, scale, tiling)`` of one ``+`` composition; tiling is ``(rows, cols, overlap, (row, col) or
    None)`` or None."""
    hflip, scale, tiling = False, None, None
    for token in text.strip().split("+"):
        m = _TOKEN.match(token.strip())
        if not m:
            raise ValueError(f"unknown view {text!r}: expected {_SYNTAX}")
        if m.group(1) == "hflip":
            if hflip:
                raise ValueError(f"view {text!r} flips twice")
            hflip = True
        elif m.group(2) is not None:
            if scale is not None:
                raise ValueError(f"view {text!r} has two scales")
            scale = float(m.group(2))
        elif m.group(3) is not None:
            if tiling is not None:
                raise ValueError(f"view {text!r} has two tilings")
            overlap = DEFAULT_TILE_OVERLAP if m.group(5) is None else float(m.group(5))
            at = None if m.group(6) is None else (int(m.group(6)), int(m.group(7)))
            tiling = (int(m.group(3)), int(m.group(4)), overlap, at)
    return hflip, 1.0 if scale is None else scale, tiling


def parse_view(text: str) -> View:
    """``identity``, ``hflip``, ``scale:F``, one tile ``tile:RxC[@OVERLAP]:rIcJ`` (row I, column J of an
    R x C grid, overlap a fraction of the tile side, default :data:`DEFAULT_TILE_OVERLAP`) or a ``+``
    composition such as ``hflip+scale:0.75`` or ``hflip+tile:2x2:r0c1+scale:1.5``; the inverse of
    :attr:`View.name`."""
    views = expand_view(text)
    if len(views) != 1:
        raise ValueError(
            f"view {text!r} is {len(views)} views (one per tile): list it in --views, or name one tile as "
            f"{views[0].tile.name if views[0].tile else 'tile:RxC:rIcJ'}"
        )
    return views[0]


def expand_view(text: str) -> tuple[View, ...]:
    """The views of one ``+`` composition: one, or one per tile (row by row) when it names a whole grid
    (``tile:2x2``, ``hflip+tile:3x3@0.2+scale:1.5``)."""
    hflip, scale, tiling = _parse_tokens(text)
    if tiling is None:
        return (View(hflip=hflip, scale=scale),)
    rows, cols, overlap, at = tiling
    if at is not None:
        return (View(hflip=hflip, scale=scale, tile=Tile(rows, cols, at[0], at[1], overlap)),)
    return tuple(View(hflip=hflip, scale=scale, tile=t) for t in Tile(rows, cols, 0, 0, overlap).grid())


def views_for_scales(scales: tuple[float, ...]) -> tuple[View, ...]:
    """Every scale with and without flip, identity first."""
    return tuple(View(hflip=f, scale=s) for s in sorted(scales, key=lambda s: (s != 1.0, s)) for f in (False, True))


def parse_views(text: str) -> tuple[View, ...]:
    """A comma list of views (:func:`expand_view`: ``tile:2x2`` is its 4 tiles), in which ``default`` (4
    scales x flip) and ``paper`` (18 views) stand for their views: ``default,tile:2x2`` is the default
    views and 4 tiles. ``auto`` parses as ``default``: the label stage first replaces it with what the data
    calls for (:func:`datadistill.stages.defaults.auto_views`)."""
    views: list[View] = []
    for item in text.split(","):
        item = item.strip()
        if item in ("default", "auto"):
            views += views_for_scales(DEFAULT_SCALES)
        elif item == "paper":
            views += views_for_scales(PAPER_SCALES)
        elif item:
            views += expand_view(item)
    if not views:
        raise ValueError("--views needs at least one view")
    if len(set(views)) != len(views):
        raise ValueError(f"--views lists a view twice: {text!r}")
    return tuple(views)
