"""Property tests of the geometry, the views and the fusion, over hostile and extreme inputs.

Invalid values raise ValueError with the value in the message; valid ones, however extreme (empty, one
box, identical boxes, zero-size boxes, coordinates from 1e-6 to 1e6 px), keep the invariants: scores in
[0, 1], boxes inside the image after inversion, fusion independent of the order of the views.
(tests/test_fusion.py checks parity with ensemble-boxes and sanity over moderate scenes.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from datadistill.core import fusion
from datadistill.core.types import Detections
from datadistill.core.views import MAX_SCALE, MIN_SCALE, View, parse_view, resized_size
from datadistill.data.dataset import MIN_BOX_SIDE_PX, apply_augmentation, draw_augmentation, sanitize

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
METHODS = ("nms", "soft-nms", "vote", "wbf")


def _in_message(value: object, message: str) -> bool:
    return repr(value) in message or str(value) in message


# ---------------------------------------------------------------------------------------------------------
# views

bad_scales = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0]),
    st.floats(max_value=MIN_SCALE, exclude_max=True, allow_nan=False),
    st.floats(min_value=MAX_SCALE, exclude_min=True, allow_nan=False),
)


@FAST
@given(bad_scales)
def test_a_view_with_an_invalid_scale_names_it(scale: float) -> None:
    with pytest.raises(ValueError) as info:
        View(scale=scale)
    assert _in_message(scale, str(info.value))


@FAST
@given(st.text(max_size=30))
def test_parse_view_gives_a_view_or_a_value_error_naming_the_text(text: str) -> None:
    try:
        view = parse_view(text)
    except ValueError as exc:
        assert repr(text) in str(exc) or repr(text.strip()) in str(exc) or "scale" in str(exc)
    else:
        assert MIN_SCALE <= view.scale <= MAX_SCALE


@st.composite
def framed_boxes(draw: st.DrawFn) -> tuple[int, int, torch.Tensor]:
    """An image size and boxes inside it, at scales from a 1 px image to a 10^6 px one; some degenerate."""
    width = draw(st.integers(1, 10**6))
    height = draw(st.integers(1, 10**6))
    n = draw(st.integers(0, 6))
    xs = draw(st.lists(st.floats(0, 1), min_size=2 * n, max_size=2 * n))
    ys = draw(st.lists(st.floats(0, 1), min_size=2 * n, max_size=2 * n))
    rows = []
    for i in range(n):
        x1, x2 = sorted(xs[2 * i : 2 * i + 2])
        y1, y2 = sorted(ys[2 * i : 2 * i + 2])
        rows.append([x1 * width, y1 * height, x2 * width, y2 * height])
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return width, height, torch.tensor(rows, dtype=dtype).reshape(-1, 4)


@FAST
@given(framed_boxes(), st.booleans(), st.floats(MIN_SCALE, MAX_SCALE))
def test_inverted_boxes_stay_in_the_image_and_a_flip_undoes_itself(
    framed: tuple[int, int, torch.Tensor], hflip: bool, scale: float
) -> None:
    width, height, boxes = framed
    view = View(hflip=hflip, scale=scale)
    back = view.invert_boxes(boxes, width=width, height=height)
    assert back.shape == boxes.shape and back.dtype == boxes.dtype
    assert bool((back[:, 0] >= 0).all() and (back[:, 2] <= width).all()), back
    assert bool((back[:, 1] >= 0).all() and (back[:, 3] <= height).all()), back
    assert bool((back[:, 2] >= back[:, 0]).all() and (back[:, 3] >= back[:, 1]).all())
    ulp = width * float(torch.finfo(boxes.dtype).eps)
    torch.testing.assert_close(view.forward_boxes(back, width=width, height=height), boxes, rtol=0, atol=2 * ulp)


@st.composite
def involutions(draw: st.DrawFn) -> tuple[int, ...]:
    """A flip map: disjoint left/right pairs, the rest map to themselves."""
    k = draw(st.integers(1, 17))
    order = draw(st.permutations(list(range(k))))
    pairs = draw(st.integers(0, k // 2))
    index = list(range(k))
    for a, b in zip(order[: 2 * pairs : 2], order[1 : 2 * pairs : 2], strict=True):
        index[a], index[b] = b, a
    return tuple(index)


@FAST
@given(involutions(), st.integers(1, 4096), st.integers(0, 5), st.data())
def test_keypoints_and_heatmaps_flip_back_exactly(flip_index: tuple[int, ...], width: int, n: int, data) -> None:  # noqa: ANN001
    k = len(flip_index)
    xy = data.draw(st.lists(st.floats(0, 1), min_size=n * k * 2, max_size=n * k * 2))
    kps = torch.zeros(n, k, 3, dtype=torch.float64)
    kps[..., :2] = torch.tensor(xy, dtype=torch.float64).reshape(n, k, 2) * width
    kps[..., 2] = torch.arange(k, dtype=torch.float64)  # tags which channel went where
    view = View(hflip=True)
    once = view.invert_keypoints(kps, width=width, height=width, flip_index=flip_index)
    assert bool((once[..., 0] >= 0).all() and (once[..., 0] <= width).all())
    assert once[..., 2].tolist() == kps[..., 2][:, list(flip_index)].tolist()  # left and right swapped
    torch.testing.assert_close(view.invert_keypoints(once, width=width, height=width, flip_index=flip_index), kps, rtol=0,
                               atol=2 * width * float(torch.finfo(torch.float64).eps))  # fmt: skip
    heat = torch.randn(n, k, 5, 5)
    assert torch.equal(view.invert_heatmaps(view.invert_heatmaps(heat, flip_index=flip_index), flip_index=flip_index),
                       heat)  # fmt: skip
    if k > 1:
        with pytest.raises(ValueError, match=f"K={k}"):
            view.invert_keypoints(kps, width=width, height=width, flip_index=flip_index[:-1])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2000), st.integers(1, 2000), st.integers(1, 256), st.integers(1, 512))
def test_resized_size_is_what_torchvision_does(height: int, width: int, min_size: int, max_size: int) -> None:
    """The oracle is torchvision's own transform: a 0 px side is exactly where torch raises."""
    assume(min_size <= max_size)
    transform = GeneralizedRCNNTransform(min_size, max_size, [0.0] * 3, [1.0] * 3).eval()
    expected = resized_size(height, width, min_size=min_size, max_size=max_size)
    try:
        image, _ = transform.resize(torch.zeros(1, height, width), None)
    except RuntimeError:
        assert 0 in expected
    else:
        assert tuple(image.shape[-2:]) == expected


