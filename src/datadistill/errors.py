"""The one exception type that the CLI turns into a one-line message (no traceback)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The CLI prints ``error: <message>`` and exits with status 1. Library callers can catch it to
    handle bad input without parsing messages.
    """


class DataError(UserError):
    """A data set (COCO json, YOLO folder, image) is malformed."""


def one_line_errors(items: Iterable[T]) -> Iterator[T]:
    """Iterate ``items`` (a DataLoader); a UserError raised in a worker process (torch re-raises it with
    the worker's traceback in the message) comes back with its own one-line message."""
    try:
        yield from items
    except UserError as exc:
        lines = str(exc).strip().splitlines()
        if len(lines) <= 1:
            raise
        name = type(exc).__name__
        last = lines[-1]
        message = last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
        raise type(exc)(message) from None
