"""A busy machine: how much slower ``train`` and ``label`` run beside a process that takes one core.

    python bench/busy.py [--iterations 200] [--launch fixed,default] [--images 32] [--cap 150] \
        [--lock /tmp/dd/cpu.lock] [--out busy.json]

Each command runs as a user runs it (``python -m datadistill ...``), alone and beside a Python busy loop
(one core), in these launches (``--launch``):

- ``default``: the CLI as it is: ``train`` without ``--threads`` keeps torch's threads at the cores other
  processes leave free (:mod:`datadistill.runtime.threads`); ``label`` runs one thread and two decoding
  workers;
- ``fixed``: ``train --threads <cores>``, torch's one thread per core whatever the load (the default
  before the thread governor);
- ``one-thread``: ``OMP_NUM_THREADS=1``;
- ``short-spin``: ``GOMP_SPINCOUNT=10000`` (libgomp's waiting threads spin about 300,000 rounds before they
  sleep by default; this spins briefly, then sleeps);
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE``, no spin at all.

Speeds: ``train``, the median it/s of its logged steps after the first (startup and the first steps left
out); ``label``, images/s of its labeling loop (the manifest's ``images_per_s``). A run still going after
``--cap`` seconds is stopped and its speed is what its logged steps say. The slowdown is alone / busy, to be
compared with the CPU the busy loop takes: one core of ``os.cpu_count()``. ``--lock``: hold this file
(``flock``) during each run, so that the runs of one invocation go between other heavy jobs.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

SIZE_PX = 96
BUSY_LOOP = "while True:\n    pass\n"
# name: (environment, extra `train` arguments)
LAUNCH: dict[str, tuple[dict[str, str], list[str]]] = {
    "default": ({}, []),
    "fixed": ({}, ["--threads", str(os.cpu_count() or 1)]),
    "short-spin": ({"GOMP_SPINCOUNT": "10000"}, []),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, []),
    "one-thread": ({"OMP_NUM_THREADS": "1"}, []),
}
CLI = [sys.executable, "-m", "datadistill"]


@contextlib.contextmanager
def locked(path: str | None) -> Iterator[None]:
    if path is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def busy(on: bool) -> Iterator[None]:
    """A Python busy loop (one core) for the duration of the block when ``on``."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if on else None
    try:
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def make_data(work: Path, images: int) -> tuple[Path, Path]:
    """16 labeled shapes images and ``images`` unlabeled ones, all of ``SIZE_PX`` px."""
    from datadistill.data.synth import make_shapes

    make_shapes(work / "shapes", num_images=16, seed=0, size_px=SIZE_PX)
    make_shapes(work / "unlabeled", num_images=images, seed=1, size_px=SIZE_PX)
    return work / "shapes", work / "unlabeled" / "images"


def run(cmd: list[str], cap: float, env: dict[str, str]) -> float:
    """Seconds ``cmd`` ran with ``env`` added to the environment (stopped after ``cap``)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})  # fmt: skip
    try:
        _, err = proc.communicate(timeout=cap)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return time.perf_counter() - started


def train_speed(launch: str, shapes: Path, out: Path, *, iterations: int, cap: float) -> float:
    env, extra = LAUNCH[launch]
    cmd = [*CLI, "train", *extra, "--data", str(shapes / "annotations.json"), "--images", str(shapes / "images"),
           "--out", str(out), "--iterations", str(iterations), "--batch-size", "4", "--min-size", str(SIZE_PX),
           "--max-size", str(SIZE_PX), "--log-every", "5", "--device", "cpu"]  # fmt: skip
    run(cmd, cap, env)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]
    speeds = [line["it_s"] for line in lines if line["type"] == "step"][1:]
    return statistics.median(speeds) if speeds else 0.0


def label_speed(launch: str, checkpoint: Path, images: Path, out: Path, *, cap: float) -> float:
    env, _ = LAUNCH[launch]  # label's own default is one thread
    cmd = [*CLI, "label", "--model", str(checkpoint), "--images", str(images), "--out", str(out), "--device",
           "cpu", "--shard-size", "8", "--allow-weak-teacher"]  # fmt: skip
    seconds = run(cmd, cap, env)
    manifest = json.loads((out / "manifest.json").read_text())
    if manifest["status"] == "complete":
        return manifest["timings"]["images_per_s"]
    done = sum(pq.read_metadata(p).num_rows for p in (out / "shards").glob("part-*.parquet"))
    return done / seconds  # stopped: startup included


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=200, help="training iterations of each train run")
    p.add_argument("--images", type=int, default=32, help="unlabeled images of each label run")
    p.add_argument("--cap", type=float, default=150, help="seconds after which a run is stopped")
    p.add_argument("--lock", default=None, help="a file to flock during each run")
    p.add_argument("--launch", default="fixed,default", help=f"which launches to compare ({','.join(LAUNCH)})")
    p.add_argument("--commands", default="train,label", help="which commands to measure")
    p.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="busy-") as tmp:
        work = Path(tmp)
        shapes, unlabeled = make_data(work, args.images)
        checkpoint = None
        for launch in args.launch.split(","):
            for load in ("alone", "busy"):
                out = work / f"train-{launch}-{load}"
                with locked(args.lock), busy(load == "busy"):
                    speed = train_speed(launch, shapes, out, iterations=args.iterations, cap=args.cap)
                results[f"train {launch} {load}"] = speed
                if checkpoint is None and (out / "checkpoint.pt").exists():
                    checkpoint = out / "checkpoint.pt"
                print(f"train {launch} {load}: {speed:.2f} it/s", flush=True)
        assert checkpoint is not None, "no training run finished within --cap: raise it"
        for launch in args.launch.split(",") if "label" in args.commands else ():
            for load in ("alone", "busy"):
                with locked(args.lock), busy(load == "busy"):
                    speed = label_speed(launch, checkpoint, unlabeled, work / f"label-{launch}-{load}",
                                        cap=args.cap)  # fmt: skip
                results[f"label {launch} {load}"] = speed
                print(f"label {launch} {load}: {speed:.2f} images/s", flush=True)
    print(f"\nslowdown beside a busy loop (alone / busy), one core of {os.cpu_count()} taken:")
    for command in args.commands.split(","):
        for launch in args.launch.split(","):
            alone, loaded = results[f"{command} {launch} alone"], results[f"{command} {launch} busy"]
            ratio = alone / loaded if loaded else float("inf")
            results[f"{command} {launch} slowdown"] = ratio
            print(f"  {command:5s} {launch:4s}: {ratio:5.2f}x  ({alone:.2f} -> {loaded:.2f} per s)")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
