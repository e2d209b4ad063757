"""The Hugging Face transformers backend (``hf:`` specs) on tiny random models written offline with
save_pretrained: DETR-family training (teacher, student on pseudo-labels, kill and resume) in our loop,
labeling through our views and fusion, selection and evaluation, a run; an open-vocabulary OWL-ViT
labeling with prompts; safety (safetensors only, no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers and huggingface_hub read it
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

from datadistill import cli  # noqa: E402
from datadistill.core import selection  # noqa: E402
from datadistill.core.views import parse_views  # noqa: E402
from datadistill.data import synth  # noqa: E402
from datadistill.data.coco import load_coco  # noqa: E402
from datadistill.errors import UserError  # noqa: E402
from datadistill.models import detector as det  # noqa: E402
from datadistill.models import hf  # noqa: E402
from datadistill.models.checkpoints import read_checkpoint  # noqa: E402
from datadistill.stages.label import LabelConfig, label, read_shards  # noqa: E402
from datadistill.stages.multiview import label_images  # noqa: E402
from datadistill.stages.select import SelectConfig, select_pseudo_labels  # noqa: E402
from datadistill.stages.train import TrainConfig, train, train_loop  # noqa: E402

SIZE = 64
VIEWS = "identity,hflip,scale:0.5,hflip+scale:1.5"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every connection or name lookup fails the test (nothing may be downloaded)."""
    attempts: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(repr(args[:2]))
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert attempts == [], f"a download was attempted: {attempts}"


# ----------------------------------------------------------------------------------------------------
# tiny random models, written offline


def write_rtdetr(folder: Path, names: tuple[str, ...]) -> Path:
    """An RT-DETR of ~0.5M parameters (a fixed-size processor: SIZE x SIZE) with classes ``names``; 20 queries,
    as a 32 px scale view has 21 feature positions to pick them from."""
    backbone = transformers.RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                               layer_type="basic", out_features=["stage2", "stage3", "stage4"])  # fmt: skip
    config = transformers.RTDetrConfig(
        backbone_config=backbone, use_pretrained_backbone=False, encoder_hidden_dim=32, encoder_in_channels=[32, 64, 128],
        d_model=32, decoder_in_channels=[32, 32, 32], encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, num_queries=20, num_denoising=10, id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.RTDetrForObjectDetection(config).save_pretrained(folder)
    transformers.RTDetrImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return folder


def write_detr(folder: Path, names: tuple[str, ...]) -> Path:
    """A DETR with a tiny ResNet (no timm, no pretrained backbone) and a shortest-edge processor."""
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                         layer_type="basic", out_features=["stage4"])  # fmt: skip
    config = transformers.DetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=32,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, num_queries=20, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.DetrForObjectDetection(config).save_pretrained(folder)
    transformers.DetrImageProcessor(size={"shortest_edge": SIZE, "longest_edge": 96}).save_pretrained(folder)
    return folder


