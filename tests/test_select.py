"""The select stage on hand-made shards: thresholds, written pseudo-labels, keypoint visibility."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from datadistill.data.coco import load_coco
from datadistill.data.label_folder import shard_schema, write_shard
from datadistill.data.label_table import FlatLabels, read_label_table
from datadistill.errors import UserError
from datadistill.runtime.io import write_json_atomic
from datadistill.stages.select import SelectConfig, cross_class_duplicates, select_pseudo_labels

KP = ["head", "left_hand", "right_hand"]


def _reference(path: Path, *, per_image: list[list[int]], keypoints: bool = False) -> None:
    images, anns = [], []
    for i, labels in enumerate(per_image, 1):
        images.append({"id": i, "file_name": f"l{i}.png", "width": 100, "height": 100})
        for c in labels:
            ann = {"id": len(anns) + 1, "image_id": i, "category_id": c + 1, "bbox": [10, 10, 20, 20], "iscrowd": 0}
            if keypoints:
                ann["keypoints"] = [15, 12, 2, 12, 20, 2, 25, 20, 0]  # 2 visible of 3
            anns.append(ann)
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    if keypoints:
        cats = [{"id": 1, "name": "a", "keypoints": KP, "skeleton": [[1, 2]]}, {"id": 2, "name": "b", "keypoints": KP}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def _shards(folder: Path, rows: list[tuple], *, k: int = 0, names=("a", "b")) -> None:
    """Rows ``(file_name, scores, labels, agreement[, boxes])``; boxes default to one box for all."""
    out = []
    for name, scores, labels, agreement, *boxes in rows:
        n = len(scores)
        flat = [float(v) for b in boxes[0] for v in b] if boxes else [1.0, 2.0, 30.0, 40.0] * n
        row = {"file_name": name, "width": 100, "height": 80, "boxes": flat, "scores": scores,
               "labels": labels, "agreement": agreement, "error": None}  # fmt: skip
        if k:
            row["keypoints"] = [v for j in range(n) for v in (5.0, 6.0, 0.9 - 0.1 * j, 7.0, 8.0, 0.5, 9.0, 9.0, 0.1)]
        out.append(row)
    out.append({"file_name": "broken.png", "width": 0, "height": 0, "boxes": [], "scores": [], "labels": [],
                "agreement": [], "error": "empty file", **({"keypoints": []} if k else {})})  # fmt: skip
    write_shard(folder / "shards" / "part-00000.parquet", out, shard_schema(k))
    write_json_atomic(folder / "manifest.json", {"status": "complete", "classes": {"names": list(names)}})


ROWS = [
    ("u1.png", [0.9, 0.8, 0.3], [0, 1, 0], [3, 1, 2]),
    ("u2.png", [0.7, 0.6], [0, 0], [2, 2]),
    ("u3.png", [0.2], [1], [1]),
    ("u4.png", [], [], []),
]


def test_count_policy_matches_the_labeled_mean(tmp_path: Path) -> None:
    _reference(tmp_path / "ref.json", per_image=[[0, 1], [0]])  # 1.5 objects per labeled image
    _shards(tmp_path / "labels", ROWS)
    # every box of ROWS is the same box: the paper's selection (no cross-class suppression) keeps them all
    out = select_pseudo_labels(SelectConfig(labels=str(tmp_path / "labels"), reference=str(tmp_path / "ref.json"),
                                            out=str(tmp_path / "sel" / "pseudo.json"), cross_class_iou=0.0))  # fmt: skip
    sel = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert sel["unlabeled_images"] == 4 and sel["target_objects"] == [6]  # 1.5 * 4
    assert sel["achieved_objects"] == 6 and sel["thresholds"] == pytest.approx({"a": 0.2, "b": 0.2})
    pseudo = load_coco(out)
    assert [im.file_name for im in pseudo.images] == ["u1.png", "u2.png", "u3.png", "u4.png"]  # empty kept, broken not
    assert pseudo.num_annotations == 6
    raw = json.loads(out.read_text())
    assert {a["agreement"] for a in raw["annotations"]} == {1, 2, 3} and all("score" in a for a in raw["annotations"])
    assert (tmp_path / "sel" / "scores.png").stat().st_size > 1000


def test_per_class_fixed_agreement_and_drop_empty(tmp_path: Path) -> None:
    _reference(tmp_path / "ref.json", per_image=[[0, 0], [0, 1]])  # a: 1.5/img, b: 0.5/img
    _shards(tmp_path / "labels", ROWS)
    common = {"labels": str(tmp_path / "labels"), "reference": str(tmp_path / "ref.json"), "cross_class_iou": 0.0}
    select_pseudo_labels(SelectConfig(**common, out=str(tmp_path / "pc" / "p.json"), policy="count-per-class"))
    sel = json.loads((tmp_path / "pc" / "selection.json").read_text())
    assert sel["thresholds"] == pytest.approx({"a": 0.3, "b": 0.2}) and sel["achieved_per_class"] == {"a": 4, "b": 2}
    out = select_pseudo_labels(SelectConfig(**common, out=str(tmp_path / "fx" / "p.json"), policy="fixed:0.65",
                                            min_agreement=2, drop_empty=True))  # fmt: skip
    pseudo = load_coco(out)
    assert [im.file_name for im in pseudo.images] == ["u1.png", "u2.png"]
    assert sorted(float(s) for lab in pseudo.labels.values() for s in lab.scores) == pytest.approx([0.7, 0.9])


def test_keypoints_marked_visible_to_match_the_labeled_mean(tmp_path: Path) -> None:
    _reference(tmp_path / "ref.json", per_image=[[0], [0]], keypoints=True)  # 1 per image, 2 of 3 visible
    _shards(tmp_path / "labels", [("u1.png", [0.9, 0.8], [0, 0], [2, 2]), ("u2.png", [], [], [])], k=3)
    out = select_pseudo_labels(SelectConfig(labels=str(tmp_path / "labels"), reference=str(tmp_path / "ref.json"),
                                            out=str(tmp_path / "s" / "p.json")))  # fmt: skip
    sel = json.loads((tmp_path / "s" / "selection.json").read_text())
    assert sel["reference_visible_keypoints_per_instance"] == 2.0
    assert sel["pseudo_visible_keypoints_per_instance"] == 2.0 and sel["keypoint_threshold"] == 0.5
    raw = json.loads(out.read_text())
    assert [a["keypoints"][2::3] for a in raw["annotations"]] == [[2, 2, 0], [2, 2, 0]]
    assert raw["annotations"][0]["keypoints"][6:8] == [0, 0]  # invisible points at (0, 0), as COCO has them


@pytest.mark.parametrize(
    ("policy", "threshold", "visible"),
    [("count:0.5", 0.8, [[2, 0, 0], [2, 0, 0]]), ("count:0.25", 0.9, [[2, 0, 0], [0, 0, 0]]),
     ("all", None, [[2, 2, 2], [2, 2, 2]])],
)  # fmt: skip
def test_keypoint_policy_marks_the_most_confident_keypoints(
    tmp_path: Path, policy: str, threshold: float | None, visible: list
) -> None:
    _reference(tmp_path / "ref.json", per_image=[[0], [0]], keypoints=True)  # 2 of 3 visible per instance
    # keypoint scores (0.9, 0.5, 0.1) and (0.8, 0.5, 0.1); count:F marks F x 2 x 2 of these 6 visible
    _shards(tmp_path / "labels", [("u1.png", [0.9, 0.8], [0, 0], [2, 2]), ("u2.png", [], [], [])], k=3)
    out = select_pseudo_labels(SelectConfig(labels=str(tmp_path / "labels"), reference=str(tmp_path / "ref.json"),
                                            out=str(tmp_path / "s" / "p.json"), keypoint_policy=policy))  # fmt: skip
    sel = json.loads((tmp_path / "s" / "selection.json").read_text())
    assert sel["keypoint_threshold"] == (None if threshold is None else pytest.approx(threshold))
    raw = json.loads(out.read_text())
    assert [a["keypoints"][2::3] for a in raw["annotations"]] == visible


@pytest.mark.parametrize("policy", ["count:0", "count:1.5", "count:", "some"])
def test_bad_keypoint_policy_is_one_line(tmp_path: Path, policy: str) -> None:
    _reference(tmp_path / "ref.json", per_image=[[0]], keypoints=True)
    _shards(tmp_path / "labels", ROWS, k=3)
    with pytest.raises(UserError, match=r"^--keypoint-policy must be count, count:F \(F in \(0, 1\]\) or all, got"):
        select_pseudo_labels(SelectConfig(labels=str(tmp_path / "labels"), reference=str(tmp_path / "ref.json"),
                                          out=str(tmp_path / "p.json"), keypoint_policy=policy))  # fmt: skip


def test_errors(tmp_path: Path) -> None:
    _reference(tmp_path / "ref.json", per_image=[[0]])
    common = {"reference": str(tmp_path / "ref.json"), "out": str(tmp_path / "p.json")}
    with pytest.raises(UserError, match="no manifest.json"):
        select_pseudo_labels(SelectConfig(labels=str(tmp_path / "none"), **common))
    _shards(tmp_path / "other", ROWS, names=("cat", "dog"))
    with pytest.raises(UserError, match=r"classes \['cat', 'dog'\]"):
        select_pseudo_labels(SelectConfig(labels=str(tmp_path / "other"), **common))
    _shards(tmp_path / "labels", ROWS)
    with pytest.raises(UserError, match="--policy: unknown policy 'top5'"):
        select_pseudo_labels(SelectConfig(labels=str(tmp_path / "labels"), policy="top5", **common))
    write_json_atomic(tmp_path / "labels" / "manifest.json", {"status": "running"})
    with pytest.raises(UserError, match="labeling is not complete"):
        select_pseudo_labels(SelectConfig(labels=str(tmp_path / "labels"), **common))


def test_ignore_band_writes_near_misses_as_crowd_regions(tmp_path: Path) -> None:
    from datadistill.data.coco import load_coco as load
    from datadistill.stages.evaluate import load_predictions
    from datadistill.stages.quality import match_pseudo_labels

    _reference(tmp_path / "ref.json", per_image=[[0], [0]])  # 1 object per labeled image
    a, a_again, b, c, d, e = [10, 10, 30, 30], [11, 10, 30, 31], [60, 10, 80, 30], [60, 50, 80, 70], [5, 5, 25, 25], [
        50, 40, 70, 60]  # fmt: skip
    rows = [("u1.png", [0.9, 0.6, 0.55, 0.2], [0, 0, 1, 0], [1, 1, 1, 1], [a, b, a_again, c]),
            ("u2.png", [0.8, 0.45], [0, 1], [1, 1], [d, e]), ("u3.png", [], [], [], [])]  # fmt: skip
    _shards(tmp_path / "labels", rows)
    common = {"labels": str(tmp_path / "labels"), "reference": str(tmp_path / "ref.json")}
    # 3 objects for 3 images: threshold 0.6; the band [0.3, 0.6) holds 0.55 (the first object seen again as
    # class b: IoU 0.9 with it, so not an ignore region) and 0.45 (an object of its own: an ignore region)
    out = select_pseudo_labels(SelectConfig(**common, out=str(tmp_path / "s" / "p.json"), ignore_band=0.5))
    raw = json.loads(out.read_text())
    got = [(a["iscrowd"], round(a["score"], 2), a["bbox"]) for a in raw["annotations"]]
    assert got == [(0, 0.9, [10, 10, 20, 20]), (0, 0.6, [60, 10, 20, 20]), (0, 0.8, [5, 5, 20, 20]),
                   (1, 0.45, [50, 40, 20, 20])]  # fmt: skip
    sel = json.loads((tmp_path / "s" / "selection.json").read_text())
    assert sel["achieved_objects"] == 3 and sel["ignore_regions"] == 1 and sel["ignore_band"] == 0.5
    # ignore regions are neither pseudo objects when scored, nor predictions when evaluated
    assert match_pseudo_labels(load(out), load(out)).at(0.0)["kept"] == 3
    assert len(load_predictions(out, load(out))) == 3
    plain = select_pseudo_labels(SelectConfig(**common, out=str(tmp_path / "p" / "p.json")))
    assert [a["iscrowd"] for a in json.loads(plain.read_text())["annotations"]] == [0, 0, 0]
    with pytest.raises(UserError, match=r"--ignore-band must be in \[0, 1\), got 1.0"):
        select_pseudo_labels(SelectConfig(**common, out=str(tmp_path / "x" / "p.json"), ignore_band=1.0))


def test_cross_class_iou_keeps_one_class_per_object(tmp_path: Path) -> None:
    _reference(tmp_path / "ref.json", per_image=[[0, 0, 1]])  # 3 objects per labeled image
    a, a_as_b, b, c = [10, 10, 30, 30], [10, 11, 30, 30], [12, 12, 40, 40], [60, 60, 80, 80]
    # u1: an object seen as a (0.9) and as b (0.8, IoU 0.95: a duplicate); b overlaps a by IoU 0.37 (an object);
    # u2: c as b (0.7) and as a (0.6, IoU 1: dropped); the a at 0.1 elsewhere is an object
    rows = [("u1.png", [0.9, 0.8, 0.5], [0, 1, 1], [1, 1, 1], [a, a_as_b, b]),
            ("u2.png", [0.7, 0.6, 0.1], [1, 0, 0], [1, 1, 1], [c, c, a]),
            # u3: greedy, as NMS: the b that a first object drops does not drop the a after it (IoU 0.25 with the
            # first, 0.54 with the b)
            ("u3.png", [0.9, 0.8, 0.7], [0, 1, 0], [1, 1, 1], [[0, 0, 20, 20], [6, 0, 26, 20], [12, 0, 32, 20]])]  # fmt: skip
    _shards(tmp_path / "labels", rows)
    common = {"labels": str(tmp_path / "labels"), "reference": str(tmp_path / "ref.json")}
    out = select_pseudo_labels(SelectConfig(**common, out=str(tmp_path / "s" / "p.json"), cross_class_iou=0.5))
    raw_text = out.read_text()
    raw = json.loads(raw_text)
    got = [(a["category_id"], round(a["score"], 2)) for a in raw["annotations"]]
    assert got == [(1, 0.9), (2, 0.5), (2, 0.7), (1, 0.1), (1, 0.9), (1, 0.7)]
    sel = json.loads((tmp_path / "s" / "selection.json").read_text())
    assert sel["achieved_objects"] == 6 and sel["cross_class_duplicates"] == 3
    assert sel["achieved_per_class"] == {"a": 4, "b": 2}
    assert select_pseudo_labels(SelectConfig(**common, out=str(tmp_path / "d" / "p.json"))).read_text() == raw_text
    plain = select_pseudo_labels(SelectConfig(**common, out=str(tmp_path / "p" / "p.json"), cross_class_iou=0.0))
    assert len(json.loads(plain.read_text())["annotations"]) == 9  # the count rule: 3 x 3 images
    with pytest.raises(UserError, match=r"--cross-class-iou must be in \[0, 1\] \(0: off\), got 1.5"):
        select_pseudo_labels(SelectConfig(**common, out=str(tmp_path / "x" / "p.json"), cross_class_iou=1.5))


def _random_candidates(rng: np.random.Generator, n: int, images: int, classes: int) -> tuple[np.ndarray, ...]:
    """Boxes on a coarse grid (so that IoUs land exactly on 0.5, 1/3, 1 and 0 often), some repeated under
    another class, a few of zero area; scores in steps of 0.05 (ties); image keys in random order."""
    xy = rng.integers(0, 8, (n, 2)) * 4.0
    wh = rng.integers(0, 4, (n, 2)) * 4.0  # 0: a zero-area box
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.integers(1, 20, n) * 0.05
    labels = rng.integers(0, classes, n)
    image = rng.integers(0, images, n)
    again = rng.random(n) < 0.3  # the previous candidate's box and image under another class
    again[0] = False
    boxes[again] = boxes[np.flatnonzero(again) - 1]
    image[again] = image[np.flatnonzero(again) - 1]
    labels[again] = (labels[np.flatnonzero(again) - 1] + 1) % classes
    return boxes, scores, labels, image


@pytest.mark.parametrize("iou_thr", [0.5, 1 / 3, 1.0, 0.05, 0.7])
def test_cross_class_duplicates_match_the_python_reference(
    iou_thr: float, bench_script: Callable[[str], ModuleType]
) -> None:
    rng = np.random.default_rng(int(iou_thr * 1000))
    boxes, scores, labels, image = _random_candidates(rng, 20_000, 600, 3)
    among = rng.random(scores.size) < 0.9
    got = cross_class_duplicates(boxes, scores, labels, image, among=among, iou_thr=iou_thr)
    want = bench_script("select_speed").python_reference(boxes, scores, labels, image, among=among, iou_thr=iou_thr)
    assert 500 < want.sum() < among.sum() and np.array_equal(got, want)
    assert not got[~among].any()
    # one threshold for all classes: dropping the duplicates, then thresholding = thresholding, then dropping
    above = among & (scores >= 0.5)
    after = cross_class_duplicates(boxes, scores, labels, image, among=above, iou_thr=iou_thr)
    assert np.array_equal(after, got & above)


def test_cross_class_duplicates_edges() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 0, 0], [0, 0, 0, 0]], float)
    args = (np.array([0.9, 0.8, 0.8, 0.7, 0.6]), np.array([0, 1, 0, 0, 1]), np.array([0, 0, 0, 1, 1]))
    everything = np.ones(5, bool)
    # the b at 0.8 is the a seen again; the second a is of the same class; zero-area boxes overlap nothing
    got = cross_class_duplicates(boxes, *args, among=everything, iou_thr=1.0)
    assert got.tolist() == [False, True, False, False, False]
    assert not cross_class_duplicates(boxes, *args, among=everything, iou_thr=0.0).any()  # 0: off
    # one class among the candidates (keypoint tasks): nothing to do
    assert not cross_class_duplicates(boxes, *args, among=args[1] == 0, iou_thr=0.5).any()
    # the a at 0.9 not among them: the b and the second a tie at 0.8, and the earlier (the b) goes first
    got = cross_class_duplicates(boxes, *args, among=np.arange(5) > 0, iou_thr=0.5)
    assert got.tolist() == [False, False, True, False, False]


def _twice_per_object(rng: np.random.Generator, images: int) -> list[tuple]:
    """Rows with 2 to 6 objects per image, each listed twice: as class a and as class b (a box moved by half
    a pixel, a score 0.001 to 0.01 lower or higher), as a DETR-family teacher lists a query once per class."""
    rows = []
    for i in range(images):
        n = int(rng.integers(2, 7))
        x = np.arange(n) * 16.0  # the objects do not overlap each other
        scores, labels, boxes = [], [], []
        for k in range(n):
            s, d, first = float(rng.uniform(0.1, 0.9)), float(rng.uniform(0.001, 0.01)), int(rng.integers(0, 2))
            scores += [s, s - d]
            labels += [first, 1 - first]
            boxes += [[x[k], 10.0, x[k] + 12, 50.0], [x[k] + 0.5, 10.0, x[k] + 12.5, 50.5]]
        rows.append((f"u{i}.png", scores, labels, [1] * 2 * n, boxes))
    return rows


def test_count_rule_counts_objects_not_class_hypotheses(tmp_path: Path) -> None:
    _reference(tmp_path / "ref.json", per_image=[[0, 1, 0], [1, 0, 1]])  # 3 objects per labeled image
    _shards(tmp_path / "labels", _twice_per_object(np.random.default_rng(0), 40))
    common = {"labels": str(tmp_path / "labels"), "reference": str(tmp_path / "ref.json")}
    out = select_pseudo_labels(SelectConfig(**common, out=str(tmp_path / "s" / "p.json")))
    sel = json.loads((tmp_path / "s" / "selection.json").read_text())
    assert sel["unlabeled_images"] == 40 and sel["target_objects"] == [120]
    assert sel["achieved_objects"] == 120 and sel["achieved_per_image"] == sel["target_per_image"] == 3.0
    assert sel["cross_class_duplicates"] == sel["candidates"] // 2  # every object's second class
    kept = load_coco(out)
    assert sum(len(lab.boxes) for lab in kept.labels.values()) == 120
    # what it did before: the count threshold on the class hypotheses, the duplicates dropped after it
    plain = select_pseudo_labels(SelectConfig(**common, out=str(tmp_path / "p" / "p.json"), cross_class_iou=0.0))
    hypotheses = json.loads(plain.read_text())["annotations"]
    assert len(hypotheses) == 120
    boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                      for a in hypotheses])  # fmt: skip
    scores, labels = np.array([a["score"] for a in hypotheses]), np.array([a["category_id"] for a in hypotheses])
    image = np.array([a["image_id"] for a in hypotheses])
    old = cross_class_duplicates(boxes, scores, labels, image, among=np.ones(len(hypotheses), bool), iou_thr=0.5)
    assert 0.45 < (len(hypotheses) - old.sum()) / 120 < 0.55  # about half of the target


@pytest.mark.parametrize("policy", ["count", "count-per-class", "fixed:0.4"])
def test_without_cross_class_duplicates_the_filter_changes_nothing(tmp_path: Path, policy: str) -> None:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(30):
        n = int(rng.integers(0, 8))
        # class a on the left half, class b on the right: boxes of other classes never overlap; boxes of the
        # same class do (per-class fusion leaves such pairs below its IoU)
        labels = rng.integers(0, 2, n).tolist()
        x = [float(rng.uniform(0, 30)) + 50.0 * c for c in labels]
        boxes = [[x0, 5.0, x0 + 20, 25.0] for x0 in x]
        rows.append((f"u{i}.png", rng.uniform(0.05, 1, n).round(3).tolist(), labels, rng.integers(1, 4, n).tolist(),
                     boxes))  # fmt: skip
    _reference(tmp_path / "ref.json", per_image=[[0, 0, 1], [0, 1]])
    _shards(tmp_path / "labels", rows)
    common = {"labels": str(tmp_path / "labels"), "reference": str(tmp_path / "ref.json"), "policy": policy,
              "min_agreement": 2, "ignore_band": 0.5}  # fmt: skip
    on = select_pseudo_labels(SelectConfig(**common, out=str(tmp_path / "on" / "p.json")))
    off = select_pseudo_labels(SelectConfig(**common, out=str(tmp_path / "off" / "p.json"), cross_class_iou=0.0))
    assert on.read_text() == off.read_text() and len(json.loads(on.read_text())["annotations"]) > 10
    sel_on, sel_off = (json.loads((p.parent / "selection.json").read_text()) for p in (on, off))
    for volatile in ("options", "seconds", "provenance", "cross_class_iou"):
        del sel_on[volatile], sel_off[volatile]
    assert sel_on == sel_off and sel_on["cross_class_duplicates"] == 0


# ----------------------------------------------------------------------------------------------------
# the streaming stage against the former one (tests/select_reference.py), bit for bit


def _random_folder(folder: Path, rng: np.random.Generator, *, num_keypoints: int, shards: int) -> None:
    """``shards`` shards of random candidates: float32 scores on a coarse grid (ties) and uniform, boxes that
    overlap within an image, 3 classes, agreement 1-4, some images empty and some skipped with an error."""
    for s in range(shards):
        rows = []
        for i in range(int(rng.integers(1, 12))):
            n = int(rng.integers(0, 9))
            grid = rng.random() < 0.5
            scores = (rng.integers(1, 21, n) / 20.0) if grid else rng.random(n)
            xy = rng.uniform(0, 60, (n, 2))
            wh = rng.uniform(2, 40, (n, 2))
            row = {"file_name": f"s{s}/u{i}.png", "width": 100, "height": 100,
                   "boxes": np.concatenate([xy, xy + wh], 1).reshape(-1).tolist(), "scores": scores.tolist(),
                   "labels": rng.integers(0, 3, n).tolist(), "agreement": rng.integers(1, 5, n).tolist(),
                   "error": None}  # fmt: skip
            if num_keypoints:
                kps = np.concatenate([rng.uniform(0, 100, (n, num_keypoints, 2)), rng.random((n, num_keypoints, 1))], 2)
                row["keypoints"] = kps.reshape(-1).tolist()
            if i and rng.random() < 0.1:
                row.update(width=0, height=0, boxes=[], scores=[], labels=[], agreement=[], error="broken")
                row.update({"keypoints": []} if num_keypoints else {})
            rows.append(row)
        write_shard(folder / "shards" / f"part-{s:05d}.parquet", rows, shard_schema(num_keypoints))
    write_json_atomic(folder / "manifest.json", {"status": "complete", "classes": {"names": ["a", "b", "c"]}})


def _random_reference(path: Path, rng: np.random.Generator, *, keypoints: bool) -> None:
    images, anns = [], []
    for i in range(1, int(rng.integers(2, 6))):
        images.append({"id": i, "file_name": f"l{i}.png", "width": 100, "height": 100})
        for c in rng.integers(0, 3, int(rng.integers(1, 7))):
            ann = {
                "id": len(anns) + 1,
                "image_id": i,
                "category_id": int(c) + 1,
                "bbox": [10, 10, 20, 20],
                "iscrowd": 0,
            }
            if keypoints:
                ann["keypoints"] = [15, 12, 2, 12, 20, int(rng.integers(0, 2)) * 2, 25, 20, 0]
            anns.append(ann)
    cats = [{"id": c + 1, "name": n, **({"keypoints": KP} if keypoints else {})} for c, n in enumerate("abc")]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


STREAM_CONFIGS = {
    "count": {},
    "count, no cross-class filter": {"cross_class_iou": 0.0},
    "count-per-class, agreement 2, drop empty": {"policy": "count-per-class", "min_agreement": 2, "drop_empty": True},
    "fixed 0.5, ignore band": {"policy": "fixed:0.5", "ignore_band": 0.5},
    "count, ignore band, drop empty": {"ignore_band": 0.3, "drop_empty": True},
    "count-per-class, ignore band, iou 0.3": {"policy": "count-per-class", "ignore_band": 0.6, "cross_class_iou": 0.3},
}


@pytest.mark.parametrize("keypoints", [0, 3], ids=["boxes", "keypoints"])
@pytest.mark.parametrize("name", list(STREAM_CONFIGS))
def test_streaming_select_equals_the_former_select_bit_for_bit(tmp_path: Path, name: str, keypoints: int) -> None:
    from select_reference import former_select

    kept = []
    for trial in range(4):
        rng = np.random.default_rng([list(STREAM_CONFIGS).index(name), keypoints, trial])
        base = tmp_path / str(trial)
        _random_folder(base / "labels", rng, num_keypoints=keypoints, shards=int(rng.integers(1, 5)))
        _random_reference(base / "ref.json", rng, keypoints=bool(keypoints))
        policy = {"keypoint_policy": "count:0.8"} if keypoints and trial % 2 else {}
        cfg = SelectConfig(labels=str(base / "labels"), reference=str(base / "ref.json"),
                           out=str(base / "sel" / "pseudo.json"), **STREAM_CONFIGS[name], **policy)  # fmt: skip
        out = select_pseudo_labels(cfg)
        coco, report = former_select(cfg)
        assert out.read_bytes() == json.dumps(coco, allow_nan=False).encode(), (name, trial)
        mine = json.loads((base / "sel" / "selection.json").read_text())
        for key in ("seconds", "provenance"):
            mine.pop(key), report.pop(key)
        assert mine == json.loads(json.dumps(report)), (name, trial)
        kept.append(report["achieved_objects"])
        # the label table beside the json holds the same images and objects, bit for bit
        table, coco_flat = read_label_table(out.parent / "pseudo.parquet"), FlatLabels.from_coco(load_coco(out))
        for field in ("image_ids", "widths", "heights", "name_offsets", "name_bytes", "offsets", "boxes", "labels",
                      "iscrowd", "keypoints"):  # fmt: skip
            mine, theirs = getattr(table, field), getattr(coco_flat, field)
            assert (mine is None and theirs is None) or np.array_equal(mine, theirs), (name, trial, field)
    assert min(kept) > 0, kept  # the data keep something: a comparison of empty outputs proves little


@pytest.mark.parametrize(
    ("rows", "policy"),
    [
        (ROWS, "count"),
        (ROWS, "count-per-class"),
        (ROWS, "fixed:0.65"),
    ],
)
def test_streaming_select_equals_the_former_on_the_hand_made_shards(tmp_path: Path, rows, policy: str) -> None:
    from select_reference import former_select

    _reference(tmp_path / "ref.json", per_image=[[0, 1], [0]])
    _shards(tmp_path / "labels", rows)
    cfg = SelectConfig(labels=str(tmp_path / "labels"), reference=str(tmp_path / "ref.json"),
                       out=str(tmp_path / "sel" / "pseudo.json"), policy=policy)  # fmt: skip
    out = select_pseudo_labels(cfg)
    assert out.read_bytes() == json.dumps(former_select(cfg)[0], allow_nan=False).encode()
