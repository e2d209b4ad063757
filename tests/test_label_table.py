"""The label table (pseudo.parquet) and FlatLabels: round trips bit for bit against the COCO json, one-line
errors for damaged and foreign files, memory-mapped arrays shared by DataLoader workers and processes."""

from __future__ import annotations

import json
import multiprocessing
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader

from datadistill.data.coco import load_coco
from datadistill.data.dataset import DetectionDataset, MixedBatchSampler, collate
from datadistill.data.inputs import CHECKED_IMAGES, check_image_files, load_pseudo_labels
from datadistill.data.label_table import (
    FlatLabels,
    LabelTableWriter,
    cache_label_table,
    first_images,
    label_table_schema,
    open_flat_labels,
    open_label_table,
    read_label_table,
    save_label_table,
)
from datadistill.data.synth import make_figures, make_shapes
from datadistill.errors import DataError, UserError

SIZE_PX = 64


def _with_crowd_and_scores(path: Path) -> Path:
    """Every third annotation an ignore region, every one with a score and an agreement (as select writes)."""
    raw = json.loads(path.read_text())
    for i, ann in enumerate(raw["annotations"]):
        ann.update(iscrowd=int(i % 3 == 2), score=0.5 + 0.01 * i, agreement=1 + i % 2)
    out = path.with_name("pseudo.json")
    out.write_text(json.dumps(raw))
    return out


@pytest.fixture(scope="module")
def crowd_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 box images with crowd regions and scores; returns the json (images beside it)."""
    root = tmp_path_factory.mktemp("shapes")
    return _with_crowd_and_scores(Path(make_shapes(root, num_images=6, seed=1, size_px=SIZE_PX)))


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 keypoint images (13 keypoints) with crowd regions and scores."""
    root = tmp_path_factory.mktemp("figures")
    return _with_crowd_and_scores(Path(make_figures(root, num_images=4, seed=2, size_px=SIZE_PX)))


def _bits(a: np.ndarray | None) -> bytes | None:
    return None if a is None else np.ascontiguousarray(a).tobytes()


def _flat_forms(json_path: Path, tmp_path: Path) -> dict[str, FlatLabels]:
    coco = load_coco(json_path)
    table = save_label_table(coco, tmp_path / "pseudo.parquet", chunk_images=4)  # two row groups or more
    return {
        "from-coco": FlatLabels.from_coco(coco),
        "table-in-memory": read_label_table(table),
        "table-memory-mapped": cache_label_table(open_label_table(table), tmp_path / "cache"),
    }


