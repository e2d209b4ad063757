"""COCO json in and out, with validation that reports every problem.

Inside datadistill a data set is a :class:`CocoDataset`: images, per-image :class:`ImageLabels` (boxes as
absolute pixel xyxy, labels as contiguous class indices, keypoints ``[N, K, 3]``) and categories that
carry the keypoint schema (names, skeleton, flip map, OKS sigmas). COCO's ``bbox`` is xywh; the
conversion happens here and nowhere else.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import numpy as np

from datadistill.data.images import check_image_name, image_size, read_image, resolve_image_path
from datadistill.errors import DataError, shorten
from datadistill.runtime.io import write_json_atomic

log = logging.getLogger(__name__)

# COCO's person keypoints and their OKS sigmas (pycocotools cocoeval.py).
COCO_PERSON_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
# Written as pycocotools computes them (x / 10.0) so that the floats are bit-identical.
COCO_PERSON_SIGMAS = tuple(
    float(s) / 10.0 for s in (.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89)
)  # fmt: skip
DEFAULT_SIGMA = 0.05
BOX_TOLERANCE_PX = 1.0  # boxes may exceed the image by rounding; more than this is an error
# A predicted keypoint (an annotation with a score) may lie outside its image, a model extrapolates a body cut
# by the frame; by more than the image's own width or height it is a broken file (a labeled one: as boxes).
PREDICTED_KEYPOINT_SLACK = 1.0


@dataclass(frozen=True)
class Category:
    """A COCO category. ``skeleton`` is 1-based as in COCO; ``flip_index[i]`` is the mirror of keypoint i."""

    id: int
    name: str
    supercategory: str = ""
    keypoints: tuple[str, ...] = ()
    skeleton: tuple[tuple[int, int], ...] = ()
    flip_index: tuple[int, ...] = ()
    sigmas: tuple[float, ...] = ()


@dataclass(frozen=True)
class ImageRecord:
    id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class ImageLabels:
    """The annotations of one image, as arrays.

    ids ``[N]`` int64, boxes ``[N, 4]`` float64 xyxy px, labels ``[N]`` int64 class indices,
    iscrowd ``[N]`` bool, area ``[N]`` float64, keypoints ``[N, K, 3]`` float64 or None,
    scores ``[N]`` float64 or None (pseudo-labels and predictions), agreement ``[N]`` int64 or None.
    Float64 so that a file's numbers survive the xywh -> xyxy -> xywh round trip for evaluation.
    """

    ids: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray
    area: np.ndarray
    keypoints: np.ndarray | None = None
    scores: np.ndarray | None = None
    agreement: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @staticmethod
    def empty(num_keypoints: int = 0) -> ImageLabels:
        return ImageLabels(
            ids=np.zeros((0,), np.int64),
            boxes=np.zeros((0, 4), np.float64),
            labels=np.zeros((0,), np.int64),
            iscrowd=np.zeros((0,), bool),
            area=np.zeros((0,), np.float64),
            keypoints=np.zeros((0, num_keypoints, 3), np.float64) if num_keypoints else None,
        )


class CategorySchema:
    """What a data set's ``categories`` tell: class names, the keypoint schema, the task. Shared by
    :class:`CocoDataset` and the flat forms of :mod:`datadistill.data.label_table`."""

    categories: tuple[Category, ...]

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.categories)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def keypoint_category(self) -> Category | None:
        """The category that defines the keypoint schema (all keypoint categories share it)."""
        return next((c for c in self.categories if c.keypoints), None)

    @property
    def num_keypoints(self) -> int:
        cat = self.keypoint_category
        return len(cat.keypoints) if cat else 0

    @property
    def task(self) -> str:
        """``"keypoints"`` when any category has keypoints, else ``"boxes"``."""
        return "keypoints" if self.num_keypoints else "boxes"


@dataclass(frozen=True)
class CocoDataset(CategorySchema):
    """A COCO data set held in memory. ``labels`` maps image id to its :class:`ImageLabels`."""

    images: tuple[ImageRecord, ...]
    labels: dict[int, ImageLabels]
    categories: tuple[Category, ...]
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_annotations(self) -> int:
        return sum(len(v) for v in self.labels.values())


def objects_per_image(dataset: CocoDataset) -> list[int]:
    """The objects of each image of ``dataset``, in image order (crowd regions left out: they are not objects
    a detector should find one by one)."""
    counts = []
    for image in dataset.images:
        labels = dataset.labels.get(image.id)
        counts.append(0 if labels is None else int(np.count_nonzero(~labels.iscrowd)))
    return counts


# ----------------------------------------------------------------------------------------------------
# keypoint metadata


def derive_flip_index(names: Iterable[str]) -> tuple[int, ...]:
    """The mirror of each keypoint, from ``left``/``right`` in the names (``left_knee`` <-> ``right_knee``).

    Names are split into words on ``_``, ``-``, ``.`` and spaces; a name whose words contain ``left`` is
    paired with the name that has ``right`` in the same place (any case). Keypoints with no partner
    (``nose``) map to themselves.
    """
    names = list(names)
    swap = {"left": "right", "right": "left", "l": "r", "r": "l"}
    lookup = {n.lower(): i for i, n in enumerate(names)}
    index = list(range(len(names)))
    for i, name in enumerate(names):
        parts = re.split(r"([_\-. ])", name.lower())
        words = [p for p in parts if p not in "_-. "]
        sided = [w for w in words if w in ("left", "right")] or [w for w in words if w in ("l", "r")]
        if len(sided) != 1:
            continue
        mirrored = "".join(swap.get(p, p) if p == sided[0] else p for p in parts)
        j = lookup.get(mirrored)
        if j is not None:
            index[i] = j
    return tuple(index)


def _flip_index_from_pairs(pairs: Any, names: tuple[str, ...], where: str, problems: list[str]) -> tuple[int, ...]:
    k = len(names)
    index = list(range(k))
    if not isinstance(pairs, list):
        problems.append(f"{where}: flip_pairs must be a list of [a, b] pairs, got {type(pairs).__name__}")
        return tuple(index)
    lookup = {n: i for i, n in enumerate(names)}
    for pair in pairs:
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            problems.append(f"{where}: flip_pairs entry {show_value(pair)} is not a pair")
            continue
        ab = []
        for x in pair:
            if isinstance(x, str) and x in lookup:
                ab.append(lookup[x])
            elif isinstance(x, int) and not isinstance(x, bool) and 0 <= x < k:
                ab.append(x)
            else:
                problems.append(
                    f"{where}: flip_pairs entry {show_value(pair)} names no keypoint (0-based index or name)"
                )
                break
        if len(ab) == 2:
            index[ab[0]], index[ab[1]] = ab[1], ab[0]
    return tuple(index)


@functools.lru_cache(maxsize=8)
def _warn_default_sigmas(k: int) -> None:
    log.warning("no OKS 'sigmas' in the keypoint category; using %.3f for all %d keypoints", DEFAULT_SIGMA, k)


def default_sigmas(names: tuple[str, ...]) -> tuple[float, ...]:
    """COCO's sigmas for COCO's 17 person keypoints, else a uniform default (logged)."""
    if names == COCO_PERSON_KEYPOINTS:
        return COCO_PERSON_SIGMAS
    if names:
        _warn_default_sigmas(len(names))
    return (DEFAULT_SIGMA,) * len(names)


# ----------------------------------------------------------------------------------------------------
# parsing with validation


_INT64_LIMIT = 2**63  # ids and counts become int64 arrays; json integers have no bound


def is_int(x: Any) -> bool:
    """A json (or YAML) integer that fits int64 (not a bool)."""
    return isinstance(x, int) and not isinstance(x, bool) and -_INT64_LIMIT <= x < _INT64_LIMIT


def is_positive_integer(x: Any) -> bool:
    """An image size: an integer, or a float with an integral value (``64.0``), in ``[1, 2**63)``; not a
    string (``"64"``), a bool, NaN or infinity."""
    return (is_int(x) or (is_finite_number(x) and float(x).is_integer())) and 0 < x < _INT64_LIMIT


def control_characters(text: str) -> list[str]:
    """The control characters in ``text`` (Unicode category Cc: NUL, escape, line breaks, tabs, DEL ...),
    escaped (``\\x1b``): a class or keypoint name holding one breaks the XML of a Label Studio config,
    the lines of a log and the labels of a plot."""
    return [repr(c)[1:-1] for c in dict.fromkeys(text) if unicodedata.category(c) == "Cc"]


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def is_finite_number(x: Any) -> bool:
    """An int or float (not a bool) that is a finite float64: json's NaN, Infinity and integers beyond
    float64's range (``1e400`` written out as digits) are not."""
    if not _is_number(x):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def _finite(values: list[Any]) -> bool:
    return all(is_finite_number(v) for v in values)


