"""Labeling: multi-view inference mapped back exactly, fused, streamed into resumable shards."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from datadistill.core.types import Detections
from datadistill.core.views import parse_views
from datadistill.data.coco import load_coco
from datadistill.data.label_folder import (
    ShardWriter,
    TableShardWriter,
    detections_row,
    error_row,
    shard_path,
    shard_schema,
)
from datadistill.errors import UserError
from datadistill.models import torchvision as models
from datadistill.stages import label as label_mod
from datadistill.stages.label import LabelConfig, label, list_source, read_shards, shard_detections
from datadistill.stages.label_ray import output_schema
from datadistill.stages.multiview import label_images

FLIP = (0, 2, 1, 4, 3)  # head, left_hand, right_hand, left_foot, right_foot


def _meta(task: str = "boxes", k: int = 0) -> models.ModelMeta:
    names = ("head", "left_hand", "right_hand", "left_foot", "right_foot")[:k]
    return models.ModelMeta(
        model="small_fcos" if task == "boxes" else "small_keypointrcnn",
        task=task,
        class_names=("blob",),
        category_ids=(1,),
        keypoint_names=names,
        flip_index=FLIP[:k] if k else (),
        skeleton=(),
        sigmas=(0.05,) * k,
        min_size=64,
        max_size=64,
    )


def _oracle_predict(model: torch.nn.Module, images: list[torch.Tensor]) -> list[Detections]:
    """An exactly flip-equivariant detector: one box per bright column band, and for figures the
    anatomical hands (the figure faces the viewer: its left hand is the dot on the image's right)."""
    out = []
    for img in images:
        mask = img[0] > 0.5
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(xs) == 0:
            out.append(Detections.empty(5))
            continue
        box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
        hands = torch.nonzero(img[1] > 0.5, as_tuple=True)  # green dots are hands
        hx = hands[1].float()
        hy = hands[0].float()
        left = torch.stack([hx.max() + 0.5, hy[hx.argmax()] + 0.5, torch.tensor(1.0)])  # image right
        right = torch.stack([hx.min() + 0.5, hy[hx.argmin()] + 0.5, torch.tensor(1.0)])
        head = torch.tensor([(box[0, 0] + box[0, 2]) / 2, box[0, 1] + 1, 1.0])
        kps = torch.stack([head, left, right, left * torch.tensor([1, 0, 1]), right * torch.tensor([1, 0, 1])])[None]
        out.append(Detections(boxes=box, scores=torch.tensor([0.9]), labels=torch.tensor([0]), keypoints=kps))
    return out


def _symmetric_figure(width: int = 64, height: int = 48, centre: float = 32.0) -> torch.Tensor:
    img = torch.zeros(3, height, width)
    c = int(centre)
    img[0, 8:40, c - 10 : c + 10] = 1.0  # body, symmetric about x = centre
    img[1, 20, c - 9] = 1.0  # the figure's right hand: image left
    img[1, 20, c + 8] = 1.0  # its left hand: image right
    return img


def test_symmetric_image_gives_the_same_output_with_and_without_the_flip_view() -> None:
    meta = _meta("keypoints", 5)
    img = _symmetric_figure()
    assert torch.equal(img, img.flip(-1))
    kw = {"fuse": "wbf", "keypoint_fuse": "mean", "iou_thr": 0.5, "score_floor": 0.05}
    (alone,) = label_images(_Oracle(meta), [img], views=parse_views("identity"), **kw)
    (both,) = label_images(_Oracle(meta), [img], views=parse_views("identity,hflip"), **kw)
    torch.testing.assert_close(both.boxes, alone.boxes)
    torch.testing.assert_close(both.keypoints, alone.keypoints)
    assert both.agreement.tolist() == [2] and alone.agreement.tolist() == [1]
    assert float(both.keypoints[0, 1, 0]) > float(both.keypoints[0, 2, 0])  # left hand on the image right


def test_flip_without_swap_would_be_caught() -> None:
    """The same scene with a flip map that does not swap: fused hands collapse to the middle."""
    meta = _meta("keypoints", 5)
    wrong = models.ModelMeta(**{**meta.__dict__, "flip_index": (0, 1, 2, 3, 4)})
    kw = {"fuse": "wbf", "keypoint_fuse": "mean", "iou_thr": 0.5, "score_floor": 0.05}
    (fused,) = label_images(
        _Oracle(wrong),
        [_symmetric_figure()],
        views=parse_views("identity,hflip"),
        **kw,
    )
    assert abs(float(fused.keypoints[0, 1, 0]) - float(fused.keypoints[0, 2, 0])) < 1.0


class _Oracle:
    """A stand-in Detector (label_images takes any): :func:`_oracle_predict` at every input size."""

    has_heatmaps = False
    max_det = 100

    def __init__(self, meta: models.ModelMeta) -> None:
        self.meta, self.spec = meta, "oracle"

    def predict(self, images: Sequence[torch.Tensor]) -> list[Detections]:
        return _oracle_predict(torch.nn.Identity(), list(images))

    def input_size(self, min_size: int, max_size: int) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    def heatmaps(self, images: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]) -> None:
        return None

    def unfit_reason(self, height: int, width: int, *, min_size: int, max_size: int) -> None:
        return None


