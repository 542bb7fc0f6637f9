"""`mtcmkd report`: training curves and a short Markdown summary of a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .console import console, failer

fail = failer("report")


def report(
    run_dir: Annotated[Path, typer.Argument(help="Run folder of `mtcmkd train`.")],
    out: Annotated[Path | None, typer.Option(
        help="Output folder (default RUN_DIR/report).")] = None,
) -> None:
    """Plot losses by term, teacher weights, validation Dice and learning rates from log.jsonl,
    and write report.md (best epoch and Dice, final losses, throughput)."""
    # matplotlib (~0.5 s) only when a report is drawn: cli/main.py imports every command.
    from mtcmkd.run_report import write_run_report

    if not run_dir.is_dir():
        fail(f"{run_dir}: no such run folder")
    try:
        result = write_run_report(run_dir, out)
    except FileNotFoundError as exc:
        fail(str(exc))
    table = Table(title=f"mtcmkd report -> {result.markdown.parent}", show_header=False)
    best = result.best
    table.add_row("best epoch", "-" if best is None else str(best.get("epoch")))
    table.add_row("best mean Dice", "-" if best is None or best.get("mean_dice") is None
                  else f"{best['mean_dice']:.4f}")
    table.add_row("figures", ", ".join(p.name for p in result.figures.values()) or "none")
    table.add_row("summary", str(result.markdown))
    console.print(table)
