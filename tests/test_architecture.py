"""The shape of the package, checked on its source (``ast``, nothing imported).

- no module uses another's private (``_name``) functions: by ``from datadistill.x import _f`` or by
  ``m._f`` on a name bound to a datadistill import (what two modules share gets a public name and a home);
- no function or method is longer than :data:`MAX_FUNCTION_LINES` lines;
- model specs (``"yolo:..."``, ``"hf:..."``) are parsed only in ``datadistill/models/``, and a backend is
  reached only through ``datadistill.models.detector``: nothing outside ``models/`` imports
  ``datadistill.models.ultralytics``;
- imports point down (:data:`LAYERS`: core < data < models < stages < run < demo < cli, with errors, config
  and runtime below models), function-level and ``TYPE_CHECKING`` imports counted too: a backend never calls
  a stage, a stage never calls ``run``;
- loading a YOLO model, or the train stage, imports no torchvision builder (``models/torchvision.py``,
  ``models/zoo.py``).

Each check runs once per source file (the test id names the file) and lists every offence as
``path:line: what``. The ``test_*_catches_*`` tests plant an offence in a code string, so a checker that
finds nothing cannot pass unnoticed.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "datadistill"
MAX_FUNCTION_LINES = 100
SPEC_PREFIXES = ("yolo:", "hf:")
SPEC_METHODS = ("startswith", "removeprefix")
BACKEND_MODULES = ("datadistill.models.ultralytics",)
# Files (relative to src/datadistill) outside models/ allowed to import a backend module. Keep it empty.
BACKEND_IMPORT_ALLOWED: frozenset[str] = frozenset()

# The layers of the package, lowest first: a module may import from its own part (the first name after
# ``datadistill.``) and from parts of a lower layer, never from a part of its own layer or above.
LAYERS: dict[str, int] = {
    "__init__": 0,  # the package itself (__version__)
    "errors": 0,
    "core": 1,  # pure code
    "config": 1,  # stage options, no torch
    "runtime": 2,  # devices, distributed, atomic io
    "data": 3,
    "layout": 3,  # where a run's stages write
    "models": 4,
    "stages": 5,
    "run": 6,
    "demo": 7,
    "cli": 8,
    "__main__": 9,
}

Offence = tuple[int, str]  # (line, what)


def _source_files() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(SRC).as_posix()


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _module_name(rel: str) -> str:
    """``stages/label.py`` -> ``datadistill.stages.label`` (``stages/__init__.py`` -> ``datadistill.stages.__init__``,
    so that relative imports resolve the same way in both)."""
    return ".".join(["datadistill", *rel.removesuffix(".py").split("/")])


def _absolute(node: ast.ImportFrom, module: str) -> str:
    """The absolute module of ``from X import ...`` (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    package = module.split(".")
    base = package[: len(package) - node.level]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name: str) -> bool:
    """``_name``, not ``__dunder__``."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_ours(module: str) -> bool:
    return module == "datadistill" or module.startswith("datadistill.")


# ----------------------------------------------------------------------------------------------------
# checkers: (tree, module name) -> offences


def private_imports(tree: ast.Module, module: str = "datadistill.x") -> list[Offence]:
    """``from datadistill.x import _f``, anywhere in the file (function-level imports too)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _is_ours(_absolute(node, module)):
            for alias in node.names:
                if _is_private(alias.name):
                    out.append((node.lineno, f"imports private {alias.name} from {_absolute(node, module)}"))
    return out


