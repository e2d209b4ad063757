"""YOLO txt (Ultralytics layout) to and from COCO, for detection and pose.

The layout, as Ultralytics reads it::

    out/data.yaml              path, train, val, nc, names {index: name}; for pose kpt_shape, flip_idx, kpt_names
    out/images/sub/a.jpg       the images (hard links, copies or symbolic links of the originals)
    out/labels/sub/a.txt       one line per object: ``class cx cy w h [x y v]...``, all normalised to [0, 1]

A label file sits where Ultralytics looks for it: the image path with its last ``/images/`` replaced by
``/labels/`` and its extension by ``.txt`` (:func:`label_path`). An empty label file marks an image with
no objects (a known negative); a missing one is read the same way.

YOLO holds less than COCO. What it cannot hold (category ids, supercategories, the skeleton, OKS sigmas)
goes into extra keys of ``data.yaml``, which Ultralytics ignores, so COCO -> YOLO -> COCO keeps everything
both formats can express. It cannot keep crowd regions (skipped, with a logged count), scores, image and
annotation ids (renumbered 1..N in sorted file order), or coordinates of unlabeled keypoints (v=0 is
written ``0 0 0``, as Ultralytics does).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

from datadistill.data.coco import (
    Category,
    CocoDataset,
    ImageLabels,
    ImageRecord,
    control_characters,
    derive_flip_index,
    is_int,
    load_coco,
    open_text,
    parse_sigmas,
    parse_skeleton,
    save_coco,
    show_value,
)
from datadistill.data.images import IMAGE_EXTENSIONS, image_size, list_images, resolve_image_path
from datadistill.errors import DataError, UserError
from datadistill.runtime.io import write_text_atomic

log = logging.getLogger(__name__)

LINK_MODES = ("hardlink", "copy", "symlink")
# Other tools round normalised coordinates (Ultralytics' own converter writes 6 digits); values may leave
# [0, 1] by this much before a label line is refused.
COORD_TOLERANCE = 1e-4
# Ten significant digits: a normalised value is off by at most 5e-11 of the image side (5e-7 px on a
# 10,000 px image), far below the float32 resolution of the boxes themselves.
_FLOAT_FORMAT = "{:.10g}"
_YAML_NAMES = ("data.yaml", "data.yml")
# Box edges past the image are clipped when read; only clips larger than float rounding are reported.
_CLIP_REPORT_PX = 1e-3


def label_path(image_path: str | os.PathLike[str]) -> Path:
    """Where Ultralytics looks for the labels of ``image_path``.

    The last ``/images/`` component becomes ``/labels/`` and the extension becomes ``.txt``; a path with no
    ``images`` folder has its labels next to it. Pass an absolute path: the rule works on the whole string.
    """
    text = os.fspath(image_path)
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if images in text:
        head, tail = text.rsplit(images, 1)
        text = head + labels + tail
    return Path(text).with_suffix(".txt")


# ----------------------------------------------------------------------------------------------------
# COCO -> YOLO


@dataclass
class _WriteCounts:
    crowd: int = 0
    crowd_only_images: int = 0
    clipped_boxes: int = 0
    dropped_boxes: int = 0
    clipped_keypoints: int = 0
    scored_keypoints: int = 0
    examples: dict[str, str] = field(default_factory=dict)

    def note(self, what: str, where: str) -> None:
        self.examples.setdefault(what, where)


def _fmt(value: float) -> str:
    return _FLOAT_FORMAT.format(float(value) + 0.0)  # + 0.0 turns -0.0 into 0.0


def _label_lines(
    labels: ImageLabels | None, record: ImageRecord, num_keypoints: int, counts: _WriteCounts
) -> list[str]:
    """The YOLO lines of one image; crowd regions are skipped and counted."""
    if labels is None or len(labels) == 0:
        return []
    width, height = float(record.width), float(record.height)
    where = f"image {record.id} ({record.file_name})"
    lines = []
    for j in range(len(labels)):
        if bool(labels.iscrowd[j]):
            counts.crowd += 1
            continue
        x1, y1, x2, y2 = (float(v) for v in labels.boxes[j])
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
            y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
            if x2 <= x1 or y2 <= y1:
                counts.dropped_boxes += 1
                counts.note("dropped_boxes", where)
                continue
            counts.clipped_boxes += 1
            counts.note("clipped_boxes", where)
        values = [
            (x1 + x2) / 2 / width,
            (y1 + y2) / 2 / height,
            (x2 - x1) / width,
            (y2 - y1) / height,
        ]
        parts = [str(int(labels.labels[j]))] + [_fmt(v) for v in values]
        if num_keypoints:
            assert labels.keypoints is not None
            for x, y, v in labels.keypoints[j].astype(np.float64):
                if v == 0:
                    parts += ["0", "0", "0"]
                    continue
                if v not in (1, 2):  # a score (pseudo-labels): YOLO has visibility only
                    counts.scored_keypoints += 1
                    v = 2
                nx, ny = x / width, y / height
                if not (0 <= nx <= 1 and 0 <= ny <= 1):
                    nx, ny = min(max(nx, 0.0), 1.0), min(max(ny, 0.0), 1.0)
                    counts.clipped_keypoints += 1
                    counts.note("clipped_keypoints", where)
                parts += [_fmt(nx), _fmt(ny), str(int(v))]
        lines.append(" ".join(parts))
    if not lines:
        counts.crowd_only_images += 1
    return lines


def _check_schema(dataset: CocoDataset) -> None:
    """YOLO keeps one skeleton, flip map and sigma list per data set: warn when categories disagree."""
    ref = dataset.keypoint_category
    if ref is None:
        return
    for cat in dataset.categories:
        if cat.keypoints and (cat.skeleton, cat.flip_index, cat.sigmas) != (ref.skeleton, ref.flip_index, ref.sigmas):
            log.warning(
                "category %d (%s) has another skeleton, flip map or sigmas than category %d (%s); "
                "YOLO keeps one per data set, category %d's is written",
                cat.id, cat.name, ref.id, ref.name, ref.id,
            )  # fmt: skip


def _place_image(source: Path, target: Path, link: str) -> str:
    """Put ``source`` at ``target`` by ``link``; returns the mode used (hard links fall back to copies)."""
    if target.exists() or target.is_symlink():
        if target.exists() and os.path.samefile(source, target):
            return link
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    if link == "symlink":
        target.symlink_to(source)
        return link
    if link == "hardlink":
        try:
            os.link(source, target)
            return link
        except OSError as exc:
            log.debug("hard link %s -> %s failed (%s); copying", source, target, exc)
    shutil.copy2(source, target)
    return "copy"


def _yaml_text(sections: list[tuple[str, dict[str, Any]]]) -> str:
    """YAML with block mappings and flow lists (``kpt_shape: [5, 3]``), each section after its comment."""

    class Dumper(yaml.SafeDumper):
        pass

    def flow_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)

    Dumper.add_representer(list, flow_list)
    parts = []
    for comment, mapping in sections:
        if not mapping:
            continue
        parts.append("".join(f"# {line}\n" for line in comment.splitlines()))
        parts.append(yaml.dump(mapping, Dumper=Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True))
    return "".join(parts)


def coco_to_yolo(
    dataset: CocoDataset,
    image_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    link: str = "hardlink",
) -> Path:
    """Write ``dataset`` as an Ultralytics YOLO folder; returns the path of its ``data.yaml``.

    Images go to ``out_dir/images/<file_name>`` (subfolders kept) by ``link``: ``"hardlink"`` (copies where
    the file system refuses links), ``"copy"`` or ``"symlink"`` (absolute links to the originals; note that
    datadistill's own COCO loader refuses image files that link out of their image root, so read a json
    made from such a folder with the original image root). Labels go
    to :func:`label_path` of each image; an image with no objects gets an empty file. Class indices follow
    the order of ``dataset.categories``. Coordinates are normalised by each image's recorded width and
    height, which must match the file (checked from its header); boxes and keypoints that stick out of the
    image are clipped to it, crowd regions skipped, keypoint scores written as visibility 2 (each logged with
    a count). ``data.yaml`` is written last, atomically, after every image and label file.

    Raises DataError (one line, with the count of other problems) for missing or unreadable images, sizes
    that differ from the files, non-image extensions and two images that would share a label file; and
    UserError when ``out_dir/images`` already holds images that are not in ``dataset``.
    """
    if link not in LINK_MODES:
        raise ValueError(f"link must be one of {', '.join(LINK_MODES)}, got {link!r}")
    out = Path(out_dir).resolve()
    images_dir = out / "images"
    plan = _plan_images(dataset, image_root, out=out)
    _check_no_stale_images(dataset, images_dir)
    _check_schema(dataset)
    counts = _WriteCounts()
    copied = _write_images_and_labels(dataset, plan, link=link, counts=counts)
    if copied:
        log.info("%d images copied: hard links are not possible from %s to %s", copied, image_root, images_dir)
    _log_write_counts(dataset, counts)
    yaml_path = out / "data.yaml"
    write_text_atomic(yaml_path, _data_yaml(dataset, out))
    log.info("wrote %d images and their labels to %s", len(plan), out)
    return yaml_path


class _PlannedImage(NamedTuple):
    record: ImageRecord
    source: Path  # the original image
    target: Path  # where it goes, under out/images
    labels: Path  # its label file


def _plan_images(dataset: CocoDataset, image_root: str | os.PathLike[str], *, out: Path) -> list[_PlannedImage]:
    """Where each image and its label file go, after checking every image; nothing is written yet.

    Raises DataError with the first problem and the count of the others.
    """
    images_dir = out / "images"
    problems: list[str] = []
    plan: list[_PlannedImage] = []
    owner: dict[Path, str] = {}
    for record in dataset.images:
        where = f"image {record.id} ({record.file_name})"
        if Path(record.file_name).suffix.lower() not in IMAGE_EXTENSIONS:
            problems.append(
                f"{where}: not an image extension YOLO readers list ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
            continue
        try:
            source = resolve_image_path(image_root, record.file_name)
            size = image_size(source)
        except DataError as exc:
            problems.append(f"{where}: {exc}")
            continue
        # Checked by name only: in an earlier symlink-mode output the target may link out of images_dir.
        target = Path(os.path.normpath(images_dir / record.file_name))
        if not target.is_relative_to(images_dir):
            problems.append(f"{where}: image path leaves {images_dir}")
            continue
        if size != (record.width, record.height):
            problems.append(
                f"{where}: recorded size {record.width}x{record.height} differs from the file's {size[0]}x{size[1]}"
            )
            continue
        labels = label_path(target)
        if labels in owner:
            problems.append(f"{where}: shares the label file {labels.relative_to(out)} with {owner[labels]}")
            continue
        owner[labels] = record.file_name
        plan.append(_PlannedImage(record, source, target, labels))
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DataError(f"cannot convert to YOLO: {problems[0]}{more}")
    return plan


def _check_no_stale_images(dataset: CocoDataset, images_dir: Path) -> None:
    """UserError when ``images_dir`` holds images that are not in ``dataset`` (YOLO would train on them)."""
    if not images_dir.is_dir():
        return
    stale = sorted(set(list_images(images_dir)) - {r.file_name for r in dataset.images})
    if stale:
        raise UserError(
            f"{images_dir} already holds {len(stale)} images that are not in the data set "
            f"(e.g. {stale[0]}); write to an empty folder"
        )


def _write_images_and_labels(
    dataset: CocoDataset, plan: list[_PlannedImage], *, link: str, counts: _WriteCounts
) -> int:
    """Place every image and write its label file; returns how many images were copied instead of linked."""
    copied = 0
    for record, source, target, labels in plan:
        if _place_image(source, target, link) != link:
            copied += 1
        lines = _label_lines(dataset.labels.get(record.id), record, dataset.num_keypoints, counts)
        labels.parent.mkdir(parents=True, exist_ok=True)
        labels.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return copied


def _log_write_counts(dataset: CocoDataset, counts: _WriteCounts) -> None:
    """Log what YOLO could not hold as given: crowd regions, clipped boxes and keypoints, scores."""
    if counts.crowd:
        log.warning(
            "skipped %d crowd annotations (YOLO has no iscrowd); %d images that had only crowd regions "
            "are written as images with no objects",
            counts.crowd, counts.crowd_only_images,
        )  # fmt: skip
    for key, what in (
        ("clipped_boxes", "boxes that stick out of their image clipped to it"),
        ("dropped_boxes", "boxes that lie outside their image dropped"),
        ("clipped_keypoints", "keypoints outside their image clipped to its border"),
    ):
        if getattr(counts, key):
            log.warning("%d %s (first in %s)", getattr(counts, key), what, counts.examples[key])
    if counts.scored_keypoints:
        log.warning("%d keypoints had a score, not a visibility; written as visible (2)", counts.scored_keypoints)
    if any(lab.scores is not None for lab in dataset.labels.values()):
        log.info("scores dropped: YOLO label files hold none")


def _data_yaml(dataset: CocoDataset, out: Path) -> str:
    """The text of ``data.yaml``: what Ultralytics reads, then the extras that keep what YOLO cannot hold."""
    cats = dataset.categories
    core: dict[str, Any] = {
        "path": str(out),
        "train": "images",
        "val": "images",
        "nc": len(cats),
        "names": {i: c.name for i, c in enumerate(cats)},
    }
    kp_cat = dataset.keypoint_category
    extras: dict[str, Any] = {"category_ids": [int(c.id) for c in cats]}
    if any(c.supercategory for c in cats):
        extras["supercategories"] = {i: c.supercategory for i, c in enumerate(cats)}
    if kp_cat is not None:
        core["kpt_shape"] = [dataset.num_keypoints, 3]
        core["flip_idx"] = [int(i) for i in kp_cat.flip_index]
        core["kpt_names"] = {i: list(c.keypoints) for i, c in enumerate(cats) if c.keypoints}
        extras["skeleton"] = [[int(a), int(b)] for a, b in kp_cat.skeleton]
        extras["kpt_sigmas"] = [float(s) for s in kp_cat.sigmas]
    source_name = dataset.path.name if dataset.path is not None else "a COCO data set"
    return _yaml_text(
        [
            (
                f"YOLO data set (Ultralytics layout) written by datadistill from {source_name}.\n"
                "'val' lists the same images as 'train': point it at validation images before training.",
                core,
            ),
            (
                "datadistill extras that Ultralytics ignores: what YOLO cannot hold, kept for the way back.\n"
                "skeleton edges are 1-based keypoint indices, as in COCO.",
                extras,
            ),
        ]
    )


# ----------------------------------------------------------------------------------------------------
# YOLO -> COCO


def _find_yaml(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.exists():
        raise DataError(f"{path}: not found (expected a YOLO data.yaml or the folder that holds it)")
    for name in _YAML_NAMES:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    if len(found) == 1:
        return found[0]
    which = f"{len(found)} yaml files ({', '.join(p.name for p in found)})" if found else "no yaml file"
    raise DataError(f"{path}: expected a data.yaml in the folder, found {which}")


def read_data_yaml(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Path]:
    """Parse a YOLO data.yaml (``path`` may be the folder that holds it) with ``yaml.safe_load``.

    Returns the mapping and the yaml's path. Python object tags and other unsafe YAML are refused.
    """
    yaml_path = _find_yaml(Path(path))
    try:
        with open_text(yaml_path, "YAML") as f:
            data = yaml.safe_load(f)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise DataError(f"{yaml_path}: invalid YAML{at}: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise DataError(f"{yaml_path}: invalid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        raise DataError(f"{yaml_path}: expected a mapping with 'train' and 'names', got {type(data).__name__}")
    return data, yaml_path


def _dataset_root(data: dict[str, Any], yaml_path: Path) -> Path:
    """The folder that ``train``/``val`` are relative to.

    Ultralytics resolves a relative ``path`` against the working folder or its settings' datasets folder;
    here it is tried against the yaml's folder, then the working folder. A ``path`` that does not exist
    (a moved folder) falls back to the yaml's folder, as does a missing one.
    """
    here = yaml_path.parent
    raw = data.get("path")
    if raw in (None, ""):
        return here
    if not isinstance(raw, str):
        raise DataError(f"{yaml_path}: 'path' must be a folder name, got {show_value(raw)}")
    given = Path(raw).expanduser()
    candidates = [given] if given.is_absolute() else [here / given, Path.cwd() / given]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    log.warning("%s: 'path' %s does not exist; reading relative to the yaml's folder %s", yaml_path, raw, here)
    return here


def _per_class(value: Any, nc: int, key: str, problems: list[str]) -> dict[int, Any]:
    """A ``{class index: value}`` mapping from YAML written as a mapping or a list."""
    if isinstance(value, list):
        value = dict(enumerate(value))
    if not isinstance(value, dict):
        problems.append(f"'{key}' must be a mapping of class index to value, got {type(value).__name__}")
        return {}
    out = {}
    for k, v in value.items():
        if not (is_int(k) and 0 <= k < nc):
            problems.append(f"'{key}' has key {show_value(k)}, not a class index in 0..{nc - 1}")
            continue
        out[k] = v
    return out


class _KeypointSchema(NamedTuple):
    """The keypoint metadata of a YOLO data set: names per class index, flip map, skeleton (1-based), sigmas."""

    names: dict[int, tuple[str, ...]]
    flip: tuple[int, ...]
    skeleton: tuple[tuple[int, int], ...]
    sigmas: tuple[float, ...]


def _categories_from_yaml(data: dict[str, Any], problems: list[str]) -> tuple[tuple[Category, ...], int, int]:
    """Categories in class-index order, the number of keypoints K and their dims (2 or 3; 0 for boxes)."""
    raw_names = data.get("names")
    if raw_names is None:
        problems.append("missing key 'names'")
        return (), 0, 0
    names = _class_names(raw_names, problems)
    nc = len(names)
    if "nc" in data and data["nc"] != nc:
        problems.append(f"'nc' is {show_value(data['nc'])} but 'names' lists {nc} classes")
    ids = data.get("category_ids")
    if ids is None:
        ids = list(range(1, nc + 1))
    elif not (isinstance(ids, list) and len(ids) == nc and all(is_int(i) for i in ids) and len(set(ids)) == nc):
        problems.append(f"'category_ids' must be {nc} distinct integers, got {show_value(ids)}")
        ids = list(range(1, nc + 1))
    supers = _per_class(data.get("supercategories") or {}, nc, "supercategories", problems)
    k, dims = _keypoint_shape(data.get("kpt_shape"), problems)
    schema = _KeypointSchema(names={}, flip=(), skeleton=(), sigmas=())
    if k:
        schema = _keypoint_schema(data, k=k, nc=nc, problems=problems)
    elif data.get("kpt_names"):
        problems.append("'kpt_names' given without 'kpt_shape'")
    categories = []
    for i, name in enumerate(names):
        kp = schema.names.get(i, ())
        sup = supers.get(i, "")
        categories.append(
            Category(
                id=int(ids[i]),
                name=name,
                supercategory=sup if isinstance(sup, str) else str(sup),
                keypoints=kp,
                skeleton=schema.skeleton if kp else (),
                flip_index=schema.flip if kp else (),
                sigmas=schema.sigmas if kp else (),
            )
        )
    return tuple(categories), k, dims


def _class_names(raw_names: Any, problems: list[str]) -> list[str]:
    """One name per class index from ``names`` (a list or a mapping); numbers become text, gaps ``class{i}``."""
    nc = len(raw_names) if isinstance(raw_names, list | dict) else 0
    by_index = _per_class(raw_names, nc, "names", problems)
    names = []
    for i in range(nc):
        name = by_index.get(i)
        if isinstance(name, int | float) and not isinstance(name, bool):
            name = str(name)
        if not isinstance(name, str) or not name or control_characters(name):
            problems.append(
                f"'names' has no name for class {i}" if i not in by_index else f"class {i}: bad name {show_value(name)}"
            )
            name = f"class{i}"
        names.append(name)
    return names


MAX_KEYPOINTS = 10_000  # far above any real skeleton (COCO 17, whole-body 133, face meshes 468)


def _keypoint_shape(shape: Any, problems: list[str]) -> tuple[int, int]:
    """``kpt_shape`` as (K, dims); (0, 0) when absent (a box data set) or malformed (the problem noted)."""
    if shape is None:
        return 0, 0
    if isinstance(shape, list) and len(shape) == 2 and is_int(shape[0]) and shape[0] > 0 and shape[1] in (2, 3):
        if shape[0] > MAX_KEYPOINTS:  # a hostile K would have every default name built in memory
            problems.append(f"'kpt_shape' has {shape[0]} keypoints; at most {MAX_KEYPOINTS} are read")
            return 0, 0
        return int(shape[0]), int(shape[1])
    problems.append(f"'kpt_shape' must be [K, 2] or [K, 3] with K > 0, got {show_value(shape)}")
    return 0, 0


def _keypoint_schema(data: dict[str, Any], *, k: int, nc: int, problems: list[str]) -> _KeypointSchema:
    """The keypoint names (``kpt_names``, else ``kp0``..), flip map, skeleton and sigmas of K keypoints.

    A missing ``flip_idx`` is derived from the names, missing sigmas are the defaults; a malformed value is
    noted in ``problems``.
    """
    names: dict[int, tuple[str, ...]] = {}
    raw_kpt_names = data.get("kpt_names")
    if raw_kpt_names:
        for i, kn in _per_class(raw_kpt_names, nc, "kpt_names", problems).items():
            if isinstance(kn, list) and len(kn) == k and all(isinstance(n, str) and n and not control_characters(n)
                                                             for n in kn):  # fmt: skip
                names[i] = tuple(kn)
            else:
                problems.append(f"'kpt_names' for class {i} must be {k} names, got {show_value(kn)}")
        if len(set(names.values())) > 1:
            problems.append("'kpt_names' differ between classes (one keypoint schema per data set)")
    if not names:
        names = {i: tuple(f"kp{j}" for j in range(k)) for i in range(nc)}
    kp_names = next(iter(names.values()), ())
    if len(set(kp_names)) != len(kp_names):
        problems.append("'kpt_names' has duplicate names")

    flip: tuple[int, ...] = ()
    raw_flip = data.get("flip_idx")
    if raw_flip is None:
        flip = derive_flip_index(kp_names)
    elif (
        isinstance(raw_flip, list)
        and all(is_int(i) for i in raw_flip)
        and sorted(raw_flip) == list(range(k))
        and all(raw_flip[j] == i for i, j in enumerate(raw_flip))
    ):
        flip = tuple(int(i) for i in raw_flip)
    else:
        problems.append(
            f"'flip_idx' must be a permutation of 0..{k - 1} made of swaps (its own inverse),"
            f" got {show_value(raw_flip)}"
        )
    return _KeypointSchema(
        names=names,
        flip=flip,
        skeleton=parse_skeleton(data.get("skeleton") or [], k, where="", problems=problems),
        sigmas=parse_sigmas(data.get("kpt_sigmas"), kp_names, where="'kpt_sigmas'", problems=problems),
    )


@dataclass
class _ReadCounts:
    clipped_boxes: int = 0
    missing_label_files: int = 0


class _Invalid(Exception):
    """A label line's problem: the line is left out and the message (one line) noted."""


