"""review and merge on a hand-made labeling folder: the ranking, Label Studio's task format, round trips."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from datadistill.cli import main
from datadistill.data.coco import load_coco, validate_coco
from datadistill.data.label_folder import object_values, read_shards, shard_detections, shard_schema, write_shard
from datadistill.errors import UserError
from datadistill.runtime.io import write_json_atomic
from datadistill.stages.review import merge, object_doubt, review

W, H = 200, 100
# (file_name, scores, labels, agreement, boxes xyxy px) on W x H images, 4 views, threshold 0.5
ROWS = [
    ("confident.png", [0.95, 0.9], [0, 1], [4, 4], [[13.3, 7.7, 151.1, 66.6], [1.25, 2.5, 40.125, 99.0]]),
    ("doubtful.png", [0.52], [0], [1], [[20.2, 30.3, 60.6, 70.7]]),
    (
        "middle.png",
        [0.7, 0.1, 0.3],
        [1, 0, 0],
        [3, 1, 4],
        [[0.0, 0.0, 200.0, 100.0], [5.0, 5.0, 9.0, 9.0], [50.0, 50.0, 60.0, 60.0]],
    ),
    ("empty.png", [], [], [], []),
]


def _labeling(folder: Path, rows: list[tuple] = ROWS, spreads: dict[str, tuple[list, list]] | None = None) -> None:
    """A labeling folder; ``spreads``: per file name its (score_spread, box_spread) lists (default: none, as
    shards written before they were measured)."""
    spreads = spreads or {}
    out = [{"file_name": n, "width": W, "height": H, "boxes": [float(v) for b in bx for v in b], "scores": s,
            "labels": lab, "agreement": a, "score_spread": spreads.get(n, (None, None))[0],
            "box_spread": spreads.get(n, (None, None))[1], "error": None} for n, s, lab, a, bx in rows]  # fmt: skip
    out.append({"file_name": "broken.png", "width": 0, "height": 0, "boxes": [], "scores": [], "labels": [],
                "agreement": [], "error": "empty file"})  # fmt: skip
    write_shard(folder / "shards" / "part-00000.parquet", out, shard_schema(0))
    manifest = {"status": "complete", "classes": {"names": ["a", "b"]},
                "config": {"views": ["identity", "hflip", "scale:0.8", "scale:1.2"]}}  # fmt: skip
    write_json_atomic(folder / "manifest.json", manifest)


def _reference(path: Path) -> None:
    images = [{"id": i, "file_name": f"l{i}.png", "width": W, "height": H} for i in (1, 2)]
    anns = [{"id": i, "image_id": i, "category_id": i, "bbox": [10, 10, 20, 20], "iscrowd": 0} for i in (1, 2)]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    _labeling(tmp_path / "labels")
    _reference(tmp_path / "ref.json")
    (tmp_path / "selection.json").write_text(json.dumps({"thresholds": {"a": 0.5, "b": 0.5}, "min_agreement": 1}))
    return tmp_path


def _review(folder: Path, **kw: Any) -> dict[str, Any]:
    kw.setdefault("selection_path", folder / "selection.json")
    return review(folder / "labels", folder / "ref.json", out=folder / "rev", top=kw.pop("top", 10), **kw)


def _export(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What Label Studio's JSON export gives after a person accepted every pre-annotation."""
    out = copy.deepcopy(tasks)
    for i, t in enumerate(out, 1):
        t["id"] = i
        t["annotations"] = [{"id": i, "was_cancelled": False, "result": copy.deepcopy(t["predictions"][0]["result"])}]
    return out


