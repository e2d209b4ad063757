"""The ``select`` stage: label shards + the labeled reference -> a pseudo-labeled COCO json.

Reads the labeling folder one shard at a time, only the columns each pass needs (scores, labels, agreement
and boxes to choose the thresholds; keypoints and image names to write the kept objects), vectorised over a
shard's objects: memory does not grow with the number of images (``bench/scale.py``).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numba
import numpy as np
import pyarrow as pa
import torch
from torchvision.ops import box_iou

from datadistill.config import SelectConfig
from datadistill.core import selection
from datadistill.data.coco import Category, CocoDataset, category_to_coco, load_coco
from datadistill.data.label_folder import (
    LabelFolder,
    check_lengths,
    flat_values,
    list_lengths,
    open_label_folder,
    read_shard,
)
from datadistill.data.label_table import TABLE_NAME, LabelTableWriter
from datadistill.errors import UserError
from datadistill.runtime.io import atomic_file, provenance, remove_temporaries, write_atomic, write_json_atomic

log = logging.getLogger(__name__)


def reference_counts(ref: CocoDataset) -> dict[str, Any]:
    """Mean objects per labeled image (all and per class, crowd excluded) and mean visible keypoints."""
    n_images = len(ref.images)
    if n_images == 0:
        raise UserError(f"{ref.path}: the reference data set has no images")
    per_class = np.zeros(ref.num_classes)
    visible = instances = 0
    for lab in ref.labels.values():
        keep = ~lab.iscrowd
        per_class += np.bincount(lab.labels[keep], minlength=ref.num_classes)
        if lab.keypoints is not None:
            visible += int((lab.keypoints[keep][..., 2] > 0).sum())
            instances += int(keep.sum())
    return {
        "images": n_images,
        "per_image": float(per_class.sum() / n_images),
        "per_class_per_image": (per_class / n_images).tolist(),
        "visible_keypoints_per_instance": visible / instances if instances else None,
    }


def _categories(folder: LabelFolder, ref: CocoDataset) -> tuple[Category, ...]:
    names = folder.class_names
    if names is not None and names != ref.class_names:
        raise UserError(
            f"{folder.path} was labeled by a model for classes {list(names[:5])}... but {ref.path} has "
            f"{list(ref.class_names[:5])}...; label with a checkpoint trained on this data"
        )
    return ref.categories


def _plot_histogram(path: Path, counts: np.ndarray, thresholds: np.ndarray, policy: str) -> None:
    """The counted candidates' scores: ``counts`` ``[SCORE_BINS]`` over ``[0, 1]``, with the thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.stairs(counts, np.linspace(0.0, 1.0, SCORE_BINS + 1), fill=True, color="#4c72b0")
    finite = np.unique(thresholds[np.isfinite(thresholds)])
    for t in finite:
        ax.axvline(t, color="#c44e52", lw=1.5)
    label = f"threshold {finite[0]:.3f}" if len(finite) == 1 else f"{len(finite)} per-class thresholds"
    ax.set(xlabel="fused score", ylabel="objects", title=f"pseudo-label scores ({policy}: {label})")
    if counts.any():
        ax.set_yscale("log")
    fig.tight_layout()
    buf = io.BytesIO()  # drawn in memory, then written whole: a kill never leaves half a png
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(path, lambda f: f.write(buf.getvalue()))


# An uncertain candidate that overlaps a kept object this much is that object seen again (another class,
# a looser box), not an object of its own: it is not made an ignore region.
SAME_OBJECT_IOU = 0.5


