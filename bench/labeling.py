"""Labeling throughput, the share of wall time spent outside the model, and peak memory vs. image count.

    python bench/labeling.py                       # 1,000 and 10,000 images, default model and views
    python bench/labeling.py --counts 200 --workers 1 --checkpoint runs/demo/teacher/checkpoint.pt

Each count runs ``datadistill label`` in a fresh process (so its peak RSS is its own) on synthetic shapes
images, with a teacher trained for a few epochs (or ``--checkpoint``). Prints images/s, the share of the
labeling loop spent outside the model's forward passes (decode, views, fusion, writing), and peak memory;
the memory ratio between the largest and smallest count shows whether memory grows with the data.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _teacher(work: Path, size: int) -> Path:
    from datadistill.synth import make_shapes
    from datadistill.train import TrainConfig, train

    data = make_shapes(work / "teacher_data", num_images=200, seed=11, size_px=size)
    out = train(TrainConfig(data=str(data), images=str(data.parent / "images"), out=str(work / "teacher"),
                            epochs=4, batch_size=8, threads=2, device="cpu"))  # fmt: skip
    return out / "checkpoint.pt"


def _images(work: Path, count: int, size: int) -> Path:
    from datadistill.synth import make_shapes

    folder = work / f"images_{count}"
    if not (folder / "annotations.json").exists():
        make_shapes(folder, num_images=count, seed=5, size_px=size)
    return folder / "images"


def _label(checkpoint: Path, images: Path, out: Path, args: argparse.Namespace) -> dict:
    rss_file = out.parent / f"{out.name}.rss"
    code = (
        "import resource, sys\n"
        "from datadistill.cli import main\n"
        "rc = main(sys.argv[2:])\n"
        "own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "open(sys.argv[1], 'w').write(f'{own} {workers}')\n"
        "raise SystemExit(rc)\n"
    )
    cmd = [sys.executable, "-c", code, str(rss_file), "label", "--checkpoint", str(checkpoint), "--images", str(images),
           "--out", str(out), "--views", args.views, "--workers", str(args.workers), "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--device", args.device, "--overwrite"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    own_kb, worker_kb = (int(v) for v in rss_file.read_text().split())
    manifest = json.loads((out / "manifest.json").read_text())
    t = manifest["timings"]
    return {
        "images": manifest["counts"]["images"],
        "wall_s": wall,
        "images_per_s": t["images_per_s"],
        "outside_model": 1 - t["model_s"] / t["loop_s"],
        "peak_mb": own_kb / 1024,
        "worker_peak_mb": worker_kb / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--views", default="default")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
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
            rows.append(_label(checkpoint, images, work / f"labels_{count}", args))
    print(f"views {args.views}, workers {args.workers}, threads {args.threads}, batch {args.batch_size}, "
          f"{args.size} px, device {args.device}")  # fmt: skip
    print(f"{'images':>8} {'wall s':>8} {'img/s':>8} {'outside model':>14} {'peak MB':>8} {'worker MB':>10}")
    for r in rows:
        print(f"{r['images']:>8} {r['wall_s']:>8.1f} {r['images_per_s']:>8.1f} {100 * r['outside_model']:>13.1f}%"
              f" {r['peak_mb']:>8.0f} {r['worker_peak_mb']:>10.0f}")  # fmt: skip
    if len(rows) > 1:
        print(f"peak memory ratio {rows[-1]['images']} vs {rows[0]['images']} images: "
              f"{rows[-1]['peak_mb'] / rows[0]['peak_mb']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
