"""How close does labeling come to what the device computes, and what does mixed precision buy in training?

    python bench/gpu.py --out bench/results/gpu.json                       # on a GPU (auto picks cuda)
    python bench/gpu.py --device cpu --images 8 --size 128 --views identity,hflip --batch-size 4 \
        --limit-batch 4 --workers 0 --threads 2 --train-models --out bench/results/gpu_cpu.json
    python bench/gpu.py --merge A.json B.json --out all.json                # one table from several runs

Every model has random weights (speed does not depend on them, nothing is downloaded) and runs on the
same ``--images`` synthetic images of ``--size`` px (the data set's classes):

- ``small_fcos``, ``fasterrcnn_resnet50_fpn_v2`` (any torchvision model of the zoo): a datadistill
  checkpoint at ``min_size = max_size = --size``;
- ``yolo:NAME.yaml`` (Ultralytics' bundled YAMLs resolve offline): the model built from the YAML for the
  data set's classes, saved as an Ultralytics ``.pt`` that ``label`` reads weights-only;
- ``hf:rtdetr``: a Hugging Face RT-DETR (transformers' default ``RTDetrConfig``: ResNet-50-vd, 300 queries)
  written with ``save_pretrained`` and a ``--size`` x ``--size`` image processor, labeled as ``hf:FOLDER``.

For each model, three speeds:

- (a) the compute limit: the network without its pre- and post-processing (torchvision: ``backbone`` =
  ResNet + FPN; YOLO: the whole network, no NMS; RT-DETR: backbone + hybrid encoder), batches of
  ``--limit-batch`` (32) random ``--size`` x ``--size`` images already on the device, channels-last, at
  the labeling precision (bf16 autocast on a GPU), ``cudnn.benchmark`` on; images per second;
- (b) the model's eager forward as ``label`` calls it: every view's batches of ``--batch-size`` images,
  decoded and prepared on the device beforehand, through ``Detector.predict`` (the model's own resize,
  normalisation and post-processing); images x views per second;
- (c) ``datadistill label`` end to end on those images as PNG files (decoding, views, copies, inverses,
  fusion, shard writing); images x views per second, from the run's manifest.

(c)/(b) is the share of the model's own speed that labeling keeps; (c)/(a) the share of the device's
speed on the network alone. The views are not all at ``--size``: ``view_px`` is their mean pixel count
over ``--size``**2 (1.34 for the 8 default views), so (a) runs smaller inputs than the average view.
Random weights give few detections for YOLO and RT-DETR (their score priors are low): their
post-processing and fusion work less than with trained weights.

Training (``--train-models``, datadistill's loop): iterations per second after ``--train-warmup``
iterations at ``--train-batch-size`` images per step, in fp32 and in bf16 autocast, and peak memory
(CUDA's allocator; on a CPU the process's peak resident memory, which only grows).

A model whose package is missing, or that fails, is one row that says why; the other rows go on. Timings
synchronise the device. The ratios in one table come from one run; absolute numbers depend on the machine
and on what else runs on it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datadistill.core.views import parse_views
from datadistill.data.coco import load_coco
from datadistill.data.synth import make_shapes
from datadistill.models import torchvision as models
from datadistill.models.detector import load_detector
from datadistill.runtime.devices import autocast, resolve_device, resolve_precision
from datadistill.runtime.io import provenance, write_json_atomic
from datadistill.stages.label import LabelConfig, label
from datadistill.stages.multiview import predict
from datadistill.stages.train import TrainConfig, train

log = logging.getLogger("bench.gpu")

MODELS = ("small_fcos", "fasterrcnn_resnet50_fpn_v2", "yolo:yolo11n.yaml", "hf:rtdetr")
TRAIN_MODELS = ("small_fcos", "fasterrcnn_resnet50_fpn_v2")
RTDETR = "hf:rtdetr"
PARTS = ("limit", "forward", "label")  # (a), (b), (c)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    """Peak memory since the last :func:`reset_peak`: CUDA's allocator on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, at most 200 characters: a row's reason."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:200]


# ----------------------------------------------------------------------------------------------------
# the models: a spec that ``label`` takes, and the network alone for (a)


