"""How busy does labeling keep the device, and what does mixed precision buy?

    python bench/gpu.py --out bench/results/gpu.json                       # on a GPU (auto picks cuda)
    python bench/gpu.py --device cpu --images 16 --repeat 1 --train-iterations 3 --train-warmup 1 --workers 1 \
        --threads 1 --out bench/results/gpu_cpu.json

For each model (random weights: speed does not depend on them; ``min_size = max_size = --size``), on the
same ``--images`` synthetic images of ``--size`` px and the same views (``--views``, the 8 default ones):

- (a) forward-only limit: every view's batches, already decoded, prepared and on the device, through the
  model in a tight loop (the model's own post-processing included), at the labeling precision; images x
  views per second;
- (b) ``datadistill label`` on those images as PNG files (decoding, copies, inverses, fusion, shard
  writing), the overlapped loop, and (b') the same with ``--sync`` (the plain loop); images x views per
  second. (b) / (a) is the pipeline's efficiency: the share of the model's speed that labeling keeps;
- (c) training iterations per second (``--train-batch-size`` images, by default ``--batch-size``; the
  model's losses, backward, step) in fp32 and in bf16 (autocast), after ``--train-warmup`` iterations;
- (d) peak device memory of (a), (b), and each training run (CUDA's allocator; on a CPU: the process's
  peak resident memory, which only grows, so only its final value is given).

Timings synchronise the device. The ratios in one table come from one run; absolute numbers depend on the
machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from datadistill.core.views import parse_views
from datadistill.data.coco import load_coco
from datadistill.data.synth import make_shapes
from datadistill.models import torchvision as models
from datadistill.models.detector import load_detector
from datadistill.runtime.devices import resolve_device, resolve_precision
from datadistill.runtime.io import provenance, write_json_atomic
from datadistill.stages.label import LabelConfig, label
from datadistill.stages.multiview import predict
from datadistill.stages.train import TrainConfig, train

log = logging.getLogger("bench.gpu")

MODELS = ("small_fcos", "fasterrcnn_resnet50_fpn_v2")


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


def make_checkpoint(model: str, data: Path, size: int, folder: Path) -> Path:
    """A random-weights checkpoint of ``model`` for the classes of ``data``, at a ``size`` px input."""
    torch.manual_seed(0)
    meta = models.ModelMeta.from_dataset(model, load_coco(data / "annotations.json"), min_size=size, max_size=size)
    path = folder / f"{model}.pt"
    models.save_checkpoint(path, model=models.build_model(meta), meta=meta)
    return path


def forward_limit(
    checkpoint: Path, data: Path, *, views: str, batch_size: int, precision: str, device: torch.device, repeat: int
) -> dict[str, float]:
    """(a): images x views per second of the model alone, on inputs already prepared on the device."""
    from datadistill.data.images import read_image  # the decoder the labeling stage uses

    detector = load_detector(str(checkpoint), device=device, min_score=0.05)
    meta = detector.meta
    images = [read_image(p).to(device).float().div_(255) for p in sorted((data / "images").glob("*.png"))]
    parsed = parse_views(views)
    batches = {
        view.name: [[view.prepare(im) for im in images[i : i + batch_size]] for i in range(0, len(images), batch_size)]
        for view in parsed
    }

    def one_pass() -> None:
        for view in parsed:
            with detector.input_size(*view.input_size(meta.min_size, meta.max_size)):
                for batch in batches[view.name]:
                    predict(detector, batch, precision=precision)

    one_pass()  # warm-up: cuDNN picks its kernels, the allocator fills
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        one_pass()
    sync(device)
    seconds = time.perf_counter() - t0
    return {"image_views_per_s": repeat * len(images) * len(parsed) / seconds, "seconds": seconds,
            "peak_gib": peak_gib(device)}  # fmt: skip


def label_speed(
    checkpoint: Path, data: Path, out: Path, *, views: str, batch_size: int, precision: str, device: torch.device,
    workers: int, threads: int, sync_loop: bool,
) -> dict[str, float]:  # fmt: skip
    """(b): images x views per second of ``datadistill label`` (the loop's wall time, from its manifest)."""
    reset_peak(device)
    cfg = LabelConfig(model=str(checkpoint), images=str(data / "images"), out=str(out), views=views,
                      batch_size=batch_size, shard_size=10**6, workers=workers, threads=threads, device=str(device),
                      precision=precision, sync=sync_loop, allow_weak_teacher=True, overwrite=True)  # fmt: skip
    manifest = json.loads(label(cfg).read_text())
    sync(device)
    t = manifest["timings"]
    n = manifest["counts"]["images"] - manifest["counts"]["skipped"]
    v = len(parse_views(views))
    return {"image_views_per_s": n * v / t["loop_s"], "seconds": t["loop_s"], "model_s": t["model_s"],
            "fusion_s": t["fusion_s"], "objects": manifest["counts"]["objects"],
            "peak_gib": peak_gib(device)}  # fmt: skip


def train_speed(
    model: str, data: Path, out: Path, *, size: int, batch_size: int, iterations: int, warmup: int, precision: str,
    device: torch.device, workers: int, threads: int,
) -> dict[str, float]:  # fmt: skip
    """(c): training iterations per second after ``warmup`` iterations (from the run's step lines)."""
    reset_peak(device)
    cfg = TrainConfig(data=str(data / "annotations.json"), images=str(data / "images"), out=str(out), model=model,
                      iterations=warmup + iterations, batch_size=batch_size, min_size=size, max_size=size,
                      warmup_iters=0, lr_steps=(), log_every=1, eval_every=10**6, save_every=10**6, device=str(device),
                      precision=precision, workers=workers, threads=threads)  # fmt: skip
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["type"] == "step"][warmup:]
    seconds = sum(1.0 / s["it_s"] for s in steps)
    finite = all(s["loss"] == s["loss"] and abs(s["loss"]) != float("inf") for s in steps)
    return {"iterations_per_s": len(steps) / seconds, "wall_s": wall, "finite_losses": finite,
            "peak_gib": peak_gib(device)}  # fmt: skip


