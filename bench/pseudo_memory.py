"""A student's start-up and memory with many pseudo-labeled images: the label table (``pseudo.parquet``,
memory-mapped flat arrays) against the COCO json.

Run: ``flock /tmp/dd/cpu.lock python bench/pseudo_memory.py --out bench/results/pseudo_memory.json``
(``--former-src /path/to/old/src`` adds the json path of another checkout, e.g. before the label table).

Data (made once under ``--work``, reused): 120 labeled 96 px images of shapes (``make_shapes``); for each size
``N`` of ``--sizes`` a ``pseudo.parquet`` of N images with 4.2 objects per image on average (Poisson; 5% ignore
regions), written by :class:`~datadistill.data.label_table.LabelTableWriter` 65,536 images at a time; the
images are one folder of symlinks to the labeled images. For ``--json-sizes`` the same labels as a COCO json.

Each (size, file) runs in a fresh process, as ``train`` does before its first iteration, without a model:
:func:`~datadistill.data.inputs.load_training_sets` (for a label table: its flat arrays written to a fresh
output folder and memory-mapped; 1,000 image files checked), the input-size check, the sha256 recorded for
resume, the two ``DetectionDataset`` and the mixing sampler (batch 8, 6:4 real:pseudo), a DataLoader with 2
workers; then ``--iterations`` (20) batches. It reports the seconds to the first batch (the imports apart) and
the peak RSS (``VmHWM``) of the main process and of each worker, read after the last batch. The ratios of
each process's peak at the largest and the smallest size close the table.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REAL_IMAGES = 120
SIZE_PX = 96
OBJECTS_PER_IMAGE = 4.2
CROWD_FRACTION = 0.05
BATCH_SIZE = 8
CHUNK = 65_536


def status_mb(pid: int, key: str) -> float:
    """A memory line of ``/proc/PID/status`` in MB (10^6 bytes): ``VmHWM`` (the peak resident set, shared
    library pages included: torch's take about 950 MB in each process of a CUDA build) or ``RssAnon`` (the
    process's own memory now: what grows with the data)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no {key} for process {pid}")


# ----------------------------------------------------------------------------------------------------
# the data


def make_labeled(work: Path, count: int) -> tuple[Path, list[str]]:
    """The labeled set of ``count`` images (json, file names), made once."""
    from datadistill.data.coco import load_coco
    from datadistill.data.synth import make_shapes

    json_path = work / "labeled" / "annotations.json"
    if not json_path.exists():
        make_shapes(work / "labeled", num_images=count, seed=0, size_px=SIZE_PX)
    return json_path, [im.file_name for im in load_coco(json_path).images]


def link_images(work: Path, names: list[str], count: int) -> Path:
    """``count`` symlinks ``0000000.png ...`` to the labeled images, in one folder (added to as needed)."""
    folder = work / "pseudo_images"
    folder.mkdir(exist_ok=True)
    have = len(os.listdir(folder))
    for i in range(have, count):
        os.symlink(work / "labeled" / "images" / names[i % len(names)], folder / f"{i:07d}.png")
    return folder


def chunks(n: int, seed: int = 0):  # noqa: ANN201 (a generator of dicts)
    """The synthetic pseudo-labels of ``n`` images, ``CHUNK`` images at a time (LabelTableWriter.write's arguments)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for lo in range(0, n, CHUNK):
        k = min(CHUNK, n - lo)
        counts = rng.poisson(OBJECTS_PER_IMAGE, k)
        m = int(counts.sum())
        xy = rng.uniform(0, SIZE_PX - 8, (m, 2))
        wh = rng.uniform(2.0, SIZE_PX - xy)  # inside the image
        yield dict(
            file_names=[f"{i:07d}.png" for i in range(lo, lo + k)],
            widths=np.full(k, SIZE_PX), heights=np.full(k, SIZE_PX), counts=counts,
            boxes=np.concatenate([xy, xy + wh], axis=1), labels=rng.integers(0, 7, m),
            iscrowd=rng.random(m) < CROWD_FRACTION, scores=rng.uniform(0.3, 1.0, m), agreement=rng.integers(1, 3, m),
        )  # fmt: skip


def make_pseudo(work: Path, labeled: Path, n: int, *, as_json: bool) -> Path:
    """``pseudo.parquet`` (or ``pseudo.json``) of ``n`` images, made once."""
    from datadistill.data.coco import load_coco
    from datadistill.data.label_table import LabelTableWriter

    path = work / f"pseudo_{n}" / ("pseudo.json" if as_json else "pseudo.parquet")
    if path.exists():
        return path
    categories = load_coco(labeled).categories
    if not as_json:
        with LabelTableWriter(path, categories=categories, num_keypoints=0, info={"bench": "pseudo_memory"}) as w:
            for chunk in chunks(n):
                w.write(**chunk)
        return path
    images, annotations = [], []
    for chunk in chunks(n):
        start = len(images)
        images += [{"id": start + i + 1, "file_name": f, "width": SIZE_PX, "height": SIZE_PX}
                   for i, f in enumerate(chunk["file_names"])]  # fmt: skip
        image_of = [start + i + 1 for i, c in enumerate(chunk["counts"]) for _ in range(c)]
        for j, (x1, y1, x2, y2) in enumerate(chunk["boxes"].tolist()):
            cid = categories[int(chunk["labels"][j])].id
            annotations.append({"id": len(annotations) + 1, "image_id": image_of[j], "category_id": cid,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": int(chunk["iscrowd"][j]), "score": float(chunk["scores"][j]),
                                "agreement": int(chunk["agreement"][j])})  # fmt: skip
    raw = json.loads(labeled.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": raw["categories"]}))
    return path


# ----------------------------------------------------------------------------------------------------
# one measurement, in its own process


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Start a student's data as ``train`` does, then ``args.iterations`` batches; seconds and peak RSS."""
    started = time.perf_counter()
    import psutil
    import torch
    from torch.utils.data import ConcatDataset, DataLoader

    from datadistill.data.dataset import DetectionDataset, MixedBatchSampler, collate
    from datadistill.data.inputs import check_input_sizes, load_training_sets
    from datadistill.runtime.io import file_sha256

    torch.set_num_threads(1)
    imported = time.perf_counter()
    out = Path(tempfile.mkdtemp(dir=args.work, prefix="run-"))
    kwargs = dict(data=args.data, images=args.images, pseudo=args.pseudo, pseudo_images=args.pseudo_images)
    if "cache_dir" in inspect.signature(load_training_sets).parameters:  # a checkout without it reads json only
        kwargs["cache_dir"] = out / ".flat-labels"
    sets = load_training_sets(**kwargs)
    for part, path in ((sets.dataset, args.data), (sets.pseudo, args.pseudo)):
        check_input_sizes(part, path, min_size=SIZE_PX, max_size=SIZE_PX)
    file_sha256(args.pseudo)
    real = DetectionDataset(sets.dataset, args.images, train=True, seed=0)
    pseudo = DetectionDataset(sets.pseudo, args.pseudo_images, train=True, seed=1)
    loaded = time.perf_counter()
    sampler = MixedBatchSampler(len(real), len(pseudo), batch_size=BATCH_SIZE, seed=0)
    assert len(sampler) >= args.iterations, "one epoch must hold the iterations (the workers start once)"
    loader = DataLoader(ConcatDataset([real, pseudo]), batch_sampler=sampler, num_workers=args.workers,
                        collate_fn=collate)  # fmt: skip
    batches = iter(loader)
    next(batches)
    first = time.perf_counter()
    for _ in range(args.iterations - 1):
        next(batches)
    done = time.perf_counter()
    workers = [p.pid for p in psutil.Process().children()]
    result = {
        "import_s": imported - started,
        "load_s": loaded - imported,
        "startup_s": first - imported,
        "iterations_s": done - first,
        "main_peak_mb": status_mb(os.getpid(), "VmHWM"),
        "worker_peak_mb": [status_mb(pid, "VmHWM") for pid in workers],
        "main_anon_mb": status_mb(os.getpid(), "RssAnon"),
        "worker_anon_mb": [status_mb(pid, "RssAnon") for pid in workers],
    }
    del batches
    return result


def run_child(args: argparse.Namespace, pseudo: Path, images: Path, *, src: str | None) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if src is not None:
        env["PYTHONPATH"] = src
    cmd = [sys.executable, __file__, "--child", "--work", str(args.work), "--data", str(args.labeled),
           "--images", str(args.labeled.parent / "images"), "--pseudo", str(pseudo), "--pseudo-images", str(images),
           "--iterations", str(args.iterations), "--workers", str(args.workers)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{pseudo}: the measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'images':>9} {'file':<24} {'start-up s':>10} {'20 it s':>8} {'peak RSS MB: main':>17} {'workers':>11} "
        f"{'anon MB: main':>13} {'workers':>9}"
    ]
    for r in rows:
        workers = " / ".join(f"{w:.0f}" for w in r["worker_peak_mb"])
        anon = " / ".join(f"{w:.0f}" for w in r["worker_anon_mb"])
        lines.append(f"{r['images']:>9,} {r['file']:<24} {r['startup_s']:>10.2f} {r['iterations_s']:>8.2f} "
                     f"{r['main_peak_mb']:>17.0f} {workers:>11} {r['main_anon_mb']:>13.0f} {anon:>9}")  # fmt: skip
    tables = [r for r in rows if r["file"] == "pseudo.parquet"]
    if len(tables) > 1:
        small, large = tables[0], tables[-1]
        ratios = [large["main_peak_mb"] / small["main_peak_mb"]]
        ratios += [a / b for a, b in zip(large["worker_peak_mb"], small["worker_peak_mb"], strict=True)]
        lines.append(f"peak RSS at {large['images']:,} / at {small['images']:,} images (pseudo.parquet): main "
                     f"{ratios[0]:.2f}, workers " + " / ".join(f"{x:.2f}" for x in ratios[1:]))  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dd_pseudo_memory")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--json-sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--former-src", help="also measure the json path of the checkout whose src/ this is")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--real-images", type=int, default=REAL_IMAGES, help="labeled images (one epoch: / 5 batches)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the rows as json here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--data", "--images", "--pseudo", "--pseudo-images"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    args.labeled, names = make_labeled(args.work, args.real_images)
    images = link_images(args.work, names, max(args.sizes + args.json_sizes))
    rows = []
    runs = [(n, False, None) for n in args.sizes] + [(n, True, None) for n in args.json_sizes]
    runs += [(n, True, args.former_src) for n in args.json_sizes if args.former_src]
    for n, as_json, src in runs:
        pseudo = make_pseudo(args.work, args.labeled, n, as_json=as_json)
        result = run_child(args, pseudo, images, src=src)
        result.update(images=n, file=pseudo.name + (" (former)" if src else ""), bytes=pseudo.stat().st_size)
        rows.append(result)
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.out:
        from datadistill.runtime.io import provenance, write_json_atomic

        write_json_atomic(args.out, {"rows": rows, "provenance": provenance(), "cpus": os.cpu_count()}, indent=2)


if __name__ == "__main__":
    main()
