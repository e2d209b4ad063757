"""Multi-transform labeling (steps 2 and 3 of data distillation), streamed into resumable parquet shards.

The unlabeled images are listed once, in a deterministic order, and cut into shards of ``shard_size``
images. Each shard is decoded in DataLoader workers, run through the model under every view, fused, and
written as ``shards/part-NNNNN.parquet`` (to a temporary name, renamed when complete). A re-run skips the
shards that exist, so a killed run resumes without losing or repeating work; memory holds one shard.

Each parquet row is one image: ``file_name`` (relative to the source root), ``width``, ``height``, and
flat lists ``boxes`` (4N, xyxy px), ``scores`` (N), ``labels`` (N class indices), ``agreement`` (N, how
many views saw the object), ``keypoints`` (N*K*3, x, y, score; keypoint models only), and ``error``
(why an image was skipped, else null).

Scale-out writes the same shards: under ``torchrun`` rank ``r`` of ``W`` labels the shards ``k`` with
``k % W == r`` (rank 0 prepares the folder before any rank starts, and writes ``manifest.json`` once every
rank has finished); ``engine="ray"`` labels them on a Ray cluster (:mod:`datadistill.engines.ray`). Every
engine cuts a shard into the same forward-pass batches (:func:`plan_batches`), so the labels do not depend
on the engine, the number of processes, or where a resumed run started.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datadistill import distributed, fusion, models
from datadistill.coco import load_coco, read_json
from datadistill.errors import DataError, UserError
from datadistill.images import list_images, read_image, resolve_image_path
from datadistill.io import file_sha256, provenance, remove_temporaries, write_atomic, write_json_atomic
from datadistill.types import Detections
from datadistill.views import View, parse_views, resized_size

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "datadistill-labels"
BOX_FUSIONS = ("nms", "soft-nms", "vote", "wbf")
KEYPOINT_FUSIONS = ("heatmap", "mean")
# What must match for a re-run to resume a folder instead of refusing it.
RESUME_KEYS = ("checkpoint_sha256", "views", "fuse", "keypoint_fuse", "iou_thr", "score_floor", "shard_size",
               "batch_size", "files_sha256")  # fmt: skip
ENGINES = ("local", "ray")
# How long ranks under torchrun wait for each other: the last wait lasts as long as the slowest rank's
# remaining shards. A rank that dies is noticed by torchrun, which stops the others, not by this timeout.
RANK_WAIT = timedelta(days=7)


@dataclass(frozen=True)
class LabelConfig:
    """Every option of ``datadistill label``.

    ``rank``/``world_size``: this process's share under torchrun (the CLI reads them from ``RANK`` and
    ``WORLD_SIZE``). ``engine``: ``"local"`` (this process, or each torchrun rank) or ``"ray"`` (a Ray
    Data pipeline; ``ray_address`` joins a running cluster, None starts one on this machine).
    The model is ``checkpoint`` (a datadistill checkpoint) or ``model`` (``yolo:PATH.pt``, an Ultralytics
    YOLO model: :mod:`datadistill.ultralytics_backend`), exactly one of them.
    """

    images: str
    out: str
    checkpoint: str | None = None
    model: str | None = None
    image_root: str | None = None
    views: str = "default"
    fuse: str = "nms"
    keypoint_fuse: str = "heatmap"
    iou_thr: float = 0.5
    score_floor: float = 0.05
    batch_size: int = 8
    shard_size: int = 1000
    workers: int = 2
    threads: int = 1
    device: str = "auto"
    overwrite: bool = False
    rank: int = 0
    world_size: int = 1
    engine: str = "local"
    ray_address: str | None = None


@dataclass(frozen=True)
class ImageSource:
    """The unlabeled images: a root folder and file names relative to it, in labeling order."""

    root: Path
    files: tuple[str, ...]
    description: str = ""

    def shard(self, index: int, shard_size: int) -> tuple[str, ...]:
        return self.files[index * shard_size : (index + 1) * shard_size]

    def num_shards(self, shard_size: int) -> int:
        return -(-len(self.files) // shard_size)


def list_source(src: str | os.PathLike[str], *, image_root: str | os.PathLike[str] | None = None) -> ImageSource:
    """The images of a folder (recursive), a text file of paths, or a COCO json (annotations ignored).

    A text file's paths are relative to ``image_root`` (default: the text file's folder). A COCO json's
    ``file_name`` are relative to ``image_root`` (default: ``images/`` beside the json if it exists, else
    the json's folder). Paths that leave the root are refused.
    """
    path = Path(src)
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise UserError(f"{path}: no images found (looked for {', '.join(sorted({'.jpg', '.png', '.webp'}))} ...)")
        return ImageSource(root=path, files=tuple(files), description=f"folder {path}")
    if not path.exists():
        raise UserError(f"{path}: no such folder or file")
    if path.suffix.lower() == ".json":
        raw = read_json(path)
        if isinstance(raw, dict) and "images" in raw and "annotations" not in raw:
            raw = {**raw, "annotations": []}
        default_root = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
        root = Path(image_root) if image_root is not None else default_root
        dataset = load_coco(path, image_root=root)
        return ImageSource(root=root, files=tuple(im.file_name for im in dataset.images), description=f"COCO {path}")
    root = Path(image_root) if image_root is not None else path.parent
    files = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            name = line.strip()
            if not name or name.startswith("#"):
                continue
            candidate = Path(name)
            if candidate.is_absolute() and candidate.resolve().is_relative_to(root.resolve()):
                name = candidate.resolve().relative_to(root.resolve()).as_posix()
            try:
                resolve_image_path(root, name)
            except DataError as exc:
                raise UserError(f"{path} line {lineno}: {exc}") from exc
            files.append(name)
    if not files:
        raise UserError(f"{path}: the list names no images")
    if len(set(files)) != len(files):
        raise UserError(f"{path}: lists an image more than once")
    return ImageSource(root=root, files=tuple(files), description=f"list {path}")


class _ShardImages(Dataset):
    """Decodes images for the DataLoader workers; a broken file gives its error instead of a crash."""

    def __init__(self, root: Path, items: list[tuple[int, str]]) -> None:
        self.root, self.items = root, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        shard, name = self.items[i]
        try:
            image = read_image(resolve_image_path(self.root, name))
            return {"shard": shard, "file_name": name, "image": image, "error": None}
        except DataError as exc:
            return {"shard": shard, "file_name": name, "image": None, "error": str(exc).split(": ", 1)[-1]}
        except Exception as exc:  # a decoder bug on a hostile file must not kill the run
            return {"shard": shard, "file_name": name, "image": None, "error": f"{type(exc).__name__}: {exc}"}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def shard_path(out: Path, index: int) -> Path:
    return out / "shards" / f"part-{index:05d}.parquet"


def plan_batches(num_images: int, batch_size: int) -> list[range]:
    """The forward passes of one shard of ``num_images``: positions in runs of ``batch_size``, the last
    run shorter. Batches never cross a shard, so that a shard's labels depend on the shard alone, not on
    the engine, the number of processes or where a resumed run started (batch composition changes
    floating-point results: the model pads a batch to its largest image)."""
    return [range(i, min(i + batch_size, num_images)) for i in range(0, num_images, batch_size)]


def _schema(num_keypoints: int) -> pa.Schema:
    fields = [
        pa.field("file_name", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("boxes", pa.list_(pa.float32())),
        pa.field("scores", pa.list_(pa.float32())),
        pa.field("labels", pa.list_(pa.int32())),
        pa.field("agreement", pa.list_(pa.int32())),
    ]
    if num_keypoints:
        fields.append(pa.field("keypoints", pa.list_(pa.float32())))
    fields.append(pa.field("error", pa.string()))
    return pa.schema(fields, metadata={b"num_keypoints": str(num_keypoints).encode()})


def _write_shard(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    columns = {name: [r.get(name) for r in rows] for name in schema.names}
    table = pa.Table.from_pydict(columns, schema=schema)
    write_atomic(path, lambda f: pq.write_table(table, f, compression="zstd"))


def _row(name: str, width: int, height: int, det: Detections, num_keypoints: int) -> dict[str, Any]:
    row = {
        "file_name": name,
        "width": width,
        "height": height,
        "boxes": det.boxes.reshape(-1).tolist(),
        "scores": det.scores.tolist(),
        "labels": det.labels.tolist(),
        "agreement": (det.agreement if det.agreement is not None else torch.ones(len(det), dtype=torch.int64)).tolist(),
        "error": None,
    }
    if num_keypoints:
        kps = det.keypoints if det.keypoints is not None else torch.zeros(len(det), num_keypoints, 3)
        row["keypoints"] = kps.reshape(-1).tolist()
    return row


def unfit_reason(height: int, width: int, *, meta: models.ModelMeta, views: tuple[View, ...]) -> str | None:
    """Why a torchvision model cannot label an image of ``height x width`` px under one of ``views`` (its
    resize would leave a side of 0 px, and torch would raise mid-run), or None when it can."""
    for view in views:
        low, high = view.input_size(meta.min_size, meta.max_size)
        h, w = resized_size(height, width, min_size=low, max_size=high)
        if h < 1 or w < 1:
            size = f"{width}x{height} px"
            return f"{size} is too elongated for the model: view {view.name} would resize it to {w}x{h} px"
    return None


def _error_row(name: str, error: str, num_keypoints: int) -> dict[str, Any]:
    row = {"file_name": name, "width": 0, "height": 0, "boxes": [], "scores": [], "labels": [], "agreement": [],
           "error": error}  # fmt: skip
    if num_keypoints:
        row["keypoints"] = []
    return row


@dataclass
class _Timer:
    """Seconds spent in the model's forward passes vs. everything else (for the labeling benchmark)."""

    model_s: float = 0.0
    fusion_s: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)


