"""COCO reading, writing and validation: every problem is found, each in one line naming its record."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from datadistill.cli import main
from datadistill.data.coco import (
    COCO_PERSON_KEYPOINTS,
    COCO_PERSON_SIGMAS,
    derive_flip_index,
    load_coco,
    parse_coco,
    save_coco,
    to_coco_dict,
    validate_coco,
)
from datadistill.data.images import read_image, resolve_image_path
from datadistill.errors import DataError

KP_NAMES = ["head", "left_hand", "right_hand", "left_foot", "right_foot"]


def _base() -> dict[str, Any]:
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "sub/b.png", "width": 20, "height": 20},
        ],
        "annotations": [
            {
                "id": 10,
                "image_id": 1,
                "category_id": 7,
                "bbox": [1.5, 2.0, 10.0, 8.0],
                "iscrowd": 0,
                "keypoints": [5, 5, 2, 3, 6, 2, 9, 6, 1, 4, 9, 2, 0, 0, 0],
            },
            {
                "id": 11,
                "image_id": 2,
                "category_id": 7,
                "bbox": [0.0, 0.0, 20.0, 20.0],
                "iscrowd": 1,
                "keypoints": [0] * 15,
            },
        ],
        "categories": [{"id": 7, "name": "figure", "keypoints": KP_NAMES, "skeleton": [[1, 2], [1, 3]]}],
    }


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    (tmp_path / "images" / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "images" / "a.png")
    Image.new("RGB", (20, 20), (10, 20, 30)).save(tmp_path / "images" / "sub" / "b.png")
    (tmp_path / "ann.json").write_text(json.dumps(_base()))
    return tmp_path


def test_clean_data_set_has_no_problems(dataset_dir: Path) -> None:
    assert validate_coco(dataset_dir / "ann.json", dataset_dir / "images") == []
    ds = load_coco(dataset_dir / "ann.json", image_root=dataset_dir / "images")
    assert ds.task == "keypoints" and ds.num_keypoints == 5 and ds.class_names == ("figure",)
    lab = ds.labels[1]
    np.testing.assert_allclose(lab.boxes, [[1.5, 2.0, 11.5, 10.0]])  # xywh -> xyxy
    assert lab.labels.tolist() == [0]  # contiguous class index, not the category id 7
    assert lab.keypoints.shape == (1, 5, 3) and lab.keypoints[0, 2].tolist() == [9, 6, 1]
    assert ds.labels[2].iscrowd.tolist() == [True]
    assert ds.keypoint_category.flip_index == (0, 2, 1, 4, 3)
    assert ds.keypoint_category.skeleton == ((1, 2), (1, 3))


def _set(path: list[Any], value: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        target = d
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return mutate


_DELETE = object()


def _append(key: str, item: dict[str, Any]) -> Any:
    return lambda d: d[key].append(item)


MUTATIONS = [
    pytest.param(_set(["annotations", 0, "bbox"], [1, 2, 0, 8]), "annotation 10 (image 1): box has non-positive width", id="zero-width"),
    pytest.param(_set(["annotations", 0, "bbox"], [1, 2, 5, -3]), "annotation 10 (image 1): box has non-positive", id="negative-height"),
    pytest.param(_set(["annotations", 0, "bbox"], [35, 2, 10, 8]), "annotation 10 (image 1): box [35, 2, 10, 8] lies outside the 40x30 image", id="box-outside"),
    pytest.param(_set(["annotations", 0, "bbox"], [1, 2, float("nan"), 8]), "annotation 10 (image 1): 'bbox' must be 4 finite numbers", id="box-nan"),
    pytest.param(_set(["annotations", 0, "bbox"], [1, 2, 3]), "annotation 10 (image 1): 'bbox' must be 4 finite numbers", id="box-3-values"),
    pytest.param(_set(["annotations", 0, "bbox"], "1,2,3,4"), "annotation 10 (image 1): 'bbox' must be 4 finite numbers", id="box-string"),
    pytest.param(_set(["annotations", 0, "category_id"], 99), "annotation 10 (image 1): unknown category_id 99", id="unknown-category"),
    pytest.param(_set(["annotations", 0, "image_id"], 5), "annotation 10 (image 5): unknown image_id 5", id="unknown-image"),
    pytest.param(_set(["annotations", 1, "id"], 10), "annotation 10: duplicate annotation id", id="duplicate-annotation-id"),
    pytest.param(_set(["images", 1, "id"], 1), "image 1: duplicate image id", id="duplicate-image-id"),
    pytest.param(_set(["categories", 0, "id"], "7"), "category #0: 'id' must be an integer", id="category-id-string"),
    pytest.param(_append("categories", {"id": 7, "name": "again"}), "category 7: duplicate category id", id="duplicate-category-id"),
    pytest.param(_set(["annotations", 0, "keypoints"], [1, 2, 2] * 4), "annotation 10 (image 1): 'keypoints' must hold 15 numbers (5 x, y, v), got 12", id="keypoints-wrong-length"),
    pytest.param(_set(["annotations", 0, "keypoints"], [1, 2, 3] * 5), "keypoint visibility must be 0, 1 or 2", id="keypoint-visibility-3"),
    pytest.param(_set(["images", 0, "file_name"], "../outside.png"), "image 1: image path '../outside.png' leaves the image root", id="path-dotdot"),
    pytest.param(_set(["images", 0, "file_name"], "/etc/passwd"), "image 1: image path '/etc/passwd' is absolute", id="path-absolute"),
    pytest.param(_set(["images", 0, "width"], 0), "image 1: 'width' must be a positive integer, got 0", id="width-zero"),
    pytest.param(_set(["images", 0, "height"], "30"), "image 1: 'height' must be a positive integer, got '30'", id="height-string"),
    pytest.param(_set(["images", 1, "file_name"], "a.png"), "image 2: file_name 'a.png' already used by image 1", id="duplicate-file-name"),
    pytest.param(_set(["annotations", 0, "iscrowd"], 2), "'iscrowd' must be 0 or 1, got 2", id="iscrowd-2"),
    pytest.param(_set(["annotations", 0, "score"], 1.5), "'score' must be a number in [0, 1], got 1.5", id="score-above-1"),
    pytest.param(_set(["annotations", 0, "id"], None), "annotation #0: 'id' must be an integer, got None", id="annotation-id-missing"),
    pytest.param(_set(["categories", 0, "flip_pairs"], [["left_hand", "nose"]]), "flip_pairs entry ['left_hand', 'nose'] names no keypoint", id="flip-pair-unknown"),
    pytest.param(_set(["categories", 0, "sigmas"], [0.1, 0.1]), "category 7: 'sigmas' must be 5 positive numbers", id="sigmas-wrong-length"),
    pytest.param(_set(["categories", 0, "skeleton"], [[0, 1]]), "category 7: skeleton edge [0, 1] is not a pair of 1-based", id="skeleton-0-based"),
    pytest.param(_set(["images"], _DELETE), "missing key 'images'", id="missing-images"),
    pytest.param(_set(["annotations"], {}), "'annotations' must be a list, got dict", id="annotations-not-list"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "expected"), MUTATIONS)
def test_each_problem_is_reported_in_one_line(dataset_dir: Path, mutate: Any, expected: str) -> None:
    raw = copy.deepcopy(_base())
    mutate(raw)
    (dataset_dir / "bad.json").write_text(json.dumps(raw))
    problems = validate_coco(dataset_dir / "bad.json", dataset_dir / "images")
    assert any(expected in p for p in problems), problems
    assert all("\n" not in p for p in problems)
    with pytest.raises(DataError) as info:
        load_coco(dataset_dir / "bad.json", image_root=dataset_dir / "images")
    message = str(info.value)
    assert "\n" not in message and str(dataset_dir / "bad.json") in message and "datadistill validate" in message


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "images": [\n    {"id": 1,,}\n  ]\n}')
    assert validate_coco(path) == [
        "invalid json at line 3, column 14: Expecting property name enclosed in double quotes"
    ]
    with pytest.raises(DataError, match=r"broken.json: invalid json at line 3, column 14"):
        load_coco(path)


def test_truncated_json(tmp_path: Path) -> None:
    path = tmp_path / "trunc.json"
    path.write_text(json.dumps(_base())[:100])
    (problem,) = validate_coco(path)
    assert problem.startswith("invalid json at line 1, column")


@pytest.mark.parametrize(
    ("break_image", "expected"),
    [
        pytest.param(lambda p: p.unlink(), "image 1 (a.png): image file not found", id="missing"),
        pytest.param(
            lambda p: p.write_bytes(b""), "image 1 (a.png): not a readable image (empty file)", id="zero-bytes"
        ),
        pytest.param(lambda p: p.write_text("hello"), "image 1 (a.png): not a readable image", id="text-file"),
        pytest.param(
            lambda p: p.write_bytes(p.read_bytes()[:60]), "image 1 (a.png): not a readable image", id="truncated"
        ),
        pytest.param(
            lambda p: Image.new("RGB", (41, 30)).save(p),
            "image 1 (a.png): recorded size 40x30 differs from the file's 41x30",
            id="size-differs",
        ),
    ],
)
def test_image_problems(dataset_dir: Path, break_image: Any, expected: str) -> None:
    path = dataset_dir / "images" / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
    break_image(path)
    problems = validate_coco(dataset_dir / "ann.json", dataset_dir / "images")
    assert any(p.startswith(expected) for p in problems), problems


@pytest.mark.parametrize(
    "name",
    ["../x.png", "a/../../x.png", "/etc/passwd", "C:/x.png", "..\\x.png", "a\x00.png"],
    ids=["dotdot", "nested-dotdot", "absolute", "drive-letter", "backslash-dotdot", "nul-byte"],
)
def test_paths_that_leave_the_root_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match="leaves the image root|absolute|NUL"):
        resolve_image_path(tmp_path, name)


def test_names_inside_the_root_resolve(tmp_path: Path) -> None:
    assert resolve_image_path(tmp_path, "sub/../ok.png") == tmp_path / "ok.png"
    assert resolve_image_path(tmp_path, "./a/b.png") == tmp_path / "a" / "b.png"
    # an image folder of symlinks into a shared store is a common layout: the name decides, not the target
    (tmp_path / "store").mkdir()
    Image.new("RGB", (4, 3)).save(tmp_path / "store" / "s.png")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link.png").symlink_to(tmp_path / "store" / "s.png")
    assert tuple(read_image(resolve_image_path(tmp_path / "root", "link.png")).shape) == (3, 3, 4)


def test_exif_rotated_image_reports_displayed_size(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 30), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "r.jpg", exif=exif)
    raw = _base()
    raw["images"] = [{"id": 1, "file_name": "r.jpg", "width": 30, "height": 40}]
    raw["annotations"] = []
    (tmp_path / "r.json").write_text(json.dumps(raw))
    assert validate_coco(tmp_path / "r.json", tmp_path) == []
    assert tuple(read_image(tmp_path / "r.jpg").shape) == (3, 40, 30)


@pytest.mark.parametrize(
    ("mode", "value"),
    [("L", 128), ("RGBA", (10, 20, 30, 0)), ("I;16", 65535), ("CMYK", (0, 0, 0, 0)), ("P", 3)],
    ids=["grayscale", "rgba", "16-bit", "cmyk", "palette"],
)
def test_read_image_converts_modes_to_rgb(tmp_path: Path, mode: str, value: Any) -> None:
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    Image.new(mode, (7, 5), value).save(path)
    img = read_image(path)
    assert img.dtype.is_floating_point is False and tuple(img.shape) == (3, 5, 7)
    if mode == "I;16":
        assert int(img.max()) == 255
    if mode == "CMYK":
        assert img.min() == 255  # no ink is white


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        pytest.param(["nose", "left_eye", "right_eye"], (0, 2, 1), id="prefix"),
        pytest.param(["hand_left", "hand_right", "tail"], (1, 0, 2), id="suffix"),
        pytest.param(["Left Foot", "Right Foot"], (1, 0), id="words-any-case"),
        pytest.param(["l_knee", "r_knee", "lr"], (1, 0, 2), id="single-letter"),
        pytest.param(["left_wing"], (0,), id="no-partner"),
        pytest.param(
            list(COCO_PERSON_KEYPOINTS), (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15), id="coco"
        ),
    ],
)
def test_derive_flip_index(names: list[str], expected: tuple[int, ...]) -> None:
    assert derive_flip_index(names) == expected


def test_explicit_flip_pairs_win_over_names() -> None:
    raw = _base()
    raw["categories"][0]["flip_pairs"] = [[1, 3]]  # deliberately not the name-derived pairs
    ds, problems = parse_coco(raw)
    assert problems == [] and ds.keypoint_category.flip_index == (0, 3, 2, 1, 4)


def test_coco_person_gets_coco_sigmas() -> None:
    raw = _base()
    raw["categories"][0]["keypoints"] = list(COCO_PERSON_KEYPOINTS)
    raw["annotations"] = []
    ds, _ = parse_coco(raw)
    assert ds.keypoint_category.sigmas == COCO_PERSON_SIGMAS


def test_write_read_round_trip(dataset_dir: Path) -> None:
    ds = load_coco(dataset_dir / "ann.json")
    save_coco(ds, dataset_dir / "copy.json")
    again = load_coco(dataset_dir / "copy.json")
    assert to_coco_dict(again) == to_coco_dict(ds)
    assert again.keypoint_category == ds.keypoint_category
    ann = to_coco_dict(ds)["annotations"][0]
    assert ann["bbox"] == [1.5, 2.0, 10.0, 8.0] and ann["num_keypoints"] == 4


def test_real_coco_fixtures_load() -> None:
    fixtures = Path(__file__).resolve().parent / "fixtures" / "cocoapi"
    ds = load_coco(fixtures / "instances_val2014_100.json")
    assert (len(ds.images), ds.num_annotations, ds.num_classes) == (100, 839, 80)
    kp = load_coco(fixtures / "keypoints_gt.json")
    assert kp.keypoint_category.sigmas == COCO_PERSON_SIGMAS


def test_cli_validate_exit_codes(dataset_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(dataset_dir / "ann.json"), "--images", str(dataset_dir / "images")]) == 0
    assert "OK, 2 images, 2 annotations, 1 categories (keypoints)" in capsys.readouterr().out
    raw = _base()
    raw["annotations"][0]["bbox"] = [1, 2, 0, 8]
    raw["annotations"][1]["category_id"] = 3
    (dataset_dir / "bad.json").write_text(json.dumps(raw))
    assert main(["validate", str(dataset_dir / "bad.json"), "--images", str(dataset_dir / "images")]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[-1].endswith("bad.json: 2 problems found")
    assert "annotation 10 (image 1)" in lines[0] and "annotation 11 (image 2): unknown category_id 3" in lines[1]


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        pytest.param("image_id", [1], "unknown image_id [1]", id="image-id-list"),
        pytest.param("image_id", True, "unknown image_id True", id="image-id-bool"),
        pytest.param("category_id", {"a": 1}, "unknown category_id {'a': 1}", id="category-id-dict"),
        pytest.param("iscrowd", True, "'iscrowd' must be 0 or 1, got True", id="iscrowd-bool"),
    ],
)
def test_wrong_types_of_ids_are_problems_not_crashes(field: str, value: Any, expected: str) -> None:
    raw = _base()
    raw["annotations"][0][field] = value
    _, problems = parse_coco(raw)
    assert any(expected in p for p in problems), problems


def test_flip_pairs_are_written_as_names() -> None:
    ds, _ = parse_coco(_base())
    cat = to_coco_dict(ds)["categories"][0]
    assert cat["flip_pairs"] == [["left_hand", "right_hand"], ["left_foot", "right_foot"]]
