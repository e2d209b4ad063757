"""The ``datadistill`` command line: one subcommand per stage. Only this module prints."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from datadistill import __version__
from datadistill.config import PRECISIONS
from datadistill.errors import UserError, bounded_line

log = logging.getLogger("datadistill")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# --------------------------------------------------------------------------------------------------
# validate


def cmd_validate(args: argparse.Namespace) -> int:
    from datadistill.data.coco import parse_coco, read_json, validate_coco

    problems = validate_coco(args.coco, args.images)
    for p in problems:
        print(f"{args.coco}: {p}")
    if problems:
        print(f"{args.coco}: {len(problems)} problem{'s' if len(problems) != 1 else ''} found")
        return 1
    dataset, _ = parse_coco(read_json(args.coco), image_root=args.images)
    checked = "images checked" if args.images else "images not checked (pass --images DIR)"
    print(
        f"{args.coco}: OK, {len(dataset.images)} images, {dataset.num_annotations} annotations, "
        f"{dataset.num_classes} categories ({dataset.task}); {checked}"
    )
    return 0


# --------------------------------------------------------------------------------------------------
# convert


def cmd_convert(args: argparse.Namespace) -> int:
    from datadistill.data.yolo_txt import convert

    out = convert(args.src, args.dst, to=args.to, images=args.images)
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------------------------------
# synth


def cmd_synth(args: argparse.Namespace) -> int:
    from datadistill.data import synth

    make = {"shapes": synth.make_shapes, "figures": synth.make_figures}[args.kind]
    for flag, given in (("--small-objects", args.small_objects), ("--dense", args.dense)):
        if given and args.kind != "shapes":
            raise UserError(f"synth {args.kind}: {flag} is for shapes only")
    if args.small_objects and args.dense:
        raise UserError("synth shapes: choose --small-objects or --dense, not both")
    extra = {"small_objects": True} if args.small_objects else {"dense": True} if args.dense else {}
    try:
        path = make(args.out, num_images=args.images, seed=args.seed, size_px=args.size, **extra)
    except ValueError as exc:
        raise UserError(f"synth {args.kind}: {exc}") from exc
    except OSError as exc:  # PIL's writes of a full disk name no file
        raise UserError(f"synth {args.kind}: cannot write {args.out}: {exc.strerror or exc}") from exc
    print(f"wrote {args.images} images and {path}")
    return 0


# --------------------------------------------------------------------------------------------------
# models


def cmd_models(args: argparse.Namespace) -> int:
    from datadistill.models.detector import list_models

    rows = list_models()
    width = max(len(name) for name, _, _ in rows)
    for name, task, description in rows:
        print(f"{name:<{width}}  {task:<9}  {description}")
    return 0


# --------------------------------------------------------------------------------------------------
# options generated from the stage configs (one flag per field: --batch-size for batch_size)


def _add_config_options(
    parser: argparse.ArgumentParser, cls: type, helps: dict[str, str], *, skip: tuple[str, ...] = ()
) -> None:
    """One option per dataclass field, typed from its annotation; required when the field has no default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default
        help_text = helps.get(f.name, "")
        if tp is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        base = args[0]
        kwargs: dict[str, typing.Any] = {"required": required, "help": help_text}
        if typing.get_origin(base) is tuple:
            kwargs.update(type=int, nargs="+")
        else:
            kwargs["type"] = base if base in (int, float) else str
        if not required:
            kwargs["default"] = default
            if default is not None and help_text:
                kwargs["help"] = f"{help_text} ({default})"
        parser.add_argument(flag, metavar=f.name.upper().split("_")[-1], **kwargs)


def _config_from_args(cls: type, args: argparse.Namespace, **fixed: typing.Any) -> typing.Any:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(fixed)
    for key, value in values.items():
        if isinstance(value, list):
            values[key] = tuple(value)
    return cls(**values)


PRECISION_HELP = "mixed precision: auto (bf16 on a GPU that has it, else fp32), fp32, bf16, or fp16 (GPU only)"