@pytest.mark.parametrize(("height", "width"), [(0, 5), (5, 0), (-1, 3)])
def test_resized_size_refuses_an_empty_image_naming_it(height: int, width: int) -> None:
    with pytest.raises(ValueError, match=f"{height}x{width}"):
        resized_size(height, width, min_size=64, max_size=64)


# ---------------------------------------------------------------------------------------------------------
# training geometry


@FAST
@given(st.integers(2, 48), st.integers(2, 48), st.floats(0.25, 3.0), st.floats(0, 1), st.integers(0, 2**31), st.data())
def test_augmented_and_sanitized_boxes_lie_in_the_image(
    height: int, width: int, scale: float, flip_prob: float, seed: int, data
) -> None:  # noqa: ANN001
    framed = data.draw(framed_boxes())
    _, _, unit = framed
    boxes = (unit.double() / torch.tensor([framed[0], framed[1], framed[0], framed[1]])).float()
    boxes = boxes * torch.tensor([width, height, width, height], dtype=torch.float32)
    kps = torch.cat([boxes[:, None, :2], torch.full((len(boxes), 1, 1), 2.0)], dim=2).repeat(1, 2, 1)
    aug = draw_augmentation(np.random.default_rng(seed), height=height, width=width, min_scale=min(scale, 1.0),
                            max_scale=max(scale, 1.0), flip_prob=flip_prob)  # fmt: skip
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    out_image, out_boxes, out_kps = apply_augmentation(image, boxes, kps, aug, flip_index=(1, 0))
    assert tuple(out_image.shape) == (3, height, width)
    b, _, k = sanitize(out_boxes, torch.zeros(len(out_boxes), dtype=torch.int64), out_kps, height=height, width=width)
    assert bool(
        (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= width).all() and (b[:, 3] <= height).all()
    )
    assert bool(((b[:, 2] - b[:, 0]) >= MIN_BOX_SIDE_PX).all() and ((b[:, 3] - b[:, 1]) >= MIN_BOX_SIDE_PX).all())
    assert k is not None and len(k) == len(b)
    visible = k[..., 2] > 0
    assert bool((k[..., 0][visible] <= width).all() and (k[..., 1][visible] <= height).all())
    assert bool((k[..., :2][visible] >= 0).all()) and bool((k[~visible] == 0).all())


# ---------------------------------------------------------------------------------------------------------
# fusion: invalid values


