"""Ultralytics YOLO detectors (detect and pose) as datadistill models: ``--model yolo:PATH_OR_YAML``.

An optional backend (``pip install 'datadistill[yolo]'``; Ultralytics is AGPL-3.0). The spec after ``yolo:``
is a model YAML (``yolo11n.yaml``, ``yolo11n-pose.yaml``: Ultralytics' bundled ones resolve offline; a
random init, for ``train``) or a local ``.pt``.

- **No code from a model file**: an Ultralytics ``.pt`` is a pickle of model objects, which Ultralytics reads
  with ``weights_only=False`` (a hostile file runs its code while loading). Here every ``.pt`` a user names
  (``--model``, ``--init``) is read with ``torch.load(weights_only=True)`` and an allowlist of the classes an
  Ultralytics checkpoint holds (:func:`checkpoint_classes`: torch's and Ultralytics' ``nn.Module`` classes),
  and a file that needs anything else is refused in one line before any of it is unpickled. A file the user
  trusts loads as Ultralytics loads it with ``DATADISTILL_TRUST_MODEL_FILES=1`` (:data:`TRUST_ENV`).

- **Training** goes through Ultralytics' own trainer and recipe (:func:`fit`, :data:`TRAINER`: the train stage
  calls it as an external trainer and evaluates its model) on a YOLO data set
  written from the COCO inputs. A student's real:pseudo ratio is kept by *repeating files* in the training
  list (:func:`mix_plan`): the list holds real and pseudo images in the ratio, cycling the smaller sets, and
  as many samples in all as the torchvision student sees (``epochs`` passes over the real images at that
  ratio). Ultralytics shuffles the list, so the ratio holds per epoch and on average per minibatch, not
  exactly in every minibatch as with :class:`~datadistill.data.dataset.MixedBatchSampler`.
- **Labeling and evaluation** use :class:`YoloDetector`, one more
  :class:`~datadistill.models.detector.Detector`, so views, keypoint flips with the data set's flip map,
  fusion and shards are the ones of every model. YOLO gives keypoint coordinates and scores but no
  heatmaps: keypoints are fused by score-weighted coordinate averaging (``mean``).
- **Offline**: :func:`import_ultralytics` turns off everything that would reach the network (see there).

Coordinates are absolute pixel xyxy in the original image frame, as everywhere in datadistill.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from torch import Tensor

from datadistill.core.types import Detections
from datadistill.data.coco import CocoDataset, default_sigmas, derive_flip_index
from datadistill.errors import UserError
from datadistill.models.detector import (
    ExternalRun,
    ExternalTrainer,
    ModelFiles,
    ModelMeta,
    resolve_max_det,
    single_file,
)

if TYPE_CHECKING:
    from datadistill.config import TrainConfig

log = logging.getLogger(__name__)

PREFIX = "yolo:"
EXTRA_HINT = "install the extra: pip install 'datadistill[yolo]' (Ultralytics, AGPL-3.0)"
# Set before Ultralytics is imported, whatever the environment says: it must never reach the network.
# YOLO_OFFLINE makes its online check answer False without a DNS query (no telemetry, error reports,
# update checks or Platform sync follow from it); YOLO_AUTOINSTALL=0 stops it pip-installing packages.
OFFLINE_ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0"}
# Integrations that Ultralytics turns on when their package is importable; all upload or log elsewhere.
INTEGRATIONS = ("clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
TASKS = {"detect": "boxes", "pose": "keypoints"}
DEFAULT_CONF = 0.01  # score threshold of the raw predictions (fusion and the score floor come after)
DEFAULT_MAX_DET = 100  # detections per image when the model records no objects per image (COCO's count)
DEFAULT_IOU = 0.7  # Ultralytics' NMS IoU within one view
MAX_DEFAULT_IMGSZ = 640
CHECKPOINT_KEY = "datadistill"  # our model meta, stored inside the Ultralytics .pt that train writes
CHECKPOINT_NAME = "yolo.pt"
MODEL_HELP = (
    "Ultralytics YOLO detect/pose from a model YAML (yolo11n.yaml, yolo11n-pose.yaml) or a local .pt "
    "(read weights-only: Ultralytics' model classes only); pip install 'datadistill[yolo]' (AGPL-3.0)"
)
# "1": read yolo: .pt files as Ultralytics does, unpickled with weights_only=False (they can run code)
TRUST_ENV = "DATADISTILL_TRUST_MODEL_FILES"
# The modules whose nn.Module classes (in them or their submodules) an Ultralytics checkpoint may hold
SAFE_CLASS_MODULES = ("torch.nn.modules", "ultralytics.nn.modules", "ultralytics.nn.tasks")


def list_models() -> list[tuple[str, str, str]]:
    """The one row of ``datadistill models`` for YOLO."""
    return [(f"{PREFIX}PATH_OR_YAML", "both", MODEL_HELP)]


def is_yolo(spec: str | None) -> bool:
    """Whether a ``--model`` value names an Ultralytics model (``yolo:...``)."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def _source(spec: str) -> str:
    source = spec.removeprefix(PREFIX).strip()
    if not source:
        raise UserError(f"--model {spec!r}: give a model YAML or a .pt after 'yolo:', e.g. yolo:yolo11n.yaml")
    return source


