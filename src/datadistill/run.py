"""``datadistill run``: teacher, label, select, student and evaluation, in one folder, resumable.

Each stage writes into its own subfolder (see :class:`datadistill.layout.RunLayout`) and is skipped when
its final file exists; an interrupted training resumes from its ``last.pt``, an interrupted labeling from
its finished shards. ``rounds: N`` repeats label, select and student with the last student as teacher.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from datadistill.config import (
    LabelConfig,
    LabelOptions,
    RunConfig,
    SelectConfig,
    SelectOptions,
    TrainConfig,
    TrainSection,
    config_to_dict,
    options_of,
    read_recorded_config,
)
from datadistill.errors import UserError
from datadistill.layout import RunLayout
from datadistill.runtime.io import provenance, remove_killed_temporaries, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """Where everything went, and the validation metrics of the teacher and of each round's student."""

    layout: RunLayout
    teacher: dict[str, Any] | None
    students: tuple[dict[str, Any] | None, ...]
    seconds: dict[str, float]


# The data keys that name image roots: a folder, or an object-store prefix (s3://bucket/prefix).
IMAGE_ROOT_KEYS = ("train_images", "unlabeled", "unlabeled_images", "val_images")


def _path(base: Path, value: str | None) -> str | None:
    """``value`` relative to the config's folder ``base``; an object-store URI as it is."""
    from datadistill.data.object_store import is_uri

    if value in (None, ""):
        return None
    if is_uri(value):
        return value
    p = Path(value)
    return str(p if p.is_absolute() else (base / p))


def _check_data(cfg: RunConfig, base: Path) -> None:
    missing = [k for k in ("train", "train_images", "unlabeled") if not getattr(cfg.data, k)]
    if missing:
        raise UserError(f"data.{missing[0]} is required (the config's data section names the files)")
    from datadistill.data.object_store import check_prefix, is_uri

    for key in ("train", "train_images", "unlabeled", "unlabeled_images", "val", "val_images", "unlabeled_truth"):
        value = _path(base, getattr(cfg.data, key))
        if is_uri(value) and key not in IMAGE_ROOT_KEYS:
            raise UserError(f"data.{key}: {value}: a COCO json or list is read from a local path (images may live "
                            "in object storage)")  # fmt: skip
        if is_uri(value):
            try:  # credentials, bucket and prefix, before hours of training
                check_prefix(value)  # type: ignore[arg-type]
            except UserError as exc:
                raise UserError(f"data.{key}: {exc}") from None
        elif value is not None and not Path(value).exists():
            raise UserError(f"data.{key}: {value} does not exist")
    if cfg.rounds < 1:
        raise UserError(f"rounds must be at least 1, got {cfg.rounds}")
    for name, section in (("teacher", cfg.teacher), ("student", cfg.student)):
        if section.epochs is not None and section.iterations is not None:
            raise UserError(f"{name}: give epochs or iterations, not both")
    if cfg.student.init not in (None, "teacher") and not cfg.student.init.startswith("weights:"):
        if not Path(_path(base, cfg.student.init) or "").exists():
            raise UserError(f"student.init: {cfg.student.init} is neither 'teacher', weights:NAME nor a file")
    _check_models(cfg, base)
    from datadistill.stages.select import check_select_options

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


def _check_models(cfg: RunConfig, base: Path) -> None:
    """Before hours of training: a student started from the teacher's weights must be of its backend (and
    the teacher one that trains); prompts need an open-vocabulary teacher."""
    from datadistill.models.detector import backend_of, label_only

    teacher = cfg.teacher.model or ""
    student = cfg.student.model or ("" if _label_only_teacher(cfg) else teacher)
    if cfg.label.prompts is not None and not (teacher and label_only(teacher)):
        raise UserError(f"label.prompts: the teacher ({teacher or 'the default model'}) is not an open-vocabulary "
                        "model (hf:... OWLv2, OWL-ViT); drop label.prompts")  # fmt: skip
    if cfg.student.init == "teacher" and _label_only_teacher(cfg):
        raise UserError(f"student.init: teacher: the teacher {teacher} labels as it is and has no weights to start "
                        "a student from; drop student.init")  # fmt: skip
    if cfg.student.init == "teacher" and backend_of(teacher) != backend_of(student):
        raise UserError(
            f"student.init: teacher starts the student from the teacher's weights, but the teacher "
            f"({teacher or 'the default model'}) and the student ({student or 'the default model'}) are models of "
            "different libraries; drop student.init or use one library for both"
        )


