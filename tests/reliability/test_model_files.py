"""Model files a user names with ``--model yolo:FILE.pt`` or ``--model hf:DIR``: hostile ones never run code,
damaged ones give one line naming the file and the field, never a traceback, and no input file changes.

A YOLO ``.pt`` is read with ``torch.load(weights_only=True)`` and an allowlist of Ultralytics' model classes;
anything else is refused before any of the file is unpickled, unless ``DATADISTILL_TRUST_MODEL_FILES=1``
says the user trusts it. A real Ultralytics checkpoint (trained here, from YAML, offline) loads that way and
predicts exactly as Ultralytics' own loading does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import cli, error_line

from datadistill.config import TrainConfig
from datadistill.data.coco import load_coco
from datadistill.errors import UserError
from datadistill.models.detector import load_detector

HAVE_ULTRALYTICS = importlib.util.find_spec("ultralytics") is not None
needs_ultralytics = pytest.mark.skipif(not HAVE_ULTRALYTICS, reason="needs the yolo extra (ultralytics)")
TRUST_ENV = "DATADISTILL_TRUST_MODEL_FILES"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Write:
    """Unpickling this writes ``marker`` (a file the test checks for): the harmless stand-in for any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "the payload ran"))


@pytest.fixture(scope="module")
def yolo_pt(shapes: Path, tmp_path_factory: pytest.TempPathFactory, ultralytics_home: Path) -> Path:
    """A real Ultralytics checkpoint: ``yolo.pt`` of a one-epoch ``train --model yolo:yolo11n.yaml`` (offline)."""
    if not HAVE_ULTRALYTICS:
        pytest.skip("needs the yolo extra (ultralytics)")
    from datadistill.stages.train import train

    out = tmp_path_factory.mktemp("yolo") / "teacher"
    train(TrainConfig(data=str(shapes / "annotations.json"), images=str(shapes / "images"), out=str(out),
                      model="yolo:yolo11n.yaml", epochs=1, batch_size=2, min_size=64, device="cpu", threads=1,
                      seed=0))  # fmt: skip
    return out / "yolo.pt"


def _payload_in_a_real_checkpoint(path: Path, marker: Path, real: Path) -> None:
    """The real checkpoint's content with one more entry: the payload (Ultralytics' classes stay allowed)."""
    content = torch.load(real, map_location="cpu", weights_only=False)  # the test's own file
    torch.save({**content, "x": _Write(marker)}, path)


def _payload_in_a_zip(path: Path, marker: Path, real: Path) -> None:
    torch.save({"model": _Write(marker)}, path)


def _payload_in_a_bare_pickle(path: Path, marker: Path, real: Path) -> None:
    path.write_bytes(pickle.dumps({"model": _Write(marker)}, protocol=2))


HOSTILE = [
    pytest.param(_payload_in_a_real_checkpoint, "builtins.getattr, pathlib.Path", id="real-checkpoint-plus-payload"),
    pytest.param(_payload_in_a_zip, "builtins.getattr, pathlib.Path", id="torch-zip"),
    pytest.param(_payload_in_a_bare_pickle, "not a torch zip checkpoint", id="bare-pickle"),
]


@needs_ultralytics
@pytest.mark.parametrize(("make", "says"), HOSTILE)
def test_a_yolo_file_that_would_run_code_is_refused_before_it_runs(
    make: Callable[[Path, Path, Path], None], says: str, yolo_pt: Path, unlabeled: Path, tmp_path: Path
) -> None:
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    make(evil, marker, yolo_pt)
    before = _sha256(evil)
    argv = ("label", "--model", f"yolo:{evil}", "--images", unlabeled, "--out", tmp_path / "labels", "--device", "cpu")
    error_line(cli(*argv), f"--model {evil}: refused: ", says, TRUST_ENV)
    with pytest.raises(UserError, match="refused"):
        load_detector(f"yolo:{evil}")
    assert not marker.exists()
    assert _sha256(evil) == before and not (tmp_path / "labels" / "manifest.json").exists()


