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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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


def _opened(path: str | os.PathLike[str], data: bytes | None = None) -> str | os.PathLike[str] | io.BytesIO:
    """What PIL opens: a local path, or an object's bytes (read whole: objects are fetched, not seeked);
    ``data``, the file's bytes when they were read already."""
    if data is not None:
        if not data:
            raise DataError(f"{path}: not a readable image (empty file)")
        return io.BytesIO(data)
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


def read_image(path: str | os.PathLike[str], *, data: bytes | None = None) -> torch.Tensor:
    """Decode an image to a ``[3, H, W]`` uint8 RGB tensor, EXIF orientation applied.

    Raises DataError (one line, naming the file) for missing, empty, truncated, non-image or
    oversized files. ``data``: the file's bytes, when they were read already (not read again).
    """
    with _decoding(path), Image.open(_opened(path, data)) as img:
        img.load()
        rgb = _to_rgb(ImageOps.exif_transpose(img))
        arr = np.asarray(rgb, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------------
# JPEGs decoded elsewhere (on the device): the bytes read and checked here, decoded in a batch there

_JPEG_MAGIC = b"\xff\xd8\xff"
# What a JPEG's pixels may be for torchvision's decoder to take it: PIL decodes the rest (CMYK, MPO...).
_DEVICE_MODES = frozenset({"RGB", "L"})


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG file's bytes, checked as :func:`read_image` checks a file before it decodes it (a safe name,
    PIL's pixel limit, a header PIL reads), for :func:`decode_jpegs` to decode elsewhere (on the device).
    ``orientation``: its EXIF orientation (1..8, 1: as stored); ``height``, ``width``: px as displayed."""

    path: str
    data: bytes
    orientation: int
    height: int
    width: int


def read_encoded(path: str | os.PathLike[str]) -> torch.Tensor | EncodedJpeg:
    """A JPEG of RGB or grayscale pixels as its checked bytes (:class:`EncodedJpeg`); any other image
    decoded by :func:`read_image` here (a ``[3, H, W]`` uint8 tensor). The same DataErrors as
    :func:`read_image` for a file that cannot be read or whose header is refused; a JPEG whose data turn
    out broken is refused when it is decoded (:func:`decode_jpegs` hands it back to :func:`read_image`)."""
    with _decoding(path):
        if is_uri(path):
            data = object_store.read_object(str(path))
        else:
            with open(path, "rb") as f:
                if f.read(len(_JPEG_MAGIC)) != _JPEG_MAGIC:
                    return read_image(path)  # not a JPEG: today's decoder, from the file
                f.seek(0)
                data = f.read()
    if not data.startswith(_JPEG_MAGIC):
        return read_image(path, data=data)
    with _decoding(path), Image.open(io.BytesIO(data)) as img:  # the header only: size, mode, EXIF
        fmt, mode, (width, height) = img.format, img.mode, img.size
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    if fmt != "JPEG" or mode not in _DEVICE_MODES or orientation not in range(1, 9):  # a value PIL would ignore, too
        return read_image(path, data=data)
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return EncodedJpeg(path=str(path), data=data, orientation=orientation, height=height, width=width)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """An image ``[..., H, W]`` as stored, turned as its EXIF ``orientation`` (1..8) says it is displayed:
    the pixels of PIL's :func:`~PIL.ImageOps.exif_transpose`, on any device."""
    if orientation == 1:
        return image
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.transpose(-2, -1).flip(-2)
    raise ValueError(f"EXIF orientation must be in 1..8, got {orientation}")


def decode_jpegs(encoded: Sequence[EncodedJpeg], *, device: torch.device | str) -> list[torch.Tensor | None]:
    """Each JPEG decoded to a ``[3, H, W]`` uint8 RGB tensor on ``device`` (grayscale as three equal
    channels, EXIF orientation applied), by torchvision's ``decode_jpeg`` in one batched call (nvJPEG on a
    GPU, libjpeg on the CPU); None for a file it refuses or warns about (the batched call refused, each is
    decoded alone to find which): decode that one with :func:`read_image` (``data=``), which gives its
    DataError or, where PIL reads it, its pixels."""
    if not encoded:
        return []
    device = torch.device(device)
    decoded: list[torch.Tensor | None] | None = _decode_jpegs([e.data for e in encoded], device=device)  # type: ignore[assignment]
    if decoded is None:
        decoded = [(alone or [None])[0] for alone in (_decode_jpegs([e.data], device=device) for e in encoded)]
    return [
        None if image is None or tuple(image.shape) != (3, *_stored_size(e)) else orient(image, e.orientation)
        for e, image in zip(encoded, decoded, strict=True)
    ]


def _stored_size(e: EncodedJpeg) -> tuple[int, int]:
    """``(H, W)`` px of the pixels as stored (before the EXIF orientation turns them)."""
    return (e.width, e.height) if e.orientation in _SWAPPING_ORIENTATIONS else (e.height, e.width)


def _decode_jpegs(datas: list[bytes], *, device: torch.device) -> list[torch.Tensor] | None:
    """torchvision's ``decode_jpeg`` of every JPEG in one call, or None when it raises or warns (a decoder's
    warnings are about damaged data: PIL has the last word on those files). Only torchvision's own warnings
    count, not its deprecation notice, nor what another thread warns meanwhile (the labeling writer's)."""
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        except (RuntimeError, ValueError):
            return None
    package = os.path.dirname(torchvision.__file__)
    if any(w.filename.startswith(package) and not issubclass(w.category, DeprecationWarning) for w in caught):
        return None
    return list(images)
