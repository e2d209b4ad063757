"""Checks of a training run's inputs, shared by every backend's trainer: the image files exist, the model
can take every image, and pseudo-labels name the classes and keypoints of the labeled data."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from datadistill.core.views import resized_size
from datadistill.data.coco import CocoDataset, load_coco
from datadistill.data.images import missing_images, resolve_image_path
from datadistill.data.label_table import (
    FlatLabels,
    LabelTable,
    cache_label_table,
    is_label_table,
    open_label_table,
    read_label_table,
)
from datadistill.errors import DataError, UserError

# At most this many image files are looked for before training (a deterministic sample of a larger set); a
# file missing from the rest is a one-line DataError naming it when a DataLoader worker reads it.
CHECKED_IMAGES = 1000


def shorten(names: tuple[str, ...], limit: int = 6) -> str:
    """``[a, b, ... (N in all)]``: a list of names for a one-line message."""
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def _num_images(dataset: CocoDataset | FlatLabels | LabelTable) -> int:
    return len(dataset.images) if isinstance(dataset, CocoDataset) else len(dataset)


def _file_names(dataset: CocoDataset | FlatLabels | LabelTable, rows: np.ndarray) -> list[str]:
    """The file names of image positions ``rows`` (sorted)."""
    if isinstance(dataset, CocoDataset):
        return [dataset.images[int(r)].file_name for r in rows]
    if isinstance(dataset, FlatLabels):
        return [dataset.file_name(int(r)) for r in rows]
    return dataset.file_names(rows)


def check_image_files(
    dataset: CocoDataset | FlatLabels | LabelTable, image_root: str | os.PathLike[str], *, what: str, option: str
) -> None:
    """A one-line UserError naming the first missing image file and how many are missing (``image_root``: a
    folder, or an object-store prefix).

    Sets of more than :data:`CHECKED_IMAGES` images are checked on a deterministic sample of that many (a
    million ``stat`` calls on a network file system take minutes); the message then says so.
    """
    n = _num_images(dataset)
    rows = np.arange(n)
    if n > CHECKED_IMAGES:
        rows = np.sort(np.random.default_rng(0).choice(n, CHECKED_IMAGES, replace=False))
    names = _file_names(dataset, rows)
    for name in names:  # a name that leaves the root: the file named, not only the image
        try:
            resolve_image_path(image_root, name)
        except DataError as exc:
            raise DataError(f"{dataset.path}: {exc}") from None
    missing = missing_images(image_root, names)  # a URI prefix is listed once
    if missing:
        checked = f"the {n}" if len(rows) == n else f"{len(rows)} checked (a sample of the {n})"
        raise UserError(
            f"{len(missing)} of {checked} {what} images are missing from {option} {image_root}, the first: {missing[0]}"
        )


def check_input_sizes(dataset: CocoDataset | FlatLabels, path: Any, *, min_size: int, max_size: int) -> None:
    """A one-line UserError naming the first image a model that resizes its shorter side to ``min_size``
    (the longer at most ``max_size``) cannot take: one so elongated that a side would become 0 px (torch
    would raise in the middle of the run)."""
    if isinstance(dataset, CocoDataset):
        bad = [
            im for im in dataset.images if 0 in resized_size(im.height, im.width, min_size=min_size, max_size=max_size)
        ]
        count, first = len(bad), bad[0] if bad else None
    else:  # each distinct size once
        keys = dataset.heights.astype(np.int64) << 32 | dataset.widths.astype(np.int64)
        sizes = np.unique(keys)
        bad_keys = [k for k in sizes if 0 in resized_size(int(k >> 32), int(k & 0xFFFFFFFF), min_size=min_size,
                                                         max_size=max_size)]  # fmt: skip
        rows = np.flatnonzero(np.isin(keys, bad_keys)) if bad_keys else np.zeros(0, np.int64)
        count, first = len(rows), dataset.image_record(int(rows[0])) if len(rows) else None
    if first is not None:
        raise UserError(
            f"{path}: image {first.id} ({first.file_name}) is {first.width}x{first.height} px, too elongated for the "
            f"model's input size ({min_size}-{max_size} px); {count} such image(s): leave them out of the data set"
        )


def category_map(pseudo_names: tuple[str, ...], real: CocoDataset, path: str) -> np.ndarray | None:
    """``remap[c]``: the labeled data's class index of the pseudo-labels' class ``c`` (matched by name); None
    when the classes are the same, in the same order. A UserError when the names differ."""
    if pseudo_names == real.class_names:
        return None
    if sorted(pseudo_names) != sorted(real.class_names):
        raise UserError(
            f"{path}: pseudo-label categories {shorten(pseudo_names)} differ from the data's "
            f"{shorten(real.class_names)}"
        )
    index = {name: i for i, name in enumerate(real.class_names)}
    return np.array([index[name] for name in pseudo_names], np.int64)


def match_categories(pseudo: CocoDataset | FlatLabels, real: CocoDataset, path: str) -> CocoDataset | FlatLabels:
    """The pseudo-labels with their labels mapped to the real data's class indices (matched by name)."""
    remap = category_map(pseudo.class_names, real, path)
    if remap is None:
        return pseudo
    if isinstance(pseudo, FlatLabels):
        return pseudo.with_categories(real.categories, remap)
    labels = {
        iid: dataclasses.replace(lab, labels=remap[lab.labels]) if len(lab) else lab
        for iid, lab in pseudo.labels.items()
    }
    return dataclasses.replace(pseudo, labels=labels, categories=real.categories)


