"""The CUDA paths: mixed precision and the overlapped labeling loop on a GPU (skipped without one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datadistill.data.synth import make_shapes
from datadistill.stages.label import LabelConfig, label
from datadistill.stages.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SIZE_PX = 128


@pytest.fixture(scope="module")
def cuda_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, num_images=40, seed=0, size_px=SIZE_PX)
    return root


def _train(cuda_shapes: Path, out: Path, **kw: object) -> Path:
    cfg = TrainConfig(data=str(cuda_shapes / "annotations.json"), images=str(cuda_shapes / "images"), out=str(out),
                      model="small_fcos", iterations=20, batch_size=8, min_size=SIZE_PX, max_size=SIZE_PX,
                      log_every=1, save_every=1, device="cuda", **kw)  # type: ignore[arg-type]  # fmt: skip
    return train(cfg)


def _steps(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["type"] == "step"]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_cuda_gives_finite_losses(cuda_shapes: Path, tmp_path: Path, precision: str) -> None:
    out = _train(cuda_shapes, tmp_path / precision, precision=precision)
    steps = _steps(out)
    assert len(steps) == 20 and all(s["loss"] == s["loss"] for s in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    last = torch.load(out / "last.pt", weights_only=True)
    assert ("scaler" in last["extra"]) == (precision == "fp16")


def test_fp16_run_resumes_with_its_scaler(cuda_shapes: Path, tmp_path: Path) -> None:
    out = _train(cuda_shapes, tmp_path / "r", precision="fp16")
    (out / "checkpoint.pt").unlink()
    # resuming a finished run's last.pt rebuilds the scaler from it and finishes again
    _train(cuda_shapes, tmp_path / "r", precision="fp16", resume=True)
    assert (out / "checkpoint.pt").is_file()


@pytest.fixture(scope="module")
def bf16_teacher(cuda_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(cuda_shapes, tmp_path_factory.mktemp("runs") / "teacher", precision="bf16")


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("part-*.parquet"))}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_overlapped_loop_on_cuda_writes_the_plain_loops_bytes(
    bf16_teacher: Path, cuda_shapes: Path, tmp_path: Path, precision: str
) -> None:
    outs = {}
    for sync in (True, False):
        outs[sync] = tmp_path / f"sync{sync}"
        label(LabelConfig(model=str(bf16_teacher), images=str(cuda_shapes / "images"), out=str(outs[sync]), views="default",
                          batch_size=4, shard_size=10, workers=2, device="cuda", precision=precision, sync=sync,
                          allow_weak_teacher=True))  # fmt: skip
    assert len(_shards(outs[True])) == 4
    assert _shards(outs[False]) == _shards(outs[True])
    timings = json.loads((outs[False] / "manifest.json").read_text())["timings"]
    assert 0 < timings["model_s"] < timings["loop_s"]
