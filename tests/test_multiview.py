"""The labeling stage's batch path (one inverse per view, one fusion and one spread per batch) against the
image-by-image composition it replaced: the same objects, bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from types import ModuleType
from typing import Any

import pytest
import torch

from datadistill.core.types import Detections
from datadistill.core.views import View, parse_views
from datadistill.models.detector import ModelMeta
from datadistill.stages.multiview import ViewOutputs, fuse_views, label_images

SIZES = ((480, 640), (300, 200), (640, 480), (123, 457), (480, 640))  # (height, width): every image its own


def _outputs(views: tuple[View, ...], *, keypoints: int | None, seed: int) -> ViewOutputs:
    """Random raw outputs of ``views`` for the images of SIZES, packed as the model loop packs them: rows
    by view, then image; near-duplicates across views, ties, and empty images."""
    g = torch.Generator().manual_seed(seed)
    boxes, scores, labels, kps, counts = [], [], [], [], []
    for view in views:
        for i, (h, w) in enumerate(SIZES):
            fh, fw = view.frame_size(height=h, width=w)
            n = 0 if (i == 1 and view.hflip) else int(torch.randint(0, 15, (1,), generator=g))
            xy = torch.rand(n, 2, generator=g) * torch.tensor([fw * 0.8, fh * 0.8])
            b = torch.cat([xy, xy + 2 + torch.rand(n, 2, generator=g) * 40], dim=1)
            boxes.append(b)
            scores.append((torch.rand(n, generator=g) * 10).round() / 10)
            labels.append(torch.randint(0, 4, (n,), generator=g))
            if keypoints is not None:
                kps.append(torch.rand(n, keypoints, 3, generator=g) * 100)
            counts.append(n)
    return ViewOutputs(boxes=torch.cat(boxes), scores=torch.cat(scores), labels=torch.cat(labels),
                       keypoints=torch.cat(kps) if keypoints is not None else None, counts=tuple(counts),
                       sizes=SIZES, ready=None)  # fmt: skip


@pytest.mark.parametrize("method", ["nms", "wbf", "soft-nms", "vote"])
@pytest.mark.parametrize(
    ("spec", "keypoints"),
    [("default", None), ("default", 3), ("identity,hflip,tile:2x2", None), ("hflip,hflip+tile:2x1", 3)],
)
def test_a_batch_is_fused_as_each_image_alone(
    method: str, spec: str, keypoints: int | None, bench_script: Callable[[str], ModuleType]
) -> None:
    views = parse_views(spec)
    flip_index = (1, 0, 2) if keypoints else ()
    out = _outputs(views, keypoints=keypoints, seed=len(spec) + (keypoints or 0))
    batch = fuse_views(out.invert(views, flip_index), fuse=method, iou_thr=0.5, score_floor=0.02, timer=None)
    alone = bench_script("writer_gil").image_by_image(
        out, views, flip_index=flip_index, method=method, score_floor=0.02
    )
    assert sum(len(d) for d in batch) > 10
    for got, want in zip(batch, alone, strict=True):
        for name in ("boxes", "scores", "labels", "agreement", "keypoints", "score_spread", "box_spread"):
            a, b = getattr(got, name), getattr(want, name)
            assert (a is None and b is None) or torch.equal(a, b), name


def test_a_flip_maps_each_row_back_within_its_own_image() -> None:
    view = View(hflip=True)
    det = Detections(boxes=torch.tensor([[10.0, 1, 30, 5], [10.0, 1, 30, 5]]), scores=torch.tensor([0.5, 0.5]),
                     labels=torch.tensor([0, 0]), keypoints=torch.tensor([[[1.0, 2, 1], [3, 4, 1]]] * 2))  # fmt: skip
    got = view.invert_rows(det, widths=torch.tensor([100.0, 50.0]), flip_index=(1, 0))
    assert got.boxes.tolist() == [[70.0, 1, 90, 5], [20.0, 1, 40, 5]]
    assert got.keypoints.tolist() == [[[97.0, 4, 1], [99, 2, 1]], [[47.0, 4, 1], [49, 2, 1]]]  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="a tile view maps back one image at a time"):
        parse_views("tile:2x2")[0].invert_rows(det, widths=torch.tensor([100.0, 50.0]))


class _TwoHands:
    """A keypoint detector that sees one figure, its "left hand" (keypoint 0) at the left of its input and
    its "right hand" (keypoint 1) at the right, whatever the input: mirrored, its hands swap places."""

    def __init__(self, flip_index: tuple[int, ...]) -> None:
        self.meta = ModelMeta(model="fake", task="keypoints", class_names=("figure",), category_ids=(1,),
                              keypoint_names=("left_hand", "right_hand"), flip_index=flip_index, min_size=64,
                              max_size=64)  # fmt: skip
        self.has_heatmaps = False

    def input_size(self, min_size: int, max_size: int) -> Any:
        return nullcontext()

    def predict(self, images: list[torch.Tensor]) -> list[Detections]:
        out = []
        for image in images:
            w = float(image.shape[-1])
            kps = torch.tensor([[[0.2 * w, 10.0, 1.0], [0.4 * w, 10.0, 1.0]]])
            out.append(Detections(boxes=torch.tensor([[0.1 * w, 5.0, 0.9 * w, 20.0]]), scores=torch.tensor([0.9]),
                                  labels=torch.tensor([0]), keypoints=kps))  # fmt: skip
        return out


def test_a_given_flip_map_replaces_the_detectors_own() -> None:
    image = [torch.zeros(3, 32, 100)]
    views = parse_views("identity,hflip")

    def run(own: tuple[int, ...], given: tuple[int, ...] | None) -> list[list[float]]:
        (det,) = label_images(_TwoHands(own), image, views=views, keypoint_fuse="mean", flip_index=given)
        return det.keypoints[0].tolist()  # type: ignore[index]

    # the mirror's left hand, at 80 px in the original frame, is the right hand: hands at 40 and 60 px
    assert run((1, 0), None) == [[40.0, 10.0, 1.0], [60.0, 10.0, 1.0]]
    assert run((0, 1), (1, 0)) == [[40.0, 10.0, 1.0], [60.0, 10.0, 1.0]]  # an actor told the driver's map
    assert run((0, 1), None) == [[50.0, 10.0, 1.0], [50.0, 10.0, 1.0]]  # a wrong map blurs the hands
