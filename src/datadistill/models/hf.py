"""Hugging Face ``transformers`` detectors as datadistill models: ``--model hf:PATH_OR_ID``.

An optional backend (``pip install 'datadistill[hf]'``). ``PATH`` is a folder written by ``save_pretrained``
(``config.json``, the image processor's config, ``*.safetensors`` weights); ``ID`` a hub name, fetched by
transformers' own cache (a user with internet; the tests never download). Weights load from safetensors
only (``use_safetensors=True``: a folder with only pickled ``.bin`` weights is refused), and never with
``trust_remote_code``.

- **Closed-set models** (whatever ``AutoModelForObjectDetection`` loads: DETR, Deformable/Conditional
  DETR, RT-DETR(v2), D-FINE, YOLOS...) train in datadistill's own loop (:mod:`datadistill.stages.train`)
  with their own loss (Hungarian matching: the ``loss`` transformers returns when labels are passed),
  and label and evaluate through :class:`HfDetector`. Classes map to the data set's categories by name
  through ``id2label``; a head trained for other classes is re-initialised for ours (logged).
- **Open-vocabulary models** (``AutoModelForZeroShotObjectDetection``: OWL-ViT, OWLv2) label only: each
  category gets one or more text prompts (default: its name), and the box of each prompt counts for
  its category.
- A finished training run writes ``OUT/hf_model/``: a ``save_pretrained`` folder (usable by transformers
  as is) plus ``datadistill.json`` (our :class:`~datadistill.models.detector.ModelMeta`); its
  ``last.pt`` is a datadistill checkpoint (tensors and plain types, read with ``weights_only=True``).

A spec may carry two options after ``?``: ``hf:SOURCE?classes=COCO.json&prompts=PROMPTS.yaml``. ``classes``
names the data set whose categories (ids, names, order) the model labels; ``prompts`` maps category
names to phrases (a YAML/JSON mapping ``name: phrase`` or ``name: [phrase, ...]``). Build them with
:func:`with_options`. Coordinates are absolute pixel xyxy in the original image frame.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import torch
import yaml
from torch import Tensor, nn

from datadistill.core.types import Detections
from datadistill.core.views import resized_size
from datadistill.data.coco import CocoDataset
from datadistill.errors import UserError
from datadistill.models.checkpoints import read_checkpoint, unwrap
from datadistill.models.detector import LoopBackend, ModelFiles, ModelMeta, folder_files, resolve_max_det

log = logging.getLogger(__name__)

PREFIX = "hf:"
EXTRA_HINT = "install the extra: pip install 'datadistill[hf]'"
TRAINED_DIR = "hf_model"  # what a finished training run writes into its output folder
META_FILE = "datadistill.json"  # our model meta, inside such a folder
DEFAULT_THRESHOLD = 0.01  # raw score floor of the post-processing (fusion and the labeling floor come after)
MAX_DETECTIONS = 100  # per image and view, the highest scores, of a model with no fixed number of queries (OWL)
DEFAULT_LR = 1e-4  # AdamW, the rate the DETR-family recipes fine-tune with
OPTIONS = ("classes", "prompts")
ZERO_SHOT_TYPES = ("owlvit", "owlv2")  # open-vocabulary models whose text queries and outputs we read
FIXED_MULTIPLE = 32  # a fixed-size model (RT-DETR, D-FINE, OWL) runs a scale view at a multiple of this
MODEL_HELP = (
    "a transformers detector: a save_pretrained folder (safetensors) or a hub id; closed-set models "
    "(DETR, RT-DETR, D-FINE, YOLOS, ...) train and label, open-vocabulary ones (OWL-ViT, OWLv2) label only "
    "(label --prompts FILE); pip install 'datadistill[hf]'"
)


def list_models() -> list[tuple[str, str, str]]:
    """The one row of ``datadistill models`` for transformers."""
    return [(f"{PREFIX}PATH_OR_ID", "boxes", MODEL_HELP)]


# ----------------------------------------------------------------------------------------------------
# specs


@dataclass(frozen=True)
class HfSpec:
    """A parsed ``hf:`` spec: the model's folder or hub id, and the optional data set and prompt files."""

    source: str
    classes: str | None = None
    prompts: str | None = None


def parse_spec(spec: str) -> HfSpec:
    """``hf:SOURCE[?classes=FILE][&prompts=FILE]`` -> :class:`HfSpec`; a one-line UserError otherwise."""
    body = spec.removeprefix(PREFIX).strip()
    source, _, query = body.partition("?")
    if not source:
        raise UserError(f"--model {spec!r}: give a save_pretrained folder or a hub id after 'hf:'")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False)) if query else {}
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UserError(f"--model {spec!r}: unknown option {unknown[0]!r} (options: {', '.join(OPTIONS)})")
    return HfSpec(source=source, classes=options.get("classes") or None, prompts=options.get("prompts") or None)


