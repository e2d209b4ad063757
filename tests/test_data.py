"""DetectionDataset (targets, flip with the data set's flip map, scale jitter) and MixedBatchSampler."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from datadistill.data.coco import load_coco, parse_coco
from datadistill.data.dataset import (
    Augmentation,
    DetectionDataset,
    MixedBatchSampler,
    apply_augmentation,
    collate,
    sanitize,
)
from datadistill.errors import DataError

W, H = 64, 48  # not square, so that a swapped width and height shows


def _write_image(path: Path, boxes_xyxy: list[list[int]] | None = None) -> None:
    """A black image with white rectangles at integer boxes (an oracle for where the pixels go)."""
    arr = np.zeros((H, W, 3), np.uint8)
    for x1, y1, x2, y2 in boxes_xyxy or []:
        arr[y1:y2, x1:x2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _keypoint_coco(keypoint_names: list[str], flip_pairs: list[list[str]] | None) -> dict[str, Any]:
    category: dict[str, Any] = {"id": 7, "name": "figure", "keypoints": keypoint_names}
    if flip_pairs is not None:
        category["flip_pairs"] = flip_pairs
    k = len(keypoint_names)
    # keypoint 0 at (10, 20) visible, keypoint 1 at (30, 22) occluded-but-labeled, others unlabeled
    kps = [10, 20, 2, 30, 22, 1] + [0, 0, 0] * (k - 2)
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [8, 8, 16, 8], "keypoints": kps, "iscrowd": 0},
            {
                "id": 2,
                "image_id": 1,
                "category_id": 7,
                "bbox": [40, 30, 10, 10],
                "keypoints": [0, 0, 0] * k,
                "iscrowd": 1,
            },
        ],
        "categories": [category],
    }


def _dataset(tmp_path: Path, raw: dict[str, Any], **kwargs: Any) -> DetectionDataset:
    _write_image(tmp_path / "a.png", [[8, 8, 24, 16]])
    (tmp_path / "ann.json").write_text(json.dumps(raw))
    coco = load_coco(tmp_path / "ann.json", image_root=tmp_path)
    return DetectionDataset(coco, tmp_path, **kwargs)


@pytest.fixture
def box_coco() -> dict[str, Any]:
    return {
        "images": [{"id": 5, "file_name": "a.png", "width": W, "height": H}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 9, "bbox": [8, 8, 16, 8], "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [30, 20, 10, 20], "iscrowd": 0},
            {"id": 3, "image_id": 5, "category_id": 3, "bbox": [0, 0, 64, 48], "iscrowd": 1},
        ],
        "categories": [{"id": 3, "name": "a"}, {"id": 9, "name": "b"}],
    }


# ----------------------------------------------------------------------------------------------------
# the dataset


def test_dataset_returns_images_and_targets_with_the_documented_shapes(tmp_path: Path, box_coco) -> None:
    ds = _dataset(tmp_path, box_coco, train=False)
    image, target = ds[0]
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, H, W)
    assert 0.0 <= float(image.min()) and float(image.max()) == 1.0
    assert target["image_id"] == 5
    # the crowd annotation is not a target; labels are 0-based indices into the categories (3 -> 0, 9 -> 1)
    assert target["boxes"].dtype == torch.float32
    assert torch.equal(target["boxes"], torch.tensor([[8.0, 8, 24, 16], [30, 20, 40, 40]]))
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1, 0]
    assert "keypoints" not in target


def test_keypoint_dataset_targets_have_keypoints_and_no_crowd(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, _keypoint_coco(["nose", "left_eye", "right_eye"], None), train=False)
    _, target = ds[0]
    assert tuple(target["keypoints"].shape) == (1, 3, 3) and target["keypoints"].dtype == torch.float32
    assert target["keypoints"][0].tolist() == [[10, 20, 2], [30, 22, 1], [0, 0, 0]]


@pytest.mark.parametrize(
    ("names", "flip_pairs"),
    [
        pytest.param(["left_hand", "right_hand"], None, id="flip-map-derived-from-left-right-names"),
        pytest.param(["a", "b"], [["a", "b"]], id="flip-map-from-metadata-pairs-names-say-nothing"),
        pytest.param(["left_hand", "right_hand", "nose"], None, id="unpaired-third-keypoint-maps-to-itself"),
    ],
)
def test_flip_swaps_left_and_right_keypoints_with_the_data_sets_flip_map(
    tmp_path: Path, names: list[str], flip_pairs: list[list[str]] | None
) -> None:
    ds = _dataset(tmp_path, _keypoint_coco(names, flip_pairs), train=True, flip_prob=1.0, min_scale=1, max_scale=1)
    image, target = ds[0]
    # box [8, 8, 24, 16] -> [W - 24, 8, W - 8, 16]
    assert target["boxes"].tolist() == [[W - 24, 8, W - 8, 16]]
    kps = target["keypoints"][0].tolist()
    # the new keypoint 0 ("left") is the mirror of the old keypoint 1 ("right") at x = W - 30, and vice versa
    assert kps[0] == [W - 30, 22, 1]
    assert kps[1] == [W - 10, 20, 2]
    for rest in kps[2:]:
        assert rest == [0, 0, 0]  # unlabeled keypoints stay unlabeled at (0, 0)
    # the pixels moved with the box: the white rectangle now spans columns W-24 .. W-8
    cols = torch.nonzero(image[0].amax(0) > 0.5).flatten()
    assert (int(cols.min()), int(cols.max()) + 1) == (W - 24, W - 8)


def test_flip_twice_is_the_identity_for_images_boxes_and_keypoints() -> None:
    image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8)
    boxes = torch.tensor([[1.5, 2.25, 30.0, 40.5], [0.0, 0.0, 64.0, 48.0]])
    keypoints = torch.tensor([[[3.5, 4.0, 2.0], [20.25, 5.0, 1.0]], [[0.0, 0.0, 2.0], [64.0, 48.0, 2.0]]])
    flip = Augmentation(flip=True)
    once = apply_augmentation(image, boxes, keypoints, flip, flip_index=(1, 0))
    twice = apply_augmentation(*once, flip, flip_index=(1, 0))
    assert not torch.equal(once[1], boxes)
    assert torch.equal(twice[0], image)
    assert torch.equal(twice[1], boxes)
    assert torch.equal(twice[2], keypoints)


@pytest.mark.parametrize(
    ("aug", "box", "keypoint"),
    [
        # shrink: resized to 32 x 24, padded at the bottom and right: everything times 0.5
        pytest.param(Augmentation(scale=0.5), [4, 4, 12, 8], [5, 10], id="shrink-pads"),
        # grow: resized to 128 x 96, then the 64 x 48 window at (top=4, left=6): times 2, minus the offset
        pytest.param(Augmentation(scale=2.0, top=4, left=6), [10, 12, 42, 28], [14, 36], id="grow-crops"),
        pytest.param(Augmentation(scale=2.0, top=4, left=6, flip=True), [22, 12, 54, 28], [50, 36], id="grow-flip"),
    ],
)
def test_scale_jitter_moves_pixels_boxes_and_keypoints_together(
    aug: Augmentation, box: list[int], keypoint: list[int]
) -> None:
    arr = torch.zeros((3, H, W), dtype=torch.uint8)
    arr[:, 8:16, 8:24] = 255  # the box [8, 8, 24, 16]
    boxes = torch.tensor([[8.0, 8.0, 24.0, 16.0]])
    keypoints = torch.tensor([[[10.0, 20.0, 2.0]]])
    image, out_boxes, out_kps = apply_augmentation(arr, boxes, keypoints, aug, flip_index=(0,))
    assert tuple(image.shape) == (3, H, W)
    assert out_boxes.tolist() == [box]
    assert out_kps[0, 0].tolist() == [*keypoint, 2.0]
    mask = image[0] > 127
    rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    assert [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1] == box


def test_dataset_scale_jitter_scales_boxes_and_keypoints_consistently(tmp_path: Path) -> None:
    raw = _keypoint_coco(["left_hand", "right_hand"], None)
    plain = _dataset(tmp_path, raw, train=False)[0][1]
    _, jittered = _dataset(tmp_path, raw, train=True, flip_prob=0.0, min_scale=0.5, max_scale=0.5)[0]
    assert torch.equal(jittered["boxes"], plain["boxes"] * 0.5)
    expected = plain["keypoints"].clone()
    expected[..., :2] *= 0.5
    assert torch.equal(jittered["keypoints"], expected)


def test_objects_and_keypoints_that_leave_the_image_are_dropped_or_made_invisible(tmp_path: Path) -> None:
    raw = _keypoint_coco(["left_hand", "right_hand"], None)
    raw["annotations"][1]["iscrowd"] = 0  # a second object at [40, 30, 50, 40], no labeled keypoints
    ds = _dataset(tmp_path, raw, train=False)
    image = torch.zeros((3, H, W), dtype=torch.uint8)
    _, target = ds[0]
    # grow x3 and keep the window at top=20, left=0: the first object stays (partly), the second leaves
    aug = Augmentation(scale=3.0, top=20, left=0)
    _, boxes, kps = apply_augmentation(image, target["boxes"], target["keypoints"], aug, flip_index=(1, 0))
    boxes, labels, kps = sanitize(boxes, target["labels"], kps, height=H, width=W)
    assert boxes.tolist() == [[24, 4, 64, 28]]  # [24, 4, 72, 28] clipped; the other box was dropped
    assert labels.tolist() == [0] and tuple(kps.shape) == (1, 2, 3)
    # keypoint 0 (10, 20) -> (30, 40) stays; keypoint 1 (30, 22) -> (90, 46) left through the right side
    assert kps[0].tolist() == [[30, 40, 2], [0, 0, 0]]


def test_augmentation_is_a_pure_function_of_seed_epoch_and_index(tmp_path: Path, box_coco) -> None:
    def draws(epoch: int, seed: int = 0) -> list[list[float]]:
        ds = _dataset(tmp_path, box_coco, train=True, min_scale=0.5, max_scale=2.0, seed=seed)
        ds.set_epoch(epoch)
        return ds[0][1]["boxes"].tolist()

    assert draws(0) == draws(0)
    assert len({json.dumps(draws(e)) for e in range(4)}) > 1


def test_collate_keeps_lists(tmp_path: Path, box_coco) -> None:
    ds = _dataset(tmp_path, box_coco, train=False)
    images, targets = collate([ds[0], ds[0]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 2


def test_images_are_read_only_from_under_the_root(tmp_path: Path, box_coco) -> None:
    coco, _ = parse_coco(box_coco)
    box_coco["images"][0]["file_name"] = "../outside.png"
    _, problems = parse_coco(box_coco)  # the name is checked without an image root too
    assert "leaves the image root" in problems[0]
    # a data set made in code (not parsed) with that name: the dataset refuses it as it reads the image
    coco = dataclasses.replace(coco, images=(dataclasses.replace(coco.images[0], file_name="../outside.png"),
                                             *coco.images[1:]))  # fmt: skip
    _write_image(tmp_path / "outside.png")
    (tmp_path / "root").mkdir()
    with pytest.raises(DataError, match="leaves the image root"):
        DetectionDataset(coco, tmp_path / "root", train=False)[0]


def test_image_whose_size_differs_from_the_json_is_a_data_error(tmp_path: Path, box_coco) -> None:
    box_coco["images"][0]["width"] = 65
    with pytest.raises(DataError, match="64x48 but the json says 65x48"):
        _dataset(tmp_path, box_coco, train=False)[0]


# ----------------------------------------------------------------------------------------------------
# MixedBatchSampler


def _epoch(sampler: MixedBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize(
    ("batch_size", "ratio", "num_real", "num_pseudo", "pseudo_per_batch"),
    [
        pytest.param(5, 0.4, 20, 100, 2, id="paper-6-4-pseudo-set-larger-than-real"),
        pytest.param(5, 0.4, 20, 1, 2, id="pseudo-set-smaller-than-one-batch-share"),
        pytest.param(8, 0.4, 17, 3, 3, id="3.2-rounds-to-3-real-set-not-a-multiple"),
        pytest.param(2, 0.4, 5, 5, 1, id="smallest-batch-one-of-each"),
        pytest.param(10, 0.25, 30, 7, 3, id="2.5-rounds-half-up"),
        pytest.param(4, 0.0, 9, 0, 0, id="ratio-0-real-only"),
    ],
)
def test_every_batch_has_exactly_the_requested_mix(
    batch_size: int, ratio: float, num_real: int, num_pseudo: int, pseudo_per_batch: int
) -> None:
    sampler = MixedBatchSampler(num_real, num_pseudo, batch_size=batch_size, pseudo_ratio=ratio, seed=3)
    real_per_batch = batch_size - pseudo_per_batch
    for epoch in range(3):
        batches = _epoch(sampler, epoch)
        assert len(batches) == len(sampler) == num_real // real_per_batch  # one pass over the real images
        real = [i for b in batches for i in b if i < num_real]
        assert len(real) == len(set(real)) == len(batches) * real_per_batch
        for b in batches:
            assert len(b) == batch_size
            assert sum(1 for i in b if i >= num_real) == pseudo_per_batch
            assert all(0 <= i < num_real + num_pseudo for i in b)
        pseudo = [i - num_real for b in batches for i in b if i >= num_real]
        if num_pseudo >= len(pseudo):  # drawn without replacement
            assert len(set(pseudo)) == len(pseudo)


def test_pseudo_images_continue_through_reshuffled_passes_across_epochs() -> None:
    sampler = MixedBatchSampler(6, 12, batch_size=5, pseudo_ratio=0.4, seed=0)  # 2 batches x 2 = 4 per epoch
    per_epoch = [[i - 6 for b in _epoch(sampler, e) for i in b if i >= 6] for e in range(6)]
    # epochs 0-2 make one pass over the 12 pseudo images, epochs 3-5 a reshuffled second pass
    assert sorted(sum(per_epoch[:3], [])) == list(range(12))
    assert sorted(sum(per_epoch[3:], [])) == list(range(12))
    assert sum(per_epoch[:3], []) != sum(per_epoch[3:], [])


def test_batches_are_a_pure_function_of_seed_and_epoch() -> None:
    def make(seed: int) -> MixedBatchSampler:
        return MixedBatchSampler(40, 30, batch_size=5, pseudo_ratio=0.4, seed=seed)

    a, b = make(1), make(1)
    _epoch(a, 5)  # a sampler's history does not matter
    assert _epoch(a, 2) == _epoch(b, 2)
    assert _epoch(a, 2) != _epoch(a, 3)
    assert _epoch(make(2), 2) != _epoch(make(1), 2)


@pytest.mark.parametrize("num_pseudo", [200, 3], ids=["pseudo-large", "pseudo-small"])
def test_ranks_get_disjoint_shares_with_the_same_mix(num_pseudo: int) -> None:
    kwargs = dict(batch_size=5, pseudo_ratio=0.4, seed=7)
    single = _epoch(MixedBatchSampler(21, num_pseudo, **kwargs), 1)  # 7 batches
    ranks = [_epoch(MixedBatchSampler(21, num_pseudo, rank=r, world_size=2, **kwargs), 1) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 7 batches cut to 6, 3 per rank
    # the real images of the ranks' batches are those of the single-process epoch, dealt out round-robin
    assert [b[:3] for b in ranks[0]] == [b[:3] for b in single[0:6:2]]
    assert [b[:3] for b in ranks[1]] == [b[:3] for b in single[1:6:2]]
    real = [{i for b in r for i in b if i < 21} for r in ranks]
    assert not real[0] & real[1]
    if num_pseudo == 200:
        pseudo = [{i for b in r for i in b if i >= 21} for r in ranks]
        assert not pseudo[0] & pseudo[1]
    for r in ranks:
        assert all(sum(1 for i in b if i >= 21) == 2 for b in r)


@pytest.mark.parametrize(
    ("num_real", "world_size", "batch_size", "pseudo_ratio"),
    [
        pytest.param(1, 1, 8, 0.0, id="one-image-batch-of-8"),
        pytest.param(6, 1, 8, 0.0, id="six-images-batch-of-8"),
        pytest.param(2, 1, 5, 0.4, id="student-2-real-of-3"),
        pytest.param(3, 2, 4, 0.0, id="two-ranks"),
    ],
)
def test_a_real_set_smaller_than_a_batch_is_cycled(num_real: int, world_size: int, batch_size: int,
                                                   pseudo_ratio: float) -> None:  # fmt: skip
    def sampler(rank: int, seed: int = 0) -> MixedBatchSampler:
        return MixedBatchSampler(num_real, 7 if pseudo_ratio else 0, batch_size=batch_size, pseudo_ratio=pseudo_ratio,
                                 seed=seed, rank=rank, world_size=world_size)  # fmt: skip

    first = sampler(0)
    assert first.cycles_real and len(first) == 1
    real_per_batch = first.real_per_batch
    for epoch in range(4):
        batches = []
        for rank in range(world_size):
            s = sampler(rank)
            s.set_epoch(epoch)
            (batch,) = list(s)
            assert len(batch) == batch_size
            batches.append(batch[:real_per_batch])
            assert all(num_real <= i < num_real + 7 for i in batch[real_per_batch:])
        real = [i for b in batches for i in b]
        assert all(0 <= i < num_real for i in real)
        # every image appears, and none more than once above the others: whole reshuffled passes
        counts = [real.count(i) for i in range(num_real)]
        assert min(counts) >= len(real) // num_real and max(counts) <= -(-len(real) // num_real)
    a, b = sampler(0), sampler(0)
    a.set_epoch(3), b.set_epoch(3)
    assert list(a) == list(b)  # a pure function of (seed, epoch)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param(dict(pseudo_ratio=1.0), r"pseudo_ratio must be in \[0, 1\)", id="ratio-1"),
        pytest.param(dict(pseudo_ratio=-0.1), r"pseudo_ratio must be in \[0, 1\)", id="ratio-negative"),
        pytest.param(dict(batch_size=1), "batch_size 1 is too small for pseudo_ratio 0.4", id="batch-of-one"),
        pytest.param(dict(batch_size=2, pseudo_ratio=0.8), "too small", id="no-real-left"),
        pytest.param(dict(batch_size=10, pseudo_ratio=0.04), "too small", id="no-pseudo-rounds-to-zero"),
        pytest.param(dict(num_pseudo=0), "needs pseudo images", id="no-pseudo-images"),
        pytest.param(dict(rank=2, world_size=2), "rank", id="rank-out-of-range"),
    ],
)
def test_sampler_refuses_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    args = dict(num_real=10, num_pseudo=10, batch_size=5, pseudo_ratio=0.4, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        MixedBatchSampler(args.pop("num_real"), args.pop("num_pseudo"), **args)