TRAIN_HELP = {
    "data": "COCO json of the labeled images",
    "images": "image root of --data: a folder, or an object-store prefix (s3://, gs://, az://)",
    "out": "output folder (checkpoint.pt, last.pt, metrics.jsonl, config.yaml)",
    "model": "a name from `datadistill models`, yolo:PATH_OR_YAML (Ultralytics: its trainer and recipe, "
    "writes OUT/yolo.pt; a .pt is read weights-only), or hf:PATH_OR_ID (a transformers detector in "
    "datadistill's loop with its own loss, writes OUT/hf_model/); default: the small model of the data's task",
    "epochs": "passes over the labeled images (or give --iterations; neither: 20 passes, but at least 1,000 "
    "iterations, so that a handful of labeled images trains long enough)",
    "iterations": "minibatches to train for (instead of --epochs)",
    "save_every": "epochs between writes of OUT/last.pt (default: every epoch, or about every 50 iterations)",
    "eval_every": "epochs between evaluations of --val (default: about five in the run)",
    "lr_steps": "lower the lr (x0.1) at these epochs (iterations with --iterations); default: 2/3 and 8/9 of the run",
    "batch_size": "images per minibatch",
    "lr": "peak learning rate (default: 2e-3 for small models, 1e-4 for pretrained ones with adamw; 0.01 sgd)",
    "optimizer": "adamw or sgd",
    "clip_grad_norm": "clip the gradient norm to this",
    "weight_decay": "weight decay",
    "warmup_iters": "iterations of linear lr warmup (at most a fifth of the run)",
    "init": "initial weights: none (default), weights:NAME (torchvision) or a file (e.g. teacher/checkpoint.pt)",
    "pseudo": "pseudo-labels from `datadistill select`: pseudo.parquet (read as memory-mapped columns) or a COCO "
    "json; trains a student",
    "pseudo_images": "image root of --pseudo (a folder or s3://, gs://, az:// prefix)",
    "pseudo_ratio": "fraction of each minibatch that is pseudo-labeled (the paper's 6:4)",
    "val": "COCO json evaluated after each epoch",
    "val_images": "image root of --val (default: --images)",
    "resume": "continue a killed run from OUT/last.pt",
    "device": "auto, cpu, cuda or cuda:N",
    "precision": PRECISION_HELP,
    "seed": "random seed of everything",
    "threads": "torch threads of this process (0: one per core that other processes leave free, followed "
    "during the run; give N for bit-identical reruns)",
    "workers": "DataLoader worker processes (1 thread each)",
    "min_size": "input size (short side, px; imgsz of yolo: models); default: the model's own; the small "
    "models: the labeled images' median short side, 128-160 px on a CPU, 128-512 on a GPU (logged)",
    "max_size": "input size cap (long side, px); default: the model's (the small models: --min-size's)",
    "max_det": "detections per image the model keeps, recorded in its checkpoint (default: twice the 99th "
    "percentile of the labeled objects per image, at least the library's 100)",
}