def _import_bindings(tree: ast.Module, module: str) -> dict[str, str]:
    """Names bound by importing from datadistill: ``import datadistill.x as m`` (m), ``import
    datadistill.x`` (datadistill), ``from datadistill.x import y [as z]`` (y or z); each to what it names."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_ours(alias.name) and alias.asname:
                    bound[alias.asname] = alias.name
                elif _is_ours(alias.name):
                    bound["datadistill"] = "datadistill"
        elif isinstance(node, ast.ImportFrom) and _is_ours(_absolute(node, module)):
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{_absolute(node, module)}.{alias.name}"
    return bound


def private_attributes(tree: ast.Module, module: str = "datadistill.x") -> list[Offence]:
    """``m._f`` (or ``datadistill.x._f``) where ``m`` is bound by importing from datadistill."""
    bound = _import_bindings(tree, module)
    out = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
            continue
        root = node.value
        while isinstance(root, ast.Attribute):
            root = root.value
        if isinstance(root, ast.Name) and root.id in bound:
            out.append((node.lineno, f"uses private {ast.unparse(node)} ({root.id} is {bound[root.id]})"))
    return out


def long_functions(tree: ast.Module, module: str = "datadistill.x") -> list[Offence]:
    """Functions and methods (nested ones too) longer than :data:`MAX_FUNCTION_LINES`, decorators excluded."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                out.append((node.lineno, f"{node.name} is {length} lines (at most {MAX_FUNCTION_LINES})"))
    return out


def _string_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "text"`` assignments, so that ``s.startswith(PREFIX)`` is seen through."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Constant):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and isinstance(node.value.value, str):
                    out[target.id] = node.value.value
    return out


def _spec_prefix(node: ast.expr, names: dict[str, str]) -> str | None:
    """The spec prefix that a string literal starts with, or that a module constant is (``PREFIX = "yolo:"``);
    in a tuple, list or set of them too. None when there is none."""
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return next((p for p in (_spec_prefix(e, names) for e in node.elts) if p), None)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return next((p for p in SPEC_PREFIXES if node.value.startswith(p)), None)
    if isinstance(node, ast.Name) and names.get(node.id) in SPEC_PREFIXES:
        return names[node.id]
    return None


def spec_parsing(tree: ast.Module, module: str = "datadistill.x") -> list[Offence]:
    """``s.startswith("yolo:")``, ``s.removeprefix("hf:")``, ``s[:5] == "yolo:"``, ``"hf:" in s`` and alike."""
    names = _string_constants(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SPEC_METHODS:
            prefix = next((p for p in (_spec_prefix(a, names) for a in node.args) if p), None)
            if prefix:
                out.append((node.lineno, f"parses a model spec: .{node.func.attr}({prefix!r}...)"))
        elif isinstance(node, ast.Compare):
            prefix = next((p for p in (_spec_prefix(e, names) for e in (node.left, *node.comparators)) if p), None)
            if prefix:
                out.append((node.lineno, f"parses a model spec: compares with {prefix!r}..."))
    return out


def backend_imports(tree: ast.Module, module: str = "datadistill.x") -> list[Offence]:
    """Imports of a backend module (``datadistill.models.ultralytics``), in any spelling."""
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            if func in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                names = [str(node.args[0].value)]
        for name in names:
            backend = next((b for b in BACKEND_MODULES if name == b or name.startswith(f"{b}.")), None)
            if backend:
                out.append((node.lineno, f"imports {backend}; reach backends through datadistill.models.detector"))
                break
    return out


def _part(module: str) -> str:
    """The part of the package a module belongs to: ``datadistill.stages.train`` -> ``stages``;
    ``datadistill`` (its ``__init__``) -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imported_modules(node: ast.AST, module: str) -> list[str]:
    """The datadistill modules an import node (or an ``import_module("datadistill...")`` call) brings in;
    ``from datadistill import errors`` brings in ``datadistill.errors``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if _is_ours(alias.name)]
    if isinstance(node, ast.ImportFrom):
        base = _absolute(node, module)
        if not _is_ours(base):
            return []
        if base == "datadistill":
            return [f"datadistill.{alias.name}" if alias.name in LAYERS else base for alias in node.names]
        return [base]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name):
        func = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
        if func in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            name = str(node.args[0].value)
            return [name] if _is_ours(name) else []
    return []


