"""Fusion speed against ensemble-boxes: 4 views x 300 boxes x 80 classes, normalized clustered boxes.

Run: ``python bench/fusion.py [--views 4] [--boxes 300] [--classes 80] [--repeat 20]``. Prints one table:
the median time of ours and of ensemble-boxes per call, and their ratio, after a warm-up call of each (so
numba compilation is excluded on both sides). The target is WBF at least 50x faster.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import ensemble_boxes
import numpy as np
import torch

from datadistill.core import fusion


def make_views(
    num_views: int, num_boxes: int, num_classes: int, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per view ``num_boxes`` boxes in [0, 1]: most jittered around shared objects, some false positives."""
    rng = np.random.default_rng(seed)
    num_objects = int(num_boxes * 0.8)
    centre = rng.uniform(0.15, 0.85, (num_objects, 2))
    size = rng.uniform(0.03, 0.25, (num_objects, 2))
    cls = rng.integers(0, num_classes, num_objects)
    boxes, scores, labels = [], [], []
    for _ in range(num_views):
        seen = rng.random(num_objects) < 0.9
        n_seen = int(seen.sum())
        c = centre[seen] + rng.normal(0.0, 0.01, (n_seen, 2))
        s = size[seen] * rng.uniform(0.9, 1.1, (n_seen, 2))
        lab = cls[seen]
        n_noise = num_boxes - n_seen
        c = np.concatenate([c, rng.uniform(0.15, 0.85, (n_noise, 2))])
        s = np.concatenate([s, rng.uniform(0.03, 0.25, (n_noise, 2))])
        lab = np.concatenate([lab, rng.integers(0, num_classes, n_noise)])
        b = np.clip(np.concatenate([c - s / 2, c + s / 2], axis=1), 0.0, 1.0)
        boxes.append(b)
        scores.append(rng.uniform(0.05, 1.0, num_boxes))
        labels.append(lab)
    return boxes, scores, labels


def median_time(call: Callable[[], object], repeat: int) -> float:
    call()  # warm-up: numba compilation or cache loading
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--boxes", type=int, default=300)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)

    boxes, scores, labels = make_views(args.views, args.boxes, args.classes)
    tb = [torch.from_numpy(b).float() for b in boxes]
    ts = [torch.from_numpy(s).float() for s in scores]
    tl = [torch.from_numpy(lab) for lab in labels]

    def ref(fn: Callable[..., object], **kw: object) -> Callable[[], object]:
        # ensemble-boxes' nms rescales the score arrays in place when given weights: hand it copies
        return lambda: fn([b.copy() for b in boxes], [s.copy() for s in scores], [lab.copy() for lab in labels], **kw)

    cases = [
        ("wbf", lambda: fusion.wbf(tb, ts, tl, iou_thr=0.55), ref(ensemble_boxes.weighted_boxes_fusion, iou_thr=0.55)),
        ("nms", lambda: fusion.nms(tb, ts, tl, iou_thr=0.5), ref(ensemble_boxes.nms, iou_thr=0.5)),
        ("soft_nms", lambda: fusion.soft_nms(tb, ts, tl, iou_thr=0.5), ref(ensemble_boxes.soft_nms, iou_thr=0.5)),
        (
            "box_voting",
            lambda: fusion.box_voting(tb, ts, tl, iou_thr=0.55),
            ref(ensemble_boxes.non_maximum_weighted, iou_thr=0.55),
        ),
    ]
    print(f"{args.views} views x {args.boxes} boxes x {args.classes} classes, median of {args.repeat}")
    print(f"{'method':<11} {'ours ms':>9} {'ensemble-boxes ms':>18} {'ratio':>8}")
    for name, ours, theirs in cases:
        t_ours = median_time(ours, args.repeat)
        t_theirs = median_time(theirs, args.repeat)
        print(f"{name:<11} {t_ours * 1e3:>9.3f} {t_theirs * 1e3:>18.3f} {t_theirs / t_ours:>7.1f}x")


if __name__ == "__main__":
    main()
