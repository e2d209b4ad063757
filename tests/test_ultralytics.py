"""The Ultralytics YOLO backend: tiny detect and pose models trained from YAML on a CPU, labeled through our
views and fusion, pseudo-labels selected; the real:pseudo ratio of the training list; offline; no extra."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datadistill import cli
from datadistill.core.views import View, parse_views
from datadistill.data import synth
from datadistill.data.coco import load_coco
from datadistill.errors import UserError
from datadistill.models import ultralytics as ub
from datadistill.stages.label import LabelConfig, label, read_shards, shard_detections
from datadistill.stages.multiview import label_images
from datadistill.stages.select import SelectConfig, select_pseudo_labels
from datadistill.stages.train import TrainConfig, train

HAVE_ULTRALYTICS = importlib.util.find_spec("ultralytics") is not None
needs_ultralytics = pytest.mark.skipif(not HAVE_ULTRALYTICS, reason="needs the yolo extra (ultralytics)")
IMGSZ = 64  # scale views round to YOLO's stride of 32: 0.5 -> 32, 1.5 -> 96
VIEWS = "identity,hflip,scale:0.5,hflip+scale:1.5"


@pytest.fixture(scope="module", autouse=True)
def _ultralytics_settings(ultralytics_home: Path) -> Path:
    """Every test of this module with Ultralytics' settings in a temp folder (conftest.ultralytics_home)."""
    return ultralytics_home


