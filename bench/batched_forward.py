"""The forward pass of torchvision detectors with torchvision's per-image transform and post-processing
against :mod:`datadistill.models.batched`'s, and channels-last against channels-first, in one run.

    OMP_NUM_THREADS=1 python bench/batched_forward.py [--models small_fcos fasterrcnn_resnet50_fpn_v2]
        [--images 8] [--size 320] [--repeats 5] [--device cpu]

Random weights, ``--images`` images of ``--size`` px in one batch, the model built at that input size (no
resize). Prints the median seconds per forward of each and the ratios (torchvision's / ours: above 1 is
faster). The batched variants run batched on a CPU too (``configure(one_call=True)``), where by default the
models keep torchvision's own code (measured slower batched there).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from datadistill.models import batched
from datadistill.models.zoo import MODELS


def _forward_seconds(model: torch.nn.Module, images: list[torch.Tensor]) -> float:
    with torch.no_grad():
        if images[0].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(images)
        if images[0].is_cuda:
            torch.cuda.synchronize()
    return time.perf_counter() - start


def _batched(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with the batched transform and post-processing, on a CPU too (by default only on a GPU)."""
    return batched.configure(batched.install(model), one_call=True)


def _variants(model: torch.nn.Module, images: list[torch.Tensor], *, repeats: int) -> dict[str, float]:
    """The median seconds of one forward with torchvision's transform and post-processing, the batched ones,
    and the batched ones channels-last, measured in turns (one warm-up of each) so that a machine's drift
    falls on all three alike."""
    variants = {
        "torchvision": lambda: batched.uninstall(model).to(memory_format=torch.contiguous_format),
        "batched": lambda: _batched(model).to(memory_format=torch.contiguous_format),
        "batched + channels-last": lambda: batched.channels_last(_batched(model)),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(repeats + 1):
        for name, switch in variants.items():
            switch()
            model.transform.memory_format = torch.channels_last if "channels" in name else torch.contiguous_format
            seconds = _forward_seconds(model, images)
            if i:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small_fcos", "fasterrcnn_resnet50_fpn_v2"])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {args.device}")
    g = torch.Generator().manual_seed(0)
    images = [im.to(args.device) for im in torch.rand(args.images, 3, args.size, args.size, generator=g)]
    for name in args.models:
        torch.manual_seed(0)
        model = MODELS[name].builder(num_classes=3, num_keypoints=0, min_size=args.size, max_size=args.size)
        model.to(args.device).eval()
        t = _variants(model, images, repeats=args.repeats)
        theirs, ours, last = t["torchvision"], t["batched"], t["batched + channels-last"]
        print(f"{name}: torchvision {theirs:.3f} s, batched {ours:.3f} s, batched + channels-last {last:.3f} s "
              f"per forward of {args.images} x {args.size} px (median of {args.repeats}); "
              f"torchvision/batched {theirs / ours:.3f}, channels-first/channels-last {ours / last:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
