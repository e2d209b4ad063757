"""Views: parsing, and exact inverses for every view and composition (boxes, keypoints, heatmaps)."""

from __future__ import annotations

import re

import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from datadistill.core.types import Detections
from datadistill.core.views import PAPER_SCALES, Tile, View, parse_view, parse_views

FLIP_INDEX = (0, 2, 1, 4, 3)  # head, left_hand, right_hand, left_foot, right_foot

VIEWS = [
    pytest.param("identity", View(), id="identity"),
    pytest.param("hflip", View(hflip=True), id="hflip"),
    pytest.param("scale:0.75", View(scale=0.75), id="scale-down"),
    pytest.param("scale:1.5", View(scale=1.5), id="scale-up"),
    pytest.param("hflip+scale:0.75", View(hflip=True, scale=0.75), id="hflip-then-scale"),
    pytest.param("scale:1.25+hflip", View(hflip=True, scale=1.25), id="scale-then-hflip"),
]
TILE_VIEWS = [
    pytest.param("tile:2x2:r0c1", View(tile=Tile(2, 2, 0, 1)), id="tile"),
    pytest.param(
        "tile:3x2@0.1:r2c0+hflip+scale:1.5",
        View(hflip=True, scale=1.5, tile=Tile(3, 2, 2, 0, 0.1)),
        id="tile-overlap-flip-scale",
    ),
]


