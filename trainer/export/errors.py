"""The one error an export raises for anything a user can fix, with its message in one line."""

from __future__ import annotations


class ExportError(RuntimeError):
    """An export that cannot be done; the message says why in one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (exporters and checkers write pages)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