@pytest.mark.parametrize(
    ("score", "agreement", "threshold", "expected"),
    [(0.5, 1, 0.5, (0.75 + 1.0) / 2),  # one view of four, on the threshold: the most doubtful
     (1.0, 4, 0.5, 0.0),  # every view, as far from the threshold as can be
     (0.2, 4, 0.2, 0.5),  # threshold 0.2: the scale is max(t, 1 - t) = 0.8
     (0.9, 2, np.inf, 0.25)],  # a class without a threshold: disagreement only
)  # fmt: skip
def test_object_doubt(score: float, agreement: int, threshold: float, expected: float) -> None:
    doubt, _ = object_doubt(np.array([score]), np.array([agreement]), np.array([threshold]), num_views=4)
    assert doubt[0] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("score_spread", "box_spread", "expected"),
    [(0.0, 0.0, (0.0 + 0.0 + 0.0 + 0.0) / 4),  # every view agrees on all four counts
     (0.25, 0.05, (0.0 + 0.0 + 0.5 + 0.5) / 4),  # half the largest score swing, half the full box wander
     (0.5, 0.3, (0.0 + 0.0 + 1.0 + 1.0) / 4),  # both capped at 1
     (np.nan, 0.05, (0.0 + 0.0 + 0.5) / 3),  # a term not measured is left out of the mean
     (np.nan, np.nan, 0.0)],  # an older shard: (d + c) / 2, as before the spreads were measured
)  # fmt: skip
def test_object_doubt_with_the_views_spread(score_spread: float, box_spread: float, expected: float) -> None:
    doubt, _ = object_doubt(np.array([1.0]), np.array([4]), np.array([0.5]), num_views=4,
                            score_spread=np.array([score_spread]), box_spread=np.array([box_spread]))  # fmt: skip
    assert doubt[0] == pytest.approx(expected)


def test_spreads_reorder_the_images_and_travel_to_coco(tmp_path: Path) -> None:
    """Two images alike in agreement and score: the one whose views swing and wander goes first."""
    box = [[20.0, 20.0, 60.0, 60.0]]
    rows = [("steady.png", [0.9], [0], [4], box), ("swinging.png", [0.9], [0], [4], box)]
    _labeling(tmp_path / "labels", rows, spreads={"steady.png": ([0.01], [0.0]), "swinging.png": ([0.3], [0.08])})
    _reference(tmp_path / "ref.json")
    (tmp_path / "selection.json").write_text(json.dumps({"thresholds": {"a": 0.5, "b": 0.5}, "min_agreement": 1}))
    summary = _review(tmp_path, top=1)
    assert [r["file_name"] for r in summary["ranking"]] == ["swinging.png", "steady.png"]
    # swinging: d 0, c 1 - 0.4 / 0.5 = 0.2, w 0.6, b 0.8
    assert summary["ranking"][0]["doubt"] == pytest.approx((0.0 + 0.2 + 0.6 + 0.8) / 4)
    assert summary["spreads_measured"] is True and "score_spread" in summary["formula"]
    ann = json.loads((tmp_path / "rev" / "coco.json").read_text())["annotations"][0]
    assert ann["score_spread"] == pytest.approx(0.3) and ann["box_spread"] == pytest.approx(0.08)


def test_older_shards_without_spreads_are_ranked_as_before(folder: Path) -> None:
    summary = _review(folder)
    assert summary["spreads_measured"].startswith("no: the shards hold no score_spread")
    assert summary["ranking"][0]["doubt"] == pytest.approx((0.75 + (1 - 0.02 / 0.5)) / 2)  # doubtful.png
    ann = json.loads((folder / "rev" / "coco.json").read_text())["annotations"][0]
    assert ann["score_spread"] is None and ann["box_spread"] is None


def test_a_shard_written_before_the_spread_columns_reads_them_as_null(folder: Path) -> None:
    part = folder / "labels" / "shards" / "part-00000.parquet"
    table = pq.read_table(part)
    old = table.drop_columns(["score_spread", "box_spread"])
    pq.write_table(old, part)
    _labeling(folder / "new", ROWS[:1], spreads={"confident.png": ([0.1, 0.2], [0.01, 0.02])})
    (folder / "new" / "shards" / "part-00000.parquet").rename(folder / "labels" / "shards" / "part-00001.parquet")
    whole = read_shards(folder / "labels")
    assert whole.schema.names == shard_schema(0).names and whole.num_rows == 7  # old and new shards together
    assert object_values(whole, "score_spread")[-2:].tolist() == pytest.approx([0.1, 0.2])
    assert np.isnan(object_values(whole, "box_spread")[:-2]).all()
    det = shard_detections(whole.to_pylist()[0], 0)
    assert det.score_spread is None and det.box_spread is None and len(det) == 2
    summary = _review(folder)
    assert summary["images_ranked"] == 5 and summary["spreads_measured"] is True


