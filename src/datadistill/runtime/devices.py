"""Devices, seeding and random-number state: what every stage that runs a model sets up the same way."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from datadistill.errors import UserError

DEVICE_HELP = "auto, cpu, cuda or cuda:N"


def check_device_name(requested: str) -> None:
    """A one-line UserError unless ``requested`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    ok = requested in ("auto", "cpu") or requested.split(":")[0] == "cuda"
    if not ok:
        raise UserError(f"device must be {DEVICE_HELP}, got {requested!r}")


def resolve_device(requested: str) -> torch.device:
    """``"auto"``: cuda when available, else cpu. cuda requested but absent: a one-line UserError."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device_name(requested)
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {requested!r} requested but CUDA is not available; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {requested!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return device


def seed_everything(seed: int) -> None:
    """Seed random, numpy and torch from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The RNG states of random, numpy and torch as tensors and plain types (weights_only-loadable)."""
    np_state = np.random.get_state()
    return {
        "random": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
    }


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` took."""
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    s = state["numpy"]
    np.random.set_state(
        (s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