def with_options(spec: str, *, classes: str | None = None, prompts: str | None = None) -> str:
    """``spec`` (an ``hf:`` spec) with ``classes`` and ``prompts`` files set (absolute paths)."""
    if not spec.startswith(PREFIX):
        raise UserError(f"--prompts and --classes apply to hf: models only, not {spec!r}")
    parsed = parse_spec(spec)
    classes = str(Path(classes).expanduser().resolve()) if classes else parsed.classes
    prompts = str(Path(prompts).expanduser().resolve()) if prompts else parsed.prompts
    query = "&".join(f"{k}={quote(v, safe='/:._-')}" for k, v in (("classes", classes), ("prompts", prompts)) if v)
    return f"{PREFIX}{parsed.source}" + (f"?{query}" if query else "")


def option_files(spec: str) -> tuple[Path, ...]:
    """The files of ``spec``'s options (``classes``, ``prompts``) that change what the model labels: a labeling
    run's signature hashes them beside the weights."""
    parsed = parse_spec(spec)
    return tuple(Path(f) for f in (parsed.classes, parsed.prompts) if f)


def label_only(spec: str) -> bool:
    """Whether ``spec`` is an open-vocabulary model (it labels as it is; it cannot be trained here)."""
    return is_zero_shot(load_config(check_source(parse_spec(spec).source)))


def import_transformers() -> Any:
    """The ``transformers`` module; a one-line UserError when the extra is not installed."""
    try:
        import transformers
    except ImportError as exc:
        raise UserError(f"hf: models need transformers ({exc.name or exc}): {EXTRA_HINT}") from None
    return transformers


def check_source(source: str) -> str:
    """A local ``save_pretrained`` folder, checked (config and safetensors weights present), or a hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: no config.json: not a folder written by save_pretrained")
        if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
            if any(path.glob("*.bin")):
                raise UserError(f"{path}: refused: its weights are pickled .bin files, which can run code when "
                                "loaded; save them as safetensors (save_pretrained does by default)")  # fmt: skip
            raise UserError(f"{path}: no model.safetensors in this folder")
        for weights in sorted(path.glob("*.safetensors")):
            check_safetensors(weights)
        return str(path)
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise UserError(f"{source}: not a folder written by save_pretrained (nor a hub id like owner/name)")
    return source


def check_safetensors(path: Path) -> None:
    """A one-line UserError naming ``path`` when safetensors cannot read its header (an empty file, random
    bytes, a link to a text file); only the header is read."""
    try:
        from safetensors import safe_open
    except ImportError:
        return  # transformers' own import says what is missing
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:  # safetensors' SafetensorError, and the OSError of an unreadable file
        link = f" (a link to {path.resolve()})" if path.is_symlink() else ""
        reason = " ".join(str(exc).split())[:120]
        raise UserError(f"{path}{link}: not a readable safetensors file ({type(exc).__name__}: {reason})") from exc


def _pretrained_call(what: str, source: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` (a transformers ``from_pretrained``) with its failures as one-line UserErrors."""
    try:
        return fn(*args, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:240]
        raise UserError(f"hf:{source}: cannot load its {what} ({type(exc).__name__}: {reason})") from exc


def load_config(source: str) -> Any:
    transformers = import_transformers()
    return _pretrained_call("config", source, transformers.AutoConfig.from_pretrained, source)


def is_zero_shot(config: Any) -> bool:
    """Whether ``config`` is an open-vocabulary detector's (``AutoModelForZeroShotObjectDetection``)."""
    import_transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES as ZS

    return getattr(config, "model_type", None) in ZS