@pytest.mark.parametrize("fixture", ["crowd_shapes", "figures"])
def test_flat_forms_hold_each_images_annotations_bit_for_bit(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    json_path: Path = request.getfixturevalue(fixture)
    coco = load_coco(json_path)
    assert any(lab.iscrowd.any() for lab in coco.labels.values())
    for name, flat in _flat_forms(json_path, tmp_path).items():
        assert len(flat) == len(coco.images) and flat.num_objects == coco.num_annotations, name
        assert flat.categories == coco.categories and flat.num_keypoints == coco.num_keypoints
        for i, im in enumerate(coco.images):
            assert flat.image_record(i) == im, name  # select's ids are 1..N in order: the table keeps them
            lab, obj = coco.labels[im.id], flat.objects(i)
            assert _bits(np.asarray(obj.boxes, np.float64)) == _bits(lab.boxes), (name, i)
            assert np.asarray(obj.labels).tolist() == lab.labels.tolist(), (name, i)
            assert np.asarray(obj.iscrowd).tolist() == lab.iscrowd.tolist(), (name, i)
            assert _bits(obj.keypoints) == _bits(lab.keypoints), (name, i)


@pytest.mark.parametrize("fixture", ["crowd_shapes", "figures"])
def test_training_samples_are_the_same_from_the_json_and_from_the_label_table(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    json_path: Path = request.getfixturevalue(fixture)
    root = json_path.parent / "images"
    coco = load_coco(json_path)
    augment = dict(train=True, min_scale=0.6, max_scale=1.5, flip_prob=0.5, seed=4)
    reference = DetectionDataset(coco, root, **augment)
    for name, flat in _flat_forms(json_path, tmp_path).items():
        other = DetectionDataset(flat, root, **augment)
        for epoch in (0, 1):
            reference.set_epoch(epoch)
            other.set_epoch(epoch)
            for i in range(len(coco.images)):
                (img_a, tgt_a), (img_b, tgt_b) = reference[i], other[i]
                assert torch.equal(img_a, img_b), (name, epoch, i)
                assert tgt_a.keys() == tgt_b.keys(), (name, epoch, i)
                for key in tgt_a:
                    a, b = tgt_a[key], tgt_b[key]
                    assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, (name, epoch, i, key)
    assert any("ignore" in reference[i][1] for i in range(len(coco.images)))


def test_a_dataloader_with_two_workers_gives_the_batches_of_none(crowd_shapes: Path, tmp_path: Path) -> None:
    root = crowd_shapes.parent / "images"
    coco = load_coco(crowd_shapes)
    real = DetectionDataset(coco, root, train=True, seed=0)
    mapped = cache_label_table(open_label_table(save_label_table(coco, tmp_path / "p.parquet")), tmp_path / "cache")
    pseudo = DetectionDataset(mapped, root, train=True, seed=1)
    data = ConcatDataset([real, pseudo])

    def batches(workers: int) -> list[tuple[list[torch.Tensor], list[dict[str, Any]]]]:
        sampler = MixedBatchSampler(len(real), len(pseudo), batch_size=5, seed=2)
        out = []
        for epoch in (0, 1):
            for part in (sampler, real, pseudo):
                part.set_epoch(epoch)
            out += list(DataLoader(data, batch_sampler=sampler, num_workers=workers, collate_fn=collate))
        return out

    alone, shared = batches(0), batches(2)
    assert len(alone) == len(shared) == 4  # 2 epochs of 2 batches
    for (images_a, targets_a), (images_b, targets_b) in zip(alone, shared, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(images_a, images_b, strict=True))
        for ta, tb in zip(targets_a, targets_b, strict=True):
            assert ta.keys() == tb.keys()
            assert all(torch.equal(ta[k], tb[k]) if isinstance(ta[k], torch.Tensor) else ta[k] == tb[k] for k in ta)


def test_a_memory_mapped_set_is_pickled_as_its_folder(crowd_shapes: Path, tmp_path: Path) -> None:
    table = open_label_table(save_label_table(load_coco(crowd_shapes), tmp_path / "p.parquet"))
    mapped = cache_label_table(table, tmp_path / "cache")
    remapped = mapped.with_categories(mapped.categories[::-1], np.arange(mapped.num_classes)[::-1])
    data = pickle.dumps(remapped)
    assert len(data) < 4096  # the folder and the class map, not the arrays
    back = pickle.loads(data)
    assert back.folder == mapped.folder and isinstance(back.boxes, np.memmap)
    assert back.categories == remapped.categories
    assert np.array_equal(back.objects(2).labels, mapped.num_classes - 1 - np.asarray(mapped.objects(2).labels))
    in_memory = read_label_table(table)
    assert isinstance(pickle.loads(pickle.dumps(in_memory)).boxes, np.ndarray)


def _convert(args: tuple[str, str]) -> str:
    table, cache = args
    return str(cache_label_table(open_label_table(table), cache).folder)


def test_processes_that_convert_at_once_share_one_folder(crowd_shapes: Path, tmp_path: Path) -> None:
    table = save_label_table(load_coco(crowd_shapes), tmp_path / "p.parquet")
    with multiprocessing.get_context("fork").Pool(3) as pool:
        folders = pool.map(_convert, [(str(table), str(tmp_path / "cache"))] * 6)
    assert len(set(folders)) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(folders[0]).name]  # no temporary left
    # a damaged folder (a file cut short) is made again
    boxes = Path(folders[0]) / "boxes.bin"
    boxes.write_bytes(boxes.read_bytes()[:10])
    with pytest.raises(DataError, match=r"boxes.bin holds 10 bytes"):
        open_flat_labels(folders[0])
    again = cache_label_table(open_label_table(table), tmp_path / "cache")
    assert np.array_equal(again.boxes, FlatLabels.from_coco(load_coco(crowd_shapes)).boxes)


# ----------------------------------------------------------------------------------------------------
# one-line errors


def _rows(**columns: Any) -> pa.Table:
    """Two images of 40 x 30 px with one box each, as a table of the contract's schema (one column replaced)."""
    from datadistill.data.coco import Category

    base = {
        "file_name": ["a.png", "b.png"],
        "width": pa.array([40, 40], pa.int32()),
        "height": pa.array([30, 30], pa.int32()),
        "boxes": [[1.0, 2.0, 10.0, 12.0], [3.0, 3.0, 9.0, 9.0]],
        "labels": pa.array([[0], [1]], pa.list_(pa.int32())),
        "iscrowd": [[False], [True]],
        "scores": [[0.9], [0.4]],
        "agreement": pa.array([[2], [1]], pa.list_(pa.int32())),
    }
    base.update(columns)
    schema = label_table_schema((Category(1, "cat"), Category(2, "dog")), num_keypoints=0)
    arrays = {k: v if isinstance(v, pa.Array) else pa.array(v, schema.field(k).type) for k, v in base.items()}
    return pa.table(arrays).replace_schema_metadata(schema.metadata)


def _metadata(**changes: Any) -> dict[bytes, bytes]:
    meta = json.loads(_rows().schema.metadata[b"datadistill"])
    meta.update(changes)
    return {b"datadistill": json.dumps(meta).encode()}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda p: p.write_bytes(b"PAR1 not really"), "not a readable parquet file", id="damaged"),
        pytest.param(lambda p: p.write_text('{"images": []}'), "not a readable parquet file", id="a-json"),
        pytest.param(
            lambda p: pq.write_table(pa.table({"x": [1]}), p),
            "not a datadistill label table (no 'datadistill' schema metadata)",
            id="foreign-parquet",
        ),
        pytest.param(
            lambda p: pq.write_table(_rows().replace_schema_metadata(_metadata(format="other")), p),
            "not a datadistill label table (format 'other'",
            id="other-format",
        ),
        pytest.param(
            lambda p: pq.write_table(_rows().replace_schema_metadata(_metadata(version=2)), p),
            "label table version 2; this datadistill reads 1",
            id="newer-version",
        ),
        pytest.param(
            lambda p: pq.write_table(_rows().replace_schema_metadata(_metadata(categories=[{"id": 1}])), p),
            "metadata 'categories': category 1: 'name' must be a non-empty string",
            id="bad-categories",
        ),
        pytest.param(
            lambda p: pq.write_table(_rows().replace_schema_metadata({b"datadistill": b"{"}), p),
            "schema metadata 'datadistill' is not json",
            id="metadata-not-json",
        ),
        pytest.param(
            lambda p: pq.write_table(_rows().drop_columns(["scores"]), p),
            "column 'scores' is missing",
            id="missing-column",
        ),
        pytest.param(
            lambda p: pq.write_table(_rows(labels=pa.array([[0], [1]], pa.list_(pa.int64()))), p),
            "column 'labels' is list<int64>, expected list<int32>",
            id="labels-int64",
        ),
        pytest.param(
            lambda p: pq.write_table(_rows(width=pa.array(["40", "40"])), p),
            "column 'width' is string, expected int32",
            id="width-as-text",
        ),
    ],
)
def test_a_damaged_or_foreign_file_is_a_one_line_error_naming_it(tmp_path: Path, make: Any, message: str) -> None:
    path = tmp_path / "pseudo.parquet"
    make(path)
    with pytest.raises(DataError) as info:
        read_label_table(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        pytest.param(
            {"boxes": [[1.0, 2.0, 10.0, 12.0], [3.0, 3.0, 9.0]]},
            "image 2 (b.png): column 'boxes' holds 3 values, expected 4",
            id="box-short",
        ),
        pytest.param(
            {"iscrowd": [[False], []]}, "image 2 (b.png): column 'iscrowd' holds 0 values, expected 1", id="crowd-short"
        ),
        pytest.param(
            {"labels": pa.array([[0], [2]], pa.list_(pa.int32()))},
            "image 2 (b.png): column 'labels' class index 2 is not in [0, 2)",
            id="class-out-of-range",
        ),
        pytest.param(
            {"boxes": [[1.0, 2.0, float("nan"), 12.0], [3.0, 3.0, 9.0, 9.0]]},
            "image 1 (a.png): column 'boxes' object 0: [1, 2, nan, 12] is not a finite box",
            id="nan-box",
        ),
        pytest.param(
            {"boxes": [[1.0, 2.0, 10.0, 12.0], [3.0, 3.0, 3.0, 9.0]]},
            "image 2 (b.png): column 'boxes' object 0: [3, 3, 3, 9] is not a finite box with x2 > x1",
            id="empty-box",
        ),
        pytest.param(
            {"boxes": [[1.0, 2.0, 10.0, 12.0], [3.0, 3.0, 45.0, 9.0]]},
            "image 2 (b.png): column 'boxes' object 0: [3, 3, 45, 9] lies outside the image (40x30 px)",
            id="box-outside",
        ),
        pytest.param(
            {"height": pa.array([30, 0], pa.int32())},
            "image 2 (b.png): column 'height' must be positive",
            id="zero-height",
        ),
        pytest.param({"file_name": ["a.png", ""]}, "image 2 (): column 'file_name' is empty", id="empty-name"),
        pytest.param({"file_name": ["a.png", None]}, "image 2 (None): column 'file_name' is null", id="null-name"),
        pytest.param({"scores": [[0.9], None]}, None, id="scores-not-read-for-training"),
    ],
)
def test_a_bad_row_is_a_one_line_error_naming_the_image_and_column(
    tmp_path: Path, columns: dict[str, Any], message: str | None
) -> None:
    path = tmp_path / "pseudo.parquet"
    pq.write_table(_rows(**columns), path)
    if message is None:
        assert len(read_label_table(path)) == 2
        return
    with pytest.raises(DataError) as info:
        read_label_table(path)
    assert str(info.value) == f"{path}: {message}" or str(info.value).startswith(f"{path}: {message}"), info.value
    assert "\n" not in str(info.value)


