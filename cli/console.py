"""Shared console helpers: one rich console, one way to fail with a one-line error, and
per-case progress that also reaches a log file."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, NoReturn

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

#: Width of the console when its output is not a terminal (a pipe, a SLURM or nohup log): wide
#: enough that no table of ours is cut (rich shortens a cell that does not fit to `2347...`),
#: so logs keep every number.
PIPED_WIDTH = 400


class _LogFriendlyConsole(Console):
    """A rich console that is :data:`PIPED_WIDTH` wide when it does not write to a terminal.

    Rich falls back to 80 columns (or the width of whatever terminal stdin still is) when
    piped, which cut tables mid-number in logs; a terminal keeps its own width. ``COLUMNS``
    (which rich also reads) does not narrow a log; an explicit ``width=`` is kept.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._explicit_width = kwargs.get("width") is not None

    @property
    def size(self) -> ConsoleDimensions:
        dims = super().size
        if self._explicit_width or self.is_terminal:
            return dims
        return ConsoleDimensions(max(dims.width, PIPED_WIDTH), dims.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


console = _LogFriendlyConsole(highlight=False)
err_console = _LogFriendlyConsole(stderr=True, highlight=False)


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


def format_duration(seconds: float) -> str:
    """A duration as people read it in a log: ``41 s``, ``6 min``, ``2 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class CaseProgress:
    """Progress over the cases of one command: rich's bar on a terminal, and one plain line per
    case otherwise (SLURM, nohup, a pipe), where a bar prints nothing until the end.

    A line reads ``case 3/12 BraTS2021_00005 41.2 s, ETA 6 min``: the case's own wall time
    (since the previous case ended) and the remaining cases at the mean time per case so far.
    Use as a context manager; call :meth:`case_done` after each case.

    Args:
        verb: the command's name, shown left of the bar.
        total: the number of cases.
        out: where the bar or the lines go (default: the shared stdout console, so a log reads
            in order with the command's tables).
        clock: seconds, monotonic (a test passes a fake one).
    """

    def __init__(self, verb: str, total: int, *, out: Console | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 window_every_s: float = 30.0) -> None:
        self.verb = verb
        self.total = total
        self.out = out if out is not None else console
        self.clock = clock
        self.window_every_s = window_every_s
        self.done = 0
        self._start = self._last = 0.0
        self._last_window_line = 0.0
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> CaseProgress:
        self._start = self._last = self.clock()
        if self.out.is_terminal:
            self._bar = Progress(TextColumn(self.verb), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.description}"),
                                 console=self.out, transient=True)
            self._bar.start()
            self._task = self._bar.add_task("", total=self.total)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()

    def windows(self, done: int, total: int) -> str | None:
        """Within the current case (a :func:`mtcmkd.inference.window_progress` callback): on a
        terminal the bar's text; otherwise a line such as ``case 3/12: windows 400/1000, 2 min
        left in the case`` at most every `window_every_s` seconds (none in a case shorter than
        that). Returns the line when one is printed."""
        now = self.clock()
        if self._bar is not None:
            self._bar.update(self._task, description=f"windows {done}/{total}")  # type: ignore[arg-type]
            return None
        if done >= total or now - max(self._last, self._last_window_line) < self.window_every_s:
            return None
        self._last_window_line = now
        left = (now - self._last) / done * (total - done)
        line = (f"case {self.done + 1}/{self.total}: windows {done}/{total}, "
                f"{format_duration(left)} left in the case")
        self.out.print(line, soft_wrap=True, markup=False, highlight=False)
        return line

    def case_done(self, case_id: str, status: str = "") -> str:
        """One case finished (`status`: e.g. "failed"); returns the line (printed when not on a
        terminal)."""
        now = self.clock()
        seconds, self._last = now - self._last, now
        self.done += 1
        left = self.total - self.done
        if left > 0:
            tail = f"ETA {format_duration((now - self._start) / self.done * left)}"
        else:
            tail = f"all done in {format_duration(now - self._start)}"
        line = (f"case {self.done}/{self.total} {case_id} {seconds:.1f} s"
                + (f" {status}" if status else "") + f", {tail}")
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=case_id)  # type: ignore[arg-type]
        else:
            self.out.print(line, soft_wrap=True, markup=False, highlight=False)
        return line
