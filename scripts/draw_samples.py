"""Draw a grid of synthetic (or any COCO) images with their labels, to check that labels match pixels.

    python scripts/draw_samples.py --kind shapes --out shapes.png
    python scripts/draw_samples.py --kind figures --out figures.png --n 12 --seed 3
    python scripts/draw_samples.py --data DIR --out sample.png   # DIR holds annotations.json and images/

Boxes are drawn on the pixel edges (a box is tight when it touches the outermost object pixels).
Keypoints: the figure's left side in red, its right side in blue, unpaired points in yellow; filled
markers are visible (v=2), hollow ones hidden (v=1); points with v=0 are not drawn.
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from datadistill.data.coco import CocoDataset, load_coco  # noqa: E402
from datadistill.data.images import read_image, resolve_image_path  # noqa: E402
from datadistill.data.synth import make_figures, make_shapes  # noqa: E402

LEFT, RIGHT, CENTRE = "red", "blue", "yellow"


def keypoint_colours(dataset: CocoDataset) -> list[str]:
    """One colour per keypoint: red for the left member of a flip pair, blue for the right, else yellow."""
    cat = dataset.keypoint_category
    if cat is None:
        return []
    colours = []
    for i, name in enumerate(cat.keypoints):
        if cat.flip_index[i] == i:
            colours.append(CENTRE)
        else:
            colours.append(LEFT if "left" in name.lower() else RIGHT)
    return colours


def draw_grid(dataset: CocoDataset, image_root: Path, out: Path, *, n: int) -> None:
    """Save a grid of the first ``n`` images with boxes, class names, keypoints and skeleton."""
    images = dataset.images[:n]
    cols = min(4, len(images))
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    names = dataset.class_names
    kp_colours = keypoint_colours(dataset)
    cat = dataset.keypoint_category
    skeleton = [(a - 1, b - 1) for a, b in cat.skeleton] if cat else []
    for ax in axes.flat:
        ax.axis("off")
    for ax, im in zip(axes.flat, images, strict=False):
        pixels = read_image(resolve_image_path(image_root, im.file_name)).permute(1, 2, 0).numpy()
        # extent puts pixel (c, r) on [c, c+1) x [r, r+1): the continuous frame of the labels
        ax.imshow(pixels, extent=(0, im.width, im.height, 0), interpolation="nearest")
        lab = dataset.labels[im.id]
        for j in range(len(lab)):
            x1, y1, x2, y2 = (float(v) for v in lab.boxes[j])
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=1))
            ax.text(x1, y1, names[int(lab.labels[j])], color="black", fontsize=7, va="bottom",
                    bbox={"facecolor": "lime", "alpha": 0.7, "pad": 0.5, "linewidth": 0})  # fmt: skip
            if lab.keypoints is None:
                continue
            kp = lab.keypoints[j]
            for a, b in skeleton:
                if kp[a, 2] > 0 and kp[b, 2] > 0:
                    ax.plot([kp[a, 0], kp[b, 0]], [kp[a, 1], kp[b, 1]], color="white", linewidth=0.7, alpha=0.8)
            for k in range(kp.shape[0]):
                x, y, v = (float(t) for t in kp[k])
                if v <= 0:
                    continue
                face = kp_colours[k] if v >= 2 else "none"
                ax.plot(x, y, "o", markersize=4, markerfacecolor=face, markeredgecolor=kp_colours[k], mew=1.2)
        ax.set_xlim(0, im.width)
        ax.set_ylim(im.height, 0)
        ax.set_title(f"{im.file_name}: {len(lab)} objects", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("shapes", "figures"), default="shapes")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--n", type=int, default=8, help="how many images to draw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="image side in px (generated data only)")
    parser.add_argument("--data", type=Path, help="a folder with annotations.json and images/ (skips generation)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.data is not None:
        draw_grid(load_coco(args.data / "annotations.json"), args.data / "images", args.out, n=args.n)
        return
    make = make_shapes if args.kind == "shapes" else make_figures
    with tempfile.TemporaryDirectory() as tmp:
        json_path = make(tmp, num_images=args.n, seed=args.seed, size_px=args.size)
        draw_grid(load_coco(json_path), json_path.parent / "images", args.out, n=args.n)
    logging.getLogger("draw_samples").info("wrote %s", args.out)


if __name__ == "__main__":
    main()