def cmd_train(args: argparse.Namespace) -> int:
    from datadistill.config import TrainConfig
    from datadistill.models.detector import trained_name
    from datadistill.runtime.distributed import launch_from_env
    from datadistill.stages.train import train

    out = train(_config_from_args(TrainConfig, args))
    if launch_from_env().is_main:  # under torchrun, rank 0 speaks for all
        print(f"wrote {out / trained_name(args.model)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from datadistill.data.coco import load_coco
    from datadistill.stages.evaluate import evaluate_results, format_metrics, load_predictions, write_metrics

    if args.checkpoint is not None and args.model is not None:
        raise UserError("give the model once: --model SPEC (--checkpoint is its former name)")
    spec = args.model if args.model is not None else args.checkpoint
    if (spec is None) == (args.predictions is None):
        raise UserError("give one of --model SPEC --images DIR, or --predictions P.json")
    if spec is not None:
        if args.images is None:
            raise UserError(f"{'--model' if args.model is not None else '--checkpoint'} needs --images DIR "
                            "(the image root of --data)")  # fmt: skip
        metrics = _evaluate_model(spec, args)
    else:
        gt = load_coco(args.data)
        metrics = evaluate_results(gt, load_predictions(args.predictions, gt), evaluator=args.evaluator,
                                   max_dets=args.max_dets)  # fmt: skip
    write_metrics(args.out, metrics)
    print(format_metrics(metrics))
    print(f"wrote {args.out}")
    return 0


def _evaluate_model(spec: str, args: argparse.Namespace) -> dict[str, typing.Any]:
    import torch

    from datadistill.data.coco import load_coco
    from datadistill.models.detector import load_detector
    from datadistill.runtime.devices import resolve_device, resolve_precision
    from datadistill.stages.evaluate import evaluate_model

    if args.threads:
        torch.set_num_threads(args.threads)
    gt = load_coco(args.data, image_root=args.images)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    detector = load_detector(spec, device=device)
    if tuple(detector.meta.class_names) != gt.class_names:
        raise UserError(
            f"{spec} predicts classes {list(detector.meta.class_names)[:6]} but {args.data} has "
            f"{list(gt.class_names)[:6]}"
        )
    return evaluate_model(detector, gt, args.images, device=device, batch_size=args.batch_size, workers=args.workers,
                          evaluator=args.evaluator, precision=precision, max_dets=args.max_dets)  # fmt: skip


LABEL_HELP = {
    "model": "the teacher: a checkpoint.pt, a training folder (OUT of `datadistill train`), yolo:PATH.pt (an "
    "Ultralytics .pt, read weights-only: Ultralytics' classes; keypoints fused by mean; use --iou-thr 0.7), or "
    "hf:PATH_OR_ID (a transformers detector: a save_pretrained folder or a hub id; open-vocabulary ones such as "
    "OWLv2 take --prompts)",
    "checkpoint": "the former name of --model",
    "images": "unlabeled images: a folder or an object-store prefix (s3://, gs://, az://; recursive), a text file "
    "of paths, or a COCO json",
    "out": "output folder (shards/part-NNNNN.parquet, manifest.json)",
    "image_root": "root of the paths in a list or COCO json, a folder or an s3://... prefix (default: the file's "
    "folder, or images/ beside a json)",
    "views": "comma list of identity, hflip, scale:F, hflip+scale:F, tile:RxC (the R*C tiles of a grid, each "
    "cropped and run at the model's input size; tile:RxC@O overlaps them by O of the tile side, default 0.25; one "
    "tile is tile:RxC:rIcJ; composes: hflip+tile:2x2, tile:3x3+scale:1.5), default (scales 0.75, 1, 1.25, 1.5, "
    "each with and without flip: 8 views) or paper (18 views); e.g. default,tile:2x2 adds 4 tiles to the default",
    "fuse": "box fusion: nms (the paper), soft-nms, vote, wbf",
    "keypoint_fuse": "keypoint fusion: heatmap (the paper) or mean",
    "iou_thr": "IoU threshold of the box fusion",
    "score_floor": "keep every fused object scoring at least this",
    "batch_size": "images per forward pass",
    "shard_size": "images per shard",
    "workers": "DataLoader processes decoding images",
    "threads": "torch threads of the labeling process",
    "device": "auto, cpu, cuda or cuda:N",
    "precision": PRECISION_HELP,
    "sync": "fuse and write in the labeling loop itself, not in a thread beside the next batch (the same shards; "
    "measured faster for a small model on a GPU, slower for a large one)",
    "overwrite": "replace labels made with another checkpoint, views or fusion",
    "allow_weak_teacher": "go on when the teacher finds no object above --score-floor on any image (else: an error)",
    "engine": "local (this process, or each torchrun process) or ray (Ray Data; pip install 'datadistill[ray]')",
    "ray_address": "with --engine ray: a running Ray cluster to join (default: start one on this machine)",
    "max_det": "detections per image and view the teacher keeps (default: what its checkpoint records: twice the "
    "99th percentile of its labeled objects per image, at least the library's 100)",
    "decode": "where JPEGs are decoded: auto (on the device if it is a GPU, else cpu), cpu (PIL, in the --workers) "
    "or device (torchvision's decode_jpeg on --device, one call per batch; other formats and files it refuses by "
    "PIL; --engine ray: cpu); a folder resumes only with the decoder it was made with",
    "compile": "torch.compile the model's backbone (off by default until measured)",
}


def cmd_label(args: argparse.Namespace) -> int:
    from datadistill.config import LabelConfig
    from datadistill.stages.label import label

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    fixed: dict[str, typing.Any] = {"rank": rank, "world_size": world}
    if args.prompts or args.classes:
        from datadistill.models.detector import with_label_options

        fixed["model"] = with_label_options(args.model or args.checkpoint or "", classes=args.classes,
                                            prompts=args.prompts)  # fmt: skip
        fixed["checkpoint"] = None
    manifest = label(_config_from_args(LabelConfig, args, **fixed))
    if rank != 0:  # under torchrun, rank 0 speaks for all
        return 0
    from datadistill.data.coco import read_json

    m = read_json(manifest)
    counts = m.get("counts", {})
    print(
        f"labeled {counts.get('images', 0) - counts.get('skipped', 0)} images "
        f"({counts.get('objects', 0)} objects above the floor), skipped {counts.get('skipped', 0)}"
    )
    for item in m.get("skipped", [])[:20]:
        print(f"  skipped {item['file_name']}: {item['reason']}")
    print(f"wrote {manifest}")
    return 0


SELECT_HELP = {
    "labels": "the folder written by `datadistill label`",
    "reference": "the labeled COCO json (its mean objects per image sets the threshold)",
    "out": "the pseudo-label COCO json to write (pseudo.parquet, selection.json and scores.png go beside it)",
    "policy": "count (the paper), count-per-class, or fixed:T",
    "min_agreement": "keep only objects seen by at least this many views",
    "drop_empty": "drop unlabeled images with no pseudo object (default: keep them as negatives)",
    "keypoint_policy": "count: mark as many keypoints visible as the labeled data has (the most confident); "
    "count:F: F x that many (F in (0, 1]); all: every one",
    "ignore_band": "F in [0, 1): write the candidates that score in [F x threshold, threshold) as ignore regions "
    "(iscrowd 1; the student learns them neither as objects nor as background; YOLO students drop them); 0: "
    "none, as in the paper",
    "cross_class_iou": "before the threshold is chosen, drop a candidate that overlaps a higher-scoring candidate "
    "of another class by at least this IoU (one class per object: the count rule counts objects); 0: keep both, "
    "as the paper's per-class NMS does",
}


def _done(summary: str, *written: str | Path) -> int:
    """Print a command's one-line summary and the files it wrote; the exit status of success."""
    print(summary)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from datadistill.data.coco import read_json
    from datadistill.stages.select import SelectConfig, select_pseudo_labels

    out = select_pseudo_labels(_config_from_args(SelectConfig, args))
    sel = read_json(Path(out).parent / "selection.json")
    thr = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} none" for k, v in sel["thresholds"].items())
    target = sel["target_per_image"] if sel["target_per_image"] is not None else "-"
    return _done(
        f"kept {sel['achieved_objects']} of {sel['candidates']} candidates: {sel['achieved_per_image']:.2f} per image "
        f"(labeled data: {target}); thresholds: {thr}",
        out,
    )


