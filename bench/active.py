"""Does a labeling budget spent on the most doubtful images help the student more than one spent at random?

    python bench/active.py --seeds 0 1 --jobs 1 --threads 1 --out bench/results/active.json

Per seed, a synthetic box data set (``synth shapes``, ``--size`` px, made from the seed) is split into a
validation set V (``--val``), a labeled set L (``--labeled``) and an unlabeled set U (``--unlabeled``, its
labels held back). The teacher trains on L and labels U with ``--views`` (``label`` measures each object's
agreement and score and box spread across the views); ``select`` picks the threshold with L as reference.
Then the same budget of ``--budget`` images is spent, a perfect annotator giving each chosen image its
held-back true labels:

- ``random``: images of U drawn at random (by the seed);
- ``doubt``: the most doubtful images by ``review`` (its ranking, with the selection's thresholds);
- ``none``: no budget, for reference (the plain data distillation student).

The corrected images join L through ``merge`` (as an annotation tool's COCO export would); the rest of U
keeps the teacher's pseudo-labels (``select`` re-run with the enlarged L as reference, the corrected images
left out); a student trains on both for ``--iterations`` (the teacher too) with the seed, and is scored on V
(box AP, percent). The teacher and its labeling are shared: the arms differ only in which images were
corrected. The table also gives, per arm, the pseudo-label errors the budget corrected (false positives +
missed objects of the teacher's pseudo-labels on the chosen images, IoU 0.5).

Every stage is skipped when its output exists, so a killed benchmark resumes. ``--jobs`` seeds run at once,
one process each with ``--threads`` torch threads.
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from common import Stages, ap_text, cached_metrics, init_worker, options, parser, run_seeds, work_folder

from datadistill.config import LabelConfig, SelectConfig, TrainConfig
from datadistill.data.coco import CocoDataset, load_coco, read_json, save_coco
from datadistill.data.label_folder import object_values, read_shards
from datadistill.demo import DemoPlan, make_demo_data
from datadistill.runtime.io import provenance, write_json_atomic
from datadistill.stages.label import label
from datadistill.stages.quality import match_pseudo_labels
from datadistill.stages.review import merge, review
from datadistill.stages.select import select_pseudo_labels
from datadistill.stages.train import train

ARMS = ("none", "random", "doubt")
log = logging.getLogger("bench.active")


def subset(dataset: CocoDataset, names: set[str]) -> CocoDataset:
    images = tuple(im for im in dataset.images if im.file_name in names)
    return replace(dataset, images=images, labels={im.id: dataset.labels[im.id] for im in images})


def without(path: Path, names: set[str], out: Path) -> Path:
    """A copy of a COCO json without the images ``names`` (and their annotations)."""
    raw = read_json(path)
    gone = {im["id"] for im in raw["images"] if im["file_name"] in names}
    raw["images"] = [im for im in raw["images"] if im["id"] not in gone]
    raw["annotations"] = [a for a in raw["annotations"] if a["image_id"] not in gone]
    write_json_atomic(out, raw)
    return out


def choose(arm: str, ranking: list[str], *, budget: int, seed: int) -> list[str]:
    """The images an arm sends to the annotator: ``ranking`` is review's, most doubtful first."""
    if arm == "doubt":
        return ranking[:budget]
    if arm == "random":
        return sorted(random.Random(seed).sample(sorted(ranking), budget))
    return []


def errors_on(pseudo: CocoDataset, truth: CocoDataset, names: set[str]) -> dict[str, int]:
    """False positives and missed objects of the pseudo-labels on the images ``names`` (IoU 0.5)."""
    matched = match_pseudo_labels(subset(pseudo, names), subset(truth, names))
    tp = int(matched.true_positive.sum())
    return {"false_positives": len(matched.scores) - tp, "missed": matched.num_truth - tp, "true": matched.num_truth}