def model_names(config: Any) -> tuple[str, ...]:
    """The class names of a closed-set config, in label-index order (``id2label``)."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return tuple(id2label[i] for i in sorted(id2label))


# ----------------------------------------------------------------------------------------------------
# classes and prompts


def read_prompts(path: str) -> dict[str, tuple[str, ...]]:
    """A prompts file: a YAML/JSON mapping ``category name -> phrase or list of phrases``."""
    file = Path(path).expanduser()
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{file}: prompts file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{file}: not a readable YAML/JSON prompts file ({type(exc).__name__})") from exc
    return check_prompts(raw, where=str(file))


def check_prompts(raw: Any, *, where: str) -> dict[str, tuple[str, ...]]:
    """``raw`` (a mapping from category names to a phrase or a list of phrases) as name -> phrases."""
    if not isinstance(raw, Mapping) or not raw:
        raise UserError(f"{where}: prompts must be a mapping of category name -> phrase(s), got {type(raw).__name__}")
    prompts: dict[str, tuple[str, ...]] = {}
    for name, value in raw.items():
        phrases = (value,) if isinstance(value, str) else value
        if not isinstance(phrases, list | tuple) or not phrases or not all(isinstance(p, str) and p for p in phrases):
            raise UserError(f"{where}: prompts[{name!r}] must be a non-empty phrase or list of phrases")
        prompts[str(name)] = tuple(phrases)
    return prompts


def categories_of(hf: HfSpec, *, fallback: tuple[str, ...] | None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``(class names, category ids)`` the model labels: the ``classes`` data set's, else the prompts
    file's keys (ids 1..C), else ``fallback`` (the model's own names, ids 1..C)."""
    if hf.classes is not None:
        from datadistill.data.coco import load_coco

        dataset = load_coco(hf.classes)
        if not dataset.categories:
            raise UserError(f"{hf.classes}: no categories to label")
        if dataset.task != "boxes":
            raise UserError(f"{hf.classes}: a keypoint data set; hf: models detect boxes only")
        return dataset.class_names, tuple(c.id for c in dataset.categories)
    if hf.prompts is not None:
        names = tuple(read_prompts(hf.prompts))
        return names, tuple(range(1, len(names) + 1))
    if fallback is None:
        raise UserError(f"hf:{hf.source}: an open-vocabulary model needs the classes to look for: "
                        "--prompts FILE (category -> phrases) or --classes COCO.json")  # fmt: skip
    return fallback, tuple(range(1, len(fallback) + 1))


def queries_for(hf: HfSpec, names: tuple[str, ...]) -> tuple[tuple[str, ...], Tensor]:
    """The text queries of an open-vocabulary model, and the class index of each: every category's
    phrases from the prompts file, its name when the file has none for it."""
    prompts = read_prompts(hf.prompts) if hf.prompts is not None else {}
    unknown = [n for n in prompts if n not in names]
    if unknown:
        raise UserError(f"{hf.prompts}: prompts for {unknown[0]!r}, which is not a category ({', '.join(names[:8])})")
    phrases: list[str] = []
    classes: list[int] = []
    for i, name in enumerate(names):
        for phrase in prompts.get(name, (name,)):
            phrases.append(phrase)
            classes.append(i)
    return tuple(phrases), torch.tensor(classes, dtype=torch.int64)


def class_map(model_classes: tuple[str, ...], names: tuple[str, ...], *, spec: str) -> Tensor:
    """For each of the model's classes, the index of the category of the same name (-1: none)."""
    index = {n: i for i, n in enumerate(names)}
    mapping = torch.tensor([index.get(n, -1) for n in model_classes], dtype=torch.int64)
    found = set(mapping.tolist()) - {-1}
    if not found:
        raise UserError(f"{spec}: none of the model's classes ({', '.join(model_classes[:6])}...) is a category "
                        f"of the data ({', '.join(names[:6])})")  # fmt: skip
    missing = [n for i, n in enumerate(names) if i not in found]
    if missing:
        log.warning("%s has no class for %d categories (%s): they get no labels", spec, len(missing),
                    ", ".join(missing[:6]))  # fmt: skip
    return mapping


# ----------------------------------------------------------------------------------------------------
# input sizes


def size_range(processor: Any) -> tuple[int, int, bool]:
    """``(min_size, max_size, fixed)`` of an image processor: shortest/longest edge, or a fixed
    ``height x width`` (fixed: the image is stretched to it, whatever its aspect ratio)."""
    size = dict(getattr(processor, "size", None) or {})
    if size.get("shortest_edge"):
        short = int(size["shortest_edge"])
        return short, int(size.get("longest_edge") or max(short, 1333)), False
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["height"]), True
    if size.get("longest_edge"):
        return int(size["longest_edge"]), int(size["longest_edge"]), True
    raise UserError(f"cannot read the input size of {type(processor).__name__} (size={size})")


def size_dict(min_size: int, max_size: int, *, fixed: bool) -> dict[str, int]:
    """The processor ``size`` for a model running at ``min_size``-``max_size`` px; a fixed size rounded to a
    multiple of :data:`FIXED_MULTIPLE` (RT-DETR's and D-FINE's feature pyramids need one)."""
    if fixed:
        side = max(FIXED_MULTIPLE, FIXED_MULTIPLE * round(int(min_size) / FIXED_MULTIPLE))
        return {"height": side, "width": side}
    return {"shortest_edge": int(min_size), "longest_edge": int(max_size)}