def test_ranking_puts_the_lone_object_near_the_threshold_first(folder: Path) -> None:
    summary = _review(folder, top=2)
    ranking = [r["file_name"] for r in summary["ranking"]]
    assert ranking == ["doubtful.png", "middle.png", "confident.png", "empty.png"]  # broken.png: never sent
    assert summary["images_sent"] == 2 and summary["num_views"] == 4
    tasks = json.loads((folder / "rev" / "tasks.json").read_text())
    assert [t["data"]["file_name"] for t in tasks] == ["doubtful.png", "middle.png"]
    assert tasks[0]["predictions"][0]["score"] == pytest.approx(summary["ranking"][0]["doubt"])
    xml = (folder / "rev" / "label_config.xml").read_text()
    assert '<RectangleLabels name="label" toName="image">' in xml and '<Label value="b"/>' in xml


def test_count_rule_without_a_selection(folder: Path) -> None:
    summary = _review(folder, selection_path=None)  # 1 object per labeled image, 4 images: keep the best 4
    assert summary["thresholds"] == pytest.approx({"a": 0.52, "b": 0.52})
    assert summary["thresholds_from"].startswith("count rule")


def test_label_studio_task_format_and_percent_round_trip(folder: Path) -> None:
    _review(folder)
    tasks = json.loads((folder / "rev" / "tasks.json").read_text())
    task = next(t for t in tasks if t["data"]["file_name"] == "confident.png")
    assert task["data"]["image"] == "/data/local-files/?d=confident.png"
    pred = task["predictions"][0]
    assert pred["model_version"].startswith("datadistill")
    region = pred["result"][0]
    assert {k: region[k] for k in ("type", "from_name", "to_name", "original_width", "original_height")} == {
        "type": "rectanglelabels", "from_name": "label", "to_name": "image", "original_width": W, "original_height": H
    }  # fmt: skip
    v = region["value"]
    assert v["rectanglelabels"] == ["a"] and region["score"] == pytest.approx(0.95)
    x1, y1, x2, y2 = np.float32([13.3, 7.7, 151.1, 66.6]).astype(np.float64)  # the shard holds float32
    assert (v["x"], v["y"], v["width"], v["height"]) == pytest.approx(
        (100 * x1 / W, 100 * y1 / H, 100 * (x2 - x1) / W, 100 * (y2 - y1) / H), abs=1e-9
    )
    back = (v["x"] / 100 * W, v["y"] / 100 * H, (v["x"] + v["width"]) / 100 * W, (v["y"] + v["height"]) / 100 * H)
    assert np.abs(np.array(back) - [x1, y1, x2, y2]).max() < 1e-6
    # below the threshold 0.5: far from it (0.1, closeness 0.2) not sent, nearer (0.3, closeness 0.6) sent
    middle = next(t for t in tasks if t["data"]["file_name"] == "middle.png")
    assert [r["score"] for r in middle["predictions"][0]["result"]] == pytest.approx([0.7, 0.3])
    _review(folder, image_url_prefix="https://bucket.example/imgs/")
    tasks = json.loads((folder / "rev" / "tasks.json").read_text())
    assert tasks[0]["data"]["image"] == "https://bucket.example/imgs/doubtful.png"


def _boxes_by_name(coco_path: Path) -> dict[str, np.ndarray]:
    ds = load_coco(coco_path)
    return {im.file_name: ds.labels[im.id].boxes for im in ds.images}


def test_label_studio_export_merges_back_as_real_labels(folder: Path) -> None:
    _review(folder)
    export = _export(json.loads((folder / "rev" / "tasks.json").read_text()))
    (folder / "export.json").write_text(json.dumps(export))
    summary = merge(folder / "ref.json", folder / "export.json", out=folder / "merged.json")
    assert summary["images_added"] == 4 and summary["images"] == 6
    assert validate_coco(folder / "merged.json") == []
    merged, sent = _boxes_by_name(folder / "merged.json"), _boxes_by_name(folder / "rev" / "coco.json")
    for name, boxes in sent.items():
        assert np.abs(merged[name] - boxes).max(initial=0) < 1e-6
    raw = json.loads((folder / "merged.json").read_text())
    assert len({a["id"] for a in raw["annotations"]}) == len(raw["annotations"])
    assert all("score" not in a for a in raw["annotations"])  # real labels now


