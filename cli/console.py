"""Shared console helpers: one rich console, one way to fail with a one-line error."""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


#: Where every command's errors are explained, one section per command.
TROUBLESHOOTING = "docs/TROUBLESHOOTING.md"


def fail(message: str, code: int = 2, *, section: str | None = None) -> NoReturn:
    """Print `error: message` on stderr (one line, no traceback) and exit with `code`.

    With `section`, the line ends with a pointer to that section of docs/TROUBLESHOOTING.md.
    """
    hint = f" [dim](see {TROUBLESHOOTING}#{section})[/]" if section else ""
    err_console.print(f"[bold red]error:[/] {escape(message)}{hint}", soft_wrap=True)
    raise typer.Exit(code)


def failer(section: str) -> Callable[..., NoReturn]:
    """`fail` for one command: its errors point to the command's troubleshooting section."""

    def fail_command(message: str, code: int = 2) -> NoReturn:
        fail(message, code, section=section)

    return fail_command
