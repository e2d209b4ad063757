"""Synthetic data sets for the demo, the tests and the benchmarks: shapes (boxes) and stick figures (keypoints).

Both generators write ``out_dir/images/000001.png ...`` and ``out_dir/annotations.json`` (COCO, image ids
``1..N``, image root ``out_dir/images``) and are byte-for-byte deterministic for the same arguments. Image
``i`` is drawn from its own generator seeded by ``(seed, kind, i)``, so the first images of a larger set
are the images of a smaller one.

Coordinates are COCO's continuous pixel frame: pixel ``(col, row)`` covers ``[col, col + 1) x [row, row + 1)``.
PIL draws float coordinates in the same frame, so the geometry is drawn as computed. Labels come from the
rendered pixels, not from the geometry: each object is drawn into a mask, later objects hide earlier ones,
and a box is the tight box of the pixels that stay visible.

Each image is built in layers: a textured background (gradient, low-frequency colour noise, sometimes a
grating) with clutter drawn on it (lines, scribbles, arcs, dots, irregular blobs: none of them a class),
then the objects in depth order, then blur and pixel noise. A new object (or occluder) is placed only if
every object already placed keeps enough of itself visible, so heavily hidden objects never exist and
nothing drawn is left unlabelled.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from datadistill.data.coco import Category, CocoDataset, ImageLabels, ImageRecord, derive_flip_index, to_coco_dict
from datadistill.runtime.io import write_json_atomic

log = logging.getLogger(__name__)

MIN_SIZE_PX = 64
MAX_SIZE_PX = 1024
PROGRESS_MIN_IMAGES = 200  # show a progress bar from this many images on

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross", "hexagon", "ring")
MAX_SHAPES = 8
SHAPE_SIZE_FRAC = (0.10, 0.45)  # extent of a shape (its circumscribed diameter), as a fraction of the side
MIN_SHAPE_VISIBLE = 0.5  # fraction of a shape's pixels that must stay in frame and unoccluded
MIN_SHAPE_IN_FRAME = 0.6
# ``small_objects``: the setting of sliced inference, many small shapes on a large image (size_px 512 or more).
# Log-uniform extents put 44% of the shapes under 6.25% of the side (32 px of 512 px: COCO's "small").
SMALL_SHAPE_SIZE_FRAC = (0.025, 0.2)
SMALL_SHAPE_COUNT = (4, 24)
# ``dense``: scenes of many objects (shelves, tree crowns, cells, crowds), more than the 100 detections per
# image that detection libraries and COCO's evaluation keep by default. Shapes sit one per cell of a square
# grid (jittered), each this fraction of the cell side.
DENSE_SHAPE_COUNT = (100, 300)
DENSE_CELL_FRAC = (0.7, 1.1)

FIGURE_KEYPOINTS = (
    "head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_hand", "right_hand",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_foot", "right_foot",
)  # fmt: skip
# 1-based, as COCO writes it.
FIGURE_SKELETON = (
    (1, 2), (1, 3), (2, 3), (2, 4), (4, 6), (3, 5), (5, 7), (2, 8), (3, 9), (8, 9), (8, 10), (10, 12),
    (9, 11), (11, 13),
)  # fmt: skip
# OKS sigmas in COCO's style: the ends of limbs are located more tightly than the joints near the body.
FIGURE_SIGMAS = (0.06, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062)
MAX_FIGURES = 4
FIGURE_HEIGHT_FRAC = (0.35, 0.9)  # standing height of a figure, as a fraction of the side
MIN_FIGURE_VISIBLE = 0.4  # fraction of a figure's pixels that must stay in frame and unoccluded
MIN_FIGURE_IN_FRAME_KEYPOINTS = 8
MIN_FIGURE_VISIBLE_KEYPOINTS = 6

_KIND_SEED = {"shapes": 1, "figures": 2}
_PLACEMENT_TRIES = 30


@dataclass(frozen=True)
class _Rendered:
    """One generated image: pixels ``[S, S, 3]`` uint8 and its labels (boxes xyxy px, continuous frame)."""

    pixels: np.ndarray
    boxes: np.ndarray  # [N, 4] float32
    labels: np.ndarray  # [N] int64 class indices
    area: np.ndarray  # [N] float32 px^2
    keypoints: np.ndarray | None  # [N, K, 3] float32


# ----------------------------------------------------------------------------------------------------
# public API


def shape_categories() -> tuple[Category, ...]:
    """The categories of :func:`make_shapes`, ids ``1..7`` in the order of :data:`SHAPE_CLASSES`."""
    return tuple(Category(id=i + 1, name=n, supercategory="shape") for i, n in enumerate(SHAPE_CLASSES))


def figure_category() -> Category:
    """The one category of :func:`make_figures`, with its keypoint schema (names, skeleton, flips, sigmas)."""
    return Category(
        id=1,
        name="figure",
        supercategory="figure",
        keypoints=FIGURE_KEYPOINTS,
        skeleton=FIGURE_SKELETON,
        flip_index=derive_flip_index(FIGURE_KEYPOINTS),
        sigmas=FIGURE_SIGMAS,
    )


def make_shapes(
    out_dir: str | Path,
    *,
    num_images: int,
    seed: int,
    size_px: int = 128,
    plain: bool = False,
    small_objects: bool = False,
    dense: bool = False,
) -> Path:
    """Write a box data set of coloured shapes on cluttered backgrounds; returns the json path.

    Seven classes (:data:`SHAPE_CLASSES`), 1 to 8 shapes per ``size_px`` x ``size_px`` image, each
    10% to 45% of the side, randomly rotated, coloured and filled (solid, gradient or stripes), partly
    occluded by others or cut by the frame but always at least half visible. Boxes are the tight boxes
    of the visible pixels; ``area`` is the visible pixel count.

    ``plain`` draws on a flat background with solid colours and no clutter, blur or noise, so that every
    pixel that differs from the background belongs to a labelled object (for tests and debugging).

    ``small_objects``: large images with many small objects, the setting of sliced inference (tile views):
    4 to 24 shapes per image (:data:`SMALL_SHAPE_COUNT`), each 2.5% to 20% of the side, log-uniform
    (:data:`SMALL_SHAPE_SIZE_FRAC`), so most are small; meant for ``size_px`` 512 or more.

    ``dense``: 100 to 300 shapes per image (:data:`DENSE_SHAPE_COUNT`), one per cell of a jittered square grid,
    each 70% to 110% of the cell side (:data:`DENSE_CELL_FRAC`): more objects than the 100 detections per
    image a detector and COCO's evaluation keep by default. A 256 px image gives shapes of 10 to 28 px.
    """
    if small_objects and dense:
        raise ValueError("small_objects and dense are two different layouts: choose one")
    render = _render_shapes
    if small_objects:
        render = functools.partial(_render_shapes, size_frac=SMALL_SHAPE_SIZE_FRAC, count=SMALL_SHAPE_COUNT)
    if dense:
        render = functools.partial(_render_shapes, size_frac=DENSE_CELL_FRAC, count=DENSE_SHAPE_COUNT, grid=True)
    return _make(
        out_dir,
        kind="shapes",
        num_images=num_images,
        seed=seed,
        size_px=size_px,
        plain=plain,
        categories=shape_categories(),
        render=render,
        extra_info={"small_objects": True} if small_objects else {"dense": True} if dense else {},
    )


def make_figures(out_dir: str | Path, *, num_images: int, seed: int, size_px: int = 128, plain: bool = False) -> Path:
    """Write a keypoint data set of stick figures on cluttered backgrounds; returns the json path.

    One category, ``figure``, with the 13 keypoints of :data:`FIGURE_KEYPOINTS`. 1 to 4 figures per
    image, 35% to 90% of the side tall, in varied poses, thicknesses and colours. Figures face the viewer:
    the appearance is mirror-symmetric and the labels anatomical, so a figure's ``left_*`` points lie on
    the image's right. Later figures and drawn occluders hide earlier figures: a hidden keypoint has
    visibility 1, one outside the frame visibility 0 at ``(0, 0)``. The box is the tight box of the
    visible pixels, grown to hold any hidden keypoint (visibility 1) that lies beyond them, so every
    labelled keypoint is inside its box. ``area`` is the box area: a stick figure's ink covers too
    little of it to give a body-like OKS scale.

    ``plain`` draws on a flat background with solid colours and no clutter, occluders, blur or noise.
    """
    return _make(
        out_dir,
        kind="figures",
        num_images=num_images,
        seed=seed,
        size_px=size_px,
        plain=plain,
        categories=(figure_category(),),
        render=_render_figures,
    )


# ----------------------------------------------------------------------------------------------------
# writing


def _make(
    out_dir: str | Path,
    *,
    kind: str,
    num_images: int,
    seed: int,
    size_px: int,
    plain: bool,
    categories: tuple[Category, ...],
    render: Callable[[np.random.Generator, int, bool], _Rendered],
    extra_info: dict[str, Any] | None = None,
) -> Path:
    """Render and write every image, then the COCO json (``extra_info`` added to its info); returns its path."""
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(size_px, bool) or not isinstance(size_px, int) or not MIN_SIZE_PX <= size_px <= MAX_SIZE_PX:
        raise ValueError(f"size_px must be an integer in {MIN_SIZE_PX}..{MAX_SIZE_PX}, got {size_px!r}")
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    records, labels = _write_images(
        images_dir, kind=kind, num_images=num_images, seed=seed, size_px=size_px, plain=plain, render=render
    )
    info: dict[str, Any] = {
        "description": f"datadistill synthetic {kind}",
        "generator": f"datadistill.data.synth.make_{kind}",
        "seed": seed,
        "size_px": size_px,
        "num_images": num_images,
        "plain": plain,
        **(extra_info or {}),
    }
    dataset = CocoDataset(images=tuple(records), labels=labels, categories=categories, info={"info": info})
    coco = to_coco_dict(dataset)  # flip pairs are written by name
    json_path = out / "annotations.json"
    write_json_atomic(json_path, coco)
    log.info(
        "wrote %d synthetic %s images (%d objects, %d px) to %s in %.1f s",
        num_images,
        kind,
        dataset.num_annotations,
        size_px,
        out,
        time.perf_counter() - start,
    )
    return json_path


def _write_images(
    images_dir: Path,
    *,
    kind: str,
    num_images: int,
    seed: int,
    size_px: int,
    plain: bool,
    render: Callable[[np.random.Generator, int, bool], _Rendered],
) -> tuple[list[ImageRecord], dict[int, ImageLabels]]:
    """Render images ``1..num_images`` (each from its own generator) and save them as PNG; returns their
    records and labels, annotation ids counting up from 1 in image order."""
    records: list[ImageRecord] = []
    labels: dict[int, ImageLabels] = {}
    next_id = 1
    progress = tqdm(
        range(1, num_images + 1),
        desc=f"synthetic {kind}",
        unit="img",
        disable=True if num_images < PROGRESS_MIN_IMAGES else None,
    )  # None: only on a terminal
    for image_id in progress:
        rng = np.random.default_rng([seed, _KIND_SEED[kind], image_id])
        r = render(rng, size_px, plain)
        file_name = f"{image_id:06d}.png"
        Image.fromarray(r.pixels, mode="RGB").save(images_dir / file_name, format="PNG", compress_level=6)
        n = len(r.labels)
        records.append(ImageRecord(id=image_id, file_name=file_name, width=size_px, height=size_px))
        labels[image_id] = ImageLabels(
            ids=np.arange(next_id, next_id + n, dtype=np.int64),
            boxes=r.boxes,
            labels=r.labels,
            iscrowd=np.zeros((n,), bool),
            area=r.area,
            keypoints=r.keypoints,
        )
        next_id += n
    return records, labels


# ----------------------------------------------------------------------------------------------------
# canvas: background, clutter, layers


@lru_cache(maxsize=4)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)``, each ``[S, S]`` float32 in ``(0, 1)``."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.broadcast_to(c[None, :], (size, size)), np.broadcast_to(c[:, None], (size, size))


def _background(rng: np.random.Generator, size: int, plain: bool) -> np.ndarray:
    """A ``[S, S, 3]`` float32 background in 0..255: gradient + low-frequency colour noise (+ grating)."""
    if plain:
        return np.broadcast_to(rng.uniform(20, 235, 3).astype(np.float32), (size, size, 3)).copy()
    xx, yy = _unit_grid(size)
    c1, c2 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = np.clip((xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle) + 0.5, 0, 1)
    bg = c1 + (c2 - c1) * t[..., None]
    k = int(rng.integers(3, 9))
    coarse = np.clip(rng.normal(128, 40, (k, k, 3)), 0, 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse, "RGB").resize((size, size), Image.Resampling.BICUBIC))
    bg += (smooth.astype(np.float32) - 128) * rng.uniform(0.3, 1.1)
    if rng.random() < 0.35:
        freq = rng.uniform(4, 20)  # cycles per image side
        phi = rng.uniform(0, 2 * math.pi)
        wave = np.sin(2 * math.pi * freq * (xx * math.cos(phi) + yy * math.sin(phi)) + rng.uniform(0, 6.3))
        bg += wave[..., None] * rng.uniform(-25, 25, 3).astype(np.float32)
    return np.clip(bg, 0, 255)


def _blob_polygon(rng: np.random.Generator, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """An irregular closed blob: a radius that wobbles with two or three harmonics (no class looks like it)."""
    a = np.linspace(0, 2 * math.pi, 32, endpoint=False)
    r = np.ones_like(a)
    for h in range(2, int(rng.integers(4, 6))):
        r += rng.uniform(0.12, 0.3) * np.sin(h * a + rng.uniform(0, 2 * math.pi))
    r = radius * np.clip(r, 0.35, None) / r.max()
    return list(zip((cx + r * np.cos(a)).tolist(), (cy + r * np.sin(a)).tolist(), strict=True))


def _draw_clutter(rng: np.random.Generator, img: Image.Image, *, count: int, with_blobs: bool) -> None:
    """Distractors drawn on the background: lines, scribbles, short arcs, dot clusters, irregular blobs."""
    size = img.size[0]
    s = size / 128
    draw = ImageDraw.Draw(img)
    kinds = ("line", "scribble", "arc", "dots", "blob")
    p = (0.3, 0.25, 0.2, 0.1, 0.15) if with_blobs else (0.3, 0.25, 0.25, 0.2, 0.0)
    for _ in range(count):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        width = int(rng.integers(1, max(2, round(2.5 * s)) + 1))
        kind = kinds[int(rng.choice(len(kinds), p=p))]
        if kind == "line":
            xy = rng.uniform(-0.1 * size, 1.1 * size, (2, 2))
            draw.line([tuple(q) for q in xy.tolist()], fill=colour, width=width)
        elif kind == "scribble":
            steps = rng.normal(0, 0.12 * size, (int(rng.integers(3, 7)), 2))
            xy = rng.uniform(0, size, 2) + np.cumsum(steps, axis=0)
            draw.line([tuple(q) for q in xy.tolist()], fill=colour, width=width, joint="curve")
        elif kind == "arc":
            cx, cy = rng.uniform(0, size, 2)
            r = rng.uniform(0.08, 0.35) * size
            start = rng.uniform(0, 360)
            draw.arc([cx - r, cy - r, cx + r, cy + r], start, start + rng.uniform(30, 150), fill=colour, width=width)
        elif kind == "dots":
            centre = rng.uniform(0, size, 2)
            for q in rng.normal(centre, 0.06 * size, (int(rng.integers(3, 9)), 2)):
                r = rng.uniform(0.5, 1.5) * s
                draw.ellipse([q[0] - r, q[1] - r, q[0] + r, q[1] + r], fill=colour)
        else:
            cx, cy = rng.uniform(0, size, 2)
            draw.polygon(_blob_polygon(rng, cx, cy, rng.uniform(0.04, 0.12) * size), fill=colour)


def _finish(rng: np.random.Generator, canvas: np.ndarray, plain: bool) -> np.ndarray:
    """Blur (sometimes) and pixel noise; ``[S, S, 3]`` float -> uint8."""
    out = np.clip(canvas, 0, 255).astype(np.uint8)
    if plain:
        return out
    size = canvas.shape[0]
    if rng.random() < 0.3:
        img = Image.fromarray(out, "RGB").filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8) * size / 128))
        out = np.asarray(img)
    sigma = rng.uniform(2, 10)
    noisy = out.astype(np.float32) + rng.standard_normal(out.shape, dtype=np.float32) * sigma
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _render_layer(
    size: int, bounds: tuple[float, float, float, float], draw: Callable[[ImageDraw.ImageDraw, float, float], None]
) -> tuple[np.ndarray, int]:
    """Rasterise one object into an index image that covers the frame and the object's ``bounds`` (xyxy).

    ``draw(d, dx, dy)`` draws with every coordinate shifted by ``(dx, dy)``; values are small non-zero
    integers (parts of the object). Returns the in-frame part ``[S, S]`` uint8 and the number of pixels
    the whole object covers, in frame or not.
    """
    x0 = min(0, math.floor(bounds[0]) - 2)
    y0 = min(0, math.floor(bounds[1]) - 2)
    x1 = max(size, math.ceil(bounds[2]) + 2)
    y1 = max(size, math.ceil(bounds[3]) + 2)
    img = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw(ImageDraw.Draw(img), float(-x0), float(-y0))
    arr = np.asarray(img)
    return arr[-y0 : -y0 + size, -x0 : -x0 + size], int(np.count_nonzero(arr))


def _pick_colour(rng: np.random.Generator, under: np.ndarray, min_dist: float = 110.0) -> np.ndarray:
    """A random colour far from ``under`` (the mean colour it will be drawn on); the best of a few tries."""
    best, best_d = None, -1.0
    for _ in range(12):
        c = rng.uniform(0, 255, 3).astype(np.float32)
        d = float(np.linalg.norm(c - under))
        if d > best_d:
            best, best_d = c, d
        if d >= min_dist:
            break
    assert best is not None
    return best


def _fill(rng: np.random.Generator, colour: np.ndarray, h: int, w: int, scale: float, plain: bool) -> np.ndarray:
    """The paint of one object over its ``[h, w]`` patch: solid, a gradient near ``colour``, or stripes."""
    if plain:
        return np.broadcast_to(colour, (h, w, 3))
    kind = rng.choice(3, p=(0.5, 0.3, 0.2))
    if kind == 0:
        return np.broadcast_to(colour, (h, w, 3))
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    proj = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == 1:
        other = np.clip(colour + rng.uniform(-70, 70, 3), 0, 255).astype(np.float32)
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
        return colour + (other - colour) * t[..., None]
    period = rng.uniform(3, 8) * scale
    band = (np.floor(proj / (period / 2)) % 2).astype(np.float32)
    return colour * (1 - band[..., None] * rng.uniform(0.2, 0.45))


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The tight ``(x1, y1, x2, y2)`` of a non-empty ``[S, S]`` mask, in the continuous frame."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


class _Scene:
    """The objects of one image in depth order: who owns each pixel, and what each object keeps visible."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.owner = np.full((size, size), -1, np.int16)
        self.visible_px: list[int] = []
        self.total_px: list[int] = []
        self.min_visible: list[float] = []  # fraction of total_px that must stay visible; 0 = unlabelled
        self.keypoint_px: list[np.ndarray] = []  # [K, 2] (col, row) of in-frame keypoints, or empty
        self.min_keypoints: list[int] = []

    def accepts(self, index: np.ndarray, total_px: int, keypoint_px: np.ndarray | None = None) -> bool:
        """Whether an object drawn on top (its in-frame ``index`` image) leaves every object visible enough."""
        hit = index > 0
        if not self.visible_px:
            return True
        lost = np.bincount(self.owner[hit].astype(np.int64) + 1, minlength=len(self.visible_px) + 1)[1:]
        for i, (vis, tot, frac) in enumerate(zip(self.visible_px, self.total_px, self.min_visible, strict=True)):
            if frac and vis - lost[i] < frac * tot:
                return False
            kp = self.keypoint_px[i]
            if self.min_keypoints[i] and len(kp):
                still = (self.owner[kp[:, 1], kp[:, 0]] == i) & ~hit[kp[:, 1], kp[:, 0]]
                if int(still.sum()) < self.min_keypoints[i]:
                    return False
        return True

    def add(
        self,
        index: np.ndarray,
        total_px: int,
        *,
        min_visible: float,
        keypoint_px: np.ndarray | None = None,
        min_keypoints: int = 0,
    ) -> int:
        hit = index > 0
        lost = np.bincount(self.owner[hit].astype(np.int64) + 1, minlength=len(self.visible_px) + 1)[1:]
        for i in range(len(self.visible_px)):
            self.visible_px[i] -= int(lost[i])
        k = len(self.visible_px)
        self.owner[hit] = k
        self.visible_px.append(int(hit.sum()))
        self.total_px.append(total_px)
        self.min_visible.append(min_visible)
        self.keypoint_px.append(np.zeros((0, 2), np.int64) if keypoint_px is None else keypoint_px)
        self.min_keypoints.append(min_keypoints)
        return k