def default_config_dir() -> Path:
    """Where Ultralytics' settings.json goes unless ``YOLO_CONFIG_DIR`` is set: a per-user temp folder,
    never the home folder or the working tree."""
    return Path(tempfile.gettempdir()) / f"datadistill-ultralytics-{os.getuid() if hasattr(os, 'getuid') else 0}"


def import_ultralytics() -> Any:
    """The ``ultralytics`` module, imported so that it stays offline and out of the user's home.

    Before the first import: ``YOLO_OFFLINE=1`` and ``YOLO_AUTOINSTALL=0`` (:data:`OFFLINE_ENV`), and
    ``YOLO_CONFIG_DIR`` (where its settings.json lives) defaults to :func:`default_config_dir`. After it,
    in memory only (the settings file is not rewritten): settings sync, the logging integrations
    (:data:`INTEGRATIONS`) and the Platform training callbacks off; the plotting-font lookup, which
    downloads ``Arial.ttf`` when a data set is checked even with plots off, replaced by a no-op; the AMP
    check, which downloads ``yolo26n.pt`` on a GPU, skipped when that file is not already local (AMP then
    stays on, as Ultralytics decides offline).
    A missing package is a one-line UserError.
    """
    fresh = "ultralytics" not in sys.modules
    if fresh:
        os.environ.update(OFFLINE_ENV)
        os.environ.setdefault("YOLO_CONFIG_DIR", str(default_config_dir()))
    try:
        import ultralytics
        import ultralytics.data.utils as data_utils
        import ultralytics.engine.trainer as trainer_module
        import ultralytics.utils as ul_utils
        import ultralytics.utils.callbacks.platform as platform_callbacks
        import ultralytics.utils.plotting as plotting
    except ImportError as exc:
        raise UserError(f"YOLO models need Ultralytics ({exc.name or exc}): {EXTRA_HINT}") from None
    if ul_utils.ONLINE:
        raise UserError(
            "Ultralytics was imported before datadistill could set YOLO_OFFLINE=1; set it in the environment "
            "(export YOLO_OFFLINE=1) or import datadistill's backend first"
        )
    dict.update(ul_utils.SETTINGS, {"sync": False, **dict.fromkeys(INTEGRATIONS, False)})
    platform_callbacks.callbacks.clear()  # no Platform streaming, even where ULTRALYTICS_API_KEY is set
    _restore_pil_open()
    data_utils.check_font = _no_font
    plotting.check_font = _no_font
    if not getattr(trainer_module.check_amp, "_datadistill", False):
        trainer_module.check_amp = _offline_amp_check(trainer_module.check_amp, ul_utils.WEIGHTS_DIR)
    return ultralytics


def _restore_pil_open() -> None:
    """Undo Ultralytics' process-wide patch of ``PIL.Image.open``: on a file PIL cannot identify, the patch
    tries to install and import ``pi-heif``, so that every later read of a broken image in this process
    (datadistill's own, in another stage of a ``run``) raised ModuleNotFoundError instead of a one-line
    error naming the file."""
    from PIL import Image

    patches = sys.modules.get("ultralytics.utils.patches")
    original = getattr(patches, "_image_open", None)
    if original is not None and Image.open is not original:
        Image.open = original


def _no_font(font: str = "Arial.ttf") -> None:
    """Ultralytics' font lookup without the download (fonts only serve plots, which datadistill turns off)."""
    return None


def _offline_amp_check(original: Any, weights_dir: Path) -> Any:
    def check_amp(model: torch.nn.Module) -> bool:
        device = next(model.parameters()).device
        if device.type != "cuda":
            return False
        if not (Path(weights_dir) / "yolo26n.pt").is_file():
            log.info("Ultralytics' AMP check skipped (it would download yolo26n.pt): mixed precision on")
            return True
        return bool(original(model))

    check_amp._datadistill = True  # type: ignore[attr-defined]
    return check_amp


# ----------------------------------------------------------------------------------------------------
# model files: weights-only, an allowlist of classes


def trusts_model_files() -> bool:
    """Whether the user opted in to loading ``.pt`` files as Ultralytics does (``DATADISTILL_TRUST_MODEL_FILES=1``)."""
    return os.environ.get(TRUST_ENV, "").strip() == "1"


def _allowed_class(name: str) -> type | None:
    """The class a checkpoint's global ``module.Name`` names when it is an ``nn.Module`` class of
    :data:`SAFE_CLASS_MODULES` (imported from the installed package, never from the file); else None."""
    module, _, attr = name.rpartition(".")
    if not any(module == m or module.startswith(f"{m}.") for m in SAFE_CLASS_MODULES):
        return None
    try:
        found = getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None
    return found if isinstance(found, type) and issubclass(found, torch.nn.Module) else None