def _one_view(box: list[float], score: float = 0.5) -> list[Detections]:
    return [Detections(torch.tensor([box], dtype=torch.float64), torch.tensor([score], dtype=torch.float64),
                       torch.tensor([0]))]  # fmt: skip


finite = st.floats(-1e6, 1e6, allow_nan=False)


@FAST
@given(st.sampled_from(METHODS), st.sampled_from([math.nan, math.inf, -math.inf]), st.integers(0, 3), finite)
def test_fusion_refuses_non_finite_boxes_naming_them(method: str, bad: float, where: int, x: float) -> None:
    box = [x, x, x + 1, x + 1]
    box[where] = bad
    with pytest.raises(ValueError, match="boxes must be finite") as info:
        fusion.fuse(_one_view(box), method=method, iou_thr=0.5, skip_box_thr=0.0)
    assert _in_message(bad, str(info.value)) and "view 0, row 0" in str(info.value)


@FAST
@given(st.sampled_from(METHODS), st.one_of(st.floats(1.0, exclude_min=True), st.floats(max_value=0.0, exclude_max=True),
                                           st.just(math.nan)))  # fmt: skip
def test_fusion_refuses_scores_outside_0_1_naming_them(method: str, score: float) -> None:
    with pytest.raises(ValueError, match=r"scores must be in \[0, 1\]") as info:
        fusion.fuse(_one_view([0, 0, 1, 1], score), method=method, iou_thr=0.5, skip_box_thr=0.0)
    assert _in_message(score, str(info.value))


@FAST
@given(st.sampled_from(METHODS), finite, st.floats(1e-6, 1e6))
def test_fusion_refuses_inverted_boxes_naming_them(method: str, x: float, size: float) -> None:
    with pytest.raises(ValueError, match="x2 >= x1") as info:
        fusion.fuse(_one_view([x + size, 0, x, 1]), method=method, iou_thr=0.5, skip_box_thr=0.0)
    assert "view 0, row 0" in str(info.value)


@FAST
@given(st.sampled_from(METHODS), st.sampled_from(["iou_thr", "skip_box_thr"]),
       st.one_of(st.floats(1.0, exclude_min=True), st.floats(max_value=0.0, exclude_max=True), st.just(math.nan)))  # fmt: skip
def test_fusion_refuses_thresholds_outside_0_1_naming_them(method: str, name: str, value: float) -> None:
    kwargs = {"iou_thr": 0.5, "skip_box_thr": 0.0, name: value}
    with pytest.raises(ValueError, match=name) as info:
        fusion.fuse(_one_view([0, 0, 1, 1]), method=method, **kwargs)
    assert _in_message(value, str(info.value))


# ---------------------------------------------------------------------------------------------------------
# fusion: extreme valid inputs


@st.composite
def extreme_views(draw: st.DrawFn, distinct_scores: bool = False) -> list[Detections]:
    """Up to 4 views of up to 6 boxes at one scale from 1e-6 to 1e6 px: empty views, single boxes, exact
    duplicates across views, zero-size boxes."""
    scale = 10.0 ** draw(st.integers(-6, 6))
    pool = draw(st.lists(st.tuples(st.floats(0, 100), st.floats(0, 100), st.floats(0, 30), st.floats(0, 30),
                                   st.integers(0, 2)), min_size=1, max_size=6))  # fmt: skip
    views = []
    for _ in range(draw(st.integers(1, 4))):
        picks = draw(st.lists(st.integers(0, len(pool) - 1), max_size=6))
        rows = [pool[i] for i in picks]
        scores = [draw(st.floats(0, 1)) for _ in rows]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h, _ in rows], dtype=torch.float64) * scale
        labels = torch.tensor([r[4] for r in rows], dtype=torch.int64)
        views.append(Detections(boxes.reshape(-1, 4), torch.tensor(scores, dtype=torch.float64), labels))
    if distinct_scores:
        all_scores = torch.cat([v.scores for v in views])
        assume(len(set(all_scores.tolist())) == len(all_scores))
    return views


def _canonical(det: Detections) -> list[tuple]:
    return sorted(
        zip(det.labels.tolist(), det.scores.tolist(), det.boxes.tolist(), det.agreement.tolist(), strict=True)
    )


