"""YOLO pose pseudo-labels from datadistill's views vs Ultralytics' own test-time augmentation (issue 9).

    python bench/yolo_pose_tta.py            # about 20 minutes on one CPU thread
    python bench/yolo_pose_tta.py --quick    # a smoke run of a minute; its numbers mean nothing
    python bench/yolo_pose_tta.py --tune     # also compare fusion settings on the tuning images

Trains ``yolo11n-pose.yaml`` from scratch (no pretrained weights) on ``synth figures`` with
``datadistill train --model yolo:...`` (Ultralytics' trainer and recipe), then labels held-out figures whose
labels are held back, three ways, with the same model, score threshold and detections per image:

- ``ultralytics augment=True``: Ultralytics' test-time augmentation; a pose head falls back to one view
  (Ultralytics warns), so this is what a YOLO pose user gets from it;
- ``datadistill views``: ``datadistill label`` with the given views (default: 4 scales x flip), box fusion
  and mean keypoint fusion; the shards are the predictions;
- ``single view``: plain ``predict``, for reference.

Each is scored by keypoint AP (and box AP) against the held-back labels with datadistill's COCO evaluator
(the figures' OKS sigmas). ``--tune`` compares fusion settings on a tuning set drawn with another seed and
reports the best of them on the evaluation images too: nothing is chosen on the evaluation images.
Prints a table and writes ``results.json`` into ``--out``; a trained model there is reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

SEEDS = {"train": 1, "eval": 2, "tune": 3}
TUNE_GRID = [  # (views, fuse, iou_thr); 0.7 is Ultralytics' own NMS IoU within one view
    ("default", "nms", 0.5),
    ("default", "nms", 0.6),
    ("default", "nms", 0.7),
    ("default", "wbf", 0.55),
    ("default", "wbf", 0.7),
    ("default", "vote", 0.5),
    ("default", "vote", 0.7),
    ("identity,hflip", "nms", 0.7),
    ("identity,hflip,scale:0.75,hflip+scale:0.75", "nms", 0.7),
]


def _data(out: Path, split: str, count: int, size: int) -> Path:
    from datadistill.data.synth import make_figures

    folder = out / "data" / split
    if not (folder / "annotations.json").exists():
        make_figures(folder, num_images=count, seed=SEEDS[split], size_px=size)
    return folder / "annotations.json"


def _teacher(out: Path, train_json: Path, args: argparse.Namespace) -> tuple[Path, float]:
    from datadistill.stages.train import TrainConfig, train

    weights = out / "teacher" / "yolo.pt"
    if weights.exists():
        return weights, json.loads((out / "teacher" / "timings.json").read_text())["train_s"]
    cfg = TrainConfig(
        data=str(train_json), images=str(train_json.parent / "images"), out=str(out / "teacher"),
        model=f"yolo:{args.model}", epochs=args.epochs, batch_size=args.batch_size, min_size=args.size,
        device="cpu", threads=args.threads, workers=0, seed=0,
    )  # fmt: skip
    train(cfg)
    return weights, json.loads((out / "teacher" / "timings.json").read_text())["train_s"]


def _images(gt: Any, root: Path) -> tuple[list[int], list[torch.Tensor]]:
    from datadistill.data.images import read_image, resolve_image_path

    ids = [im.id for im in gt.images]
    images = [read_image(resolve_image_path(root, im.file_name)).float().div_(255) for im in gt.images]
    return ids, images


def _predict_arm(model: Any, gt: Any, root: Path, *, augment: bool, batch: int) -> tuple[dict[str, Any], float]:
    from datadistill.stages.evaluate import evaluate_predictions

    ids, images = _images(gt, root)
    t0 = time.perf_counter()
    predictions = {}
    for i in range(0, len(images), batch):
        for iid, det in zip(ids[i : i + batch], model.predict(images[i : i + batch], augment=augment), strict=True):
            predictions[iid] = det
    seconds = time.perf_counter() - t0
    return evaluate_predictions(gt, predictions), seconds


def _views_arm(
    weights: Path, gt_json: Path, out: Path, *, views: str, fuse: str, iou_thr: float, args: argparse.Namespace
) -> tuple[dict[str, Any], float]:
    from datadistill.data.coco import load_coco
    from datadistill.stages.evaluate import evaluate_predictions
    from datadistill.stages.label import LabelConfig, label, read_shards, shard_detections

    gt = load_coco(gt_json)
    cfg = LabelConfig(
        model=f"yolo:{weights}", images=str(gt_json), image_root=str(gt_json.parent / "images"), out=str(out),
        views=views, fuse=fuse, keypoint_fuse="mean", iou_thr=iou_thr, score_floor=args.conf,
        batch_size=args.batch_size, shard_size=1000, workers=0, threads=args.threads, device="cpu", overwrite=True,
    )  # fmt: skip
    t0 = time.perf_counter()
    label(cfg)
    seconds = time.perf_counter() - t0
    by_name = {im.file_name: im.id for im in gt.images}
    k = gt.num_keypoints
    predictions = {by_name[r["file_name"]]: shard_detections(r, k) for r in read_shards(out).to_pylist()}
    return evaluate_predictions(gt, predictions), seconds


def _row(name: str, metrics: dict[str, Any], seconds: float, images: int) -> dict[str, Any]:
    kp, box = metrics["keypoints"], metrics["bbox"]
    return {"arm": name, "keypoint_AP": kp["AP"], "keypoint_AP50": kp["AP50"], "keypoint_AP75": kp["AP75"],
            "keypoint_AR": kp["AR"], "box_AP": box["AP"], "seconds": round(seconds, 2),
            "images_per_s": round(images / seconds, 2) if seconds > 0 else None}  # fmt: skip


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'':<60}{'kp AP':>7}{'AP50':>7}{'AP75':>7}{'AR':>7}{'box AP':>8}{'img/s':>8}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['arm']:<60}{100 * r['keypoint_AP']:>7.1f}{100 * r['keypoint_AP50']:>7.1f}"
                     f"{100 * r['keypoint_AP75']:>7.1f}{100 * r['keypoint_AR']:>7.1f}{100 * r['box_AP']:>8.1f}"
                     f"{r['images_per_s'] or 0:>8.1f}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench_yolo_pose_tta"))
    p.add_argument("--model", default="yolo11n-pose.yaml", help="an Ultralytics pose model YAML")
    p.add_argument("--train-images", type=int, default=600)
    p.add_argument("--eval-images", type=int, default=300)
    p.add_argument("--tune-images", type=int, default=150)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=128, help="image side and YOLO imgsz (px)")
    p.add_argument("--views", default="default", help="datadistill's views (see `datadistill label --help`)")
    p.add_argument("--fuse", default="nms")
    p.add_argument("--iou-thr", type=float, default=0.7, help="fusion IoU (0.7: Ultralytics' own NMS IoU in a view)")
    p.add_argument("--conf", type=float, default=0.01, help="score threshold of every arm's predictions")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tune", action="store_true", help="compare fusion settings on the tuning images")
    p.add_argument("--quick", action="store_true", help="tiny sets and 3 epochs: a smoke run")
    args = p.parse_args()
    if args.quick:
        args.train_images, args.eval_images, args.tune_images, args.epochs = 48, 24, 16, 3
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    from datadistill.data.coco import load_coco
    from datadistill.models import ultralytics as ub

    args.out.mkdir(parents=True, exist_ok=True)
    train_json = _data(args.out, "train", args.train_images, args.size)
    eval_json = _data(args.out, "eval", args.eval_images, args.size)
    tune_json = _data(args.out, "tune", args.tune_images, args.size) if args.tune else None
    weights, train_s = _teacher(args.out, train_json, args)

    model = ub.load_yolo(f"yolo:{weights}")
    model.conf = args.conf

    def evaluate_all(gt_json: Path, label_dir: str, settings: list[tuple[str, str, float]]) -> list[dict[str, Any]]:
        gt = load_coco(gt_json)
        n = len(gt.images)
        rows = []
        metrics, s = _predict_arm(model, gt, gt_json.parent / "images", augment=True, batch=args.batch_size)
        rows.append(_row("ultralytics augment=True", metrics, s, n))
        for views, fuse, iou in settings:
            metrics, s = _views_arm(weights, gt_json, args.out / label_dir / f"{views}-{fuse}-{iou}".replace(",", "_"),
                                    views=views, fuse=fuse, iou_thr=iou, args=args)  # fmt: skip
            rows.append(_row(f"datadistill views={views} {fuse}@{iou}", metrics, s, n))
        metrics, s = _predict_arm(model, gt, gt_json.parent / "images", augment=False, batch=args.batch_size)
        rows.append(_row("single view", metrics, s, n))
        return rows

    results: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "train_s": round(train_s, 1)}  # fmt: skip
    chosen = [(args.views, args.fuse, args.iou_thr)]
    if tune_json is not None:
        tune_rows = evaluate_all(tune_json, "labels_tune", TUNE_GRID)
        results["tune"] = tune_rows
        print(f"tuning images ({args.tune_images}, seed {SEEDS['tune']}):\n{_table(tune_rows)}\n")
        best = max((r for r in tune_rows if r["arm"].startswith("datadistill")), key=lambda r: r["keypoint_AP"])
        best_setting = TUNE_GRID[[r["arm"] for r in tune_rows if r["arm"].startswith("datadistill")].index(best["arm"])]
        results["chosen_on_tune"] = best_setting
        if best_setting not in chosen:
            chosen.append(best_setting)
    rows = evaluate_all(eval_json, "labels_eval", chosen)
    results["eval"] = rows
    results["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"evaluation images ({args.eval_images}, seed {SEEDS['eval']}, labels held back); model {args.model} "
          f"trained {args.epochs} epochs on {args.train_images} images at {args.size} px "
          f"({train_s / 60:.1f} min):")  # fmt: skip
    print(_table(rows))
    print(f"wall time {results['wall_s'] / 60:.1f} min")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
