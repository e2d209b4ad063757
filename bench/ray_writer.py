"""Does one Ray driver keep up with many actors? Rows per second through the driver's writer, before and
after, and through the whole ``label --engine ray`` path.

Run: ``flock /tmp/dd/cpu.lock python bench/ray_writer.py --out bench/results/ray_writer.json``.

The teacher is a fake detector (:class:`FakeDetector`): ``--boxes`` boxes per image (and ``--keypoints``
keypoints per box) returned at once, no model; the labeling's fusion (one view, NMS) keeps them all.

1. The driver's part alone, without Ray: the tables that the actors send (one per forward batch of
   ``--batch-size`` images, built as the actors build them) for ``--driver-images`` images go through
   :data:`ARMS`, each writing every shard of ``--shard-size`` images: the former driver loop
   (:func:`former_write_rows`: ``to_pylist``, one dict per row) into the former writer
   (:class:`FormerShardWriter`: parquet's dictionary tried on every column), the same loop into today's
   ``ShardWriter``, and today's driver (:func:`datadistill.stages.label_ray.write_rows`: arrow columns into
   ``TableShardWriter``). Checked: every arm's shards hold the same values, and today's two writers' the same
   bytes. Images per second, the median of ``--repeat`` rounds, for each ``--keypoints`` case (0: a box
   model; 17: COCO person keypoints, 5,100 more values per image).
2. The whole path: ``label`` with ``engine="ray"`` on ``--images`` tiny PNGs (``--distinct`` files, the
   rest links to them, so decoding is not what is measured), with ``--actors`` CPU actors of one thread
   (Ray started with ``--actors`` + 1 CPUs: the engine keeps one for the decode tasks and the driver).
   Images per second of the labeling loop and of the whole call, and the seconds the driver spent
   writing (the manifest's ``write_s``). On 2 cores the actors (decoding, fusion, building rows) and the
   driver share the CPUs: the whole path measures this machine, the driver's part what one driver takes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from datadistill.core.types import Detections
from datadistill.data.label_folder import ShardWriter, TableShardWriter, detections_row, shard_path, shard_schema
from datadistill.models.detector import DetectorLoader, ModelMeta
from datadistill.runtime.io import provenance, write_atomic, write_json_atomic
from datadistill.stages.label import LabelConfig, label
from datadistill.stages.label_ray import output_schema, write_rows
from datadistill.stages.shards import plan_batches

# distinct detections the fake cycles through, chosen by an image's first pixel (so that every engine
# gives an image the same ones, whatever process or batch labels it)
POOL = 16


class FakeDetector:
    """A detector that returns ``boxes`` objects per image at once: a grid of non-overlapping boxes over the
    image (jittered, scores in [0.1, 1), 3 classes) and ``keypoints`` keypoints each, one of :data:`POOL`
    sets chosen by the image's first pixel value. No model runs."""

    def __init__(self, spec: str, *, boxes: int, keypoints: int, size: int) -> None:
        names = tuple(f"kp{i}" for i in range(keypoints))
        self.meta = ModelMeta(model="fake", task="keypoints" if keypoints else "boxes", class_names=("a", "b", "c"),
                              category_ids=(1, 2, 3), keypoint_names=names, flip_index=tuple(range(keypoints)),
                              min_size=size, max_size=size)  # fmt: skip
        self.spec = spec
        self.max_det = boxes
        self.has_heatmaps = False
        self.sets = [_detections(boxes, keypoints, size, seed) for seed in range(POOL)]

    def predict(self, images: list[torch.Tensor]) -> list[Detections]:
        return [self.sets[round(float(image[0, 0, 0]) * 255) % POOL] for image in images]

    def input_size(self, min_size: int, max_size: int) -> Any:
        return nullcontext()

    def heatmaps(self, images: Any, boxes: Any) -> None:
        return None

    def unfit_reason(self, height: int, width: int, *, min_size: int, max_size: int) -> str | None:
        return None