@pytest.mark.parametrize(("text", "view"), VIEWS + TILE_VIEWS)
def test_parse_view(text: str, view: View) -> None:
    assert parse_view(text) == view
    assert parse_view(view.name) == view


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("rotate", "unknown view 'rotate'", id="unknown"),
        pytest.param("scale:", "unknown view 'scale:'", id="scale-without-number"),
        pytest.param("scale:0", "view scale must be in", id="scale-zero"),
        pytest.param("scale:100", "view scale must be in [0.05, 8.0], got 100.0", id="scale-huge"),
        pytest.param("hflip+hflip", "flips twice", id="double-flip"),
        pytest.param("scale:1+scale:2", "two scales", id="two-scales"),
        pytest.param("tile:0x2", "tile rows and columns must be in 1..16, got tile:0x2", id="tile-no-rows"),
        pytest.param(
            "tile:2x2@1.5",
            "tile overlap must be in [0, 0.5] (a fraction of the tile side), got 1.5",
            id="tile-overlap-too-big",
        ),
        pytest.param("tile:2x2", "'tile:2x2' is 4 views (one per tile)", id="tile-grid-is-not-one-view"),
        pytest.param("tile:2x2:r0c2", "tile r0c2 is outside a 2x2 grid", id="tile-outside-grid"),
    ],
)
def test_bad_views(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_view(text)


def test_view_lists() -> None:
    paper = parse_views("paper")
    assert len(paper) == 18 and len(set(paper)) == 18
    assert sorted({v.scale * 800 for v in paper}) == pytest.approx([400, 500, 600, 700, 800, 900, 1000, 1100, 1200])
    assert tuple(sorted(PAPER_SCALES)) == PAPER_SCALES
    default = parse_views("default")
    assert default[0] == View() and {v.hflip for v in default} == {False, True}
    assert len(default) == 2 * len({v.scale for v in default}) == 8
    assert {v.scale for v in default} == {0.75, 1.0, 1.25, 1.5}
    assert parse_views("identity, hflip+scale:0.5") == (View(), View(hflip=True, scale=0.5))
    with pytest.raises(ValueError, match="lists a view twice"):
        parse_views("hflip,hflip")
    tiled = parse_views("default, tile:2x2")
    assert tiled[:8] == default and [v.tile.name for v in tiled[8:]] == [
        f"tile:2x2:r{r}c{c}" for r in (0, 1) for c in (0, 1)
    ]


def _random_detections(n: int, width: int, height: int, k: int = 5, seed: int = 0) -> Detections:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([width * 0.3, height * 0.3]) + 1
    kps = torch.rand(n, k, 3, generator=g) * torch.tensor([width, height, 1.0])
    return Detections(
        boxes=torch.cat([xy, xy + wh], dim=1),
        scores=torch.rand(n, generator=g),
        labels=torch.randint(0, 3, (n,), generator=g),
        keypoints=kps,
    )


@pytest.mark.parametrize(("text", "view"), VIEWS)
def test_forward_then_invert_is_exact(text: str, view: View) -> None:
    width, height = 97, 64
    det = _random_detections(7, width, height)
    in_view = Detections(
        boxes=view.forward_boxes(det.boxes, width=width, height=height),
        scores=det.scores,
        labels=det.labels,
        # into the view: a flip mirrors x and swaps sides, which is its own inverse
        keypoints=view.invert_keypoints(det.keypoints, width=width, height=height, flip_index=FLIP_INDEX),
    )
    back = view.invert(in_view, width=width, height=height, flip_index=FLIP_INDEX)
    torch.testing.assert_close(back.boxes, det.boxes, rtol=0, atol=1e-5)
    torch.testing.assert_close(back.keypoints, det.keypoints, rtol=0, atol=1e-5)
    assert torch.equal(back.labels, det.labels) and torch.equal(back.scores, det.scores)
    assert (back.boxes[:, 2] > back.boxes[:, 0]).all()


def test_flip_swaps_left_and_right_keypoints() -> None:
    # A figure facing the viewer: its left hand is on the image's right.
    width = 100
    kps = torch.tensor([[[50.0, 10, 1], [80, 40, 1], [20, 40, 1], [70, 90, 1], [30, 90, 1]]])
    view = View(hflip=True)
    mirrored_image_kps = view.invert_keypoints(kps, width=width, height=width, flip_index=FLIP_INDEX)
    # In the mirrored image the figure's own left hand is again on the image's right: same positions.
    torch.testing.assert_close(mirrored_image_kps, kps)
    without_swap = kps.clone()
    without_swap[..., 0] = width - without_swap[..., 0]
    assert not torch.allclose(without_swap, kps)  # a flip without the swap would be wrong


@pytest.mark.parametrize(("text", "view"), VIEWS + TILE_VIEWS)
def test_heatmap_inverse_matches_keypoint_inverse(text: str, view: View) -> None:
    # The argmax of an un-flipped heatmap over the original box equals the keypoint inverse.
    m, width = 8, 64
    box = torch.tensor([[8.0, 4.0, 40.0, 36.0]])
    box_in_view = view.forward_boxes(box, width=width, height=width)
    heat = torch.zeros(1, 5, m, m)
    cols = torch.tensor([1, 6, 2, 5, 3])
    heat[0, torch.arange(5), 4, cols] = 1.0
    bw = float(box_in_view[0, 2] - box_in_view[0, 0])
    x_view = box_in_view[0, 0] + (cols.float() + 0.5) * bw / m
    kps_view = torch.stack([x_view, torch.zeros(5), torch.ones(5)], dim=1)[None]
    expected = view.invert_keypoints(kps_view, width=width, height=width, flip_index=FLIP_INDEX)[0, :, 0]
    back = view.invert_heatmaps(heat, flip_index=FLIP_INDEX)
    col = back[0].reshape(5, -1).argmax(dim=1) % m
    got = box[0, 0] + (col.float() + 0.5) * float(box[0, 2] - box[0, 0]) / m
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("scale", [0.5, 0.75, 1.0, 1.3, 2.0])
def test_scale_views_change_the_model_input_not_the_frame(scale: float) -> None:
    """torchvision resizes each input to min_size; a scale view changes min_size, and postprocess maps
    boxes found in the resized image back to the original frame exactly."""
    transform = GeneralizedRCNNTransform(min_size=64, max_size=96, image_mean=[0.0] * 3, image_std=[1.0] * 3).eval()
    image = torch.zeros(3, 60, 80)
    image[:, 12:36, 20:52] = 1.0  # a bright rectangle: x 20..52, y 12..36
    min_size, max_size = View(scale=scale).input_size(64, 96)
    transform.min_size, transform.max_size = (min_size,), max_size
    batch, _ = transform([image])
    resized = batch.tensors[0, 0, : batch.image_sizes[0][0], : batch.image_sizes[0][1]]
    assert min(resized.shape) == pytest.approx(min(min_size, max_size * 60 / 80), abs=1)
    ys, xs = torch.nonzero(resized > 0.5, as_tuple=True)
    found = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    out = transform.postprocess([{"boxes": found}], batch.image_sizes, [(60, 80)])
    # The detection at any scale lands on the rectangle in the original frame (within a resized pixel).
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[20.0, 12.0, 52.0, 36.0]]), rtol=0, atol=1 / scale + 0.01)
