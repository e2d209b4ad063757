"""Label Studio and CVAT: the pre-annotations ``review`` writes for them, the corrections ``merge`` reads back.

Writing. A Label Studio task per image (``data.image`` its URL, ``data.file_name``, ``data.width`` /
``data.height``) holds one prediction whose ``result`` lists ``rectanglelabels`` regions (x, y, width, height
in percent of ``original_width`` / ``original_height``, the class under the ``label`` tag) and, in a keypoint
task, ``keypointlabels`` regions (x, y in percent, the keypoint's name under the ``keypoint`` tag, a
``parentID`` naming its box's region). For CVAT (and FiftyOne) the same objects go out as a COCO json.

Reading. A Label Studio JSON export (a list of tasks; per task the last annotation not cancelled) or a COCO
json (CVAT's "COCO 1.0" export) becomes :class:`CorrectedImage` records: boxes in absolute pixels (xyxy),
class names, COCO keypoints. Everything in the file is checked before it is used, and any problem is a
one-line :class:`~datadistill.errors.UserError` naming the file, the task or image, the region or annotation
and the field: a missing or non-numeric coordinate, a size that is not a positive integer, a list where an
object belongs, an image name that could leave the image root. A region or annotation that ``merge`` cannot
take (a Label Studio region that is not a rectangle or a keypoint, a COCO annotation whose ``image_id``
matches no image) is an error too, or, with ``skip_unsupported``, left out and counted
(:attr:`Corrections.skipped`): never dropped in silence.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlparse
from xml.sax.saxutils import quoteattr

import numpy as np
import pyarrow as pa

from datadistill import __version__
from datadistill.data.coco import (
    CocoDataset,
    category_to_coco,
    is_finite_number,
    is_int,
    is_positive_integer,
    read_json,
    show_value,
)
from datadistill.data.images import check_image_name
from datadistill.errors import DataError, UserError, shorten

LOCAL_FILES_URL = "/data/local-files/?d="
BOX_TOLERANCE_PX = 1e-3  # a corrected box or keypoint may pass the image's edge by float rounding, no more
KEYPOINT_SIZE_PCT = 0.5  # how large Label Studio draws a pre-annotated keypoint, in percent of the image width
SKIP_HINT = "pass --skip-unsupported to leave such records out, counted"


# ----------------------------------------------------------------------------------------------------
# writing: pre-annotations


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


def label_studio_tasks(
    ref: CocoDataset,
    objects_of: dict[int, np.ndarray],
    table: pa.Table,
    *,
    obj: dict[str, np.ndarray],
    image_doubt: np.ndarray,
    kp_thr: float | None,
    prefix: str | None,
) -> list[dict[str, Any]]:
    """One Label Studio task per row of ``table`` (``file_name``, ``width``, ``height``), in its order: the
    objects ``objects_of[row]`` (indices into ``obj``'s ``boxes``, ``labels``, ``scores``, ``id``,
    ``keypoints``) as rectanglelabels regions and, for a keypoint task, their visible keypoints as
    keypointlabels regions; the prediction's score is the image's doubt ``image_doubt[row]``."""
    file_names, widths, heights = (table[c].to_pylist() for c in ("file_name", "width", "height"))
    kp_cat = ref.keypoint_category
    tasks = []
    for r in range(table.num_rows):
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


def review_coco(
    ref: CocoDataset,
    objects_of: dict[int, np.ndarray],
    table: pa.Table,
    *,
    obj: dict[str, np.ndarray],
    kp_thr: float | None,
) -> dict[str, Any]:
    """The rows of ``table`` as a COCO json (for CVAT and FiftyOne), in its order, each object with its
    ``score``, ``agreement``, ``doubt``, ``kept``, ``score_spread`` and ``box_spread`` (null where not
    measured); keypoints visible (v 2) from ``kp_thr`` (or a score above 0), the others 0, 0, 0."""
    file_names, widths, heights = (table[c].to_pylist() for c in ("file_name", "width", "height"))
    keypoints = obj.get("keypoints")
    images, annotations = [], []
    cat_ids = [c.id for c in ref.categories]
    for image_id, r in enumerate(range(table.num_rows), 1):
        images.append({"id": image_id, "file_name": file_names[r], "width": int(widths[r]), "height": int(heights[r])})
        for j in objects_of[r]:
            x1, y1, x2, y2 = (float(v) for v in obj["boxes"][j])
            ann: dict[str, Any] = {
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat_ids[int(obj["labels"][j])],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                "score": float(obj["scores"][j]), "agreement": int(obj["agreement"][j]),
                "doubt": float(obj["doubt"][j]), "kept": bool(obj["kept"][j]),
                "score_spread": _or_none(obj["score_spread"][j]), "box_spread": _or_none(obj["box_spread"][j]),
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


def _or_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


# ----------------------------------------------------------------------------------------------------
# reading: corrections


@dataclass(frozen=True)
class CorrectedImage:
    """One corrected image: where it came from (``record``, for messages), its name, the size the export
    claims (``width`` x ``height`` px, 0 x 0 where it claims none) and the field that claims it
    (``size_field``), its objects (``boxes`` ``[N]`` xyxy px, ``labels`` ``[N]`` class names, ``extra`` per
    object: the COCO fields kept, keypoints)."""

    record: str
    file_name: str
    width: int
    height: int
    boxes: list[tuple[float, float, float, float]]
    labels: list[str]
    extra: list[dict[str, Any]]
    size_field: str = "width/height"


@dataclass(frozen=True)
class Corrections:
    """The images of a correction export and what was left out of it with ``skip_unsupported``, counted by
    kind (``{"polygonlabels region": 2, "annotation whose image_id matches no image": 1}``)."""

    images: list[CorrectedImage]
    skipped: dict[str, int] = field(default_factory=dict)


def file_name_of_task(data: dict[str, Any]) -> str | None:
    """The image of a Label Studio task: ``data.file_name`` (review writes it), else the local-files path,
    else the URL's last path component (both percent-decoded)."""
    if isinstance(data.get("file_name"), str):
        return data["file_name"]
    url = data.get("image")
    if not isinstance(url, str) or not url:
        return None
    if url.startswith("/data/local-files/"):
        d = parse_qs(urlparse(url).query).get("d")
        return d[0] if d else None
    return unquote(urlparse(url).path.rsplit("/", 1)[-1]) or None