def _parse_label_file(
    text: str,
    *,
    where: str,
    num_classes: int,
    num_keypoints: int,
    dims: int,
    width: int,
    height: int,
    problems: list[str],
    counts: _ReadCounts,
) -> list[tuple[int, tuple[float, float, float, float], np.ndarray | None]]:
    """The objects of one label file: (class index, xyxy box in px, ``[K, 3]`` keypoints in px or None)."""
    expected = 5 + num_keypoints * dims
    if num_keypoints:
        kp_desc = "x y v" if dims == 3 else "x y"
        layout = f"class cx cy w h + {num_keypoints} keypoints {kp_desc}"
    else:
        layout = "class cx cy w h"
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        at = f"{where} line {number}"
        try:
            values = _line_values(
                tokens, line, at=at, expected=expected, layout=layout, polygons_possible=not num_keypoints
            )
            cls = _line_class(values[0], tokens[0], at=at, num_classes=num_classes)
            box = _line_box(values[1:5], tokens, at=at, width=width, height=height, counts=counts)
            keypoints = None
            if num_keypoints:
                keypoints = _line_keypoints(
                    values[5:], at=at, num_keypoints=num_keypoints, dims=dims, width=width, height=height
                )
        except _Invalid as exc:
            problems.append(str(exc))
            continue
        rows.append((cls, box, keypoints))
    return rows


