"""Checkpoint files, for every backend: ``last.pt`` of a training run and torchvision's ``checkpoint.pt``.

A checkpoint is ``{"format", "version", "meta", "state_dict", "extra"}``: only tensors and plain types, so
that it is always read with ``torch.load(..., weights_only=True)`` and no file can run code when loaded.
``meta`` is a :class:`~datadistill.models.detector.ModelMeta` as a dict; ``extra`` is what the writer adds
(the training loop: optimizer, scheduler, RNG states, config; a finished run: epochs and validation metrics).
Backend-neutral: the training loop writes every backend's ``last.pt`` through :func:`save_checkpoint`.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datadistill.errors import UserError
from datadistill.models.detector import ModelMeta
from datadistill.runtime.io import write_atomic

CHECKPOINT_FORMAT = "datadistill-checkpoint"
CHECKPOINT_VERSION = 1


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel/DataParallel wrapper (``model`` itself otherwise)."""
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return model.module
    return model


def load_torch_file(path: str | os.PathLike[str], what: str) -> Any:
    """``torch.load(weights_only=True)`` with every failure as a one-line UserError naming ``path``; ``what``
    says what the file should be (``checkpoint``, ``weights``)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} not found")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a {what} file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None and "global" not in str(exc).lower():
            raise UserError(f"{path}: not a readable {what} (truncated or not a torch file)") from exc
        name = f" ({found.group(1)})" if found else ""
        raise UserError(
            f"{path}: refused to load: the file needs code to be unpickled{name}; a {what} must hold only "
            "tensors and plain types (it is read with weights_only=True)"
        ) from exc
    except Exception as exc:  # zip, EOF, key and decode errors of a truncated or foreign file
        raise UserError(f"{path}: not a readable {what} (truncated or not a torch file)") from exc


def save_checkpoint(
    path: str | os.PathLike[str], *, model: nn.Module, meta: ModelMeta, extra: Mapping[str, Any] | None = None
) -> None:
    """Write ``{"format", "version", "meta", "state_dict", "extra"}`` atomically (tensors on the CPU; the
    weights of ``model``, unwrapped from DDP).

    ``extra`` must hold only tensors and plain types (optimizer state dicts qualify), so that the file
    loads with ``weights_only=True``.
    """
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    content = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "meta": meta.to_dict(),
        "state_dict": state,
        "extra": dict(extra or {}),
    }
    write_atomic(path, lambda f: torch.save(content, f))


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's content (``weights_only=True``); a one-line UserError for a missing, truncated or
    foreign file, or one that needs code to be unpickled."""
    content = load_torch_file(path, "checkpoint")
    if not isinstance(content, dict) or content.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a datadistill checkpoint (no 'format': {CHECKPOINT_FORMAT!r})")
    version = content.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise UserError(
            f"{path}: checkpoint version {version!r} is newer than this datadistill reads "
            f"({CHECKPOINT_VERSION}); upgrade datadistill"
        )
    for key in ("meta", "state_dict"):
        if not isinstance(content.get(key), dict):
            raise UserError(f"{path}: malformed checkpoint: no {key!r}")
    content.setdefault("extra", {})
    return content


def is_checkpoint(content: Any) -> bool:
    """Whether a loaded file's content is a datadistill checkpoint (by its ``format``)."""
    return isinstance(content, dict) and content.get("format") == CHECKPOINT_FORMAT