@dataclass(frozen=True)
class BenchModel:
    """A model under test: ``spec`` for ``load_detector`` and ``label``; ``core()`` a fresh random-weights
    copy of its network without pre- and post-processing (``core_part`` says which part), taking a
    ``[B, 3, H, W]`` float batch."""

    name: str
    spec: str
    core: Callable[[], nn.Module]
    core_part: str


def class_names(data: Path) -> tuple[str, ...]:
    return tuple(c.name for c in load_coco(data / "annotations.json").categories)


def prepare_torchvision(model: str, data: Path, size: int, folder: Path) -> BenchModel:
    """A random-weights checkpoint of a zoo model for the classes of ``data``, at a ``size`` px input."""
    torch.manual_seed(0)
    meta = models.ModelMeta.from_dataset(model, load_coco(data / "annotations.json"), min_size=size, max_size=size)
    path = folder / f"{model}.pt"
    models.save_checkpoint(path, model=models.build_model(meta), meta=meta)
    return BenchModel(model, str(path), lambda: models.build_model(meta).backbone, "backbone+FPN")


def prepare_yolo(model: str, data: Path, size: int, folder: Path) -> BenchModel:
    """The YOLO of a bundled YAML (``yolo:yolo11n.yaml``) for the classes of ``data``, random weights, saved
    as the ``.pt`` an Ultralytics trainer writes (the model object and ``train_args``)."""
    from datadistill.models.ultralytics import import_ultralytics

    import_ultralytics()  # offline, settings out of the home folder
    from ultralytics.nn.tasks import DetectionModel

    yaml_name = model.removeprefix("yolo:")
    names = class_names(data)

    def build() -> nn.Module:
        net = DetectionModel(yaml_name, nc=len(names), verbose=False)
        net.names = dict(enumerate(names))
        return net

    torch.manual_seed(0)
    path = folder / f"{Path(yaml_name).stem}.pt"
    torch.save({"model": build(), "train_args": {"imgsz": size, "task": "detect"}}, path)
    return BenchModel(model, f"yolo:{path}", lambda: build().fuse(), "network (no NMS)")