def _line_values(
    tokens: list[str], line: str, *, at: str, expected: int, layout: str, polygons_possible: bool
) -> list[float]:
    """The line's ``expected`` numbers, all finite."""
    if len(tokens) != expected:
        hint = ""
        if polygons_possible and len(tokens) > 5 and len(tokens) % 2 == 1:
            hint = "; segmentation polygons are not supported"
        raise _Invalid(f"{at}: expected {expected} values ({layout}), got {len(tokens)}{hint}")
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        bad = next(t for t in tokens if not _parses(t))
        raise _Invalid(f"{at}: {show_value(bad)} is not a number") from None
    if not all(math.isfinite(v) for v in values):
        raise _Invalid(f"{at}: values must be finite, got {show_value(line.strip())}")
    return values


def _line_class(value: float, token: str, *, at: str, num_classes: int) -> int:
    """The class index, an integer in ``0..num_classes - 1``."""
    if not (value.is_integer() and 0 <= value < num_classes):
        raise _Invalid(f"{at}: class {token} is not a class index in 0..{num_classes - 1}")
    return int(value)


def _line_box(
    values: list[float], tokens: list[str], *, at: str, width: int, height: int, counts: _ReadCounts
) -> tuple[float, float, float, float]:
    """Normalised ``cx cy w h`` as an xyxy box in px, clipped to the image (a clip past rounding is counted)."""
    tol = COORD_TOLERANCE
    cx, cy, w, h = values
    outside = next((i for i in range(4) if not -tol <= values[i] <= 1 + tol), None)
    if outside is not None:
        name = ("cx", "cy", "w", "h")[outside]
        raise _Invalid(f"{at}: {name}={tokens[outside + 1]} is outside [0, 1] (coordinates are normalised)")
    if w <= 0 or h <= 0:
        raise _Invalid(f"{at}: box width and height must be positive, got w={tokens[3]}, h={tokens[4]}")
    box = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
    x1, y1 = max(box[0], 0.0), max(box[1], 0.0)
    x2, y2 = min(box[2], float(width)), min(box[3], float(height))
    if x2 <= x1 or y2 <= y1:
        raise _Invalid(f"{at}: box lies outside the image")
    if max(abs(a - b) for a, b in zip(box, (x1, y1, x2, y2), strict=True)) > _CLIP_REPORT_PX:
        counts.clipped_boxes += 1
    return x1, y1, x2, y2


