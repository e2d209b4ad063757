"""``datadistill run``: teacher, label, select, student and evaluation, in one folder, resumable.

Each stage writes into its own subfolder (see :class:`datadistill.layout.RunLayout`) and is skipped when
its final file exists; an interrupted training resumes from its ``last.pt``, an interrupted labeling from
its finished shards. ``rounds: N`` repeats label, select and student with the last student as teacher.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from datadistill.config import RunConfig, TrainSection, config_to_dict, read_recorded_config
from datadistill.errors import UserError
from datadistill.io import provenance, write_json_atomic, write_text_atomic
from datadistill.layout import RunLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """Where everything went, and the validation metrics of the teacher and of each round's student."""

    layout: RunLayout
    teacher: dict[str, Any] | None
    students: tuple[dict[str, Any] | None, ...]
    seconds: dict[str, float]


def _path(base: Path, value: str | None) -> str | None:
    if value in (None, ""):
        return None
    p = Path(value)
    return str(p if p.is_absolute() else (base / p))


def _check_data(cfg: RunConfig, base: Path) -> None:
    missing = [k for k in ("train", "train_images", "unlabeled") if not getattr(cfg.data, k)]
    if missing:
        raise UserError(f"data.{missing[0]} is required (the config's data section names the files)")
    for key in ("train", "train_images", "unlabeled", "unlabeled_images", "val", "val_images", "unlabeled_truth"):
        value = _path(base, getattr(cfg.data, key))
        if value is not None and not Path(value).exists():
            raise UserError(f"data.{key}: {value} does not exist")
    if cfg.rounds < 1:
        raise UserError(f"rounds must be at least 1, got {cfg.rounds}")
    if cfg.student.init not in (None, "teacher") and not cfg.student.init.startswith("weights:"):
        if not Path(_path(base, cfg.student.init) or "").exists():
            raise UserError(f"student.init: {cfg.student.init} is neither 'teacher', weights:NAME nor a file")
    from datadistill.pseudo import check_select_options

    try:  # before hours of training, not after
        check_select_options(
            policy=cfg.select.policy, keypoint_policy=cfg.select.keypoint_policy,
            ignore_band=cfg.select.ignore_band, cross_class_iou=cfg.select.cross_class_iou,
        )  # fmt: skip
    except UserError as exc:
        message = str(exc)
        for flag in ("keypoint-policy", "policy", "ignore-band", "cross-class-iou"):
            message = message.replace(f"--{flag}", f"select.{flag.replace('-', '_')}")
        raise UserError(message) from None


