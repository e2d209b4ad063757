"""Tile views (sliced inference as one more exact view): grid geometry, parsing, exact inverses against
the pixels, the inner-edge rule that keeps cut objects from coming out twice, and heatmap fusion."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import pytest
import torch

from datadistill.core.fusion import fuse
from datadistill.core.types import Detections
from datadistill.core.views import (
    DEFAULT_TILE_OVERLAP,
    TILE_EDGE_MARGIN,
    Tile,
    View,
    expand_view,
    parse_view,
    parse_views,
    resized_size,
    tile_spans,
)
from datadistill.models.detector import ModelMeta
from datadistill.stages.multiview import LabelTimer, fuse_heatmaps, label_images, unfit_reason

FLIP_INDEX = (0, 2, 1, 4, 3)  # head, left_hand, right_hand, left_foot, right_foot
HEIGHT, WIDTH = 150, 203  # odd and not square: rows and columns get different tile sizes

TILE_VIEWS = [
    pytest.param(View(tile=Tile(2, 2, 0, 1)), id="2x2-top-right"),
    pytest.param(View(tile=Tile(2, 2, 1, 0)), id="2x2-bottom-left"),
    pytest.param(View(hflip=True, tile=Tile(2, 2, 1, 1)), id="2x2-flip"),
    pytest.param(View(tile=Tile(3, 3, 1, 1, 0.1)), id="3x3-middle-overlap-0.1"),
    pytest.param(View(hflip=True, scale=1.5, tile=Tile(3, 2, 2, 0, 0.5)), id="3x2-flip-scale-overlap-0.5"),
    pytest.param(View(scale=0.75, tile=Tile(1, 4, 0, 2, 0.0)), id="1x4-scale-no-overlap"),
]


# ----------------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize(
    ("text", "view"),
    [
        pytest.param("tile:2x2:r0c1", View(tile=Tile(2, 2, 0, 1)), id="one-tile"),
        pytest.param("hflip+tile:2x2@0.2:r1c0+scale:1.5", View(True, 1.5, Tile(2, 2, 1, 0, 0.2)), id="composed"),
        pytest.param("scale:1.5+tile:3x3:r2c2+hflip", View(True, 1.5, Tile(3, 3, 2, 2)), id="any-order"),
        pytest.param("tile:1x3@0:r0c2", View(tile=Tile(1, 3, 0, 2, 0.0)), id="one-row-no-overlap"),
        pytest.param("tile:2x2@0.25:r0c0", View(tile=Tile(2, 2, 0, 0)), id="default-overlap-written-out"),
        pytest.param(f"tile:4x4@{1 / 3!r}:r3c0", View(tile=Tile(4, 4, 3, 0, 1 / 3)), id="overlap-not-short"),
    ],
)
def test_parse_and_name_round_trip(text: str, view: View) -> None:
    assert parse_view(text) == view
    assert parse_view(view.name) == view
    assert parse_views(view.name) == (view,)


def test_a_grid_expands_into_its_tiles_row_by_row() -> None:
    assert [v.name for v in parse_views("tile:2x2")] == [
        "tile:2x2:r0c0",
        "tile:2x2:r0c1",
        "tile:2x2:r1c0",
        "tile:2x2:r1c1",
    ]
    flipped = expand_view("hflip+tile:3x3@0.1+scale:1.5")
    assert len(flipped) == 9 and all(v.hflip and v.scale == 1.5 and v.tile.overlap == 0.1 for v in flipped)
    assert {(v.tile.row, v.tile.col) for v in flipped} == {(r, c) for r in range(3) for c in range(3)}
    both = parse_views("default,tile:2x2,hflip+tile:2x2")
    assert len(both) == 8 + 4 + 4 and both[:8] == parse_views("default")
    assert parse_views("tile:2x2@0.25") == parse_views("tile:2x2")  # the default overlap, written out
    assert tuple(v.name for v in parse_views("default,tile:2x2")) == tuple(
        parse_view(v.name).name for v in parse_views("default,tile:2x2")
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("tile:0x2", "tile rows and columns must be in 1..16, got tile:0x2", id="no-rows"),
        pytest.param("tile:2x0", "tile rows and columns must be in 1..16, got tile:2x0", id="no-columns"),
        pytest.param("tile:17x2", "tile rows and columns must be in 1..16, got tile:17x2", id="too-many-rows"),
        pytest.param("tile:1x1", "tile:1x1 is the whole image: use identity", id="one-tile-grid"),
        pytest.param(
            "tile:2x2@1.5",
            "tile overlap must be in [0, 0.5] (a fraction of the tile side), got 1.5",
            id="overlap-above-1",
        ),
        pytest.param(
            "tile:2x2@0.6",
            "tile overlap must be in [0, 0.5] (a fraction of the tile side), got 0.6",
            id="overlap-above-max",
        ),
        pytest.param("tile:2x2@-0.1", "unknown view 'tile:2x2@-0.1'", id="negative-overlap"),
        pytest.param("tile:2x2@", "unknown view 'tile:2x2@'", id="overlap-without-number"),
        pytest.param("tile:2", "unknown view 'tile:2'", id="no-grid"),
        pytest.param("tile:2x2:r2c0", "tile r2c0 is outside a 2x2 grid", id="row-outside"),
        pytest.param("tile:2x3:r0c3", "tile r0c3 is outside a 2x3 grid", id="column-outside"),
        pytest.param("tile:2x2+tile:3x3", "view 'tile:2x2+tile:3x3' has two tilings", id="two-tilings"),
    ],
)
def test_bad_tile_specs_are_clear_value_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_views(text)


def test_a_grid_is_not_one_view_and_a_tile_listed_twice_is_refused() -> None:
    with pytest.raises(ValueError, match=re.escape("'tile:2x2' is 4 views (one per tile)")):
        parse_view("tile:2x2")
    with pytest.raises(ValueError, match="lists a view twice"):
        parse_views("tile:2x2,tile:2x2:r1c1")


# ----------------------------------------------------------------------------------------------------
# geometry


@pytest.mark.parametrize(
    ("length", "n", "overlap"),
    [
        pytest.param(512, 2, 0.25, id="512-halves"),
        pytest.param(512, 3, 0.25, id="512-thirds"),
        pytest.param(203, 3, 0.1, id="odd-length"),
        pytest.param(100, 3, 0.0, id="no-overlap-rounds-up"),
        pytest.param(1000, 7, 0.5, id="max-overlap"),
        pytest.param(97, 16, 0.2, id="many-small-tiles"),
        pytest.param(5, 4, 0.25, id="tiles-of-2-px"),
        pytest.param(640, 1, 0.25, id="one-span"),
    ],
)
def test_tile_spans_cover_the_length_exactly_with_the_requested_overlap(length: int, n: int, overlap: float) -> None:
    spans = tile_spans(length, n, overlap)
    assert len(spans) == n and all(isinstance(v, int) for s in spans for v in s)
    size = spans[0][1] - spans[0][0]
    assert all(end - start == size for start, end in spans), spans  # one size
    assert spans[0][0] == 0 and spans[-1][1] == length  # first at 0, last ends at the border
    assert size == min(length, math.ceil(length / (n - (n - 1) * overlap) - 1e-9))
    starts = [s for s, _ in spans]
    assert starts == sorted(starts)
    for (_, end), (start, _) in zip(spans[:-1], spans[1:], strict=True):
        assert end - start >= math.floor(overlap * size), (spans, overlap * size)  # at least the overlap asked
        assert end - start <= overlap * size + 3, (spans, overlap * size)  # and not much more
    covered = torch.zeros(length, dtype=torch.int64)
    for start, end in spans:
        covered[start:end] += 1
    assert bool((covered >= 1).all())


def test_tiles_of_a_grid_cover_the_image_and_stay_inside() -> None:
    count = torch.zeros(HEIGHT, WIDTH, dtype=torch.int64)
    for view in parse_views("tile:3x4@0.2"):
        x0, y0, x1, y1 = view.crop(height=HEIGHT, width=WIDTH)
        assert 0 <= x0 < x1 <= WIDTH and 0 <= y0 < y1 <= HEIGHT
        assert view.frame_size(height=HEIGHT, width=WIDTH) == (y1 - y0, x1 - x0)
        count[y0:y1, x0:x1] += 1
    assert bool((count >= 1).all()) and int(count.max()) == 4  # the overlaps of four tiles at inner corners


# ----------------------------------------------------------------------------------------------------
# exact inverses


def _boxes_inside(view: View, n: int, seed: int) -> torch.Tensor:
    """Random boxes ``[n, 4]`` in the original frame, well inside the view's tile."""
    g = torch.Generator().manual_seed(seed)
    x0, y0, x1, y1 = view.crop(height=HEIGHT, width=WIDTH)
    w, h = x1 - x0, y1 - y0
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5]) + torch.tensor([x0 + w * 0.1, y0 + h * 0.1])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 1
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("view", TILE_VIEWS)
def test_forward_then_invert_is_exact_for_boxes_and_keypoints(view: View) -> None:
    g = torch.Generator().manual_seed(1)
    boxes = torch.rand(9, 4, generator=g) * torch.tensor([WIDTH, HEIGHT, WIDTH, HEIGHT])  # anywhere, even outside
    boxes = torch.cat([boxes[:, :2].minimum(boxes[:, 2:]), boxes[:, :2].maximum(boxes[:, 2:])], dim=1)
    kps = torch.rand(9, 5, 3, generator=g) * torch.tensor([WIDTH, HEIGHT, 1.0])
    in_view = view.forward_boxes(boxes, width=WIDTH, height=HEIGHT)
    assert bool((in_view[:, 2] >= in_view[:, 0]).all())
    torch.testing.assert_close(view.invert_boxes(in_view, width=WIDTH, height=HEIGHT), boxes, rtol=0, atol=1e-4)
    kps_in_view = view.forward_keypoints(kps, width=WIDTH, height=HEIGHT, flip_index=FLIP_INDEX)
    back = view.invert_keypoints(kps_in_view, width=WIDTH, height=HEIGHT, flip_index=FLIP_INDEX)
    torch.testing.assert_close(back, kps, rtol=0, atol=1e-4)
    if view.hflip:  # the view's left hand is the original's right hand
        torch.testing.assert_close(kps_in_view[:, 1, 2], kps[:, 2, 2])
    # invert keeps boxes clear of the inner edges, exactly mapped back
    inside = _boxes_inside(view, 6, seed=2)
    det = Detections(boxes=view.forward_boxes(inside, width=WIDTH, height=HEIGHT), scores=torch.rand(6),
                     labels=torch.zeros(6, dtype=torch.int64))  # fmt: skip
    torch.testing.assert_close(view.invert(det, width=WIDTH, height=HEIGHT).boxes, inside, rtol=0, atol=1e-4)