def _line_keypoints(
    values: list[float], *, at: str, num_keypoints: int, dims: int, width: int, height: int
) -> np.ndarray:
    """``[K, 3]`` keypoints in px from normalised ``x y v`` (or ``x y``: (0, 0) unlabeled, else visible)."""
    tol = COORD_TOLERANCE
    raw = np.asarray(values, np.float64).reshape(num_keypoints, dims)
    bad_xy = np.flatnonzero(((raw[:, :2] < -tol) | (raw[:, :2] > 1 + tol)).any(axis=1))
    if bad_xy.size:
        j = int(bad_xy[0])
        raise _Invalid(f"{at}: keypoint {j} ({raw[j, 0]:g}, {raw[j, 1]:g}) is outside [0, 1]")
    if dims == 3:
        vis = raw[:, 2]
        if not np.isin(vis, (0, 1, 2)).all():
            j = int(np.flatnonzero(~np.isin(vis, (0, 1, 2)))[0])
            raise _Invalid(f"{at}: keypoint {j} visibility must be 0, 1 or 2, got {vis[j]:g}")
    else:  # no visibility: (0, 0) marks a missing keypoint, anything else a labeled one
        vis = np.where((raw[:, 0] == 0) & (raw[:, 1] == 0), 0.0, 2.0)
    keypoints = np.zeros((num_keypoints, 3), np.float64)
    labeled = vis > 0
    keypoints[labeled, 0] = raw[labeled, 0] * width
    keypoints[labeled, 1] = raw[labeled, 1] * height
    keypoints[:, 2] = vis
    return keypoints