class RTDetrBackboneEncoder(nn.Module):
    """RT-DETR's backbone, input projections and hybrid encoder (``RTDetrModel.forward`` up to the decoder)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model  # an RTDetrModel

    def forward(self, x: torch.Tensor) -> Any:
        mask = torch.ones((x.shape[0], x.shape[2], x.shape[3]), dtype=torch.long, device=x.device)
        features = self.model.backbone(x, mask)
        projected = [self.model.encoder_input_proj[i](source) for i, (source, _) in enumerate(features)]
        return self.model.encoder(projected)


def prepare_rtdetr(model: str, data: Path, size: int, folder: Path) -> BenchModel:
    """transformers' default RT-DETR (ResNet-50-vd backbone, no pretrained weights) for the classes of
    ``data``, written with ``save_pretrained`` and an image processor of ``size`` x ``size`` px."""
    from datadistill.models.hf import import_transformers

    transformers = import_transformers()
    names = class_names(data)
    config = transformers.RTDetrConfig(use_pretrained_backbone=False, id2label=dict(enumerate(names)),
                                       label2id={n: i for i, n in enumerate(names)})  # fmt: skip
    out = folder / "rtdetr"
    torch.manual_seed(0)
    transformers.RTDetrForObjectDetection(config).save_pretrained(out)
    transformers.RTDetrImageProcessor(size={"height": size, "width": size}).save_pretrained(out)

    def build() -> nn.Module:
        return RTDetrBackboneEncoder(transformers.RTDetrForObjectDetection(config).model)

    return BenchModel(model, f"hf:{out}", build, "backbone+encoder")


def prepare_model(model: str, data: Path, size: int, folder: Path) -> BenchModel:
    """The :class:`BenchModel` of a ``--models`` entry (see the module docstring)."""
    if model.startswith("yolo:"):
        return prepare_yolo(model, data, size, folder)
    if model == RTDETR:
        return prepare_rtdetr(model, data, size, folder)
    if model.startswith("hf:"):
        raise ValueError(f"{model}: the HF model here is {RTDETR} (a random RT-DETR written by the bench)")
    return prepare_torchvision(model, data, size, folder)


# ----------------------------------------------------------------------------------------------------
# (a), (b), (c)


@contextlib.contextmanager
def cudnn_benchmark(on: bool) -> Iterator[None]:
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def compute_limit(
    core: nn.Module, *, size: int, batch_size: int, iterations: int, warmup: int, precision: str, device: torch.device
) -> dict[str, float]:
    """(a): images per second of ``core`` on a ``[batch_size, 3, size, size]`` channels-last batch already on
    the device, under autocast at ``precision``, after ``warmup`` untimed batches."""
    core = core.to(device).eval().to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((batch_size, 3, size, size), generator=generator).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    with cudnn_benchmark(True), torch.inference_mode(), autocast(device, precision):
        for _ in range(warmup):
            core(x)
        sync(device)
        reset_peak(device)
        t0 = time.perf_counter()
        for _ in range(iterations):
            core(x)
        sync(device)
        seconds = time.perf_counter() - t0
    return {"images_per_s": iterations * batch_size / seconds, "seconds": seconds, "batch_size": batch_size,
            "peak_gib": peak_gib(device)}  # fmt: skip


def eager_forward(
    spec: str, folder: Path, *, views: str, batch_size: int, precision: str, device: torch.device, repeat: int
) -> dict[str, float]:
    """(b): images x views per second of ``Detector.predict`` on inputs already prepared on the device;
    the first batch of each view is run once before the clock starts (kernel choice, allocator)."""
    from datadistill.data.images import read_image  # the decoder the labeling stage uses

    detector = load_detector(spec, device=device, min_score=0.05)
    meta = detector.meta
    images = [read_image(p).to(device).float().div_(255) for p in sorted(folder.iterdir())]
    parsed = parse_views(views)
    batches = {
        view.name: [[view.prepare(im) for im in images[i : i + batch_size]] for i in range(0, len(images), batch_size)]
        for view in parsed
    }

    def run(first_only: bool) -> None:
        for view in parsed:
            with detector.input_size(*view.input_size(meta.min_size, meta.max_size)):
                for batch in batches[view.name][: 1 if first_only else None]:
                    predict(detector, batch, precision=precision)

    run(first_only=True)
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        run(first_only=False)
    sync(device)
    seconds = time.perf_counter() - t0
    return {"image_views_per_s": repeat * len(images) * len(parsed) / seconds, "seconds": seconds,
            "peak_gib": peak_gib(device)}  # fmt: skip


def label_speed(
    spec: str, folder: Path, out: Path, *, views: str, batch_size: int, precision: str, device: torch.device,
    workers: int, threads: int,
) -> dict[str, float]:  # fmt: skip
    """(c): images x views per second of ``datadistill label`` (the loop's wall time, from its manifest)."""
    reset_peak(device)
    cfg = LabelConfig(model=spec, images=str(folder), out=str(out), views=views, batch_size=batch_size,
                      shard_size=10**6, workers=workers, threads=threads, device=str(device), precision=precision,
                      allow_weak_teacher=True, overwrite=True)  # fmt: skip
    manifest = json.loads(label(cfg).read_text())
    sync(device)
    t = manifest["timings"]
    n = manifest["counts"]["images"] - manifest["counts"]["skipped"]
    v = len(parse_views(views))
    return {"image_views_per_s": n * v / t["loop_s"], "seconds": t["loop_s"], "model_s": t["model_s"],
            "fusion_s": t["fusion_s"], "objects": manifest["counts"]["objects"],
            "peak_gib": peak_gib(device)}  # fmt: skip


def warm_then_label(spec: str, folder: Path, warm: Path, out: Path, **kwargs: Any) -> dict[str, float]:
    """(c) on the images of ``folder`` after a first run on the few images of ``warm`` (numba's cache, cuDNN's
    kernel choice, the first worker start: what one labeling run pays once, whatever its size)."""
    label_speed(spec, warm, out.with_name(out.name + "-warm"), **kwargs)
    return label_speed(spec, folder, out, **kwargs)


def label_images(data: Path, image_format: str) -> Path:
    """The folder (b) and (c) read: the data set's PNGs, or JPEG copies of them (quality 95, as cameras and
    crawls give; ``label --decode auto`` decodes JPEGs on a GPU), made once."""
    if image_format == "png":
        return data / "images"
    from PIL import Image

    out = data / "images-jpg"
    if not out.is_dir():
        tmp = data / "images-jpg.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for path in sorted((data / "images").glob("*.png")):
            Image.open(path).convert("RGB").save(tmp / f"{path.stem}.jpg", quality=95)
        tmp.rename(out)
    return out


def measured(row: dict[str, Any], part: str, fn: Callable[[], dict[str, Any]]) -> None:
    """``row[part] = fn()``, or ``{"error": reason}`` when it raises: one failing part is one cell."""
    try:
        row[part] = fn()
    except Exception as exc:  # a bench row, not a library call: say why and go on
        log.exception("%s: %s failed", row["model"], part)
        row[part] = {"error": one_line(exc)}


def ratios(row: dict[str, Any]) -> None:
    """(c)/(a) and (c)/(b) into ``row`` where both were measured."""
    c = row.get("label", {}).get("image_views_per_s")
    a = row.get("limit", {}).get("images_per_s")
    b = row.get("forward", {}).get("image_views_per_s")
    if c is not None and a:
        row["label_over_limit"] = c / a
    if c is not None and b:
        row["label_over_forward"] = c / b


def bench_label(model: str, data: Path, work: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """(a), (b), (c) of one model (a row that says why where a part could not run)."""
    precision = resolve_precision(args.precision, device)
    row: dict[str, Any] = {"model": model, "precision": precision, "images": args.images, "format": args.image_format}
    try:
        bench = prepare_model(model, data, args.size, work)
    except Exception as exc:  # a missing package, a YAML Ultralytics does not bundle: one row says why
        log.exception("%s: cannot be prepared", model)
        row["error"] = one_line(exc)
        return row
    row["spec"], row["core_part"] = bench.spec, bench.core_part
    common = dict(views=args.views, batch_size=args.batch_size, precision=precision, device=device)
    log.info("%s: (a) compute limit, %s", model, bench.core_part)
    measured(row, "limit", lambda: compute_limit(bench.core(), size=args.size, batch_size=args.limit_batch,
                                                 iterations=args.limit_iterations, warmup=args.limit_warmup,
                                                 precision=precision, device=device))  # fmt: skip
    folder = label_images(data, args.image_format)
    log.info("%s: (b) eager forward", model)
    measured(row, "forward", lambda: eager_forward(bench.spec, folder, repeat=args.repeat, **common))  # type: ignore[arg-type]
    safe = model.replace(":", "_").replace("/", "_")
    warm = work / f"warm-{folder.parent.name}-{folder.name}"  # a batch of the same images, labeled before each (c)
    if not warm.is_dir():
        warm.mkdir(parents=True)
        for path in sorted(folder.iterdir())[: args.batch_size]:
            shutil.copy(path, warm / path.name)
    log.info("%s: (c) datadistill label", model)
    out = work / f"{safe}-label"
    measured(row, "label", lambda: warm_then_label(bench.spec, folder, warm, out, workers=args.workers,
                                                   threads=args.threads, **common))  # fmt: skip  # type: ignore[arg-type]
    ratios(row)
    return row


def train_speed(
    model: str, data: Path, out: Path, *, size: int, batch_size: int, iterations: int, warmup: int, precision: str,
    device: torch.device, workers: int, threads: int,
) -> dict[str, float]:  # fmt: skip
    """Training iterations per second after ``warmup`` iterations (from the run's step lines). The lr warms up
    over the whole run: the speed does not depend on it, and a run that diverged would end early."""
    reset_peak(device)
    cfg = TrainConfig(data=str(data / "annotations.json"), images=str(data / "images"), out=str(out), model=model,
                      iterations=warmup + iterations, batch_size=batch_size, min_size=size, max_size=size,
                      warmup_iters=warmup + iterations, lr_steps=(), log_every=1, eval_every=10**6, save_every=10**6,
                      device=str(device), precision=precision, workers=workers, threads=threads)  # fmt: skip
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["type"] == "step"][warmup:]
    seconds = sum(1.0 / s["it_s"] for s in steps)
    finite = all(s["loss"] == s["loss"] and abs(s["loss"]) != float("inf") for s in steps)
    return {"iterations_per_s": len(steps) / seconds, "wall_s": wall, "finite_losses": finite,
            "peak_gib": peak_gib(device)}  # fmt: skip


def bench_train(model: str, data: Path, work: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Training it/s of one model in each of ``--train-precisions`` (a cell that says why where one failed)."""
    row: dict[str, Any] = {
        "model": model,
        "batch_size": args.train_batch_size or args.batch_size,
        "images": args.images,
    }
    for p in args.train_precisions:
        log.info("%s: training in %s", model, p)
        measured(row, f"train_{p}", lambda p=p: train_speed(
            model, data, work / f"{model}-train-{p}", size=args.size, batch_size=row["batch_size"],
            iterations=args.train_iterations, warmup=args.train_warmup, precision=p, device=device,
            workers=args.workers, threads=args.threads))  # fmt: skip
    f32, b16 = row.get("train_fp32", {}), row.get("train_bf16", {})
    if f32.get("iterations_per_s") and b16.get("iterations_per_s"):
        row["bf16_speedup"] = b16["iterations_per_s"] / f32["iterations_per_s"]
    return row


# ----------------------------------------------------------------------------------------------------
# the table


def _num(x: Any, width: int, digits: int) -> str:
    return f"{x:{width}.{digits}f}" if isinstance(x, int | float) else f"{'-':>{width}}"


def format_table(results: dict[str, Any]) -> str:
    """The printed table: one line per labeled model ((a), (b), (c), (c)/(a), (c)/(b), peak memory), one
    per trained model (fp32 and bf16 it/s, their ratio), and one per part that could not run (why)."""
    lines = [
        f"device {results['device']} ({results['device_name']}), torch {results['torch']}, images of "
        f"{results['size']} px ({results.get('image_format', 'png')}), {results['num_views']} views (mean view px "
        f"{results['view_px']:.2f}x), label batch {results['batch_size']}, (a) batch {results['limit_batch']}",
    ]
    errors = []
    rows = results.get("models", [])
    if rows:
        lines.append(f"{'model':28}{'prec':>6}{'imgs':>6}{'(a) img/s':>11}{'(b) iv/s':>10}{'(c) iv/s':>10}"
                     f"{'(c)/(a)':>9}{'(c)/(b)':>9}{'peak GiB a/b/c':>17}  (a) runs")  # fmt: skip
    for r in rows:
        if "error" in r:
            errors.append(f"{r['model']}: not measured: {r['error']}")
            continue
        parts = {p: r.get(p, {}) for p in PARTS}
        errors += [f"{r['model']} {p}: {v['error']}" for p, v in parts.items() if "error" in v]
        peaks = "/".join(_num(parts[p].get("peak_gib"), 0, 1).strip() for p in PARTS)
        a, b, c = parts["limit"], parts["forward"], parts["label"]
        lines.append(
            f"{r['model']:28}{r['precision']:>6}{r.get('images', ''):>6}{_num(a.get('images_per_s'), 11, 1)}"
            f"{_num(b.get('image_views_per_s'), 10, 1)}{_num(c.get('image_views_per_s'), 10, 1)}"
            f"{_num(r.get('label_over_limit'), 9, 2)}{_num(r.get('label_over_forward'), 9, 2)}{peaks:>17}  "
            f"{r.get('core_part', '')}"
        )
    trained = results.get("training", [])
    if trained:
        lines.append(f"{'training':28}{'batch':>6}{'imgs':>6}{'fp32 it/s':>11}{'bf16 it/s':>10}{'bf16/fp32':>10}"
                     f"{'peak GiB fp32/bf16':>20}")  # fmt: skip
    for r in trained:
        f32, b16 = r.get("train_fp32", {}), r.get("train_bf16", {})
        errors += [
            f"{r['model']} training {k}: {v['error']}" for k, v in r.items() if isinstance(v, dict) and "error" in v
        ]
        peaks = f"{_num(f32.get('peak_gib'), 0, 1).strip()}/{_num(b16.get('peak_gib'), 0, 1).strip()}"
        speeds = [_num(f32.get("iterations_per_s"), 11, 2), _num(b16.get("iterations_per_s"), 10, 2),
                  _num(r.get("bf16_speedup"), 10, 2)]  # fmt: skip
        lines.append(f"{r['model']:28}{r['batch_size']:>6}{r.get('images', ''):>6}{''.join(speeds)}{peaks:>20}")
    lines.append("(a): images/s of the network alone; (b) eager forward, (c) datadistill label: images x views per s")
    lines += errors
    return "\n".join(lines)


def merge(paths: list[Path]) -> dict[str, Any]:
    """One result from several runs of this script (the rows in the order given; the header of the first,
    and each run's command)."""
    runs = [json.loads(p.read_text()) for p in paths]
    merged = dict(runs[0])
    merged["models"] = [r for run in runs for r in run.get("models", [])]
    merged["training"] = [r for run in runs for r in run.get("training", [])]
    merged["commands"] = [run["command"] for run in runs]
    merged["total_seconds"] = round(sum(run["total_seconds"] for run in runs), 1)
    return merged


# ----------------------------------------------------------------------------------------------------


def view_pixels(views: str, size: int) -> float:
    """The mean pixel count of the views' model inputs over ``size``**2 (a square image of ``size`` px)."""
    parsed = parse_views(views)
    return sum(h * w for h, w in (v.input_size(size, size) for v in parsed)) / (len(parsed) * size * size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", required=True, help="results json")
    p.add_argument("--merge", nargs="+", default=None, help="results of earlier runs: write and print them as one")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one); data made once there")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto)")
    p.add_argument("--precision", default="auto", help="labeling precision (auto: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--models", nargs="*", default=list(MODELS), help=f"labeled models ({' '.join(MODELS)})")
    p.add_argument("--images", type=int, default=256, help="synthetic images (256)")
    p.add_argument("--size", type=int, default=640, help="image side and model input size in px (640)")
    p.add_argument("--views", default="default", help="label views (default: the 8 default views)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass of (b), (c) (8)")
    p.add_argument("--limit-batch", type=int, default=32, help="images per batch of (a) (32)")
    p.add_argument("--limit-iterations", type=int, default=20, help="timed batches of (a) (20)")
    p.add_argument("--limit-warmup", type=int, default=5, help="untimed batches of (a) first (5)")
    p.add_argument("--repeat", type=int, default=1, help="timed passes of (b) over every view (1)")
    p.add_argument(
        "--image-format",
        choices=("png", "jpg"),
        default="png",
        help="what (b) and (c) read: the synthetic PNGs, or JPEG copies (jpg: device decoding on a GPU)",
    )
    p.add_argument("--train-models", nargs="*", default=list(TRAIN_MODELS),
                   help=f"models trained in fp32 and bf16 ({' '.join(TRAIN_MODELS)}); none: no training")  # fmt: skip
    p.add_argument("--train-batch-size", type=int, default=0, help="images per training step (0: --batch-size)")
    p.add_argument("--train-iterations", type=int, default=30, help="timed training iterations (30)")
    p.add_argument("--train-warmup", type=int, default=5, help="training iterations not timed (5)")
    p.add_argument("--train-precisions", nargs="*", default=["fp32", "bf16"], help="fp32 bf16 (fp16: GPU)")
    p.add_argument("--skip-label", action="store_true", help="training only (as --models with no model)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader processes decoding images (4)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.merge:
        results = merge([Path(m) for m in args.merge])
        write_json_atomic(Path(args.out), results, indent=2)
        print(format_table(results))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        data = work / f"data-{args.images}-{args.size}"
        if not (data / "annotations.json").exists():
            make_shapes(data, num_images=args.images, seed=0, size_px=args.size)
        labeled = [] if args.skip_label else args.models
        rows = [bench_label(m, data, work, args, device) for m in labeled]
        trained = [bench_train(m, data, work, args, device) for m in args.train_models if args.train_precisions]
    results = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "images": args.images,
        "size": args.size,
        "views": args.views,
        "image_format": args.image_format,
        "num_views": len(parse_views(args.views)),
        "view_px": view_pixels(args.views, args.size),
        "batch_size": args.batch_size,
        "limit_batch": args.limit_batch,
        "train_batch_size": args.train_batch_size or args.batch_size,
        "threads": torch.get_num_threads(),
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "models": rows,
        "training": trained,
        "total_seconds": round(time.time() - started, 1),
        "command": " ".join(["python", "bench/gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "provenance": provenance(),
    }
    write_json_atomic(Path(args.out), results, indent=2)
    print(format_table(results))
    print(f"total {results['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
