"""``select``'s cross-class filter: its speed on a million candidates, and the count it reaches for a teacher
that lists a box once per class it scores.

Run: ``flock /tmp/dd/cpu.lock python bench/select_speed.py --out bench/results/select_speed.json``.

1. Speed: ``--candidates`` (1,000,000) fused candidates on ``--images`` (20,000) images, 80 classes, half of
   them an object's box seen again under another class (a box moved by up to 2 px). Times
   :func:`datadistill.stages.select.cross_class_duplicates` on all of them (the first call, which compiles or
   loads the numba cache, timed apart), and the former per-image Python loop over torchvision's ``box_iou``
   on ``--reference-images`` of the images (the same masks, checked), scaled up to all of them; then the
   same candidates on a tenth of the images (500 per image, as many views and classes above the floor give).
2. An RT-DETR-like teacher, no model: 300 images with 1 to 8 objects of 7 classes, 50 queries per image,
   sigmoid scores per query and class (a query on an object scores its class highest and its look-alikes
   next), the top 50 of queries x classes above 0.05 kept (Hugging Face's post-processing), then per-class
   NMS at 0.5 (one view's fusion). ``select`` (the count rule, a labeled mean of 4.39 objects per image) runs on
   its label folder; the former order (threshold first, duplicates dropped after) is computed beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou

from datadistill.core import selection
from datadistill.data.label_folder import shard_schema, write_shard
from datadistill.runtime.io import provenance, write_json_atomic
from datadistill.stages.select import SelectConfig, cross_class_duplicates, select_pseudo_labels


def python_reference(boxes, scores, labels, image, *, among=None, iou_thr: float = 0.5) -> np.ndarray:  # noqa: ANN001
    """The former filter (and the compiled one's reference in tests/test_select.py): per image, among the
    candidates ``among`` (default: all), the greedy over torchvision's ``box_iou`` matrix."""
    out = np.zeros(scores.shape, bool)
    idx = np.arange(scores.size) if among is None else np.flatnonzero(among)
    idx = idx[np.argsort(image[idx], kind="stable")]
    for group in np.split(idx, np.flatnonzero(np.diff(image[idx])) + 1):
        group = group[np.argsort(-scores[group], kind="stable")]
        iou = box_iou(torch.from_numpy(boxes[group]), torch.from_numpy(boxes[group])).numpy()
        other = labels[group][:, None] != labels[group][None, :]
        dropped = np.zeros(group.size, bool)
        for i in range(group.size):
            if not dropped[i]:
                dropped[i + 1 :] |= other[i, i + 1 :] & (iou[i, i + 1 :] >= iou_thr)
        out[group[dropped]] = True
    return out


def many_candidates(n: int, images: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """``n`` candidates in image order (as ``select`` reads them): half objects, half their second class."""
    rng = np.random.default_rng(seed)
    half = n // 2
    xy = rng.uniform(0, 600, (half, 2))
    wh = rng.uniform(10, 200, (half, 2))
    first = np.concatenate([xy, xy + wh], axis=1)
    again = first + rng.uniform(-2, 2, (half, 4))
    boxes = np.concatenate([first, again])
    labels = rng.integers(0, 80, half)
    labels = np.concatenate([labels, (labels + rng.integers(1, 80, half)) % 80])
    image = np.tile(np.sort(rng.integers(0, images, half)), 2)
    scores = rng.uniform(0.05, 1.0, 2 * half)
    order = np.argsort(image, kind="stable")
    return boxes[order], scores[order], labels[order], image[order]


def speed(n: int, images: int, reference_images: int) -> dict:
    boxes, scores, labels, image = many_candidates(n, images)
    everything = np.ones(scores.size, bool)
    start = time.perf_counter()
    cross_class_duplicates(boxes[:100], scores[:100], labels[:100], image[:100], among=everything[:100], iou_thr=0.5)
    first_call = time.perf_counter() - start
    start = time.perf_counter()
    ours = cross_class_duplicates(boxes, scores, labels, image, among=everything, iou_thr=0.5)
    seconds = time.perf_counter() - start
    part = image < reference_images
    start = time.perf_counter()
    ref = python_reference(boxes[part], scores[part], labels[part], image[part])
    ref_seconds = (time.perf_counter() - start) * images / reference_images
    assert np.array_equal(ours[part], ref), "the compiled loop and the Python reference disagree"
    return {"candidates": int(scores.size), "images": images, "duplicates": int(ours.sum()),
            "first_call_seconds": round(first_call, 3), "seconds": round(seconds, 3),
            "python_reference_seconds_scaled": round(ref_seconds, 1), "reference_images": reference_images,
            "speedup": round(ref_seconds / seconds, 1), "masks_equal_on_reference_images": True}  # fmt: skip


def rtdetr_like_rows(images: int, seed: int = 0) -> list[dict]:
    """Label-shard rows of the RT-DETR-like teacher of the module docstring, 128 px images."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(images):
        g = int(rng.integers(1, 9))
        centre, size = rng.uniform(20, 108, (g, 2)), rng.uniform(12, 40, (g, 2))
        truth = rng.integers(0, 7, g)
        logits = rng.normal(-4.0, 1.0, (50, 7))  # queries on the background
        q_boxes = np.tile(np.array([[0.0, 0.0, 20.0, 20.0]]), (50, 1)) + rng.uniform(0, 100, (50, 1))
        for k in range(g):  # three queries on each object
            q = np.arange(3 * k, 3 * k + 3)
            box = np.concatenate([centre[k] - size[k] / 2, centre[k] + size[k] / 2])
            q_boxes[q] = box + rng.normal(0, 1.5, (3, 4))
            strength = rng.normal(0.5, 1.5)  # how sure the teacher is of this object
            logits[q] = rng.normal(strength - 2.5, 1.0, (3, 7))  # its look-alikes
            logits[q, truth[k]] = strength + rng.normal(0, 0.5, 3)
        probs = torch.sigmoid(torch.from_numpy(logits)).reshape(-1)
        top = torch.topk(probs, 50)
        b = torch.from_numpy(np.clip(q_boxes, 0, 128))[top.indices // 7]
        s, c = top.values, top.indices % 7
        keep = s >= 0.05
        b, s, c = b[keep], s[keep], c[keep]
        kept = batched_nms(b.float(), s.float(), c, 0.5)
        b, s, c = b[kept], s[kept], c[kept]
        rows.append({"file_name": f"u{i}.png", "width": 128, "height": 128, "boxes": b.reshape(-1).tolist(),
                     "scores": s.tolist(), "labels": c.tolist(), "agreement": [1] * len(s), "error": None})  # fmt: skip
    return rows


def rtdetr_like(images: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = rtdetr_like_rows(images)
        write_shard(folder / "labels" / "shards" / "part-00000.parquet", rows, shard_schema(0))
        names = ["circle", "square", "triangle", "star", "cross", "hexagon", "ring"]
        write_json_atomic(folder / "labels" / "manifest.json", {"status": "complete", "classes": {"names": names}})
        ref_images = [{"id": i + 1, "file_name": f"l{i}.png", "width": 128, "height": 128} for i in range(100)]
        on = [i + 1 for i in range(100) for _ in range(5 if i < 39 else 4)]  # 439 objects: 4.39 per image
        anns = [{"id": j + 1, "image_id": i, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0, "area": 100}
                for j, i in enumerate(on)]  # fmt: skip
        cats = [{"id": k + 1, "name": n} for k, n in enumerate(names)]
        write_json_atomic(folder / "ref.json", {"images": ref_images, "annotations": anns, "categories": cats})
        select_pseudo_labels(SelectConfig(labels=str(folder / "labels"), reference=str(folder / "ref.json"),
                                          out=str(folder / "sel" / "pseudo.json")))  # fmt: skip
        sel = json.loads((folder / "sel" / "selection.json").read_text())
    # the former order: the count threshold on every candidate, the duplicates dropped among those kept
    scores = np.concatenate([np.asarray(r["scores"], np.float32) for r in rows]).astype(np.float64)
    labels = np.concatenate([np.asarray(r["labels"], np.int64) for r in rows])
    boxes = np.concatenate([np.asarray(r["boxes"], np.float32).reshape(-1, 4) for r in rows]).astype(np.float64)
    image = np.repeat(np.arange(len(rows)), [len(r["scores"]) for r in rows])
    old = selection.select_count(scores, labels, num_images=images, per_image=4.39, num_classes=7)
    kept = old.keep(scores, labels)
    kept &= ~cross_class_duplicates(boxes, scores, labels, image, among=kept, iou_thr=0.5)
    return {"images": images, "candidates": int(scores.size), "target_per_image": sel["target_per_image"],
            "before_achieved_per_image": round(int(kept.sum()) / images, 2),
            "before_threshold": round(float(old.thresholds[0]), 4),
            "after_achieved_per_image": round(sel["achieved_per_image"], 2),
            "after_threshold": round(next(iter(sel["thresholds"].values())), 4),
            "after_cross_class_duplicates": sel["cross_class_duplicates"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", type=int, default=1_000_000)
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--reference-images", type=int, default=2_000, help="images the Python reference runs on")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    dense = max(args.images // 10, 1), max(args.reference_images // 10, 1)  # ten times the candidates per image
    results = {"speed": speed(args.candidates, args.images, args.reference_images),
               "speed_dense": speed(args.candidates, *dense), "rtdetr_like": rtdetr_like(300)}  # fmt: skip
    results["threads"], results["load_average"] = args.threads, [round(x, 2) for x in os.getloadavg()]
    results["command"] = "python bench/select_speed.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None
    )
    results["provenance"] = provenance()
    r = results["rtdetr_like"]
    for s in (results["speed"], results["speed_dense"]):
        ref_s = s["python_reference_seconds_scaled"]
        print(f"cross-class filter: {s['candidates']:,} candidates on {s['images']:,} images in {s['seconds']:.2f} s "
              f"(first call {s['first_call_seconds']:.2f} s); the former Python loop {ref_s:.1f} s "
              f"(scaled from {s['reference_images']:,} images, same masks): {s['speedup']:.0f}x")  # fmt: skip
    print(
        f"RT-DETR-like teacher: target {r['target_per_image']:.2f} per image; kept "
        f"{r['before_achieved_per_image']:.2f} before (threshold first), {r['after_achieved_per_image']:.2f} now"
    )
    if args.out:
        write_json_atomic(args.out, results, indent=2)


if __name__ == "__main__":
    main()