class Seed:
    """The stages of one seed, each in its own folder under ``work/seed{seed}``."""

    def __init__(self, seed: int, args: argparse.Namespace) -> None:
        self.seed, self.args = seed, args
        self.work = Path(args.work) / f"seed{seed}"
        plan = DemoPlan(labeled=args.labeled, unlabeled=args.unlabeled, val=args.val, size_px=args.size,
                        teacher_epochs=0, student_epochs=0, batch_size=8, views=args.views)  # fmt: skip
        self.data = make_demo_data(self.work / "data", task="boxes", plan=plan, seed=seed)
        self.images = self.data.train_images
        self.val = load_coco(self.data.val)
        self.truth = load_coco(self.data.unlabeled_truth)
        self.stages = Stages()

    def train(self, out: Path, labeled: str, pseudo: str | None) -> Path:
        cfg = TrainConfig(data=labeled, images=self.images, out=str(out), pseudo=pseudo,
                          pseudo_images=self.images if pseudo else None, iterations=self.args.iterations,
                          seed=self.seed, threads=self.args.threads, workers=0, device="cpu",
                          resume=(out / "last.pt").exists())  # fmt: skip
        self.stages.run(
            f"seed {self.seed}: train {out.relative_to(self.work)}", out / "checkpoint.pt", lambda: train(cfg)
        )
        return out

    def metrics(self, folder: Path) -> dict[str, Any]:
        return cached_metrics(folder / "val_metrics.json", folder, self.val, self.data.val_images)["bbox"]

    def select(self, reference: str, out: Path) -> Path:
        cfg = SelectConfig(labels=str(self.work / "labels"), reference=reference, out=str(out / "pseudo.json"))
        name = f"seed {self.seed}: select {out.relative_to(self.work)}"
        self.stages.run(name, out / "pseudo.json", lambda: select_pseudo_labels(cfg))
        return out

    def label(self, teacher: Path) -> None:
        labels = self.work / "labels"
        cfg = LabelConfig(model=str(teacher), images=self.data.unlabeled, image_root=self.images, out=str(labels),
                          views=self.args.views, workers=0, threads=self.args.threads, device="cpu",
                          allow_weak_teacher=True)  # fmt: skip
        done = labels / "manifest.json"
        if done.exists() and read_json(done).get("status") != "complete":
            done.unlink()  # a killed labeling: label resumes from its shards
        self.stages.run(f"seed {self.seed}: label", done, lambda: label(cfg))
        spreads = object_values(read_shards(labels, columns=["scores", "score_spread"]), "score_spread")
        if len(spreads) and np.isnan(spreads).all():
            raise SystemExit(f"{labels}: the shards hold no score_spread; delete the folder and run again")

    def arm(self, name: str, ranking: list[str], first: Path) -> dict[str, Any]:
        chosen = choose(name, ranking, budget=self.args.budget, seed=self.seed)
        folder = self.work / name
        labeled = self.data.train
        if chosen:
            corrections = folder / "corrections.json"
            if not corrections.exists():
                save_coco(subset(self.truth, set(chosen)), corrections)  # what a perfect annotator sends back
            labeled = str(folder / "labeled.json")
            if not Path(labeled).exists():
                merge(self.data.train, corrections, out=labeled, images=self.images)
        selected = self.select(labeled, folder / "select") if chosen else first
        pseudo = without(selected / "pseudo.json", set(chosen), folder / "pseudo.json")
        student = self.train(folder / "student", labeled, str(pseudo))
        errors = errors_on(load_coco(first / "pseudo.json"), self.truth, set(chosen))
        return {"val": self.metrics(student), "chosen": chosen, "pseudo_label_errors_corrected": errors,
                "labeled_images": len(load_coco(labeled).images)}  # fmt: skip

    def run(self) -> dict[str, Any]:
        teacher = self.train(self.work / "teacher", self.data.train, None)
        self.label(teacher)
        first = self.select(self.data.train, self.work / "select")
        summary = review(self.work / "labels", self.data.train, out=self.work / "review", top=self.args.budget,
                         selection_path=first / "selection.json", formats=("coco",))  # fmt: skip
        with open(self.work / "review" / "ranking.csv", newline="", encoding="utf-8") as f:
            ranking = [row["file_name"] for row in csv.DictReader(f)]  # every image (review.json lists the top)
        arms = {name: self.arm(name, ranking, first) for name in ARMS if name in self.args.arms}
        return {"teacher": {"val": self.metrics(teacher)}, "arms": arms,
                "doubt_formula": summary["formula"], "seconds": self.stages.seconds}  # fmt: skip


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    return Seed(seed, args).run()