def label_part(row: dict[str, Any], model: str, checkpoint: Path, data: Path, work: Path, args: argparse.Namespace,
               common: dict[str, Any]) -> None:  # fmt: skip
    """(a) and (b) of ``model`` into ``row``."""
    log.info("%s: (a) forward-only limit", model)
    row["forward"] = forward_limit(checkpoint, data, repeat=args.repeat, **common)  # type: ignore[arg-type]
    warm = work / "warm"  # one batch labeled first: numba's cache, cuDNN's kernel choice, the first worker start
    if not warm.is_dir():
        (warm / "images").mkdir(parents=True)
        for path in sorted((data / "images").glob("*.png"))[: args.batch_size]:
            shutil.copy(path, warm / "images" / path.name)
    label_speed(checkpoint, warm, work / f"{model}-warm", workers=args.workers, threads=args.threads, sync_loop=False,
                **common)  # type: ignore[arg-type]  # fmt: skip
    for name, sync_loop in (("label", False), ("label_sync", True)):
        log.info("%s: (b) datadistill label%s", model, " --sync" if sync_loop else "")
        row[name] = label_speed(checkpoint, data, work / f"{model}-{name}", workers=args.workers, threads=args.threads,
                                sync_loop=sync_loop, **common)  # type: ignore[arg-type]  # fmt: skip
    row["efficiency"] = row["label"]["image_views_per_s"] / row["forward"]["image_views_per_s"]
    row["efficiency_sync"] = row["label_sync"]["image_views_per_s"] / row["forward"]["image_views_per_s"]