def upward_imports(tree: ast.Module, module: str = "datadistill.x") -> list[Offence]:
    """Imports of a part of the package in the importer's layer or above (:data:`LAYERS`), anywhere in the
    file: module level, inside functions, under ``TYPE_CHECKING``, by ``importlib.import_module``. A part
    missing from :data:`LAYERS` is an offence too (give it a layer)."""
    own = _part(module)
    out = []
    for node in ast.walk(tree):
        for name in _imported_modules(node, module):
            part = _part(name)
            if part == own:
                continue
            if own not in LAYERS or part not in LAYERS:
                missing = own if own not in LAYERS else part
                out.append((node.lineno, f"imports {name}: {missing!r} has no layer in LAYERS"))
            elif LAYERS[part] >= LAYERS[own]:
                out.append((node.lineno, f"imports {name} ({part}, layer {LAYERS[part]}) from {own} (layer "
                                         f"{LAYERS[own]}): imports point down"))  # fmt: skip
                break
    return out


# ----------------------------------------------------------------------------------------------------
# the checks, one test per source file


def _offences(rel: str, tree: ast.Module, checker: Callable[[ast.Module, str], list[Offence]]) -> list[str]:
    """``src/datadistill/<rel>:<line>: <what>`` for each offence ``checker`` finds in ``tree``."""
    return [f"src/datadistill/{rel}:{line}: {what}" for line, what in checker(tree, _module_name(rel))]


def _check(path: Path, checker: Callable[[ast.Module, str], list[Offence]]) -> None:
    lines = _offences(_rel(path), _tree(path), checker)
    assert not lines, "\n".join(lines)


FILES = [pytest.param(p, id=_rel(p)) for p in _source_files()]
OUTSIDE_MODELS = [pytest.param(p, id=_rel(p)) for p in _source_files() if not _rel(p).startswith("models/")]


def test_the_source_is_found() -> None:
    found = {_rel(p) for p in _source_files()}
    assert len(found) > 20 and {"cli.py", "data/coco.py", "core/fusion.py"} <= found, sorted(found)


@pytest.mark.parametrize("path", FILES)
def test_no_private_imports(path: Path) -> None:
    _check(path, private_imports)


@pytest.mark.parametrize("path", FILES)
def test_no_private_attributes_of_other_modules(path: Path) -> None:
    _check(path, private_attributes)


@pytest.mark.parametrize("path", FILES)
def test_functions_fit_on_a_screen(path: Path) -> None:
    _check(path, long_functions)


@pytest.mark.parametrize("path", OUTSIDE_MODELS)
def test_model_specs_are_parsed_in_models_only(path: Path) -> None:
    _check(path, spec_parsing)


@pytest.mark.parametrize("path", OUTSIDE_MODELS)
def test_backends_are_reached_through_the_detector(path: Path) -> None:
    if _rel(path) in BACKEND_IMPORT_ALLOWED:
        pytest.skip("allowed to import a backend")
    _check(path, backend_imports)


@pytest.mark.parametrize("path", FILES)
def test_imports_point_down(path: Path) -> None:
    _check(path, upward_imports)


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {_part(_module_name(_rel(p))) for p in _source_files()}
    assert parts == set(LAYERS), f"give a layer to {sorted(parts - set(LAYERS))}; drop {sorted(set(LAYERS) - parts)}"


@pytest.mark.parametrize("entry", ["datadistill.models.ultralytics", "datadistill.stages.train"])
def test_yolo_and_the_train_stage_import_no_torchvision_builder(entry: str) -> None:
    """A YOLO model (and the train stage, whatever it trains) loads without the torchvision backend or its zoo:
    ModelMeta, checkpoints and the LoopBackend live in backend-neutral modules."""
    code = f"import sys, {entry}; print(sorted(m for m in sys.modules if m.startswith('datadistill.models.')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(SRC.parent), "PATH": ""})  # fmt: skip
    loaded = set(eval(done.stdout))  # noqa: S307 (a list of module names printed by the child)
    assert "datadistill.models.detector" in loaded
    assert not loaded & {"datadistill.models.torchvision", "datadistill.models.zoo"}, sorted(loaded)


