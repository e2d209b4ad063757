"""The former ``select`` (before 2026-12-07's streaming rewrite), kept as the reference its output must equal
bit for bit: every candidate of every shard in memory at once, the thresholds by ``count_threshold`` over the
whole array, the json built as one dict. The pure pieces it shares with the stage (the cross-class filter,
the ignore regions, the reference counts, the policies) are the library's, tested on their own."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from datadistill.config import SelectConfig
from datadistill.core import selection
from datadistill.data.coco import Category, CocoDataset, category_to_coco, load_coco, read_json
from datadistill.data.label_folder import read_shards
from datadistill.errors import UserError
from datadistill.runtime.io import provenance
from datadistill.stages.select import check_select_options, cross_class_duplicates, reference_counts, uncertain_regions


def _flat(table: pa.Table, column: str, dtype: Any) -> np.ndarray:
    return np.asarray(pa.compute.list_flatten(table[column]).to_numpy(zero_copy_only=False), dtype=dtype)


def _categories(manifest: dict[str, Any], ref: CocoDataset, labels_dir: Path) -> tuple[Category, ...]:
    names = manifest.get("classes", {}).get("names")
    assert names is None or tuple(names) == ref.class_names
    return ref.categories


def former_select(cfg: SelectConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pseudo-labels and the selection report (without writing them) as the former ``select`` made them:
    the same order of steps as :func:`datadistill.stages.select.select_pseudo_labels` says, on every candidate at
    once."""
    started = time.time()
    labels_dir = Path(cfg.labels)
    policy, fixed = check_select_options(
        policy=cfg.policy, keypoint_policy=cfg.keypoint_policy, ignore_band=cfg.ignore_band,
        cross_class_iou=cfg.cross_class_iou,
    )  # fmt: skip
    manifest = read_json(labels_dir / "manifest.json")
    ref = load_coco(cfg.reference)
    categories = _categories(manifest, ref, labels_dir)
    counts = reference_counts(ref)

    cand = _read_candidates(labels_dir)
    objects = _read_objects(labels_dir, num_keypoints=ref.num_keypoints)
    eligible = cand.agreement >= cfg.min_agreement
    # one class per object before counting: the count rule then counts objects, not class hypotheses (a
    # teacher that lists a box once per class it scores would otherwise fill the count with duplicates)
    duplicates = cross_class_duplicates(
        objects.boxes, cand.scores, cand.labels, cand.image, among=eligible, iou_thr=cfg.cross_class_iou
    )
    counted = eligible & ~duplicates
    sel = _choose_thresholds(
        cand.scores[counted], cand.labels[counted], policy=policy, fixed=fixed, num_images=cand.num_images,
        counts=counts, num_classes=len(categories),
    )  # fmt: skip
    keep = counted & sel.keep(cand.scores, cand.labels)
    kp_thr = None
    if objects.keypoints is not None:
        kp_thr = _keypoint_threshold(objects.keypoints[keep], keypoint_policy=cfg.keypoint_policy, counts=counts)
    ignored = uncertain_regions(
        objects.boxes, cand.scores, cand.labels, cand.image, keep=keep, eligible=counted,
        thresholds=sel.thresholds, band=cfg.ignore_band,
    )  # fmt: skip

    coco = _pseudo_coco(
        cand, objects, keep=keep, ignored=ignored, kp_thr=kp_thr, categories=categories, drop_empty=cfg.drop_empty,
        description=f"datadistill pseudo-labels from {labels_dir}", policy=sel.policy,
    )  # fmt: skip
    report = _selection_report(
        cfg, sel=sel, policy=policy, counts=counts, class_names=ref.class_names, cand=cand, keep=keep,
        duplicates=duplicates, coco=coco, kp_thr=kp_thr, started=started,
    )  # fmt: skip
    return coco, report


@dataclass(frozen=True)
class _Candidates:
    """Every fused candidate of the label shards, in shard order.

    Per candidate ``[N]``: ``scores`` float64, ``labels`` (class indices) and ``agreement`` (views that
    agreed) int64, ``image`` the shard row of its image (sorted). Per shard row ``[R]``: ``ok``, labeled
    without an error.
    """

    scores: np.ndarray
    labels: np.ndarray
    agreement: np.ndarray
    image: np.ndarray
    ok: np.ndarray

    @property
    def num_images(self) -> int:
        """The images labeled without an error."""
        return int(self.ok.sum())