def _parses(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _display(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def yolo_to_coco(data_yaml_or_dir: str | os.PathLike[str], *, split: str = "train") -> tuple[CocoDataset, Path]:
    """Read one split of a YOLO folder as a :class:`CocoDataset`; returns it and its image root.

    ``split`` names a key of data.yaml (``train``, ``val``, ``test``) that must be a folder of images
    (file lists are not supported). File names are relative to that folder, which is the returned image
    root. Images get ids 1..N in sorted file order, annotations 1..M in that order and line order. Sizes
    come from the image headers (EXIF orientation applied). Categories come from ``names`` and, when
    present, the extras written by :func:`coco_to_yolo` (``category_ids``, ``supercategories``,
    ``skeleton``, ``kpt_sigmas``); keypoint names from ``kpt_names`` (else ``kp0``..), the flip map from
    ``flip_idx`` (else derived from the names). Labels with two values per keypoint get visibility 2,
    except (0, 0), which is unlabeled. Box edges past the image are clipped (logged with a count).

    Raises DataError (one line, naming the file and line, with the count of other problems) for any bad
    label line, a bad or missing data.yaml, or unreadable images.
    """
    data, yaml_path = read_data_yaml(data_yaml_or_dir)
    root = _dataset_root(data, yaml_path)
    images_dir = _split_folder(data, yaml_path, root=root, split=split)
    problems: list[str] = []
    categories, num_keypoints, dims = _categories_from_yaml(data, problems)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DataError(f"{yaml_path}: {problems[0]}{more}")
    file_names = list_images(images_dir)
    if not file_names:
        raise DataError(f"{yaml_path}: no images under the '{split}' folder {images_dir}")
    shown_root = root.resolve()
    counts = _ReadCounts()
    images, labels = _read_split(
        images_dir, file_names, categories=categories, num_keypoints=num_keypoints, dims=dims,
        shown_root=shown_root, problems=problems, counts=counts,
    )  # fmt: skip
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}")
    if counts.missing_label_files:
        log.info(
            "%d of %d images have no label file (read as images with no objects); labels are expected at %s",
            counts.missing_label_files, len(images), _display(label_path(images_dir / file_names[0]), shown_root),
        )  # fmt: skip
    if counts.clipped_boxes:
        log.warning("%d boxes stuck out of their image and were clipped to it", counts.clipped_boxes)
    dataset = CocoDataset(images=tuple(images), labels=labels, categories=categories)
    return dataset, images_dir


def _split_folder(data: dict[str, Any], yaml_path: Path, *, root: Path, split: str) -> Path:
    """The absolute folder of images that ``split`` names; DataError when it is missing or a file list."""
    if split not in data or data[split] in (None, ""):
        keys = ", ".join(k for k in ("train", "val", "test") if data.get(k))
        raise DataError(f"{yaml_path}: no '{split}' images (splits given: {keys or 'none'})")
    split_value = data[split]
    if not isinstance(split_value, str):
        raise DataError(f"{yaml_path}: '{split}' must be one folder of images, got {show_value(split_value)}")
    images_dir = Path(split_value).expanduser()
    images_dir = (images_dir if images_dir.is_absolute() else root / images_dir).resolve()
    if images_dir.is_file():
        raise DataError(f"{yaml_path}: '{split}' is a file list ({images_dir}); only a folder of images is supported")
    if not images_dir.is_dir():
        raise DataError(f"{yaml_path}: '{split}' folder {images_dir} not found")
    return images_dir


def _read_split(
    images_dir: Path,
    file_names: list[str],
    *,
    categories: tuple[Category, ...],
    num_keypoints: int,
    dims: int,
    shown_root: Path,
    problems: list[str],
    counts: _ReadCounts,
) -> tuple[list[ImageRecord], dict[int, ImageLabels]]:
    """Each image's record (size from its header) and labels (from its label file), ids 1..N in file order.

    An unreadable image or label file is noted in ``problems`` and left out; so is each bad label line.
    """
    images: list[ImageRecord] = []
    labels: dict[int, ImageLabels] = {}
    next_ann = 1
    for image_id, name in enumerate(file_names, start=1):
        image_file = images_dir / name
        try:
            width, height = image_size(image_file)
        except DataError as exc:
            problems.append(str(exc))
            continue
        images.append(ImageRecord(id=image_id, file_name=name, width=width, height=height))
        txt = label_path(image_file)
        where = _display(txt, shown_root)
        text = _read_label_text(txt, where=where, problems=problems, counts=counts)
        if text is None:
            continue
        rows = _parse_label_file(
            text, where=where, num_classes=len(categories), num_keypoints=num_keypoints, dims=dims, width=width,
            height=height, problems=problems, counts=counts,
        )  # fmt: skip
        labels[image_id] = _labels_from_rows(rows, first_id=next_ann, num_keypoints=num_keypoints)
        next_ann += len(rows)
    return images, labels


def _read_label_text(txt: Path, *, where: str, problems: list[str], counts: _ReadCounts) -> str | None:
    """A label file's text; a missing file reads as empty (counted), an unreadable one as None (noted)."""
    try:
        return txt.read_text(encoding="utf-8")
    except FileNotFoundError:
        counts.missing_label_files += 1
        return ""
    except UnicodeDecodeError as exc:
        problems.append(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})")
    except OSError as exc:
        problems.append(f"{where}: cannot read: {exc.strerror or exc}")
    return None


