"""Kills, full disks and unwritable folders: nothing lost, nothing twice, no partial file a reader could take.

Every stage is killed at each of its writes (mid-write, before the rename, after it) and at random
moments, then run again: the result equals an uninterrupted run's. The long versions are marked slow
(``pytest -m slow tests/reliability``); the default run kills each stage a few times.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from harness import (
    MODES,
    assert_only_complete_files,
    cli,
    disk_full_at_write,
    error_line,
    kill_at_every_write,
    kill_at_random_moments,
    run_in_child,
    temporaries,
)

from datadistill.cli import main

# ---------------------------------------------------------------------------------------------------------
# label


def _label_argv(checkpoint: Path, images: Path, out: Path) -> list[str]:
    return ["label", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out), "--views",
            "identity,hflip", "--shard-size", "3", "--batch-size", "2", "--workers", "0", "--threads", "1",
            "--device", "cpu"]  # fmt: skip


def _labels(out: Path) -> dict[str, Any]:
    """What a labeling folder says: its shards' rows and the manifest's counts (timings aside)."""
    manifest = json.loads((out / "manifest.json").read_text())
    shards = [pq.read_table(p).to_pylist() for p in sorted((out / "shards").glob("part-*.parquet"))]
    return {
        "shards": shards,
        "status": manifest["status"],
        "counts": manifest["counts"],
        "skipped": manifest["skipped"],
    }


@pytest.fixture(scope="module")
def labeled(checkpoint: Path, unlabeled: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted labeling of ``unlabeled`` (12 images, 4 shards)."""
    out = tmp_path_factory.mktemp("reference") / "labels"
    assert cli(*_label_argv(checkpoint, unlabeled, out)).rc == 0  # in this process: the children start warm
    _time_a_warm_run(lambda: main(_label_argv(checkpoint, unlabeled, out.parent / "again")), out)
    return out


def _time_a_warm_run(work: Callable[[], Any], reference: Path) -> None:
    """How long a run takes once warm: random kills land in ``[0, seconds)`` (see :func:`_seconds`)."""
    started = time.monotonic()
    assert run_in_child(work) == 0
    (reference.parent / "seconds").write_text(str(time.monotonic() - started))


def _seconds(reference: Path) -> float:
    return float((reference.parent / "seconds").read_text())


def _check_labels(out: Path) -> None:
    """After a kill: only complete files; a manifest that says complete has every shard."""
    assert_only_complete_files(out)
    manifest = out / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        shards = list((out / "shards").glob("part-*.parquet"))
        assert m["status"] in ("running", "complete") and (m["status"] == "running" or len(shards) == m["num_shards"])


def _same_labels(out: Path, reference: Path) -> None:
    got = _labels(out)
    assert got == _labels(reference)
    names = [row["file_name"] for shard in got["shards"] for row in shard]
    assert len(names) == len(set(names)) == got["counts"]["images"]  # nothing lost, nothing twice
    assert not temporaries(out)


def _kill_label(labeled: Path, checkpoint: Path, unlabeled: Path, out: Path, modes: tuple[str, ...]) -> int:
    argv = _label_argv(checkpoint, unlabeled, out)
    return kill_at_every_write(
        lambda: main(argv),
        reset=lambda: shutil.rmtree(out, ignore_errors=True),
        check=lambda: _check_labels(out),
        finish=lambda: _same_labels(out, labeled),
        modes=modes,
    )


def test_label_killed_before_each_rename_resumes_to_the_same_labels(
    labeled: Path, checkpoint: Path, unlabeled: Path, tmp_path: Path
) -> None:
    assert _kill_label(labeled, checkpoint, unlabeled, tmp_path / "out", ("before-rename",)) == 6


@pytest.mark.slow
def test_label_killed_at_every_write_in_every_way(
    labeled: Path, checkpoint: Path, unlabeled: Path, tmp_path: Path
) -> None:
    assert _kill_label(labeled, checkpoint, unlabeled, tmp_path / "out", MODES) == 18


def _kill_label_at_random(
    labeled: Path, checkpoint: Path, unlabeled: Path, out: Path, kills: int, seed: int
) -> tuple[int, int]:
    argv = _label_argv(checkpoint, unlabeled, out)
    return kill_at_random_moments(
        lambda: main(argv),
        reset=lambda: shutil.rmtree(out, ignore_errors=True),
        check=lambda: _check_labels(out),
        finish=lambda: _same_labels(out, labeled),
        seconds=_seconds(labeled),
        kills=kills,
        seed=seed,
    )