def _checked_name(record: str, name: Any) -> str:
    """The image name of a task or image, or a one-line UserError: no name, or one that could leave the root."""
    try:
        check_image_name(name)
    except DataError as exc:
        raise UserError(f"{record}: {exc}") from None
    return name


def _list_field(where: str, value: Any, name: str) -> list[Any]:
    """``value`` (a field ``name`` that must hold a list; None reads as an empty one) or a one-line UserError."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{where}: '{name}' must be a list, got {type(value).__name__}")
    return value


def _size(where: str, width: Any, height: Any, fields: str) -> tuple[int, int]:
    """A claimed image size (``fields`` names them in the message): positive integers, else a UserError."""
    for key, value in zip(fields.split("/"), (width, height), strict=True):
        if not is_positive_integer(value):
            raise UserError(f"{where}: '{key}' must be a positive integer (pixels), got {show_value(value)}")
    return int(width), int(height)


def _one_name(where: str, value: dict[str, Any], key: str, what: str) -> str:
    """The one name of ``value[key]`` (a region's ``rectanglelabels``: a ``what`` = class name, or its
    ``keypointlabels``: a keypoint name)."""
    names = value.get(key)
    if not (isinstance(names, list) and len(names) == 1 and isinstance(names[0], str) and names[0]):
        raise UserError(f"{where}: needs one {what} name in value.{key}, got {show_value(names)}")
    return names[0]


def _percent(where: str, value: dict[str, Any], keys: tuple[str, ...]) -> list[float]:
    """The finite numbers ``value[key]`` (percent of the image) for ``keys``, or a UserError naming the key."""
    out = []
    for key in keys:
        if not is_finite_number(value.get(key)):
            raise UserError(f"{where}: value.{key} must be a finite number (percent of the image), got "
                            f"{show_value(value.get(key))}")  # fmt: skip
        out.append(float(value[key]))
    return out


@dataclass
class _TaskSize:
    """The size a task's regions claim (all must agree), else its ``data.width``/``data.height``."""

    record: str
    fallback: tuple[int, int] | None
    claimed: tuple[int, int] | None = None

    def of(self, where: str, region: dict[str, Any]) -> tuple[int, int]:
        if "original_width" not in region and "original_height" not in region:
            if self.fallback is None:
                raise UserError(f"{where}: has no original_width/original_height (nor the task data.width/height)")
            return self.fallback
        size = _size(where, region.get("original_width"), region.get("original_height"),
                     "original_width/original_height")  # fmt: skip
        if self.claimed is not None and size != self.claimed:
            raise UserError(f"{where}: original_width/original_height {size[0]}x{size[1]} differ from another "
                            f"region's {self.claimed[0]}x{self.claimed[1]}")  # fmt: skip
        self.claimed = size
        return size


