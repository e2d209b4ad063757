"""Do our views help a DETR-family teacher from Hugging Face transformers, and its student?

    flock /tmp/dd/cpu.lock python bench/hf_views.py --threads 1 --out bench/results/hf_views.json

A small RT-DETR (``transformers.RTDetrForObjectDetection``: a 4-stage ResNet of 24-192 channels, a
64-wide hybrid encoder and 3 decoder layers, 50 queries, denoising; about 1.6M parameters) is written with
random weights by ``save_pretrained`` and trained here from scratch, as ``--model hf:FOLDER``, in
datadistill's loop with its own loss (Hungarian matching), on the labeled split L of the synthetic shapes
(``synth shapes``, 128 px, the demo's splits: L, U with labels held back, V). U is then labeled under each
arm's views (``label``, nms fusion) and:

- every fused candidate above the floor (the shards, before any selection) is scored against U's held-back
  labels as COCO box AP: the pseudo-labels' quality, threshold-free;
- ``select`` keeps as many as L has objects per image (the count rule), and a student, the same RT-DETR
  from its random initial weights, trains on L + those pseudo-labels (6:4 minibatches) for the teacher's
  iterations; its box AP on V is the arm's result.

Arms: ``identity`` (one view) and ``default`` (scales 0.75, 1, 1.25, 1.5, each with and without flip: 8
views; a scale view changes the image processor's size). Every stage writes into ``--work`` and is skipped
when done, so a killed run resumes; the ratios of one table come from one run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import common
import torch

from datadistill.core.views import parse_views
from datadistill.data.coco import CocoDataset, load_coco, read_json
from datadistill.data.synth import SHAPE_CLASSES
from datadistill.demo import DemoPlan, make_demo_data
from datadistill.models.detector import load_detector, trained_file
from datadistill.runtime.io import write_json_atomic
from datadistill.stages.evaluate import evaluate_model, evaluate_predictions
from datadistill.stages.label import LabelConfig
from datadistill.stages.select import SelectConfig, select_pseudo_labels
from datadistill.stages.train import TrainConfig, train

ARMS = {"identity": "identity", "default": "default"}  # arm -> --views
REFERENCE = "identity"
SINGLE_VIEWS = ("hflip", "scale:0.75", "scale:1.25", "scale:1.5")  # each of the default views alone: pseudo AP only


def write_model(folder: Path, *, size_px: int, width: int, queries: int, seed: int) -> Path:
    """A random RT-DETR for the shape classes, its processor at ``size_px`` (skipped when written)."""
    if (folder / "model.safetensors").is_file():
        return folder
    import transformers

    w = width
    backbone = transformers.RTDetrResNetConfig(embedding_size=w, hidden_sizes=[w, 2 * w, 4 * w, 8 * w],
                                               depths=[1, 1, 1, 1], layer_type="basic",
                                               out_features=["stage2", "stage3", "stage4"])  # fmt: skip
    config = transformers.RTDetrConfig(
        backbone_config=backbone, use_pretrained_backbone=False, encoder_hidden_dim=64,
        encoder_in_channels=[2 * w, 4 * w, 8 * w], d_model=64, decoder_in_channels=[64, 64, 64], encoder_layers=1,
        decoder_layers=3, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_attention_heads=4,
        decoder_attention_heads=4, num_queries=queries, num_denoising=30, id2label=dict(enumerate(SHAPE_CLASSES)),
        label2id={n: i for i, n in enumerate(SHAPE_CLASSES)},
    )  # fmt: skip
    torch.manual_seed(seed)
    transformers.RTDetrForObjectDetection(config).save_pretrained(folder)
    transformers.RTDetrImageProcessor(size={"height": size_px, "width": size_px}).save_pretrained(folder)
    return folder


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{'views':10}{'n':>3}{'pseudo AP':>11}{'AP50':>7}{'ratio':>7}{'kept/img':>10}{'student AP':>12}"
             f"{'AP50':>7}{'ratio':>7}",
             f"{'teacher':10}{'':>3}{'':>11}{'':>7}{'':>7}{'':>10}{results['teacher']['val']['AP']:12.1f}"
             f"{results['teacher']['val']['AP50']:7.1f}"]  # fmt: skip
    ref = results["arms"][REFERENCE]
    for name, r in results["arms"].items():
        p, s = r["pseudo_labels"], r["student"]
        ratio_p = p["AP"] / ref["pseudo_labels"]["AP"] if ref["pseudo_labels"]["AP"] else float("nan")
        ratio_s = s["AP"] / ref["student"]["AP"] if ref["student"]["AP"] else float("nan")
        lines.append(f"{name:10}{r['num_views']:3d}{p['AP']:11.1f}{p['AP50']:7.1f}{ratio_p:7.2f}"
                     f"{r['kept_per_image']:10.2f}{s['AP']:12.1f}{s['AP50']:7.1f}{ratio_s:7.2f}")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = common.parser(__doc__)
    p.add_argument("--seed", type=int, default=0, help="data and training seed")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--labeled", type=int, default=300, help="labeled images L (300)")
    p.add_argument("--unlabeled", type=int, default=300, help="unlabeled images U, labels held back (300)")
    p.add_argument("--val", type=int, default=100, help="validation images V (100)")
    p.add_argument("--size", type=int, default=128, help="image side and model input in px (128)")
    p.add_argument("--width", type=int, default=24, help="the backbone's first stage width (24)")
    p.add_argument("--queries", type=int, default=50, help="object queries (50)")
    p.add_argument("--iterations", type=int, default=1500, help="teacher and student iterations (1500)")
    p.add_argument("--batch-size", type=int, default=8, help="minibatch (8)")
    p.add_argument("--lr", type=float, default=4e-4, help="AdamW peak lr (4e-4: from scratch)")
    p.add_argument("--only", default=None, help="comma-separated arms (default: all; the reference always runs)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.init_worker(args.threads)
    out = Path(args.out)
    work = common.work_folder(args)
    started, load_start = time.time(), common.load_now()
    stages = common.Stages()
    plan = DemoPlan(labeled=args.labeled, unlabeled=args.unlabeled, val=args.val, size_px=args.size, teacher_epochs=1,
                    student_epochs=1, batch_size=args.batch_size, views="default")  # fmt: skip
    data = make_demo_data(work / "data", task="boxes", plan=plan, seed=args.seed)
    model = write_model(work / "model", size_px=args.size, width=args.width, queries=args.queries, seed=args.seed)
    train_options = dict(model=f"hf:{model}", iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
                  seed=args.seed, threads=args.threads, workers=0, device="cpu", val=data.val,
                  val_images=data.val_images)  # fmt: skip

    def train_in(folder: Path, **kw: Any) -> Path:
        cfg = TrainConfig(data=str(data.train), images=str(data.train_images), out=str(folder),
                          resume=(folder / "last.pt").exists(), **train_options, **kw)  # type: ignore[arg-type]  # fmt: skip
        stages.run(f"train {folder.name}", folder / "hf_model", lambda: train(cfg))
        return folder

    teacher = train_in(work / "teacher")
    truth, val = load_coco(data.unlabeled_truth), load_coco(data.val, image_root=data.val_images)
    results: dict[str, Any] = {"teacher": {"val": _val_ap(teacher, val, data.val_images)}, "arms": {}}
    arms = {k: v for k, v in ARMS.items() if not args.only or k in set(args.only.split(",")) | {REFERENCE}}
    for name, views in arms.items():
        folder = work / f"label-{name}"
        stages.run(f"label {name}", folder / "manifest.complete",
                   lambda f=folder, v=views: _label(teacher, data, f, views=v, threads=args.threads))  # fmt: skip
        pseudo = work / f"select-{name}" / "pseudo.json"
        select_cfg = SelectConfig(labels=str(folder), reference=str(data.train), out=str(pseudo))
        stages.run(f"select {name}", pseudo, lambda c=select_cfg: select_pseudo_labels(c))
        student = train_in(work / f"student-{name}", pseudo=str(pseudo), pseudo_images=str(data.unlabeled_images))
        kept = len(read_json(pseudo)["annotations"])
        results["arms"][name] = {
            "views": views, "num_views": len(parse_views(views)),
            "pseudo_labels": _pseudo_ap(folder, truth),
            "kept_per_image": round(kept / max(1, len(truth.images)), 2),
            "student": _val_ap(student, val, data.val_images),
            "label_seconds": read_json(folder / "manifest.json")["timings"]["total_s"],
        }  # fmt: skip
    results["single_views"] = {}
    for view in SINGLE_VIEWS:  # what each view gives alone: the pseudo-labels' AP, no student
        folder = work / f"label-{view.replace(':', '')}"
        stages.run(f"label {view}", folder / "manifest.complete",
                   lambda f=folder, v=view: _label(teacher, data, f, views=v, threads=args.threads))  # fmt: skip
        results["single_views"][view] = _pseudo_ap(folder, truth)
    _finish(results, args, argv, stages.seconds, started=started, load_start=load_start, truth=truth)
    write_json_atomic(out, results, indent=2)
    print(format_table(results))
    print("each view alone, pseudo AP:", ", ".join(f"{v} {m['AP']}" for v, m in results["single_views"].items()))
    print(f"total {results['total_seconds'] / 60:.1f} min, {results['cpu_seconds'] / 60:.1f} CPU min (this run; stages "
          f"done earlier are not counted); load average {load_start[0]} at the start")  # fmt: skip
    return 0


def _pseudo_ap(folder: Path, truth: CocoDataset) -> dict[str, float | None]:
    """Box AP (percent) on U's held-back labels of every fused candidate of a labeling folder."""
    return common.percent(evaluate_predictions(truth, common.fused_candidates(folder, truth))["bbox"])