@pytest.mark.parametrize("view", TILE_VIEWS)
def test_prepare_crops_the_tile_and_invert_maps_its_pixels_back(view: View) -> None:
    """The oracle is the pixels: a rectangle and a marked keypoint drawn in the image are found in the
    view's input, and the inverse maps what is found there back onto what was drawn."""
    x0, y0, x1, y1 = view.crop(height=HEIGHT, width=WIDTH)
    rect = [x0 + (x1 - x0) // 5, y0 + (y1 - y0) // 4, x0 + (x1 - x0) // 2, y0 + 2 * (y1 - y0) // 3]
    image = torch.zeros(3, HEIGHT, WIDTH)
    image[0, rect[1] : rect[3], rect[0] : rect[2]] = 1.0
    hand = (rect[0] + 3, rect[1] + 2)  # the figure's left hand (keypoint 1), pixel (col, row)
    image[1, hand[1], hand[0]] = 1.0
    prepared = view.prepare(image)
    assert tuple(prepared.shape[-2:]) == view.frame_size(height=HEIGHT, width=WIDTH) == (y1 - y0, x1 - x0)
    ys, xs = torch.nonzero(prepared[0] > 0.5, as_tuple=True)
    found = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    assert torch.equal(found, view.forward_boxes(torch.tensor([rect], dtype=torch.float32), width=WIDTH, height=HEIGHT))
    torch.testing.assert_close(
        view.invert_boxes(found, width=WIDTH, height=HEIGHT), torch.tensor([rect], dtype=torch.float32)
    )
    hy, hx = torch.nonzero(prepared[1] > 0.5, as_tuple=True)
    kps = torch.zeros(1, 5, 3)
    slot = FLIP_INDEX[1] if view.hflip else 1  # in a mirrored view the figure's left hand reads as its right
    kps[0, slot] = torch.tensor([float(hx[0]) + 0.5, float(hy[0]) + 0.5, 1.0])
    back = view.invert_keypoints(kps, width=WIDTH, height=HEIGHT, flip_index=FLIP_INDEX)
    torch.testing.assert_close(back[0, 1], torch.tensor([hand[0] + 0.5, hand[1] + 0.5, 1.0]))


@pytest.mark.parametrize("view", TILE_VIEWS)
def test_heatmaps_over_a_box_only_need_the_flip(view: View) -> None:
    """Heatmaps are box-relative: the argmax over the original box decodes to the keypoint inverse."""
    m = 8
    box = _boxes_inside(view, 1, seed=3)
    box_in_view = view.forward_boxes(box, width=WIDTH, height=HEIGHT)
    heat = torch.zeros(1, 5, m, m)
    cols = torch.tensor([1, 6, 2, 5, 3])
    heat[0, torch.arange(5), 4, cols] = 1.0
    bw = float(box_in_view[0, 2] - box_in_view[0, 0])
    x_view = box_in_view[0, 0] + (cols.float() + 0.5) * bw / m
    kps_view = torch.stack([x_view, torch.zeros(5), torch.ones(5)], dim=1)[None]
    expected = view.invert_keypoints(kps_view, width=WIDTH, height=HEIGHT, flip_index=FLIP_INDEX)[0, :, 0]
    col = view.invert_heatmaps(heat, flip_index=FLIP_INDEX)[0].reshape(5, -1).argmax(dim=1) % m
    got = box[0, 0] + (col.float() + 0.5) * float(box[0, 2] - box[0, 0]) / m
    torch.testing.assert_close(got, expected)


def test_views_without_tiles_do_not_move_or_drop_anything() -> None:
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [10.0, 20.0, 30.0, 40.0]])
    for view in parse_views("default"):
        assert bool(view.covers(boxes, width=WIDTH, height=HEIGHT).all())
        assert bool(view.clear_of_cuts(boxes, width=WIDTH, height=HEIGHT).all())
        assert view.crop(height=HEIGHT, width=WIDTH) == (0, 0, WIDTH, HEIGHT)


