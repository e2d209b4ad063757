"""The ``run`` config: nested frozen dataclasses, read from YAML strictly.

Unknown keys and wrong types are one-line errors naming the key (``teacher.epochs: expected an integer,
got 'ten'``). ``--set key=value`` overrides use the same dotted names; values are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datadistill.errors import UserError


@dataclass(frozen=True)
class DataSection:
    """Where the data is. Paths are relative to the config file's folder."""

    train: str = ""
    train_images: str = ""
    unlabeled: str = ""
    unlabeled_images: str | None = None
    val: str | None = None
    val_images: str | None = None
    unlabeled_truth: str | None = None  # held-back labels of the unlabeled images, to score pseudo-labels


@dataclass(frozen=True)
class TrainSection:
    model: str | None = None  # None: the default small model for the data's task
    epochs: int = 12
    batch_size: int = 8
    lr: float | None = None  # None: the model's default
    init: str | None = None  # None: initial weights; "teacher" (student only), "weights:NAME" or a path
    pseudo_ratio: float = 0.4  # student only


@dataclass(frozen=True)
class LabelSection:
    views: str = "default"
    fuse: str = "nms"
    keypoint_fuse: str = "heatmap"
    iou_thr: float = 0.5
    score_floor: float = 0.05
    batch_size: int = 8
    shard_size: int = 1000


@dataclass(frozen=True)
class SelectSection:
    policy: str = "count"
    min_agreement: int = 1
    drop_empty: bool = False
    ignore_band: float = 0.0
    cross_class_iou: float = 0.5
    keypoint_policy: str = "count"


@dataclass(frozen=True)
class RunConfig:
    data: DataSection = field(default_factory=DataSection)
    teacher: TrainSection = field(default_factory=TrainSection)
    student: TrainSection = field(default_factory=TrainSection)
    label: LabelSection = field(default_factory=LabelSection)
    select: SelectSection = field(default_factory=SelectSection)
    rounds: int = 1
    seed: int = 0
    device: str = "auto"
    threads: int = 2
    workers: int = 1


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(names.get(a, a.__name__) for a in args) + " or null"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except UserError:
                continue
        raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping of settings, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise UserError(f"{prefix}{key}: unknown setting (known: {', '.join(sorted(known))})")
    values = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    return cls(**values)


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    target = raw
    for p in parts[:-1]:
        nxt = target.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserError(f"--set {dotted}: {p} is not a section")
        target = nxt
    target[parts[-1]] = value


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[RunConfig, Path]:
    """The config from ``path`` (YAML, ``safe_load``) with ``key=value`` overrides; also the folder that
    relative paths in it are resolved against."""
    raw: Any = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"{path}: cannot read the config ({exc.strerror or exc})") from exc
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise UserError(f"{path}: invalid YAML{where}: {problem}") from exc
        if not isinstance(raw, dict):
            raise UserError(f"{path}: the config must be a mapping of settings, got {type(raw).__name__}")
        base = path.resolve().parent
    for item in overrides:
        key, sep, text_value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set teacher.epochs=5")
        try:
            value = yaml.safe_load(text_value) if text_value else None
        except yaml.YAMLError:
            value = text_value
        _set(raw, key.strip(), value)
    where = f"{path}: " if path is not None else ""
    try:
        return _build(RunConfig, raw), base
    except UserError as exc:
        raise UserError(f"{where}{exc}") from None


def read_recorded_config(path: Path) -> dict[str, Any]:
    """The ``config.yaml`` a run folder recorded (``safe_load``: tags that would build Python objects are
    refused), or a one-line UserError for a file that is not a readable mapping."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = getattr(exc, "problem", None) or getattr(exc, "strerror", None) or type(exc).__name__
        raise UserError(f"{path}: not a readable run config ({reason})") from exc
    if not isinstance(raw, dict):
        raise UserError(f"{path}: not a readable run config (a {type(raw).__name__}, not a mapping)")
    return raw


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