def cmd_report(args: argparse.Namespace) -> int:
    from datadistill.stages.report import write_report

    print(f"wrote {write_report(args.run_dir)}")
    return 0


# --------------------------------------------------------------------------------------------------
# review and merge: the human in the loop


def cmd_review(args: argparse.Namespace) -> int:
    from datadistill.stages.review import review

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    summary = review(args.labels, args.reference, out=args.out, top=args.top, selection_path=args.selection,
                     formats=formats, image_url_prefix=args.image_url_prefix)  # fmt: skip
    return _done(
        f"sent {summary['images_sent']} of {summary['images_ranked']} images ({summary['objects_sent']} objects) "
        f"for review; thresholds from {summary['thresholds_from']}",
        *(Path(args.out) / f for f in summary["files"] + ["review.json"]),
    )


def cmd_merge(args: argparse.Namespace) -> int:
    from datadistill.stages.review import merge

    summary = merge(args.labeled, args.corrections, out=args.out, images=args.images,
                    skip_unsupported=args.skip_unsupported)  # fmt: skip
    skipped = sum(summary["skipped"].values())
    return _done(
        f"added {summary['images_added']} images and {summary['annotations_added']} annotations: "
        f"{summary['images']} images, {summary['annotations']} annotations in all"
        + (f"; left out {skipped} unsupported (--skip-unsupported)" if skipped else ""),
        args.out,
    )