def _val_ap(folder: Path, val: CocoDataset, images: str | None) -> dict[str, float | None]:
    """Box AP (percent) on V of a finished training folder."""
    spec = trained_file(folder)
    assert spec is not None
    metrics = evaluate_model(load_detector(spec), val, images, device=torch.device("cpu"), batch_size=8, workers=0)
    return common.percent(metrics["bbox"])


def _finish(results: dict[str, Any], args: argparse.Namespace, argv: list[str] | None, seconds: dict[str, float], *,
            started: float, load_start: list[float], truth: CocoDataset) -> None:  # fmt: skip
    """Ratios, the plan, timings and provenance."""
    ref = results["arms"][REFERENCE]
    results["ratios_vs_identity"] = {
        name: {part: round(r[part]["AP"] / ref[part]["AP"], 3) if ref[part]["AP"] else None
               for part in ("pseudo_labels", "student")}
        for name, r in results["arms"].items()
    }  # fmt: skip
    results["data"] = {"labeled": args.labeled, "unlabeled": args.unlabeled, "val": args.val, "size_px": args.size,
                       "objects_in_U": truth.num_annotations, "seed": args.seed}  # fmt: skip
    results["model"] = {"architecture": "RTDetrForObjectDetection", "width": args.width, "queries": args.queries,
                        "iterations": args.iterations, "batch_size": args.batch_size, "lr": args.lr,
                        "init": "random (from scratch)"}  # fmt: skip
    results["seconds"], results["threads"] = seconds, args.threads
    results.update(common.run_facts(started=started, load_start=load_start, script="hf_views.py", argv=argv))


def _label(teacher: Path, data: Any, folder: Path, *, views: str, threads: int) -> None:
    """``label`` U with the teacher under ``views`` (nms fusion), marked complete when it is."""
    cfg = LabelConfig(model=str(teacher), images=str(data.unlabeled), image_root=str(data.unlabeled_images),
                      out=str(folder), views=views, fuse="nms", workers=0, threads=threads, device="cpu",
                      allow_weak_teacher=True)  # fmt: skip
    common.label_complete(cfg, folder)


if __name__ == "__main__":
    raise SystemExit(main())
