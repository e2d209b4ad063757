"""Data distillation on real images with few labels: aerial tree crowns, every option at its default.

    python bench/real_trees.py --seeds 0 1 --jobs 2 --threads 1 --out bench/results/real_trees.json

The ``deepforest==2.1.0`` wheel (MIT) ships aerial RGB images with hand-drawn tree crowns. This benchmark
uses only ``2019_YELL_2_528000_4978000_image_crop2.png`` (2299 x 2472 px) and its Pascal VOC ``.xml`` (574
crowns of about 20 px); the package's other annotated images are kept for an independent check. The wheel
is fetched with ``pip download --no-deps`` into ``--work`` (nothing of it is imported) unless
``--deepforest-data`` names a folder that holds the two files.

The image is cut into ``--tile`` px tiles (the last row and column dropped where they do not fit); a crown
is in a tile when at least half of its box is, clipped to the tile. Each split seed shuffles the tiles into
``--labeled`` labeled tiles (L, 8), ``--unlabeled`` unlabeled ones (U, labels held back) and the rest as the
test set (T). Four arms, each the default ``datadistill train`` (the default model, schedule, batch and
lr: nothing tuned here), evaluated on T:

- ``supervised``: L only (the teacher);
- ``single_view``: L + the teacher's pseudo-labels of U from the identity view;
- ``distilled``: L + pseudo-labels of U from the default views and fusion (``datadistill label`` and
  ``select`` with their defaults);
- ``oracle``: L + U with its true labels, mixed into the minibatches as the pseudo-labels are.

It prints box AP and AP50 (percent) per arm and seed, their mean, and the pseudo-labels' precision and recall
(IoU 0.5) against U's held-back labels. Every stage is skipped when its output exists, so a killed
benchmark resumes. ``--iterations N`` overrides the schedule of every arm (to measure how long a handful
of labeled tiles must train: the default schedule's floor of :mod:`datadistill.core.schedule`).
"""

from __future__ import annotations

import argparse
import logging
import random
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from common import Stages, cached_metrics, init_worker, options, parser, run_seeds, work_folder
from PIL import Image

from datadistill.config import LabelConfig, SelectConfig, TrainConfig
from datadistill.data.coco import Category, CocoDataset, ImageLabels, ImageRecord, load_coco, save_coco
from datadistill.runtime.io import provenance, write_json_atomic
from datadistill.stages.label import label
from datadistill.stages.quality import match_pseudo_labels
from datadistill.stages.select import select_pseudo_labels
from datadistill.stages.train import train

IMAGE = "2019_YELL_2_528000_4978000_image_crop2"
WHEEL = "deepforest==2.1.0"
ARMS = ("supervised", "single_view", "distilled", "oracle")
log = logging.getLogger("real_trees")


# ----------------------------------------------------------------------------------------------------
# the data


def fetch(work: Path, data_dir: str | None) -> tuple[Path, Path]:
    """The image and its xml: from ``data_dir``, or from the deepforest wheel (downloaded once)."""
    if data_dir is not None:
        folder = Path(data_dir)
    else:
        folder = work / "deepforest"
        if not (folder / f"{IMAGE}.xml").exists():
            wheels = work / "wheel"
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(wheels)],
                           check=True)  # fmt: skip
            (wheel,) = wheels.glob("deepforest-*.whl")
            folder.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheel) as z:
                for suffix in (".png", ".xml"):
                    (folder / f"{IMAGE}{suffix}").write_bytes(z.read(f"deepforest/data/{IMAGE}{suffix}"))
    image, xml = folder / f"{IMAGE}.png", folder / f"{IMAGE}.xml"
    for path in (image, xml):
        if not path.is_file():
            raise SystemExit(f"{path}: not found")
    return image, xml


