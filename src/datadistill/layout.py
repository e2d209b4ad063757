"""Where each stage of a ``run`` writes, inside the run folder (shared by ``run`` and ``report``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """``root/teacher``, ``root/teacher/eval``, then per round ``root/round-N/{label,select,student}``."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

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

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def results(self) -> Path:
        return self.root / "results.json"