def test_coco_export_through_cvat_merges_back(folder: Path) -> None:
    _review(folder, formats=("cvat",))
    assert not (folder / "rev" / "tasks.json").exists()
    coco = json.loads((folder / "rev" / "coco.json").read_text())
    assert {a["kept"] for a in coco["annotations"]} == {True, False}  # doubtful below the threshold sent too
    # what CVAT's "COCO 1.0" export gives back: its own category ids, no scores, extra fields
    cvat_id = {1: 9, 2: 7}
    cvat = {"licenses": [{"name": "", "id": 0, "url": ""}], "info": {"contributor": ""},
            "categories": [{"id": 7, "name": "b", "supercategory": ""}, {"id": 9, "name": "a", "supercategory": ""}],
            "images": [{**im, "id": im["id"] + 100, "license": 0} for im in coco["images"]],
            "annotations": [{"id": a["id"], "image_id": a["image_id"] + 100, "category_id": cvat_id[a["category_id"]],
                             "segmentation": [], "area": a["area"], "bbox": a["bbox"], "iscrowd": 0,
                             "attributes": {"occluded": False}} for a in coco["annotations"]]}  # fmt: skip
    (folder / "cvat.json").write_text(json.dumps(cvat))
    merge(folder / "ref.json", folder / "cvat.json", out=folder / "merged.json")
    merged, sent = load_coco(folder / "merged.json"), load_coco(folder / "rev" / "coco.json")
    assert validate_coco(folder / "merged.json") == []
    for im in sent.images:
        new = next(m for m in merged.images if m.file_name == im.file_name)
        assert np.abs(merged.labels[new.id].boxes - sent.labels[im.id].boxes).max(initial=0) < 1e-9
        assert merged.labels[new.id].labels.tolist() == sent.labels[im.id].labels.tolist()


def _set_value(key: str, value: Any) -> Any:
    def edit(task: dict[str, Any]) -> None:
        task["annotations"][0]["result"][0]["value"][key] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [(lambda t: t["data"].update(file_name="l1.png"), "already labeled"),
     (_set_value("rectanglelabels", ["zebra"]), "unknown class 'zebra'"),
     (_set_value("x", 95.0), "outside the 200x100 image"),
     (_set_value("width", 0.0), "non-positive size"),
     (lambda t: t.update(annotations=[]), "has no annotation"),
     (lambda t: t["annotations"][0]["result"].append(
         {"id": "p", "type": "keypointlabels", "original_width": W, "original_height": H,
          "value": {"x": 50.0, "y": 50.0, "width": 0.5, "keypointlabels": ["head"]}}),
      "unknown keypoint name 'head' \\(the labeled set has no keypoints\\)")],
    ids=["already-labeled", "unknown-class", "box-outside", "zero-width", "no-annotation", "keypoint-in-a-box-task"],
)  # fmt: skip
def test_conflicts_are_one_line_errors_naming_the_task(folder: Path, edit: Any, message: str) -> None:
    _review(folder)
    export = _export(json.loads((folder / "rev" / "tasks.json").read_text()))
    edit(export[0])  # doubtful.png, task 1
    (folder / "export.json").write_text(json.dumps(export))
    with pytest.raises(UserError, match=message) as exc:
        merge(folder / "ref.json", folder / "export.json", out=folder / "merged.json")
    assert "task 1 (" in str(exc.value) and "\n" not in str(exc.value)
    assert not (folder / "merged.json").exists()


def test_cli_review_and_merge(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["review", "--labels", str(folder / "labels"), "--reference", str(folder / "ref.json"),
               "--selection", str(folder / "selection.json"), "--top", "3", "--out", str(folder / "rev")])  # fmt: skip
    assert rc == 0 and "sent 3 of 4 images" in capsys.readouterr().out
    (folder / "export.json").write_text(json.dumps(_export(json.loads((folder / "rev" / "tasks.json").read_text()))))
    args = ["merge", "--labeled", str(folder / "ref.json"), "--corrections", str(folder / "export.json")]
    assert main([*args, "--out", str(folder / "merged.json")]) == 0
    assert main(["validate", str(folder / "merged.json")]) == 0
    # merging the merged set again: every image is already labeled
    assert main(["merge", "--labeled", str(folder / "merged.json"), "--corrections", str(folder / "export.json"),
                 "--out", str(folder / "again.json")]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "already labeled" in err and "\n" not in err


# ----------------------------------------------------------------------------------------------------
# keypoints: synthetic stick figures, their true boxes and keypoints written as the pseudo-labels

KP_SCORE_SHOWN, KP_THR = 0.9, 0.5  # as bench/label_studio.py's make_keypoint_inputs writes them


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory, bench_script) -> Path:  # noqa: ANN001 (conftest's loader)
    """A keypoint labeling folder: 6 figure images of 128 px, the first 2 the labeled reference, the other 4
    labeled by "the teacher" with their true boxes and keypoints (score 0.9 where visible, 0.1 where hidden or
    out of the frame); a selection at 0.5 for boxes and keypoints (the Label Studio round trip's own inputs)."""
    folder = tmp_path_factory.mktemp("figures")
    bench_script("label_studio").make_keypoint_inputs(folder, size_px=128)
    review(folder / "labels", folder / "ref.json", out=folder / "rev", top=10, selection_path=folder / "selection.json")
    return folder