def bench_model(model: str, data: Path, work: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    precision = resolve_precision(args.precision, device)
    checkpoint = make_checkpoint(model, data, args.size, work)
    common = dict(views=args.views, batch_size=args.batch_size, precision=precision, device=device)
    row: dict[str, Any] = {"model": model, "precision": precision}
    if not args.skip_label:
        label_part(row, model, checkpoint, data, work, args, common)
    for p in args.train_precisions:
        log.info("%s: (c) training in %s", model, p)
        row[f"train_{p}"] = train_speed(model, data, work / f"{model}-train-{p}", size=args.size,
                                        batch_size=args.train_batch_size or args.batch_size,
                                        iterations=args.train_iterations,
                                        warmup=args.train_warmup, precision=p, device=device, workers=args.workers,
                                        threads=args.threads)  # fmt: skip
    if "fp32" in args.train_precisions and "bf16" in args.train_precisions:
        row["train_bf16_speedup"] = row["train_bf16"]["iterations_per_s"] / row["train_fp32"]["iterations_per_s"]
    return row


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"device {results['device']} ({results['device_name']}), {results['images']} images of {results['size']} px, "
        f"{results['num_views']} views, batch {results['batch_size']} "
        f"(training {results.get('train_batch_size', results['batch_size'])})",
        f"{'model':28}{'prec':>6}{'(a) fwd':>10}{'(b) label':>11}{'(b)/(a)':>9}{'sync':>8}{'sync/(a)':>10}"
        f"{'fp32 it/s':>11}{'bf16 it/s':>11}{'bf16/fp32':>11}{'peak GiB a/b/train':>22}",
    ]
    nan = float("nan")
    for r in results["models"]:
        f32, b16 = r.get("train_fp32", {}), r.get("train_bf16", {})
        fwd, lab, syn = r.get("forward", {}), r.get("label", {}), r.get("label_sync", {})  # none with --skip-label
        peaks = "/".join(f"{x:.1f}" for x in (fwd.get("peak_gib", nan), lab.get("peak_gib", nan),
                                              max(f32.get("peak_gib", 0), b16.get("peak_gib", 0))))  # fmt: skip
        lines.append(
            f"{r['model']:28}{r['precision']:>6}{fwd.get('image_views_per_s', nan):10.1f}"
            f"{lab.get('image_views_per_s', nan):11.1f}{r.get('efficiency', nan):9.2f}"
            f"{syn.get('image_views_per_s', nan):8.1f}{r.get('efficiency_sync', nan):10.2f}"
            f"{f32.get('iterations_per_s', nan):11.2f}{b16.get('iterations_per_s', nan):11.2f}"
            f"{r.get('train_bf16_speedup', nan):11.2f}{peaks:>22}"
        )
    lines.append("(a), (b): images x views per second; peak memory: CUDA allocator, or the process's peak RSS on a CPU")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", required=True, help="results json")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto)")
    p.add_argument("--precision", default="auto", help="labeling precision (auto: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--models", nargs="+", default=list(MODELS), help=f"models ({' '.join(MODELS)})")
    images_help = "synthetic images (256: labeling's worker start is amortised, training epochs take workers)"
    p.add_argument("--images", type=int, default=256, help=images_help)
    p.add_argument("--size", type=int, default=640, help="image side and model input size in px (640)")
    p.add_argument("--views", default="default", help="label views (default: the 8 default views)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass and per training step (8)")
    p.add_argument(
        "--train-batch-size",
        type=int,
        default=0,
        help="images per training step (0: --batch-size); larger batches leave less of a step to Python",
    )
    p.add_argument("--repeat", type=int, default=2, help="timed passes of the forward-only loop (2)")
    p.add_argument("--train-iterations", type=int, default=30, help="timed training iterations (30)")
    p.add_argument("--train-warmup", type=int, default=5, help="training iterations not timed (5)")
    p.add_argument("--train-precisions", nargs="*", default=["fp32", "bf16"],
                   help="fp32 bf16 (fp16: GPU); none: no (c)")  # fmt: skip
    p.add_argument("--skip-label", action="store_true", help="training only: no (a), (b)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader processes decoding images (4)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        data = work / "data"
        if not (data / "annotations.json").exists():
            make_shapes(data, num_images=args.images, seed=0, size_px=args.size)
        rows = [bench_model(m, data, work, args, device) for m in args.models]
    results = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "images": args.images,
        "size": args.size,
        "views": args.views,
        "num_views": len(parse_views(args.views)),
        "batch_size": args.batch_size,
        "train_batch_size": args.train_batch_size or args.batch_size,
        "threads": torch.get_num_threads(),
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "models": rows,
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
