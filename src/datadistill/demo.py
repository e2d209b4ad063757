"""``datadistill demo``: synthetic data, the whole method on a CPU, and the table that shows the gain.

The data set is split into a validation set, a labeled set (10% of the rest) and an unlabeled set (90%)
whose labels are held back: the method never sees them, they only score the pseudo-labels.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from datadistill.config import DataSection, LabelSection, RunConfig, SelectSection, TrainSection
from datadistill.data.coco import CocoDataset, ImageLabels, load_coco, save_coco
from datadistill.layout import RunLayout
from datadistill.runtime.io import write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and schedules of one demo."""

    labeled: int
    unlabeled: int
    val: int
    size_px: int
    teacher_epochs: int
    student_epochs: int
    batch_size: int
    views: str


# Chosen so that the default demo runs in about 10-15 minutes on a 2-core CPU and --quick in about 2.
PLANS: dict[tuple[str, bool], DemoPlan] = {
    ("boxes", False): DemoPlan(labeled=200, unlabeled=1800, val=200, size_px=128, teacher_epochs=60,
                               student_epochs=40, batch_size=8, views="default"),
    ("boxes", True): DemoPlan(labeled=24, unlabeled=48, val=24, size_px=96, teacher_epochs=2,
                              student_epochs=2, batch_size=4, views="identity,hflip"),
    ("keypoints", False): DemoPlan(labeled=200, unlabeled=1800, val=200, size_px=128, teacher_epochs=40,
                                   student_epochs=40, batch_size=8, views="default"),
    ("keypoints", True): DemoPlan(labeled=24, unlabeled=48, val=24, size_px=96, teacher_epochs=2,
                                  student_epochs=2, batch_size=4, views="identity,hflip"),
}  # fmt: skip


def _subset(ds: CocoDataset, ids: list[int], *, keep_labels: bool = True) -> CocoDataset:
    wanted = set(ids)
    images = tuple(im for im in ds.images if im.id in wanted)
    empty = ImageLabels.empty(ds.num_keypoints)
    labels = {im.id: ds.labels[im.id] if keep_labels else empty for im in images}
    return CocoDataset(images=images, labels=labels, categories=ds.categories, info=ds.info)


def make_demo_data(out: Path, *, task: str, plan: DemoPlan, seed: int) -> DataSection:
    """Write the synthetic data and its splits under ``out``; idempotent (skips what exists)."""
    from datadistill.data import synth

    done = out / "splits.done"
    total = plan.labeled + plan.unlabeled + plan.val
    if not done.exists():
        make = synth.make_figures if task == "keypoints" else synth.make_shapes
        make(out, num_images=total, seed=seed, size_px=plan.size_px)
        full = load_coco(out / "annotations.json", image_root=out / "images")
        ids = [im.id for im in full.images]
        val_ids = ids[: plan.val]
        labeled_ids = ids[plan.val : plan.val + plan.labeled]
        unlabeled_ids = ids[plan.val + plan.labeled :]
        save_coco(_subset(full, val_ids), out / "val.json")
        save_coco(_subset(full, labeled_ids), out / "labeled.json")
        save_coco(_subset(full, unlabeled_ids, keep_labels=False), out / "unlabeled.json")
        save_coco(_subset(full, unlabeled_ids), out / "unlabeled_truth.json")
        done.write_text("ok\n")
    return DataSection(
        train=str(out / "labeled.json"),
        train_images=str(out / "images"),
        unlabeled=str(out / "unlabeled.json"),
        unlabeled_images=str(out / "images"),
        val=str(out / "val.json"),
        val_images=str(out / "images"),
        unlabeled_truth=str(out / "unlabeled_truth.json"),
    )


def demo_config(
    task: str,
    plan: DemoPlan,
    data: DataSection,
    *,
    seed: int,
    threads: int,
    teacher_model: str | None = None,
    student_model: str | None = None,
    quick: bool = False,
) -> RunConfig:
    """The run config of a demo; the models default to the small ones of the task (any model spec that
    ``train --model`` takes works, e.g. ``yolo:yolo11n.yaml``)."""
    teacher = TrainSection(model=teacher_model, epochs=plan.teacher_epochs, batch_size=plan.batch_size)
    return RunConfig(
        data=data,
        teacher=teacher,
        student=replace(teacher, model=student_model or teacher_model, epochs=plan.student_epochs),
        label=LabelSection(views=plan.views),
        select=SelectSection(),
        rounds=1,
        seed=seed,
        device="cpu",
        threads=threads,
        workers=0,
        teacher_check=not quick,  # a --quick teacher trains for seconds: it is weak, and its numbers mean nothing
    )


