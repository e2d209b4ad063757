"""Label shards: what is labeled, how a shard is cut into batches, and how its rows are written and read.

The unlabeled images (:class:`ImageSource`) are listed once, in a deterministic order, and cut into shards
of ``shard_size`` images; each shard is cut into the same forward-pass batches by every engine
(:func:`plan_batches`). Each parquet row is one image: ``file_name`` (relative to the source root),
``width``, ``height``, and flat lists ``boxes`` (4N, xyxy px), ``scores`` (N), ``labels`` (N class indices),
``agreement`` (N, how many views saw the object), ``score_spread`` and ``box_spread`` (N, how much the
object's score and box vary across the views: :mod:`datadistill.core.uncertainty`; a null list where the
labeling did not measure them), ``keypoints`` (N*K*3, x, y, score; keypoint models only), and ``error``
(why an image was skipped, else null). Shards written before ``score_spread``/``box_spread`` existed are
read with those columns null (:func:`read_shard`), and their objects' spreads are NaN
(:func:`object_values`). :class:`ShardWriter` writes a shard atomically
once all its rows are in, the one rule that makes a killed run resume without losing or repeating work;
the local and the Ray engines both write through it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from datadistill.core.types import Detections
from datadistill.data.coco import load_coco, read_json
from datadistill.data.images import list_images, read_image, resolve_image_path
from datadistill.errors import DataError, UserError
from datadistill.runtime.io import write_atomic


@dataclass(frozen=True)
class ImageSource:
    """The unlabeled images: a root folder and file names relative to it, in labeling order."""

    root: Path
    files: tuple[str, ...]
    description: str = ""

    def shard(self, index: int, shard_size: int) -> tuple[str, ...]:
        return self.files[index * shard_size : (index + 1) * shard_size]

    def num_shards(self, shard_size: int) -> int:
        return -(-len(self.files) // shard_size)


def list_source(src: str | os.PathLike[str], *, image_root: str | os.PathLike[str] | None = None) -> ImageSource:
    """The images of a folder (recursive), a text file of paths, or a COCO json (annotations ignored).

    A text file's paths are relative to ``image_root`` (default: the text file's folder). A COCO json's
    ``file_name`` are relative to ``image_root`` (default: ``images/`` beside the json if it exists, else
    the json's folder). Paths that leave the root are refused.
    """
    path = Path(src)
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise UserError(f"{path}: no images found (looked for {', '.join(sorted({'.jpg', '.png', '.webp'}))} ...)")
        return ImageSource(root=path, files=tuple(files), description=f"folder {path}")
    if not path.exists():
        raise UserError(f"{path}: no such folder or file")
    if path.suffix.lower() == ".json":
        raw = read_json(path)
        if isinstance(raw, dict) and "images" in raw and "annotations" not in raw:
            raw = {**raw, "annotations": []}
        default_root = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
        root = Path(image_root) if image_root is not None else default_root
        dataset = load_coco(path, image_root=root)
        return ImageSource(root=root, files=tuple(im.file_name for im in dataset.images), description=f"COCO {path}")
    root = Path(image_root) if image_root is not None else path.parent
    files = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            name = line.strip()
            if not name or name.startswith("#"):
                continue
            candidate = Path(name)
            if candidate.is_absolute() and candidate.resolve().is_relative_to(root.resolve()):
                name = candidate.resolve().relative_to(root.resolve()).as_posix()
            try:
                resolve_image_path(root, name)
            except DataError as exc:
                raise UserError(f"{path} line {lineno}: {exc}") from exc
            files.append(name)
    if not files:
        raise UserError(f"{path}: the list names no images")
    if len(set(files)) != len(files):
        raise UserError(f"{path}: lists an image more than once")
    return ImageSource(root=root, files=tuple(files), description=f"list {path}")


class ShardImages(Dataset):
    """Decodes images for the DataLoader workers; a broken file gives its error instead of a crash."""

    def __init__(self, root: Path, items: list[tuple[int, str]]) -> None:
        self.root, self.items = root, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        shard, name = self.items[i]
        try:
            image = read_image(resolve_image_path(self.root, name))
            return {"shard": shard, "file_name": name, "image": image, "error": None}
        except DataError as exc:
            return {"shard": shard, "file_name": name, "image": None, "error": str(exc).split(": ", 1)[-1]}
        except Exception as exc:  # a decoder bug on a hostile file must not kill the run
            return {"shard": shard, "file_name": name, "image": None, "error": f"{type(exc).__name__}: {exc}"}


def worker_init(_: int) -> None:
    torch.set_num_threads(1)


def collate_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def shard_path(out: Path, index: int) -> Path:
    return out / "shards" / f"part-{index:05d}.parquet"


def plan_batches(num_images: int, batch_size: int) -> list[range]:
    """The forward passes of one shard of ``num_images``: positions in runs of ``batch_size``, the last
    run shorter. Batches never cross a shard, so that a shard's labels depend on the shard alone, not on
    the engine, the number of processes or where a resumed run started (batch composition changes
    floating-point results: the model pads a batch to its largest image)."""
    return [range(i, min(i + batch_size, num_images)) for i in range(0, num_images, batch_size)]


def shard_schema(num_keypoints: int) -> pa.Schema:
    fields = [
        pa.field("file_name", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("boxes", pa.list_(pa.float32())),
        pa.field("scores", pa.list_(pa.float32())),
        pa.field("labels", pa.list_(pa.int32())),
        pa.field("agreement", pa.list_(pa.int32())),
        pa.field("score_spread", pa.list_(pa.float32())),
        pa.field("box_spread", pa.list_(pa.float32())),
    ]
    if num_keypoints:
        fields.append(pa.field("keypoints", pa.list_(pa.float32())))
    fields.append(pa.field("error", pa.string()))
    return pa.schema(fields, metadata={b"num_keypoints": str(num_keypoints).encode()})


def write_shard(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    columns = {name: [r.get(name) for r in rows] for name in schema.names}
    table = pa.Table.from_pydict(columns, schema=schema)
    write_atomic(path, lambda f: pq.write_table(table, f, compression="zstd"))


def detections_row(name: str, width: int, height: int, det: Detections, num_keypoints: int) -> dict[str, Any]:
    row = {
        "file_name": name,
        "width": width,
        "height": height,
        "boxes": det.boxes.reshape(-1).tolist(),
        "scores": det.scores.tolist(),
        "labels": det.labels.tolist(),
        "agreement": (det.agreement if det.agreement is not None else torch.ones(len(det), dtype=torch.int64)).tolist(),
        "score_spread": None if det.score_spread is None else det.score_spread.tolist(),
        "box_spread": None if det.box_spread is None else det.box_spread.tolist(),
        "error": None,
    }
    if num_keypoints:
        kps = det.keypoints if det.keypoints is not None else torch.zeros(len(det), num_keypoints, 3)
        row["keypoints"] = kps.reshape(-1).tolist()
    return row


def error_row(name: str, error: str, num_keypoints: int) -> dict[str, Any]:
    row = {"file_name": name, "width": 0, "height": 0, "boxes": [], "scores": [], "labels": [], "agreement": [],
           "score_spread": [], "box_spread": [], "error": error}  # fmt: skip
    if num_keypoints:
        row["keypoints"] = []
    return row


# Columns added after the first shards were written: a shard without one reads it as null lists.
OPTIONAL_COLUMNS: dict[str, pa.DataType] = {
    "score_spread": pa.list_(pa.float32()),
    "box_spread": pa.list_(pa.float32()),
}


def read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One shard's table; a file that is not a readable shard (copied in part, damaged on disk, written by
    something else) is a one-line UserError that names it and says how to redo it. An
    :data:`OPTIONAL_COLUMNS` column the shard lacks (an older shard) comes back as nulls, in schema order."""
    try:
        present = set(pq.read_schema(path).names)
        missing = [c for c in (columns if columns is not None else list(OPTIONAL_COLUMNS)) if c not in present]
        wanted = None if columns is None else [c for c in columns if c not in missing]
        table = pq.read_table(path, columns=wanted)
        for name in (c for c in missing if c in OPTIONAL_COLUMNS):
            nulls = pa.nulls(table.num_rows, OPTIONAL_COLUMNS[name])
            where = columns.index(name) if columns is not None else _optional_position(table, name)
            table = table.add_column(where, pa.field(name, OPTIONAL_COLUMNS[name]), nulls)
        return table
    except (OSError, pa.ArrowException) as exc:
        reason = " ".join(str(exc).replace(str(path), "").split())[:120]
        raise UserError(
            f"{path}: not a readable label shard ({reason}); delete it and re-run the same `datadistill label` "
            "to label its images again"
        ) from exc


def _optional_position(table: pa.Table, name: str) -> int:
    """Where ``name`` sits in :func:`shard_schema` (after ``agreement``), for an older shard read whole."""
    names = table.schema.names
    anchor = "agreement" if name == "score_spread" else "score_spread"
    return names.index(anchor) + 1 if anchor in names else len(names)


def object_values(table: pa.Table, column: str) -> np.ndarray:
    """A per-object list column flattened to ``[N]`` float64 (N: the objects of every row, as ``scores``
    lists them), NaN for the objects of a row whose list is null (not measured, or an older shard)."""
    lengths = np.asarray(pa.compute.list_value_length(table["scores"]).to_numpy(zero_copy_only=False), np.int64)
    values = table[column]
    have = np.asarray(values.is_valid().to_numpy(zero_copy_only=False), bool)
    out = np.full(int(lengths.sum()), np.nan)
    flat = np.asarray(pa.compute.list_flatten(values).to_numpy(zero_copy_only=False), np.float64)
    mask = np.repeat(have, lengths)
    if int(mask.sum()) != len(flat):
        raise UserError(f"column {column!r} does not list one value per object (a damaged shard?)")
    out[mask] = flat
    return out


def summarize_shards(out: Path) -> dict[str, Any]:
    """Counts and skipped files, read from the shards' small columns only."""
    images = objects = 0
    skipped: list[dict[str, str]] = []
    for part in sorted((out / "shards").glob("part-*.parquet")):
        table = read_shard(part, columns=["file_name", "scores", "error"])
        images += table.num_rows
        objects += int(pa.compute.list_value_length(table["scores"]).to_numpy(zero_copy_only=False).sum())
        errors = table["error"].to_pylist()
        names = table["file_name"].to_pylist()
        skipped += [{"file_name": n, "reason": e} for n, e in zip(names, errors, strict=True) if e is not None]
    return {"images": images, "skipped": len(skipped), "objects": objects, "skipped_files": skipped}


def read_shards(out: str | os.PathLike[str], columns: list[str] | None = None) -> pa.Table:
    """All shards of a labeling folder as one arrow table (only ``columns`` when given)."""
    out = Path(out)
    parts = sorted((out / "shards").glob("part-*.parquet"))
    if not parts:
        raise UserError(f"{out}: no label shards found (run `datadistill label` first)")
    return pa.concat_tables(read_shard(p, columns=columns) for p in parts)


def shard_detections(row: dict[str, Any], num_keypoints: int) -> Detections:
    """One parquet row back as :class:`Detections`."""
    n = len(row["scores"])
    kps = None
    if num_keypoints and row.get("keypoints") is not None:
        kps = torch.tensor(np.asarray(row["keypoints"], np.float32).reshape(n, num_keypoints, 3))
    return Detections(
        boxes=torch.tensor(np.asarray(row["boxes"], np.float32).reshape(n, 4)),
        scores=torch.tensor(np.asarray(row["scores"], np.float32)),
        labels=torch.tensor(np.asarray(row["labels"], np.int64)),
        keypoints=kps,
        agreement=torch.tensor(np.asarray(row["agreement"], np.int64)),
        score_spread=_optional_tensor(row.get("score_spread")),
        box_spread=_optional_tensor(row.get("box_spread")),
    )


def _optional_tensor(values: list[float] | None) -> torch.Tensor | None:
    return None if values is None else torch.tensor(np.asarray(values, np.float32))


@dataclass
class ShardWriter:
    """Collects the rows of shards as they come (in any order) and writes each shard, atomically, once it
    holds every one of its ``expected[k]`` rows; a shard is never written in part."""

    out: Path
    expected: dict[int, int]
    num_keypoints: int
    pending: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)

    def add(self, shard: int, position: int, row: dict[str, Any]) -> None:
        """Row ``position`` (0-based, in the shard's file order) of shard ``shard``."""
        rows = self.pending.setdefault(shard, {})
        rows[position] = row
        if len(rows) == self.expected[shard]:
            rows_in_order = [rows[i] for i in range(self.expected[shard])]
            write_shard(shard_path(self.out, shard), rows_in_order, shard_schema(self.num_keypoints))
            del self.pending[shard]

    def close(self) -> None:
        """Raise if a shard is still incomplete (an engine lost rows: a bug, never a partial shard)."""
        if self.pending:
            raise RuntimeError(f"internal error: shards {sorted(self.pending)} incomplete after labeling finished")