def _read_candidates(labels_dir: Path) -> _Candidates:
    """The columns that choose the thresholds; UserError when no image was labeled."""
    small = read_shards(labels_dir, columns=["scores", "labels", "agreement", "error"])
    ok_rows = np.asarray(small["error"].is_null().to_numpy(zero_copy_only=False))
    if int(ok_rows.sum()) == 0:
        raise UserError(f"{labels_dir}: no image was labeled (all skipped?)")
    lengths = np.asarray(pa.compute.list_value_length(small["scores"]).to_numpy(zero_copy_only=False), np.int64)
    return _Candidates(
        scores=_flat(small, "scores", np.float64),
        labels=_flat(small, "labels", np.int64),
        agreement=_flat(small, "agreement", np.int64),
        image=np.repeat(np.arange(len(lengths)), lengths),
        ok=ok_rows,
    )


def _choose_thresholds(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    policy: str,
    fixed: float | None,
    num_images: int,
    counts: dict[str, Any],
    num_classes: int,
) -> selection.Selection:
    """The thresholds of ``policy`` over the eligible candidates' ``scores`` and ``labels`` ``[M]``: the
    labeled mean number of objects per image (``count``), per class (``count-per-class``), or ``fixed``."""
    if policy == "count":
        return selection.select_count(
            scores, labels, num_images=num_images, per_image=counts["per_image"], num_classes=num_classes
        )
    if policy == "count-per-class":
        return selection.select_count_per_class(
            scores, labels, num_images=num_images, per_image=np.asarray(counts["per_class_per_image"]),
            num_classes=num_classes,
        )  # fmt: skip
    return selection.select_fixed(scores, labels, threshold=float(fixed), num_classes=num_classes)


@dataclass(frozen=True)
class _Objects:
    """What is written of each candidate and image: boxes ``[N, 4]`` xyxy px, keypoints ``[N, K, 3]`` (or
    None), and per shard row ``[R]`` its file name, width and height."""

    boxes: np.ndarray
    keypoints: np.ndarray | None
    file_names: list[str]
    widths: np.ndarray
    heights: np.ndarray


def _read_objects(labels_dir: Path, *, num_keypoints: int) -> _Objects:
    """The columns that are written (boxes, keypoints, image names and sizes)."""
    columns = ["file_name", "width", "height", "boxes", "error"] + (["keypoints"] if num_keypoints else [])
    big = read_shards(labels_dir, columns=columns)
    return _Objects(
        boxes=_flat(big, "boxes", np.float64).reshape(-1, 4),
        keypoints=_flat(big, "keypoints", np.float64).reshape(-1, num_keypoints, 3) if num_keypoints else None,
        file_names=big["file_name"].to_pylist(),
        widths=big["width"].to_numpy(),
        heights=big["height"].to_numpy(),
    )


def _keypoint_threshold(kept_keypoints: np.ndarray, *, keypoint_policy: str, counts: dict[str, Any]) -> float:
    """The keypoint score from which a kept object's keypoint is written visible; ``-inf`` (all) for
    ``keypoint_policy`` ``all`` or a reference without visible keypoints. ``kept_keypoints``: ``[M, K, 3]``."""
    kp_fraction = selection.parse_keypoint_policy(keypoint_policy)
    if kp_fraction is not None and counts["visible_keypoints_per_instance"] is not None:
        return selection.keypoint_threshold(
            kept_keypoints[..., 2], visible_per_instance=kp_fraction * counts["visible_keypoints_per_instance"]
        )
    return -np.inf