class NetworkAttempts:
    """Every TCP/UDP connection or name lookup tried while installed, each refused."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.attempts: list[str] = []
        real_connect = socket.socket.connect

        def connect(sock: socket.socket, address: Any) -> Any:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                self.attempts.append(f"connect {address}")
                raise OSError("network blocked by the test")
            return real_connect(sock, address)

        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            self.attempts.append(f"getaddrinfo {host}")
            raise socket.gaierror("network blocked by the test")

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: connect(socket.socket(), address))


@pytest.fixture()
def network(monkeypatch: pytest.MonkeyPatch) -> NetworkAttempts:
    return NetworkAttempts(monkeypatch)


# ----------------------------------------------------------------------------------------------------
# the training list: the real:pseudo ratio kept by repeating files


@pytest.mark.parametrize(
    ("real", "pseudo", "ratio", "epochs", "expected"),
    [
        (10, 0, 0.4, 7, ub.MixPlan(real=10, pseudo=0, epochs=7)),  # a teacher: the real images, `epochs` times
        (10, 50, 0.0, 3, ub.MixPlan(real=10, pseudo=0, epochs=3)),  # ratio 0 mixes nothing in
        (60, 40, 0.4, 5, ub.MixPlan(real=60, pseudo=40, epochs=5)),  # the natural mix: each image once per epoch
        (200, 1800, 0.4, 30, ub.MixPlan(real=3000, pseudo=2000, epochs=2)),  # the demo's sets: real repeated 15x
        (100, 10, 0.5, 2, ub.MixPlan(real=100, pseudo=100, epochs=2)),  # a small pseudo set is cycled
        (100, 5000, 0.4, 1, ub.MixPlan(real=100, pseudo=67, epochs=1)),  # a short run sees part of the pseudo set
    ],
)
def test_mix_plan_keeps_the_ratio_and_the_sample_budget(
    real: int, pseudo: int, ratio: float, epochs: int, expected: ub.MixPlan
) -> None:
    plan = ub.mix_plan(real, pseudo, pseudo_ratio=ratio, epochs=epochs)
    assert plan == expected
    if pseudo and ratio:
        assert abs(plan.pseudo / plan.size - ratio) <= 0.5 / plan.size + 1e-12
        budget = epochs * real / (1 - ratio)  # what the torchvision student sees
        assert abs(plan.size * plan.epochs - budget) < plan.epochs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_real": 0, "num_pseudo": 5}, "at least one real image"),
        ({"num_real": 5, "num_pseudo": 5, "pseudo_ratio": 1.0}, "pseudo_ratio"),
        ({"num_real": 5, "num_pseudo": 5, "epochs": 0}, "epochs"),
    ],
)
def test_mix_plan_refuses_bad_input(kwargs: dict[str, Any], message: str) -> None:
    args = {"pseudo_ratio": 0.4, "epochs": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        ub.mix_plan(args.pop("num_real"), args.pop("num_pseudo"), **args)


# ----------------------------------------------------------------------------------------------------
# data


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("figures")
    synth.make_figures(root / "labeled", num_images=8, seed=1, size_px=IMGSZ)
    synth.make_figures(root / "unlabeled", num_images=5, seed=2, size_px=IMGSZ)
    return {"labeled": root / "labeled", "unlabeled": root / "unlabeled"}


@pytest.fixture(scope="module")
def yolo_shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shapes")
    synth.make_shapes(root / "labeled", num_images=8, seed=1, size_px=IMGSZ)
    synth.make_shapes(root / "unlabeled", num_images=5, seed=2, size_px=IMGSZ)
    return {"labeled": root / "labeled", "unlabeled": root / "unlabeled"}


def test_training_set_lists_real_and_pseudo_images_in_the_ratio(figures: dict[str, Path], tmp_path: Path) -> None:
    real = load_coco(figures["labeled"] / "annotations.json")
    pseudo = load_coco(figures["unlabeled"] / "annotations.json")
    data_yaml, plan = ub.write_training_set(
        tmp_path / "yolo", real=real, real_root=figures["labeled"] / "images", pseudo=pseudo,
        pseudo_root=figures["unlabeled"] / "images", pseudo_ratio=0.4, epochs=4, seed=0,
    )  # fmt: skip
    assert plan == ub.mix_plan(8, 5, pseudo_ratio=0.4, epochs=4)
    lines = (tmp_path / "yolo" / "train.txt").read_text().splitlines()
    n_pseudo = sum("/pseudo/images/" in line for line in lines)
    assert (len(lines) - n_pseudo, n_pseudo) == (plan.real, plan.pseudo)
    assert {Path(line).name for line in lines if "/real/" in line} == {im.file_name for im in real.images}
    data = yaml.safe_load(data_yaml.read_text())
    assert data["kpt_shape"] == [13, 3] and data["flip_idx"] == list(real.keypoint_category.flip_index)
    assert data["names"] == {0: "figure"} and Path(data["train"]).is_file() and Path(data["val"]).is_file()
    for line in set(lines):  # every listed image opens, and has its label file where Ultralytics looks
        assert Image.open(line).size == (IMGSZ, IMGSZ)
        assert Path(line.replace("/images/", "/labels/")).with_suffix(".txt").is_file()


def test_default_image_size_is_the_longest_side_rounded_to_the_stride(figures: dict[str, Path]) -> None:
    assert ub.default_imgsz(load_coco(figures["labeled"] / "annotations.json")) == IMGSZ


# ----------------------------------------------------------------------------------------------------
# tiny models from YAML, trained, labeled through our views and fusion, selected: all on a CPU, offline


def _train(data: dict[str, Path], out: Path, model: str, **kw: Any) -> Path:
    cfg = TrainConfig(
        data=str(data["labeled"] / "annotations.json"), images=str(data["labeled"] / "images"), out=str(out),
        model=model, epochs=2, batch_size=4, min_size=IMGSZ, device="cpu", threads=1, seed=0, **kw,
    )  # fmt: skip
    train(cfg)
    return out / ub.CHECKPOINT_NAME


@pytest.fixture(scope="module")
def pose_teacher(figures: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_ULTRALYTICS:
        pytest.skip("needs the yolo extra (ultralytics)")
    return _train(figures, tmp_path_factory.mktemp("pose") / "teacher", "yolo:yolo11n-pose.yaml",
                  val=str(figures["labeled"] / "annotations.json"))  # fmt: skip


@pytest.fixture(scope="module")
def detect_teacher(yolo_shapes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_ULTRALYTICS:
        pytest.skip("needs the yolo extra (ultralytics)")
    return _train(yolo_shapes, tmp_path_factory.mktemp("detect") / "teacher", "yolo:yolo11n.yaml")


def _label_and_select(weights: Path, data: dict[str, Path], out: Path) -> tuple[Path, dict[str, Any]]:
    cfg = LabelConfig(
        model=f"yolo:{weights}", images=str(data["unlabeled"] / "images"), out=str(out / "labels"), views=VIEWS,
        score_floor=0.0, batch_size=2, shard_size=3, workers=0, device="cpu",
    )  # fmt: skip
    manifest = json.loads(label(cfg).read_text())
    pseudo = select_pseudo_labels(
        SelectConfig(
            labels=str(out / "labels"),
            reference=str(data["labeled"] / "annotations.json"),
            out=str(out / "select" / "pseudo.json"),
        )  # fmt: skip
    )
    return pseudo, manifest


@needs_ultralytics
def test_tiny_pose_model_trains_labels_with_flip_and_scales_and_gives_pseudo_labels(
    pose_teacher: Path, figures: dict[str, Path], tmp_path: Path, network: NetworkAttempts
) -> None:
    out = pose_teacher.parent
    assert {"config.yaml", "provenance.json", "metrics.jsonl", "timings.json"} <= {p.name for p in out.iterdir()}
    assert (out / "ultralytics" / "weights" / "last.pt").is_file()
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(record["val"]) == {"bbox", "keypoints"}  # our COCO evaluator ran on --val

    model = ub.load_yolo(f"yolo:{pose_teacher}")
    assert model.meta.task == "keypoints" and model.meta.keypoint_names == synth.FIGURE_KEYPOINTS
    assert model.meta.flip_index == load_coco(figures["labeled"] / "annotations.json").keypoint_category.flip_index

    pseudo, manifest = _label_and_select(pose_teacher, figures, tmp_path)
    assert manifest["status"] == "complete" and manifest["config"]["views"] == VIEWS.split(",")
    assert manifest["options"]["keypoint_fuse"] == "mean"  # YOLO has no heatmaps: mean, with a warning
    rows = read_shards(tmp_path / "labels").to_pylist()
    dets = [shard_detections(r, 13) for r in rows]
    assert sum(len(d) for d in dets) > 0
    assert max(int(d.agreement.max()) for d in dets if len(d)) > 1  # objects seen by several views
    raw = json.loads(pseudo.read_text())
    assert raw["annotations"] and all(len(a["keypoints"]) == 39 and "score" in a for a in raw["annotations"])

    # a student on real + pseudo labels, then the evaluate command on it
    student = _train(figures, tmp_path / "student", "yolo:yolo11n-pose.yaml", pseudo=str(pseudo),
                     pseudo_images=str(figures["unlabeled"] / "images"), init=str(pose_teacher))  # fmt: skip
    config = yaml.safe_load((student.parent / "config.yaml").read_text())
    assert config["train_list"] == {"real": 8, "pseudo": 6} and config["ultralytics_epochs"] == 2  # 6 of 14 ~ 0.4
    assert cli.main(["evaluate", "--model", f"yolo:{student}", "--data", str(figures["unlabeled"] / "annotations.json"),
                     "--images", str(figures["unlabeled"] / "images"), "--out", str(tmp_path / "m.json")]) == 0  # fmt: skip
    assert set(json.loads((tmp_path / "m.json").read_text())) == {"bbox", "keypoints"}
    assert network.attempts == []


@needs_ultralytics
def test_tiny_detect_model_trains_labels_and_gives_pseudo_labels(
    detect_teacher: Path, yolo_shapes: dict[str, Path], tmp_path: Path, network: NetworkAttempts
) -> None:
    model = ub.load_yolo(f"yolo:{detect_teacher}")
    assert model.meta.task == "boxes" and model.meta.class_names == synth.SHAPE_CLASSES
    pseudo, manifest = _label_and_select(detect_teacher, yolo_shapes, tmp_path)
    assert manifest["counts"]["objects"] > 0
    raw = json.loads(pseudo.read_text())
    assert raw["annotations"] and all("keypoints" not in a for a in raw["annotations"])
    assert network.attempts == []


def _read_bgr(path: Path) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1])


def _read_tensor(path: Path) -> torch.Tensor:
    """``[3, H, W]`` float in [0, 1], as datadistill's image reader gives."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


