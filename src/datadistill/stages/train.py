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

The loop is this module's; a backend gives it data, never a loop (DETR's ``build_model`` shape): its
:class:`~datadistill.models.detector.LoopBackend` (model builder, losses, detector for validation, the trained
model's format). Ultralytics' models train with Ultralytics' own trainer, the backend's
:class:`~datadistill.models.detector.ExternalTrainer`, which :func:`train` calls and whose model it then
evaluates (:func:`train_external`). Every backend's ``last.pt`` is :mod:`datadistill.models.checkpoints`'.

Several processes: under ``torchrun --nproc_per_node N -m datadistill train ...`` (one process per GPU,
or per CPU slot) the model is trained with DistributedDataParallel; every rank's minibatch holds
``batch_size`` images with the same real:pseudo mix (the global batch is ``N * batch_size``); only rank 0
writes the files above and logs; ``--resume`` continues with the same number of processes.

Determinism: torch, numpy and random are seeded from ``cfg.seed``; the batches of an epoch are a pure
function of ``(seed, epoch)`` (:class:`~datadistill.data.dataset.MixedBatchSampler`), and so is each sample's
augmentation (:class:`~datadistill.data.dataset.DetectionDataset`). On a CPU with ``threads`` given
(``--threads N``) a resumed run ends with exactly the weights of an uninterrupted one; without it the thread
count follows the machine's load (:mod:`datadistill.runtime.threads`), and a thread count changes how float
sums split.

A student is trained by giving ``pseudo`` (a COCO json of pseudo-labels, as written by ``select``):
every minibatch then mixes real and pseudo-labeled images at ``pseudo_ratio`` (the paper's 6:4). The
pseudo-labels' ``score`` is ignored: they are hard labels, like the real ones. The student starts from
the model's initial weights (the default), or from ``init`` (for example the teacher's checkpoint.pt),
and may be another architecture than the teacher.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler
from tqdm import tqdm

from datadistill.config import RUNTIME_KEYS, TrainConfig
from datadistill.core.schedule import Schedule, resolve_schedule
from datadistill.data.coco import CocoDataset
from datadistill.data.dataset import DetectionDataset, MixedBatchSampler, collate
from datadistill.data.images import absolute_root
from datadistill.data.inputs import check_input_sizes, load_training_sets, shorten
from datadistill.data.label_table import FlatLabels
from datadistill.errors import UserError, one_line_errors
from datadistill.models import checkpoints
from datadistill.models.detector import (
    DEFAULT_MODELS,
    ExternalRun,
    ExternalTrainer,
    LoopBackend,
    ModelMeta,
    load_detector,
    training_backend,
)
from datadistill.runtime import distributed
from datadistill.runtime.devices import (
    autocast,
    grad_scaler,
    resolve_device,
    resolve_precision,
    rng_state,
    seed_everything,
    set_rng_state,
)
from datadistill.runtime.io import (
    file_sha256,
    provenance,
    remove_temporaries,
    to_plain,
    write_json_atomic,
    write_text_atomic,
)
from datadistill.runtime.threads import ThreadGovernor
from datadistill.stages import defaults
from datadistill.stages.evaluate import evaluate_model

log = logging.getLogger(__name__)

# last.pt is written after the epoch that ends at least this many iterations after the previous one (and
# after the last): every epoch for large sets, every few dozen for a handful of labeled images, whose
# epochs are one iteration long. A resumed run replays the epochs since, to the same weights.
SAVE_EVERY_ITERATIONS = 50
# Where, in the output folder, a label table's flat arrays are memory-mapped from during the run.
FLAT_CACHE = ".flat-labels"
# DataLoader workers live for the whole run, but each epoch starts with their queues empty: an epoch of one
# batch gives them nothing to load ahead, so below this many iterations per epoch images load in the training process.
MIN_WORKER_EPOCH = 2

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


# ----------------------------------------------------------------------------------------------------
# one epoch, and evaluation


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
    max_iterations: int | None = None,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    losses: Callable[..., dict[str, torch.Tensor]],
    threads: ThreadGovernor | None = None,
) -> dict[str, float]:
    """Train ``model`` for one pass over ``loader`` (its first ``max_iterations`` batches when given: the
    last epoch of a schedule in iterations); returns the mean of each loss and of their sum.

    ``record`` receives a step line every ``log_every`` iterations and after the last one. The lr
    schedule steps once per iteration. ``progress``: False hides the progress bar (ranks other than 0).
    ``precision`` (resolved: fp32, bf16 or fp16): the forward pass and losses run under autocast; the
    losses are summed in fp32, and ``scaler`` (fp16) scales the loss for the backward pass. ``losses``:
    the backend's ``losses(model, images, targets)`` (:class:`~datadistill.models.detector.LoopBackend`).
    ``threads``: keeps torch's CPU threads at the cores other processes leave free (polled every step); each
    step line records the thread count in use.
    """
    sums: dict[str, float] = {}
    count = 0
    steps = len(loader) if max_iterations is None else min(len(loader), max_iterations)
    last_time, last_count = time.perf_counter(), 0
    bar = tqdm(itertools.islice(one_line_errors(loader), steps), desc=f"epoch {epoch + 1}/{epochs}", total=steps,
               disable=None if progress else True, leave=False, dynamic_ncols=True)  # fmt: skip
    for images, targets in bar:
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items() if k != "image_id"} for t in targets]
        with autocast(device, precision):
            loss_terms = losses(model, images, targets)
        loss_terms = {k: v.float() for k, v in loss_terms.items()}
        loss = sum(loss_terms.values())
        value = float(loss.detach())
        if not math.isfinite(value):
            terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in loss_terms.items())
            raise UserError(
                f"training diverged: loss is {value} at epoch {epoch + 1}, iteration {count + 1} ({terms}); "
                "lower --lr or raise --warmup-iters"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            if clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            scaler.step(optimizer)  # skipped when the scaled gradients overflowed
            scaler.update()
        else:
            loss.backward()
            if clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        count += 1
        if threads is not None:
            threads.poll()
        terms_f = {k: float(v.detach()) for k, v in loss_terms.items()}
        for k, v in terms_f.items():
            sums[k] = sums.get(k, 0.0) + v
        sums["loss"] = sums.get("loss", 0.0) + value
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2g}")
        if count % log_every == 0 or count == steps:
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
                    "threads": torch.get_num_threads(),
                }
            )
            last_time, last_count = now, count
    bar.close()
    return {k: v / max(count, 1) for k, v in sums.items()}


