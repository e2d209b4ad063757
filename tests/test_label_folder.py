"""The labeling folder's one validator (open_label_folder) and the checks select and review make on every
shard they read: a one-line UserError naming the file and the field, never a traceback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from datadistill.data.label_folder import open_label_folder, shard_schema, write_shard
from datadistill.errors import UserError
from datadistill.stages.review import review
from datadistill.stages.select import SelectConfig, select_pseudo_labels

GOOD = {"status": "complete", "num_shards": 1, "classes": {"names": ["a", "b"]},
        "config": {"views": ["identity", "hflip"], "image_root": "/data"}}  # fmt: skip


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        pytest.param(None, "no manifest.json", id="missing"),
        pytest.param("[1, 2]", "not a labeling manifest", id="a list"),
        pytest.param("{bad json", "invalid json", id="broken json"),
        pytest.param({**GOOD, "status": "running"}, "labeling is not complete", id="running"),
        pytest.param({**GOOD, "classes": "ab"}, "'classes' must be a dict, got str", id="classes a string"),
        pytest.param({**GOOD, "classes": {"names": "ab"}}, "'classes.names' must be a list", id="names a string"),
        pytest.param(
            {**GOOD, "classes": {"names": [1, 2]}}, "'classes.names' must be a list of class names", id="names ints"
        ),
        pytest.param({**GOOD, "config": {"views": 8}}, "'config.views' must be a list, got int", id="views an int"),
        pytest.param({**GOOD, "config": {"image_root": 3}}, "'config.image_root' must be a str", id="root an int"),
        pytest.param({**GOOD, "config": []}, "'config' must be a dict, got list", id="config a list"),
        pytest.param({**GOOD, "num_shards": "2"}, "'num_shards' must be a non-negative integer", id="shards a string"),
    ],
)
def test_a_bad_manifest_is_one_line(tmp_path: Path, manifest, message: str) -> None:
    if manifest is not None:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(UserError, match=message) as info:
        open_label_folder(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_a_good_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(GOOD))
    folder = open_label_folder(tmp_path)
    assert folder.class_names == ("a", "b") and folder.views == ("identity", "hflip") and folder.image_root == "/data"
    assert folder.num_views(max_agreement=7) == 2
    with pytest.raises(UserError, match="no label shards found"):
        folder.shard_files()


ROW = {"file_name": "u.png", "width": 64, "height": 64, "boxes": [1.0, 2.0, 30.0, 40.0, 5.0, 5.0, 20.0, 20.0],
       "scores": [0.9, 0.4], "labels": [0, 1], "agreement": [2, 1], "error": None}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"labels": [0]}, "column 'labels' holds 1 values for 2 objects", id="labels short"),
        pytest.param({"agreement": [1, 1, 1]}, "column 'agreement' holds 3 values for 2 objects", id="agreement long"),
        pytest.param({"boxes": [1.0, 2.0, 3.0, 4.0]}, "column 'boxes' holds 4 values for 2 objects", id="boxes short"),
        pytest.param({"scores": [float("nan"), 0.4]}, "row 1: column 'scores' holds nan", id="NaN score"),
        pytest.param({"scores": [float("inf"), 0.4]}, "row 1: column 'scores' holds inf", id="inf score"),
        pytest.param(
            {"labels": [0, 7]},
            "row 1: column 'labels' holds 7, expected a class index in [0, 2)",
            id="label out of range",
        ),
        pytest.param(
            {"labels": [-1, 0]},
            "row 1: column 'labels' holds -1, expected a class index in [0, 2)",
            id="negative label",
        ),
    ],
)
@pytest.mark.parametrize("stage", ["select", "review"])
def test_a_damaged_shard_is_one_line_naming_it(tmp_path: Path, change: dict, message: str, stage: str) -> None:
    write_shard(tmp_path / "labels" / "shards" / "part-00000.parquet", [ROW, {**ROW, "file_name": "v.png", **change}],
                shard_schema(0))  # fmt: skip
    (tmp_path / "labels" / "manifest.json").write_text(json.dumps(GOOD))
    ref = {"images": [{"id": 1, "file_name": "l.png", "width": 64, "height": 64}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9]}],
           "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}  # fmt: skip
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    with pytest.raises(UserError, match=re.escape(message)) as info:
        if stage == "select":
            select_pseudo_labels(SelectConfig(labels=str(tmp_path / "labels"), reference=str(tmp_path / "ref.json"),
                                              out=str(tmp_path / "sel" / "pseudo.json")))  # fmt: skip
        else:
            review(tmp_path / "labels", tmp_path / "ref.json", out=tmp_path / "rev", top=1)
    assert "part-00000.parquet" in str(info.value) and "\n" not in str(info.value)
    if "holds" in message and "values for" in message:  # the label-count ones are checked before the scores
        assert "object" in str(info.value)
    assert not (tmp_path / "sel" / "pseudo.json").exists()


def _folder_with(tmp_path: Path, rows: list[dict], *, num_shards: int = 1, schema=None, k: int = 0) -> None:
    write_shard(tmp_path / "labels" / "shards" / "part-00000.parquet", rows, schema or shard_schema(k))
    (tmp_path / "labels" / "manifest.json").write_text(json.dumps({**GOOD, "num_shards": num_shards}))
    cats = [{"id": 1, "name": "a", **({"keypoints": ["p", "q"]} if k else {})}, {"id": 2, "name": "b"}]
    ref = {"images": [{"id": 1, "file_name": "l.png", "width": 64, "height": 64}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9],
                            **({"keypoints": [2, 2, 2, 3, 3, 2]} if k else {})}], "categories": cats}  # fmt: skip
    (tmp_path / "ref.json").write_text(json.dumps(ref))


def _select(tmp_path: Path, **options) -> None:
    select_pseudo_labels(SelectConfig(labels=str(tmp_path / "labels"), reference=str(tmp_path / "ref.json"),
                                      out=str(tmp_path / "sel" / "pseudo.json"), **options))  # fmt: skip


def test_a_missing_shard_is_one_line_not_a_smaller_selection(tmp_path: Path) -> None:
    _folder_with(tmp_path, [ROW], num_shards=3)
    with pytest.raises(UserError, match=r"lists 3 shards but part-00001.parquet is missing") as info:
        _select(tmp_path)
    assert "\n" not in str(info.value)


def test_a_shard_of_another_schema_is_one_line(tmp_path: Path) -> None:
    import pyarrow as pa

    schema = shard_schema(0)
    schema = schema.set(schema.get_field_index("scores"), pa.field("scores", pa.list_(pa.float64())))
    _folder_with(tmp_path, [ROW], schema=schema)
    with pytest.raises(UserError, match=r"column 'scores' is list<\w+: double>, not list<item: float>"):
        _select(tmp_path)


def test_a_null_list_of_labels_is_a_damaged_shard(tmp_path: Path) -> None:
    _folder_with(tmp_path, [{**ROW, "labels": None}])
    with pytest.raises(UserError, match=r"column 'labels' holds 0 values for 2 objects"):
        _select(tmp_path)


@pytest.mark.parametrize("policy", ["count", "all"])
def test_nan_keypoints_are_one_line(tmp_path: Path, policy: str) -> None:
    row = {**ROW, "keypoints": [1.0, 2.0, 0.9, float("nan"), 4.0, 0.5, 1.0, 2.0, 0.9, 3.0, 4.0, float("nan")]}
    _folder_with(tmp_path, [row], k=2)
    with pytest.raises(UserError, match=r"row 0: column 'keypoints' holds nan"):
        _select(tmp_path, keypoint_policy=policy)