def _paint(
    rng: np.random.Generator,
    canvas: np.ndarray,
    index: np.ndarray,
    colours: dict[int, np.ndarray],
    *,
    plain: bool,
    outline: bool = False,
) -> None:
    """Paint the pixels where ``index == v`` with the fill of ``colours[v]``, in place."""
    x1, y1, x2, y2 = _mask_box(index > 0)
    patch = index[y1:y2, x1:x2]
    region = canvas[y1:y2, x1:x2]
    scale = canvas.shape[0] / 128
    for value, colour in colours.items():
        sel = patch == value
        region[sel] = _fill(rng, colour, y2 - y1, x2 - x1, scale, plain)[sel]
    if outline:
        m = np.pad(patch > 0, 1, mode="edge")
        inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
        edge = (patch > 0) & ~inner
        main = colours[min(colours)]
        region[edge] = main * 0.45 if main.mean() > 100 else main + (255 - main) * 0.55


# ----------------------------------------------------------------------------------------------------
# shapes


def _unit_shape(rng: np.random.Generator, name: str) -> list[tuple[np.ndarray, int]]:
    """Polygons ``[M, 2]`` of a shape of circumradius 1 centred at 0, each with its value (0 cuts a hole)."""
    polys = _unit_shape_unscaled(rng, name)
    radius = max(float(np.linalg.norm(p, axis=1).max()) for p, _ in polys)
    return [(p / radius, v) for p, v in polys]