def _region_where(record: str, region: dict[str, Any], j: int) -> str:
    """``RECORD: region ID`` (a keypoint: ``RECORD: keypoint ID``), ``#j`` for a region without an id."""
    rid = region.get("id")
    kind = "keypoint" if region.get("type") == "keypointlabels" else "region"
    return f"{record}: {kind} {shorten(str(rid)) if rid is not None else f'#{j}'}"


def read_label_studio_export(
    path: Path, raw: list[Any], keypoint_names: tuple[str, ...] = (), *, skip_unsupported: bool = False
) -> Corrections:
    """A Label Studio JSON export ``raw`` (read from ``path``): per task, the last annotation not cancelled,
    its rectanglelabels back in absolute pixels (``x / 100 * original_width`` ...) and, for a keypoint task
    (``keypoint_names``), its keypointlabels as each box's COCO keypoints (see :func:`_task_keypoints`)."""
    images, skipped = [], Counter[str]()
    for i, task in enumerate(raw):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise UserError(f"{path}: task #{i} is not a Label Studio task (no 'data' object)")
        data = task["data"]
        name = file_name_of_task(data)
        record = f"{path}: task {shorten(str(task.get('id', f'#{i}')))} ({shorten(str(name))})"
        if name is None:
            raise UserError(f"{record}: cannot tell which image it is (no data.file_name or data.image)")
        _checked_name(record, name)
        annotations = _list_field(record, task.get("annotations"), "annotations")
        bad = next((j for j, a in enumerate(annotations) if not isinstance(a, dict)), None)
        if bad is not None:
            raise UserError(f"{record}: annotation #{bad} must be an object, got {type(annotations[bad]).__name__}")
        done = [a for a in annotations if not a.get("was_cancelled")]
        if not done:
            raise UserError(f"{record}: has no annotation (label it, or leave it out of the export)")
        fallback = None
        if data.get("width") is not None or data.get("height") is not None:
            fallback = _size(record, data.get("width"), data.get("height"), "data.width/data.height")
        size = _TaskSize(record, fallback)
        boxes, labels, box_ids, points = [], [], [], []
        for j, region in enumerate(_list_field(record, done[-1].get("result"), "result")):
            if not isinstance(region, dict):
                raise UserError(f"{record}: result item #{j} must be an object, got {type(region).__name__}")
            where, kind = _region_where(record, region, j), region.get("type")
            if kind not in ("rectanglelabels", "keypointlabels"):
                shown = f"a {shorten(str(kind))!r} region" if kind is not None else "a region without a 'type'"
                if not skip_unsupported:
                    raise UserError(f"{where}: {shown}; merge takes rectanglelabels and keypointlabels regions only "
                                    f"({SKIP_HINT})")  # fmt: skip
                skipped[f"{shorten(str(kind))} region" if kind is not None else "region without a type"] += 1
                continue
            value = region.get("value")
            if not isinstance(value, dict):
                raise UserError(f"{where}: 'value' must be an object, got {type(value).__name__}")
            if kind == "keypointlabels":
                points.append((where, region, value))
                continue
            width, height = size.of(where, region)
            rotation = value.get("rotation")
            if rotation is not None and not is_finite_number(rotation):
                raise UserError(f"{where}: value.rotation must be a finite number, got {show_value(rotation)}")
            if abs(float(rotation or 0)) > 1e-9:
                raise UserError(f"{where}: is rotated; axis-aligned boxes only")
            x, y, w, h = _percent(where, value, ("x", "y", "width", "height"))
            x1, y1 = x / 100.0 * width, y / 100.0 * height
            boxes.append((x1, y1, x1 + w / 100.0 * width, y1 + h / 100.0 * height))
            labels.append(_one_name(where, value, "rectanglelabels", "class"))
            box_ids.append(region.get("id"))
        extra: list[dict[str, Any]] = [{}] * len(boxes)
        if keypoint_names or points:  # not a box task with boxes only (that path is as before)
            extra = _task_keypoints(points, boxes, box_ids, keypoint_names=keypoint_names, size=size)
        claimed = size.claimed or size.fallback or (0, 0)
        field_name = "original_width/original_height" if size.claimed else "data.width/data.height"
        images.append(CorrectedImage(record, name, *claimed, boxes, labels, extra, size_field=field_name))
    return Corrections(images, dict(skipped))


