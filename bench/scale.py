"""Scale: ``select``, the student's start-up and ``review`` on a real labeling folder replicated to 10k, 100k
and 1M unlabeled images; time and peak RSS of every process.

Run: ``flock /tmp/dd/cpu.lock python bench/scale.py --work /tmp/dd/scale --out bench/results/scale.json``
(``--sizes 10000,100000`` for a shorter run; the replicated folders are kept in ``--work`` and reused).

1. The base: ``datadistill demo --quick`` (synthetic shapes, a small FCOS teacher trained for seconds, so a
   weak one that leaves many candidates above the floor), then ``datadistill label`` of its unlabeled images
   with the default views. Its shards are real labels: scores, boxes and agreements as a teacher makes them.
2. Each size N: the base's rows repeated until N images, each copy's file names under its own folder
   ``cNNNNNN/`` of an image farm whose folders are symlinks to the base's images (so that every image exists),
   written as shards of 1,000 images with the manifest's counts.
3. Per size, each command a fresh process, sampled every 50 ms (psutil: the process and each child):
   ``select`` (the count rule), ``train --pseudo`` (a small FCOS student, 20 iterations, 2 DataLoader
   workers; the pseudo-labels as ``select`` wrote them: ``pseudo.parquet`` when it writes one, else the
   json) with its start-up to the first iteration, and ``review --top 100``.

The main process's peak RSS is its own ``getrusage`` (exact); the workers' are sampled. A batch of 2 (one
real image, one pseudo) so that an epoch of the demo's 24 labeled images is long enough for DataLoader
workers (shorter epochs load in the main process).

The goals (issue 27), at 1M images: ``select`` peak RSS <= 1.5 GB and under 10 minutes on 2 cores; the
student's start-up under 2 minutes with every process under 1.5 GB; RSS(1M) / RSS(10k) <= 1.3 for each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datadistill.data.label_folder import read_shard, shard_path
from datadistill.runtime.io import provenance, write_json_atomic

SHARD_SIZE = 1000
BIN = Path(sys.executable).parent


# The CLI in a process that writes its own peak RSS (getrusage: exact, where sampling misses short peaks) to
# the file named by DD_PEAK_RSS at exit; DataLoader workers leave through os._exit and write nothing.
LAUNCH = (
    "import atexit, os, resource, sys\n"
    "atexit.register(lambda: open(os.environ['DD_PEAK_RSS'], 'w').write("
    "str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))\n"
    "from datadistill.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", LAUNCH, *args]


def measure(cmd: list[str], *, env: dict[str, str], first_line: Path | None = None) -> dict[str, Any]:
    """Run ``cmd``; its wall time, the peak RSS (MiB) of the process and of each of its children, and the
    seconds until ``first_line`` (a file) first holds a line (None when not asked)."""
    peak_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"dd-peak-{os.getpid()}.txt"
    peak_file.unlink(missing_ok=True)
    started = time.perf_counter()
    log = tempfile.TemporaryFile(mode="w+")  # a pipe would fill and block a chatty process
    proc = subprocess.Popen(cmd, env={**env, "DD_PEAK_RSS": str(peak_file)}, stdout=subprocess.DEVNULL, stderr=log)
    root = psutil.Process(proc.pid)
    peaks: dict[int, int] = {}
    first = None
    while proc.poll() is None:
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    peaks[p.pid] = max(peaks.get(p.pid, 0), p.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass
        if first is None and first_line is not None and first_line.exists() and first_line.stat().st_size > 0:
            first = time.perf_counter() - started
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    log.seek(0)
    err = log.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    sampled = peaks.pop(proc.pid, 0)
    main_peak = int(peak_file.read_text()) * 1024 if peak_file.exists() else sampled
    peak_file.unlink(missing_ok=True)
    return {
        "seconds": round(seconds, 1),
        "first_iteration_s": None if first is None else round(first, 1),
        "rss_mib": round(main_peak / 2**20),
        "children_rss_mib": sorted((round(v / 2**20) for v in peaks.values()), reverse=True),
    }


def make_base(work: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """The demo's run folder and a labeling folder of its unlabeled images (default views)."""
    demo, labels = work / "demo", work / "base-labels"
    if not (demo / "teacher").exists():
        subprocess.run(cli("demo", "--quick", "--out", str(demo), "--threads", "1"), env=env, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    if not (labels / "manifest.json").exists():
        subprocess.run(cli("label", "--model", str(demo / "teacher"), "--images", str(demo / "data" / "unlabeled.json"),
                           "--out", str(labels), "--threads", "2", "--allow-weak-teacher"), env=env, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    return demo, labels


def replicate(base: Path, size: int, work: Path) -> Path:
    """``base`` repeated to ``size`` images under ``work/labels-SIZE`` (kept and reused), its images in
    ``work/farm``: one symlink folder per copy."""
    out = work / f"labels-{size}"
    if (out / "manifest.json").exists():
        return out
    manifest = json.loads((base / "manifest.json").read_text())
    table = pa.concat_tables(read_shard(p) for p in sorted((base / "shards").glob("part-*.parquet")))
    per_copy = table.num_rows
    copies = -(-size // per_copy)
    farm = work / "farm"
    farm.mkdir(parents=True, exist_ok=True)
    root = Path(manifest["config"]["image_root"])
    for c in range(copies):
        link = farm / f"c{c:06d}"
        if not link.exists():
            link.symlink_to(root, target_is_directory=True)
    names = table["file_name"]
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    num_shards = -(-size // SHARD_SIZE)
    objects = 0
    for k in range(num_shards):
        rows = range(k * SHARD_SIZE, min((k + 1) * SHARD_SIZE, size))
        parts = []
        for c in range(rows.start // per_copy, (rows.stop - 1) // per_copy + 1):
            lo, hi = max(rows.start - c * per_copy, 0), min(rows.stop - c * per_copy, per_copy)
            part = table.slice(lo, hi - lo)
            prefixed = pc.binary_join_element_wise(f"c{c:06d}", names.slice(lo, hi - lo), "/")
            parts.append(part.set_column(0, "file_name", prefixed))
        shard = pa.concat_tables(parts)
        objects += int(pc.sum(pc.list_value_length(shard["scores"])).as_py() or 0)
        path = shard_path(tmp, k)
        path.parent.mkdir(parents=True, exist_ok=True)

        pq.write_table(shard, path, compression="zstd")
    manifest.update(num_shards=num_shards, shards_done=num_shards, counts={"images": size, "skipped": 0,
                    "objects": objects})  # fmt: skip
    manifest["config"].update(image_root=str(farm), num_images=size, source=f"bench/scale.py x{copies}")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    tmp.rename(out)
    return out


def run_size(size: int, work: Path, demo: Path, base: Path, env: dict[str, str]) -> dict[str, Any]:
    labels = replicate(base, size, work)
    data = demo / "data"
    row: dict[str, Any] = {"images": size}
    meta = json.loads((labels / "manifest.json").read_text())
    row["candidates"] = meta["counts"]["objects"]
    sel = work / f"select-{size}"
    shutil.rmtree(sel, ignore_errors=True)
    row["select"] = measure(cli("select", "--labels", str(labels), "--reference", str(data / "labeled.json"),
                                "--out", str(sel / "pseudo.json")), env=env)  # fmt: skip
    pseudo = sel / "pseudo.parquet" if (sel / "pseudo.parquet").exists() else sel / "pseudo.json"
    row["pseudo_file"] = pseudo.name
    student = work / f"student-{size}"
    shutil.rmtree(student, ignore_errors=True)
    row["student"] = measure(
        cli("train", "--data", str(data / "labeled.json"), "--images", str(data / "images"), "--pseudo", str(pseudo),
            "--pseudo-images", str(work / "farm"), "--out", str(student), "--model", "small_fcos", "--iterations", "20",
            "--workers", "2", "--batch-size", "2", "--threads", "1", "--log-every", "1", "--min-size", "128",
            "--max-size", "128"),
        env=env, first_line=student / "metrics.jsonl",
    )  # fmt: skip
    review = work / f"review-{size}"
    shutil.rmtree(review, ignore_errors=True)
    row["review"] = measure(cli("review", "--labels", str(labels), "--reference", str(data / "labeled.json"),
                                "--selection", str(sel / "selection.json"), "--top", "100", "--out", str(review)),
                            env=env)  # fmt: skip
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "| images | candidates | select s | select RSS MiB | student start s | student 20 it s | student RSS "
        "MiB (main / workers) | review --top 100 s | review RSS MiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        s, t, v = r["select"], r["student"], r["review"]
        workers = "/".join(str(x) for x in t["children_rss_mib"][:2]) or "-"
        print(
            f"| {r['images']:,} | {r['candidates']:,} | {s['seconds']} | {s['rss_mib']} | {t['first_iteration_s']} "
            f"| {t['seconds']} | {t['rss_mib']} / {workers} | {v['seconds']} | {v['rss_mib']} |"
        )
    if len(rows) > 1:
        lo, hi = rows[0], rows[-1]
        for key in ("select", "student", "review"):
            print(f"RSS({hi['images']:,}) / RSS({lo['images']:,}) {key}: {hi[key]['rss_mib'] / lo[key]['rss_mib']:.2f}")
        w_lo, w_hi = lo["student"]["children_rss_mib"], hi["student"]["children_rss_mib"]
        if w_lo and w_hi:
            print(f"RSS({hi['images']:,}) / RSS({lo['images']:,}) student worker: {max(w_hi) / max(w_lo):.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma list of unlabeled image counts")
    p.add_argument("--work", type=Path, required=True, help="where the replicated folders go (kept, reused)")
    p.add_argument("--out", type=Path, default=None, help="write the results json here")
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args.work.mkdir(parents=True, exist_ok=True)
    demo, base = make_base(args.work, env)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        rows.append(run_size(size, args.work, demo, base, env))
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    if args.out is not None:
        write_json_atomic(args.out, {"rows": rows, "provenance": provenance()}, indent=2)


if __name__ == "__main__":
    main()
