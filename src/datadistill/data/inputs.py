"""Checks of a training run's inputs, shared by every backend's trainer: the image files exist, the model
can take every image, and pseudo-labels name the classes and keypoints of the labeled data."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from datadistill.core.views import resized_size
from datadistill.data.coco import CocoDataset, load_coco
from datadistill.data.images import missing_images
from datadistill.errors import UserError


def shorten(names: tuple[str, ...], limit: int = 6) -> str:
    """``[a, b, ... (N in all)]``: a list of names for a one-line message."""
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def check_image_files(dataset: CocoDataset, image_root: str | os.PathLike[str], *, what: str, option: str) -> None:
    """A one-line UserError naming the first missing image file and how many are missing (``image_root``: a
    folder, or an object-store prefix, listed once)."""
    missing = missing_images(image_root, [im.file_name for im in dataset.images])
    if missing:
        raise UserError(
            f"{len(missing)} of the {len(dataset.images)} {what} images are missing from {option} {image_root}, "
            f"the first: {missing[0]}"
        )


def check_input_sizes(dataset: CocoDataset, path: Any, *, min_size: int, max_size: int) -> None:
    """A one-line UserError naming the first image a model that resizes its shorter side to ``min_size``
    (the longer at most ``max_size``) cannot take: one so elongated that a side would become 0 px (torch
    would raise in the middle of the run)."""
    bad = [im for im in dataset.images if 0 in resized_size(im.height, im.width, min_size=min_size, max_size=max_size)]
    if bad:
        im = bad[0]
        raise UserError(
            f"{path}: image {im.id} ({im.file_name}) is {im.width}x{im.height} px, too elongated for the model's "
            f"input size ({min_size}-{max_size} px); {len(bad)} such image(s): leave them out of the data set"
        )


def match_categories(pseudo: CocoDataset, real: CocoDataset, path: str) -> CocoDataset:
    """The pseudo-labels with their labels mapped to the real data's class indices (matched by name)."""
    if pseudo.class_names == real.class_names:
        return pseudo
    if sorted(pseudo.class_names) != sorted(real.class_names):
        raise UserError(
            f"{path}: pseudo-label categories {shorten(pseudo.class_names)} differ from the data's "
            f"{shorten(real.class_names)}"
        )
    index = {name: i for i, name in enumerate(real.class_names)}
    remap = np.array([index[name] for name in pseudo.class_names], np.int64)
    labels = {
        iid: dataclasses.replace(lab, labels=remap[lab.labels]) if len(lab) else lab
        for iid, lab in pseudo.labels.items()
    }
    return dataclasses.replace(pseudo, labels=labels, categories=real.categories)


def load_pseudo_labels(path: str, image_root: str, real: CocoDataset) -> CocoDataset:
    """The pseudo-label COCO json at ``path`` (images under ``image_root``), checked against the labeled
    data ``real``: its images exist, its keypoints are the same, its classes are mapped to ``real``'s."""
    pseudo = load_coco(path, image_root=image_root)
    check_image_files(pseudo, image_root, what="pseudo-label", option="--pseudo-images")
    real_kp = real.keypoint_category.keypoints if real.keypoint_category else ()
    pseudo_kp = pseudo.keypoint_category.keypoints if pseudo.keypoint_category else ()
    if pseudo_kp != real_kp:
        raise UserError(
            f"{path}: pseudo-label keypoints {shorten(pseudo_kp)} differ from the data's {shorten(real_kp)}"
        )
    return match_categories(pseudo, real, path)


@dataclasses.dataclass(frozen=True)
class TrainingSets:
    """A training run's data: the labeled set, its pseudo-labels (a student) and its validation set."""

    dataset: CocoDataset
    pseudo: CocoDataset | None
    val: CocoDataset | None


def load_training_sets(
    *,
    data: str,
    images: str,
    pseudo: str | None = None,
    pseudo_images: str | None = None,
    val: str | None = None,
    val_images: str | None = None,
) -> TrainingSets:
    """Load and check what every backend's trainer trains on: the labeled COCO json ``data`` (not empty, every
    image file under ``images``), the pseudo-labels (:func:`load_pseudo_labels`) and the validation set
    (its images under ``val_images``, default ``images``); each problem a one-line UserError."""
    dataset = load_coco(data, image_root=images)
    if not dataset.images:
        raise UserError(f"{data}: no images to train on")
    check_image_files(dataset, images, what="training", option="--images")
    pseudo_set = None
    if pseudo is not None:
        if pseudo_images is None:
            raise UserError("--pseudo needs --pseudo-images (the root of its images)")
        pseudo_set = load_pseudo_labels(pseudo, pseudo_images, dataset)
    val_set = None
    if val is not None:
        val_set = load_coco(val, image_root=val_images or images)
        check_image_files(val_set, val_images or images, what="validation", option="--val-images")
    return TrainingSets(dataset=dataset, pseudo=pseudo_set, val=val_set)
