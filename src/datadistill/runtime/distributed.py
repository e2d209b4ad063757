"""Several processes under ``torchrun``: who this process is, its device, and the few collectives we need.

``torchrun`` (``python -m torch.distributed.run``) starts one process per GPU (or per CPU slot) and tells
each who it is through the environment: ``RANK`` (0..WORLD_SIZE-1 over all machines), ``WORLD_SIZE``,
``LOCAL_RANK`` (its index on its machine) and ``MASTER_ADDR``/``MASTER_PORT`` (the rendezvous). Without
them this is one process, and every function here is a no-op that gives the one-process answer, so the
stages call them unconditionally.

The stages use them so: ``train`` runs DDP (nccl on GPUs, gloo on CPUs) and only rank 0 writes files;
``label`` takes shard ``k`` on rank ``k % WORLD_SIZE`` and uses a gloo group only to agree on the output
folder before the work and to wait for every rank after it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from datadistill.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """This process's place among the processes of one run: ``rank`` in ``[0, world_size)`` over all
    machines, ``local_rank`` its index on its machine (its GPU there)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch:
    """The :class:`Launch` that ``torchrun`` describes in ``environ`` (default: ``os.environ``); one
    process (rank 0 of 1) when its variables are absent. Malformed values are a one-line UserError."""
    env = os.environ if environ is None else environ
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise UserError(f"torchrun's RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise UserError(f"need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, got RANK={rank}, "
                        f"WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}")  # fmt: skip
    return Launch(rank=rank, world_size=world_size, local_rank=local_rank)


def rank_device(device: torch.device, launch: Launch) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when ``device`` is cuda and there are several
    processes (one GPU per process, as torchrun's ``--nproc_per_node`` GPUs), else ``device``."""
    if not launch.distributed or device.type != "cuda":
        return device
    if device.index is not None:
        raise UserError(
            f"--device {device} under torchrun: each process uses the GPU of its LOCAL_RANK; use --device cuda or auto"
        )
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise UserError(
            f"LOCAL_RANK {launch.local_rank} has no GPU: this machine has {count}; "
            f"start at most {count} processes per machine (--nproc_per_node)"
        )
    return torch.device("cuda", launch.local_rank)


@contextmanager
def process_group(launch: Launch, *, device: torch.device, timeout: timedelta | None = None) -> Iterator[None]:
    """Join the run's process group for the duration of the block (nccl for a cuda ``device``, else gloo),
    then leave it. Nothing for one process, nor when the caller has already initialised a group (then it
    is the caller's to destroy). ``timeout``: how long a collective may wait for the slowest rank."""
    if not launch.distributed or dist.is_initialized():
        yield
        return
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; run one process")
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise UserError(
            f"WORLD_SIZE is {launch.world_size} but MASTER_ADDR/MASTER_PORT are not set: start the processes "
            "with torchrun (python -m torch.distributed.run)"
        )
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=launch.rank, world_size=launch.world_size, device_id=device, **kwargs)
    else:
        dist.init_process_group("gloo", rank=launch.rank, world_size=launch.world_size, **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait until every rank gets here (nothing for one process)."""
    if _active():
        dist.barrier()


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` for one process."""
    if not _active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's ``obj`` in rank order on rank 0, None on the others; ``[obj]`` for one process."""
    if not _active():
        return [obj]
    rank = dist.get_rank()
    gathered: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only, while the others wait, and give every rank its result; a UserError it
    raises is raised on every rank with the same message (so that all stop with one clear reason)."""
    if not _active():
        return fn()
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [("ok", fn())]
        except UserError as exc:
            outcome = [("error", str(exc))]
        except BaseException:
            dist.broadcast_object_list([("error", "rank 0 failed; see its traceback")], src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "error":
        raise UserError(value)
    return value


def mean_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """The mean of each value over the ranks (every rank must pass the same keys); ``values`` for one
    process."""
    if not _active():
        return dict(values)
    keys = sorted(values)  # the same order on every rank
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    mean = dict(zip(keys, (t / dist.get_world_size()).tolist(), strict=True))
    return {k: mean[k] for k in values}


@contextmanager
def quiet_unless_main(launch: Launch, logger: str = "datadistill") -> Iterator[None]:
    """Info messages of ``logger`` only from rank 0 (warnings and errors from every rank)."""
    log = logging.getLogger(logger)
    if launch.is_main:
        yield
        return
    before = log.level
    log.setLevel(max(before, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(before)
