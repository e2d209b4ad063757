"""Synthetic large images with small objects (``make_shapes(small_objects=True)``, ``synth --small-objects``):
the counts and sizes promised, valid COCO, determinism, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datadistill.cli import main
from datadistill.data.coco import load_coco, validate_coco
from datadistill.data.synth import SMALL_SHAPE_COUNT, SMALL_SHAPE_SIZE_FRAC, make_shapes

SIZE = 256


@pytest.fixture(scope="module")
def small_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("small"), num_images=12, seed=0, size_px=SIZE, small_objects=True)


def test_many_small_shapes_per_image(small_json: Path) -> None:
    assert validate_coco(small_json, small_json.parent / "images") == []
    dataset = load_coco(small_json)
    counts = [len(dataset.labels[im.id]) for im in dataset.images]
    assert min(counts) >= SMALL_SHAPE_COUNT[0] and max(counts) <= SMALL_SHAPE_COUNT[1]
    assert np.mean(counts) > 10  # the default draws 1 to 8
    lab = [dataset.labels[im.id] for im in dataset.images]
    sides = (
        np.concatenate([np.maximum(x.boxes[:, 2] - x.boxes[:, 0], x.boxes[:, 3] - x.boxes[:, 1]) for x in lab]) / SIZE
    )
    # the longer box side of a visible shape: at most its extent (2.5%..20% of the side), log-uniform
    assert sides.max() <= SMALL_SHAPE_SIZE_FRAC[1] + 2 / SIZE
    assert np.median(sides) < 0.08 and sides.min() < 0.04


def test_small_objects_are_recorded_and_deterministic(small_json: Path, tmp_path: Path) -> None:
    info = json.loads(small_json.read_text())["info"]
    assert info["small_objects"] is True and info["size_px"] == SIZE
    again = make_shapes(tmp_path / "again", num_images=2, seed=0, size_px=SIZE, small_objects=True)
    for name in ("000001.png", "000002.png"):
        assert (again.parent / "images" / name).read_bytes() == (small_json.parent / "images" / name).read_bytes()
    plain = make_shapes(tmp_path / "default", num_images=1, seed=0, size_px=64)
    assert "small_objects" not in json.loads(plain.read_text())["info"]  # the default's json is unchanged


def test_cli_small_objects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["synth", "shapes", "--out", str(out), "--images", "2", "--size", "128", "--small-objects"]) == 0
    assert json.loads((out / "annotations.json").read_text())["info"]["small_objects"] is True
    assert main(["synth", "figures", "--out", str(tmp_path / "f"), "--images", "1", "--small-objects"]) == 1
    assert "--small-objects is for shapes only" in capsys.readouterr().err
