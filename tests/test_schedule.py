"""Schedules in iterations: the default length for few and many labeled images, warmup and lr steps as
fractions of the run, and `train` with its defaults on 1, 3, 6 and 8 labeled images."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from datadistill.cli import main
from datadistill.core import schedule as schedule_mod
from datadistill.core.schedule import resolve_schedule
from datadistill.data.synth import make_shapes


@pytest.mark.parametrize(
    ("kwargs", "iterations", "epochs", "warmup", "milestones", "unit"),
    [
        # neither given: 20 passes when they make at least 1,000 iterations (a large set) ...
        pytest.param(dict(iterations_per_epoch=250), 5000, 20, 200, (3250, 4500), "epochs", id="default-large-set"),
        # ... else 1,000 iterations (8 labeled images make epochs of one iteration)
        pytest.param(dict(iterations_per_epoch=1), 1000, 1000, 200, (667, 889), "iterations", id="default-8-images"),
        pytest.param(dict(iterations_per_epoch=3), 1000, 334, 200, (667, 889), "iterations", id="default-partial-epoch"),
        pytest.param(dict(iterations_per_epoch=49), 1000, 21, 200, (667, 889), "iterations", id="default-49-per-epoch"),
        pytest.param(dict(iterations_per_epoch=50), 1000, 20, 200, (650, 900), "epochs", id="default-50-per-epoch"),
        # what the user gives
        pytest.param(dict(epochs=12, iterations_per_epoch=10), 120, 12, 24, (80, 110), "epochs", id="epochs-warmup-capped"),
        pytest.param(dict(iterations=50, iterations_per_epoch=7), 50, 8, 10, (33, 44), "iterations", id="iterations"),
        pytest.param(dict(iterations=5, iterations_per_epoch=1), 5, 5, 1, (3, 4), "iterations", id="tiny-run"),
        pytest.param(dict(epochs=12, lr_steps=(5,), iterations_per_epoch=10), 120, 12, 24, (50,), "epochs", id="lr-steps-in-epochs"),
        pytest.param(dict(iterations=100, lr_steps=(60,), iterations_per_epoch=10), 100, 10, 20, (60,), "iterations", id="lr-steps-in-iterations"),
        pytest.param(dict(epochs=3, warmup_iters=0, iterations_per_epoch=10), 30, 3, 0, (20,), "epochs", id="no-warmup"),
    ],
)  # fmt: skip
def test_resolve_schedule(
    kwargs: dict, iterations: int, epochs: int, warmup: int, milestones: tuple[int, ...], unit: str
) -> None:
    args = {"epochs": None, "iterations": None, "lr_steps": None, "warmup_iters": 200} | kwargs
    s = resolve_schedule(**args)
    assert (s.iterations, s.epochs, s.warmup, s.milestones, s.unit) == (iterations, epochs, warmup, milestones, unit)
    assert sum(s.steps_in(e) for e in range(s.epochs)) == s.iterations and s.steps_in(s.epochs) == 0


def test_resolve_schedule_refuses_both_lengths() -> None:
    with pytest.raises(ValueError, match="not both"):
        resolve_schedule(epochs=2, iterations=10, lr_steps=None, warmup_iters=0, iterations_per_epoch=1)


@pytest.mark.parametrize("num_images", [1, 3, 6, 8])
def test_train_with_its_defaults_on_a_handful_of_images(
    num_images: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every size that `validate` accepts trains with the defaults (the batch of 8 never needs more images
    than there are) and the log says the schedule. The default (20 passes, at least 1,000 iterations) is
    lowered to 2 passes, at least 6 iterations, so that the test runs in seconds; everything else is the
    default."""
    monkeypatch.setattr(schedule_mod, "DEFAULT_MIN_ITERATIONS", 6)
    monkeypatch.setattr(schedule_mod, "DEFAULT_EPOCHS", 2)
    make_shapes(tmp_path / "data", num_images=num_images, seed=num_images, size_px=64)
    data = tmp_path / "data"
    with caplog.at_level(logging.INFO, logger="datadistill"):
        argv = ["train", "--data", str(data / "annotations.json"), "--images", str(data / "images"), "--out",
                str(tmp_path / "out"), "--threads", "1"]  # fmt: skip
        assert main(argv) == 0
    log = caplog.text
    assert "6 iterations (6 epochs of 1), warmup 1, lr steps at 4 and 5" in log
    assert ("are cycled" in log) == (num_images < 8)
    config = (tmp_path / "out" / "config.yaml").read_text()
    assert "iterations: 6\n" in config and "epochs: null\n" in config
    steps = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["iteration"] for r in steps if r["type"] == "step") == 6
