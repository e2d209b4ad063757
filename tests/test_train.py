"""The training stage on tiny synthetic data: outputs, exact resume after SIGKILL, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from datadistill.core.schedule import default_lr_steps
from datadistill.data.coco import load_coco
from datadistill.data.label_table import save_label_table
from datadistill.data.synth import make_figures, make_shapes
from datadistill.errors import DataError, UserError
from datadistill.models import torchvision as models
from datadistill.stages.train import FLAT_CACHE, LrSchedule, TrainConfig, train

SIZE_PX = 64


@pytest.fixture(scope="module")
def pseudo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 other images with their labels as pseudo-labels (with a score), as `select` writes them."""
    root = tmp_path_factory.mktemp("pseudo")
    path = make_shapes(root, num_images=6, seed=1, size_px=SIZE_PX)
    raw = json.loads(Path(path).read_text())
    for i, ann in enumerate(raw["annotations"]):
        ann["score"] = 0.5 + 0.05 * (i % 10)
    (root / "pseudo.json").write_text(json.dumps(raw))
    return root


def _cfg(shapes: Path, out: Path, **kwargs: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        data=str(shapes / "annotations.json"),
        images=str(shapes / "images"),
        out=str(out),
        epochs=2,
        save_every=1,
        batch_size=4,
        lr=0.01,
        warmup_iters=2,
        min_size=SIZE_PX,
        max_size=SIZE_PX,
        threads=1,
        log_every=1,
    )
    return TrainConfig(**(base | kwargs))


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 images of stick figures with 13 keypoints, 64 px."""
    root = tmp_path_factory.mktemp("figures")
    make_figures(root, num_images=4, seed=0, size_px=SIZE_PX)
    return root


@pytest.fixture(scope="module")
def trained(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainConfig:
    """A finished 2-epoch run with validation."""
    cfg = _cfg(shapes, tmp_path_factory.mktemp("runs") / "teacher", val=str(shapes / "annotations.json"))
    train(cfg)
    return cfg


def _lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_training_writes_checkpoints_metrics_config_and_provenance(trained: TrainConfig) -> None:
    out = Path(trained.out)
    for name in ("checkpoint.pt", "last.pt", "metrics.jsonl", "config.yaml", "provenance.json", "timings.json"):
        assert (out / name).is_file(), name
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"] == "small_fcos" and config["epochs"] == 2 and config["seed"] == 0
    assert config["data"] == str(Path(trained.data).resolve()) and config["lr_steps"] == [1]

    lines = _lines(out)
    epochs = [line for line in lines if line["type"] == "epoch"]
    steps = [line for line in lines if line["type"] == "step"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert len(steps) == 4  # 8 images / batch 4 = 2 iterations per epoch, logged every iteration
    for line in steps:
        assert {"loss", "lr", "it_s", "classification", "bbox_regression"} <= set(line)
        assert 1 <= line["threads"] <= torch.get_num_threads()  # the governor's count (fewer on a busy machine)
    for line in epochs:
        assert "AP" in line["val"]["bbox"] and line["loss"] > 0

    _, meta, extra = models.load_checkpoint(out / "checkpoint.pt")
    assert meta.model == "small_fcos" and meta.min_size == SIZE_PX
    assert meta.class_names == tuple(c["name"] for c in json.loads(Path(trained.data).read_text())["categories"])
    last = models.read_checkpoint(out / "last.pt")["extra"]
    assert last["epoch"] == 2 and {"optimizer", "scheduler", "rng", "config"} <= set(last)
    assert "versions" in json.loads((out / "provenance.json").read_text())


def test_student_mixes_pseudo_labels_and_starts_from_the_teacher(
    shapes: Path, pseudo: Path, trained: TrainConfig, tmp_path: Path
) -> None:
    cfg = _cfg(
        shapes,
        tmp_path / "student",
        epochs=1,
        pseudo=str(pseudo / "pseudo.json"),
        pseudo_images=str(pseudo / "images"),
        init=str(Path(trained.out) / "checkpoint.pt"),
    )
    train(cfg)
    steps = [line for line in _lines(tmp_path / "student") if line["type"] == "step"]
    assert len(steps) == 4  # batch 4 at 0.4 = 2 real + 2 pseudo: 8 real images make 4 iterations
    config = yaml.safe_load((tmp_path / "student" / "config.yaml").read_text())
    assert config["pseudo_ratio"] == 0.4 and config["init"].endswith("checkpoint.pt")


def test_keypoint_model_trains_and_is_evaluated_on_keypoints(figures: Path, tmp_path: Path) -> None:
    cfg = _cfg(figures, tmp_path / "kp", epochs=1, batch_size=2, val=str(figures / "annotations.json"))
    train(cfg)
    epoch = [line for line in _lines(tmp_path / "kp") if line["type"] == "epoch"][0]
    assert epoch["loss_keypoint"] > 0 and "AP" in epoch["val"]["keypoints"]
    meta = models.ModelMeta.from_dict(models.read_checkpoint(tmp_path / "kp" / "checkpoint.pt")["meta"])
    assert meta.model == "small_keypointrcnn" and len(meta.keypoint_names) == 13
    assert meta.flip_index[meta.keypoint_names.index("left_hand")] == meta.keypoint_names.index("right_hand")


@pytest.mark.parametrize(
    ("it", "factor"),
    [
        pytest.param(0, 0.001, id="warmup-starts-at-warmup-factor"),
        pytest.param(5, 0.5005, id="warmup-halfway-linear"),
        pytest.param(10, 1.0, id="warmup-done"),
        pytest.param(19, 1.0, id="before-first-step"),
        pytest.param(20, 0.1, id="first-step"),
        pytest.param(30, 0.01, id="second-step"),
    ],
)
def test_lr_schedule_warms_up_linearly_then_steps(it: int, factor: float) -> None:
    schedule = LrSchedule(warmup_iters=10, warmup_factor=0.001, milestones=(20, 30), gamma=0.1)
    assert schedule(it) == pytest.approx(factor)


@pytest.mark.parametrize(("epochs", "steps"), [(12, (8, 11)), (2, (1,)), (1, ()), (26, (17, 23))])
def test_default_lr_steps_follow_the_1x_schedule(epochs: int, steps: tuple[int, ...]) -> None:
    assert default_lr_steps(epochs) == steps


def test_resume_of_a_finished_run_changes_nothing_and_a_changed_option_is_refused(trained: TrainConfig) -> None:
    before = (Path(trained.out) / "checkpoint.pt").stat().st_mtime_ns
    train(dataclasses.replace(trained, resume=True, workers=0, log_every=5))  # runtime options may change
    assert (Path(trained.out) / "checkpoint.pt").stat().st_mtime_ns == before
    with pytest.raises(UserError, match=r"^--resume: lr is 0.02 but the run .* was started with 0.01"):
        train(dataclasses.replace(trained, resume=True, lr=0.02))
    with pytest.raises(UserError, match="^--resume: epochs is 3"):
        train(dataclasses.replace(trained, resume=True, epochs=3))
    with pytest.raises(UserError, match="^--resume: model is 'small_frcnn'"):
        train(dataclasses.replace(trained, resume=True, model="small_frcnn"))


def test_an_out_folder_with_a_run_is_refused_without_resume(trained: TrainConfig) -> None:
    with pytest.raises(UserError, match="already holds a training run .*use --resume to continue it, or another --out"):
        train(trained)


def test_resume_without_last_pt_is_a_one_line_error(shapes: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^--resume: .*last\.pt not found") as info:
        train(_cfg(shapes, tmp_path / "new", resume=True))
    assert "\n" not in str(info.value)


_CHILD = """
import dataclasses
import time
from pathlib import Path

