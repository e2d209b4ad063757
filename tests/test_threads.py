"""Torch's OpenMP threads wait passively under the CLI unless the user chose (bench/busy.py measures why)."""

from __future__ import annotations

import os
import subprocess
import sys

from datadistill.runtime.threads import set_thread_waits


def test_waits_are_passive_unless_the_user_chose() -> None:
    env: dict[str, str] = {"PATH": "/bin"}
    assert set_thread_waits(env) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert env == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    mine = {"OMP_WAIT_POLICY": "active"}
    assert set_thread_waits(mine) == {} and mine == {"OMP_WAIT_POLICY": "active"}


def test_the_cli_sets_it_before_torch_is_imported() -> None:
    code = ("import contextlib, os, sys\nfrom datadistill.cli import main\n"
            "with contextlib.suppress(SystemExit):\n    main(['--version'])\n"
            "print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.splitlines()[-1] == "False PASSIVE", done.stderr[-2000:]
