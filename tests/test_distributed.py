"""Several processes: torchrun training (DDP on gloo) and labeling, and the Ray engine, on tiny data on a CPU.

Each run is a real ``python -m torch.distributed.run --standalone --nproc_per_node 2`` (or a real local Ray
cluster) in a child process; the oracle is the one-process result: the same weights after a killed and
resumed run, the same label shards whatever the engine and wherever a killed run resumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from datadistill.errors import UserError
from datadistill.models import torchvision as models
from datadistill.models.detector import model_files, single_file
from datadistill.runtime.distributed import Launch, launch_from_env, rank_device
from datadistill.stages.label import LabelConfig, label
from datadistill.stages.shards import plan_batches
from slow_label import SCRIPT as SLOW_LABEL

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups and SIGKILL semantics")

SIZE_PX = 64
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


# ---------------------------------------------------------------------------------------------------
# pure parts


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, Launch(0, 1, 0)),  # a plain process
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, Launch(3, 4, 1)),  # second machine of two
        ({"RANK": "1", "WORLD_SIZE": "2"}, Launch(1, 2, 1)),  # no LOCAL_RANK: the rank
    ],
)
def test_launch_is_read_from_torchruns_variables(environ: dict[str, str], expected: Launch) -> None:
    assert launch_from_env(environ) == expected


@pytest.mark.parametrize(
    "environ",
    [
        {"RANK": "2", "WORLD_SIZE": "2"},  # rank past the end
        {"RANK": "0", "WORLD_SIZE": "0"},  # no processes
        {"RANK": "x", "WORLD_SIZE": "2"},  # not a number
    ],
)
def test_malformed_torchrun_variables_are_one_line_errors(environ: dict[str, str]) -> None:
    with pytest.raises(UserError, match="RANK"):
        launch_from_env(environ)


def test_each_rank_takes_the_gpu_of_its_local_rank() -> None:
    cpu = torch.device("cpu")
    assert rank_device(cpu, Launch(1, 2, 1)) == cpu
    assert rank_device(torch.device("cuda", 0), Launch(0, 1, 0)) == torch.device("cuda", 0)  # one process: as asked
    with pytest.raises(UserError, match="uses the GPU of its LOCAL_RANK"):
        rank_device(torch.device("cuda", 1), Launch(0, 2, 0))
    if torch.cuda.device_count() < 2:
        with pytest.raises(UserError, match="LOCAL_RANK 1 has no GPU"):
            rank_device(torch.device("cuda"), Launch(1, 2, 1))


@pytest.mark.parametrize(
    ("num_images", "batch_size", "expected"),
    [
        (5, 2, [(0, 2), (2, 4), (4, 5)]),  # the last batch is shorter
        (4, 2, [(0, 2), (2, 4)]),  # exact
        (1, 8, [(0, 1)]),  # a shard smaller than a batch
        (0, 3, []),  # nothing
    ],
)
def test_batches_never_cross_a_shard(num_images: int, batch_size: int, expected: list[tuple[int, int]]) -> None:
    assert [(b.start, b.stop) for b in plan_batches(num_images, batch_size)] == expected


# ---------------------------------------------------------------------------------------------------
# helpers


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _kill_everything(proc: subprocess.Popen) -> None:
    """SIGKILL a child started in its own session, with its process group and torchrun's workers (which
    torchrun starts in sessions of their own) and theirs."""
    workers = _children(proc.pid)
    for group in (proc.pid, *workers):
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    for pid in workers:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def _run(cmd: list[str], *, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _wait_for(condition: Any, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


def _tables(out: Path) -> dict[str, list[dict]]:
    return {p.name: pq.read_table(p).to_pylist() for p in sorted((out / "shards").glob("part-*.parquet"))}


def _assert_same_labels(got: Path, want: Path) -> None:
    """The same shards, images and objects; boxes and scores within 1e-4."""
    a, b = _tables(got), _tables(want)
    assert list(a) == list(b)
    for name in a:
        assert [r["file_name"] for r in a[name]] == [r["file_name"] for r in b[name]], name
        for ra, rb in zip(a[name], b[name], strict=True):
            exact = ("width", "height", "labels", "agreement", "error")
            assert {k: ra[k] for k in exact} == {k: rb[k] for k in exact}, ra["file_name"]
            for key in ("boxes", "scores"):
                np.testing.assert_allclose(ra[key], rb[key], atol=1e-4, rtol=0, err_msg=f"{ra['file_name']} {key}")
    assert not list(got.rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------------
# training


def _train_args(shapes: Path, out: Path) -> list[str]:
    data = str(shapes / "annotations.json")
    return ["train", "--data", data, "--images", str(shapes / "images"), "--out", str(out), "--epochs", "2",
            "--batch-size", "2", "--min-size", str(SIZE_PX), "--max-size", str(SIZE_PX), "--warmup-iters", "2",
            "--log-every", "1", "--save-every", "1", "--threads", "1", "--device", "cpu", "--val", data]  # fmt: skip


# Under torchrun: rank 0 stops for good in the first iteration of epoch 2, after last.pt of epoch 1 is written
# (and says so in a file). The seam: train_loop runs the losses of the LoopBackend it is given; the config is
# parsed as the CLI parses it.
_STOP_AFTER_EPOCH_1 = """
import dataclasses, sys, time
from pathlib import Path
from datadistill.cli import build_parser
from datadistill.config import TrainConfig
from datadistill.models import torchvision as models
from datadistill.runtime.distributed import launch_from_env
from datadistill.stages.train import train_loop

