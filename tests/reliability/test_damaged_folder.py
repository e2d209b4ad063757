"""review, select and report's doubt gallery on a damaged labeling folder: every damage one line naming the
shard file (or the manifest), the row and the field, and no input file changed."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import cli, error_line

from datadistill.data.label_folder import shard_schema, write_shard
from datadistill.errors import UserError
from datadistill.stages.report import doubt_gallery

W, H = 64, 48
SHARD = "part-00000.parquet"


def _rows() -> list[dict[str, Any]]:
    """Four images of W x H px, 2 classes, 4 views; the last one skipped (an error row)."""

    def row(name: str, scores: list[float], labels: list[int], agreement: list[int]) -> dict[str, Any]:
        boxes = [float(v) for i in range(len(scores)) for v in (2 + i, 3, 30 + i, 40)]
        return {"file_name": name, "width": W, "height": H, "boxes": boxes, "scores": scores, "labels": labels,
                "agreement": agreement, "score_spread": [0.1] * len(scores), "box_spread": [1.0] * len(scores),
                "error": None}  # fmt: skip

    return [
        row("a.png", [0.9, 0.6], [0, 1], [4, 2]),
        row("b.png", [0.55], [1], [1]),
        row("c.png", [0.3, 0.8, 0.7], [0, 0, 1], [1, 4, 3]),
        {
            "file_name": "d.png",
            "width": 0,
            "height": 0,
            "boxes": [],
            "scores": [],
            "labels": [],
            "agreement": [],
            "score_spread": [],
            "box_spread": [],
            "error": "empty file",
        },  # fmt: skip
    ]


def _manifest() -> dict[str, Any]:
    return {"format": "datadistill-labels", "status": "complete", "num_shards": 1,
            "classes": {"names": ["a", "b"]},
            "config": {"views": ["identity", "hflip", "scale:0.8", "scale:1.2"], "image_root": "."}}  # fmt: skip


def _write(root: Path, rows: list[dict[str, Any]], manifest: Any) -> None:
    labels = root / "labels"
    write_shard(labels / "shards" / SHARD, rows, shard_schema(0))
    (labels / "manifest.json").write_text(json.dumps(manifest))
    images = [{"id": i, "file_name": f"l{i}.png", "width": W, "height": H} for i in (1, 2)]
    anns = [{"id": i, "image_id": i, "category_id": i, "bbox": [4, 4, 20, 20], "iscrowd": 0} for i in (1, 2)]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    (root / "ref.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (root / "selection.json").write_text(json.dumps({"thresholds": {"a": 0.5, "b": 0.5}, "min_agreement": 1}))


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


def _set(row: int, field: str, value: Any) -> Callable[[list[dict[str, Any]]], None]:
    def edit(rows: list[dict[str, Any]]) -> None:
        rows[row][field] = value

    return edit


# (id, the rows' edit, the fragments of the one error line: the shard, the row, the field)
ROW_DAMAGE = [
    ("agreement-short", _set(0, "agreement", [4]), ("row 0", "'agreement'")),
    ("labels-long", _set(1, "labels", [1, 0]), ("row 1", "'labels'")),
    ("boxes-short", _set(2, "boxes", [1.0, 2.0, 3.0]), ("row 2", "'boxes'")),
    ("score-spread-long", _set(1, "score_spread", [0.1, 0.2]), ("row 1", "'score_spread'")),
    ("box-spread-short", _set(2, "box_spread", [1.0]), ("row 2", "'box_spread'")),
    ("score-nan", _set(2, "scores", [0.3, math.nan, 0.7]), ("row 2", "'scores'", "nan")),
    ("score-inf", _set(0, "scores", [math.inf, 0.6]), ("row 0", "'scores'", "inf")),
    ("score-negative-inf", _set(1, "scores", [-math.inf]), ("row 1", "'scores'", "inf")),
    ("box-nan", _set(1, "boxes", [1.0, math.nan, 3.0, 4.0]), ("row 1", "'boxes'", "nan")),
    ("box-inf", _set(0, "boxes", [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, math.inf, 4.0]), ("row 0", "'boxes'", "inf")),
    ("label-too-large", _set(2, "labels", [0, 2, 1]), ("row 2", "'labels'", "2")),
    ("label-negative", _set(0, "labels", [0, -1]), ("row 0", "'labels'", "-1")),
    ("width-zero", _set(1, "width", 0), ("row 1", "'width'", "0")),
    ("height-negative", _set(2, "height", -48), ("row 2", "'height'", "-48")),
    ("file-name-null", _set(1, "file_name", None), ("row 1", "'file_name'")),
    ("agreement-zero", _set(0, "agreement", [4, 0]), ("row 0", "'agreement'", "0")),
]


def _manifest_edit(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], Any]:
    def edit(m: dict[str, Any]) -> Any:
        target = m
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return m

    return edit


MANIFEST_DAMAGE = [
    ("classes-a-string", _manifest_edit(("classes",), "a,b"), ("'classes'",)),
    ("class-names-a-string", _manifest_edit(("classes", "names"), "ab"), ("'classes.names'",)),
    ("class-names-numbers", _manifest_edit(("classes", "names"), [1, 2]), ("'classes.names'",)),
    ("class-name-control", _manifest_edit(("classes", "names"), ["a", "b\x1b[31m"]), ("'classes.names'", "control")),
    ("class-name-nul", _manifest_edit(("classes", "names"), ["a\x00", "b"]), ("'classes.names'", "control")),
    ("views-an-int", _manifest_edit(("config", "views"), 8), ("'config.views'",)),
    ("views-a-string", _manifest_edit(("config", "views"), "identity"), ("'config.views'",)),
    ("views-empty", _manifest_edit(("config", "views"), []), ("'config.views'",)),
    ("views-numbers", _manifest_edit(("config", "views"), [1, 2]), ("'config.views'",)),
    ("config-a-list", _manifest_edit(("config",), ["views"]), ("'config'",)),
    ("image-root-an-int", _manifest_edit(("config", "image_root"), 3), ("'config.image_root'",)),
    ("num-shards-a-string", _manifest_edit(("num_shards",), "1"), ("'num_shards'",)),
    ("num-shards-a-bool", _manifest_edit(("num_shards",), True), ("'num_shards'",)),
    ("manifest-a-list", lambda m: [m], ("not a labeling manifest",)),
]


def _damaged(root: Path, rows_edit: Any = None, manifest_edit: Any = None) -> dict[str, str]:
    rows, manifest = _rows(), _manifest()
    if rows_edit is not None:
        rows_edit(rows)
    if manifest_edit is not None:
        manifest = manifest_edit(manifest)
    _write(root, rows, manifest)
    return _hashes(root)


COMMANDS = {
    "review": lambda root: (
        "review",
        "--labels",
        root / "labels",
        "--reference",
        root / "ref.json",
        "--top",
        "3",
        "--out",
        root / "rev",
    ),  # fmt: skip
    "select": lambda root: (
        "select",
        "--labels",
        root / "labels",
        "--reference",
        root / "ref.json",
        "--out",
        root / "sel" / "pseudo.json",
    ),  # fmt: skip
}


DAMAGE = [("rows", *d[1:]) for d in ROW_DAMAGE] + [("manifest", *d[1:]) for d in MANIFEST_DAMAGE]


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(("where", "edit", "fragments"), DAMAGE, ids=[d[0] for d in ROW_DAMAGE + MANIFEST_DAMAGE])
def test_a_damaged_folder_is_one_line_naming_the_file_row_and_field(
    tmp_path: Path, command: str, where: str, edit: Any, fragments: tuple[str, ...]
) -> None:
    """A damaged shard: its file, the row and the column; a damaged manifest: manifest.json and the field."""
    before = _damaged(tmp_path, **{f"{where}_edit": edit})
    result = cli(*COMMANDS[command](tmp_path))
    if command == "select" and "spread" in fragments[-1]:  # select reads no spread: the shard serves it whole
        assert result.rc == 0, result
        assert json.loads((tmp_path / "sel" / "selection.json").read_text())["candidates"] == 6
        return
    error_line(result, SHARD if where == "rows" else "manifest.json", *fragments)
    assert _hashes(tmp_path) == before  # nothing written, no input changed


@pytest.mark.parametrize(("edit", "fragments"), [d[1:] for d in ROW_DAMAGE], ids=[d[0] for d in ROW_DAMAGE])
def test_the_reports_doubt_gallery_refuses_a_damaged_shard_in_one_line(
    tmp_path: Path, edit: Any, fragments: tuple[str, ...]
) -> None:
    before = _damaged(tmp_path, rows_edit=edit)
    with pytest.raises(UserError) as caught:
        doubt_gallery(tmp_path / "labels", tmp_path / "selection.json", ("a", "b"), tmp_path, None)
    message = str(caught.value)
    assert "\n" not in message and SHARD in message, message
    assert all(f in message for f in fragments), (fragments, message)
    assert _hashes(tmp_path) == before


def test_the_undamaged_folder_passes(tmp_path: Path) -> None:
    """The oracle of the cases above: the same folder undamaged is reviewed and selected."""
    _damaged(tmp_path)
    result = cli(*COMMANDS["review"](tmp_path))
    assert result.rc == 0, result
    review = json.loads((tmp_path / "rev" / "review.json").read_text())
    assert review["num_views"] == 4 and review["images_sent"] == 3
    result = cli(*COMMANDS["select"](tmp_path))
    assert result.rc == 0, result
    assert json.loads((tmp_path / "sel" / "selection.json").read_text())["candidates"] == 6


# ---------------------------------------------------------------------------------------------------------
# class names


def _reference_with_class(root: Path, name: str) -> None:
    ref = json.loads((root / "ref.json").read_text())
    ref["categories"][1]["name"] = name
    (root / "ref.json").write_text(json.dumps(ref))


@pytest.mark.parametrize("name", ["b\x01", "b\x1b[31m", "b\x00"], ids=["soh", "escape", "nul"])
@pytest.mark.parametrize("command", ["review", "train"])
def test_a_class_name_with_a_control_character_is_refused(tmp_path: Path, name: str, command: str) -> None:
    _damaged(tmp_path)
    _reference_with_class(tmp_path, name)
    manifest = json.loads((tmp_path / "labels" / "manifest.json").read_text())
    manifest["classes"]["names"] = ["a", name]  # the labeling agrees with the reference
    (tmp_path / "labels" / "manifest.json").write_text(json.dumps(manifest))
    before = _hashes(tmp_path)
    argv = COMMANDS["review"](tmp_path) if command == "review" else (
        "train", "--data", tmp_path / "ref.json", "--images", tmp_path, "--out", tmp_path / "train")  # fmt: skip
    line = error_line(cli(*argv), "control character")
    assert all(c not in line for c in "\x00\x01\x1b")
    assert _hashes(tmp_path) == before


def test_the_label_studio_config_of_hostile_class_names_is_well_formed_xml(tmp_path: Path) -> None:
    """Names that are legal but mean something to XML (quotes, <, &, ]]>) and non-ASCII ones come back as
    they are from the config review writes."""
    import xml.etree.ElementTree as ET

    names = ['a"<b>&amp;', "]]><!--x", "ring $x^$ é"]
    _damaged(tmp_path)
    ref = json.loads((tmp_path / "ref.json").read_text())
    ref["categories"] = [{"id": 1, "name": names[0]}, {"id": 2, "name": names[1]}, {"id": 3, "name": names[2]}]
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    manifest = json.loads((tmp_path / "labels" / "manifest.json").read_text())
    manifest["classes"]["names"] = names
    (tmp_path / "labels" / "manifest.json").write_text(json.dumps(manifest))
    assert cli(*COMMANDS["review"](tmp_path)).rc == 0
    root = ET.parse(tmp_path / "rev" / "label_config.xml").getroot()
    assert [label.get("value") for label in root.iter("Label")] == names
