"""One line out of an exception, for the one-line errors every command prints."""

from __future__ import annotations


def first_line(exc: BaseException, default: str | None = None) -> str:
    """The first line of `str(exc)` after stripping, else `default`, else the exception's type
    name (libraries raise multi-line messages and message-less exceptions alike)."""
    text = str(exc).strip()
    if text:
        return text.splitlines()[0]
    return default if default is not None else type(exc).__name__
