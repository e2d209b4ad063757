"""Training schedules in iterations: how long to train, when to warm up and when to lower the lr.

A user gives ``epochs`` (passes over the labeled images), ``iterations`` (minibatches), or neither. With
neither, the schedule is :data:`DEFAULT_EPOCHS` passes, but at least :data:`DEFAULT_MIN_ITERATIONS`
iterations: 20 passes over 2,000 labeled images at batch 8 are 5,000 iterations, but 20 passes over 8
images are 20 iterations, and a detector learns nothing in 20 iterations. On 8 labeled aerial tiles of
256 px (``bench/real_trees.py``, the small default model) 60 iterations gave a teacher of 7% box AP50 and
600 one of 26%; 1,000 leaves a margin at a cost a CPU can pay (minutes at 128 px). Warmup is
:data:`WARMUP_ITERATIONS` iterations, at most a fifth of the schedule; the lr drops at 2/3 and 8/9 of it (the
"1x" schedule's 8 and 11 of 12).
Pure arithmetic: no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_EPOCHS = 20
DEFAULT_MIN_ITERATIONS = 1000
WARMUP_ITERATIONS = 200
WARMUP_MAX_FRACTION = 0.2
LR_STEP_FRACTIONS = (2 / 3, 8 / 9)


@dataclass(frozen=True)
class Schedule:
    """A resolved schedule: ``iterations`` minibatches in all, in ``epochs`` epochs of
    ``iterations_per_epoch`` (the last one shorter when the iterations are not a whole number of epochs),
    a linear warmup over ``warmup`` iterations, and the lr multiplied by gamma at each of ``milestones``
    (iteration numbers). ``unit`` says what the user gave: ``epochs`` or ``iterations``."""

    iterations: int
    iterations_per_epoch: int
    warmup: int
    milestones: tuple[int, ...]
    unit: str

    @property
    def epochs(self) -> int:
        return math.ceil(self.iterations / self.iterations_per_epoch)

    def steps_in(self, epoch: int) -> int:
        """Iterations of epoch ``epoch`` (0-based)."""
        return max(0, min(self.iterations_per_epoch, self.iterations - epoch * self.iterations_per_epoch))

    def describe(self) -> str:
        """One line for the log: ``1,600 iterations (200 epochs of 8), warmup 200, lr steps at 1,067 and 1,422``."""
        steps = " and ".join(f"{m:,}" for m in self.milestones) or "none"
        return (
            f"{self.iterations:,} iterations ({self.epochs:,} epochs of {self.iterations_per_epoch:,}), "
            f"warmup {self.warmup:,}, lr steps at {steps}"
        )

    def to_dict(self) -> dict[str, object]:
        return {"iterations": self.iterations, "iterations_per_epoch": self.iterations_per_epoch,
                "epochs": self.epochs, "warmup": self.warmup, "milestones": list(self.milestones),
                "unit": self.unit}  # fmt: skip


def default_lr_steps(epochs: int) -> tuple[int, ...]:
    """The "1x" schedule's decay epochs scaled to ``epochs``: 8 and 11 of 12."""
    return tuple(sorted({s for s in (round(epochs * 2 / 3), round(epochs * 8 / 9)) if 0 < s < epochs}))


def default_iterations(iterations_per_epoch: int) -> tuple[str, int]:
    """The default length: ``("epochs", DEFAULT_EPOCHS)`` when that many passes make at least
    :data:`DEFAULT_MIN_ITERATIONS` iterations, else ``("iterations", DEFAULT_MIN_ITERATIONS)``."""
    if DEFAULT_EPOCHS * iterations_per_epoch >= DEFAULT_MIN_ITERATIONS:
        return "epochs", DEFAULT_EPOCHS
    return "iterations", DEFAULT_MIN_ITERATIONS


def resolve_schedule(
    *,
    epochs: int | None,
    iterations: int | None,
    lr_steps: tuple[int, ...] | None,
    warmup_iters: int,
    iterations_per_epoch: int,
) -> Schedule:
    """The schedule of a run. ``lr_steps`` are in the unit of the length given (epoch numbers with
    ``epochs``, iteration numbers with ``iterations``); None puts them at 2/3 and 8/9 of the run. The
    warmup is ``warmup_iters`` but at most a fifth of the run."""
    if iterations_per_epoch < 1:
        raise ValueError(f"iterations_per_epoch must be at least 1, got {iterations_per_epoch}")
    if epochs is not None and iterations is not None:
        raise ValueError("give epochs or iterations, not both")
    if epochs is None and iterations is None:
        unit, length = default_iterations(iterations_per_epoch)
        epochs, iterations = (length, None) if unit == "epochs" else (None, length)
    if epochs is not None:
        total = epochs * iterations_per_epoch
        steps = default_lr_steps(epochs) if lr_steps is None else lr_steps
        milestones = tuple(s * iterations_per_epoch for s in steps)
        unit = "epochs"
    else:
        assert iterations is not None
        total = iterations
        if lr_steps is None:
            lr_steps = tuple(sorted({s for s in (round(total * f) for f in LR_STEP_FRACTIONS) if 0 < s < total}))
        milestones = tuple(lr_steps)
        unit = "iterations"
    warmup = min(warmup_iters, total, max(1, int(total * WARMUP_MAX_FRACTION))) if warmup_iters else 0
    return Schedule(iterations=total, iterations_per_epoch=iterations_per_epoch, warmup=warmup,
                    milestones=milestones, unit=unit)  # fmt: skip
