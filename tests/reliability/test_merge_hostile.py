"""`merge` and `validate` against careless and hostile annotation-tool exports (issue 28).

Every case is an input made here: a Label Studio export or a CVAT "COCO 1.0" export with one field broken,
merged into a small labeled set (64 px images). Each gives one line naming the export, the task or image and
the field, or the correct result; none is a traceback, none loses a region silently, and no input file changes
(hashes before and after). The library function is called where the CLI adds nothing; a few CLI calls prove
the one-line path.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import cli, error_line
from PIL import Image

from datadistill.data.coco import load_coco, validate_coco
from datadistill.data.label_folder import shard_schema, write_shard
from datadistill.errors import UserError
from datadistill.runtime.io import write_json_atomic
from datadistill.stages.review import merge

SIZE = 64
LS_TASK = {
    "id": 7,
    "data": {"image": "/data/local-files/?d=new0.png"},
    "annotations": [{"id": 1, "was_cancelled": False, "result": [
        {"id": "r1", "type": "rectanglelabels", "from_name": "label", "to_name": "image", "original_width": SIZE,
         "original_height": SIZE, "value": {"x": 10.0, "y": 20.0, "width": 25.0, "height": 50.0, "rotation": 0,
                                            "rectanglelabels": ["a"]}}]}],
}  # fmt: skip
CVAT = {
    "images": [{"id": 1, "file_name": "new0.png", "width": SIZE, "height": SIZE}],
    "annotations": [{"id": 5, "image_id": 1, "category_id": 9, "bbox": [1.0, 2.0, 10.0, 20.0], "iscrowd": 0}],
    "categories": [{"id": 9, "name": "a"}],
}
KEYPOINTS = ["head", "tail"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ref.json`` (2 classes, one labeled image), ``ref_kp.json`` (a keypoint set), ``images/`` with the
    labeled image and two new ones, all 64 x 64 px."""
    root = tmp_path_factory.mktemp("merge")
    (root / "images").mkdir()
    for name in ("l0.png", "new0.png", "new1.png"):
        Image.new("RGB", (SIZE, SIZE), (90, 120, 30)).save(root / "images" / name)
    image = {"id": 1, "file_name": "l0.png", "width": SIZE, "height": SIZE}
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "iscrowd": 0}
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    (root / "ref.json").write_text(json.dumps({"images": [image], "annotations": [ann], "categories": cats}))
    kp_cat = {"id": 1, "name": "a", "keypoints": KEYPOINTS, "skeleton": [[1, 2]]}
    kp_ann = {**ann, "keypoints": [8, 8, 2, 16, 16, 2], "num_keypoints": 2}
    (root / "ref_kp.json").write_text(json.dumps({"images": [image], "annotations": [kp_ann], "categories": [kp_cat]}))
    return root


def _hashes(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*"))
            if p.is_file()}  # fmt: skip


def _export(tmp_path: Path, raw: Any) -> Path:
    path = tmp_path / "export.json"
    path.write_text(json.dumps(raw))
    return path


def _refused(base: Path, tmp_path: Path, raw: Any, *fragments: str, ref: str = "ref.json", **kw: Any) -> str:
    """merge ``raw`` into ``ref``: a one-line UserError naming the export and every fragment; no output, no
    input changed."""
    export = _export(tmp_path, raw)
    before = _hashes(base, tmp_path)
    with pytest.raises(UserError) as exc:
        merge(base / ref, export, out=tmp_path / "merged.json", **kw)
    message = str(exc.value)
    assert "\n" not in message and len(message) < 600, message
    for fragment in (str(export), *fragments):
        assert fragment in message, (fragment, message)
    assert not (tmp_path / "merged.json").exists()
    assert _hashes(base, tmp_path) == before
    return message


def _ls(edit: Callable[[dict[str, Any]], Any]) -> list[dict[str, Any]]:
    """A Label Studio export of one task, edited (``edit`` gets the task)."""
    task = copy.deepcopy(LS_TASK)
    edit(task)
    return [task]


def _region(task: dict[str, Any]) -> dict[str, Any]:
    return task["annotations"][0]["result"][0]


