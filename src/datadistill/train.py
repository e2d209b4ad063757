"""The training stage: one plain loop (torchvision references style) for teachers and students.

``train(cfg)`` writes into ``cfg.out``:

- ``config.yaml``: the resolved config (absolute paths, the model, input size and lr steps filled in);
- ``provenance.json``: package versions, git revision, host;
- ``metrics.jsonl``: one json object per line, ``"type": "step"`` every ``log_every`` iterations (losses,
  lr, it/s) and ``"type": "epoch"`` at each epoch end (mean losses, time, and ``val`` metrics when
  ``cfg.val`` is set);
- ``last.pt`` after every epoch (atomic): weights, optimizer, lr scheduler, epochs done, RNG states of
  torch/numpy/random and the config, for ``resume``;
- ``checkpoint.pt`` at the end: the weights and the model meta (model name, classes, keypoint names, flip
  map, sigmas, input size), read by the other stages;
- ``timings.json``: seconds spent in setup, training and evaluation.

Several processes: under ``torchrun --nproc_per_node N -m datadistill train ...`` (one process per GPU,
or per CPU slot) the model is trained with DistributedDataParallel; every rank's minibatch holds
``batch_size`` images with the same real:pseudo mix (the global batch is ``N * batch_size``); only rank 0
writes the files above and logs; ``--resume`` continues with the same number of processes.

Determinism: torch, numpy and random are seeded from ``cfg.seed``; the batches of an epoch are a pure
function of ``(seed, epoch)`` (:class:`~datadistill.data.MixedBatchSampler`), and so is each sample's
augmentation (:class:`~datadistill.data.DetectionDataset`). On a CPU a resumed run ends with exactly the
weights of an uninterrupted one.

A student is trained by giving ``pseudo`` (a COCO json of pseudo-labels, as written by ``select``):
every minibatch then mixes real and pseudo-labeled images at ``pseudo_ratio`` (the paper's 6:4). The
pseudo-labels' ``score`` is ignored: they are hard labels, like the real ones. The student starts from
the model's initial weights (the default), or from ``init`` (for example the teacher's checkpoint.pt),
and may be another architecture than the teacher.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, Subset
from tqdm import tqdm

from datadistill import distributed, models
from datadistill.coco import CocoDataset, load_coco
from datadistill.data import DetectionDataset, MixedBatchSampler, collate
from datadistill.errors import UserError
from datadistill.images import is_file, resolve_image_path
from datadistill.io import file_sha256, provenance, remove_temporaries, write_json_atomic, write_text_atomic
from datadistill.views import resized_size

log = logging.getLogger(__name__)

# Options that may differ when a run is resumed: they change where and how fast it runs, or what is
# evaluated, not the weights it ends with.
RUNTIME_KEYS = frozenset(
    {"out", "resume", "device", "threads", "workers", "log_every", "eval_every", "val", "val_images"}
)
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    """Every option of ``datadistill train``.

    Paths: ``data`` (COCO json) with its image root ``images``; ``out`` the output folder.
    ``model``: a name of :data:`datadistill.models.MODELS`; None picks the default of the data's task;
    ``yolo:PATH_OR_YAML`` trains an Ultralytics YOLO model (:func:`datadistill.ultralytics_backend.train_yolo`).
    ``batch_size``: images per step of one process (under torchrun each process takes that many, as in
    torchvision's references; ``lr`` is not scaled with the number of processes).
    Optimization: ``optimizer`` ``"adamw"`` or ``"sgd"`` (with ``momentum``); ``lr`` is the peak learning
    rate (None: :func:`default_lr`), reached linearly from ``lr * warmup_factor`` over ``warmup_iters``
    iterations, then multiplied by
    ``lr_gamma`` at the start of each epoch in ``lr_steps`` (epochs counted from 0; None: at 2/3 and 8/9 of
    the run, the "1x" schedule's 8 and 11 of 12); ``clip_grad_norm`` None or the max gradient norm.
    Input: ``min_size``/``max_size`` the model's resize target in px (None: the model's default);
    augmentation: scale jitter in ``[min_scale, max_scale]`` and horizontal flip with ``flip_prob``.
    ``init``: None (initial weights), ``"weights:NAME"`` (torchvision weights) or a file (a checkpoint.pt,
    e.g. the teacher's, or a state dict). ``pseudo``/``pseudo_images``/``pseudo_ratio``: pseudo-labels
    for a student (the fraction of each minibatch that is pseudo-labeled). ``val``/``val_images``
    (default: ``images``): evaluated every ``eval_every`` epochs and at the end.
    ``resume``: continue from ``out/last.pt``. ``device``: ``"auto"`` (cuda if available), ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"``. ``threads``: torch CPU threads of the training process (0: torch's default,
    one per core); DataLoader worker processes always run one thread each (torch sets that).
    ``workers``: DataLoader worker processes (0: load in the training process). ``log_every``: iterations
    between step lines in metrics.jsonl.
    """

    data: str
    images: str
    out: str
    model: str | None = None
    epochs: int = 20
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
    eval_every: int = 1
    resume: bool = False
    device: str = "auto"
    seed: int = 0
    threads: int = 0
    workers: int = 0
    log_every: int = 20

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)

        for name in ("epochs", "batch_size", "eval_every", "log_every"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
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
            f"lr_steps must be epoch numbers >= 0, got {self.lr_steps!r}",
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


# ----------------------------------------------------------------------------------------------------
# learning rate schedule


@dataclass(frozen=True)
class LrSchedule:
    """The lr factor at iteration ``it``: linear warmup from ``warmup_factor`` over ``warmup_iters``
    iterations, times ``gamma`` per milestone (an iteration number) passed."""

    warmup_iters: int
    warmup_factor: float
    milestones: tuple[int, ...]
    gamma: float

    def __call__(self, it: int) -> float:
        factor = 1.0
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            factor = self.warmup_factor * (1 - alpha) + alpha
        return factor * self.gamma ** sum(1 for m in self.milestones if it >= m)


def default_lr_steps(epochs: int) -> tuple[int, ...]:
    """The "1x" schedule's decay epochs scaled to ``epochs``: 8 and 11 of 12."""
    return tuple(sorted({s for s in (round(epochs * 2 / 3), round(epochs * 8 / 9)) if 0 < s < epochs}))


# ----------------------------------------------------------------------------------------------------
# one epoch, and evaluation


def _one_line_errors(loader: DataLoader) -> Iterator[Any]:
    """Iterate ``loader``; a UserError raised in a worker process (torch re-raises it with the worker's
    traceback in the message) comes back with its own one-line message."""
    try:
        yield from loader
    except UserError as exc:
        lines = str(exc).strip().splitlines()
        if len(lines) <= 1:
            raise
        name = type(exc).__name__
        last = lines[-1]
        message = last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
        raise type(exc)(message) from None


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    device: torch.device,
    epoch: int,
    epochs: int,
    log_every: int,
    clip_grad_norm: float | None,
    record: Callable[[dict[str, Any]], None],
    progress: bool = True,
) -> dict[str, float]:
    """Train ``model`` for one pass over ``loader``; returns the mean of each loss and of their sum.

    ``record`` receives a step line every ``log_every`` iterations and after the last one. The lr
    schedule steps once per iteration. ``progress``: False hides the progress bar (ranks other than 0).
    """
    sums: dict[str, float] = {}
    count = 0
    last_time, last_count = time.perf_counter(), 0
    bar = tqdm(_one_line_errors(loader), desc=f"epoch {epoch + 1}/{epochs}", total=len(loader),
               disable=None if progress else True, leave=False, dynamic_ncols=True)  # fmt: skip
    for images, targets in bar:
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device) for k, v in t.items() if k != "image_id"} for t in targets]
        loss_terms = models.losses(model, images, targets)
        loss = sum(loss_terms.values())
        value = float(loss.detach())
        if not math.isfinite(value):
            terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in loss_terms.items())
            raise UserError(
                f"training diverged: loss is {value} at epoch {epoch + 1}, iteration {count + 1} ({terms}); "
                "lower --lr or raise --warmup-iters"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        count += 1
        terms_f = {k: float(v.detach()) for k, v in loss_terms.items()}
        for k, v in terms_f.items():
            sums[k] = sums.get(k, 0.0) + v
        sums["loss"] = sums.get("loss", 0.0) + value
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2g}")
        if count % log_every == 0 or count == len(loader):
            now = time.perf_counter()
            record(
                {
                    "type": "step",
                    "epoch": epoch + 1,
                    "iteration": scheduler.last_epoch,
                    "lr": lr,
                    "loss": value,
                    **terms_f,
                    "it_s": (count - last_count) / max(now - last_time, 1e-9),
                }
            )
            last_time, last_count = now, count
    bar.close()
    return {k: v / max(count, 1) for k, v in sums.items()}


