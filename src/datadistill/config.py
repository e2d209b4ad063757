"""The options of the stages (:class:`TrainConfig`, :class:`LabelConfig`) and of ``run`` (:class:`RunConfig`):
frozen dataclasses with no heavy imports, so that the command line builds its parser without torch.

The run config is read from YAML strictly: unknown keys and wrong types are one-line errors naming the
key (``teacher.epochs: expected an integer, got 'ten'``). ``--set key=value`` overrides use the same dotted
names; values are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datadistill.errors import UserError

# ----------------------------------------------------------------------------------------------------
# the train stage's options

# Options that may differ when a run is resumed: they change where and how fast it runs, or what is
# evaluated, not the weights it ends with.
RUNTIME_KEYS = frozenset(
    {"out", "resume", "device", "precision", "threads", "workers", "log_every", "eval_every", "save_every", "val",
     "val_images"}
)  # fmt: skip
OPTIMIZERS = ("sgd", "adamw")
# Mixed precision of every stage that runs a model (runtime.devices.resolve_precision says what each means).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """Every option of ``datadistill train``.

    Paths: ``data`` (COCO json) with its image root ``images``; ``out`` the output folder.
    ``model``: a name of :data:`datadistill.models.torchvision.MODELS`; None picks the default of the data's task;
    ``yolo:PATH_OR_YAML`` trains an Ultralytics YOLO model (:mod:`datadistill.models.ultralytics`).
    ``batch_size``: images per step of one process (under torchrun each process takes that many, as in
    torchvision's references; ``lr`` is not scaled with the number of processes); a labeled set smaller
    than a batch's real part is cycled. Length: ``epochs`` (passes over the labeled images) or
    ``iterations`` (minibatches), at most one; neither: the default schedule of
    :mod:`datadistill.core.schedule` (20 epochs, but at least 1,000 iterations).
    Optimization: ``optimizer`` ``"adamw"`` or ``"sgd"`` (with ``momentum``); ``lr`` is the peak learning
    rate (None: :func:`datadistill.models.torchvision.default_lr`), reached linearly from ``lr * warmup_factor``
    over ``warmup_iters`` iterations (at most a fifth of the run), then multiplied by ``lr_gamma`` at each
    of ``lr_steps`` (epoch numbers with ``epochs``, iteration numbers with ``iterations``; None: at 2/3
    and 8/9 of the run, the "1x" schedule's 8 and 11 of 12); ``clip_grad_norm`` None or the max gradient norm.
    Input: ``min_size``/``max_size`` the model's resize target in px (None: the model's default);
    augmentation: scale jitter in ``[min_scale, max_scale]`` and horizontal flip with ``flip_prob``.
    ``init``: None (initial weights), ``"weights:NAME"`` (torchvision weights) or a file (a checkpoint.pt,
    e.g. the teacher's, or a state dict). ``pseudo``/``pseudo_images``/``pseudo_ratio``: pseudo-labels
    for a student (the fraction of each minibatch that is pseudo-labeled). ``val``/``val_images``
    (default: ``images``): evaluated every ``eval_every`` epochs (None: about five times) and at the end.
    ``save_every``: epochs between writes of ``last.pt`` (None: every epoch, or every ~50 iterations when
    epochs are shorter: a handful of labeled images makes epochs of one iteration).
    ``resume``: continue from ``out/last.pt``. ``device``: ``"auto"`` (cuda if available), ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"``. ``threads``: torch CPU threads of the training process (0: one per core that
    other processes leave free, looked at every few seconds, :mod:`datadistill.runtime.threads`; a thread
    count changes how float sums split, so give one for bit-identical reruns); DataLoader worker processes
    always run one thread each (torch sets that).
    ``workers``: DataLoader worker processes (0: load in the training process). ``log_every``: iterations
    between step lines in metrics.jsonl. ``max_det``: the detections per image the trained model keeps, carried
    in its checkpoint (None: twice the 99th percentile of the labeled objects per image, at least the
    library's default; :func:`datadistill.models.detector.resolve_max_det`).
    """

    data: str
    images: str
    out: str
    model: str | None = None
    epochs: int | None = None
    iterations: int | None = None
    batch_size: int = 8
    lr: float | None = None
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.05
    warmup_iters: int = 200
    warmup_factor: float = 0.001
    lr_steps: tuple[int, ...] | None = None
    lr_gamma: float = 0.1
    clip_grad_norm: float | None = 10.0
    min_size: int | None = None
    max_size: int | None = None
    min_scale: float = 0.8
    max_scale: float = 1.25
    flip_prob: float = 0.5
    init: str | None = None
    pseudo: str | None = None
    pseudo_images: str | None = None
    pseudo_ratio: float = 0.4
    val: str | None = None
    val_images: str | None = None
    eval_every: int | None = None
    save_every: int | None = None
    resume: bool = False
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    threads: int = 0
    workers: int = 0
    log_every: int = 20
    max_det: int | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)

        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and value >= 1),
                 f"{name} must be a positive integer, got {value!r}")  # fmt: skip
        for name in ("batch_size", "log_every"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        for name in ("epochs", "iterations"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and value >= 1),
                 f"{name} must be a positive integer, got {value!r}")  # fmt: skip
        need(self.epochs is None or self.iterations is None, "give --epochs or --iterations, not both")
        for name in ("warmup_iters", "threads", "workers"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 0, f"{name} must be an integer >= 0, got {value!r}")
        need(
            self.lr is None or (math.isfinite(self.lr) and self.lr > 0),
            f"lr must be a positive number, got {self.lr!r}",
        )
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(0 < self.warmup_factor <= 1, f"warmup_factor must be in (0, 1], got {self.warmup_factor!r}")
        need(0 < self.lr_gamma <= 1, f"lr_gamma must be in (0, 1], got {self.lr_gamma!r}")
        need(
            self.lr_steps is None or all(isinstance(s, int) and s >= 0 for s in self.lr_steps),
            f"lr_steps must be epoch or iteration numbers >= 0, got {self.lr_steps!r}",
        )
        need(
            self.clip_grad_norm is None or self.clip_grad_norm > 0,
            f"clip_grad_norm must be None or > 0, got {self.clip_grad_norm!r}",
        )
        need(
            0 < self.min_scale <= self.max_scale,
            f"need 0 < min_scale <= max_scale, got {self.min_scale!r} and {self.max_scale!r}",
        )
        need(0 <= self.flip_prob <= 1, f"flip_prob must be in [0, 1], got {self.flip_prob!r}")
        need(
            isinstance(self.pseudo_ratio, int | float) and 0 <= self.pseudo_ratio < 1,
            f"pseudo_ratio must be in [0, 1) (the fraction of each batch that is pseudo-labeled), "
            f"got {self.pseudo_ratio!r}",
        )
        if self.pseudo is not None:
            need(self.pseudo_images is not None, "--pseudo needs --pseudo-images (the root of its images)")
            need(self.pseudo_ratio > 0, "--pseudo-ratio 0 would mix no pseudo images: drop --pseudo or raise it")
        need(
            self.device == "auto" or self.device == "cpu" or self.device.split(":")[0] == "cuda",
            f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        need(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")
        need(self.max_det is None or (isinstance(self.max_det, int) and self.max_det >= 1),
             f"max_det must be a positive integer, got {self.max_det!r}")  # fmt: skip
        need(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


# ----------------------------------------------------------------------------------------------------
# the label stage's options


# Where ``label`` decodes JPEGs: auto (on the device where it is a GPU, else cpu), cpu (PIL, in the DataLoader
# workers) or device (torchvision's decode_jpeg on the labeling device, batched; other images as cpu).
DECODES = ("auto", "cpu", "device")


@dataclass(frozen=True, kw_only=True)
class LabelOptions:
    """The options of ``datadistill label`` that a run config's ``label`` section sets too (one place for their
    defaults: :class:`LabelConfig` and :class:`LabelSection` are built on it). ``views``: ``auto`` (the default
    views, plus tiles where the teacher's labeled data calls for them: :mod:`datadistill.stages.defaults`) or a
    comma list of views. ``max_det``: the detections per image and view the teacher keeps (None: read from the
    data it was trained on, :func:`datadistill.models.detector.resolve_max_det`). ``decode``: where JPEGs are
    decoded (:data:`DECODES`: ``auto`` on the device where it is a GPU, else by the DataLoader workers)."""

    views: str = "auto"
    fuse: str = "nms"
    keypoint_fuse: str = "heatmap"
    iou_thr: float = 0.5
    score_floor: float = 0.05
    batch_size: int = 8
    shard_size: int = 1000
    max_det: int | None = None
    decode: str = "auto"


@dataclass(frozen=True, kw_only=True)
class LabelConfig(LabelOptions):
    """Every option of ``datadistill label``: :class:`LabelOptions` and these.

    ``rank``/``world_size``: this process's share under torchrun (the CLI reads them from ``RANK`` and
    ``WORLD_SIZE``). ``engine``: ``"local"`` (this process, or each torchrun rank) or ``"ray"`` (a Ray
    Data pipeline; ``ray_address`` joins a running cluster, None starts one on this machine).
    ``model``: the model spec of the teacher (:func:`datadistill.models.detector.load_detector`: a
    checkpoint, a training output folder, ``yolo:PATH.pt``); ``checkpoint`` is the same option under its
    former name. Give one of them. ``compile``: ``torch.compile`` the teacher's backbone (off until measured).
    """

    images: str
    out: str
    model: str | None = None
    checkpoint: str | None = None
    image_root: str | None = None
    workers: int = 2
    threads: int = 1
    device: str = "auto"
    precision: str = "auto"
    sync: bool = False  # fuse and write in the labeling loop itself, not beside the next batch (same shards)
    overwrite: bool = False
    allow_weak_teacher: bool = False
    rank: int = 0
    world_size: int = 1
    engine: str = "local"
    ray_address: str | None = None
    compile: bool = False


# ----------------------------------------------------------------------------------------------------
# the select stage's options


@dataclass(frozen=True, kw_only=True)
class SelectOptions:
    """The options of ``datadistill select``, also a run config's ``select`` section (one place for their
    defaults)."""

    policy: str = "count"
    min_agreement: int = 1
    drop_empty: bool = False
    keypoint_policy: str = "count"  # "count": match the labeled mean of visible keypoints; "count:F": F times it; "all"
    ignore_band: float = 0.0  # > 0: candidates scoring in [ignore_band * threshold, threshold) become ignore regions
    cross_class_iou: float = 0.5  # a candidate overlapping a better one of another class this much: dropped; 0: off


@dataclass(frozen=True, kw_only=True)
class SelectConfig(SelectOptions):
    """Every option of ``datadistill select``: where it reads and writes, and :class:`SelectOptions`."""

    labels: str
    reference: str
    out: str


def options_of(config: Any, options: type) -> dict[str, Any]:
    """The fields of the dataclass ``options`` (a base of ``config``'s class, or one with the same field names)
    as they are set in ``config``: a run section turned into the keyword arguments of its stage config."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(options)}


# ----------------------------------------------------------------------------------------------------
# the run config


@dataclass(frozen=True)
class DataSection:
    """Where the data is. Paths are relative to the config file's folder; the image roots (``train_images``,
    ``unlabeled``, ``unlabeled_images``, ``val_images``) may be object-store prefixes (``s3://bucket/prefix``)."""

    train: str = ""
    train_images: str = ""
    unlabeled: str = ""
    unlabeled_images: str | None = None
    val: str | None = None
    val_images: str | None = None
    unlabeled_truth: str | None = None  # held-back labels of the unlabeled images, to score pseudo-labels


@dataclass(frozen=True)
class TrainSection:
    """A run's teacher or student: the defaults are :class:`TrainConfig`'s."""

    model: str | None = None  # None: the default small model for the data's task
    epochs: int | None = None  # passes over the labeled images; None (and no iterations): the default schedule
    iterations: int | None = None  # or minibatches; a student with neither follows the teacher's setting
    batch_size: int = TrainConfig.batch_size
    lr: float | None = None  # None: the model's default
    init: str | None = None  # None: initial weights; "teacher" (student only), "weights:NAME" or a path
    pseudo_ratio: float = TrainConfig.pseudo_ratio  # student only


@dataclass(frozen=True, kw_only=True)
class LabelSection(LabelOptions):
    """A run's labeling: :class:`LabelOptions` and an open-vocabulary teacher's ``prompts`` (category -> phrase
    or list of phrases)."""

    prompts: dict[str, Any] | None = None


# A run's ``select`` section is the select stage's options.
SelectSection = SelectOptions


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
    precision: str = "auto"  # auto, fp32, bf16 or fp16 (GPU only), for every stage that runs a model
    threads: int = 2
    workers: int = 1
    teacher_check: bool = True  # stop before labeling when the teacher is too weak to teach (see run.py)


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
    if typing.get_origin(tp) is dict:
        if isinstance(value, dict):
            return value
        raise UserError(f"{key}: expected a mapping, got {value!r}")
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


def load_run_config(
    path: str | Path | None, overrides: Sequence[str] = (), *, settings: Mapping[str, Any] | None = None
) -> tuple[RunConfig, Path]:
    """The config from ``path`` (YAML, ``safe_load``; None: the defaults), then ``settings`` (dotted key ->
    value, as they are: the command line's named options), then the ``key=value`` overrides (``--set``, values
    parsed as YAML scalars); also the folder that relative paths in it are resolved against."""
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
    for key, value in (settings or {}).items():
        _set(raw, key, value)
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
