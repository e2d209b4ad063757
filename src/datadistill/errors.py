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


SHORT_LIMIT = 80  # characters of a value quoted in a one-line message


def shorten(text: str, limit: int = SHORT_LIMIT) -> str:
    """``text`` fit for a one-line message: characters that are not printable (line breaks, escapes, NUL) as
    their escapes, cut to ``limit`` characters (``...`` at the end), so that a hostile value keeps an error to
    one short line."""
    shown = printable(text[: limit + 1])
    return shown if len(shown) <= limit and len(text) <= limit else shown[: limit - 3] + "..."


def root_user_error(exc: BaseException) -> UserError | None:
    """The innermost UserError in ``exc``'s chain (``cause``, ``__cause__``, ``__context__``) with its first
    line only, or None. Ray raises a task's UserError inside its own exception, whose message holds the
    task's traceback, and appends its retry notes to the UserError's message."""
    found: BaseException | None = None
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        found = link if isinstance(link, UserError) else found
        link = getattr(link, "cause", None) or link.__cause__ or link.__context__
    if found is None:
        return None
    return type(found)((str(found).strip().splitlines() or [""])[0])


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


MESSAGE_LIMIT = 1000  # characters of the one line the CLI prints for an error


def bounded_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` as one printable line of at most about ``limit`` characters: a longer text keeps its start
    (two thirds of ``limit``: the file named first) and its end (the field and the advice), the middle cut
    and counted; line breaks, escapes and other characters that are not printable are shown escaped
    (``\\n``, ``\\x1b``). A hostile value (a 50 MB file name) gives a short line, in time linear in ``limit``."""
    head, tail = limit * 2 // 3, limit // 3
    if len(text) > limit + 40:
        text = f"{text[:head]} [... {len(text) - head - tail} characters cut ...] {text[len(text) - tail :]}"
    return printable(text)


def printable(text: str) -> str:
    """``text`` with each character that is not printable (line breaks, escapes, NUL) as its escape."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