def _label_only_teacher(cfg: RunConfig) -> bool:
    """Whether the teacher is an open-vocabulary model that labels as it is (no teacher training)."""
    from datadistill.models.detector import label_only

    return bool(cfg.teacher.model) and label_only(cfg.teacher.model)  # type: ignore[arg-type]


def _teacher_spec(cfg: RunConfig, base: Path, layout: RunLayout) -> str:
    """An open-vocabulary teacher's spec: the categories of ``data.train`` and ``label.prompts`` (written to
    ``prompts.yaml`` in the run folder) in it."""
    from datadistill.models.detector import with_label_options

    assert cfg.teacher.model is not None
    prompts = None
    if cfg.label.prompts is not None:
        prompts = layout.root / "prompts.yaml"
        write_text_atomic(prompts, yaml.safe_dump(cfg.label.prompts, sort_keys=False, allow_unicode=True))
    return with_label_options(cfg.teacher.model, classes=_path(base, cfg.data.train),
                              prompts=str(prompts) if prompts else None)  # fmt: skip


def _train_config(section: TrainSection, cfg: RunConfig, base: Path, out: Path, **extra: Any) -> TrainConfig:
    from datadistill.models.detector import training_started

    options: dict[str, Any] = {
        "data": _path(base, cfg.data.train),
        "images": _path(base, cfg.data.train_images),
        "out": str(out),
        "model": section.model,
        "epochs": section.epochs,
        "iterations": section.iterations,
        "batch_size": section.batch_size,
        "seed": cfg.seed,
        "device": cfg.device,
        "precision": cfg.precision,
        "threads": cfg.threads,
        "workers": cfg.workers,
        "resume": training_started(out),
        # validation AP along the way, for the report's curves (the train stage's default: about 5 per run)
        "val": _path(base, cfg.data.val),
        "val_images": _path(base, cfg.data.val_images) or _path(base, cfg.data.train_images),
    }
    if section.lr is not None:
        options["lr"] = section.lr
    options.update(extra)
    return TrainConfig(**options)


def _evaluate(model: str | Path, cfg: RunConfig, base: Path, out: Path) -> dict[str, Any] | None:
    """Validation metrics of a model (a training folder, or a spec), computed once and kept in ``out``."""
    if cfg.data.val is None:
        return None
    from datadistill.data.coco import read_json

    if out.exists():
        return read_json(out)
    from datadistill.data.coco import load_coco
    from datadistill.models.detector import load_detector
    from datadistill.runtime.devices import resolve_device, resolve_precision
    from datadistill.stages.evaluate import evaluate_model, write_metrics

    images = _path(base, cfg.data.val_images) or _path(base, cfg.data.train_images)
    gt = load_coco(_path(base, cfg.data.val), image_root=images)
    device = resolve_device(cfg.device)
    detector = load_detector(str(model), device=device)
    metrics = evaluate_model(detector, gt, images, device=device, batch_size=8, workers=cfg.workers,
                             precision=resolve_precision(cfg.precision, device))  # fmt: skip
    write_metrics(out, metrics)
    return metrics


