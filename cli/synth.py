"""`mtcmkd synth`: write a phantom BraTS dataset in a release's exact layout."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mtcmkd.brats import RELEASES
from mtcmkd.phantom import synthesize, template_path

from .console import console, failer

fail = failer("synth")


def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (must not exist or be empty).")],
    cases: Annotated[int, typer.Option("--cases", "-n", help="Number of cases.")] = 8,
    layout: Annotated[str, typer.Option(help=f"Release layout: {', '.join(RELEASES)}.")] = "2021",
    shape: Annotated[tuple[int, int, int], typer.Option(
        help="Volume shape as the NIfTI array shape (X Y Z); BraTS is 240 240 155.")] = (
        240, 240, 155),
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives identical files.")] = 0,
    procedural: Annotated[bool, typer.Option(
        "--procedural", help="Use procedural anatomy even when the MNI152 template is there.")
    ] = False,
) -> None:
    """Write a realistic phantom dataset (MNI152 anatomy, 3-compartment tumours)."""
    if layout.lower() not in RELEASES:
        fail(f"--layout {layout!r}: expected one of {', '.join(RELEASES)}")
    start = time.perf_counter()
    with Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, transient=True) as bar:
        task = bar.add_task("", total=cases)
        try:
            ids = synthesize(out, n_cases=cases, layout=layout.lower(), shape=shape, seed=seed,
                             use_template=not procedural,
                             on_case=lambda cid: bar.update(task, advance=1, description=cid))
        except (ValueError, FileExistsError) as exc:
            fail(str(exc))
    table = Table(title="mtcmkd synth", show_header=False)
    table.add_row("output", str(out))
    table.add_row("layout", layout)
    table.add_row("cases", str(len(ids)))
    table.add_row("shape", " x ".join(map(str, shape)))
    anatomy = "procedural" if procedural or template_path() is None else "MNI152 2009 (nilearn)"
    table.add_row("anatomy", anatomy)
    table.add_row("seconds", f"{time.perf_counter() - start:.1f}")
    console.print(table)
