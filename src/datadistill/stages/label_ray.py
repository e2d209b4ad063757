"""Labeling on a Ray cluster with Ray Data: the local engine's shards, from one driver process.

The streaming pipeline, for the shards still to do:

1. one row per forward-pass batch of each shard (:func:`datadistill.stages.shards.plan_batches`: the local
   engine's batches, so the labels are the same);
2. ``map_batches`` tasks on CPU workers read and decode the row's images (broken files become errors,
   as in the local engine);
3. ``map_batches`` on a pool of model actors, each holding the detector loaded once from the model's files
   (:func:`datadistill.models.detector.model_files`: a weights file, or a Hugging Face model's whole folder,
   and an open-vocabulary teacher's prompts and classes files), shipped through the object store and
   rebuilt in a temporary folder, so the workers need not see the driver's files (one GPU per actor
   where the cluster has GPUs, else ``threads`` CPU threads per actor), runs
   :func:`datadistill.stages.multiview.label_images` and returns one shard-table row per image;
4. the driver gathers each shard's rows and writes the shard atomically once it is complete
   (:class:`~datadistill.data.label_folder.TableShardWriter`: the bytes of the local engine's
   :class:`~datadistill.data.label_folder.ShardWriter`), so a killed run resumes from its finished shards, as
   with the local engine. The rows stay arrow columns from the actors to the file (:func:`write_rows`):
   no Python object per row or value, so that one driver keeps up with many actors (``bench/ray_writer.py``).

The images must be readable at the same path from every node (a shared file system), or live under an
object-store prefix (``s3://``, ``gs://``, ``az://``), which each decode task reads with the credentials of
its own node's environment (nothing is shipped); the output is written by the driver alone. Ray Data
retries a task whose worker died and restarts a dead actor (its defaults; Ray 2.60 takes other limits only
through its deprecated ``ray_remote_args``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from datadistill.core.views import parse_views
from datadistill.data.images import as_image_root
from datadistill.data.label_folder import TableShardWriter, detections_row, error_row, shard_schema
from datadistill.errors import UserError, root_user_error
from datadistill.models.detector import DetectorLoader, ModelFiles, load_detector, model_files, write_model_files
from datadistill.runtime.devices import resolve_precision
from datadistill.stages.multiview import ImageBatch, LabelTimer, label_images, unfit_reason
from datadistill.stages.shards import ImageSource, ShardImages, plan_batches

log = logging.getLogger(__name__)

_BATCH_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.int64()),
        pa.field("start", pa.int64()),
        pa.field("names", pa.list_(pa.string())),
        pa.field("pixels", pa.large_binary()),  # the batch's decoded images, uint8 [3, H, W] one after another
        pa.field("shapes", pa.list_(pa.int32())),  # 3 per image (0, 0, 0 for a broken one)
        pa.field("errors", pa.list_(pa.string())),  # null for a decoded image
    ]
)


def output_schema(num_keypoints: int) -> pa.Schema:
    """The shard table's columns, plus where each row goes and the batch's model time (spread evenly)."""
    extra = [pa.field("shard", pa.int64()), pa.field("position", pa.int64()), pa.field("model_s", pa.float64()),
             pa.field("fusion_s", pa.float64())]  # fmt: skip
    return pa.schema(extra + list(shard_schema(num_keypoints)))


def _decode(batch: pa.Table, *, root: str) -> pa.Table:
    """Read and decode the images of each row (one forward-pass batch)."""
    rows = []
    for row in batch.to_pylist():
        reader = ShardImages(as_image_root(root), [(row["shard"], name) for name in row["names"]])
        pixels, shapes, errors = [], [], []
        for i in range(len(reader)):
            item = reader[i]
            image = item["image"]
            if image is None:
                shapes += [0, 0, 0]
            else:
                pixels.append(image.numpy().tobytes())
                shapes += list(image.shape)
            errors.append(item["error"])
        rows.append({**row, "pixels": b"".join(pixels), "shapes": shapes, "errors": errors})
    return pa.Table.from_pylist(rows, schema=_BATCH_SCHEMA)


class _Labeler:
    """A model actor: loads the detector once, then labels one forward-pass batch per row.

    ``contents``: each of ``shipped``'s files (by name) as bytes in the object store; written to a
    temporary folder, from which the detector loads (``shipped.spec_in``), then deleted."""

    def __init__(self, *, shipped: ModelFiles, contents: dict[str, Any], device: str, threads: int,
                 num_keypoints: int, settings: dict, load: DetectorLoader) -> None:  # fmt: skip
        import ray

        torch.set_num_threads(threads)
        blobs = ray.get(list(contents.values()))
        with tempfile.TemporaryDirectory(prefix="datadistill-model-") as tmp:
            write_model_files(dict(zip(contents, blobs, strict=True)), tmp)
            self.detector = load(shipped.spec_in(tmp), device=device, min_score=settings["score_floor"],
                                 max_det=settings["max_det"], compile=settings["compile"])  # fmt: skip
        self.device = torch.device(device)
        self.precision = resolve_precision(settings["precision"], self.device)
        self.views = parse_views(settings["views"])
        # the driver's flip map: a foreign YOLO pose model's comes from a file the actor may not see
        self.fusion = {k: settings[k] for k in ("fuse", "keypoint_fuse", "iou_thr", "score_floor", "flip_index")}
        self.num_keypoints = num_keypoints
        self.schema = output_schema(num_keypoints)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.to_pylist():
            names, shapes, errors = row["names"], row["shapes"], row["errors"]
            images: list[torch.Tensor | None] = []
            offset = 0
            errors = list(errors)
            for i in range(len(names)):
                if errors[i] is not None:
                    images.append(None)
                    continue
                c, h, w = shapes[3 * i : 3 * i + 3]
                array = np.frombuffer(row["pixels"], np.uint8, c * h * w, offset).reshape(c, h, w)
                offset += c * h * w
                errors[i] = unfit_reason(self.detector, h, w, views=self.views)  # as the local engine does
                images.append(None if errors[i] else torch.from_numpy(array.copy()))
            good = [im for im in images if im is not None]
            timer = LabelTimer()
            results = iter(())
            if good:
                tensors = ImageBatch.stack(good, device=self.device)
                results = iter(label_images(self.detector, tensors, views=self.views, timer=timer,
                                            precision=self.precision, **self.fusion))  # fmt: skip
            share = {"model_s": timer.model_s / len(names), "fusion_s": timer.fusion_s / len(names)}
            for i, (name, image) in enumerate(zip(names, images, strict=True)):
                if image is None:
                    table_row = error_row(name, errors[i], self.num_keypoints)
                else:
                    w, h = image.shape[-1], image.shape[-2]
                    table_row = detections_row(name, w, h, next(results), self.num_keypoints)
                out.append({"shard": row["shard"], "position": row["start"] + i, **share, **table_row})
        return pa.Table.from_pylist(out, schema=self.schema)


def write_rows(batch: pa.Table, writer: TableShardWriter, timings: dict[str, Any]) -> None:
    """The driver's part: one table of the actors' rows (:func:`output_schema`) into ``writer``, which
    writes the shards it completes; their model and fusion seconds added to ``timings``. Columns only, no
    Python object per row (``bench/ray_writer.py`` measures it against the row by row loop it replaced)."""
    for key in ("model_s", "fusion_s"):
        timings[key] += pc.sum(batch[key]).as_py() or 0.0
    errors = batch["error"]
    if errors.null_count < len(errors):
        skipped = batch.filter(errors.is_valid()).select(["file_name", "error"]).to_pylist()
        for row in skipped:
            log.warning("skipped %s: %s", row["file_name"], row["error"])
    writer.add(batch)


def _connect(address: str | None) -> bool:
    """Start or join a Ray cluster unless this process already is in one; True when we must shut it down."""
    import ray

    if ray.is_initialized():
        return False
    # A new local cluster takes this machine's CPUs and GPUs; the dashboard is not needed to label.
    ray.init(address=address, include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    return True


def _actor_resources(device: str, threads: int) -> tuple[str, dict[str, Any], int]:
    """``(actor device, resources of one actor, most actors)`` from the cluster's resources."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if device.startswith("cuda") and device != "cuda":
        raise UserError(f"--device {device} with --engine ray: Ray gives each actor its own GPU; use cuda or auto")
    if device == "cuda" and gpus == 0:
        raise UserError("--device cuda with --engine ray, but the Ray cluster has no GPU (use --device cpu or auto)")
    if device != "cpu" and gpus > 0:
        return "cuda", {"num_gpus": 1, "num_cpus": 1}, gpus
    # One CPU stays for the decode tasks and the driver.
    return "cpu", {"num_cpus": threads}, max(1, (cpus - 1) // threads)


def label_shards(
    *,
    spec: str,
    source: ImageSource,
    shards: list[int],
    out: Path,
    num_keypoints: int,
    views: str,
    fuse: str,
    keypoint_fuse: str,
    iou_thr: float,
    score_floor: float,
    batch_size: int,
    shard_size: int,
    threads: int,
    device: str,
    address: str | None,
    precision: str = "auto",
    flip_index: tuple[int, ...] = (),
    load: DetectorLoader = load_detector,
    max_det: int | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Label ``shards`` of ``source`` into ``out/shards`` on a Ray cluster (``address``: join it; None:
    start one on this machine, and stop it at the end). Returns the timings the manifest records.
    ``flip_index``: the keypoint flip map of the driver's detector, and ``max_det`` its detections per image,
    which every actor uses. ``load``: how
    each actor builds the detector from its copies of the model's files (a picklable function); ``compile``:
    passed to ``load`` (``torch.compile`` of the backbone)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install 'datadistill[ray]'") from None

    started = time.perf_counter()
    expected = {k: len(source.shard(k, shard_size)) for k in shards}
    rows = [{"shard": k, "start": b.start, "names": list(source.shard(k, shard_size)[b.start : b.stop])}
            for k in shards for b in plan_batches(expected[k], batch_size)]  # fmt: skip
    timings = {"engine": "ray", "processes": 0, "images": sum(expected.values()), "loop_s": 0.0,
               "process_loop_s": None, "model_s": 0.0, "fusion_s": 0.0, "write_s": 0.0}  # fmt: skip
    if not rows:
        return timings
    shipped = model_files(spec)  # its refusals come before Ray starts
    shutdown = _connect(address)
    context = ray.data.DataContext.get_current()
    wrapped = getattr(context, "raise_original_map_exception", None)
    # a task's UserError (a store that refuses to be read) reaches us as itself, not in Ray's UserCodeException
    context.raise_original_map_exception = True
    try:
        actor_device, actor_resources, most = _actor_resources(device, threads)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        settings = {"views": views, "fuse": fuse, "keypoint_fuse": keypoint_fuse, "iou_thr": iou_thr,
                    "score_floor": score_floor, "precision": precision, "flip_index": tuple(flip_index),
                    "max_det": max_det, "compile": compile}  # fmt: skip
        blocks = min(len(rows), max(len(shards), 4 * cpus))
        # The actors fetch the model's files themselves (a reference in a dict is not resolved by Ray), and
        # this process keeps them alive, so that a restarted actor finds them again.
        contents = {name: ray.put(path.read_bytes()) for name, path in shipped.files}
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        ds = ds.map_batches(_decode, fn_kwargs={"root": str(source.root)}, batch_size=1, batch_format="pyarrow",
                            num_cpus=1)  # fmt: skip
        ds = ds.map_batches(
            _Labeler,
            fn_constructor_kwargs={"shipped": shipped, "contents": contents, "device": actor_device,
                                   "threads": threads, "num_keypoints": num_keypoints, "settings": settings,
                                   "load": load},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=most),
            batch_size=1,
            batch_format="pyarrow",
            **actor_resources,
        )  # fmt: skip
        writer = TableShardWriter(out=out, expected=expected, num_keypoints=num_keypoints)
        t_loop = time.perf_counter()
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                t_write = time.perf_counter()
                write_rows(batch, writer, timings)
                timings["write_s"] += time.perf_counter() - t_write
        except Exception as exc:  # Ray's exception holds the task's traceback: its UserError's one line instead
            cause = root_user_error(exc)
            if cause is None:
                raise
            raise cause from None
        timings["loop_s"] = time.perf_counter() - t_loop
        timings["processes"] = most
    finally:
        context.raise_original_map_exception = wrapped
        if shutdown:
            ray.shutdown()
    writer.close()  # raises if Ray lost rows: never a partial shard
    log.info("ray engine: %d shards in %.1f s", len(shards), time.perf_counter() - started)
    return timings
