"""Set for the whole test session, before any test module imports transformers or huggingface_hub (which read
these once, at import): nothing may be downloaded in a test. Also the fixture that loads a bench script by path
(bench_script), the one that keeps Ultralytics' settings out of the home folder (ultralytics_home), the data
and models that several modules share, made once per session (shapes, checkpoint, teacher), and a labeling
child that the test kills once it has written some shards (label_killed_after).

A module that needs another variant of the shared data keeps its own fixture under another name
(``cuda_shapes``, ``hf_shapes``...)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def load_bench(name: str):  # noqa: ANN201 (a module)
    """``bench/NAME.py`` as a module (``bench/`` is not a package; its scripts are loaded by path, with
    ``bench/`` on the path for the ``common`` module they share, as ``python bench/NAME.py`` has it)."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "bench"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    path = folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def bench_script():  # noqa: ANN201
    """:func:`load_bench`, for a test: ``bench_script("writer_gil")``."""
    return load_bench


@pytest.fixture(scope="session")
def ultralytics_home(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 (an iterator of a Path)
    """Ultralytics' settings in a temp folder, set before its first import (the import reads it once) and
    kept for the session: a module that imported it after another had set the folder finds it still set."""
    import sys

    folder = tmp_path_factory.mktemp("ultralytics-config")
    saved = os.environ.get("YOLO_CONFIG_DIR")
    if "ultralytics" not in sys.modules:
        os.environ["YOLO_CONFIG_DIR"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("YOLO_CONFIG_DIR", None)
    else:
        os.environ["YOLO_CONFIG_DIR"] = saved


SIZE_PX = 64  # the side of the shared images and the input size of the shared models


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 labeled images of 64 px (seed 0): ``annotations.json`` and ``images/``."""
    from datadistill.data.synth import make_shapes

    return Path(make_shapes(tmp_path_factory.mktemp("shapes"), num_images=8, seed=0, size_px=SIZE_PX)).parent


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained small_fcos (seed 0) of one class, ``blob`` (category 1), at 64 px: ``checkpoint.pt``."""
    import torch

    from datadistill.models import torchvision as models

    torch.manual_seed(0)
    meta = models.ModelMeta(model="small_fcos", task="boxes", class_names=("blob",), category_ids=(1,),
                            keypoint_names=(), flip_index=(), skeleton=(), sigmas=(), min_size=SIZE_PX,
                            max_size=SIZE_PX)  # fmt: skip
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    models.save_checkpoint(path, model=models.build_model(meta), meta=meta)
    return path


@pytest.fixture(scope="session")
def teacher(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained small_fcos (seed 0) for the classes of ``shapes``, at 64 px: it finds some objects, which is
    all labeling needs. ``checkpoint.pt``."""
    import torch

    from datadistill.data.coco import load_coco
    from datadistill.models import torchvision as models

    torch.manual_seed(0)
    meta = models.meta_for("small_fcos", load_coco(shapes / "annotations.json"), min_size=SIZE_PX, max_size=SIZE_PX)
    path = tmp_path_factory.mktemp("teacher") / "checkpoint.pt"
    models.save_checkpoint(path, model=models.build_model(meta), meta=meta)
    return path


def kill_label_after(args: list[str], out: Path, shards: int, *, timeout_s: float = 300.0) -> int:
    """Run ``datadistill label ARGS --out OUT`` in a child process (``tests/slow_label.py pause:N``) until OUT
    holds ``shards`` shards, then SIGKILL it (an event, the child's marker, not a time window: the kill lands mid-run however loaded the
    machine is). Returns the shards written by then (``shards``, or a few more the writer had in hand)."""
    marker = out.parent / f"{out.name}.paused"
    marker.unlink(missing_ok=True)
    log = out.parent / f"{out.name}.stderr"
    with open(log, "wb") as err:
        script = Path(__file__).resolve().parent / "slow_label.py"
        cmd = [sys.executable, str(script), f"pause:{shards}", "label", *args, "--out", str(out)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout_s
        try:
            while not marker.exists():
                if proc.poll() is not None:
                    pytest.fail(f"label exited ({proc.returncode}) before {shards} shards: {log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"label wrote no {shards} shards in {timeout_s:.0f} s: {log.read_text()[-2000:]}")
                time.sleep(0.01)
        finally:
            proc.kill()
            proc.wait()
    return len(list((out / "shards").glob("*.parquet")))


@pytest.fixture
def label_killed_after() -> Callable[..., int]:
    """:func:`kill_label_after`, for a test: ``label_killed_after(args, out, shards)``."""
    return kill_label_after