def uncertain_regions(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    image_of_object: np.ndarray,
    *,
    keep: np.ndarray,
    eligible: np.ndarray,
    thresholds: np.ndarray,
    band: float,
) -> np.ndarray:
    """``[N]`` bool: the candidates to write as ignore regions (``iscrowd: 1``).

    Those that scored in ``[band * threshold, threshold)`` of their class, minus those that overlap a kept
    object of their image by IoU >= :data:`SAME_OBJECT_IOU`. A teacher's near misses are as often true
    objects as not; as ignore regions the student learns them neither as objects nor as background.
    ``band`` 0 gives none (the paper: every candidate is an object or background).
    """
    out = np.zeros(scores.shape, bool)
    if band == 0.0 or scores.size == 0:
        return out
    t = thresholds[labels]
    candidates = np.flatnonzero(eligible & ~keep & np.isfinite(t) & (scores >= band * t))
    if candidates.size == 0:
        return out
    # the candidates grouped by image, and the kept objects of each of those images (image_of_object is
    # sorted: objects come in shard order)
    kept = np.flatnonzero(keep)
    images = np.unique(image_of_object[candidates])
    starts = np.searchsorted(image_of_object[kept], images, side="left")
    ends = np.searchsorted(image_of_object[kept], images, side="right")
    groups = np.split(candidates, np.flatnonzero(np.diff(image_of_object[candidates])) + 1)
    for group, lo, hi in zip(groups, starts, ends, strict=True):
        mine = torch.from_numpy(boxes[group])
        theirs = torch.from_numpy(boxes[kept[lo:hi]])
        if len(theirs):
            overlaps = box_iou(mine, theirs).max(dim=1).values.numpy() >= SAME_OBJECT_IOU
            group = group[~overlaps]
        out[group] = True
    return out


def cross_class_duplicates(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    image_of_object: np.ndarray,
    *,
    among: np.ndarray,
    iou_thr: float,
) -> np.ndarray:
    """``[N]`` bool: the objects of ``among`` (``[N]`` bool) that are another object of ``among`` seen as
    another class.

    Greedy NMS across classes within each image, in score order (equal scores in the order given): an object
    is a duplicate when a higher-scoring object of another class, not itself a duplicate, overlaps it by
    IoU >= ``iou_thr`` (torchvision's ``box_iou``). Per-class fusion (the paper's NMS) keeps one box per
    class, so an object the teacher hesitates on comes out once per class it considered; a true label has
    one class. ``boxes`` ``[N, 4]`` xyxy px; ``image_of_object`` ``[N]`` any image key. 0: none. With one
    threshold for every class, dropping the duplicates and then thresholding gives what thresholding and then
    dropping them gives (a duplicate's suppressor scores higher). A compiled loop: 0.4 s for a million
    candidates on 20,000 images (``bench/select_speed.py``).
    """
    out = np.zeros(scores.shape, bool)
    if iou_thr == 0.0:
        return out
    idx = np.flatnonzero(among)
    if idx.size < 2 or labels[idx].min() == labels[idx].max():  # one class (keypoint tasks): nothing to do
        return out
    idx = idx[np.argsort(-scores[idx], kind="stable")]
    idx = idx[np.argsort(image_of_object[idx], kind="stable")]  # each image's objects together, best first
    image = image_of_object[idx]
    bounds = np.flatnonzero(np.concatenate(([True], image[1:] != image[:-1], [True]))).astype(np.int64)
    dropped = _cross_class_loop(
        np.ascontiguousarray(boxes[idx], dtype=np.float64), labels[idx].astype(np.int64), bounds, float(iou_thr)
    )
    out[idx[dropped]] = True
    return out


@numba.njit(cache=True, nogil=True)
def _cross_class_loop(boxes: np.ndarray, labels: np.ndarray, bounds: np.ndarray, iou_thr: float) -> np.ndarray:
    """:func:`cross_class_duplicates` over the images ``bounds[g]:bounds[g + 1]`` of objects sorted by
    score within each; IoU computed as torchvision's ``box_iou`` computes it (0/0 counts as no overlap)."""
    dropped = np.zeros(boxes.shape[0], np.bool_)
    for g in range(bounds.shape[0] - 1):
        for i in range(bounds[g], bounds[g + 1]):
            if dropped[i]:
                continue
            area_i = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
            for j in range(i + 1, bounds[g + 1]):
                if dropped[j] or labels[j] == labels[i]:
                    continue
                w = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
                h = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
                inter = max(w, 0.0) * max(h, 0.0)
                union = area_i + (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1]) - inter
                if union > 0.0 and inter / union >= iou_thr:
                    dropped[j] = True
    return dropped


