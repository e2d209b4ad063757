"""Kills under ``torchrun`` (2 processes on gloo) and under ``--engine ray`` (the driver, an actor) at seeded
moments, then the same command again: the shards equal an uninterrupted run's, nothing lost, nothing twice.

A moment is an event, never a time window: a rank (or the Ray driver) dies at its k-th atomic write, half
written, complete but not renamed, or renamed (``harness.dying_at_write``), while the other rank is wherever
it is; or every process is SIGKILLed once n shard files exist; or the Ray actors are SIGKILLed as the driver
writes a shard (Ray restarts them and retries their batches), or as soon as an actor appears. The runs are
real ``python -m torch.distributed.run`` and local Ray clusters in child processes, so these tests are slow
(``pytest -m slow tests/reliability/test_distributed_kills.py``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from harness import MODES, assert_only_complete_files, cli, command_line, descendants, kill_tree, temporaries, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="process trees and SIGKILL semantics"),
]

HERE = Path(__file__).resolve().parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# ``datadistill ARGV`` with one action on the process of rank RANK (the Ray driver is rank 0):
# ``none``; ``die`` at its WRITE-th atomic write in MODE; ``kill-actors`` right after its WRITE-th atomic write
# (SIGKILL every Ray actor that labels, then go on; MODE is then a file to write once done).
CHILD = """
import os, signal, sys
sys.path.insert(0, {here!r})
import harness
from datadistill.cli import main

action, rank, write, mode, *argv = sys.argv[1:]
if action == "none" or int(os.environ.get("RANK", "0")) != int(rank):
    raise SystemExit(main(argv))
if action == "die":
    with harness.dying_at_write(int(write), mode):
        raise SystemExit(main(argv))

def kill_actors():
    actors = [p for p in harness.descendants(os.getpid()) if "_Labeler" in harness.command_line(p)]
    for pid in actors:
        os.kill(pid, signal.SIGKILL)
    open(mode, "w").write(str(len(actors)))

with harness.calling_at_write(int(write), kill_actors):
    raise SystemExit(main(argv))
"""


@dataclass(frozen=True)
class Moment:
    """Where a run is stopped: ``action`` ``die`` (``rank`` dies at its ``write``-th atomic write, ``mode``
    one of :data:`harness.MODES`), ``kill-all`` (every process SIGKILLed once ``shards`` shard files exist),
    ``kill-actors`` (the Ray actors SIGKILLed after the driver's ``write``-th write; 0: as soon as one is
    seen)."""

    action: str
    rank: int = 0
    write: int = 0
    mode: str = ""
    shards: int = 0


def seeded_moments(seed: int, count: int, writes: dict[int, int], shards: int) -> list[Moment]:
    """``count`` moments drawn from ``seed``: deaths cycling through every mode of :data:`harness.MODES`
    (mid-write first) at a random write of a random rank (``writes[rank]``: how many it makes), and every
    third moment a SIGKILL of everything once a random number of the ``shards`` shard files exist."""
    rng = random.Random(seed)
    deaths = [(rank, write) for rank in sorted(writes) for write in range(1, writes[rank] + 1)]
    unused = {mode: rng.sample(deaths, len(deaths)) for mode in MODES}  # each (rank, write) once per mode
    moments = []
    for i in range(count):
        if i % 3 == 2:
            moments.append(Moment("kill-all", shards=rng.randrange(shards)))
        else:
            mode = MODES[(i - i // 3) % len(MODES)]
            rank, write = unused[mode].pop()
            moments.append(Moment("die", rank=rank, write=write, mode=mode))
    return moments


def _label_args(checkpoint: Path, images: Path, out: Path) -> list[str]:
    return ["label", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out), "--views",
            "identity,hflip", "--shard-size", "3", "--batch-size", "2", "--workers", "0", "--threads", "1",
            "--device", "cpu", "--allow-weak-teacher"]  # fmt: skip


@pytest.fixture(scope="module")
def reference(checkpoint: Path, unlabeled: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted labeling of ``unlabeled`` (12 images, 2 broken: 4 shards) in one process."""
    out = tmp_path_factory.mktemp("reference") / "labels"
    assert cli(*_label_args(checkpoint, unlabeled, out)).rc == 0
    return out


def _rows(out: Path) -> dict[str, list[dict]]:
    return {p.name: pq.read_table(p).to_pylist() for p in sorted((out / "shards").glob("part-*.parquet"))}


def _shard_times(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("part-*.parquet")}


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _child(tmp: Path) -> Path:
    script = tmp / "child.py"
    script.write_text(CHILD.format(here=str(HERE)))
    return script