def label_images(
    model: torch.nn.Module,
    meta: models.ModelMeta,
    images: list[torch.Tensor],
    *,
    views: tuple[View, ...],
    fuse: str = "nms",
    keypoint_fuse: str = "heatmap",
    iou_thr: float = 0.5,
    score_floor: float = 0.05,
    timer: _Timer | None = None,
) -> list[Detections]:
    """Run ``model`` on every view of each image ``[3, H, W]`` (float in [0, 1]), map the predictions back
    to the original frame and fuse them. Returns one :class:`Detections` per image, with ``agreement``
    and keypoints (``[N, K, 3]`` x, y, score) for keypoint models; objects below ``score_floor`` dropped.
    """
    timer = timer or _Timer()
    if meta.task == "keypoints" and keypoint_fuse == "heatmap" and models._external(model):
        raise ValueError(f"{meta.model} gives no keypoint heatmaps: use keypoint_fuse='mean'")
    per_image: list[list[Detections]] = [[] for _ in images]
    for view in views:
        prepared = [view.prepare(img) for img in images]
        t0 = time.perf_counter()
        with models.input_size(model, *view.input_size(meta.min_size, meta.max_size)):
            predictions = models.predict(model, prepared)
        timer.model_s += time.perf_counter() - t0
        for i, (img, det) in enumerate(zip(images, predictions, strict=True)):
            per_image[i].append(view.invert(det.to("cpu"), width=img.shape[-1], flip_index=meta.flip_index))
    t0 = time.perf_counter()
    fused = [fusion.fuse(dets, method=fuse, iou_thr=iou_thr, skip_box_thr=0.0) for dets in per_image]
    fused = [f.select(f.scores >= score_floor) for f in fused]
    timer.fusion_s += time.perf_counter() - t0
    if meta.task == "keypoints" and keypoint_fuse == "heatmap":
        fused = _fuse_heatmaps(model, meta, images, fused, views, timer)
    return fused


