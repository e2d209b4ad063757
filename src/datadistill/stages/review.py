"""The human in the loop: ``review`` sends the images the views disagree on to a person, ``merge`` takes the
corrections back as real labels.

``review`` reads a labeling folder (the shards and ``manifest.json``) and the threshold of a selection
(``selection.json``, or the count rule over every candidate, without ``select``'s cross-class filter), ranks
the unlabeled images from most to least doubtful and writes the top N as pre-annotations: Label Studio tasks
(``tasks.json`` and the project's ``label_config.xml``) and a COCO json (``coco.json``, which CVAT imports as
"COCO 1.0" and FiftyOne loads), beside ``ranking.csv`` (every image by doubt) and ``review.json`` (the top of
the ranking, the thresholds, the formula's inputs).

The doubt. For a fused candidate j with score ``s``, seen by ``a`` of the ``V`` views (the manifest's
``views``), whose class has the selection threshold ``t``, with the views' score spread ``ss`` and box
spread ``bs`` measured by ``label`` (:mod:`datadistill.core.uncertainty`):

- disagreement ``d = 1 - a / V``: 0 when every view saw the object, ``1 - 1/V`` when one view alone did;
  the views disagree on whether it is there.
- closeness ``c = max(0, 1 - |s - t| / max(t, 1 - t))``: 1 on the threshold, 0 as far from it as a score
  can be (0 for a class without a threshold); a small change of threshold flips whether it is kept.
- score swing ``w = min(1, 2 ss)``: the standard deviation of the views' scores (a view that missed the
  object counting 0) over its largest possible value, 0.5; the views disagree on how sure to be.
- box wander ``b = min(1, bs / 0.1)``: how far the views put the box's edges apart, in units of its size,
  over 0.1 (two views whose boxes just still match, IoU 0.5, are about 0.09 apart); the views disagree on
  where the object is.
- object doubt: the mean of ``d, c, w, b``, in [0, 1]. Shards written before the spreads were measured
  (or by a labeling that did not measure them) hold none: their doubt is ``(d + c) / 2``, as before, and
  ``review.json`` says so (``spreads_measured``).

An image's doubt is the largest doubt of its candidates (0 without any): one doubtful object is enough to
send an image to a person, and a crowded image is not preferred for its crowd. Equal doubts are ordered by
the sum of the objects' doubts, then by labeling order. An image skipped by ``label`` (an error) is never
sent.

The pre-annotations of an image are its kept objects (score >= ``t`` and agreement >= the selection's
``min_agreement``) and, below the threshold, its doubtful ones (closeness >= ``min_closeness``, 0.5 by
default), each with its ``score``; the COCO json also carries ``agreement``, ``doubt`` and ``kept``. In a
keypoint task (the reference's categories have keypoints) an object's keypoints go along: those whose score
reaches the selection's ``keypoint_threshold`` (or is above 0 without one), in the COCO json as COCO
keypoints (v 2; the others 0, 0, 0), in the Label Studio tasks as ``keypointlabels`` regions (x, y in
percent, the keypoint's name, a ``parentID`` naming its box's region) under a ``KeyPointLabels`` tag
``keypoint`` of the labeling config.

``merge`` reads a Label Studio JSON export (tasks with ``annotations[].result`` of ``rectanglelabels`` in
percent of ``original_width`` / ``original_height``, and ``keypointlabels`` for keypoints) or a COCO json
(from CVAT) and appends its images to the labeled COCO json with new image and annotation ids. A Label
Studio keypoint belongs to the box its ``parentID`` names, else to the one box that contains it; it comes
back as a COCO keypoint (x, y px, v 2), a keypoint not marked as 0, 0, 0. Any conflict is a one-line
:class:`UserError` that names the record: an image already labeled (same ``file_name``), an unknown class
or keypoint name, a box outside the image or without positive size, a keypoint outside every box (or in
more than one) without a ``parentID``, a task without an annotation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlparse
from xml.sax.saxutils import quoteattr

import numpy as np
import pyarrow as pa

from datadistill import __version__
from datadistill.core import selection
from datadistill.data.coco import (
    CocoDataset,
    category_to_coco,
    is_finite_number,
    load_coco,
    parse_coco,
    read_json,
)
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
from datadistill.errors import DataError, UserError
from datadistill.runtime.io import atomic_file, provenance, write_json_atomic, write_text_atomic
from datadistill.stages.select import reference_counts

FORMATS = ("label-studio", "cvat", "coco")
RANKING_FILE = "ranking.csv"  # every image labeled without an error, most doubtful first: file_name,doubt
RANKING_IN_JSON = 1000  # review.json lists this many of them
LOCAL_FILES_URL = "/data/local-files/?d="
BOX_TOLERANCE_PX = 1e-3  # a corrected box may pass the image's edge by float rounding, no more
KEYPOINT_SIZE_PCT = 0.5  # how large Label Studio draws a pre-annotated keypoint, in percent of the image width
BOX_SPREAD_FULL = 0.1  # the box spread that counts as full doubt (two views matched at IoU 0.5: about 0.09)
FORMULA = (
    "object doubt = mean of the terms measured: 1 - agreement / views; max(0, 1 - |score - t| / max(t, 1 - t)); "
    f"min(1, 2 * score_spread); min(1, box_spread / {BOX_SPREAD_FULL:g}); image doubt = max over its objects "
    "(ties: sum)"
)


# ----------------------------------------------------------------------------------------------------
# the doubt: pure functions


def object_doubt(
    scores: np.ndarray,
    agreement: np.ndarray,
    thresholds: np.ndarray,
    *,
    num_views: int,
    score_spread: np.ndarray | None = None,
    box_spread: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate ``[N]``: the doubt (the mean of ``d, c, w, b``) and the closeness ``c`` (see the module
    docstring).

    ``thresholds`` ``[N]`` is the threshold of each candidate's class (``inf``: the class keeps nothing).
    ``score_spread`` and ``box_spread`` ``[N]``: NaN (or None for all) where not measured; such a candidate's
    doubt is the mean of the terms it has.
    """
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    scores = np.asarray(scores, np.float64)
    t = np.asarray(thresholds, np.float64)
    disagreement = np.clip(1.0 - np.asarray(agreement, np.float64) / num_views, 0.0, 1.0)
    finite = np.isfinite(t)
    tf = np.where(finite, t, 0.5)
    closeness = np.where(finite, np.clip(1.0 - np.abs(scores - tf) / np.maximum(tf, 1.0 - tf), 0.0, 1.0), 0.0)
    nan = np.full(len(scores), np.nan)
    swing = np.minimum(1.0, 2.0 * (nan if score_spread is None else np.asarray(score_spread, np.float64)))
    wander = np.minimum(1.0, (nan if box_spread is None else np.asarray(box_spread, np.float64)) / BOX_SPREAD_FULL)
    terms = np.stack([disagreement, closeness, swing, wander])  # [4, N]
    measured = ~np.isnan(terms)
    doubt = np.where(measured, terms, 0.0).sum(axis=0) / measured.sum(axis=0)
    return doubt, closeness


