"""bench/writer_gil.py: the labeling writer's batch path against image by image, on the same objects."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType


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