# ----------------------------------------------------------------------------------------------------
# the model: a module that gives losses (training) and detections


class HfModule(nn.Module):
    """A transformers detector with its processor, as datadistill's loop and :class:`HfDetector` use it.

    ``forward(images, targets)`` returns the model's own training loss (Hungarian matching) as
    ``{"loss_hf": scalar}`` (what the training loop sums; under DDP the forward pass must be this
    module's), at the model's input size (multi-scale training was tried: docs/results.md). ``detect(images,
    threshold=...)`` gives detections in each image's frame. ``class_of`` maps the model's label index (or
    text-query index) to our class index (-1: not ours).
    ``queries``: the text queries of an open-vocabulary model (empty for closed-set ones).
    """

    def __init__(self, model: nn.Module, processor: Any, *, class_of: Tensor, queries: tuple[str, ...] = (),
                 min_size: int, max_size: int, fixed: bool) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.processor = processor
        self.image_processor = getattr(processor, "image_processor", processor)
        self.register_buffer("class_of", class_of, persistent=False)
        self.queries = queries
        self.fixed = fixed
        self.size = size_dict(min_size, max_size, fixed=fixed)
        # OWLv2 pads every image to a square before resizing: its boxes are fractions of that square
        self.square_pad = type(self.image_processor).__name__.startswith("Owlv2")

    def encode(self, images: Sequence[Tensor]) -> dict[str, Tensor]:
        """The model's inputs for float ``[3, H, W]`` images in [0, 1] at the current size."""
        device = self.class_of.device
        kwargs: dict[str, Any] = {"images": [im.detach().float() for im in images], "return_tensors": "pt",
                                  "do_rescale": False, "size": dict(self.size)}  # fmt: skip
        if self.queries:
            config = self.model.config
            kwargs.update(text=[list(self.queries)] * len(images), padding="max_length", truncation=True,
                          max_length=int(config.text_config.max_position_embeddings))  # fmt: skip
            inputs = self.processor(**kwargs)
        else:
            inputs = self.image_processor(**kwargs)
        inputs = {k: v.to(device) for k, v in inputs.items() if isinstance(v, Tensor)}
        if self.queries and self.size.get("height") != getattr(self.model.config.vision_config, "image_size", None):
            inputs["interpolate_pos_encoding"] = True  # type: ignore[assignment]
        return inputs

    def forward(self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        if self.queries:
            raise UserError("open-vocabulary models label only: train a closed-set model (DETR, RT-DETR, ...)")
        device = self.class_of.device
        labels = []
        for image, t in zip(images, targets, strict=True):
            h, w = image.shape[-2:]
            boxes = t["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=device)
            xyxy = (boxes / scale).clamp(0, 1)
            cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1)
            labels.append({"class_labels": t["labels"].to(device=device, dtype=torch.int64).reshape(-1),
                           "boxes": cxcywh})  # fmt: skip
        out = self.model(**self.encode(images), labels=labels)
        return {"loss_hf": out.loss}

    @property
    def num_queries(self) -> int | None:
        """The model's fixed number of object queries (DETR 100, RT-DETR 300): the most objects it can
        give per image; None for a model without (OWL's one box per image patch)."""
        queries = getattr(self.model.config, "num_queries", None)
        return int(queries) if isinstance(queries, int) else None

    @torch.no_grad()
    def detect(self, images: Sequence[Tensor], *, threshold: float, max_det: int = MAX_DETECTIONS) -> list[Detections]:
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        out = self.model(**self.encode(images))
        frames = [(max(s), max(s)) for s in sizes] if self.square_pad else sizes
        results = self.image_processor.post_process_object_detection(out, threshold=threshold, target_sizes=frames)
        detections = []
        for (h, w), r in zip(sizes, results, strict=True):
            labels = self.class_of[r["labels"].to(self.class_of.device)]
            boxes = r["boxes"].float().reshape(-1, 4)
            boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                                 boxes[:, 3].clamp(0, h)], dim=1)  # fmt: skip
            keep = torch.nonzero(labels >= 0).flatten()
            keep = keep[r["scores"].float()[keep].argsort(descending=True)[:max_det]]
            det = Detections(boxes=boxes[keep], scores=r["scores"].float()[keep], labels=labels[keep])
            detections.append(det.to(images[0].device))
        return detections


def hf_module(model: nn.Module) -> HfModule:
    """The :class:`HfModule` of ``model`` (itself, or inside its DDP wrapper)."""
    inner = unwrap(model)
    assert isinstance(inner, HfModule)
    return inner


