"""``datadistill label`` whose forward passes take longer, so that a kill lands mid-run (the kill tests run it):

    python tests/slow_label.py SECONDS label --model ... --images ... --out ...

or that stops once its folder holds N shards, says so in a marker file ``OUT.paused`` beside the folder and
waits to be killed (the test waits for the marker, an event, not a time window):

    python tests/slow_label.py pause:N label --model ... --images ... --out OUT

The seam: :func:`datadistill.stages.label.label` builds the teacher with the loader it is given (in this
process, and pickled to each Ray actor); the config is parsed as the CLI parses it. Under ``torchrun`` each
process labels its part, as ``datadistill label`` does.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()


class Slow:
    """A detector whose ``predict`` sleeps ``delay`` seconds first, or, with ``pause_at``, waits for good
    (after touching ``OUT.paused``) once the labeling folder ``out`` holds that many shards; everything else
    is the detector's."""

    def __init__(self, detector: Any, delay: float, pause_at: int | None = None, out: Path | None = None) -> None:
        self.detector, self.delay, self.pause_at, self.out = detector, delay, pause_at, out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.detector, name)

    def predict(self, images: Sequence[Any]) -> Any:
        if self.pause_at is not None and self.out is not None:
            if len(list((self.out / "shards").glob("*.parquet"))) >= self.pause_at:
                (self.out.parent / f"{self.out.name}.paused").touch()
                time.sleep(3600)
        time.sleep(self.delay)
        return self.detector.predict(images)


def main(argv: Sequence[str]) -> None:
    from datadistill.cli import build_parser
    from datadistill.config import LabelConfig
    from datadistill.models.detector import load_detector
    from datadistill.stages.label import label

    mode = argv[0]
    delay, pause_at = (0.0, int(mode[len("pause:") :])) if mode.startswith("pause:") else (float(mode), None)
    args = build_parser().parse_args(list(argv[1:]))
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(LabelConfig) if hasattr(args, f.name)}
    fields.update(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)))

    def slow_load(spec: str, **kwargs: Any) -> Slow:
        return Slow(load_detector(spec, **kwargs), delay, pause_at, Path(args.out))

    label(LabelConfig(**fields), load=slow_load)


if __name__ == "__main__":
    main(sys.argv[1:])