# ----------------------------------------------------------------------------------------------------
# objects cut by tile edges


def _scene_detector(images: list[torch.Tensor], *, min_frac: float = 0.0) -> list[Detections]:
    """A detector that sees every object of a scene (channel 0 holds object ``k`` as the value ``k / 10``)
    as the tight box of its visible pixels: a fragment where the image (a tile) cuts it. With ``min_frac``,
    it misses objects whose longer side is under that fraction of the image's longer side, as a detector
    at a fixed input size misses objects too small for it."""
    out = []
    for img in images:
        values = (img[0] * 10).round().long()
        boxes, labels = [], []
        for k in values.unique().tolist():
            if k == 0:
                continue
            ys, xs = torch.nonzero(values == k, as_tuple=True)
            box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
            if max(box[2] - box[0], box[3] - box[1]) >= min_frac * max(img.shape[-2:]):
                boxes.append(box)
                labels.append(k % 2)
        n = len(boxes)
        out.append(Detections(boxes=torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
                              scores=torch.full((n,), 0.9), labels=torch.tensor(labels, dtype=torch.int64)))  # fmt: skip
    return out


def _scene(objects: list[tuple[int, int, int, int]], height: int = 200, width: int = 200) -> torch.Tensor:
    image = torch.zeros(3, height, width)
    for k, (x1, y1, x2, y2) in enumerate(objects, start=1):
        image[0, y1:y2, x1:x2] = k / 10
    return image


