"""bench/hf_views.py end to end on a tiny plan: data, an RT-DETR teacher from scratch, both arms labeled,
selected and distilled, scores and ratios, resumable."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("transformers", reason="needs the hf extra (transformers)")


def test_tiny_bench_scores_both_arms_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bench_script: Callable[[str], ModuleType]
) -> None:
    bench = bench_script("hf_views")
    out = tmp_path / "hf_views.json"
    argv = ["--out", str(out), "--labeled", "8", "--unlabeled", "4", "--val", "4", "--size", "64", "--width", "8",
            "--queries", "20", "--iterations", "2", "--batch-size", "4"]  # fmt: skip
    assert bench.main(argv) == 0
    results = json.loads(out.read_text())
    assert list(results["arms"]) == ["identity", "default"]
    assert [results["arms"][a]["num_views"] for a in ("identity", "default")] == [1, 8]
    for arm in results["arms"].values():
        assert set(arm["pseudo_labels"]) == {"AP", "AP50", "AP75"} and set(arm["student"]) == {"AP", "AP50", "AP75"}
        assert arm["kept_per_image"] > 0  # the count rule kept about L's objects per image
    assert results["ratios_vs_identity"]["identity"]["pseudo_labels"] in (1.0, None)
    assert list(results["single_views"]) == ["hflip", "scale:0.75", "scale:1.25", "scale:1.5"]
    table = capsys.readouterr().out
    assert "student AP" in table and "teacher" in table
    assert bench.main(argv) == 0  # every stage done: skipped, the same scores
    assert json.loads(out.read_text())["arms"] == results["arms"]