def _train_config(section: TrainSection, cfg: RunConfig, base: Path, out: Path, **extra: Any) -> Any:
    from datadistill.train import TrainConfig

    options: dict[str, Any] = {
        "data": _path(base, cfg.data.train),
        "images": _path(base, cfg.data.train_images),
        "out": str(out),
        "model": section.model,
        "epochs": section.epochs,
        "batch_size": section.batch_size,
        "seed": cfg.seed,
        "device": cfg.device,
        "threads": cfg.threads,
        "workers": cfg.workers,
        "resume": (out / "last.pt").exists(),
        # validation AP along the way, for the report's curves (about 5 points per run)
        "val": _path(base, cfg.data.val),
        "val_images": _path(base, cfg.data.val_images) or _path(base, cfg.data.train_images),
        "eval_every": max(1, section.epochs // 5),
    }
    if section.lr is not None:
        options["lr"] = section.lr
    options.update(extra)
    return TrainConfig(**options)


def _evaluate(checkpoint: Path, cfg: RunConfig, base: Path, out: Path) -> dict[str, Any] | None:
    """Validation metrics of a checkpoint, computed once and kept in ``out``."""
    if cfg.data.val is None:
        return None
    from datadistill.coco import read_json

    if out.exists():
        return read_json(out)
    from datadistill import models
    from datadistill.coco import load_coco
    from datadistill.evaluate import write_metrics
    from datadistill.train import evaluate_model, resolve_device

    images = _path(base, cfg.data.val_images) or _path(base, cfg.data.train_images)
    gt = load_coco(_path(base, cfg.data.val), image_root=images)
    device = resolve_device(cfg.device)
    model, _, _ = models.load_checkpoint(checkpoint, device=device)
    metrics = evaluate_model(model, gt, images, device=device, batch_size=8, workers=cfg.workers)
    write_metrics(out, metrics)
    return metrics


# Config keys added after the first release, with the value that gives what a run did before they existed.
_ADDED_KEYS: dict[str, dict[str, Any]] = {
    "select": {"ignore_band": 0.0, "cross_class_iou": 0.0, "keypoint_policy": "count"}
}


def _record_config(layout: RunLayout, cfg: RunConfig, base: Path) -> None:
    """Write the resolved config once; a re-run with a different config is refused (one line)."""
    current = config_to_dict(cfg)
    current["_base"] = str(base)
    if layout.config.exists():
        try:
            recorded = read_recorded_config(layout.config)
        except UserError as exc:
            raise UserError(f"{exc}; use another --out") from None
        recorded.pop("_base", None)
        for section, keys in _ADDED_KEYS.items():  # a folder recorded before these existed ran without them
            if isinstance(recorded.get(section), dict):
                recorded[section] = {**keys, **recorded[section]}
        runtime = {"device", "threads", "workers", "rounds"}
        for key in sorted(set(recorded) | set(current)):
            if key in runtime or key == "_base":
                continue
            if recorded.get(key) != current.get(key):
                raise UserError(
                    f"{layout.root} was started with another '{key}' ({recorded.get(key)!r}); "
                    "use another --out to run a different config"
                )
    write_text_atomic(layout.config, yaml.safe_dump(current, sort_keys=False))


def run(cfg: RunConfig, *, base: Path, out: str | Path) -> RunResult:
    """Run (or resume) the whole method. Relative paths in ``cfg`` are resolved against ``base``."""
    from datadistill.label import LabelConfig
    from datadistill.pseudo import SelectConfig, select_pseudo_labels
    from datadistill.train import train

    _check_data(cfg, base)
    layout = RunLayout(Path(out))
    layout.root.mkdir(parents=True, exist_ok=True)
    for tmp in layout.root.rglob(".*.tmp"):  # what write_atomic left when an earlier run was killed
        tmp.unlink(missing_ok=True)
    _record_config(layout, cfg, base)
    seconds: dict[str, float] = {}

    def stage(name: str, done: Path, work: Any) -> None:
        if done.exists():
            log.info("%s: done already (%s)", name, done)
            return
        log.info("%s ...", name)
        t0 = time.time()
        work()
        seconds[name] = round(time.time() - t0, 1)
        log.info("%s: %.1f s", name, seconds[name])

    stage(
        "teacher",
        layout.teacher / "checkpoint.pt",
        lambda: train(_train_config(cfg.teacher, cfg, base, layout.teacher)),
    )
    t0 = time.time()
    teacher_metrics = _evaluate(layout.teacher / "checkpoint.pt", cfg, base, layout.teacher_metrics())
    seconds.setdefault("teacher eval", round(time.time() - t0, 1))

    previous = layout.teacher / "checkpoint.pt"
    students: list[dict[str, Any] | None] = []
    for r in range(1, cfg.rounds + 1):
        label_cfg = LabelConfig(
            checkpoint=str(previous),
            images=_path(base, cfg.data.unlabeled),
            image_root=_path(base, cfg.data.unlabeled_images),
            out=str(layout.label(r)),
            views=cfg.label.views,
            fuse=cfg.label.fuse,
            keypoint_fuse=cfg.label.keypoint_fuse,
            iou_thr=cfg.label.iou_thr,
            score_floor=cfg.label.score_floor,
            batch_size=cfg.label.batch_size,
            shard_size=cfg.label.shard_size,
            workers=cfg.workers,
            threads=max(1, cfg.threads),
            device=cfg.device,
        )
        stage(f"label {r}", layout.label(r) / ".complete", lambda c=label_cfg, r=r: _label_and_mark(c, layout.label(r)))
        select_cfg = SelectConfig(
            labels=str(layout.label(r)),
            reference=_path(base, cfg.data.train),
            out=str(layout.pseudo(r)),
            policy=cfg.select.policy,
            min_agreement=cfg.select.min_agreement,
            drop_empty=cfg.select.drop_empty,
            ignore_band=cfg.select.ignore_band,
            cross_class_iou=cfg.select.cross_class_iou,
            keypoint_policy=cfg.select.keypoint_policy,
        )
        stage(f"select {r}", layout.pseudo(r), lambda c=select_cfg: select_pseudo_labels(c))
        init = None
        if cfg.student.init == "teacher":
            init = str(previous)
        elif cfg.student.init is not None:
            init = cfg.student.init if cfg.student.init.startswith("weights:") else _path(base, cfg.student.init)
        student_cfg = _train_config(
            replace(cfg.student, model=cfg.student.model or cfg.teacher.model),
            cfg,
            base,
            layout.student(r),
            pseudo=str(layout.pseudo(r)),
            pseudo_images=label_root(layout.label(r)),
            pseudo_ratio=cfg.student.pseudo_ratio,
            init=init,
        )
        stage(f"student {r}", layout.student(r) / "checkpoint.pt", lambda c=student_cfg: train(c))
        t0 = time.time()
        students.append(_evaluate(layout.student(r) / "checkpoint.pt", cfg, base, layout.student_metrics(r)))
        seconds.setdefault(f"student {r} eval", round(time.time() - t0, 1))
        previous = layout.student(r) / "checkpoint.pt"

    write_json_atomic(layout.root / "timings.json", {"seconds": seconds, "provenance": provenance()}, indent=2)
    from datadistill.report import write_report

    write_report(layout.root)
    return RunResult(layout=layout, teacher=teacher_metrics, students=tuple(students), seconds=seconds)


def _label_and_mark(cfg: Any, folder: Path) -> None:
    from datadistill.coco import read_json
    from datadistill.label import label

    manifest = label(cfg)
    if read_json(manifest).get("status") == "complete":
        write_text_atomic(folder / ".complete", "")


def label_root(label_dir: Path) -> str:
    """The image root that a labeling folder's file names are relative to."""
    from datadistill.coco import read_json

    return read_json(label_dir / "manifest.json")["config"]["image_root"]
