"""Set for the whole test session, before any test module imports transformers or huggingface_hub (which read
these once, at import): nothing may be downloaded in a test. Also the fixture that loads a bench script by path
(bench_script) and the one that keeps Ultralytics' settings out of the home folder (ultralytics_home)."""

from __future__ import annotations

import os

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