def evaluate_model(
    model: nn.Module,
    dataset: CocoDataset,
    image_root: str | os.PathLike[str],
    *,
    device: torch.device,
    batch_size: int,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    evaluator: str = "faster-coco-eval",
) -> dict[str, Any]:
    """COCO metrics of ``model`` on ``dataset`` (:func:`datadistill.evaluate.evaluate_predictions`).

    With ``world_size > 1`` (every rank calls it, in a process group) each rank predicts the images
    ``rank, rank + world_size, ...`` and rank 0 gathers the predictions and returns the metrics; the
    other ranks return an empty dict. Pass the model unwrapped from DDP: ranks predict different numbers
    of batches, and DDP's forward would wait for the others.
    """
    from datadistill.evaluate import evaluate_predictions

    transform = getattr(models._unwrap(model), "transform", None)  # torchvision's resize
    if transform is not None:
        where = dataset.path if dataset.path is not None else "the evaluation data"
        check_input_sizes(dataset, where, min_size=min(transform.min_size), max_size=transform.max_size)

    items = DetectionDataset(dataset, image_root, train=False)
    loader = DataLoader(
        items if world_size == 1 else Subset(items, range(rank, len(items), world_size)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
    )
    predictions = {}
    for images, targets in _one_line_errors(loader):
        detections = models.predict(model, [im.to(device) for im in images])
        for target, det in zip(targets, detections, strict=True):
            predictions[int(target["image_id"])] = det.to("cpu")
    if world_size > 1:
        parts = distributed.gather_to_main(predictions)
        if parts is None:
            return {}
        predictions = {k: v for part in parts for k, v in part.items()}
    return evaluate_predictions(dataset, predictions, evaluator=evaluator)


# ----------------------------------------------------------------------------------------------------
# setup helpers


def resolve_device(requested: str) -> torch.device:
    """``"auto"``: cuda when available, else cpu. cuda requested but absent: a one-line UserError."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {requested!r} requested but CUDA is not available; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {requested!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
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


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    s = state["numpy"]
    np.random.set_state(
        (s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def _shorten(names: tuple[str, ...], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def check_image_files(dataset: CocoDataset, image_root: str | os.PathLike[str], *, what: str, option: str) -> None:
    """A one-line UserError naming the first missing image file and how many are missing."""
    missing = [im.file_name for im in dataset.images if not is_file(resolve_image_path(image_root, im.file_name))]
    if missing:
        raise UserError(
            f"{len(missing)} of the {len(dataset.images)} {what} images are missing from {option} {image_root}, "
            f"the first: {missing[0]}"
        )


def check_input_sizes(dataset: CocoDataset, path: Any, *, min_size: int, max_size: int) -> None:
    """A one-line UserError naming the first image the model cannot take: one so elongated that resizing it
    to the model's input size leaves a side of 0 px (torch would raise in the middle of the run)."""
    bad = [im for im in dataset.images if 0 in resized_size(im.height, im.width, min_size=min_size, max_size=max_size)]
    if bad:
        im = bad[0]
        raise UserError(
            f"{path}: image {im.id} ({im.file_name}) is {im.width}x{im.height} px, too elongated for the model's "
            f"input size ({min_size}-{max_size} px); {len(bad)} such image(s): leave them out of the data set"
        )


def _match_categories(pseudo: CocoDataset, real: CocoDataset, path: str) -> CocoDataset:
    """The pseudo-labels with their labels mapped to the real data's class indices (matched by name)."""
    if pseudo.class_names == real.class_names:
        return pseudo
    if sorted(pseudo.class_names) != sorted(real.class_names):
        raise UserError(
            f"{path}: pseudo-label categories {_shorten(pseudo.class_names)} differ from the data's "
            f"{_shorten(real.class_names)}"
        )
    index = {name: i for i, name in enumerate(real.class_names)}
    remap = np.array([index[name] for name in pseudo.class_names], np.int64)
    labels = {
        iid: dataclasses.replace(lab, labels=remap[lab.labels]) if len(lab) else lab
        for iid, lab in pseudo.labels.items()
    }
    return dataclasses.replace(pseudo, labels=labels, categories=real.categories)


def _load_pseudo(cfg: TrainConfig, real: CocoDataset) -> CocoDataset:
    assert cfg.pseudo is not None and cfg.pseudo_images is not None
    pseudo = load_coco(cfg.pseudo, image_root=cfg.pseudo_images)
    check_image_files(pseudo, cfg.pseudo_images, what="pseudo-label", option="--pseudo-images")
    real_kp = real.keypoint_category.keypoints if real.keypoint_category else ()
    pseudo_kp = pseudo.keypoint_category.keypoints if pseudo.keypoint_category else ()
    if pseudo_kp != real_kp:
        raise UserError(
            f"{cfg.pseudo}: pseudo-label keypoints {_shorten(pseudo_kp)} differ from the data's {_shorten(real_kp)}"
        )
    return _match_categories(pseudo, real, cfg.pseudo)


def _check_init_classes(spec: str, meta: models.ModelMeta) -> None:
    """A datadistill checkpoint given as ``init`` must have been trained on the same classes."""
    if spec.startswith("weights:"):
        return
    try:
        content = models.read_checkpoint(spec)
    except UserError:
        return  # not a datadistill checkpoint: init_weights reads it (or explains why it cannot)
    names = tuple(str(n) for n in content["meta"].get("class_names", ()))
    if names != meta.class_names:
        raise UserError(
            f"--init {spec}: its classes {_shorten(names)} do not match the data's {_shorten(meta.class_names)}"
        )


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (the form yaml and json give back)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _abs(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def default_lr(model: str, optimizer: str) -> float:
    """The peak learning rate when none is given. AdamW: 2e-3 for the small models trained from scratch
    (the best of the rates tried on the synthetic sets), 1e-4 to fine-tune pretrained ones; SGD: 0.01."""
    if optimizer == "adamw":
        return 1e-4 if models.get_spec(model).pretrained else 2e-3
    return 0.01


def resolve_config(cfg: TrainConfig, dataset: CocoDataset) -> TrainConfig:
    """``cfg`` with absolute paths, and the model, input size and lr steps filled in."""
    model = cfg.model or models.DEFAULT_MODELS[dataset.task]
    meta = models.ModelMeta.from_dataset(model, dataset, min_size=cfg.min_size, max_size=cfg.max_size)
    init = cfg.init
    if init is not None and not init.startswith("weights:"):
        init = _abs(init)
    lr_steps = default_lr_steps(cfg.epochs) if cfg.lr_steps is None else tuple(int(s) for s in cfg.lr_steps)
    lr = cfg.lr if cfg.lr is not None else default_lr(model, cfg.optimizer)
    return dataclasses.replace(
        cfg,
        lr=lr,
        data=_abs(cfg.data),
        images=_abs(cfg.images),
        out=_abs(cfg.out),
        model=model,
        min_size=meta.min_size,
        max_size=meta.max_size,
        lr_steps=lr_steps,
        init=init,
        pseudo=_abs(cfg.pseudo),
        pseudo_images=_abs(cfg.pseudo_images),
        val=_abs(cfg.val),
        val_images=_abs(cfg.val_images or (cfg.images if cfg.val else None)),
    )


def _check_same_run(recorded: Mapping[str, Any], current: Mapping[str, Any], last: Path) -> None:
    for key in sorted(set(recorded) | set(current)):
        if key in RUNTIME_KEYS:
            continue
        if recorded.get(key) != current.get(key):
            raise UserError(
                f"--resume: {key} is {current.get(key)!r} but the run in {last.parent} was started with "
                f"{recorded.get(key)!r}; resume with the same options or use another --out"
            )


class _MetricsFile:
    """metrics.jsonl, appended one flushed line at a time."""

    def __init__(self, path: Path, *, truncate_to: int | None) -> None:
        self.path = path
        if truncate_to is None:
            self.file: IO[str] = open(path, "w", encoding="utf-8")
        else:
            with open(path, "a+b") as f:
                f.truncate(min(truncate_to, f.seek(0, os.SEEK_END)))
            self.file = open(path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        try:
            self.file.write(json.dumps(record, allow_nan=True) + "\n")
            self.file.flush()
        except OSError as exc:  # a full disk; a resumed run cuts the file back to its last epoch
            raise UserError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

    def tell(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # the flush of a line that a full disk refused: write() has said so already
            pass


# ----------------------------------------------------------------------------------------------------
# the stage


def train(cfg: TrainConfig) -> Path:
    """Train a detector as ``cfg`` says; returns the output folder (see the module docstring).

    Without ``resume``, an output folder that already holds ``last.pt`` or ``checkpoint.pt`` is refused
    (a finished or resumable run is never overwritten); other files there (a run killed in its first
    epoch) are overwritten. With ``resume``, ``last.pt`` must exist and the run's options must be those
    it was started with, except :data:`RUNTIME_KEYS`; resuming a finished run does nothing.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process calls this: the model is
    wrapped in DistributedDataParallel (nccl on ``cuda:LOCAL_RANK``, gloo on CPUs), each rank takes its
    own ``batch_size`` images per step (the global batch is ``batch_size * WORLD_SIZE``; ``lr`` is not
    scaled), validation is sharded over the ranks, and only rank 0 writes files and logs. A run resumes
    with the number of processes it was started with.
    """
    from datadistill import ultralytics_backend

    if ultralytics_backend.is_yolo(cfg.model):  # Ultralytics' trainer (the optional backend)
        return ultralytics_backend.train_yolo(cfg)
    started = time.perf_counter()
    launch = distributed.launch_from_env()
    out = Path(cfg.out)
    last_path, final_path = out / "last.pt", out / "checkpoint.pt"
    if cfg.resume and not last_path.is_file():
        raise UserError(f"--resume: {last_path} not found, so there is no run to continue; start without --resume")
    if not cfg.resume and (last_path.exists() or final_path.exists()):
        found = "checkpoint.pt" if final_path.exists() else "last.pt"
        raise UserError(f"{out} already holds a training run ({found}); use --resume to continue it, or another --out")
    device = distributed.rank_device(resolve_device(cfg.device), launch)

    dataset = load_coco(cfg.data, image_root=cfg.images)
    if not dataset.images:
        raise UserError(f"{cfg.data}: no images to train on")
    check_image_files(dataset, cfg.images, what="training", option="--images")
    pseudo = _load_pseudo(cfg, dataset) if cfg.pseudo is not None else None
    val = load_coco(cfg.val, image_root=cfg.val_images or cfg.images) if cfg.val is not None else None
    cfg = resolve_config(cfg, dataset)
    assert cfg.model is not None and cfg.lr_steps is not None
    if val is not None:
        assert cfg.val_images is not None
        check_image_files(val, cfg.val_images, what="validation", option="--val-images")
    meta = models.ModelMeta.from_dataset(cfg.model, dataset, min_size=cfg.min_size, max_size=cfg.max_size)
    for part, path in ((dataset, cfg.data), (pseudo, cfg.pseudo), (val, cfg.val)):
        if part is not None:
            check_input_sizes(part, path, min_size=meta.min_size, max_size=meta.max_size)
    config_dict = _plain(dataclasses.asdict(cfg))
    inputs = {"data_sha256": file_sha256(cfg.data), "pseudo_sha256": file_sha256(cfg.pseudo) if cfg.pseudo else None}

    try:
        sampler = MixedBatchSampler(
            len(dataset.images),
            len(pseudo.images) if pseudo is not None else 0,
            batch_size=cfg.batch_size,
            pseudo_ratio=cfg.pseudo_ratio if pseudo is not None else 0.0,
            seed=cfg.seed,
            rank=launch.rank,
            world_size=launch.world_size,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc

    resume_state: dict[str, Any] | None = None
    if cfg.resume:
        resume_state = models.read_checkpoint(last_path)
        extra = resume_state["extra"]
        _check_same_run(extra.get("config", {}), config_dict, last_path)
        for key, option in (("data_sha256", "--data"), ("pseudo_sha256", "--pseudo")):
            if extra.get("inputs", {}).get(key) != inputs[key]:
                raise UserError(
                    f"--resume: the file of {option} changed since the run in {out} started (its sha256 differs); "
                    "resume with the same data or use another --out"
                )
        started_with = int(extra.get("world_size", 1))
        finished = int(extra["epoch"]) >= cfg.epochs and final_path.is_file()
        if started_with != launch.world_size and not finished:
            raise UserError(
                f"--resume: the run in {out} was started with {started_with} process(es) and this is "
                f"{launch.world_size}; its batches and lr schedule depend on it: resume with {started_with}"
            )
    elif cfg.init is not None:
        _check_init_classes(cfg.init, meta)

    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with distributed.process_group(launch, device=device), distributed.quiet_unless_main(launch):
            return _train(cfg, out, device, dataset, pseudo, val, meta, config_dict, inputs, sampler, resume_state,
                          started, launch=launch)  # fmt: skip
    finally:
        torch.set_num_threads(threads_before)


def _train(
    cfg: TrainConfig,
    out: Path,
    device: torch.device,
    dataset: CocoDataset,
    pseudo: CocoDataset | None,
    val: CocoDataset | None,
    meta: models.ModelMeta,
    config_dict: dict[str, Any],
    inputs: dict[str, Any],
    sampler: MixedBatchSampler,
    resume_state: dict[str, Any] | None,
    started: float,
    *,
    launch: distributed.Launch,
) -> Path:
    main = launch.is_main  # only rank 0 writes files
    if main:
        out.mkdir(parents=True, exist_ok=True)
        remove_temporaries(out, ("last.pt", "checkpoint.pt", "config.yaml", "provenance.json", "timings.json"))
    seed_everything(cfg.seed)
    net = models.build_model(meta)  # the detector; ``model`` is it or its DDP wrapper
    if cfg.init is not None and resume_state is None:
        models.init_weights(net, cfg.init, meta=meta)
    net.to(device)
    model: nn.Module = net

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    iters_per_epoch = len(sampler)
    assert cfg.lr_steps is not None
    schedule = LrSchedule(
        warmup_iters=min(cfg.warmup_iters, iters_per_epoch * cfg.epochs),
        warmup_factor=cfg.warmup_factor,
        milestones=tuple(s * iters_per_epoch for s in cfg.lr_steps),
        gamma=cfg.lr_gamma,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    real_set = DetectionDataset(
        dataset, cfg.images, train=True, min_scale=cfg.min_scale, max_scale=cfg.max_scale,
        flip_prob=cfg.flip_prob, seed=cfg.seed,
    )  # fmt: skip
    parts: list[DetectionDataset] = [real_set]
    if pseudo is not None:
        assert cfg.pseudo_images is not None
        parts.append(
            DetectionDataset(
                pseudo, cfg.pseudo_images, train=True, min_scale=cfg.min_scale, max_scale=cfg.max_scale,
                flip_prob=cfg.flip_prob, seed=cfg.seed + 1,
            )
        )  # fmt: skip
    loader = DataLoader(
        ConcatDataset(parts),
        batch_sampler=sampler,
        num_workers=cfg.workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )

    start_epoch = 0
    timings = {"setup_s": 0.0, "train_s": 0.0, "eval_s": 0.0}
    metrics_bytes = None
    if resume_state is not None:
        extra = resume_state["extra"]
        net.load_state_dict(resume_state["state_dict"])
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        start_epoch = int(extra["epoch"])
        timings.update(extra.get("timings", {}))
        metrics_bytes = int(extra.get("metrics_bytes", 0))
        log.info("resuming %s after epoch %d of %d", out, start_epoch, cfg.epochs)
        if start_epoch >= cfg.epochs and (out / "checkpoint.pt").is_file():
            log.info("the run in %s is already finished", out)
            return out
    elif main:
        write_text_atomic(out / "config.yaml", yaml.safe_dump(config_dict, sort_keys=False))
    metrics: _MetricsFile | None = None
    if main:
        write_json_atomic(out / "provenance.json", provenance(), indent=2)
        metrics = _MetricsFile(out / "metrics.jsonl", truncate_to=metrics_bytes)
    if launch.distributed:
        # DDP starts every rank from rank 0's weights and all-reduces the gradients of each step.
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        if resume_state is None and launch.rank > 0:
            seed_everything(cfg.seed + launch.rank)  # rank 0 keeps the one-process random stream
    if resume_state is not None:
        extra = resume_state["extra"]
        rng = extra["rng_ranks"][launch.rank] if launch.distributed else extra["rng"]
        _set_rng_state(rng, device)  # last: nothing may draw after it
    timings["setup_s"] += time.perf_counter() - started

    n_pseudo = len(pseudo.images) if pseudo is not None else 0
    log.info(
        "training %s on %s: %d real%s images, %d iterations per epoch, %d epochs, output %s",
        cfg.model, device, len(dataset.images), f" + {n_pseudo} pseudo-labeled" if pseudo else "",
        iters_per_epoch, cfg.epochs, out,
    )  # fmt: skip
    val_metrics: dict[str, Any] | None = None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            for part in parts:
                part.set_epoch(epoch)
            t0 = time.perf_counter()
            stats = train_one_epoch(
                model, loader, optimizer, scheduler, device=device, epoch=epoch, epochs=cfg.epochs,
                log_every=cfg.log_every, clip_grad_norm=cfg.clip_grad_norm,
                record=metrics.write if metrics is not None else _discard, progress=main,
            )  # fmt: skip
            stats = distributed.mean_over_ranks(stats)
            train_s = time.perf_counter() - t0
            timings["train_s"] += train_s
            record: dict[str, Any] = {
                "type": "epoch",
                "epoch": epoch + 1,
                **stats,
                "lr": optimizer.param_groups[0]["lr"],
                "time_s": train_s,
                "it_s": iters_per_epoch / max(train_s, 1e-9),
            }
            if val is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                assert cfg.val_images is not None
                t0 = time.perf_counter()
                val_metrics = evaluate_model(
                    net, val, cfg.val_images, device=device, batch_size=cfg.batch_size, workers=cfg.workers,
                    rank=launch.rank, world_size=launch.world_size,
                )  # fmt: skip
                timings["eval_s"] += time.perf_counter() - t0
                record["val"] = val_metrics
            rng_state = _rng_state(device)
            rng_ranks = distributed.gather_to_main(rng_state) if launch.distributed else None
            if metrics is None:
                continue
            metrics.write(record)
            log.info(
                "epoch %d/%d: loss %.4f, %.1f it/s%s", epoch + 1, cfg.epochs, stats.get("loss", float("nan")),
                record["it_s"], _val_summary(val_metrics) if "val" in record else "",
            )  # fmt: skip
            extra = {
                "epoch": epoch + 1,
                "sampler_epoch": epoch + 1,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "config": config_dict,
                "inputs": inputs,
                "metrics_bytes": metrics.tell(),
                "timings": dict(timings),
                "world_size": launch.world_size,
                "rng": rng_state,  # taken last: nothing may draw between it and the next epoch
            }
            if rng_ranks is not None:
                extra["rng_ranks"] = rng_ranks
            models.save_checkpoint(out / "last.pt", model=model, meta=meta, extra=extra)
    finally:
        if metrics is not None:
            metrics.close()

    if main:
        final_extra: dict[str, Any] = {"epochs": cfg.epochs, "config": config_dict}
        if val_metrics is not None:
            final_extra["val"] = val_metrics
        timings["total_s"] = timings["setup_s"] + timings["train_s"] + timings["eval_s"]
        write_json_atomic(out / "timings.json", timings, indent=2)
        # last: checkpoint.pt marks the run finished (`run` skips the stage), so nothing may follow it
        models.save_checkpoint(out / "checkpoint.pt", model=model, meta=meta, extra=final_extra)
        log.info("wrote %s", out / "checkpoint.pt")
    distributed.barrier()  # every rank returns once checkpoint.pt is written
    return out


def _discard(record: Mapping[str, Any]) -> None:
    """The metrics sink of ranks other than 0."""


def _val_summary(metrics: Mapping[str, Any] | None) -> str:
    if not metrics:
        return ""
    parts = [f"{task} AP {m['AP']:.3f}" for task, m in metrics.items() if m.get("AP") is not None]
    return f", val {', '.join(parts)}" if parts else ""
