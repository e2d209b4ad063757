"""bench/keypoint_tta.py: the teacher of a keypoint accuracy work folder scored on U under several views."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

from datadistill.data.coco import load_coco
from datadistill.data.synth import make_figures
from datadistill.models import torchvision as models


def test_every_view_set_is_scored_on_the_first_images_of_u(
    tmp_path: Path, bench_script: Callable[[str], ModuleType]
) -> None:
    data = tmp_path / "work" / "data"
    coco = make_figures(data, num_images=3, seed=0)
    shutil.copy(coco, data / "unlabeled_truth.json")
    torch.manual_seed(0)
    meta = models.ModelMeta.from_dataset("small_keypointrcnn", load_coco(coco))
    (tmp_path / "work" / "supervised").mkdir()
    models.save_checkpoint(
        tmp_path / "work" / "supervised" / "checkpoint.pt", model=models.build_model(meta), meta=meta
    )
    out = tmp_path / "tta.json"
    assert bench_script("keypoint_tta").main([str(tmp_path / "work"), "--images", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 2
    rows = {k: v for k, v in result.items() if isinstance(v, dict)}
    assert len(rows) == 7 and "default" in rows and "identity" in rows
    assert all(0.0 <= v["keypoint_AP"] <= 100.0 and 0.0 <= v["box_AP"] <= 100.0 for v in rows.values())
    # the keypoint fusions share the default views' boxes
    boxes = {rows[k]["box_AP"] for k in ("default", "default, heatmap probabilities", "default, --keypoint-fuse mean")}
    assert len(boxes) == 1


def test_a_folder_without_a_teacher_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, bench_script: Callable[[str], ModuleType]
) -> None:
    assert bench_script("keypoint_tta").main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "supervised/checkpoint.pt: not found" in err and "\n" not in err