def _detections(boxes: int, keypoints: int, size: int, seed: int) -> Detections:
    """``boxes`` boxes in a grid of cells over a ``size`` px image, each 60-80% of its cell."""
    g = torch.Generator().manual_seed(seed)
    side = int(np.ceil(np.sqrt(boxes)))
    cell = size / side
    ij = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    low = ij[:boxes].float() * cell + torch.rand(boxes, 2, generator=g) * 0.2 * cell
    high = low + (0.6 + 0.2 * torch.rand(boxes, 2, generator=g)) * cell
    kps = None
    if keypoints:
        kps = torch.cat([low[:, None] + torch.rand(boxes, keypoints, 2, generator=g) * (high - low)[:, None],
                         torch.rand(boxes, keypoints, 1, generator=g)], dim=2)  # fmt: skip
    return Detections(boxes=torch.cat([low, high], 1), scores=0.1 + 0.9 * torch.rand(boxes, generator=g),
                      labels=torch.randint(0, 3, (boxes,), generator=g), keypoints=kps)  # fmt: skip


def load_fake(spec: str, *, device: Any = "cpu", min_score: float | None = None, max_det: int | None = None,
              compile: bool = False, boxes: int = 100, keypoints: int = 0, size: int = 32) -> FakeDetector:  # fmt: skip
    return FakeDetector(spec, boxes=boxes, keypoints=keypoints, size=size)


def fake_loader(*, boxes: int, keypoints: int, size: int) -> DetectorLoader:
    """The :class:`~datadistill.models.detector.DetectorLoader` that ``label`` takes, for Ray's actors too
    (this module is pickled by value when it is not ``__main__``: the workers cannot import it by name)."""
    if __name__ != "__main__":
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return partial(load_fake, boxes=boxes, keypoints=keypoints, size=size)


def make_images(folder: Path, *, count: int, distinct: int, size: int) -> Path:
    """``count`` PNGs of ``size`` px in ``folder/images``: ``distinct`` files (first pixel value 0, 1, ...),
    the others links to them; and a stand-in model file ``folder/fake.pt`` (the spec the folder hashes)."""
    images = folder / "images"
    images.mkdir(parents=True)
    for i in range(distinct):
        pixels = np.full((size, size, 3), i % 256, np.uint8)
        Image.fromarray(pixels).save(folder / f"distinct-{i}.png")
    for i in range(count):
        os.symlink(folder / f"distinct-{i % distinct}.png", images / f"{i:07d}.png")
    (folder / "fake.pt").write_bytes(b"a stand-in: bench/ray_writer.py loads a fake detector")
    return images


