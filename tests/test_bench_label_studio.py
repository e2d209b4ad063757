"""bench/label_studio.py without Label Studio: a server that dies is one line naming the last lines of its log,
and stopping a group that is gone already raises nothing. (The round trip itself runs in CI, ``.ci/run``.)"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

DIES = "import sys\nfor i in range(9): print(f'line {i}')\nprint('TypeError: Unknown option', file=sys.stderr)\nsys.exit(3)"


def test_a_dead_server_is_one_line_with_the_end_of_its_log(
    tmp_path: Path, bench_script: Callable[[str], ModuleType]
) -> None:
    ls = bench_script("label_studio")
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", DIES], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    proc.wait(timeout=30)
    with pytest.raises(ls.BenchError) as info:
        ls.wait_for("http://127.0.0.1:9", proc, 30, log_path)
    message = str(info.value)
    assert message.startswith("label-studio exited with status 3 before answering;") and "\n" not in message
    assert message.endswith(": line 5 | line 6 | line 7 | line 8 | TypeError: Unknown option")  # the last 5
    ls.stop(proc)  # the group is gone: no ProcessLookupError
    assert proc.returncode == 3


def test_the_venv_is_pinned_by_the_constraints_file(bench_script: Callable[[str], ModuleType]) -> None:
    pins = dict(
        line.split("==")
        for line in bench_script("label_studio").CONSTRAINTS.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert {"label-studio", "label-studio-sdk", "sentry-sdk"} <= set(pins)
    assert int(pins["sentry-sdk"].split(".")[0]) < 3  # 3.0.0 kills label-studio 1.23.2 at start