# --------------------------------------------------------------------------------------------------
# demo


def cmd_demo(args: argparse.Namespace) -> int:
    from datadistill.demo import format_table, run_demo

    results = run_demo(task=args.task, out=args.out, quick=args.quick, seed=args.seed, threads=args.threads,
                       teacher_model=args.model, student_model=args.student_model)  # fmt: skip
    print(format_table(results, args.task))
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'report.html'}")
    return 0


# `run`'s named options: the run config key each one sets (a path made absolute: the config's own paths are
# relative to its folder).
RUN_FLAGS = {
    "labeled": "data.train",
    "images": "data.train_images",
    "unlabeled": "data.unlabeled",
    "val": "data.val",
    "model": "teacher.model",
    "student_model": "student.model",
}
RUN_PATHS = ("labeled", "images", "unlabeled", "val")


def _run_out(args: argparse.Namespace) -> str:
    """``run``'s folder: ``--out``, else ``runs/`` and the config's (or the labeled json's) name."""
    if args.out:
        return args.out
    return str(Path("runs") / Path(args.config if args.config is not None else args.labeled or "run").stem)


def cmd_run(args: argparse.Namespace) -> int:
    from datadistill.config import load_run_config
    from datadistill.data.object_store import is_uri
    from datadistill.run import run
    from datadistill.stages.evaluate import format_metrics

    settings = {}
    for flag, key in RUN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            settings[key] = str(Path(value).resolve()) if flag in RUN_PATHS and not is_uri(value) else value
    if args.config is None and not {"labeled", "images", "unlabeled"} <= {f for f in RUN_FLAGS if getattr(args, f)}:
        raise UserError("run: give a CONFIG.yaml, or --labeled L.json --images DIR --unlabeled SRC (see run --help)")
    cfg, base = load_run_config(args.config, list(args.set or []), settings=settings)
    result = run(cfg, base=base, out=_run_out(args))
    if result.teacher is not None:
        print("teacher (supervised):")
        print(format_metrics(result.teacher))
    for r, m in enumerate(result.students, 1):
        if m is not None:
            print(f"student, round {r}:")
            print(format_metrics(m))
    print(f"wrote {result.layout.results} and {result.layout.report} (config: {result.layout.config})")
    return 0


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="the run config (see examples/); or leave it "
                   "out and name the data with --labeled, --images and --unlabeled")  # fmt: skip
    p.add_argument("--labeled", metavar="L.json", help="the labeled COCO json (data.train)")
    p.add_argument("--images", metavar="DIR", help="the image root of --labeled and --val (data.train_images)")
    p.add_argument("--unlabeled", metavar="SRC", help="the unlabeled images: a folder, an s3:// prefix, a list or a "
                   "COCO json (data.unlabeled)")  # fmt: skip
    p.add_argument("--val", metavar="V.json", help="a labeled COCO json to evaluate on, images under --images "
                   "(data.val; without it: no teacher check, no metrics)")  # fmt: skip
    p.add_argument("--model", metavar="MODEL", help="the teacher's model (teacher.model; default: the small model "
                   "of the data's task)")  # fmt: skip
    p.add_argument("--student-model", metavar="MODEL", help="the student's model (student.model; default: the "
                   "teacher's)")  # fmt: skip
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. teacher.epochs=5")
    p.add_argument("--out", metavar="DIR", help="the run folder (default: runs/<config or labeled json name>)")


# --------------------------------------------------------------------------------------------------
# the output rule: checked for every command that writes, before it starts its work