def test_label_killed_at_random_moments(labeled: Path, checkpoint: Path, unlabeled: Path, tmp_path: Path) -> None:
    killed, _ = _kill_label_at_random(labeled, checkpoint, unlabeled, tmp_path / "out", kills=4, seed=0)
    assert killed >= 2


@pytest.mark.slow
def test_label_killed_at_many_random_moments(labeled: Path, checkpoint: Path, unlabeled: Path, tmp_path: Path) -> None:
    killed, trials = _kill_label_at_random(labeled, checkpoint, unlabeled, tmp_path / "out", kills=50, seed=1)
    print(f"label: {killed} kills at random moments in {trials} runs")
    assert killed >= 25


def test_a_full_disk_at_each_label_write_is_one_line_and_the_rerun_completes(
    labeled: Path, checkpoint: Path, unlabeled: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = _label_argv(checkpoint, unlabeled, out)
    for k in range(1, 7):
        shutil.rmtree(out, ignore_errors=True)
        with disk_full_at_write(k):
            error_line(cli(*argv), "cannot write", "No space left on device")
        assert not temporaries(out)
        _check_labels(out)
        assert cli(*argv).rc == 0  # space freed: the same command finishes the job
        _same_labels(out, labeled)


def test_label_on_a_real_full_disk(labeled: Path, checkpoint: Path, unlabeled: Path, tmpfs) -> None:  # noqa: ANN001
    size_kb = sum(p.stat().st_size for p in labeled.rglob("*") if p.is_file()) // 1024
    disk = tmpfs.mount(max(8, size_kb // 2))
    out = disk / "labels"
    argv = _label_argv(checkpoint, unlabeled, out)
    error_line(cli(*argv), "No space left on device")
    _check_labels(out)
    assert not temporaries(out)
    tmpfs.remount(disk, 4 * size_kb + 64)
    assert cli(*argv).rc == 0
    _same_labels(out, labeled)


def test_a_damaged_shard_is_named_and_redone_once_deleted(labeled: Path, shapes: Path, tmp_path: Path) -> None:
    """Atomic writes never leave a partial shard, but a copy or a disk can: every reader names it."""
    out = tmp_path / "labels"
    shutil.copytree(labeled, out)
    shard = out / "shards" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:200])
    select = ("select", "--labels", out, "--reference", shapes / "annotations.json", "--out", tmp_path / "p.json")
    error_line(cli(*select), str(shard), "not a readable label shard", "delete it")
    manifest = json.loads((out / "manifest.json").read_text())
    argv = _label_argv(Path(manifest["options"]["checkpoint"]), Path(manifest["options"]["images"]), out)
    error_line(cli(*argv), str(shard), "not a readable label shard")
    shard.unlink()
    assert cli(*argv).rc == 0
    _same_labels(out, labeled)
    assert cli(*select).rc == 0


# ---------------------------------------------------------------------------------------------------------
# select


def _select_argv(labels: Path, reference: Path, out: Path) -> list[str]:
    return ["select", "--labels", str(labels), "--reference", str(reference), "--out", str(out / "pseudo.json")]


def _selection(out: Path) -> dict[str, Any]:
    report = json.loads((out / "selection.json").read_text())
    for key in ("seconds", "provenance", "options"):
        report.pop(key)
    pseudo = json.loads((out / "pseudo.json").read_text())
    pseudo["info"].pop("description")  # names the labels' folder
    return {"pseudo": pseudo, "selection": report,
            "png": (out / "scores.png").read_bytes()}  # fmt: skip


@pytest.fixture(scope="module")
def selected(labeled: Path, shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "select"
    assert cli(*_select_argv(labeled, shapes / "annotations.json", out)).rc == 0
    return out


@pytest.mark.parametrize("modes", [("before-rename",), pytest.param(MODES, marks=pytest.mark.slow)],
                         ids=["before-rename", "every-way"])  # fmt: skip
def test_select_killed_at_each_write_resumes_to_the_same_pseudo_labels(
    selected: Path, labeled: Path, shapes: Path, tmp_path: Path, modes: tuple[str, ...]
) -> None:
    out = tmp_path / "select"
    argv = _select_argv(labeled, shapes / "annotations.json", out)

    def check() -> None:
        assert_only_complete_files(out)
        # pseudo.json, which marks the stage done for `run`, is written last
        assert not (out / "pseudo.json").exists() or (out / "selection.json").exists()

    def finish() -> None:
        assert _selection(out) == _selection(selected) and not temporaries(out)

    kills = kill_at_every_write(lambda: main(argv), reset=lambda: shutil.rmtree(out, ignore_errors=True),
                                check=check, finish=finish, modes=modes)  # fmt: skip
    assert kills == 4 * len(modes)  # selection.json, scores.png, pseudo.parquet, pseudo.json


def test_a_full_disk_at_each_select_write(selected: Path, labeled: Path, shapes: Path, tmp_path: Path) -> None:
    out = tmp_path / "select"
    argv = _select_argv(labeled, shapes / "annotations.json", out)
    for k in range(1, 5):  # selection.json, scores.png, pseudo.parquet, pseudo.json
        shutil.rmtree(out, ignore_errors=True)
        with disk_full_at_write(k):
            error_line(cli(*argv), "No space left on device")
        assert not temporaries(out) and not (out / "pseudo.json").exists()
        assert cli(*argv).rc == 0
        assert _selection(out) == _selection(selected)


# ---------------------------------------------------------------------------------------------------------
# train


def _train_argv(shapes: Path, out: Path, *extra: str) -> list[str]:
    argv = ["train", "--data", str(shapes / "annotations.json"), "--images", str(shapes / "images"), "--out",
            str(out), "--epochs", "2", "--batch-size", "2", "--min-size", "64", "--max-size", "64", "--threads",
            "1", "--warmup-iters", "2", "--log-every", "1", "--save-every", "1", *extra]  # fmt: skip
    return argv


def _train_or_resume(shapes: Path, out: Path) -> Callable[[], int]:
    """What a user (or `run`) does after a kill: --resume when last.pt exists, else start again."""
    return lambda: main(_train_argv(shapes, out, *(["--resume"] if (out / "last.pt").exists() else [])))


def _training(out: Path) -> dict[str, Any]:
    state = torch.load(out / "checkpoint.pt", weights_only=True)["state_dict"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("it_s", None)
        line.pop("time_s", None)
    config = yaml.safe_load((out / "config.yaml").read_text())
    config.pop("out")
    return {"state": state, "metrics": lines, "config": config}


def _same_training(out: Path, reference: Path) -> None:
    got, want = _training(out), _training(reference)
    assert got["state"].keys() == want["state"].keys()
    for key in want["state"]:
        assert torch.equal(got["state"][key], want["state"][key]), key
    assert got["metrics"] == want["metrics"] and got["config"] == want["config"]
    assert (out / "timings.json").exists() and not temporaries(out)


def _check_training(out: Path) -> None:
    assert_only_complete_files(out)
    if (out / "checkpoint.pt").exists():  # a finished run has all its files
        assert (out / "timings.json").exists() and (out / "last.pt").exists()


@pytest.fixture(scope="module")
def trained(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "train"
    assert cli(*_train_argv(shapes, out)).rc == 0
    _time_a_warm_run(lambda: main(_train_argv(shapes, out.parent / "again")), out)
    return out


def _kill_train(trained: Path, shapes: Path, out: Path, modes: tuple[str, ...]) -> int:
    return kill_at_every_write(
        _train_or_resume(shapes, out),
        reset=lambda: shutil.rmtree(out, ignore_errors=True),
        check=lambda: _check_training(out),
        finish=lambda: _same_training(out, trained),
        modes=modes,
    )


@pytest.mark.slow
def test_train_killed_at_every_write_in_every_way(trained: Path, shapes: Path, tmp_path: Path) -> None:
    # 14 writes: config.yaml, provenance.json, 2 x (3 step lines + 1 epoch line), 2 x last.pt, timings.json,
    # checkpoint.pt
    assert _kill_train(trained, shapes, tmp_path / "out", MODES) == 3 * 14


def _kill_train_at_random(trained: Path, shapes: Path, out: Path, kills: int, seed: int) -> tuple[int, int]:
    return kill_at_random_moments(
        _train_or_resume(shapes, out),
        reset=lambda: shutil.rmtree(out, ignore_errors=True),
        check=lambda: _check_training(out),
        finish=lambda: _same_training(out, trained),
        seconds=_seconds(trained),
        kills=kills,
        seed=seed,
    )


def test_train_killed_at_random_moments(trained: Path, shapes: Path, tmp_path: Path) -> None:
    killed, _ = _kill_train_at_random(trained, shapes, tmp_path / "out", kills=3, seed=0)
    assert killed >= 2


@pytest.mark.slow
def test_train_killed_at_many_random_moments(trained: Path, shapes: Path, tmp_path: Path) -> None:
    killed, trials = _kill_train_at_random(trained, shapes, tmp_path / "out", kills=40, seed=1)
    print(f"train: {killed} kills at random moments in {trials} runs")
    assert killed >= 20


@pytest.mark.slow
def test_a_full_disk_at_each_train_write(trained: Path, shapes: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for k in range(1, 7):  # config.yaml, provenance.json, last.pt x 2, timings.json, checkpoint.pt
        shutil.rmtree(out, ignore_errors=True)
        with disk_full_at_write(k):
            error_line(cli(*_train_argv(shapes, out)), "No space left on device")
        _check_training(out)
        assert not temporaries(out) and not (out / "checkpoint.pt").exists()
        assert run_in_child(_train_or_resume(shapes, out)) == 0
        _same_training(out, trained)


@pytest.mark.slow
def test_train_on_a_real_full_disk(trained: Path, shapes: Path, tmpfs) -> None:  # noqa: ANN001
    """last.pt of epoch 1 fits; epoch 2's does not (its temporary file sits beside the old one)."""
    last_kb = (trained / "last.pt").stat().st_size // 1024
    disk = tmpfs.mount(int(last_kb * 1.6))
    out = disk / "train"
    error_line(cli(*_train_argv(shapes, out)), "cannot write", "No space left on device")
    _check_training(out)
    assert not temporaries(out) and torch.load(out / "last.pt", weights_only=True)["extra"]["epoch"] == 1
    tmpfs.remount(disk, last_kb * 4)
    assert cli(*_train_argv(shapes, out, "--resume")).rc == 0
    _same_training(out, trained)


# ---------------------------------------------------------------------------------------------------------
# an output folder that cannot be written


def test_an_unwritable_output_folder_is_one_line_and_nothing_is_written(
    shapes: Path, checkpoint: Path, labeled: Path, unlabeled: Path, tmp_path: Path, tmpfs
) -> None:  # noqa: ANN001
    import os

    if os.geteuid() == 0:  # root writes through permissions: a read-only file system stops it
        folder = tmpfs.mount(64, readonly=True)
    else:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
    data, images = shapes / "annotations.json", shapes / "images"
    config = tmp_path / "run.yaml"
    config.write_text(
        json.dumps({"data": {"train": str(data), "train_images": str(images), "unlabeled": str(unlabeled)}})
    )
    commands = {
        "synth": ("synth", "shapes", "--out", folder / "synth", "--images", "2", "--size", "64"),
        "train": ("train", "--data", data, "--images", images, "--out", folder / "t", "--batch-size", "2"),
        "label": tuple(_label_argv(checkpoint, unlabeled, folder / "l")),
        "select": ("select", "--labels", labeled, "--reference", data, "--out", folder / "p.json"),
        "evaluate": ("evaluate", "--data", data, "--checkpoint", checkpoint, "--images", images, "--out",
                     folder / "m.json", "--threads", "1"),
        "convert": ("convert", data, folder / "yolo", "--to", "yolo", "--images", images),
        "run": ("run", config, "--out", folder / "run"),
        "report": ("report", folder),
    }  # fmt: skip
    for name, argv in commands.items():
        line = error_line(cli(*argv), str(folder))
        assert "Read-only file system" in line or "Permission denied" in line, (name, line)
    assert list(folder.iterdir()) == []
    if os.geteuid() != 0:
        folder.chmod(0o700)


# ---------------------------------------------------------------------------------------------------------
# run: the whole method in one folder

RUN_CONFIG = """
data:
  train: data/labeled.json
  train_images: data/images
  unlabeled: data/unlabeled.json
  unlabeled_images: data/images
  val: data/val.json
  val_images: data/images
teacher: {epochs: 2, batch_size: 4}
student: {epochs: 2, batch_size: 5}
label: {views: "identity,hflip", shard_size: 4, batch_size: 4}
device: cpu
threads: 1
workers: 0
teacher_check: false  # teachers of seconds are weak: these tests are about the pipeline
"""


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted ``run`` on 8 labeled, 12 unlabeled and 6 validation images of 64 px."""
    from datadistill.demo import DemoPlan, make_demo_data

    root = tmp_path_factory.mktemp("reference")
    plan = DemoPlan(labeled=8, unlabeled=12, val=6, size_px=64, teacher_epochs=2, student_epochs=2, batch_size=4,
                    views="identity,hflip")  # fmt: skip
    make_demo_data(root / "data", task="boxes", plan=plan, seed=3)
    (root / "config.yaml").write_text(RUN_CONFIG)
    assert cli("run", root / "config.yaml", "--out", root / "run").rc == 0
    _time_a_warm_run(lambda: main(["run", str(root / "config.yaml"), "--out", str(root / "again")]), root / "run")
    return root / "run"


def _run_results(out: Path) -> dict[str, Any]:
    """What a run folder holds, but for timings, paths and provenance."""
    results: dict[str, Any] = {}
    for name in ("teacher", "round-1/student"):
        results[name] = _training(out / name)
        results[name]["eval"] = json.loads((out / name / "eval" / "metrics.json").read_text())
    results["labels"] = _labels(out / "round-1" / "label")
    results["select"] = _selection(out / "round-1" / "select")
    return results


def _same_run(out: Path, reference: Path) -> None:
    got, want = _run_results(out), _run_results(reference)
    for name in ("teacher", "round-1/student"):
        for key in want[name]["state"]:
            assert torch.equal(got[name]["state"][key], want[name]["state"][key]), (name, key)
        assert got[name]["metrics"] == want[name]["metrics"] and got[name]["eval"] == want[name]["eval"], name
    assert got["labels"] == want["labels"] and got["select"] == want["select"]
    assert (out / "report.html").exists() and (out / "round-1" / "label" / ".complete").exists()
    assert not temporaries(out)


@pytest.mark.slow
def test_run_killed_at_every_write_in_every_way(ran: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["run", str(ran.parent / "config.yaml"), "--out", str(out)]
    kills = kill_at_every_write(
        lambda: main(argv),
        reset=lambda: shutil.rmtree(out, ignore_errors=True),
        check=lambda: assert_only_complete_files(out),
        finish=lambda: _same_run(out, ran),
    )
    print(f"run: {kills} kills, one at each write in each way")
    assert kills >= 3 * 30


@pytest.mark.slow
def test_run_killed_at_many_random_moments(ran: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["run", str(ran.parent / "config.yaml"), "--out", str(out)]
    killed, trials = kill_at_random_moments(
        lambda: main(argv),
        reset=lambda: shutil.rmtree(out, ignore_errors=True),
        check=lambda: assert_only_complete_files(out),
        finish=lambda: _same_run(out, ran),
        seconds=_seconds(ran),
        kills=30,
        seed=2,
    )
    print(f"run: {killed} kills at random moments in {trials} runs")
    assert killed >= 15


def test_a_full_disk_inside_torch_save_is_one_line(tmp_path: Path) -> None:
    """torch's zip writer meets ENOSPC with a RuntimeError ("unexpected pos") raised while handling it; a
    full disk as a checkpoint is written must still be a one-line error, with no temporary file left."""
    import errno

    from datadistill.errors import UserError
    from datadistill.runtime.io import write_atomic

    class FillsUp:
        def __init__(self, f: Any, room: int) -> None:
            self.f, self.room = f, room

        def write(self, data: bytes) -> int:
            self.room -= len(data)
            if self.room < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def flush(self) -> None:
            self.f.flush()

    with pytest.raises(UserError, match=r"^cannot write .*last\.pt: No space left on device$"):
        write_atomic(tmp_path / "last.pt", lambda f: torch.save({"w": torch.zeros(100_000)}, FillsUp(f, 50_000)))
    assert list(tmp_path.iterdir()) == []