def format_table(per_seed: dict[int, dict[str, Any]]) -> str:
    """Validation box AP (percent) per arm and seed, the mean, and the pseudo-label errors corrected."""
    arms = [a for a in ARMS if all(a in r["arms"] for r in per_seed.values())]
    head = f"{'arm':<10}" + "".join(f"{f'seed {s} AP / AP50':>20}" for s in per_seed) + f"{'mean AP':>9}"
    rows = [("teacher (L)", [r["teacher"]["val"] for r in per_seed.values()], None)]
    rows += [(a, [r["arms"][a]["val"] for r in per_seed.values()], [r["arms"][a] for r in per_seed.values()])
             for a in arms]  # fmt: skip
    lines = [head]
    for name, vals, detail in rows:
        cells = "".join(f"{ap_text(v):>20}" for v in vals)
        lines.append(f"{name:<10}{cells}{np.mean([100 * v['AP'] for v in vals]):9.1f}")
        if detail and detail[0]["chosen"]:
            errs = [d["pseudo_label_errors_corrected"] for d in detail]
            lines[-1] += "   corrected: " + ", ".join(
                f"{e['false_positives']} FP + {e['missed']} missed of {e['true']}" for e in errs
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="data, split, draw and training seeds (0 1)")
    p.add_argument("--labeled", type=int, default=40, help="labeled images L (40)")
    p.add_argument("--unlabeled", type=int, default=400, help="unlabeled images U (400)")
    p.add_argument("--val", type=int, default=200, help="validation images V (200)")
    p.add_argument("--budget", type=int, default=50, help="images of U given their true labels (50)")
    p.add_argument("--size", type=int, default=96, help="image side in px (96)")
    p.add_argument("--iterations", type=int, default=600, help="training iterations of the teacher and students")
    p.add_argument("--views", default="default", help="label's views (default)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of each process (1)")
    p.add_argument("--jobs", type=int, default=1, help="seeds run at once, one process each (1)")
    args = p.parse_args(argv)
    args.arms = set(args.arms.split(","))
    if not args.arms <= set(ARMS) or args.budget < 1 or args.budget > args.unlabeled:
        p.error(f"--arms: a comma list of {', '.join(ARMS)}; --budget: 1 to --unlabeled")
    args.work = str(work_folder(args))
    init_worker(args.threads)
    started = time.perf_counter()
    per_seed = run_seeds(run_seed, args.seeds, args, jobs=args.jobs, threads=args.threads)
    table = format_table(per_seed)
    minutes = (time.perf_counter() - started) / 60
    print(table)
    print(f"wall time {minutes:.1f} min ({args.jobs} process(es) of {args.threads} thread(s))")
    ahead = {s: r["arms"]["doubt"]["val"]["AP"] - r["arms"]["random"]["val"]["AP"] for s, r in per_seed.items()
             if {"doubt", "random"} <= set(r["arms"])}  # fmt: skip
    write_json_atomic(Path(args.out), {"command": " ".join(sys.argv), "options": options(args), "seeds": per_seed,
                      "table": table, "doubt_minus_random_AP": ahead, "doubt_ahead_on_every_seed": bool(ahead)
                      and all(v > 0 for v in ahead.values()), "wall_minutes": round(minutes, 1),
                      "provenance": provenance()}, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
