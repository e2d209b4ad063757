"""Broken and unusual images in an unlabeled set: each is skipped and reported, or handled; the run goes on.

Handled: CMYK, 16-bit (grey and RGB), grey + alpha, palette, 1-bit, float and 32-bit TIFF, animated GIF
(first frame), EXIF orientation (applied, as everywhere in datadistill), a 1 x 1 px image. Skipped, with
the reason in ``manifest.json``: empty, truncated PNG and JPEG, text with an image extension, a
decompression bomb (a header claiming 10^10 px, and one between PIL's warning and error limits), a JPEG
header claiming 65535 x 65535 px, a dangling symlink, and strips too elongated for the model's resize.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from harness import cli
from PIL import Image

from datadistill.data.images import image_size, read_image

RNG_IMAGE = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
_Y, _X = np.mgrid[0:48, 0:64]
SMOOTH_IMAGE = np.stack([_X * 4, _Y * 5, 255 - _X * 2], axis=-1).astype(np.uint8)  # survives JPEG


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int, *, depth: int = 8, colour: int = 2, rows: bytes = b"\x00") -> bytes:
    """A valid PNG signature and IHDR claiming ``width x height`` px: costs nothing to make, a lot to decode."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def _rgb16_png(path: Path) -> None:
    """A 16-bit RGB PNG (PIL writes none): each channel the 8-bit image times 257."""
    wide = RNG_IMAGE.astype(">u2") * 257
    rows = b"".join(b"\x00" + wide[r].tobytes() for r in range(wide.shape[0]))
    path.write_bytes(_png_header_only(64, 48, depth=16, colour=2, rows=rows))


def _exif_rotated(path: Path, pixels: np.ndarray = RNG_IMAGE) -> None:
    """Stored turned a quarter counter-clockwise (48 x 64 px) with EXIF orientation 6, "rotate 90 degrees
    clockwise to display": a viewer shows the 64 x 48 px ``pixels``."""
    stored = Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90)
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(path, exif=exif)


def _good_png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(RNG_IMAGE).save(buf, format="PNG")
    return buf.getvalue()


def _good_jpeg_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(RNG_IMAGE).save(buf, format="JPEG")
    return buf.getvalue()