# A 200 px image, tile:2x2 (overlap 0.25): tiles 115 px, spans 0..115 and 85..200, margin 2.3 px.
BORDER_CASES = [
    pytest.param((100, 30, 130, 50), id="across-the-vertical-inner-edges"),
    pytest.param((30, 90, 50, 120), id="across-the-horizontal-inner-edges"),
    pytest.param((90, 92, 110, 108), id="across-the-inner-corner-four-tiles"),
    pytest.param((95, 40, 114, 60), id="ends-within-the-margin-of-an-inner-edge"),
    pytest.param((0, 0, 20, 20), id="on-the-image-corner"),
    pytest.param((186, 100, 200, 110), id="on-the-image-border-in-the-overlap"),
]


@pytest.mark.parametrize("obj", BORDER_CASES)
@pytest.mark.parametrize("method", ["nms", "wbf", "vote"])  # soft-nms keeps decayed duplicates by design
@pytest.mark.parametrize("views", ["tile:2x2", "identity,hflip+tile:2x2"])
def test_an_object_on_a_tile_border_comes_out_once_after_invert_and_fusion(
    obj: tuple[int, int, int, int], method: str, views: str
) -> None:
    image = _scene([obj])
    per_view = []
    for view in parse_views(views):
        (pred,) = _scene_detector([view.prepare(image)])
        per_view.append(view.invert(pred, width=200, height=200))
    fused = fuse(per_view, method=method, iou_thr=0.5, skip_box_thr=0.0)
    fused = fused.select(fused.scores >= 0.05)
    assert len(fused) == 1, fused.boxes
    torch.testing.assert_close(fused.boxes[0], torch.tensor(obj, dtype=torch.float32))


