"""COCO evaluation: box AP and keypoint AP through faster-coco-eval (pycocotools' numbers, in C++).

The metrics of one evaluation are a dict per task, values as fractions in [0, 1], ``None`` where COCO
has nothing to average (no ground truth in a size range; COCO's summaries say -1 there)::

    {"bbox": {"AP": 0.505, "AP50": ..., ...}, "keypoints": {"AP": ..., ...}}

``bbox`` keys are COCO's 12 box summaries, in COCO's order (:data:`BBOX_KEYS`): AP over IoU 0.50:0.95,
at 0.50 and 0.75, AP for small/medium/large objects, AR at 1, 10 and 100 detections per image, AR for
small/medium/large. ``keypoints`` keys are COCO's 10 keypoint summaries (:data:`KEYPOINT_KEYS`): COCO's
keypoint evaluation keeps 20 detections per image and has no small range, so ``AR`` is AR at 20
detections (over OKS 0.50:0.95), ``AR50``/``AR75`` are AR at one OKS threshold, and there is no
``APs``/``ARs``. The ``keypoints`` entry is present only when the data set has keypoints.

Detections per image: COCO counts at most 100 per image, which caps AP and recall on dense scenes (SKU-110K's
own benchmark counts 300). Box metrics count at most ``max_dets`` per image (None: read from the ground
truth, twice the 99th percentile of its objects per image, at least 100: :func:`max_dets_for`), recorded as
``bbox["max_dets"]`` where it is not COCO's 100; ``AR100`` is then the recall at ``max_dets`` detections
(its name kept for readers of metrics.json). Keypoints keep COCO's 20.

Predictions enter as :class:`~datadistill.core.types.Detections` per image (:func:`evaluate_predictions`) or
as a COCO results list (:func:`evaluate_results`, :func:`load_predictions`). OKS sigmas come from the
keypoint category's metadata (``Category.sigmas``), never from COCO's person constants.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from datadistill.core.caps import DEFAULT_MAX_DET, cap_for, objects_quantile
from datadistill.core.types import Detections
from datadistill.data.coco import (
    CocoDataset,
    is_finite_number,
    objects_per_image,
    parse_coco,
    read_json,
    to_coco_dict,
)
from datadistill.errors import DataError, UserError, one_line_errors
from datadistill.runtime.io import write_json_atomic

if TYPE_CHECKING:
    import torch

    from datadistill.models.detector import Detector

log = logging.getLogger(__name__)

# COCO's summary statistics (COCOeval.stats), in COCO's order.
BBOX_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
KEYPOINT_KEYS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
TASK_KEYS = {"bbox": BBOX_KEYS, "keypoints": KEYPOINT_KEYS}

Metrics = dict[str, dict[str, float | None]]


# ----------------------------------------------------------------------------------------------------
# predictions -> COCO results


def results_from_predictions(gt: CocoDataset, predictions: Mapping[int, Detections]) -> list[dict[str, Any]]:
    """The COCO results list of per-image predictions.

    ``predictions`` maps image id to :class:`Detections` (boxes ``[N, 4]`` xyxy px, labels ``[N]`` class
    indices into ``gt.categories``, keypoints ``[N, K, 3]`` x, y, score). Each detection becomes
    ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` plus flat ``keypoints`` (x, y, score
    per keypoint) when its category has keypoints. Raises ValueError for an image id that ``gt`` lacks,
    a label out of range, a keypoint count that differs from the data set's, or a non-finite value.
    """
    image_ids = {im.id for im in gt.images}
    cat_ids = [c.id for c in gt.categories]
    has_kp = [bool(c.keypoints) for c in gt.categories]
    k = gt.num_keypoints
    results: list[dict[str, Any]] = []
    for image_id, det in predictions.items():
        iid = int(image_id)  # numpy and torch integers too
        if iid not in image_ids:
            raise ValueError(f"predictions for image id {iid!r}, which the ground truth does not have")
        if len(det) == 0:
            continue
        boxes = det.boxes.detach().cpu().double().numpy()
        scores = det.scores.detach().cpu().double().numpy()
        labels = det.labels.detach().cpu().numpy()
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise ValueError(f"image {iid}: boxes and scores must be finite")
        if labels.min() < 0 or labels.max() >= len(cat_ids):
            bad = int(labels[(labels < 0) | (labels >= len(cat_ids))][0])
            raise ValueError(f"image {iid}: label {bad} is not a class index in [0, {len(cat_ids)})")
        kps = None
        if det.keypoints is not None and k:
            if det.keypoints.shape[1] != k:
                raise ValueError(f"image {iid}: keypoints have K={det.keypoints.shape[1]}, the data set has {k}")
            kps = det.keypoints.detach().cpu().double().numpy()
            if not np.isfinite(kps).all():
                raise ValueError(f"image {iid}: keypoints must be finite")
        for j in range(len(det)):
            x1, y1, x2, y2 = (float(v) for v in boxes[j])
            label = int(labels[j])
            rec: dict[str, Any] = {
                "image_id": iid,
                "category_id": cat_ids[label],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(scores[j]),
            }
            if kps is not None and has_kp[label]:
                rec["keypoints"] = [float(v) for v in kps[j].reshape(-1)]
            results.append(rec)
    return results


# ----------------------------------------------------------------------------------------------------
# checking and reading results


def _finite_numbers(x: Any, n: int) -> bool:
    return isinstance(x, list | tuple) and len(x) == n and all(is_finite_number(v) for v in x)


def _check_results(results: Sequence[Any], gt: CocoDataset, *, where: str, names: Sequence[str] | None = None) -> None:
    """Raise a one-line DataError at the first malformed record (``names[i]`` names record i)."""
    image_ids = {im.id for im in gt.images}
    cats = {c.id: c for c in gt.categories}
    k = gt.num_keypoints
    first_has_bbox: bool | None = None
    for i, r in enumerate(results):
        name = names[i] if names is not None else f"result #{i}"
        if not isinstance(r, dict):
            raise DataError(f"{where}: {name}: must be an object, got {type(r).__name__}")
        iid, cid, score = r.get("image_id"), r.get("category_id"), r.get("score")
        name = f"{name} (image {iid})"
        if iid not in image_ids or not isinstance(iid, int) or isinstance(iid, bool):
            missing = sum(1 for x in results if not (isinstance(x, dict) and x.get("image_id") in image_ids))
            raise DataError(
                f"{where}: {name}: image_id {iid!r} is not in the ground truth "
                f"({missing} of {len(results)} records name images it lacks)"
            )
        if cid not in cats or not isinstance(cid, int) or isinstance(cid, bool):
            raise DataError(f"{where}: {name}: category_id {cid!r} is not in the ground truth")
        if not _finite_numbers([score], 1):
            raise DataError(f"{where}: {name}: 'score' must be a finite number, got {score!r}")
        bbox, kps = r.get("bbox"), r.get("keypoints")
        if bbox is None and kps is None:
            what = "segmentation results are not supported" if "segmentation" in r else "no 'bbox'"
            raise DataError(f"{where}: {name}: {what} (expected 'bbox' and/or 'keypoints')")
        if bbox is not None:
            if not _finite_numbers(bbox, 4) or bbox[2] < 0 or bbox[3] < 0:
                raise DataError(f"{where}: {name}: 'bbox' must be 4 finite numbers [x, y, w>=0, h>=0], got {bbox!r}")
        if first_has_bbox is None:
            first_has_bbox = bbox is not None
        elif first_has_bbox != (bbox is not None):
            raise DataError(
                f"{where}: {name}: {'has' if bbox is not None else 'has no'} 'bbox' but the first record "
                f"{'does not' if bbox is not None else 'does'} (boxes for all records or for none)"
            )
        if kps is not None:
            if not cats[cid].keypoints:
                raise DataError(f"{where}: {name}: has keypoints but category {cid} defines none")
            if not _finite_numbers(kps, 3 * k):
                got = len(kps) if isinstance(kps, list | tuple) else type(kps).__name__
                raise DataError(
                    f"{where}: {name}: 'keypoints' must be {3 * k} finite numbers ({k} x, y, score), got {got}"
                )


def _match_categories(file_cats: Sequence[Any], gt: CocoDataset, path: Path) -> dict[int, int]:
    """Category id in the file -> category id in ``gt``: by id when ids and names agree, else by name."""
    gt_by_id = {c.id: c.name for c in gt.categories}
    gt_by_name = {c.name: c.id for c in gt.categories}
    if all(gt_by_id.get(c.id) == c.name for c in file_cats):
        return {c.id: c.id for c in file_cats}
    if all(c.name in gt_by_name for c in file_cats):
        log.info("%s: category ids differ from the ground truth's; matched categories by name", path)
        return {c.id: gt_by_name[c.name] for c in file_cats}
    if all(c.id in gt_by_id for c in file_cats):
        log.warning("%s: category names differ from the ground truth's; matched categories by id", path)
        return {c.id: c.id for c in file_cats}
    # A partial match: keep what matches by id and name, then by name; the caller rejects annotations
    # of categories left over.
    mapping = {c.id: c.id for c in file_cats if gt_by_id.get(c.id) == c.name}
    mapping.update({c.id: gt_by_name[c.name] for c in file_cats if c.id not in mapping and c.name in gt_by_name})
    return mapping


def _results_from_pseudo_labels(raw: dict[str, Any], gt: CocoDataset, path: Path) -> list[dict[str, Any]]:
    dataset, problems = parse_coco(raw, path=path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{path}: {problems[0]}{more}")
    for a in raw["annotations"]:
        if "score" not in a:
            raise DataError(
                f"{path}: annotation {a['id']} (image {a['image_id']}): no 'score' "
                "(a pseudo-label file needs one per annotation)"
            )
    cat_map = _match_categories(dataset.categories, gt, path)
    gt_id_by_name = {im.file_name: im.id for im in gt.images}
    image_map = {im.id: gt_id_by_name[im.file_name] for im in dataset.images if im.file_name in gt_id_by_name}
    if dataset.images and not image_map:
        gt_name = f" {gt.path}" if gt.path is not None else ""
        raise DataError(
            f"{path}: none of its {len(dataset.images)} images is in the ground truth{gt_name} (matched by file_name)"
        )
    unmatched = len(dataset.images) - len(image_map)
    if unmatched:
        dropped = sum(1 for a in raw["annotations"] if a["image_id"] not in image_map)
        log.warning(
            "%s: %d of %d images are not in the ground truth (matched by file_name); ignoring them and "
            "their %d annotations",
            path, unmatched, len(dataset.images), dropped,
        )  # fmt: skip
    results: list[dict[str, Any]] = []
    names: list[str] = []
    for a in raw["annotations"]:
        if a["image_id"] not in image_map or a.get("iscrowd"):  # crowd: an ignore region, not a prediction
            continue
        if a["category_id"] not in cat_map:
            name = next(c.name for c in dataset.categories if c.id == a["category_id"])
            raise DataError(
                f"{path}: annotation {a['id']} (image {a['image_id']}): category {a['category_id']} "
                f"({name!r}) matches no ground-truth category by id or name"
            )
        rec: dict[str, Any] = {
            "image_id": image_map[a["image_id"]],
            "category_id": cat_map[a["category_id"]],
            "bbox": list(a["bbox"]),
            "score": a["score"],
        }
        if a.get("keypoints") and any(c.keypoints for c in gt.categories if c.id == rec["category_id"]):
            rec["keypoints"] = list(a["keypoints"])
        results.append(rec)
        names.append(f"annotation {a['id']}")
    _check_results(results, gt, where=str(path), names=names)
    return results


def load_predictions(path: str | os.PathLike[str], gt: CocoDataset) -> list[dict[str, Any]]:
    """Read predictions for ``gt`` as a COCO results list.

    ``path`` holds either a COCO results list (``image_id`` and ``category_id`` as in ``gt``) or a COCO data
    set whose annotations carry ``score`` (a pseudo-label file). A data set's images are matched to
    ``gt``'s by ``file_name`` (its image ids need not agree; images ``gt`` lacks are ignored, with one
    warning), its categories by id, or by name where the ids differ. Bad content raises a one-line
    DataError naming the file and the record.
    """
    path = Path(path)
    raw = read_json(path)
    if isinstance(raw, list):
        results = [dict(r) if isinstance(r, dict) else r for r in raw]
        _check_results(results, gt, where=str(path))
        return results
    if isinstance(raw, dict) and "annotations" in raw:
        return _results_from_pseudo_labels(raw, gt, path)
    kind = "an object without 'annotations'" if isinstance(raw, dict) else type(raw).__name__
    raise DataError(f"{path}: expected a COCO results list or a COCO data set with scored annotations, got {kind}")


# ----------------------------------------------------------------------------------------------------
# evaluation


EVALUATORS = ("faster-coco-eval", "pycocotools")


@contextlib.contextmanager
def _evaluator_output() -> Iterator[None]:
    """Keep the evaluator's printed tables off stdout unless logging is at debug level."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _run_cocoeval(
    gt_dict: dict[str, Any],
    results: list[dict[str, Any]],
    *,
    iou_type: str,
    cat_ids: list[int],
    sigmas: Sequence[float] | None = None,
    evaluator_name: str = "faster-coco-eval",
    max_dets: int = DEFAULT_MAX_DET,
) -> dict[str, float | None]:
    """COCO's summaries of ``iou_type``; box metrics count at most ``max_dets`` detections per image (COCO's
    ``params.maxDets`` ``[1, 10, max_dets]``)."""
    keys = TASK_KEYS[iou_type]
    if not gt_dict["images"]:
        return dict.fromkeys(keys)
    sigma_array = None if sigmas is None else np.asarray(sigmas, dtype=np.float64)
    with _evaluator_output():
        if evaluator_name == "pycocotools":
            try:
                from pycocotools.coco import COCO as PyCOCO
                from pycocotools.cocoeval import COCOeval
            except ImportError as exc:
                raise UserError("--evaluator pycocotools needs pycocotools: pip install pycocotools") from exc
            coco_gt = PyCOCO()
            coco_gt.dataset = copy.deepcopy(gt_dict)
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(copy.deepcopy(results)) if results else PyCOCO()
            if not results:  # pycocotools' loadRes refuses an empty list
                coco_dt.dataset = {"images": gt_dict["images"], "categories": gt_dict["categories"], "annotations": []}
                coco_dt.createIndex()
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        elif evaluator_name == "faster-coco-eval":
            coco_gt = COCO(gt_dict, use_deepcopy=True, print_function=log.debug)  # deepcopy: loadRes too
            coco_dt = coco_gt.loadRes(results)
            evaluator = COCOeval_faster(
                coco_gt, coco_dt, iou_type, print_function=log.debug, kpt_oks_sigmas=sigma_array
            )
        else:
            raise UserError(f"unknown evaluator {evaluator_name!r}: choose one of {', '.join(EVALUATORS)}")
        evaluator.params.catIds = sorted(cat_ids)
        if sigma_array is not None:
            evaluator.params.kpt_oks_sigmas = sigma_array
        if iou_type == "bbox":
            evaluator.params.maxDets = [1, 10, int(max_dets)]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = np.asarray(evaluator.stats, dtype=np.float64)[: len(keys)]
    if iou_type == "bbox" and evaluator_name == "pycocotools" and max_dets != DEFAULT_MAX_DET:
        stats = box_summaries(evaluator.eval, evaluator.params)  # its summarize() counts 100 for AP, whatever maxDets
    if stats.shape[0] != len(keys):
        raise RuntimeError(f"the COCO evaluator gave {stats.shape[0]} {iou_type} statistics, expected {len(keys)}")
    return {key: None if value < 0 else float(value) for key, value in zip(keys, stats, strict=True)}


def box_summaries(evaluated: Mapping[str, Any], params: Any) -> np.ndarray:
    """COCO's 12 box summaries (:data:`BBOX_KEYS`) from an accumulated evaluation (``precision`` ``[T, R, K, A,
    M]``, ``recall`` ``[T, K, A, M]``), AP and the area ranges at the last of ``params.maxDets``, as
    faster-coco-eval summarizes; pycocotools' ``summarize`` looks up 100 there (-1 when maxDets lacks it)."""
    last = len(params.maxDets) - 1

    def mean(ap: bool, *, iou: float | None = None, area: str = "all", m: int = last) -> float:
        values = evaluated["precision"] if ap else evaluated["recall"]
        if iou is not None:
            values = values[np.flatnonzero(np.isclose(params.iouThrs, iou))]
        values = values[..., params.areaRngLbl.index(area), m]
        kept = values[values > -1]
        return float(kept.mean()) if kept.size else -1.0

    return np.array([mean(True), mean(True, iou=0.5), mean(True, iou=0.75), *(mean(True, area=a) for a in
                     ("small", "medium", "large")), mean(False, m=0), mean(False, m=1), mean(False),
                     *(mean(False, area=a) for a in ("small", "medium", "large"))])  # fmt: skip


def max_dets_for(gt: CocoDataset) -> int:
    """The detections per image to count on ``gt``: twice the 99th percentile of its objects per image, at
    least COCO's 100 (:func:`~datadistill.core.caps.cap_for`)."""
    return cap_for(objects_quantile(objects_per_image(gt)), default=DEFAULT_MAX_DET)


def evaluate_results(
    gt: CocoDataset,
    results: list[dict[str, Any]],
    *,
    evaluator: str = "faster-coco-eval",
    max_dets: int | None = None,
) -> Metrics:
    """COCO metrics of a COCO results list against ``gt``: ``{"bbox": {...}, "keypoints": {...}}``.

    ``results`` records are ``{"image_id", "category_id", "score", "bbox": [x, y, w, h]}`` with flat
    ``keypoints`` for keypoint categories. Boxes are evaluated over all categories, keypoints over the
    keypoint categories with OKS sigmas from ``gt``'s keypoint category. An empty list scores 0.0 (None
    where ``gt`` has nothing to find). Keypoint-only results (no ``bbox``) give no ``bbox`` entry.

    ``evaluator``: ``faster-coco-eval`` (the default, about 7x faster; its accumulate leaves out
    pycocotools' ``np.spacing(1)`` in the precision denominator, which can move a value by one unit in the
    last place) or ``pycocotools`` (the reference itself, bit for bit).

    ``max_dets``: box detections counted per image (None: :func:`max_dets_for` ``gt``), in ``bbox["max_dets"]``
    unless it is COCO's 100.
    """
    _check_results(results, gt, where="results")
    if max_dets is None:
        max_dets = max_dets_for(gt)
    elif max_dets < 1:
        raise UserError(f"--max-dets must be at least 1, got {max_dets}")
    gt_dict = to_coco_dict(gt)
    metrics: Metrics = {}
    if not results or "bbox" in results[0]:
        box_results = [{k: v for k, v in r.items() if k != "keypoints"} for r in results]
        metrics["bbox"] = _run_cocoeval(gt_dict, box_results, iou_type="bbox", cat_ids=[c.id for c in gt.categories],
                                         evaluator_name=evaluator, max_dets=max_dets)  # fmt: skip
        if max_dets != DEFAULT_MAX_DET:  # absent: COCO's 100, as in metrics written before it was recorded
            metrics["bbox"]["max_dets"] = max_dets
    else:
        log.info("the results carry no boxes: no box metrics")
    kp_category = gt.keypoint_category
    if kp_category is not None:
        kp_cat_ids = [c.id for c in gt.categories if c.keypoints]
        differing = [c.id for c in gt.categories if c.keypoints and c.sigmas != kp_category.sigmas]
        if differing:
            log.warning(
                "categories %s have other OKS sigmas than category %d; evaluating all with category %d's",
                differing, kp_category.id, kp_category.id,
            )  # fmt: skip
        kp_ids = set(kp_cat_ids)
        kp_results = [dict(r) for r in results if "keypoints" in r and r["category_id"] in kp_ids]
        if results and not kp_results:
            log.warning("the data set has keypoints but the results carry none: keypoint AP is 0")
        metrics["keypoints"] = _run_cocoeval(
            gt_dict,
            kp_results,
            iou_type="keypoints",
            cat_ids=kp_cat_ids,
            sigmas=kp_category.sigmas,
            evaluator_name=evaluator,
        )
    for task, values in metrics.items():
        log.debug("%s: %s", task, values)
    return metrics


def evaluate_predictions(
    gt: CocoDataset,
    predictions: Mapping[int, Detections],
    *,
    evaluator: str = "faster-coco-eval",
    max_dets: int | None = None,
) -> Metrics:
    """COCO metrics of per-image :class:`Detections` (image id -> detections) against ``gt``.

    See :func:`results_from_predictions` for the conversion and :func:`evaluate_results` for the metrics.
    Images of ``gt`` missing from ``predictions`` count as images with no detections.
    """
    return evaluate_results(gt, results_from_predictions(gt, predictions), evaluator=evaluator, max_dets=max_dets)


# ----------------------------------------------------------------------------------------------------
# output


def check_detector_fits(detector: Detector, dataset: CocoDataset) -> None:
    """A one-line UserError naming the first image of ``dataset`` that ``detector`` cannot take at its
    input size (:meth:`~datadistill.models.detector.Detector.unfit_reason`)."""
    meta = detector.meta
    bad = [im for im in dataset.images
           if detector.unfit_reason(im.height, im.width, min_size=meta.min_size, max_size=meta.max_size)]  # fmt: skip
    if bad:
        im, where = bad[0], dataset.path if dataset.path is not None else "the evaluation data"
        raise UserError(
            f"{where}: image {im.id} ({im.file_name}) is {im.width}x{im.height} px, too elongated for the model's "
            f"input size ({meta.min_size}-{meta.max_size} px); {len(bad)} such image(s): leave them out of the data set"
        )


def evaluate_model(
    detector: Detector,
    dataset: CocoDataset,
    image_root: str | os.PathLike[str],
    *,
    device: torch.device,
    batch_size: int,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    evaluator: str = "faster-coco-eval",
    precision: str = "fp32",
    max_dets: int | None = None,
) -> Metrics:
    """COCO metrics of ``detector`` on ``dataset`` (:func:`evaluate_predictions`).

    With ``world_size > 1`` (every rank calls it, in a process group) each rank predicts the images
    ``rank, rank + world_size, ...`` and rank 0 gathers the predictions and returns the metrics; the
    other ranks return an empty dict. Give a detector whose model is not wrapped in DDP: ranks predict
    different numbers of batches, and DDP's forward would wait for the others. ``precision`` (resolved:
    fp32, bf16 or fp16): the forward passes run under autocast, and the predictions are scored in fp32.
    ``max_dets``: box detections counted per image (:func:`evaluate_results`).
    """
    from torch.utils.data import DataLoader, Subset

    from datadistill.data.dataset import DetectionDataset, collate
    from datadistill.runtime import distributed
    from datadistill.stages.multiview import predict

    check_detector_fits(detector, dataset)
    items = DetectionDataset(dataset, image_root, train=False)
    loader = DataLoader(
        items if world_size == 1 else Subset(items, range(rank, len(items), world_size)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
    )
    predictions = {}
    for images, targets in one_line_errors(loader):
        detections = predict(detector, [im.to(device, non_blocking=True) for im in images], precision=precision)
        for target, det in zip(targets, detections, strict=True):
            predictions[int(target["image_id"])] = det.to("cpu")
    if world_size > 1:
        parts = distributed.gather_to_main(predictions)
        if parts is None:
            return {}
        predictions = {k: v for part in parts for k, v in part.items()}
    return evaluate_predictions(dataset, predictions, evaluator=evaluator, max_dets=max_dets)


def format_metrics(metrics: Mapping[str, Mapping[str, float | None]]) -> str:
    """A plain-text table: per task a header line of metric names and a line of values (fractions)."""
    width = max((len(task) for task in metrics), default=4)
    lines: list[str] = []
    for task, values in metrics.items():
        header = "task".ljust(width) + "".join(f"  {key:>6}" for key in values)
        row = task.ljust(width) + "".join(
            f"  {'-' if value is None else value if isinstance(value, int) else f'{value:.3f}':>6}"
            for value in values.values()
        )
        lines += [header, row]
    return "\n".join(lines)


def write_metrics(path: str | os.PathLike[str], metrics: Mapping[str, Mapping[str, float | None]]) -> None:
    """Write metrics as json (None -> null), atomically."""
    write_json_atomic(path, {task: dict(values) for task, values in metrics.items()}, indent=2)
