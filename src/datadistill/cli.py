"""The ``datadistill`` command line: one subcommand per stage. Only this module prints."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from datadistill import __version__
from datadistill.errors import UserError

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
    from datadistill.coco import parse_coco, read_json, validate_coco

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
    from datadistill.yolo import convert

    out = convert(args.src, args.dst, to=args.to, images=args.images)
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------------------------------
# synth


def cmd_synth(args: argparse.Namespace) -> int:
    from datadistill import synth

    make = {"shapes": synth.make_shapes, "figures": synth.make_figures}[args.kind]
    path = make(args.out, num_images=args.images, seed=args.seed, size_px=args.size)
    print(f"wrote {args.images} images and {path}")
    return 0


# --------------------------------------------------------------------------------------------------
# models


def cmd_models(args: argparse.Namespace) -> int:
    from datadistill.models import MODELS

    width = max(len(n) for n in MODELS)
    for name, spec in MODELS.items():
        print(f"{name:<{width}}  {spec.task:<9}  {spec.description}")
    return 0


# --------------------------------------------------------------------------------------------------
# demo


def cmd_demo(args: argparse.Namespace) -> int:
    raise UserError("`datadistill demo` is not built yet (see the issue 'The data distillation loop end to end')")


# --------------------------------------------------------------------------------------------------
# the parser


COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {
    "validate": ("check a COCO json (and its images) and list every problem", cmd_validate),
    "convert": ("convert between COCO json and Ultralytics YOLO txt", cmd_convert),
    "synth": ("make a synthetic data set (shapes: boxes, figures: keypoints)", cmd_synth),
    "models": ("list the available detector models", cmd_models),
    "demo": ("run the whole method on synthetic data and print the gain", cmd_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datadistill",
        description="Data distillation: better object and keypoint detectors from unlabeled images.",
    )
    parser.add_argument("--version", action="version", version=f"datadistill {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str) -> argparse.ArgumentParser:
        help_text, func = COMMANDS[name]
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        p.set_defaults(func=func)
        return p

    p = add("validate")
    p.add_argument("coco", metavar="COCO.json", help="the COCO json to check")
    p.add_argument("--images", metavar="DIR", help="image root: also check every image file and its size")

    p = add("convert")
    p.add_argument("src", metavar="SRC", help="a COCO json (--to yolo) or a YOLO data.yaml or folder (--to coco)")
    p.add_argument("dst", metavar="DST", help="the YOLO folder (--to yolo) or COCO json (--to coco) to write")
    p.add_argument("--to", choices=("yolo", "coco"), required=True, help="the format to write")
    p.add_argument("--images", metavar="DIR", help="image root of the COCO json (needed with --to yolo)")

    p = add("synth")
    p.add_argument("kind", choices=("shapes", "figures"), help="shapes: 5+ classes of boxes; figures: keypoints")
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/images/*.png and DIR/annotations.json")
    p.add_argument("--images", type=_positive_int, default=100, metavar="N", help="number of images (100)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the output is a function of it (0)")
    p.add_argument("--size", type=_positive_int, default=128, metavar="PX", help="image side in pixels (128)")

    add("models")

    p = add("demo")
    p.add_argument("--task", choices=("boxes", "keypoints"), default="boxes")
    p.add_argument("--out", default="runs/demo", metavar="DIR")
    p.add_argument("--quick", action="store_true", help="a smoke run of about 2 minutes")
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
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
