"""The labeling folder: what ``datadistill label`` writes and every later stage reads. Its one owner.

A labeling folder holds ``manifest.json`` (how it was made: :data:`MANIFEST_FORMAT`, the signature under
``config``, the classes, the shard count, the status, the counts) and ``shards/part-NNNNN.parquet``.
Each parquet row is one image: ``file_name`` (relative to the manifest's ``config.image_root``),
``width``, ``height``, and flat lists ``boxes`` (4N, xyxy px), ``scores`` (N), ``labels`` (N class indices),
``agreement`` (N, how many views saw the object), ``score_spread`` and ``box_spread`` (N, how much the
object's score and box vary across the views: :mod:`datadistill.core.uncertainty`; a null list where the
labeling did not measure them), ``keypoints`` (N*K*3, x, y, score; keypoint models only), and ``error``
(why an image was skipped, else null). Shards written before ``score_spread``/``box_spread`` existed are
read with those columns null (:func:`read_shard`), and their objects' spreads are NaN
(:func:`object_values`). :class:`ShardWriter` (rows as dicts: the local engine) and
:class:`TableShardWriter` (rows as arrow tables: the Ray engine) write a shard atomically once all its rows
are in, the one rule that makes a killed run resume without losing or repeating work, and both write the
same bytes for the same rows (:func:`write_shard_table`).

Readers never hold the whole folder: :func:`iter_shards` gives one shard at a time with only the columns a
stage needs, and :func:`open_label_folder` checks the manifest once (one validator for ``select``,
``review``, ``report`` and ``run``). :func:`read_shards` concatenates every shard, for small folders and
tests only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from datadistill.core.types import Detections
from datadistill.data.coco import control_characters, read_json
from datadistill.errors import UserError
from datadistill.runtime.io import write_atomic

MANIFEST_FORMAT = "datadistill-labels"


def shard_path(out: Path, index: int) -> Path:
    return out / "shards" / f"part-{index:05d}.parquet"


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
    write_shard_table(path, pa.Table.from_pydict(columns, schema=schema))


def write_shard_table(path: Path, table: pa.Table) -> None:
    """Write one shard's whole table (:func:`shard_schema`, rows in file order) atomically: the same bytes
    for the same values, whether the table was built from rows or gathered from arrow batches. No
    dictionary encoding: a detector's floats and unique file names rarely repeat, and trying the dictionary
    made writing 1.7-3x slower and the files larger (``bench/ray_writer.py``)."""
    write_atomic(path, lambda f: pq.write_table(table, f, compression="zstd", use_dictionary=False))


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


def read_shard(path: Path, columns: list[str] | None = None, *, num_classes: int | None = None) -> pa.Table:
    """One shard's table, checked (:func:`check_shard`: with ``num_classes``, its labels too); a file that is
    not a readable shard (copied in part, damaged on disk, written by something else) is a one-line UserError
    that names it and says how to redo it. An :data:`OPTIONAL_COLUMNS` column the shard lacks (an older
    shard) comes back as nulls, in schema order."""
    try:
        schema = pq.read_schema(path)
        present = set(schema.names)
        missing = [c for c in (columns if columns is not None else list(OPTIONAL_COLUMNS)) if c not in present]
        wanted = None if columns is None else [c for c in columns if c not in missing]
        table = pq.read_table(path, columns=wanted)
        _check_types(table, path)
        for name in (c for c in missing if c in OPTIONAL_COLUMNS):
            nulls = pa.nulls(table.num_rows, OPTIONAL_COLUMNS[name])
            where = columns.index(name) if columns is not None else _optional_position(table, name)
            table = table.add_column(where, pa.field(name, OPTIONAL_COLUMNS[name]), nulls)
        num_keypoints = int((schema.metadata or {}).get(b"num_keypoints", b"0") or 0)
    except (OSError, pa.ArrowException, ValueError) as exc:
        reason = " ".join(str(exc).replace(str(path), "").split())[:120]
        raise UserError(
            f"{path}: not a readable label shard ({reason}); delete it and re-run the same `datadistill label` "
            "to label its images again"
        ) from exc
    check_shard(table, path, num_keypoints=num_keypoints, num_classes=num_classes)
    return table


def _check_types(table: pa.Table, path: Path) -> None:
    """A one-line UserError when a column is not of :func:`shard_schema`'s type (written by something else)."""
    expected = shard_schema(1)
    for column in table.schema:
        want = expected.field(column.name).type if column.name in expected.names else None
        if want is not None and not _same_type(column.type, want):
            raise UserError(
                f"{path}: column {column.name!r} is {column.type}, not {want} (not a label "
                "shard of this datadistill); delete it and re-run the same `datadistill label`"
            )