def actor_tables(*, images: int, batch_size: int, shard_size: int, boxes: int, keypoints: int,
                 size: int) -> list[pa.Table]:  # fmt: skip
    """What the actors send the driver for ``images`` images: one table per forward batch (the engine's
    batches of each shard), rows made as an actor makes them (``detections_row``, ``output_schema``)."""
    schema = output_schema(keypoints)
    tables = []
    for k in range(-(-images // shard_size)):
        count = min(shard_size, images - k * shard_size)
        for batch in plan_batches(count, batch_size):
            rows = []
            for position in batch:
                i = k * shard_size + position
                det = _detections(boxes, keypoints, size, seed=i)
                n = len(det)
                det = Detections(boxes=det.boxes, scores=det.scores, labels=det.labels, keypoints=det.keypoints,
                                 agreement=torch.ones(n, dtype=torch.int64), score_spread=torch.zeros(n),
                                 box_spread=torch.zeros(n))  # fmt: skip
                rows.append({"shard": k, "position": position, "model_s": 0.0, "fusion_s": 0.0,
                             **detections_row(f"{i:07d}.png", size, size, det, keypoints)})  # fmt: skip
            tables.append(pa.Table.from_pylist(rows, schema=schema))
    return tables


def former_write_rows(batch: pa.Table, writer: ShardWriter, timings: dict[str, Any]) -> None:
    """The driver's loop before ``write_rows`` (the reference): every row a Python dict, into ``ShardWriter``."""
    for row in batch.to_pylist():
        k, position = row.pop("shard"), row.pop("position")
        timings["model_s"] += row.pop("model_s")
        timings["fusion_s"] += row.pop("fusion_s")
        if row["error"] is not None:
            logging.getLogger(__name__).warning("skipped %s: %s", row["file_name"], row["error"])
        writer.add(k, position, row)


class FormerShardWriter(ShardWriter):
    """``ShardWriter`` as it wrote before: parquet's dictionary encoding tried on every column."""

    def add(self, shard: int, position: int, row: dict[str, Any]) -> None:
        rows = self.pending.setdefault(shard, {})
        rows[position] = row
        if len(rows) == self.expected[shard]:
            schema = shard_schema(self.num_keypoints)
            table = pa.Table.from_pydict({n: [rows[i].get(n) for i in range(len(rows))] for n in schema.names},
                                         schema=schema)  # fmt: skip
            write_atomic(shard_path(self.out, shard), lambda f: pq.write_table(table, f, compression="zstd"))
            del self.pending[shard]


# The driver's part three ways: the former loop and file options; the former loop into today's ShardWriter
# (only the file options changed); today's (arrow columns into TableShardWriter).
ARMS = ("former", "rows", "arrow")


def drive(tables: list[pa.Table], out: Path, *, arm: str, shard_size: int, keypoints: int) -> float:
    """Seconds for the driver's part: every table through one of :data:`ARMS` into shards in ``out``."""
    images = sum(t.num_rows for t in tables)
    expected = {k: min(shard_size, images - k * shard_size) for k in range(-(-images // shard_size))}
    timings = {"model_s": 0.0, "fusion_s": 0.0}
    t0 = time.perf_counter()
    if arm == "arrow":
        writer: ShardWriter | TableShardWriter = TableShardWriter(out, expected, keypoints)
        for table in tables:
            write_rows(table, writer, timings)
    else:
        writer = (FormerShardWriter if arm == "former" else ShardWriter)(out, expected, keypoints)
        for table in tables:
            former_write_rows(table, writer, timings)
    writer.close()
    return time.perf_counter() - t0


def shard_files(out: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((out / "shards").glob("part-*.parquet"))}


def compare(a: Path, b: Path) -> tuple[bool, bool]:
    """(the same values, the same bytes) of the shards of two folders."""
    fa, fb = shard_files(a), shard_files(b)
    if list(fa) != list(fb) or not fa:
        return False, False
    values = all(pq.read_table(fa[n]).equals(pq.read_table(fb[n]), check_metadata=True) for n in fa)
    return values, all(fa[n].read_bytes() == fb[n].read_bytes() for n in fa)


def driver_part(args: argparse.Namespace, keypoints: int, tmp: Path) -> dict[str, Any]:
    tables = actor_tables(images=args.driver_images, batch_size=args.batch_size, shard_size=args.shard_size,
                          boxes=args.boxes, keypoints=keypoints, size=args.size)  # fmt: skip
    seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}

    def folder(arm: str, r: int) -> Path:
        return tmp / f"driver-{keypoints}-{arm}-{r}"

    for r in range(args.repeat):
        for arm in ARMS:
            seconds[arm].append(drive(tables, folder(arm, r), arm=arm, shard_size=args.shard_size,
                                      keypoints=keypoints))  # fmt: skip
    former = [compare(folder("former", r), folder("arrow", r))[0] for r in range(args.repeat)]
    rows = [compare(folder("rows", r), folder("arrow", r))[1] for r in range(args.repeat)]
    rate = {arm: args.driver_images / statistics.median(s) for arm, s in seconds.items()}
    size = {arm: sum(p.stat().st_size for p in shard_files(folder(arm, 0)).values()) for arm in ARMS}
    return {"images": args.driver_images, "values_per_image": args.boxes * (9 + 3 * keypoints),
            "images_per_s": {arm: round(v) for arm, v in rate.items()},
            "speedup_over_former": round(rate["arrow"] / rate["former"], 2),
            "same_values_as_former": all(former), "same_bytes_as_rows": all(rows),
            "shard_mb": {arm: round(v / 1e6, 2) for arm, v in size.items()},
            "seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()}}  # fmt: skip


def whole_path(args: argparse.Namespace, keypoints: int, tmp: Path) -> dict[str, Any]:
    """``label(engine="ray")`` on the fake detector, in the Ray cluster that :func:`main` started."""
    folder = tmp / f"whole-{keypoints}"
    images = make_images(folder, count=args.images, distinct=args.distinct, size=args.size)
    cfg = LabelConfig(model=str(folder / "fake.pt"), images=str(images), out=str(folder / "labels"), engine="ray",
                      views="identity", keypoint_fuse="mean", batch_size=args.batch_size, shard_size=args.shard_size,
                      threads=1, device="cpu", workers=0)  # fmt: skip
    t0 = time.perf_counter()
    manifest_path = label(cfg, load=fake_loader(boxes=args.boxes, keypoints=keypoints, size=args.size))
    seconds = time.perf_counter() - t0
    manifest = json.loads(manifest_path.read_text())
    timings, counts = manifest["timings"], manifest["counts"]
    if counts["objects"] != args.boxes * args.images:
        raise RuntimeError(f"the fusion kept {counts['objects']} objects, not {args.boxes} per image")
    return {"images": args.images, "actors": timings["processes"], "loop_s": timings["loop_s"],
            "images_per_s_loop": round(args.images / timings["loop_s"]), "call_s": round(seconds, 3),
            "images_per_s_call": round(args.images / seconds), "driver_write_s": timings["write_s"],
            "driver_share_of_loop": round(timings["write_s"] / timings["loop_s"], 3)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", required=True, help="results json")
    p.add_argument("--boxes", type=int, default=100, help="boxes per image (100)")
    p.add_argument("--keypoints", default="0,17", help="keypoints per box, one case each (0,17)")
    p.add_argument("--driver-images", type=int, default=16000, help="images through the driver's part (16000)")
    p.add_argument("--images", type=int, default=16000, help="images through the whole path (16000)")
    p.add_argument("--distinct", type=int, default=POOL, help=f"distinct image files ({POOL})")
    p.add_argument("--size", type=int, default=32, help="image side in px (32)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward batch (32)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (1000, label's default)")
    p.add_argument("--actors", type=int, default=2, help="CPU actors of the whole path (2)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of the driver's part; the median (3)")
    p.add_argument("--skip-whole", action="store_true", help="the driver's part only (no Ray)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cases = [int(k) for k in args.keypoints.split(",")]
    results: dict[str, Any] = {"driver": {}, "whole": {}}
    with tempfile.TemporaryDirectory(prefix="ray-writer-") as tmp:
        for k in cases:
            results["driver"][str(k)] = driver_part(args, k, Path(tmp))
        if not args.skip_whole:
            import ray

            logging.getLogger("ray").setLevel(logging.WARNING)
            ray.init(num_cpus=args.actors + 1, include_dashboard=False, logging_level=logging.WARNING,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})  # fmt: skip
            try:
                for k in cases:
                    results["whole"][str(k)] = whole_path(args, k, Path(tmp))
            finally:
                ray.shutdown()
    command = " ".join(["python", "bench/ray_writer.py", *(sys.argv[1:] if argv is None else argv)])
    results.update(boxes=args.boxes, batch_size=args.batch_size, shard_size=args.shard_size, size=args.size,
                   cpus=os.cpu_count(), provenance=provenance(), command=command)  # fmt: skip
    write_json_atomic(Path(args.out), results, indent=2)
    print(f"driver's part alone ({args.driver_images} images, {args.boxes} boxes each, median of {args.repeat}):")
    print(
        "| keypoints | values/image | former images/s | former loop, today's files | today | speedup | "
        "same values | same bytes as rows |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for k, r in results["driver"].items():
        rate = r["images_per_s"]
        print(
            f"| {k} | {r['values_per_image']:,} | {rate['former']:,} | {rate['rows']:,} | {rate['arrow']:,} | "
            f"{r['speedup_over_former']:.1f}x | {r['same_values_as_former']} | {r['same_bytes_as_rows']} |"
        )
    if results["whole"]:
        print(f"whole `label --engine ray` path ({args.images} images, {args.actors} CPU actors):")
        print("| keypoints | images/s (loop) | images/s (call) | driver writing | of the loop |")
        print("| --- | --- | --- | --- | --- |")
        for k, r in results["whole"].items():
            print(f"| {k} | {r['images_per_s_loop']:,} | {r['images_per_s_call']:,} | {r['driver_write_s']:.2f} s | "
                  f"{100 * r['driver_share_of_loop']:.0f}% |")  # fmt: skip
    checks = [r["same_values_as_former"] and r["same_bytes_as_rows"] for r in results["driver"].values()]
    return 0 if all(checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