def checkpoint_classes(path: Path, *, what: str) -> list[type]:
    """The classes that reading the Ultralytics checkpoint ``path`` needs beyond torch's tensors and plain
    types, each on the allowlist; read from the file's pickle opcodes without running any of them
    (``torch.serialization.get_unsafe_globals_in_checkpoint``). A one-line UserError, ``what`` first (the
    option that named the file), names the file and the first globals off the list, or says the file is no torch
    checkpoint."""
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # not a zip archive (a bare pickle, a truncated or foreign file): never unpickled
        kind = type(exc).__name__
        raise UserError(f"{what} {path}: refused: not a torch zip checkpoint, so it cannot be read weights-only "
                        f"({kind}); set {TRUST_ENV}=1 to unpickle a file you trust") from exc  # fmt: skip
    allowed = {name: _allowed_class(name) for name in needed}
    refused = sorted(name for name, cls in allowed.items() if cls is None)
    if refused:
        more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
        raise UserError(f"{what} {path}: refused: reading it would call {', '.join(refused[:3])}{more}, not an "
                        f"Ultralytics model class (it may run code); set {TRUST_ENV}=1 to load a file you "
                        "trust")  # fmt: skip
    return [cls for cls in allowed.values() if cls is not None]


@contextlib.contextmanager
def weights_only_loading(path: Path, *, what: str) -> Iterator[None]:
    """A context in which Ultralytics reads the checkpoint ``path`` (``YOLO(path)``, ``YOLO.load(path)``) with
    ``torch.load(weights_only=True)`` and the classes of :func:`checkpoint_classes` allowed; the check runs
    first, so a refused file is never unpickled. With :func:`trusts_model_files`, Ultralytics' own loading."""
    if trusts_model_files():
        yield
        return
    allowed = checkpoint_classes(path, what=what)
    import ultralytics.nn.tasks as tasks

    original = tasks.torch_load

    def load_weights_only(*args: Any, **kwargs: Any) -> Any:
        with torch.serialization.safe_globals(allowed):
            return original(*args, **{**kwargs, "weights_only": True})

    tasks.torch_load = load_weights_only
    try:
        yield
    finally:
        tasks.torch_load = original


# ----------------------------------------------------------------------------------------------------
# models


def _ultralytics_device(device: torch.device) -> str:
    if device.type == "cuda":
        return str(device.index or 0)
    return device.type


def _stride_multiple(size: float, stride: int) -> int:
    return max(stride, int(round(size / stride)) * stride)


class YoloDetector:
    """An Ultralytics YOLO model behind :class:`datadistill.models.detector.Detector`.

    ``predict(images)`` runs Ultralytics' predictor (letterbox to ``imgsz``, NMS within the view at
    ``iou``, boxes and keypoints mapped back to the input frame) on float32 ``[3, H, W]`` images in
    [0, 1]; ``input_size`` changes ``imgsz`` for a scale view. Keypoints come back ``[N, K, 3]`` with x, y
    and the keypoint's confidence in [0, 1].
    """

    has_heatmaps = False  # YOLO gives keypoint coordinates and scores, no heatmaps

    def __init__(
        self,
        yolo: Any,
        meta: ModelMeta,
        *,
        device: torch.device,
        path: Path,
        conf: float = DEFAULT_CONF,
        iou: float = DEFAULT_IOU,
        max_det: int = DEFAULT_MAX_DET,
    ) -> None:
        self.yolo, self.meta, self.device, self.path = yolo, meta, device, path
        self.spec = f"{PREFIX}{path}"
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.stride = int(max(yolo.model.stride)) if hasattr(yolo.model, "stride") else 32
        self.imgsz = _stride_multiple(meta.max_size, self.stride)

    @contextlib.contextmanager
    def input_size(self, min_size: int, max_size: int) -> Iterator[YoloDetector]:
        """Run at ``max_size`` (rounded to the stride): YOLO letterboxes the long side to ``imgsz``."""
        saved = self.imgsz
        self.imgsz = _stride_multiple(max_size, self.stride)
        try:
            yield self
        finally:
            self.imgsz = saved

    def predict(self, images: Sequence[Tensor], *, augment: bool = False) -> list[Detections]:
        """Detections per image in its own frame. ``augment``: Ultralytics' own test-time augmentation
        (3 scales and a flip for plain detection heads; pose and end-to-end heads fall back to one view)."""
        if len(images) == 0:
            return []
        arrays = [_to_bgr_uint8(im) for im in images]
        threads = torch.get_num_threads()  # Ultralytics' device setup resets the thread count on a CPU
        try:
            results = self.yolo.predict(
                arrays, imgsz=self.imgsz, conf=self.conf, iou=self.iou, max_det=self.max_det, augment=augment,
                device=_ultralytics_device(self.device), batch=len(arrays), verbose=False,
            )  # fmt: skip
        finally:
            torch.set_num_threads(threads)
        k = self.meta.num_keypoints
        out_device = images[0].device
        detections = []
        for r in results:
            boxes = r.boxes
            kps = None
            if k:
                kps = r.keypoints.data.float() if r.keypoints is not None else torch.zeros((len(boxes), k, 3))
                if kps.shape[-1] == 2:  # a model trained with kpt_shape [K, 2] gives no keypoint scores
                    kps = torch.cat([kps, torch.ones_like(kps[..., :1])], dim=-1)
            det = Detections(
                boxes=boxes.xyxy.float().reshape(-1, 4),
                scores=boxes.conf.float().reshape(-1),
                labels=boxes.cls.long().reshape(-1),
                keypoints=kps.reshape(len(boxes), k, 3) if kps is not None else None,
            )
            detections.append(det.to(out_device))
        return detections

    def heatmaps(self, images: Sequence[Tensor], boxes: Sequence[Tensor]) -> list[Tensor] | None:
        return None

    def keypoints_from_heatmaps(self, heatmaps: Tensor, boxes: Tensor, *, image_size: tuple[int, int]) -> Tensor:
        raise ValueError(f"{self.spec} gives no keypoint heatmaps")

    def unfit_reason(self, height: int, width: int, *, min_size: int, max_size: int) -> str | None:
        """None: YOLO letterboxes any image into its square input."""
        return None


