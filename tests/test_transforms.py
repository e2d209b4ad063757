"""Transforms that own their inverses: round trips for every transform and composition (boxes, points,
keypoints with the flip map, heatmaps, images), and the oracles that tie them together (a box is its
corners, a keypoint follows the pixel it marks, training's flip is the views' flip)."""

from __future__ import annotations

import re

import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from datadistill.core.transforms import Crop, HFlip, Resize, Transform, Transforms, swap_sides
from datadistill.core.views import View, model_resize, parse_view
from datadistill.data.dataset import Augmentation, apply_augmentation

H, W = 64, 97
FLIP_INDEX = (0, 2, 1, 4, 3)  # head, left_hand, right_hand, left_foot, right_foot
CROP = Crop(10, 5, 70, 50, height=H, width=W)

TRANSFORMS = [
    pytest.param(Transforms(), id="identity"),
    pytest.param(HFlip(W), id="hflip"),
    pytest.param(Resize(H, W, 48, 130), id="resize-x-up-y-down"),
    pytest.param(CROP, id="crop"),
    pytest.param(CROP.inverse(), id="pad"),
    pytest.param(Transforms((CROP, HFlip(60))), id="crop-then-hflip (a flipped tile view)"),
    pytest.param(Transforms((CROP, HFlip(60), Resize(45, 60, 90, 120))), id="crop-hflip-resize (a view and the model)"),
    pytest.param(
        Transforms((Resize(H, W, 128, 194), Crop(3, 7, 100, 70, height=128, width=194), HFlip(97))),
        id="resize-crop-hflip (training's order)",
    ),  # fmt: skip
    pytest.param(Transforms((HFlip(W), HFlip(W))), id="two-flips-cancel"),
]


def _boxes(n: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([W * 0.7, H * 0.7])
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 20 + 1], dim=1)


def _keypoints(n: int = 9, seed: int = 0) -> torch.Tensor:
    """``[n, 5, 3]``: x, y, and a tag naming the channel (which side a keypoint is on travels with it)."""
    g = torch.Generator().manual_seed(seed)
    kps = torch.rand(n, 5, 3, generator=g) * torch.tensor([W, H, 0.0])
    kps[..., 2] = torch.arange(5.0)
    return kps


@pytest.mark.parametrize("t", TRANSFORMS)
def test_inverse_maps_boxes_points_keypoints_and_heatmaps_back(t: Transform) -> None:
    boxes, kps = _boxes(), _keypoints()
    torch.testing.assert_close(t.inverse().apply_box(t.apply_box(boxes)), boxes, rtol=0, atol=1e-4)
    torch.testing.assert_close(t.inverse().apply_coords(t.apply_coords(kps[..., :2])), kps[..., :2], rtol=0, atol=1e-4)
    back = t.inverse().apply_keypoints(t.apply_keypoints(kps, flip_index=FLIP_INDEX), flip_index=FLIP_INDEX)
    torch.testing.assert_close(back, kps, rtol=0, atol=1e-4)  # the tags too: sides swapped back
    heat = torch.randn(9, 5, 7, 7)
    assert torch.equal(t.inverse().apply_heatmap(t.apply_heatmap(heat, flip_index=FLIP_INDEX), flip_index=FLIP_INDEX),
                       heat)  # fmt: skip


