"""Defaults read from the data where the user gave none: the input size of the small from-scratch models and
the views of ``views: auto``. Each choice is logged with its reason.

The rules are pure functions of a few numbers (:func:`input_size_rule`, :func:`views_rule`); the thresholds
were measured with ``bench/tiles.py`` and ``bench/real_trees.py`` (docs/results.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from datadistill.data.coco import CocoDataset, load_coco
from datadistill.models.detector import sized_by_data

log = logging.getLogger(__name__)

# The input sizes (short side, px) read from the data for the small models, by device type: 128 px is their
# own size (so data of 128 px or less trains as before). On a CPU at most 160 px, so that a default schedule
# takes at most 1.5x the time of 128 px: small_fcos at batch 8 on one thread trains 1.49x slower at 160 px than
# at 128, 2.05x at 192 and 3.8x at 256 (``bench/model_speed.py --models small_fcos --size-px 128,160,192,256``
# on the 2-core development machine; in datadistill's training loop on 256 px tiles, with the data loading,
# 1.35x at 160 and 1.78x at 192). On a GPU at most 512 px: an estimate (16x the pixels of 128 px for a 2.6M
# parameter model), not yet measured. Sizes are rounded to SIZE_STEP_PX.
INPUT_SIZE_RANGE_PX = {"cpu": (128, 160), "cuda": (128, 512)}
SIZE_STEP_PX = 32
# ``views: auto`` adds tiles when the model sees the images shrunk this much or more (bench/tiles.py: 512 px
# images at a 192 px input, 2.7x, tiles raised APs from 21.7 to 32.1) ...
TILE_SHRINK = 2.0
# ... or when the labeled objects' median side is below this many px at the model's input: about one and a
# half strides of the small models' finest level (8 px), where tiles.py's small shapes sit (5 to 12 px).
SMALL_OBJECT_PX = 12.0
# The tile grids auto chooses from (n x n tiles overlapping by a quarter: each magnified n - (n-1)/4 times).
TILE_GRIDS = (2, 3, 4)
TILE_OVERLAP = 0.25


@dataclass(frozen=True)
class DataSizes:
    """The sizes that the defaults are read from: the labeled images' median short and long sides and their
    objects' median side (the square root of the box area; crowd regions left out; 0.0 when there are none),
    all in px of the original images."""

    short_px: float
    long_px: float
    object_px: float

    @staticmethod
    def of(dataset: CocoDataset) -> DataSizes:
        shorts = [min(im.width, im.height) for im in dataset.images]
        longs = [max(im.width, im.height) for im in dataset.images]
        boxes = [lab.boxes[~lab.iscrowd] for lab in dataset.labels.values()]
        xyxy = np.concatenate(boxes) if boxes else np.zeros((0, 4))
        objects = np.sqrt(np.clip(xyxy[:, 2] - xyxy[:, 0], 0, None) * np.clip(xyxy[:, 3] - xyxy[:, 1], 0, None))
        return DataSizes(
            short_px=float(np.median(shorts)) if shorts else 0.0,
            long_px=float(np.median(longs)) if longs else 0.0,
            object_px=float(np.median(objects)) if objects.size else 0.0,
        )


def input_size_rule(sizes: DataSizes, *, device_type: str = "cpu") -> tuple[int, str]:
    """The input size (short side, px) of a small model for data of ``sizes`` trained on ``device_type``
    (``cpu`` or ``cuda``), and why."""
    low, high = INPUT_SIZE_RANGE_PX["cuda" if device_type == "cuda" else "cpu"]
    rounded = int(SIZE_STEP_PX * round(sizes.short_px / SIZE_STEP_PX))
    size = min(high, max(low, rounded))
    median = f"the labeled images' median short side ({sizes.short_px:.0f} px)"
    if size == rounded:
        return size, median
    bound = "at least" if size == low else f"at most (on a {'GPU' if device_type == 'cuda' else 'CPU'})"
    return size, f"{median}, clamped to {bound} {size} px"


def input_size(model: str, dataset: CocoDataset, *, device: str = "auto") -> int | None:
    """The input size of ``model`` trained on ``device`` read from ``dataset`` (logged with its reason); None
    for a model that keeps its own."""
    if not sized_by_data(model) or not dataset.images:
        return None
    from datadistill.runtime.devices import resolve_device

    size, reason = input_size_rule(DataSizes.of(dataset), device_type=resolve_device(device).type)
    log.info("training at %d px: %s (--min-size sets another)", size, reason)
    return size


def views_rule(sizes: DataSizes, *, min_size: int, max_size: int) -> tuple[str, str]:
    """``views: auto`` for a model of input ``min_size``-``max_size`` px on data of ``sizes``: the default views,
    plus the tiles of an n x n grid when the model sees the images shrunk :data:`TILE_SHRINK` times or more,
    or the objects smaller than :data:`SMALL_OBJECT_PX`; n is the grid whose magnification is the closest to
    what brings both back. Returns the views (``--views`` text) and the reason."""
    if sizes.short_px <= 0:
        return "default", "no labeled image sizes known"
    scale = min(min_size / sizes.short_px, max_size / max(sizes.long_px, sizes.short_px))
    object_px = sizes.object_px * scale
    wanted = [1 / scale] if 1 / scale >= TILE_SHRINK else []
    if 0 < object_px < SMALL_OBJECT_PX:
        wanted.append(SMALL_OBJECT_PX / object_px)
    seen = f"the model sees the labeled images at {scale:.2f}x ({sizes.short_px:.0f} px short side at {min_size} px)"
    if sizes.object_px > 0:
        seen += f" and their objects' median side at {object_px:.1f} px"
    if not wanted:
        return "default", seen
    magnification = max(wanted)
    n = min(TILE_GRIDS, key=lambda g: abs(g - (g - 1) * TILE_OVERLAP - magnification))
    return f"default,tile:{n}x{n}", f"{seen}: tiles magnify {n - (n - 1) * TILE_OVERLAP:.2f}x"


def training_data(spec: str) -> Path | None:
    """The labeled COCO json a trained model (a training folder or a file in one) was trained on, read from
    its ``config.yaml``; None where there is none (a model trained elsewhere) or it is gone."""
    from datadistill.models.detector import model_file, resolve_spec

    try:
        folder = Path(spec) if Path(spec).is_dir() else model_file(resolve_spec(spec)).parent
        config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
        data = Path(str(config["data"]))
    except Exception:  # noqa: BLE001 - any spec, folder or file that does not say: no data known
        return None
    return data if data.is_file() else None


def auto_views(views: str, *, spec: str, min_size: int, max_size: int) -> str:
    """``views`` with ``auto`` (the default of ``label --views``) replaced by the views that the teacher's
    labeled data calls for (:func:`views_rule`, logged with the reason); other views as given."""
    items = [v.strip() for v in views.split(",")]
    if "auto" not in items:
        return views
    data = training_data(spec)
    if data is None:
        chosen, reason = "default", f"no labeled data recorded beside {spec}"
    else:
        chosen, reason = views_rule(DataSizes.of(load_coco(data)), min_size=min_size, max_size=max_size)
    log.info("views: auto: %s: %s", chosen, reason)
    return ",".join(chosen if v == "auto" else v for v in items if v)