def show_value(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, so that a hostile value keeps a problem to a short line."""
    return shorten(repr(value), limit)


@contextlib.contextmanager
def open_text(path: str | os.PathLike[str], kind: str) -> Iterator[TextIO]:
    """``path`` open as UTF-8 text for a parser of ``kind`` (``"json"``, ``"YAML"``): a file that is missing, a
    folder, unreadable or not UTF-8 (found as the parser reads it) raises a one-line DataError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            yield f
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except IsADirectoryError as exc:
        raise DataError(f"{path}: is a folder, expected a {kind} file") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: invalid {kind}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def read_json(path: str | os.PathLike[str], *, hint: str = "") -> Any:
    """Parse a json file; a DataError names the file, line and column of a syntax error, followed by ``hint``
    (what to do about it) where given."""
    try:
        return _parse_json_file(path)
    except DataError as exc:
        if not hint:
            raise
        raise DataError(f"{exc}; {hint}") from exc


def _parse_json_file(path: str | os.PathLike[str]) -> Any:
    try:
        with open_text(path, "json") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid json at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    except RecursionError as exc:
        raise DataError(f"{path}: invalid json: nested too deeply to read") from exc
    except ValueError as exc:  # an integer of more than 4300 digits (Python's limit on int parsing)
        raise DataError(f"{path}: invalid json: {str(exc).split(';')[0]}") from exc


def _parse_categories(raw: Any, problems: list[str]) -> tuple[Category, ...]:
    """The categories in file order, each with its keypoint schema; one without a valid id or name is left out.

    Every keypoint category must list the same keypoint names (one schema per data set).
    """
    if not isinstance(raw, list):
        problems.append(f"'categories' must be a list, got {type(raw).__name__}")
        return ()
    cats: list[Category] = []
    seen: set[int] = set()
    schema: tuple[str, ...] | None = None
    for i, c in enumerate(raw):
        cid = _record_id(c, i, "category", seen, problems)
        if cid is None:
            continue
        where, name = f"category {cid}", c.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: 'name' must be a non-empty string, got {show_value(name)}")
            continue
        if control_characters(name):
            problems.append(f"{where}: 'name' {show_value(name)} holds control characters {control_characters(name)}")
            continue
        kp = _category_keypoint_names(c.get("keypoints"), where=where, problems=problems)
        if kp:
            if schema is None:
                schema = kp
            elif kp != schema:
                problems.append(f"{where}: keypoint names differ from another category's (one schema per data set)")
        skeleton = parse_skeleton(c.get("skeleton") or [], len(kp), where=f"{where}: ", problems=problems)
        if "flip_pairs" in c:
            flip = _flip_index_from_pairs(c["flip_pairs"], kp, where, problems)
        else:
            flip = derive_flip_index(kp)
        sigmas = parse_sigmas(c.get("sigmas"), kp, where=f"{where}: 'sigmas'", problems=problems) or default_sigmas(kp)
        supercategory = c.get("supercategory", "")
        cats.append(
            Category(
                id=cid,
                name=name,
                supercategory=supercategory if isinstance(supercategory, str) else "",
                keypoints=kp,
                skeleton=skeleton,
                flip_index=flip,
                sigmas=sigmas,
            )
        )
    return tuple(cats)


def _record_id(record: Any, index: int, kind: str, seen: set[int], problems: list[str]) -> int | None:
    """The ``id`` of the ``index``-th record (a category or an image), added to ``seen``; None with the
    problem noted when the record is no object, its id no integer or one already ``seen``."""
    if not isinstance(record, dict):
        problems.append(f"{kind} #{index}: must be an object, got {type(record).__name__}")
        return None
    rid = record.get("id")
    if not is_int(rid):
        problems.append(f"{kind} #{index}: 'id' must be an integer, got {show_value(rid)}")
        return None
    if rid in seen:
        problems.append(f"{kind} {rid}: duplicate {kind} id")
        return None
    seen.add(rid)
    return rid


def parse_categories(raw: Any) -> tuple[tuple[Category, ...], list[str]]:
    """The categories of a COCO ``categories`` list (as :func:`parse_coco` reads them), and every problem
    found, one line each (a category with a problem is left out)."""
    problems: list[str] = []
    return _parse_categories(raw, problems), problems


def _category_keypoint_names(raw: Any, *, where: str, problems: list[str]) -> tuple[str, ...]:
    """A category's keypoint names (none when missing or malformed, the problem noted)."""
    kp_names = raw or []
    if not (isinstance(kp_names, list) and all(isinstance(n, str) for n in kp_names)):
        problems.append(f"{where}: 'keypoints' must be a list of names")
        kp_names = []
    kp = tuple(kp_names)
    if kp and len(set(kp)) != len(kp):
        problems.append(f"{where}: duplicate keypoint names")
    bad = next((n for n in kp if not n or control_characters(n)), None)
    if bad is not None:
        problems.append(f"{where}: keypoint name {show_value(bad)} is empty or holds control characters")
        kp = ()
    return kp


def parse_skeleton(raw: Any, k: int, *, where: str, problems: list[str]) -> tuple[tuple[int, int], ...]:
    """A skeleton's edges as pairs of 1-based indices of ``k`` keypoints (COCO's ``skeleton``, YOLO's data.yaml
    ``skeleton``); a malformed edge is noted (``where`` prefixes the message) and left out."""
    edges = []
    for edge in raw if isinstance(raw, list) else [raw]:
        if isinstance(edge, list | tuple) and len(edge) == 2 and all(is_int(e) and 1 <= e <= k for e in edge):
            edges.append((int(edge[0]), int(edge[1])))
        else:
            problems.append(f"{where}skeleton edge {show_value(edge)} is not a pair of 1-based keypoint indices")
    return tuple(edges)


def parse_sigmas(raw: Any, names: tuple[str, ...], *, where: str, problems: list[str]) -> tuple[float, ...]:
    """The OKS sigmas, one positive number per keypoint of ``names``: the defaults when ``raw`` is None, none
    when malformed (the problem noted, ``where`` naming the field)."""
    if raw is None:
        return default_sigmas(names)
    if isinstance(raw, list) and len(raw) == len(names) and _finite(raw) and all(s > 0 for s in raw):
        return tuple(float(s) for s in raw)
    problems.append(f"{where} must be {len(names)} positive numbers, got {show_value(raw)}")
    return ()


def _parse_images(raw: Any, image_root: str | os.PathLike[str] | None, problems: list[str]) -> tuple[ImageRecord, ...]:
    if not isinstance(raw, list):
        problems.append(f"'images' must be a list, got {type(raw).__name__}")
        return ()
    images: list[ImageRecord] = []
    seen_ids: set[int] = set()
    seen_names: dict[str, int] = {}
    for i, im in enumerate(raw):
        iid = _record_id(im, i, "image", seen_ids, problems)
        if iid is None:
            continue
        where = f"image {iid}"
        name, width, height = im.get("file_name"), im.get("width"), im.get("height")
        ok = True
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: 'file_name' must be a non-empty string, got {show_value(name)}")
            ok = False
        elif name in seen_names:
            problems.append(f"{where}: file_name {show_value(name)} already used by image {seen_names[name]}")
            ok = False
        else:
            seen_names[name] = iid
            try:  # the name, whether or not the images are checked; under a root, the root too
                check_image_name(name) if image_root is None else resolve_image_path(image_root, name)
            except DataError as exc:
                problems.append(f"{where}: {exc}")
                ok = False
        for key, value in (("width", width), ("height", height)):
            if not is_positive_integer(value):
                problems.append(f"{where}: '{key}' must be a positive integer, got {show_value(value)}")
                ok = False
        if ok:
            images.append(ImageRecord(id=iid, file_name=name, width=int(width), height=int(height)))
    return tuple(images)


class _Invalid(Exception):
    """A record's problem: the record is left out and the message (one line) noted."""


class _AnnotationRow(NamedTuple):
    """One annotation that passed every check: box xyxy px, label a class index, keypoints ``[K, 3]``."""

    id: int
    box: tuple[float, float, float, float]
    label: int
    iscrowd: bool
    area: float
    keypoints: np.ndarray | None
    score: float | None
    agreement: int | None


@dataclass
class _OptionalColumns:
    """Whether an annotation carried a ``score`` / an ``agreement``: then every image gets that column."""

    scores: bool = False
    agreement: bool = False


def _parse_annotations(
    raw: Any, images: tuple[ImageRecord, ...], categories: tuple[Category, ...], problems: list[str]
) -> dict[int, ImageLabels]:
    """The labels of every image (empty ones included); an annotation with a problem is left out."""
    if not isinstance(raw, list):
        problems.append(f"'annotations' must be a list, got {type(raw).__name__}")
        raw = []
    image_by_id = {im.id: im for im in images}
    class_of = {c.id: i for i, c in enumerate(categories)}
    kp_count = len(next((c.keypoints for c in categories if c.keypoints), ()))
    rows: dict[int, list[_AnnotationRow]] = {im.id: [] for im in images}
    columns = _OptionalColumns()
    seen: set[int] = set()
    for i, a in enumerate(raw):
        try:
            image_id, row = _parse_annotation(
                a, i, image_by_id=image_by_id, class_of=class_of, categories=categories, kp_count=kp_count,
                seen=seen, columns=columns,
            )  # fmt: skip
        except _Invalid as exc:
            problems.append(str(exc))
            continue
        rows[image_id].append(row)
    return {iid: _image_labels(rs, kp_count=kp_count, columns=columns) for iid, rs in rows.items()}


def _parse_annotation(
    a: Any,
    index: int,
    *,
    image_by_id: dict[int, ImageRecord],
    class_of: dict[int, int],
    categories: tuple[Category, ...],
    kp_count: int,
    seen: set[int],
    columns: _OptionalColumns,
) -> tuple[int, _AnnotationRow]:
    """One annotation checked field by field: its image id and row, or :class:`_Invalid` at the first problem.

    Adds its id to ``seen`` once the id is known to be new, and marks ``columns`` once a score or an
    agreement has been read, even when a later field fails.
    """
    where = f"annotation #{index}"
    if not isinstance(a, dict):
        raise _Invalid(f"{where}: must be an object, got {type(a).__name__}")
    aid = a.get("id")
    if not is_int(aid):
        raise _Invalid(f"{where}: 'id' must be an integer, got {show_value(aid)}")
    if aid in seen:
        raise _Invalid(f"annotation {aid}: duplicate annotation id")
    seen.add(aid)
    iid = a.get("image_id")
    where = f"annotation {aid} (image {show_value(iid)})" if not is_int(iid) else f"annotation {aid} (image {iid})"
    if not is_int(iid) or iid not in image_by_id:
        raise _Invalid(f"{where}: unknown image_id {show_value(iid)}")
    cid = a.get("category_id")
    if not is_int(cid) or cid not in class_of:
        raise _Invalid(f"{where}: unknown category_id {show_value(cid)}")
    x, y, w, h = _annotation_box(a.get("bbox"), image_by_id[iid], where=where)
    iscrowd = a.get("iscrowd", 0)
    if not is_int(iscrowd) or iscrowd not in (0, 1):
        raise _Invalid(f"{where}: 'iscrowd' must be 0 or 1, got {show_value(iscrowd)}")
    kps = _annotation_keypoints(a, categories[class_of[cid]], image_by_id[iid], where=where, kp_count=kp_count)
    score, agreement = _annotation_score_agreement(a, where=where, columns=columns)
    area = a.get("area")
    area = float(area) if is_finite_number(area) and area >= 0 else w * h
    return iid, _AnnotationRow(aid, (x, y, x + w, y + h), class_of[cid], bool(iscrowd), area, kps, score, agreement)


def _annotation_box(bbox: Any, img: ImageRecord, *, where: str) -> tuple[float, float, float, float]:
    """COCO's ``[x, y, w, h]`` as floats: finite, positive in size, inside the image up to the tolerance."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and _finite(bbox)):
        raise _Invalid(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {show_value(bbox)}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise _Invalid(f"{where}: box has non-positive width or height (w={w:g}, h={h:g})")
    tol = BOX_TOLERANCE_PX
    if x < -tol or y < -tol or x + w > img.width + tol or y + h > img.height + tol:
        raise _Invalid(f"{where}: box [{x:g}, {y:g}, {w:g}, {h:g}] lies outside the {img.width}x{img.height} image")
    return x, y, w, h


def _annotation_keypoints(
    a: dict[str, Any], category: Category, img: ImageRecord, *, where: str, kp_count: int
) -> np.ndarray | None:
    """``[K, 3]`` keypoints, or None in a data set without keypoints.

    An annotation of a category without keypoints, in a data set with them, gets K unlabeled points.
    Visibility must be 0, 1 or 2, except in predictions and pseudo-labels (a ``score``), where it is a score.
    A labeled keypoint (v > 0) lies inside the image up to the boxes' tolerance; a predicted one (v a score
    above 0) up to :data:`PREDICTED_KEYPOINT_SLACK` of the image's size beyond each edge.
    """
    if not kp_count:
        if a.get("keypoints"):
            raise _Invalid(f"{where}: has keypoints but its category {category.id} defines none")
        return None
    kp_raw = a.get("keypoints")
    if kp_raw is None and not category.keypoints:
        kp_raw = [0] * (3 * kp_count)
    if not (isinstance(kp_raw, list) and len(kp_raw) == 3 * kp_count):
        got = len(kp_raw) if isinstance(kp_raw, list) else type(kp_raw).__name__
        raise _Invalid(f"{where}: 'keypoints' must hold {3 * kp_count} numbers ({kp_count} x, y, v), got {got}")
    if not _finite(kp_raw):
        raise _Invalid(f"{where}: 'keypoints' must be finite numbers")
    kps = np.asarray(kp_raw, np.float64).reshape(kp_count, 3)
    if "score" not in a and not np.isin(kps[:, 2], (0, 1, 2)).all():
        raise _Invalid(f"{where}: keypoint visibility must be 0, 1 or 2")
    size = np.array([img.width, img.height], np.float64)
    slack = PREDICTED_KEYPOINT_SLACK * size if "score" in a else np.full(2, BOX_TOLERANCE_PX)
    outside = (kps[:, 2] > 0) & ((kps[:, :2] < -slack) | (kps[:, :2] > size + slack)).any(axis=1)
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        name = f" ({show_value(category.keypoints[k])})" if k < len(category.keypoints) else ""
        raise _Invalid(f"{where}: keypoint {k}{name} at ({kps[k, 0]:g}, {kps[k, 1]:g}) px lies outside the "
                       f"{img.width}x{img.height} image")  # fmt: skip
    return kps


def _annotation_score_agreement(
    a: dict[str, Any], *, where: str, columns: _OptionalColumns
) -> tuple[float | None, int | None]:
    """The optional ``score`` (in [0, 1]) and ``agreement`` (a count of views); marks ``columns`` when read."""
    score = a.get("score")
    if score is not None:
        if not (is_finite_number(score) and 0 <= score <= 1):
            raise _Invalid(f"{where}: 'score' must be a number in [0, 1], got {show_value(score)}")
        columns.scores = True
    agreement = a.get("agreement")
    if agreement is not None:
        if not is_int(agreement) or agreement < 0:
            raise _Invalid(f"{where}: 'agreement' must be a non-negative integer, got {show_value(agreement)}")
        columns.agreement = True
    return score, agreement


def _image_labels(rows: list[_AnnotationRow], *, kp_count: int, columns: _OptionalColumns) -> ImageLabels:
    """The rows of one image as arrays; a missing score reads 1.0 and a missing agreement 0."""
    if not rows:
        empty = ImageLabels.empty(kp_count)
        if columns.scores or columns.agreement:
            empty = ImageLabels(
                **{
                    **empty.__dict__,
                    "scores": np.zeros((0,), np.float64) if columns.scores else None,
                    "agreement": np.zeros((0,), np.int64) if columns.agreement else None,
                }
            )
        return empty
    return ImageLabels(
        ids=np.array([r.id for r in rows], np.int64),
        boxes=np.array([r.box for r in rows], np.float64).reshape(-1, 4),
        labels=np.array([r.label for r in rows], np.int64),
        iscrowd=np.array([r.iscrowd for r in rows], bool),
        area=np.array([r.area for r in rows], np.float64),
        keypoints=np.stack([r.keypoints for r in rows]) if kp_count else None,
        scores=np.array([1.0 if r.score is None else r.score for r in rows], np.float64) if columns.scores else None,
        agreement=(
            np.array([0 if r.agreement is None else r.agreement for r in rows], np.int64) if columns.agreement else None
        ),
    )


def parse_coco(
    raw: Any, *, image_root: str | os.PathLike[str] | None = None, path: Path | None = None
) -> tuple[CocoDataset, list[str]]:
    """Build a :class:`CocoDataset` from parsed json, collecting every problem found (one line each).

    Records with problems are left out of the returned data set; callers decide whether problems are
    fatal (:func:`load_coco`) or only reported (:func:`validate_coco`).
    """
    problems: list[str] = []
    if not isinstance(raw, dict):
        return CocoDataset(images=(), labels={}, categories=(), path=path), [
            f"top level must be a json object with 'images', 'annotations' and 'categories', got {type(raw).__name__}"
        ]
    for key in ("images", "categories"):
        if key not in raw:
            problems.append(f"missing key '{key}'")
    categories = _parse_categories(raw.get("categories", []), problems)
    images = _parse_images(raw.get("images", []), image_root, problems)
    labels = _parse_annotations(raw.get("annotations", []), images, categories, problems)
    info = {k: raw[k] for k in ("info", "licenses") if k in raw}
    return CocoDataset(images=images, labels=labels, categories=categories, path=path, info=info), problems


def load_coco(path: str | os.PathLike[str], *, image_root: str | os.PathLike[str] | None = None) -> CocoDataset:
    """Read a COCO json; any problem raises a one-line DataError that points to ``datadistill validate``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    raw = read_json(path, hint=f"run `datadistill validate {path}` to see every problem")
    dataset, problems = parse_coco(raw, image_root=image_root, path=path)
    if problems:
        images_hint = f" --images {image_root}" if image_root is not None else " --images DIR"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(
            f"{path}: {problems[0]}{more}; run `datadistill validate {path}{images_hint}` to see every problem"
        )
    return dataset


