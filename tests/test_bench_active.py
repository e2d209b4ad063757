"""bench/active.py at tiny sizes: the doubt arm sends review's top images, the random arm as many others; the
corrected images join the labeled set with their true labels and leave the pseudo-labels; the shards hold
the views' spreads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import active  # noqa: E402

from datadistill.data.coco import load_coco  # noqa: E402
from datadistill.data.label_folder import object_values, read_shards  # noqa: E402


def test_choose() -> None:
    ranking = [f"{i}.png" for i in range(10)]
    assert active.choose("doubt", ranking, budget=3, seed=0) == ["0.png", "1.png", "2.png"]
    drawn = active.choose("random", ranking, budget=3, seed=0)
    assert (
        len(set(drawn)) == 3
        and set(drawn) <= set(ranking)
        and drawn == active.choose("random", list(reversed(ranking)), budget=3, seed=0)
    )  # a function of the seed and the set, not of the ranking's order
    assert active.choose("none", ranking, budget=3, seed=0) == []


def test_tiny_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "active.json"
    args = ["--out", str(out), "--seeds", "0", "--labeled", "8", "--unlabeled", "12", "--val", "4", "--budget", "3",
            "--size", "64", "--iterations", "2", "--views", "identity,hflip"]  # fmt: skip
    assert active.main(args) == 0
    result = json.loads(out.read_text())
    seed = result["seeds"]["0"]
    work = tmp_path / "active_work" / "seed0"
    ranking = [r["file_name"] for r in json.loads((work / "review" / "review.json").read_text())["ranking"]]
    assert seed["arms"]["doubt"]["chosen"] == ranking[:3]
    assert len(set(seed["arms"]["random"]["chosen"])) == 3 and seed["arms"]["none"]["chosen"] == []
    truth = load_coco(work / "data" / "unlabeled_truth.json")
    true_count = {im.file_name: len(truth.labels[im.id]) for im in truth.images}
    for arm in ("random", "doubt"):
        chosen = set(seed["arms"][arm]["chosen"])
        labeled = load_coco(work / arm / "labeled.json")
        assert seed["arms"][arm]["labeled_images"] == len(labeled.images) == 8 + 3
        added = {im.file_name: len(labeled.labels[im.id]) for im in labeled.images if im.file_name in chosen}
        assert added == {n: true_count[n] for n in chosen}  # the true labels, every one
        assert seed["arms"][arm]["pseudo_label_errors_corrected"]["true"] == sum(added.values())
        pseudo = {im.file_name for im in load_coco(work / arm / "pseudo.json").images}
        assert not pseudo & chosen and len(pseudo) == 12 - 3
    spreads = object_values(read_shards(work / "labels", columns=["scores", "score_spread"]), "score_spread")
    assert not np.isnan(spreads).any()
    assert "teacher (L)" in capsys.readouterr().out and result["doubt_minus_random_AP"].keys() == {"0"}
