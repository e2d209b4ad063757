"""report.html on a hand-made run folder: the gain row, one threshold said once, AP in percent on an iteration
axis, unambiguous stage times, and the gallery of the images the views disagree on most."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from datadistill.data.label_folder import shard_schema, write_shard
from datadistill.runtime.io import write_json_atomic
from datadistill.stages import report

matplotlib.use("Agg")
W, H = 64, 48
# file_name, scores, labels, agreement, score_spread, box_spread, boxes: doubtful.png is the most doubtful
ROWS = [
    ("sure.png", [0.95], [0], [4], [0.01], [0.0], [[4.0, 4.0, 30.0, 30.0]]),
    ("doubtful.png", [0.56, 0.3], [1, 0], [1, 3], [0.3, 0.2], [0.08, 0.02], [[10, 10, 40, 30], [2, 2, 12, 12]]),
    ("middle.png", [0.8], [0], [3], [0.1], [0.03], [[20.0, 5.0, 60.0, 45.0]]),
]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path, ("a", "b"), [name for name, *_ in ROWS])


def make_run(tmp_path: Path, classes: tuple[str, str], file_names: list[str]) -> Path:
    """A run folder of one round whose labeling holds ROWS (with ``file_names`` for theirs), classes ``classes``."""
    run = tmp_path / "run"
    images = tmp_path / "images"
    images.mkdir()
    for name in file_names:
        Image.new("RGB", (W, H), (90, 140, 200)).save(images / name, format="png")
    rows = [{"file_name": n, "width": W, "height": H, "boxes": [float(v) for b in bx for v in b], "scores": s,
             "labels": lab, "agreement": a, "score_spread": ss, "box_spread": bs, "error": None}
            for n, (_, s, lab, a, ss, bs, bx) in zip(file_names, ROWS, strict=True)]  # fmt: skip
    label = run / "round-1" / "label"
    write_shard(label / "shards" / "part-00000.parquet", rows, shard_schema(0))
    write_json_atomic(label / "manifest.json", {"status": "complete", "classes": {"names": list(classes)},
                      "config": {"views": ["identity", "hflip", "scale:0.8", "scale:1.2"],
                                 "image_root": str(images)}})  # fmt: skip
    cats = [{"id": 1, "name": classes[0]}, {"id": 2, "name": classes[1]}]
    imgs = [{"id": i, "file_name": n, "width": W, "height": H} for i, n in enumerate(file_names, 1)]
    truth = {"images": imgs, "annotations": [{"id": 1, "image_id": 2, "category_id": 2, "bbox": [11, 10, 30, 20],
             "iscrowd": 0, "area": 600}], "categories": cats}  # fmt: skip
    write_json_atomic(tmp_path / "truth.json", truth)
    pseudo = {"images": imgs, "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 26, 26],
              "iscrowd": 0, "area": 676, "score": 0.95}], "categories": cats}  # fmt: skip
    write_json_atomic(run / "round-1" / "select" / "pseudo.json", pseudo)
    write_json_atomic(run / "round-1" / "select" / "selection.json", {
        "policy": "count", "thresholds": {classes[0]: 0.551, classes[1]: 0.551}, "min_agreement": 1, "achieved_objects": 5928,
        "unlabeled_images": 1800, "achieved_per_image": 3.29, "target_per_image": 4.26, "candidates": 431257,
        "cross_class_duplicates": 1749, "cross_class_iou": 0.5})  # fmt: skip
    (run / "config.yaml").write_text(f"_base: {tmp_path}\ndata: {{unlabeled_truth: truth.json}}\n")
    write_json_atomic(run / "teacher" / "eval" / "metrics.json", {"bbox": {"AP": 0.244, "AP50": 0.381, "AP75": None}})
    write_json_atomic(run / "round-1" / "student" / "eval" / "metrics.json",
                      {"bbox": {"AP": 0.262, "AP50": 0.396, "AP75": 0.292}})  # fmt: skip
    write_json_atomic(run / "timings.json", {"seconds": {"teacher": 42.4, "label": 1899.4}})
    return run


def test_report_mends_what_a_newcomer_found_confusing(run_dir: Path) -> None:
    page = report.write_report(run_dir).read_text()
    assert "<th>gain: student, round 1 − teacher (supervised)</th><td>+1.8</td><td>+1.5</td><td>–</td>" in page
    assert "threshold 0.551 (every class)" in page and "a: 0.551" not in page
    assert "Kept 5,928 objects on 1,800 unlabeled images" in page and "out of 431,257 candidates" in page
    assert "1,749 candidates were dropped before the threshold was chosen" in page and "the curve below" not in page
    assert "(one class per object); the precision/recall plot below still counts them" in page
    assert "<li>label: 1,899 s (31.7 min)</li>" in page and "<li>teacher: 42 s</li>" in page
    assert "The images the views disagree on most, round 1" in page
    assert "The 3 unlabeled images" in page and "Right: the held-back true labels" in page
    assert page.count("data:image/png;base64,") == 3  # PR, pseudo gallery, doubt gallery (no curves here)


def test_names_with_dollar_signs_are_drawn_as_written(tmp_path: Path) -> None:
    """Class and file names reach matplotlib as plain text: ``ring $x^$`` is no TeX to parse (it would raise)."""
    odd = ["sure $x^$.png", "doubtful $\\frac{.png", "middle $$.png"]
    run = make_run(tmp_path, ("ring $x^$", "b_$1"), odd)
    page = report.write_report(run).read_text()
    assert page.count("data:image/png;base64,") == 3  # PR, pseudo gallery, doubt gallery: all drawn
    assert "threshold 0.551 (every class)" in page


def test_doubt_gallery_without_truth_or_spreads_says_less(run_dir: Path) -> None:
    html = report.doubt_gallery(run_dir / "round-1" / "label", run_dir / "round-1" / "select" / "selection.json",
                                ("a", "b"), run_dir.parent / "images", None, count=2)  # fmt: skip
    assert "The 2 unlabeled images" in html and "held-back" not in html and "of the 4 views" in html


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(42.4, "42 s"), (119.0, "119 s"), (1899.4, "1,899 s (31.7 min)"), (12600.0, "12,600 s (3.5 h)")],
)
def test_format_seconds(seconds: float, text: str) -> None:
    assert report.format_seconds(seconds) == text


@pytest.mark.parametrize(
    ("thresholds", "text"),
    [({"circle": 0.551, "square": 0.551}, "threshold 0.551 (every class)"),
     ({"tree": 0.3}, "threshold 0.300"),
     ({"circle": 0.551, "square": 0.6}, "thresholds circle: 0.551, square: 0.600"),
     ({"circle": 0.551, "square": None}, "thresholds circle: 0.551, square: none")],
)  # fmt: skip
def test_thresholds_text(thresholds: dict[str, float | None], text: str) -> None:
    assert report.thresholds_text(thresholds) == text


def test_eval_points_are_in_iterations_and_percent() -> None:
    teacher = [{"type": "step", "iteration": 5, "loss": 1.0}] + [
        {"type": "epoch", "epoch": e, "it_s": 10.0 / 0.37, "time_s": 0.37, "val": {"bbox": {"AP": 0.1 * e}}}
        for e in (1, 2, 3)
    ]  # epochs of 10 iterations
    student = [{"type": "epoch", "epoch": 1, "it_s": 25.0, "time_s": 1.0},  # no validation this epoch
               {"type": "epoch", "epoch": 2, "it_s": 50.0, "time_s": 0.5, "val": {"bbox": {"AP": 0.25}}},
               {"type": "epoch", "epoch": 3, "iteration": 80, "val": {"bbox": {"AP": 0.3}}}]  # fmt: skip
    np.testing.assert_allclose(report.eval_points(teacher, "bbox"), [(10, 10.0), (20, 20.0), (30, 30.0)])
    np.testing.assert_allclose(report.eval_points(student, "bbox"), [(50, 25.0), (80, 30.0)])
    assert report.eval_points(student, "keypoints") == []


def test_the_band_spans_the_box_spread() -> None:
    import matplotlib.pyplot as plt
    from matplotlib.patches import PathPatch

    fig, ax = plt.subplots()
    obj = {"boxes": np.array([[10.0, 20.0, 50.0, 40.0]]), "labels": np.array([1]), "scores": np.array([0.6]),
           "agreement": np.array([2]), "kept": np.array([True]), "score_spread": np.array([0.2]),
           "box_spread": np.array([0.1])}  # fmt: skip
    report.draw_candidates(ax, obj, class_names=("a", "b"), num_views=4)
    (band,) = [p for p in ax.patches if isinstance(p, PathPatch)]
    vertices = band.get_path().vertices
    # +- 0.1 of the 40 x 20 px box: 4 px sideways, 2 px up and down
    np.testing.assert_allclose(vertices[:4], [[6, 18], [54, 18], [54, 42], [6, 42]])
    np.testing.assert_allclose(vertices[5:9], [[14, 22], [14, 38], [46, 38], [46, 22]])
    assert [t.get_text() for t in ax.texts] == ["b 0.60 2/4 ±0.20"]
    plt.close(fig)


def test_ap_table_gain_rows() -> None:
    table = report.ap_table(
        [("teacher", {"bbox": {"AP": 0.2, "AP50": 0.4}}), ("student", {"bbox": {"AP": 0.25, "AP50": 0.38}})],
        baseline="teacher",
    )
    assert "<th>gain: student − teacher</th><td>+5.0</td><td>-2.0</td><td>–</td>" in table
    assert "gain" not in report.ap_table([("teacher", {"bbox": {"AP": 0.2}})])
    assert json.dumps(table)  # plain text