def check_images(dataset: CocoDataset, image_root: str | os.PathLike[str]) -> list[str]:
    """Problems with the image files: missing, unreadable, or a size that differs from the json."""
    problems = []
    for im in dataset.images:
        where = f"image {im.id} ({im.file_name})"
        file = Path(image_root) / im.file_name
        try:
            file = resolve_image_path(image_root, im.file_name)
            width, height = image_size(file)
            read_image(file)  # a full decode: truncated files pass the header check
        except DataError as exc:
            problems.append(f"{where}: {str(exc).removeprefix(f'{file}: ')}")
            continue
        if (width, height) != (im.width, im.height):
            problems.append(f"{where}: recorded size {im.width}x{im.height} differs from the file's {width}x{height}")
    return problems


def validate_coco(path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None) -> list[str]:
    """Every problem of a COCO json (and its images, when ``image_root`` is given), one line each."""
    try:
        raw = read_json(path)
    except DataError as exc:
        return [str(exc).removeprefix(f"{path}: ")]
    dataset, problems = parse_coco(raw, image_root=image_root, path=Path(path))
    if image_root is not None:
        problems += check_images(dataset, image_root)
    return problems


# ----------------------------------------------------------------------------------------------------
# writing


def _num(x: float) -> float:
    """Json-friendly number (no numpy types)."""
    return float(x)