def write_owlvit(folder: Path, *, v2: bool = False) -> Path:
    """A tiny OWL-ViT (OWLv2 with ``v2``) with a CLIP tokenizer built from a vocabulary of single letters (no
    merges: each word is spelled letter by letter, so different phrases give different token ids)."""
    vocab: dict[str, int] = {}
    for c in string.ascii_lowercase:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=SIZE,
                  patch_size=16)  # fmt: skip
    torch.manual_seed(0)
    prefix = "Owlv2" if v2 else "OwlViT"
    config = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=vision, projection_dim=32)
    getattr(transformers, f"{prefix}ForObjectDetection")(config).save_pretrained(folder)
    image_processor = getattr(transformers, f"{prefix}ImageProcessor")(size={"height": SIZE, "width": SIZE})
    getattr(transformers, f"{prefix}Processor")(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(
        folder
    )
    return folder


@pytest.fixture(scope="module")
def hf_shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shapes")
    synth.make_shapes(root / "labeled", num_images=8, seed=1, size_px=SIZE)
    synth.make_shapes(root / "unlabeled", num_images=6, seed=2, size_px=SIZE)
    return {"labeled": root / "labeled", "unlabeled": root / "unlabeled"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    coco = tuple(["person", "bicycle", *synth.SHAPE_CLASSES[::-1]])  # other classes, other order
    return {"rtdetr": write_rtdetr(root / "rtdetr", coco), "detr": write_detr(root / "detr", synth.SHAPE_CLASSES),
            "owlvit": write_owlvit(root / "owlvit"), "owlv2": write_owlvit(root / "owlv2", v2=True)}  # fmt: skip


def _train_cfg(data: dict[str, Path], out: Path, model: str, **kw: Any) -> TrainConfig:
    base = dict(data=str(data["labeled"] / "annotations.json"), images=str(data["labeled"] / "images"), out=str(out),
                model=model, epochs=3, batch_size=4, lr=2e-4, device="cpu", threads=1, workers=0, seed=0,
                save_every=1)  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def rtdetr_teacher(
    hf_shapes: dict[str, Path], models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(_train_cfg(hf_shapes, out, f"hf:{models['rtdetr']}", val=str(hf_shapes["labeled"] / "annotations.json")))
    return out


# ----------------------------------------------------------------------------------------------------
# specs and safety


def test_spec_options_round_trip(tmp_path: Path) -> None:
    spec = hf.with_options("hf:owner/name", classes=str(tmp_path / "a b.json"), prompts=str(tmp_path / "p.yaml"))
    parsed = hf.parse_spec(spec)
    assert parsed == hf.HfSpec("owner/name", classes=str(tmp_path / "a b.json"), prompts=str(tmp_path / "p.yaml"))
    assert det.backend_of(spec) == "hf" and hf.parse_spec("hf:x/y") == hf.HfSpec("x/y")
    assert ("hf:PATH_OR_ID", "boxes") in [row[:2] for row in det.list_models()]  # datadistill models
    with pytest.raises(UserError, match="unknown option 'prompt'"):
        hf.parse_spec("hf:x/y?prompt=a")
    with pytest.raises(UserError, match="hf: models only"):
        hf.with_options("small_fcos", prompts="p.yaml")


def test_a_folder_with_only_pickled_weights_is_refused_in_one_line(models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_bytes((models["detr"] / "config.json").read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError) as info:
        det.load_detector(f"hf:{folder}")
    assert "refused" in str(info.value) and ".bin" in str(info.value) and "\n" not in str(info.value)


def test_a_missing_hub_model_offline_is_a_one_line_error() -> None:
    with pytest.raises(UserError, match=r"^hf:nobody/no-such-detector: cannot load its config") as info:
        det.load_detector("hf:nobody/no-such-detector")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------
# closed-set models: predictions, views


def test_predictions_are_the_post_processed_boxes_in_the_original_frame(models: dict[str, Path]) -> None:
    detector = det.load_detector(f"hf:{models['detr']}", min_score=0.0)
    assert detector.meta.class_names == synth.SHAPE_CLASSES and (detector.meta.min_size, detector.meta.max_size) == (
        64,
        96,
    )
    image = torch.rand(3, 40, 80, generator=torch.Generator().manual_seed(0))
    (got,) = detector.predict([image])
    module = detector.module
    with torch.no_grad():
        out = module.model(**module.encode([image]))
    probs = out.logits.softmax(-1)[0, :, :-1]
    scores, labels = probs.max(-1)
    cx, cy, w, h = out.pred_boxes[0].unbind(-1)
    boxes = torch.stack([(cx - w / 2) * 80, (cy - h / 2) * 40, (cx + w / 2) * 80, (cy + h / 2) * 40], -1)
    boxes = torch.stack([boxes[:, 0].clamp(0, 80), boxes[:, 1].clamp(0, 40), boxes[:, 2].clamp(0, 80),
                         boxes[:, 3].clamp(0, 40)], -1)  # fmt: skip
    order = scores.argsort(descending=True)
    torch.testing.assert_close(got.scores, scores[order])
    torch.testing.assert_close(got.boxes, boxes[order])
    assert torch.equal(got.labels, labels[order])
    # a scale view runs the processor at another size (the image is not resized by the caller)
    with detector.input_size(32, 48):
        assert module.encode([image])["pixel_values"].shape[-2:] == (24, 48)
    assert module.encode([image])["pixel_values"].shape[-2:] == (
        48,
        96,
    )  # 64 px short side unless the long one passes 96
    assert detector.unfit_reason(1, 4000, min_size=64, max_size=96) == "would resize it to 96x0 px"


def test_a_detr_with_fewer_queries_than_the_data_needs_is_a_one_line_warning(
    models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """The tiny DETR has 20 queries: by default it keeps them all, silently; a cap of 150 (``--max-det``, or a
    dense training set) is more than it can give, and says so in one line."""
    with caplog.at_level(logging.WARNING, logger="datadistill.models.hf"):
        plain = det.load_detector(f"hf:{models['detr']}", min_score=0.0)
    assert plain.max_det == 20 and not caplog.records
    with caplog.at_level(logging.WARNING, logger="datadistill.models.hf"):
        dense = det.load_detector(f"hf:{models['detr']}", min_score=0.0, max_det=150)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "has 20 object queries" in warning.getMessage() and "fewer than the 150" in warning.getMessage()
    assert "\n" not in warning.getMessage() and dense.max_det == 150
    (found,) = dense.predict([torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))])
    assert 0 < len(found) <= 20


def test_classes_map_by_name_to_the_data_sets_categories(models: dict[str, Path], hf_shapes: dict[str, Path]) -> None:
    data = hf_shapes["labeled"] / "annotations.json"
    detector = det.load_detector(hf.with_options(f"hf:{models['rtdetr']}", classes=str(data)), min_score=0.0)
    assert detector.meta.class_names == synth.SHAPE_CLASSES
    assert detector.meta.category_ids == tuple(c.id for c in load_coco(data).categories)
    expected = [-1, -1, *range(len(synth.SHAPE_CLASSES) - 1, -1, -1)]  # person, bicycle: none; the rest reversed
    assert detector.module.class_of.tolist() == expected
    dets = detector.predict([torch.rand(3, 48, 64)])
    assert len(dets[0]) > 0 and int(dets[0].labels.max()) < len(synth.SHAPE_CLASSES)


def test_views_label_and_fuse_an_hf_model(models: dict[str, Path]) -> None:
    detector = det.load_detector(f"hf:{models['detr']}", min_score=0.0)
    image = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(1))
    (identity,) = label_images(detector, [image], views=parse_views("identity"), score_floor=0.0)
    (flipped,) = label_images(detector, [image.flip(-1)], views=parse_views("hflip"), score_floor=0.0)
    # the flip view of the mirrored image is the identity view of the image, mapped back
    torch.testing.assert_close(flipped.boxes, identity.boxes, atol=1e-2, rtol=0)  # px; resize rounding
    torch.testing.assert_close(flipped.scores, identity.scores)
    (fused,) = label_images(detector, [image], views=parse_views(VIEWS), score_floor=0.0)
    assert len(fused) > 0 and int(fused.agreement.max()) >= 2


# ----------------------------------------------------------------------------------------------------
# training in our loop: teacher, kill and resume, student, label, select, evaluate


def test_teacher_trains_with_the_models_own_loss_and_writes_a_save_pretrained_folder(rtdetr_teacher: Path) -> None:
    folder = rtdetr_teacher / hf.TRAINED_DIR
    assert {"config.json", "model.safetensors", "preprocessor_config.json", hf.META_FILE} <= {
        p.name for p in folder.iterdir()
    }
    assert (
        det.trained_file(rtdetr_teacher) == f"hf:{folder}" and det.resolve_spec(str(rtdetr_teacher)) == f"hf:{folder}"
    )
    lines = [json.loads(line) for line in (rtdetr_teacher / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if line["type"] == "step"]
    assert steps and all(np.isfinite(s["loss_hf"]) and s["loss_hf"] == s["loss"] for s in steps)
    assert "bbox" in lines[-1]["val"]
    config = transformers.AutoConfig.from_pretrained(folder)
    assert tuple(config.id2label[i] for i in range(config.num_labels)) == synth.SHAPE_CLASSES  # head re-made for ours
    loaded = det.load_detector(str(rtdetr_teacher))
    assert loaded.meta.class_names == synth.SHAPE_CLASSES and (loaded.meta.min_size, loaded.meta.max_size) == (64, 64)
    # the saved folder holds the trained weights of last.pt, and transformers reads it as is
    state = read_checkpoint(rtdetr_teacher / "last.pt")["state_dict"]
    saved = transformers.AutoModelForObjectDetection.from_pretrained(folder, use_safetensors=True).state_dict()
    for key, value in saved.items():
        assert torch.equal(value, state[f"model.{key}"]), key


def test_a_run_killed_mid_training_resumes_to_the_same_weights(
    hf_shapes: dict[str, Path], models: dict[str, Path], tmp_path: Path
) -> None:
    spec = f"hf:{models['detr']}"
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train(_train_cfg(hf_shapes, whole, spec))
    calls = 0

    def dies_in_epoch_3(model: Any, images: Any, targets: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 5:  # 2 iterations per epoch: the first of epoch 3
            raise KeyboardInterrupt
        return hf.losses(model, images, targets)

    with pytest.raises(KeyboardInterrupt):  # the seam: the loop runs the LoopBackend it is given
        train_loop(_train_cfg(hf_shapes, killed, spec), dataclasses.replace(hf.LOOP, losses=dies_in_epoch_3))
    assert read_checkpoint(killed / "last.pt")["extra"]["epoch"] == 2 and not (killed / hf.TRAINED_DIR).exists()
    with pytest.raises(UserError, match="already holds a training run"):
        train(_train_cfg(hf_shapes, killed, spec))
    train(_train_cfg(hf_shapes, killed, spec, resume=True))
    a, b = read_checkpoint(whole / "last.pt")["state_dict"], read_checkpoint(killed / "last.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # --init with the training folder starts a model from exactly its weights
    meta = dataclasses.replace(det.load_detector(str(killed)).meta, model=spec)
    net = hf.build_model(meta)
    hf.init_weights(net, str(killed), meta=meta)
    assert all(torch.equal(v, b[k]) for k, v in net.state_dict().items())
    strip = ("it_s", "time_s")
    lines = [[{k: v for k, v in json.loads(x).items() if k not in strip} for x in (f / "metrics.jsonl").read_text().splitlines()]
             for f in (whole, killed)]  # fmt: skip
    assert lines[0] == lines[1]


def test_label_select_student_and_evaluate(
    rtdetr_teacher: Path, hf_shapes: dict[str, Path], models: dict[str, Path], tmp_path: Path
) -> None:
    labels = tmp_path / "labels"
    manifest = json.loads(label(LabelConfig(model=str(rtdetr_teacher), images=str(hf_shapes["unlabeled"] / "images"),
                                            out=str(labels), views=VIEWS, score_floor=0.0, batch_size=3, shard_size=4,
                                            workers=0, device="cpu", allow_weak_teacher=True)).read_text())  # fmt: skip
    assert manifest["status"] == "complete" and manifest["config"]["views"] == VIEWS.split(",")
    assert manifest["classes"]["names"] == list(synth.SHAPE_CLASSES)
    rows = read_shards(labels).to_pylist()
    assert len(rows) == 6 and sum(len(r["scores"]) for r in rows) > 0
    pseudo = select_pseudo_labels(SelectConfig(labels=str(labels), reference=str(hf_shapes["labeled"] / "annotations.json"),
                                               out=str(tmp_path / "select" / "pseudo.json")))  # fmt: skip
    chosen = json.loads(pseudo.read_text())["annotations"]
    truth = load_coco(hf_shapes["labeled"] / "annotations.json")
    target = round(sum(len(v.boxes) for v in truth.labels.values()) / len(truth.images) * 6)
    sel = json.loads((pseudo.parent / "selection.json").read_text())
    scores = np.concatenate([np.asarray(r["scores"], dtype=np.float32) for r in rows])
    # the count rule: the threshold that keeps L's mean number of objects per image (as near as ties allow)
    assert sel["target_objects"] == [target] and chosen
    assert set(sel["thresholds"].values()) == {selection.count_threshold(scores, target)}

    student = tmp_path / "student"  # a DETR student (another architecture) on real + pseudo-labels
    train(_train_cfg(hf_shapes, student, f"hf:{models['detr']}", epochs=1, batch_size=5, pseudo=str(pseudo),
                     pseudo_images=str(hf_shapes["unlabeled"] / "images")))  # fmt: skip
    config = yaml.safe_load((student / "config.yaml").read_text())
    assert config["pseudo_ratio"] == 0.4 and config["batch_size"] == 5  # 3 real + 2 pseudo per minibatch
    metrics = tmp_path / "metrics.json"
    assert cli.main(["evaluate", "--model", str(student), "--data", str(hf_shapes["unlabeled"] / "annotations.json"),
                     "--images", str(hf_shapes["unlabeled"] / "images"), "--out", str(metrics)]) == 0  # fmt: skip
    assert 0.0 <= json.loads(metrics.read_text())["bbox"]["AP"] <= 1.0


# ----------------------------------------------------------------------------------------------------
# open-vocabulary teachers


def test_an_open_vocabulary_model_labels_with_prompts_in_our_category_ids(
    models: dict[str, Path], hf_shapes: dict[str, Path], tmp_path: Path
) -> None:
    data = hf_shapes["labeled"] / "annotations.json"
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("circle: [a circle, a round disc]\nsquare: a square\n")
    spec = hf.with_options(f"hf:{models['owlvit']}", classes=str(data), prompts=str(prompts))
    detector = det.load_detector(spec, min_score=0.0)
    queries = ("a circle", "a round disc", "a square", *synth.SHAPE_CLASSES[2:])  # the others: their names
    assert detector.module.queries == queries and detector.meta.class_names == synth.SHAPE_CLASSES
    assert detector.module.class_of.tolist() == [0, 0, 1, *range(2, len(synth.SHAPE_CLASSES))]
    labels = tmp_path / "labels"
    assert cli.main(["label", "--model", f"hf:{models['owlvit']}", "--prompts", str(prompts), "--classes", str(data),
                     "--images", str(hf_shapes["unlabeled"] / "images"), "--out", str(labels), "--views", "identity,hflip",
                     "--score-floor", "0", "--batch-size", "3", "--workers", "0", "--device", "cpu",
                     "--allow-weak-teacher"]) == 0  # fmt: skip
    manifest = json.loads((labels / "manifest.json").read_text())
    assert manifest["config"]["checkpoint"] == spec
    assert manifest["classes"]["category_ids"] == [c.id for c in load_coco(data).categories]
    rows = read_shards(labels).to_pylist()
    assert sum(len(r["scores"]) for r in rows) > 0
    assert all(0 <= lab < len(synth.SHAPE_CLASSES) for r in rows for lab in r["labels"])
    pseudo = select_pseudo_labels(SelectConfig(labels=str(labels), reference=str(data), out=str(tmp_path / "p.json")))
    assert json.loads(pseudo.read_text())["annotations"]
    prompts.write_text("circle: a wheel\nsquare: a square\n")  # other prompts: the folder's labels no longer fit
    with pytest.raises(UserError, match=r"labels made with another options_sha256"):
        label(LabelConfig(model=spec, images=str(hf_shapes["unlabeled"] / "images"), out=str(labels),
                          views="identity,hflip", score_floor=0.0, batch_size=3, workers=0, device="cpu"))  # fmt: skip
    with pytest.raises(UserError, match="labels only"):
        train(_train_cfg(hf_shapes, tmp_path / "t", spec))
    bad = tmp_path / "bad.yaml"
    bad.write_text("zebra: a zebra\n")
    with pytest.raises(UserError, match=r"prompts for 'zebra', which is not a category"):
        det.load_detector(hf.with_options(spec, prompts=str(bad)))


def test_owlv2_boxes_are_mapped_back_from_its_padded_square(models: dict[str, Path], tmp_path: Path) -> None:
    prompts = tmp_path / "p.yaml"
    prompts.write_text("circle: a circle\nsquare: a square\n")
    detector = det.load_detector(hf.with_options(f"hf:{models['owlv2']}", prompts=str(prompts)), min_score=0.0)
    assert detector.meta.class_names == ("circle", "square") and detector.meta.category_ids == (1, 2)
    image = torch.rand(3, 40, 80, generator=torch.Generator().manual_seed(0))
    (got,) = detector.predict([image])
    module = detector.module
    with torch.no_grad():
        out = module.model(**module.encode([image]))
    scores = out.logits[0].max(-1).values.sigmoid()
    cx, cy, w, h = (out.pred_boxes[0] * 80).unbind(-1)  # fractions of the 80 x 80 square OWLv2 pads to
    boxes = torch.stack([(cx - w / 2).clamp(0, 80), (cy - h / 2).clamp(0, 40), (cx + w / 2).clamp(0, 80),
                         (cy + h / 2).clamp(0, 40)], -1)  # fmt: skip
    order = scores.argsort(descending=True)[: hf.MAX_DETECTIONS]
    torch.testing.assert_close(got.scores, scores[order])
    torch.testing.assert_close(got.boxes, boxes[order])


def test_an_open_vocabulary_model_we_cannot_read_is_refused_in_one_line(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    transformers.GroundingDinoConfig().save_pretrained(tmp_path)  # its config: refused before its weights load
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))  # a readable file, no model's weights
    with pytest.raises(UserError, match=r"open-vocabulary grounding-dino models are not supported yet"):
        det.load_detector(f"hf:{tmp_path}?prompts=x.yaml")


@pytest.mark.parametrize(
    "rescale",
    [
        pytest.param(lambda s: s**3, id="cubed"),
        pytest.param(lambda s: 1 / (1 + np.exp(-40 * (s - 0.15))), id="sigmoid-stretched"),
        pytest.param(lambda s: 0.5 * s + 0.5, id="shifted-up"),
    ],
)
def test_the_count_rule_selects_the_same_boxes_whatever_the_score_scale(rescale: Any) -> None:
    """Zero-shot scores are uncalibrated; the count rule picks the threshold by count, so any increasing
    rescaling of the scores selects the same boxes, where a fixed threshold selects others."""
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.0, 0.3, size=500)  # an OWL-like range, far below a closed-set model's
    labels = rng.integers(0, 3, size=500)
    other = rescale(scores)
    per_class = np.array([1.2, 0.8, 2.0])
    for select in (
        lambda s: selection.select_count(s, labels, num_images=50, per_image=4.0, num_classes=3),
        lambda s: selection.select_count_per_class(s, labels, num_images=50, per_image=per_class, num_classes=3),
    ):
        kept = select(scores).keep(scores, labels)
        assert np.array_equal(kept, select(other).keep(other, labels))
        assert int(kept.sum()) in (200, 60 + 40 + 100)
    fixed = [selection.select_fixed(s, labels, threshold=0.2, num_classes=3) for s in (scores, other)]
    assert not np.array_equal(fixed[0].keep(scores, labels), fixed[1].keep(other, labels))


# ----------------------------------------------------------------------------------------------------
# run: an hf teacher and student; an open-vocabulary teacher with prompts and a small student


RUN = """
data:
  train: data/labeled.json
  train_images: data/images
  unlabeled: data/unlabeled.json
  unlabeled_images: data/images
  val: data/val.json
  val_images: data/images
teacher: {{model: "hf:{teacher}", epochs: 2, batch_size: 4, lr: 0.0002}}
student: {{model: "hf:{student}", epochs: 1, batch_size: 5, lr: 0.0002{student_options}}}
label: {{views: "identity,hflip", shard_size: 4, batch_size: 4{label}}}
device: cpu
threads: 1
workers: 0
teacher_check: false
"""


@pytest.fixture(scope="module")
def run_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from datadistill.demo import DemoPlan, make_demo_data

    root = tmp_path_factory.mktemp("run")
    plan = DemoPlan(labeled=8, unlabeled=6, val=4, size_px=SIZE, teacher_epochs=1, student_epochs=1, batch_size=4,
                    views="identity")  # fmt: skip
    make_demo_data(root / "data", task="boxes", plan=plan, seed=3)
    return root


def test_run_with_an_hf_teacher_and_an_hf_student(
    run_data: Path, models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    config = run_data / "hf.yaml"
    config.write_text(RUN.format(teacher=models["rtdetr"], student=models["rtdetr"], label="",
                                 student_options=", init: teacher"))  # fmt: skip
    out = run_data / "out-hf"
    with caplog.at_level(logging.INFO, logger="datadistill.models.hf"):
        assert cli.main(["run", str(config), "--out", str(out)]) == 0
    inits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("init ")]
    assert len(inits) == 1 and "(0 class-head tensors skipped); 0 keep their init" in inits[0]  # all of the teacher
    assert (out / "teacher" / hf.TRAINED_DIR / hf.META_FILE).is_file()
    assert (out / "round-1" / "student" / hf.TRAINED_DIR / "model.safetensors").is_file()
    metrics = json.loads((out / "round-1" / "student" / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["bbox"]["AP"] <= 1.0
    student = read_checkpoint(out / "round-1" / "student" / "last.pt")
    assert student["extra"]["config"]["init"] == str(out / "teacher" / hf.TRAINED_DIR / "model.safetensors")
    assert cli.main(["run", str(config), "--out", str(out)]) == 0  # finished: every stage is skipped


def test_run_with_an_open_vocabulary_teacher_labels_without_training_it(
    run_data: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    label_options = ", prompts: {circle: [a circle, a disc]}"
    config = run_data / "owl.yaml"
    config.write_text(
        RUN.format(teacher=models["owlvit"], student=models["detr"], label=label_options, student_options="")
    )
    out = run_data / "out-owl"
    assert cli.main(["run", str(config), "--out", str(out)]) == 0
    assert not (out / "teacher" / hf.TRAINED_DIR).exists()  # labels as it is
    assert yaml.safe_load((out / "prompts.yaml").read_text()) == {"circle": ["a circle", "a disc"]}
    manifest = json.loads((out / "round-1" / "label" / "manifest.json").read_text())
    assert "prompts=" in manifest["config"]["checkpoint"] and "classes=" in manifest["config"]["checkpoint"]
    assert (out / "teacher" / "eval" / "metrics.json").is_file() and (
        out / "round-1" / "student" / hf.TRAINED_DIR
    ).is_dir()
    config.write_text(
        RUN.format(teacher=models["rtdetr"], student=models["detr"], label=label_options, student_options="")
    )
    assert cli.main(["run", str(config), "--out", str(run_data / "out-bad")]) == 1
    assert "label.prompts: the teacher" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# shipping a model to machines that cannot see its files (the Ray engine's actors)


def _ship(spec: str, folder: Path) -> str:
    """Copy the files of ``spec`` into ``folder`` as a Ray actor does; the spec that loads the copies."""
    shipped = det.model_files(spec)
    det.write_model_files({name: path.read_bytes() for name, path in shipped.files}, folder)
    return shipped.spec_in(folder)


def test_a_folder_and_its_option_files_ship_and_load_from_the_copies_alone(
    models: dict[str, Path], hf_shapes: dict[str, Path], tmp_path: Path
) -> None:
    source, classes, prompts = tmp_path / "owl", tmp_path / "coco.json", tmp_path / "prompts.yaml"
    shutil.copytree(models["owlvit"], source)
    (source / ".git").mkdir()  # hidden: left out
    (source / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (source / "checkpoint-5").mkdir()  # a subfolder, which from_pretrained never reads: left out
    (source / "checkpoint-5" / "optimizer.pt").write_bytes(b"large")
    shutil.copyfile(hf_shapes["labeled"] / "annotations.json", classes)
    prompts.write_text("circle: [a circle, a round disc]\n")
    spec = hf.with_options(f"hf:{source}", classes=str(classes), prompts=str(prompts))
    names = [name for name, _ in det.model_files(spec).files]
    model = [f"model/{p.name}" for p in sorted(models["owlvit"].iterdir())]
    assert names == [*model, "classes/coco.json", "prompts/prompts.yaml"]
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer_config.json"} <= set(model)
    want = det.load_detector(spec, min_score=0.0)
    image = torch.rand(3, SIZE, SIZE + 16, generator=torch.Generator().manual_seed(0))
    expected = want.predict([image])[0]
    copied = _ship(spec, tmp_path / "copies")
    for path in (source, classes, prompts):  # the copies alone from here on
        path.rename(path.with_name(path.name + ".away"))
    got = det.load_detector(copied, min_score=0.0)
    assert (got.meta.class_names, got.meta.category_ids) == (want.meta.class_names, want.meta.category_ids)
    assert got.module.queries == want.module.queries == ("a circle", "a round disc", *synth.SHAPE_CLASSES[1:])
    result = got.predict([image])[0]
    assert len(expected.scores) > 0
    torch.testing.assert_close(result.boxes, expected.boxes)
    torch.testing.assert_close(result.scores, expected.scores)
    assert torch.equal(result.labels, expected.labels)


@pytest.mark.parametrize(
    ("edge", "link", "target", "refused"),
    [
        ("a link to a file outside the folder", "extra.json", "../secret.json", True),
        ("a link to a file inside the folder", "weights.safetensors", "model.safetensors", False),
        ("a link that leads nowhere", "gone.json", "missing.json", True),
        ("a link out through a link inside", "hop.json", "inner-link.json", True),
    ],
)
def test_a_link_out_of_the_model_folder_is_refused_in_one_line(
    models: dict[str, Path], tmp_path: Path, edge: str, link: str, target: str, refused: bool
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(models["rtdetr"], folder)
    (tmp_path / "secret.json").write_text("{}")
    if link == "hop.json":
        (folder / "inner-link.json").symlink_to("../secret.json")
    (folder / link).symlink_to(target)
    if refused:
        with pytest.raises(UserError, match=r"refused: a link to /") as info:
            det.model_files(f"hf:{folder}")
        assert "\n" not in str(info.value) and str(folder) in str(info.value)
    else:
        files = dict(det.model_files(f"hf:{folder}").files)
        assert files[f"model/{link}"].read_bytes() == (folder / target).read_bytes()


@pytest.mark.parametrize(
    ("name", "ok"),
    [("model/config.json", True), ("prompts/p.yaml", True), ("x", True), ("/etc/passwd", False), ("..", False),
     ("model/../../x", False), ("./x", True), ("", False), ("a\\..\\b", False)],
)  # fmt: skip
def test_shipped_file_names_stay_inside_the_copy_folder(name: str, ok: bool, tmp_path: Path) -> None:
    if ok:
        det.write_model_files({name: b"1"}, tmp_path / "copies")
        assert (tmp_path / "copies" / name).resolve().is_relative_to((tmp_path / "copies").resolve())
    else:
        with pytest.raises(ValueError, match="not a relative file name"):
            det.write_model_files({name: b"1"}, tmp_path / "copies")
        assert not (tmp_path / "copies").exists()


def test_a_hub_id_ships_the_snapshot_in_the_cache_and_an_uncached_one_is_refused(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub cache laid out as huggingface_hub does (refs/main, snapshots/<commit>/ of links to blobs/)."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--someone--tiny-rtdetr"
    snapshot = repo / "snapshots" / "0123abcd"
    for folder in (repo / "refs", repo / "blobs", snapshot):
        folder.mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    for f in sorted(models["rtdetr"].iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = "hf:someone/tiny-rtdetr"
    files = dict(det.model_files(spec).files)
    assert list(files) == [f"model/{f.name}" for f in sorted(models["rtdetr"].iterdir())]
    assert files["model/model.safetensors"].resolve() == det.model_file(spec).resolve()  # what the signature hashes
    copied = _ship(spec, tmp_path / "copies")
    assert copied == f"hf:{tmp_path / 'copies' / 'model'}"
    assert det.load_detector(copied).meta.class_names == det.load_detector(f"hf:{models['rtdetr']}").meta.class_names
    (tmp_path / "token").write_text("secret")
    (snapshot / "extra.json").symlink_to(tmp_path / "token")  # out of the repo's cache folder
    with pytest.raises(UserError, match=r"extra.json: refused: a link to"):
        det.model_files(spec)
    with pytest.raises(UserError, match=r"^hf:nobody/absent: not in this machine's Hugging Face cache") as info:
        det.model_files("hf:nobody/absent")
    assert "\n" not in str(info.value)
