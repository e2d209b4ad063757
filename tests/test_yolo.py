"""YOLO txt interop: the exact line format, lossless round trips both ways, and one-line errors."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from datadistill.data.coco import CocoDataset, load_coco, parse_coco, save_coco
from datadistill.data.yolo_txt import COORD_TOLERANCE, coco_to_yolo, convert, label_path, read_data_yaml, yolo_to_coco
from datadistill.errors import DataError, UserError

KP_NAMES = ["nose", "left_eye", "right_eye", "left_wrist", "right_wrist"]
KP_SIGMAS = [0.026, 0.025, 0.025, 0.062, 0.0621]


def _image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (width % 256, height % 256, 90)).save(path)


def _boxes_raw() -> dict[str, Any]:
    """Three sizes, a subfolder, an image with no objects, a crowd region, ids 12/3/7 out of order."""
    return {
        "images": [
            {"id": 5, "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": 9, "file_name": "sub/b.png", "width": 80, "height": 100},
            {"id": 2, "file_name": "c.png", "width": 50, "height": 50},
        ],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 3, "bbox": [1.25, 2.5, 30.123456, 20.654321], "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 12, "bbox": [0.0, 0.0, 64.0, 48.0], "iscrowd": 0},
            {"id": 3, "image_id": 9, "category_id": 7, "bbox": [10.333333, 70.1, 69.6, 29.9], "iscrowd": 0},
            {"id": 4, "image_id": 9, "category_id": 3, "bbox": [5.0, 5.0, 20.0, 20.0], "iscrowd": 1},
            {"id": 5, "image_id": 9, "category_id": 12, "bbox": [40.5, 0.75, 3.1, 2.9], "iscrowd": 0},
        ],
        "categories": [
            {"id": 12, "name": "dog", "supercategory": "animal"},
            {"id": 3, "name": "cat", "supercategory": "animal"},
            {"id": 7, "name": "car", "supercategory": "vehicle"},
        ],
    }


def _pose_raw() -> dict[str, Any]:
    kp1 = [20.5, 10.25, 2, 18.0, 8.0, 1, 0, 0, 0, 5.123, 30.987, 2, 35.5, 31.25, 2]
    kp2 = [60.0, 20.0, 2, 0, 0, 0, 62.5, 18.75, 1, 0, 0, 0, 79.0, 99.0, 2]
    return {
        "images": [
            {"id": 1, "file_name": "p/one.png", "width": 40, "height": 40},
            {"id": 2, "file_name": "two.png", "width": 80, "height": 100},
            {"id": 3, "file_name": "three.png", "width": 30, "height": 20},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 4, "bbox": [2.0, 3.0, 36.0, 33.5], "keypoints": kp1},
            {"id": 2, "image_id": 2, "category_id": 4, "bbox": [50.25, 10.5, 29.75, 89.5], "keypoints": kp2},
        ],
        "categories": [
            {
                "id": 4,
                "name": "figure",
                "supercategory": "",
                "keypoints": KP_NAMES,
                "skeleton": [[1, 2], [1, 3], [4, 5]],
                "sigmas": KP_SIGMAS,
            }
        ],
    }


def _make(tmp_path: Path, raw: dict[str, Any]) -> tuple[CocoDataset, Path]:
    root = tmp_path / "coco_images"
    for im in raw["images"]:
        _image(root / im["file_name"], im["width"], im["height"])
    dataset, problems = parse_coco(copy.deepcopy(raw), image_root=root)
    assert problems == []
    return dataset, root


def _by_name(dataset: CocoDataset) -> dict[str, Any]:
    """file_name -> (width, height, labels) with crowd regions left out, for comparing across ids."""
    out = {}
    for im in dataset.images:
        lab = dataset.labels[im.id]
        keep = ~lab.iscrowd
        kps = lab.keypoints[keep] if lab.keypoints is not None else None
        out[im.file_name] = (im.width, im.height, lab.boxes[keep], lab.labels[keep], kps)
    return out


def _numbers(path: Path) -> list[list[float]]:
    return [[float(t) for t in line.split()] for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------
# COCO -> YOLO -> COCO


def test_round_trip_boxes_is_lossless(tmp_path: Path) -> None:
    dataset, root = _make(tmp_path, _boxes_raw())
    yaml_path = coco_to_yolo(dataset, root, tmp_path / "yolo")
    back, image_root = yolo_to_coco(yaml_path)

    assert image_root == (tmp_path / "yolo" / "images").resolve()
    assert [c.id for c in back.categories] == [12, 3, 7]
    assert back.categories == dataset.categories
    assert sorted(im.file_name for im in back.images) == sorted(im.file_name for im in dataset.images)
    assert [im.id for im in back.images] == [1, 2, 3]
    assert [im.file_name for im in back.images] == ["a.jpg", "c.png", "sub/b.png"]
    want, got = _by_name(dataset), _by_name(back)
    for name, (w, h, boxes, labels, _) in want.items():
        gw, gh, gboxes, glabels, _ = got[name]
        assert (gw, gh) == (w, h)
        np.testing.assert_array_equal(glabels, labels)
        np.testing.assert_allclose(gboxes, boxes, rtol=0, atol=1e-4)
    ann_ids = np.concatenate([back.labels[i].ids for i in (1, 2, 3)])
    np.testing.assert_array_equal(ann_ids, np.arange(1, 5))
    lab = back.labels[3]  # sub/b.png
    area = (lab.boxes[:, 2] - lab.boxes[:, 0]) * (lab.boxes[:, 3] - lab.boxes[:, 1])
    np.testing.assert_allclose(lab.area, area, rtol=1e-6)  # computed before the float32 rounding of the box
    assert len(back.labels[2]) == 0  # c.png: a known negative


def test_round_trip_keypoints_is_lossless(tmp_path: Path) -> None:
    dataset, root = _make(tmp_path, _pose_raw())
    back, _ = yolo_to_coco(coco_to_yolo(dataset, root, tmp_path / "yolo"))

    cat, got_cat = dataset.categories[0], back.categories[0]
    assert got_cat == cat
    assert got_cat.flip_index == (0, 2, 1, 4, 3)
    assert got_cat.sigmas == tuple(KP_SIGMAS)
    assert got_cat.skeleton == ((1, 2), (1, 3), (4, 5))
    want, got = _by_name(dataset), _by_name(back)
    assert set(got) == set(want)
    for name, (_, _, boxes, labels, kps) in want.items():
        _, _, gboxes, glabels, gkps = got[name]
        np.testing.assert_array_equal(glabels, labels)
        np.testing.assert_allclose(gboxes, boxes, rtol=0, atol=1e-4)
        assert gkps.shape == kps.shape
        np.testing.assert_array_equal(gkps[..., 2], kps[..., 2])
        np.testing.assert_allclose(gkps[..., :2], kps[..., :2], rtol=0, atol=1e-4)
    two = next(im.id for im in back.images if im.file_name == "two.png")
    assert set(np.unique(back.labels[two].keypoints[..., 2])) == {0.0, 1.0, 2.0}


def test_unlabeled_keypoints_lose_their_coordinates(tmp_path: Path) -> None:
    raw = _pose_raw()
    raw["annotations"][0]["keypoints"][6:9] = [7.0, 9.0, 0]  # v=0 with coordinates
    dataset, root = _make(tmp_path, raw)
    coco_to_yolo(dataset, root, tmp_path / "yolo")
    line = _numbers(tmp_path / "yolo" / "labels" / "p" / "one.txt")[0]
    assert line[5 + 6 : 5 + 9] == [0.0, 0.0, 0.0]
    back, _ = yolo_to_coco(tmp_path / "yolo")
    one = next(im.id for im in back.images if im.file_name == "p/one.png")
    np.testing.assert_array_equal(back.labels[one].keypoints[0, 2], [0, 0, 0])


def test_layout_and_data_yaml(tmp_path: Path) -> None:
    dataset, root = _make(tmp_path, _pose_raw())
    out = tmp_path / "yolo"
    yaml_path = coco_to_yolo(dataset, root, out)

    assert yaml_path == out.resolve() / "data.yaml"
    for name in ("p/one.png", "two.png", "three.png"):
        assert (out / "images" / name).is_file()
        assert (out / "labels" / name).with_suffix(".txt").is_file()
    assert (out / "labels" / "three.txt").read_bytes() == b""
    data = yaml.safe_load(yaml_path.read_text())
    assert data["path"] == str(out.resolve())
    assert data["train"] == "images" and data["val"] == "images"
    assert data["nc"] == 1
    assert data["names"] == {0: "figure"}
    assert data["kpt_shape"] == [5, 3]
    assert data["flip_idx"] == [0, 2, 1, 4, 3]
    assert data["kpt_names"] == {0: KP_NAMES}
    assert data["skeleton"] == [[1, 2], [1, 3], [4, 5]]
    assert data["kpt_sigmas"] == KP_SIGMAS
    assert data["category_ids"] == [4]
    assert "names:\n  0: figure\n" in yaml_path.read_text()  # a block mapping, as Ultralytics writes it


def test_boxes_data_yaml_has_no_keypoint_keys(tmp_path: Path) -> None:
    dataset, root = _make(tmp_path, _boxes_raw())
    data = yaml.safe_load(coco_to_yolo(dataset, root, tmp_path / "yolo").read_text())
    assert data["names"] == {0: "dog", 1: "cat", 2: "car"}
    assert data["category_ids"] == [12, 3, 7]
    assert data["supercategories"] == {0: "animal", 1: "animal", 2: "vehicle"}
    assert not {"kpt_shape", "flip_idx", "kpt_names", "skeleton", "kpt_sigmas"} & set(data)


def test_txt_format_exact(tmp_path: Path) -> None:
    raw = {
        "images": [{"id": 1, "file_name": "x.png", "width": 200, "height": 100}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 9,
                "bbox": [20, 10, 60, 30],
                "keypoints": [50, 25, 2, 0, 0, 0, 100, 50, 1, 1, 99, 2, 199, 1, 2],
            }
        ],
        "categories": [{"id": 2, "name": "a"}, {"id": 9, "name": "b", "keypoints": KP_NAMES}],
    }
    dataset, root = _make(tmp_path, raw)
    coco_to_yolo(dataset, root, tmp_path / "yolo")
    text = (tmp_path / "yolo" / "labels" / "x.txt").read_text()
    assert text.endswith("\n") and text.count("\n") == 1
    tokens = text.split()
    assert tokens[0] == "1"  # class index of category 9, the second category
    assert [tokens[i] for i in (7, 10, 13, 16, 19)] == ["2", "0", "1", "2", "2"]  # visibility as integers
    want = [0.25, 0.25, 0.3, 0.3, 0.25, 0.25, 2, 0, 0, 0, 0.5, 0.5, 1, 0.005, 0.99, 2, 0.995, 0.01, 2]
    np.testing.assert_allclose([float(t) for t in tokens[1:]], want, rtol=0, atol=1e-12)


def test_floats_keep_enough_digits(tmp_path: Path) -> None:
    raw = {
        "images": [{"id": 1, "file_name": "big.png", "width": 3000, "height": 7}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1234.5678, 1.0, 1.0, 5.0]}],
        "categories": [{"id": 1, "name": "a"}],
    }
    dataset, root = _make(tmp_path, raw)
    coco_to_yolo(dataset, root, tmp_path / "yolo")
    cx = _numbers(tmp_path / "yolo" / "labels" / "big.txt")[0][1]
    assert abs(cx * 3000 - 1235.0678) < 1e-4  # %g (6 digits) would be 0.01 px off


def test_crowd_is_skipped_with_a_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = _boxes_raw()
    raw["annotations"].append({"id": 6, "image_id": 2, "category_id": 3, "bbox": [1, 1, 9, 9], "iscrowd": 1})
    dataset, root = _make(tmp_path, raw)
    with caplog.at_level(logging.WARNING, logger="datadistill.data.yolo_txt"):
        coco_to_yolo(dataset, root, tmp_path / "yolo")
    lines = _numbers(tmp_path / "yolo" / "labels" / "sub" / "b.txt")
    assert [int(line[0]) for line in lines] == [2, 0]  # car, dog; the crowd cat is gone
    assert (tmp_path / "yolo" / "labels" / "c.txt").read_text() == ""
    assert "skipped 2 crowd annotations" in caplog.text
    assert "1 images that had only crowd regions" in caplog.text


@pytest.mark.parametrize("link", ["hardlink", "copy", "symlink"])
def test_link_modes(tmp_path: Path, link: str) -> None:
    dataset, root = _make(tmp_path, _boxes_raw())
    coco_to_yolo(dataset, root, tmp_path / "yolo", link=link)
    coco_to_yolo(dataset, root, tmp_path / "yolo", link=link)  # again, over its own output
    src, dst = root / "sub" / "b.png", tmp_path / "yolo" / "images" / "sub" / "b.png"
    assert dst.read_bytes() == src.read_bytes()
    assert dst.is_symlink() == (link == "symlink")
    assert (os.stat(dst).st_ino == os.stat(src).st_ino) == (link != "copy")


def test_rewrite_into_same_folder_is_allowed_but_stale_images_are_refused(tmp_path: Path) -> None:
    dataset, root = _make(tmp_path, _boxes_raw())
    coco_to_yolo(dataset, root, tmp_path / "yolo")
    coco_to_yolo(dataset, root, tmp_path / "yolo")  # same images: fine
    _image(tmp_path / "yolo" / "images" / "old.png", 5, 5)
    with pytest.raises(UserError, match=r"1 images that are not in the data set \(e\.g\. old\.png\)"):
        coco_to_yolo(dataset, root, tmp_path / "yolo")


@pytest.mark.parametrize("link", ["hardlink", "copy", "symlink"])
def test_in_place_conversion_keeps_the_images(tmp_path: Path, link: str) -> None:
    raw = _boxes_raw()
    dataset, _ = _make(tmp_path, raw)
    out = tmp_path  # the images are already in <out>/images
    (tmp_path / "coco_images").rename(tmp_path / "images")
    before = (tmp_path / "images" / "sub" / "b.png").read_bytes()
    coco_to_yolo(dataset, tmp_path / "images", out, link=link)
    after = tmp_path / "images" / "sub" / "b.png"
    assert not after.is_symlink() and after.read_bytes() == before
    assert (tmp_path / "labels" / "sub" / "b.txt").is_file()


def test_two_images_sharing_a_label_file_are_refused(tmp_path: Path) -> None:
    raw = _boxes_raw()
    raw["images"].append({"id": 11, "file_name": "a.png", "width": 10, "height": 10})
    dataset, root = _make(tmp_path, raw)
    with pytest.raises(DataError, match=r"image 11 \(a\.png\): shares the label file labels/a\.txt with a\.jpg"):
        coco_to_yolo(dataset, root, tmp_path / "yolo")


def test_recorded_size_must_match_the_file(tmp_path: Path) -> None:
    dataset, root = _make(tmp_path, _boxes_raw())
    _image(root / "c.png", 51, 50)
    with pytest.raises(DataError, match=r"image 2 \(c\.png\): recorded size 50x50 differs from the file's 51x50"):
        coco_to_yolo(dataset, root, tmp_path / "yolo")


@pytest.mark.parametrize(
    ("image", "label"),
    [
        ("/d/images/train/a.jpg", "/d/labels/train/a.txt"),
        ("/d/images/sub/images/a.b.png", "/d/images/sub/labels/a.b.txt"),  # only the last images/ changes
        ("/d/pics/a.jpg", "/d/pics/a.txt"),  # no images/ folder: labels sit next to the image
        ("/d/myimages/a.jpg", "/d/myimages/a.txt"),  # a folder merely ending in 'images' is not one
    ],
)
def test_label_path_follows_ultralytics(image: str, label: str) -> None:
    assert label_path(image.replace("/", os.sep)) == Path(label.replace("/", os.sep))


# ----------------------------------------------------------------------------------------------------
# YOLO -> COCO


def _yolo(
    tmp_path: Path, data: dict[str, Any] | str, labels: dict[str, str], sizes: dict[str, tuple[int, int]]
) -> Path:
    out = tmp_path / "yolo"
    for name, (w, h) in sizes.items():
        _image(out / "images" / name, w, h)
    for name, text in labels.items():
        (out / "labels" / name).parent.mkdir(parents=True, exist_ok=True)
        (out / "labels" / name).write_text(text)
    (out / "data.yaml").write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return out


POSE_YAML = {"train": "images", "names": {0: "hand", 1: "foot"}, "kpt_shape": [3, 3], "flip_idx": [0, 2, 1]}
POSE_LINES = (
    "1 0.5 0.5 0.25 0.125 0.4 0.45 2 0.1234567891 0.9876543219 1 0 0 0\n"
    "\n"
    "0 0.3125 0.6875 0.125 0.375 0.3 0.6 2 0.3 0.7 2 0.31 0.72 1\n"
)


def test_yolo_coco_yolo_keeps_the_numbers(tmp_path: Path) -> None:
    src = _yolo(tmp_path, POSE_YAML, {"a.txt": POSE_LINES, "s/b.txt": "0 0.5 0.5 1 1 0 0 0 0 0 0 0 0 0\n"},
                {"a.png": (64, 48), "s/b.png": (10, 10), "c.png": (8, 8)})  # fmt: skip
    dataset, image_root = yolo_to_coco(src)
    assert image_root == (src / "images").resolve()
    assert [im.file_name for im in dataset.images] == ["a.png", "c.png", "s/b.png"]
    assert [(im.width, im.height) for im in dataset.images] == [(64, 48), (8, 8), (10, 10)]
    assert [c.name for c in dataset.categories] == ["hand", "foot"]
    assert [c.id for c in dataset.categories] == [1, 2]
    assert dataset.categories[0].keypoints == ("kp0", "kp1", "kp2")
    assert dataset.categories[0].flip_index == (0, 2, 1)
    a = dataset.labels[1]
    np.testing.assert_allclose(a.boxes[0], [24, 21, 40, 27], atol=1e-5)  # cx 0.5 w 0.25 of 64 x 48
    np.testing.assert_allclose(a.area, [16 * 6, 8 * 18], rtol=1e-6)
    np.testing.assert_array_equal(a.labels, [1, 0])

    out = tmp_path / "again"
    coco_to_yolo(dataset, image_root, out)
    np.testing.assert_allclose(_numbers(out / "labels" / "a.txt"), _numbers(src / "labels" / "a.txt"), atol=1e-7)
    assert _numbers(out / "labels" / "s" / "b.txt") == _numbers(src / "labels" / "s" / "b.txt")
    assert (out / "labels" / "c.txt").read_text() == ""
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["kpt_shape"] == [3, 3] and data["flip_idx"] == [0, 2, 1]
    assert data["names"] == {0: "hand", 1: "foot"}


def test_two_value_keypoints_are_visible_unless_at_origin(tmp_path: Path) -> None:
    data = {"train": "images", "names": ["p"], "kpt_shape": [2, 2]}
    src = _yolo(tmp_path, data, {"a.txt": "0 0.5 0.5 0.5 0.5 0.25 0.75 0 0\n"}, {"a.png": (40, 20)})
    dataset, _ = yolo_to_coco(src)
    np.testing.assert_allclose(dataset.labels[1].keypoints[0], [[10, 15, 2], [0, 0, 0]])


def test_kpt_names_and_extras_are_read(tmp_path: Path) -> None:
    data = {
        "train": "images",
        "names": {0: "p"},
        "kpt_shape": [5, 3],
        "kpt_names": {0: KP_NAMES},
        "category_ids": [42],
        "skeleton": [[1, 2]],
        "kpt_sigmas": KP_SIGMAS,
    }
    src = _yolo(tmp_path, data, {}, {"a.png": (4, 4)})
    cat = yolo_to_coco(src)[0].categories[0]
    assert (cat.id, cat.keypoints, cat.skeleton, cat.sigmas) == (42, tuple(KP_NAMES), ((1, 2),), tuple(KP_SIGMAS))
    assert cat.flip_index == (0, 2, 1, 4, 3)  # no flip_idx: derived from left/right in the names


def test_missing_label_file_means_no_objects(tmp_path: Path) -> None:
    src = _yolo(tmp_path, {"train": "images", "names": ["a"]}, {"a.txt": "0 0.5 0.5 0.1 0.1\n"},
                {"a.png": (9, 9), "b.png": (9, 9)})  # fmt: skip
    dataset, _ = yolo_to_coco(src)
    assert [len(dataset.labels[i]) for i in (1, 2)] == [1, 0]


def test_path_key_and_split(tmp_path: Path) -> None:
    root = tmp_path / "elsewhere"
    _image(root / "images" / "val" / "v.png", 10, 10)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "val" / "v.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    yaml_path = tmp_path / "cfg" / "mine.yaml"
    yaml_path.parent.mkdir()
    yaml_path.write_text(
        yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val", "names": ["a"]})
    )
    dataset, image_root = yolo_to_coco(yaml_path.parent, split="val")  # the folder's only yaml
    assert image_root == (root / "images" / "val").resolve()
    assert [im.file_name for im in dataset.images] == ["v.png"]
    assert dataset.num_annotations == 1
    with pytest.raises(DataError, match=r"'images/train' folder|'train' folder"):
        yolo_to_coco(yaml_path)
    with pytest.raises(DataError, match=r"no 'test' images \(splits given: train, val\)"):
        yolo_to_coco(yaml_path, split="test")


BAD_LINES = [
    ("too few values", "0 0.5 0.5 0.2", r"line 2: expected 5 values \(class cx cy w h\), got 4"),
    ("polygon", "0 0.1 0.1 0.2 0.1 0.2 0.2", r"line 2: expected 5 values .* got 7; segmentation polygons"),
    ("not a number", "0 0.5 abc 0.2 0.2", r"line 2: 'abc' is not a number"),
    ("nan", "0 0.5 nan 0.2 0.2", r"line 2: values must be finite"),
    ("class out of range", "3 0.5 0.5 0.2 0.2", r"line 2: class 3 is not a class index in 0\.\.1"),
    ("negative class", "-1 0.5 0.5 0.2 0.2", r"line 2: class -1 is not a class index"),
    ("fractional class", "0.5 0.5 0.5 0.2 0.2", r"line 2: class 0\.5 is not a class index"),
    ("pixel coordinates", "0 32 24 10 10", r"line 2: cx=32 is outside \[0, 1\]"),
    ("negative center", "0 -0.01 0.5 0.2 0.2", r"line 2: cx=-0\.01 is outside \[0, 1\]"),
    ("zero width", "0 0.5 0.5 0 0.2", r"line 2: box width and height must be positive, got w=0, h=0\.2"),
]


@pytest.mark.parametrize(("line", "message"), [row[1:] for row in BAD_LINES], ids=[row[0] for row in BAD_LINES])
def test_bad_box_lines(tmp_path: Path, line: str, message: str) -> None:
    src = _yolo(tmp_path, {"train": "images", "names": ["a", "b"]}, {"a.txt": f"0 0.5 0.5 0.2 0.2\n{line}\n"},
                {"a.png": (64, 48)})  # fmt: skip
    with pytest.raises(DataError, match=r"^labels/a\.txt " + message) as info:
        yolo_to_coco(src)
    assert "\n" not in str(info.value)


BAD_POSE_LINES = [
    ("two values per keypoint in a [K, 3] set", "0 0.5 0.5 0.2 0.2 0.1 0.1 0.2 0.2 0.3 0.3",
     r"line 1: expected 14 values \(class cx cy w h \+ 3 keypoints x y v\), got 11"),
    ("visibility 3", "0 0.5 0.5 0.2 0.2 0.1 0.1 2 0.2 0.2 3 0 0 0",
     r"line 1: keypoint 1 visibility must be 0, 1 or 2"),
    ("keypoint outside", "0 0.5 0.5 0.2 0.2 0.1 0.1 2 0.2 1.5 2 0 0 0",
     r"line 1: keypoint 1 \(0\.2, 1\.5\) is outside"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("line", "message"), [row[1:] for row in BAD_POSE_LINES], ids=[row[0] for row in BAD_POSE_LINES]
)
def test_bad_pose_lines(tmp_path: Path, line: str, message: str) -> None:
    src = _yolo(tmp_path, POSE_YAML, {"s/a.txt": line + "\n"}, {"s/a.png": (64, 48)})
    with pytest.raises(DataError, match=r"^labels/s/a\.txt " + message):
        yolo_to_coco(src)


def test_every_bad_line_is_counted(tmp_path: Path) -> None:
    labels = {"a.txt": "0 0.5 0.5 0.2\n0 0.5 0.5 0.2 0.2\n0 2 0.5 0.2 0.2\n", "b.txt": "x 0.5 0.5 0.2 0.2\n"}
    src = _yolo(tmp_path, {"train": "images", "names": ["a"]}, labels, {"a.png": (9, 9), "b.png": (9, 9)})
    with pytest.raises(DataError, match=r"^labels/a\.txt line 1: .*\(and 2 more problems\)$"):
        yolo_to_coco(src)


def test_within_tolerance_is_accepted(tmp_path: Path) -> None:
    over = 1 + COORD_TOLERANCE / 2
    src = _yolo(tmp_path, {"train": "images", "names": ["a"]}, {"a.txt": f"0 0.5 0.5 {over} 0.5\n"},
                {"a.png": (100, 10)})  # fmt: skip
    dataset, _ = yolo_to_coco(src)
    np.testing.assert_allclose(dataset.labels[1].boxes[0], [0, 2.5, 100, 7.5])  # edges clipped to the image


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("names: [a\ntrain: images\n", r"data\.yaml: invalid YAML at line \d+, column \d+"),
        ("- a\n- b\n", r"data\.yaml: expected a mapping"),
        ({"train": "images"}, r"data\.yaml: missing key 'names'"),
        ({"train": "images", "names": ["a"], "nc": 2}, r"'nc' is 2 but 'names' lists 1 classes"),
        ({"train": "images", "names": ["a"], "kpt_shape": [3, 4]}, r"'kpt_shape' must be \[K, 2\] or \[K, 3\]"),
        ({"train": "images", "names": ["a"], "kpt_shape": [10**12, 3]}, r"'kpt_shape' has 1000000000000 keypoints; at most 10000"),
        ({"train": "images", "names": ["a"], "kpt_shape": [3, 3], "flip_idx": [0, 1, 1]}, r"'flip_idx' must be a perm"),
        ({"train": "images", "names": ["a"], "kpt_shape": [3, 3], "flip_idx": [1, 2, 0]}, r"made of swaps"),
        ({"train": ["images", "more"], "names": ["a"]}, r"'train' must be one folder of images"),
        ({"train": "nowhere", "names": ["a"]}, r"'train' folder .*nowhere not found"),
    ],
    ids=["syntax", "not a mapping", "no names", "nc mismatch", "bad kpt_shape", "huge kpt_shape", "flip not a permutation",
         "flip a 3-cycle", "list of folders", "missing folder"],
)  # fmt: skip
def test_bad_data_yaml(tmp_path: Path, data: dict[str, Any] | str, message: str) -> None:
    src = _yolo(tmp_path, data, {}, {"a.png": (4, 4)})
    with pytest.raises(DataError, match=message) as info:
        yolo_to_coco(src)
    assert "\n" not in str(info.value)


def test_missing_data_yaml(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: expected a data\.yaml in the folder, found no yaml file"):
        yolo_to_coco(tmp_path / "empty")
    with pytest.raises(DataError, match=r"nope\.yaml: not found"):
        yolo_to_coco(tmp_path / "nope.yaml")


def test_python_tags_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "created-by-yaml"
    text = f"train: images\nnames: [a]\nx: !!python/object/apply:os.mkdir [{str(marker)!r}]\n"
    src = _yolo(tmp_path, text, {}, {"a.png": (4, 4)})
    with pytest.raises(DataError, match=r"invalid YAML at line 3.*python/object/apply:os\.mkdir"):
        read_data_yaml(src)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------
# convert, the CLI's entry point


def test_convert_both_ways(tmp_path: Path) -> None:
    dataset, root = _make(tmp_path, _boxes_raw())
    save_coco(dataset, tmp_path / "in.json")
    yaml_path = convert(tmp_path / "in.json", tmp_path / "yolo", to="yolo", images=root)
    assert yaml_path == (tmp_path / "yolo" / "data.yaml").resolve()
    json_path = convert(tmp_path / "yolo", tmp_path / "out.json", to="coco", images=None)
    back = load_coco(json_path, image_root=tmp_path / "yolo" / "images")  # the documented image root
    want, got = _by_name(dataset), _by_name(back)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name][2], want[name][2], rtol=0, atol=1e-4)
    assert [(c.id, c.name, c.supercategory) for c in back.categories] == [(12, "dog", "animal"), (3, "cat", "animal"),
                                                                          (7, "car", "vehicle")]  # fmt: skip


@pytest.mark.parametrize(
    ("to", "images", "message"),
    [("yolo", None, r"needs the image root"), ("coco", "x", r"--images is only for --to yolo"), ("voc", None, "voc")],
)
def test_convert_refuses_bad_arguments(tmp_path: Path, to: str, images: str | None, message: str) -> None:
    with pytest.raises(UserError, match=message):
        convert(tmp_path / "a", tmp_path / "b", to=to, images=images)