def _unit_shape_unscaled(rng: np.random.Generator, name: str) -> list[tuple[np.ndarray, int]]:

    def ring_of(n: int, start: float, jitter: float) -> np.ndarray:
        a = start + np.arange(n) * 2 * math.pi / n + rng.uniform(-jitter, jitter, n)
        r = rng.uniform(0.95, 1.0, n) if jitter else np.ones(n)
        return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)

    if name in ("circle", "ring"):
        a = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        ellipse = np.stack([np.cos(a), rng.uniform(0.85, 1.0) * np.sin(a)], axis=1)
        if name == "circle":
            return [(ellipse, 1)]
        return [(ellipse, 1), (ellipse * rng.uniform(0.45, 0.65), 0)]
    if name == "square":
        sq = ring_of(4, math.pi / 4, 0.0)
        return [(sq * np.array([rng.uniform(0.9, 1.1), 1.0]) + rng.uniform(-0.04, 0.04, (4, 2)), 1)]
    if name == "triangle":
        return [(ring_of(3, -math.pi / 2, math.radians(8)), 1)]
    if name == "hexagon":
        return [(ring_of(6, 0.0, math.radians(3)), 1)]
    if name == "star":
        outer = ring_of(5, -math.pi / 2, math.radians(3))
        inner = ring_of(5, -math.pi / 2 + math.pi / 5, 0.0) * rng.uniform(0.38, 0.55)
        return [(np.stack([outer, inner], axis=1).reshape(10, 2), 1)]
    if name == "cross":
        w = rng.uniform(0.22, 0.34)
        q = [(w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1), (w, -1), (w, -w), (1, -w), (1, w)]
        return [(np.array(q) / math.hypot(1, w), 1)]
    raise ValueError(f"unknown shape {name!r}; known: {SHAPE_CLASSES}")