def _interrupt(moment: Moment, prefix: list[str], args: list[str], out: Path, log: Path) -> int:
    """Run ``[*prefix, ACTION, RANK, WRITE, MODE, *args]`` (the child script) stopped at ``moment``; its exit
    status."""
    action = "none" if moment.action == "kill-all" else moment.action
    proc = _start([*prefix, action, str(moment.rank), str(moment.write), moment.mode, *args], log)
    try:
        if moment.action == "kill-all":
            wait_for(lambda: len(_shard_times(out)) >= moment.shards and (out / "manifest.json").exists(),
                     proc, f"{moment.shards} shards")  # fmt: skip
            kill_tree(proc)
        elif moment.action == "kill-actors" and moment.write == 0:
            actors = wait_for(lambda: [p for p in descendants(proc.pid) if "_Labeler" in command_line(p)], proc,
                              "a Ray actor")  # fmt: skip
            for pid in actors:
                os.kill(pid, signal.SIGKILL)
        return proc.wait(timeout=600)
    finally:
        kill_tree(proc)  # torchrun's or Ray's leftovers, if any


def _check_resumed(out: Path, reference: Path, before: dict[str, int]) -> None:
    """``out`` holds the reference's rows; the shards that existed before the rerun were not written again."""
    got, want = _rows(out), _rows(reference)
    assert got == want
    names = [row["file_name"] for rows in got.values() for row in rows]
    assert len(names) == len(set(names)) == 12  # nothing lost, nothing twice
    after = _shard_times(out)
    assert {name: after[name] for name in before} == before  # finished work was not redone
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"] == json.loads((reference / "manifest.json").read_text())["counts"]
    assert not temporaries(out)


def _kill_and_resume(
    moment: Moment, prefix: list[str], rerun: list[str], args: list[str], out: Path, reference: Path
) -> str:
    """From an empty ``out``: the run stopped at ``moment``, then ``[*rerun, *args]`` to the end, checked."""
    shutil.rmtree(out, ignore_errors=True)
    log = out.parent / "child.log"
    status = _interrupt(moment, prefix, args, out, log)
    assert_only_complete_files(out)
    before = _shard_times(out)
    done = subprocess.run([*rerun, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{moment}: the rerun failed\n{done.stderr[-3000:]}"
    _check_resumed(out, reference, before)
    return f"{moment}: status {status}, {len(before)} shards kept"


def test_torchrun_label_killed_at_seeded_moments_resumes_to_the_same_shards(
    checkpoint: Path, unlabeled: Path, reference: Path, tmp_path: Path
) -> None:
    """Rank 0 writes the manifest, shards 0 and 2 and the final manifest; rank 1 shards 1 and 3."""
    out = tmp_path / "labels"
    args = _label_args(checkpoint, unlabeled, out)
    prefix, rerun = [*TORCHRUN, str(_child(tmp_path))], [*TORCHRUN, "-m", "datadistill"]
    results = [_kill_and_resume(m, prefix, rerun, args, out, reference)
               for m in seeded_moments(0, 6, writes={0: 4, 1: 2}, shards=4)]  # fmt: skip
    print("\n".join(results))
    assert any(r.startswith("Moment(action='die', rank=1") for r in results)


def test_ray_driver_killed_at_seeded_moments_resumes_to_the_same_shards(
    checkpoint: Path, unlabeled: Path, reference: Path, tmp_path: Path
) -> None:
    """The driver writes the manifest, the 4 shards and the final manifest."""
    pytest.importorskip("ray", reason="the Ray engine is optional: pip install 'datadistill[ray]'")
    out = tmp_path / "labels"
    args = [*_label_args(checkpoint, unlabeled, out), "--engine", "ray"]
    prefix, rerun = [sys.executable, str(_child(tmp_path))], [sys.executable, "-m", "datadistill"]
    results = [_kill_and_resume(m, prefix, rerun, args, out, reference)
               for m in seeded_moments(1, 3, writes={0: 6}, shards=4)]  # fmt: skip
    print("\n".join(results))


def test_ray_actors_killed_mid_run_finish_the_same_shards(
    checkpoint: Path, unlabeled: Path, reference: Path, tmp_path: Path
) -> None:
    """The actors SIGKILLed as soon as one appears (loading the model), and right after the driver wrote
    shard 1 or 2 (labeling the next): Ray restarts them and retries their batches; the run completes with
    every row once, and the same command again changes nothing."""
    pytest.importorskip("ray", reason="the Ray engine is optional: pip install 'datadistill[ray]'")
    out = tmp_path / "labels"
    args = [*_label_args(checkpoint, unlabeled, out), "--engine", "ray"]
    marker = tmp_path / "actors-killed"
    for write in (0, 2, 3):  # the driver's write 1 is the manifest, 2 shard 0, 3 shard 1
        shutil.rmtree(out, ignore_errors=True)
        marker.unlink(missing_ok=True)
        moment = Moment("kill-actors", write=write, mode=str(marker))
        status = _interrupt(moment, [sys.executable, str(_child(tmp_path))], args, out, tmp_path / "child.log")
        assert status == 0, (moment, (tmp_path / "child.log").read_text()[-3000:])
        assert write == 0 or int(marker.read_text()) >= 1  # an actor was killed
        before = _shard_times(out)
        _check_resumed(out, reference, before)
        again = subprocess.run([sys.executable, "-m", "datadistill", *args], capture_output=True, text=True)
        assert again.returncode == 0, again.stderr[-3000:]
        _check_resumed(out, reference, before)
