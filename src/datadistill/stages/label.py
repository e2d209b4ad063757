"""The label stage: multi-transform labeling (steps 2 and 3 of data distillation) into resumable shards.

The unlabeled images are listed once, in a deterministic order, and cut into shards of ``shard_size``
images (:mod:`datadistill.stages.shards`). Each shard is decoded in DataLoader workers, run through the
detector under every view and fused (:func:`datadistill.stages.multiview.label_images`), and written as
``shards/part-NNNNN.parquet`` (to a temporary name, renamed when complete). A re-run skips the shards that
exist, so a killed run resumes without losing or repeating work; memory holds one shard.

Scale-out writes the same shards: under ``torchrun`` rank ``r`` of ``W`` labels the shards ``k`` with
``k % W == r`` (rank 0 prepares the folder before any rank starts, and writes ``manifest.json`` once every
rank has finished); ``engine="ray"`` labels them on a Ray cluster (:mod:`datadistill.stages.label_ray`).
Every engine cuts a shard into the same forward-pass batches (:func:`~datadistill.stages.shards.plan_batches`)
and writes a shard's file once it is complete, in the same bytes
(:class:`~datadistill.data.label_folder.ShardWriter` from rows,
:class:`~datadistill.data.label_folder.TableShardWriter` from the Ray actors' arrow tables), so the labels do
not depend on the engine, the number of processes, or where a resumed run started.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datadistill.config import DECODES, LabelConfig
from datadistill.core.views import View, parse_views
from datadistill.data.coco import read_json
from datadistill.data.label_folder import (
    MANIFEST_FORMAT,
    detections_row,
    error_row,
    read_shards,
    shard_detections,
    shard_path,
    summarize_shards,
)
from datadistill.errors import DataError, UserError, one_line_errors
from datadistill.models.detector import Detector, DetectorLoader, load_detector, model_file, option_files, resolve_spec
from datadistill.runtime import distributed
from datadistill.runtime.devices import resolve_device, resolve_precision
from datadistill.runtime.io import file_sha256, provenance, remove_temporaries, write_json_atomic
from datadistill.stages.defaults import auto_views
from datadistill.stages.label_writer import Fusion, Job, make_writer
from datadistill.stages.multiview import ImageBatch, LabelTimer, label_images, run_views, unfit_reason
from datadistill.stages.shards import (
    ImageSource,
    ShardImages,
    collate_items,
    decode_on_device,
    list_source,
    plan_batches,
    worker_init,
)

__all__ = ["LabelConfig", "label", "list_source", "read_shards", "shard_detections"]

log = logging.getLogger(__name__)

BOX_FUSIONS = ("nms", "soft-nms", "vote", "wbf")
KEYPOINT_FUSIONS = ("heatmap", "mean")
# What must match for a re-run to resume a folder instead of refusing it.
RESUME_KEYS = ("checkpoint_sha256", "views", "fuse", "keypoint_fuse", "iou_thr", "score_floor", "shard_size",
               "batch_size", "files_sha256", "precision", "options_sha256", "max_det", "decoder")  # fmt: skip
# What a folder written before a key existed was made with (every backend kept 100 detections per image; PIL
# decoded every image).
LEGACY_VALUES: dict[str, Any] = {"precision": "fp32", "options_sha256": None, "max_det": 100, "decoder": "cpu"}
# How to resume a folder made with the other decoder (the recorded one is the key).
DECODER_HINTS = {"cpu": " (or --decode cpu, which decodes as PIL did)",
                 "nvjpeg": " (or resume on a GPU with --decode device)"}  # fmt: skip
# Batches whose fusion and writing may wait behind the one on the device (the overlapped loop); each holds
# its images' raw predictions on the CPU only.
PIPELINE_DEPTH = 2
ENGINES = ("local", "ray")
# How long ranks under torchrun wait for each other: the last wait lasts as long as the slowest rank's
# remaining shards. A rank that dies is noticed by torchrun, which stops the others, not by this timeout.
RANK_WAIT = timedelta(days=7)


def _spec(cfg: LabelConfig) -> str:
    """The teacher's model spec (``--model``, or ``--checkpoint`` under its former name)."""
    spec = cfg.model if cfg.model is not None else cfg.checkpoint
    assert spec is not None
    return spec