@needs_ultralytics
def test_identity_view_gives_ultralytics_own_predictions(pose_teacher: Path, figures: dict[str, Path]) -> None:
    model = ub.load_yolo(f"yolo:{pose_teacher}")
    model.conf = 0.0
    files = sorted((figures["unlabeled"] / "images").glob("*.png"))[:3]
    images = [_read_tensor(f) for f in files]
    ours = model.predict(images)
    theirs = model.yolo.predict([_read_bgr(f) for f in files], imgsz=IMGSZ, conf=0.0, max_det=ub.DEFAULT_MAX_DET,
                                iou=ub.DEFAULT_IOU, batch=3, verbose=False, device="cpu")  # fmt: skip
    for det, ref in zip(ours, theirs, strict=True):
        assert len(det) > 0
        torch.testing.assert_close(det.boxes, ref.boxes.xyxy.float(), rtol=0, atol=0)
        torch.testing.assert_close(det.scores, ref.boxes.conf.float(), rtol=0, atol=0)
        torch.testing.assert_close(det.keypoints, ref.keypoints.data.float(), rtol=0, atol=0)


@needs_ultralytics
def test_flip_view_mirrors_boxes_and_swaps_keypoints_with_the_flip_map(
    pose_teacher: Path, figures: dict[str, Path]
) -> None:
    model = ub.load_yolo(f"yolo:{pose_teacher}")
    model.conf = 0.0
    flip = model.meta.flip_index
    file = sorted((figures["unlabeled"] / "images").glob("*.png"))[0]
    image = _read_tensor(file)
    (mirrored,) = model.predict([image.flip(-1)])
    (mapped,) = [
        View(hflip=True).invert(d, width=IMGSZ, height=image.shape[-2], flip_index=flip)
        for d in model.predict([image.flip(-1)])
    ]
    for j in range(len(mirrored)):
        x1, y1, x2, y2 = mirrored.boxes[j].tolist()
        assert mapped.boxes[j].tolist() == pytest.approx([IMGSZ - x2, y1, IMGSZ - x1, y2])
        for i, m in enumerate(flip):  # the original's keypoint i is the mirror image's keypoint flip[i]
            x, y, s = mirrored.keypoints[j, m].tolist()
            assert mapped.keypoints[j, i].tolist() == pytest.approx([IMGSZ - x, y, s])