def view_heatmaps(
    model: torch.nn.Module, meta: models.ModelMeta, images: list[torch.Tensor], dets: list[Detections], view: View
) -> dict[int, torch.Tensor]:
    """The keypoint head's heatmap logits ``[N, K, M, M]`` on the boxes of ``dets`` under ``view``, back in
    the original frame (mirrored, left/right channels swapped on a flip), for every image ``i`` with boxes;
    one batch for all images."""
    todo = [i for i, d in enumerate(dets) if len(d)]
    if not todo:
        return {}
    prepared = [view.prepare(images[i]) for i in todo]
    boxes = [view.forward_boxes(dets[i].boxes, width=images[i].shape[-1]) for i in todo]
    with models.input_size(model, *view.input_size(meta.min_size, meta.max_size)):
        heats = models.keypoint_heatmaps(model, prepared, boxes)
    return {i: view.invert_heatmaps(h.cpu(), flip_index=meta.flip_index) for i, h in zip(todo, heats, strict=True)}


def _fuse_heatmaps(
    model: torch.nn.Module,
    meta: models.ModelMeta,
    images: list[torch.Tensor],
    dets: list[Detections],
    views: tuple[View, ...],
    timer: _Timer,
) -> list[Detections]:
    """The paper's keypoint fusion: the keypoint head runs on the fused boxes under every view (one batch
    per view); heatmaps are mapped back, averaged, then decoded in the original frame."""
    totals: dict[int, torch.Tensor] = {}
    for view in views:
        t0 = time.perf_counter()
        heats = view_heatmaps(model, meta, images, dets, view)
        timer.model_s += time.perf_counter() - t0
        for i, heat in heats.items():
            totals[i] = heat if i not in totals else totals[i] + heat
    out = list(dets)
    for i, total in totals.items():
        d, image = dets[i], images[i]
        keypoints = models.heatmaps_to_keypoints(
            total / len(views), d.boxes, model=model, image_size=(image.shape[-2], image.shape[-1])
        )
        out[i] = Detections(boxes=d.boxes, scores=d.scores, labels=d.labels, keypoints=keypoints, agreement=d.agreement)
    return out


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but CUDA is not available here (use --device cpu)")
    return torch.device(device)


