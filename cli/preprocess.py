"""`mtcmkd preprocess`: raw BraTS (any release) -> one chunked Zarr v3 store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .console import console, err_console, failer

fail = failer("preprocess")


def preprocess(
    raw: Annotated[Path, typer.Argument(help="Raw BraTS folder as distributed.")],
    store: Annotated[Path, typer.Argument(help="Zarr store to create or complete.")],
    year: Annotated[str | None, typer.Option(
        help="Force the release (2018, 2019, 2020, 2021, 2023, msd); default: detect.")] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Parallel processes.")] = 1,
    folds: Annotated[int, typer.Option(help="Number of cross-validation folds.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the fold split.")] = 0,
    dtype: Annotated[str, typer.Option(help="Image dtype in the store: float16 or float32.")] = (
        "float16"),
    chunk: Annotated[int, typer.Option(help="Edge of the cubic inner chunks (voxels).")] = 64,
    codec: Annotated[str, typer.Option(
        help="Blosc codec: lz4 (fastest patch reads) or zstd (about 20% smaller).")] = "lz4",
    labels: Annotated[str, typer.Option(
        help="auto (a seg is required when any case has one), required, or optional.")] = "auto",
    report: Annotated[Path | None, typer.Option(
        help="Also write the JSON report here (always written to STORE/preprocess_report.json).")
    ] = None,
) -> None:
    """Convert every case: check, crop to the brain, z-score, store float16 + uint8 labels.

    Resumable: finished cases are kept, a killed run's leftovers are discarded. Exit code 1
    when any case failed (each failure is one line; details in the JSON report).
    """
    if labels not in ("auto", "required", "optional"):
        fail(f"--labels {labels!r}: expected auto, required or optional")
    if workers < 1:
        fail(f"--workers must be >= 1 (got {workers})")
    if chunk < 8:
        fail(f"--chunk must be >= 8 (got {chunk})")
    from mtcmkd.preprocessing import DatasetError
    from mtcmkd.preprocessing import preprocess as run_preprocess

    # auto_refresh=False: no refresh thread exists when the worker processes are forked.
    progress = Progress(TextColumn("preprocess"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.description}"), console=console,
                        auto_refresh=False, transient=True)
    state: dict = {}

    def on_start(n: int) -> None:
        state["task"] = progress.add_task("", total=n)
        progress.refresh()

    def on_result(result) -> None:
        if result.status == "failed":
            progress.console.print(f"[red]failed[/] {result.error}", soft_wrap=True)
        progress.update(state["task"], advance=1, description=result.case_id, refresh=True)

    try:
        with progress:
            rep = run_preprocess(raw, store, year=year, workers=workers, n_folds=folds, seed=seed,
                                 image_dtype=dtype, chunk=chunk, codec=codec, labels=labels,
                                 on_start=on_start, on_result=on_result)
    except (DatasetError, ValueError) as exc:
        fail(str(exc))
    if report is not None:
        report.write_text(json.dumps(rep.to_json(), indent=2) + "\n")

    table = Table(title=f"mtcmkd preprocess -> {store}")
    for col in ("converted", "skipped", "failed", "releases", "seconds", "s/case"):
        table.add_column(col, justify="right")
    n_conv = rep.count("converted")
    per_case = sum(r.seconds for r in rep.results if r.status == "converted") / max(n_conv, 1)
    table.add_row(str(n_conv), str(rep.count("skipped")), str(len(rep.failed)),
                  ",".join(rep.releases), f"{rep.seconds:.1f}", f"{per_case:.2f}")
    console.print(table)
    if rep.failed:
        err_console.print(f"[bold red]{len(rep.failed)} case(s) failed[/]; report: "
                          f"{store / 'preprocess_report.json'}", soft_wrap=True)
        raise typer.Exit(1)
