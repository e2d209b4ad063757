"""Labeling throughput, the share of wall time spent outside the model, and peak memory vs. image count.

    python bench/labeling.py                       # 1,000 and 10,000 images, default model and views
    python bench/labeling.py --counts 200 --workers 1 --checkpoint runs/demo/teacher/checkpoint.pt
    python bench/labeling.py --counts 400 --procs 1 2  # one process vs torchrun --nproc_per_node 2

Each count runs ``datadistill label`` in a fresh process (so its peak RSS is its own) on synthetic shapes
images, with a teacher trained for a few epochs (or ``--checkpoint``). Prints images/s, the share of the
labeling loop spent outside the model's forward passes (decode, views, fusion, writing), and peak memory;
the memory ratio between the largest and smallest count shows whether memory grows with the data.
``--procs 1 2`` labels each count with one process and with ``torchrun --nproc_per_node 2`` (``--threads``
torch threads per process, 1 by default), and prints the throughput ratio of 2 to 1 processes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _teacher(work: Path, size: int) -> Path:
    from datadistill.data.synth import make_shapes
    from datadistill.stages.train import TrainConfig, train

    data = make_shapes(work / "teacher_data", num_images=200, seed=11, size_px=size)
    out = train(TrainConfig(data=str(data), images=str(data.parent / "images"), out=str(work / "teacher"),
                            epochs=4, batch_size=8, threads=2, device="cpu"))  # fmt: skip
    return out / "checkpoint.pt"


def _images(work: Path, count: int, size: int) -> Path:
    from datadistill.data.synth import make_shapes

    folder = work / f"images_{count}"
    if not (folder / "annotations.json").exists():
        make_shapes(folder, num_images=count, seed=5, size_px=size)
    return folder / "images"


# Runs `datadistill label` and writes this process's peak RSS (and its children's) to ARGV[1].RANK.
_MEASURED_LABEL = """
import os, resource, sys
from datadistill.cli import main
rc = main(sys.argv[2:])
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
open(f"{sys.argv[1]}.{os.environ.get('RANK', '0')}", "w").write(f"{own} {workers}")
raise SystemExit(rc)
"""


def _label(checkpoint: Path, images: Path, out: Path, args: argparse.Namespace, procs: int = 1) -> dict:
    script = out.parent / "measured_label.py"
    script.write_text(_MEASURED_LABEL)
    rss = out.parent / f"{out.name}.rss"
    launcher = [sys.executable]
    if procs > 1:  # torchrun; --standalone picks a free port on this machine
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    cmd = [*launcher, str(script), str(rss), "label", "--checkpoint", str(checkpoint), "--images", str(images),
           "--out", str(out), "--views", args.views, "--workers", str(args.workers), "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size), "--device", args.device,
           "--overwrite"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - t0
    peaks = [[int(v) for v in rss.with_name(f"{rss.name}.{rank}").read_text().split()] for rank in range(procs)]
    manifest = json.loads((out / "manifest.json").read_text())
    t = manifest["timings"]
    return {
        "images": manifest["counts"]["images"],
        "procs": procs,
        "wall_s": wall,
        "images_per_s": t["images_per_s"],
        "outside_model": 1 - t["model_s"] / (t.get("process_loop_s") or t["loop_s"]),
        "peak_mb": max(own for own, _ in peaks) / 1024,
        "worker_peak_mb": max(workers for _, workers in peaks) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--views", default="default")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each labeling process")
    parser.add_argument(
        "--procs",
        type=int,
        nargs="+",
        default=[1],
        help="numbers of processes to compare (torchrun --nproc_per_node N when N > 1)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=100, help="images per shard: each process takes whole shards")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--work", type=Path, help="keep data here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = args.checkpoint or _teacher(work, args.size)
        rows = []
        for count in sorted(args.counts):
            images = _images(work, count, args.size)
            for procs in args.procs:
                rows.append(_label(checkpoint, images, work / f"labels_{count}_{procs}", args, procs))
    print(f"views {args.views}, workers {args.workers}, threads {args.threads} per process, batch {args.batch_size}, "
          f"shards of {args.shard_size}, {args.size} px, device {args.device}")  # fmt: skip
    print(f"{'images':>8} {'procs':>6} {'wall s':>8} {'img/s':>8} {'outside model':>14} {'peak MB':>8} "
          f"{'worker MB':>10}")  # fmt: skip
    for r in rows:
        print(f"{r['images']:>8} {r['procs']:>6} {r['wall_s']:>8.1f} {r['images_per_s']:>8.1f} "
              f"{100 * r['outside_model']:>13.1f}% {r['peak_mb']:>8.0f} {r['worker_peak_mb']:>10.0f}")  # fmt: skip
    one = [r for r in rows if r["procs"] == args.procs[0]]
    if len(one) > 1:
        print(f"peak memory ratio {one[-1]['images']} vs {one[0]['images']} images: "
              f"{one[-1]['peak_mb'] / one[0]['peak_mb']:.2f}")  # fmt: skip
    for count in sorted({r["images"] for r in rows}):
        by_procs = {r["procs"]: r for r in rows if r["images"] == count}
        base = by_procs[args.procs[0]]
        for procs, r in by_procs.items():
            if procs != args.procs[0]:
                print(f"{count} images, {procs} vs {args.procs[0]} processes: throughput ratio "
                      f"{r['images_per_s'] / base['images_per_s']:.2f} in the labeling loop, "
                      f"{base['wall_s'] / r['wall_s']:.2f} in wall time (with start-up)")  # fmt: skip


if __name__ == "__main__":
    main()