@settings(max_examples=150, deadline=None)
@given(extreme_views(), st.sampled_from(METHODS), st.floats(0, 1))
def test_fused_extreme_views_keep_their_invariants(views: list[Detections], method: str, iou_thr: float) -> None:
    fused = fusion.fuse(views, method=method, iou_thr=iou_thr, skip_box_thr=0.0)
    union = torch.cat([v.boxes for v in views]).float()
    assert len(fused) <= len(union)
    assert bool(((fused.scores >= 0) & (fused.scores <= 1)).all()), fused.scores
    assert bool(torch.isfinite(fused.boxes).all())
    assert bool(((fused.boxes[:, 2] > fused.boxes[:, 0]) & (fused.boxes[:, 3] > fused.boxes[:, 1])).all())
    assert fused.agreement is not None and bool(((fused.agreement >= 1) & (fused.agreement <= len(views))).all())
    assert bool((fused.scores[:-1] >= fused.scores[1:]).all())
    if len(fused):
        low, high = union.min(0).values, union.max(0).values
        slack = 1e-5 * high.abs().max()
        assert bool((fused.boxes >= low - slack).all() and (fused.boxes <= high + slack).all())
    if method in ("nms", "soft-nms"):  # they choose among the input boxes
        rows = {tuple(b) for b in union.tolist()}
        assert all(tuple(b) in rows for b in fused.boxes.tolist())
    if method != "soft-nms":  # (soft-NMS drops what decays to its min_score) an object survives
        assert (len(fused) > 0) == bool(((union[:, 2] > union[:, 0]) & (union[:, 3] > union[:, 1])).any())


@settings(max_examples=100, deadline=None)
@given(extreme_views(distinct_scores=True), st.sampled_from(METHODS), st.floats(0, 1), st.randoms())
def test_fusion_does_not_depend_on_the_order_of_the_views(
    views: list[Detections], method: str, iou_thr: float, rnd
) -> None:  # noqa: ANN001
    shuffled = list(views)
    rnd.shuffle(shuffled)
    a = fusion.fuse(views, method=method, iou_thr=iou_thr, skip_box_thr=0.0)
    b = fusion.fuse(shuffled, method=method, iou_thr=iou_thr, skip_box_thr=0.0)
    assert _canonical(a) == _canonical(b)


# ---------------------------------------------------------------------------------------------------------
# what the properties found, kept as examples


@pytest.mark.parametrize("method", METHODS)
def test_boxes_whose_area_underflows_are_dropped_not_divided_by(method: str) -> None:
    """Sides of 1e-6 and 1e-318 px multiply to 0 in float64: vote and WBF divided 0 by 0 in IoU."""
    boxes = torch.tensor(
        [[0.0, 0.0, 1e-6, 1e-318], [0.0, 0.0, 1e-6, 1e-318], [0.0, 0.0, 2.0, 2.0]], dtype=torch.float64
    )
    views = [Detections(boxes, torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64), torch.zeros(3, dtype=torch.int64))]
    fused = fusion.fuse(views, method=method, iou_thr=0.0, skip_box_thr=0.0)
    assert fused.boxes.tolist() == [[0.0, 0.0, 2.0, 2.0]]


@pytest.mark.parametrize("method", METHODS)
def test_a_box_too_thin_for_float32_is_dropped_from_the_fused_output(method: str) -> None:
    """y1 = 1 - 1e-9 and y2 = 1 are one float32: such a box would reach pseudo.json with height 0, which the
    student's data loading refuses."""
    boxes = torch.tensor([[0.0, 1.0 - 1e-9, 1.0, 1.0], [5.0, 5.0, 9.0, 9.0]], dtype=torch.float64)
    views = [Detections(boxes, torch.tensor([0.9, 0.8], dtype=torch.float64), torch.zeros(2, dtype=torch.int64))]
    fused = fusion.fuse(views, method=method, iou_thr=0.5, skip_box_thr=0.0)
    assert fused.boxes.dtype == torch.float32 and fused.boxes.tolist() == [[5.0, 5.0, 9.0, 9.0]]
    assert fused.agreement is not None and fused.agreement.tolist() == [1]


def test_an_augmentation_that_shrinks_an_image_to_one_pixel_works() -> None:
    """torch's uint8 resize to 1 x 1 px fails an internal assert; the one pixel is the image's mean."""
    image = torch.tensor([[[0, 100], [200, 100]]], dtype=torch.uint8).expand(3, 2, 2).clone()
    aug = draw_augmentation(np.random.default_rng(0), height=2, width=2, min_scale=0.25, max_scale=0.25, flip_prob=0)
    out, boxes, _ = apply_augmentation(image, torch.tensor([[0.0, 0.0, 2.0, 2.0]]), None, aug, flip_index=None)
    assert out[:, 0, 0].tolist() == [100, 100, 100] and out[:, 1:, :].eq(0).all() and out[:, :, 1:].eq(0).all()
    assert boxes.tolist() == [[0.0, 0.0, 1.0, 1.0]]
