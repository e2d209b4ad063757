"""What the reliability tests share: the CLI run as a user runs it, children killed at chosen moments, and
checks that an output folder holds only complete files.

Kills happen in forked children (``os.fork``): they start at once (torch is already imported), run the CLI's
``main``, and die by ``SIGKILL`` from the parent or by ``os._exit`` at a chosen write, which is what a kill
does: no ``finally``, no cleanup, buffers lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import random
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import yaml
from PIL import Image

from datadistill.cli import main

KILLED = 128 + signal.SIGKILL  # the exit status of a child that "died" at a chosen write


@dataclasses.dataclass(frozen=True)
class CliResult:
    rc: int
    out: str
    err: str


def cli(*argv: str | os.PathLike[str]) -> CliResult:
    """``datadistill ARGV`` in this process. Anything but a return from ``main`` (a traceback) fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return CliResult(rc, out.getvalue(), err.getvalue())


def error_line(result: CliResult, *fragments: str) -> str:
    """The one ``error:`` line of a failed command (exit status 1, no traceback), with every fragment in it."""
    lines = [line for line in result.err.splitlines() if not line.startswith(("INFO ", "WARNING ", "DEBUG "))]
    assert result.rc == 1, result
    assert "Traceback" not in result.err, result.err
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# children


def fork(work: Callable[[], Any]) -> int:
    """Run ``work()`` in a forked child whose output goes nowhere; returns its pid. It exits 0 when ``work``
    returns 0 or None, 1 when it returns or raises anything else."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        torch.set_num_threads(1)
        code = int(work() or 0)
    except BaseException:  # noqa: B036 - the child must never return into pytest
        code = 1
    finally:
        os._exit(code)


def wait(pid: int) -> int:
    """The child's exit status, as subprocess gives it (``-9`` for SIGKILL)."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def run_in_child(work: Callable[[], Any]) -> int:
    return wait(fork(work))


def _is_temporary(path: str | os.PathLike[str]) -> bool:
    name = Path(path).name
    return name.startswith(".") and name.endswith(".tmp")


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


MODES = ("mid-write", "before-rename", "after-rename")


