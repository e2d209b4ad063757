"""Torch's OpenMP threads spin briefly under the CLI, then sleep, unless the user chose (bench/busy.py measures why)."""

from __future__ import annotations

import os
import subprocess
import sys

from datadistill.runtime.threads import set_thread_waits


def test_a_short_spin_unless_the_user_chose() -> None:
    env: dict[str, str] = {"PATH": "/bin"}
    assert set_thread_waits(env) == {"GOMP_SPINCOUNT": "10000"}
    assert env == {"PATH": "/bin", "GOMP_SPINCOUNT": "10000"}
    for mine in ({"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "300000"}):
        assert set_thread_waits(mine) == {} and len(mine) == 1


def test_the_cli_sets_it_before_torch_is_imported() -> None:
    code = ("import contextlib, os, sys\nfrom datadistill.cli import main\n"
            "with contextlib.suppress(SystemExit):\n    main(['--version'])\n"
            "print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'))")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.splitlines()[-1] == "False 10000", done.stderr[-2000:]
