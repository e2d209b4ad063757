"""The one exception type that the CLI turns into a one-line message (no traceback)."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The CLI prints ``error: <message>`` and exits with status 1. Library callers can catch it to
    handle bad input without parsing messages.
    """


class DataError(UserError):
    """A data set (COCO json, YOLO folder, image) is malformed."""
