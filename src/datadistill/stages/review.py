"""The human in the loop: ``review`` sends the images the views disagree on to a person, ``merge`` takes the
corrections back as real labels.

``review`` reads a labeling folder (the shards and ``manifest.json``) and the threshold of a selection
(``selection.json``, or the count rule over every candidate, without ``select``'s cross-class filter), ranks
the unlabeled images from most to least doubtful and writes the top N as pre-annotations: Label Studio tasks
(``tasks.json`` and the project's ``label_config.xml``) and a COCO json (``coco.json``, which CVAT imports as
"COCO 1.0" and FiftyOne loads), beside ``ranking.csv`` (every image by doubt) and ``review.json`` (the top of
the ranking, the thresholds, the formula's inputs).

The doubt of each candidate and image is :mod:`datadistill.core.doubt`'s (the views' disagreement, the
score's closeness to the threshold, the views' score swing and box wander); shards without the spreads
rank by the first two terms, as before, and ``review.json`` says so (``spreads_measured``). An image skipped
by ``label`` (an error) is never sent.

The pre-annotations of an image are its kept objects (score >= ``t`` and agreement >= the selection's
``min_agreement``) and, below the threshold, its doubtful ones (closeness >= ``min_closeness``, 0.5 by
default), each with its ``score``; the COCO json also carries ``agreement``, ``doubt`` and ``kept``. In a
keypoint task (the reference's categories have keypoints) an object's keypoints go along: those whose score
reaches the selection's ``keypoint_threshold`` (or is above 0 without one), in the COCO json as COCO
keypoints (v 2; the others 0, 0, 0), in the Label Studio tasks as ``keypointlabels`` regions (x, y in
percent, the keypoint's name, a ``parentID`` naming its box's region) under a ``KeyPointLabels`` tag
``keypoint`` of the labeling config.

``merge`` reads a Label Studio JSON export or a COCO json (from CVAT) through
:mod:`datadistill.data.annotation_tools` and appends its images to the labeled COCO json with new image and
annotation ids. A Label Studio keypoint belongs to the box its ``parentID`` names, else to the one box that
contains it; it comes back as a COCO keypoint (x, y px, v 2), a keypoint not marked as 0, 0, 0. With
``--images`` each image's size is read from its file, and an export that claims another size (its
``original_width`` / ``original_height``, or a COCO image's ``width`` / ``height``) is refused: its
percentages would be scaled by the wrong size. Any conflict is a one-line :class:`UserError` that names the
record: an image already labeled (same ``file_name``), an unknown class or keypoint name, a box outside the
image or without positive size, a keypoint outside the image, outside every box (or in more than one)
without a ``parentID``, a task without an annotation, a region or annotation merge cannot take (left out and
counted with ``skip_unsupported``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from datadistill.core import selection
from datadistill.core.doubt import FORMULA, image_doubts, object_doubt, order_images
from datadistill.data.annotation_tools import (
    BOX_TOLERANCE_PX,
    CorrectedImage,
    label_config_xml,
    label_studio_tasks,
    read_corrections,
    review_coco,
)
from datadistill.data.coco import CocoDataset, load_coco, parse_coco, read_json
from datadistill.data.images import image_size, resolve_image_path
from datadistill.data.label_folder import (
    LabelFolder,
    check_lengths,
    finite_or_raise,
    flat_values,
    iter_shards,
    list_lengths,
    object_values,
    open_label_folder,
    read_shard,
)
from datadistill.errors import DataError, UserError, shorten
from datadistill.runtime.io import atomic_file, provenance, write_json_atomic, write_text_atomic
from datadistill.stages.select import reference_counts

FORMATS = ("label-studio", "cvat", "coco")
RANKING_FILE = "ranking.csv"  # every image labeled without an error, most doubtful first: file_name,doubt
RANKING_IN_JSON = 1000  # review.json lists this many of them

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# review


@dataclass(frozen=True)
class Thresholds:
    """Per class ``[C]`` thresholds (``inf``: keep none), the minimum agreement, the keypoint threshold."""

    per_class: np.ndarray
    min_agreement: int
    keypoint: float | None
    source: str


def read_thresholds(path: str | Path, class_names: tuple[str, ...]) -> Thresholds:
    """The thresholds of a ``selection.json`` (written by ``select``) for ``class_names``."""
    raw = read_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("thresholds"), dict):
        raise UserError(f"{path}: not a selection.json (no 'thresholds'); pass the one `datadistill select` wrote")
    missing = [n for n in class_names if n not in raw["thresholds"]]
    if missing:
        raise UserError(f"{path}: no threshold for class {missing[0]!r}; was it selected for another data set?")
    per_class = np.array(
        [math.inf if raw["thresholds"][n] is None else float(raw["thresholds"][n]) for n in class_names]
    )
    kp = raw.get("keypoint_threshold")
    return Thresholds(per_class, int(raw.get("min_agreement", 1)), None if kp is None else float(kp), str(path))


def count_thresholds(folder: LabelFolder, ref: CocoDataset, stats: FolderStats) -> Thresholds:
    """The count rule of ``select`` (its default policy ``count``, ``min_agreement`` 1, no cross-class filter)
    over every candidate of ``folder``, streamed (:func:`datadistill.core.selection.count_thresholds_streamed`)."""
    counts = reference_counts(ref)
    target = int(round(counts["per_image"] * stats.num_images))

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for _, table in iter_shards(folder, ["scores"]):
            scores = flat_values(table, "scores", np.float64)
            yield scores, np.zeros(len(scores), np.int64)

    t = selection.count_thresholds_streamed(chunks, np.array([target]))[0]
    return Thresholds(np.full(ref.num_classes, t), 1, None, "count rule (no --selection)")


@dataclass(frozen=True)
class FolderStats:
    """A first look at a labeling folder's shards (small columns only): ``num_images`` labeled without an
    error, ``num_views`` (the manifest's, else the largest agreement seen)."""

    num_images: int
    num_views: int


def folder_stats(folder: LabelFolder, num_classes: int) -> FolderStats:
    """:class:`FolderStats`, each shard checked for what ranking relies on (one-line UserErrors naming the
    shard): lists of one value per object, finite scores, labels of the data set's classes."""
    num_images, max_agreement = 0, 1
    for part, table in iter_shards(folder, ["scores", "labels", "agreement", "error"]):
        check_lengths(table, part, {"labels": 1, "agreement": 1})
        finite_or_raise(flat_values(table, "scores", np.float64), part, "scores")
        labels = flat_values(table, "labels", np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise UserError(f"{part}: column 'labels' holds classes outside the data set's {num_classes}")
        num_images += int(table["error"].is_null().to_numpy(zero_copy_only=False).sum())
        max_agreement = max(max_agreement, int(np.max(flat_values(table, "agreement", np.int64), initial=1)))
    if num_images == 0:
        raise UserError(f"{folder.path}: no image was labeled (all skipped?)")
    return FolderStats(num_images=num_images, num_views=folder.num_views(max_agreement))


_RANK_COLUMNS = ["file_name", "scores", "labels", "agreement", "score_spread", "box_spread", "error"]


@dataclass(frozen=True)
class Ranking:
    """Every image of a labeling folder, by doubt. ``order`` ``[M]``: the rows (over all shards, in shard
    order) of the images labeled without an error, most doubtful first (:func:`~datadistill.core.doubt.order_images`);
    ``image_doubt`` ``[R]``; ``names`` ``[R]`` (arrow strings); ``row_starts`` and ``object_starts``
    ``[S + 1]``: where each shard's rows and candidates begin; ``spreads_measured``: any candidate has one."""

    order: np.ndarray
    image_doubt: np.ndarray
    names: pa.ChunkedArray
    row_starts: np.ndarray
    object_starts: np.ndarray
    spreads_measured: bool
    num_candidates: int


def rank_folder(folder: LabelFolder, thr: Thresholds, *, num_views: int) -> Ranking:
    """:class:`Ranking` in one pass, a shard at a time; per image it keeps two floats and its name."""
    image_max, image_sum, ok, names = [], [], [], []
    row_starts, object_starts, measured = [0], [0], False
    for _, table in iter_shards(folder, _RANK_COLUMNS):
        scores, cls = flat_values(table, "scores", np.float64), flat_values(table, "labels", np.int64)
        spread = object_values(table, "score_spread")
        doubt, _ = object_doubt(scores, flat_values(table, "agreement", np.int64), thr.per_class[cls],
                                num_views=num_views, score_spread=spread,
                                box_spread=object_values(table, "box_spread"))  # fmt: skip
        lengths = list_lengths(table)
        row_max, row_sum = image_doubts(doubt, np.repeat(np.arange(len(lengths)), lengths), len(lengths))
        image_max.append(row_max)
        image_sum.append(row_sum)
        ok.append(np.asarray(table["error"].is_null().to_numpy(zero_copy_only=False), bool))
        names.append(table["file_name"].combine_chunks())
        row_starts.append(row_starts[-1] + len(lengths))
        object_starts.append(object_starts[-1] + len(scores))
        measured = measured or bool(len(spread) and not np.isnan(spread).all())
    mx = np.concatenate(image_max)
    order = order_images(mx, np.concatenate(image_sum), np.concatenate(ok))
    return Ranking(order=order, image_doubt=mx, names=pa.chunked_array(names, pa.string()),
                   row_starts=np.asarray(row_starts), object_starts=np.asarray(object_starts),
                   spreads_measured=measured, num_candidates=object_starts[-1])  # fmt: skip


def chosen_objects(
    folder: LabelFolder, ranking: Ranking, chosen: np.ndarray, thr: Thresholds, *, num_views: int, num_keypoints: int
) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """The ``chosen`` rows' table (``file_name``, ``width``, ``height``, in ``chosen``'s order) and their
    candidates' values: ``boxes`` ``[N, 4]``, ``scores``, ``labels``, ``agreement``, ``score_spread`` and
    ``box_spread`` (NaN where not measured), ``keypoints`` ``[N, K, 3]`` in a keypoint task, ``id`` the
    candidate's index over the folder, ``doubt``, ``closeness``, ``kept``, and ``image`` its image's position
    in ``chosen``. Only the shards of the chosen rows are read."""
    columns = _RANK_COLUMNS + ["width", "height", "boxes"] + (["keypoints"] if num_keypoints else [])
    shard_of = np.searchsorted(ranking.row_starts, chosen, side="right") - 1
    tables, parts, position = {}, [], {int(r): i for i, r in enumerate(chosen)}
    files = folder.shard_files()
    for k in np.unique(shard_of):
        shard_file = files[int(k)]
        table = read_shard(shard_file, columns=columns)
        lengths = check_lengths(table, shard_file, {"boxes": 4, "keypoints": 3 * num_keypoints})
        for name in ("boxes", "keypoints") if num_keypoints else ("boxes",):
            finite_or_raise(flat_values(table, name, np.float64), shard_file, name)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        mine = {"boxes": flat_values(table, "boxes", np.float64).reshape(-1, 4),
                "scores": flat_values(table, "scores", np.float64), "labels": flat_values(table, "labels", np.int64),
                "agreement": flat_values(table, "agreement", np.int64),
                "score_spread": object_values(table, "score_spread"),
                "box_spread": object_values(table, "box_spread")}  # fmt: skip
        if num_keypoints:
            mine["keypoints"] = flat_values(table, "keypoints", np.float64).reshape(-1, num_keypoints, 3)
        for r in chosen[shard_of == k]:
            local = int(r - ranking.row_starts[k])
            idx = np.arange(starts[local], starts[local + 1])
            part = {name: values[idx] for name, values in mine.items()}
            part["id"] = ranking.object_starts[k] + idx
            part["image"] = np.full(len(idx), position[int(r)])
            parts.append(part)
            tables[position[int(r)]] = table.select(["file_name", "width", "height"]).slice(local, 1)
    obj = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]} if parts else {}
    if parts:
        t = thr.per_class[obj["labels"]]
        obj["doubt"], obj["closeness"] = object_doubt(
            obj["scores"], obj["agreement"], t, num_views=num_views, score_spread=obj["score_spread"],
            box_spread=obj["box_spread"],
        )  # fmt: skip
        obj["kept"] = (obj["scores"] >= t) & (obj["agreement"] >= thr.min_agreement)
    table = pa.concat_tables([tables[i] for i in range(len(chosen))]) if len(chosen) else None
    return table, obj  # type: ignore[return-value]


