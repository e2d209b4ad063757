"""bench/tiles.py end to end on a tiny plan: data, teacher, one labeling per arm, scores, resumable."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest


def test_tiny_bench_scores_every_arm_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bench_script: Callable[[str], ModuleType]
) -> None:
    bench = bench_script("tiles")
    out = tmp_path / "tiles.json"
    argv = ["--out", str(out), "--threads", "1", "--workers", "0", "--labeled", "8", "--unlabeled", "4",
            "--size", "128", "--input-size", "64", "--iterations", "2", "--batch-size", "4",
            "--only", "default+tile:2x2"]  # fmt: skip
    assert bench.main(argv) == 0
    results = json.loads(out.read_text())
    assert list(results["arms"]) == ["default", "default+tile:2x2"]
    assert results["arms"]["default+tile:2x2"]["num_views"] == 12
    assert results["ratios_vs_default"]["default"]["AP"] in (1.0, None)
    assert set(results["arms"]["default"]["pseudo_labels"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    table = capsys.readouterr().out
    assert "default+tile:2x2" in table and "AP ratio" in table
    assert bench.main(argv) == 0  # every stage done: skipped, the same scores
    assert json.loads(out.read_text())["arms"] == results["arms"]