def test_the_inner_edge_rule_drops_fragments_and_keeps_whole_objects() -> None:
    view = parse_view("tile:2x2:r0c0")  # 0..115 x 0..115; inner edges at x = 115 and y = 115
    margin = TILE_EDGE_MARGIN * 115
    boxes = torch.tensor(
        [
            [100.0, 30, 115, 50],  # a fragment cut by the right inner edge
            [100.0, 30, 115 - margin - 0.01, 50],  # whole, just clear of the margin
            [100.0, 30, 115 - margin + 0.01, 50],  # within the margin: dropped (the next tile sees it whole)
            [0.0, 0, 20, 20],  # on the image border: kept
            [30.0, 110, 50, 115],  # cut by the bottom inner edge
        ]
    )
    assert view.clear_of_cuts(boxes, width=200, height=200).tolist() == [False, True, False, True, False]
    last = parse_view("tile:2x2:r1c1")  # 85..200: its inner edges are x = 85 and y = 85
    assert last.clear_of_cuts(torch.tensor([[85.0, 150, 100, 160], [150.0, 150, 200, 200]]),
                              width=200, height=200).tolist() == [False, True]  # fmt: skip


def test_an_object_larger_than_the_overlap_is_seen_only_by_full_image_views() -> None:
    """The documented limit: cut in every tile, the object is dropped by all of them."""
    big = (40, 40, 160, 160)
    image = _scene([big])
    tiles = [v.invert(_scene_detector([v.prepare(image)])[0], width=200, height=200) for v in parse_views("tile:2x2")]
    assert sum(len(d) for d in tiles) == 0
    (whole,) = _scene_detector([image])
    fused = fuse([whole, *tiles], method="nms", iou_thr=0.5, skip_box_thr=0.0)
    assert fused.boxes.tolist() == [list(map(float, big))]