def _check_init_classes(spec: str, meta: ModelMeta) -> None:
    """A datadistill checkpoint given as ``init`` must have been trained on the same classes."""
    if spec.startswith("weights:"):
        return
    try:
        content = checkpoints.read_checkpoint(spec)
    except UserError:
        return  # not a datadistill checkpoint: init_weights reads it (or explains why it cannot)
    names = tuple(str(n) for n in content["meta"].get("class_names", ()))
    if names != meta.class_names:
        raise UserError(
            f"--init {spec}: its classes {shorten(names)} do not match the data's {shorten(meta.class_names)}"
        )


def _abs(path: str | None) -> str | None:
    """A local path made absolute; an object-store URI (an image root: ``s3://...``) as it is."""
    return None if path is None else absolute_root(path)


def resolve_config(cfg: TrainConfig, dataset: CocoDataset, backend: LoopBackend) -> TrainConfig:
    """``cfg`` with absolute paths, and the model, input size and lr filled in (by ``backend``; the
    schedule follows from the sampler: :func:`with_schedule`)."""
    model = cfg.model or DEFAULT_MODELS[dataset.task]
    min_size = cfg.min_size if cfg.min_size is not None else defaults.input_size(model, dataset, device=cfg.device)
    meta = backend.meta_for(model, dataset, min_size=min_size, max_size=cfg.max_size)
    init = cfg.init
    if init is not None and not init.startswith("weights:"):
        init = _abs(init)
    lr_steps = None if cfg.lr_steps is None else tuple(int(s) for s in cfg.lr_steps)
    lr = cfg.lr if cfg.lr is not None else backend.default_lr(model, cfg.optimizer)
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