@needs_ultralytics
def test_heatmap_fusion_is_refused_for_yolo_in_the_library(pose_teacher: Path, figures: dict[str, Path]) -> None:
    model = ub.load_yolo(f"yolo:{pose_teacher}")
    image = torch.rand(3, IMGSZ, IMGSZ)
    with pytest.raises(ValueError, match="no keypoint heatmaps"):
        label_images(model, [image], views=parse_views("identity"), keypoint_fuse="heatmap")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "yolo:yolo11n-pose.yaml"}, "has no trained weights"),
        ({"model": "yolo:missing.pt"}, "never downloaded"),
        ({"model": "yolo:x.pt", "checkpoint": "c.pt"}, "give the teacher once"),
        ({}, "give the teacher once"),
        ({"model": "small_fcos"}, "names an architecture, not a trained model"),
        ({"model": "yolo:x.pt", "engine": "ray"}, "never downloaded"),  # every engine takes every backend
    ],
)
def test_label_model_options_are_checked(kwargs: dict[str, Any], message: str, tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match=message):
        label(LabelConfig(images=str(tmp_path), out=str(tmp_path / "out"), **kwargs))


# ----------------------------------------------------------------------------------------------------
# `run` with a teacher and a student of different libraries

MIXED_RUN = """
data:
  train: data/labeled.json
  train_images: data/images
  unlabeled: data/unlabeled.json
  unlabeled_images: data/images
  val: data/val.json
  val_images: data/images
  unlabeled_truth: data/unlabeled_truth.json
teacher: {model: TEACHER, epochs: 2, batch_size: 4}
student: {model: STUDENT, epochs: 2, batch_size: 5}
label: {views: "identity,hflip", shard_size: 4, batch_size: 4, iou_thr: 0.7}
device: cpu
threads: 1
workers: 0
teacher_check: false  # teachers of seconds are weak: these tests are about the pipeline
"""


