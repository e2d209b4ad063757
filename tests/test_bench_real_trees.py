"""bench/real_trees.py's data preparation on a tiny image and VOC file made here (the real one is fetched by
the benchmark): crowns are read as continuous pixels, cut into tiles by the half-inside rule, and split."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import real_trees  # noqa: E402

from datadistill.data.coco import load_coco  # noqa: E402

VOC = """<annotation><size><width>64</width><height>64</height><depth>3</depth></size>
<object><name>Tree</name><bndbox><xmin>3</xmin><ymin>3</ymin><xmax>12</xmax><ymax>12</ymax></bndbox></object>
<object><name>Tree</name><bndbox><xmin>27</xmin><ymin>5</ymin><xmax>36</xmax><ymax>14</ymax></bndbox></object>
<object><name>Tree</name><bndbox><xmin>29</xmin><ymin>40</ymin><xmax>34</xmax><ymax>50</ymax></bndbox></object>
</annotation>"""


def test_tiles_keep_a_crown_where_at_least_half_of_it_is(tmp_path: Path) -> None:
    (tmp_path / "t.xml").write_text(VOC)
    Image.new("RGB", (70, 66), (10, 120, 30)).save(tmp_path / "t.png")
    crowns = real_trees.read_crowns(tmp_path / "t.xml")
    np.testing.assert_array_equal(crowns[0], [2, 2, 12, 12])  # VOC's 1-based inclusive corners
    tiles = real_trees.make_tiles(tmp_path / "t.png", crowns, tmp_path / "tiles", tile=32)
    assert [im.file_name for im in tiles.images] == ["r00_c00.png", "r00_c01.png", "r01_c00.png", "r01_c01.png"]
    boxes = {im.file_name: tiles.labels[im.id].boxes.tolist() for im in tiles.images}
    # crown 2 spans x 26..36: 6 of 10 px in tile c00 (kept, clipped), 4 in c01 (dropped)
    assert boxes["r00_c00.png"] == [[2, 2, 12, 12], [26, 4, 32, 14]]
    assert boxes["r00_c01.png"] == []
    # crown 3 spans x 28..34 (4 of 6 px in c00) and y 39..50 (all in r01): kept in r01_c00 only
    assert boxes["r01_c00.png"] == [[28, 7, 32, 18]] and boxes["r01_c01.png"] == []
    assert Image.open(tmp_path / "tiles" / "images" / "r01_c01.png").size == (32, 32)

    paths = real_trees.split(tiles, tmp_path / "split", seed=0, labeled=1, unlabeled=2)
    parts = {name: load_coco(paths[name]) for name in ("labeled", "unlabeled", "unlabeled_truth", "test")}
    assert [len(p.images) for p in parts.values()] == [1, 2, 2, 1]
    names = [{im.file_name for im in parts[n].images} for n in ("labeled", "unlabeled_truth", "test")]
    assert set.union(*names) == {im.file_name for im in tiles.images} and sum(map(len, names)) == 4
    assert all(len(lab) == 0 for lab in parts["unlabeled"].labels.values())
    again = real_trees.split(tiles, tmp_path / "again", seed=0, labeled=1, unlabeled=2)
    assert load_coco(again["test"]).images == parts["test"].images  # a function of the seed