# name -> (how to make it, the displayed (width, height) when handled, or a fragment of the skip reason)
CASES: dict[str, tuple[Callable[[Path], object], tuple[int, int] | str]] = {
    "zero.png": (lambda p: p.write_bytes(b""), "empty file"),
    "truncated.png": (lambda p: p.write_bytes(_good_png_bytes()[:400]), "not a readable image"),
    "truncated.jpg": (lambda p: p.write_bytes(_good_jpeg_bytes()[:400]), "not a readable image"),
    "text.jpg": (lambda p: p.write_text("just text\n"), "not an image format PIL can read"),
    "text.png": (lambda p: p.write_text("\x89PNG but not really"), "not a readable image"),
    "bomb.png": (lambda p: p.write_bytes(_png_header_only(100_000, 100_000)), "image too large to decode safely"),
    "bomb-warning.png": (lambda p: p.write_bytes(_png_header_only(10_000, 10_000, colour=0)), "too large"),
    "bomb-header.jpg": (
        lambda p: p.write_bytes(bytes.fromhex("ffd8ffc0001108ffffffff03012200021101031101ffd9")),
        "too large",
    ),
    "dangling-link.png": (lambda p: p.symlink_to(p.parent / "nowhere.png"), "image file not found"),
    "strip.png": (lambda p: Image.new("RGB", (4000, 1)).save(p), "too elongated for the model"),
    "column.png": (lambda p: Image.new("RGB", (1, 4000)).save(p), "too elongated for the model"),
    "cmyk.jpg": (lambda p: Image.new("CMYK", (64, 48), (0, 255, 0, 0)).save(p), (64, 48)),
    "grey16.png": (lambda p: Image.fromarray(RNG_IMAGE[..., 0].astype(np.uint16) * 257).save(p), (64, 48)),
    "rgb16.png": (_rgb16_png, (64, 48)),
    "exif-rotated.png": (_exif_rotated, (64, 48)),
    "exif-rotated.jpg": (lambda p: _exif_rotated(p, SMOOTH_IMAGE), (64, 48)),
    "grey-alpha.png": (lambda p: Image.new("LA", (64, 48), (100, 0)).save(p), (64, 48)),
    "palette.gif": (lambda p: Image.new("P", (64, 48), 3).save(p), (64, 48)),
    "one-bit.png": (lambda p: Image.new("1", (64, 48), 1).save(p), (64, 48)),
    "float.tif": (lambda p: Image.new("F", (64, 48), 0.5).save(p), (64, 48)),
    "int32.tif": (lambda p: Image.new("I", (64, 48), 70_000).save(p), (64, 48)),
    "animated.gif": (
        lambda p: Image.new("RGB", (64, 48), "red").save(p, save_all=True, append_images=[Image.new("RGB", (64, 48))]),
        (64, 48),
    ),
    "one-pixel.png": (lambda p: Image.new("RGB", (1, 1), "white").save(p), (1, 1)),
    "good.png": (lambda p: Image.fromarray(RNG_IMAGE).save(p), (64, 48)),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    for name, (make, _) in CASES.items():
        make(root / name)
    return root


def test_label_skips_and_reports_broken_files_and_handles_the_rest(zoo: Path, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "labels"
    result = cli("label", "--checkpoint", checkpoint, "--images", zoo, "--out", out, "--views", "identity,hflip,scale:0.75",
                 "--shard-size", "5", "--batch-size", "3", "--workers", "0", "--threads", "1", "--device", "cpu")  # fmt: skip
    assert result.rc == 0 and "Traceback" not in result.err, result
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["images"] == len(CASES)
    reasons = {s["file_name"]: s["reason"] for s in manifest["skipped"]}
    rows = {r["file_name"]: r for p in sorted((out / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()}
    assert sorted(rows) == sorted(CASES)
    for name, (_, expected) in CASES.items():
        if isinstance(expected, str):
            assert expected in reasons.get(name, ""), (name, reasons.get(name))
            assert rows[name]["error"] is not None and rows[name]["boxes"] == []
        else:
            assert name not in reasons, (name, reasons[name])
            width, height = expected
            assert (rows[name]["width"], rows[name]["height"]) == expected, name
            boxes = np.asarray(rows[name]["boxes"], np.float64).reshape(-1, 4)
            assert (boxes >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all(), name
            assert all(0.0 <= s <= 1.0 for s in rows[name]["scores"])
    assert f"skipped {len(reasons)}" in result.out and "skipped bomb.png: image too large" in result.out


@pytest.mark.parametrize("name", [n for n, (_, e) in CASES.items() if not isinstance(e, str)])
def test_handled_images_decode_to_rgb_in_their_displayed_orientation(zoo: Path, name: str) -> None:
    image = read_image(zoo / name)
    width, height = CASES[name][1]  # type: ignore[misc]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, height, width)
    assert image_size(zoo / name) == (width, height)  # what `validate` compares the json's sizes with
    if name in ("good.png", "rgb16.png", "exif-rotated.png"):  # exactly what a viewer shows
        assert np.array_equal(image.permute(1, 2, 0).numpy(), RNG_IMAGE)
    if name == "exif-rotated.jpg":  # the same, up to JPEG's loss
        assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - SMOOTH_IMAGE).mean() < 4
    if name == "cmyk.jpg":  # magenta ink only
        r, g, b = (int(c) for c in image[:, 0, 0])
        assert r > 200 and g < 60 and b > 200
    if name == "grey16.png":
        assert np.array_equal(image[0].numpy(), RNG_IMAGE[..., 0])  # 16 bits scaled back to 8
