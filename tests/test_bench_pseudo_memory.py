"""bench/pseudo_memory.py on a few hundred images: both files hold the same labels, and every row is measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from datadistill.data.coco import load_coco
from datadistill.data.inputs import load_pseudo_labels


def test_the_bench_measures_the_same_labels_in_both_files(
    bench_script, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    bench = bench_script("pseudo_memory")
    argv = ["pseudo_memory", "--work", str(tmp_path), "--sizes", "300", "--json-sizes", "300", "--iterations", "2",
            "--real-images", "10", "--out", str(tmp_path / "rows.json")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [(r["images"], r["file"]) for r in rows] == [(300, "pseudo.parquet"), (300, "pseudo.json")]
    for r in rows:
        assert 0 < r["startup_s"] < 60 and len(r["worker_peak_mb"]) == 2 and r["main_peak_mb"] > r["main_anon_mb"] > 0
    real = load_coco(tmp_path / "labeled" / "annotations.json")
    images = str(tmp_path / "pseudo_images")
    table, coco = (load_pseudo_labels(str(tmp_path / "pseudo_300" / name), images, real)
                   for name in ("pseudo.parquet", "pseudo.json"))  # fmt: skip
    assert table.num_objects == coco.num_objects > 300 * 3
    assert np.array_equal(table.offsets, coco.offsets) and np.array_equal(table.labels, coco.labels)
    assert np.array_equal(table.iscrowd, coco.iscrowd) and 0 < table.iscrowd.sum() < table.num_objects * 0.2
    # the json's xywh round trip moves a box by at most an ulp of its coordinates
    assert np.allclose(table.boxes, coco.boxes, rtol=0, atol=1e-12)
    assert (table.boxes[:, 2:] <= 96).all() and (table.boxes[:, 2:] > table.boxes[:, :2]).all()