def with_schedule(cfg: TrainConfig, schedule: Schedule) -> TrainConfig:
    """``cfg`` with its schedule resolved: the length in the unit given (or chosen by default), the lr
    steps in that unit, and ``eval_every`` (default: about five evaluations per run)."""
    ipe = schedule.iterations_per_epoch
    if schedule.unit == "epochs":
        length = {"epochs": schedule.epochs, "iterations": None}
        lr_steps = tuple(m // ipe for m in schedule.milestones)
    else:
        length = {"epochs": None, "iterations": schedule.iterations}
        lr_steps = schedule.milestones
    eval_every = cfg.eval_every or max(1, schedule.epochs // 5)
    return dataclasses.replace(cfg, lr_steps=lr_steps, eval_every=eval_every, **length)  # type: ignore[arg-type]


def _check_same_run(recorded: Mapping[str, Any], current: Mapping[str, Any], last: Path) -> None:
    for key in sorted(set(recorded) | set(current)):
        if key in RUNTIME_KEYS:
            continue
        if recorded.get(key) != current.get(key):
            raise UserError(
                f"--resume: {key} is {current.get(key)!r} but the run in {last.parent} was started with "
                f"{recorded.get(key)!r}; resume with the same options or use another --out"
            )


class MetricsFile:
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
# the stage: setup steps


@dataclass(frozen=True)
class TrainInputs:
    """What a training run reads, loaded and checked before anything is written.

    ``config``: the resolved :class:`TrainConfig` as plain types (``config.yaml``, and what a resumed run
    must match); ``hashes``: sha256 of the data and pseudo-label files (likewise)."""

    dataset: CocoDataset
    pseudo: FlatLabels | None
    val: CocoDataset | None
    meta: ModelMeta
    config: dict[str, Any]
    hashes: dict[str, Any]


@dataclass
class Progress:
    """Where a run stands: the next epoch, seconds spent so far, and how much of metrics.jsonl is its own."""

    start_epoch: int = 0
    timings: dict[str, float] = field(default_factory=lambda: {"setup_s": 0.0, "train_s": 0.0, "eval_s": 0.0})
    metrics_bytes: int | None = None


def train(cfg: TrainConfig) -> Path:
    """The train stage: datadistill's loop (:func:`train_loop`) with the :class:`LoopBackend` of ``cfg.model``'s
    backend (torchvision, transformers), or that backend's own trainer (Ultralytics') as an external trainer,
    whose model this stage then evaluates (:func:`train_external`)."""
    backend = training_backend(cfg.model)
    if isinstance(backend, ExternalTrainer):
        return train_external(cfg, backend)
    return train_loop(cfg, backend)


def train_external(cfg: TrainConfig, trainer: ExternalTrainer) -> Path:
    """Train with ``trainer`` (it writes the trained model, ``config.yaml`` and ``provenance.json``), then
    evaluate the trained model on ``cfg.val`` and write ``metrics.jsonl`` (one epoch line) and ``timings.json``."""
    started = time.perf_counter()
    done = trainer.fit(cfg)
    out = Path(cfg.out).expanduser().resolve()
    if done is not None:
        write_external_metrics(cfg, out, done, started=started)
        log.info("wrote %s", out / trainer.final_name)
    return out


def write_external_metrics(cfg: TrainConfig, out: Path, done: ExternalRun, *, started: float) -> None:
    """``metrics.jsonl`` (``done.record`` with this stage's COCO evaluation of the validation set) and
    ``timings.json`` of an external trainer's run."""
    record = dict(done.record)
    eval_s = 0.0
    if done.val is not None:
        assert done.val_images is not None
        t0 = time.perf_counter()
        device = resolve_device(cfg.device)
        record["val"] = evaluate_model(load_detector(done.model, device=device), done.val, done.val_images,
                                       device=device, batch_size=cfg.batch_size, workers=cfg.workers)  # fmt: skip
        eval_s = time.perf_counter() - t0
    write_text_atomic(out / "metrics.jsonl", json.dumps(record) + "\n")
    total = time.perf_counter() - started
    write_json_atomic(out / "timings.json", {"setup_s": total - done.train_s - eval_s, "train_s": done.train_s,
                                            "eval_s": eval_s, "total_s": total}, indent=2)  # fmt: skip


def check_output_folder(cfg: TrainConfig, out: Path, *, final_name: str = "checkpoint.pt") -> None:
    """Without ``resume``, a folder holding ``last.pt`` or ``final_name`` (the backend's trained model) is
    refused (a finished or resumable run is never overwritten); with it, ``last.pt`` must exist."""
    last_path, final_path = out / "last.pt", out / final_name
    if cfg.resume and not last_path.is_file():
        raise UserError(f"--resume: {last_path} not found, so there is no run to continue; start without --resume")
    if not cfg.resume and (last_path.exists() or final_path.exists()):
        found = final_name if final_path.exists() else "last.pt"
        raise UserError(f"{out} already holds a training run ({found}); use --resume to continue it, or another --out")


def load_inputs(cfg: TrainConfig, backend: LoopBackend) -> tuple[TrainConfig, TrainInputs]:
    """The data, pseudo-labels and validation set, checked; ``cfg`` resolved (:func:`resolve_config`).

    Pseudo-labels in a label table are memory-mapped from ``OUT/.flat-labels/`` (:data:`FLAT_CACHE`;
    :func:`train_loop` removes it when the run ends, or when a check fails)."""
    sets = load_training_sets(data=cfg.data, images=cfg.images, pseudo=cfg.pseudo, pseudo_images=cfg.pseudo_images,
                              val=cfg.val, val_images=cfg.val_images, cache_dir=Path(cfg.out) / FLAT_CACHE)  # fmt: skip
    dataset, pseudo, val = sets.dataset, sets.pseudo, sets.val
    cfg = resolve_config(cfg, dataset, backend)
    assert cfg.model is not None
    meta = backend.meta_for(cfg.model, dataset, min_size=cfg.min_size, max_size=cfg.max_size)
    meta = dataclasses.replace(meta, max_det=cfg.max_det or 0)  # --max-det: the cap the checkpoint carries
    for part, path in ((dataset, cfg.data), (pseudo, cfg.pseudo), (val, cfg.val)):
        if part is not None:
            check_input_sizes(part, path, min_size=meta.min_size, max_size=meta.max_size)
    hashes = {"data_sha256": file_sha256(cfg.data), "pseudo_sha256": file_sha256(cfg.pseudo) if cfg.pseudo else None}
    inputs = TrainInputs(dataset=dataset, pseudo=pseudo, val=val, meta=meta,
                         config=to_plain(dataclasses.asdict(cfg)), hashes=hashes)  # fmt: skip
    return cfg, inputs


def build_sampler(cfg: TrainConfig, inputs: TrainInputs, launch: distributed.Launch) -> MixedBatchSampler:
    """Every rank's minibatches: ``batch_size`` images mixing real and pseudo-labeled ones at ``pseudo_ratio``."""
    try:
        sampler = MixedBatchSampler(
            len(inputs.dataset.images),
            len(inputs.pseudo) if inputs.pseudo is not None else 0,
            batch_size=cfg.batch_size,
            pseudo_ratio=cfg.pseudo_ratio if inputs.pseudo is not None else 0.0,
            seed=cfg.seed,
            rank=launch.rank,
            world_size=launch.world_size,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if sampler.cycles_real:
        log.info(
            "%d labeled images are fewer than the %d real images of a batch%s: they are cycled (an epoch is one "
            "batch, and an image may appear in it more than once)", sampler.num_real, sampler.real_per_batch,
            f" on each of {launch.world_size} processes" if launch.world_size > 1 else "",
        )  # fmt: skip
    return sampler


def read_resume_state(
    cfg: TrainConfig,
    inputs: TrainInputs,
    out: Path,
    launch: distributed.Launch,
    *,
    epochs: int,
    final_name: str = "checkpoint.pt",
) -> dict[str, Any] | None:
    """``last.pt``'s content when resuming, after checking that the run's options, input files and number
    of processes are those it started with; None for a new run (whose ``init`` is checked instead)."""
    if not cfg.resume:
        if cfg.init is not None:
            _check_init_classes(cfg.init, inputs.meta)
        return None
    last_path = out / "last.pt"
    state = checkpoints.read_checkpoint(last_path)
    extra = state["extra"]
    _check_same_run(extra.get("config", {}), inputs.config, last_path)
    for key, option in (("data_sha256", "--data"), ("pseudo_sha256", "--pseudo")):
        if extra.get("inputs", {}).get(key) != inputs.hashes[key]:
            raise UserError(
                f"--resume: the file of {option} changed since the run in {out} started (its sha256 differs); "
                "resume with the same data or use another --out"
            )
    started_with = int(extra.get("world_size", 1))
    finished = int(extra["epoch"]) >= epochs and (out / final_name).exists()
    if started_with != launch.world_size and not finished:
        raise UserError(
            f"--resume: the run in {out} was started with {started_with} process(es) and this is "
            f"{launch.world_size}; its batches and lr schedule depend on it: resume with {started_with}"
        )
    return state


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum over the trainable parameters, at the peak lr."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, schedule: Schedule
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then steps (:class:`LrSchedule`), stepped once per iteration."""
    factor = LrSchedule(warmup_iters=schedule.warmup, warmup_factor=cfg.warmup_factor,
                        milestones=schedule.milestones, gamma=cfg.lr_gamma)  # fmt: skip
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """The batches of a :class:`MixedBatchSampler`, each index paired with the epoch the sampler is set to.

    DataLoader workers that live across epochs hold the copies of the data sets made when they started, where
    ``set_epoch`` in the training process does not reach; the epoch travels with each index instead, and
    :class:`EpochDataset` sets it wherever the sample is read, so the augmentation stays a pure function of
    ``(seed, epoch, index)`` with persistent workers, without them and after a resume."""

    def __init__(self, sampler: MixedBatchSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch
        for batch in self.sampler:
            yield [(epoch, index) for index in batch]


class EpochDataset(Dataset[tuple[torch.Tensor, dict[str, Any]]]):
    """``ConcatDataset(parts)`` read by ``(epoch, index)`` (:class:`EpochBatches`): each part is set to
    ``epoch`` before the sample is read, in whichever process reads it."""

    def __init__(self, parts: list[DetectionDataset]) -> None:
        self.parts = parts
        self.concat = ConcatDataset(parts)

    def __len__(self) -> int:
        return len(self.concat)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        epoch, index = key
        for part in self.parts:
            if part.epoch != epoch:
                part.set_epoch(epoch)
        return self.concat[index]


def build_loader(
    cfg: TrainConfig, inputs: TrainInputs, sampler: MixedBatchSampler, *, device: torch.device
) -> tuple[DataLoader, list[DetectionDataset]]:
    """The DataLoader over the real images then the pseudo-labeled ones (the sampler's indices), and the
    data sets whose augmentation follows the epoch.

    ``cfg.workers`` processes load the images (in the training process when an epoch is shorter than
    :data:`MIN_WORKER_EPOCH` iterations); they start once and live across epochs (``persistent_workers``:
    no restart, no re-import per epoch; the epoch reaches them with every index, :class:`EpochBatches`),
    each loading torch's default of 2 batches ahead, into pinned memory on CUDA (the copy to the
    device does not wait). The loader draws its workers' base seed from its own generator, seeded from
    ``cfg.seed``, not from torch's global one, whose stream the model's own sampling (Faster R-CNN's
    anchors and proposals) uses: with or without workers, and resumed at any epoch, a run draws the same
    random numbers."""
    augment = dict(train=True, min_scale=cfg.min_scale, max_scale=cfg.max_scale, flip_prob=cfg.flip_prob)
    parts = [DetectionDataset(inputs.dataset, cfg.images, seed=cfg.seed, **augment)]  # type: ignore[arg-type]
    if inputs.pseudo is not None:
        assert cfg.pseudo_images is not None
        parts.append(DetectionDataset(inputs.pseudo, cfg.pseudo_images, seed=cfg.seed + 1, **augment))  # type: ignore[arg-type]
    workers = cfg.workers
    if workers and len(sampler) < MIN_WORKER_EPOCH:
        log.info("epochs of %d iteration: images are loaded in the training process (DataLoader workers could "
                 "not load ahead)", len(sampler))  # fmt: skip
        workers = 0
    loader = DataLoader(EpochDataset(parts), batch_sampler=EpochBatches(sampler), num_workers=workers,
                        collate_fn=collate, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed))  # fmt: skip
    return loader, parts


def restore(state: Mapping[str, Any], net: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> Progress:
    """Load a ``last.pt``'s weights, optimizer and scheduler; returns where the run stands."""
    extra = state["extra"]
    net.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    progress = Progress(start_epoch=int(extra["epoch"]), metrics_bytes=int(extra.get("metrics_bytes", 0)))
    progress.timings.update(extra.get("timings", {}))
    return progress


# ----------------------------------------------------------------------------------------------------
# the stage: datadistill's loop


def train_loop(cfg: TrainConfig, backend: LoopBackend) -> Path:
    """Train a detector as ``cfg`` says with ``backend``'s model, losses and checkpoint (torchvision's
    ``checkpoint.pt``, or transformers' ``hf_model/``); returns the output folder (see the module docstring).

    Without ``resume``, an output folder that already holds ``last.pt`` or the trained model is refused
    (a finished or resumable run is never overwritten); other files there (a run killed in its first
    epoch) are overwritten. With ``resume``, ``last.pt`` must exist and the run's options must be those
    it was started with, except :data:`RUNTIME_KEYS`; resuming a finished run does nothing.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process calls this: the model is
    wrapped in DistributedDataParallel (nccl on ``cuda:LOCAL_RANK``, gloo on CPUs), each rank takes its
    own ``batch_size`` images per step (the global batch is ``batch_size * WORLD_SIZE``; ``lr`` is not
    scaled), validation is sharded over the ranks, and only rank 0 writes files and logs. A run resumes
    with the number of processes it was started with.
    """
    started = time.perf_counter()
    launch = distributed.launch_from_env()
    out = Path(cfg.out)
    check_output_folder(cfg, out, final_name=backend.final_name)
    device = distributed.rank_device(resolve_device(cfg.device), launch)
    resolve_precision(cfg.precision, device)  # fp16 on a CPU is refused before any work
    with _removed_when_refused(out):
        cfg, inputs = load_inputs(cfg, backend)
        sampler = build_sampler(cfg, inputs, launch)
        schedule = resolve_schedule(epochs=cfg.epochs, iterations=cfg.iterations, lr_steps=cfg.lr_steps,
                                    warmup_iters=cfg.warmup_iters, iterations_per_epoch=len(sampler))  # fmt: skip
        cfg = with_schedule(cfg, schedule)
        inputs = dataclasses.replace(inputs, config=to_plain(dataclasses.asdict(cfg)))
        resume_state = read_resume_state(cfg, inputs, out, launch, epochs=schedule.epochs,
                                         final_name=backend.final_name)  # fmt: skip
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with distributed.process_group(launch, device=device), distributed.quiet_unless_main(launch):
            fit(cfg, inputs, sampler, schedule, out=out, device=device, resume_state=resume_state, started=started,
                launch=launch, backend=backend)  # fmt: skip
        if launch.is_main:  # the run is finished: its memory-mapped pseudo-labels go (a resumed run remakes them)
            shutil.rmtree(out / FLAT_CACHE, ignore_errors=True)
        return out
    finally:
        torch.set_num_threads(threads_before)


def _governor(cfg: TrainConfig, device: torch.device, launch: distributed.Launch) -> ThreadGovernor | None:
    """Torch's threads follow the free cores (:mod:`datadistill.runtime.threads`) when the user gave no
    ``--threads``, on a CPU, in one process (torchrun ranks on a CPU are given their threads)."""
    if cfg.threads or device.type != "cpu" or launch.distributed:
        return None
    governor = ThreadGovernor()
    return governor if governor.active else None


@contextlib.contextmanager
def _removed_when_refused(out: Path) -> Iterator[None]:
    """A refused run leaves no trace: the memory-mapped pseudo-labels (:data:`FLAT_CACHE`) that its checks
    wrote go, and so does the output folder when they made it."""
    made = not out.exists()
    try:
        yield
    except BaseException:
        shutil.rmtree(out / FLAT_CACHE, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty
        raise


def fit(
    cfg: TrainConfig,
    inputs: TrainInputs,
    sampler: MixedBatchSampler,
    schedule: Schedule,
    *,
    out: Path,
    device: torch.device,
    resume_state: dict[str, Any] | None,
    started: float,
    launch: distributed.Launch,
    backend: LoopBackend,
) -> Path:
    """Build the model, optimizer and loader, restore a resumed run, train the remaining epochs and write
    the trained model (``backend.save_final``). Only rank 0 writes files."""
    main = launch.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        remove_temporaries(out, ("last.pt", backend.final_name, "config.yaml", "provenance.json", "timings.json"))
    seed_everything(cfg.seed)
    net = backend.build_model(inputs.meta)  # the detector; ``model`` is it or its DDP wrapper
    if cfg.init is not None and resume_state is None:
        backend.init_weights(net, cfg.init, meta=inputs.meta)
    net.to(device)
    optimizer = build_optimizer(net, cfg)
    scheduler = build_scheduler(optimizer, cfg, schedule)
    precision = resolve_precision(cfg.precision, device)
    scaler = grad_scaler(device, precision)
    loader, parts = build_loader(cfg, inputs, sampler, device=device)
    progress = Progress()
    if resume_state is not None:
        progress = restore(resume_state, net, optimizer, scheduler)
        if scaler.is_enabled() and resume_state["extra"].get("scaler"):
            scaler.load_state_dict(resume_state["extra"]["scaler"])
        log.info("resuming %s after epoch %d of %d", out, progress.start_epoch, schedule.epochs)
        if progress.start_epoch >= schedule.epochs and (out / backend.final_name).exists():
            log.info("the run in %s is already finished", out)
            return out
    elif main:
        write_text_atomic(out / "config.yaml", yaml.safe_dump(inputs.config, sort_keys=False))
    metrics: MetricsFile | None = None
    if main:
        write_json_atomic(out / "provenance.json", provenance(), indent=2)
        metrics = MetricsFile(out / "metrics.jsonl", truncate_to=progress.metrics_bytes)
    model: nn.Module = net
    if launch.distributed:
        # DDP starts every rank from rank 0's weights and all-reduces the gradients of each step.
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        if resume_state is None and launch.rank > 0:
            seed_everything(cfg.seed + launch.rank)  # rank 0 keeps the one-process random stream
    if resume_state is not None:
        extra = resume_state["extra"]
        set_rng_state(extra["rng_ranks"][launch.rank] if launch.distributed else extra["rng"], device)  # last
    progress.timings["setup_s"] += time.perf_counter() - started
    n_pseudo = len(inputs.pseudo) if inputs.pseudo is not None else 0
    log.info(
        "training %s on %s (%s): %d real%s images, %s; output %s", cfg.model, device, precision,
        len(inputs.dataset.images), f" + {n_pseudo} pseudo-labeled" if inputs.pseudo else "", schedule.describe(), out,
    )  # fmt: skip
    try:
        run = EpochRun(cfg=cfg, inputs=inputs, net=net, model=model, loader=loader, parts=parts, sampler=sampler,
                       schedule=schedule, optimizer=optimizer, scheduler=scheduler, device=device, launch=launch,
                       out=out, precision=precision, scaler=scaler, backend=backend,
                       threads=_governor(cfg, device, launch))  # fmt: skip
        val_metrics = run_epochs(run, progress, metrics)
    finally:
        if metrics is not None:
            metrics.close()
    if main:
        save_final(out, model=model, meta=inputs.meta, epochs=schedule.epochs, config=inputs.config,
                   val_metrics=val_metrics, timings=progress.timings, backend=backend)  # fmt: skip
    distributed.barrier()  # every rank returns once the trained model is written
    return out


@dataclass(frozen=True)
class EpochRun:
    """What the epochs of one training run share (built by :func:`fit`)."""

    cfg: TrainConfig
    inputs: TrainInputs
    net: nn.Module  # the detector
    model: nn.Module  # it, or its DDP wrapper
    loader: DataLoader
    parts: list[DetectionDataset]
    sampler: MixedBatchSampler
    schedule: Schedule
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    launch: distributed.Launch
    out: Path
    backend: LoopBackend  # the model's losses, detector, files
    precision: str = "fp32"  # resolved: fp32, bf16 or fp16
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scaler (disabled otherwise)
    threads: ThreadGovernor | None = None  # torch's CPU threads follow the free cores (no --threads given)


def run_epochs(run: EpochRun, progress: Progress, metrics: MetricsFile | None) -> dict[str, Any] | None:
    """Train epochs ``progress.start_epoch ..`` with validation every ``eval_every``; rank 0 appends each
    epoch's line to metrics.jsonl and saves ``last.pt``. Returns the last validation metrics."""
    cfg, timings, schedule = run.cfg, progress.timings, run.schedule
    epochs = schedule.epochs
    save_every = cfg.save_every or max(1, math.ceil(SAVE_EVERY_ITERATIONS / schedule.iterations_per_epoch))
    val_metrics: dict[str, Any] | None = None
    for epoch in range(progress.start_epoch, epochs):
        run.sampler.set_epoch(epoch)
        for part in run.parts:
            part.set_epoch(epoch)
        t0 = time.perf_counter()
        stats = train_one_epoch(
            run.model, run.loader, run.optimizer, run.scheduler, device=run.device, epoch=epoch, epochs=epochs,
            log_every=cfg.log_every, clip_grad_norm=cfg.clip_grad_norm,
            record=metrics.write if metrics is not None else _discard, progress=run.launch.is_main,
            max_iterations=schedule.steps_in(epoch), precision=run.precision, scaler=run.scaler,
            losses=run.backend.losses, threads=run.threads,
        )  # fmt: skip
        stats = distributed.mean_over_ranks(stats)
        train_s = time.perf_counter() - t0
        timings["train_s"] += train_s
        record: dict[str, Any] = {"type": "epoch", "epoch": epoch + 1, "iteration": run.scheduler.last_epoch, **stats,
                                  "lr": run.optimizer.param_groups[0]["lr"], "time_s": train_s,
                                  "it_s": schedule.steps_in(epoch) / max(train_s, 1e-9)}  # fmt: skip
        assert cfg.eval_every is not None
        if run.inputs.val is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == epochs):
            assert cfg.val_images is not None
            t0 = time.perf_counter()
            val_metrics = evaluate_model(
                run.backend.detector(run.net, run.inputs.meta), run.inputs.val, cfg.val_images,
                device=run.device, batch_size=cfg.batch_size, workers=cfg.workers, rank=run.launch.rank,
                world_size=run.launch.world_size, precision=run.precision,
            )  # fmt: skip
            timings["eval_s"] += time.perf_counter() - t0
            record["val"] = val_metrics
        state = rng_state(run.device)
        rng_ranks = distributed.gather_to_main(state) if run.launch.distributed else None
        if metrics is None:
            continue
        metrics.write(record)
        if "val" in record or (epoch + 1) % save_every == 0 or epoch + 1 == epochs:
            log.info(
                "epoch %d/%d: loss %.4f, %.1f it/s%s", epoch + 1, epochs, stats.get("loss", float("nan")),
                record["it_s"], _val_summary(val_metrics) if "val" in record else "",
            )  # fmt: skip
        if (epoch + 1) % save_every == 0 or epoch + 1 == epochs:
            save_epoch(run, epoch=epoch, metrics=metrics, timings=timings, rng=state, rng_ranks=rng_ranks)
    return val_metrics


def save_epoch(
    run: EpochRun,
    *,
    epoch: int,
    metrics: MetricsFile,
    timings: dict[str, float],
    rng: dict[str, Any],
    rng_ranks: list[dict[str, Any]] | None,
) -> None:
    """``last.pt`` after epoch ``epoch``: weights, optimizer, scheduler, RNG states and the config."""
    extra = {
        "epoch": epoch + 1,
        "sampler_epoch": epoch + 1,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "config": run.inputs.config,
        "inputs": run.inputs.hashes,
        "metrics_bytes": metrics.tell(),
        "timings": dict(timings),
        "world_size": run.launch.world_size,
        "rng": rng,  # taken last: nothing may draw between it and the next epoch
    }
    if rng_ranks is not None:
        extra["rng_ranks"] = rng_ranks
    if run.scaler is not None and run.scaler.is_enabled():
        extra["scaler"] = run.scaler.state_dict()
    checkpoints.save_checkpoint(run.out / "last.pt", model=run.model, meta=run.inputs.meta, extra=extra)


def save_final(
    out: Path,
    *,
    model: nn.Module,
    meta: ModelMeta,
    epochs: int,
    config: dict[str, Any],
    val_metrics: dict[str, Any] | None,
    timings: dict[str, float],
    backend: LoopBackend,
) -> None:
    """``timings.json``, then the trained model (``backend.save_final``: ``checkpoint.pt`` for torchvision;
    last: it marks the run finished, and ``run`` skips the stage)."""
    final_extra: dict[str, Any] = {"epochs": epochs, "config": config}
    if val_metrics is not None:
        final_extra["val"] = val_metrics
    timings["total_s"] = timings["setup_s"] + timings["train_s"] + timings["eval_s"]
    write_json_atomic(out / "timings.json", timings, indent=2)
    backend.save_final(out, model=model, meta=meta, extra=final_extra)
    log.info("wrote %s", out / backend.final_name)


def _discard(record: Mapping[str, Any]) -> None:
    """The metrics sink of ranks other than 0."""


def _val_summary(metrics: Mapping[str, Any] | None) -> str:
    if not metrics:
        return ""
    parts = [f"{task} AP {m['AP']:.3f}" for task, m in metrics.items() if m.get("AP") is not None]
    return f", val {', '.join(parts)}" if parts else ""
