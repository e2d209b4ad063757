"""Malformed data sets: every field with every wrong type, and each broken case of the issue through the CLI.

Each gives a one-line error naming the file and the record, exit status 1 and no traceback; ``validate``
lists every problem at once. (tests/test_coco.py checks the parser's messages one mutation at a time.)
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from harness import cli, error_line
from PIL import Image

from datadistill.data.coco import parse_coco

KP = ["head", "left_hand", "right_hand"]


def _base() -> dict[str, Any]:
    """Two images, a keypoint category and a box category, one annotation of each."""
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 8], "iscrowd": 0,
             "keypoints": [2, 3, 2, 4, 5, 2, 6, 7, 1]},
            {"id": 11, "image_id": 2, "category_id": 8, "bbox": [0, 0, 40, 30], "iscrowd": 0},
        ],
        "categories": [
            {"id": 7, "name": "figure", "keypoints": KP, "skeleton": [[1, 2]], "sigmas": [0.05, 0.05, 0.05]},
            {"id": 8, "name": "box"},
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("malformed")
    (root / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30), (90, 120, 150)).save(root / "images" / name)
    (root / "ok.json").write_text(json.dumps(_base()))
    return root


# ---------------------------------------------------------------------------------------------------------
# every field, every wrong type

FIELDS = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox", "iscrowd", "area", "keypoints", "score", "agreement"),
    "categories": ("id", "name", "supercategory", "keypoints", "skeleton", "flip_pairs", "sigmas"),
}
_DELETE = object()
WRONG = [
    _DELETE, None, "x", "", [], {}, True, 1.5, -1, 0, 10**30, 10**400, -(10**400), float("nan"), float("inf"),
    [float("nan")] * 4, [10**400] * 4, ["a"] * 4, [1, 2, 3], [[1]], {"a": 1}, "\x00", "../../etc/passwd",
]  # fmt: skip
# Fields where any value must be reported: the record cannot be used without a valid one.
REQUIRED = {
    ("images", "id"), ("images", "file_name"), ("images", "width"), ("images", "height"),
    ("annotations", "id"), ("annotations", "image_id"), ("annotations", "category_id"), ("annotations", "bbox"),
    ("categories", "id"), ("categories", "name"),
}  # fmt: skip


def _plausible(field: str, value: Any) -> bool:
    """Values of a required field that are valid in themselves (the file may still be missing)."""
    if field == "id":
        return value in (-1, 0) and not isinstance(value, bool | float)
    # names: without an image root, any non-empty string (paths: test_a_bad_record_is_one_line_naming_...)
    return field in ("file_name", "name") and isinstance(value, str) and value != ""


RECORD_NAMES = ("image ", "annotation ", "category ", "missing key", "'images'", "'annotations'", "'categories'")
CASES = [(s, f, i) for s, fields in FIELDS.items() for f in fields for i in range(len(WRONG))]


def test_every_field_with_every_wrong_value_is_a_problem_not_a_crash(data_dir: Path) -> None:
    """460 mutated files (20 fields x 23 values) through the parser and ``validate``: one line per problem,
    each naming its record; a required field with a wrong value is always reported."""
    path = data_dir / "mutated.json"
    reported = 0
    for section, field, i in CASES:
        raw = _base()
        record = raw[section][0]
        if WRONG[i] is _DELETE:
            record.pop(field, None)
        else:
            record[field] = copy.deepcopy(WRONG[i])
        _, problems = parse_coco(raw)
        where = f"{section}[0].{field} = {WRONG[i]!r:.40}"
        for p in problems:
            assert "\n" not in p and len(p) < 300, (where, p)
            assert p.startswith(RECORD_NAMES), (where, p)
        if (section, field) in REQUIRED and not _plausible(field, WRONG[i]):
            assert problems, f"{where} was accepted"
        path.write_text(json.dumps(raw))
        result = cli("validate", path)  # (the image files: test_validate_lists_every_problem_at_once)
        assert "Traceback" not in result.err and all(line.startswith(str(path)) for line in result.out.splitlines())
        assert result.rc == (1 if problems else 0), (where, result)
        reported += bool(problems)
    assert len(CASES) == 460 and reported > 300, reported


# ---------------------------------------------------------------------------------------------------------
# the cases, through the CLI as a user meets them


def _set(section: str, index: int, field: str, value: Any) -> Any:
    def mutate(raw: dict[str, Any]) -> None:
        raw[section][index][field] = value

    return mutate


def _append(section: str, item: dict[str, Any]) -> Any:
    return lambda raw: raw[section].append(item)


BROKEN_FILES = [
    pytest.param('{\n  "images": [\n    {"id": 1,,}\n', "invalid json at line 3, column 14", id="invalid-json"),
    pytest.param(json.dumps(_base())[:70], "invalid json at line 1", id="truncated-json"),
    pytest.param("", "invalid json at line 1, column 1", id="empty-file"),
    pytest.param(b"\xff\xfe{}", "not UTF-8", id="not-utf8"),
    pytest.param("[" * 100_000 + "]" * 100_000, "nested too deeply", id="nested-100000-deep"),
    pytest.param('{"images": [{"id": ' + "9" * 5000 + "}]}", "4300 digits", id="integer-of-5000-digits"),
    pytest.param("null", "top level must be a json object", id="top-level-null"),
    pytest.param("[]", "top level must be a json object", id="top-level-list"),
]


@pytest.mark.parametrize(("content", "message"), BROKEN_FILES)
def test_a_broken_json_file_is_one_line_naming_it(data_dir: Path, content: str | bytes, message: str) -> None:
    path = data_dir / "broken.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = error_line(cli("train", "--data", path, "--images", data_dir / "images", "--out", data_dir / "x"), message)
    assert str(path) in line and "datadistill validate" in line
    result = cli("validate", path)
    assert result.rc == 1 and message in result.out and "Traceback" not in result.err


MUTATIONS = [
    pytest.param(_set("annotations", 0, "bbox", [1, 2, float("nan"), 8]), "annotation 10 (image 1): 'bbox' must be 4 finite numbers", id="box-nan"),
    pytest.param(_set("annotations", 0, "bbox", [1, 2, float("inf"), 8]), "annotation 10 (image 1): 'bbox' must be 4 finite numbers", id="box-inf"),
    pytest.param(_set("annotations", 0, "bbox", [1, 2, 10**400, 8]), "annotation 10 (image 1): 'bbox' must be 4 finite numbers", id="box-beyond-float64"),
    pytest.param(_set("annotations", 0, "bbox", [1, 2, -3, 8]), "annotation 10 (image 1): box has non-positive width", id="box-negative-size"),
    pytest.param(_set("annotations", 0, "bbox", [1, 2, 0, 0]), "annotation 10 (image 1): box has non-positive width", id="box-zero-size"),
    pytest.param(_set("annotations", 0, "bbox", [35, 2, 10, 8]), "annotation 10 (image 1): box [35, 2, 10, 8] lies outside the 40x30 image", id="box-outside-image"),
    pytest.param(_set("annotations", 0, "bbox", "1 2 3 4"), "annotation 10 (image 1): 'bbox' must be 4 finite numbers", id="box-wrong-type"),
    pytest.param(_set("annotations", 0, "category_id", 99), "annotation 10 (image 1): unknown category_id 99", id="unknown-category"),
    pytest.param(_set("annotations", 0, "image_id", 5), "annotation 10 (image 5): unknown image_id 5", id="unknown-image"),
    pytest.param(_set("annotations", 1, "id", 10), "annotation 10: duplicate annotation id", id="duplicate-annotation-id"),
    pytest.param(_set("images", 1, "id", 1), "image 1: duplicate image id", id="duplicate-image-id"),
    pytest.param(_append("categories", {"id": 8, "name": "again"}), "category 8: duplicate category id", id="duplicate-category-id"),
    pytest.param(_set("images", 1, "file_name", "a.png"), "image 2: file_name 'a.png' already used by image 1", id="duplicate-file-name"),
    pytest.param(_set("annotations", 0, "keypoints", [2, 3, 2, 4, 5, 2]), "annotation 10 (image 1): 'keypoints' must hold 9 numbers (3 x, y, v), got 6", id="keypoints-wrong-length"),
    pytest.param(_set("annotations", 0, "keypoints", "2 3 2"), "annotation 10 (image 1): 'keypoints' must hold 9 numbers", id="keypoints-wrong-type"),
    pytest.param(_set("annotations", 0, "id", 2**63), "annotation #0: 'id' must be an integer, got 9223372036854775808", id="id-beyond-int64"),
    pytest.param(_set("images", 0, "width", 10**400), "image 1: 'width' must be a positive integer, got 1000000", id="width-beyond-float64"),
    pytest.param(_set("images", 0, "height", "30"), "image 1: 'height' must be a positive integer, got '30'", id="height-string"),
    pytest.param(_set("annotations", 0, "score", 10**400), "annotation 10 (image 1): 'score' must be a number in [0, 1]", id="score-beyond-float64"),
    pytest.param(_set("images", 0, "file_name", "../outside.png"), "image 1: image path '../outside.png' leaves the image root", id="path-dotdot"),
    pytest.param(_set("images", 0, "file_name", "/etc/hostname"), "image 1: image path '/etc/hostname' is absolute", id="path-absolute"),
    pytest.param(_set("images", 0, "file_name", "sub/../../outside.png"), "image 1: image path 'sub/../../outside.png' leaves the image root", id="path-nested-dotdot"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "message"), MUTATIONS)
def test_a_bad_record_is_one_line_naming_the_file_and_the_record(data_dir: Path, mutate: Any, message: str) -> None:
    raw = _base()
    mutate(raw)
    path = data_dir / "bad.json"
    path.write_text(json.dumps(raw))
    images = data_dir / "images"
    (data_dir / "no-results.json").write_text("[]")
    commands = [
        ("train", "--data", path, "--images", images, "--out", data_dir / "never"),
        ("convert", path, data_dir / "never-yolo", "--to", "yolo", "--images", images),
    ]
    if "image path" not in message:  # evaluating a results file opens no image: a path is only a name there
        commands.append(("evaluate", "--data", path, "--predictions", data_dir / "no-results.json",
                         "--out", data_dir / "never.json"))  # fmt: skip
    for argv in commands:
        line = error_line(cli(*argv), message, str(path))
        assert len(line) < 400
    result = cli("validate", path, "--images", images)
    assert result.rc == 1 and f"{path}: {message}" in result.out
    assert not (data_dir / "never").exists() and not (data_dir / "never.json").exists()


def test_validate_lists_every_problem_at_once(data_dir: Path) -> None:
    raw = _base()
    raw["images"] += [
        {"id": 3, "file_name": "missing.png", "width": 40, "height": 30},
        {"id": 4, "file_name": "broken.png", "width": 40, "height": 30},
        {"id": 5, "file_name": "../up.png", "width": 40, "height": 30},
        {"id": 6, "file_name": "b.png", "width": 41, "height": 30},  # the file's size differs
    ]
    raw["images"][1]["file_name"] = "b2.png"
    (data_dir / "images" / "b2.png").write_bytes((data_dir / "images" / "b.png").read_bytes())
    (data_dir / "images" / "broken.png").write_bytes((data_dir / "images" / "a.png").read_bytes()[:50])
    raw["annotations"] += [
        {"id": 20, "image_id": 1, "category_id": 8, "bbox": [1, 2, float("nan"), 3]},
        {"id": 21, "image_id": 1, "category_id": 99, "bbox": [1, 2, 3, 3]},
        {"id": 22, "image_id": 1, "category_id": 8, "bbox": [30, 2, 30, 3]},
        {"id": 22, "image_id": 1, "category_id": 8, "bbox": [1, 2, 3, 3]},
        {"id": 23, "image_id": 1, "category_id": 7, "bbox": [1, 2, 3, 3], "keypoints": [1, 1, 2]},
    ]
    path = data_dir / "many.json"
    path.write_text(json.dumps(raw))
    result = cli("validate", path, "--images", data_dir / "images")
    expected = [
        "image 5: image path '../up.png' leaves the image root",
        "annotation 20 (image 1): 'bbox' must be 4 finite numbers",
        "annotation 21 (image 1): unknown category_id 99",
        "annotation 22 (image 1): box [30, 2, 30, 3] lies outside the 40x30 image",
        "annotation 22: duplicate annotation id",
        "annotation 23 (image 1): 'keypoints' must hold 9 numbers",
        "image 3 (missing.png): image file not found",
        "image 4 (broken.png): not a readable image",
        "image 6 (b.png): recorded size 41x30 differs from the file's 40x30",
    ]
    lines = result.out.splitlines()
    assert result.rc == 1 and lines[-1] == f"{path}: {len(expected)} problems found"
    for want, line in zip(expected, lines[:-1], strict=True):
        assert line.startswith(f"{path}: {want}"), (want, line)


def test_missing_and_unusable_image_files(data_dir: Path, tmp_path: Path) -> None:
    raw = _base()
    raw["images"][1]["file_name"] = "gone.png"
    path = tmp_path / "missing.json"
    path.write_text(json.dumps(raw))
    error_line(cli("train", "--data", path, "--images", data_dir / "images", "--out", tmp_path / "o"),
               "1 of the 2 training images are missing from --images", "gone.png")  # fmt: skip
    raw["images"][1]["file_name"] = "x" * 300 + ".png"  # a name the file system refuses (ENAMETOOLONG)
    path.write_text(json.dumps(raw))
    error_line(cli("train", "--data", path, "--images", data_dir / "images", "--out", tmp_path / "o"),
               "1 of the 2 training images are missing")  # fmt: skip
    result = cli("validate", path, "--images", data_dir / "images")
    assert result.rc == 1 and "image 2 (xxxx" in result.out and "File name too long" in result.out


def test_an_image_too_elongated_for_the_model_is_refused_up_front(data_dir: Path, tmp_path: Path) -> None:
    """A 4000 x 1 px strip: torchvision's resize makes it 64 x 0 px and torch raises mid-run. ``train`` and
    ``evaluate`` refuse it before they start, naming the image."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        (images / name).write_bytes((data_dir / "images" / name).read_bytes())
    Image.new("RGB", (4000, 1)).save(images / "strip.png")
    raw = _base()
    raw["images"].append({"id": 3, "file_name": "strip.png", "width": 4000, "height": 1})
    path = tmp_path / "strip.json"
    path.write_text(json.dumps(raw))
    assert cli("validate", path, "--images", images).rc == 0  # a valid COCO file; the model cannot take it
    message = "image 3 (strip.png) is 4000x1 px, too elongated for the model's input size (64-64 px)"
    out = tmp_path / "run"
    line = error_line(cli("train", "--data", path, "--images", images, "--out", out, "--epochs", "1",
                          "--batch-size", "2", "--min-size", "64", "--max-size", "64", "--threads", "1"), message)  # fmt: skip
    assert str(path) in line and not (out / "last.pt").exists()


