"""Fusion: parity with ensemble-boxes (and torchvision's batched_nms), threshold edges, empty and degenerate
inputs, agreement counts, keypoint mean fusion, input checks, and properties."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import ensemble_boxes
import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from datadistill.core import fusion
from datadistill.core.types import Detections

Lists = tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]


def clustered(seed: int, num_views: int = 5, num_objects: int = 12, num_classes: int = 3) -> Lists:
    """Boxes in [0, 1] jittered around shared objects (each view sees each object with probability 0.8),
    plus a few false positives per view; distinct random scores."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(0.2, 0.8, (num_objects, 2))
    size = rng.uniform(0.05, 0.3, (num_objects, 2))
    cls = rng.integers(0, num_classes, num_objects)
    boxes, scores, labels = [], [], []
    for _ in range(num_views):
        seen = rng.random(num_objects) < 0.8
        c = centre[seen] + rng.normal(0.0, 0.04, (int(seen.sum()), 2)) * size[seen]
        s = size[seen] * rng.uniform(0.85, 1.15, (int(seen.sum()), 2))
        lab = cls[seen]
        noise = int(rng.integers(0, 4))
        c = np.concatenate([c, rng.uniform(0.2, 0.8, (noise, 2))])
        s = np.concatenate([s, rng.uniform(0.05, 0.3, (noise, 2))])
        lab = np.concatenate([lab, rng.integers(0, num_classes, noise)])
        boxes.append(np.clip(np.concatenate([c - s / 2, c + s / 2], axis=1), 0.0, 1.0))
        scores.append(rng.uniform(0.02, 1.0, len(lab)))
        labels.append(lab.astype(np.int64))
    return boxes, scores, labels


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return float(inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter))