def check_select_options(
    *,
    policy: str,
    keypoint_policy: str = "count",
    ignore_band: float = 0.0,
    cross_class_iou: float = 0.0,
) -> tuple[str, float | None]:
    """The selection options that need no data, checked (one-line :class:`UserError`); returns the parsed
    policy ``(name, fixed threshold or None)``. ``run`` calls it before training anything."""
    try:
        parsed = selection.parse_policy(policy)
    except ValueError as exc:
        raise UserError(f"--policy: {exc}") from exc
    try:
        selection.parse_keypoint_policy(keypoint_policy)
    except ValueError as exc:
        raise UserError(f"--keypoint-policy {exc}") from exc
    if not 0.0 <= ignore_band < 1.0:
        raise UserError(f"--ignore-band must be in [0, 1), got {ignore_band}")
    if not 0.0 <= cross_class_iou <= 1.0:
        raise UserError(f"--cross-class-iou must be in [0, 1] (0: off), got {cross_class_iou}")
    return parsed


def select_pseudo_labels(cfg: SelectConfig) -> Path:
    """The ``select`` stage; writes ``cfg.out`` (COCO json with ``score`` and ``agreement``),
    ``selection.json`` and ``scores.png`` beside it. Returns the json path.

    In order: the eligible candidates (agreement >= ``min_agreement``); among them the cross-class duplicates
    (:func:`cross_class_duplicates`, ``cross_class_iou`` 0: none) are dropped; the policy's thresholds are
    chosen on what is left, so that ``count`` and ``count-per-class`` count objects, each under its
    best-scoring class, not class hypotheses. With ``fixed:T`` (one threshold) the order changes nothing.
    With ``count-per-class`` an object whose best class falls below that class's threshold is not kept under
    a runner-up class either. Ignore regions come from the same survivors; ``selection.json``'s
    ``cross_class_duplicates`` counts the candidates dropped, above the threshold or not.

    Memory stays flat in the number of images: the shards are read one at a time, a few times over
    (:class:`_Scan`: the candidates and what they count; a second pass for the count rule's exact
    threshold, :func:`datadistill.core.selection.count_thresholds_streamed`; two more for a keypoint
    threshold; the last writes), and the json is written as it goes (:func:`_write_pseudo_labels`). What is
    kept grows with the images only by one bit per candidate (which of them the count rule counts).
    """
    started = time.time()
    policy, fixed = check_select_options(
        policy=cfg.policy, keypoint_policy=cfg.keypoint_policy, ignore_band=cfg.ignore_band,
        cross_class_iou=cfg.cross_class_iou,
    )  # fmt: skip
    folder = open_label_folder(cfg.labels)
    ref = load_coco(cfg.reference)
    out = Path(cfg.out)
    remove_temporaries(out.parent, (out.name, "selection.json", "scores.png", TABLE_NAME))  # of a kill
    categories = _categories(folder, ref)
    counts = reference_counts(ref)
    num_classes = len(categories)

    scan = _scan(folder, cfg=cfg, policy=policy, num_classes=num_classes, num_keypoints=ref.num_keypoints)
    thresholds, targets = _thresholds(folder, scan, policy=policy, fixed=fixed, counts=counts)
    kp_thr = None
    if ref.num_keypoints:
        kp_thr = _keypoint_threshold(
            scan, thresholds, keypoint_policy=cfg.keypoint_policy, counts=counts, num_keypoints=ref.num_keypoints
        )
    info = {"description": f"datadistill pseudo-labels from {cfg.labels}", "policy": _policy_name(policy, fixed)}
    with (
        atomic_file(out) as f,
        LabelTableWriter(out.parent / TABLE_NAME, categories=categories, num_keypoints=ref.num_keypoints,
                         info=info) as table_writer,
    ):  # fmt: skip
        written = _write_pseudo_labels(
            folder, scan, f, table_writer, thresholds=thresholds, kp_thr=kp_thr, categories=categories, info=info,
            cfg=cfg, num_keypoints=ref.num_keypoints,
        )  # fmt: skip
        report = _selection_report(
            cfg, policy=policy, policy_name=info["policy"], thresholds=thresholds, targets=targets, counts=counts,
            class_names=ref.class_names, scan=scan, written=written, kp_thr=kp_thr, started=started,
        )  # fmt: skip
        write_json_atomic(out.parent / "selection.json", report, indent=2)
        _plot_histogram(out.parent / "scores.png", scan.score_bins, thresholds, info["policy"])
        # the block's end closes the label table (the inner writer), then renames the json into place last:
        # it marks the stage done (`run` skips it then), so it follows what goes beside it
    log.info(
        "kept %d of %d candidates (%d cross-class duplicates dropped; %.2f per image, target %.2f) on %d "
        "images with %s", written.kept, scan.candidates, scan.duplicates, written.kept / scan.num_images,
        counts["per_image"], scan.num_images, info["policy"],
    )  # fmt: skip
    return out