def category_to_coco(cat: Category) -> dict[str, Any]:
    out: dict[str, Any] = {"id": cat.id, "name": cat.name, "supercategory": cat.supercategory}
    if cat.keypoints:
        out["keypoints"] = list(cat.keypoints)
        out["skeleton"] = [list(e) for e in cat.skeleton]
        # names, not indices: unambiguous next to the 1-based skeleton
        out["flip_pairs"] = [[cat.keypoints[i], cat.keypoints[j]] for i, j in enumerate(cat.flip_index) if i < j]
        out["sigmas"] = list(cat.sigmas)
    return out


def to_coco_dict(dataset: CocoDataset) -> dict[str, Any]:
    """The COCO json form of a data set (xywh boxes, flat keypoints, ``score``/``agreement`` when set)."""
    images = [{"id": im.id, "file_name": im.file_name, "width": im.width, "height": im.height} for im in dataset.images]
    cat_ids = [c.id for c in dataset.categories]
    annotations = []
    for im in dataset.images:
        lab = dataset.labels.get(im.id)
        if lab is None:
            continue
        for j in range(len(lab)):
            x1, y1, x2, y2 = (float(v) for v in lab.boxes[j])
            ann: dict[str, Any] = {
                "id": int(lab.ids[j]),
                "image_id": im.id,
                "category_id": cat_ids[int(lab.labels[j])],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": float(lab.area[j]),
                "iscrowd": int(lab.iscrowd[j]),
            }
            if lab.keypoints is not None:
                kp = lab.keypoints[j]
                ann["keypoints"] = [_num(v) for v in kp.reshape(-1)]
                ann["num_keypoints"] = int((kp[:, 2] > 0).sum())
            if lab.scores is not None:
                ann["score"] = float(lab.scores[j])
            if lab.agreement is not None:
                ann["agreement"] = int(lab.agreement[j])
            annotations.append(ann)
    out: dict[str, Any] = dict(dataset.info)
    out.update(
        images=images,
        annotations=annotations,
        categories=[category_to_coco(c) for c in dataset.categories],
    )
    return out


def save_coco(dataset: CocoDataset, path: str | os.PathLike[str]) -> None:
    """Write a data set as COCO json, atomically (a temporary file renamed into place)."""
    write_json_atomic(path, to_coco_dict(dataset))