def review(
    labels: str | Path,
    reference: str | Path,
    *,
    out: str | Path,
    top: int,
    selection_path: str | Path | None = None,
    formats: tuple[str, ...] = FORMATS,
    image_url_prefix: str | None = None,
    min_closeness: float = 0.5,
) -> dict[str, Any]:
    """The ``review`` stage (see the module docstring); returns what it wrote into ``review.json``."""
    started = time.time()
    labels_dir, out = Path(labels), Path(out)
    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"--format: unknown format {bad[0] if bad else '(none)'!r}; choose from {', '.join(FORMATS)}")
    folder = open_label_folder(labels_dir)
    ref = load_coco(reference)
    names = folder.class_names
    if names is not None and names != ref.class_names:
        raise UserError(
            f"{labels_dir} was labeled for classes {list(names[:5])} but {reference} has {list(ref.class_names[:5])}"
        )
    stats = folder_stats(folder, ref.num_classes)
    if selection_path is not None:
        thr = read_thresholds(selection_path, ref.class_names)
    else:
        thr = count_thresholds(folder, ref, stats)
    ranking = rank_folder(folder, thr, num_views=stats.num_views)
    table, obj = chosen_objects(folder, ranking, ranking.order[:top], thr, num_views=stats.num_views,
                                num_keypoints=ref.num_keypoints)  # fmt: skip
    chosen = np.arange(table.num_rows)
    written = obj["kept"] | (obj["closeness"] >= min_closeness)
    objects_of = {int(r): np.flatnonzero((obj["image"] == r) & written) for r in chosen}
    image_doubt = ranking.image_doubt[ranking.order[:top]]
    out.mkdir(parents=True, exist_ok=True)
    files = []
    if "label-studio" in formats:
        tasks = label_studio_tasks(ref, objects_of, table, obj=obj, image_doubt=image_doubt, kp_thr=thr.keypoint,
                                   prefix=image_url_prefix)  # fmt: skip
        write_json_atomic(out / "tasks.json", tasks, indent=1)
        kp_names = ref.keypoint_category.keypoints if ref.keypoint_category is not None else ()
        write_text_atomic(out / "label_config.xml", label_config_xml(ref.class_names, kp_names))
        files += ["tasks.json", "label_config.xml"]
    if "cvat" in formats or "coco" in formats:
        coco = review_coco(ref, objects_of, table, obj=obj, kp_thr=thr.keypoint)
        write_json_atomic(out / "coco.json", coco)
        files.append("coco.json")
    _write_ranking(out / RANKING_FILE, ranking)
    files.append(RANKING_FILE)
    listed = ranking.order[:RANKING_IN_JSON]
    summary = {
        "formula": FORMULA,
        "spreads_measured": True if ranking.spreads_measured else (False if not ranking.num_candidates else
            "no: the shards hold no score_spread/box_spread (labeled before they were measured); the doubt is the "
            "mean of the first two terms"),
        "num_views": stats.num_views,
        "thresholds": {n: (None if not np.isfinite(t) else float(t))
                       for n, t in zip(ref.class_names, thr.per_class, strict=True)},
        "thresholds_from": thr.source,
        "min_agreement": thr.min_agreement,
        "min_closeness": min_closeness,
        "images_ranked": len(ranking.order),
        "images_sent": len(chosen),
        "objects_sent": int(sum(len(v) for v in objects_of.values())),
        "files": files,
        "ranking": [{"file_name": n, "doubt": float(d)} for n, d in
                    zip(ranking.names.take(listed).to_pylist(), ranking.image_doubt[listed], strict=True)],
        "ranking_note": f"the {len(listed)} most doubtful images; {RANKING_FILE} lists every image",
        "seconds": round(time.time() - started, 3),
        "provenance": provenance(),
    }  # fmt: skip
    write_json_atomic(out / "review.json", summary, indent=1)
    return summary