class HfDetector:
    """An :class:`HfModule` behind :class:`datadistill.models.detector.Detector`: ``predict`` runs the
    processor (resize, normalise) at the current size, the model and its post-processing with
    ``target_sizes`` (boxes back in each image's frame); ``input_size`` changes the processor's size (how
    a scale view runs). Boxes only: no keypoints, no heatmaps. ``max_det``: the highest-scoring detections
    kept per image (:func:`~datadistill.models.detector.resolve_max_det`, at least the model's queries); a model
    whose queries are fewer than that is a one-line warning: it cannot give more, and its queries cannot be
    raised without training it again."""

    has_heatmaps = False

    def __init__(self, module: nn.Module, meta: ModelMeta, *, spec: str = "", threshold: float = DEFAULT_THRESHOLD,
                 max_det: int | None = None) -> None:  # fmt: skip
        self.module, self.meta, self.spec, self.threshold = module, meta, spec or meta.model, threshold
        queries = hf_module(module).num_queries
        self.max_det = resolve_max_det(meta, default=queries or MAX_DETECTIONS, override=max_det)
        if queries is not None and queries < self.max_det:
            log.warning("%s has %d object queries: it finds at most %d objects per image, fewer than the %d the "
                        "data needs; its queries cannot be raised without retraining (a model with more, e.g. "
                        "RT-DETR's 300, or tile views help)", self.spec, queries, queries, self.max_det)  # fmt: skip

    def predict(self, images: Sequence[Tensor]) -> list[Detections]:
        if len(images) == 0:
            return []
        module = hf_module(self.module)
        module.eval()
        return module.detect(images, threshold=self.threshold, max_det=self.max_det)

    @contextlib.contextmanager
    def input_size(self, min_size: int, max_size: int) -> Iterator[None]:
        module = hf_module(self.module)
        saved = module.size
        module.size = size_dict(min_size, max_size, fixed=module.fixed)
        try:
            yield
        finally:
            module.size = saved

    def heatmaps(self, images: Sequence[Tensor], boxes: Sequence[Tensor]) -> list[Tensor] | None:
        return None

    def keypoints_from_heatmaps(self, heatmaps: Tensor, boxes: Tensor, *, image_size: tuple[int, int]) -> Tensor:
        raise ValueError(f"{self.spec} gives no keypoint heatmaps")

    def unfit_reason(self, height: int, width: int, *, min_size: int, max_size: int) -> str | None:
        """A fixed-size model stretches any image to its square; a shortest-edge one cannot take an image
        whose resize would leave a side of 0 px."""
        if hf_module(self.module).fixed:
            return None
        h, w = resized_size(height, width, min_size=min_size, max_size=max_size)
        return None if h >= 1 and w >= 1 else f"would resize it to {w}x{h} px"


# ----------------------------------------------------------------------------------------------------
# loading


def _auto_classes(zero_shot: bool) -> tuple[Any, Any]:
    transformers = import_transformers()
    if zero_shot:
        return transformers.AutoModelForZeroShotObjectDetection, transformers.AutoProcessor
    return transformers.AutoModelForObjectDetection, transformers.AutoImageProcessor


def read_meta(folder: Path) -> dict[str, Any] | None:
    """The ``datadistill.json`` of a folder written by datadistill's training (its ``meta`` checked: a one-line
    UserError naming the file and the field), or None."""
    path = folder / META_FILE
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable datadistill.json ({type(exc).__name__})") from exc
    if not isinstance(content, dict) or not isinstance(content.get("meta"), dict):
        raise UserError(f"{path}: malformed: field 'meta' must be an object")
    try:
        ModelMeta.from_dict(content["meta"])
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from exc
    return content