def test_allow_list_names_existing_files() -> None:
    assert BACKEND_IMPORT_ALLOWED <= {_rel(p) for p in _source_files()}


# ----------------------------------------------------------------------------------------------------
# each checker catches a planted offence and passes clean code


def _lines(checker: Callable[[ast.Module, str], list[Offence]], code: str) -> list[int]:
    return [line for line, _ in checker(ast.parse(code), "datadistill.stages.label")]


def _long_function(name: str, lines: int) -> str:
    return f"def {name}():\n" + "    x = 1\n" * (lines - 1)


# (edge, checker, code planted in datadistill/stages/label.py, lines of the offences)
CAUGHT = [
    ("private-import", private_imports, "from datadistill.stages.train import _plain\n", [1]),
    ("private-import-among-public", private_imports, "from datadistill.stages.train import train, _plain as p\n", [1]),
    (
        "private-import-in-function",
        private_imports,
        "def f():\n    from datadistill.models.torchvision import _unwrap\n",
        [2],
    ),
    ("private-import-relative", private_imports, "from .shards import _schema\n", [1]),
    (
        "attribute-of-aliased-module",
        private_attributes,
        "import datadistill.models.torchvision as tv\ntv._unwrap(m)\n",
        [2],
    ),
    (
        "attribute-of-from-imported-module",
        private_attributes,
        "from datadistill.stages import train as t\nt._plain\n",
        [2],
    ),
    (
        "attribute-of-imported-function",
        private_attributes,
        "from datadistill.stages.train import train\ntrain._cache\n",
        [2],
    ),
    (
        "attribute-of-dotted-module",
        private_attributes,
        "import datadistill.stages.train\ndatadistill.stages.train._plain(1)\n",
        [2],
    ),
    (
        "attribute-import-in-function",
        private_attributes,
        "def f():\n    from datadistill import models\n    return models._external\n",
        [3],
    ),
    ("function-one-line-too-long", long_functions, _long_function("f", MAX_FUNCTION_LINES + 1), [1]),
    (
        "method-too-long",
        long_functions,
        "class A:\n" + textwrap.indent(_long_function("m", MAX_FUNCTION_LINES + 1), "    "),
        [2],
    ),
    ("startswith", spec_parsing, 'spec.startswith("yolo:")\n', [1]),
    ("startswith-tuple", spec_parsing, 'spec.startswith(("hf:", "yolo:"))\n', [1]),
    ("removeprefix", spec_parsing, 'name = spec.removeprefix("hf:")\n', [1]),
    ("compare-slice", spec_parsing, 'if spec[:5] == "yolo:":\n    pass\n', [1]),
    ("compare-in", spec_parsing, 'ok = "hf:" in spec\n', [1]),
    ("compare-full-spec", spec_parsing, 'ok = spec != "yolo:yolov8n.pt"\n', [1]),
    ("startswith-module-constant", spec_parsing, 'PREFIX = "yolo:"\nspec.startswith(PREFIX)\n', [2]),
    ("compare-module-constant", spec_parsing, 'HF: str = "hf:"\nok = spec[:3] == HF\n', [2]),
    ("import-backend", backend_imports, "import datadistill.models.ultralytics\n", [1]),
    ("from-backend-import", backend_imports, "from datadistill.models.ultralytics import load_yolo\n", [1]),
    (
        "import-backend-from-package",
        backend_imports,
        "from datadistill.models import torchvision, ultralytics as u\n",
        [1],
    ),
    ("import-backend-relative", backend_imports, "def f():\n    from ..models import ultralytics\n", [2]),
    ("import-backend-by-name", backend_imports, 'importlib.import_module("datadistill.models.ultralytics")\n', [1]),
    ("stage-imports-run", upward_imports, "from datadistill.run import run\n", [1]),
    ("stage-imports-run-in-function", upward_imports, "def f():\n    from datadistill.run import run\n", [2]),
    ("stage-imports-cli-as-module", upward_imports, "import datadistill.cli as cli\n", [1]),
    ("stage-imports-demo-from-package", upward_imports, "from datadistill import errors, demo\n", [1]),
    ("stage-imports-run-relative", upward_imports, "def f():\n    from .. import run\n", [2]),
    ("stage-imports-run-by-name", upward_imports, 'importlib.import_module("datadistill.run")\n', [1]),
    (
        "stage-imports-cli-under-type-checking",
        upward_imports,
        "if TYPE_CHECKING:\n    from datadistill.cli import main\n",
        [2],
    ),
    ("part-without-a-layer", upward_imports, "from datadistill.utils import helper\n", [1]),
]

