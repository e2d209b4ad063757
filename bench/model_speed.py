"""Training and inference speed of the small models on a CPU: iterations/s at batch 8, 128 px, 1 thread.

    python bench/model_speed.py [--models small_fcos,small_keypointrcnn] [--size-px 128,160,192] [--iters 10]

Prints one row per model and input size with train it/s (forward + backward + SGD step), predict images/s,
and the ratio of each to the first row of the table (the reference): the cost of an input size read from
the data (:mod:`datadistill.stages.defaults`) is the ratio of its row to the 128 px row. Speeds are per CPU
second of this process (``time.process_time``), so that a machine shared with other jobs still gives
comparable numbers; with one thread that is the speed of one dedicated core. Each image holds 1-4 random
boxes (keypoint models: 5 keypoints per box).
"""

from __future__ import annotations

import argparse
import time

import torch

from datadistill.models.torchvision import MODELS, ModelMeta, build_model, losses, predict

NUM_KEYPOINTS = 5


def _batch(batch_size: int, size_px: int, task: str, gen: torch.Generator) -> tuple[list, list]:
    images, targets = [], []
    for _ in range(batch_size):
        images.append(torch.rand(3, size_px, size_px, generator=gen))
        n = int(torch.randint(1, 5, (), generator=gen))
        xy = torch.rand(n, 2, generator=gen) * size_px * 0.6
        wh = 8 + torch.rand(n, 2, generator=gen) * size_px * 0.35
        boxes = torch.cat([xy, (xy + wh).clamp(max=size_px - 1)], dim=1)
        target = {"boxes": boxes, "labels": torch.randint(0, 3, (n,), generator=gen)}
        if task == "keypoints":
            frac = torch.rand(n, NUM_KEYPOINTS, 2, generator=gen)
            kxy = boxes[:, None, :2] + frac * (boxes[:, None, 2:] - boxes[:, None, :2])
            target["keypoints"] = torch.cat([kxy, torch.full((n, NUM_KEYPOINTS, 1), 2.0)], dim=-1)
        targets.append(target)
    return images, targets


def measure(name: str, *, batch_size: int, size_px: int, iters: int) -> tuple[float, float, int]:
    """``(train it/s, predict images/s, parameter count)`` of model ``name``."""
    spec = MODELS[name]
    keypoints = tuple(f"k{i}" for i in range(NUM_KEYPOINTS)) if spec.task == "keypoints" else ()
    meta = ModelMeta(
        model=name,
        task=spec.task,
        class_names=("a", "b", "c"),
        category_ids=(1, 2, 3),
        keypoint_names=keypoints,
        flip_index=tuple(range(len(keypoints))),
        sigmas=(0.05,) * len(keypoints),
        min_size=size_px,
        max_size=size_px,
    )
    torch.manual_seed(0)
    model = build_model(meta)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    batches = [_batch(batch_size, size_px, spec.task, gen) for _ in range(iters + 2)]
    for step, (images, targets) in enumerate(batches):
        if step == 2:  # two warm-up steps
            start = time.process_time()
        loss = sum(losses(model, images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_its = iters / (time.process_time() - start)
    images = batches[0][0]
    predict(model, images)
    start = time.process_time()
    for _ in range(3):
        predict(model, images)
    predict_ips = 3 * len(images) / (time.process_time() - start)
    return train_its, predict_ips, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    small = [n for n, s in MODELS.items() if not s.pretrained]
    parser.add_argument("--models", default=",".join(small), help="comma-separated names from MODELS")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size-px", default="128", help="input sizes in px, a comma list (128)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        for size in (int(s) for s in args.size_px.split(",")):
            row = measure(name, batch_size=args.batch_size, size_px=size, iters=args.iters)
            rows.append((f"{name} {size} px", *row))
    ref_train, ref_pred = rows[0][1], rows[0][2]
    print(f"batch {args.batch_size}, {args.threads} thread(s); ratios against {rows[0][0]}")
    print(f"{'model':<28} {'params':>9} {'train it/s':>11} {'ratio':>6} {'predict img/s':>14} {'ratio':>6}")
    for name, train_its, predict_ips, params in rows:
        print(
            f"{name:<28} {params / 1e6:>8.2f}M {train_its:>11.2f} {train_its / ref_train:>6.2f} "
            f"{predict_ips:>14.1f} {predict_ips / ref_pred:>6.2f}"
        )


if __name__ == "__main__":
    main()