def _model_file(cfg: LabelConfig) -> Path:
    """The weights file that labels: the checkpoint, or the .pt of a ``yolo:`` model."""
    if cfg.model is not None:
        from datadistill.ultralytics_backend import weights_path

        return weights_path(cfg.model)
    assert cfg.checkpoint is not None
    return Path(cfg.checkpoint)


def _signature(cfg: LabelConfig, source: ImageSource, views: tuple[View, ...], task: str) -> dict[str, Any]:
    return {
        "checkpoint": str(cfg.checkpoint if cfg.model is None else cfg.model),
        "checkpoint_sha256": file_sha256(_model_file(cfg)),
        "source": source.description,
        "image_root": str(source.root),
        "num_images": len(source.files),
        "files_sha256": hashlib.sha256("\n".join(source.files).encode()).hexdigest(),
        "views": [v.name for v in views],
        "fuse": cfg.fuse,
        "keypoint_fuse": cfg.keypoint_fuse if task == "keypoints" else None,
        "iou_thr": cfg.iou_thr,
        "score_floor": cfg.score_floor,
        "shard_size": cfg.shard_size,
        "batch_size": cfg.batch_size,
    }


def _check_config(cfg: LabelConfig) -> tuple[View, ...]:
    if (cfg.checkpoint is None) == (cfg.model is None):
        raise UserError("give --checkpoint CKPT (a datadistill checkpoint) or --model yolo:PATH.pt, one of them")
    if cfg.model is not None:
        if not cfg.model.startswith("yolo:"):
            raise UserError(f"--model {cfg.model!r}: label takes yolo:PATH.pt; other models label with --checkpoint")
        if cfg.engine == "ray":
            raise UserError("--engine ray labels with datadistill checkpoints; label YOLO models with --engine local")
    if cfg.fuse not in BOX_FUSIONS:
        raise UserError(f"unknown --fuse {cfg.fuse!r}: choose one of {', '.join(BOX_FUSIONS)}")
    if cfg.keypoint_fuse not in KEYPOINT_FUSIONS:
        raise UserError(f"unknown --keypoint-fuse {cfg.keypoint_fuse!r}: choose one of {', '.join(KEYPOINT_FUSIONS)}")
    for name, value, low, high in (("--iou-thr", cfg.iou_thr, 0.0, 1.0), ("--score-floor", cfg.score_floor, 0.0, 1.0)):
        if not low <= value <= high:
            raise UserError(f"{name} must be in [{low}, {high}], got {value}")
    for name, value in (("--batch-size", cfg.batch_size), ("--shard-size", cfg.shard_size), ("--threads", cfg.threads)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if cfg.workers < 0:
        raise UserError(f"--workers must be at least 0, got {cfg.workers}")
    if cfg.engine not in ENGINES:
        raise UserError(f"unknown --engine {cfg.engine!r}: choose one of {', '.join(ENGINES)}")
    if cfg.world_size < 1 or not 0 <= cfg.rank < cfg.world_size:
        raise UserError(f"need 0 <= rank < world_size, got rank {cfg.rank} of {cfg.world_size}")
    if cfg.engine == "ray" and cfg.world_size > 1:
        raise UserError("--engine ray runs from one process: start it without torchrun (Ray spreads the work)")
    if cfg.ray_address is not None and cfg.engine != "ray":
        raise UserError("--ray-address needs --engine ray")
    try:
        return parse_views(cfg.views)
    except ValueError as exc:
        raise UserError(f"--views: {exc}") from exc


def _prepare_out(out: Path, signature: dict[str, Any], overwrite: bool) -> None:
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not overwrite:
        try:
            old = read_json(manifest_path).get("config", {})
        except (DataError, AttributeError):
            old = {}
        differing = [k for k in RESUME_KEYS if old.get(k) != signature.get(k)]
        if differing:
            raise UserError(
                f"{out} holds labels made with another {differing[0]} ({old.get(differing[0])!r}, now "
                f"{signature.get(differing[0])!r}); use another --out or --overwrite to replace them"
            )
    remove_temporaries(out, ("manifest.json",))  # of writes that a kill interrupted
    if (out / "shards").is_dir():
        for tmp in (out / "shards").glob(".part-*.tmp"):
            tmp.unlink(missing_ok=True)
    if manifest_path.exists() and not overwrite:
        return
    if overwrite:
        for stale in (out / "shards").glob("part-*.parquet") if (out / "shards").is_dir() else ():
            stale.unlink()
    elif (out / "shards").is_dir() and any((out / "shards").glob("part-*.parquet")):
        raise UserError(f"{out} holds shards but no manifest.json; use another --out or --overwrite")


def _read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One shard's table; a file that is not a readable shard (copied in part, damaged on disk, written by
    something else) is a one-line UserError that names it and says how to redo it."""
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        reason = " ".join(str(exc).replace(str(path), "").split())[:120]
        raise UserError(
            f"{path}: not a readable label shard ({reason}); delete it and re-run the same `datadistill label` "
            "to label its images again"
        ) from exc


def summarize_shards(out: Path) -> dict[str, Any]:
    """Counts and skipped files, read from the shards' small columns only."""
    images = objects = 0
    skipped: list[dict[str, str]] = []
    for part in sorted((out / "shards").glob("part-*.parquet")):
        table = _read_shard(part, columns=["file_name", "scores", "error"])
        images += table.num_rows
        objects += int(pa.compute.list_value_length(table["scores"]).to_numpy(zero_copy_only=False).sum())
        errors = table["error"].to_pylist()
        names = table["file_name"].to_pylist()
        skipped += [{"file_name": n, "reason": e} for n, e in zip(names, errors, strict=True) if e is not None]
    return {"images": images, "skipped": len(skipped), "objects": objects, "skipped_files": skipped}


