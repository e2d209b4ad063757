"""Tiny data sets and a checkpoint for the reliability tests (64 px images, an untrained small model)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datadistill.data.coco import load_coco
from datadistill.data.synth import make_shapes
from datadistill.models import torchvision as models

SIZE_PX = 64


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 labeled images of 64 px: ``annotations.json`` and ``images/``."""
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, num_images=6, seed=0, size_px=SIZE_PX)
    return root


@pytest.fixture(scope="session")
def checkpoint(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained small_fcos for the classes of ``shapes`` (its detections are noise, but real ones)."""
    torch.manual_seed(0)
    meta = models.ModelMeta.from_dataset(
        "small_fcos", load_coco(shapes / "annotations.json"), min_size=SIZE_PX, max_size=SIZE_PX
    )
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    models.save_checkpoint(path, model=models.build_model(meta), meta=meta)
    return path


@pytest.fixture(scope="session")
def unlabeled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 random images of 48 x 64 px and two broken files (their rows must survive kills too)."""
    root = tmp_path_factory.mktemp("unlabeled")
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    return root


def _can_mount() -> bool:
    if os.geteuid() != 0:
        return False
    probe = Path("/proc/self/mountinfo")
    return probe.exists()


@pytest.fixture
def tmpfs(tmp_path: Path):
    """``mount(size_kb, readonly=False) -> Path``: a real small tmpfs (root only, else the test is skipped),
    unmounted at the end; ``remount(path, size_kb)`` grows it (the disk is freed)."""
    mounted: list[Path] = []

    class Tmpfs:
        @staticmethod
        def mount(size_kb: int, *, readonly: bool = False) -> Path:
            if not _can_mount():
                pytest.skip("needs root to mount a tmpfs")
            target = tmp_path / f"tmpfs{len(mounted)}"
            target.mkdir()
            options = f"size={size_kb}k" + (",ro" if readonly else "")
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
            if done.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
            mounted.append(target)
            return target

        @staticmethod
        def remount(target: Path, size_kb: int) -> None:
            subprocess.run(["mount", "-o", f"remount,size={size_kb}k", str(target)], check=True)

    yield Tmpfs
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], check=False)