def _task_keypoints(
    points: list[tuple[str, dict[str, Any], dict[str, Any]]],
    boxes: list[tuple[float, float, float, float]],
    box_ids: list[Any],
    *,
    keypoint_names: tuple[str, ...],
    size: _TaskSize,
) -> list[dict[str, Any]]:
    """Per box of a task (``boxes`` xyxy px, ``box_ids`` their region ids), its COCO ``keypoints`` (x, y px,
    v 2; a keypoint not marked 0, 0, 0) and ``num_keypoints``, from the task's keypointlabels regions
    ``points`` (where, region, value): each lies inside the image and goes to the box its ``parentID`` names,
    else to the one box that contains it."""
    index = {n: k for k, n in enumerate(keypoint_names)}
    kps = np.zeros((len(boxes), len(keypoint_names), 3))
    for where, region, v in points:
        name = _one_name(where, v, "keypointlabels", "keypoint")
        where = f"{where} ({shorten(name)})"
        if name not in index:
            known = list(keypoint_names[:8]) if keypoint_names else "no keypoints"
            raise UserError(f"{where}: has an unknown keypoint name {shorten(repr(name))} (the labeled set has "
                            f"{known})")  # fmt: skip
        width, height = size.of(where, region)
        x, y = (p / 100.0 * s for p, s in zip(_percent(where, v, ("x", "y")), (width, height), strict=True))
        t = BOX_TOLERANCE_PX
        if not (-t <= x <= width + t and -t <= y <= height + t):
            raise UserError(f"{where}: lies at ({x:g}, {y:g}) px, outside the {width}x{height} image")
        b = _parent_box(where, region.get("parentID"), (x, y), boxes, box_ids)
        if kps[b, index[name], 2]:
            raise UserError(f"{where}: box {shorten(str(box_ids[b]))} has two {shorten(repr(name))} keypoints")
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
            raise UserError(f"{where}: its parentID {show_value(parent)} names no box of the task")
        return box_ids.index(parent)
    x, y, t = point[0], point[1], BOX_TOLERANCE_PX
    inside = [i for i, (x1, y1, x2, y2) in enumerate(boxes) if x1 - t <= x <= x2 + t and y1 - t <= y <= y2 + t]
    if len(inside) == 1:
        return inside[0]
    ids = shorten(", ".join(str(box_ids[i]) for i in inside))
    lies = f"inside {len(inside)} boxes ({ids})" if inside else "outside every box"
    raise UserError(f"{where}: has no parentID and lies {lies} at ({x:g}, {y:g}) px; link it to its box")


def _coco_keypoints(where: str, kp: Any, k: int, size: tuple[int, int]) -> dict[str, Any]:
    """A COCO annotation's ``keypoints`` checked (``k`` x, y, v; v 0, 1 or 2; a marked one inside the image)
    with its ``num_keypoints`` counted; nothing for a box task without them."""
    if kp is None or (kp == [] and not k):
        return {}
    if not k:
        raise UserError(f"{where}: has keypoints but the labeled set defines none")
    if not (isinstance(kp, list) and len(kp) == 3 * k and all(is_finite_number(v) for v in kp)):
        got = f"{len(kp)} values" if isinstance(kp, list) else type(kp).__name__
        raise UserError(f"{where}: 'keypoints' must be {3 * k} finite numbers ({k} x, y, v), got {got}")
    arr = np.asarray(kp, np.float64).reshape(k, 3)
    if not np.isin(arr[:, 2], (0, 1, 2)).all():
        raise UserError(f"{where}: keypoint visibility must be 0, 1 or 2")
    t, (w, h) = BOX_TOLERANCE_PX, size
    outside = (arr[:, 2] > 0) & ((arr[:, 0] < -t) | (arr[:, 0] > w + t) | (arr[:, 1] < -t) | (arr[:, 1] > h + t))
    if outside.any():
        j = int(np.flatnonzero(outside)[0])
        raise UserError(f"{where}: keypoint {j} at ({arr[j, 0]:g}, {arr[j, 1]:g}) px lies outside the {w}x{h} image")
    return {"keypoints": [float(v) for v in kp], "num_keypoints": int((arr[:, 2] > 0).sum())}


def _coco_categories(path: Path, raw: Any) -> dict[int, str]:
    """The class name of each category id of a COCO export."""
    names = {}
    for i, c in enumerate(_list_field(str(path), raw, "categories")):
        if not (isinstance(c, dict) and is_int(c.get("id")) and isinstance(c.get("name"), str)):
            raise UserError(f"{path}: category #{i} needs an integer 'id' and a 'name', got {show_value(c)}")
        names[c["id"]] = c["name"]
    return names