def load_module(spec: str, *, device: Any = "cpu") -> tuple[HfModule, ModelMeta]:
    """The :class:`HfModule` of a spec (eval mode, on ``device``) and its meta (classes from the
    ``classes`` data set, the prompts file, our ``datadistill.json``, or the model's ``id2label``)."""
    hf = parse_spec(spec)
    source = check_source(hf.source)
    stored = read_meta(Path(source)) if Path(source).is_dir() else None
    config = load_config(source)
    zero_shot = is_zero_shot(config)
    auto_model, auto_processor = _auto_classes(zero_shot)
    if zero_shot:
        if config.model_type not in ZERO_SHOT_TYPES:
            raise UserError(f"{spec}: open-vocabulary {config.model_type} models are not supported yet (these are: "
                            f"{', '.join(ZERO_SHOT_TYPES)})")  # fmt: skip
        names, ids = categories_of(hf, fallback=None)
        queries, class_of = queries_for(hf, names)
    elif stored is not None and hf.classes is None:
        meta = ModelMeta.from_dict(stored["meta"])
        names, ids, queries = meta.class_names, meta.category_ids, ()
        class_of = class_map(model_names(config), names, spec=spec)
    else:
        if hf.prompts is not None:
            raise UserError(f"{spec}: a closed-set model takes no prompts (its classes are {model_names(config)[:6]})")
        names, ids = categories_of(hf, fallback=model_names(config))
        queries, class_of = (), class_map(model_names(config), names, spec=spec)
    model = _pretrained_call("weights", source, auto_model.from_pretrained, source, use_safetensors=True)
    processor = _pretrained_call("processor", source, auto_processor.from_pretrained, source)
    image_processor = getattr(processor, "image_processor", processor)
    min_size, max_size, fixed = size_range(image_processor)
    if stored is not None and not zero_shot:
        min_size, max_size = int(stored["meta"]["min_size"]), int(stored["meta"]["max_size"])
    module = HfModule(model, processor, class_of=class_of, queries=queries, min_size=min_size, max_size=max_size,
                      fixed=fixed)  # fmt: skip
    counts = {k: stored["meta"][k] for k in ("objects_p99", "max_det") if k in stored["meta"]} if stored else {}
    meta = ModelMeta(model=spec, task="boxes", class_names=names, category_ids=ids, min_size=min_size,
                     max_size=max_size, **counts)  # fmt: skip
    module.to(device).eval()
    return module, meta


def load(
    spec: str,
    *,
    device: Any = "cpu",
    min_score: float | None = None,
    max_det: int | None = None,
    compile: bool = False,
) -> HfDetector:
    """The detector of ``hf:PATH_OR_ID``, keeping raw detections down to ``min_score`` (a labeling floor), at
    most ``max_det`` per image (:class:`HfDetector`). ``compile`` is not supported for this backend: a
    warning, and the model runs eagerly."""
    if compile:
        log.warning("%s: --compile is not supported for Hugging Face models; running it eagerly", spec)
    module, meta = load_module(spec, device=device)
    threshold = DEFAULT_THRESHOLD if min_score is None else min(DEFAULT_THRESHOLD, min_score)
    return HfDetector(module, meta, spec=spec, threshold=threshold, max_det=max_det)


def model_file(spec: str) -> Path:
    """The weights file of a spec: the folder's ``model.safetensors`` (or its shard index); a hub id's
    from transformers' cache."""
    source = check_source(parse_spec(spec).source)
    folder = Path(source)
    if not folder.is_dir():
        import_transformers()
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(source, "model.safetensors"))
        except Exception as exc:  # offline, missing, gated: all mean "cannot get the file"
            raise UserError(f"hf:{source}: cannot get model.safetensors ({type(exc).__name__})") from exc
    single = folder / "model.safetensors"
    return single if single.is_file() else folder / "model.safetensors.index.json"


def model_files(spec: str) -> ModelFiles:
    """Every file ``spec`` loads from, for a machine that cannot see them (the Ray engine's actors): the
    files of its ``save_pretrained`` folder under ``model/`` (from_pretrained reads no subfolder: a Trainer's
    ``checkpoint-N/`` is not shipped), its ``classes`` and ``prompts`` files under ``classes/`` and ``prompts/``.

    A hub id ships the snapshot that this machine's Hugging Face cache holds for it (the driver downloaded it
    when it loaded the model; its ``model.safetensors`` is the :func:`model_file` a labeling signature
    hashes): the workers need no hub access and label with the very revision the driver checked. An id that
    is not in the cache is a one-line UserError; so is a link that leads out of the folder (out of the cache's
    folder of that repo, whose ``blobs/`` a snapshot's links point to)."""
    hf = parse_spec(spec)
    source = check_source(hf.source)
    folder, within = Path(source), None
    if not folder.is_dir():
        folder, within = cached_snapshot(source)
    files = [(f"model/{name}", path) for name, path in folder_files(folder, within=within)]
    options: dict[str, str] = {}
    for key, value in (("classes", hf.classes), ("prompts", hf.prompts)):
        if value is None:
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise UserError(f"{path}: {key} file not found (named in the model spec)")
        options[key] = f"{key}/{path.name}"
        files.append((options[key], path))
    return ModelFiles(files=tuple(files), rebuild=partial(spec_in_folder, **options))


def spec_in_folder(folder: Path, *, classes: str | None = None, prompts: str | None = None) -> str:
    """The spec of the copies of :func:`model_files` laid out in ``folder`` (``classes``, ``prompts``: the
    names of the option files in it)."""
    return with_options(f"{PREFIX}{folder / 'model'}", classes=str(folder / classes) if classes else None,
                        prompts=str(folder / prompts) if prompts else None)  # fmt: skip