def read_crowns(xml: Path) -> np.ndarray:
    """The Pascal VOC boxes ``[N, 4]`` xyxy px (VOC's 1-based inclusive corners as continuous pixels)."""
    root = ElementTree.parse(xml).getroot()
    boxes = []
    for obj in root.iter("object"):
        b = obj.find("bndbox")
        assert b is not None
        x0, y0, x1, y1 = (float(b.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x0 - 1, y0 - 1, x1, y1])
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def make_tiles(image_path: Path, crowns: np.ndarray, out: Path, *, tile: int) -> CocoDataset:
    """Every full ``tile`` x ``tile`` tile as a PNG in ``out/images`` and one COCO data set of them all."""
    image = Image.open(image_path).convert("RGB")
    width, height = image.size
    images, labels = [], {}
    (out / "images").mkdir(parents=True, exist_ok=True)
    for r in range(height // tile):
        for c in range(width // tile):
            x0, y0 = c * tile, r * tile
            name = f"r{r:02d}_c{c:02d}.png"
            if not (out / "images" / name).exists():
                image.crop((x0, y0, x0 + tile, y0 + tile)).save(out / "images" / name)
            clipped = np.clip(crowns - [x0, y0, x0, y0], 0, tile)
            area = (crowns[:, 2] - crowns[:, 0]) * (crowns[:, 3] - crowns[:, 1])
            inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
            boxes = clipped[inside >= 0.5 * area]
            iid = len(images) + 1
            images.append(ImageRecord(id=iid, file_name=name, width=tile, height=tile))
            n = len(boxes)
            box_area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.float32)
            labels[iid] = ImageLabels(
                ids=np.arange(n, dtype=np.int64) + 1000 * iid, boxes=boxes.astype(np.float32),
                labels=np.zeros(n, np.int64), iscrowd=np.zeros(n, bool), area=box_area,
            )  # fmt: skip
    return CocoDataset(images=tuple(images), labels=labels, categories=(Category(id=1, name="tree"),))


def split(tiles: CocoDataset, out: Path, *, seed: int, labeled: int, unlabeled: int) -> dict[str, Path]:
    """L, U (without labels, and its held-back truth) and T as COCO files in ``out``."""
    ids = [im.id for im in tiles.images]
    random.Random(seed).shuffle(ids)
    parts = {"labeled": ids[:labeled], "unlabeled_truth": ids[labeled : labeled + unlabeled],
             "test": ids[labeled + unlabeled :]}  # fmt: skip
    paths = {}
    for name, chosen in parts.items():
        keep = set(chosen)
        images = tuple(im for im in tiles.images if im.id in keep)
        paths[name] = out / f"{name}.json"
        if not paths[name].exists():
            save_coco(CocoDataset(images=images, labels={im.id: tiles.labels[im.id] for im in images},
                                  categories=tiles.categories), paths[name])  # fmt: skip
    paths["unlabeled"] = out / "unlabeled.json"
    if not paths["unlabeled"].exists():
        images = tuple(im for im in tiles.images if im.id in set(parts["unlabeled_truth"]))
        empty = ImageLabels.empty(0)
        save_coco(CocoDataset(images=images, labels={im.id: empty for im in images}, categories=tiles.categories),
                  paths["unlabeled"])  # fmt: skip
    return paths


# ----------------------------------------------------------------------------------------------------
# the arms


def run_seed(seed: int, tiles_dir: Path, tiles: CocoDataset, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work) / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    paths = split(tiles, work, seed=seed, labeled=args.labeled, unlabeled=args.unlabeled)
    images = str(tiles_dir / "images")
    truth, test = load_coco(paths["unlabeled_truth"]), load_coco(paths["test"])
    stages = Stages()

    def train_arm(name: str, pseudo: str | None) -> Path:
        out = work / name
        cfg = TrainConfig(data=str(paths["labeled"]), images=images, out=str(out), pseudo=pseudo,
                          pseudo_images=images if pseudo else None, iterations=args.iterations, seed=seed,
                          threads=args.threads, device="cpu", resume=(out / "last.pt").exists())  # fmt: skip
        stages.run(f"seed {seed}: train {name}", out / "checkpoint.pt", lambda: train(cfg))
        return out

    def metrics(folder: Path) -> dict[str, Any]:
        return cached_metrics(folder / "test_metrics.json", folder, test, images)["bbox"]

    def pseudo_labels(name: str, views: str) -> tuple[str, dict[str, Any]]:
        labels_dir, pseudo = work / f"labels-{name}", work / f"select-{name}" / "pseudo.json"
        cfg = LabelConfig(model=str(teacher), images=str(paths["unlabeled"]), image_root=images, out=str(labels_dir),
                          views=views, workers=0, threads=args.threads, device="cpu")  # fmt: skip
        stages.run(f"seed {seed}: label {name}", labels_dir / "manifest.json", lambda: label(cfg))
        sel = SelectConfig(labels=str(labels_dir), reference=str(paths["labeled"]), out=str(pseudo))
        stages.run(f"seed {seed}: select {name}", pseudo, lambda: select_pseudo_labels(sel))
        matched = match_pseudo_labels(load_coco(pseudo), truth).at(0.0)
        return str(pseudo), {k: matched[k] for k in ("precision", "recall", "kept")}

    teacher = train_arm("supervised", None)
    results: dict[str, Any] = {"supervised": {"test": metrics(teacher)}}
    for name, views in (("single_view", "identity"), ("distilled", "auto")):
        if name in args.arms:
            pseudo, quality = pseudo_labels(name, views)
            results[name] = {"test": metrics(train_arm(name, pseudo)), "pseudo_labels": quality}
    if "oracle" in args.arms:
        results["oracle"] = {"test": metrics(train_arm("oracle", str(paths["unlabeled_truth"])))}
    counts = {name: len(load_coco(paths[name]).images) for name in ("labeled", "unlabeled", "test")}
    crowns = {name: sum(len(lab) for lab in load_coco(paths[name]).labels.values())
              for name in ("labeled", "unlabeled_truth", "test")}  # fmt: skip
    return {"arms": results, "tiles": counts, "crowns": crowns, "seconds": stages.seconds}


def format_table(per_seed: dict[int, dict[str, Any]]) -> str:
    arms = [a for a in ARMS if all(a in r["arms"] for r in per_seed.values())]
    head = f"{'arm':<14}" + "".join(f"{f'seed {s} AP / AP50':>22}" for s in per_seed) + f"{'mean AP / AP50':>20}"
    lines = [head]
    for arm in arms:
        values = [(100 * r["arms"][arm]["test"]["AP"], 100 * r["arms"][arm]["test"]["AP50"]) for r in per_seed.values()]
        cells = "".join(f"{f'{ap:.1f} / {ap50:.1f}':>22}" for ap, ap50 in values)
        mean = f"{np.mean([v[0] for v in values]):.1f} / {np.mean([v[1] for v in values]):.1f}"
        lines.append(f"{arm:<14}{cells}{mean:>20}")
    lines.append("pseudo-labels against U's held-back labels (IoU 0.5): precision / recall")
    for arm in ("single_view", "distilled"):
        if arm in arms:
            quality = {s: r["arms"][arm]["pseudo_labels"] for s, r in per_seed.items()}
            cells = ", ".join(
                f"seed {s}: {100 * q['precision']:.1f}% / {100 * q['recall']:.1f}%" for s, q in quality.items()
            )
            lines.append(f"  {arm:<12}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="split seeds (0 1)")
    p.add_argument("--tile", type=int, default=256, help="tile side in px (256: 72 tiles)")
    p.add_argument("--labeled", type=int, default=8, help="labeled tiles (8)")
    p.add_argument("--unlabeled", type=int, default=40, help="unlabeled tiles (40); the rest is the test set")
    p.add_argument("--iterations", type=int, default=None, help="override the default schedule of every arm")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)} (supervised always runs)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of each process (2)")
    p.add_argument("--jobs", type=int, default=1, help="seeds run at once, one process each (1)")
    p.add_argument("--deepforest-data", default=None, help="a folder with the image and its xml (default: fetch)")
    args = p.parse_args(argv)
    args.arms = set(args.arms.split(","))
    args.work = str(work_folder(args))
    init_worker(args.threads)
    started = time.perf_counter()
    image, xml = fetch(Path(args.work), args.deepforest_data)
    crowns = read_crowns(xml)
    tiles_dir = Path(args.work) / f"tiles{args.tile}"
    tiles = make_tiles(image, crowns, tiles_dir, tile=args.tile)
    log.info("%d crowns, %d tiles of %d px", len(crowns), len(tiles.images), args.tile)
    per_seed = run_seeds(run_seed, args.seeds, tiles_dir, tiles, args, jobs=args.jobs, threads=args.threads)
    table = format_table(per_seed)
    print(table)
    minutes = (time.perf_counter() - started) / 60
    print(f"wall time {minutes:.1f} min ({args.jobs} process(es) of {args.threads} thread(s))")
    write_json_atomic(Path(args.out), {"command": " ".join(sys.argv), "options": options(args), "seeds": per_seed,
                      "table": table, "wall_minutes": round(minutes, 1), "provenance": provenance()},
                      indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