@contextlib.contextmanager
def dying_at_write(k: int, mode: str) -> Iterator[None]:
    """In a child: ``os._exit(KILLED)`` at the ``k``-th atomic write (1-based), as a SIGKILL would.

    ``mid-write``: the temporary file holds half of its bytes; ``before-rename``: it is complete but not
    renamed; ``after-rename``: the file is in place, and whatever should follow it never happens. The
    appended lines of ``metrics.jsonl`` count as writes too (``mid-write`` leaves half a line).
    """
    from datadistill.stages import train as train_mod

    assert mode in MODES, mode
    count = 0
    real_fsync, real_replace, real_write = os.fsync, os.replace, train_mod.MetricsFile.write

    def tick() -> bool:
        nonlocal count
        count += 1
        return count == k

    def fsync(fd: int) -> None:
        if mode == "mid-write" and _is_temporary(_fd_path(fd)) and tick():
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            os._exit(KILLED)
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        if mode != "mid-write" and _is_temporary(src) and tick():
            if mode == "after-rename":
                real_replace(src, dst, **kw)
            os._exit(KILLED)
        real_replace(src, dst, **kw)

    def metrics_write(self: Any, record: Any) -> None:
        if tick():
            if mode == "mid-write":
                line = json.dumps(record) + "\n"
                self.file.write(line[: len(line) // 2])
                self.file.flush()
            elif mode == "after-rename":
                real_write(self, record)
            os._exit(KILLED)
        real_write(self, record)

    os.fsync, os.replace = fsync, replace
    train_mod.MetricsFile.write = metrics_write
    try:
        yield
    finally:
        os.fsync, os.replace = real_fsync, real_replace
        train_mod.MetricsFile.write = real_write


@contextlib.contextmanager
def calling_at_write(k: int, action: Callable[[], None]) -> Iterator[None]:
    """Call ``action()`` right after the ``k``-th atomic write (1-based) is renamed into place, then go on."""
    count = 0
    real_replace = os.replace

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        nonlocal count
        real_replace(src, dst, **kw)
        if _is_temporary(src):
            count += 1
            if count == k:
                action()

    os.replace = replace
    try:
        yield
    finally:
        os.replace = real_replace


def kill_at_every_write(
    run: Callable[[], Any],
    *,
    reset: Callable[[], None],
    check: Callable[[], None],
    finish: Callable[[], None],
    modes: Sequence[str] = MODES,
) -> int:
    """For each mode and k = 1, 2, ...: from a fresh start (``reset``), run the command ``run`` in a child that
    dies at its k-th write, ``check`` the folder it left, run it again to the end (the resume) and ``finish``
    (compare with an uninterrupted run). Stops when a child finishes before its k-th write. Returns how many
    kills were made."""
    kills = 0
    for mode in modes:
        for k in range(1, 1000):
            reset()

            def dying(k: int = k, mode: str = mode) -> Any:
                with dying_at_write(k, mode):
                    return run()

            status = run_in_child(dying)
            if status == 0:
                break
            assert status == KILLED, f"the child failed at write {k} ({mode}) with status {status}"
            kills += 1
            check()
            assert run_in_child(run) == 0, f"the resume after a kill at write {k} ({mode}) failed"
            finish()
    return kills


def kill_at_random_moments(
    run: Callable[[], Any],
    *,
    reset: Callable[[], None],
    check: Callable[[], None],
    finish: Callable[[], None],
    seconds: float,
    kills: int,
    seed: int,
) -> tuple[int, int]:
    """Trials until ``kills`` children were SIGKILLed (at most ``4 * kills`` trials): from a fresh start
    (``reset``), start ``run`` in a child and SIGKILL it after a random delay in ``[0, seconds)``, ``check``
    the folder, start it again (the resume) with another delay, ..., until one start runs to the end; then
    ``finish`` (compare with an uninterrupted run). Returns ``(kills, trials)``."""
    rng = random.Random(seed)
    killed = trials = 0
    while killed < kills and trials < 4 * kills:
        trials += 1
        reset()
        while True:
            pid = fork(run)
            deadline = time.monotonic() + rng.uniform(0.0, seconds)
            status = None
            while status is None and time.monotonic() < deadline:
                done, raw = os.waitpid(pid, os.WNOHANG)
                status = os.waitstatus_to_exitcode(raw) if done else None
                time.sleep(0.002)
            if status is None:
                os.kill(pid, signal.SIGKILL)
                status = wait(pid)
            if status == 0:
                break
            assert status == -signal.SIGKILL, f"a child failed with status {status}"
            killed += 1
            check()
        finish()
    return killed, trials


# ---------------------------------------------------------------------------------------------------------
# checks of output folders


def temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_temporary(p))


def assert_only_complete_files(folder: Path) -> None:
    """Every file a reader could take (all but ``.NAME.*.tmp``) reads whole: json, jsonl (but the last line
    of a log being appended), parquet, torch, png, yaml and html."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not _is_temporary(p)):
        suffix = path.suffix
        if suffix == ".json":
            json.loads(path.read_text())
        elif suffix == ".jsonl":
            lines = path.read_text().splitlines()
            for line in lines[:-1]:
                json.loads(line)
        elif suffix == ".parquet":
            pq.read_table(path)
        elif suffix == ".pt":
            torch.load(path, weights_only=True)
        elif suffix == ".png":
            with Image.open(path) as img:
                img.load()
        elif suffix == ".yaml":
            yaml.safe_load(path.read_text())
        elif suffix == ".html":
            assert path.read_text().rstrip().endswith("</html>"), path


def disk_full_at_write(k: int) -> contextlib.AbstractContextManager[None]:
    """In this process: the ``k``-th atomic write (1-based) fails with ENOSPC as its bytes are flushed."""
    count = 0
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        nonlocal count
        if _is_temporary(_fd_path(fd)):
            count += 1
            if count == k:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    @contextlib.contextmanager
    def patched() -> Iterator[None]:
        os.fsync = fsync
        try:
            yield
        finally:
            os.fsync = real_fsync

    return patched()


# ---------------------------------------------------------------------------------------------------------
# process trees (torchrun's workers, a Ray cluster's processes)


def descendants(pid: int) -> list[int]:
    """Every process started by ``pid`` and by those, depth first (Linux: ``/proc/PID/task/*/children``)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def command_line(pid: int) -> str:
    """The command line of ``pid`` as one string ('' once it has gone); Ray's workers show their actor."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_tree(proc: Any) -> None:
    """SIGKILL a ``subprocess.Popen`` started with ``start_new_session=True``, its process group and every
    process it started (torchrun starts its workers, and Ray its daemons, in sessions of their own), then
    wait until they are gone."""
    family = descendants(proc.pid)
    for pid in (proc.pid, *family):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    for pid in family:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.02)


def wait_for(condition: Callable[[], Any], proc: Any, what: str, timeout: float = 300) -> Any:
    """Poll ``condition`` until it gives something true (returned); fail when ``proc`` (a Popen) ends first
    or after ``timeout`` seconds. An event, not a time window: the timeout only bounds a hung run."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.01)