def _policy_name(policy: str, fixed: float | None) -> str:
    return f"fixed:{fixed:g}" if policy == "fixed" else policy


SCORE_BINS = 50  # the histogram of scores.png, over [0, 1]
_SCAN_COLUMNS = ["scores", "labels", "agreement", "boxes", "error"]


@dataclass(frozen=True)
class _Scan:
    """What the first pass over the shards leaves. Per shard (in :meth:`LabelFolder.shard_files` order):
    ``counted`` the candidates the count rule counts (eligible and not a cross-class duplicate), bit-packed.
    In all: ``num_images`` labeled without an error, ``candidates``, ``duplicates`` (eligible candidates
    dropped as another class's), ``score_bins`` ``[SCORE_BINS]`` the counted scores' histogram, and
    ``first`` the count rule's first-pass counts (one group, or one per class; None for ``fixed``)."""

    shards: list[Path]
    counted: list[np.ndarray]
    num_images: int
    candidates: int
    duplicates: int
    score_bins: np.ndarray
    first: selection.ScoreCounts | None

    def counted_mask(self, shard: int, size: int) -> np.ndarray:
        return np.unpackbits(self.counted[shard], count=size).astype(bool)


def _read_checked(part: Path, columns: list[str], *, num_classes: int, num_keypoints: int = 0) -> pa.Table:
    """A shard's ``columns``, checked for what selection relies on (:func:`check_shard`): one value per object
    in every list (four per box, ``3K`` keypoint values), finite scores and boxes, labels of the data set's
    classes, and the data set's ``num_keypoints``."""
    table = read_shard(part, columns=columns, num_classes=num_classes)
    check_lengths(table, part, {"keypoints": 3 * num_keypoints})
    return table


