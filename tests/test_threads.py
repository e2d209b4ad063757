"""runtime.threads: torch's thread count follows the cores other processes leave free."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from datadistill.runtime.threads import CpuSample, ThreadGovernor, free_cores, read_sample, threads_for


def sample(busy_s: float, own_s: float, wall_s: float, cpus: int = 2) -> CpuSample:
    return CpuSample(busy_s=busy_s, own_s=own_s, wall_s=wall_s, cpus=cpus)


@pytest.mark.parametrize(
    ("busy", "own", "free"),
    [
        (4.0, 4.0, 2.0),  # alone, both cores ours
        (4.0, 2.0, 1.0),  # a busy loop takes one core
        (4.0, 2.67, 1.335),  # our 2 threads and a busy loop share 2 cores (2/3 each)
        (0.2, 0.0, 1.9),  # an idle machine
        (5.0, 0.0, 0.0),  # more than every core (clock skew): none free, never negative
        (1.0, 2.0, 2.0),  # ours counted above the machine's: none taken by others
    ],
)
def test_free_cores_over_two_seconds(busy: float, own: float, free: float) -> None:
    assert free_cores(sample(0, 0, 0), sample(busy, own, 2.0)) == pytest.approx(free)


@pytest.mark.parametrize(("free", "most", "threads"), [(2.0, 2, 2), (1.8, 2, 2), (1.7, 2, 1), (1.0, 2, 1),
                                                       (0.0, 2, 1), (7.9, 4, 4), (2.6, 8, 2)])  # fmt: skip
def test_threads_for(free: float, most: int, threads: int) -> None:
    assert threads_for(free, most) == threads


class Machine:
    """Fake CPU counters: ``others`` cores taken by other processes, ``ours`` by this process, per second."""

    def __init__(self) -> None:
        self.t, self.busy, self.own, self.others, self.ours = 0.0, 0.0, 0.0, 0.0, 2.0

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.busy += (self.others + self.ours) * seconds
        self.own += self.ours * seconds

    def sample(self) -> CpuSample:
        return sample(self.busy, self.own, self.t)


def test_governor_follows_a_busy_process_after_two_agreeing_looks() -> None:
    machine, calls = Machine(), []
    gov = ThreadGovernor(2, every_s=2.0, sample=machine.sample, set_threads=calls.append, clock=lambda: machine.t)
    assert gov.active

    def step(seconds: float) -> int:
        machine.advance(seconds)
        return gov.poll()

    assert [step(1.0) for _ in range(4)] == [2, 2, 2, 2]  # alone
    machine.others, machine.ours = 1.0, 1.33
    assert step(2.0) == 2  # one look says 1 thread: not yet
    assert step(1.0) == 2  # not time to look again
    assert step(1.0) == 1 and calls == [1]  # the second look agrees
    machine.ours = 1.0
    assert [step(2.0) for _ in range(3)] == [1, 1, 1] and calls == [1]  # our own use is not another's
    machine.others = 0.0
    assert step(2.0) == 1
    assert step(2.0) == 2 and calls == [1, 2]  # the busy process is gone: both cores again


def test_governor_ignores_a_blip() -> None:
    machine, calls = Machine(), []
    gov = ThreadGovernor(2, every_s=2.0, sample=machine.sample, set_threads=calls.append, clock=lambda: machine.t)
    for others in (0.0, 1.0, 0.0, 1.0, 0.0):
        machine.others = others
        machine.advance(2.0)
        assert gov.poll() == 2
    assert calls == []


def test_governor_does_nothing_without_proc_or_with_one_thread() -> None:
    calls: list[int] = []
    blind = ThreadGovernor(2, sample=lambda: None, set_threads=calls.append, clock=lambda: 1e9)
    assert not blind.active and blind.poll() == 2
    single = ThreadGovernor(1, sample=Machine().sample, set_threads=calls.append, clock=lambda: 1e9)
    assert not single.active and single.poll() == 1
    assert calls == []


def test_read_sample_counts_this_process() -> None:
    before = read_sample()
    if before is None:
        pytest.skip("no /proc on this system")
    end = time.process_time() + 0.3
    while time.process_time() < end:  # 0.3 s of this process's CPU
        pass
    after = read_sample()
    assert after is not None
    assert after.own_s - before.own_s == pytest.approx(0.3, abs=0.05)
    assert after.busy_s - before.busy_s >= 0.25  # the machine saw it
    assert after.cpus >= 1


def test_read_sample_counts_children_that_ended_as_ours() -> None:
    """An evaluation's DataLoader workers end and are waited for: their CPU time is this process's
    (``cutime``), not another process's."""
    before = read_sample()
    if before is None:
        pytest.skip("no /proc on this system")
    burn = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end:\n    pass\n"
    subprocess.run([sys.executable, "-c", burn], check=True)
    after = read_sample()
    assert after is not None
    assert after.own_s - before.own_s >= 0.35