def _pseudo_coco(
    cand: _Candidates,
    objects: _Objects,
    *,
    keep: np.ndarray,
    ignored: np.ndarray,
    kp_thr: float | None,
    categories: tuple[Category, ...],
    drop_empty: bool,
    description: str,
    policy: str,
) -> dict[str, Any]:
    """The pseudo-labeled COCO json: kept objects and ignore regions (``iscrowd: 1``, no visible keypoints)
    with their ``score`` and ``agreement``, on the images labeled without an error (those with no kept
    object left out when ``drop_empty``). Ids count up from 1 in shard order."""
    kept_per_image = np.bincount(cand.image[keep], minlength=len(cand.ok))
    images, image_ids = [], {}
    for row in range(len(cand.ok)):
        if not cand.ok[row] or (drop_empty and kept_per_image[row] == 0):
            continue
        image_ids[row] = len(images) + 1
        images.append({"id": len(images) + 1, "file_name": objects.file_names[row], "width": int(objects.widths[row]),
                       "height": int(objects.heights[row])})  # fmt: skip
    cat_ids = [c.id for c in categories]
    annotations = []
    idx = np.flatnonzero(keep | ignored)  # objects and ignore regions, in shard order
    for ann_id, j in enumerate((int(j) for j in idx if cand.image[j] in image_ids), 1):
        x1, y1, x2, y2 = (float(v) for v in objects.boxes[j])
        crowd = bool(ignored[j])
        ann: dict[str, Any] = {
            "id": ann_id, "image_id": image_ids[int(cand.image[j])], "category_id": cat_ids[int(cand.labels[j])],
            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": int(crowd),
            "score": float(cand.scores[j]), "agreement": int(cand.agreement[j]),
        }  # fmt: skip
        if objects.keypoints is not None:
            k = objects.keypoints[j].copy()
            vis = (k[:, 2] >= kp_thr) & (not crowd)
            k[:, 2] = np.where(vis, 2.0, 0.0)
            k[~vis, :2] = 0.0
            ann["keypoints"] = k.reshape(-1).tolist()
            ann["num_keypoints"] = int(vis.sum())
        annotations.append(ann)
    return {"images": images, "annotations": annotations, "categories": [category_to_coco(c) for c in categories],
            "info": {"description": description, "policy": policy}}  # fmt: skip


def _selection_report(
    cfg: SelectConfig,
    *,
    sel: selection.Selection,
    policy: str,
    counts: dict[str, Any],
    class_names: tuple[str, ...],
    cand: _Candidates,
    keep: np.ndarray,
    duplicates: np.ndarray,
    coco: dict[str, Any],
    kp_thr: float | None,
    started: float,
) -> dict[str, Any]:
    """``selection.json``: the thresholds chosen, the targets and what was achieved, the options."""
    achieved_total = int(keep.sum())
    kept_per_image = np.bincount(cand.image[keep], minlength=len(cand.ok))
    annotations = coco["annotations"]
    return {
        "policy": sel.policy,
        "min_agreement": cfg.min_agreement,
        "thresholds": {
            name: (None if not np.isfinite(t) else float(t))
            for name, t in zip(class_names, sel.thresholds, strict=True)
        },
        "target_per_image": counts["per_image"] if policy == "count" else None,
        "target_per_class_per_image": dict(zip(class_names, counts["per_class_per_image"], strict=True)),
        "target_objects": None if sel.target is None else sel.target.tolist(),
        "achieved_objects": achieved_total,
        "achieved_per_class": dict(
            zip(class_names, np.bincount(cand.labels[keep], minlength=len(class_names)).tolist(), strict=True)
        ),
        "cross_class_iou": cfg.cross_class_iou,
        "cross_class_duplicates": int(duplicates.sum()),  # eligible candidates, before the threshold
        "achieved_per_image": achieved_total / cand.num_images,
        "unlabeled_images": cand.num_images,
        "images_written": len(coco["images"]),
        "empty_images_kept": int(((kept_per_image == 0) & cand.ok).sum()) if not cfg.drop_empty else 0,
        "candidates": int(cand.scores.size),
        "keypoint_threshold": None if kp_thr is None or not np.isfinite(kp_thr) else float(kp_thr),
        "reference_visible_keypoints_per_instance": counts["visible_keypoints_per_instance"],
        "pseudo_visible_keypoints_per_instance": (
            float(np.mean([a["num_keypoints"] for a in annotations if not a["iscrowd"]]))
            if kp_thr is not None and keep.any()
            else None
        ),
        "ignore_band": cfg.ignore_band,
        "ignore_regions": sum(a["iscrowd"] for a in annotations),  # those written (drop_empty drops some)
        "options": asdict(cfg),
        "seconds": round(time.time() - started, 3),
        "provenance": provenance(),
    }
