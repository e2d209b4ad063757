"""Torch's CPU threads on a shared machine: as many as the cores that other processes leave free.

Torch's intra-op threads (OpenMP) split every op into one part per thread and wait for the slowest. When
another process takes one core of two, the thread that shares its core gets half of it, every op waits for
that thread, and the waiting threads spin: training on a 2-core machine ran 3.9x slower beside a busy loop
that takes 2x the CPU (bench/busy.py). With one thread it runs on the free core at that core's speed.

:class:`ThreadGovernor` watches, every few seconds, how much CPU the other processes take on the cores this
process may use (``/proc/stat``, less this process's own time and its children's) and sets torch's thread
count to the free cores (at least 1, at most the count it started with). It changes nothing where
``/proc`` is missing, and the caller uses it only where the user gave no thread count: a thread count
changes how float sums are split, so ``--threads N`` stays the way to bit-identical runs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Seconds between two looks at the machine: long enough to average a busy process's share, short enough
# to follow one that starts or stops within a training run.
EVERY_S = 2.0
# Free cores are rounded down after adding this: a process that takes under 3/4 of a core leaves that core
# to a thread of ours; one that takes more takes the core.
ROUND_UP = 0.25


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds at one moment: ``busy_s`` of every process on the cores in ``cpus`` (the
    machine's ``/proc/stat``), ``own_s`` of this process and its children (DataLoader workers)."""

    busy_s: float
    own_s: float
    wall_s: float
    cpus: int


def _tick() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def _process_seconds(stat: str, tick: float, *, reaped: bool = False) -> float:
    """utime + stime of a ``/proc/PID/stat`` line, in seconds (the fields after the command's ``)``); with
    ``reaped``, plus cutime + cstime: the CPU time of its children that have ended and been waited for (an
    evaluation's DataLoader workers), which would otherwise count as another process's."""
    fields = stat[stat.rindex(")") + 2 :].split()
    used = int(fields[11]) + int(fields[12])
    if reaped:
        used += int(fields[13]) + int(fields[14])
    return used / tick


def _children_seconds(pid: int, tick: float) -> float:
    """CPU seconds of the live children of ``pid`` (one level: DataLoader workers)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                total += _process_seconds(stat, tick)
        except (OSError, ValueError, IndexError):
            continue  # gone since the listing, or not readable
    return total


def read_sample(cpus: frozenset[int] | None = None) -> CpuSample | None:
    """The machine's and this process tree's CPU seconds now, or None where ``/proc`` cannot say (not Linux).

    ``cpus``: the cores to count (default: those this process may run on, ``os.sched_getaffinity``)."""
    try:
        cpus = frozenset(os.sched_getaffinity(0)) if cpus is None else cpus
        tick = _tick()
        busy = 0.0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *values = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                continue
            ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
            busy += (sum(ticks) - ticks[3] - ticks[4]) / tick
        pid = os.getpid()
        own = _process_seconds(Path(f"/proc/{pid}/stat").read_text(), tick, reaped=True) + _children_seconds(pid, tick)
    except (OSError, ValueError, AttributeError, IndexError):
        return None
    return CpuSample(busy_s=busy, own_s=own, wall_s=time.monotonic(), cpus=len(cpus))


def free_cores(before: CpuSample, after: CpuSample) -> float:
    """Cores not taken by other processes between two samples (this process's own use counts as free)."""
    wall = after.wall_s - before.wall_s
    if wall <= 0:
        return float(after.cpus)
    others = (after.busy_s - before.busy_s - (after.own_s - before.own_s)) / wall
    return after.cpus - min(max(others, 0.0), float(after.cpus))


def threads_for(free: float, most: int) -> int:
    """The thread count for ``free`` cores: rounded down after :data:`ROUND_UP`, between 1 and ``most``."""
    return max(1, min(most, int(free + ROUND_UP)))


class ThreadGovernor:
    """Keeps ``torch.get_num_threads()`` at the free cores; call :meth:`poll` often (every training step):
    it looks at the machine every ``every_s`` seconds and changes the count when two looks in a row agree.

    ``most``: the most threads to use (default: torch's count when made). ``sample`` and ``set_threads``
    are seams for tests."""

    def __init__(
        self,
        most: int | None = None,
        *,
        every_s: float = EVERY_S,
        sample: Callable[[], CpuSample | None] = read_sample,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.most = torch.get_num_threads() if most is None else most
        self.threads = self.most
        self.every_s = every_s
        self._sample, self._set, self._clock = sample, set_threads, clock
        self._last = sample()
        self._next = clock() + every_s
        self._pending: int | None = None

    @property
    def active(self) -> bool:
        """False where the machine cannot be read (then :meth:`poll` does nothing)."""
        return self._last is not None and self.most > 1

    def poll(self) -> int:
        """Look at the machine if it is time; returns the thread count now in use."""
        if not self.active or self._clock() < self._next:
            return self.threads
        now = self._sample()
        self._next = self._clock() + self.every_s
        if now is None or self._last is None:
            return self.threads
        free = free_cores(self._last, now)
        self._last = now
        want = threads_for(free, self.most)
        if want == self.threads:
            self._pending = None
        elif want == self._pending:
            log.info("torch threads %d -> %d: other processes leave %.1f of %d cores free",
                     self.threads, want, free, now.cpus)  # fmt: skip
            self._set(want)
            self.threads, self._pending = want, None
        else:
            self._pending = want
        return self.threads
