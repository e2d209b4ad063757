"""Pseudo-labels at scale: the label table (``pseudo.parquet``) and the flat form a student trains on.

**The label table** is a parquet file, one row per image in image-id order (ids ``1..N``), written by
``select`` beside ``pseudo.json``:

==============  ===============  ====================================================================
column          type             content
==============  ===============  ====================================================================
``file_name``   string           the image, relative to the image root
``width``       int32            px
``height``      int32            px
``boxes``       list<float64>    ``4 * n`` values: the n objects' xyxy boxes, absolute px, original frame
``labels``      list<int32>      ``n`` class indices into the categories' order
``iscrowd``     list<bool>       ``n``: ignore regions (neither object nor background in training)
``scores``      list<float64>    ``n`` fused scores
``agreement``   list<int32>      ``n`` numbers of views that agreed
``keypoints``   list<float64>    keypoint tasks only: ``n * K * 3`` values (x, y, v; v 2 visible, 0 not)
==============  ===============  ====================================================================

The schema's metadata key ``datadistill`` holds json: ``{"format": "datadistill-labels", "version": 1,
"categories": [COCO categories as pseudo.json writes them], "num_keypoints": K, "info": {...}}``.
:class:`LabelTableWriter` writes it shard by shard and renames it into place when closed;
:func:`open_label_table` checks a file's schema and metadata, and every row as it is read, each problem a
one-line DataError naming the file, the image and the column.

**The flat form** (:class:`FlatLabels`) holds N images and their M objects as a few arrays: per image the
id, width, height, file name (offsets into one utf-8 byte array) and ``offsets [N + 1]`` into the object
arrays ``boxes [M, 4]``, ``labels [M]``, ``iscrowd [M]`` (and ``keypoints [M, K, 3]``): no Python object
per image, so DataLoader workers share it without copies (a per-image object is copied into each worker
that touches it, as its reference count changes). It is built from a COCO json (:meth:`FlatLabels.from_coco`)
or from a label table, in memory (:func:`read_label_table`) or, for a large table, streamed into a folder of
raw arrays that every process of the machine opens (:func:`cache_label_table`; detectron2 serializes its
data set list into one buffer for the same reason): a student's start-up then holds one row group of the
table at a time, and each process reads a sample's rows from the page cache they share, whatever the number
of images (:meth:`FlatLabels.rows`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datadistill.data.coco import (
    BOX_TOLERANCE_PX,
    Category,
    CategorySchema,
    CocoDataset,
    ImageLabels,
    ImageRecord,
    category_to_coco,
    parse_categories,
    parse_coco,
)
from datadistill.errors import DataError, UserError
from datadistill.runtime.io import check_writable, file_sha256, write_json_atomic

log = logging.getLogger(__name__)

FORMAT = "datadistill-labels"
VERSION = 1
METADATA_KEY = b"datadistill"
TABLE_NAME = "pseudo.parquet"  # beside pseudo.json
CHUNK_IMAGES = 65_536  # images per row group written by save_label_table, and per batch read
FLAT_FORMAT = "datadistill-flat-labels"
FLAT_VERSION = 1

_COLUMNS: dict[str, pa.DataType] = {
    "file_name": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "boxes": pa.list_(pa.float64()),
    "labels": pa.list_(pa.int32()),
    "iscrowd": pa.list_(pa.bool_()),
    "scores": pa.list_(pa.float64()),
    "agreement": pa.list_(pa.int32()),
}
_KEYPOINTS_TYPE = pa.list_(pa.float64())
# values per object of each list column (keypoints: 3 K)
_PER_OBJECT = {"boxes": 4, "labels": 1, "iscrowd": 1, "scores": 1, "agreement": 1}


def label_table_schema(
    categories: Sequence[Category], *, num_keypoints: int, info: Mapping[str, Any] | None = None
) -> pa.Schema:
    """The schema of a label table with ``categories`` (keypoint tasks: ``num_keypoints`` > 0)."""
    schema_k = len(next((c.keypoints for c in categories if c.keypoints), ()))
    if num_keypoints != schema_k:
        raise ValueError(f"num_keypoints is {num_keypoints} but the categories define {schema_k} keypoints")
    fields = [pa.field(name, kind, nullable=False) for name, kind in _COLUMNS.items()]
    if num_keypoints:
        fields.append(pa.field("keypoints", _KEYPOINTS_TYPE, nullable=False))
    meta = {"format": FORMAT, "version": VERSION, "categories": [category_to_coco(c) for c in categories],
            "num_keypoints": num_keypoints, "info": dict(info or {})}  # fmt: skip
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta, allow_nan=False).encode("utf-8")})


# ----------------------------------------------------------------------------------------------------
# writing


class LabelTableWriter:
    """Write a label table shard by shard: each :meth:`write` appends images (a row group), :meth:`close`
    renames the finished file into place (until then ``path`` keeps its former content, or is absent).

    Use it as a context manager: an exception inside the block removes the temporary file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        categories: Sequence[Category],
        num_keypoints: int,
        info: Mapping[str, Any] | None = None,
        compression: str = "zstd",
    ) -> None:
        self.path = Path(path)
        self.schema = label_table_schema(categories, num_keypoints=num_keypoints, info=info)
        self.num_keypoints = num_keypoints
        self.num_classes = len(categories)
        self.num_images = 0
        check_writable(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            os.close(fd)
            self._tmp = Path(tmp)
            self._writer: pq.ParquetWriter | None = pq.ParquetWriter(tmp, self.schema, compression=compression)
        except OSError as exc:
            raise UserError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

    def __enter__(self) -> LabelTableWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def write(
        self,
        file_names: Sequence[str],
        widths: np.ndarray,
        heights: np.ndarray,
        counts: np.ndarray,
        boxes: np.ndarray,
        labels: np.ndarray,
        iscrowd: np.ndarray,
        scores: np.ndarray,
        agreement: np.ndarray,
        keypoints: np.ndarray | None = None,
    ) -> None:
        """Append n images: ``file_names``, ``widths``, ``heights`` and ``counts`` (objects per image) ``[n]``;
        the M = ``sum(counts)`` objects in image order: ``boxes [M, 4]`` float64 xyxy px, ``labels [M]``
        class indices, ``iscrowd [M]`` bool, ``scores [M]`` float64, ``agreement [M]`` int, and in keypoint
        tasks ``keypoints [M, K, 3]`` float64. A ValueError names an array whose shape does not fit."""
        if self._writer is None:
            raise ValueError(f"{self.path}: the writer is closed")
        objects = {"boxes": boxes, "labels": labels, "iscrowd": iscrowd, "scores": scores, "agreement": agreement}
        batch = _record_batch(self.schema, file_names, widths, heights, counts, objects, keypoints=keypoints,
                              num_keypoints=self.num_keypoints)  # fmt: skip
        if batch.num_rows == 0:
            return
        try:
            self._writer.write_batch(batch, row_group_size=batch.num_rows)
        except OSError as exc:
            self.abort()
            raise UserError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        self.num_images += batch.num_rows

    def close(self) -> Path:
        """Finish the file and rename it into place; returns its path."""
        if self._writer is None:
            return self.path
        writer, self._writer = self._writer, None
        try:
            writer.close()
            with open(self._tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(self._tmp, 0o666 & ~_umask())
            os.replace(self._tmp, self.path)
        except OSError as exc:
            self._tmp.unlink(missing_ok=True)
            raise UserError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        return self.path

    def abort(self) -> None:
        """Drop what was written (``path`` is left as it was)."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except OSError:
                pass
        self._tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _record_batch(
    schema: pa.Schema,
    file_names: Sequence[str],
    widths: np.ndarray,
    heights: np.ndarray,
    counts: np.ndarray,
    objects: dict[str, np.ndarray],
    *,
    keypoints: np.ndarray | None,
    num_keypoints: int,
) -> pa.RecordBatch:
    """One shard's rows (:meth:`LabelTableWriter.write`; ``objects``: its per-object arrays by column name),
    every shape checked (ValueError naming the array)."""
    counts = np.asarray(counts, np.int64)
    n = len(file_names)
    for name, arr in (("widths", widths), ("heights", heights), ("counts", counts)):
        if np.shape(arr) != (n,):
            raise ValueError(f"{name} must have shape ({n},) (one per file name), got {np.shape(arr)}")
    if (counts < 0).any():
        raise ValueError("counts must be non-negative")
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    m = int(offsets[-1])
    shapes = {"boxes": (m, 4), "labels": (m,), "iscrowd": (m,), "scores": (m,), "agreement": (m,)}
    arrays = dict(objects)
    if num_keypoints:
        if keypoints is None:
            raise ValueError(f"keypoints [M, {num_keypoints}, 3] are required: the categories define keypoints")
        shapes["keypoints"], arrays["keypoints"] = (m, num_keypoints, 3), keypoints
    elif keypoints is not None:
        raise ValueError("keypoints given, but the categories define none")
    for name, shape in shapes.items():
        if np.shape(arrays[name]) != shape:
            raise ValueError(
                f"{name} must have shape {shape} (counts sum to {m} objects), got {np.shape(arrays[name])}"
            )
    if m * 3 * max(num_keypoints, 2) >= 2**31:
        raise ValueError(f"{m} objects are too many for one write: write fewer images at a time")
    dtypes = {"boxes": np.float64, "labels": np.int32, "iscrowd": np.bool_, "scores": np.float64,
              "agreement": np.int32, "keypoints": np.float64}  # fmt: skip
    columns = {
        "file_name": pa.array(list(file_names), pa.string()),
        "width": pa.array(np.asarray(widths, np.int32)),
        "height": pa.array(np.asarray(heights, np.int32)),
    }
    for name, arr in arrays.items():
        per = _PER_OBJECT.get(name, 3 * num_keypoints)
        values = pa.array(np.ascontiguousarray(arr, dtypes[name]).reshape(-1))
        columns[name] = pa.ListArray.from_arrays(pa.array((offsets * per).astype(np.int32)), values)
    return pa.RecordBatch.from_arrays([columns[f.name] for f in schema], schema=schema)


def save_label_table(dataset: CocoDataset, path: str | os.PathLike[str], *, chunk_images: int = CHUNK_IMAGES) -> Path:
    """``dataset`` (a pseudo-label COCO json as read) as a label table; images in ``dataset.images`` order,
    so image ``i`` of the table is its ``i``-th image. A missing score reads 1.0, a missing agreement 0."""
    k = dataset.num_keypoints
    with LabelTableWriter(path, categories=dataset.categories, num_keypoints=k, info=dataset.info) as writer:
        for lo in range(0, len(dataset.images), chunk_images):
            images = dataset.images[lo : lo + chunk_images]
            labs = [dataset.labels.get(im.id) or ImageLabels.empty(k) for im in images]
            writer.write(
                [im.file_name for im in images],
                np.array([im.width for im in images]),
                np.array([im.height for im in images]),
                np.array([len(lab) for lab in labs]),
                _concat(labs, "boxes", (4,), np.float64),
                _concat(labs, "labels", (), np.int64),
                _concat(labs, "iscrowd", (), np.bool_),
                _concat(labs, "scores", (), np.float64, fill=1.0),
                _concat(labs, "agreement", (), np.int64),
                _concat(labs, "keypoints", (k, 3), np.float64) if k else None,
            )
    return Path(path)


def _concat(labs: list[ImageLabels], name: str, shape: tuple[int, ...], dtype: Any, fill: float = 0) -> np.ndarray:
    """Attribute ``name`` of every image's labels, concatenated ``[M, *shape]``; ``fill`` where it is None."""
    parts = [
        np.full((len(lab), *shape), fill, dtype) if getattr(lab, name) is None
        else np.asarray(getattr(lab, name), dtype).reshape(-1, *shape)
        for lab in labs
    ]  # fmt: skip
    return np.concatenate(parts) if parts else np.zeros((0, *shape), dtype)


# ----------------------------------------------------------------------------------------------------
# reading: the header, then validated chunks


@dataclass(frozen=True)
class LabelTable(CategorySchema):
    """A label table whose schema and metadata were checked (:func:`open_label_table`); rows not read yet."""

    path: Path
    num_images: int
    categories: tuple[Category, ...]
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.num_images

    def file_names(self, rows: np.ndarray) -> list[str]:
        """The file names of ``rows`` (sorted row numbers), reading only that column."""
        wanted = np.asarray(rows, np.int64)
        names: list[str] = []
        start = 0
        for batch in _batches(self, ["file_name"], batch_images=CHUNK_IMAGES):
            stop = start + batch.num_rows
            lo, hi = np.searchsorted(wanted, [start, stop])
            if hi > lo:
                column = batch.column(0)
                names += [column[int(r - start)].as_py() for r in wanted[lo:hi]]
            start = stop
        pa.default_memory_pool().release_unused()
        return names


def is_label_table(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a parquet file (by its first bytes; a missing file is not)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return False


def _damaged(path: Path, exc: BaseException) -> DataError:
    text = str(exc).strip().splitlines()
    return DataError(f"{path}: not a readable parquet file ({text[0] if text else type(exc).__name__})")


def open_label_table(path: str | os.PathLike[str]) -> LabelTable:
    """Check a label table's schema and metadata (a one-line DataError naming the file and the column or
    key otherwise: a damaged file, another file's schema, a column of another type)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        file = pq.ParquetFile(path)
        schema, num_rows = file.schema_arrow, file.metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise _damaged(path, exc) from exc
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise DataError(f"{path}: not a datadistill label table (no '{METADATA_KEY.decode()}' schema metadata)")
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: schema metadata '{METADATA_KEY.decode()}' is not json ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{path}: not a datadistill label table (format {got!r}, expected {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise DataError(f"{path}: label table version {meta.get('version')!r}; this datadistill reads {VERSION}")
    categories, problems = parse_categories(meta.get("categories"))
    if problems or not categories:
        raise DataError(f"{path}: metadata 'categories': {problems[0] if problems else 'none'}")
    k = len(next((c.keypoints for c in categories if c.keypoints), ()))
    if meta.get("num_keypoints") != k:
        raise DataError(f"{path}: metadata 'num_keypoints' is {meta.get('num_keypoints')!r}, the categories define {k}")
    expected = dict(_COLUMNS, **({"keypoints": _KEYPOINTS_TYPE} if k else {}))
    for name, kind in expected.items():
        if name not in schema.names:
            raise DataError(f"{path}: column '{name}' is missing")
        actual = schema.field(name).type
        if not _same_type(actual, kind):
            raise DataError(f"{path}: column '{name}' is {_type_name(actual)}, expected {_type_name(kind)}")
    if not k and "keypoints" in schema.names:
        raise DataError(f"{path}: column 'keypoints' is present but the categories define no keypoints")
    info = meta.get("info") if isinstance(meta.get("info"), dict) else {}
    return LabelTable(path=path, num_images=int(num_rows), categories=categories, info=info)


def _same_type(actual: pa.DataType, expected: pa.DataType) -> bool:
    """The contract's type; string and list may be their large forms, and a list's item field any name."""
    if pa.types.is_list(expected):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and actual.value_type == expected.value_type
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    return actual == expected


def _type_name(kind: pa.DataType) -> str:
    """``list<int32>``: a type without its list item's field name (``item``, ``element``)."""
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return f"{'large_' if pa.types.is_large_list(kind) else ''}list<{_type_name(kind.value_type)}>"
    return str(kind)


def _batches(table: LabelTable, columns: list[str], *, batch_images: int) -> Iterator[pa.RecordBatch]:
    """The table's rows, ``batch_images`` at a time; a damaged file is a DataError.

    One row group at a time, without pyarrow's read-ahead (``pre_buffer``, which buffers the whole file: a
    1M-image table's 180 MB)."""
    try:
        file = pq.ParquetFile(table.path, pre_buffer=False)
        for group in range(file.num_row_groups):
            yield from file.iter_batches(
                batch_size=batch_images, row_groups=[group], columns=columns, use_threads=False
            )
    except (pa.ArrowException, OSError) as exc:
        raise _damaged(table.path, exc) from exc


class _Chunk(NamedTuple):
    """Consecutive images of a table, checked: ``name_offsets [n + 1]`` into ``name_bytes``, ``widths``,
    ``heights`` ``[n]``, ``offsets [n + 1]`` into the objects ``boxes [m, 4]``, ``labels [m]``,
    ``iscrowd [m]``, ``keypoints [m, K, 3]`` (None without keypoints); offsets start at 0."""

    name_offsets: np.ndarray
    name_bytes: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray
    keypoints: np.ndarray | None


def _string_parts(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A string array as ``(offsets [n + 1] int64 from 0, utf-8 bytes)``, without a copy of the bytes."""
    width = np.int64 if pa.types.is_large_string(column.type) else np.int32
    buffers = column.buffers()
    offsets = np.frombuffer(buffers[1], width)[column.offset : column.offset + len(column) + 1].astype(np.int64)
    data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    return offsets - offsets[0], data[offsets[0] : offsets[-1]]


def _list_parts(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list array as ``(offsets [n + 1] int64 from 0, values)``."""
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    if values.null_count:
        raise ValueError("holds a null value")
    return offsets - offsets[0], values.to_numpy(zero_copy_only=False)


class _RowError(Exception):
    """A problem at one row of a chunk: ``(row, column, what)``."""


def _read_chunk(batch: pa.RecordBatch, *, num_classes: int, num_keypoints: int) -> _Chunk:
    """A batch's arrays, every value checked; :class:`_RowError` ``(row in batch, column, what)`` otherwise."""
    cols = {name: batch.column(name) for name in batch.schema.names}
    for name, col in cols.items():
        if col.null_count:
            raise _RowError(int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0]), name, "is null")
    name_offsets, name_bytes = _string_parts(cols["file_name"])
    widths, heights = (cols[c].to_numpy().astype(np.int32) for c in ("width", "height"))
    parts = {}
    for name in ("labels", "boxes", "iscrowd", *(("keypoints",) if num_keypoints else ())):
        try:
            parts[name] = _list_parts(cols[name])
        except ValueError as exc:
            raise _RowError(0, name, str(exc)) from exc
    offsets = parts["labels"][0]
    counts = np.diff(offsets)
    for name, (col_offsets, _) in parts.items():
        per = _PER_OBJECT.get(name, 3 * num_keypoints)
        got = np.diff(col_offsets)
        bad = np.flatnonzero(got != per * counts)
        if bad.size:
            r = int(bad[0])
            raise _RowError(
                r, name, f"holds {got[r]} values, expected {per * counts[r]} ({per} per object of 'labels')"
            )
    _check_values(name_offsets, widths, heights, offsets, parts, num_classes=num_classes)
    boxes = parts["boxes"][1].reshape(-1, 4)
    keypoints = parts["keypoints"][1].reshape(-1, num_keypoints, 3) if num_keypoints else None
    return _Chunk(name_offsets, name_bytes, widths, heights, offsets, boxes, parts["labels"][1].astype(np.int32),
                  parts["iscrowd"][1].astype(bool), keypoints)  # fmt: skip


def _check_values(
    name_offsets: np.ndarray,
    widths: np.ndarray,
    heights: np.ndarray,
    offsets: np.ndarray,
    parts: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    num_classes: int,
) -> None:
    """File names not empty, sizes positive, boxes finite with a positive size inside the image (up to
    :data:`BOX_TOLERANCE_PX`), class indices in range, keypoints finite."""
    empty = np.flatnonzero(np.diff(name_offsets) == 0)
    if empty.size:
        raise _RowError(int(empty[0]), "file_name", "is empty")
    for name, values in (("width", widths), ("height", heights)):
        bad = np.flatnonzero(values <= 0)
        if bad.size:
            raise _RowError(int(bad[0]), name, f"must be positive, got {values[bad[0]]}")
    counts = np.diff(offsets)
    boxes = parts["boxes"][1].reshape(-1, 4)
    w, h = np.repeat(widths, counts), np.repeat(heights, counts)
    tol = BOX_TOLERANCE_PX
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(boxes).all(axis=1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        inside = (boxes[:, :2] >= -tol).all(axis=1) & (boxes[:, 2] <= w + tol) & (boxes[:, 3] <= h + tol)
    for mask, what in ((ok, "is not a finite box with x2 > x1 and y2 > y1"), (inside, "lies outside the image")):
        bad = np.flatnonzero(~mask)
        if bad.size:
            j = int(bad[0])
            r = int(np.searchsorted(offsets, j, side="right") - 1)
            box = ", ".join(f"{v:g}" for v in boxes[j])
            raise _RowError(r, "boxes", f"object {j - offsets[r]}: [{box}] {what} ({widths[r]}x{heights[r]} px)")
    labels = parts["labels"][1]
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        j = int(bad[0])
        r = int(np.searchsorted(offsets, j, side="right") - 1)
        raise _RowError(r, "labels", f"class index {labels[j]} is not in [0, {num_classes})")
    if "keypoints" in parts:
        values = parts["keypoints"][1]
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            r = int(np.searchsorted(parts["keypoints"][0], int(bad[0]), side="right") - 1)
            raise _RowError(r, "keypoints", "holds a value that is not finite")


def _chunks(table: LabelTable, *, batch_images: int = CHUNK_IMAGES) -> Iterator[_Chunk]:
    """The table's rows as checked chunks, in order; the first problem is a DataError naming the image."""
    columns = ["file_name", "width", "height", "boxes", "labels", "iscrowd"]
    columns += ["keypoints"] if table.num_keypoints else []
    start = 0
    for batch in _batches(table, columns, batch_images=batch_images):
        try:
            chunk = _read_chunk(batch, num_classes=table.num_classes, num_keypoints=table.num_keypoints)
        except _RowError as exc:
            row, column, what = exc.args
            name = batch.column("file_name")[row].as_py()
            raise DataError(f"{table.path}: image {start + row + 1} ({name}): column '{column}' {what}") from None
        yield chunk
        start += batch.num_rows
    if start != table.num_images:
        raise DataError(f"{table.path}: {start} rows read, the file's metadata says {table.num_images}")
    pa.default_memory_pool().release_unused()  # pyarrow's allocator keeps what the row groups took otherwise


# ----------------------------------------------------------------------------------------------------
# the flat form


class ImageObjects(NamedTuple):
    """The objects of one image (views into the flat arrays): ``boxes [n, 4]`` float64 xyxy px, ``labels
    [n]`` class indices, ``iscrowd [n]`` bool, ``keypoints [n, K, 3]`` float64 or None."""

    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray
    keypoints: np.ndarray | None


_IMAGE_ARRAYS = ("image_ids", "widths", "heights", "name_offsets", "name_bytes")
_OBJECT_ARRAYS = ("offsets", "boxes", "labels", "iscrowd", "keypoints")
_DTYPES = {"image_ids": np.int64, "widths": np.int32, "heights": np.int32, "name_offsets": np.int64,
           "name_bytes": np.uint8, "offsets": np.int64, "boxes": np.float64, "labels": np.int32,
           "iscrowd": np.bool_, "keypoints": np.float64}  # fmt: skip


@dataclass(frozen=True, eq=False)
class FlatLabels(CategorySchema):
    """N images and their M objects as flat arrays (see the module docstring).

    ``image_ids [N]`` int64; ``widths``, ``heights`` ``[N]`` int32 px; file name ``i`` is
    ``name_bytes[name_offsets[i]:name_offsets[i + 1]]`` (utf-8); the objects of image ``i`` are rows
    ``offsets[i]:offsets[i + 1]`` of ``boxes [M, 4]`` float64 xyxy px, ``labels [M]`` int32 class indices,
    ``iscrowd [M]`` bool and ``keypoints [M, K, 3]`` float64 (None without keypoints). ``class_map``, when
    set, maps the stored class indices to ``categories``' (:meth:`with_categories`). ``folder``: the
    memory-mapped folder the arrays live in (None: in memory); ``path``: the file they were read from.
    """

    categories: tuple[Category, ...]
    image_ids: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    name_offsets: np.ndarray
    name_bytes: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray
    keypoints: np.ndarray | None = None
    class_map: np.ndarray | None = None
    path: Path | None = None
    folder: Path | None = None

    def __len__(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def num_objects(self) -> int:
        return int(self.boxes.shape[0])

    def rows(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` of array ``name`` (``"boxes"``, ``"offsets"``, ...).

        A memory-mapped set reads them with ``pread`` (from the page cache, shared by every process) rather
        than through its mapping: on kernels that map page-cache folios whole (Linux 6), a random touch of
        a mapping makes up to 400 KB resident, so a DataLoader worker's RSS would grow toward the size of
        the arrays; a read adds nothing to it. The result may be read-only."""
        array = getattr(self, name)
        if self.folder is None:
            return array[lo:hi]
        row_shape = array.shape[1:]
        row_bytes = array.dtype.itemsize * int(np.prod(row_shape))
        data = os.pread(self._file(name), (hi - lo) * row_bytes, lo * row_bytes)
        return np.frombuffer(data, array.dtype).reshape(hi - lo, *row_shape)

    def _file(self, name: str) -> int:
        """This process's descriptor of the folder's ``name.bin`` (opened on first use)."""
        files = self.__dict__.get("_files")
        if files is None or files[0] != os.getpid():  # a forked process opens its own
            files = (os.getpid(), {})
            object.__setattr__(self, "_files", files)
        if name not in files[1]:
            assert self.folder is not None
            files[1][name] = open(self.folder / f"{name}.bin", "rb", buffering=0)  # noqa: SIM115 (kept open)
        return files[1][name].fileno()

    def file_name(self, index: int) -> str:
        lo, hi = (int(x) for x in self.rows("name_offsets", index, index + 2))
        return bytes(self.rows("name_bytes", lo, hi)).decode("utf-8", "surrogatepass")

    def image_record(self, index: int) -> ImageRecord:
        """Image ``index`` (0-based position, not id) as a COCO image record."""
        return ImageRecord(id=int(self.rows("image_ids", index, index + 1)[0]), file_name=self.file_name(index),
                           width=int(self.rows("widths", index, index + 1)[0]),
                           height=int(self.rows("heights", index, index + 1)[0]))  # fmt: skip

    def objects(self, index: int) -> ImageObjects:
        """The objects of image ``index`` (0-based position), their labels in ``categories``' indices."""
        lo, hi = (int(x) for x in self.rows("offsets", index, index + 2))
        labels = self.rows("labels", lo, hi)
        if self.class_map is not None:
            labels = self.class_map[labels]
        kps = self.rows("keypoints", lo, hi) if self.keypoints is not None else None
        return ImageObjects(self.rows("boxes", lo, hi), labels, self.rows("iscrowd", lo, hi), kps)

    def with_categories(self, categories: tuple[Category, ...], class_map: np.ndarray) -> FlatLabels:
        """The same objects labeled with ``categories``: stored class ``c`` becomes ``class_map[c]`` (no copy)."""
        composed = np.asarray(class_map, np.int64)
        if self.class_map is not None:
            composed = composed[self.class_map]
        return dataclasses.replace(self, categories=tuple(categories), class_map=composed)

    @staticmethod
    def from_coco(dataset: CocoDataset) -> FlatLabels:
        """The images of ``dataset`` in its order, with their annotations (boxes bit for bit)."""
        k = dataset.num_keypoints
        labs = [dataset.labels.get(im.id) or ImageLabels.empty(k) for im in dataset.images]
        counts = np.array([len(lab) for lab in labs], np.int64)
        names = [im.file_name.encode("utf-8", "surrogatepass") for im in dataset.images]
        return FlatLabels(
            categories=dataset.categories,
            image_ids=np.array([im.id for im in dataset.images], np.int64),
            widths=np.array([im.width for im in dataset.images], np.int32),
            heights=np.array([im.height for im in dataset.images], np.int32),
            name_offsets=_offsets(np.array([len(b) for b in names], np.int64)),
            name_bytes=np.frombuffer(b"".join(names), np.uint8).copy(),
            offsets=_offsets(counts),
            boxes=_concat(labs, "boxes", (4,), np.float64),
            labels=_concat(labs, "labels", (), np.int32),
            iscrowd=_concat(labs, "iscrowd", (), np.bool_),
            keypoints=_concat(labs, "keypoints", (k, 3), np.float64) if k else None,
            path=dataset.path,
        )

    def to_coco(self) -> CocoDataset:
        """The COCO form (per-image objects; annotation ids count from 1, ``area`` is the box's), for the
        code that needs it whole (a YOLO folder for Ultralytics' trainer)."""
        images, labels = [], {}
        next_id = 1
        for i in range(len(self)):
            rec = self.image_record(i)
            obj = self.objects(i)
            n = len(obj.labels)
            boxes = np.array(obj.boxes, np.float64)
            labels[rec.id] = ImageLabels(
                ids=np.arange(next_id, next_id + n, dtype=np.int64), boxes=boxes,
                labels=np.array(obj.labels, np.int64), iscrowd=np.array(obj.iscrowd, bool),
                area=(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
                keypoints=None if obj.keypoints is None else np.array(obj.keypoints, np.float64),
            )  # fmt: skip
            images.append(rec)
            next_id += n
        return CocoDataset(images=tuple(images), labels=labels, categories=self.categories, path=self.path)

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Memory-mapped: pickled as its folder (a process that unpickles it maps the same files)."""
        if self.folder is None:
            return super().__reduce_ex__(protocol)
        return (_reopen, (self.folder, self.categories, self.class_map, self.path))


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _reopen(
    folder: Path, categories: tuple[Category, ...], class_map: np.ndarray | None, path: Path | None
) -> FlatLabels:
    flat = open_flat_labels(folder, path=path)
    return dataclasses.replace(flat, categories=categories, class_map=class_map)


class _Builder:
    """Appends checked chunks to the flat arrays: in memory (``folder`` None) or to raw files in ``folder``."""

    def __init__(self, folder: Path | None, num_keypoints: int) -> None:
        self.folder = folder
        self.num_keypoints = num_keypoints
        self.names = [*_IMAGE_ARRAYS, *_OBJECT_ARRAYS[: 4 + (num_keypoints > 0)]]
        self.parts: dict[str, list[np.ndarray]] = {name: [] for name in self.names}
        self.files = {name: open(folder / f"{name}.bin", "wb") for name in self.names} if folder else {}
        self.rows = dict.fromkeys(self.names, 0)
        self.num_images = self.num_objects = self.num_bytes = 0
        self._append(name_offsets=np.zeros(1, np.int64), offsets=np.zeros(1, np.int64))

    def _append(self, **arrays: np.ndarray) -> None:
        for name, arr in arrays.items():
            arr = np.ascontiguousarray(arr, _DTYPES[name])
            self.rows[name] += arr.shape[0]
            if self.folder is None:
                self.parts[name].append(arr)
            else:
                arr.tofile(self.files[name])

    def add(self, chunk: _Chunk) -> None:
        n = len(chunk.widths)
        self._append(
            image_ids=np.arange(self.num_images + 1, self.num_images + n + 1, dtype=np.int64),
            widths=chunk.widths, heights=chunk.heights, name_offsets=chunk.name_offsets[1:] + self.num_bytes,
            name_bytes=chunk.name_bytes, offsets=chunk.offsets[1:] + self.num_objects, boxes=chunk.boxes,
            labels=chunk.labels, iscrowd=chunk.iscrowd,
            **({"keypoints": chunk.keypoints} if chunk.keypoints is not None else {}),
        )  # fmt: skip
        self.num_images += n
        self.num_objects += int(chunk.offsets[-1])
        self.num_bytes += int(chunk.name_offsets[-1])

    def shapes(self) -> dict[str, list[int]]:
        trailing = {"boxes": [4], "keypoints": [self.num_keypoints, 3]}
        return {name: [self.rows[name], *trailing.get(name, [])] for name in self.names}

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def arrays(self) -> dict[str, np.ndarray]:
        """In memory: the concatenated arrays (empty ones for a table without rows)."""
        parts = {name: self.parts[name] or [np.zeros(0, _DTYPES[name])] for name in self.names}
        return {name: np.concatenate(parts[name]).reshape(shape) for name, shape in self.shapes().items()}


def read_label_table(path: str | os.PathLike[str] | LabelTable) -> FlatLabels:
    """A label table in memory, every row checked (a one-line DataError names the first problem)."""
    table = path if isinstance(path, LabelTable) else open_label_table(path)
    builder = _Builder(None, table.num_keypoints)
    for chunk in _chunks(table):
        builder.add(chunk)
    arrays = builder.arrays()
    arrays.setdefault("keypoints", None)  # type: ignore[arg-type]
    return FlatLabels(categories=table.categories, path=table.path, **arrays)


def cache_label_table(table: LabelTable, cache_root: str | os.PathLike[str]) -> FlatLabels:
    """``table`` as memory-mapped flat arrays in ``cache_root/<sha256 of the file>/`` (see
    :func:`open_flat_labels`): converted once, one row group at a time, then mapped by every process that
    asks (several processes may ask at once: each converts into its own temporary folder, the first
    rename wins and the others map its folder)."""
    root = Path(cache_root)
    folder = root / f"{file_sha256(table.path)[:24]}-v{FLAT_VERSION}"
    if (folder / "meta.json").is_file():
        try:
            return open_flat_labels(folder, path=table.path)
        except DataError:
            log.info("rebuilding the damaged flat labels in %s", folder)
            shutil.rmtree(folder, ignore_errors=True)
    tmp = root / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        builder = _Builder(tmp, table.num_keypoints)
        try:
            for chunk in _chunks(table):
                builder.add(chunk)
        finally:
            builder.close()
        meta = {"format": FLAT_FORMAT, "version": FLAT_VERSION, "source": str(table.path),
                "categories": [category_to_coco(c) for c in table.categories],
                "arrays": {name: {"dtype": np.dtype(_DTYPES[name]).str, "shape": shape}
                           for name, shape in builder.shapes().items()}}  # fmt: skip
        write_json_atomic(tmp / "meta.json", meta, indent=1)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: map its folder
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write {folder}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s: %d images as flat arrays in %s", table.path, table.num_images, folder)
    return open_flat_labels(folder, path=table.path)


def open_flat_labels(folder: str | os.PathLike[str], *, path: Path | None = None) -> FlatLabels:
    """Memory-map a folder written by :func:`cache_label_table` (``meta.json`` and one raw ``NAME.bin``
    per array): the arrays are read-only views of the files, shared by every process that maps them."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != FLAT_FORMAT or meta.get("version") != FLAT_VERSION:
            raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}")
        categories, problems = parse_categories(meta["categories"])
        if problems:
            raise ValueError(problems[0])
        arrays: dict[str, Any] = {}
        for name, spec in meta["arrays"].items():
            if name not in _DTYPES:
                raise ValueError(f"unknown array {name!r}")
            dtype, shape = np.dtype(spec["dtype"]), tuple(int(s) for s in spec["shape"])
            file = folder / f"{name}.bin"
            if file.stat().st_size != dtype.itemsize * int(np.prod(shape)):
                raise ValueError(f"{file.name} holds {file.stat().st_size} bytes, not {shape} x {dtype}")
            if 0 in shape:
                arrays[name] = np.zeros(shape, dtype)
            else:
                arrays[name] = np.memmap(file, dtype=dtype, mode="r", shape=shape)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{folder}: not a readable flat-labels folder ({exc})") from exc
    arrays.setdefault("keypoints", None)
    return FlatLabels(categories=categories, path=path, folder=folder, **arrays)


def first_images(path: str | os.PathLike[str], *, count: int) -> CocoDataset:
    """The first ``count`` images of a label table that hold an object, as a small :class:`CocoDataset` with
    their ``score`` and ``agreement`` (for a gallery: the table is read a row group at a time, not whole)."""
    table = open_label_table(path)
    columns = ["file_name", "width", "height", "boxes", "labels", "iscrowd", "scores", "agreement"]
    columns += ["keypoints"] if any(c.keypoints for c in table.categories) else []
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for batch in _batches(table, columns, batch_images=1024):
        for row in batch.to_pylist():
            if not row["labels"] or len(images) >= count:
                continue
            images.append({"id": len(images) + 1, "file_name": row["file_name"], "width": row["width"],
                           "height": row["height"]})  # fmt: skip
            k = len(row["keypoints"]) // len(row["labels"]) if "keypoints" in row else 0
            for j, label in enumerate(row["labels"]):
                x1, y1, x2, y2 = row["boxes"][4 * j : 4 * j + 4]
                ann = {"id": len(annotations) + 1, "image_id": len(images), "category_id": table.categories[label].id,
                       "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": int(row["iscrowd"][j]),
                       "score": row["scores"][j], "agreement": row["agreement"][j]}  # fmt: skip
                if k:
                    ann["keypoints"] = row["keypoints"][k * j : k * j + k]
                annotations.append(ann)
        if len(images) >= count:
            break
    raw = {"images": images, "annotations": annotations, "categories": [category_to_coco(c) for c in table.categories]}
    dataset, problems = parse_coco(raw, path=table.path)
    if problems:
        raise DataError(f"{table.path}: {problems[0]}")
    return dataset
