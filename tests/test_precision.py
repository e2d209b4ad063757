"""Mixed precision (``--precision``) and the overlapped labeling loop, on a CPU.

bf16 autocast runs on a CPU too, so its training steps and labels are checked here against fp32; fp16
needs a GPU and is refused on a CPU in one line. The overlapped loop (fusion and writing in a thread
beside the next batch) must write the very bytes of the plain loop (``--sync``), kills included.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datadistill.core.types import Detections
from datadistill.data.coco import CocoDataset, load_coco
from datadistill.data.label_folder import read_shards, shard_detections
from datadistill.data.synth import make_shapes
from datadistill.errors import UserError
from datadistill.runtime.devices import autocast, resolve_precision
from datadistill.stages.evaluate import evaluate_predictions
from datadistill.stages.label import LabelConfig, label
from datadistill.stages.train import TrainConfig, train

CPU = torch.device("cpu")
SIZE_PX = 128  # at 64 px, CPU bf16 backward of the 1x1 P7 map gives NaN weight gradients (torch 2.14, oneDNN)


@pytest.mark.parametrize(("requested", "resolved"), [("auto", "fp32"), ("fp32", "fp32"), ("bf16", "bf16")])
def test_precision_resolves_on_a_cpu(requested: str, resolved: str) -> None:
    assert resolve_precision(requested, CPU) == resolved


@pytest.mark.parametrize(
    ("requested", "message"),
    [("fp16", "precision fp16 needs a GPU, and the device is cpu: use bf16 or fp32 on a CPU"),
     ("half", "precision must be one of auto, fp32, bf16, fp16, got 'half'")],
)  # fmt: skip
def test_bad_precisions_are_one_line_errors(requested: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        resolve_precision(requested, CPU)
    assert str(err.value) == message


def test_autocast_fp32_is_off_and_bf16_is_on() -> None:
    x = torch.ones(4, 4)
    with autocast(CPU, "fp32"):
        assert (x @ x).dtype == torch.float32
    with autocast(CPU, "bf16"):
        assert (x @ x).dtype == torch.bfloat16


@pytest.mark.parametrize("command", ["train", "label", "evaluate"])
def test_fp16_on_a_cpu_is_refused_by_every_command_in_one_line(command: str, tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_shapes(root, num_images=2, seed=0, size_px=SIZE_PX)
    data, images = str(root / "annotations.json"), str(root / "images")
    args = {
        "train": ["--data", data, "--images", images, "--out", str(tmp_path / "t")],
        "label": ["--model", str(tmp_path / "none.pt"), "--images", images, "--out", str(tmp_path / "l")],
        "evaluate": ["--model", str(tmp_path / "none.pt"), "--data", data, "--images", images,
                     "--out", str(tmp_path / "m.json")],
    }[command]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "datadistill", command, *args, "--device", "cpu",
                           "--precision", "fp16"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines == ["error: precision fp16 needs a GPU, and the device is cpu: use bf16 or fp32 on a CPU"]


# ----------------------------------------------------------------------------------------------------
# bf16 against fp32: training steps and labels


@pytest.fixture(scope="module")
def shapes_128(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Labeled shapes (``train``) and held-back ones (``held``, whose labels score the pseudo-labels)."""
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root / "train", num_images=32, seed=0, size_px=SIZE_PX)
    make_shapes(root / "held", num_images=24, seed=1, size_px=SIZE_PX)
    return {"train": root / "train", "held": root / "held"}