def _labels_from_rows(
    rows: list[tuple[int, tuple[float, float, float, float], np.ndarray | None]], *, first_id: int, num_keypoints: int
) -> ImageLabels:
    """The parsed lines of one label file as :class:`ImageLabels`, annotation ids counting up from ``first_id``."""
    if not rows:
        return ImageLabels.empty(num_keypoints)
    boxes = np.array([r[1] for r in rows], np.float64)
    return ImageLabels(
        ids=np.arange(first_id, first_id + len(rows), dtype=np.int64),
        boxes=boxes.astype(np.float32),
        labels=np.array([r[0] for r in rows], np.int64),
        iscrowd=np.zeros(len(rows), bool),
        area=((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.float32),
        keypoints=np.stack([r[2] for r in rows]).astype(np.float32) if num_keypoints else None,
    )


# ----------------------------------------------------------------------------------------------------
# the CLI's entry point


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str,
    images: str | os.PathLike[str] | None,
    split: str = "train",
    link: str = "hardlink",
) -> Path:
    """Convert between COCO json and a YOLO folder; returns what was written.

    ``to="yolo"``: ``src`` is a COCO json, ``images`` its image root (required), ``dst`` the YOLO folder to
    write (see :func:`coco_to_yolo`, ``link`` says how images get there); returns its data.yaml.

    ``to="coco"``: ``src`` is a YOLO data.yaml or its folder, ``split`` the split to read, ``dst`` the COCO
    json to write; ``images`` must be None (the YOLO folder names its images). The json's file names are
    relative to the split's images folder (``<yolo>/images`` for a folder written by :func:`coco_to_yolo`):
    use that folder as the image root with the written json. It is logged; returns the json's path.
    """
    if to == "yolo":
        if images is None:
            raise UserError("converting COCO to YOLO needs the image root (--images DIR)")
        dataset = load_coco(src, image_root=images)
        return coco_to_yolo(dataset, images, dst, link=link)
    if to == "coco":
        if images is not None:
            raise UserError("--images is only for --to yolo; a YOLO data.yaml names its own image folders")
        dataset, image_root = yolo_to_coco(src, split=split)
        dst = Path(dst)
        save_coco(dataset, dst)
        log.info(
            "wrote %s: %d images, %d annotations; its image root is %s (pass --images %s)",
            dst, len(dataset.images), dataset.num_annotations, image_root, image_root,
        )  # fmt: skip
        return dst
    raise UserError(f"unknown target format {to!r}; expected 'yolo' or 'coco'")