def a_pair_iou(data: Lists) -> float:
    """The median IoU of the overlapping same-class pairs across views, exactly as computed: a threshold
    that some pair sits exactly on."""
    boxes, _, labels = data
    flat = [
        (b, lab, v) for v, (bs, ls) in enumerate(zip(boxes, labels, strict=True)) for b, lab in zip(bs, ls, strict=True)
    ]
    ious = sorted(
        iou(a, b)
        for i, (a, la, va) in enumerate(flat)
        for b, lb, vb in flat[i + 1 :]
        if la == lb and va != vb and iou(a, b) > 0.3
    )
    return ious[len(ious) // 2]


def torch_lists(data: Lists) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    boxes, scores, labels = data
    return (
        [torch.from_numpy(b) for b in boxes],
        [torch.from_numpy(s) for s in scores],
        [torch.from_numpy(x) for x in labels],
    )


def numpy_copies(data: Lists) -> Lists:
    # ensemble-boxes' nms rescales the score arrays in place when given weights
    boxes, scores, labels = data
    return [b.copy() for b in boxes], [s.copy() for s in scores], [x.copy() for x in labels]


def canonical(boxes: Any, scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted by label, score descending, x1, y1: ensemble-boxes' nms groups its output by label."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    s = np.asarray(scores, dtype=np.float64)
    lab = np.asarray(labels).astype(np.int64)
    order = np.lexsort((b[:, 1], b[:, 0], -s, lab))
    return b[order], s[order], lab[order]


def assert_same(ours: tuple[torch.Tensor, ...], ref: tuple[Any, ...], atol: float = 1e-4) -> None:
    ob, os_, ol = canonical(*(t.cpu().numpy() for t in ours))
    rb, rs, rl = canonical(*ref)
    assert len(ob) == len(rb), f"{len(ob)} fused boxes, ensemble-boxes gives {len(rb)}"
    np.testing.assert_array_equal(ol, rl)
    np.testing.assert_allclose(ob, rb, atol=atol, rtol=0)
    np.testing.assert_allclose(os_, rs, atol=atol, rtol=0)


# (ours, ensemble-boxes, our options, its options)
METHODS = [
    pytest.param(fusion.nms, ensemble_boxes.nms, {}, {}, id="nms"),
    pytest.param(fusion.soft_nms, ensemble_boxes.soft_nms, {"decayed_scores": False}, {}, id="soft_nms-gaussian"),
    pytest.param(
        fusion.soft_nms,
        ensemble_boxes.soft_nms,
        {"decay": "linear", "decayed_scores": False},
        {"method": 1},
        id="soft_nms-linear",
    ),
    pytest.param(
        fusion.soft_nms,
        ensemble_boxes.soft_nms,
        {"sigma": 0.1, "min_score": 0.05, "decayed_scores": False},
        {"sigma": 0.1, "thresh": 0.05},
        id="soft_nms-narrow-sigma-high-floor",
    ),
    pytest.param(fusion.box_voting, ensemble_boxes.non_maximum_weighted, {}, {}, id="vote"),
    pytest.param(
        fusion.box_voting,
        ensemble_boxes.non_maximum_weighted,
        {"skip_box_thr": 0.3},
        {"skip_box_thr": 0.3},
        id="vote-skip_box_thr",
    ),
    pytest.param(fusion.wbf, ensemble_boxes.weighted_boxes_fusion, {}, {}, id="wbf-avg"),
    pytest.param(
        fusion.wbf,
        ensemble_boxes.weighted_boxes_fusion,
        {"conf_type": "max", "skip_box_thr": 0.3},
        {"conf_type": "max", "skip_box_thr": 0.3},
        id="wbf-max-skip_box_thr",
    ),
    pytest.param(
        fusion.wbf,
        ensemble_boxes.weighted_boxes_fusion,
        {"conf_type": "box_and_model_avg"},
        {"conf_type": "box_and_model_avg"},
        id="wbf-box_and_model_avg",
    ),
    pytest.param(
        fusion.wbf,
        ensemble_boxes.weighted_boxes_fusion,
        {"conf_type": "absent_model_aware_avg"},
        {"conf_type": "absent_model_aware_avg"},
        id="wbf-absent_model_aware_avg",
    ),
]


@pytest.mark.parametrize(("ours", "ref", "our_kw", "ref_kw"), METHODS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("iou_thr", [0.4, 0.7, "pair-iou"])
def test_parity_with_ensemble_boxes_on_clustered_views(
    ours: Callable[..., Any],
    ref: Callable[..., Any],
    our_kw: dict,
    ref_kw: dict,
    seed: int,
    weighted: bool,
    iou_thr: Any,
) -> None:
    data = clustered(seed)
    thr = a_pair_iou(data) if iou_thr == "pair-iou" else iou_thr
    weights = list(np.random.default_rng(seed + 100).uniform(0.5, 3.0, len(data[0]))) if weighted else None
    result = ours(*torch_lists(data), weights=weights, iou_thr=thr, **our_kw)
    rb, rs, rl = ref(*numpy_copies(data), weights=weights, iou_thr=thr, **ref_kw)
    assert len(rb) < sum(len(b) for b in data[0]) or ours is fusion.soft_nms, "the data should make fusion merge"
    # ensemble-boxes' WBF 'avg' exceeds 1 with unequal weights; ours is capped at 1
    assert_same(result, (rb, np.minimum(rs, 1.0), rl))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("iou_thr", [0.3, 0.5, 0.8])
def test_nms_matches_torchvision_batched_nms_in_pixels(seed: int, iou_thr: float) -> None:
    boxes, scores, labels = torch_lists(clustered(seed, num_views=4, num_objects=30))
    boxes = [b * 640.0 - 20.0 for b in boxes]  # pixels, some outside the image: nothing is clipped
    union_b, union_s, union_l = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = torchvision.ops.batched_nms(union_b, union_s, union_l, iou_thr)
    ref = (union_b[keep].numpy(), union_s[keep].numpy(), union_l[keep].numpy())
    assert_same(fusion.nms(boxes, scores, labels, iou_thr=iou_thr), ref, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("decay", ["gaussian", "linear"])
def test_soft_nms_decayed_scores_match_the_reference_loop(seed: int, decay: Any) -> None:
    """ensemble-boxes' per-class soft-NMS loop decays its score array in place: those are the oracle."""
    boxes, scores, labels = clustered(seed)
    union_b, union_s, union_l = np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels)
    ref_b, ref_s, ref_l = [], [], []
    for cls in np.unique(union_l):
        b, s = union_b[union_l == cls], union_s[union_l == cls].copy()
        keep = ensemble_boxes.ensemble_boxes_nms.cpu_soft_nms_float(
            b.copy(), s, Nt=0.5, sigma=0.5, thresh=0.001, method=1 if decay == "linear" else 2
        )
        ref_b.append(b[keep])
        ref_s.append(s[s > 0.001])  # decayed, in the loop's order, which is keep's order
        ref_l.append(np.full(len(keep), cls))
    ours = fusion.soft_nms(*torch_lists((boxes, scores, labels)), iou_thr=0.5, decay=decay, decayed_scores=True)
    assert_same(ours, (np.concatenate(ref_b), np.concatenate(ref_s), np.concatenate(ref_l)), atol=1e-9)


# ---------------------------------------------------------------------------------------------------------
# Box pairs on the IoU threshold: exact dyadic coordinates, so every implementation computes the IoU exactly.

EDGE_PAIRS = [
    pytest.param([0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.25], 0.5, id="iou-exactly-0.5"),
    pytest.param([0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.25, 0.25], 0.25, id="iou-exactly-0.25"),
    pytest.param([0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.375], 0.75, id="iou-exactly-0.75"),
    pytest.param([0.25, 0.25, 0.75, 0.75], [0.25, 0.5, 0.75, 0.75], 0.5, id="iou-exactly-0.5-offset"),
]
MERGING = [
    pytest.param(fusion.nms, ensemble_boxes.nms, id="nms"),
    pytest.param(fusion.box_voting, ensemble_boxes.non_maximum_weighted, id="vote"),
    pytest.param(fusion.wbf, ensemble_boxes.weighted_boxes_fusion, id="wbf"),
]


@pytest.mark.parametrize(("box_a", "box_b", "pair_iou"), EDGE_PAIRS)
@pytest.mark.parametrize(("ours", "ref"), MERGING)
@pytest.mark.parametrize("frame", ["normalized", "pixels"])
def test_pair_on_the_iou_threshold_is_not_merged_and_just_below_is(
    box_a: list[float], box_b: list[float], pair_iou: float, ours: Callable, ref: Callable, frame: str
) -> None:
    a, b = np.array([box_a]), np.array([box_b])
    if frame == "pixels":  # still exact: powers of two and integers
        a, b = a * 1024.0 + 37.0, b * 1024.0 + 37.0
    data = ([a, b], [np.array([0.9]), np.array([0.8])], [np.array([1]), np.array([1])])
    for thr, expected in [(pair_iou, 2), (math.nextafter(pair_iou, 0.0), 1)]:
        result = ours(*torch_lists(data), iou_thr=thr)
        assert len(result[0]) == expected, f"iou_thr={thr!r}"
        if frame == "normalized":
            assert_same(result, ref(*numpy_copies(data), iou_thr=thr))


@pytest.mark.parametrize(("box_a", "box_b", "pair_iou"), EDGE_PAIRS)
def test_linear_soft_nms_decays_only_above_the_threshold(
    box_a: list[float], box_b: list[float], pair_iou: float
) -> None:
    data = torch_lists(
        ([np.array([box_a]), np.array([box_b])], [np.array([0.9]), np.array([0.8])], [np.array([1])] * 2)
    )
    _, at, _ = fusion.soft_nms(*data, iou_thr=pair_iou, decay="linear", decayed_scores=True)
    _, below, _ = fusion.soft_nms(*data, iou_thr=math.nextafter(pair_iou, 0.0), decay="linear", decayed_scores=True)
    torch.testing.assert_close(at, torch.tensor([0.9, 0.8], dtype=torch.float64))
    torch.testing.assert_close(below, torch.tensor([0.9, 0.8 * (1 - pair_iou)], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------
# Empty, single and identical inputs.

ALL = [
    pytest.param(fusion.nms, id="nms"),
    pytest.param(fusion.soft_nms, id="soft_nms"),
    pytest.param(fusion.box_voting, id="vote"),
    pytest.param(fusion.wbf, id="wbf"),
]


def views_of(*rows: list[tuple[list[float], float, int]]) -> tuple[list[torch.Tensor], ...]:
    """Per view a list of (box, score, label) rows."""
    boxes = [torch.tensor([r[0] for r in v], dtype=torch.float32).reshape(-1, 4) for v in rows]
    scores = [torch.tensor([r[1] for r in v], dtype=torch.float32) for v in rows]
    labels = [torch.tensor([r[2] for r in v], dtype=torch.int64) for v in rows]
    return boxes, scores, labels


EMPTY = [
    pytest.param(([], [], []), {}, id="no-views"),
    pytest.param(views_of([], [], []), {}, id="three-empty-views"),
    pytest.param(views_of([([0.1, 0.1, 0.4, 0.4], 0.2, 0)], []), {"skip_box_thr": 0.5}, id="all-below-skip_box_thr"),
    pytest.param(views_of([([0.1, 0.1, 0.1, 0.4], 0.9, 0)], [([0.2, 0.3, 0.6, 0.3], 0.9, 0)]), {}, id="zero-area-only"),
    pytest.param(views_of([([0.1, 0.1, 0.4, 0.4], 0.0, 0)]), {}, id="zero-score-soft-nms-drops"),
]


@pytest.mark.parametrize(("data", "kw"), EMPTY)
@pytest.mark.parametrize("method", ALL)
def test_empty_results_have_the_right_shapes_and_dtypes(data: tuple, kw: dict, method: Callable) -> None:
    boxes, scores, labels = method(*data, **kw)
    if method is not fusion.soft_nms and len(scores):  # a zero score is kept by the others
        assert scores.tolist() == [0.0]
        return
    assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.shape == (0,)
    assert boxes.dtype == torch.float32 and scores.dtype == torch.float32 and labels.dtype == torch.int64


@pytest.mark.parametrize(
    ("method", "kw", "num_views", "expected_score"),
    [
        pytest.param(fusion.nms, {}, 1, 0.6, id="nms"),
        pytest.param(fusion.soft_nms, {}, 1, 0.6, id="soft_nms"),
        pytest.param(fusion.box_voting, {}, 1, 0.6, id="vote"),
        pytest.param(fusion.wbf, {}, 1, 0.6, id="wbf-avg"),
        pytest.param(fusion.wbf, {}, 3, 0.2, id="wbf-avg-one-of-three-views-divides-by-3"),
        pytest.param(fusion.wbf, {"conf_type": "max"}, 3, 0.6, id="wbf-max-one-of-three-views"),
        pytest.param(fusion.nms, {"weights": [2.0, 1.0, 1.0]}, 3, 0.3, id="nms-weighted-scales-by-w-over-sum"),
    ],
)
def test_one_box(method: Callable, kw: dict, num_views: int, expected_score: float) -> None:
    box = [12.5, -3.0, 700.25, 300.0]  # pixels, partly outside [0, 1]: not clipped
    data = views_of([(box, 0.6, 4)], *([[]] * (num_views - 1)))
    boxes, scores, labels = method(*data, **kw)
    torch.testing.assert_close(boxes, torch.tensor([box]))
    torch.testing.assert_close(scores, torch.tensor([expected_score]))
    assert labels.tolist() == [4]


E2 = math.exp(-2.0)  # gaussian decay of an identical box with sigma 0.5


@pytest.mark.parametrize(
    ("method", "kw", "expected_scores"),
    [
        pytest.param(fusion.nms, {}, [0.9], id="nms-keeps-the-best"),
        pytest.param(fusion.box_voting, {}, [0.9], id="vote-keeps-the-best-score"),
        pytest.param(fusion.wbf, {}, [0.6], id="wbf-avg-means"),
        pytest.param(fusion.wbf, {"conf_type": "max"}, [0.9], id="wbf-max"),
        pytest.param(
            fusion.soft_nms, {"decayed_scores": True}, [0.9, 0.6 * E2, 0.3 * E2 * E2], id="soft_nms-decays-twice"
        ),
    ],
)
def test_identical_boxes_in_three_views(method: Callable, kw: dict, expected_scores: list[float]) -> None:
    box = [0.2, 0.2, 0.6, 0.7]
    data = views_of([(box, 0.9, 1)], [(box, 0.6, 1)], [(box, 0.3, 1)])
    boxes, scores, labels = method(*data, **kw)
    torch.testing.assert_close(scores, torch.tensor(expected_scores))
    torch.testing.assert_close(boxes, torch.tensor([box] * len(expected_scores)))
    ref = {
        fusion.nms: ensemble_boxes.nms,
        fusion.box_voting: ensemble_boxes.non_maximum_weighted,
        fusion.wbf: ensemble_boxes.weighted_boxes_fusion,
        fusion.soft_nms: ensemble_boxes.soft_nms,
    }[method]
    ref_kw = {**kw, "decayed_scores": False} if method is fusion.soft_nms else kw
    original = method(*data, **ref_kw)
    ref_args = {k: v for k, v in kw.items() if k != "decayed_scores"}
    assert_same(original, ref(*(list(x.numpy() for x in part) for part in data), **ref_args))


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("seed", [0, 1])
def test_view_order_does_not_change_the_fused_set(method: Callable, seed: int) -> None:
    data = torch_lists(clustered(seed))
    perm = np.random.default_rng(seed).permutation(len(data[0]))
    permuted = tuple([part[i] for i in perm] for part in data)
    a = canonical(*(t.numpy() for t in method(*data)))
    b = canonical(*(t.numpy() for t in method(*permuted)))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_output_dtype_follows_the_boxes(dtype: torch.dtype) -> None:
    data = views_of([([1, 2, 30, 40], 0.5, 0)])
    boxes, scores, labels = fusion.wbf([data[0][0].to(dtype)], data[1], data[2])
    expected = torch.float32 if dtype == torch.int64 else dtype
    assert boxes.dtype == expected and scores.dtype == expected and labels.dtype == torch.int64


# ---------------------------------------------------------------------------------------------------------
# fuse: agreement and keypoints.

FUSE_METHODS = ["nms", "soft-nms", "vote", "wbf"]


def agreement_scene() -> list[Detections]:
    """Object A (class 0) in all 3 views; B (class 1) twice in view 1 only; C (class 2) in views 0 and 2."""
    a = [[10.0, 10.0, 50.0, 50.0], [11.0, 10.0, 51.0, 50.0], [10.0, 11.0, 50.0, 52.0]]
    b = [[100.0, 100.0, 150.0, 140.0], [102.0, 101.0, 150.0, 141.0]]
    c = [[200.0, 20.0, 260.0, 90.0], [201.0, 22.0, 259.0, 90.0]]
    rows = [
        [(a[0], 0.9, 0), (c[0], 0.7, 2)],
        [(a[1], 0.8, 0), (b[0], 0.6, 1), (b[1], 0.5, 1)],
        [(a[2], 0.85, 0), (c[1], 0.65, 2)],
    ]
    boxes, scores, labels = views_of(*rows)
    return [Detections(b, s, lab) for b, s, lab in zip(boxes, scores, labels, strict=True)]


@pytest.mark.parametrize("method", FUSE_METHODS)
def test_agreement_counts_distinct_views(method: str) -> None:
    fused = fusion.fuse(agreement_scene(), method=method, iou_thr=0.5, skip_box_thr=0.0)
    assert fused.agreement is not None and fused.agreement.dtype == torch.int64
    best = {}  # per class, the agreement of its highest scored object (soft-NMS keeps decayed duplicates)
    for label, agreement in zip(fused.labels.tolist(), fused.agreement.tolist(), strict=True):
        best.setdefault(label, agreement)
    assert best == {0: 3, 1: 1, 2: 2}
    if method != "soft-nms":
        assert sorted(fused.labels.tolist()) == [0, 1, 2]


@pytest.mark.parametrize("method", FUSE_METHODS)
def test_fuse_boxes_match_the_box_function(method: str) -> None:
    views = agreement_scene()
    fused = fusion.fuse(views, method=method, iou_thr=0.5, skip_box_thr=0.0, weights=[1.0, 2.0, 0.5])
    function = {"nms": fusion.nms, "soft-nms": fusion.soft_nms, "vote": fusion.box_voting, "wbf": fusion.wbf}[method]
    extra = {"decayed_scores": True} if method == "soft-nms" else {}  # fuse decays soft-NMS scores
    boxes, scores, labels = function(
        [v.boxes for v in views],
        [v.scores for v in views],
        [v.labels for v in views],
        weights=[1.0, 2.0, 0.5],
        iou_thr=0.5,
        **extra,
    )
    torch.testing.assert_close(fused.boxes, boxes)
    torch.testing.assert_close(fused.scores, scores)
    assert torch.equal(fused.labels, labels)


def keypoint_views() -> list[Detections]:
    """One object in two views: box scores 0.75 and 0.25, IoU 10/11."""
    return [
        Detections(
            torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
            torch.tensor([0.75]),
            torch.tensor([0]),
            keypoints=torch.tensor([[[1.0, 1.0, 1.0], [3.0, 5.0, 0.5]]]),
        ),
        Detections(
            torch.tensor([[0.0, 0.0, 10.0, 11.0]]),
            torch.tensor([0.25]),
            torch.tensor([0]),
            keypoints=torch.tensor([[[5.0, 1.0, 0.0], [3.0, 1.0, 1.0]]]),
        ),
        Detections.empty(num_keypoints=2),
    ]


@pytest.mark.parametrize("method", FUSE_METHODS)
@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        pytest.param(None, [[2.0, 1.0, 0.75], [3.0, 4.0, 0.625]], id="box-score-weighted"),
        pytest.param([1.0, 3.0, 1.0], [[3.0, 1.0, 0.5], [3.0, 3.0, 0.75]], id="view-weights-scale-box-scores"),
    ],
)
def test_keypoints_are_the_score_weighted_mean_of_the_cluster(
    method: str, weights: list[float] | None, expected: list[list[float]]
) -> None:
    fused = fusion.fuse(keypoint_views(), method=method, iou_thr=0.5, skip_box_thr=0.0, weights=weights)
    assert fused.keypoints is not None and fused.keypoints.shape == (len(fused), 2, 3)
    torch.testing.assert_close(fused.keypoints[0], torch.tensor(expected))
    assert fused.agreement is not None and fused.agreement[0] == 2


@pytest.mark.parametrize("method", FUSE_METHODS)
def test_fuse_without_keypoints_or_views(method: str) -> None:
    assert fusion.fuse(agreement_scene(), method=method, iou_thr=0.5, skip_box_thr=0.0).keypoints is None
    empty = fusion.fuse([], method=method, iou_thr=0.5, skip_box_thr=0.0)
    assert len(empty) == 0 and empty.agreement is not None and empty.agreement.shape == (0,)


@pytest.mark.parametrize(
    ("weights", "members", "clusters", "expected"),
    [
        pytest.param([0.0, 0.0], [0, 1], [0, 0], [[2.0, 3.0, 0.5]], id="all-zero-weights-plain-mean"),
        pytest.param([1.0, 3.0], [0, 1, 1], [0, 0, 1], [[2.5, 3.5, 0.25], [3.0, 4.0, 0.0]], id="overlapping-clusters"),
        pytest.param([1.0, 3.0], [0], [1], [[0.0, 0.0, 0.0], [1.0, 2.0, 1.0]], id="memberless-cluster-zeros"),
    ],
)
def test_fuse_keypoints_mean(weights: list, members: list, clusters: list, expected: list) -> None:
    keypoints = torch.tensor([[[1.0, 2.0, 1.0]], [[3.0, 4.0, 0.0]]])
    out = fusion.fuse_keypoints_mean(
        keypoints, torch.tensor(weights), torch.tensor(members), torch.tensor(clusters), len(expected)
    )
    torch.testing.assert_close(out, torch.tensor(expected)[:, None, :])


# ---------------------------------------------------------------------------------------------------------
# Bad input.

B1 = torch.tensor([[0.1, 0.1, 0.4, 0.4]])
S1 = torch.tensor([0.5])
L1 = torch.tensor([0])


def two_views(**overrides: Any) -> dict[str, Any]:
    args = {"boxes_list": [B1, B1], "scores_list": [S1, S1], "labels_list": [L1, L1]}
    args.update(overrides)
    return args


BAD_FOR_ALL = [
    pytest.param(two_views(scores_list=[S1]), "2, 1 and 2", id="lists-of-different-lengths"),
    pytest.param(
        two_views(boxes_list=[B1, torch.zeros(5, 3)]), "view 1 must have shape [N, 4], got (5, 3)", id="boxes-not-Nx4"
    ),
    pytest.param(two_views(scores_list=[S1, torch.zeros(2)]), "got (2,) and (1,)", id="scores-length-mismatch"),
    pytest.param(two_views(labels_list=[L1, torch.tensor([0.0])]), "torch.float32", id="float-labels"),
    pytest.param(two_views(boxes_list=[B1, torch.tensor([[0.1, math.nan, 0.4, 0.4]])]), "nan", id="nan-box"),
    pytest.param(two_views(scores_list=[S1, torch.tensor([math.inf])]), "inf", id="inf-score"),
    pytest.param(two_views(scores_list=[S1, torch.tensor([1.5])]), "got 1.5 (view 1, row 0)", id="score-above-1"),
    pytest.param(two_views(scores_list=[torch.tensor([-0.25]), S1]), "-0.25", id="negative-score"),
    pytest.param(two_views(boxes_list=[B1, torch.tensor([[0.5, 0.1, 0.25, 0.4]])]), "[0.5, 0.1", id="x2-below-x1"),
    pytest.param(two_views(weights=[1.0, 1.0, 1.0]), "(3,)", id="weights-wrong-length"),
    pytest.param(two_views(weights=[0.0, 0.0]), "[0.0, 0.0]", id="weights-all-zero"),
    pytest.param(two_views(weights=[1.0, -1.0]), "-1.0", id="negative-weight"),
    pytest.param(two_views(weights=[1.0, math.nan]), "nan", id="nan-weight"),
    pytest.param(two_views(iou_thr=1.5), "iou_thr must be in [0, 1], got 1.5", id="iou_thr-above-1"),
    pytest.param(two_views(skip_box_thr=-0.5), "-0.5", id="negative-skip_box_thr"),
]


@pytest.mark.parametrize(("args", "message"), BAD_FOR_ALL)
@pytest.mark.parametrize("method", ALL)
def test_bad_input_raises_value_error_naming_it(args: dict, message: str, method: Callable) -> None:
    with pytest.raises(ValueError) as info:
        method(
            args["boxes_list"],
            args["scores_list"],
            args["labels_list"],
            **{k: v for k, v in args.items() if not k.endswith("_list")},
        )
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: fusion.wbf([B1], [S1], [L1], conf_type="median"), "'median'", id="unknown-conf_type"),
        pytest.param(lambda: fusion.soft_nms([B1], [S1], [L1], decay="cubic"), "'cubic'", id="unknown-decay"),
        pytest.param(lambda: fusion.soft_nms([B1], [S1], [L1], sigma=0.0), "got 0.0", id="zero-sigma"),
        pytest.param(lambda: fusion.soft_nms([B1], [S1], [L1], min_score=2.0), "got 2.0", id="min_score-above-1"),
        pytest.param(
            lambda: fusion.fuse([Detections(B1, S1, L1)], method="soft_nms", iou_thr=0.5, skip_box_thr=0.0),
            "'soft_nms'",
            id="unknown-fuse-method",
        ),
        pytest.param(
            lambda: fusion.fuse([Detections(B1, S1, L1)], method="nms", iou_thr=0.5, skip_box_thr=0.0, sigma=0.5),
            "got ['sigma']",
            id="option-of-another-method",
        ),
        pytest.param(
            lambda: fusion.fuse(
                [
                    Detections(B1, S1, L1, keypoints=torch.zeros(1, 2, 3)),
                    Detections(B1, S1, L1, keypoints=torch.zeros(1, 5, 3)),
                ],
                method="nms",
                iou_thr=0.5,
                skip_box_thr=0.0,
            ),
            "(2, 3)",
            id="different-keypoint-counts",
        ),
        pytest.param(
            lambda: fusion.fuse(
                [Detections(B1, S1, L1, keypoints=torch.zeros(1, 2, 3)), Detections(B1, S1, L1)],
                method="wbf",
                iou_thr=0.5,
                skip_box_thr=0.0,
            ),
            "views [1]",
            id="keypoints-missing-in-one-view",
        ),
    ],
)
def test_bad_options_raise_value_error_naming_them(call: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Properties.

coordinate = st.floats(-50.0, 500.0, allow_nan=False)
detection = st.tuples(
    coordinate, coordinate, st.floats(0.0, 80.0), st.floats(0.0, 80.0), st.floats(0.0, 1.0), st.integers(0, 2)
)


@st.composite
def scenes(draw: st.DrawFn) -> tuple[list[Detections], list[float] | None, float, str]:
    views = []
    for _ in range(draw(st.integers(0, 4))):
        rows = draw(st.lists(detection, max_size=8))
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h, _, _ in rows], dtype=torch.float32).reshape(-1, 4)
        scores = torch.tensor([r[4] for r in rows], dtype=torch.float32)
        labels = torch.tensor([r[5] for r in rows], dtype=torch.int64)
        keypoints = torch.cat([boxes[:, None, :2], scores[:, None, None].expand(-1, 1, 1)], dim=2)
        views.append(Detections(boxes, scores, labels, keypoints=keypoints.expand(-1, 2, 3).clone()))
    weights = draw(st.none() | st.lists(st.floats(0.0, 5.0), min_size=len(views), max_size=len(views)))
    if weights is not None and views and not any(w > 0 for w in weights):
        weights[0] = 1.0
    return views, weights, draw(st.floats(0.0, 1.0)), draw(st.sampled_from(FUSE_METHODS))