@needs_ultralytics
def test_the_opt_in_loads_a_trusted_file_as_ultralytics_does(
    yolo_pt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``DATADISTILL_TRUST_MODEL_FILES=1`` the file is unpickled: its code runs (what trusting means)."""
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    _payload_in_a_real_checkpoint(evil, marker, yolo_pt)
    monkeypatch.setenv(TRUST_ENV, "1")
    load_detector(f"yolo:{evil}")
    assert marker.read_text() == "the payload ran"


@needs_ultralytics
def test_a_real_checkpoint_loads_weights_only_and_predicts_as_ultralytics_loading_does(
    yolo_pt: Path, shapes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datadistill.models import ultralytics as ub

    classes = ub.checkpoint_classes(yolo_pt, what="--model")
    names = {f"{c.__module__}.{c.__qualname__}" for c in classes}
    assert "ultralytics.nn.tasks.DetectionModel" in names and "torch.nn.modules.conv.Conv2d" in names
    assert all(issubclass(c, torch.nn.Module) for c in classes)
    loads: list[bool] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        loads.append(bool(kwargs.get("weights_only")))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    safe = load_detector(f"yolo:{yolo_pt}", device="cpu")
    assert loads == [True]  # Ultralytics read the file once, weights-only
    monkeypatch.setenv(TRUST_ENV, "1")
    trusted = load_detector(f"yolo:{yolo_pt}", device="cpu")
    assert loads == [True, False]
    assert safe.meta == trusted.meta and safe.meta.class_names == load_coco(shapes / "annotations.json").class_names
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    for a, b in zip(safe.predict(images), trusted.predict(images), strict=True):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)


# ----------------------------------------------------------------------------------------------------
# hf: folders with damaged weights or a malformed datadistill.json


def _hf_folder(root: Path, weights: Callable[[Path], None], meta: Any = None) -> Path:
    """A save_pretrained-shaped folder: a config.json, ``model.safetensors`` made by ``weights``, and when
    ``meta`` is given a datadistill.json of ``{"meta": meta}`` (a string: the file's whole text)."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "detr"}))
    weights(root / "model.safetensors")
    if meta is not None:
        text = meta if isinstance(meta, str) else json.dumps({"meta": meta})
        (root / "datadistill.json").write_text(text)
    return root


def _good_weights(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(path))


def _link_to_text(path: Path) -> None:
    (path.parent / "notes.txt").write_text("these are not weights\n")
    os.symlink(path.parent / "notes.txt", path)


META = {"model": "hf:x", "task": "boxes", "class_names": ["circle"], "category_ids": [1], "min_size": 64,
        "max_size": 64}  # fmt: skip


@pytest.mark.parametrize(
    ("weights", "fragments"),
    [
        pytest.param(lambda p: p.write_bytes(b""), ["not a readable safetensors file"], id="empty"),
        pytest.param(lambda p: p.write_bytes(os.urandom(4096)), ["not a readable safetensors file"], id="random-bytes"),
        pytest.param(_link_to_text, ["a link to", "notes.txt", "not a readable safetensors file"], id="link-to-text"),
    ],
)
def test_hf_weights_that_safetensors_cannot_read_are_one_line(
    weights: Callable[[Path], None], fragments: list[str], unlabeled: Path, tmp_path: Path
) -> None:
    pytest.importorskip("safetensors")
    folder = _hf_folder(tmp_path / "model", weights)
    before = {p.name: _sha256(p) for p in folder.iterdir()}
    argv = ("label", "--model", f"hf:{folder}", "--images", unlabeled, "--out", tmp_path / "labels", "--device", "cpu")
    error_line(cli(*argv), str(folder / "model.safetensors"), *fragments)
    assert {p.name: _sha256(p) for p in folder.iterdir()} == before


@pytest.mark.parametrize(
    ("meta", "fragments"),
    [
        pytest.param({k: v for k, v in META.items() if k != "min_size"}, ["field 'min_size' is missing"],
                     id="min-size-missing"),
        pytest.param({**META, "min_size": "big"}, ["field 'min_size'", "'big'", "not an integer"], id="min-size-text"),
        pytest.param({**META, "class_names": "circle"}, ["field 'class_names'", "not a list of names"],
                     id="class-names-a-string"),
        pytest.param({**META, "task": "masks"}, ["task must be 'boxes' or 'keypoints'"], id="task-unknown"),
        pytest.param([1, 2], ["field 'meta' must be an object"], id="meta-a-list"),
        pytest.param("{not json", ["not a readable datadistill.json"], id="not-json"),
    ],
)  # fmt: skip
def test_a_malformed_datadistill_json_is_one_line_naming_the_field(
    meta: Any, fragments: list[str], unlabeled: Path, tmp_path: Path
) -> None:
    pytest.importorskip("safetensors")
    folder = _hf_folder(tmp_path / "model", _good_weights, meta)
    before = {p.name: _sha256(p) for p in folder.iterdir()}
    argv = ("label", "--model", f"hf:{folder}", "--images", unlabeled, "--out", tmp_path / "labels", "--device", "cpu")
    error_line(cli(*argv), str(folder / "datadistill.json"), *fragments)
    assert {p.name: _sha256(p) for p in folder.iterdir()} == before