def label(cfg: LabelConfig) -> Path:
    """The ``label`` stage: every shard of the source labeled into ``cfg.out``; returns the manifest path.

    Under torchrun (``world_size`` > 1) every rank calls it, in a gloo process group that it joins for
    the call: rank 0 checks and prepares the folder while the others wait (so that a refusal stops all of
    them, and ``overwrite`` deletes nothing that another rank wrote), each rank labels its shards, and
    rank 0 writes the final manifest once all have finished.
    """
    started = time.time()
    views = _check_config(cfg)
    out = Path(cfg.out)
    launch = distributed.Launch(rank=cfg.rank, world_size=cfg.world_size,
                                local_rank=int(os.environ.get("LOCAL_RANK", cfg.rank)))  # fmt: skip
    torch.set_num_threads(cfg.threads)
    # The ray engine's driver only needs the meta; loading the model checks the checkpoint up front.
    device = distributed.rank_device(_resolve_device(cfg.device), launch) if cfg.engine == "local" else None
    if cfg.model is not None:
        from datadistill.ultralytics_backend import load_yolo

        yolo = load_yolo(cfg.model, device=device if device is not None else "cpu")
        yolo.conf = min(yolo.conf, cfg.score_floor)  # candidates as low as the floor reach the fusion
        model, meta = yolo, yolo.meta
        if meta.task == "keypoints" and cfg.keypoint_fuse == "heatmap":
            log.warning("%s gives no keypoint heatmaps: keypoints are fused by mean (--keypoint-fuse mean)", cfg.model)
            cfg = dataclasses.replace(cfg, keypoint_fuse="mean")
        if meta.task == "keypoints" and any(v.hflip for v in views) and len(meta.flip_index) != meta.num_keypoints:
            raise UserError(f"{cfg.model} has no keypoint flip map: flip views need one (train with datadistill)")
    else:
        assert cfg.checkpoint is not None
        model, meta, _ = models.load_checkpoint(cfg.checkpoint, device=device if device is not None else "cpu")
    model.eval()
    source = list_source(cfg.images, image_root=cfg.image_root)
    signature = _signature(cfg, source, views, meta.task)
    manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "version": 1, "config": signature,
                                "options": asdict(cfg), "status": "running", "num_shards": 0,
                                "classes": {"names": list(meta.class_names), "category_ids": list(meta.category_ids),
                                            "keypoints": list(meta.keypoint_names)}}  # fmt: skip
    num_shards = manifest["num_shards"] = source.num_shards(cfg.shard_size)

    def prepare() -> None:
        _prepare_out(out, signature, cfg.overwrite)
        write_json_atomic(out / "manifest.json", manifest, indent=2)

    with distributed.process_group(launch, device=torch.device("cpu"), timeout=RANK_WAIT):
        distributed.on_main(prepare)
        mine = [k for k in range(num_shards) if k % cfg.world_size == cfg.rank]
        todo = [k for k in mine if not shard_path(out, k).exists()]
        log.info(
            "labeling %d images from %s: %d shards (%d done, %d to do%s), %d views (%s), fusion %s, engine %s",
            len(source.files), source.description, num_shards, len(mine) - len(todo), len(todo),
            f" by rank {cfg.rank} of {cfg.world_size}" if cfg.world_size > 1 else "", len(views),
            ",".join(v.name for v in views), cfg.fuse, cfg.engine,
        )  # fmt: skip
        if cfg.engine == "ray":
            from datadistill.engines.ray import label_shards

            assert cfg.checkpoint is not None  # _check_config refuses YOLO models on Ray
            mine_timings = label_shards(
                checkpoint=cfg.checkpoint, source=source, shards=todo, out=out, num_keypoints=len(meta.keypoint_names),
                views=cfg.views, fuse=cfg.fuse, keypoint_fuse=cfg.keypoint_fuse, iou_thr=cfg.iou_thr,
                score_floor=cfg.score_floor, batch_size=cfg.batch_size, shard_size=cfg.shard_size,
                threads=cfg.threads, device=cfg.device, address=cfg.ray_address,
            )  # fmt: skip
        else:
            assert device is not None
            mine_timings = _label_local(cfg, source, todo, out, model, meta, views, device)
        every_rank = distributed.gather_to_main(mine_timings)
        if every_rank is not None:
            summary = summarize_shards(out)
            done = sum(1 for k in range(num_shards) if shard_path(out, k).exists())
            manifest.update(
                status="complete" if done == num_shards else "partial",
                shards_done=done,
                counts={k: v for k, v in summary.items() if k != "skipped_files"},
                skipped=summary["skipped_files"],
                timings={"total_s": round(time.time() - started, 3), **_merge_timings(every_rank)},
                provenance=provenance(),
            )
            write_json_atomic(out / "manifest.json", manifest, indent=2)
        distributed.barrier()  # every rank returns once the final manifest is written
    return out / "manifest.json"


