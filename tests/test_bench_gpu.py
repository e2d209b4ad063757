"""bench/gpu.py end to end on a CPU, tiny: the table's every column is measured and consistent."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest


def test_tiny_gpu_bench_runs_on_a_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bench_script: Callable[[str], ModuleType]
) -> None:
    bench = bench_script("gpu")
    out = tmp_path / "gpu.json"
    argv = ["--out", str(out), "--device", "cpu", "--models", "small_fcos", "--images", "4", "--size", "128",
            "--views", "identity,hflip", "--batch-size", "2", "--train-batch-size", "3", "--repeat", "1",
            "--train-iterations", "2",
            "--train-warmup", "1", "--workers", "0", "--threads", "1", "--work", str(tmp_path / "work")]  # fmt: skip
    assert bench.main(argv) == 0
    results = json.loads(out.read_text())
    (row,) = results["models"]
    assert row["precision"] == "fp32" and results["num_views"] == 2
    assert (results["batch_size"], results["train_batch_size"]) == (2, 3)
    for part in ("forward", "label", "label_sync"):
        assert row[part]["image_views_per_s"] > 0
    assert row["efficiency"] == pytest.approx(row["label"]["image_views_per_s"] / row["forward"]["image_views_per_s"])
    assert row["train_fp32"]["finite_losses"] and row["train_bf16"]["finite_losses"]
    assert math.isfinite(row["train_bf16_speedup"])
    assert "small_fcos" in capsys.readouterr().out


def test_gpu_bench_trains_alone_with_skip_label(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bench_script: Callable[[str], ModuleType]
) -> None:
    out = tmp_path / "gpu.json"
    argv = ["--out", str(out), "--device", "cpu", "--models", "small_fcos", "--images", "2", "--size", "128",
            "--skip-label", "--train-precisions", "fp32", "--batch-size", "2", "--train-iterations", "1",
            "--train-warmup", "1", "--workers", "0", "--threads", "1"]  # fmt: skip
    assert bench_script("gpu").main(argv) == 0
    (row,) = json.loads(out.read_text())["models"]
    assert "forward" not in row and "label" not in row and row["train_fp32"]["iterations_per_s"] > 0
    assert "nan" in capsys.readouterr().out  # the labeling columns, not measured


def test_writer_gil_bench_compares_both_paths_on_the_same_objects(
    tmp_path: Path, bench_script: Callable[[str], ModuleType]
) -> None:
    bench = bench_script("writer_gil")
    views = bench.parse_views("default")
    outputs = bench.make_outputs(views, batch=3, per_view=20, size=200, seed=1)
    batch, alone = bench.batch_path(outputs, views), bench.image_by_image(outputs, views)
    assert [d.boxes.tolist() for d in batch] == [d.boxes.tolist() for d in alone]
    assert sum(len(d) for d in batch) > 10
    out = tmp_path / "writer_gil.json"
    argv = [
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--per-view",
        "10",
        "--size",
        "200",
        "--ops",
        "2000",
        "--repeat",
        "1",
    ]
    assert bench.main(argv) == 0
    paths = json.loads(out.read_text())["paths"]
    assert paths["batch"]["torch_calls_per_batch"] < paths["image_by_image"]["torch_calls_per_batch"]
    assert all(p["model_slowdown"] > 0 and p["writer_ms_per_batch"] > 0 for p in paths.values())
