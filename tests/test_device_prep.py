"""Images prepared on the labeling device: each view in one call per image size (the values of the image by
image path, bit for bit), JPEGs decoded by torchvision's decode_jpeg (PIL's pixels, PIL's errors), and the
``--decode`` and ``--compile`` options of ``label``. Everything runs on CPU tensors."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from datadistill.cli import build_parser
from datadistill.config import LabelConfig
from datadistill.core.transforms import Crop, HFlip, Pad, Resize, Transforms
from datadistill.core.types import Detections
from datadistill.core.views import parse_views
from datadistill.data.images import EncodedJpeg, decode_jpegs, orient, read_encoded, read_image
from datadistill.errors import UserError
from datadistill.models.detector import ModelMeta, load_detector
from datadistill.stages.label import decoder, label, resolve_decode
from datadistill.stages.multiview import ImageBatch, run_views
from datadistill.stages.shards import ShardImages, decode_on_device

VIEWS = parse_views("default,tile:2x2,hflip+tile:2x2@0.1")  # 8 scales x flip, 4 tiles, 4 flipped tiles


def _uint8_images(sizes: Sequence[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


# ----------------------------------------------------------------------------------------------------
# views prepared in one call per image size


@pytest.mark.parametrize(
    "transform",
    [
        pytest.param(HFlip(40), id="flip"),
        pytest.param(Crop(3, 5, 31, 29, height=30, width=40), id="crop"),
        pytest.param(Pad(3, 5, 31, 29, height=33, width=45), id="pad"),
        pytest.param(Resize(30, 40, 45, 60), id="resize"),
        pytest.param(Transforms((Crop(0, 0, 20, 30, height=30, width=40), HFlip(20))), id="crop+flip"),
    ],
)
def test_a_transform_of_a_stacked_batch_is_each_images_transform(transform: Any) -> None:
    """``apply_image`` on ``[B, C, H, W]`` gives, image by image, what it gives on ``[C, H, W]``."""
    h, w = (24, 28) if isinstance(transform, Pad) else (30, 40)
    batch = torch.rand(4, 3, h, w, generator=torch.Generator().manual_seed(1))
    stacked = transform.apply_image(batch)
    assert stacked.shape[0] == 4
    for i in range(4):
        assert torch.equal(stacked[i], transform.apply_image(batch[i]))


def test_a_prepared_batch_is_each_images_view_bit_for_bit_in_batch_order() -> None:
    """Three sizes in one batch (two images share one): every view's inputs are ``view.prepare`` of
    ``image.float().div_(255)``, image by image, in the batch's order; three groups, one call each."""
    sizes = [(48, 64), (40, 56), (48, 64), (33, 71)]
    raw = _uint8_images(sizes)
    batch = ImageBatch.stack(raw, device="cpu")
    assert batch.members == ((0, 2), (1,), (3,)) and batch.sizes == tuple(sizes)
    assert [tuple(g.shape) for g in batch.groups] == [(2, 3, 48, 64), (1, 3, 40, 56), (1, 3, 33, 71)]
    today = [im.to("cpu").float().div_(255) for im in raw]  # what label did image by image
    assert all(torch.equal(a, b) for a, b in zip(batch.images(), today, strict=True))
    for view in VIEWS:
        prepared = batch.prepare(view)
        expected = [view.prepare(im) for im in today]
        assert [tuple(p.shape) for p in prepared] == [tuple(e.shape) for e in expected], view.name
        assert all(torch.equal(p, e) for p, e in zip(prepared, expected, strict=True)), view.name


def test_a_float_batch_is_stacked_as_it_is_and_the_callers_images_are_untouched() -> None:
    images = [torch.rand(3, 20, 30), torch.rand(3, 20, 30)]
    copies = [im.clone() for im in images]
    batch = ImageBatch.stack(images)
    batch.groups[0].mul_(0)  # the stack is its own tensor
    assert all(torch.equal(a, b) for a, b in zip(images, copies, strict=True))
    single = ImageBatch.stack([torch.full((3, 2, 2), 255, dtype=torch.uint8)])
    assert single.groups[0].dtype == torch.float32 and float(single.groups[0].max()) == 1.0
    with pytest.raises(ValueError, match=r"image 1 must have shape \[C, H, W\], got \(1, 3, 4, 4\)"):
        ImageBatch.stack([torch.rand(3, 4, 4), torch.rand(1, 3, 4, 4)])