def _scan(folder: LabelFolder, *, cfg: SelectConfig, policy: str, num_classes: int, num_keypoints: int) -> _Scan:
    """The first pass (:class:`_Scan`), one shard at a time, each shard checked (:func:`_read_checked`)."""
    shards = folder.shard_files()
    first = selection.ScoreCounts(num_classes if policy == "count-per-class" else 1) if policy != "fixed" else None
    counted_bits, bins = [], np.zeros(SCORE_BINS, np.int64)
    num_images = candidates = duplicates = 0
    for part in shards:
        columns = _SCAN_COLUMNS + (["keypoints"] if num_keypoints else [])
        table = _read_checked(part, columns, num_classes=num_classes, num_keypoints=num_keypoints)
        lengths = list_lengths(table)
        scores, labels = flat_values(table, "scores", np.float64), flat_values(table, "labels", np.int64)
        agreement = flat_values(table, "agreement", np.int64)
        image = np.repeat(np.arange(len(lengths)), lengths)
        eligible = agreement >= cfg.min_agreement
        # one class per object before counting: the count rule then counts objects, not class hypotheses (a
        # teacher that lists a box once per class it scores would otherwise fill the count with duplicates)
        dup = cross_class_duplicates(flat_values(table, "boxes", np.float64).reshape(-1, 4), scores, labels, image,
                                     among=eligible, iou_thr=cfg.cross_class_iou)  # fmt: skip
        counted = eligible & ~dup
        counted_bits.append(np.packbits(counted))
        num_images += int(table["error"].is_null().to_numpy(zero_copy_only=False).sum())
        candidates, duplicates = candidates + len(scores), duplicates + int(dup.sum())
        bins += np.histogram(scores[counted], bins=SCORE_BINS, range=(0.0, 1.0))[0]
        if first is not None:
            first.add(scores[counted], labels[counted] if policy == "count-per-class" else np.zeros(int(counted.sum())))
    if num_images == 0:
        raise UserError(f"{folder.path}: no image was labeled (all skipped?)")
    return _Scan(shards=shards, counted=counted_bits, num_images=num_images, candidates=candidates,
                 duplicates=duplicates, score_bins=bins, first=first)  # fmt: skip


def _thresholds(
    folder: LabelFolder, scan: _Scan, *, policy: str, fixed: float | None, counts: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray | None]:
    """``[C]`` the per-class thresholds of ``policy`` over the counted candidates, and the target counts
    (``[1]`` for ``count``, ``[C]`` for ``count-per-class``, None for ``fixed``): the labeled mean number of
    objects per image (all, or per class) times the images labeled."""
    num_classes = len(counts["per_class_per_image"])
    if policy == "fixed":
        return np.full(num_classes, float(fixed)), None  # type: ignore[arg-type]
    assert scan.first is not None
    if policy == "count":
        targets = np.array([int(round(counts["per_image"] * scan.num_images))])
    else:
        targets = np.round(np.asarray(counts["per_class_per_image"], np.float64) * scan.num_images).astype(np.int64)
    buckets = selection.boundary_buckets(scan.first, targets)
    second = None
    if (buckets >= 0).any():
        second = selection.ScoreCounts(scan.first.num_groups, buckets=buckets)
        for k, part in enumerate(scan.shards):
            table = read_shard(part, columns=["scores", "labels"])
            scores, labels = flat_values(table, "scores", np.float64), flat_values(table, "labels", np.int64)
            counted = scan.counted_mask(k, len(scores))
            groups = labels[counted] if policy == "count-per-class" else np.zeros(int(counted.sum()), np.int64)
            second.add(scores[counted], groups)
    found = selection.thresholds_from_counts(scan.first, second, targets)
    return (np.full(num_classes, found[0]) if policy == "count" else found), targets


def _kept(table: pa.Table, scan: _Scan, shard: int, thresholds: np.ndarray) -> np.ndarray:
    """``[N]`` the shard's kept candidates: counted, and scoring at least their class's threshold."""
    scores, labels = flat_values(table, "scores", np.float64), flat_values(table, "labels", np.int64)
    return scan.counted_mask(shard, len(scores)) & (scores >= thresholds[labels])


