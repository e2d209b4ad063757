"""Where an image lives, and reading it: safe names under an image root, listing, robust decoding to RGB.

An image root is a local folder or an object-store prefix (``s3://bucket/prefix``, ``gs://``, ``az://``,
``abfs://``: :mod:`datadistill.data.object_store`). A file name is a relative POSIX path under it, and the
same rules hold for both: a name never leads out of its root. :func:`resolve_image_path` gives a local
image's :class:`~pathlib.Path` or an object's URI (a ``str``); :func:`read_image`, :func:`image_size` and
:func:`is_file` take either, and objects are decoded by the same decoder as files.
"""

from __future__ import annotations

import io
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

from datadistill.data import object_store
from datadistill.data.object_store import is_uri
from datadistill.errors import DataError, shorten

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
_ORIENTATION_TAG = 0x0112
# Orientations 5..8 rotate by 90 degrees: the displayed width and height are swapped.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


ImageRoot = str | os.PathLike[str]  # a local folder, or an object-store URI prefix (a str)


def as_image_root(root: ImageRoot) -> Path | str:
    """``root`` as the image functions take it: a local folder as a Path, a URI prefix as a checked str
    (:func:`~datadistill.data.object_store.check_uri`: no trailing ``/``, no credentials in it)."""
    return object_store.check_uri(root) if is_uri(root) else Path(root)


def absolute_root(root: str) -> str:
    """A local root made absolute (``~`` expanded); a URI prefix as it is."""
    return object_store.check_uri(root) if is_uri(root) else str(Path(root).expanduser().resolve())


def check_image_name(file_name: object, *, root: ImageRoot | None = None) -> str:
    """``file_name`` as a normalized relative POSIX path (``\\`` read as ``/``); a one-line DataError when it
    is no name (empty, not a string) or could lead out of any image root: absolute, a drive letter, a URI, a
    NUL byte, ``..`` components that climb above the root. Needs no root: a data set's names are checked
    whether or not its images are (``root`` only names the root in the message)."""
    if not isinstance(file_name, str) or not file_name:
        raise DataError(f"image file_name must be a non-empty string, got {shorten(repr(file_name))}")
    shown = shorten(repr(file_name))
    if "\x00" in file_name:
        raise DataError(f"image path {shown} contains a NUL byte")
    if is_uri(file_name):
        raise DataError(f"image path {shown} is a URI; it must be relative to the image root (--images)")
    if os.path.isabs(file_name) or file_name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", file_name):
        raise DataError(f"image path {shown} is absolute; it must be relative to the image root")
    normal = posixpath.normpath(file_name.replace("\\", "/"))
    if normal == ".." or normal.startswith("../"):
        where = f" {shorten(repr(str(root)))}" if root is not None else ""
        raise DataError(f"image path {shown} leaves the image root{where}")
    return normal


def resolve_image_path(root: ImageRoot, file_name: str) -> Path | str:
    """The path of ``file_name`` under ``root`` (a Path), or its URI under a URI prefix (a str); refuses
    names that leave the root.

    Absolute names, drive letters and ``..`` components that climb above the root are refused, so a
    hostile data set cannot make us read arbitrary files (or objects outside the prefix). The check is on
    the name, not on the file: an image folder made of symlinks into a shared store (a common layout)
    keeps working. Under a URI prefix the name is normalized (``a/./b`` reads the key ``a/b``).
    """
    normal = check_image_name(file_name, root=root)
    if is_uri(root):
        return object_store.join_uri(object_store.check_uri(root), normal)
    return Path(root) / normal


def list_images(folder: ImageRoot) -> list[str]:
    """Image files under ``folder`` (recursive; a local folder or a URI prefix), as sorted POSIX paths
    relative to it."""
    if is_uri(folder):
        return object_store.list_objects(folder, suffixes=IMAGE_EXTENSIONS)
    root = Path(folder)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


def is_file(path: str | os.PathLike[str]) -> bool:
    """``Path.is_file`` that says False, not raises, where the name itself is unusable (too long); for a
    URI, whether the object exists (a UserError when the store cannot be read)."""
    if is_uri(path):
        return object_store.object_exists(path)
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


ASK_EACH_OBJECT = 2000  # names checked one request each; beyond, a prefix is listed instead


def missing_images(root: ImageRoot, file_names: list[str]) -> list[str]:
    """The names of ``file_names`` with no file under ``root``, in their order. Under a URI prefix, a few
    names (at most :data:`ASK_EACH_OBJECT`) are asked for one by one; more, and the prefix is listed once (a
    request per 1,000 objects) rather than each object asked for."""
    if is_uri(root) and len(file_names) > ASK_EACH_OBJECT:
        present = {resolve_image_path(root, name) for name in list_images(root)}
        return [name for name in file_names if resolve_image_path(root, name) not in present]
    return [name for name in file_names if not is_file(resolve_image_path(root, name))]


def _unreadable(path: str | os.PathLike[str], exc: BaseException) -> DataError:
    if not is_uri(path) and is_file(path) and Path(path).stat().st_size == 0:
        reason = "empty file"
    elif isinstance(exc, UnidentifiedImageError):
        reason = "not an image format PIL can read"
    else:
        reason = str(exc).replace(str(path), "").strip(" '") or type(exc).__name__
    return DataError(f"{path}: not a readable image ({reason})")


def _opened(path: str | os.PathLike[str]) -> str | os.PathLike[str] | io.BytesIO:
    """What PIL opens: a local path, or an object's bytes (read whole: objects are fetched, not seeked)."""
    if not is_uri(path):
        return path
    data = object_store.read_object(str(path))
    if not data:
        raise DataError(f"{path}: not a readable image (empty file)")
    return io.BytesIO(data)


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
    with _decoding(path), Image.open(_opened(path)) as img:
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
    with _decoding(path), Image.open(_opened(path)) as img:
        img.load()
        rgb = _to_rgb(ImageOps.exif_transpose(img))
        arr = np.asarray(rgb, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
