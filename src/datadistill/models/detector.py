"""One detector interface for every stage, and the one place that reads a model spec.

Every stage (label, evaluate, run, the Ray engine, the benchmarks) speaks to a model through
:class:`Detector`, and gets it from :func:`load_detector`; nothing else asks which library a model comes
from. A *model spec* is what a user types after ``--model``:

==========================  ===============================================================================
``teacher/checkpoint.pt``   a datadistill checkpoint (torchvision models: :mod:`datadistill.models.torchvision`)
``teacher/``                a training output folder: its ``checkpoint.pt``, ``yolo.pt`` or ``hf_model/``
``yolo:PATH.pt``            an Ultralytics YOLO model (:mod:`datadistill.models.ultralytics`)
``yolo:NAME.yaml``          (train only) a YOLO architecture with random weights
``hf:PATH_OR_ID``           a transformers detector (:mod:`datadistill.models.hf`): a save_pretrained folder
                            or a hub id; ``?classes=COCO.json&prompts=FILE`` for open-vocabulary ones
``small_fcos`` ...          (train only) a torchvision architecture of ``datadistill models``
==========================  ===============================================================================

:data:`BACKENDS` maps each backend to the module that implements it; each such module offers
``load(spec, *, device, min_score)`` (a :class:`Detector`), ``model_file(spec)``, ``model_files(spec)`` (a
:class:`ModelFiles`), and for training data, never a loop (DETR's ``build_model`` shape): ``LOOP``, a
:class:`LoopBackend` that datadistill's loop (:mod:`datadistill.stages.train`) runs, or ``TRAINER``, an
:class:`ExternalTrainer` (Ultralytics' own) that the train stage calls and then evaluates;
:func:`training_backend` gives either. :data:`TRAINED_FILES` names what a train run writes last into its
output folder. Coordinates are absolute pixel xyxy in the original image frame, as everywhere in datadistill.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, Protocol

from datadistill.core.caps import cap_for, objects_quantile
from datadistill.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

    from datadistill.core.types import Detections
    from datadistill.data.coco import CocoDataset

Task = Literal["boxes", "keypoints"]

log = logging.getLogger(__name__)

# backend -> the module that implements it (imported only when a model of that backend is used)
BACKENDS: dict[str, str] = {
    "torchvision": "datadistill.models.torchvision",
    "ultralytics": "datadistill.models.ultralytics",
    "hf": "datadistill.models.hf",
}
# backend -> the file its train stage writes last (its presence marks a finished run)
TRAINED_FILES: dict[str, str] = {"torchvision": "checkpoint.pt", "ultralytics": "yolo.pt", "hf": "hf_model"}
# backend -> the file an interrupted train stage resumes from
RESUME_FILES: dict[str, str] = {"torchvision": "last.pt", "ultralytics": "ultralytics/weights/last.pt", "hf": "last.pt"}
# spec prefix -> backend; a spec without one of these is a torchvision name, checkpoint or folder
PREFIXES: dict[str, str] = {"yolo:": "ultralytics", "hf:": "hf"}
# task -> the architecture (of datadistill.models.zoo) that ``train`` builds when no --model is given
DEFAULT_MODELS: dict[str, str] = {"boxes": "small_fcos", "keypoints": "small_keypointrcnn"}


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to rebuild a model and read its outputs, stored in every checkpoint.

    ``model``: the architecture (a name of ``datadistill models`` or a ``yolo:`` spec).
    ``class_names``/``category_ids``: the data set's categories in class-index order. Keypoint fields are
    empty for box models: ``flip_index[i]`` is the mirror of keypoint i, ``skeleton`` is 1-based pairs as
    in COCO, ``sigmas`` are the OKS sigmas. ``min_size``/``max_size``: the model's input size in px.
    ``objects_p99``: the 99th percentile of objects per image of the data it was trained on (0.0: unknown, as
    for a model trained elsewhere); ``max_det``: the detections per image set at training (``train --max-det``;
    0: read from ``objects_p99``). :func:`resolve_max_det` turns them into the cap a backend applies.
    """

    model: str
    task: Task
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]
    keypoint_names: tuple[str, ...] = ()
    flip_index: tuple[int, ...] = ()
    skeleton: tuple[tuple[int, int], ...] = ()
    sigmas: tuple[float, ...] = ()
    min_size: int = 128
    max_size: int = 128
    objects_p99: float = 0.0
    max_det: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoint_names)

    @staticmethod
    def for_dataset(model: str, dataset: CocoDataset, *, min_size: int, max_size: int) -> ModelMeta:
        """The meta of ``model`` trained on ``dataset`` at ``min_size``-``max_size`` px (classes, keypoint
        names, flip map, skeleton and sigmas from the data set's categories; the 99th percentile of its
        objects per image, crowd regions left out)."""
        if not dataset.categories:
            raise UserError("the data set has no categories; a detector needs at least one class")
        if min_size <= 0 or max_size < min_size:
            raise UserError(f"need 0 < min_size <= max_size, got min_size={min_size}, max_size={max_size}")
        from datadistill.data.coco import objects_per_image

        kp = dataset.keypoint_category
        return ModelMeta(
            model=model,
            task=dataset.task,
            class_names=dataset.class_names,
            category_ids=tuple(c.id for c in dataset.categories),
            keypoint_names=kp.keypoints if kp else (),
            flip_index=kp.flip_index if kp else (),
            skeleton=kp.skeleton if kp else (),
            sigmas=kp.sigmas if kp else (),
            min_size=int(min_size),
            max_size=int(max_size),
            objects_p99=objects_quantile(objects_per_image(dataset)),
        )

    @staticmethod
    def from_dataset(
        model: str, dataset: CocoDataset, *, min_size: int | None = None, max_size: int | None = None
    ) -> ModelMeta:
        """The meta of the torchvision architecture ``model`` trained on ``dataset``, its input size
        defaulting to the architecture's; a model of the other task is a UserError."""
        tv = backend_module("torchvision")
        return tv.meta_for(model, dataset, min_size=min_size, max_size=max_size)  # type: ignore[no-any-return]

    def to_dict(self) -> dict[str, Any]:
        """Plain json-able types only (so a checkpoint loads with ``weights_only=True``)."""
        return {
            "model": self.model,
            "task": self.task,
            "class_names": list(self.class_names),
            "category_ids": list(self.category_ids),
            "keypoint_names": list(self.keypoint_names),
            "flip_index": list(self.flip_index),
            "skeleton": [list(e) for e in self.skeleton],
            "sigmas": list(self.sigmas),
            "min_size": self.min_size,
            "max_size": self.max_size,
            "objects_p99": self.objects_p99,
            "max_det": self.max_det,
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> ModelMeta:
        """The meta of :meth:`to_dict`'s form; a one-line UserError names the field that is missing or of the
        wrong type (fields added later, such as ``objects_p99``, default when absent)."""
        if not isinstance(d, Mapping):
            raise UserError(f"malformed model meta: expected an object, got {type(d).__name__}")
        if d.get("task") not in ("boxes", "keypoints"):
            raise UserError(f"malformed model meta: task must be 'boxes' or 'keypoints', got {d.get('task')!r}")
        values: dict[str, Any] = {"task": d["task"]}
        for key, (convert, required) in _META_FIELDS.items():
            if key not in d:
                if required:
                    raise UserError(f"malformed model meta: field {key!r} is missing")
                continue
            try:
                values[key] = convert(d[key])
            except (TypeError, ValueError):
                raise UserError(
                    f"malformed model meta: field {key!r} is {str(d[key])[:60]!r}, not {_META_KINDS[convert]}"
                ) from None
        return ModelMeta(**values)


def _items(value: Any) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise TypeError(f"not a list: {type(value).__name__}")
    return list(value)


def _names(value: Any) -> tuple[str, ...]:
    return tuple(str(n) for n in _items(value))


def _ints(value: Any) -> tuple[int, ...]:
    return tuple(_int(i) for i in _items(value))


def _pairs(value: Any) -> tuple[tuple[int, int], ...]:
    pairs = tuple(tuple(_ints(e)) for e in _items(value))
    if any(len(e) != 2 for e in pairs):
        raise ValueError("not pairs")
    return pairs  # type: ignore[return-value]


def _floats(value: Any) -> tuple[float, ...]:
    return tuple(_float(f) for f in _items(value))


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise TypeError("not an integer")
    return int(value)


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("not a number")
    return float(value)


# ModelMeta field -> (how its json value is read, whether it must be there); task is read before them
_META_FIELDS: dict[str, tuple[Callable[[Any], Any], bool]] = {
    "model": (str, True),
    "class_names": (_names, True),
    "category_ids": (_ints, True),
    "keypoint_names": (_names, False),
    "flip_index": (_ints, False),
    "skeleton": (_pairs, False),
    "sigmas": (_floats, False),
    "min_size": (_int, True),
    "max_size": (_int, True),
    "objects_p99": (_float, False),  # absent from checkpoints written before it
    "max_det": (_int, False),
}
_META_KINDS: dict[Callable[[Any], Any], str] = {str: "a string", _names: "a list of names", _ints: "a list of integers",
                                                 _pairs: "a list of pairs", _floats: "a list of numbers",
                                                 _int: "an integer", _float: "a number"}  # fmt: skip


@dataclass(frozen=True)
class LoopBackend:
    """What datadistill's training loop (:func:`datadistill.stages.train.train_loop`) takes from a backend.

    ``meta_for(model, dataset, *, min_size, max_size)``: the meta of ``model`` trained on ``dataset`` (input
    size defaulting to the model's). ``default_lr(model, optimizer)``: the peak lr when none is given.
    ``build_model(meta)``: the module to train; in train mode ``module(images, targets)`` gives named
    scalar losses (what DDP wraps). ``init_weights(module, spec, *, meta)``: load ``--init`` weights.
    ``losses(module, images, targets)``: a batch's named losses (sums to the total). ``detector(module,
    meta)``: the :class:`Detector` that validation runs. ``save_final(out, *, model, meta, extra)``: write
    the trained model as :data:`final_name` in ``out`` (last: its presence marks the run finished).
    """

    meta_for: Callable[..., ModelMeta]
    default_lr: Callable[[str, str], float]
    build_model: Callable[[ModelMeta], Any]
    init_weights: Callable[..., Any]
    losses: Callable[..., dict[str, Any]]
    detector: Callable[[Any, ModelMeta], Detector]
    save_final: Callable[..., None]
    final_name: str


@dataclass(frozen=True)
class ExternalRun:
    """What an :class:`ExternalTrainer` leaves for the train stage to finish: the spec of the trained model
    (``yolo:OUT/yolo.pt``), the validation set to evaluate it on (None: none given) and its images, the
    epoch line of ``metrics.jsonl`` before evaluation, and the seconds its own training took."""

    model: str
    val: CocoDataset | None
    val_images: str | None
    record: dict[str, Any]
    train_s: float


@dataclass(frozen=True)
class ExternalTrainer:
    """A backend whose models train with their library's own trainer (Ultralytics'), called by the train stage.

    ``fit(cfg)`` trains as the :class:`~datadistill.config.TrainConfig` says and writes :data:`final_name`
    into ``cfg.out`` with ``config.yaml`` and ``provenance.json``; it returns an :class:`ExternalRun`, or None
    when a resumed run was already finished. The stage then evaluates and writes ``metrics.jsonl`` and
    ``timings.json``: the backend never calls a stage.
    """

    fit: Callable[[Any], ExternalRun | None]
    final_name: str


class Detector(Protocol):
    """A trained detector as every stage sees it.

    ``predict`` takes float32 images ``[3, H, W]`` in [0, 1] of any sizes and gives one
    :class:`~datadistill.core.types.Detections` per image in that image's frame: boxes ``[N, 4]`` xyxy px,
    labels as class indices ``0..C-1`` (``meta.class_names``), keypoints ``[N, K, 3]`` (x, y, score) for
    keypoint models, on the device of the first image. ``input_size(min, max)`` is a context in which the
    model runs at another input size (how scale views run: the image is not resized by the caller).
    ``heatmaps`` gives the keypoint head's heatmap logits ``[N, K, M, M]`` on given boxes (None: the model
    has none, and keypoints are fused by coordinates); ``keypoints_from_heatmaps`` decodes such heatmaps
    as ``predict`` would. ``unfit_reason`` says why an image of ``height x width`` px cannot run at an
    input size (e.g. "would resize it to 0x3 px"; None: it can).
    """

    meta: ModelMeta
    spec: str
    max_det: int

    def predict(self, images: Sequence[Tensor]) -> list[Detections]: ...

    def input_size(self, min_size: int, max_size: int) -> AbstractContextManager[Any]: ...

    @property
    def has_heatmaps(self) -> bool: ...

    def heatmaps(self, images: Sequence[Tensor], boxes: Sequence[Tensor]) -> list[Tensor] | None: ...

    def keypoints_from_heatmaps(self, heatmaps: Tensor, boxes: Tensor, *, image_size: tuple[int, int]) -> Tensor: ...

    def unfit_reason(self, height: int, width: int, *, min_size: int, max_size: int) -> str | None: ...


class DetectorLoader(Protocol):
    """What builds a :class:`Detector` from a model spec: :func:`load_detector`, or a stand-in that a stage
    takes in its place (a benchmark's fake detector; pickled to the workers of the Ray engine)."""

    def __call__(
        self,
        spec: str,
        *,
        device: Any = "cpu",
        min_score: float | None = None,
        max_det: int | None = None,
        compile: bool = False,
    ) -> Detector: ...


def list_models() -> list[tuple[str, str, str]]:
    """``(spec, task, description)`` of every model ``train --model`` takes, backend by backend."""
    rows: list[tuple[str, str, str]] = []
    for backend in BACKENDS:
        rows += backend_module(backend).list_models()
    return rows


def sized_by_data(model: str) -> bool:
    """Whether ``model`` takes its input size from the data: the small models that train from scratch (a
    name of the torchvision zoo not meant for pretrained weights). YOLO, Hugging Face and the pretrained
    torchvision models keep their own sizes."""
    from datadistill.models.zoo import MODELS  # the zoo builds torchvision models: loaded only when asked

    spec = MODELS.get(model)
    return spec is not None and not spec.pretrained


def backend_of(spec: str) -> str:
    """The backend of a model spec (see the module docstring); a folder's backend is its trained file's."""
    for prefix, backend in PREFIXES.items():
        if spec.startswith(prefix):
            return backend
    path = Path(spec).expanduser()
    if path.is_dir():
        found = trained_file(path)
        if found is not None:
            return backend_of(found)
    return "torchvision"


def backend_module(backend: str) -> ModuleType:
    """The module implementing ``backend`` (a key of :data:`BACKENDS`)."""
    return importlib.import_module(BACKENDS[backend])


def trained_file(out: str | os.PathLike[str]) -> str | None:
    """The model spec of what a ``train`` run left in folder ``out`` (a ``checkpoint.pt``, a ``yolo.pt``
    as ``yolo:PATH``, an ``hf_model`` folder as ``hf:PATH``), or None when the run has not finished."""
    out = Path(out)
    for backend, name in TRAINED_FILES.items():
        if (out / name).exists():
            prefix = next((p for p, b in PREFIXES.items() if b == backend), "")
            return f"{prefix}{out / name}"
    return None


def training_started(out: str | os.PathLike[str]) -> bool:
    """Whether folder ``out`` holds an interrupted (or finished) train stage of any backend to resume."""
    return any((Path(out) / name).exists() for name in RESUME_FILES.values())


def trained_name(model: str | None) -> str:
    """The file that ``train --model MODEL`` writes into its output folder when it finishes."""
    return TRAINED_FILES[backend_of(model) if model else "torchvision"]


def resolve_spec(spec: str) -> str:
    """``spec`` with a training folder replaced by the spec of its trained file; a one-line UserError
    when a folder holds no finished training run."""
    if any(spec.startswith(p) for p in PREFIXES):
        return spec
    path = Path(spec).expanduser()
    if path.is_dir():
        found = trained_file(path)
        if found is None:
            names = " or ".join(TRAINED_FILES.values())
            raise UserError(f"{path}: a folder with no trained model in it ({names}); has its training finished?")
        return found
    return spec


def model_file(spec: str) -> Path:
    """The one local file that holds a loadable model spec's weights (what a labeling run's signature
    hashes, and what the Ray engine ships to its workers)."""
    spec = resolve_spec(spec)
    module = backend_module(backend_of(spec))
    return module.model_file(spec)  # type: ignore[no-any-return]


def option_files(spec: str) -> tuple[Path, ...]:
    """The files besides the weights that change what ``spec`` labels (an open-vocabulary model's prompts and
    classes); none for most backends."""
    spec = resolve_spec(spec)
    module = backend_module(backend_of(spec))
    return tuple(getattr(module, "option_files", lambda s: ())(spec))


def with_model_file(spec: str, path: str | os.PathLike[str]) -> str:
    """``spec`` with its weights file replaced by ``path`` (a copy of :func:`model_file` elsewhere)."""
    spec = resolve_spec(spec)
    prefix = next((p for p in PREFIXES if spec.startswith(p)), "")
    return f"{prefix}{path}"


@dataclass(frozen=True)
class ModelFiles:
    """Every local file a model spec loads from, to copy to a machine that cannot see them (a Ray worker).

    ``files``: ``(name, path)`` pairs; the copy of ``path`` goes to ``FOLDER/name`` (``name`` is relative,
    ``/``-separated, never ``..``). ``rebuild(FOLDER)``: the spec that loads the copies laid out in ``FOLDER``
    (a ``partial`` of a module-level function, so that the record pickles)."""

    files: tuple[tuple[str, Path], ...]
    rebuild: Callable[[Path], str]

    def spec_in(self, folder: str | os.PathLike[str]) -> str:
        """The spec of the copies laid out in ``folder`` (by :func:`write_model_files`)."""
        return self.rebuild(Path(folder))


def model_files(spec: str) -> ModelFiles:
    """What to ship so that another machine loads ``spec`` without seeing this one's files: its weights
    file or whole model folder and its option files (prompts, classes), each backend saying which (its
    ``model_files``); a one-line UserError for a file that is missing or a link that leads out of its folder."""
    spec = resolve_spec(spec)
    shipped: ModelFiles = backend_module(backend_of(spec)).model_files(spec)
    names = [check_file_name(name) for name, _ in shipped.files]
    if len(set(names)) != len(names):
        raise ValueError(f"{spec}: two files to ship under one name: {sorted(names)}")
    return shipped


def check_file_name(name: str) -> str:
    """``name`` when it is a relative ``/``-separated path that stays in its folder; ValueError otherwise."""
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or any(p in ("", ".", "..") for p in parts) or "\\" in name:
        raise ValueError(f"not a relative file name inside a folder: {name!r}")
    return name


def single_file(spec: str, path: Path) -> ModelFiles:
    """The :class:`ModelFiles` of a spec that is its one weights file ``path`` (a checkpoint, a YOLO .pt)."""
    return ModelFiles(files=((path.name, path),), rebuild=partial(_spec_of_copy, spec, path.name))


def _spec_of_copy(spec: str, name: str, folder: Path) -> str:
    return with_model_file(spec, folder / name)


def folder_files(folder: Path, *, within: Path | None = None) -> tuple[tuple[str, Path], ...]:
    """``(name, path)`` of the files directly in ``folder``, by name; hidden ones (``.git``, ``.cache``) and
    folders (links to folders too) are left out. A link is followed only when it stays inside ``within``
    (default: ``folder``; a Hugging Face cache snapshot's links lead to the repo's ``blobs/``); one leading
    elsewhere, or nowhere, is a one-line UserError (as is any other thing that is not a regular file)."""
    bound = (within if within is not None else folder).resolve()
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        target = path.resolve()
        if path.is_symlink() and not target.is_relative_to(bound):
            raise UserError(f"{path}: refused: a link to {target}, outside {bound}")
        if not target.is_file():
            raise UserError(f"{path}: refused: {'a link to ' + str(target) if path.is_symlink() else 'not a file'}")
        files.append((path.name, path))
    return tuple(files)


def write_model_files(contents: Mapping[str, bytes], folder: str | os.PathLike[str]) -> None:
    """Write the shipped files ``name -> bytes`` (the names of a :class:`ModelFiles`) into ``folder``."""
    for name, blob in contents.items():
        path = Path(folder) / check_file_name(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)


def with_label_options(spec: str, *, classes: str | None = None, prompts: str | None = None) -> str:
    """``spec`` with the categories to label (``classes``, a COCO json) and an open-vocabulary model's text
    ``prompts`` (a YAML/JSON file) in it; a one-line UserError for a backend that takes neither."""
    module = backend_module(backend_of(spec))
    if not hasattr(module, "with_options"):
        raise UserError(f"--prompts and --classes apply to hf: models only, not {spec!r}")
    return module.with_options(spec, classes=classes, prompts=prompts)  # type: ignore[no-any-return]


def label_only(spec: str) -> bool:
    """Whether ``spec`` names a model that labels as it is and cannot be trained (an open-vocabulary one)."""
    module = backend_module(backend_of(spec))
    return bool(getattr(module, "label_only", lambda s: False)(spec))


def resolve_max_det(meta: ModelMeta, *, default: int, override: int | None = None) -> int:
    """The detections per image a backend keeps: ``override`` (``--max-det``) when given, else the cap set at
    training (``meta.max_det``), else :func:`~datadistill.core.caps.cap_for` the training data's objects per
    image (``meta.objects_p99``), never below ``default``, the library's own cap."""
    if override is not None:
        if override < 1:
            raise UserError(f"--max-det must be at least 1, got {override}")
        return int(override)
    if meta.max_det > 0:
        return meta.max_det
    return cap_for(meta.objects_p99, default=default)


def max_det_reason(meta: ModelMeta, *, override: int | None) -> str:
    """Where :func:`resolve_max_det`'s cap came from, in words (what ``load_detector`` logs)."""
    if override is not None:
        return "--max-det"
    if meta.max_det > 0:
        return "set at training with --max-det"
    if meta.objects_p99 > 0:
        p99 = f"{meta.objects_p99:g}"
        return f"twice the training data's 99th percentile of {p99} objects per image, at least the library's default"
    return "the library's default: the model records no objects per image of its training data"


def load_detector(
    spec: str, *, device: Any = "cpu", min_score: float | None = None, max_det: int | None = None, compile: bool = False
) -> Detector:
    """The :class:`Detector` of a model spec, in eval mode on ``device``.

    ``min_score``: the lowest score the caller needs (a labeling run's score floor); a backend that drops
    low scores before returning them (YOLO's ``conf``) keeps at least those. ``max_det``: the detections per
    image to keep (None: read from the data the model was trained on, :func:`resolve_max_det`), applied to
    every backend's output and to the proposals feeding a two-stage head. A one-line UserError for a
    missing, foreign or unsafe file, or a spec that names an architecture rather than a trained model.
    ``compile``: ``torch.compile`` the model's backbone where the backend can (torchvision: backbone and FPN);
    a backend that cannot logs a warning and runs eagerly.
    """
    spec = resolve_spec(spec)
    module = backend_module(backend_of(spec))
    detector: Detector = module.load(spec, device=device, min_score=min_score, max_det=max_det, compile=compile)
    log.info("%s keeps at most %d detections per image (%s)", spec, detector.max_det,
             max_det_reason(detector.meta, override=max_det))  # fmt: skip
    return detector


def training_backend(model: str | None) -> LoopBackend | ExternalTrainer:
    """What trains ``train --model MODEL`` (None: a torchvision default): the backend's :class:`LoopBackend`
    (its ``LOOP``, for datadistill's loop) or its :class:`ExternalTrainer` (its ``TRAINER``)."""
    module = backend_module(backend_of(model) if model else "torchvision")
    found = getattr(module, "LOOP", None) or getattr(module, "TRAINER", None)
    if not isinstance(found, LoopBackend | ExternalTrainer):
        raise TypeError(f"{module.__name__} offers neither LOOP nor TRAINER")
    return found