def _keypoint_threshold(
    scan: _Scan, thresholds: np.ndarray, *, keypoint_policy: str, counts: dict[str, Any], num_keypoints: int
) -> float:
    """The keypoint score from which a kept object's keypoint is written visible
    (:func:`datadistill.core.selection.keypoint_threshold` over the kept objects' keypoints, in two passes);
    ``-inf`` (all) for ``keypoint_policy`` ``all`` or a reference without visible keypoints."""
    kp_fraction = selection.parse_keypoint_policy(keypoint_policy)
    if kp_fraction is None or counts["visible_keypoints_per_instance"] is None:
        return -np.inf
    visible_per_instance = kp_fraction * counts["visible_keypoints_per_instance"]

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for k, part in enumerate(scan.shards):
            table = read_shard(part, columns=["scores", "labels", "keypoints"])
            keep = _kept(table, scan, k, thresholds)
            kps = flat_values(table, "keypoints", np.float64).reshape(len(keep), num_keypoints, 3)[keep]
            yield kps[..., 2].reshape(-1), np.zeros(kps[..., 2].size, np.int64)

    # the kept objects' keypoint scores, K per object: the target follows from their number (first pass)
    def target(first: selection.ScoreCounts) -> np.ndarray:
        num_kept = int(first.total[0]) // num_keypoints
        return np.array([int(round(visible_per_instance * num_kept))])

    return float(selection.count_thresholds_streamed(chunks, target, num_groups=1)[0])


@dataclass
class _Written:
    """Running counts of what :func:`_write_pseudo_labels` wrote (mutable: it accumulates)."""

    num_classes: int
    kept: int = 0
    images: int = 0
    empty_images: int = 0
    ignore_regions: int = 0
    visible_keypoints: int = 0
    per_class: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.per_class = np.zeros(self.num_classes, np.int64)


def _write_pseudo_labels(
    folder: LabelFolder,
    scan: _Scan,
    f: IO[bytes],
    table_writer: LabelTableWriter,
    *,
    thresholds: np.ndarray,
    kp_thr: float | None,
    categories: tuple[Category, ...],
    info: dict[str, Any],
    cfg: SelectConfig,
    num_keypoints: int,
) -> _Written:
    """The last pass: the pseudo-labeled COCO json into ``f`` and the same images and objects into
    ``table_writer`` (a row group per shard), one shard at a time. Kept objects and ignore
    regions (``iscrowd: 1``, no visible keypoints; :func:`uncertain_regions`) with their ``score`` and
    ``agreement``, on the images labeled without an error (those with no kept object left out when
    ``drop_empty``); ids count up from 1 in shard order. The json is ``{"images": [...], "annotations":
    [...], "categories": [...], "info": {...}}`` as ``json.dumps`` writes it: the annotations go to a
    temporary file beside it while the images are written, and are copied in after them."""
    written = _Written(len(categories))
    cat_ids = [c.id for c in categories]
    columns = ["file_name", "width", "height", "boxes", "scores", "labels", "agreement", "error"]
    columns += ["keypoints"] if num_keypoints else []
    out = Path(cfg.out)
    with tempfile.TemporaryFile(dir=out.parent) as annotations:
        f.write(b'{"images": [')
        image_sep = ann_sep = b""
        for k, part in enumerate(scan.shards):
            table = read_shard(part, columns=columns)
            shard = _shard_selection(table, scan, k, thresholds=thresholds, band=cfg.ignore_band,
                                     drop_empty=cfg.drop_empty, first_id=written.images + 1)  # fmt: skip
            for row, image_id in zip(shard.image_rows, shard.image_ids, strict=True):
                im = {"id": int(image_id), "file_name": shard.file_names[row], "width": int(shard.widths[row]),
                      "height": int(shard.heights[row])}  # fmt: skip
                f.write(image_sep + json.dumps(im).encode())
                image_sep = b", "
            for ann in _annotations(shard, table, cat_ids, kp_thr=kp_thr, first_id=written.kept
                                    + written.ignore_regions + 1, num_keypoints=num_keypoints):  # fmt: skip
                annotations.write(ann_sep + json.dumps(ann, allow_nan=False).encode())
                ann_sep = b", "
                written.visible_keypoints += ann.get("num_keypoints", 0) if not ann["iscrowd"] else 0
            _write_table_rows(table_writer, shard, table, kp_thr=kp_thr, num_keypoints=num_keypoints)
            written.kept += int(shard.keep.sum())
            written.ignore_regions += int(shard.written_ignored)
            written.images += len(shard.image_rows)
            written.empty_images += shard.empty_images
            written.per_class += np.bincount(shard.labels[shard.keep], minlength=len(categories))
        f.write(b'], "annotations": [')
        annotations.seek(0)
        shutil.copyfileobj(annotations, f, 1 << 20)
    tail = {"categories": [category_to_coco(c) for c in categories], "info": info}
    f.write(b"], " + json.dumps(tail)[1:].encode())
    return written


