"""Devices, seeding and random-number state: what every stage that runs a model sets up the same way."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from datadistill.config import PRECISIONS
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


# ----------------------------------------------------------------------------------------------------
# mixed precision

PRECISION_HELP = "auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or fp16 (GPU only)"
_AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision_name(requested: str) -> None:
    """A one-line UserError unless ``requested`` is one of :data:`PRECISIONS`."""
    if requested not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")


def resolve_precision(requested: str, device: torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``requested`` on ``device``. ``auto``: bf16 on a GPU that supports
    it, fp32 elsewhere (a CPU gains little from bf16 autocast and loses accuracy). fp16 needs a GPU (its
    gradient scaler and kernels are CUDA's): refused on a CPU in one line."""
    check_precision_name(requested)
    cuda = device.type == "cuda"
    if requested == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if requested == "fp16" and not cuda:
        raise UserError(f"precision fp16 needs a GPU, and the device is {device}: use bf16 or fp32 on a CPU")
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError(f"precision bf16 is not supported by {torch.cuda.get_device_name(device)}: use fp16 or fp32")
    return requested


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context of a resolved ``precision`` (``fp32``: autocast off) on ``device``."""
    dtype = _AUTOCAST_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """The loss scaler of a training run: on for fp16 (whose small gradients underflow), off otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