def _coco_images(path: Path, raw: list[Any]) -> dict[int, tuple[str, str, tuple[int, int]]]:
    """Per image id of a COCO export, in file order: its record (for messages), name and size."""
    images: dict[int, tuple[str, str, tuple[int, int]]] = {}
    for i, im in enumerate(raw):
        if not isinstance(im, dict):
            raise UserError(f"{path}: image #{i} must be an object, got {type(im).__name__}")
        iid, name = im.get("id"), im.get("file_name")
        record = f"{path}: image {show_value(iid) if not is_int(iid) else iid} ({shorten(str(name))})"
        if not is_int(iid):
            raise UserError(f"{record}: 'id' must be an integer, got {show_value(iid)}")
        if iid in images:
            raise UserError(f"{record}: the same id as {images[iid][0].removeprefix(f'{path}: ')}; each image needs "
                            "its own id (else their annotations mix)")  # fmt: skip
        name = _checked_name(record, name)
        images[iid] = (record, name, _size(record, im.get("width"), im.get("height"), "width/height"))
    return images


def read_coco_corrections(
    path: Path, raw: dict[str, Any], keypoint_names: tuple[str, ...] = (), *, skip_unsupported: bool = False
) -> Corrections:
    """A COCO json ``raw`` (CVAT's "COCO 1.0" export, read from ``path``): every image, its boxes (xywh ->
    xyxy), class names and, in a keypoint task, keypoints (checked, ``num_keypoints`` counted)."""
    cat_names = _coco_categories(path, raw.get("categories"))
    images = _coco_images(path, raw["images"])
    by_image: dict[int, list[tuple[str, dict[str, Any]]]] = {iid: [] for iid in images}
    skipped = Counter[str]()
    for j, a in enumerate(_list_field(str(path), raw.get("annotations"), "annotations")):
        if not isinstance(a, dict):
            raise UserError(f"{path}: annotation #{j} must be an object, got {type(a).__name__}")
        iid = a.get("image_id")
        where = f"annotation {shorten(str(a.get('id', f'#{j}')))}"
        if not (is_int(iid) and iid in images):
            if not skip_unsupported:
                raise UserError(f"{path}: {where}: its image_id {show_value(iid)} matches no image of the file "
                                f"({SKIP_HINT})")  # fmt: skip
            skipped["annotation whose image_id matches no image"] += 1
            continue
        by_image[iid].append((f"{images[iid][0]} {where}", a))
    out = []
    for iid, (record, name, size) in images.items():
        boxes, labels, extra = [], [], []
        for where, a in by_image[iid]:
            if a.get("category_id") not in cat_names or not is_int(a.get("category_id")):
                raise UserError(f"{where}: unknown category_id {show_value(a.get('category_id'))}")
            bbox = a.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_finite_number(v) for v in bbox)):
                raise UserError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {show_value(bbox)}")
            x, y, w, h = (float(v) for v in bbox)
            boxes.append((x, y, x + w, y + h))
            labels.append(cat_names[a["category_id"]])
            kept = _coco_keypoints(where, a.get("keypoints"), len(keypoint_names), size)
            iscrowd = a.get("iscrowd", 0)
            if not (is_int(iscrowd) and iscrowd in (0, 1)):
                raise UserError(f"{where}: 'iscrowd' must be 0 or 1, got {show_value(iscrowd)}")
            extra.append({**kept, "iscrowd": iscrowd} if "iscrowd" in a else kept)
        out.append(CorrectedImage(record, name, *size, boxes, labels, extra))
    return Corrections(out, dict(skipped))


def read_corrections(
    path: str | Path, keypoint_names: tuple[str, ...] = (), *, skip_unsupported: bool = False
) -> Corrections:
    """A Label Studio export (a json list of tasks) or a COCO json (an object with ``images``);
    ``keypoint_names``: the labeled set's keypoints (none for a box task)."""
    path = Path(path)
    raw = read_json(path)
    if isinstance(raw, list):
        return read_label_studio_export(path, raw, keypoint_names, skip_unsupported=skip_unsupported)
    if isinstance(raw, dict) and isinstance(raw.get("images"), list):
        return read_coco_corrections(path, raw, keypoint_names, skip_unsupported=skip_unsupported)
    raise UserError(f"{path}: neither a Label Studio JSON export (a list of tasks) nor a COCO json")