# Config keys added after the first release, with the value that gives what a run did before they existed.
_ADDED_KEYS: dict[str, dict[str, Any]] = {
    "select": {"ignore_band": 0.0, "cross_class_iou": 0.0, "keypoint_policy": "count"},
    "teacher": {"iterations": None},
    "student": {"iterations": None},
    "label": {"prompts": None, "max_det": None},
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
        runtime = {"device", "precision", "threads", "workers", "rounds", "teacher_check"}
        for key in sorted(set(recorded) | set(current)):
            if key in runtime or key == "_base":
                continue
            if recorded.get(key) != current.get(key):
                raise UserError(
                    f"{layout.root} was started with another '{key}' ({recorded.get(key)!r}); "
                    "use another --out to run a different config"
                )
    write_text_atomic(layout.config, yaml.safe_dump(current, sort_keys=False))


# Below this validation AP50 (the task's: boxes, or keypoints) a teacher's pseudo-labels do not help its
# student: measured on few labeled aerial tiles (bench/real_trees.py) and on the synthetic sets, a teacher
# at 7% box AP50 gave a student no better than itself, one at 26% a better one. See the README.
TEACHER_MIN_AP50 = 0.10


def check_teacher(metrics: dict[str, Any] | None, *, min_ap50: float = TEACHER_MIN_AP50) -> None:
    """A one-line UserError when the teacher's validation AP50 is below ``min_ap50`` (no validation set:
    nothing to check here; the label stage still stops a teacher that finds nothing)."""
    if not metrics:
        return
    task = "keypoints" if "keypoints" in metrics else "bbox"
    ap50 = metrics[task].get("AP50")
    if ap50 is not None and ap50 < min_ap50:
        what = "keypoint" if task == "keypoints" else "box"
        raise UserError(
            f"the teacher is too weak to teach: its validation {what} AP50 is {100 * ap50:.1f}%, below "
            f"{100 * min_ap50:.0f}%, and its pseudo-labels would mostly teach its mistakes; train it longer "
            "(teacher.iterations), on more labeled images, or from pretrained weights (teacher.init), or set "
            "teacher_check: false to go on"
        )


@dataclass
class _Stages:
    """Runs each stage unless its final file exists, and keeps the seconds each one took."""

    seconds: dict[str, float]

    def run(self, name: str, done: Path, work: Callable[[], Any]) -> None:
        if done.exists():
            log.info("%s: done already (%s)", name, done)
            return
        log.info("%s ...", name)
        t0 = time.time()
        work()
        self.seconds[name] = round(time.time() - t0, 1)
        log.info("%s: %.1f s", name, self.seconds[name])

    def evaluate(self, name: str, model: str | Path, cfg: RunConfig, base: Path, out: Path) -> dict[str, Any] | None:
        t0 = time.time()
        metrics = _evaluate(model, cfg, base, out)
        self.seconds.setdefault(name, round(time.time() - t0, 1))
        return metrics


def run(cfg: RunConfig, *, base: Path, out: str | Path) -> RunResult:
    """Run (or resume) the whole method. Relative paths in ``cfg`` are resolved against ``base``.

    The teacher and the students may be models of any library (:mod:`datadistill.models.detector`): each
    stage reaches its model through a training folder, whatever that folder holds."""
    from datadistill.models.detector import trained_name
    from datadistill.stages.select import select_pseudo_labels
    from datadistill.stages.train import train

    _check_data(cfg, base)
    layout = RunLayout(Path(out))
    layout.root.mkdir(parents=True, exist_ok=True)
    remove_killed_temporaries(layout.root)  # what an earlier, killed run left
    _record_config(layout, cfg, base)
    stages = _Stages(seconds={})
    teacher_model = cfg.teacher.model
    student_model = cfg.student.model or cfg.teacher.model
    previous: str | Path = layout.teacher
    if _label_only_teacher(cfg):  # an open-vocabulary teacher labels as it is
        previous, student_model = _teacher_spec(cfg, base, layout), cfg.student.model
    else:
        stages.run("teacher", layout.teacher / trained_name(teacher_model),
                   lambda: train(_train_config(cfg.teacher, cfg, base, layout.teacher)))  # fmt: skip
    teacher_metrics = stages.evaluate("teacher eval", previous, cfg, base, layout.teacher_metrics())
    if cfg.teacher_check:
        check_teacher(teacher_metrics)
    students: list[dict[str, Any] | None] = []
    for r in range(1, cfg.rounds + 1):
        label_cfg = _label_config(cfg, base, str(previous), layout.label(r))
        stages.run(f"label {r}", layout.label(r) / ".complete",
                   lambda c=label_cfg, r=r: _label_and_mark(c, layout.label(r)))  # fmt: skip
        select_cfg = _select_config(cfg, base, layout, r)
        stages.run(f"select {r}", layout.pseudo(r), lambda c=select_cfg: select_pseudo_labels(c))
        student_cfg = _student_config(cfg, base, layout, r, teacher=previous, model=student_model)
        stages.run(f"student {r}", layout.student(r) / trained_name(student_model), lambda c=student_cfg: train(c))
        students.append(stages.evaluate(f"student {r} eval", layout.student(r), cfg, base, layout.student_metrics(r)))
        previous = layout.student(r)

    seconds = stages.seconds
    write_json_atomic(layout.timings, {"seconds": seconds, "provenance": provenance()}, indent=2)
    result = RunResult(layout=layout, teacher=teacher_metrics, students=tuple(students), seconds=seconds)
    write_json_atomic(layout.results, run_results(result), indent=2)
    from datadistill.stages.report import write_report

    write_report(layout.root)
    return result


# The summary metrics of results.json's gain: student minus teacher, for each task evaluated.
GAIN_KEYS = ("AP", "AP50", "AP75")


def run_results(result: RunResult) -> dict[str, Any]:
    """What ``results.json`` holds (``run`` and ``demo`` write it): the validation metrics of the teacher,
    of the last round's student and of each round's (``students``), the ``gain`` of the last student over the
    teacher (AP, AP50, AP75 per task, as fractions; None without a validation set), the seconds of each stage
    and the provenance."""
    student = result.students[-1] if result.students else None
    gain = None
    if result.teacher and student:
        gain = {
            task: {k: None if student[task].get(k) is None or result.teacher[task].get(k) is None
                   else student[task][k] - result.teacher[task][k] for k in GAIN_KEYS}
            for task in ("bbox", "keypoints") if task in result.teacher and task in student
        }  # fmt: skip
    return {
        "teacher": result.teacher,
        "student": student,
        "students": list(result.students),
        "gain": gain,
        "seconds": result.seconds,
        "provenance": provenance(),
    }


def _label_config(cfg: RunConfig, base: Path, teacher: str, out: Path) -> LabelConfig:
    """The label stage of a round: ``teacher`` (a training folder) labels the unlabeled images."""
    return LabelConfig(
        **options_of(cfg.label, LabelOptions),
        model=teacher,
        images=_path(base, cfg.data.unlabeled),  # type: ignore[arg-type]
        image_root=_path(base, cfg.data.unlabeled_images),
        out=str(out),
        workers=cfg.workers,
        threads=max(1, cfg.threads),
        device=cfg.device,
        precision=cfg.precision,
        allow_weak_teacher=not cfg.teacher_check,
    )


def _select_config(cfg: RunConfig, base: Path, layout: RunLayout, r: int) -> SelectConfig:
    return SelectConfig(
        **options_of(cfg.select, SelectOptions),
        labels=str(layout.label(r)),
        reference=_path(base, cfg.data.train),  # type: ignore[arg-type]
        out=str(layout.pseudo(r)),
    )


def _student_config(
    cfg: RunConfig, base: Path, layout: RunLayout, r: int, *, teacher: str | Path, model: str | None
) -> TrainConfig:
    """The student of round ``r``: ``model`` on real + pseudo-labels, from its initial weights, the
    teacher's (a training folder of the same library, checked up front) or the file ``student.init``."""
    from datadistill.data.label_table import TABLE_NAME
    from datadistill.models.detector import model_file, trained_file

    init = None
    if cfg.student.init == "teacher":
        spec = trained_file(teacher)
        assert spec is not None  # the stage before wrote it
        init = str(model_file(spec))
    elif cfg.student.init is not None:
        init = cfg.student.init if cfg.student.init.startswith("weights:") else _path(base, cfg.student.init)
    section = replace(cfg.student, model=model)
    if section.epochs is None and section.iterations is None:  # the student follows the teacher's schedule
        section = replace(section, epochs=cfg.teacher.epochs, iterations=cfg.teacher.iterations)
    table = layout.pseudo(r).with_name(TABLE_NAME)  # the label table, where select wrote one beside the json
    pseudo = table if table.is_file() else layout.pseudo(r)
    return _train_config(
        section, cfg, base, layout.student(r), pseudo=str(pseudo),
        pseudo_images=label_root(layout.label(r)), pseudo_ratio=cfg.student.pseudo_ratio, init=init,
    )  # fmt: skip


def _label_and_mark(cfg: Any, folder: Path) -> None:
    from datadistill.data.coco import read_json
    from datadistill.stages.label import label

    try:
        manifest = label(cfg)
    except UserError as exc:  # the label stage's advice, in the run config's words
        text = str(exc).replace("pass --allow-weak-teacher", "set teacher_check: false")
        raise UserError(text.replace("--score-floor", "label.score_floor")) from None
    if read_json(manifest).get("status") == "complete":
        write_text_atomic(folder / ".complete", "")


def label_root(label_dir: Path) -> str:
    """The image root that a labeling folder's file names are relative to."""
    from datadistill.data.label_folder import open_label_folder

    root = open_label_folder(label_dir).image_root
    if root is None:
        raise UserError(f"{label_dir / 'manifest.json'}: names no 'config.image_root'; re-run the labeling")
    return root
