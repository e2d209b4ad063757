"""Defaults read from the data: the small models' input size, and ``views: auto`` (the rule, the label stage
that records what it chose, resume)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from datadistill.config import LabelConfig
from datadistill.data.coco import Category, CocoDataset, ImageLabels, ImageRecord, save_coco
from datadistill.errors import UserError
from datadistill.models import torchvision as models
from datadistill.stages.defaults import DataSizes, input_size, input_size_rule, sized_by_data, views_rule
from datadistill.stages.label import label


def _dataset(sides: list[tuple[int, int]], box_px: float, per_image: int = 2) -> CocoDataset:
    """Images of (width, height) ``sides``, each with ``per_image`` square boxes of ``box_px``, and a crowd region
    of half the image that the object statistics leave out."""
    images, labels = [], {}
    for i, (w, h) in enumerate(sides, 1):
        images.append(ImageRecord(id=i, file_name=f"{i}.png", width=w, height=h))
        boxes = [[2 * k, 2 * k, 2 * k + box_px, 2 * k + box_px] for k in range(per_image)] + [[0, 0, w / 2, h / 2]]
        n = len(boxes)
        labels[i] = ImageLabels(ids=np.arange(n) + 10 * i, boxes=np.asarray(boxes, float), labels=np.zeros(n, np.int64),
                                iscrowd=np.arange(n) == n - 1, area=np.full(n, box_px**2))  # fmt: skip
    return CocoDataset(images=tuple(images), labels=labels, categories=(Category(id=1, name="thing"),))


def test_data_sizes_are_medians_without_crowds() -> None:
    sizes = DataSizes.of(_dataset([(640, 480), (300, 200), (256, 256)], box_px=20))
    assert (sizes.short_px, sizes.long_px, sizes.object_px) == (256.0, 300.0, 20.0)


@pytest.mark.parametrize(
    ("short_px", "device_type", "size", "why"),
    [
        pytest.param(128, "cpu", 128, "median short side (128 px)", id="128px-data-trains-as-before"),
        pytest.param(64, "cpu", 128, "clamped to at least 128 px", id="small-images-at-least-the-own-size"),
        pytest.param(160, "cpu", 160, "(160 px)", id="within-the-range"),
        pytest.param(170, "cpu", 160, "(170 px)", id="rounded-to-32"),
        pytest.param(256, "cpu", 160, "clamped to at most (on a CPU) 160 px", id="cpu-cap"),
        pytest.param(256, "cuda", 256, "(256 px)", id="gpu-range"),
        pytest.param(1080, "cuda", 512, "clamped to at most (on a GPU) 512 px", id="gpu-cap"),
    ],
)
def test_input_size_rule(short_px: float, device_type: str, size: int, why: str) -> None:
    chosen, reason = input_size_rule(DataSizes(short_px, short_px, 20.0), device_type=device_type)
    assert chosen == size and why in reason


def test_only_the_small_models_take_their_size_from_the_data(caplog: pytest.LogCaptureFixture) -> None:
    assert sized_by_data("small_fcos") and sized_by_data("small_keypointrcnn")
    for model in ("fasterrcnn_resnet50_fpn_v2", "ssdlite320_mobilenet_v3_large", "yolo:yolo11n.yaml", "hf:x/y"):
        assert not sized_by_data(model), model
    data = _dataset([(200, 160)] * 3, box_px=20)
    with caplog.at_level(logging.INFO, logger="datadistill.stages.defaults"):
        assert input_size("small_fcos", data, device="cpu") == 160
    assert "training at 160 px: the labeled images' median short side (160 px)" in caplog.text
    assert input_size("fasterrcnn_resnet50_fpn_v2", data, device="cpu") is None


@pytest.mark.parametrize(
    ("sizes", "input_px", "views"),
    [
        # bench/tiles.py: 512 px images, objects of 13-100 px, a 192 px teacher: 3x3 tiles (2.5x)
        pytest.param(DataSizes(512, 512, 33.5), 192, "default,tile:3x3", id="tiles-bench-small-objects"),
        pytest.param(DataSizes(512, 512, 33.5), 256, "default,tile:2x2", id="shrunk-2x"),
        pytest.param(DataSizes(1024, 1024, 60), 256, "default,tile:4x4", id="shrunk-4x"),
        # the shapes data (128 px, objects of about 21 px) at the model's own size: no tiles
        pytest.param(DataSizes(128, 128, 21.5), 128, "default", id="shapes-128px"),
        # bench/real_trees.py: 256 px tiles, crowns of about 40 px, at the CPU's 160 px (1.6x): no tiles
        pytest.param(DataSizes(256, 256, 39.7), 160, "default", id="real-trees"),
        pytest.param(DataSizes(256, 256, 39.7), 128, "default,tile:2x2", id="real-trees-at-128-shrunk-2x"),
        pytest.param(DataSizes(160, 160, 8.0), 160, "default,tile:2x2", id="tiny-objects-at-full-size"),
        pytest.param(DataSizes(0, 0, 0), 128, "default", id="no-images"),
    ],
)
def test_views_rule(sizes: DataSizes, input_px: int, views: str) -> None:
    chosen, reason = views_rule(sizes, min_size=input_px, max_size=input_px)
    assert chosen == views and reason


def _teacher(folder: Path, labeled: Path) -> Path:
    """An untrained small_fcos at 128 px in a training folder whose config.yaml names ``labeled``."""
    torch.manual_seed(0)
    meta = models.ModelMeta(model="small_fcos", task="boxes", class_names=("thing",), category_ids=(1,))
    folder.mkdir(parents=True)
    models.save_checkpoint(folder / "checkpoint.pt", model=models.build_model(meta), meta=meta)
    (folder / "config.yaml").write_text(yaml.safe_dump({"data": str(labeled), "model": "small_fcos"}))
    return folder


def test_label_with_views_auto_records_the_views_it_chose_and_resumes(tmp_path: Path) -> None:
    from PIL import Image

    labeled = tmp_path / "labeled.json"
    save_coco(_dataset([(320, 320)] * 2, box_px=30), labeled)
    teacher = _teacher(tmp_path / "teacher", labeled)
    images = tmp_path / "unlabeled"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (320, 320, 3), dtype=np.uint8)).save(images / f"{i}.png")
    cfg = LabelConfig(model=str(teacher), images=str(images), out=str(tmp_path / "labels"), workers=0, device="cpu",
                      allow_weak_teacher=True, score_floor=0.01)  # fmt: skip
    assert cfg.views == "auto"  # the default
    label(cfg)
    manifest = json.loads((tmp_path / "labels" / "manifest.json").read_text())
    views = manifest["config"]["views"]
    # 320 px at 128 px is 2.5x: the default 8 views and the 9 tiles of a 3x3 grid (magnified 2.5x)
    assert len(views) == 17 and views[:2] == ["identity", "hflip"] and sum("tile:3x3" in v for v in views) == 9
    label(cfg)  # resumes: auto chooses the same views
    with pytest.raises(UserError, match="another views"):
        label(LabelConfig(**{**cfg.__dict__, "views": "default"}))
    # a teacher with no labeled data beside it: the default views
    (teacher / "config.yaml").unlink()
    label(LabelConfig(**{**cfg.__dict__, "out": str(tmp_path / "plain")}))
    assert len(json.loads((tmp_path / "plain" / "manifest.json").read_text())["config"]["views"]) == 8
