"""How much does labeling's writer thread slow the model's Python? The batch path against image by image.

    python bench/writer_gil.py --out bench/results/writer_gil.json

On a GPU the labeling loop's thread is the model's: its forward passes are Python launching kernels, and
the writer thread (the views mapped back, fused, their spreads measured, beside the model) takes the GIL
whenever the model's thread lets it go, at every torch call. The more calls the writer makes, the more often
the model waits (measured on an H200: the small FCOS's model time rose by 30% with the writer beside it).
This bench measures that on any machine, with a stand-in for the model: a thread making ``--ops`` small
torch calls (what a short forward pass is, seen from Python), timed alone and then while a second thread
finishes labeling batches without pause, once with the batch path that ``label`` runs
(:func:`datadistill.stages.multiview.fuse_views` on :meth:`ViewOutputs.invert`) and once with the image by
image composition it replaced (each view's rows inverted, fused and spread per image). Both give the same
objects (``tests/test_multiview.py``).

Printed: the model thread's slowdown (time with the writer / time alone) and the writer's ms per batch
and torch calls per batch, for both paths; ratios from one run.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from datadistill.core import fusion, uncertainty
from datadistill.core.types import Detections
from datadistill.core.views import View, parse_views
from datadistill.runtime.io import provenance, write_json_atomic
from datadistill.stages.multiview import ViewOutputs, fuse_views


def make_outputs(views: tuple[View, ...], *, batch: int, per_view: int, size: int, seed: int) -> ViewOutputs:
    """Raw outputs of ``views`` on ``batch`` images of ``size`` px, ``per_view`` boxes per view and image
    (a detector's cap; random weights fill it), near-duplicates across views, 3 classes."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch * per_view, 2, generator=g) * size * 0.85
    base = torch.cat([xy, xy + 8 + torch.rand(batch * per_view, 2, generator=g) * 80], dim=1)
    boxes = torch.cat([base + torch.randn(base.shape, generator=g) * 2 for _ in views])
    m = len(boxes)
    return ViewOutputs(boxes=boxes, scores=torch.rand(m, generator=g), labels=torch.randint(0, 3, (m,), generator=g),
                       keypoints=None, counts=(per_view,) * (batch * len(views)), sizes=((size, size),) * batch,
                       ready=None)  # fmt: skip


def batch_path(out: ViewOutputs, views: tuple[View, ...]) -> list[Detections]:
    return fuse_views(out.invert(views, ()), fuse="nms", iou_thr=0.5, score_floor=0.05, timer=None)


def image_by_image(
    out: ViewOutputs, views: tuple[View, ...], *, flip_index: tuple[int, ...] = (), method: str = "nms",
    score_floor: float = 0.05, iou_thr: float = 0.5,
) -> list[Detections]:  # fmt: skip
    """What the writer did before, and the batch path's reference (``tests/test_multiview.py``): per image,
    each view's rows mapped back, fused, floored, and their spread measured."""
    num = len(out.sizes)
    ends = [0, *torch.tensor(out.counts).cumsum(0).tolist()]
    result = []
    for i, (h, w) in enumerate(out.sizes):
        per_view = []
        for v, view in enumerate(views):
            lo, hi = ends[v * num + i], ends[v * num + i + 1]
            det = Detections(boxes=out.boxes[lo:hi], scores=out.scores[lo:hi], labels=out.labels[lo:hi],
                             keypoints=None if out.keypoints is None else out.keypoints[lo:hi])  # fmt: skip
            per_view.append(view.invert(det, width=w, height=h, flip_index=flip_index))
        crops = [view.crop(height=h, width=w) for view in views] if any(v.tile is not None for v in views) else None
        fused = fusion.fuse(per_view, method=method, iou_thr=iou_thr, skip_box_thr=0.0, crops=crops)
        fused = fused.select(fused.scores >= score_floor)
        result.append(uncertainty.view_spread(fused, per_view, iou_thr=iou_thr))
    return result


def model_stand_in(ops: int) -> float:
    """Seconds for ``ops`` small torch calls, one after the other (each lets the GIL go, as kernel launches do)."""
    x = torch.ones(64)
    t0 = time.perf_counter()
    for _ in range(ops):
        x = x.mul(1.0000001)
    return time.perf_counter() - t0


def torch_calls(fn: Any) -> int:
    """Torch operator calls of ``fn()`` (each one a place where the GIL is let go and taken back)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def contended(ops: int, work: Any) -> tuple[float, float]:
    """(model stand-in seconds, writer ms per batch) with ``work`` looping in a thread beside it."""
    stop = threading.Event()
    done = [0, 0.0]

    def writer() -> None:
        t0 = time.perf_counter()
        while not stop.is_set():
            work()
            done[0] += 1
        done[1] = time.perf_counter() - t0

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.2)
    seconds = model_stand_in(ops)
    stop.set()
    thread.join()
    return seconds, 1000 * done[1] / max(done[0], 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", required=True, help="results json")
    p.add_argument("--views", default="default", help="views (default: the 8 default views)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (8)")
    p.add_argument("--per-view", type=int, default=100, help="boxes per view and image (100)")
    p.add_argument("--size", type=int, default=640, help="image side in px (640)")
    p.add_argument("--ops", type=int, default=200_000, help="torch calls of the model stand-in (200000)")
    p.add_argument("--repeat", type=int, default=3, help="rounds; the median is reported (3)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    views = parse_views(args.views)
    out = make_outputs(views, batch=args.batch_size, per_view=args.per_view, size=args.size, seed=0)
    paths = {"batch": lambda: batch_path(out, views), "image_by_image": lambda: image_by_image(out, views)}
    for fn in paths.values():  # compile and warm up
        fn()
    rows: dict[str, dict[str, float]] = {}
    alone = []
    for _ in range(args.repeat):
        alone.append(model_stand_in(args.ops))
        for name, fn in paths.items():
            seconds, ms = contended(args.ops, fn)
            rows.setdefault(name, {"seconds": [], "ms": []})["seconds"].append(seconds)  # type: ignore[index]
            rows[name]["ms"].append(ms)  # type: ignore[union-attr]
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    base = median(alone)
    results: dict[str, Any] = {"model_alone_s": round(base, 3), "paths": {}}
    for name, fn in paths.items():
        r = rows[name]
        results["paths"][name] = {
            "model_slowdown": round(median(r["seconds"]) / base, 3),  # type: ignore[arg-type]
            "writer_ms_per_batch": round(median(r["ms"]), 2),  # type: ignore[arg-type]
            "torch_calls_per_batch": torch_calls(fn),
        }
    b, o = results["paths"]["batch"], results["paths"]["image_by_image"]
    results["slowdown_ratio_image_by_image_over_batch"] = round(o["model_slowdown"] / b["model_slowdown"], 3)
    command = " ".join(["python", "bench/writer_gil.py", *(sys.argv[1:] if argv is None else argv)])
    results.update(views=args.views, num_views=len(views), batch_size=args.batch_size, per_view=args.per_view,
                   ops=args.ops, repeat=args.repeat, provenance=provenance(), command=command)  # fmt: skip
    write_json_atomic(Path(args.out), results, indent=2)
    print(f"model stand-in alone: {base:.2f} s for {args.ops} torch calls")
    print("| writer path | model slowdown | writer ms/batch | torch calls/batch |")
    print("| --- | --- | --- | --- |")
    for name, r in results["paths"].items():
        print(
            f"| {name} | {r['model_slowdown']:.2f}x | {r['writer_ms_per_batch']:.1f} | {r['torch_calls_per_batch']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
