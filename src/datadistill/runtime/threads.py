"""How torch's CPU threads wait for work, set before torch is imported (this module imports no torch).

torch runs its CPU kernels on an OpenMP pool (the Linux wheels bundle GNU libgomp), which reads its settings
from the environment once, when the library is loaded by ``import torch``. By libgomp's default a thread that
has finished its part of an operation spins (about 300,000 rounds) before it sleeps. With one thread per
core (torch's default) and another process on one of the cores, the spinning threads hold the cores that the
slowest thread of every operation needs, and each of the thousands of operations of a training step waits
for the scheduler's time slices: a training measured at 6-7 it/s alone ran at 0.2 it/s beside one busy
process on 2 cores (issue 28). A passive wait (a thread sleeps at once) gives the core back, so a busy
machine slows a run about in proportion to the CPU taken (``bench/busy.py``); alone, the cost is a few
wake-ups per operation.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

# What the CLI sets unless the user set it (``OMP_WAIT_POLICY=ACTIVE`` restores spinning).
WAIT_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def set_thread_waits(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :data:`WAIT_DEFAULTS` in ``environ`` (default ``os.environ``, which DataLoader workers and
    ``torchrun``'s processes inherit) where the user set nothing; returns what was set. It takes effect
    only if torch is not yet imported in this process (as in ``python -m datadistill``); a library user who
    imports torch first sets ``OMP_WAIT_POLICY`` themselves."""
    env = os.environ if environ is None else environ
    added = {key: value for key, value in WAIT_DEFAULTS.items() if key not in env}
    env.update(added)
    if added and environ is None and "torch" in sys.modules:
        log.debug("torch was imported before datadistill set %s: its threads keep their wait policy", added)
    return added