def _train_cfg(data: Path, out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(data=str(data / "annotations.json"), images=str(data / "images"), out=str(out),
                                   model="small_fcos", iterations=240, batch_size=4, warmup_iters=20,
                                   min_size=SIZE_PX, max_size=SIZE_PX, threads=1, log_every=1, device="cpu")  # fmt: skip
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def fp32_teacher(shapes_128: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small_fcos trained in fp32 for 240 iterations: good enough that its labels have an AP to compare."""
    return train(_train_cfg(shapes_128["train"], tmp_path_factory.mktemp("runs") / "teacher", precision="fp32"))


def _steps(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["type"] == "step"]


def test_bf16_training_steps_give_finite_losses_close_to_fp32(shapes_128: dict[str, Path], tmp_path: Path) -> None:
    runs = {
        p: train(_train_cfg(shapes_128["train"], tmp_path / p, iterations=12, precision=p)) for p in ("fp32", "bf16")
    }
    fp32, bf16 = (_steps(runs[p]) for p in ("fp32", "bf16"))
    assert len(bf16) == len(fp32) == 12
    assert all(math.isfinite(r["loss"]) for r in bf16)
    # the same data and initial weights: the first step differs only by bf16 rounding (8 bits of mantissa)
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=0.03)
    assert bf16[0]["loss"] != fp32[0]["loss"]  # autocast was on
    assert torch.load(runs["bf16"] / "checkpoint.pt", weights_only=True)["state_dict"]


def _pseudo_label_ap(folder: Path, truth: CocoDataset) -> float:
    ids = {im.file_name: im.id for im in truth.images}
    preds = {ids[r["file_name"]]: shard_detections(r, 0) for r in read_shards(folder).to_pylist()}
    metrics = evaluate_predictions(truth, preds)
    return 100 * metrics["bbox"]["AP"]


def test_bf16_labels_are_within_half_a_point_of_fp32(
    fp32_teacher: Path, shapes_128: dict[str, Path], tmp_path: Path
) -> None:
    truth = load_coco(shapes_128["held"] / "annotations.json")
    ap = {}
    for p in ("fp32", "bf16"):
        label(LabelConfig(model=str(fp32_teacher), images=str(shapes_128["held"] / "images"), out=str(tmp_path / p),
                          views="default", batch_size=8, workers=0, device="cpu", precision=p))  # fmt: skip
        ap[p] = _pseudo_label_ap(tmp_path / p, truth)
    manifest = json.loads((tmp_path / "bf16" / "manifest.json").read_text())
    assert manifest["config"]["precision"] == "bf16"
    assert ap["fp32"] > 3.0, ap  # a teacher with something to lose (about 5 AP after 240 iterations)
    assert abs(ap["bf16"] - ap["fp32"]) <= 0.5, ap


def test_a_folder_labeled_in_another_precision_is_refused(
    fp32_teacher: Path, shapes_128: dict[str, Path], tmp_path: Path
) -> None:
    cfg = LabelConfig(model=str(fp32_teacher), images=str(shapes_128["held"] / "images"), out=str(tmp_path / "l"),
                      views="identity", workers=0, device="cpu", precision="fp32")  # fmt: skip
    label(cfg)
    with pytest.raises(UserError, match="another precision \\('fp32', now 'bf16'\\)"):
        label(LabelConfig(**{**cfg.__dict__, "precision": "bf16"}))


def test_bf16_predictions_leave_autocast_in_fp32(fp32_teacher: Path, shapes_128: dict[str, Path]) -> None:
    from datadistill.models.detector import load_detector
    from datadistill.stages.multiview import predict

    detector = load_detector(str(fp32_teacher), device=CPU)
    image = torch.rand(3, SIZE_PX, SIZE_PX)
    (det,) = predict(detector, [image], precision="bf16")
    assert isinstance(det, Detections) and det.boxes.dtype == det.scores.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------
# the overlapped loop writes the bytes of the plain one


def _random_images(root: Path, n: int) -> Path:
    rng = np.random.default_rng(3)
    root.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48 + i % 5, 64, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("part-*.parquet"))}


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL semantics")
def test_overlapped_loop_writes_the_plain_loops_bytes_killed_and_resumed(
    fp32_teacher: Path, tmp_path: Path, label_killed_after: Callable[..., int]
) -> None:
    images = _random_images(tmp_path / "imgs", 200)
    args = ["--model", str(fp32_teacher), "--images", str(images), "--views", "identity,hflip,scale:1.5",
            "--batch-size", "4", "--shard-size", "20", "--workers", "1", "--device", "cpu"]  # fmt: skip
    plain = tmp_path / "plain"
    subprocess.run([sys.executable, "-m", "datadistill", "label", *args, "--sync", "--out", str(plain)], check=True,
                   capture_output=True)  # fmt: skip
    killed = tmp_path / "killed"
    for attempt in range(2):  # killed once 2, then 5 of the 11 shards are written
        assert 2 + 3 * attempt <= label_killed_after(args, killed, 2 + 3 * attempt) < 11
    done = subprocess.run([sys.executable, "-m", "datadistill", "label", *args, "--out", str(killed)], check=True,
                          capture_output=True)  # fmt: skip
    assert json.loads((killed / "manifest.json").read_text())["timings"]["writer"] == "thread", done.stderr[-2000:]
    reference = _shard_bytes(plain)
    assert len(reference) == 11  # 201 files in shards of 20
    assert _shard_bytes(killed) == reference
    rows = read_shards(plain).to_pylist()
    assert sum(len(r["scores"]) for r in rows) > 100  # the bytes compared hold real detections
    assert [r["file_name"] for r in rows if r["error"]] == ["broken.png"]