def pseudo_label_quality(layout: RunLayout, truth_path: str, r: int = 1) -> dict[str, Any]:
    """Precision and recall (IoU 0.5) of the selected pseudo-labels against the held-back labels, and of
    all candidates; also the keypoint AP of the pseudo-labels where there are keypoints."""
    from datadistill.data.coco import read_json
    from datadistill.stages.evaluate import evaluate_results, load_predictions
    from datadistill.stages.quality import match_pseudo_labels

    truth = load_coco(truth_path)
    pseudo = load_coco(layout.pseudo(r))
    sel = read_json(layout.selection(r))
    matched = match_pseudo_labels(pseudo, truth)
    at = matched.at(0.0)
    metrics = evaluate_results(truth, load_predictions(layout.pseudo(r), truth))
    return {
        "precision": at["precision"],
        "recall": at["recall"],
        "objects": at["kept"],
        "true_objects": matched.num_truth,
        "thresholds": sel["thresholds"],
        "per_image": sel["achieved_per_image"],
        "labeled_per_image": sel["target_per_image"],
        "metrics": metrics,
    }


def _pct(x: float | None) -> str:
    return "   -" if x is None else f"{100 * x:5.1f}"


def format_table(results: dict[str, Any], task: str) -> str:
    metric = "keypoints" if task == "keypoints" else "bbox"
    sup, stu = results["teacher"][metric], results["student"][metric]
    lines = [
        f"{'':28}{'AP':>7}{'AP50':>7}{'AP75':>7}",
        f"{'supervised (teacher)':28}{_pct(sup['AP']):>7}{_pct(sup['AP50']):>7}{_pct(sup['AP75']):>7}",
        f"{'student (data distillation)':28}{_pct(stu['AP']):>7}{_pct(stu['AP50']):>7}{_pct(stu['AP75']):>7}",
        f"{'gain':28}{100 * (stu['AP'] - sup['AP']):>+7.1f}{100 * (stu['AP50'] - sup['AP50']):>+7.1f}"
        f"{100 * (stu['AP75'] - sup['AP75']):>+7.1f}",
        "",
    ]
    p = results["pseudo_labels"]
    thr = ", ".join(f"{v:.3f}" for v in {v for v in p["thresholds"].values() if v is not None})
    lines.append(
        f"pseudo-labels: {p['objects']} objects ({p['per_image']:.2f} per image, labeled data "
        f"{p['labeled_per_image']:.2f}), threshold {thr}"
    )
    # (keypoint AP of pseudo-labels is left out: their unmarked keypoints sit at (0, 0), as COCO wants)
    ap = f"; box AP of the pseudo-labels {_pct(p['metrics']['bbox']['AP'])}" if metric == "bbox" else ""
    lines.append(
        f"  against the held-back labels (IoU 0.5): precision {100 * p['precision']:.1f}%, "
        f"recall {100 * p['recall']:.1f}%{ap}"
    )
    lines.append("time per stage: " + ", ".join(f"{k}: {v:,.0f} s" for k, v in results["seconds"].items()))
    return "\n".join(lines)


def run_demo(*, task: str = "boxes", out: str | Path = "runs/demo", quick: bool = False, seed: int = 0,
             threads: int = 2, teacher_model: str | None = None, student_model: str | None = None,
             ) -> dict[str, Any]:  # fmt: skip
    """Make the data, run the method, write ``results.json`` and ``report.html``; returns the results."""
    from datadistill.run import run, run_results

    started = time.time()
    plan = PLANS[(task, quick)]
    out = Path(out)
    t0 = time.time()
    data = make_demo_data(out / "data", task=task, plan=plan, seed=seed)
    data_s = round(time.time() - t0, 1)
    cfg = demo_config(task, plan, data, seed=seed, threads=threads, teacher_model=teacher_model,
                      student_model=student_model, quick=quick)  # fmt: skip
    result = run(cfg, base=Path.cwd(), out=out)
    quality = pseudo_label_quality(result.layout, data.unlabeled_truth)
    results = {
        **run_results(result),  # what `run` writes, and what the demo adds
        "task": task,
        "quick": quick,
        "pseudo_labels": quality,
        "seconds": {"data": data_s, **result.seconds},
        "total_seconds": round(time.time() - started, 1),
        "plan": plan.__dict__,
    }
    write_json_atomic(result.layout.results, results, indent=2)
    return results