@needs_ultralytics
@pytest.mark.parametrize(
    ("teacher", "student"), [("yolo:yolo11n.yaml", "small_fcos"), ("small_fcos", "yolo:yolo11n.yaml")]
)
def test_run_takes_a_teacher_and_a_student_of_different_libraries(
    teacher: str, student: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], network: NetworkAttempts
) -> None:
    from datadistill.demo import DemoPlan, make_demo_data

    plan = DemoPlan(labeled=8, unlabeled=12, val=6, size_px=IMGSZ, teacher_epochs=1, student_epochs=1, batch_size=4,
                    views="identity")  # fmt: skip
    make_demo_data(tmp_path / "data", task="boxes", plan=plan, seed=3)
    (tmp_path / "config.yaml").write_text(MIXED_RUN.replace("TEACHER", teacher).replace("STUDENT", student))
    out = tmp_path / "run"
    assert cli.main(["run", str(tmp_path / "config.yaml"), "--out", str(out)]) == 0
    teacher_file = "yolo.pt" if teacher.startswith("yolo:") else "checkpoint.pt"
    student_file = "yolo.pt" if student.startswith("yolo:") else "checkpoint.pt"
    assert (out / "teacher" / teacher_file).is_file() and (out / "round-1" / "student" / student_file).is_file()
    manifest = json.loads((out / "round-1" / "label" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["images"] == 12
    assert manifest["config"]["checkpoint"].endswith(teacher_file)
    pseudo = json.loads((out / "round-1" / "select" / "pseudo.json").read_text())
    assert len(pseudo["images"]) == 12
    for name in ("teacher/eval/metrics.json", "round-1/student/eval/metrics.json"):
        metrics = json.loads((out / name).read_text())
        assert 0.0 <= metrics["bbox"]["AP"] <= 1.0, name
    assert "Accuracy on the validation set" in (out / "report.html").read_text()
    printed = capsys.readouterr().out
    assert "teacher (supervised):" in printed and "student, round 1:" in printed
    assert network.attempts == []


def test_student_init_from_a_teacher_of_another_library_is_refused_before_training(tmp_path: Path) -> None:
    from datadistill.config import load_run_config
    from datadistill.run import run

    (tmp_path / "config.yaml").write_text(
        MIXED_RUN.replace("TEACHER", "yolo:yolo11n.yaml").replace("STUDENT", "small_fcos")
    )
    cfg, base = load_run_config(tmp_path / "config.yaml", ["student.init=teacher"])
    for name in ("labeled", "unlabeled", "val", "unlabeled_truth"):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f"{name}.json").write_text("{}")
    (tmp_path / "data" / "images").mkdir()
    with pytest.raises(UserError, match="models of different libraries"):
        run(cfg, base=base, out=tmp_path / "run")
    assert not (tmp_path / "run" / "teacher").exists()


# ----------------------------------------------------------------------------------------------------
# offline, and without the extra


@needs_ultralytics
def test_a_broken_image_is_a_one_line_error_after_ultralytics_is_imported(tmp_path: Path) -> None:
    """Ultralytics patches PIL.Image.open to install pi-heif on unknown files; the guard undoes it, so a later
    stage of the same process (a torchvision student after a YOLO teacher) reports the file, not an import."""
    from datadistill.data.images import read_image
    from datadistill.errors import DataError

    ub.import_ultralytics()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png"):
        read_image(broken)


@needs_ultralytics
def test_import_guard_keeps_ultralytics_offline_and_out_of_home(ultralytics_home: Path) -> None:
    ul = ub.import_ultralytics()
    import ultralytics.data.utils as data_utils
    import ultralytics.utils as ul_utils
    import ultralytics.utils.callbacks.platform

    assert os.environ["YOLO_OFFLINE"] == "1" and os.environ["YOLO_AUTOINSTALL"] == "0"
    assert ul_utils.ONLINE is False and ul_utils.is_online() is False
    assert ul_utils.SETTINGS["sync"] is False and not any(ul_utils.SETTINGS[k] for k in ub.INTEGRATIONS)
    assert data_utils.check_font("Arial.ttf") is None  # no download of the plotting font
    assert ultralytics.utils.callbacks.platform.callbacks == {}  # no Platform streaming
    config_dir = Path(os.environ["YOLO_CONFIG_DIR"])
    assert ul_utils.USER_CONFIG_DIR.is_relative_to(config_dir)
    assert not ul_utils.USER_CONFIG_DIR.is_relative_to(Path.home()) or config_dir.is_relative_to(Path.home())
    assert ul is sys.modules["ultralytics"]


def test_missing_extra_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # what an import sees without the package
    with pytest.raises(UserError, match=r"pip install 'datadistill\[yolo\]'"):
        ub.import_ultralytics()
    synth.make_shapes(tmp_path / "d", num_images=2, seed=0, size_px=64)
    code = cli.main(["train", "--model", "yolo:yolo11n.yaml", "--data", str(tmp_path / "d" / "annotations.json"),
                     "--images", str(tmp_path / "d" / "images"), "--out", str(tmp_path / "run"), "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "datadistill[yolo]" in err