@pytest.mark.parametrize("t", TRANSFORMS)
def test_a_box_is_its_corners(t: Transform) -> None:
    """apply_box agrees with the corners through apply_coords (detectron2's definition of a box transform)."""
    boxes = _boxes()
    corners = t.apply_coords(boxes.reshape(-1, 2, 2))  # [N, 2 corners, xy]
    expected = torch.cat([corners.amin(dim=1), corners.amax(dim=1)], dim=1)
    torch.testing.assert_close(t.apply_box(boxes), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("t", [p for p in TRANSFORMS if "resize" not in p.id and p.id != "pad"])
def test_a_point_follows_the_pixel_it_marks(t: Transform) -> None:
    """A lit pixel's centre goes where the image puts the pixel (exactly: no resampling in flips and crops)."""
    image = torch.zeros(2, 3, H, W)  # a batch
    xs, ys = torch.tensor([12, 40, 69]), torch.tensor([6, 30, 49])
    image[:, :, ys, xs] = torch.tensor([1.0, 2.0, 3.0])
    out = t.apply_image(image)
    assert out.shape[:2] == (2, 3)
    centres = t.apply_coords(torch.stack([xs + 0.5, ys + 0.5], dim=1))
    for (x, y), value in zip(centres.tolist(), (1.0, 2.0, 3.0), strict=True):
        assert out[:, :, int(y), int(x)].eq(value).all()
    if all(not isinstance(s, Resize) for s in getattr(t, "steps", (t,))):
        assert torch.equal(t.inverse().apply_image(out)[..., 5:50, 10:70], image[..., 5:50, 10:70])


def test_resize_image_is_bilinear_and_points_follow_it() -> None:
    image = torch.zeros(3, 8, 8)
    image[:, 2:6, 4:8] = 1.0  # a block x 4..8, y 2..6
    t = Resize(8, 8, 16, 24)
    out = t.apply_image(image)
    assert out.shape == (3, 16, 24)
    ys, xs = torch.nonzero(out[0] > 0.5, as_tuple=True)
    found = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    torch.testing.assert_close(found, t.apply_box(torch.tensor([[4.0, 2, 8, 6]])))  # [[12, 4, 24, 12]]


def test_keypoint_flip_swaps_sides_through_the_flip_map() -> None:
    # A figure facing the viewer: its left hand on the image's right. Mirrored, its left hand is again on
    # the right: the same positions, each channel still the same body part.
    kps = torch.tensor([[[50.0, 10, 1], [80, 40, 1], [20, 40, 1], [70, 90, 1], [30, 90, 1]]])
    torch.testing.assert_close(HFlip(100).apply_keypoints(kps, flip_index=FLIP_INDEX), kps)
    assert torch.equal(HFlip(100).apply_coords(kps[0, :, :2])[:, 0], 100 - kps[0, :, 0])  # no swap for bare points


def test_the_inverse_swap_undoes_any_permutation() -> None:
    """The inverse is not assumed to be the forward transform: a flip map that is not made of pairs (a
    3-cycle) still comes back."""
    cycle = (1, 2, 0)
    kps = torch.arange(3.0)[None, :, None].expand(1, 3, 3).clone()
    once = HFlip(10).apply_keypoints(kps, flip_index=cycle)
    assert once[0, :, 2].tolist() == [1.0, 2.0, 0.0]
    assert HFlip(10).inverse().apply_keypoints(once, flip_index=cycle)[0, :, 2].tolist() == [0.0, 1.0, 2.0]
    assert HFlip(10).apply_keypoints(once, flip_index=cycle)[0, :, 2].tolist() == [2.0, 0.0, 1.0]  # not an undo


@pytest.mark.parametrize(
    ("flip_index", "message"),
    [
        pytest.param((0, 2, 1), "flip_index has 3 entries but keypoints have K=5", id="wrong-length"),
        pytest.param((0, 1, 1, 3, 4), "flip_index must be a permutation of 0..4, got (0, 1, 1, 3, 4)", id="repeat"),
        pytest.param((0, 2, 1, 4, 5), "must be a permutation of 0..4", id="out-of-range"),
    ],
)
def test_bad_flip_maps(flip_index: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        swap_sides(_keypoints(), flip_index)


def test_flip_of_rows_from_images_of_several_widths() -> None:
    widths = torch.tensor([100.0, 50.0])
    boxes = torch.tensor([[10.0, 1, 30, 2], [0.0, 3, 50, 4]])
    assert HFlip(widths).apply_box(boxes).tolist() == [[70.0, 1, 90, 2], [0.0, 3, 50, 4]]
    kps = torch.tensor([[[10.0, 1, 9], [20, 2, 8]], [[5.0, 3, 7], [50, 4, 6]]])
    assert HFlip(widths).apply_keypoints(kps, flip_index=(1, 0)).tolist() == [
        [[80.0, 2, 8], [90, 1, 9]],
        [[0.0, 4, 6], [45, 3, 7]],
    ]


def test_flipped_heatmap_is_the_flipped_image_of_the_map() -> None:
    heat = torch.randn(4, 5, 6, 6)
    expected = HFlip(6).apply_image(heat)[:, list(FLIP_INDEX)]
    assert torch.equal(HFlip(6).apply_heatmap(heat, flip_index=FLIP_INDEX), expected)
    for t in (CROP, Resize(H, W, 10, 10), CROP.inverse()):  # box-relative: a crop or resize leaves the map
        assert t.apply_heatmap(heat, flip_index=FLIP_INDEX) is heat


@pytest.mark.parametrize(
    ("t", "image", "message"),
    [
        pytest.param(
            HFlip(W), torch.zeros(3, H, W + 1), "HFlip of a frame 97 px wide got an image 98 px wide", id="flip-width"
        ),  # fmt: skip
        pytest.param(CROP, torch.zeros(3, H + 1, W), "Crop of a 64x97 frame got an image (65, 97)", id="crop-size"),
        pytest.param(CROP.inverse(), torch.zeros(3, H, W), "Pad of a 45x60 frame got an image (64, 97)", id="pad-size"),
    ],
)
def test_images_of_the_wrong_size(t: Transform, image: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        t.apply_image(image)


def test_crop_outside_the_frame() -> None:
    with pytest.raises(ValueError, match=re.escape("part (0, 0, 98, 10) is not inside a 64x97 frame")):
        Crop(0, 0, 98, 10, height=H, width=W)


@pytest.mark.parametrize("text", ["identity", "hflip", "tile:2x2:r1c0", "hflip+tile:3x2@0.1:r0c1+scale:1.5"])
def test_a_view_is_its_transforms(text: str) -> None:
    """The view's prepare/forward/invert are its composition of transforms and the composition's inverse."""
    view = parse_view(text)
    t = view.transforms(height=H, width=W)
    assert len(t.steps) == (view.tile is not None) + view.hflip
    boxes, kps, image = _boxes(), _keypoints(), torch.rand(3, H, W)
    assert torch.equal(view.prepare(image), t.apply_image(image))
    assert torch.equal(view.forward_boxes(boxes, width=W, height=H), t.apply_box(boxes))
    assert torch.equal(view.invert_boxes(boxes, width=W, height=H), t.inverse().apply_box(boxes))
    fwd = view.forward_keypoints(kps, width=W, height=H, flip_index=FLIP_INDEX)
    assert torch.equal(fwd, t.apply_keypoints(kps, flip_index=FLIP_INDEX))
    torch.testing.assert_close(view.invert_keypoints(fwd, width=W, height=H, flip_index=FLIP_INDEX), kps, rtol=0,
                               atol=1e-4)  # fmt: skip


def test_training_flip_is_the_views_flip() -> None:
    """apply_augmentation's flip gives what the hflip view gives: image, boxes and keypoints (sides swapped)."""
    image, boxes, kps = torch.rand(3, H, W), _boxes(), _keypoints()
    img, bxs, out = apply_augmentation(image, boxes, kps, Augmentation(flip=True), flip_index=FLIP_INDEX)
    view = View(hflip=True)
    assert torch.equal(img, view.prepare(image))
    assert torch.equal(bxs, view.forward_boxes(boxes, width=W, height=H))
    assert torch.equal(out, view.forward_keypoints(kps, width=W, height=H, flip_index=FLIP_INDEX))
    assert out[0, :, 2].tolist() == [0.0, 2.0, 1.0, 4.0, 3.0]


@pytest.mark.parametrize("scale", [0.5, 1.0, 1.5])
def test_model_resize_is_torchvisions_resize_and_its_inverse_the_postprocess(scale: float) -> None:
    view = View(scale=scale)
    min_size, max_size = view.input_size(64, 96)
    transform = GeneralizedRCNNTransform(min_size, max_size, image_mean=[0.0] * 3, image_std=[1.0] * 3).eval()
    batch, _ = transform([torch.rand(3, 60, 80)])
    resize = model_resize(60, 80, min_size=min_size, max_size=max_size)
    assert (resize.new_height, resize.new_width) == tuple(batch.image_sizes[0])
    found = _boxes() * 0.5
    (out,) = transform.postprocess([{"boxes": found}], batch.image_sizes, [(60, 80)])
    torch.testing.assert_close(resize.inverse().apply_box(found), out["boxes"], rtol=1e-6, atol=1e-5)
