"""Image files: safe path resolution under an image root, listing, and robust decoding to RGB."""

from __future__ import annotations

import os
import posixpath
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from datadistill.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
_ORIENTATION_TAG = 0x0112
# Orientations 5..8 rotate by 90 degrees: the displayed width and height are swapped.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def resolve_image_path(root: str | os.PathLike[str], file_name: str) -> Path:
    """The path of ``file_name`` under ``root``; refuses names that leave the root.

    Absolute names, drive letters and ``..`` components that climb above the root are refused, so a
    hostile data set cannot make us read arbitrary files. The check is on the name, not on the file:
    an image folder made of symlinks into a shared store (a common layout) keeps working.
    """
    if not isinstance(file_name, str) or not file_name:
        raise DataError(f"image file_name must be a non-empty string, got {file_name!r}")
    if "\x00" in file_name:
        raise DataError(f"image path {file_name!r} contains a NUL byte")
    if os.path.isabs(file_name) or file_name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", file_name):
        raise DataError(f"image path {file_name!r} is absolute; it must be relative to the image root")
    normal = posixpath.normpath(file_name.replace("\\", "/"))
    if normal == ".." or normal.startswith("../"):
        raise DataError(f"image path {file_name!r} leaves the image root {str(root)!r}")
    return Path(root) / normal


def list_images(folder: str | os.PathLike[str]) -> list[str]:
    """Image files under ``folder`` (recursive), as sorted POSIX paths relative to it."""
    root = Path(folder)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


def is_file(path: str | os.PathLike[str]) -> bool:
    """``Path.is_file`` that says False, not raises, where the name itself is unusable (too long)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def _unreadable(path: str | os.PathLike[str], exc: BaseException) -> DataError:
    if is_file(path) and Path(path).stat().st_size == 0:
        reason = "empty file"
    elif isinstance(exc, UnidentifiedImageError):
        reason = "not an image format PIL can read"
    else:
        reason = str(exc).replace(str(path), "").strip(" '") or type(exc).__name__
    return DataError(f"{path}: not a readable image ({reason})")


@contextmanager
def _decoding(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turns every way an image file can fail into a one-line DataError naming the file; a decompression
    bomb (beyond PIL's pixel limit) is an error, not a warning."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except FileNotFoundError as exc:
        raise DataError(f"{path}: image file not found") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: image too large to decode safely ({exc})") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise _unreadable(path, exc) from exc


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(width, height)`` as displayed (EXIF orientation applied), read from the header only."""
    with _decoding(path), Image.open(path) as img:
        width, height = img.size
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    if orientation in _SWAPPING_ORIENTATIONS:
        return height, width
    return width, height


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any mode: 16-bit and 32-bit grayscale are rescaled, alpha is dropped, CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max(initial=0)
        peak = 65535.0 if img.mode.startswith("I;16") or top > 255 else 1.0 if img.mode == "F" and top <= 1 else 255.0
        arr = np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "RGB":
        return img
    if img.mode in ("P", "PA", "LA", "RGBA") and "transparency" in img.info or img.mode in ("PA", "LA"):
        img = img.convert("RGBA")
    return img.convert("RGB")


def read_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """Decode an image to a ``[3, H, W]`` uint8 RGB tensor, EXIF orientation applied.

    Raises DataError (one line, naming the file) for missing, empty, truncated, non-image or
    oversized files.
    """
    with _decoding(path), Image.open(path) as img:
        img.load()
        rgb = _to_rgb(ImageOps.exif_transpose(img))
        arr = np.asarray(rgb, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