def test_asymmetric_scene_maps_back_to_the_same_place() -> None:
    """A figure off-centre: the flip view's detections land exactly on the identity view's."""
    img = _symmetric_figure(width=80, centre=22.0)
    meta = _meta("keypoints", 5)
    kw = {"fuse": "nms", "keypoint_fuse": "mean", "iou_thr": 0.5, "score_floor": 0.05}
    (alone,) = label_images(_Oracle(meta), [img], views=parse_views("identity"), **kw)
    (both,) = label_images(_Oracle(meta), [img], views=parse_views("identity,hflip"), **kw)
    torch.testing.assert_close(both.boxes, alone.boxes)
    torch.testing.assert_close(both.keypoints, alone.keypoints)


# ---------------------------------------------------------------------------------------------------
# the stage, with a real (untrained) small model


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unlabeled")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    for i in range(9):
        folder = root / "sub" if i % 3 == 0 else root
        Image.fromarray(rng.integers(0, 255, (48 + i, 64, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    good = (root / "img1.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("L", (40, 30), 128).save(root / "gray.png")
    return root


def _cfg(checkpoint: Path, images: Path, out: Path, **kw: object) -> LabelConfig:
    base = {"views": "identity,hflip,scale:0.75", "batch_size": 3, "shard_size": 4, "workers": 0, "device": "cpu"}
    return LabelConfig(checkpoint=str(checkpoint), images=str(images), out=str(out), **{**base, **kw})


def _tables(out: Path) -> list[dict]:
    return [pq.read_table(p).to_pylist() for p in sorted((out / "shards").glob("part-*.parquet"))]


def test_label_folder_writes_shards_and_reports_broken_files(checkpoint: Path, unlabeled: Path, tmp_path: Path) -> None:
    out = tmp_path / "labels"
    manifest = json.loads(label(_cfg(checkpoint, unlabeled, out)).read_text())
    assert manifest["status"] == "complete" and manifest["num_shards"] == 4  # 13 images / 4
    assert manifest["counts"]["images"] == 13 and manifest["counts"]["skipped"] == 3
    reasons = {s["file_name"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"empty.png", "text.jpg", "truncated.png"}
    assert "empty file" in reasons["empty.png"]
    table = read_shards(out)
    assert table.num_rows == 13 and sorted(table["file_name"].to_pylist())[:2] == ["empty.png", "gray.png"]
    row = next(r for r in table.to_pylist() if r["file_name"] == "sub/img0.png")
    assert (row["width"], row["height"]) == (64, 48)
    det = shard_detections(row, 0)
    assert (det.scores >= 0.05).all() and det.agreement.min() >= 1 and det.agreement.max() <= 3
    assert (det.boxes[:, 2] >= det.boxes[:, 0]).all()
    assert not list(out.rglob("*.tmp"))


def test_rerun_resumes_and_other_settings_are_refused(checkpoint: Path, unlabeled: Path, tmp_path: Path) -> None:
    out = tmp_path / "labels"
    label(_cfg(checkpoint, unlabeled, out))
    before = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")}
    first = _tables(out)
    (out / "shards" / "part-00002.parquet").unlink()
    label(_cfg(checkpoint, unlabeled, out))
    assert _tables(out) == first
    after = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")}
    assert [p.name for p in after if after[p] != before.get(p)] == ["part-00002.parquet"]
    with pytest.raises(UserError, match="another views"):
        label(_cfg(checkpoint, unlabeled, out, views="identity"))
    label(_cfg(checkpoint, unlabeled, out, views="identity", overwrite=True))
    assert json.loads((out / "manifest.json").read_text())["config"]["views"] == ["identity"]


def test_sources_list_file_and_coco_json(checkpoint: Path, unlabeled: Path, tmp_path: Path) -> None:
    listing = unlabeled / "list.txt"
    listing.write_text("# some images\nimg1.png\n\nsub/img3.png\n")
    src = list_source(listing)
    assert src.files == ("img1.png", "sub/img3.png") and src.root == unlabeled
    coco = tmp_path / "u.json"
    coco.write_text(json.dumps({"images": [{"id": 5, "file_name": "img2.png", "width": 64, "height": 50}],
                                "categories": [{"id": 1, "name": "blob"}]}))  # fmt: skip
    assert list_source(coco, image_root=unlabeled).files == ("img2.png",)
    bad = unlabeled / "bad.txt"
    bad.write_text("img1.png\n../../etc/passwd\n")
    with pytest.raises(UserError, match=r"bad.txt line 2: image path '../../etc/passwd' leaves the image root"):
        list_source(bad)
    manifest = label(_cfg(checkpoint, listing, tmp_path / "l2"))
    assert json.loads(manifest.read_text())["counts"]["images"] == 2


def test_bad_options_are_one_line_errors(checkpoint: Path, unlabeled: Path, tmp_path: Path) -> None:
    for kw, message in [
        ({"fuse": "max"}, "unknown --fuse 'max'"),
        ({"views": "rotate"}, "--views: unknown view 'rotate'"),
        ({"shard_size": 0}, "--shard-size must be at least 1"),
        ({"iou_thr": 1.5}, r"--iou-thr must be in \[0.0, 1.0\], got 1.5"),
    ]:
        with pytest.raises(UserError, match=message):
            label(_cfg(checkpoint, unlabeled, tmp_path / "x", **kw))
    with pytest.raises(UserError, match="no such folder or file"):
        label(_cfg(checkpoint, tmp_path / "missing", tmp_path / "y"))


def test_heatmap_fusion_of_one_view_gives_the_model_keypoints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    meta = models.ModelMeta(**{**_meta("keypoints", 5).__dict__, "min_size": 96, "max_size": 96})
    model = models.build_model(meta).eval()
    model.roi_heads.score_thresh = 0.0
    img = torch.rand(3, 80, 96)
    (pred,) = models.predict(model, [img])
    (fused,) = label_images(models.TorchvisionDetector(model, meta), [img], views=parse_views("identity"), fuse="nms",
                            keypoint_fuse="heatmap", iou_thr=0.999, score_floor=0.0)  # fmt: skip
    order = torch.argsort(pred.scores, descending=True, stable=True)
    assert len(fused) == len(pred) > 0
    torch.testing.assert_close(fused.boxes, pred.boxes[order])
    torch.testing.assert_close(fused.keypoints[..., :2], pred.keypoints[order][..., :2], atol=1e-3, rtol=0)


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL semantics")
def test_sigkill_then_resume_gives_the_uninterrupted_result(
    checkpoint: Path, tmp_path: Path, label_killed_after: Callable[..., int]
) -> None:
    rng = np.random.default_rng(1)
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
    args = ["--checkpoint", str(checkpoint), "--images", str(images), "--views", "identity,hflip,scale:0.75",
            "--batch-size", "2", "--shard-size", "3", "--workers", "0", "--device", "cpu"]  # fmt: skip
    label_cmd = [sys.executable, "-m", "datadistill", "label", *args, "--out"]
    ref = tmp_path / "ref"
    subprocess.run([*label_cmd, str(ref)], check=True, capture_output=True)
    killed = tmp_path / "killed"
    for attempt in range(3):  # killed once 1, 3 and 5 of the 8 shards are written
        assert 1 + 2 * attempt <= label_killed_after(args, killed, 1 + 2 * attempt) < 8
    subprocess.run([*label_cmd, str(killed)], check=True, capture_output=True)
    assert _tables(killed) == _tables(ref)
    assert not list(killed.rglob("*.tmp"))
    assert json.loads((killed / "manifest.json").read_text())["status"] == "complete"


def test_coco_source_reads_synthetic_data(tmp_path: Path) -> None:
    from datadistill.data.synth import make_shapes

    path = make_shapes(tmp_path, num_images=3, seed=0, size_px=64)
    src = list_source(path)
    assert src.root == tmp_path / "images" and len(src.files) == 3
    assert load_coco(path).num_classes >= 5
    assert label_mod.MANIFEST_FORMAT == "datadistill-labels"


# ---------------------------------------------------------------------------------------------------
# the Ray driver's writer: rows as arrow tables


def _rows(rng: np.random.Generator, shard: int, count: int, k: int) -> list[dict]:
    """Shard rows as an engine makes them: detections (some with spreads not measured), and an error row."""
    rows = []
    for position in range(count):
        if position == 1:
            row = error_row(f"{shard}-{position}.png", "cannot decode", k)
        else:
            n = int(rng.integers(0, 6))
            det = Detections(boxes=torch.tensor(rng.random((n, 4)), dtype=torch.float32),
                             scores=torch.tensor(rng.random(n), dtype=torch.float32),
                             labels=torch.tensor(rng.integers(0, 3, n)), keypoints=torch.rand(n, k, 3),
                             agreement=torch.tensor(rng.integers(1, 3, n)),
                             score_spread=None if position == 2 else torch.rand(n),
                             box_spread=None if position == 2 else torch.rand(n))  # fmt: skip
            row = detections_row(f"{shard}-{position}.png", 64, 48, det, k)
        rows.append({"shard": shard, "position": position, "model_s": 0.5, "fusion_s": 0.25, **row})
    return rows


def test_table_writer_writes_the_row_writers_bytes_once_a_shard_is_complete(tmp_path: Path) -> None:
    """Rows of two shards in a shuffled order, three to a table (tables mixing shards), some sent twice (a
    retried task), one again after its shard was written: each shard appears when its last row comes, in
    the bytes ShardWriter writes from the same rows in order."""
    rng = np.random.default_rng(0)
    k, expected = 2, {0: 5, 3: 4}
    rows = _rows(rng, 0, 5, k) + _rows(rng, 3, 4, k)
    reference = ShardWriter(out=tmp_path / "rows", expected=expected, num_keypoints=k)
    for row in rows:
        reference.add(row["shard"], row["position"], {n: row[n] for n in shard_schema(k).names})
    reference.close()

    order = rng.permutation(len(rows)).tolist()
    sent = [order[i : i + 3] for i in range(0, len(order), 3)]
    sent.insert(2, sent[0])  # a table that comes twice
    sent.append([order[0]])  # a row of a shard written already
    writer = TableShardWriter(out=tmp_path / "tables", expected=expected, num_keypoints=k)
    arrived: set[tuple[int, int]] = set()
    for part in sent:
        table = pa.Table.from_pylist([rows[i] for i in part], schema=output_schema(k))
        done = writer.add(table)
        before = {s for s in expected if all((s, p) in arrived for p in range(expected[s]))}
        arrived |= {(rows[i]["shard"], rows[i]["position"]) for i in part}
        after = {s for s in expected if all((s, p) in arrived for p in range(expected[s]))}
        assert sorted(done) == sorted(after - before)
        assert {s for s in expected if shard_path(tmp_path / "tables", s).exists()} == after
    writer.close()
    for s in expected:
        want = shard_path(tmp_path / "rows", s).read_bytes()
        assert shard_path(tmp_path / "tables", s).read_bytes() == want
    assert pq.read_table(shard_path(tmp_path / "tables", 3))["file_name"].to_pylist() == [
        f"3-{p}.png" for p in range(4)
    ]


def test_table_writer_never_writes_a_partial_shard(tmp_path: Path) -> None:
    rows = _rows(np.random.default_rng(1), 0, 3, 0)
    writer = TableShardWriter(out=tmp_path, expected={0: 3, 1: 2}, num_keypoints=0)
    assert writer.add(pa.Table.from_pylist(rows[:2], schema=output_schema(0))) == []
    with pytest.raises(RuntimeError, match=r"shards \[0, 1\] incomplete"):
        writer.close()  # shard 1 got no row at all
    assert not (tmp_path / "shards").exists()
    with pytest.raises(RuntimeError, match="shard 7, which is not being labeled"):
        writer.add(pa.Table.from_pylist([{**rows[2], "shard": 7}], schema=output_schema(0)))
    with pytest.raises(RuntimeError, match="past its 3 images"):
        writer.add(pa.Table.from_pylist([{**rows[2], "position": 3}], schema=output_schema(0)))