def _merge_timings(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One manifest ``timings`` from each rank's (or the Ray engine's): wall times of the slowest, sums
    of work; ``process_loop_s`` adds the processes' loop times (None where unknown, as with Ray)."""
    images = sum(p["images"] for p in parts)
    loop_s = max(p["loop_s"] for p in parts)
    process_s = [p.get("process_loop_s") for p in parts]
    return {
        "engine": parts[0]["engine"],
        "processes": sum(p["processes"] for p in parts),
        "loop_s": round(loop_s, 3),
        "process_loop_s": round(sum(process_s), 3) if None not in process_s else None,
        "model_s": round(sum(p["model_s"] for p in parts), 3),
        "fusion_s": round(sum(p["fusion_s"] for p in parts), 3),
        "images_labeled_now": images,
        "images_per_s": round(images / loop_s, 3) if loop_s > 0 and images else None,
    }


def _label_local(
    cfg: LabelConfig,
    source: ImageSource,
    todo: list[int],
    out: Path,
    model: torch.nn.Module,
    meta: models.ModelMeta,
    views: tuple[View, ...],
    device: torch.device,
) -> dict[str, Any]:
    """Label shards ``todo`` in this process (DataLoader workers decode); returns its timings."""
    items = [(k, name) for k in todo for name in source.shard(k, cfg.shard_size)]
    expected = {k: len(source.shard(k, cfg.shard_size)) for k in todo}
    batches, start = [], 0
    for k in todo:
        batches += [[start + i for i in batch] for batch in plan_batches(expected[k], cfg.batch_size)]
        start += expected[k]
    loader = DataLoader(
        _ShardImages(source.root, items),
        batch_sampler=batches,
        num_workers=cfg.workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if cfg.workers else None,
        prefetch_factor=4 if cfg.workers else None,
        persistent_workers=False,
    )
    num_kp = len(meta.keypoint_names)
    schema = _schema(num_kp)
    pending: dict[int, list[dict[str, Any]]] = {}
    timer = _Timer()
    t_loop = time.perf_counter()
    hide = None if cfg.rank == 0 else True  # rank 0's progress bar only (None: shown on a terminal)
    with tqdm(total=len(items), unit="img", desc="label", disable=hide, dynamic_ncols=True) as bar:
        for batch in loader:
            for b in batch:
                if b["image"] is not None and not models._external(model):
                    b["error"] = unfit_reason(*b["image"].shape[-2:], meta=meta, views=views)
                    b["image"] = None if b["error"] else b["image"]
            good = [b for b in batch if b["image"] is not None]
            results: list[Detections] = []
            if good:
                tensors = [b["image"].to(device, non_blocking=True).float().div_(255) for b in good]
                results = label_images(
                    model, meta, tensors, views=views, fuse=cfg.fuse, keypoint_fuse=cfg.keypoint_fuse,
                    iou_thr=cfg.iou_thr, score_floor=cfg.score_floor, timer=timer,
                )  # fmt: skip
            by_name = {b["file_name"]: r for b, r in zip(good, results, strict=True)}
            for b in batch:
                if b["image"] is None:
                    row = _error_row(b["file_name"], b["error"], num_kp)
                    log.warning("skipped %s: %s", b["file_name"], b["error"])
                else:
                    _, h, w = b["image"].shape
                    row = _row(b["file_name"], w, h, by_name[b["file_name"]], num_kp)
                rows = pending.setdefault(b["shard"], [])
                rows.append(row)
                if len(rows) == expected[b["shard"]]:
                    _write_shard(shard_path(out, b["shard"]), rows, schema)
                    del pending[b["shard"]]
            bar.update(len(batch))
    loop_s = time.perf_counter() - t_loop
    if pending:  # cannot happen unless the loader lost items; never write a partial shard
        raise RuntimeError(f"internal error: shards {sorted(pending)} incomplete after the loader finished")
    return {"engine": "local", "processes": 1, "images": len(items), "loop_s": loop_s, "process_loop_s": loop_s,
            "model_s": timer.model_s, "fusion_s": timer.fusion_s}  # fmt: skip


def read_shards(out: str | os.PathLike[str], columns: list[str] | None = None) -> pa.Table:
    """All shards of a labeling folder as one arrow table (only ``columns`` when given)."""
    out = Path(out)
    parts = sorted((out / "shards").glob("part-*.parquet"))
    if not parts:
        raise UserError(f"{out}: no label shards found (run `datadistill label` first)")
    return pa.concat_tables(_read_shard(p, columns=columns) for p in parts)


def shard_detections(row: dict[str, Any], num_keypoints: int) -> Detections:
    """One parquet row back as :class:`Detections`."""
    n = len(row["scores"])
    kps = None
    if num_keypoints and row.get("keypoints") is not None:
        kps = torch.tensor(np.asarray(row["keypoints"], np.float32).reshape(n, num_keypoints, 3))
    return Detections(
        boxes=torch.tensor(np.asarray(row["boxes"], np.float32).reshape(n, 4)),
        scores=torch.tensor(np.asarray(row["scores"], np.float32)),
        labels=torch.tensor(np.asarray(row["labels"], np.int64)),
        keypoints=kps,
        agreement=torch.tensor(np.asarray(row["agreement"], np.int64)),
    )
