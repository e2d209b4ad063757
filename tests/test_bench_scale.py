"""bench/scale.py's replication: a labeling folder repeated to N images, each copy under its own symlinked
image folder, cut into 1,000-image shards with the manifest's counts (the measuring itself runs in the bench)."""

from __future__ import annotations

import json
from pathlib import Path

from datadistill.data.images import read_image, resolve_image_path
from datadistill.data.label_folder import open_label_folder, read_shards, shard_schema, write_shard


def test_replicate_repeats_the_rows_under_folders_that_lead_to_the_real_images(tmp_path: Path, bench_script) -> None:
    scale = bench_script("scale")
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    rows = []
    for i in range(3):
        Image.new("RGB", (8, 6)).save(images / f"u{i}.png")
        rows.append({"file_name": f"u{i}.png", "width": 8, "height": 6, "boxes": [1.0, 1.0, 4.0, 4.0] * i,
                     "scores": [0.5] * i, "labels": [0] * i, "agreement": [1] * i, "error": None})  # fmt: skip
    base = tmp_path / "base"
    write_shard(base / "shards" / "part-00000.parquet", rows, shard_schema(0))
    manifest = {"status": "complete", "num_shards": 1, "classes": {"names": ["a"]},
                "config": {"image_root": str(images), "views": ["identity"]}, "counts": {}}  # fmt: skip
    (base / "manifest.json").write_text(json.dumps(manifest))
    out = scale.replicate(base, 2500, tmp_path / "work")
    folder = open_label_folder(out)
    table = read_shards(out, columns=["file_name", "scores"])
    names = table["file_name"].to_pylist()
    assert folder.num_shards == 3 and len(folder.shard_files()) == 3 and len(names) == 2500 == len(set(names))
    assert names[:4] == ["c000000/u0.png", "c000000/u1.png", "c000000/u2.png", "c000001/u0.png"]
    assert (
        json.loads((out / "manifest.json").read_text())["counts"]["objects"] == 833 * 3
    )  # 0, 1, 2 per copy; the last copy holds u0 only
    assert read_image(resolve_image_path(folder.image_root, names[-1])).shape == (3, 6, 8)
