"""Hostile files never run code and never make us read outside the image root, whatever command meets them.

Checkpoints and weights are read with ``torch.load(weights_only=True)``: a pickle that would run code is
refused with one line. YAML (run configs, a run folder's recorded config, YOLO data.yaml) is read with
``safe_load``. Image paths from json files and list files never leave their root. Each hostile file would
create a marker file if it ran; the marker must not exist afterwards.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from harness import cli, error_line
from PIL import Image


class _Touch:
    """Unpickling this runs ``Path.touch(marker)``: the harmless stand-in for ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _zip_checkpoint(path: Path, marker: Path) -> None:
    """A torch zip file that looks like a datadistill checkpoint, with the payload inside."""
    torch.save({"format": "datadistill-checkpoint", "version": 1, "meta": {}, "state_dict": {}, "x": _Touch(marker)},
               path)  # fmt: skip


def _legacy_pickle(path: Path, marker: Path) -> None:
    """A bare pickle (torch's legacy format accepts one), protocol 2."""
    path.write_bytes(pickle.dumps({"state_dict": _Touch(marker)}, protocol=2))


@pytest.mark.parametrize("make", [_zip_checkpoint, _legacy_pickle], ids=["torch-zip", "bare-pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_by_every_command(
    make, shapes: Path, unlabeled: Path, tmp_path: Path
) -> None:  # noqa: ANN001
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    make(evil, marker)
    data, images = shapes / "annotations.json", shapes / "images"
    commands = {
        "label": ("label", "--checkpoint", evil, "--images", unlabeled, "--out", tmp_path / "l", "--device", "cpu"),
        "evaluate": ("evaluate", "--data", data, "--checkpoint", evil, "--images", images, "--out", tmp_path / "m.json"),
        "train --init": ("train", "--data", data, "--images", images, "--out", tmp_path / "t", "--init", evil,
                         "--epochs", "1", "--batch-size", "2", "--threads", "1"),
    }  # fmt: skip
    for name, argv in commands.items():
        line = error_line(cli(*argv), str(evil))
        assert "refused to load" in line or "not a readable" in line, (name, line)
        assert not marker.exists(), name
    if make is _legacy_pickle:
        return  # `run` reads the file as `train --init` does: once is enough (it trains a teacher first)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"data": {"train": str(data), "train_images": str(images), "unlabeled": str(unlabeled)},
                                  "teacher": {"epochs": 1, "batch_size": 2}, "student": {"init": str(evil)},
                                  "device": "cpu", "threads": 1, "workers": 0}))  # fmt: skip
    # `run` trains the teacher first; a student init that would run code is refused when it is read.
    line = error_line(cli("run", config, "--out", tmp_path / "run", "--set", "label.views=identity"), str(evil))
    assert "refused to load" in line or "not a readable" in line
    assert not marker.exists()


def test_yaml_that_would_run_code_is_refused(shapes: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    tag = f"!!python/object/apply:pathlib.Path.touch [{str(marker)!r}]"
    config = tmp_path / "evil.yaml"
    config.write_text(f"data: {{train: {tag}}}\n")
    error_line(cli("run", config, "--out", tmp_path / "run"), str(config), "invalid YAML")
    # a run folder whose recorded config was tampered with
    good = tmp_path / "good.yaml"
    good.write_text(f"data: {{train: {shapes / 'annotations.json'}, train_images: {shapes / 'images'}, "
                    f"unlabeled: {shapes / 'images'}}}\n")  # fmt: skip
    (tmp_path / "tampered").mkdir()
    (tmp_path / "tampered" / "config.yaml").write_text(f"seed: {tag}\n")
    error_line(cli("run", good, "--out", tmp_path / "tampered"), "config.yaml: not a readable run config")
    report = cli("report", tmp_path / "tampered")  # the report leaves out what needs the config
    assert report.rc == 0 and (tmp_path / "tampered" / "report.html").exists()
    # a YOLO data set
    (tmp_path / "yolo" / "images").mkdir(parents=True)
    (tmp_path / "yolo" / "data.yaml").write_text(f"train: images\nnames: [a]\nx: {tag}\n")
    error_line(cli("convert", tmp_path / "yolo", tmp_path / "out.json", "--to", "coco"), "invalid YAML")
    assert not marker.exists()


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """An image outside the image root that a hostile data set points at."""
    (tmp_path / "root").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "root" / "ok.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "secret.png")
    return tmp_path / "secret.png"


@pytest.mark.parametrize(
    "name", ["../secret.png", "sub/../../secret.png", "ABSOLUTE", "..\\secret.png"],
    ids=["dotdot", "nested-dotdot", "absolute", "backslash-dotdot"],
)  # fmt: skip
def test_image_paths_never_leave_their_root(name: str, secret: Path, checkpoint: Path, shapes: Path) -> None:
    tmp = secret.parent
    name = str(secret) if name == "ABSOLUTE" else name
    coco = {"images": [{"id": 1, "file_name": "ok.png", "width": 8, "height": 8},
                       {"id": 2, "file_name": name, "width": 8, "height": 8}],
            "annotations": [], "categories": json.loads((shapes / "annotations.json").read_text())["categories"]}  # fmt: skip
    (tmp / "hostile.json").write_text(json.dumps(coco))
    (tmp / "hostile.txt").write_text(f"ok.png\n{name}\n")
    label = (
        "label",
        "--checkpoint",
        checkpoint,
        "--out",
        tmp / "labels",
        "--image-root",
        tmp / "root",
        "--device",
        "cpu",
    )
    for source, where in ((tmp / "hostile.json", "image 2"), (tmp / "hostile.txt", "line 2")):
        line = error_line(cli(*label, "--images", source), str(source), where)
        assert "leaves the image root" in line or "is absolute" in line
    line = error_line(
        cli("train", "--data", tmp / "hostile.json", "--images", tmp / "root", "--out", tmp / "t"), "image 2"
    )
    assert "leaves the image root" in line or "is absolute" in line
    result = cli("validate", tmp / "hostile.json", "--images", tmp / "root")
    assert result.rc == 1 and "image 2: image path" in result.out
    assert not (tmp / "labels" / "shards").exists() and not (tmp / "t").exists()