class _Recorder:
    """A stand-in Detector that keeps what it was given and finds one box in the left half of each input."""

    def __init__(self) -> None:
        self.meta = ModelMeta(model="fake", task="boxes", class_names=("blob",), category_ids=(1,), min_size=64,
                              max_size=64)  # fmt: skip
        self.seen: list[list[torch.Tensor]] = []

    def input_size(self, min_size: int, max_size: int) -> Any:
        return nullcontext()

    def predict(self, images: Sequence[torch.Tensor]) -> list[Detections]:
        self.seen.append([im.clone() for im in images])
        return [Detections(boxes=torch.tensor([[1.0, 2.0, im.shape[-1] / 2, 9.0]]), scores=torch.tensor([0.5]),
                           labels=torch.tensor([0])) for im in images]  # fmt: skip


def test_run_views_gives_the_model_each_views_images_and_maps_boxes_back_as_before() -> None:
    raw = _uint8_images([(48, 64), (50, 60), (48, 64)], seed=2)
    today = [im.float().div_(255) for im in raw]
    views = parse_views("identity,hflip,tile:2x2:r0c1,hflip+tile:2x2:r1c0")
    from_list, from_batch = _Recorder(), _Recorder()
    a = run_views(from_list, today, views=views)  # type: ignore[arg-type]
    b = run_views(from_batch, ImageBatch.stack(raw), views=views)  # type: ignore[arg-type]
    for view, seen_a, seen_b in zip(views, from_list.seen, from_batch.seen, strict=True):
        assert all(torch.equal(x, view.prepare(im)) for x, im in zip(seen_b, today, strict=True)), view.name
        assert all(torch.equal(x, y) for x, y in zip(seen_a, seen_b, strict=True))
    rows = b.invert(views, ())
    # hflip: the box [1, 2, 32, 9] of a 64 px wide image is [32, 2, 63, 9] back in the original frame
    assert rows.per_view[1].boxes[0].tolist() == [32.0, 2.0, 63.0, 9.0]
    assert (
        torch.equal(a.boxes, b.boxes) and a.counts == b.counts and a.sizes == b.sizes == ((48, 64), (50, 60), (48, 64))
    )


# ----------------------------------------------------------------------------------------------------
# JPEGs decoded by torchvision


def _jpeg(path: Path, *, mode: str = "RGB", size: tuple[int, int] = (64, 48), orientation: int = 1,
          subsampling: int = 2, seed: int = 0) -> Path:  # fmt: skip
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pixels[h // 4 : h // 2, w // 3 : w // 2] = (220, 40, 30)  # an edge for the chroma upsampling to blur
    image = Image.fromarray(pixels).convert(mode)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    image.save(path, "JPEG", quality=90, subsampling=subsampling, exif=exif.tobytes())
    return path


@pytest.mark.parametrize(
    ("mode", "subsampling", "orientation"),
    [("RGB", 2, 1), ("RGB", 0, 1), ("RGB", 1, 1), ("L", 2, 1)] + [("RGB", 2, o) for o in range(2, 9)],
    ids=lambda v: str(v),
)
def test_decode_jpeg_on_the_cpu_gives_pils_pixels(
    tmp_path: Path, mode: str, subsampling: int, orientation: int
) -> None:
    """On this machine's libraries torchvision's libjpeg and PIL's give the same pixels (max difference 0),
    for 4:2:0, 4:4:4 and 4:2:2 chroma, grayscale, and every EXIF orientation (turned after decoding)."""
    path = _jpeg(tmp_path / "a.jpg", mode=mode, subsampling=subsampling, orientation=orientation)
    encoded = read_encoded(path)
    assert isinstance(encoded, EncodedJpeg) and encoded.orientation == orientation
    (image,) = decode_jpegs([encoded], device="cpu")
    expected = read_image(path)
    assert image is not None and image.dtype == torch.uint8
    assert (encoded.height, encoded.width) == tuple(expected.shape[-2:]) == tuple(image.shape[-2:])
    assert int((image.int() - expected.int()).abs().max()) == 0


def test_orient_turns_as_pil_does() -> None:
    stored = Image.fromarray(np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3))
    tensor = torch.from_numpy(np.asarray(stored).copy()).permute(2, 0, 1)
    methods = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }  # PIL's exif_transpose
    for orientation, method in methods.items():
        turned = torch.from_numpy(np.asarray(stored.transpose(method)).copy()).permute(2, 0, 1)
        assert torch.equal(orient(tensor, orientation), turned), orientation
    with pytest.raises(ValueError, match="EXIF orientation must be in 1..8, got 9"):
        orient(tensor, 9)