def cached_snapshot(repo_id: str) -> tuple[Path, Path]:
    """``(snapshot folder, the repo's cache folder)`` of hub id ``repo_id`` in this machine's Hugging Face cache
    (its ``main`` revision, as transformers loads it); a one-line UserError when it is not there."""
    import_transformers()
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(config, str):
        raise UserError(f"hf:{repo_id}: not in this machine's Hugging Face cache, so there is nothing to ship to the "
                        "Ray workers: load it here once (datadistill evaluate or label), or give a save_pretrained "
                        "folder")  # fmt: skip
    snapshot = Path(config).parent
    return snapshot, snapshot.parent.parent


# ----------------------------------------------------------------------------------------------------
# training: what datadistill's loop needs (LOOP)


def _closed_set_config(spec: str) -> tuple[str, Any]:
    """The checked source and config of a closed-set model to train; a UserError for an open-vocabulary one."""
    source = check_source(parse_spec(spec).source)
    config = load_config(source)
    if is_zero_shot(config):
        raise UserError(f"--model {spec}: an open-vocabulary model labels only; train a closed-set model "
                        "(DETR, RT-DETR, D-FINE, ...) as the student")  # fmt: skip
    return source, config


def meta_for(
    model: str, dataset: CocoDataset, *, min_size: int | None = None, max_size: int | None = None
) -> ModelMeta:
    """The meta of ``hf:...`` trained on ``dataset``; the input size defaults to the image processor's
    (a fixed-size processor takes a square: its ``max_size`` is its ``min_size``)."""
    if dataset.task != "boxes":
        raise UserError(f"--model {model}: hf: models detect boxes; the data set has keypoints")
    source, _ = _closed_set_config(model)
    _, auto_processor = _auto_classes(False)
    processor = _pretrained_call("processor", source, auto_processor.from_pretrained, source)
    low, high, fixed = size_range(processor)
    low = low if min_size is None else int(min_size)
    if fixed:
        low = size_dict(low, low, fixed=True)["height"]
    high = low if fixed else (max(low, high) if max_size is None else int(max_size))
    return ModelMeta.for_dataset(model, dataset, min_size=low, max_size=high)


def default_lr(model: str, optimizer: str) -> float:
    """AdamW 1e-4 (the DETR-family fine-tuning rate), SGD 0.01."""
    return DEFAULT_LR if optimizer == "adamw" else 0.01


def _config_for(config: Any, names: tuple[str, ...]) -> Any:
    """A copy of ``config`` for our classes, that builds without downloading a pretrained backbone."""
    ours = config.__class__.from_dict(config.to_dict())
    ours.id2label = dict(enumerate(names))
    ours.label2id = {n: i for i, n in enumerate(names)}
    ours.num_labels = len(names)
    if getattr(ours, "use_pretrained_backbone", False):
        ours.use_pretrained_backbone = False
    return ours


def class_keys(config: Any) -> set[str]:
    """The state-dict keys whose shape follows the number of classes (the class heads, the denoising
    label embedding...): found by building the model for C and C+1 classes on the meta device."""
    auto_model, _ = _auto_classes(False)
    shapes = []
    for n in (config.num_labels, config.num_labels + 1):
        cfg = _config_for(config, tuple(f"class{i}" for i in range(n)))
        with torch.device("meta"):
            shapes.append({k: tuple(v.shape) for k, v in auto_model.from_config(cfg).state_dict().items()})
    return {k for k, shape in shapes[0].items() if shapes[1].get(k) != shape}


def build_model(meta: ModelMeta) -> HfModule:
    """The model of ``meta.model`` (``hf:SOURCE``) for ``meta``'s classes: the source's weights, its
    class-dependent tensors re-initialised when its classes (``id2label``) are not ours (logged)."""
    source, config = _closed_set_config(meta.model)
    auto_model, auto_processor = _auto_classes(False)
    ours = _config_for(config, meta.class_names)
    model = _pretrained_call("weights", source, auto_model.from_pretrained, source, config=ours,
                             ignore_mismatched_sizes=True, use_safetensors=True)  # fmt: skip
    theirs = model_names(config)
    if theirs != meta.class_names:
        keys = class_keys(ours)
        fresh = auto_model.from_config(ours).state_dict()
        model.load_state_dict({k: fresh[k] for k in keys}, strict=False)
        log.info("%s was trained for other classes (%s): its class head (%d tensors) is re-initialised for ours (%s)",
                 meta.model, ", ".join(theirs[:4]), len(keys), ", ".join(meta.class_names[:4]))  # fmt: skip
    processor = _pretrained_call("processor", source, auto_processor.from_pretrained, source)
    _, _, fixed = size_range(processor)
    return HfModule(model, processor, class_of=torch.arange(meta.num_classes), min_size=meta.min_size,
                    max_size=meta.max_size, fixed=fixed)  # fmt: skip


