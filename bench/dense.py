"""Dense scenes: what the 100-detections cap costs data distillation, and what caps read from the data give.

    python bench/dense.py --threads 2 --out bench/results/dense.json

Dense synthetic images (``synth shapes --dense``: 100 to 300 shapes per image on a jittered grid) are split
into a labeled set L, an unlabeled set U whose labels are held back, and a validation set V. The teacher,
``small_fcos``, trains on L; its checkpoint records L's 99th percentile of objects per image. U is labeled
with one whole-image view (``identity``) under two caps, selected with the count rule, and a student trains
on L + the pseudo-labels of each arm:

- ``default caps``: ``label --max-det 100``, what every backend kept before (torchvision's
  ``detections_per_img``), and the student evaluated as COCO does, at 100 detections per image;
- ``caps from the data``: the cap the teacher's checkpoint gives (twice L's 99th percentile);
- ``oracle``: a student trained on L + U's true labels.

Printed per arm: fused candidates per image, the recall of the selected pseudo-labels against U's labels
(COCO AR at IoU 0.50:0.95, at the detections per image the data needs), and the student's box AP on
V counted at the data's maxDets and at COCO's 100. Every stage writes into ``--work`` and is skipped when
done; the numbers of one table come from one run. Small on purpose (2 CPU cores, ~15 minutes): the AP of
so short a training is low, the differences between the arms are what it measures.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from datadistill.data.coco import CocoDataset, ImageLabels, load_coco, objects_per_image, read_json, save_coco
from datadistill.data.label_folder import read_shards
from datadistill.data.synth import make_shapes
from datadistill.models.detector import load_detector
from datadistill.runtime.io import provenance, write_json_atomic
from datadistill.stages.evaluate import evaluate_model, evaluate_results, load_predictions, max_dets_for
from datadistill.stages.label import LabelConfig, label
from datadistill.stages.select import SelectConfig, select_pseudo_labels
from datadistill.stages.train import TrainConfig, train

log = logging.getLogger("bench.dense")

ARMS = {"default caps": 100, "caps from the data": None}  # arm -> label --max-det (None: from the checkpoint)


def make_data(work: Path, *, labeled: int, unlabeled: int, val: int, size_px: int, seed: int) -> dict[str, Path]:
    """The dense images and their L / U / V splits under ``work`` (skipped when done)."""
    paths = {name: work / f"{name}.json" for name in ("labeled", "unlabeled", "unlabeled_truth", "val")}
    paths["images"] = work / "images"
    done = work / "splits.done"
    if done.exists():
        return paths
    make_shapes(work, num_images=labeled + unlabeled + val, seed=seed, size_px=size_px, dense=True)
    full = load_coco(work / "annotations.json", image_root=work / "images")

    def subset(images: tuple[Any, ...], *, keep_labels: bool) -> CocoDataset:
        labels = {im.id: full.labels[im.id] if keep_labels else ImageLabels.empty() for im in images}
        return CocoDataset(images=images, labels=labels, categories=full.categories, info=full.info)

    cut = labeled + unlabeled
    save_coco(subset(full.images[:labeled], keep_labels=True), paths["labeled"])
    save_coco(subset(full.images[labeled:cut], keep_labels=False), paths["unlabeled"])
    save_coco(subset(full.images[labeled:cut], keep_labels=True), paths["unlabeled_truth"])
    save_coco(subset(full.images[cut:], keep_labels=True), paths["val"])
    done.write_text("ok\n")
    return paths


def pct(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 1)


def format_table(results: dict[str, Any]) -> str:
    head = (f"{'arm':<20} {'max_det':>7} {'cand/img':>8} {'PL recall':>9} {'PL/img':>7} "
            f"{'AP@data':>7} {'AP50@data':>9} {'AP@100':>6}")  # fmt: skip
    lines = [head]
    for name, r in results["arms"].items():
        cells = [str(r.get("max_det", "-")), f"{r['candidates_per_image']:.0f}" if "candidates_per_image" in r else "-",
                 str(r.get("pseudo_recall", "-")), f"{r['pseudo_per_image']:.0f}" if "pseudo_per_image" in r else "-",
                 str(r["student"]["AP"]),
                 str(r["student"]["AP50"]), str(r["student_at_100"]["AP"])]  # fmt: skip
        widths = (7, 8, 9, 7, 7, 9, 6)
        lines.append(f"{name:<20} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results json")
    p.add_argument("--work", default=None, help="working folder (default: OUT without .json + '_work')")
    p.add_argument("--labeled", type=int, default=16)
    p.add_argument("--unlabeled", type=int, default=32)
    p.add_argument("--val", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="image side, px (also the model's input)")
    p.add_argument("--iterations", type=int, default=300, help="teacher's and each student's minibatches")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_name(out.stem + "_work")
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data = make_data(work, labeled=args.labeled, unlabeled=args.unlabeled, val=args.val, size_px=args.size,
                     seed=args.seed)  # fmt: skip
    images = str(data["images"])
    val, truth = load_coco(data["val"], image_root=images), load_coco(data["unlabeled_truth"], image_root=images)
    val_dets, truth_dets = max_dets_for(val), max_dets_for(truth)

    def fit(name: str, pseudo: Path | None) -> Path:
        folder = work / name
        if not (folder / "checkpoint.pt").exists():
            train(TrainConfig(data=str(data["labeled"]), images=images, out=str(folder), model="small_fcos",
                              iterations=args.iterations, batch_size=args.batch_size, min_size=args.size,
                              max_size=args.size, pseudo=str(pseudo) if pseudo else None,
                              pseudo_images=images if pseudo else None, threads=args.threads, device="cpu",
                              seed=args.seed, warmup_iters=min(200, args.iterations // 5)))  # fmt: skip
        return folder / "checkpoint.pt"

    def student_metrics(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        detector = load_detector(str(checkpoint), device="cpu")
        metrics = evaluate_model(detector, val, images, device=torch.device("cpu"), batch_size=4, max_dets=val_dets)
        coco = evaluate_model(load_detector(str(checkpoint), device="cpu", max_det=100), val, images,
                              device=torch.device("cpu"), batch_size=4, max_dets=100)  # fmt: skip
        keep = ("AP", "AP50", "AR100")
        return ({k: pct(metrics["bbox"][k]) for k in keep}, {k: pct(coco["bbox"][k]) for k in keep})

    teacher = fit("teacher", None)
    results: dict[str, Any] = {
        "objects_per_image": {split: objects_per_image(load_coco(data[split])) for split in ("labeled", "val")},
        "val_max_dets": val_dets, "unlabeled_max_dets": truth_dets, "arms": {},
    }  # fmt: skip
    t_data = load_coco(data["unlabeled_truth"])
    results["objects_per_image"]["unlabeled"] = objects_per_image(t_data)
    results["teacher"], _ = student_metrics(teacher)
    for arm, max_det in ARMS.items():
        folder = work / f"label_{arm.replace(' ', '_')}"
        label(LabelConfig(model=str(teacher), images=str(data["unlabeled"]), image_root=images, out=str(folder),
                          views="identity", max_det=max_det, workers=0, threads=args.threads, device="cpu",
                          batch_size=4, allow_weak_teacher=True))  # fmt: skip
        config = read_json(folder / "manifest.json")["config"]
        counts = [len(s) for s in read_shards(folder, columns=["scores"]).column("scores").to_pylist()]
        pseudo = folder / "pseudo.json"
        if not pseudo.exists():
            select_pseudo_labels(SelectConfig(labels=str(folder), reference=str(data["labeled"]), out=str(pseudo)))
        recall = evaluate_results(t_data, load_predictions(pseudo, t_data), max_dets=truth_dets)["bbox"]
        student, at_100 = student_metrics(fit(f"student_{arm.replace(' ', '_')}", pseudo))
        results["arms"][arm] = {"max_det": config["max_det"], "candidates_per_image": sum(counts) / len(counts),
                                "max_candidates": max(counts), "pseudo_recall": pct(recall["AR100"]),
                                "pseudo_ap": pct(recall["AP"]),
                                "pseudo_per_image": len(read_json(pseudo)["annotations"]) / len(counts),
                                "student": student, "student_at_100": at_100}  # fmt: skip
    oracle, oracle_100 = student_metrics(fit("student_oracle", data["unlabeled_truth"]))
    results["arms"]["oracle"] = {"student": oracle, "student_at_100": oracle_100}
    results["settings"] = vars(args)
    results["total_seconds"] = round(time.time() - started, 1)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)
    results["provenance"] = provenance()
    write_json_atomic(out, results, indent=2)
    print(format_table(results))
    print(f"teacher on V: {results['teacher']} (maxDets {val_dets}); total {results['total_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
