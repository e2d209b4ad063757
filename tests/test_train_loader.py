"""The training stage's DataLoader: workers live across epochs, and the epoch still reaches them.

The oracle is the in-process loader (no workers): its samples follow ``set_epoch`` by construction. A
persistent worker holds the data sets it started with, so without the epoch travelling with each index it
would repeat epoch 0's augmentation; and a loader that drew its workers' seed from torch's global stream
would change the random numbers the model draws (Faster R-CNN's sampling) whenever workers are on.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from datadistill.config import TrainConfig
from datadistill.data.dataset import DetectionDataset
from datadistill.models import checkpoints
from datadistill.models.detector import training_backend
from datadistill.runtime import distributed
from datadistill.stages.train import build_loader, build_sampler, load_inputs, train

SIZE_PX = 64


def _cfg(shapes: Path, out: Path, **kwargs: Any) -> TrainConfig:
    base: dict[str, Any] = dict(data=str(shapes / "annotations.json"), images=str(shapes / "images"), out=str(out),
                                model="small_fcos", batch_size=2, min_size=SIZE_PX, max_size=SIZE_PX, threads=1,
                                device="cpu", seed=5)  # fmt: skip
    return TrainConfig(**{**base, **kwargs})


def _epochs(cfg: TrainConfig, epochs: int) -> list[list[tuple[int, torch.Tensor, int]]]:
    """Every sample of ``epochs`` epochs through :func:`build_loader`: (image id, image, reading pid)."""
    cfg, inputs = load_inputs(cfg, training_backend(cfg.model))
    sampler = build_sampler(cfg, inputs, distributed.launch_from_env())
    loader, parts = build_loader(cfg, inputs, sampler, device=torch.device("cpu"))
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for part in parts:
            part.set_epoch(epoch)
        batches = [zip(images, targets, strict=True) for images, targets in loader]
        out.append([(t["image_id"], im, int(t["pid"])) for batch in batches for im, t in batch])
    return out


def test_workers_live_across_epochs_and_augment_as_the_training_process_does(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read = DetectionDataset.__getitem__

    def tagged(self: DetectionDataset, index: int) -> Any:  # which process read the sample (workers fork)
        image, target = read(self, index)
        return image, {**target, "pid": torch.tensor(os.getpid())}

    monkeypatch.setattr(DetectionDataset, "__getitem__", tagged)
    alone = _epochs(_cfg(shapes, tmp_path / "a", workers=0), 3)
    pooled = _epochs(_cfg(shapes, tmp_path / "b", workers=2), 3)
    assert {pid for epoch in alone for *_, pid in epoch} == {os.getpid()}
    pids = [{pid for *_, pid in epoch} for epoch in pooled]
    assert len(pids[0]) == 2 and os.getpid() not in pids[0]
    assert pids[1] == pids[0] and pids[2] == pids[0]  # the same two processes: no restart per epoch
    for a, b in zip(alone, pooled, strict=True):
        assert [i for i, *_ in a] == [i for i, *_ in b] and len(a) == 8
        assert all(torch.equal(x, y) for (_, x, _), (_, y, _) in zip(a, b, strict=True))
    # the augmentation changes with the epoch (the check above would pass with epoch 0's everywhere if not)
    first = {i: im for i, im, _ in pooled[0]}
    assert sum(not torch.equal(first[i], im) for i, im, _ in pooled[2] if first[i].shape == im.shape) >= 2


def test_workers_change_no_weight_of_a_model_that_samples_at_random(shapes: Path, tmp_path: Path) -> None:
    # small_frcnn draws anchors and proposals from torch's global stream: the loader must not draw from it
    cfg = _cfg(shapes, tmp_path / "alone", model="small_frcnn", epochs=3, batch_size=4, workers=0, lr=0.01,
               warmup_iters=2, save_every=1)  # fmt: skip
    train(cfg)
    train(dataclasses.replace(cfg, out=str(tmp_path / "pooled"), workers=2))
    a = checkpoints.read_checkpoint(tmp_path / "alone" / "checkpoint.pt")["state_dict"]
    b = checkpoints.read_checkpoint(tmp_path / "pooled" / "checkpoint.pt")["state_dict"]
    assert a.keys() == b.keys() and len(a) > 10
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
