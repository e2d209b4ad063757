"""What the benchmarks share: the stage runner that skips a stage whose output is there (so a killed bench
resumes), the set-up of each worker process, the pool that runs one seed per process, the cached evaluation
and the AP helpers, and the facts written beside every result (options, timings, load, provenance).

``bench/`` is not a package: each script imports this module as ``common`` (``python bench/NAME.py`` puts
``bench/`` first on the path; the tests load the scripts through ``tests/conftest.py:load_bench``)."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from datadistill.core.types import Detections
from datadistill.data.coco import CocoDataset, read_json
from datadistill.data.label_folder import read_shards, shard_detections
from datadistill.models.detector import load_detector
from datadistill.runtime.io import provenance
from datadistill.stages.evaluate import evaluate_model, write_metrics
from datadistill.stages.label import LabelConfig, label

log = logging.getLogger("bench")


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A bench's command line: described by the first paragraph of its docstring, with ``--out`` (the
    results json) and ``--work`` (its working folder, :func:`work_folder`)."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", required=True, help="results json")
    p.add_argument("--work", default=None, help="working folder (default: OUT without .json + '_work')")
    return p


def work_folder(args: argparse.Namespace) -> Path:
    """``--work``, or the results json's path without its suffix and with ``_work``."""
    out = Path(args.out)
    return Path(args.work) if args.work else out.with_name(out.stem + "_work")


def init_worker(threads: int) -> None:
    """A bench process's set-up (the main one's, and each pool worker's): INFO logs on stderr, ``threads``
    torch threads."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)  # fmt: skip
    torch.set_num_threads(threads)


class Stages:
    """Runs a stage unless its marker file exists, and keeps the seconds each stage took in this run
    (a stage done by an earlier run is not counted)."""

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        self.seconds: dict[str, float] = {} if seconds is None else seconds

    def run(self, name: str, done: Path, work: Callable[[], Any]) -> None:
        if done.exists():
            return
        log.info("%s ...", name)
        t0 = time.perf_counter()
        work()
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        log.info("%s: %.0f s", name, self.seconds[name])


def label_complete(cfg: LabelConfig, folder: Path) -> None:
    """``label(cfg)`` into ``folder``, then ``folder/manifest.complete`` when the labeling is complete
    (the marker :class:`Stages` waits for: a killed labeling resumes from its shards)."""
    label(cfg)
    if read_json(folder / "manifest.json").get("status") == "complete":
        (folder / "manifest.complete").write_text("")


def run_seeds(run: Callable[..., Any], seeds: Iterable[int], *args: Any, jobs: int, threads: int) -> dict[int, Any]:
    """``{seed: run(seed, *args)}``, ``jobs`` seeds at once in spawned processes of ``threads`` torch threads
    each (in this process when ``jobs`` is 1)."""
    seeds = list(seeds)
    if jobs <= 1:
        return {seed: run(seed, *args) for seed in seeds}
    context = multiprocessing.get_context("spawn")  # torch and fork do not mix
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=init_worker, initargs=(threads,)) as pool:
        futures = {seed: pool.submit(run, seed, *args) for seed in seeds}
        return {seed: f.result() for seed, f in futures.items()}


def cached_metrics(path: Path, model: str | Path, dataset: CocoDataset, images: str | Path | None) -> dict[str, Any]:
    """The metrics of ``model`` (a checkpoint or training folder) on ``dataset`` on the CPU, evaluated once
    and kept in ``path`` (``metrics.json`` format)."""
    if not path.exists():
        detector = load_detector(str(model), device="cpu")
        write_metrics(path, evaluate_model(detector, dataset, images, device=torch.device("cpu"), batch_size=8))
    return read_json(path)


def percent(box: dict[str, Any], keys: tuple[str, ...] = ("AP", "AP50", "AP75")) -> dict[str, float | None]:
    """``keys`` of a box metrics dict (fractions) in percent, rounded to 0.1 (None stays None)."""
    return {k: None if box[k] is None else round(100 * box[k], 1) for k in keys}


def ap_text(box: dict[str, Any]) -> str:
    """``AP / AP50`` of a box metrics dict, in percent: ``"38.4 / 61.0"``."""
    return f"{100 * box['AP']:.1f} / {100 * box['AP50']:.1f}"


def fused_candidates(folder: Path, truth: CocoDataset) -> dict[int, Detections]:
    """Every fused candidate of a labeling folder's shards, by image id of ``truth``."""
    ids = {im.file_name: im.id for im in truth.images}
    return {ids[row["file_name"]]: shard_detections(row, 0) for row in read_shards(folder).to_pylist()}


def options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options as JSON values (sets sorted)."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()}


def load_now() -> list[float]:
    """The load averages (1, 5, 15 min): other processes on the machine slow the wall time."""
    return [round(x, 2) for x in os.getloadavg()]


def run_facts(*, started: float, load_start: list[float], script: str, argv: list[str] | None) -> dict[str, Any]:
    """What a result json records about its run: wall and CPU seconds (this process and its children) since
    ``started`` (``time.time()``), the load at the start and now, the command, and the provenance."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "total_seconds": round(time.time() - started, 1),
        "cpu_seconds": round(own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 1),
        "load_average": {"start": load_start, "end": load_now()},
        "command": " ".join(["python", f"bench/{script}", *(argv if argv is not None else sys.argv[1:])]),
        "provenance": provenance(),
    }
