"""Do tile views find the small objects that a teacher misses at full-image resolution?

    python bench/tiles.py --threads 2 --out bench/results/tiles.json

Large synthetic images with many small objects (``synth shapes --small-objects``, 512 px: shapes 2.5% to
20% of the side, 13 to 100 px) are split into a labeled set L and an unlabeled set U whose labels are held
back. The teacher, ``small_fcos``, trains on L at a 192 px input: each image is shrunk 2.7x, so that a
shape under 32 px (COCO's "small") is under 12 px, about one stride (8 px) of the model's finest level,
when the model sees the whole image.
U is then labeled (``label``, nms fusion) under each view set of :data:`ARMS`, and every fused candidate
above the floor (the shards, before any selection) is scored against U's held-back labels as COCO box AP:

- ``default``: the 8 default views (scales 0.75 to 1.5, each with and without flip);
- ``default+tile:2x2`` / ``default+tile:3x3``: the same plus the 4 / 9 tiles of a grid overlapping by 25%,
  each tile cropped and given to the model at its 192 px input (magnified 1.75x / 2.5x against the whole
  image), fragments on inner tile edges dropped (:mod:`datadistill.core.views`);
- ``default+tile:2x2+scale:1.5``: 4 tiles composed with a scale (each run at a 288 px input: 2.6x);
- ``tile:3x3 alone``: the tiles without the full-image views, to show what they cannot do alone (shapes
  larger than the overlap are cut in every tile).

Every stage writes into ``--work`` (default: next to ``--out``) and is skipped when done, so a killed run
resumes; the ratios of one table come from one run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import common

from datadistill.core.views import parse_views
from datadistill.data.coco import CocoDataset, ImageLabels, load_coco, read_json, save_coco
from datadistill.data.synth import make_shapes
from datadistill.runtime.io import write_json_atomic
from datadistill.stages.evaluate import evaluate_predictions
from datadistill.stages.label import LabelConfig
from datadistill.stages.train import TrainConfig, train

# arm -> --views
ARMS = {
    "default": "default",
    "default+tile:2x2": "default,tile:2x2",
    "default+tile:3x3": "default,tile:3x3",
    "default+tile:2x2+scale:1.5": "default,tile:2x2+scale:1.5",
    "tile:3x3 alone": "tile:3x3",
}
REFERENCE = "default"
SCORES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def make_data(work: Path, *, labeled: int, unlabeled: int, size_px: int, seed: int) -> dict[str, Path]:
    """The synthetic images and their L / U splits under ``work`` (skipped when done)."""
    paths = {name: work / f"{name}.json" for name in ("labeled", "unlabeled", "unlabeled_truth")}
    paths["images"] = work / "images"
    done = work / "splits.done"
    if done.exists():
        return paths
    make_shapes(work, num_images=labeled + unlabeled, seed=seed, size_px=size_px, small_objects=True)
    full = load_coco(work / "annotations.json", image_root=work / "images")

    def subset(images: tuple[Any, ...], *, keep_labels: bool) -> CocoDataset:
        labels = {im.id: full.labels[im.id] if keep_labels else ImageLabels.empty() for im in images}
        return CocoDataset(images=images, labels=labels, categories=full.categories, info=full.info)

    save_coco(subset(full.images[:labeled], keep_labels=True), paths["labeled"])
    save_coco(subset(full.images[labeled:], keep_labels=False), paths["unlabeled"])
    save_coco(subset(full.images[labeled:], keep_labels=True), paths["unlabeled_truth"])
    done.write_text("ok\n")
    return paths


def format_table(results: dict[str, Any]) -> str:
    ref = results["arms"][REFERENCE]
    lines = [f"{'views':28}{'n':>4}{'AP':>7}{'AP50':>7}{'APs':>7}{'APm':>7}{'APl':>7}"
             f"{'AP ratio':>10}{'AP50 ratio':>11}{'/img':>7}{'label s':>9}"]  # fmt: skip
    for name, r in results["arms"].items():
        m = r["pseudo_labels"]
        cells = "".join(
            f"{'-' if m[k] is None else format(m[k], '.1f'):>7}" for k in ("AP", "AP50", "APs", "APm", "APl")
        )
        ratio = m["AP"] / ref["pseudo_labels"]["AP"] if ref["pseudo_labels"]["AP"] else float("nan")
        ratio50 = m["AP50"] / ref["pseudo_labels"]["AP50"] if ref["pseudo_labels"]["AP50"] else float("nan")
        lines.append(f"{name:28}{r['num_views']:4d}{cells}{ratio:10.2f}{ratio50:11.2f}{r['candidates_per_image']:7.1f}"
                     f"{r['label_seconds']:9.0f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--seed", type=int, default=0, help="data and training seed")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader processes decoding the teacher's images (1)")
    p.add_argument("--labeled", type=int, default=300, help="labeled images L (300)")
    p.add_argument("--unlabeled", type=int, default=200, help="unlabeled images U, labels held back (200)")
    p.add_argument("--size", type=int, default=512, help="image side in px (512)")
    p.add_argument("--input-size", type=int, default=192, help="the teacher's input size in px (192)")
    p.add_argument("--iterations", type=int, default=1000, help="teacher training iterations (1000)")
    p.add_argument("--batch-size", type=int, default=8, help="teacher minibatch (8)")
    p.add_argument("--only", default=None, help="comma-separated arms (default: all; the reference always runs)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be at least 1")
    common.init_worker(args.threads)
    out = Path(args.out)
    work = common.work_folder(args)
    started, load_start = time.time(), common.load_now()
    stages = common.Stages()
    timed = stages.run

    data: dict[str, Path] = {}
    timed("data", work / "data" / "splits.done", lambda: data.update(make_data(
        work / "data", labeled=args.labeled, unlabeled=args.unlabeled, size_px=args.size, seed=args.seed)))  # fmt: skip
    data = data or make_data(work / "data", labeled=args.labeled, unlabeled=args.unlabeled, size_px=args.size,
                             seed=args.seed)  # fmt: skip
    teacher = work / "teacher"
    cfg = TrainConfig(
        data=str(data["labeled"]), images=str(data["images"]), out=str(teacher), model="small_fcos",
        iterations=args.iterations, batch_size=args.batch_size, min_size=args.input_size, max_size=args.input_size,
        seed=args.seed, threads=args.threads, workers=args.workers, device="cpu", resume=(teacher / "last.pt").exists(),
    )  # fmt: skip
    timed("train teacher", teacher / "checkpoint.pt", lambda: train(cfg))
    truth = load_coco(data["unlabeled_truth"])
    arms = dict(ARMS)
    if args.only:
        wanted = set(args.only.split(",")) | {REFERENCE}
        arms = {k: v for k, v in arms.items() if k in wanted}
    results: dict[str, Any] = {"arms": {}}
    for name, views in arms.items():
        folder = work / ("label-" + views.replace(",", "_").replace(":", ""))
        label_cfg = LabelConfig(
            model=str(teacher / "checkpoint.pt"), images=str(data["unlabeled"]), image_root=str(data["images"]),
            out=str(folder), views=views, fuse="nms", workers=0, threads=args.threads, device="cpu",
        )  # fmt: skip
        timed(f"label {name}", folder / "manifest.complete", lambda c=label_cfg, f=folder: common.label_complete(c, f))
        preds = common.fused_candidates(folder, truth)
        results["arms"][name] = {
            "views": views,
            "num_views": len(parse_views(views)),
            "pseudo_labels": common.percent(evaluate_predictions(truth, preds)["bbox"], SCORES),
            "candidates_per_image": round(sum(len(d) for d in preds.values()) / max(1, len(preds)), 2),
            "label_seconds": read_json(folder / "manifest.json")["timings"]["total_s"],
        }
    ref = results["arms"][REFERENCE]["pseudo_labels"]
    results["ratios_vs_default"] = {
        name: {k: round(r["pseudo_labels"][k] / ref[k], 3) if ref[k] else None for k in ("AP", "AP50")}
        for name, r in results["arms"].items()
    }
    results["data"] = {"labeled": args.labeled, "unlabeled": args.unlabeled, "size_px": args.size,
                       "objects_in_U": truth.num_annotations, "seed": args.seed}  # fmt: skip
    results["teacher"] = {"model": "small_fcos", "input_size": args.input_size, "iterations": args.iterations,
                          "batch_size": args.batch_size}  # fmt: skip
    results["seconds"] = stages.seconds
    results["threads"], results["workers"] = args.threads, args.workers
    results.update(common.run_facts(started=started, load_start=load_start, script="tiles.py", argv=argv))
    write_json_atomic(out, results, indent=2)
    print(format_table(results))
    print(f"total {results['total_seconds'] / 60:.1f} min, {results['cpu_seconds'] / 60:.1f} CPU min (this run; stages "
          f"done earlier are not counted); load average {load_start[0]} at the start")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