def test_the_writer_checks_shapes_and_writes_nothing_until_closed(tmp_path: Path) -> None:
    from datadistill.data.coco import Category

    path = tmp_path / "pseudo.parquet"
    ok = dict(file_names=["a.png"], widths=np.array([40]), heights=np.array([30]), counts=np.array([2]),
              boxes=np.zeros((2, 4)), labels=np.zeros(2), iscrowd=np.zeros(2, bool), scores=np.ones(2),
              agreement=np.ones(2))  # fmt: skip
    with pytest.raises(RuntimeError, match="stop"), LabelTableWriter(path, categories=(Category(1, "a"),),
                                                                     num_keypoints=0) as writer:  # fmt: skip
        writer.write(**ok)
        assert not path.exists()
        with pytest.raises(
            ValueError, match=r"boxes must have shape \(2, 4\) \(counts sum to 2 objects\), got \(3, 4\)"
        ):
            writer.write(**{**ok, "boxes": np.zeros((3, 4))})
        with pytest.raises(ValueError, match="keypoints given, but the categories define none"):
            writer.write(**ok, keypoints=np.zeros((2, 1, 3)))
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []  # aborted: no file, no temporary
    with LabelTableWriter(path, categories=(Category(1, "a"),), num_keypoints=0, info={"policy": "count"}) as writer:
        writer.write(**ok)
        writer.write(**{**ok, "file_names": ["b.png"], "counts": np.array([0]), **_none(0)})
    table = open_label_table(path)
    assert len(table) == 2 and table.info == {"policy": "count"} and table.file_names(np.array([1])) == ["b.png"]
    assert pq.ParquetFile(path).metadata.num_row_groups == 2
    assert [p.name for p in tmp_path.iterdir()] == ["pseudo.parquet"]