def test_what_decode_jpeg_is_not_given_is_decoded_by_pil(tmp_path: Path) -> None:
    """A PNG, a CMYK JPEG and a file named .jpg that holds a PNG come back decoded by PIL (read_image)."""
    png = tmp_path / "a.png"
    Image.fromarray(np.full((6, 5, 3), 7, np.uint8)).save(png)
    cmyk = _jpeg(tmp_path / "cmyk.jpg", mode="CMYK")
    liar = tmp_path / "liar.jpg"
    liar.write_bytes(png.read_bytes())
    for path in (png, cmyk, liar):
        got = read_encoded(path)
        assert isinstance(got, torch.Tensor) and torch.equal(got, read_image(path)), path.name


def _items(root: Path, names: list[str], *, jpeg_bytes: bool) -> list[dict[str, Any]]:
    reader = ShardImages(root, [(0, n) for n in names], jpeg_bytes=jpeg_bytes)
    return [reader[i] for i in range(len(reader))]


def test_a_broken_jpeg_gives_todays_error_row_and_its_batch_is_decoded(tmp_path: Path) -> None:
    """Truncated, corrupt, empty and missing JPEGs among good ones: decode_jpeg refuses the batch, each file
    is tried alone, and the broken ones get PIL's errors, the words of the workers' decode (today's rows)."""
    good = _jpeg(tmp_path / "good.jpg").read_bytes()
    _jpeg(tmp_path / "gray.jpg", mode="L", seed=1)
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    corrupt = bytearray(good)
    corrupt[400:440] = bytes(40)
    (tmp_path / "corrupt.jpg").write_bytes(bytes(corrupt))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "header.jpg").write_bytes(good[:40])
    names = ["good.jpg", "truncated.jpg", "gray.jpg", "corrupt.jpg", "empty.jpg", "missing.jpg", "header.jpg"]
    today = _items(tmp_path, names, jpeg_bytes=False)
    items = _items(tmp_path, names, jpeg_bytes=True)
    assert [it["encoded"] is not None for it in items] == [True, True, True, True, False, False, False]
    decode_on_device(items, torch.device("cpu"))
    assert [it["error"] for it in items] == [it["error"] for it in today]
    assert "truncated" in today[1]["error"] and "empty file" in today[4]["error"] and "not found" in today[5]["error"]
    for it, ref in zip(items, today, strict=True):
        assert it["encoded"] is None
        assert (it["image"] is None) == (ref["image"] is None)
        if ref["image"] is not None:
            assert torch.equal(it["image"], ref["image"]), it["file_name"]


# ----------------------------------------------------------------------------------------------------
# the options of label


@pytest.mark.parametrize(
    ("requested", "device", "engine", "resolved", "recorded"),
    [
        ("auto", "cpu", "local", "cpu", "cpu"),
        ("auto", "cuda", "local", "device", "nvjpeg"),
        ("device", "cpu", "local", "device", "cpu"),  # libjpeg on the CPU: PIL's pixels (tested above)
        ("cpu", "cuda", "local", "cpu", "cpu"),
        ("auto", "cuda", "ray", "cpu", "cpu"),
    ],
)
def test_decode_resolves_and_the_signature_records_what_can_change_pixels(
    requested: str, device: str, engine: str, resolved: str, recorded: str
) -> None:
    assert resolve_decode(requested, torch.device(device), engine=engine) == resolved
    assert decoder(resolved, torch.device(device)) == recorded


def test_decode_device_with_ray_and_unknown_modes_are_one_line_errors() -> None:
    with pytest.raises(UserError, match="--decode device needs --engine local"):
        resolve_decode("device", torch.device("cpu"), engine="ray")
    with pytest.raises(UserError, match="unknown --decode 'gpu': choose one of auto, cpu, device"):
        resolve_decode("gpu", torch.device("cpu"))


