"""Labeling's CPU work beside the model: the views' outputs mapped back, fused, turned into shard rows and
written (:class:`~datadistill.data.label_folder.ShardWriter`), while the model runs the next batch.

A :class:`Job` is one batch as the model left it: its images' places in the shards, the rows already made
(errors; keypoints fused by heatmap, which needed the model again), and the packed raw outputs of every
view (:class:`~datadistill.stages.multiview.ViewOutputs`) for the rest. :func:`job_rows` finishes it,
in one of two ways that give the same rows in the same order, so the same shards:

- :class:`InlineWriter`: in the labeling loop, one batch after the other (``--sync``);
- :class:`ThreadWriter`: in a thread beside the loop, at most ``depth`` batches waiting (the default). The
  fusion's compiled loops release the GIL; its Python does not, and competes with the model's own Python
  (measured on an H200: a thread helps Faster R-CNN R50-FPN, whose forward passes are long, and slowed the
  small FCOS, whose forward passes are mostly Python; ``docs/results.md``). So the writer works on a whole
  batch per call (:func:`~datadistill.stages.multiview.fuse_views`), each torch call of it a point where it
  takes the GIL from the model's thread (``bench/writer_gil.py``).

Each writer's :meth:`put` returns the number of images finished since its last call, for the progress bar.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datadistill.core.views import View
from datadistill.data.label_folder import ShardWriter, detections_row
from datadistill.stages.multiview import LabelTimer, ViewOutputs, fuse_views

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fusion:
    """How a job's views are fused into rows."""

    views: tuple[View, ...]
    flip_index: tuple[int, ...]
    fuse: str
    iou_thr: float
    score_floor: float
    num_keypoints: int


@dataclass(frozen=True)
class Job:
    """One batch: ``places[i]`` = (shard, position) of item i; ``rows[i]``: its row, or None where the
    fusion of ``outputs`` makes it (for the items ``names``, of ``sizes`` (width, height), in order)."""

    places: tuple[tuple[int, int], ...]
    rows: tuple[dict[str, Any] | None, ...]
    names: tuple[str, ...] = ()
    sizes: tuple[tuple[int, int], ...] = ()
    outputs: ViewOutputs | None = None


def job_rows(job: Job, fusion: Fusion, timer: LabelTimer) -> list[tuple[int, int, dict[str, Any]]]:
    """``(shard, position, row)`` of every item of ``job``, fusing its views' outputs."""
    made: list[dict[str, Any]] = []
    if job.outputs is not None:
        rows = job.outputs.invert(fusion.views, fusion.flip_index)
        fused = fuse_views(rows, fuse=fusion.fuse, iou_thr=fusion.iou_thr, score_floor=fusion.score_floor, timer=timer)
        made = [detections_row(name, w, h, det, fusion.num_keypoints)
                for name, (w, h), det in zip(job.names, job.sizes, fused, strict=True)]  # fmt: skip
    rest = iter(made)
    rows = [row if row is not None else next(rest) for row in job.rows]
    return [(shard, position, row) for (shard, position), row in zip(job.places, rows, strict=True)]


class InlineWriter:
    """The plain loop: each job finished and written at once."""

    def __init__(self, writer: ShardWriter, fusion: Fusion, timer: LabelTimer) -> None:
        self.writer, self.fusion, self.timer = writer, fusion, timer

    def put(self, job: Job) -> int:
        for shard, position, row in job_rows(job, self.fusion, self.timer):
            self.writer.add(shard, position, row)
        return len(job.places)

    def finish(self) -> int:
        self.writer.close()
        return 0

    def abort(self) -> None:
        pass


class ThreadWriter(InlineWriter):
    """Jobs finished in a thread beside the labeling loop, at most ``depth`` waiting."""

    def __init__(self, writer: ShardWriter, fusion: Fusion, timer: LabelTimer, *, depth: int) -> None:
        super().__init__(writer, fusion, timer)
        self.depth = depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="datadistill-write")
        self.waiting: deque[Future[int]] = deque()

    def put(self, job: Job) -> int:
        self.waiting.append(self.pool.submit(InlineWriter.put, self, job))
        done = 0
        while len(self.waiting) > self.depth or (self.waiting and self.waiting[0].done()):
            done += self.waiting.popleft().result()
        return done

    def finish(self) -> int:
        done = sum(f.result() for f in self.waiting)
        self.waiting.clear()
        self.pool.shutdown()
        return done + super().finish()

    def abort(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def make_writer(
    *, out: Path, expected: dict[int, int], fusion: Fusion, timer: LabelTimer, mode: str, depth: int
) -> InlineWriter:
    """``mode``: ``inline`` or ``thread`` (see the module docstring)."""
    shards = ShardWriter(out=out, expected=expected, num_keypoints=fusion.num_keypoints)
    if mode == "thread":
        return ThreadWriter(shards, fusion, timer, depth=depth)
    return InlineWriter(shards, fusion, timer)