from datadistill.models import torchvision as models
from datadistill.stages.train import TrainConfig, train_loop

calls = 0


def losses(model, images, targets):
    # stall in the first iteration of epoch 2, after telling the test, which then kills us
    global calls
    calls += 1
    out = models.losses(model, images, targets)
    if calls == {iters_per_epoch} + 1:
        Path({marker!r}).touch()
        time.sleep(600)
    return out


# the seam: the loop runs the losses of the LoopBackend it is given
train_loop(TrainConfig(**{kwargs!r}), dataclasses.replace(models.LOOP, losses=losses))
"""


def test_a_run_killed_mid_epoch_resumes_to_the_same_weights(shapes: Path, tmp_path: Path) -> None:
    # Faster R-CNN samples anchors and proposals at random: the resumed run must restore the RNG states
    killed, whole, marker = tmp_path / "killed", tmp_path / "whole", tmp_path / "in-epoch-2"
    cfg = _cfg(shapes, killed, model="small_frcnn", epochs=3, workers=0)
    script = _CHILD.format(kwargs=dataclasses.asdict(cfg), iters_per_epoch=2, marker=str(marker))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
            assert time.monotonic() < deadline, "the child did not reach epoch 2 in 120 s"
            time.sleep(0.02)
        assert (killed / "last.pt").exists()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stderr:
            child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert not (killed / "checkpoint.pt").exists()
    assert models.read_checkpoint(killed / "last.pt")["extra"]["epoch"] == 1

    train(dataclasses.replace(cfg, resume=True))
    train(dataclasses.replace(cfg, out=str(whole)))

    a = models.read_checkpoint(killed / "checkpoint.pt")["state_dict"]
    b = models.read_checkpoint(whole / "checkpoint.pt")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # metrics.jsonl was cut back to the resumed epoch: the same lines (timings aside) as the whole run
    drop = ("it_s", "time_s")
    strip = [{k: v for k, v in line.items() if k not in drop} for line in _lines(killed)]
    assert strip == [{k: v for k, v in line.items() if k not in drop} for line in _lines(whole)]


def test_init_from_a_checkpoint_of_other_classes_is_refused(shapes: Path, tmp_path: Path) -> None:
    meta = models.ModelMeta(
        model="small_fcos",
        task="boxes",
        class_names=("cat", "dog", "zebra"),
        category_ids=(1, 2, 3),
        min_size=SIZE_PX,
        max_size=SIZE_PX,
    )
    models.save_checkpoint(tmp_path / "other.pt", model=models.build_model(meta), meta=meta)
    with pytest.raises(UserError, match=r"its classes \[cat, dog, zebra\] do not match the data's \[") as info:
        train(_cfg(shapes, tmp_path / "out", init=str(tmp_path / "other.pt")))
    assert "\n" not in str(info.value)


def test_pseudo_labels_whose_images_are_missing_are_refused_up_front(
    shapes: Path, pseudo: Path, tmp_path: Path
) -> None:
    images = tmp_path / "few"
    images.mkdir()
    (images / "000002.png").write_bytes((pseudo / "images" / "000002.png").read_bytes())
    cfg = _cfg(shapes, tmp_path / "out", pseudo=str(pseudo / "pseudo.json"), pseudo_images=str(images))
    with pytest.raises(
        UserError, match=r"^5 of the 6 pseudo-label images are missing from --pseudo-images .*000001\.png$"
    ):
        train(cfg)
    assert not (tmp_path / "out").exists()


def test_a_student_trains_the_same_on_the_label_table_as_on_its_json(
    shapes: Path, pseudo: Path, tmp_path: Path
) -> None:
    table = save_label_table(load_coco(pseudo / "pseudo.json"), tmp_path / "pseudo.parquet")
    for name, path in (("json", pseudo / "pseudo.json"), ("table", table)):
        train(_cfg(shapes, tmp_path / name, pseudo=str(path), pseudo_images=str(pseudo / "images")))
    drop = ("it_s", "time_s")
    lines = [
        [{k: v for k, v in line.items() if k not in drop} for line in _lines(tmp_path / n)] for n in ("json", "table")
    ]
    assert lines[0] == lines[1] and len(lines[0]) == 10  # 2 epochs of 4 steps, bit for bit
    a, b = (models.read_checkpoint(tmp_path / n / "checkpoint.pt")["state_dict"] for n in ("json", "table"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert yaml.safe_load((tmp_path / "table" / "config.yaml").read_text())["pseudo"] == str(table)
    assert not (tmp_path / "table" / FLAT_CACHE).exists()  # the memory-mapped labels went with the run's end


@pytest.mark.parametrize(
    ("change", "match"),
    [
        pytest.param(
            "images",
            r"^5 of the 6 pseudo-label images are missing from --pseudo-images .*000001\.png$",
            id="missing-images",
        ),
        pytest.param(
            "labels",
            r"pseudo\.parquet: image 1 \(000001\.png\): column 'labels' class index 9 is not",
            id="class-out-of-range",
        ),
    ],
)
def test_a_label_table_with_a_problem_is_refused_and_leaves_no_output_folder(
    shapes: Path, pseudo: Path, tmp_path: Path, change: str, match: str
) -> None:
    coco = load_coco(pseudo / "pseudo.json")
    images = pseudo / "images"
    if change == "images":
        images = tmp_path / "few"
        images.mkdir()
        (images / "000002.png").write_bytes((pseudo / "images" / "000002.png").read_bytes())
    else:
        first = coco.labels[coco.images[0].id]
        labels = dict(coco.labels) | {
            coco.images[0].id: dataclasses.replace(first, labels=np.full_like(first.labels, 9))
        }
        coco = dataclasses.replace(coco, labels=labels)
    table = save_label_table(coco, tmp_path / "pseudo.parquet")
    with pytest.raises(UserError, match=match):
        train(_cfg(shapes, tmp_path / "out", pseudo=str(table), pseudo_images=str(images)))
    assert not (tmp_path / "out").exists()


def test_pseudo_labels_of_other_categories_are_refused(shapes: Path, pseudo: Path, tmp_path: Path) -> None:
    raw = json.loads((pseudo / "pseudo.json").read_text())
    raw["categories"][0]["name"] = "not-a-shape"
    (tmp_path / "p.json").write_text(json.dumps(raw))
    cfg = _cfg(shapes, tmp_path / "out", pseudo=str(tmp_path / "p.json"), pseudo_images=str(pseudo / "images"))
    with pytest.raises(UserError, match=r"pseudo-label categories \[not-a-shape, .*\] differ from the data's"):
        train(cfg)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param(dict(pseudo_ratio=1.0), r"pseudo_ratio must be in \[0, 1\)", id="ratio-1"),
        pytest.param(dict(pseudo_ratio=-0.2), r"pseudo_ratio must be in \[0, 1\)", id="ratio-negative"),
        pytest.param(dict(pseudo_ratio=0.0), "would mix no pseudo images", id="ratio-0-with-pseudo"),
        pytest.param(dict(batch_size=1), "batch_size 1 is too small for pseudo_ratio 0.4", id="batch-too-small"),
    ],
)
def test_a_bad_pseudo_ratio_is_a_one_line_error(
    shapes: Path, pseudo: Path, tmp_path: Path, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(UserError, match=match) as info:
        train(
            _cfg(
                shapes,
                tmp_path / "out",
                pseudo=str(pseudo / "pseudo.json"),
                pseudo_images=str(pseudo / "images"),
                **kwargs,
            )
        )
    assert "\n" not in str(info.value)


def test_an_unreadable_image_found_by_a_worker_process_is_a_one_line_error(shapes: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(shapes / "images", images)
    (images / "000003.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"^\S*000003\.png: not a readable image") as info:
        train(_cfg(shapes, tmp_path / "out", images=str(images), workers=1))
    assert "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_one_line_error(shapes: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="CUDA is not available"):
        train(_cfg(shapes, tmp_path / "out", device="cuda"))