def _write_table_rows(
    writer: LabelTableWriter, shard: _ShardSelection, table: pa.Table, *, kp_thr: float | None, num_keypoints: int
) -> None:
    """The shard's written images and their objects (kept and ignore regions, in shard order, as the json
    has them: keypoints visible 2 from ``kp_thr`` on, else 0, 0, 0) as one row group of the label table."""
    written_rows = np.zeros(len(shard.file_names), bool)
    written_rows[shard.image_rows] = True
    objs = np.flatnonzero((shard.keep | shard.ignored) & written_rows[shard.image])
    counts = np.bincount(shard.image[objs], minlength=len(shard.file_names))[shard.image_rows]
    crowd = shard.ignored[objs]
    keypoints = None
    if num_keypoints:
        keypoints = flat_values(table, "keypoints", np.float64).reshape(-1, num_keypoints, 3)[objs]
        visible = (keypoints[..., 2] >= kp_thr) & ~crowd[:, None]
        keypoints[..., 2] = np.where(visible, 2.0, 0.0)
        keypoints[~visible, :2] = 0.0
    writer.write(
        [shard.file_names[r] for r in shard.image_rows], shard.widths[shard.image_rows],
        shard.heights[shard.image_rows], counts, flat_values(table, "boxes", np.float64).reshape(-1, 4)[objs],
        shard.labels[objs], crowd, flat_values(table, "scores", np.float64)[objs],
        flat_values(table, "agreement", np.int64)[objs], keypoints,
    )  # fmt: skip


@dataclass(frozen=True)
class _ShardSelection:
    """One shard's selection: per candidate ``[N]`` ``keep``, ``ignored`` (written as ignore regions),
    ``labels``, ``image`` (its row); per row ``[R]`` the names and sizes; the rows written (``image_rows``)
    and their new ids; ``empty_images`` written without a kept object; ``written_ignored``."""

    keep: np.ndarray
    ignored: np.ndarray
    labels: np.ndarray
    image: np.ndarray
    file_names: list[str]
    widths: np.ndarray
    heights: np.ndarray
    image_rows: np.ndarray
    image_ids: np.ndarray
    empty_images: int
    written_ignored: int


def _shard_selection(
    table: pa.Table, scan: _Scan, shard: int, *, thresholds: np.ndarray, band: float, drop_empty: bool, first_id: int
) -> _ShardSelection:
    lengths = list_lengths(table)
    scores, labels = flat_values(table, "scores", np.float64), flat_values(table, "labels", np.int64)
    image = np.repeat(np.arange(len(lengths)), lengths)
    counted = scan.counted_mask(shard, len(scores))
    keep = counted & (scores >= thresholds[labels])
    boxes = flat_values(table, "boxes", np.float64).reshape(-1, 4)
    ignored = uncertain_regions(boxes, scores, labels, image, keep=keep, eligible=counted, thresholds=thresholds,
                                band=band)  # fmt: skip
    ok = np.asarray(table["error"].is_null().to_numpy(zero_copy_only=False), bool)
    kept_per_image = np.bincount(image[keep], minlength=len(lengths))
    rows = np.flatnonzero(ok & ((kept_per_image > 0) | (not drop_empty)))
    on_written = np.zeros(len(lengths), bool)
    on_written[rows] = True
    return _ShardSelection(
        keep=keep, ignored=ignored, labels=labels, image=image, file_names=table["file_name"].to_pylist(),
        widths=table["width"].to_numpy(), heights=table["height"].to_numpy(), image_rows=rows,
        image_ids=np.arange(first_id, first_id + len(rows)),
        empty_images=0 if drop_empty else int(((kept_per_image == 0) & ok).sum()),
        written_ignored=int((ignored & on_written[image]).sum()),
    )  # fmt: skip