def _write_ranking(path: Path, ranking: Ranking) -> None:
    """``ranking.csv``: ``file_name,doubt`` of every ranked image, most doubtful first, written in blocks."""
    with atomic_file(path) as f:
        f.write(b"file_name,doubt\n")
        for lo in range(0, len(ranking.order), 100_000):
            rows = ranking.order[lo : lo + 100_000]
            names = ranking.names.take(rows).to_pylist()
            lines = (f"{_csv_field(n)},{float(d)!r}\n" for n, d in zip(names, ranking.image_doubt[rows], strict=True))
            f.write("".join(lines).encode())


def _csv_field(text: str) -> str:
    """A CSV field: quoted (doubled quotes inside) when it holds a comma, a quote or a line break."""
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\r\n') else text


# ----------------------------------------------------------------------------------------------------
# merge


def merge(
    labeled: str | Path,
    corrections: str | Path,
    *,
    out: str | Path,
    images: str | Path | None = None,
    skip_unsupported: bool = False,
) -> dict[str, Any]:
    """The ``merge`` stage: ``labeled`` plus the corrected images as real labels, written to ``out``; with
    ``skip_unsupported`` the regions and annotations it cannot take are left out, logged and counted in the
    summary's ``skipped``."""
    labeled_path = Path(labeled)
    ref = load_coco(labeled_path, image_root=images)
    raw = read_json(labeled_path)
    kp_names = ref.keypoint_category.keypoints if ref.keypoint_category else ()
    corrected = read_corrections(corrections, kp_names, skip_unsupported=skip_unsupported)
    class_of = {c.name: c for c in ref.categories}
    taken = {im.file_name: im.id for im in ref.images}
    seen: dict[str, str] = {}
    next_image = max((im.id for im in ref.images), default=0) + 1
    next_ann = max((int(a["id"]) for a in raw.get("annotations", [])), default=0) + 1
    new_images, new_anns = [], []
    for c in corrected.images:
        if c.file_name in taken:
            raise UserError(f"{c.record}: already labeled in {labeled_path} (image {taken[c.file_name]})")
        if c.file_name in seen:
            raise UserError(f"{c.record}: the same image as {seen[c.file_name]}")
        seen[c.file_name] = c.record
        width, height = c.width, c.height
        if images is not None:
            width, height = _real_size(c, images)
        if width <= 0 or height <= 0:
            raise UserError(f"{c.record}: unknown image size (pass --images DIR)")
        new_images.append({"id": next_image, "file_name": c.file_name, "width": width, "height": height})
        for (x1, y1, x2, y2), name, extra in zip(c.boxes, c.labels, c.extra, strict=True):
            if name not in class_of:
                raise UserError(f"{c.record}: unknown class {shorten(repr(name))} (the labeled set has "
                                f"{list(class_of)[:8]})")  # fmt: skip
            shown = shorten(repr(name))
            if not (x2 - x1 > 0 and y2 - y1 > 0):
                raise UserError(f"{c.record}: a {shown} box has non-positive size ({x2 - x1:g} x {y2 - y1:g} px)")
            t = BOX_TOLERANCE_PX
            if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
                raise UserError(f"{c.record}: a {shown} box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] (xyxy px) lies outside "
                                f"the {width}x{height} image")  # fmt: skip
            ann = {"id": next_ann, "image_id": next_image, "category_id": class_of[name].id,
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                   **extra}  # fmt: skip
            if ref.num_keypoints and "keypoints" not in ann:  # a box corrected, its keypoints not labeled
                ann.update(keypoints=[0.0] * (3 * ref.num_keypoints), num_keypoints=0)
            new_anns.append(ann)
            next_ann += 1
        next_image += 1
    merged = {**raw, "images": list(raw["images"]) + new_images,
              "annotations": list(raw.get("annotations", [])) + new_anns}  # fmt: skip
    _, problems = parse_coco(merged, image_root=images)
    if problems:
        raise UserError(f"{corrections}: the merged data set would not validate: {problems[0]}")
    skipped = sum(corrected.skipped.values())
    if skipped:
        kinds = ", ".join(f"{n} {kind}{'s' if n != 1 else ''}" for kind, n in corrected.skipped.items())
        log.warning("%s: left out %d record%s merge cannot take (--skip-unsupported): %s", corrections, skipped,
                    "s" if skipped != 1 else "", kinds)  # fmt: skip
    write_json_atomic(out, merged)
    return {"images_added": len(new_images), "annotations_added": len(new_anns), "images": len(merged["images"]),
            "annotations": len(merged["annotations"]), "skipped": corrected.skipped, "out": str(out)}  # fmt: skip


def _real_size(c: CorrectedImage, images: str | Path) -> tuple[int, int]:
    """The size of ``c``'s image file under ``images``; a UserError when the export claims another size (its
    boxes were scaled or drawn for another image)."""
    try:
        file = resolve_image_path(images, c.file_name)
        width, height = image_size(file)
    except DataError as exc:
        raise UserError(f"{c.record}: {exc}") from exc
    if c.width and (c.width, c.height) != (width, height):
        raise UserError(f"{c.record}: the export's {c.size_field} say {c.width}x{c.height} but the image {file} is "
                        f"{width}x{height}; export it again from the image it shows")  # fmt: skip
    return width, height