def _model_path(spec: str | None) -> str | None:
    """The file or folder of a model spec (``yolo:PATH``, ``hf:PATH``, a path); None for a name."""
    if spec is None:
        return None
    for prefix in ("yolo:", "hf:"):
        if spec.startswith(prefix):
            return spec[len(prefix) :]
    return None if spec.startswith("weights:") else spec


TRAIN_WRITES = ("checkpoint.pt", "last.pt", "yolo.pt", "hf_model/", "metrics.jsonl", "config.yaml", "provenance.json",
                "timings.json")  # fmt: skip
RUN_WRITES = ("config.yaml", "report.html", "results.json", "timings.json", "prompts.yaml")


def _outputs(args: argparse.Namespace) -> dict[str, typing.Any] | None:
    """What ``args.command`` writes and reads, as :func:`datadistill.runtime.io.check_output` takes it; None
    for a command that writes nothing."""
    a = vars(args)
    command = args.command
    if command == "train":
        inputs = {f"--{k.replace('_', '-')}": a.get(k) for k in ("data", "images", "val", "val_images", "pseudo",
                                                                 "pseudo_images")}  # fmt: skip
        inputs.update({"--model": _model_path(args.model), "--init": _model_path(args.init)})
        return {"out": args.out, "folder": True, "writes": TRAIN_WRITES, "inputs": inputs}
    if command == "label":
        inputs = {"--model": _model_path(args.model), "--checkpoint": _model_path(args.checkpoint),
                  "--images": args.images, "--image-root": args.image_root, "--prompts": args.prompts,
                  "--classes": args.classes}  # fmt: skip
        return {"out": args.out, "folder": True, "writes": ("manifest.json", "shards/"), "inputs": inputs}
    if command == "select":
        inputs = {"--labels": args.labels, "--reference": args.reference}
        return {"out": args.out, "folder": False, "writes": ("selection.json", "scores.png", "pseudo.parquet"),
                "inputs": inputs}  # fmt: skip
    if command == "review":
        inputs = {"--labels": args.labels, "--reference": args.reference, "--selection": args.selection}
        writes = ("tasks.json", "label_config.xml", "coco.json", "ranking.csv", "review.json")
        return {"out": args.out, "folder": True, "writes": writes, "inputs": inputs}
    if command == "merge":
        inputs = {"--labeled": args.labeled, "--corrections": args.corrections, "--images": args.images}
        return {"out": args.out, "folder": False, "inputs": inputs}
    if command == "evaluate":
        inputs = {"--data": args.data, "--images": args.images, "--predictions": args.predictions,
                  "--model": _model_path(args.model), "--checkpoint": _model_path(args.checkpoint)}  # fmt: skip
        return {"out": args.out, "folder": False, "inputs": inputs}
    if command == "convert":
        folder = args.to == "yolo"
        return {"out": args.dst, "flag": "DST", "folder": folder, "writes": ("data.yaml", "images/", "labels/")
                if folder else (), "inputs": {"SRC": args.src, "--images": args.images}}  # fmt: skip
    if command == "synth":
        return {"out": args.out, "folder": True, "writes": ("annotations.json", "images/"), "inputs": {}}
    if command == "report":
        return {"out": args.run_dir, "flag": "RUN_DIR", "folder": True, "writes": ("report.html",), "inputs": {}}
    if command == "demo":
        inputs = {"--model": _model_path(args.model), "--student-model": _model_path(args.student_model)}
        return {"out": args.out, "folder": True, "writes": RUN_WRITES, "inputs": inputs}
    if command == "run":
        inputs = {"CONFIG.yaml": args.config, "--labeled": args.labeled, "--images": args.images,
                  "--unlabeled": args.unlabeled, "--val": args.val, "--model": _model_path(args.model),
                  "--student-model": _model_path(args.student_model)}  # fmt: skip
        return {"out": _run_out(args), "folder": True, "writes": RUN_WRITES, "inputs": inputs}
    return None


def check_outputs(args: argparse.Namespace) -> None:
    """The output rule (:func:`datadistill.runtime.io.check_output`) for the parsed command line; under
    torchrun only the first process removes the temporaries of killed writes."""
    from datadistill.runtime.io import check_output

    spec = _outputs(args)
    if spec is not None:
        check_output(**spec, clean=os.environ.get("RANK", "0") == "0")