# ----------------------------------------------------------------------------------------------------
# end to end through label_images


def _box_meta(min_size: int = 64, max_size: int = 64) -> ModelMeta:
    return ModelMeta(model="small_fcos", task="boxes", class_names=("even", "odd"), category_ids=(1, 2),
                     min_size=min_size, max_size=max_size)  # fmt: skip


class _SceneDetector:
    """:func:`_scene_detector` (objects under 8% of the input's side missed) behind the Detector interface."""

    has_heatmaps = False
    max_det = 100

    def __init__(self, meta: ModelMeta) -> None:
        self.meta, self.spec = meta, "scene"

    def predict(self, images: Sequence[torch.Tensor]) -> list[Detections]:
        return _scene_detector(list(images), min_frac=0.08)

    def input_size(self, min_size: int, max_size: int) -> nullcontext[None]:
        return nullcontext()

    def unfit_reason(self, height: int, width: int, *, min_size: int, max_size: int) -> None:
        return None


def test_label_images_reports_a_small_object_near_a_tile_border_once() -> None:
    """A fake detector that misses objects under 8% of its input's side: on the whole 256 px image it finds
    only the large object; each tile of tile:2x2 (147 px, spans 0..147 and 109..256) magnifies the small
    object (12 px, across x = 147, the right edge of the left tiles) enough to see it. The left tiles see a
    fragment, which they drop; the right tiles see it whole. Out: each object once, at its true box."""
    small, large = (140, 30, 152, 42), (98, 98, 158, 158)  # the large one is cut in every tile
    image = _scene([small, large], height=256, width=256)
    detector = _SceneDetector(_box_meta())  # a stand-in Detector: label_images takes any
    (left_tile,) = _scene_detector([parse_view("tile:2x2:r0c0").prepare(image)], min_frac=0.08)
    assert [140.0, 30.0, 147.0, 42.0] in left_tile.boxes.tolist()  # a fragment that the rule must drop
    (plain,) = label_images(detector, [image], views=parse_views("identity,hflip"), fuse="nms")
    assert plain.boxes.tolist() == [list(map(float, large))]  # the small object is missed without tiles
    for fusion in ("nms", "wbf"):
        (tiled,) = label_images(detector, [image], views=parse_views("identity,hflip,tile:2x2,hflip+tile:2x2"),
                                fuse=fusion, score_floor=0.05)  # fmt: skip
        order = tiled.boxes[:, 0].argsort(descending=True)
        assert tiled.boxes[order].tolist() == [list(map(float, small)), list(map(float, large))], fusion
        assert tiled.agreement[order].tolist() == [2, 2]  # small: the top right tile and its flip; large: 2 full views


class _ResizingDetector:
    """Only what :func:`unfit_reason` asks: torchvision's resize rule, and the sizes it was asked about."""

    def __init__(self) -> None:
        self.meta, self.asked = _box_meta(64, 64), []

    def unfit_reason(self, height: int, width: int, *, min_size: int, max_size: int) -> str | None:
        self.asked.append((height, width))
        h, w = resized_size(height, width, min_size=min_size, max_size=max_size)
        return None if h >= 1 and w >= 1 else f"would resize it to {w}x{h} px"


def test_unfit_reason_checks_the_tile_crop() -> None:
    detector = _ResizingDetector()
    assert unfit_reason(detector, 40, 2000, views=parse_views("identity")) is None  # 2000x40 resizes to 64x1
    reason = unfit_reason(detector, 40, 2000, views=parse_views("identity,tile:16x1"))
    assert (
        reason
        == "2000x40 px is too elongated for the model: view tile:16x1:r0c0 (its 2000x4 px tile) would resize it to 64x0 px"
    )
    assert detector.asked == [(40, 2000), (40, 2000), (4, 2000)]


# ----------------------------------------------------------------------------------------------------
# heatmap keypoint fusion


