"""How much the views improve a keypoint teacher's predictions on U, scored against U's held-back labels.

    python bench/keypoint_tta.py accuracy_keypoints_work [--images 450] [--out tta.json]

Takes the teacher (``supervised/checkpoint.pt``) and the data of a work folder that ``bench/accuracy.py
--task keypoints`` wrote, runs it on the first ``--images`` images of U under several view sets and
keypoint fusions, and prints the keypoint AP and box AP (percent) of every prediction above score 0.05
(no selection: the teacher scored as a detector):

- ``identity``: one view;
- ``flip, identity boxes`` / ``default, identity boxes``: the identity view's boxes, with the heatmaps of
  the view and its flip / of the eight default views averaged (keypoint fusion alone);
- ``default``: the eight default views, boxes fused by nms, heatmap logits averaged (``label``'s default);
- ``default, heatmap probabilities``: the same boxes, the mean of the per-view spatial softmax instead;
- ``default, --keypoint-fuse mean``: the same boxes, mean keypoint coordinates;
- ``wide``: scales 0.75 to 2 in steps of 0.25, each with and without flip (heatmap logits).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from datadistill.core.types import Detections
from datadistill.core.views import DEFAULT_SCALES, View, views_for_scales
from datadistill.data.coco import CocoDataset, load_coco
from datadistill.data.images import read_image
from datadistill.models.detector import Detector, load_detector
from datadistill.stages.evaluate import evaluate_predictions
from datadistill.stages.multiview import label_images, view_heatmaps

WIDE_SCALES = (0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


def heatmap_sums(
    detector: Detector,
    images: list[Tensor],
    dets: list[Detections],
    views: tuple[View, ...],
) -> dict[str, list[Tensor | None]]:
    """Per image, the sum over ``views`` of the heatmap logits (``logit``) and of their spatial softmax
    (``prob``) on the boxes of ``dets``, in the original frame (:func:`datadistill.stages.multiview.view_heatmaps`)."""
    sums: dict[str, list[Tensor | None]] = {"logit": [None] * len(images), "prob": [None] * len(images)}
    for view in views:
        for start in range(0, len(images), 16):
            batch = range(start, min(start + 16, len(images)))
            heats = view_heatmaps(detector, [images[i] for i in batch], [dets[i] for i in batch], view)
            for j, h in heats.items():
                p = torch.softmax(h.flatten(2), -1).reshape(h.shape)
                for mode, x in (("logit", h), ("prob", p)):
                    prev = sums[mode][start + j]
                    sums[mode][start + j] = x if prev is None else prev + x
    return sums


def decode(detector: Detector, images: list[Tensor], dets: list[Detections], sums: list[Tensor | None],
           *, probabilities: bool) -> list[Detections]:  # fmt: skip
    """``dets`` with the keypoints decoded from the summed heatmaps (log of the mean probability, or the
    mean logit: the argmax does not depend on the number of views)."""
    out = []
    for image, d, total in zip(images, dets, sums, strict=True):
        if total is None:
            out.append(d)
            continue
        heat = total.clamp_min(1e-12).log() if probabilities else total
        kp = detector.keypoints_from_heatmaps(heat, d.boxes, image_size=(image.shape[-2], image.shape[-1]))
        out.append(Detections(boxes=d.boxes, scores=d.scores, labels=d.labels, keypoints=kp))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", help="the --work folder of bench/accuracy.py --task keypoints")
    p.add_argument("--images", type=int, default=None, help="the first N images of U (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", default=None, help="also write the numbers to this json file")
    args = p.parse_args(argv)
    work = Path(args.work)
    checkpoint, truth_path = work / "supervised" / "checkpoint.pt", work / "data" / "unlabeled_truth.json"
    for path in (checkpoint, truth_path):
        if not path.exists():
            print(f"{path}: not found (not a finished bench/accuracy.py --task keypoints work folder)", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    detector = load_detector(str(checkpoint), device="cpu")
    meta = detector.meta
    if meta.task != "keypoints":
        print(f"{checkpoint}: a {meta.task} model, not a keypoint one", file=sys.stderr)
        return 2
    full = load_coco(truth_path)
    records = full.images[: args.images]
    truth = CocoDataset(images=records, labels={r.id: full.labels[r.id] for r in records}, categories=full.categories)
    images = [read_image(work / "data" / "images" / r.file_name).float() / 255 for r in records]

    def score(preds: list[Detections]) -> dict[str, float]:
        m = evaluate_predictions(truth, {r.id: d for r, d in zip(records, preds, strict=True)})
        return {"keypoint_AP": round(100 * m["keypoints"]["AP"], 1), "box_AP": round(100 * m["bbox"]["AP"], 1)}

    def run(views: tuple[View, ...], keypoint_fuse: str) -> list[Detections]:
        out: list[Detections] = []
        for start in range(0, len(images), 16):
            out += label_images(detector, images[start : start + 16], views=views, keypoint_fuse=keypoint_fuse)
        return out

    default, wide = views_for_scales(DEFAULT_SCALES), views_for_scales(WIDE_SCALES)
    single = run((View(),), "mean")  # one view: its own keypoints
    flip_sums = heatmap_sums(detector, images, single, views_for_scales((1.0,)))
    identity_boxes = heatmap_sums(detector, images, single, default)
    fused = run(default, "mean")
    default_sums = heatmap_sums(detector, images, fused, default)

    def decoded(dets: list[Detections], sums: list[Tensor | None], *, probabilities: bool) -> dict[str, float]:
        return score(decode(detector, images, dets, sums, probabilities=probabilities))

    results = {
        "identity": score(single),
        "flip, identity boxes": decoded(single, flip_sums["logit"], probabilities=False),
        "default, identity boxes": decoded(single, identity_boxes["logit"], probabilities=False),
        "default": decoded(fused, default_sums["logit"], probabilities=False),
        "default, heatmap probabilities": decoded(fused, default_sums["prob"], probabilities=True),
        "default, --keypoint-fuse mean": score(fused),
        "wide": score(run(wide, "heatmap")),
    }  # fmt: skip
    print(f"{'teacher on ' + str(len(records)) + ' images of U':40}{'keypoint AP':>12}{'box AP':>8}")
    for name, r in results.items():
        print(f"{name:40}{r['keypoint_AP']:12.1f}{r['box_AP']:8.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"work": str(work), "images": len(records), **results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