def _init_state(spec: str) -> tuple[dict[str, Tensor], tuple[str, ...] | None]:
    """``(state dict keyed as the transformers model's, its class names or None)`` of an ``init`` file: a
    save_pretrained folder or its safetensors file (loaded by transformers, which renames the keys of older
    files to the model's), a training output folder, a bare safetensors file, or a datadistill checkpoint."""
    from safetensors.torch import load_file

    path = Path(spec.removeprefix(PREFIX)).expanduser()
    if (path / TRAINED_DIR).is_dir():  # a training output folder: its trained model
        path = path / TRAINED_DIR
    folder = path if path.is_dir() else path.parent
    if (folder / "config.json").is_file() and (path.is_dir() or path.suffix == ".safetensors"):
        source, config = _closed_set_config(f"{PREFIX}{folder}")
        auto_model, _ = _auto_classes(False)
        model = _pretrained_call("weights", source, auto_model.from_pretrained, source, use_safetensors=True)
        return model.state_dict(), model_names(config)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path)), None
        except Exception as exc:  # safetensors' header and io errors
            raise UserError(f"--init {spec}: not a readable safetensors file ({type(exc).__name__})") from exc
    content = read_checkpoint(path)
    state = {k.removeprefix("model."): v for k, v in content["state_dict"].items()}
    return state, tuple(str(n) for n in content["meta"].get("class_names", ()))


def init_weights(model: nn.Module, spec: str, *, meta: ModelMeta) -> None:
    """Load the tensors of ``spec`` whose names and shapes fit (class heads only when the source's classes
    are ours); logs the counts, a UserError when nothing fits."""
    inner = hf_module(model).model
    source, names = _init_state(spec)
    target = inner.state_dict()
    skip = class_keys(inner.config) if names != meta.class_names else set()
    update = {k: v for k, v in source.items() if k in target and k not in skip and target[k].shape == v.shape}
    if not update:
        raise UserError(f"--init {spec}: no tensor fits model {meta.model} ({len(source)} tensors)")
    inner.load_state_dict(update, strict=False)
    log.info("init %s from %s: loaded %d of its %d tensors (%d class-head tensors skipped); %d keep their init",
             meta.model, spec, len(update), len(source), len(skip & set(source)),
             len(target) - len(update))  # fmt: skip


def losses(model: nn.Module, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The model's own training loss of a batch (sets train mode); ignore regions are refused, as the
    Hungarian matching would take them for objects."""
    for i, t in enumerate(targets):
        ignore = t.get("ignore")
        if ignore is not None and ignore.numel() > 0:
            raise UserError(f"target {i} has ignore regions (iscrowd annotations, or select --ignore-band), which "
                            "a transformers detector's loss cannot leave out: drop them from the data")  # fmt: skip
    model.train()
    return model(images, targets)  # type: ignore[no-any-return]


def detector(model: nn.Module, meta: ModelMeta) -> HfDetector:
    return HfDetector(model, meta)


def save_final(out: Path, *, model: nn.Module, meta: ModelMeta, extra: Mapping[str, Any]) -> None:
    """``out/hf_model``: a save_pretrained folder (safetensors, the processor at ``meta``'s input size)
    with ``datadistill.json`` (meta and ``extra``), written aside and renamed into place."""
    from datadistill.runtime.io import to_plain

    module = hf_module(model)
    final, tmp = out / TRAINED_DIR, out / f"{TRAINED_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    module.model.save_pretrained(tmp)
    processor = module.processor
    processor.size = size_dict(meta.min_size, meta.max_size, fixed=module.fixed)
    processor.save_pretrained(tmp)
    content = {"meta": replace(meta, model=f"{PREFIX}{final}").to_dict(), "source": meta.model, **to_plain(extra)}
    (tmp / META_FILE).write_text(json.dumps(content, indent=2), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


# What datadistill's training loop (datadistill.stages.train) takes from this backend: data, no loop.
LOOP = LoopBackend(meta_for=meta_for, default_lr=default_lr, build_model=build_model, init_weights=init_weights,
                   losses=losses, detector=detector, save_final=save_final, final_name=TRAINED_DIR)  # fmt: skip