# (edge, checker, code that must pass)
CLEAN = [
    (
        "dunder-and-public",
        private_imports,
        "from datadistill import __version__\nfrom datadistill.data.coco import load_coco\n",
    ),
    ("not-ours", private_imports, "from torch.utils.data import _utils\n"),
    (
        "self-and-not-ours",
        private_attributes,
        "self._cache = {}\nnp._NoValue\nfrom datadistill import errors\nerrors.__name__\n",
    ),
    ("attribute-of-a-call", private_attributes, "from datadistill.data.coco import load_coco\nload_coco(p)._x\n"),
    ("function-at-the-limit", long_functions, _long_function("f", MAX_FUNCTION_LINES)),
    (
        "spec-not-parsed",
        spec_parsing,
        'DEFAULT = "yolo:yolov8n.pt"\nspec.startswith("yolo")\nspec == DEFAULT\nname.startswith("hfx")\n',
    ),
    (
        "imports-below-and-beside",
        upward_imports,
        "from datadistill import __version__, errors\nfrom datadistill.models.detector import load_detector\n"
        "import datadistill.stages.train\nfrom . import shards\nfrom datadistill.config import LabelConfig\n",
    ),
    (
        "the-detector",
        backend_imports,
        "from datadistill.models.detector import load_detector\nfrom datadistill.models import torchvision\n",
    ),
]


@pytest.mark.parametrize(("checker", "code", "lines"), [pytest.param(*row[1:], id=row[0]) for row in CAUGHT])
def test_checker_catches_a_planted_offence(
    checker: Callable[[ast.Module, str], list[Offence]], code: str, lines: list[int]
) -> None:
    assert _lines(checker, code) == lines


@pytest.mark.parametrize(("checker", "code"), [pytest.param(*row[1:], id=row[0]) for row in CLEAN])
def test_checker_passes_clean_code(checker: Callable[[ast.Module, str], list[Offence]], code: str) -> None:
    assert _lines(checker, code) == []


# (edge, code planted in a module, that module, lines of the offences): the arrows this package had
LAYER_CAUGHT = [
    ("backend-calls-the-train-loop", "def train(cfg):\n    from datadistill.stages.train import train_loop\n",
     "datadistill.models.hf", [2]),
    ("backend-calls-evaluate", "def f():\n    from datadistill.stages.evaluate import evaluate_model\n",
     "datadistill.models.ultralytics", [2]),
    ("data-imports-a-model", "from datadistill.models.detector import ModelMeta\n", "datadistill.data.coco", [1]),
    ("core-imports-config", "from datadistill.config import LabelConfig\n", "datadistill.core.views", [1]),
    ("runtime-imports-data", "def f():\n    from datadistill.data import coco\n", "datadistill.runtime.io", [2]),
]  # fmt: skip


@pytest.mark.parametrize(("code", "module", "lines"), [pytest.param(*row[1:], id=row[0]) for row in LAYER_CAUGHT])
def test_layer_checker_catches_an_upward_import_in_any_layer(code: str, module: str, lines: list[int]) -> None:
    assert [line for line, _ in upward_imports(ast.parse(code), module)] == lines


def test_offences_name_file_and_line() -> None:
    tree = ast.parse("import os\nfrom datadistill.stages.train import _plain\n")
    assert _offences("stages/label.py", tree, private_imports) == [
        "src/datadistill/stages/label.py:2: imports private _plain from datadistill.stages.train"
    ]