def _render_shapes(
    rng: np.random.Generator,
    size: int,
    plain: bool,
    *,
    size_frac: tuple[float, float] = SHAPE_SIZE_FRAC,
    count: tuple[int, int] = (1, MAX_SHAPES),
    grid: bool = False,
) -> _Rendered:
    """One image of shapes: ``count`` (lo, hi) shapes, each ``size_frac`` (lo, hi) of the side; the
    default's crowded images (more than 4 shapes) take shapes up to 32% of the side only. ``grid``: one shape
    per cell of a square grid of at least ``count`` cells (in random cells, jittered), ``size_frac`` of the
    cell side, uniform."""
    canvas = _background(rng, size, plain)
    if not plain:
        img = Image.fromarray(canvas.astype(np.uint8), "RGB")
        _draw_clutter(rng, img, count=int(rng.integers(3, 13)), with_blobs=True)
        canvas = np.asarray(img).astype(np.float32)
    target = int(rng.integers(count[0], count[1] + 1))
    crowded = size_frac == SHAPE_SIZE_FRAC and target > 4
    hi_frac = 0.32 if crowded else size_frac[1]
    scene = _Scene(size)
    classes: list[int] = []
    side = math.ceil(math.sqrt(target))
    cells = rng.permutation(side * side)[:target] if grid else None  # (no draw otherwise: the same images as before)
    for n in range(target):
        for attempt in range(_PLACEMENT_TRIES * (3 if n == 0 else 1)):
            cls = int(rng.integers(len(SHAPE_CLASSES)))
            if cells is not None:
                cell = size / side
                extent = rng.uniform(*size_frac) * cell
                centre = (np.array([cells[n] % side, cells[n] // side]) + 0.5 + rng.uniform(-0.15, 0.15, 2)) * cell
            else:
                extent = math.exp(rng.uniform(math.log(size_frac[0]), math.log(hi_frac))) * size
                centre = rng.uniform(0, size, 2) if attempt < _PLACEMENT_TRIES else rng.uniform(0.3, 0.7, 2) * size
            rot = rng.uniform(0, 2 * math.pi)
            rotation = np.array([[math.cos(rot), math.sin(rot)], [-math.sin(rot), math.cos(rot)]])
            polys = [(p @ rotation * extent / 2 + centre, v) for p, v in _unit_shape(rng, SHAPE_CLASSES[cls])]
            pts = np.concatenate([p for p, _ in polys])
            bounds = (*pts.min(axis=0).tolist(), *pts.max(axis=0).tolist())

            def draw(d: ImageDraw.ImageDraw, dx: float, dy: float, polys: Any = polys) -> None:
                for p, v in polys:
                    d.polygon([(x + dx, y + dy) for x, y in p.tolist()], fill=v)

            index, total = _render_layer(size, bounds, draw)
            in_frame = int(np.count_nonzero(index))
            if total == 0 or in_frame < MIN_SHAPE_IN_FRAME * total or not scene.accepts(index, total):
                continue
            x1, y1, x2, y2 = _mask_box(index > 0)
            colour = _pick_colour(rng, canvas[y1:y2, x1:x2].reshape(-1, 3).mean(axis=0))
            _paint(rng, canvas, index, {1: colour}, plain=plain, outline=not plain and rng.random() < 0.3)
            scene.add(index, total, min_visible=MIN_SHAPE_VISIBLE)
            classes.append(cls)
            break
    boxes = np.array([_mask_box(scene.owner == k) for k in range(len(classes))], np.float32).reshape(-1, 4)
    return _Rendered(
        pixels=_finish(rng, canvas, plain),
        boxes=boxes,
        labels=np.array(classes, np.int64),
        area=np.array(scene.visible_px, np.float32),
        keypoints=None,
    )


# ----------------------------------------------------------------------------------------------------
# figures


def _pose(rng: np.random.Generator, height: float) -> tuple[np.ndarray, float]:
    """Keypoints ``[13, 2]`` of one figure (pelvis at 0, y down) and its head radius, both in px.

    Angles are measured from straight down, positive away from the body's midline; the figure faces
    the viewer, so its left side (``side = +1``) is drawn on the image's right (+x).
    """
    h = height
    torso = h * rng.uniform(0.26, 0.31)
    neck = h * rng.uniform(0.09, 0.11)
    head_r = h * rng.uniform(0.07, 0.09)
    shoulder_w = h * rng.uniform(0.08, 0.12)
    hip_w = h * rng.uniform(0.05, 0.075)
    upper_arm, forearm = h * rng.uniform(0.15, 0.19), h * rng.uniform(0.14, 0.18)
    thigh, shin = h * rng.uniform(0.22, 0.26), h * rng.uniform(0.21, 0.25)
    kp = np.zeros((len(FIGURE_KEYPOINTS), 2))
    kp[0] = (rng.uniform(-0.3, 0.3) * head_r, -torso - neck)
    for side, (sh, el, ha, hp, kn, ft) in ((1, (1, 3, 5, 7, 9, 11)), (-1, (2, 4, 6, 8, 10, 12))):
        kp[sh] = (side * shoulder_w, -torso)
        kp[hp] = (side * hip_w, 0.0)
        a1 = math.radians(rng.uniform(-40, 165))
        a2 = a1 + math.radians(rng.uniform(-110, 110))
        kp[el] = kp[sh] + upper_arm * np.array([side * math.sin(a1), math.cos(a1)])
        kp[ha] = kp[el] + forearm * np.array([side * math.sin(a2), math.cos(a2)])
        b1 = rng.uniform(-5, 45)
        b2 = math.radians(float(np.clip(b1 + rng.uniform(-25, 45), -15, 80)))  # feet rarely cross
        b1 = math.radians(b1)
        kp[kn] = kp[hp] + thigh * np.array([side * math.sin(b1), math.cos(b1)])
        kp[ft] = kp[kn] + shin * np.array([side * math.sin(b2), math.cos(b2)])
    tilt = math.radians(rng.uniform(-20, 20))
    rotation = np.array([[math.cos(tilt), math.sin(tilt)], [-math.sin(tilt), math.cos(tilt)]])
    return kp @ rotation, head_r


def _disk(d: ImageDraw.ImageDraw, x: float, y: float, r: float, value: int) -> None:
    """A filled disk as a polygon: PIL's ellipse rounds float centres, a polygon keeps them."""
    a = np.linspace(0, 2 * math.pi, 16, endpoint=False)
    d.polygon(list(zip((x + r * np.cos(a)).tolist(), (y + r * np.sin(a)).tolist(), strict=True)), fill=value)


def _figure_drawer(kp: np.ndarray, head_r: float, width: int) -> Callable[[ImageDraw.ImageDraw, float, float], None]:
    """Draws a figure: torso (value 1, a darker shade) outlined by its sides, limbs, joints and head (2)."""
    r_joint = max(width / 2, 1.0)
    r_end = max(0.8 * width, 1.25)
    limbs = [(a - 1, b - 1) for a, b in FIGURE_SKELETON if not (a == 1 and b in (2, 3))]
    ends = {5, 6, 11, 12}

    def draw(d: ImageDraw.ImageDraw, dx: float, dy: float) -> None:
        p = [(float(x) + dx, float(y) + dy) for x, y in kp]
        d.polygon([p[1], p[2], p[8], p[7]], fill=1)
        neck = ((p[1][0] + p[2][0]) / 2, (p[1][1] + p[2][1]) / 2)
        d.line([neck, p[0]], fill=2, width=width)
        for a, b in limbs:
            d.line([p[a], p[b]], fill=2, width=width)
        for i in range(1, len(p)):
            _disk(d, *p[i], r_end if i in ends else r_joint, 2)
        _disk(d, *p[0], head_r, 2)

    return draw


def _occluder(rng: np.random.Generator, size: int) -> tuple[list[tuple[float, float]], tuple[float, ...]]:
    """A bar or a blob that hides parts of figures (not a class); its polygon and xyxy bounds."""
    cx, cy = rng.uniform(0, size, 2)
    if rng.random() < 0.5:
        long, short = rng.uniform(0.2, 0.5) * size, rng.uniform(0.05, 0.15) * size
        a = rng.uniform(0, math.pi)
        u, v = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
        corners = [
            np.array([cx, cy]) + su * long / 2 * u + sv * short / 2 * v
            for su, sv in ((1, 1), (-1, 1), (-1, -1), (1, -1))
        ]
        poly = [(float(c[0]), float(c[1])) for c in corners]
    else:
        poly = _blob_polygon(rng, cx, cy, rng.uniform(0.08, 0.18) * size)
    pts = np.array(poly)
    return poly, (*pts.min(axis=0).tolist(), *pts.max(axis=0).tolist())


def _render_figures(rng: np.random.Generator, size: int, plain: bool) -> _Rendered:
    """One image of stick figures: figures placed back to front, then occluders over them (not ``plain``)."""
    canvas = _background(rng, size, plain)
    if not plain:
        img = Image.fromarray(canvas.astype(np.uint8), "RGB")
        _draw_clutter(rng, img, count=int(rng.integers(3, 11)), with_blobs=True)
        canvas = np.asarray(img).astype(np.float32)
    scene = _Scene(size)
    figures = _place_figures(rng, canvas, scene, size=size)
    if not plain:
        _place_occluders(rng, canvas, scene, size=size)
    boxes, keypoints = _figure_labels(figures, scene, size=size)
    return _Rendered(
        pixels=_finish(rng, canvas, plain),
        boxes=boxes,
        labels=np.zeros((len(figures),), np.int64),
        area=((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.float32),
        keypoints=keypoints,
    )


def _place_figures(
    rng: np.random.Generator, canvas: np.ndarray, scene: _Scene, *, size: int
) -> list[tuple[int, np.ndarray]]:
    """1 to :data:`MAX_FIGURES` figures painted on ``canvas`` (in place) and added to ``scene``.

    Returns each figure's scene index and keypoints ``[13, 2]`` in the continuous frame. A figure that
    finds no place in its tries is left out; the first figure has three times the tries, the extra ones in
    the frame.
    """
    target = int(rng.integers(1, MAX_FIGURES + 1))
    hi_frac = FIGURE_HEIGHT_FRAC[1] if target <= 2 else 0.65
    figures: list[tuple[int, np.ndarray]] = []
    for n in range(target):
        for attempt in range(_PLACEMENT_TRIES * (3 if n == 0 else 1)):
            placed = _try_figure(rng, canvas, scene, size=size, hi_frac=hi_frac, inside=attempt >= _PLACEMENT_TRIES)
            if placed is not None:
                figures.append(placed)
                break
    return figures


def _try_figure(
    rng: np.random.Generator, canvas: np.ndarray, scene: _Scene, *, size: int, hi_frac: float, inside: bool
) -> tuple[int, np.ndarray] | None:
    """One try at a figure of random pose, height (up to ``hi_frac`` of the side) and place (in the frame
    when ``inside``, else 70% of the time); painted and added when it keeps enough of itself in frame and
    visible and leaves every figure under it visible enough. Returns its scene index and keypoints, or None.
    """
    height = rng.uniform(FIGURE_HEIGHT_FRAC[0], hi_frac) * size
    local, head_r = _pose(rng, height)
    width = max(2, round(height * rng.uniform(0.045, 0.075)))
    margin = max(head_r, width)
    lo, hi = local.min(axis=0) - margin, local.max(axis=0) + margin
    extent = hi - lo
    inside = inside or rng.random() < 0.7
    origin = np.array(
        [rng.uniform(0, size - e) if inside and e < size else rng.uniform(-0.35 * e, size - 0.65 * e) for e in extent]
    )
    kp = np.round((local - lo + origin) * 4) / 4  # quarter pixels: exact in float32 and json
    bounds = (*(kp.min(axis=0) - margin).tolist(), *(kp.max(axis=0) + margin).tolist())
    index, total = _render_layer(size, bounds, _figure_drawer(kp, head_r, width))
    in_frame = (kp >= 0).all(axis=1) & (kp < size).all(axis=1)
    kp_px = np.floor(kp[in_frame]).astype(np.int64)
    if (
        int(in_frame.sum()) < MIN_FIGURE_IN_FRAME_KEYPOINTS
        or np.count_nonzero(index) < MIN_FIGURE_VISIBLE * total
        or not scene.accepts(index, total)
    ):
        return None
    x1, y1, x2, y2 = _mask_box(index > 0)
    colour = _pick_colour(rng, canvas[y1:y2, x1:x2].reshape(-1, 3).mean(axis=0))
    torso = colour * rng.uniform(0.45, 0.65) if colour.mean() > 110 else colour + (255 - colour) * 0.45
    _paint(rng, canvas, index, {1: torso, 2: colour}, plain=True)
    k = scene.add(
        index, total, min_visible=MIN_FIGURE_VISIBLE, keypoint_px=kp_px, min_keypoints=MIN_FIGURE_VISIBLE_KEYPOINTS
    )
    return k, kp


def _place_occluders(rng: np.random.Generator, canvas: np.ndarray, scene: _Scene, *, size: int) -> None:
    """0 to 2 occluders (:func:`_occluder`) painted over the figures, each where it leaves them visible enough."""
    for _ in range(int(rng.choice(3, p=(0.45, 0.35, 0.2)))):
        for _attempt in range(10):
            poly, bounds = _occluder(rng, size)

            def draw(d: ImageDraw.ImageDraw, dx: float, dy: float, poly: Any = poly) -> None:
                d.polygon([(x + dx, y + dy) for x, y in poly], fill=1)

            index, total = _render_layer(size, bounds, draw)
            if not np.any(index) or not scene.accepts(index, total):
                continue
            x1, y1, x2, y2 = _mask_box(index > 0)
            colour = _pick_colour(rng, canvas[y1:y2, x1:x2].reshape(-1, 3).mean(axis=0), 60.0)
            _paint(rng, canvas, index, {1: colour}, plain=False)
            scene.add(index, total, min_visible=0.0)
            break


def _figure_labels(figures: list[tuple[int, np.ndarray]], scene: _Scene, *, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``[N, 4]`` and keypoints ``[N, 13, 3]`` (float32, px) of the placed figures, from the final pixels.

    A keypoint is visible (2) where its figure owns its pixel, hidden (1) where another object does, and
    ``(0, 0, 0)`` outside the frame. The box is the tight box of the visible pixels, grown to hold the
    in-frame keypoints.
    """
    boxes, keypoints = [], []
    for k, kp in figures:
        in_frame = (kp >= 0).all(axis=1) & (kp < size).all(axis=1)
        col = np.clip(np.floor(kp[:, 0]).astype(np.int64), 0, size - 1)
        row = np.clip(np.floor(kp[:, 1]).astype(np.int64), 0, size - 1)
        v = np.where(in_frame, np.where(scene.owner[row, col] == k, 2, 1), 0)
        x1, y1, x2, y2 = _mask_box(scene.owner == k)
        if in_frame.any():  # hidden keypoints beyond the visible pixels grow the box to hold them
            x1, y1 = min(x1, int(col[in_frame].min())), min(y1, int(row[in_frame].min()))
            x2, y2 = max(x2, int(col[in_frame].max()) + 1), max(y2, int(row[in_frame].max()) + 1)
        boxes.append((x1, y1, x2, y2))
        xyv = np.concatenate([np.where(in_frame[:, None], kp, 0.0), v[:, None]], axis=1)
        keypoints.append(xyv)
    return (
        np.array(boxes, np.float32).reshape(-1, 4),
        np.array(keypoints, np.float32).reshape(-1, len(FIGURE_KEYPOINTS), 3),
    )
