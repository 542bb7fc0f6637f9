"""`mtcmkd demo`: synth -> preprocess -> DeepSpeed training -> evaluate -> report -> export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .console import console, failer
from .demo_steps import DemoError, DemoSettings, run_demo

fail = failer("demo")


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (must not exist or be "
                                                            "empty).")] = Path("demo_out"),
    cases: Annotated[int, typer.Option(help="Phantom cases (a fifth are held out as the test set, the rest split in folds).")] = 12,
    shape: Annotated[tuple[int, int, int], typer.Option(
        help="Phantom volume shape (X Y Z); BraTS is 240 240 155.")] = (64, 64, 48),
    ranks: Annotated[int, typer.Option(help="DeepSpeed data-parallel ranks (CPU processes).")
                     ] = 2,
    epochs: Annotated[int, typer.Option(help="Training epochs (KD starts at epoch 1).")] = 6,
    iters: Annotated[int, typer.Option(help="Optimiser steps per epoch.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the phantom and of training.")] = 0,
    cpp: Annotated[bool, typer.Option(
        "--cpp/--no-cpp", help="Build the C++ client and run the export with it too.")] = True,
) -> None:
    """Run the main job end to end on the embedded phantom (about 10 min on 2 CPU cores).

    Steps: synth (BraTS 2021 layout) -> preprocess (Zarr) -> store-info -> MTCM-KD training with
    DeepSpeed on RANKS CPU processes (torchrun) -> evaluate on the store's test cases (BraTS rules,
    overlay PNGs) -> report (curves) -> export torchscript --verify -> the exported file on one
    test case from Python and from the C++ client. Each step prints the command it runs;
    a final table and OUT/demo_summary.json give times and results.
    """
    if cases < 4:
        fail(f"--cases {cases}: need at least 4 (one fold of 4 is held out)")
    if ranks < 1 or epochs < 1 or iters < 1:
        fail("--ranks, --epochs and --iters must be >= 1")
    settings = DemoSettings(out=out, cases=cases, shape=shape, ranks=ranks, epochs=epochs,
                            iters=iters, seed=seed, cpp=cpp)
    try:
        steps = run_demo(settings, say=lambda m: console.print(m, highlight=False,
                                                               soft_wrap=True),
                         rule=_rule)
    except DemoError as exc:
        fail(str(exc), code=1)
    table = Table(title=f"mtcmkd demo -> {out}")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    table.add_column("result")
    for step in steps:
        table.add_row(step.name, f"{step.seconds:.1f}", step.result)
    table.add_row("total", f"{sum(s.seconds for s in steps):.1f}", f"{out / 'demo_summary.json'}")
    console.print(table)


def _rule(title: str) -> None:
    """A step's heading: rich's full-width rule on a terminal, a short line in a log (the
    console is very wide when piped, so a rule would be hundreds of characters)."""
    if console.is_terminal:
        console.rule(f"[bold]{title}")
    else:
        console.print(f"== {title} ==", markup=False, soft_wrap=True)
