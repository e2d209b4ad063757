"""Labeling's CPU work beside the model: the views' outputs mapped back, fused, turned into shard rows and
written (:class:`~datadistill.stages.shards.ShardWriter`), while the model runs the next batch.

A :class:`Job` is one batch as the model left it: its images' places in the shards, the rows already made
(errors; keypoints fused by heatmap, which needed the model again), and the packed raw outputs of every
view (:class:`~datadistill.stages.multiview.ViewOutputs`) for the rest. :func:`job_rows` finishes it. Three
ways to run it, the same rows in the same order, so the same shards:

- :class:`InlineWriter`: in the labeling loop, one batch after the other (``--sync``);
- :class:`ThreadWriter`: in a thread (on a CPU: the model's kernels release the GIL, and a short run does not
  pay for starting a process);
- :class:`ProcessWriter`: in a child process (on a GPU: the model's Python, which launches its kernels and
  waits for them, keeps the GIL to itself; a thread measurably slowed a small model's forward passes). The
  parent sends a batch once the next one has run (by then its copy to the CPU has landed, so nothing waits),
  as NumPy arrays; the child writes the shards and answers each batch. If the parent dies, the child reads
  the end of its pipe and stops: a shard is written whole or not at all, as always.

At most ``depth`` batches wait for the writer; each writer's :meth:`put` returns the number of images
finished since its last call, for the progress bar.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datadistill.core.views import View
from datadistill.errors import UserError
from datadistill.stages.multiview import LabelTimer, ViewOutputs, fuse_views
from datadistill.stages.shards import ShardWriter, detections_row

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fusion:
    """How a job's views are fused into rows (picklable: it goes to the child process)."""

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

    def portable(self) -> Job:
        """This job with its outputs as NumPy arrays, waited for (to send to another process)."""
        if self.outputs is None:
            return self
        o = self.outputs
        if o.ready is not None:
            o.ready.synchronize()
        return replace(self, outputs=_convert(replace(o, ready=None), lambda t: t.numpy()))


def _convert(outputs: ViewOutputs, fn: Callable[[Any], Any]) -> ViewOutputs:
    """``outputs`` with ``fn`` applied to each of its arrays (torch <-> NumPy)."""
    fields = {k: getattr(outputs, k) for k in ("boxes", "scores", "labels", "keypoints")}
    return replace(outputs, **{k: None if v is None else fn(v) for k, v in fields.items()})


def job_rows(job: Job, fusion: Fusion, timer: LabelTimer) -> list[tuple[int, int, dict[str, Any]]]:
    """``(shard, position, row)`` of every item of ``job``, fusing its views' outputs."""
    made: list[dict[str, Any]] = []
    if job.outputs is not None:
        o = job.outputs
        if isinstance(o.boxes, np.ndarray):  # a job sent from the labeling process
            o = _convert(o, torch.from_numpy)
        per_image = o.per_image(fusion.views, fusion.flip_index)
        fused = fuse_views(per_image, fuse=fusion.fuse, iou_thr=fusion.iou_thr, score_floor=fusion.score_floor,
                           timer=timer)  # fmt: skip
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


class ProcessWriter:
    """Jobs finished and written by a child process, one batch behind the loop, at most ``depth`` waiting."""

    def __init__(self, out: Path, expected: dict[int, int], fusion: Fusion, timer: LabelTimer, *, depth: int) -> None:
        self.timer, self.depth = timer, depth
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds CUDA and threads
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve, args=(child, out, expected, fusion), daemon=True,
                                       name="datadistill-write")  # fmt: skip
        self.process.start()
        child.close()
        self.held: Job | None = None
        self.sent = 0

    def put(self, job: Job) -> int:
        done = self._send(self.held) if self.held is not None else 0
        self.held = job
        return done

    def _send(self, job: Job) -> int:
        self.conn.send(job.portable())
        self.sent += 1
        done = 0
        while self.sent > self.depth or self.conn.poll():
            done += self._answer()
        return done

    def _answer(self) -> int:
        try:
            kind, value = self.conn.recv()
        except EOFError:
            raise RuntimeError("the labeling writer process died (out of memory?); run again to resume") from None
        if kind == "error":
            raise UserError(value)
        self.sent -= 1
        if kind == "closed":
            self.timer.fusion_s += value
            return 0
        return value

    def finish(self) -> int:
        done = self._send(self.held) if self.held is not None else 0
        self.held = None
        self.conn.send(None)
        self.sent += 1
        while self.sent:
            done += self._answer()
        self.process.join()
        return done

    def abort(self) -> None:
        self.conn.close()  # the child reads the end of the pipe and stops
        self.process.join(timeout=60)


def serve(conn: Any, out: Path, expected: dict[int, int], fusion: Fusion) -> None:
    """The child process of :class:`ProcessWriter`: finish and write each job it receives, answer
    ``("done", images)``; on None, check every shard was written and answer ``("closed", fusion seconds)``."""
    torch.set_num_threads(1)
    writer = ShardWriter(out=out, expected=expected, num_keypoints=fusion.num_keypoints)
    timer = LabelTimer()
    try:
        while True:
            try:
                job = conn.recv()
            except EOFError:  # the labeling process is gone: what it sent is written, the rest is its to redo
                return
            if job is None:
                writer.close()
                conn.send(("closed", timer.fusion_s))
                return
            for shard, position, row in job_rows(job, fusion, timer):
                writer.add(shard, position, row)
            conn.send(("done", len(job.places)))
    except Exception as exc:  # noqa: BLE001 - reported to the labeling process, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}" if not isinstance(exc, UserError) else str(exc)))


def make_writer(
    *, out: Path, expected: dict[int, int], fusion: Fusion, timer: LabelTimer, mode: str, depth: int
) -> InlineWriter | ThreadWriter | ProcessWriter:
    """``mode``: ``inline``, ``thread`` or ``process`` (see the module docstring)."""
    started = time.perf_counter()
    if mode == "process":
        made: Any = ProcessWriter(out, expected, fusion, timer, depth=depth)
    else:
        shards = ShardWriter(out=out, expected=expected, num_keypoints=fusion.num_keypoints)
        made = (
            ThreadWriter(shards, fusion, timer, depth=depth)
            if mode == "thread"
            else InlineWriter(shards, fusion, timer)
        )
    log.debug("labeling writer: %s (%.2f s to start)", mode, time.perf_counter() - started)
    return made