@settings(max_examples=150, deadline=None)
@given(scenes())
def test_fused_output_is_sane(scene: tuple[list[Detections], list[float] | None, float, str]) -> None:
    views, weights, iou_thr, method = scene
    fused = fusion.fuse(views, method=method, iou_thr=iou_thr, skip_box_thr=0.0, weights=weights)
    assert len(fused) <= sum(len(v) for v in views)
    assert bool(((fused.scores >= 0) & (fused.scores <= 1)).all())
    assert bool(torch.isfinite(fused.boxes).all())
    assert fused.agreement is not None and bool(((fused.agreement >= 1) & (fused.agreement <= len(views))).all())
    if fused.keypoints is not None:
        assert bool(torch.isfinite(fused.keypoints).all())
    assert bool((fused.scores[:-1] >= fused.scores[1:]).all()), "sorted by score"


@settings(max_examples=100, deadline=None)
@given(scenes(), st.sampled_from(["avg", "max", "box_and_model_avg", "absent_model_aware_avg"]))
def test_wbf_boxes_lie_within_their_inputs(scene: tuple, conf_type: str) -> None:
    """A fused box is a convex combination of its members: inside the inputs' hull."""
    views, weights, iou_thr, _ = scene
    boxes, scores, _ = fusion.wbf(
        [v.boxes for v in views],
        [v.scores for v in views],
        [v.labels for v in views],
        weights=weights,
        iou_thr=iou_thr,
        conf_type=conf_type,
    )
    if len(boxes):
        union = torch.cat([v.boxes for v in views])
        assert bool((boxes >= union.min(0).values - 1e-3).all() and (boxes <= union.max(0).values + 1e-3).all())
        assert bool(((scores >= 0) & (scores <= 1)).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", FUSE_METHODS)
def test_cuda_inputs_come_back_on_cuda(method: str) -> None:
    views = keypoint_views()
    on_cpu = fusion.fuse(views, method=method, iou_thr=0.5, skip_box_thr=0.0)
    on_gpu = fusion.fuse([v.to("cuda") for v in views], method=method, iou_thr=0.5, skip_box_thr=0.0)
    assert on_gpu.boxes.is_cuda and on_gpu.agreement is not None and on_gpu.agreement.is_cuda
    assert on_gpu.keypoints is not None and on_gpu.keypoints.is_cuda
    torch.testing.assert_close(on_gpu.to("cpu").boxes, on_cpu.boxes)
    torch.testing.assert_close(on_gpu.to("cpu").keypoints, on_cpu.keypoints)


def _batch_of_views(seed: int, *, num_images: int, num_views: int, keypoints: bool) -> list[list[Detections]]:
    """``[image][view]`` random detections with near-duplicates across views, ties and empty views."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num_images):
        n = int(torch.randint(0, 12, (1,), generator=g))
        base = torch.rand(n, 2, generator=g) * 200
        base = torch.cat([base, base + 5 + torch.rand(n, 2, generator=g) * 60], dim=1)
        views = []
        for v in range(num_views):
            if (i + v) % 5 == 4:
                views.append(Detections.empty(3 if keypoints else None))
                continue
            boxes = base + torch.randn(n, 4, generator=g) * 3
            boxes = torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)], dim=1)
            scores = (torch.rand(n, generator=g) * 8).round() / 8  # ties
            kps = torch.rand(n, 3, 3, generator=g) * 100 if keypoints else None
            views.append(Detections(boxes=boxes, scores=scores, labels=torch.randint(0, 3, (n,), generator=g),
                                    keypoints=kps))  # fmt: skip
        out.append(views)
    return out


@pytest.mark.parametrize(
    ("method", "options"),
    [("nms", {}), ("soft-nms", {}), ("soft-nms", {"decay": "linear", "decayed_scores": True}), ("vote", {}),
     ("wbf", {}), ("wbf", {"conf_type": "absent_model_aware_avg"})],
)  # fmt: skip
@pytest.mark.parametrize("keypoints", [False, True])
def test_fusing_a_batch_gives_each_images_own_fusion_exactly(method: str, options: dict, keypoints: bool) -> None:
    per_image = _batch_of_views(7, num_images=9, num_views=4, keypoints=keypoints)
    views = [Detections(boxes=torch.cat([img[v].boxes for img in per_image]),
                        scores=torch.cat([img[v].scores for img in per_image]),
                        labels=torch.cat([img[v].labels for img in per_image]),
                        keypoints=torch.cat([img[v].keypoints for img in per_image]) if keypoints else None)
             for v in range(4)]  # fmt: skip
    images = [torch.cat([torch.full((len(img[v]),), i) for i, img in enumerate(per_image)]) for v in range(4)]
    batch = fusion.fuse_images(views, images, len(per_image), method=method, iou_thr=0.4, skip_box_thr=0.1, **options)
    assert len(batch) == len(per_image)
    assert sum(len(b) for b in batch) > 20
    for got, img in zip(batch, per_image, strict=True):
        want = fusion.fuse(img, method=method, iou_thr=0.4, skip_box_thr=0.1, **options)
        for name in ("boxes", "scores", "labels", "agreement", "keypoints"):
            a, b = getattr(got, name), getattr(want, name)
            assert (a is None and b is None) or torch.equal(a, b), name


def test_fusing_a_batch_refuses_rows_without_an_image() -> None:
    det = Detections(boxes=torch.tensor([[0.0, 0, 10, 10]]), scores=torch.tensor([0.9]), labels=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"images must be in 0\.\.1, got 2\.\.2"):
        fusion.fuse_images([det], [torch.tensor([2])], 2, method="nms", iou_thr=0.5, skip_box_thr=0.0)
    with pytest.raises(ValueError, match=r"images of view 0 must be \[1\] integers"):
        fusion.fuse_images([det], [torch.tensor([0, 1])], 2, method="nms", iou_thr=0.5, skip_box_thr=0.0)


def test_wbf_counts_only_the_views_that_could_see_a_box() -> None:
    # identity and the four tiles of tile:2x2 on a 200 px image (tiles span 0..115 and 85..200)
    crops = torch.tensor([[0.0, 0, 200, 200], [0, 0, 115, 115], [85, 0, 200, 115], [0, 85, 115, 200],
                          [85, 85, 200, 200]])  # fmt: skip
    corner, middle = [10.0, 10, 40, 40], [90.0, 90, 110, 110]

    def det(rows: list[tuple[list[float], float]]) -> Detections:
        return Detections(boxes=torch.tensor([b for b, _ in rows]).reshape(-1, 4),
                          scores=torch.tensor([s for _, s in rows]), labels=torch.zeros(len(rows), dtype=torch.int64))  # fmt: skip

    views = [det([(corner, 0.8), (middle, 0.9)]), det([(corner, 0.6)]), det([]), det([]), det([])]
    seen = fusion.fuse(views, method="wbf", iou_thr=0.5, skip_box_thr=0.0, crops=crops)
    blind = fusion.fuse(views, method="wbf", iou_thr=0.5, skip_box_thr=0.0)
    # the corner box: 2 of the 2 views that hold it (identity, the top left tile); the middle box: 1 of 5
    assert sorted(seen.scores.tolist()) == pytest.approx([0.9 / 5, 0.7])
    assert sorted(blind.scores.tolist()) == pytest.approx([0.9 / 5, 0.7 * 2 / 5])
    assert seen.agreement.tolist() == blind.agreement.tolist()
    absent = fusion.fuse(views, method="wbf", iou_thr=0.5, skip_box_thr=0.0, crops=crops,
                         conf_type="absent_model_aware_avg")  # fmt: skip
    assert sorted(absent.scores.tolist()) == pytest.approx([0.9 / 5, (0.8 + 0.6) / 2])
    with pytest.raises(ValueError, match=r"crops must have shape \[5, 1, 4\]"):
        fusion.fuse(views, method="wbf", iou_thr=0.5, skip_box_thr=0.0, crops=crops[:3])


@pytest.mark.parametrize("method", ["wbf", "vote"])
@pytest.mark.parametrize("score", [0.0, 4.9407e-324, 1e-200])
def test_a_box_of_a_vanishing_score_comes_back_unchanged(method: str, score: float) -> None:
    """A weighted mean over subnormal weights keeps a few bits (hypothesis found 1.5 fused to 2.0): such
    clusters take the unweighted mean, so a lone box is itself."""
    box = torch.tensor([[0.0, 0.0, 1.0, 1.5]], dtype=torch.float64)
    view = Detections(boxes=box, scores=torch.tensor([score], dtype=torch.float64), labels=torch.tensor([0]))
    fused = fusion.fuse([view, view], method=method, iou_thr=0.5, skip_box_thr=0.0)
    assert fused.boxes.tolist() == [[0.0, 0.0, 1.0, 1.5]]