def _value(key: str, value: Any = None, *, drop: bool = False) -> Callable[[dict[str, Any]], None]:
    def edit(task: dict[str, Any]) -> None:
        v = _region(task)["value"]
        v.pop(key) if drop else v.__setitem__(key, value)

    return edit


def _field(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda task: _region(task).__setitem__(key, value)


# ---------------------------------------------------------------------------------------------------------
# tracebacks before: one line naming the file, the task and the field

LS_BROKEN = [
    pytest.param(_value("x", drop=True), "value.x", id="x-missing"),
    pytest.param(_value("x", None), "value.x", id="x-null"),
    pytest.param(_value("x", "abc"), "value.x", id="x-abc"),
    pytest.param(_value("x", 10**400), "value.x", id="x-401-digits"),
    pytest.param(_value("y", float("nan")), "value.y", id="y-nan"),
    pytest.param(_value("width", float("inf")), "value.width", id="width-inf"),
    pytest.param(_value("height", [1]), "value.height", id="height-list"),
    pytest.param(_value("rotation", "x"), "value.rotation", id="rotation-text"),
    pytest.param(_value("rectanglelabels", "a"), "value.rectanglelabels", id="labels-a-string"),
    pytest.param(_value("rectanglelabels", [None]), "value.rectanglelabels", id="labels-null"),
    pytest.param(_field("original_width", "64px"), "'original_width'", id="original-width-64px"),
    pytest.param(_field("original_width", float("nan")), "'original_width'", id="original-width-nan"),
    pytest.param(_field("original_width", float("inf")), "'original_width'", id="original-width-infinity"),
    pytest.param(_field("original_height", 0), "'original_height'", id="original-height-0"),
    pytest.param(_field("original_height", 10**400), "'original_height'", id="original-height-401-digits"),
    pytest.param(_field("value", [10, 20]), "'value' must be an object", id="value-a-list"),
    pytest.param(lambda t: t["annotations"][0].update(result={"id": "r1"}), "'result' must be a list",
                 id="result-an-object"),
    pytest.param(lambda t: t["annotations"][0].update(result=["r1"]), "result item #0", id="result-item-a-string"),
    pytest.param(lambda t: t.update(annotations={"result": []}), "'annotations' must be a list",
                 id="annotations-an-object"),
    pytest.param(lambda t: t.update(annotations=["x"]), "annotation #0 must be an object", id="annotation-a-string"),
    pytest.param(lambda t: t["data"].update(width="sixty", height=64), "'data.width'", id="data-width-sixty"),
    pytest.param(lambda t: [_region(t).pop(k) for k in ("original_width", "original_height")],
                 "no original_width/original_height", id="no-size"),
    pytest.param(lambda t: t["annotations"][0]["result"].append(
        {**copy.deepcopy(_region(t)), "id": "r2", "original_width": 128}), "differ from another region's",
                 id="regions-disagree-on-size"),
]  # fmt: skip


@pytest.mark.parametrize(("edit", "field"), LS_BROKEN)
def test_a_broken_label_studio_field_is_one_line(base: Path, tmp_path: Path, edit: Any, field: str) -> None:
    message = _refused(base, tmp_path, _ls(edit), "task 7 (new0.png)", field)
    if "result" not in field and "annotation" not in field and "data" not in field and "differ" not in field:
        assert "region r1" in message, message


def _cvat(edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    raw = copy.deepcopy(CVAT)
    edit(raw)
    return raw


def _ann(key: str, value: Any = None, *, drop: bool = False) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        a = raw["annotations"][0]
        a.pop(key) if drop else a.__setitem__(key, value)

    return edit


def _image(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda raw: raw["images"][0].__setitem__(key, value)


CVAT_BROKEN = [
    pytest.param(_ann("bbox", "ten"), ("annotation 5", "'bbox'"), id="bbox-ten"),
    pytest.param(_ann("bbox", [1, 2]), ("annotation 5", "'bbox'"), id="bbox-two-numbers"),
    pytest.param(_ann("bbox", None), ("annotation 5", "'bbox'"), id="bbox-null"),
    pytest.param(_ann("bbox", drop=True), ("annotation 5", "'bbox'"), id="bbox-missing"),
    pytest.param(_ann("bbox", [1, 2, float("nan"), 4]), ("annotation 5", "'bbox'"), id="bbox-nan"),
    pytest.param(_ann("category_id", "9"), ("annotation 5", "category_id"), id="category-id-text"),
    pytest.param(_ann("iscrowd", "no"), ("annotation 5", "'iscrowd'"), id="iscrowd-text"),
    pytest.param(_ann("keypoints", [1, 2, 2]), ("annotation 5", "has keypoints but the labeled set defines none"),
                 id="keypoints-in-a-box-task"),
    pytest.param(_image("width", "sixty"), ("image 1 (new0.png)", "'width'"), id="width-sixty"),
    pytest.param(_image("width", "64.9"), ("image 1 (new0.png)", "'width'"), id="width-64.9-text"),
    pytest.param(_image("height", 64.9), ("image 1 (new0.png)", "'height'"), id="height-64.9"),
    pytest.param(_image("id", "1"), ("image '1'", "'id'"), id="image-id-text"),
    pytest.param(lambda raw: raw.update(annotations={"0": CVAT["annotations"][0]}), ("'annotations' must be a list",),
                 id="annotations-an-object"),
    pytest.param(lambda raw: raw.update(annotations=[7]), ("annotation #0 must be an object",),
                 id="annotation-a-number"),
    pytest.param(lambda raw: raw.update(images=[7]), ("image #0 must be an object",), id="image-a-number"),
    pytest.param(lambda raw: raw.update(categories=[{"id": 9}]), ("category #0",), id="category-without-name"),
]  # fmt: skip


@pytest.mark.parametrize(("edit", "fragments"), CVAT_BROKEN)
def test_a_broken_cvat_field_is_one_line(base: Path, tmp_path: Path, edit: Any, fragments: tuple[str, ...]) -> None:
    _refused(base, tmp_path, _cvat(edit), *fragments)


# ---------------------------------------------------------------------------------------------------------
# silent loss before: an error, or with --skip-unsupported a counted warning


def _polygon(task: dict[str, Any]) -> None:
    task["annotations"][0]["result"].append({"id": "p1", "type": "polygonlabels", "original_width": SIZE,
                                             "original_height": SIZE, "value": {"points": [[1, 1], [5, 1], [5, 5]],
                                                                                "polygonlabels": ["a"]}})  # fmt: skip


def _untyped(task: dict[str, Any]) -> None:
    task["annotations"][0]["result"].append({"id": "u1", "value": {"x": 1, "y": 1, "width": 2, "height": 2}})


def _orphan_annotation(raw: dict[str, Any]) -> None:
    raw["annotations"].append({**CVAT["annotations"][0], "id": 6, "image_id": "1"})


@pytest.mark.parametrize(
    ("raw", "fragments", "kind"),
    [pytest.param(_ls(_polygon), ("task 7 (new0.png)", "region p1", "'polygonlabels' region"), "polygonlabels region",
                  id="label-studio-polygon"),
     pytest.param(_ls(_untyped), ("task 7 (new0.png)", "region u1", "without a 'type'"), "region without a type",
                  id="label-studio-region-without-type"),
     pytest.param(_cvat(_orphan_annotation), ("annotation 6", "image_id '1' matches no image"),
                  "annotation whose image_id matches no image", id="cvat-image-id-text")],
)  # fmt: skip
def test_what_merge_cannot_take_is_an_error_or_a_counted_skip(
    base: Path, tmp_path: Path, raw: Any, fragments: tuple[str, ...], kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    _refused(base, tmp_path, raw, *fragments, "--skip-unsupported")
    summary = merge(base / "ref.json", _export(tmp_path, raw), out=tmp_path / "merged.json", skip_unsupported=True)
    assert summary["skipped"] == {kind: 1}
    assert (summary["images_added"], summary["annotations_added"]) == (1, 1)  # the rectangle came through
    assert "left out 1 record merge cannot take" in caplog.text and kind in caplog.text
    assert load_coco(tmp_path / "merged.json").num_annotations == 2


def test_two_cvat_images_sharing_an_id_are_refused(base: Path, tmp_path: Path) -> None:
    raw = _cvat(lambda r: r["images"].append({"id": 1, "file_name": "new1.png", "width": SIZE, "height": SIZE}))
    _refused(base, tmp_path, raw, "image 1 (new1.png)", "the same id as image 1 (new0.png)")


@pytest.mark.parametrize(
    ("raw", "fragments"),
    [pytest.param(_ls(_field("original_width", 128)), ("task 7 (new0.png)", "original_width/original_height say "
                  "128x64", "is 64x64"), id="label-studio-128-on-64"),
     pytest.param(_ls(lambda t: [_region(t).pop("original_width"), _region(t).pop("original_height"),
                                 t["data"].update(width=32, height=32)]),
                  ("task 7 (new0.png)", "data.width/data.height say 32x32", "is 64x64"), id="label-studio-data-size"),
     pytest.param(_cvat(_image("width", 128)), ("image 1 (new0.png)", "width/height say 128x64", "is 64x64"),
                  id="cvat-128-on-64")],
)  # fmt: skip
def test_merge_with_images_refuses_an_export_of_another_size(
    base: Path, tmp_path: Path, raw: Any, fragments: tuple[str, ...]
) -> None:
    _refused(base, tmp_path, raw, *fragments, images=base / "images")


def test_merge_with_images_scales_by_the_real_size(base: Path, tmp_path: Path) -> None:
    merge(base / "ref.json", _export(tmp_path, _ls(lambda t: None)), out=tmp_path / "m.json", images=base / "images")
    merged = json.loads((tmp_path / "m.json").read_text())
    assert merged["images"][-1] == {"id": 2, "file_name": "new0.png", "width": SIZE, "height": SIZE}
    assert merged["annotations"][-1]["bbox"] == pytest.approx([6.4, 12.8, 16.0, 32.0])  # 10, 20, 25, 50 % of 64


# ---------------------------------------------------------------------------------------------------------
# image names that leave the root, with or without --images

ESCAPES = [
    pytest.param({"file_name": "../../etc/passwd"}, "leaves the image root", id="dot-dot"),
    pytest.param({"file_name": "/etc/passwd"}, "is absolute", id="absolute"),
    pytest.param({"image": "/data/local-files/?d=%2e%2e/%2e%2e/etc/passwd"}, "leaves the image root",
                 id="local-files-percent-encoded"),
    pytest.param({"image": "http://host/x/%2e%2e%2f%2e%2e%2fetc%2fpasswd"}, "leaves the image root",
                 id="url-percent-encoded"),
    pytest.param({"file_name": "..\\..\\etc\\passwd"}, "leaves the image root", id="backslashes"),
    pytest.param({"file_name": "new0.png\x00.txt"}, "NUL byte", id="nul"),
    pytest.param({"file_name": "C:/Windows/win.ini"}, "is absolute", id="drive-letter"),
    pytest.param({"file_name": "s3://bucket/key.png"}, "is a URI", id="uri"),
]  # fmt: skip


@pytest.mark.parametrize("with_images", [False, True], ids=["no-images", "images"])
@pytest.mark.parametrize(("data", "reason"), ESCAPES)
def test_label_studio_names_that_leave_the_root_are_refused(
    base: Path, tmp_path: Path, data: dict[str, str], reason: str, with_images: bool
) -> None:
    raw = _ls(lambda t: t.update(data=data))
    _refused(base, tmp_path, raw, "task 7 (", reason, images=base / "images" if with_images else None)


@pytest.mark.parametrize("with_images", [False, True], ids=["no-images", "images"])
@pytest.mark.parametrize(
    ("name", "reason"),
    [("../x.png", "leaves the image root"), ("/etc/passwd", "is absolute"), ("a\\..\\..\\x.png", "leaves the image "
     "root"), (None, "must be a non-empty string"), ("", "must be a non-empty string")],
    ids=["dot-dot", "absolute", "backslashes", "null", "empty"],
)  # fmt: skip
def test_cvat_names_that_leave_the_root_or_are_null_are_refused(
    base: Path, tmp_path: Path, name: str | None, reason: str, with_images: bool
) -> None:
    message = _refused(base, tmp_path, _cvat(_image("file_name", name)), "image 1 (", reason,
                       images=base / "images" if with_images else None)  # fmt: skip
    assert "None.png" not in message


@pytest.mark.parametrize(
    ("name", "reason"),
    [("../../etc/passwd", "leaves the image root"), ("/etc/passwd", "is absolute"), ("..\\x.png", "leaves"),
     ("a\x00.png", "NUL byte"), (None, "must be a non-empty string")],
    ids=["dot-dot", "absolute", "backslashes", "nul", "null"],
)  # fmt: skip
def test_validate_checks_names_without_images(base: Path, tmp_path: Path, name: str | None, reason: str) -> None:
    raw = json.loads((base / "ref.json").read_text())
    raw["images"][0]["file_name"] = name
    path = _export(tmp_path, raw)
    problems = validate_coco(path)
    assert len(problems) >= 1 and problems[0].startswith("image 1: ") and reason in problems[0], problems


# ---------------------------------------------------------------------------------------------------------
# validate: control characters in names, keypoints far outside their image


def _kp_set(base: Path, edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    raw = json.loads((base / "ref_kp.json").read_text())
    edit(raw)
    return raw


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [pytest.param(lambda r: r["categories"][0].update(name="ring\x01"), "category 1: 'name'", id="class-x01"),
     pytest.param(lambda r: r["categories"][0].update(name="\x1b[31mred"), "category 1: 'name'", id="class-escape"),
     pytest.param(lambda r: r["categories"][0].update(name="a\x00b"), "category 1: 'name'", id="class-nul"),
     pytest.param(lambda r: r["categories"][0].update(keypoints=["head", "ta\nil"]), "keypoint name 'ta\\nil'",
                  id="keypoint-newline"),
     pytest.param(lambda r: r["annotations"][0].update(keypoints=[320, 8, 2, 16, 16, 2]), "lies outside the 64x64",
                  id="keypoint-at-500-percent"),
     pytest.param(lambda r: r["annotations"][0].update(keypoints=[8, 1e300, 2, 16, 16, 2]), "lies outside the 64x64",
                  id="keypoint-at-1e300"),
     pytest.param(lambda r: r["annotations"][0].update(keypoints=[8, 8, 2, -2, 16, 1]), "lies outside the 64x64",
                  id="keypoint-2px-left"),
     pytest.param(lambda r: r["annotations"][0].update(keypoints=[320, 8, 0.9, 16, 16, 0.9], score=0.9),
                  "lies outside the 64x64", id="predicted-keypoint-at-500-percent")],
)  # fmt: skip
def test_validate_refuses_control_characters_and_far_keypoints(
    base: Path, tmp_path: Path, edit: Any, fragment: str
) -> None:
    problems = validate_coco(_export(tmp_path, _kp_set(base, edit)))
    assert any(fragment in p for p in problems), problems
    assert all("\n" not in p and "\x1b" not in p and "\x00" not in p for p in problems)


def test_validate_keeps_keypoints_within_the_tolerances(base: Path, tmp_path: Path) -> None:
    """A labeled keypoint on the edge (+0.5 px), a predicted one beyond it (a model extrapolates), an
    unlabeled one anywhere: no problem."""
    labeled = _kp_set(base, lambda r: r["annotations"][0].update(keypoints=[64.5, 0, 2, 1e6, 1e6, 0]))
    predicted = _kp_set(base, lambda r: r["annotations"][0].update(keypoints=[-40, 100, 0.8, 8, 8, 0.9], score=0.7))
    assert validate_coco(_export(tmp_path, labeled)) == []
    assert validate_coco(_export(tmp_path, predicted)) == []


def _keypoint_task(x: float, *, parent: bool) -> list[dict[str, Any]]:
    def edit(task: dict[str, Any]) -> None:
        point = {"id": "k1", "type": "keypointlabels", "original_width": SIZE, "original_height": SIZE,
                 "value": {"x": x, "y": 30.0, "width": 0.5, "keypointlabels": ["head"]}}  # fmt: skip
        if parent:
            point["parentID"] = "r1"
        task["annotations"][0]["result"].append(point)

    return _ls(edit)


@pytest.mark.parametrize("parent", [True, False], ids=["parent-id", "no-parent-id"])
@pytest.mark.parametrize("x", [500.0, 1e300, -3.0], ids=["500-percent", "1e300", "minus-3-percent"])
def test_merge_refuses_label_studio_keypoints_outside_the_image(
    base: Path, tmp_path: Path, x: float, parent: bool
) -> None:
    _refused(base, tmp_path, _keypoint_task(x, parent=parent), "task 7 (new0.png)", "keypoint k1 (head)",
             "outside the 64x64 image", ref="ref_kp.json")  # fmt: skip


def test_merge_takes_a_keypoint_inside_its_box(base: Path, tmp_path: Path) -> None:
    merge(base / "ref_kp.json", _export(tmp_path, _keypoint_task(20.0, parent=False)), out=tmp_path / "m.json")
    added = load_coco(tmp_path / "m.json").labels[2]
    assert added.keypoints.tolist() == [[[12.8, 19.2, 2.0], [0.0, 0.0, 0.0]]]


def test_cvat_keypoints_outside_the_image_are_refused(base: Path, tmp_path: Path) -> None:
    raw = _cvat(lambda r: r["annotations"][0].update(keypoints=[320, 8, 2, 0, 0, 0], num_keypoints=1))
    _refused(base, tmp_path, raw, "image 1 (new0.png) annotation 5", "keypoint 0", "outside the 64x64",
             ref="ref_kp.json")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# long values, and the CLI's one line


def test_long_values_are_cut(base: Path, tmp_path: Path) -> None:
    huge = "x" * 1_000_000
    _refused(base, tmp_path, _ls(lambda t: t["data"].update(file_name="../" + huge)), "leaves the image root")
    _refused(base, tmp_path, _ls(lambda t: [t.update(id=huge), _value("x", huge)(t)]), "task xxx", "value.x", "...")
    _refused(base, tmp_path, _ls(_value("rectanglelabels", [huge])), "unknown class 'xxx")
    _refused(base, tmp_path, _cvat(_ann("category_id", huge)), "unknown category_id 'xxx")


def test_cli_merge_and_validate_say_one_line(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged.json"
    export = _export(tmp_path, _ls(_value("x", "abc")))
    args = ("merge", "--labeled", base / "ref.json", "--corrections", export, "--out", out)
    error_line(cli(*args), str(export), "task 7 (new0.png)", "region r1", "value.x")
    export.write_text(json.dumps(_ls(_polygon)))
    error_line(cli(*args), "'polygonlabels' region", "--skip-unsupported")
    done = cli(*args, "--skip-unsupported")
    assert done.rc == 0 and "left out 1 unsupported" in done.out, done
    raw = json.loads((base / "ref.json").read_text())
    raw["categories"][0]["name"] = "ring\x1b"
    bad = _export(tmp_path, raw)
    result = cli("validate", bad)
    assert result.rc == 1 and "category 1: 'name' 'ring\\x1b' holds control characters" in result.out, result


def test_review_refuses_a_reference_with_a_control_character_in_a_class_name(base: Path, tmp_path: Path) -> None:
    """The Label Studio config review writes would not be well-formed XML (``\\x1b`` is not allowed in XML 1.0)."""
    row = {"file_name": "new0.png", "width": SIZE, "height": SIZE, "boxes": [1.0, 1.0, 9.0, 9.0], "scores": [0.6],
           "labels": [0], "agreement": [1], "error": None}  # fmt: skip
    write_shard(tmp_path / "labels" / "shards" / "part-00000.parquet", [row], shard_schema(0))
    manifest = {"status": "complete", "classes": {"names": ["ring\x1b", "b"]}, "config": {"views": ["identity"]}}
    write_json_atomic(tmp_path / "labels" / "manifest.json", manifest)
    raw = json.loads((base / "ref.json").read_text())
    raw["categories"][0]["name"] = "ring\x1b"
    reference = _export(tmp_path, raw)
    args = ("review", "--labels", tmp_path / "labels", "--reference", reference, "--top", "1", "--out", tmp_path / "r")
    # the labeling folder's manifest is read first and refused for the same name; the reference alone below
    error_line(cli(*args), "manifest.json", "holds control characters", "\\x1b")
    assert not (tmp_path / "r").exists()
    manifest["classes"] = {"names": ["ring", "b"]}
    write_json_atomic(tmp_path / "labels" / "manifest.json", manifest)
    error_line(cli(*args), str(reference), "category 1: 'name' 'ring\\x1b' holds control characters")
    assert not (tmp_path / "r").exists()