def _signature(
    cfg: LabelConfig, source: ImageSource, views: tuple[View, ...], task: str, precision: str, max_det: int,
    device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """What a labeling folder was made with; a re-run must match its :data:`RESUME_KEYS` to resume."""
    spec = resolve_spec(_spec(cfg))  # a training folder: the file it holds
    return {
        "checkpoint": spec,
        "checkpoint_sha256": file_sha256(model_file(spec)),
        # an open-vocabulary teacher's prompts and classes: edited between runs, they change the labels
        "options_sha256": _options_sha256(option_files(spec)),
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
        "precision": precision,
        "max_det": max_det,  # the teacher's detections per image and view
        "decoder": decoder(cfg.decode, device),
    }


def resolve_decode(requested: str, device: torch.device, *, engine: str = "local") -> str:
    """``cpu`` or ``device`` for ``--decode`` on ``device``. ``auto``: device on a GPU, cpu elsewhere (on a
    CPU the DataLoader workers decode beside the model; the main process would decode in its way). The Ray
    engine decodes in its CPU tasks: ``device`` is refused there in one line."""
    if requested not in DECODES:
        raise UserError(f"unknown --decode {requested!r}: choose one of {', '.join(DECODES)}")
    if engine == "ray":
        if requested == "device":
            raise UserError("--decode device needs --engine local: the Ray engine decodes in its CPU tasks")
        return "cpu"
    if requested == "auto":
        return "device" if device.type == "cuda" else "cpu"
    return requested


def decoder(decode: str, device: torch.device) -> str:
    """What the labeling signature records of ``decode`` (resolved) on ``device``: ``cpu`` where the pixels
    are PIL's (PIL, or torchvision's libjpeg on a CPU: the same pixels, ``tests/test_device_prep.py``), else
    ``nvjpeg`` (a GPU's decoder may round otherwise): a resumed folder never mixes the two."""
    return "nvjpeg" if decode == "device" and device.type == "cuda" else "cpu"


def _options_sha256(files: tuple[Path, ...]) -> str | None:
    """One hash of the contents of ``files`` (None for none); a missing file is a one-line UserError."""
    if not files:
        return None
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: not found (named in the model spec)")
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


def _check_config(cfg: LabelConfig) -> tuple[View, ...]:
    if (cfg.checkpoint is None) == (cfg.model is None):
        raise UserError(
            "give the teacher once: --model SPEC (a checkpoint.pt, a training folder or yolo:PATH.pt; --checkpoint "
            "is its former name)"
        )
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
        differing = [k for k in RESUME_KEYS if old.get(k, LEGACY_VALUES.get(k)) != signature.get(k)]
        if differing:
            key = differing[0]
            hint = DECODER_HINTS.get(old.get(key, "cpu"), "") if key == "decoder" else ""
            raise UserError(
                f"{out} holds labels made with another {key} ({old.get(key, LEGACY_VALUES.get(key))!r}, now "
                f"{signature.get(key)!r}); use another --out or --overwrite to replace them{hint}"
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


def _load_teacher(
    cfg: LabelConfig, views: tuple[View, ...], device: torch.device, load: DetectorLoader
) -> tuple[Detector, LabelConfig]:
    """The teacher on ``device``, and ``cfg`` with the keypoint fusion it can do (coordinates when it gives no
    heatmaps)."""
    detector = load(_spec(cfg), device=device, min_score=cfg.score_floor, max_det=cfg.max_det, compile=cfg.compile)
    meta = detector.meta
    if meta.task == "keypoints" and cfg.keypoint_fuse == "heatmap" and not detector.has_heatmaps:
        log.warning("%s gives no keypoint heatmaps: keypoints are fused by mean (--keypoint-fuse mean)", _spec(cfg))
        cfg = replace(cfg, keypoint_fuse="mean")
    if meta.task == "keypoints" and any(v.hflip for v in views) and len(meta.flip_index) != meta.num_keypoints:
        raise UserError(f"{_spec(cfg)} has no keypoint flip map: flip views need one (train with datadistill)")
    return detector, cfg


def label(cfg: LabelConfig, *, load: DetectorLoader = load_detector) -> Path:
    """The ``label`` stage: every shard of the source labeled into ``cfg.out``; returns the manifest path.
    ``load``: how the teacher is built from its spec, here and in each Ray actor (a stand-in for a
    benchmark; the spec's files are still hashed into the folder's signature).

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
    # The ray engine's driver only needs the meta; loading the model checks it up front.
    device = distributed.rank_device(resolve_device(cfg.device), launch) if cfg.engine == "local" else None
    # with Ray, the workers' devices decide; the driver's device stands in for them in the signature
    precision = resolve_precision(cfg.precision, device if device is not None else resolve_device(cfg.device))
    driver = device if device is not None else torch.device("cpu")  # where the model loads in this process
    cfg = replace(cfg, decode=resolve_decode(cfg.decode, driver, engine=cfg.engine))
    detector, cfg = _load_teacher(cfg, views, driver, load)
    if (chosen := auto_views(cfg.views, spec=_spec(cfg), min_size=detector.meta.min_size,
                             max_size=detector.meta.max_size)) != cfg.views:  # fmt: skip
        cfg, views = replace(cfg, views=chosen), parse_views(chosen)  # `views: auto`, read from the teacher's data
    source = list_source(cfg.images, image_root=cfg.image_root)
    manifest = _new_manifest(cfg, source, views, detector, precision, driver)
    num_shards = manifest["num_shards"]

    def prepare() -> None:
        _prepare_out(out, manifest["config"], cfg.overwrite)
        write_json_atomic(out / "manifest.json", manifest, indent=2)

    with distributed.process_group(launch, device=torch.device("cpu"), timeout=RANK_WAIT):
        distributed.on_main(prepare)
        mine = [k for k in range(num_shards) if k % cfg.world_size == cfg.rank]
        todo = [k for k in mine if not shard_path(out, k).exists()]
        log.info(
            "labeling %d images from %s: %d shards (%d done, %d to do%s), %d views (%s), fusion %s, engine %s, %s",
            len(source.files), source.description, num_shards, len(mine) - len(todo), len(todo),
            f" by rank {cfg.rank} of {cfg.world_size}" if cfg.world_size > 1 else "", len(views),
            ",".join(v.name for v in views), cfg.fuse, cfg.engine, precision,
        )  # fmt: skip
        if cfg.engine == "ray":
            from datadistill.stages.label_ray import label_shards

            mine_timings = label_shards(
                spec=_spec(cfg), source=source, shards=todo, out=out, num_keypoints=detector.meta.num_keypoints,
                views=cfg.views, fuse=cfg.fuse, keypoint_fuse=cfg.keypoint_fuse, iou_thr=cfg.iou_thr,
                score_floor=cfg.score_floor, batch_size=cfg.batch_size, shard_size=cfg.shard_size,
                threads=cfg.threads, device=cfg.device, address=cfg.ray_address, precision=cfg.precision,
                flip_index=detector.meta.flip_index, load=load, max_det=detector.max_det, compile=cfg.compile,
            )  # fmt: skip
        else:
            assert device is not None
            mine_timings = _label_local(cfg, source, todo, out, detector, views, device, precision)
        every_rank = distributed.gather_to_main(mine_timings)
        if every_rank is not None:
            _finish_manifest(out, manifest, every_rank, started=started)
        distributed.barrier()  # every rank returns once the final manifest is written
    if not cfg.allow_weak_teacher:
        _check_found_objects(out / "manifest.json", score_floor=cfg.score_floor)
    return out / "manifest.json"


def _check_found_objects(manifest_path: Path, *, score_floor: float) -> None:
    """A one-line UserError when the teacher found nothing above the floor on any image it labeled: a
    teacher collapsed to empty predictions (a known failure of pseudo-labeling) has nothing to teach."""
    manifest = read_json(manifest_path)
    counts = manifest.get("counts", {})
    labeled = counts.get("images", 0) - counts.get("skipped", 0)
    if manifest.get("status") == "complete" and labeled > 0 and counts.get("objects", 0) == 0:
        raise UserError(
            f"the teacher found no object scoring at least --score-floor {score_floor} on any of the {labeled} "
            f"images it labeled (labels in {manifest_path.parent}): it has nothing to teach; train it longer or "
            "check its data, or pass --allow-weak-teacher to go on"
        )


def _new_manifest(
    cfg: LabelConfig, source: ImageSource, views: tuple[View, ...], detector: Detector, precision: str,
    device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """``manifest.json`` of a run in progress: the signature, the options, the classes, the shard count."""
    meta = detector.meta
    signature = _signature(cfg, source, views, meta.task, precision, detector.max_det, device)
    return {"format": MANIFEST_FORMAT, "version": 1, "config": signature,
            "options": asdict(cfg), "status": "running", "num_shards": source.num_shards(cfg.shard_size),
            "classes": {"names": list(meta.class_names), "category_ids": list(meta.category_ids),
                        "keypoints": list(meta.keypoint_names)}}  # fmt: skip


def _finish_manifest(out: Path, manifest: dict[str, Any], every_rank: list[dict[str, Any]], *, started: float) -> None:
    """The final ``manifest.json``: complete or partial, counts, skipped files, timings, provenance."""
    num_shards = manifest["num_shards"]
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
        "writer": parts[0].get("writer"),  # where fusion and writing ran beside the model (local engine)
        "write_s": round(parts[0]["write_s"], 3) if "write_s" in parts[0] else None,  # the Ray driver's writing
        "images_labeled_now": images,
        "images_per_s": round(images / loop_s, 3) if loop_s > 0 and images else None,
    }


def _label_local(
    cfg: LabelConfig, source: ImageSource, todo: list[int], out: Path, detector: Detector, views: tuple[View, ...],
    device: torch.device, precision: str,
) -> dict[str, Any]:  # fmt: skip
    """Label shards ``todo`` in this process; returns its timings.

    The loop overlaps: DataLoader workers decode the next batches (into pinned memory for a GPU); this
    thread runs every view of a batch back to back and queues one copy of their outputs to the CPU; a
    writer thread (:mod:`datadistill.stages.label_writer`) maps them back, fuses them and writes the shard
    rows while the next batch runs. ``cfg.sync`` does all of it in this
    thread, one batch after the other: the same rows in the same order, so the same shards."""
    items = [(k, name) for k in todo for name in source.shard(k, cfg.shard_size)]
    expected = {k: len(source.shard(k, cfg.shard_size)) for k in todo}
    batches, start = [], 0
    for k in todo:
        batches += [[start + i for i in batch] for batch in plan_batches(expected[k], cfg.batch_size)]
        start += expected[k]
    positions = [i for k in todo for i in range(expected[k])]
    loader = DataLoader(
        ShardImages(source.root, items, jpeg_bytes=cfg.decode == "device"),
        batch_sampler=batches,
        num_workers=cfg.workers,
        collate_fn=collate_items,
        worker_init_fn=worker_init if cfg.workers else None,
        prefetch_factor=4 if cfg.workers else None,
        persistent_workers=False,
        pin_memory=device.type == "cuda",
    )
    meta = detector.meta
    fusion = Fusion(views=views, flip_index=meta.flip_index, fuse=cfg.fuse, iou_thr=cfg.iou_thr,
                    score_floor=cfg.score_floor, num_keypoints=meta.num_keypoints)  # fmt: skip
    timer = LabelTimer()
    mode = "inline" if cfg.sync or not todo else "thread"
    writer = make_writer(out=out, expected=expected, fusion=fusion, timer=timer, mode=mode, depth=PIPELINE_DEPTH)
    t_loop = time.perf_counter()
    hide = None if cfg.rank == 0 else True  # rank 0's progress bar only (None: shown on a terminal)
    try:
        with tqdm(total=len(items), unit="img", desc="label", disable=hide, dynamic_ncols=True) as bar:
            for batch, indices in zip(one_line_errors(loader), batches, strict=True):
                job = _start_batch(cfg, batch, detector, views, device, timer, precision, fusion)
                job = replace(
                    job, places=tuple((b["shard"], positions[i]) for b, i in zip(batch, indices, strict=True))
                )
                bar.update(writer.put(job))
            bar.update(writer.finish())
    except BaseException:
        writer.abort()
        raise
    loop_s = time.perf_counter() - t_loop
    return {"engine": "local", "processes": 1, "images": len(items), "loop_s": loop_s, "process_loop_s": loop_s,
            "model_s": timer.model_s, "fusion_s": timer.fusion_s, "writer": mode}  # fmt: skip


def _start_batch(
    cfg: LabelConfig, batch: list[dict[str, Any]], detector: Detector, views: tuple[View, ...],
    device: torch.device, timer: LabelTimer, precision: str, fusion: Fusion,
) -> Job:  # fmt: skip
    """Run the model's part of labeling ``batch`` now; returns the job that makes its shard rows (an error
    row for a file that could not be read or that the detector cannot take). Keypoints fused by heatmap
    need the fused boxes for a second pass of the model, so their rows are made here."""
    meta = detector.meta
    if cfg.decode == "device":
        decode_on_device(batch, device)  # the JPEGs the workers left as bytes, in one call
    for b in batch:
        if b["image"] is not None:
            b["error"] = unfit_reason(detector, *b["image"].shape[-2:], views=views)
            b["image"] = None if b["error"] else b["image"]
    good = [b for b in batch if b["image"] is not None]
    rows: list[dict[str, Any] | None] = []
    for b in batch:
        rows.append(None if b["image"] is not None else error_row(b["file_name"], b["error"], meta.num_keypoints))
        if b["image"] is None:
            log.warning("skipped %s: %s", b["file_name"], b["error"])
    names = tuple(b["file_name"] for b in good)
    sizes = tuple((int(b["image"].shape[-1]), int(b["image"].shape[-2])) for b in good)
    job = Job(places=(), rows=tuple(rows), names=names, sizes=sizes)
    if not good:
        return job
    tensors = ImageBatch.stack([b["image"] for b in good], device=device)  # uint8 -> float once per image size
    if meta.task == "keypoints" and cfg.keypoint_fuse == "heatmap":
        fused = label_images(
            detector, tensors, views=views, fuse=cfg.fuse, keypoint_fuse=cfg.keypoint_fuse, iou_thr=cfg.iou_thr,
            score_floor=cfg.score_floor, timer=timer, precision=precision,
        )  # fmt: skip
        made = iter([detections_row(name, w, h, det, meta.num_keypoints)
                     for name, (w, h), det in zip(names, sizes, fused, strict=True)])  # fmt: skip
        return replace(job, rows=tuple(row if row is not None else next(made) for row in rows), names=(), sizes=())
    return replace(job, outputs=run_views(detector, tensors, views=views, precision=precision, timer=timer))