def _to_bgr_uint8(image: Tensor) -> np.ndarray:
    """``[3, H, W]`` float in [0, 1] (RGB) -> ``[H, W, 3]`` uint8 BGR, what Ultralytics reads from cv2."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image [3, H, W], got {tuple(image.shape)}")
    rgb = image.detach().float().mul(255).round_().clamp_(0, 255).to(torch.uint8).cpu()
    return np.ascontiguousarray(rgb.permute(1, 2, 0).numpy()[:, :, ::-1])


def weights_path(spec: str) -> Path:
    """The local ``.pt`` of a ``yolo:PATH.pt`` spec; a one-line UserError when it is not one."""
    source = Path(_source(spec)).expanduser()
    if source.suffix.lower() in (".yaml", ".yml"):
        raise UserError(
            f"--model {spec}: a model YAML has no trained weights; label and evaluate need a .pt "
            "(train one with `datadistill train --model yolo:...`, which writes OUT/yolo.pt)"
        )
    if source.suffix.lower() != ".pt":
        raise UserError(f"--model {spec}: expected a local .pt file (or a model YAML for train)")
    if not source.is_file():
        raise UserError(f"--model {spec}: {source} not found (YOLO weights are never downloaded)")
    return source


def load_yolo(spec: str, *, device: torch.device | str = "cpu") -> YoloDetector:
    """A trained YOLO model from ``yolo:PATH.pt`` with its :class:`~datadistill.models.detector.ModelMeta`.

    A ``.pt`` written by ``datadistill train`` carries the meta (classes, keypoint names, flip map,
    sigmas, image size). For another Ultralytics ``.pt`` it is read from the model: class names,
    ``kpt_shape`` and ``kpt_names``, the flip map from the ``flip_idx`` of its training data YAML when that
    file is still there, else from left/right in the keypoint names; COCO category ids 1..C.
    """
    path = weights_path(spec)
    ul = import_ultralytics()
    try:
        with weights_only_loading(path, what="--model"):
            yolo = ul.YOLO(str(path))
    except UserError:
        raise
    except Exception as exc:  # unpickling errors, foreign files, version mismatches
        reason = " ".join(str(exc).split())[:160]
        raise UserError(f"--model {spec}: not a loadable Ultralytics model ({type(exc).__name__}: {reason})") from exc
    if yolo.task not in TASKS:
        raise UserError(f"--model {spec}: a YOLO {yolo.task} model; datadistill takes detect and pose models")
    ckpt = yolo.ckpt if isinstance(yolo.ckpt, dict) else {}
    stored = ckpt.get(CHECKPOINT_KEY)
    meta = ModelMeta.from_dict(stored["meta"]) if isinstance(stored, dict) else _meta_from_model(spec, yolo, ckpt)
    return YoloDetector(yolo, meta, device=torch.device(device), path=path)


def load(
    spec: str,
    *,
    device: torch.device | str = "cpu",
    min_score: float | None = None,
    max_det: int | None = None,
    compile: bool = False,
) -> YoloDetector:
    """:func:`load_yolo`, keeping the raw predictions down to ``min_score`` (a labeling run's floor) and at
    most ``max_det`` per image (Ultralytics' ``max_det``; None: read from the meta,
    :func:`~datadistill.models.detector.resolve_max_det`, at least :data:`DEFAULT_MAX_DET`). ``compile`` is
    not supported for this backend: a warning, and the model runs eagerly."""
    if compile:
        log.warning("%s: --compile is not supported for Ultralytics models; running it eagerly", spec)
    detector = load_yolo(spec, device=device)
    detector.max_det = resolve_max_det(detector.meta, default=DEFAULT_MAX_DET, override=max_det)
    if min_score is not None:
        detector.conf = min(detector.conf, min_score)  # candidates as low as the floor reach the fusion
    return detector


def model_file(spec: str) -> Path:
    """The local ``.pt`` of ``spec`` (:func:`weights_path`)."""
    return weights_path(spec)


def model_files(spec: str) -> ModelFiles:
    """What another machine needs to load ``spec``: its ``.pt``. (A foreign pose model's flip map is read from
    its training data YAML only where that file is still at its path, else from its keypoint names; the Ray
    engine hands every actor the driver's map.)"""
    return single_file(spec, weights_path(spec))


def _meta_from_model(spec: str, yolo: Any, ckpt: dict[str, Any]) -> ModelMeta:
    net = yolo.model
    names = net.names if isinstance(net.names, dict) else dict(enumerate(net.names))
    class_names = tuple(str(names[i]) for i in range(len(names)))
    train_args = ckpt.get("train_args") or {}
    imgsz = train_args.get("imgsz", MAX_DEFAULT_IMGSZ)
    imgsz = int(max(imgsz) if isinstance(imgsz, list | tuple) else imgsz)
    task = TASKS[yolo.task]
    kp_names: tuple[str, ...] = ()
    flip: tuple[int, ...] = ()
    if task == "keypoints":
        k = int(net.kpt_shape[0])
        stored_names = getattr(net, "kpt_names", None) or {}
        first = stored_names.get(0) if isinstance(stored_names, dict) else None
        kp_names = tuple(str(n) for n in first) if first and len(first) == k else tuple(f"kp{i}" for i in range(k))
        data_file = Path(str(train_args.get("data", "")))
        if data_file.suffix in (".yaml", ".yml") and data_file.is_file():
            flip_idx = (yaml.safe_load(data_file.read_text(encoding="utf-8")) or {}).get("flip_idx")
            if isinstance(flip_idx, list) and len(flip_idx) == k:
                flip = tuple(int(i) for i in flip_idx)
        if not flip:
            flip = derive_flip_index(kp_names)
            log.info("%s: flip map from the keypoint names (left/right): %s", spec, list(flip))
    return ModelMeta(
        model=spec,
        task=task,
        class_names=class_names,
        category_ids=tuple(range(1, len(class_names) + 1)),
        keypoint_names=kp_names,
        flip_index=flip,
        skeleton=(),
        sigmas=tuple(default_sigmas(kp_names)) if kp_names else (),
        min_size=imgsz,
        max_size=imgsz,
    )


# ----------------------------------------------------------------------------------------------------
# the training data: a YOLO data set with the real:pseudo ratio kept by repeating files


@dataclasses.dataclass(frozen=True)
class MixPlan:
    """How many real and pseudo entries one Ultralytics epoch lists, and how many epochs it runs."""

    real: int
    pseudo: int
    epochs: int

    @property
    def size(self) -> int:
        return self.real + self.pseudo


def mix_plan(num_real: int, num_pseudo: int, *, pseudo_ratio: float, epochs: int) -> MixPlan:
    """The training list of a YOLO student: ``pseudo_ratio`` of its entries pseudo-labeled (rounded).

    The run sees as many samples as the torchvision student of ``epochs`` passes over the real images at
    that ratio (``T = epochs * num_real / (1 - pseudo_ratio)``). One Ultralytics epoch lists every real and
    every pseudo image at least once where the budget allows (``N0 = max(R / (1 - p), P / p)`` entries),
    and ``round(T / N0)`` epochs (at least 1) share the budget; with no pseudo set (a teacher) it is the
    real images once, for ``epochs`` epochs.
    """
    if num_real < 1 or num_pseudo < 0:
        raise ValueError(f"need at least one real image and num_pseudo >= 0, got {num_real} and {num_pseudo}")
    if not 0 <= pseudo_ratio < 1:
        raise ValueError(f"pseudo_ratio must be in [0, 1), got {pseudo_ratio!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if num_pseudo == 0 or pseudo_ratio == 0:
        return MixPlan(real=num_real, pseudo=0, epochs=epochs)
    budget = epochs * num_real / (1 - pseudo_ratio)
    pass_size = max(num_real / (1 - pseudo_ratio), num_pseudo / pseudo_ratio)
    runs = max(1, round(budget / pass_size))
    size = math.ceil(budget / runs)
    pseudo = min(size - 1, max(1, round(size * pseudo_ratio)))
    return MixPlan(real=size - pseudo, pseudo=pseudo, epochs=runs)


def _cycled(items: Sequence[str], count: int, rng: random.Random) -> list[str]:
    """``count`` entries from ``items``: whole passes, then a seeded subset for the remainder."""
    whole, rest = divmod(count, len(items))
    return list(items) * whole + rng.sample(list(items), rest)


def write_training_set(
    out_dir: Path,
    *,
    real: CocoDataset,
    real_root: str | os.PathLike[str],
    pseudo: CocoDataset | None = None,
    pseudo_root: str | os.PathLike[str] | None = None,
    val: CocoDataset | None = None,
    val_root: str | os.PathLike[str] | None = None,
    pseudo_ratio: float = 0.4,
    epochs: int = 1,
    seed: int = 0,
) -> tuple[Path, MixPlan]:
    """A YOLO data set for Ultralytics' trainer in ``out_dir``; returns its ``data.yaml`` and the plan.

    Each COCO set becomes a YOLO folder (``real/``, ``pseudo/``, ``val/``: images symlinked, label txt
    files written by :func:`datadistill.data.yolo_txt.coco_to_yolo`); ``train.txt`` lists the training images as
    :func:`mix_plan` says (repeated entries are repeated samples), ``val.txt`` the validation images (the
    real ones when there is no validation set). ``data.yaml`` keeps the classes, ``kpt_shape``, ``flip_idx``.
    """
    from datadistill.data.yolo_txt import coco_to_yolo

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def image_list(dataset: CocoDataset, root: str | os.PathLike[str], name: str) -> tuple[list[str], Path]:
        yaml_path = coco_to_yolo(dataset, Path(root).resolve(), out_dir / name, link="symlink")  # absolute links
        return [str(out_dir / name / "images" / im.file_name) for im in dataset.images], yaml_path

    real_files, real_yaml = image_list(real, real_root, "real")
    plan = mix_plan(len(real_files), 0, pseudo_ratio=0.0, epochs=epochs)
    train_files = list(real_files)
    if pseudo is not None and pseudo.images:
        assert pseudo_root is not None
        pseudo_files, _ = image_list(pseudo, pseudo_root, "pseudo")
        plan = mix_plan(len(real_files), len(pseudo_files), pseudo_ratio=pseudo_ratio, epochs=epochs)
        train_files = _cycled(real_files, plan.real, rng) + _cycled(pseudo_files, plan.pseudo, rng)
    val_files = real_files
    if val is not None and val.images:
        assert val_root is not None
        val_files, _ = image_list(val, val_root, "val")
    (out_dir / "train.txt").write_text("".join(f + "\n" for f in train_files), encoding="utf-8")
    (out_dir / "val.txt").write_text("".join(f + "\n" for f in val_files), encoding="utf-8")
    data = yaml.safe_load(real_yaml.read_text(encoding="utf-8"))
    data.update(path=str(out_dir), train=str(out_dir / "train.txt"), val=str(out_dir / "val.txt"))
    data_yaml = out_dir / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return data_yaml, plan


def default_imgsz(dataset: CocoDataset, stride: int = 32) -> int:
    """The longest image side of the data, rounded up to the stride, at most :data:`MAX_DEFAULT_IMGSZ`."""
    longest = max((max(im.width, im.height) for im in dataset.images), default=MAX_DEFAULT_IMGSZ)
    return min(MAX_DEFAULT_IMGSZ, stride * math.ceil(longest / stride))


# ----------------------------------------------------------------------------------------------------
# the train stage


def fit(cfg: TrainConfig) -> ExternalRun | None:
    """``datadistill train --model yolo:...``: Ultralytics' trainer on a YOLO data set written from COCO; the
    train stage (:func:`datadistill.stages.train.train_external`) calls it and evaluates the trained model.

    Writes into ``cfg.out``: ``yolo_data/`` (the data set, :func:`write_training_set`), ``ultralytics/``
    (Ultralytics' run folder: ``weights/last.pt``, ``args.yaml``, ``results.csv``), ``yolo.pt`` (the final
    weights with datadistill's model meta inside: pass ``--model yolo:OUT/yolo.pt`` to ``label`` and
    ``evaluate``), ``config.yaml`` and ``provenance.json``; returns what the stage needs to write
    ``metrics.jsonl`` and ``timings.json`` (None: a resumed run that had finished).

    What applies: epochs (passes over the real images, see :func:`mix_plan`), batch size, ``min_size``
    as ``imgsz`` (default :func:`default_imgsz`), ``lr`` as ``lr0`` (with ``optimizer``; unset, Ultralytics
    picks both), ``flip_prob`` as ``fliplr``, ``init`` (a local .pt whose matching weights load), pseudo
    labels and ratio, val, seed, device, threads, workers, resume. The rest of the recipe (schedule,
    warmup, mosaic and colour augmentation, weight decay) is Ultralytics'.
    """
    from datadistill.runtime import distributed
    from datadistill.runtime.devices import resolve_device

    assert cfg.model is not None
    if distributed.launch_from_env().world_size > 1:
        raise UserError("--model yolo:...: YOLO models train in one process here: start without torchrun")
    out = Path(cfg.out).expanduser().resolve()
    if _check_output_folder(cfg, out):
        return None
    if Path(_source(cfg.model)).suffix.lower() not in (".yaml", ".yml"):
        weights_path(cfg.model)  # a local .pt, checked before Ultralytics would try to download it
    device = resolve_device(cfg.device)
    inputs = _load_inputs(cfg)
    ul = import_ultralytics()
    data_yaml, config = _prepare_run(cfg, out, inputs, ul.__version__, device)
    t0 = time.perf_counter()
    _run_trainer(ul, cfg, out, inputs, data_yaml, config, device)
    train_s = time.perf_counter() - t0
    last, final = out / "ultralytics" / "weights" / "last.pt", out / CHECKPOINT_NAME
    if not last.is_file():
        raise UserError(f"Ultralytics wrote no {last}; see its log above")
    _write_checkpoint(last, final, inputs.meta, config)
    record = {"type": "epoch", "epoch": config["epochs"], "ultralytics_epochs": config["ultralytics_epochs"],
              "time_s": train_s}  # fmt: skip
    return ExternalRun(model=f"{PREFIX}{final}", val=inputs.val, val_images=inputs.val_images if inputs.val else None,
                       record=record, train_s=train_s)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """The data of a YOLO training run, loaded and checked, and the model meta it will carry."""

    dataset: CocoDataset
    pseudo: CocoDataset | None
    val: CocoDataset | None
    val_images: str
    imgsz: int
    meta: ModelMeta


def _check_output_folder(cfg: TrainConfig, out: Path) -> bool:
    """True when a resumed run is already finished; a one-line UserError for a folder that holds
    another run (without ``--resume``) or none (with it)."""
    final, last = out / CHECKPOINT_NAME, out / "ultralytics" / "weights" / "last.pt"
    if cfg.resume and not last.is_file():
        raise UserError(f"--resume: {last} not found, so there is no run to continue; start without --resume")
    if cfg.resume and final.is_file():
        log.info("the run in %s is already finished", out)
        return True
    if not cfg.resume and (final.exists() or last.exists()):
        raise UserError(f"{out} already holds a training run ({final.name if final.exists() else last}); "
                        "use --resume to continue it, or another --out")  # fmt: skip
    return False


def _load_inputs(cfg: TrainConfig) -> _Inputs:
    from datadistill.data.inputs import load_training_sets
    from datadistill.data.object_store import is_uri

    for option, root in (("--images", cfg.images), ("--pseudo-images", cfg.pseudo_images),
                         ("--val-images", cfg.val_images)):  # fmt: skip
        if is_uri(root):
            raise UserError(f"{option} {root}: Ultralytics' trainer reads local image files only; copy the images "
                            "to a folder (aws s3 sync, gsutil rsync) or train a torchvision model")  # fmt: skip
    sets = load_training_sets(data=cfg.data, images=cfg.images, pseudo=cfg.pseudo, pseudo_images=cfg.pseudo_images,
                              val=cfg.val, val_images=cfg.val_images)  # fmt: skip
    # Ultralytics' trainer reads a YOLO folder, written from the whole COCO form (per-image objects)
    dataset, pseudo, val = sets.dataset, sets.pseudo.to_coco() if sets.pseudo is not None else None, sets.val
    val_images = cfg.val_images or cfg.images
    imgsz = int(cfg.min_size) if cfg.min_size is not None else default_imgsz(dataset)
    if cfg.max_size is not None and cfg.max_size != imgsz:
        log.info("YOLO letterboxes to one size: --max-size %s ignored, imgsz %d", cfg.max_size, imgsz)
    assert cfg.model is not None
    meta = ModelMeta.for_dataset(cfg.model, dataset, min_size=imgsz, max_size=imgsz)
    meta = dataclasses.replace(meta, max_det=cfg.max_det or 0)  # train --max-det: the cap the model carries
    return _Inputs(dataset=dataset, pseudo=pseudo, val=val, val_images=val_images, imgsz=imgsz, meta=meta)


def passes_over_real(cfg: TrainConfig, num_real: int, *, with_pseudo: bool) -> int:
    """``cfg``'s length as passes over the real images (what :func:`mix_plan` takes): ``epochs`` as given,
    else the iterations of the schedule datadistill's own loop would run (:mod:`datadistill.core.schedule`)
    at ``batch_size`` images per iteration, ``pseudo_ratio`` of them pseudo-labeled for a student."""
    from datadistill.core.schedule import resolve_schedule

    if cfg.epochs is not None:
        return cfg.epochs
    pseudo_per_batch = round(cfg.batch_size * cfg.pseudo_ratio) if with_pseudo else 0
    real_per_batch = max(1, cfg.batch_size - pseudo_per_batch)
    per_pass = max(1, num_real // real_per_batch)
    schedule = resolve_schedule(epochs=None, iterations=cfg.iterations, lr_steps=None, warmup_iters=0,
                                iterations_per_epoch=per_pass)  # fmt: skip
    return max(1, round(schedule.iterations / per_pass))


def _prepare_run(
    cfg: TrainConfig, out: Path, inputs: _Inputs, version: str, device: torch.device
) -> tuple[Path, dict[str, Any]]:
    """Seed, write the YOLO data set, ``config.yaml`` and ``provenance.json``; returns the data set's
    ``data.yaml`` and the resolved config."""
    from datadistill.runtime.devices import seed_everything
    from datadistill.runtime.io import provenance, to_plain, write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    passes = passes_over_real(cfg, len(inputs.dataset.images), with_pseudo=inputs.pseudo is not None)
    data_yaml, plan = write_training_set(
        out / "yolo_data", real=inputs.dataset, real_root=cfg.images, pseudo=inputs.pseudo,
        pseudo_root=cfg.pseudo_images, val=inputs.val, val_root=inputs.val_images, pseudo_ratio=cfg.pseudo_ratio,
        epochs=passes, seed=cfg.seed,
    )  # fmt: skip
    resolved = dataclasses.replace(cfg, out=str(out), min_size=inputs.imgsz, max_size=inputs.imgsz, epochs=passes,
                                   iterations=None)  # fmt: skip
    config = {**to_plain(dataclasses.asdict(resolved)), "ultralytics_epochs": plan.epochs,
              "train_list": {"real": plan.real, "pseudo": plan.pseudo}}  # fmt: skip
    write_text_atomic(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    write_json_atomic(out / "provenance.json", {**provenance(), "ultralytics": version}, indent=2)
    pseudo = inputs.pseudo
    log.info(
        "training %s on %s at imgsz %d: %d real%s images; each Ultralytics epoch lists %d real and %d pseudo "
        "entries, %d epochs", cfg.model, device, inputs.imgsz, len(inputs.dataset.images),
        f" + {len(pseudo.images)} pseudo-labeled" if pseudo is not None else "", plan.real, plan.pseudo, plan.epochs,
    )  # fmt: skip
    return data_yaml, config


def _trainer_args(
    cfg: TrainConfig, out: Path, data_yaml: Path, config: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    """Ultralytics' ``train`` arguments for a new run."""
    args: dict[str, Any] = dict(
        data=str(data_yaml), epochs=config["ultralytics_epochs"], imgsz=config["min_size"], batch=cfg.batch_size,
        workers=cfg.workers, device=_ultralytics_device(device), seed=cfg.seed, deterministic=True, plots=False,
        val=False, amp=device.type == "cuda", project=str(out), name="ultralytics", exist_ok=True,
        fliplr=cfg.flip_prob, verbose=False,
    )  # fmt: skip
    if cfg.lr is not None:
        args.update(lr0=cfg.lr, optimizer="AdamW" if cfg.optimizer == "adamw" else "SGD", momentum=cfg.momentum)
    return args


def _run_trainer(
    ul: Any, cfg: TrainConfig, out: Path, inputs: _Inputs, data_yaml: Path, config: dict[str, Any],
    device: torch.device,
) -> None:  # fmt: skip
    """Ultralytics' trainer, new or resumed, with the process-wide torch state it changes (thread count,
    deterministic algorithms) restored after."""
    threads = cfg.threads or torch.get_num_threads()
    saved_state = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                   torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.deterministic,
                   torch.utils.deterministic.fill_uninitialized_memory)  # fmt: skip

    def set_threads(_: Any) -> None:  # Ultralytics' device setup resets torch's thread count
        torch.set_num_threads(threads)

    try:
        if cfg.resume:
            yolo = ul.YOLO(str(out / "ultralytics" / "weights" / "last.pt"))
            yolo.add_callback("on_pretrain_routine_start", set_threads)
            yolo.train(resume=True)
            return
        yolo = _new_model(ul, cfg, inputs.dataset.task)
        yolo.add_callback("on_pretrain_routine_start", set_threads)
        yolo.train(**_trainer_args(cfg, out, data_yaml, config, device))
    finally:
        torch.set_num_threads(saved_state[0])
        torch.use_deterministic_algorithms(saved_state[1], warn_only=saved_state[2])
        torch.backends.cudnn.deterministic = saved_state[3]
        torch.utils.deterministic.fill_uninitialized_memory = saved_state[4]  # type: ignore[attr-defined]


def _new_model(ul: Any, cfg: TrainConfig, task: str) -> Any:
    """The YOLO model to train: from its YAML or .pt, of the data's task, with ``--init`` weights loaded."""
    assert cfg.model is not None
    source = _source(cfg.model)
    try:
        if Path(source).suffix.lower() == ".pt":
            with weights_only_loading(Path(source).expanduser(), what="--model"):
                yolo = ul.YOLO(source)
        else:
            yolo = ul.YOLO(source)
    except FileNotFoundError as exc:
        raise UserError(f"--model {cfg.model}: {' '.join(str(exc).split())[:200]}") from exc
    if yolo.task not in TASKS:
        raise UserError(f"--model {cfg.model}: a YOLO {yolo.task} model; datadistill trains detect and pose")
    if (yolo.task == "pose") != (task == "keypoints"):
        raise UserError(f"--model {cfg.model} is a YOLO {yolo.task} model but the data set has {task}")
    if cfg.init is not None:
        init = Path(cfg.init).expanduser()
        if init.suffix.lower() != ".pt" or not init.is_file():
            raise UserError(f"--init {cfg.init}: YOLO models take a local Ultralytics .pt")
        with weights_only_loading(init, what="--init"):
            yolo.load(str(init))
    return yolo


def _write_checkpoint(last: Path, final: Path, meta: ModelMeta, config: dict[str, Any]) -> None:
    """``final``: Ultralytics' ``last`` with datadistill's meta under :data:`CHECKPOINT_KEY` (atomic)."""
    from datadistill.runtime.io import write_atomic

    # Just written by Ultralytics' trainer, read back weights-only all the same (the run folder may be shared).
    with weights_only_loading(last, what="train: reading back"):
        ckpt = dict(import_ultralytics().YOLO(str(last)).ckpt)
    ckpt[CHECKPOINT_KEY] = {"meta": meta.to_dict(), "config": config}
    write_atomic(final, lambda f: torch.save(ckpt, f))


# What the train stage takes from this backend: Ultralytics' own trainer, called as an external trainer.
TRAINER = ExternalTrainer(fit=fit, final_name=CHECKPOINT_NAME)
