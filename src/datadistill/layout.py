"""Where each stage of a ``run`` writes, inside the run folder (shared by ``run``, ``demo`` and ``report``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class _Under:
    """A read-only attribute of a :class:`RunLayout`: the path ``parts`` under its root."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts

    def __get__(self, layout: RunLayout, owner: type | None = None) -> Path:
        return layout.root.joinpath(*self.parts)


@dataclass(frozen=True)
class RunLayout:
    """``root/teacher``, ``root/teacher/eval``, then per round ``root/round-N/{label,select,student}``; at the
    top the resolved ``config.yaml``, ``timings.json``, ``results.json`` and ``report.html``."""

    root: Path

    config = _Under("config.yaml")
    timings = _Under("timings.json")
    results = _Under("results.json")
    report = _Under("report.html")
    teacher = _Under("teacher")

    def teacher_metrics(self) -> Path:
        return self.teacher / "eval" / "metrics.json"

    def round_dir(self, r: int) -> Path:
        return self.root / f"round-{r}"

    def label(self, r: int) -> Path:
        return self.round_dir(r) / "label"

    def pseudo(self, r: int) -> Path:
        return self.round_dir(r) / "select" / "pseudo.json"

    def selection(self, r: int) -> Path:
        return self.round_dir(r) / "select" / "selection.json"

    def scores_png(self, r: int) -> Path:
        return self.round_dir(r) / "select" / "scores.png"

    def student(self, r: int) -> Path:
        return self.round_dir(r) / "student"

    def student_metrics(self, r: int) -> Path:
        return self.student(r) / "eval" / "metrics.json"

    def rounds(self) -> list[int]:
        found = sorted(int(p.name.split("-")[1]) for p in self.root.glob("round-*") if p.name.split("-")[1].isdigit())
        return found