# --------------------------------------------------------------------------------------------------
# the parser


Command = Callable[[argparse.Namespace], int]
Adder = Callable[[str, Command, str], argparse.ArgumentParser]  # name, the function it runs, its help


def _add_file_commands(add: Adder) -> None:
    """validate, convert, synth: the data files."""
    p = add("validate", cmd_validate, "check a COCO json (and its images) and list every problem")
    p.add_argument("coco", metavar="COCO.json", help="the COCO json to check")
    p.add_argument("--images", metavar="DIR", help="image root: also check every image file and its size")

    p = add("convert", cmd_convert, "convert between COCO json and Ultralytics YOLO txt")
    p.add_argument("src", metavar="SRC", help="a COCO json (--to yolo) or a YOLO data.yaml or folder (--to coco)")
    p.add_argument("dst", metavar="DST", help="the YOLO folder (--to yolo) or COCO json (--to coco) to write")
    p.add_argument("--to", choices=("yolo", "coco"), required=True, help="the format to write")
    p.add_argument("--images", metavar="DIR", help="image root of the COCO json (needed with --to yolo)")

    p = add("synth", cmd_synth, "make a synthetic data set (shapes: boxes, figures: keypoints)")
    p.add_argument("kind", choices=("shapes", "figures"), help="shapes: 5+ classes of boxes; figures: keypoints")
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/images/*.png and DIR/annotations.json")
    p.add_argument("--images", type=_positive_int, default=100, metavar="N", help="number of images (100)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the output is a function of it (0)")
    p.add_argument("--size", type=_positive_int, default=128, metavar="PX", help="image side in pixels (128)")
    p.add_argument(
        "--small-objects",
        action="store_true",
        help="shapes only: 4-24 shapes of 2.5-20%% of the side per image, for tile views (use --size 512)",
    )
    p.add_argument(
        "--dense",
        action="store_true",
        help="shapes only: 100-300 shapes per image on a jittered grid, more than a detector's and COCO's 100 "
        "detections per image (use --size 256 or more)",
    )


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="GT.json", help="ground truth COCO json")
    p.add_argument("--out", required=True, metavar="metrics.json", help="where to write the metrics")
    p.add_argument(
        "--model",
        metavar="SPEC",
        help="evaluate this model on --images: a checkpoint.pt, a training folder, or yolo:PATH.pt",
    )
    p.add_argument("--checkpoint", metavar="SPEC", help="the former name of --model")
    p.add_argument("--images", metavar="DIR", help="image root of --data (with --model)")
    p.add_argument("--predictions", metavar="P.json", help="a COCO results list, or a pseudo-label COCO json")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="images per forward pass (8)")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="DataLoader processes (0)")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="torch threads (0: one per core)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP + " (auto)")
    p.add_argument(
        "--evaluator",
        choices=("faster-coco-eval", "pycocotools"),
        default="faster-coco-eval",
        help="faster-coco-eval (default, ~7x faster) or pycocotools (the reference, bit for bit)",
    )
    p.add_argument("--max-dets", type=_positive_int, metavar="N", help="box detections counted per image (default: "
                   "twice the 99th percentile of --data's objects per image, at least COCO's 100)")  # fmt: skip


def _add_review_commands(add: Adder) -> None:
    """review and merge: the human in the loop."""
    p = add("review", cmd_review, "send the images the views disagree on to a person (Label Studio, CVAT, COCO)")
    p.add_argument("--labels", required=True, metavar="LABEL_DIR", help="a folder written by `datadistill label`")
    p.add_argument("--reference", required=True, metavar="LABELED.json", help="the labeled COCO json (classes, counts)")
    p.add_argument("--selection", metavar="SELECTION.json", help="the thresholds (default: the count rule)")
    p.add_argument("--top", type=_positive_int, required=True, metavar="N", help="send the N most doubtful images")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="writes tasks.json, label_config.xml, coco.json, ranking.csv, review.json")  # fmt: skip
    p.add_argument("--format", default="label-studio,cvat,coco", help="comma list of label-studio, cvat, coco (all)")
    p.add_argument("--image-url-prefix", metavar="PREFIX", help="image URL = PREFIX + file_name (default: Label "
                   "Studio local files, /data/local-files/?d=FILE_NAME)")  # fmt: skip

    p = add("merge", cmd_merge, "merge corrected images (Label Studio export or COCO json) into the labeled set")
    p.add_argument("--labeled", required=True, metavar="LABELED.json", help="the labeled COCO json")
    p.add_argument("--corrections", required=True, metavar="EXPORT", help="a Label Studio JSON export or a COCO json")
    p.add_argument("--out", required=True, metavar="MERGED.json", help="the merged COCO json to write")
    p.add_argument("--images", metavar="DIR", help="image root: check the images and read their sizes")
    p.add_argument("--skip-unsupported", action="store_true", help="leave out (counted, with a warning) the regions "
                   "merge cannot take (polygons, untyped) and annotations of no image, not an error")  # fmt: skip


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task", choices=("boxes", "keypoints"), default="boxes", help="boxes (shapes) or keypoints (figures)"
    )
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="the run folder (runs/demo)")
    p.add_argument("--quick", action="store_true", help="a smoke run of under a minute (its numbers mean nothing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the training (0)")
    p.add_argument("--threads", type=_positive_int, default=2, metavar="N", help="torch threads (2)")
    p.add_argument("--model", metavar="MODEL", help="the teacher: a name from `datadistill models` or yolo:YAML "
                   "(default: the small model of the task)")  # fmt: skip
    p.add_argument("--student-model", metavar="MODEL", help="the student, if not the teacher's model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datadistill",
        description="Data distillation: better object and keypoint detectors from unlabeled images.",
        epilog="Outputs: a command refuses an --out that is one of its inputs (or would write one of them into its "
        "folder), a FIFO, a device or a symbolic link to a file; a link to a folder is followed. The temporary "
        "files of a killed write are removed by the next run that writes there.",
    )
    parser.add_argument("--version", action="version", version=f"datadistill {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        p.set_defaults(func=func)
        return p

    _add_file_commands(add)
    add("models", cmd_models, "list the available detector models")

    from datadistill.config import LabelConfig, SelectConfig, TrainConfig

    p = add("train", cmd_train, "train a teacher, or a student with --pseudo")
    _add_config_options(p, TrainConfig, TRAIN_HELP)

    _add_evaluate(add("evaluate", cmd_evaluate, "COCO AP of a trained model or of a predictions file"))

    p = add("label", cmd_label, "run the teacher on every view of the unlabeled images and fuse")
    _add_config_options(p, LabelConfig, LABEL_HELP, skip=("rank", "world_size"))
    p.add_argument("--prompts", metavar="FILE", help="hf: open-vocabulary teachers: a YAML/JSON mapping of category "
                   "name -> phrase or list of phrases (default: each category's name)")  # fmt: skip
    p.add_argument("--classes", metavar="COCO.json", help="hf: teachers: label the categories of this data set (ids, "
                   "names, order; the labeled json), a closed-set model's classes matched by name")  # fmt: skip

    p = add("select", cmd_select, "choose the score threshold and write the pseudo-labels")
    _add_config_options(p, SelectConfig, SELECT_HELP)

    p = add("report", cmd_report, "write RUN_DIR/report.html")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `datadistill run` or `demo`")

    _add_review_commands(add)

    p = add("run", cmd_run, "teacher, label, select, student and evaluation, from a YAML config or the data's paths")
    _add_run(p)
    _add_demo(add("demo", cmd_demo, "run the whole method on synthetic data and print the gain"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        check_outputs(args)
        return int(args.func(args) or 0)
    except UserError as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # the environment, not a bug: a full disk, a read-only or vanished folder
        where = exc.filename2 if exc.filename2 is not None else exc.filename
        return _error(f"{f'{where}: ' if where is not None else ''}{exc.strerror or exc}")


def _error(message: str) -> int:
    """Print ``error: MESSAGE`` as one bounded line (:func:`datadistill.errors.bounded_line`); exit status 1."""
    print(f"error: {bounded_line(message)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