def _sent_keypoints(folder: Path) -> dict[str, np.ndarray]:
    """Per unlabeled image, the keypoints ``[N, K, 3]`` review should send: the true visible ones (as the
    shard's float32 holds them) with v 2, the others 0, 0, 0."""
    truth = load_coco(folder / "data" / "annotations.json")
    out = {}
    for im in truth.images[2:]:
        kp = truth.labels[im.id].keypoints.astype(np.float32).astype(np.float64)
        shown = kp[..., 2] == 2
        out[im.file_name] = np.where(shown[..., None], kp, 0.0)
    return out


def _merged_keypoints(path: Path, names: set[str]) -> dict[str, np.ndarray]:
    ds = load_coco(path)  # validates
    return {im.file_name: ds.labels[im.id].keypoints for im in ds.images if im.file_name in names}


def _assert_keypoints_back(merged: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> None:
    assert set(merged) == set(sent)
    for name, kp in sent.items():
        assert merged[name].shape == kp.shape
        assert np.abs(merged[name] - kp).max() < 1e-6, name


def test_keypoints_go_to_label_studio_as_keypointlabels_linked_to_their_box(figures: Path) -> None:
    xml = (figures / "rev" / "label_config.xml").read_text()
    assert '<KeyPointLabels name="keypoint" toName="image">' in xml and '<Label value="right_foot"/>' in xml
    assert '<RectangleLabels name="label" toName="image">' in xml and '<Label value="figure"/>' in xml
    tasks = json.loads((figures / "rev" / "tasks.json").read_text())
    sent = _sent_keypoints(figures)
    assert sorted(t["data"]["file_name"] for t in tasks) == sorted(sent)
    names = load_coco(figures / "ref.json").keypoint_category.keypoints
    for task in tasks:
        result = task["predictions"][0]["result"]
        boxes = [r for r in result if r["type"] == "rectanglelabels"]
        points = [r for r in result if r["type"] == "keypointlabels"]
        kp = sent[task["data"]["file_name"]]
        assert len(boxes) == len(kp) and len(points) == int((kp[..., 2] == 2).sum()) > 0
        w, h = task["data"]["width"], task["data"]["height"]
        for r in points:
            b = [x["id"] for x in boxes].index(r["parentID"])
            k = names.index(r["value"]["keypointlabels"][0])
            assert r["from_name"] == "keypoint" and r["score"] == pytest.approx(KP_SCORE_SHOWN)
            assert (r["value"]["x"] * w / 100, r["value"]["y"] * h / 100) == pytest.approx(
                tuple(kp[b, k, :2]), abs=1e-9
            )


def test_keypoints_through_a_label_studio_export_come_back(figures: Path, tmp_path: Path) -> None:
    export = _export(json.loads((figures / "rev" / "tasks.json").read_text()))
    (tmp_path / "export.json").write_text(json.dumps(export))
    summary = merge(figures / "ref.json", tmp_path / "export.json", out=tmp_path / "merged.json")
    sent = _sent_keypoints(figures)
    assert summary["images_added"] == 4 and summary["annotations_added"] == sum(len(k) for k in sent.values())
    assert validate_coco(tmp_path / "merged.json") == []
    _assert_keypoints_back(_merged_keypoints(tmp_path / "merged.json", set(sent)), sent)
    raw = json.loads((tmp_path / "merged.json").read_text())
    added = raw["annotations"][-summary["annotations_added"] :]  # in the export's order
    shown = [int((k[:, 2] == 2).sum()) for t in export for k in sent[t["data"]["file_name"]]]
    assert [a["num_keypoints"] for a in added] == shown and sum(shown) > 0


def test_keypoints_through_cvat_coco_come_back(figures: Path, tmp_path: Path) -> None:
    """What CVAT's "COCO 1.0" export of a skeleton task gives: its own ids, the keypoint schema on the
    category, ``keypoints`` and ``num_keypoints`` on every annotation."""
    coco = json.loads((figures / "rev" / "coco.json").read_text())
    cat = coco["categories"][0]
    cvat = {"licenses": [{"name": "", "id": 0, "url": ""}], "info": {"contributor": ""},
            "categories": [{"id": 4, "name": cat["name"], "supercategory": "", "keypoints": cat["keypoints"],
                            "skeleton": cat["skeleton"]}],
            "images": [{**im, "id": im["id"] + 100, "license": 0} for im in coco["images"]],
            "annotations": [{"id": a["id"] + 50, "image_id": a["image_id"] + 100, "category_id": 4, "segmentation": [],
                             "area": a["area"], "bbox": a["bbox"], "iscrowd": 0, "attributes": {"occluded": False},
                             "keypoints": a["keypoints"], "num_keypoints": a["num_keypoints"]}
                            for a in coco["annotations"]]}  # fmt: skip
    (tmp_path / "cvat.json").write_text(json.dumps(cvat))
    merge(figures / "ref.json", tmp_path / "cvat.json", out=tmp_path / "merged.json")
    assert validate_coco(tmp_path / "merged.json") == []
    sent = _sent_keypoints(figures)
    _assert_keypoints_back(_merged_keypoints(tmp_path / "merged.json", set(sent)), sent)


def _one_box(task: dict[str, Any]) -> dict[str, Any]:
    """The task's annotation cut to its first box and that box's keypoints."""
    result = task["annotations"][0]["result"]
    first = next(r for r in result if r["type"] == "rectanglelabels")
    task["annotations"][0]["result"] = [r for r in result if r is first or r.get("parentID") == first["id"]]
    return first


def test_keypoints_without_parent_id_go_to_the_box_that_holds_them(figures: Path, tmp_path: Path) -> None:
    export = _export(json.loads((figures / "rev" / "tasks.json").read_text()))
    _one_box(export[0])
    for r in export[0]["annotations"][0]["result"]:
        r.pop("parentID", None)
    (tmp_path / "export.json").write_text(json.dumps(export[:1]))
    merge(figures / "ref.json", tmp_path / "export.json", out=tmp_path / "merged.json")
    name = export[0]["data"]["file_name"]
    sent = _sent_keypoints(figures)[name][:1]
    _assert_keypoints_back(_merged_keypoints(tmp_path / "merged.json", {name}), {name: sent})


def _orphan(where: str) -> Any:
    """An edit: one box left, its first keypoint without a parentID, put ``where``."""

    def edit(task: dict[str, Any]) -> None:
        box = _one_box(task)
        point = next(r for r in task["annotations"][0]["result"] if r["type"] == "keypointlabels")
        point.pop("parentID")
        if where == "outside":
            box["value"].update(x=10.0, y=10.0, width=20.0, height=20.0)
            point["value"].update(x=90.0, y=90.0)
        else:  # the same box twice: the point is in both
            task["annotations"][0]["result"].append({**copy.deepcopy(box), "id": "twin"})

    return edit


def _keypoint_edit(**changes: Any) -> Any:
    def edit(task: dict[str, Any]) -> None:
        point = next(r for r in task["annotations"][0]["result"] if r["type"] == "keypointlabels")
        point["value"].update(changes.get("value", {}))
        point.update({k: v for k, v in changes.items() if k != "value"})

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [(_keypoint_edit(value={"keypointlabels": ["tail"]}), "unknown keypoint name 'tail'"),
     (_orphan("outside"), "has no parentID and lies outside every box"),
     (_orphan("twice"), "has no parentID and lies inside 2 boxes"),
     (_keypoint_edit(parentID="r999"), "parentID 'r999' names no box of the task"),
     (_keypoint_edit(value={"keypointlabels": []}), "needs one keypoint name")],
    ids=["unknown-name", "outside-every-box", "in-two-boxes", "parent-not-a-box", "no-name"],
)  # fmt: skip
def test_keypoint_conflicts_are_one_line_errors_naming_the_task(
    figures: Path, tmp_path: Path, edit: Any, message: str
) -> None:
    export = _export(json.loads((figures / "rev" / "tasks.json").read_text()))
    edit(export[0])
    (tmp_path / "export.json").write_text(json.dumps(export))
    with pytest.raises(UserError, match=message) as exc:
        merge(figures / "ref.json", tmp_path / "export.json", out=tmp_path / "merged.json")
    assert f"task 1 ({export[0]['data']['file_name']})" in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "merged.json").exists()
