"""The README's step-by-step commands, as a user runs them, on a tiny data set laid out as the README's."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from datadistill.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def step_by_step() -> list[list[str]]:
    """The commands of the README's block after "Step by step:", continuation lines joined; the lines that hold
    a placeholder (``...``) left out."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"Step by step:\n\n```bash\n(.*?)```", text, re.S)
    assert block, "README.md: no ```bash block after 'Step by step:'"
    joined = block.group(1).replace("\\\n", " ")
    lines = [line.split(" #")[0].strip() for line in joined.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("datadistill ") and "..." not in line]


def test_the_step_by_step_commands_run_on_tiny_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from datadistill.demo import DemoPlan, make_demo_data

    plan = DemoPlan(labeled=6, unlabeled=8, val=4, size_px=64, teacher_epochs=1, student_epochs=1, batch_size=4,
                    views="identity")  # fmt: skip
    data = make_demo_data(tmp_path / "data", task="boxes", plan=plan, seed=5)
    (tmp_path / "data" / "unlabeled").mkdir()  # the README's unlabeled folder
    for im in json.loads(Path(data.unlabeled).read_text())["images"]:
        shutil.copy(tmp_path / "data" / "images" / im["file_name"], tmp_path / "data" / "unlabeled")
    monkeypatch.chdir(tmp_path)
    commands = step_by_step()
    assert [c[1] for c in commands] == ["validate", "train", "label", "select", "train", "evaluate", "evaluate"]
    for argv in commands:
        extra = ["--iterations", "2", "--device", "cpu", "--threads", "1"] if argv[1] == "train" else []  # short
        extra += ["--workers", "0", "--device", "cpu", "--allow-weak-teacher"] if argv[1] == "label" else []
        assert main([*argv[1:], *extra]) == 0, " ".join(argv)
    out = capsys.readouterr().out
    assert "OK, 6 images" in out and "kept " in out
    for path in ("runs/teacher/checkpoint.pt", "runs/labels/manifest.json", "runs/select/pseudo.json",
                 "runs/student/checkpoint.pt"):  # fmt: skip
        assert (tmp_path / path).is_file(), path
    teacher, student = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("teacher", "student"))
    assert 0.0 <= teacher["bbox"]["AP"] <= 1.0 and 0.0 <= student["bbox"]["AP"] <= 1.0
    pseudo = json.loads((tmp_path / "runs/select/pseudo.json").read_text())
    assert len(pseudo["images"]) == 8  # every unlabeled image, with its pseudo-labels or as a negative