def test_the_cli_takes_decode_and_compile() -> None:
    args = build_parser().parse_args(["label", "--model", "m.pt", "--images", "i", "--out", "o", "--decode", "device",
                                      "--compile"])  # fmt: skip
    assert (args.decode, args.compile) == ("device", True)
    args = build_parser().parse_args(["label", "--model", "m.pt", "--images", "i", "--out", "o"])
    assert (args.decode, args.compile) == ("auto", False) == (LabelConfig.decode, LabelConfig.compile)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 JPEGs of two sizes (one turned by EXIF, one grayscale), a PNG and a truncated JPEG."""
    root = tmp_path_factory.mktemp("jpegs")
    for i in range(7):
        _jpeg(root / f"{i}.jpg", size=(64, 48) if i % 3 else (56, 60), seed=i, orientation=6 if i == 4 else 1,
              mode="L" if i == 5 else "RGB")  # fmt: skip
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(root / "p.png")
    (root / "t.jpg").write_bytes((root / "1.jpg").read_bytes()[:300])
    return root


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("part-*.parquet"))}


def test_label_decode_device_on_the_cpu_writes_the_shards_of_pil_and_resumes_them(
    teacher: Path, jpegs: Path, tmp_path: Path
) -> None:
    """``--decode device`` on a CPU: the same shard bytes as PIL in the workers, the same error row; its
    folder resumes with ``--decode cpu`` (the same pixels), but not a folder made with nvJPEG. ``--compile``
    reaches the loader."""
    seen: list[dict[str, Any]] = []

    def load(spec: str, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return load_detector(spec, **{k: v for k, v in kwargs.items() if k != "compile"})

    base = {"model": str(teacher), "images": str(jpegs), "views": "identity,hflip+scale:0.75", "batch_size": 3,
            "shard_size": 4, "workers": 1, "device": "cpu"}  # fmt: skip
    label(LabelConfig(out=str(tmp_path / "cpu"), decode="cpu", **base), load=load)
    out = tmp_path / "device"
    label(LabelConfig(out=str(out), decode="device", compile=True, **base), load=load)
    assert [s["compile"] for s in seen] == [False, True]
    assert _shards(out) == _shards(tmp_path / "cpu") and len(_shards(out)) == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["decoder"] == "cpu" and manifest["options"]["decode"] == "device"
    assert [s["file_name"] for s in manifest["skipped"]] == ["t.jpg"]
    turned = next(
        r for r in pq.read_table(out / "shards" / "part-00001.parquet").to_pylist() if r["file_name"] == "4.jpg"
    )
    assert (turned["width"], turned["height"]) == (48, 64)  # EXIF orientation 6: displayed on its side
    (out / "shards" / "part-00001.parquet").unlink()
    label(LabelConfig(out=str(out), decode="cpu", **base), load=load)  # resumes: PIL's pixels either way
    assert _shards(out) == _shards(tmp_path / "cpu")
    manifest["config"]["decoder"] = "nvjpeg"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"another decoder \('nvjpeg', now 'cpu'\).*on a GPU with --decode device\)$"):
        label(LabelConfig(out=str(out), decode="device", **base), load=load)


def test_a_folder_from_before_the_decoder_key_resumes_as_pil(teacher: Path, jpegs: Path, tmp_path: Path) -> None:
    base = {"model": str(teacher), "images": str(jpegs), "views": "identity", "batch_size": 4, "shard_size": 9,
            "workers": 0, "device": "cpu"}  # fmt: skip
    out = tmp_path / "old"
    label(LabelConfig(out=str(out), **base))
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["config"]["decoder"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    label(LabelConfig(out=str(out), decode="device", **base))  # no refusal: PIL's pixels on a CPU


def test_jpeg_bytes_travel_through_a_pickle_as_the_workers_send_them(tmp_path: Path) -> None:
    import pickle

    encoded = read_encoded(_jpeg(tmp_path / "a.jpg"))
    assert isinstance(encoded, EncodedJpeg)
    again = pickle.loads(pickle.dumps(encoded))
    assert again == encoded and len(again.data) == (tmp_path / "a.jpg").stat().st_size
    assert io.BytesIO(again.data).read(3) == b"\xff\xd8\xff"


def test_a_jpeg_torchvision_warns_about_is_left_to_pil_and_other_warnings_are_not_its(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warning from torchvision's decoder (damaged data) hands the file to PIL (None); a warning raised
    meanwhile by other code (another thread: the writer) does not."""
    import os

    import torchvision
    import torchvision.io

    real = torchvision.io.decode_jpeg
    where = {"filename": os.path.join(os.path.dirname(torchvision.__file__), "io", "image.py")}

    def warning_decoder(*args: Any, **kwargs: Any) -> Any:
        warnings.warn_explicit("Corrupt JPEG data", UserWarning, where["filename"], 1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", warning_decoder)
    encoded = read_encoded(_jpeg(tmp_path / "a.jpg"))
    assert isinstance(encoded, EncodedJpeg)
    assert decode_jpegs([encoded], device="cpu") == [None]
    where["filename"] = __file__
    (image,) = decode_jpegs([encoded], device="cpu")
    assert image is not None and torch.equal(image, read_image(tmp_path / "a.jpg"))