def rank_images(doubt: np.ndarray, image: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows ``[M]`` of the images labeled without error (``ok`` ``[R]``), most doubtful first, and the
    image doubts ``[R]`` (max of its objects' ``doubt`` ``[N]``, objects on rows ``image`` ``[N]``)."""
    image_max, image_sum = image_doubts(doubt, image, len(ok))
    return order_images(image_max, image_sum, ok), image_max


def image_doubts(doubt: np.ndarray, image: np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row ``[R]``: the largest and the sum of its objects' ``doubt`` ``[N]`` (objects on rows ``image``)."""
    image_max = np.zeros(num_rows)
    np.maximum.at(image_max, image, doubt)
    return image_max, np.bincount(image, weights=doubt, minlength=num_rows)


def order_images(image_max: np.ndarray, image_sum: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """The ``ok`` rows, by ``image_max`` (largest first), then ``image_sum``, then row."""
    rows = np.flatnonzero(ok)
    return rows[np.lexsort((rows, -image_sum[rows], -image_max[rows]))]


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
    order) of the images labeled without an error, most doubtful first (:func:`rank_images`);
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


def image_url(file_name: str, prefix: str | None) -> str:
    """Where Label Studio finds an image: ``prefix + file_name``, or its local-files storage path
    (``/data/local-files/?d=FILE_NAME``, relative to ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``)."""
    if prefix is not None:
        return prefix + quote(file_name, safe="/")
    return LOCAL_FILES_URL + quote(file_name, safe="/")


def label_config_xml(class_names: tuple[str, ...], keypoint_names: tuple[str, ...] = ()) -> str:
    """A Label Studio labeling config: one image, a RectangleLabels tag ``label`` with the class names and,
    for a keypoint task, a KeyPointLabels tag ``keypoint`` with the keypoint names."""

    def control(tag: str, name: str, values: tuple[str, ...]) -> str:
        labels = "\n".join(f"    <Label value={quoteattr(n)}/>" for n in values)
        return f'  <{tag} name="{name}" toName="image">\n{labels}\n  </{tag}>\n'

    keypoints = control("KeyPointLabels", "keypoint", keypoint_names) if keypoint_names else ""
    return (
        '<View>\n  <Image name="image" value="$image" zoom="true"/>\n'
        + control("RectangleLabels", "label", class_names)
        + keypoints
        + "</View>\n"
    )


def visible_keypoints(keypoints: np.ndarray, kp_thr: float | None) -> np.ndarray:
    """``[..., K]`` bool: the pseudo keypoints ``[..., K, 3]`` (x, y px, score) sent as visible: a score from
    the selection's keypoint threshold ``kp_thr`` on, or above 0 without one."""
    scores = keypoints[..., 2]
    return scores >= kp_thr if kp_thr is not None else scores > 0


def _ls_region(region_id: str, box: np.ndarray, name: str, score: float, width: int, height: int) -> dict[str, Any]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return {
        "id": region_id, "type": "rectanglelabels", "from_name": "label", "to_name": "image",
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"x": 100.0 * x1 / width, "y": 100.0 * y1 / height, "width": 100.0 * (x2 - x1) / width,
                  "height": 100.0 * (y2 - y1) / height, "rotation": 0, "rectanglelabels": [name]},
        "score": score,
    }  # fmt: skip


def _ls_keypoints(
    parent_id: str, keypoints: np.ndarray, names: tuple[str, ...], *, kp_thr: float | None, width: int, height: int
) -> list[dict[str, Any]]:
    """The visible keypoints ``[K, 3]`` of one box as Label Studio keypointlabels regions in percent of the
    image, each linked to its box's region by ``parentID`` (as Label Studio links a keypoint drawn in a box)."""
    return [{
        "id": f"{parent_id}k{k}", "type": "keypointlabels", "from_name": "keypoint", "to_name": "image",
        "original_width": width, "original_height": height, "image_rotation": 0, "parentID": parent_id,
        "value": {"x": 100.0 * float(keypoints[k, 0]) / width, "y": 100.0 * float(keypoints[k, 1]) / height,
                  "width": KEYPOINT_SIZE_PCT, "keypointlabels": [names[k]]},
        "score": float(keypoints[k, 2]),
    } for k in np.flatnonzero(visible_keypoints(keypoints, kp_thr))]  # fmt: skip


def _label_studio_tasks(
    ref: CocoDataset,
    chosen: np.ndarray,
    objects_of: dict[int, np.ndarray],
    table: pa.Table,
    *,
    obj: dict[str, np.ndarray],
    image_doubt: np.ndarray,
    kp_thr: float | None,
    prefix: str | None,
) -> list[dict[str, Any]]:
    """One Label Studio task per sent image, in ranking order: its objects as rectanglelabels regions and,
    for a keypoint task, their visible keypoints as keypointlabels regions."""
    file_names, widths, heights = (table[c].to_pylist() for c in ("file_name", "width", "height"))
    kp_cat = ref.keypoint_category
    tasks = []
    for r in (int(r) for r in chosen):
        w, h, name = int(widths[r]), int(heights[r]), file_names[r]
        result = []
        for j in objects_of[r]:
            cls = ref.class_names[obj["labels"][j]]
            region = f"r{int(obj['id'][j])}"  # the candidate's index over the labeling folder
            result.append(_ls_region(region, obj["boxes"][j], cls, float(obj["scores"][j]), w, h))
            if kp_cat is not None:
                result += _ls_keypoints(region, obj["keypoints"][j], kp_cat.keypoints, kp_thr=kp_thr, width=w,
                                        height=h)  # fmt: skip
        tasks.append({
            "data": {"image": image_url(name, prefix), "file_name": name, "width": w, "height": h},
            "predictions": [{"model_version": f"datadistill {__version__} review", "score": float(image_doubt[r]),
                             "result": result}],
        })  # fmt: skip
    return tasks


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
    file_names, widths, heights = (table[c].to_pylist() for c in ("file_name", "width", "height"))
    out.mkdir(parents=True, exist_ok=True)
    files = []
    if "label-studio" in formats:
        tasks = _label_studio_tasks(ref, chosen, objects_of, table, obj=obj, image_doubt=image_doubt,
                                    kp_thr=thr.keypoint, prefix=image_url_prefix)  # fmt: skip
        write_json_atomic(out / "tasks.json", tasks, indent=1)
        kp_names = ref.keypoint_category.keypoints if ref.keypoint_category is not None else ()
        write_text_atomic(out / "label_config.xml", label_config_xml(ref.class_names, kp_names))
        files += ["tasks.json", "label_config.xml"]
    if "cvat" in formats or "coco" in formats:
        coco = _review_coco(ref, chosen, objects_of, file_names, widths, heights, obj=obj, doubt=obj["doubt"],
                            kept=obj["kept"], kp_thr=thr.keypoint)  # fmt: skip
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


def _review_coco(
    ref: CocoDataset,
    chosen: np.ndarray,
    objects_of: dict[int, np.ndarray],
    file_names: list[str],
    widths: list[int],
    heights: list[int],
    *,
    obj: dict[str, np.ndarray],
    doubt: np.ndarray,
    kept: np.ndarray,
    kp_thr: float | None,
) -> dict[str, Any]:
    """The sent images as COCO, in ranking order; keypoints visible (2) from ``kp_thr`` (or a score > 0).
    ``obj``: :func:`chosen_objects`' values; ``score_spread``/``box_spread`` null where not measured."""
    boxes, cls, scores, agreement = obj["boxes"], obj["labels"], obj["scores"], obj["agreement"]
    keypoints = obj.get("keypoints")
    images, annotations = [], []
    cat_ids = [c.id for c in ref.categories]
    for image_id, r in enumerate((int(r) for r in chosen), 1):
        images.append({"id": image_id, "file_name": file_names[r], "width": int(widths[r]), "height": int(heights[r])})
        for j in objects_of[r]:
            x1, y1, x2, y2 = (float(v) for v in boxes[j])
            ann: dict[str, Any] = {
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat_ids[int(cls[j])],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                "score": float(scores[j]), "agreement": int(agreement[j]), "doubt": float(doubt[j]),
                "kept": bool(kept[j]), "score_spread": _or_none(obj["score_spread"][j]),
                "box_spread": _or_none(obj["box_spread"][j]),
            }  # fmt: skip
            if keypoints is not None:
                kp = keypoints[j].copy()
                vis = visible_keypoints(kp, kp_thr)
                kp[:, 2] = np.where(vis, 2.0, 0.0)
                kp[~vis, :2] = 0.0
                ann["keypoints"] = kp.reshape(-1).tolist()
                ann["num_keypoints"] = int(vis.sum())
            annotations.append(ann)
    return {"info": {"description": "datadistill review: the most doubtful images"}, "images": images,
            "annotations": annotations, "categories": [category_to_coco(c) for c in ref.categories]}  # fmt: skip


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


def _or_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


# ----------------------------------------------------------------------------------------------------
# merge


@dataclass(frozen=True)
class CorrectedImage:
    """One corrected image: where it came from (for messages), its name and size, its objects
    (``boxes`` ``[N, 4]`` xyxy px, ``labels`` ``[N]`` class names, ``extra`` per object: COCO fields kept)."""

    record: str
    file_name: str
    width: int
    height: int
    boxes: list[tuple[float, float, float, float]]
    labels: list[str]
    extra: list[dict[str, Any]]


def file_name_of_task(data: dict[str, Any]) -> str | None:
    """The image of a Label Studio task: ``data.file_name`` (review writes it), else the local-files path,
    else the URL's last path component."""
    if isinstance(data.get("file_name"), str):
        return data["file_name"]
    url = data.get("image")
    if not isinstance(url, str) or not url:
        return None
    if url.startswith("/data/local-files/"):
        d = parse_qs(urlparse(url).query).get("d")
        return d[0] if d else None
    return unquote(urlparse(url).path.rsplit("/", 1)[-1]) or None


def read_label_studio_export(path: Path, keypoint_names: tuple[str, ...] = ()) -> list[CorrectedImage]:
    """A Label Studio JSON export: per task, the last annotation not cancelled, its rectanglelabels back in
    absolute pixels (``x / 100 * original_width`` ...) and, for a keypoint task (``keypoint_names``), its
    keypointlabels as each box's COCO keypoints (see :func:`task_keypoints`)."""
    raw = read_json(path)
    out = []
    for i, task in enumerate(raw):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise UserError(f"{path}: task #{i} is not a Label Studio task (no 'data')")
        name = file_name_of_task(task["data"])
        record = f"{path}: task {task.get('id', f'#{i}')} ({name})"
        if name is None:
            raise UserError(f"{record}: cannot tell which image it is (no data.file_name or data.image)")
        done = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        if not done:
            raise UserError(f"{record}: has no annotation (label it, or leave it out of the export)")
        width, height = task["data"].get("width"), task["data"].get("height")
        size = width, height
        boxes, labels, box_ids, points = [], [], [], []
        for region in done[-1].get("result") or []:
            if region.get("type") == "keypointlabels":
                points.append(region)
            if region.get("type") != "rectanglelabels":
                continue
            v = region.get("value", {})
            width, height = region.get("original_width", width), region.get("original_height", height)
            if not width or not height:
                raise UserError(f"{record}: a region has no original_width/original_height")
            if abs(float(v.get("rotation", 0) or 0)) > 1e-9:
                raise UserError(f"{record}: region {region.get('id')} is rotated; axis-aligned boxes only")
            x, y = float(v["x"]) / 100.0 * width, float(v["y"]) / 100.0 * height
            boxes.append((x, y, x + float(v["width"]) / 100.0 * width, y + float(v["height"]) / 100.0 * height))
            names = v.get("rectanglelabels") or []
            if len(names) != 1:
                raise UserError(f"{record}: region {region.get('id')} needs one class name, got {names}")
            labels.append(str(names[0]))
            box_ids.append(region.get("id"))
        extra: list[dict[str, Any]] = [{}] * len(boxes)
        if keypoint_names or points:  # not a box task with boxes only (that path is as before)
            extra = task_keypoints(record, points, boxes, box_ids, keypoint_names=keypoint_names, size=size)
        out.append(CorrectedImage(record, name, int(width or 0), int(height or 0), boxes, labels, extra))
    return out


def task_keypoints(
    record: str,
    points: list[dict[str, Any]],
    boxes: list[tuple[float, float, float, float]],
    box_ids: list[Any],
    *,
    keypoint_names: tuple[str, ...],
    size: tuple[Any, Any],
) -> list[dict[str, Any]]:
    """Per box of a task (``boxes`` xyxy px, ``box_ids`` their region ids), its COCO ``keypoints`` (x, y px,
    v 2; a keypoint not marked 0, 0, 0) and ``num_keypoints``, from the task's keypointlabels regions
    ``points``: each goes to the box its ``parentID`` names, else to the one box that contains it.
    ``size``: the task's (width, height), for a region without ``original_width``/``original_height``."""
    index = {n: k for k, n in enumerate(keypoint_names)}
    kps = np.zeros((len(boxes), len(keypoint_names), 3))
    for region in points:
        rid, v = region.get("id"), region.get("value") or {}
        names = v.get("keypointlabels") or []
        if len(names) != 1:
            raise UserError(f"{record}: keypoint {rid} needs one keypoint name, got {names}")
        name = str(names[0])
        if name not in index:
            known = list(keypoint_names[:8]) if keypoint_names else "no keypoints"
            raise UserError(f"{record}: keypoint {rid} has an unknown keypoint name {name!r} (the labeled set has "
                            f"{known})")  # fmt: skip
        width, height = region.get("original_width", size[0]), region.get("original_height", size[1])
        if not width or not height or not is_finite_number(v.get("x")) or not is_finite_number(v.get("y")):
            raise UserError(f"{record}: keypoint {rid} ({name}) needs x, y and original_width/original_height")
        x, y = float(v["x"]) / 100.0 * width, float(v["y"]) / 100.0 * height
        b = _parent_box(f"{record}: keypoint {rid} ({name})", region.get("parentID"), (x, y), boxes, box_ids)
        if kps[b, index[name], 2]:
            raise UserError(f"{record}: box {box_ids[b]} has two {name!r} keypoints")
        kps[b, index[name]] = (x, y, 2.0)
    return [{"keypoints": kp.reshape(-1).tolist(), "num_keypoints": int((kp[:, 2] > 0).sum())} for kp in kps]


def _parent_box(
    where: str,
    parent: Any,
    point: tuple[float, float],
    boxes: list[tuple[float, float, float, float]],
    box_ids: list[Any],
) -> int:
    """The index of the box a keypoint belongs to: the one ``parent`` (its parentID) names, else the one box
    that contains ``point`` (x, y px); a one-line UserError when there is none or more than one."""
    if parent:
        if parent not in box_ids:
            raise UserError(f"{where}: its parentID {parent!r} names no box of the task")
        return box_ids.index(parent)
    x, y, t = point[0], point[1], BOX_TOLERANCE_PX
    inside = [i for i, (x1, y1, x2, y2) in enumerate(boxes) if x1 - t <= x <= x2 + t and y1 - t <= y <= y2 + t]
    if len(inside) == 1:
        return inside[0]
    ids = ", ".join(str(box_ids[i]) for i in inside)
    lies = f"inside {len(inside)} boxes ({ids})" if inside else "outside every box"
    raise UserError(f"{where}: has no parentID and lies {lies} at ({x:g}, {y:g}) px; link it to its box")


def read_coco_corrections(path: Path) -> list[CorrectedImage]:
    """A COCO json (CVAT's "COCO 1.0" export): every image, its boxes (xywh -> xyxy) and class names."""
    raw = read_json(path)
    cat_names = {c.get("id"): c.get("name") for c in raw.get("categories", []) if isinstance(c, dict)}
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for a in raw.get("annotations", []):
        by_image.setdefault(a.get("image_id"), []).append(a)
    out = []
    for im in raw["images"]:
        record = f"{path}: image {im.get('id')} ({im.get('file_name')})"
        boxes, labels, extra = [], [], []
        for a in by_image.get(im.get("id"), []):
            where = f"{record} annotation {a.get('id')}"
            if a.get("category_id") not in cat_names:
                raise UserError(f"{where}: unknown category_id {a.get('category_id')}")
            x, y, w, h = (float(v) for v in a["bbox"])
            boxes.append((x, y, x + w, y + h))
            labels.append(str(cat_names[a["category_id"]]))
            extra.append({k: a[k] for k in ("keypoints", "num_keypoints", "iscrowd") if k in a})
        size = int(im.get("width") or 0), int(im.get("height") or 0)
        out.append(CorrectedImage(record, str(im.get("file_name")), *size, boxes, labels, extra))
    return out


def read_corrections(path: str | Path, keypoint_names: tuple[str, ...] = ()) -> list[CorrectedImage]:
    """A Label Studio export (a json list of tasks) or a COCO json (an object with ``images``);
    ``keypoint_names``: the labeled set's keypoints (none for a box task)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    raw = read_json(path)
    if isinstance(raw, list):
        return read_label_studio_export(path, keypoint_names)
    if isinstance(raw, dict) and isinstance(raw.get("images"), list):
        return read_coco_corrections(path)
    raise UserError(f"{path}: neither a Label Studio JSON export (a list of tasks) nor a COCO json")


def merge(
    labeled: str | Path, corrections: str | Path, *, out: str | Path, images: str | Path | None = None
) -> dict[str, Any]:
    """The ``merge`` stage: ``labeled`` plus the corrected images as real labels, written to ``out``."""
    labeled_path = Path(labeled)
    ref = load_coco(labeled_path, image_root=images)
    raw = read_json(labeled_path)
    corrected = read_corrections(corrections, ref.keypoint_category.keypoints if ref.keypoint_category else ())
    class_of = {c.name: c for c in ref.categories}
    taken = {im.file_name: im.id for im in ref.images}
    seen: dict[str, str] = {}
    next_image = max((im.id for im in ref.images), default=0) + 1
    next_ann = max((int(a["id"]) for a in raw.get("annotations", [])), default=0) + 1
    new_images, new_anns = [], []
    for c in corrected:
        if c.file_name in taken:
            raise UserError(f"{c.record}: already labeled in {labeled_path} (image {taken[c.file_name]})")
        if c.file_name in seen:
            raise UserError(f"{c.record}: the same image as {seen[c.file_name]}")
        seen[c.file_name] = c.record
        width, height = c.width, c.height
        if images is not None:
            try:
                width, height = image_size(resolve_image_path(images, c.file_name))
            except DataError as exc:
                raise UserError(f"{c.record}: {exc}") from exc
        if width <= 0 or height <= 0:
            raise UserError(f"{c.record}: unknown image size (pass --images DIR)")
        new_images.append({"id": next_image, "file_name": c.file_name, "width": width, "height": height})
        for (x1, y1, x2, y2), name, extra in zip(c.boxes, c.labels, c.extra, strict=True):
            if name not in class_of:
                raise UserError(f"{c.record}: unknown class {name!r} (the labeled set has {list(class_of)[:8]})")
            if not (x2 - x1 > 0 and y2 - y1 > 0):
                raise UserError(f"{c.record}: a {name!r} box has non-positive size ({x2 - x1:g} x {y2 - y1:g} px)")
            t = BOX_TOLERANCE_PX
            if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
                raise UserError(f"{c.record}: a {name!r} box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] (xyxy px) lies outside "
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
    write_json_atomic(out, merged)
    return {"images_added": len(new_images), "annotations_added": len(new_anns), "images": len(merged["images"]),
            "annotations": len(merged["annotations"]), "out": str(out)}  # fmt: skip
