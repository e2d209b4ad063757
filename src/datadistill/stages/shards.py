"""What is labeled and how: the unlabeled images, listed once, and each shard cut into forward-pass batches.

The unlabeled images (:class:`ImageSource`) are listed once, in a deterministic order, and cut into shards
of ``shard_size`` images; each shard is cut into the same forward-pass batches by every engine
(:func:`plan_batches`) and decoded by :class:`ShardImages`. What a shard holds, and how it is written and
read, is the labeling folder's format: :mod:`datadistill.data.label_folder`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from datadistill.data.coco import load_coco, read_json
from datadistill.data.images import (
    EncodedJpeg,
    as_image_root,
    decode_jpegs,
    is_uri,
    list_images,
    read_encoded,
    read_image,
    resolve_image_path,
)
from datadistill.errors import DataError, UserError


@dataclass(frozen=True)
class ImageSource:
    """The unlabeled images: a root (a local folder, or an object-store URI prefix: a str) and file names
    relative to it, in labeling order."""

    root: Path | str
    files: tuple[str, ...]
    description: str = ""

    def shard(self, index: int, shard_size: int) -> tuple[str, ...]:
        return self.files[index * shard_size : (index + 1) * shard_size]

    def num_shards(self, shard_size: int) -> int:
        return -(-len(self.files) // shard_size)


def list_source(src: str | os.PathLike[str], *, image_root: str | os.PathLike[str] | None = None) -> ImageSource:
    """The images of a folder or an object-store prefix (recursive), a text file of paths, or a COCO json
    (annotations ignored).

    A text file's paths are relative to ``image_root`` (default: the text file's folder). A COCO json's
    ``file_name`` are relative to ``image_root`` (default: ``images/`` beside the json if it exists, else
    the json's folder). ``image_root`` may be a URI prefix (``s3://bucket/prefix``). Paths that leave the
    root are refused.
    """
    if is_uri(src):
        uri = as_image_root(src)
        files = list_images(uri)
        if not files:
            raise UserError(f"{uri}: no images found under this prefix (looked for .jpg, .png, .webp ...)")
        return ImageSource(root=uri, files=tuple(files), description=f"prefix {uri}")
    path = Path(src)
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise UserError(f"{path}: no images found (looked for {', '.join(sorted({'.jpg', '.png', '.webp'}))} ...)")
        return ImageSource(root=path, files=tuple(files), description=f"folder {path}")
    if not path.exists():
        raise UserError(f"{path}: no such folder or file")
    if path.suffix.lower() == ".json":
        raw = read_json(path)
        if isinstance(raw, dict) and "images" in raw and "annotations" not in raw:
            raw = {**raw, "annotations": []}
        default_root = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
        root = as_image_root(image_root) if image_root is not None else default_root
        dataset = load_coco(path, image_root=root)
        return ImageSource(root=root, files=tuple(im.file_name for im in dataset.images), description=f"COCO {path}")
    root = as_image_root(image_root) if image_root is not None else path.parent
    files = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            name = line.strip()
            if not name or name.startswith("#"):
                continue
            candidate = Path(name)
            local = isinstance(root, Path)
            if local and candidate.is_absolute() and candidate.resolve().is_relative_to(root.resolve()):
                name = candidate.resolve().relative_to(root.resolve()).as_posix()
            try:
                resolve_image_path(root, name)
            except DataError as exc:
                raise UserError(f"{path} line {lineno}: {exc}") from exc
            files.append(name)
    if not files:
        raise UserError(f"{path}: the list names no images")
    if len(set(files)) != len(files):
        raise UserError(f"{path}: lists an image more than once")
    return ImageSource(root=root, files=tuple(files), description=f"list {path}")


class ShardImages(Dataset):
    """Decodes images for the DataLoader workers; a broken file gives its error instead of a crash, but a
    store that cannot be read (a UserError that is no DataError: credentials, bucket, network) stops the run
    rather than skipping every image.

    ``jpeg_bytes``: JPEGs come back undecoded, as their checked bytes under ``"encoded"``
    (:func:`~datadistill.data.images.read_encoded`; ``"image"`` None), for :func:`decode_on_device` to decode
    the batch in the main process; every other image is decoded here."""

    def __init__(self, root: Path | str, items: list[tuple[int, str]], *, jpeg_bytes: bool = False) -> None:
        self.root, self.items, self.jpeg_bytes = root, items, jpeg_bytes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        shard, name = self.items[i]
        read = read_encoded if self.jpeg_bytes else read_image
        item = {"shard": shard, "file_name": name, "image": None, "encoded": None, "error": None}
        found, item["error"] = _read(lambda: read(resolve_image_path(self.root, name)))
        item["encoded" if isinstance(found, EncodedJpeg) else "image"] = found
        return item


def _read(read: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(what read() gives, None)``, or ``(None, the error)`` for a file that could not be read: an error
    row names the file, its error says why."""
    try:
        return read(), None
    except DataError as exc:
        return None, str(exc).split(": ", 1)[-1]
    except UserError:
        raise
    except Exception as exc:  # a decoder bug on a hostile file must not kill the run
        return None, f"{type(exc).__name__}: {exc}"


def decode_on_device(items: list[dict[str, Any]], device: torch.device) -> None:
    """Decode the JPEGs that :class:`ShardImages` left as bytes (``"encoded"``) on ``device``, in one batched
    call (:func:`~datadistill.data.images.decode_jpegs`), into each item's ``"image"`` (uint8 ``[3, H, W]``);
    a file that decoder refuses is decoded by PIL, as the workers would have: its pixels, or its error."""
    todo = [item for item in items if item.get("encoded") is not None]
    for item, image in zip(todo, decode_jpegs([item["encoded"] for item in todo], device=device), strict=True):
        encoded, item["encoded"] = item["encoded"], None
        if image is None:
            image, item["error"] = _read(lambda e=encoded: read_image(e.path, data=e.data))
        item["image"] = image


def worker_init(_: int) -> None:
    torch.set_num_threads(1)


def collate_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def plan_batches(num_images: int, batch_size: int) -> list[range]:
    """The forward passes of one shard of ``num_images``: positions in runs of ``batch_size``, the last
    run shorter. Batches never cross a shard, so that a shard's labels depend on the shard alone, not on
    the engine, the number of processes or where a resumed run started (batch composition changes
    floating-point results: the model pads a batch to its largest image)."""
    return [range(i, min(i + batch_size, num_images)) for i in range(0, num_images, batch_size)]