def test_the_installed_command_prints_one_line_and_no_traceback(data_dir: Path, tmp_path: Path) -> None:
    """The same through the console script in a process of its own (the other tests call ``main``)."""
    script = Path(sys.executable).with_name("datadistill")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "datadistill"]
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    done = subprocess.run([*command, "train", "--data", str(nested), "--images", str(data_dir / "images"), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines() == [f"error: {nested}: invalid json: nested too deeply to read; run "
                                        f"`datadistill validate {nested}` to see every problem"]  # fmt: skip


def test_evaluate_refuses_an_image_too_elongated_for_the_model(shapes: Path, checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    images = tmp_path / "images"
    shutil.copytree(shapes / "images", images)
    Image.new("RGB", (1, 4000)).save(images / "column.png")
    raw = json.loads((shapes / "annotations.json").read_text())
    raw["images"].append({"id": 99, "file_name": "column.png", "width": 1, "height": 4000})
    path = tmp_path / "val.json"
    path.write_text(json.dumps(raw))
    error_line(cli("evaluate", "--data", path, "--checkpoint", checkpoint, "--images", images, "--out",
                   tmp_path / "m.json", "--threads", "1"), str(path), "image 99 (column.png) is 1x4000 px")  # fmt: skip
    assert not (tmp_path / "m.json").exists()