calls = 0

def losses(model, images, targets):
    global calls
    calls += 1
    if calls == 3 and launch_from_env().is_main:  # 2 iterations per epoch
        Path(sys.argv[1]).write_text("epoch 1 saved")
        time.sleep(600)
    return models.losses(model, images, targets)

args = build_parser().parse_args(sys.argv[2:])
cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)})
train_loop(cfg, dataclasses.replace(models.LOOP, losses=losses))
"""


def _lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_training_writes_once_and_resumes_after_sigkill_to_the_same_weights(
    shapes: Path, tmp_path: Path
) -> None:
    whole = tmp_path / "whole"
    done = _run([*TORCHRUN, "-m", "datadistill", *_train_args(shapes, whole)])
    assert done.stdout.count("wrote") == 1  # rank 0 speaks for both
    assert sorted(p.name for p in whole.iterdir()) == [
        "checkpoint.pt", "config.yaml", "last.pt", "metrics.jsonl", "provenance.json", "timings.json",
    ]  # fmt: skip
    lines = _lines(whole)
    steps = [(line["epoch"], line["iteration"]) for line in lines if line["type"] == "step"]
    assert steps == [(1, 1), (1, 2), (2, 3), (2, 4)]  # 8 images / (2 ranks x 2): one line per step, not per rank
    epochs = [line for line in lines if line["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all("bbox" in e["val"] for e in epochs)
    last = models.read_checkpoint(whole / "last.pt")["extra"]
    assert last["world_size"] == 2 and len(last["rng_ranks"]) == 2

    killed, marker = tmp_path / "killed", tmp_path / "epoch-1-saved"
    script = tmp_path / "stop_after_epoch_1.py"
    script.write_text(_STOP_AFTER_EPOCH_1)
    cmd = [*TORCHRUN, str(script), str(marker), *_train_args(shapes, killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(marker.exists, proc, "last.pt of epoch 1")
    finally:
        _kill_everything(proc)
    assert not (killed / "checkpoint.pt").exists()
    assert models.read_checkpoint(killed / "last.pt")["extra"]["epoch"] == 1

    one = subprocess.run([sys.executable, "-m", "datadistill", *_train_args(shapes, killed), "--resume"],
                         capture_output=True, text=True)  # fmt: skip
    assert one.returncode == 1 and "started with 2 process(es) and this is 1" in one.stderr
    _run([*TORCHRUN, "-m", "datadistill", *_train_args(shapes, killed), "--resume"])
    a = models.read_checkpoint(killed / "checkpoint.pt")["state_dict"]
    b = models.read_checkpoint(whole / "checkpoint.pt")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    drop = ("it_s", "time_s")
    assert [{k: v for k, v in line.items() if k not in drop} for line in _lines(killed)] == [
        {k: v for k, v in line.items() if k not in drop} for line in lines
    ]


# ---------------------------------------------------------------------------------------------------
# labeling


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """17 images of different sizes (so a batch's padding matters) and one broken file: 6 shards of 3."""
    root = tmp_path_factory.mktemp("unlabeled")
    rng = np.random.default_rng(0)
    for i in range(17):
        Image.fromarray(rng.integers(0, 255, (40 + 3 * i, 64, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    (root / "007b.png").write_bytes(b"not a png")
    return root


LABEL_OPTIONS = {"views": "identity,hflip", "batch_size": 2, "shard_size": 3, "workers": 0, "threads": 1,
                 "device": "cpu"}  # fmt: skip


@pytest.fixture(scope="module")
def reference(checkpoint: Path, unlabeled: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The labels of one process with the local engine."""
    out = tmp_path_factory.mktemp("reference") / "labels"
    label(LabelConfig(checkpoint=str(checkpoint), images=str(unlabeled), out=str(out), **LABEL_OPTIONS))
    assert len(_tables(out)) == 6
    return out


def _label_args(checkpoint: Path, unlabeled: Path, out: Path, **overrides: str) -> list[str]:
    options = {**{k: str(v) for k, v in LABEL_OPTIONS.items()}, **overrides}
    args = ["label", "--checkpoint", str(checkpoint), "--images", str(unlabeled), "--out", str(out)]
    for key, value in options.items():
        args += ["--" + key.replace("_", "-"), value]
    return args


def _kill_after_shards(cmd: list[str], out: Path, count: int) -> dict[str, int]:
    """Start ``cmd``, SIGKILL everything it started once ``count`` shards exist; the shards left, with
    their modification times."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: len(list((out / "shards").glob("part-*.parquet"))) >= count, proc, f"{count} shards")
    finally:
        _kill_everything(proc)
    return {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("part-*.parquet")}


def _assert_resumed(out: Path, before: dict[str, int]) -> None:
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("part-*.parquet")}
    assert {name: after[name] for name in before} == before  # finished shards were not labeled again
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert (manifest["counts"]["images"], manifest["counts"]["skipped"]) == (18, 1)


def test_torchrun_labeling_gives_the_one_process_labels_and_resumes_after_sigkill(
    checkpoint: Path, unlabeled: Path, reference: Path, tmp_path: Path
) -> None:
    whole = tmp_path / "whole"
    done = _run([*TORCHRUN, "-m", "datadistill", *_label_args(checkpoint, unlabeled, whole)])
    assert done.stdout.count("wrote") == 1
    _assert_same_labels(whole, reference)
    manifest = json.loads((whole / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["timings"]["processes"] == 2
    assert manifest["counts"] == json.loads((reference / "manifest.json").read_text())["counts"]

    killed = tmp_path / "killed"
    # forward passes 200 ms longer, so that the kill lands mid-run (tests/slow_label.py)
    before = _kill_after_shards([*TORCHRUN, str(SLOW_LABEL), "0.2", *_label_args(checkpoint, unlabeled, killed)],
                                killed, 2)  # fmt: skip
    assert 2 <= len(before) < 6
    _run([*TORCHRUN, "-m", "datadistill", *_label_args(checkpoint, unlabeled, killed)])
    _assert_same_labels(killed, reference)
    _assert_resumed(killed, before)

    other = subprocess.run([*TORCHRUN, "-m", "datadistill", *_label_args(checkpoint, unlabeled, killed, views="identity")],
                           capture_output=True, text=True)  # fmt: skip
    assert other.returncode != 0 and "holds labels made with another views" in other.stderr
    _assert_same_labels(killed, reference)  # and nothing was touched


@pytest.mark.slow  # 40 s of two Ray starts; the default run keeps the Ray engine's bytes (the next test)
def test_ray_engine_gives_the_local_labels_and_resumes_after_sigkill(
    checkpoint: Path, unlabeled: Path, reference: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ray", reason="the Ray engine is optional: pip install 'datadistill[ray]'")
    out = tmp_path / "ray"
    args = _label_args(checkpoint, unlabeled, out, engine="ray")
    before = _kill_after_shards([sys.executable, str(SLOW_LABEL), "0.2", *args], out, 1)  # tests/slow_label.py
    assert 1 <= len(before) < 6
    done = _run([sys.executable, "-m", "datadistill", *args])
    assert "wrote" in done.stdout
    _assert_same_labels(out, reference)
    _assert_resumed(out, before)
    assert json.loads((out / "manifest.json").read_text())["timings"]["engine"] == "ray"


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("part-*.parquet"))}


def test_ray_driver_writes_the_local_engines_bytes_and_labels_a_missing_shard_again(
    tmp_path: Path, bench_script: Callable[[str], ModuleType]
) -> None:
    """bench/ray_writer.py's fake detector (100 boxes of 17 keypoints per image) under two views, given to
    ``label`` for the driver and the actors: the Ray engine's shards, gathered as arrow columns by its driver,
    are the local engine's byte for byte; a shard deleted after the run is labeled again by the next run,
    which touches no other shard."""
    pytest.importorskip("ray", reason="the Ray engine is optional: pip install 'datadistill[ray]'")
    import ray

    bench = bench_script("ray_writer")
    images = bench.make_images(tmp_path / "data", count=23, distinct=5, size=32)
    (images / "0000007b.png").write_bytes(b"not a png")  # an error row
    load = bench.fake_loader(boxes=100, keypoints=17, size=32)
    options = {"model": str(tmp_path / "data" / "fake.pt"), "images": str(images), "views": "identity,hflip",
               "keypoint_fuse": "mean", "batch_size": 4, "shard_size": 5, "threads": 1, "device": "cpu",
               "workers": 0}  # fmt: skip
    label(LabelConfig(out=str(tmp_path / "local"), **options), load=load)
    local = _shard_bytes(tmp_path / "local")
    assert len(local) == 5
    out = tmp_path / "ray"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        label(LabelConfig(out=str(out), engine="ray", **options), load=load)
        assert _shard_bytes(out) == local
        manifest = json.loads((out / "manifest.json").read_text())
        assert (manifest["counts"]["images"], manifest["counts"]["skipped"]) == (24, 1)
        assert manifest["counts"]["objects"] > 100 * 23
        assert manifest["timings"]["engine"] == "ray" and manifest["timings"]["write_s"] > 0

        before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("part-*.parquet")}
        (out / "shards" / "part-00002.parquet").unlink()
        label(LabelConfig(out=str(out), engine="ray", **options), load=load)
    finally:
        ray.shutdown()
    assert _shard_bytes(out) == local
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("part-*.parquet")}
    assert {n: t for n, t in after.items() if n != "part-00002.parquet"} == {
        n: t for n, t in before.items() if n != "part-00002.parquet"
    }
    assert after["part-00002.parquet"] != before["part-00002.parquet"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["timings"]["images_labeled_now"] == 5


def test_a_checkpoint_ships_as_its_one_file_under_its_own_name(checkpoint: Path, tmp_path: Path) -> None:
    for spec in (str(checkpoint), str(checkpoint.parent)):  # the file, or the training folder that holds it
        shipped = model_files(spec)
        assert [(name, path.resolve()) for name, path in shipped.files] == [("checkpoint.pt", checkpoint.resolve())]
        assert shipped.spec_in(tmp_path) == str(tmp_path / "checkpoint.pt")
    assert single_file("yolo:/w/best.pt", Path("/w/best.pt")).spec_in("/copies") == "yolo:/copies/best.pt"


def test_ray_actors_label_an_hf_model_and_its_prompts_from_shipped_copies(
    unlabeled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiny RT-DETR folder, then an OWL-ViT teacher with prompts and classes files: the Ray engine gives the
    local engine's shards, though the model folder and the option files are moved away once the driver has
    shipped them, before any actor loads (so the actors can only have read the copies)."""
    pytest.importorskip("ray", reason="the Ray engine is optional: pip install 'datadistill[ray]'")
    tiny = pytest.importorskip("test_hf", reason="needs the hf extra (transformers)")  # its offline model writers
    import ray
    import ray.data

    from datadistill.models.detector import with_label_options

    rtdetr = tiny.write_rtdetr(tmp_path / "rtdetr", ("spot", "blob"))
    classes, prompts = tmp_path / "classes.json", tmp_path / "prompts.yaml"
    classes.write_text(json.dumps({"images": [], "annotations": [], "categories": [
        {"id": 3, "name": "blob"}, {"id": 9, "name": "spot"}]}))  # fmt: skip
    prompts.write_text("blob: [a blob, a round spot]\n")
    owl = tiny.write_owlvit(tmp_path / "owlvit")
    runs = {"rtdetr": (f"hf:{rtdetr}", [rtdetr]),
            "owlvit": (with_label_options(f"hf:{owl}", classes=str(classes), prompts=str(prompts)),
                       [owl, classes, prompts])}  # fmt: skip
    options = {**LABEL_OPTIONS, "allow_weak_teacher": True}
    for name, (spec, _) in runs.items():
        label(LabelConfig(model=spec, images=str(unlabeled), out=str(tmp_path / "local" / name), **options))

    hidden: list[Path] = []
    iter_batches = ray.data.Dataset.iter_batches

    def hide_then_iterate(self: Any, *args: Any, **kwargs: Any) -> Any:  # the pipeline starts, actors with it
        for path in to_hide:
            hidden.append(path.rename(path.with_name(path.name + ".away")))
        return iter_batches(self, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", hide_then_iterate)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        for name, (spec, to_hide) in runs.items():
            out = tmp_path / "ray" / name
            label(LabelConfig(model=spec, images=str(unlabeled), out=str(out), engine="ray", **options))
            assert not any(p.exists() for p in to_hide)
            manifest = json.loads((out / "manifest.json").read_text())
            assert (manifest["timings"]["engine"], manifest["config"]["checkpoint"]) == ("ray", spec)
            assert sum(len(r["scores"]) for rows in _tables(out).values() for r in rows) > 0
            _assert_same_labels(out, tmp_path / "local" / name)
    finally:
        ray.shutdown()
    assert len(hidden) == 4
