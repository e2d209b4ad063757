"""How torch's CPU threads wait for work, set before torch is imported (this module imports no torch).

torch runs its CPU kernels on an OpenMP pool (the Linux wheels bundle GNU libgomp), which reads its settings
from the environment once, when the library is loaded by ``import torch``. By libgomp's default a thread that
has finished its part of an operation spins (about 300,000 rounds) before it sleeps. With one thread per
core (torch's default) and another process on one of the cores, the spinning threads hold the cores that the
slowest thread of every operation needs, and each of the thousands of operations of a training step waits
for the scheduler's time slices: a training measured at 6-7 it/s alone ran at 0.2 it/s beside one busy
process on 2 cores (issue 28). A short spin (``GOMP_SPINCOUNT=10000``, then the thread sleeps) gives the
core back within microseconds. A passive wait (``OMP_WAIT_POLICY=PASSIVE``, no spin) does too, but costs a
wake-up per operation: measured with ``bench/busy.py`` on 2 cores, a 2-thread training alone ran at 7.5 it/s
passive, 14.1 it/s with libgomp's default and 13.8 it/s with the short spin.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

# What the CLI sets unless the user set either variable (``GOMP_SPINCOUNT=300000`` restores libgomp's spin).
WAIT_DEFAULTS = {"GOMP_SPINCOUNT": "10000"}
USER_SETTINGS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def set_thread_waits(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :data:`WAIT_DEFAULTS` in ``environ`` (default ``os.environ``, which DataLoader workers and
    ``torchrun``'s processes inherit) unless the user set one of :data:`USER_SETTINGS`; returns what was
    set. It takes effect only if torch is not yet imported in this process (as in ``python -m datadistill``);
    a library user who imports torch first sets ``GOMP_SPINCOUNT`` themselves."""
    env = os.environ if environ is None else environ
    if any(key in env for key in USER_SETTINGS):
        return {}
    added = dict(WAIT_DEFAULTS)
    env.update(added)
    if added and environ is None and "torch" in sys.modules:
        log.debug("torch was imported before datadistill set %s: its threads keep their wait policy", added)
    return added