class _HeatDetector:
    """A keypoint detector whose heatmaps over every box of a view carry that view's input width: the fused
    keypoint score (the mean heatmap, decoded) is the mean input width of the views that contributed."""

    def __init__(self) -> None:
        self.meta = ModelMeta(model="fake", task="keypoints", class_names=("figure",), category_ids=(1,),
                              keypoint_names=("head", "left_hand", "right_hand", "left_foot", "right_foot"),
                              flip_index=FLIP_INDEX, sigmas=(0.05,) * 5, min_size=64, max_size=64)  # fmt: skip
        self.spec = "fake"
        self.calls: list[int] = []

    def input_size(self, min_size: int, max_size: int) -> Any:
        return nullcontext()

    @property
    def has_heatmaps(self) -> bool:
        return True

    def heatmaps(self, images: list[torch.Tensor], boxes: list[torch.Tensor]) -> list[torch.Tensor]:
        self.calls += [len(b) for b in boxes]
        return [torch.full((len(b), 5, 4, 4), float(img.shape[-1])) for img, b in zip(images, boxes, strict=True)]

    def keypoints_from_heatmaps(self, heatmaps: torch.Tensor, boxes: torch.Tensor, *, image_size: Any) -> torch.Tensor:
        centre = (boxes[:, None, :2] + boxes[:, None, 2:]) / 2
        return torch.cat([centre.expand(-1, 5, 2), heatmaps.mean(dim=(2, 3))[..., None]], dim=-1)


def _keypoint_dets(boxes: list[list[float]]) -> Detections:
    n = len(boxes)
    return Detections(boxes=torch.tensor(boxes), scores=torch.full((n,), 0.9), labels=torch.zeros(n, dtype=torch.int64),
                      keypoints=torch.full((n, 5, 3), -1.0), agreement=torch.ones(n, dtype=torch.int64))  # fmt: skip


def test_tile_views_give_heatmaps_only_for_boxes_inside_their_tile() -> None:
    detector = _HeatDetector()
    image = torch.zeros(3, 200, 200)  # tile:2x2 tiles: 115 px wide, spans 0..115 and 85..200
    dets = _keypoint_dets([[10.0, 10, 40, 40], [90, 90, 110, 110], [60, 10, 150, 60]])  # 1 tile, 4 tiles, none
    views = parse_views("identity,tile:2x2")
    (out,) = fuse_heatmaps(detector, [image], [dets], views, timer=LabelTimer())
    scores = out.keypoints[:, 0, 2].tolist()
    assert scores == [(200 + 115) / 2, (200 + 4 * 115) / 5, 200.0]  # averaged over the views that contributed
    assert detector.calls == [3, 2, 1, 1, 1]  # identity: all; r0c0: boxes 0 and 1; r0c1, r1c0, r1c1: box 1
    (alone,) = fuse_heatmaps(detector, [image], [dets], parse_views("tile:2x2"), timer=LabelTimer())
    assert alone.keypoints[:2, 0, 2].tolist() == [115.0, 115.0]
    assert alone.keypoints[2].tolist() == dets.keypoints[2].tolist()  # seen by no view: its fused mean keypoints


def test_heatmap_fusion_without_tiles_averages_every_view() -> None:
    detector = _HeatDetector()
    image = torch.zeros(3, 100, 120)
    dets = _keypoint_dets([[10.0, 10, 40, 40], [50, 20, 110, 90]])
    (out,) = fuse_heatmaps(detector, [image], [dets], parse_views("identity,hflip"), timer=LabelTimer())
    assert out.keypoints[:, :, 2].unique().tolist() == [120.0]
    assert detector.calls == [2, 2]


def test_default_tile_overlap_is_documented_in_the_names() -> None:
    assert "@" not in Tile(2, 2, 0, 0).name and Tile(2, 2, 0, 0).overlap == DEFAULT_TILE_OVERLAP
    assert Tile(2, 2, 0, 0, 0.1).name == "tile:2x2@0.1:r0c0"