def load_pseudo_labels(
    path: str, image_root: str, real: CocoDataset, *, cache_dir: str | os.PathLike[str] | None = None
) -> FlatLabels:
    """The pseudo-labels at ``path`` (a label table, ``pseudo.parquet``, or a COCO json; images under
    ``image_root``) as flat arrays, checked against the labeled data ``real``: its images exist, its keypoints
    are the same, its classes are mapped to ``real``'s (by name).

    A label table is read one row group at a time into memory-mapped arrays under ``cache_dir`` (shared by
    the DataLoader workers and the other processes of the machine; in memory when None); a json is read
    whole, then made flat."""
    source: CocoDataset | LabelTable = (
        open_label_table(path) if is_label_table(path) else load_coco(path, image_root=image_root)
    )
    check_image_files(source, image_root, what="pseudo-label", option="--pseudo-images")
    real_kp = real.keypoint_category.keypoints if real.keypoint_category else ()
    pseudo_kp = source.keypoint_category.keypoints if source.keypoint_category else ()
    if pseudo_kp != real_kp:
        raise UserError(
            f"{path}: pseudo-label keypoints {shorten(pseudo_kp)} differ from the data's {shorten(real_kp)}"
        )
    remap = category_map(source.class_names, real, path)
    if isinstance(source, CocoDataset):
        flat = FlatLabels.from_coco(source)
    elif cache_dir is not None:
        flat = cache_label_table(source, cache_dir)
    else:
        flat = read_label_table(source)
    return flat if remap is None else flat.with_categories(real.categories, remap)


@dataclasses.dataclass(frozen=True)
class TrainingSets:
    """A training run's data: the labeled set, its pseudo-labels (a student) and its validation set."""

    dataset: CocoDataset
    pseudo: FlatLabels | None
    val: CocoDataset | None


def load_training_sets(
    *,
    data: str,
    images: str,
    pseudo: str | None = None,
    pseudo_images: str | None = None,
    val: str | None = None,
    val_images: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TrainingSets:
    """Load and check what every backend's trainer trains on: the labeled COCO json ``data`` (not empty, every
    image file under ``images``), the pseudo-labels (:func:`load_pseudo_labels`) and the validation set
    (its images under ``val_images``, default ``images``); each problem a one-line UserError. ``cache_dir``:
    where a label table's flat arrays are memory-mapped from (:func:`load_pseudo_labels`)."""
    dataset = load_coco(data, image_root=images)
    if not dataset.images:
        raise UserError(f"{data}: no images to train on")
    check_image_files(dataset, images, what="training", option="--images")
    pseudo_set = None
    if pseudo is not None:
        if pseudo_images is None:
            raise UserError("--pseudo needs --pseudo-images (the root of its images)")
        pseudo_set = load_pseudo_labels(pseudo, pseudo_images, dataset, cache_dir=cache_dir)
    val_set = None
    if val is not None:
        val_set = load_coco(val, image_root=val_images or images)
        check_image_files(val_set, val_images or images, what="validation", option="--val-images")
    return TrainingSets(dataset=dataset, pseudo=pseudo_set, val=val_set)
