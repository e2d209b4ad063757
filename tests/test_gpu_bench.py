"""bench/gpu.py and bench/gpu_check.sh: the table's rows and ratios, a model that cannot run, the merge,
a tiny run on a CPU, and (slow) the whole device check in its QUICK mode."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def _result(models: list[dict[str, Any]], training: list[dict[str, Any]], command: str = "a") -> dict[str, Any]:
    return {"device": "cuda", "device_name": "fake", "torch": "x", "size": 640, "num_views": 8, "view_px": 1.34375,
            "batch_size": 8, "limit_batch": 32, "models": models, "training": training, "command": command,
            "total_seconds": 10.0}  # fmt: skip


def test_ratios_and_table_rows_from_a_fake_result(bench_script: Callable[[str], ModuleType]) -> None:
    bench = bench_script("gpu")
    good = {"model": "fasterrcnn_resnet50_fpn_v2", "precision": "bf16", "images": 128, "core_part": "backbone+FPN",
            "limit": {"images_per_s": 800.0, "peak_gib": 9.0}, "forward": {"image_views_per_s": 120.0, "peak_gib": 3.0},
            "label": {"image_views_per_s": 96.0, "peak_gib": 3.5}}  # fmt: skip
    bench.ratios(good)
    assert good["label_over_limit"] == pytest.approx(0.12) and good["label_over_forward"] == pytest.approx(0.8)
    half = {"model": "hf:rtdetr", "precision": "bf16", "images": 128, "limit": {"error": "AttributeError: no encoder"},
            "forward": {"image_views_per_s": 50.0}, "label": {"image_views_per_s": 45.0}}  # fmt: skip
    bench.ratios(half)
    assert "label_over_limit" not in half and half["label_over_forward"] == pytest.approx(0.9)
    missing = {"model": "yolo:yolo11n.yaml", "precision": "bf16", "images": 128,
               "error": "UserError: YOLO models need Ultralytics (ultralytics)"}  # fmt: skip
    trained = {"model": "fasterrcnn_resnet50_fpn_v2", "batch_size": 32, "images": 256,
               "train_fp32": {"iterations_per_s": 2.0, "peak_gib": 20.0},
               "train_bf16": {"error": "RuntimeError: out of memory"}}  # fmt: skip
    lines = bench.format_table(_result([good, half, missing], [trained])).splitlines()
    (r50,) = [line for line in lines if line.startswith("fasterrcnn_resnet50_fpn_v2") and "backbone" in line]
    assert r50.split()[1:10] == ["bf16", "128", "800.0", "120.0", "96.0", "0.12", "0.80", "9.0/3.0/3.5", "backbone+FPN"]
    (rt,) = [line for line in lines if line.startswith("hf:rtdetr ") and " bf16 " in line]
    assert rt.split()[3:7] == ["-", "50.0", "45.0", "-"]  # (a) failed: no (c)/(a)
    assert "hf:rtdetr limit: AttributeError: no encoder" in lines
    assert "yolo:yolo11n.yaml: not measured: UserError: YOLO models need Ultralytics (ultralytics)" in lines
    (train_line,) = [line for line in lines if line.startswith("fasterrcnn_resnet50_fpn_v2 ") and " 256 " in line]
    assert train_line.split()[1:6] == ["32", "256", "2.00", "-", "-"]
    assert "fasterrcnn_resnet50_fpn_v2 training train_bf16: RuntimeError: out of memory" in lines


def test_merge_keeps_every_run_s_rows_in_order(tmp_path: Path, bench_script: Callable[[str], ModuleType]) -> None:
    bench = bench_script("gpu")
    a = _result([{"model": "m1", "error": "x"}], [], command="one")
    b = _result([{"model": "m2", "error": "y"}], [{"model": "t", "batch_size": 32}], command="two")
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, result in zip(paths, (a, b), strict=True):
        path.write_text(json.dumps(result))
    merged = bench.merge(paths)
    assert [r["model"] for r in merged["models"]] == ["m1", "m2"] and merged["training"] == b["training"]
    assert merged["commands"] == ["one", "two"] and merged["total_seconds"] == 20.0
    assert bench.view_pixels("default", 640) == pytest.approx((2 + 2 * 0.5625 + 2 * 1.5625 + 2 * 2.25) / 8)


def test_tiny_gpu_bench_on_a_cpu_measures_a_model_and_says_why_another_cannot_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bench_script: Callable[[str], ModuleType]
) -> None:
    out = tmp_path / "gpu.json"
    argv = ["--out", str(out), "--device", "cpu", "--models", "small_fcos", "hf:not-a-bench-model", "--images", "2",
            "--size", "128", "--views", "identity,hflip", "--batch-size", "2", "--limit-batch", "2",
            "--limit-iterations", "1", "--limit-warmup", "1", "--train-models", "small_fcos", "--train-batch-size",
            "2", "--train-iterations", "1", "--train-warmup", "1", "--workers", "0", "--threads", "1",
            "--work", str(tmp_path / "work")]  # fmt: skip
    assert bench_script("gpu").main(argv) == 0
    results = json.loads(out.read_text())
    fcos, other = results["models"]
    assert fcos["precision"] == "fp32" and fcos["core_part"] == "backbone+FPN" and "error" not in fcos
    assert fcos["limit"]["images_per_s"] > 0 and fcos["forward"]["image_views_per_s"] > 0
    assert fcos["label_over_forward"] == pytest.approx(
        fcos["label"]["image_views_per_s"] / fcos["forward"]["image_views_per_s"]
    )
    assert other["error"].startswith("ValueError: hf:not-a-bench-model")
    (trained,) = results["training"]
    assert trained["train_fp32"]["finite_losses"] and trained["bf16_speedup"] > 0
    printed = capsys.readouterr().out
    assert "hf:not-a-bench-model: not measured" in printed and "small_fcos" in printed


@pytest.mark.slow
def test_device_check_quick_mode_runs_every_row_on_a_cpu(tmp_path: Path) -> None:
    """``QUICK=1 bash bench/gpu_check.sh``: every step ends, and every model's row is measured (needs
    Ultralytics and transformers, as the dev environment has)."""
    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
           "WHEELS": str(tmp_path / "no-wheels"), "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    merged = json.loads((tmp_path / "out" / "gpu.json").read_text())
    models = {r["model"]: r for r in merged["models"]}
    assert list(models) == ["fasterrcnn_resnet50_fpn_v2", "small_fcos", "yolo:yolo11n.yaml", "hf:rtdetr"]
    for row in models.values():
        assert "error" not in row and all(row[p]["image_views_per_s"] > 0 for p in ("forward", "label")), row
        assert row["limit"]["images_per_s"] > 0 and row["label_over_limit"] > 0
    (trained,) = merged["training"]
    assert trained["train_fp32"]["iterations_per_s"] > 0 and trained["train_bf16"]["iterations_per_s"] > 0
    steps = (tmp_path / "out" / "steps.txt").read_text().splitlines()
    assert len(steps) == 6 and all(": ok," in s for s in steps), steps