def _none(m: int) -> dict[str, np.ndarray]:
    return dict(boxes=np.zeros((m, 4)), labels=np.zeros(m), iscrowd=np.zeros(m, bool), scores=np.ones(m),
                agreement=np.ones(m))  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# the checks of a student's inputs


def test_pseudo_classes_are_matched_by_name_in_both_forms(crowd_shapes: Path, tmp_path: Path) -> None:
    real = load_coco(crowd_shapes)
    raw = json.loads(crowd_shapes.read_text())
    raw["categories"] = raw["categories"][::-1]  # same names, another order: category ids stay
    reordered = tmp_path / "reordered.json"
    reordered.write_text(json.dumps(raw))
    table = save_label_table(load_coco(reordered), tmp_path / "reordered.parquet")
    root = str(crowd_shapes.parent / "images")
    forms = [load_pseudo_labels(str(reordered), root, real), load_pseudo_labels(str(table), root, real),
             load_pseudo_labels(str(table), root, real, cache_dir=tmp_path / "cache")]  # fmt: skip
    for flat in forms:
        assert flat.categories == real.categories
        for i, im in enumerate(real.images):
            assert np.asarray(flat.objects(i).labels).tolist() == real.labels[im.id].labels.tolist()


def test_pseudo_keypoints_that_differ_are_refused_for_a_label_table(
    figures: Path, crowd_shapes: Path, tmp_path: Path
) -> None:
    table = save_label_table(load_coco(figures), tmp_path / "pseudo.parquet")
    with pytest.raises(
        UserError, match=r"pseudo.parquet: pseudo-label keypoints \[head, .*\] differ from the data's \[\]"
    ):
        load_pseudo_labels(str(table), str(figures.parent / "images"), load_coco(crowd_shapes))