def _annotations(
    shard: _ShardSelection,
    table: pa.Table,
    cat_ids: list[int],
    *,
    kp_thr: float | None,
    first_id: int,
    num_keypoints: int,
) -> Iterator[dict[str, Any]]:
    """The shard's kept objects and ignore regions on written images, in shard order, as COCO annotations."""
    boxes = flat_values(table, "boxes", np.float64).reshape(-1, 4)
    scores, agreement = flat_values(table, "scores", np.float64), flat_values(table, "agreement", np.int64)
    keypoints = flat_values(table, "keypoints", np.float64).reshape(-1, num_keypoints, 3) if num_keypoints else None
    image_id = np.zeros(len(shard.file_names), np.int64)
    image_id[shard.image_rows] = shard.image_ids
    for ann_id, j in enumerate((int(j) for j in np.flatnonzero(shard.keep | shard.ignored)
                                if image_id[shard.image[j]] > 0), first_id):  # fmt: skip
        x1, y1, x2, y2 = (float(v) for v in boxes[j])
        crowd = bool(shard.ignored[j])
        ann: dict[str, Any] = {
            "id": ann_id, "image_id": int(image_id[shard.image[j]]), "category_id": cat_ids[int(shard.labels[j])],
            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": int(crowd),
            "score": float(scores[j]), "agreement": int(agreement[j]),
        }  # fmt: skip
        if keypoints is not None:
            kp = keypoints[j].copy()
            vis = (kp[:, 2] >= kp_thr) & (not crowd)
            kp[:, 2] = np.where(vis, 2.0, 0.0)
            kp[~vis, :2] = 0.0
            ann["keypoints"] = kp.reshape(-1).tolist()
            ann["num_keypoints"] = int(vis.sum())
        yield ann


def _selection_report(
    cfg: SelectConfig,
    *,
    policy: str,
    policy_name: str,
    thresholds: np.ndarray,
    targets: np.ndarray | None,
    counts: dict[str, Any],
    class_names: tuple[str, ...],
    scan: _Scan,
    written: _Written,
    kp_thr: float | None,
    started: float,
) -> dict[str, Any]:
    """``selection.json``: the thresholds chosen, the targets and what was achieved, the options."""
    return {
        "policy": policy_name,
        "min_agreement": cfg.min_agreement,
        "thresholds": {
            name: (None if not np.isfinite(t) else float(t)) for name, t in zip(class_names, thresholds, strict=True)
        },
        "target_per_image": counts["per_image"] if policy == "count" else None,
        "target_per_class_per_image": dict(zip(class_names, counts["per_class_per_image"], strict=True)),
        "target_objects": None if targets is None else targets.tolist(),
        "achieved_objects": written.kept,
        "achieved_per_class": dict(zip(class_names, written.per_class.tolist(), strict=True)),
        "cross_class_iou": cfg.cross_class_iou,
        "cross_class_duplicates": scan.duplicates,  # eligible candidates, before the threshold
        "achieved_per_image": written.kept / scan.num_images,
        "unlabeled_images": scan.num_images,
        "images_written": written.images,
        "empty_images_kept": written.empty_images,
        "candidates": scan.candidates,
        "keypoint_threshold": None if kp_thr is None or not np.isfinite(kp_thr) else float(kp_thr),
        "reference_visible_keypoints_per_instance": counts["visible_keypoints_per_instance"],
        "pseudo_visible_keypoints_per_instance": (
            written.visible_keypoints / written.kept if kp_thr is not None and written.kept else None
        ),
        "ignore_band": cfg.ignore_band,
        "ignore_regions": written.ignore_regions,  # those written (drop_empty drops some)
        "options": asdict(cfg),
        "seconds": round(time.time() - started, 3),
        "provenance": provenance(),
    }
