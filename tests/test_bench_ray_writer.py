"""bench/ray_writer.py, tiny: the driver's three arms write the same shards, and the whole path runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest


def test_tiny_ray_writer_bench_measures_every_arm_on_the_same_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bench_script: Callable[[str], ModuleType]
) -> None:
    pytest.importorskip("ray", reason="the Ray engine is optional: pip install 'datadistill[ray]'")
    bench = bench_script("ray_writer")
    out = tmp_path / "ray_writer.json"
    argv = ["--out", str(out), "--boxes", "10", "--keypoints", "0,3", "--driver-images", "45", "--images", "30",
            "--batch-size", "4", "--shard-size", "10", "--actors", "1", "--repeat", "2"]  # fmt: skip
    assert bench.main(argv) == 0
    results = json.loads(out.read_text())
    assert list(results["driver"]) == list(results["whole"]) == ["0", "3"]
    for k, keypoints in (("0", 0), ("3", 3)):
        driver = results["driver"][k]
        assert driver["same_values_as_former"] and driver["same_bytes_as_rows"]
        assert driver["values_per_image"] == 10 * (9 + 3 * keypoints)
        assert set(driver["images_per_s"]) == {"former", "rows", "arrow"} and min(driver["images_per_s"].values()) > 0
        assert [len(s) for s in driver["seconds"].values()] == [2, 2, 2]
        whole = results["whole"][k]
        assert (whole["images"], whole["actors"]) == (30, 1) and 0 < whole["driver_write_s"] < whole["loop_s"]
    table = capsys.readouterr().out
    assert "driver's part alone" in table and "whole `label --engine ray` path" in table


def test_the_fake_detector_gives_each_image_its_boxes_whatever_the_batch(
    bench_script: Callable[[str], ModuleType],
) -> None:
    import torch

    fake = bench_script("ray_writer").FakeDetector("fake", boxes=100, keypoints=2, size=32)
    images = [torch.full((3, 32, 32), v / 255) for v in (3, 0, 3, 19)]
    dets = fake.predict(images)
    assert [len(d) for d in dets] == [100] * 4 and dets[1].keypoints.shape == (100, 2, 3)
    assert torch.equal(dets[0].boxes, dets[2].boxes) and torch.equal(dets[0].boxes, dets[3].boxes)  # 19 % 16 == 3
    assert not torch.equal(dets[0].boxes, dets[1].boxes)
    boxes = dets[0].boxes
    assert bool((boxes[:, 2:] > boxes[:, :2]).all()) and float(boxes.max()) <= 32