def test_a_large_set_is_checked_on_a_sample_and_a_missing_file_named_when_read(
    crowd_shapes: Path, tmp_path: Path
) -> None:
    coco = load_coco(crowd_shapes)
    n = CHECKED_IMAGES + 500
    images = tmp_path / "images"
    images.mkdir()
    source = crowd_shapes.parent / "images" / coco.images[0].file_name
    im = coco.images[0]
    with LabelTableWriter(tmp_path / "big.parquet", categories=coco.categories, num_keypoints=0) as writer:
        writer.write([f"{i:05d}.png" for i in range(n)], np.full(n, im.width), np.full(n, im.height),
                     np.zeros(n, np.int64), **_none(0))  # fmt: skip
    for i in range(n):
        (images / f"{i:05d}.png").symlink_to(source)
    table = open_label_table(tmp_path / "big.parquet")
    flat = read_label_table(table)
    sampled = set(np.sort(np.random.default_rng(0).choice(n, CHECKED_IMAGES, replace=False)).tolist())
    unchecked = min(set(range(n)) - sampled)
    (images / f"{unchecked:05d}.png").unlink()
    check_image_files(table, images, what="pseudo-label", option="--pseudo-images")  # the sample is all there
    check_image_files(flat, images, what="pseudo-label", option="--pseudo-images")
    with pytest.raises(DataError, match=rf"^{images}/{unchecked:05d}\.png: image file not found$"):
        DetectionDataset(flat, images, train=False)[unchecked]
    for i in sorted(sampled)[:3]:
        (images / f"{i:05d}.png").unlink()
    first = sorted(sampled)[0]
    with pytest.raises(UserError) as info:
        check_image_files(table, images, what="pseudo-label", option="--pseudo-images")
    assert str(info.value) == (
        f"3 of {CHECKED_IMAGES} checked (a sample of the {n}) pseudo-label images are missing from --pseudo-images "
        f"{images}, the first: {first:05d}.png"
    )


@pytest.mark.parametrize("which", ["crowd_shapes", "figures"])
@pytest.mark.parametrize("count", [1, 3, 50])
def test_first_images_are_the_json_s_first_images_with_objects(tmp_path: Path, request, which: str, count: int) -> None:
    json_path = request.getfixturevalue(which)
    coco = load_coco(json_path)
    head = first_images(save_label_table(coco, tmp_path / "pseudo.parquet", chunk_images=2), count=count)
    want = [im for im in coco.images if len(coco.labels[im.id])][:count]
    assert [im.file_name for im in head.images] == [im.file_name for im in want] and len(want) == min(
        count, 6 if which == "crowd_shapes" else 4
    )
    for mine, theirs in zip(head.images, want, strict=True):
        a, b = head.labels[mine.id], coco.labels[theirs.id]
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.labels, b.labels)
        assert np.array_equal(a.scores, b.scores) and np.array_equal(a.iscrowd, b.iscrowd)
        assert (a.keypoints is None) == (b.keypoints is None)
        if a.keypoints is not None:
            assert np.array_equal(a.keypoints, b.keypoints)


def test_an_empty_table_reads_as_no_images(tmp_path: Path, crowd_shapes: Path) -> None:
    """select --drop-empty that keeps nothing writes a table without rows: it reads back empty, not a crash."""
    coco = load_coco(crowd_shapes)
    with LabelTableWriter(tmp_path / "pseudo.parquet", categories=coco.categories, num_keypoints=0) as writer:
        assert writer.num_images == 0
    flat = read_label_table(tmp_path / "pseudo.parquet")
    assert len(flat) == 0 and flat.boxes.shape == (0, 4) and flat.offsets.tolist() == [0]