def _same_type(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Equal types, a list's item field of any name (parquet readers call it ``item`` or ``element``)."""
    if pa.types.is_list(expected):
        return pa.types.is_list(actual) and actual.value_type.equals(expected.value_type)
    return actual.equals(expected)


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


@dataclass
class TableShardWriter:
    """:class:`ShardWriter` for rows that come as arrow tables (the Ray engine's actors send them so): each
    shard written, atomically, once it holds every one of its ``expected[k]`` rows, in the bytes that
    :class:`ShardWriter` writes for the same rows. No Python object is made per row or value: the rows of a
    shard are kept as slices of the tables they came in, and put in order with one ``take`` when complete.
    A row that comes twice (a retried task) is kept once."""

    out: Path
    expected: dict[int, int]
    num_keypoints: int
    pieces: dict[int, list[tuple[np.ndarray, pa.Table]]] = field(default_factory=dict)
    seen: dict[int, np.ndarray] = field(default_factory=dict)
    written: set[int] = field(default_factory=set)

    def add(self, table: pa.Table) -> list[int]:
        """Rows of any shards, in any order: ``table`` has int64 columns ``shard`` and ``position`` (0-based,
        in the shard's file order) besides the :func:`shard_schema` columns (others are ignored). Returns
        the shards that it completed, which are written."""
        shards = np.asarray(table["shard"].to_numpy(), np.int64)
        positions = np.asarray(table["position"].to_numpy(), np.int64)
        done = []
        for k in np.unique(shards).tolist():
            if k not in self.expected:
                raise RuntimeError(f"internal error: a row of shard {k}, which is not being labeled")
            if k in self.written:
                continue  # a row that came twice
            where = np.flatnonzero(shards == k)
            seen = self.seen.setdefault(k, np.zeros(self.expected[k], bool))
            if positions[where].min() < 0 or positions[where].max() >= len(seen):
                raise RuntimeError(f"internal error: a row of shard {k} past its {len(seen)} images")
            _, first = np.unique(positions[where], return_index=True)
            where = where[np.sort(first)]  # one row per position
            where = where[~seen[positions[where]]]  # and none already held
            if not len(where):
                continue
            seen[positions[where]] = True
            contiguous = int(where[-1] - where[0]) == len(where) - 1
            piece = table.slice(int(where[0]), len(where)) if contiguous else table.take(pa.array(where))
            self.pieces.setdefault(k, []).append((positions[where], piece))
            if seen.all():
                self._write(k)
                done.append(k)
        return done

    def _write(self, k: int) -> None:
        schema = shard_schema(self.num_keypoints)
        pieces = sorted(self.pieces.pop(k), key=lambda piece: int(piece[0][0]))  # most are runs: often in order
        del self.seen[k]
        rows = pa.concat_tables([t.select(schema.names) for _, t in pieces])
        positions = np.concatenate([p for p, _ in pieces])
        if not np.array_equal(positions, np.arange(len(positions))):
            rows = rows.take(pa.array(np.argsort(positions, kind="stable")))
        write_shard_table(shard_path(self.out, k), rows.combine_chunks().cast(schema))
        self.written.add(k)

    def close(self) -> None:
        """Raise if a shard is not written (an engine lost rows: a bug, never a partial shard)."""
        missing = sorted(set(self.expected) - self.written)
        if missing:
            raise RuntimeError(f"internal error: shards {missing} incomplete after labeling finished")


# ----------------------------------------------------------------------------------------------------
# the manifest


@dataclass(frozen=True)
class LabelFolder:
    """A complete labeling folder, its manifest checked: ``class_names`` (None when the manifest names
    none), ``views`` (the view names, None when unknown), ``image_root`` (what ``file_name`` is relative
    to, None when unknown), ``num_shards`` and the raw ``manifest``."""

    path: Path
    manifest: dict[str, Any]
    class_names: tuple[str, ...] | None
    views: tuple[str, ...] | None
    image_root: str | None
    num_shards: int

    def shard_files(self) -> list[Path]:
        """The shard files, in shard order; a UserError when there are none."""
        parts = sorted((self.path / "shards").glob("part-*.parquet"))
        if not parts:
            raise UserError(f"{self.path}: no label shards found (run `datadistill label` first)")
        if self.num_shards:  # a shard deleted (or never written): its images would be left out unseen
            missing = [k for k in range(self.num_shards) if shard_path(self.path, k) not in set(parts)]
            if missing or len(parts) != self.num_shards:
                what = shard_path(self.path, missing[0]).name if missing else f"{len(parts)} shard files"
                raise UserError(
                    f"{self.path}: the manifest lists {self.num_shards} shards but {what} is missing or extra; "
                    "re-run the same `datadistill label` to label its images again"
                )
        return parts

    def num_views(self, max_agreement: int) -> int:
        """The number of views: the manifest's, else the largest agreement seen (at least 1)."""
        return len(self.views) if self.views else max(int(max_agreement), 1)


def open_label_folder(path: str | os.PathLike[str], *, complete: bool = True) -> LabelFolder:
    """The labeling folder at ``path`` with its manifest checked: a one-line UserError naming the file and the
    field when it is missing, not a labeling manifest, of the wrong type in a field the stages read, or (with
    ``complete``) not finished."""
    folder = Path(path)
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise UserError(f"{folder}: no manifest.json (run `datadistill label` first)")
    manifest = read_json(manifest_path, hint="re-run `datadistill label` into another --out")
    if not isinstance(manifest, dict):
        raise UserError(f"{manifest_path}: not a labeling manifest; re-run `datadistill label` into another --out")
    if complete and manifest.get("status") != "complete":
        raise UserError(f"{folder}: labeling is not complete (re-run the same `datadistill label` to finish)")
    classes = _field(manifest, "classes", dict, manifest_path, default={})
    config = _field(manifest, "config", dict, manifest_path, default={})
    names = _field(classes, "names", list, manifest_path, default=None, where="classes.names")
    if names is not None and not all(isinstance(n, str) for n in names):
        raise UserError(f"{manifest_path}: 'classes.names' must be a list of class names")
    bad = next((i for i, n in enumerate(names or ()) if control_characters(n)), None)
    if bad is not None:
        raise UserError(
            f"{manifest_path}: 'classes.names' entry {bad} holds control characters "
            f"{control_characters(names[bad])}; re-run `datadistill label` with a model whose class names are plain "
            "text"
        )
    views = _field(config, "views", list, manifest_path, default=None, where="config.views")
    if views is not None and (not views or not all(isinstance(v, str) for v in views)):
        raise UserError(f"{manifest_path}: 'config.views' must be a non-empty list of view names")
    root = _field(config, "image_root", str, manifest_path, default=None, where="config.image_root")
    num_shards = manifest.get("num_shards", 0)
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 0:
        raise UserError(f"{manifest_path}: 'num_shards' must be a non-negative integer, got {num_shards!r:.40}")
    return LabelFolder(
        path=folder, manifest=manifest, class_names=None if names is None else tuple(names),
        views=None if views is None else tuple(views), image_root=root, num_shards=num_shards,
    )  # fmt: skip


def _field(raw: dict[str, Any], key: str, kind: type, path: Path, *, default: Any, where: str | None = None) -> Any:
    value = raw.get(key, default)
    if value is not default and not isinstance(value, kind):
        raise UserError(
            f"{path}: '{where or key}' must be a {kind.__name__}, got {type(value).__name__}; "
            "re-run `datadistill label` into another --out"
        )
    return value


def iter_shards(folder: LabelFolder, columns: list[str]) -> Iterator[tuple[Path, pa.Table]]:
    """Each shard's ``columns`` (:func:`read_shard`, labels checked against the manifest's classes), one shard
    at a time, in shard order."""
    num_classes = None if folder.class_names is None else len(folder.class_names)
    for part in folder.shard_files():
        yield part, read_shard(part, columns=columns, num_classes=num_classes)


def list_lengths(table: pa.Table, column: str = "scores") -> np.ndarray:
    """``[R]`` int64: the length of each row's list in ``column`` (0 for a null list)."""
    return np.asarray(pc.list_value_length(table[column]).fill_null(0).to_numpy(zero_copy_only=False), np.int64)


def flat_values(table: pa.Table, column: str, dtype: Any) -> np.ndarray:
    """A list column's values, flat over the rows, as a numpy array of ``dtype``."""
    return np.asarray(pc.list_flatten(table[column]).to_numpy(zero_copy_only=False), dtype=dtype)


def check_lengths(table: pa.Table, part: Path, columns: dict[str, int]) -> np.ndarray:
    """``[R]`` the objects of each row (the ``scores`` lists' lengths), after checking that every list column
    of ``columns`` (name -> values per object) holds that many values per object in every row: a one-line
    UserError naming the shard and the column otherwise (a damaged or foreign shard)."""
    lengths = list_lengths(table)
    for name, per_object in columns.items():
        if name not in table.column_names:
            continue
        if name in OPTIONAL_COLUMNS:  # a null list: not measured; compare the others only
            valid = np.asarray(table[name].is_valid().to_numpy(zero_copy_only=False), bool)
        else:  # a null list is no list: its row must hold no object
            valid = np.ones(table.num_rows, bool)
        theirs = list_lengths(table, name)
        if not np.array_equal(theirs[valid], lengths[valid] * per_object):
            row = int(np.flatnonzero(valid & (theirs != lengths * per_object))[0])
            raise UserError(
                f"{part}: row {row}: column {name!r} holds {int(theirs[row])} values for "
                f"{int(lengths[row])} objects (a damaged shard); delete it and re-run the same `datadistill label`"
            )
    return lengths


def finite_or_raise(values: np.ndarray, part: Path, column: str, *, lengths: np.ndarray | None = None) -> None:
    """A one-line UserError naming the shard, the column, the value and (given ``lengths`` ``[R]``, the values
    of each row in ``column``) the row when ``values`` hold NaN or infinity."""
    if values.size and not np.isfinite(values).all():
        i = int(np.flatnonzero(~np.isfinite(values))[0])
        where = "" if lengths is None else f"row {_row_of(i, lengths)}: "
        raise UserError(
            f"{part}: {where}column {column!r} holds {float(values[i])!r} (a damaged shard); delete it and re-run "
            "the same `datadistill label`"
        )


def _row_of(value: int, lengths: np.ndarray) -> int:
    """The row that flat value ``value`` of a list column belongs to, its rows holding ``lengths`` values."""
    return int(np.searchsorted(np.cumsum(lengths), value, side="right"))


# values per object of the list columns besides ``scores`` (keypoints: per keypoint)
PER_OBJECT = {"labels": 1, "agreement": 1, "boxes": 4, "score_spread": 1, "box_spread": 1, "keypoints": 3}


def check_shard(table: pa.Table, part: Path, *, num_keypoints: int, num_classes: int | None = None) -> None:
    """Check what the stages rely on in each column of ``table`` that is present (a one-line UserError naming
    the shard, the row and the column; a damaged or foreign shard): a list of one value per object in every
    list column (:func:`check_lengths`, ``3 * num_keypoints`` keypoint values), a ``file_name`` in every row,
    a positive ``width`` and ``height`` in every row labeled without an ``error``, finite ``scores``,
    ``boxes`` and ``keypoints``, ``labels`` in ``[0, num_classes)`` (``[0, inf)`` without ``num_classes``)
    and an ``agreement`` of at least 1. Vectorised: arrow and numpy over each column's flat values."""
    names = set(table.column_names)
    if "scores" in names:
        per_object = {n: k * (num_keypoints if n == "keypoints" else 1) for n, k in PER_OBJECT.items()}
        check_lengths(table, part, per_object)
    if "file_name" in names and table["file_name"].null_count:
        row = int(np.flatnonzero(table["file_name"].is_null().to_numpy(zero_copy_only=False))[0])
        _damaged(part, row, "file_name", "null", "a file name")
    labeled = np.asarray(table["error"].is_null().to_numpy(zero_copy_only=False), bool) if "error" in names else None
    for side in ("width", "height"):
        if side in names:
            size = np.asarray(table[side].fill_null(0).to_numpy(zero_copy_only=False), np.int64)
            bad = size <= 0 if labeled is None else labeled & (size <= 0)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                _damaged(part, row, side, int(size[row]), "an image size of at least 1 px")
    for name in ("scores", "boxes", "keypoints"):
        if name in names:
            finite_or_raise(flat_values(table, name, np.float64), part, name, lengths=list_lengths(table, name))
    for name, low, high in (("labels", 0, num_classes), ("agreement", 1, None)):
        if name not in names:
            continue
        values = flat_values(table, name, np.int64)
        bad = (values < low) | (values >= high if high is not None else False)
        if values.size and bad.any():
            i = int(np.flatnonzero(bad)[0])
            want = f"a class index in [0, {high})" if name == "labels" and high else f"at least {low}"
            _damaged(part, _row_of(i, list_lengths(table, name)), name, int(values[i]), want)


def _damaged(part: Path, row: int, column: str, value: Any, want: str) -> NoReturn:
    raise UserError(
        f"{part}: row {row}: column {column!r} holds {value}, expected {want} (a damaged shard); delete it and "
        "re-run the same `datadistill label`"
    )
