"""`mtcmkd summary A B C ...`: one table over the folds (or seeds) of a cross-validation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mtcmkd.brats import REGIONS
from mtcmkd.summary import SummaryError, summarise, write_summary

from .console import console, err_console, failer

fail = failer("summary")


def summary_cmd(
    inputs: Annotated[list[Path], typer.Argument(
        help="metrics.json files of `mtcmkd evaluate`, or run folders / folders holding one "
             "(RUN/eval/metrics.json): the folds or seeds to summarise.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Folder for summary.json and summary.csv.")] = Path("summary"),
) -> None:
    """Each input's mean Dice and HD95 per region, then the mean and standard deviation over
    the inputs (nnU-Net's cross-validation summary). Written to OUT/summary.json and
    OUT/summary.csv (fractions and mm, as metrics.json)."""
    try:
        result = summarise(inputs)
    except SummaryError as exc:
        fail(str(exc))
    json_path, csv_path = write_summary(result, out)
    if result["note"]:
        err_console.print(f"note: {result['note']}", soft_wrap=True)
    if not result["same_cases"]:
        err_console.print("note: the inputs scored different cases (folds of a "
                          "cross-validation do); the mean is over inputs, not over cases",
                          soft_wrap=True)
    table = Table(title=f"summary of {result['n_inputs']} evaluation(s), BraTS "
                        f"{result['year']} rules (Dice, HD95 mm)")
    table.add_column("input")
    table.add_column("split")
    table.add_column("cases", justify="right")
    for metric in result["metrics"]:
        for region in REGIONS:
            table.add_column(f"{metric} {region}", justify="right")

    def cells(values: dict) -> list[str]:
        return [f"{values[m][r]:.4f}" if m != "hd95" else f"{values[m][r]:.2f}"
                for m in result["metrics"] for r in REGIONS]

    for row in result["inputs"]:
        table.add_row(row["input"], str(row["split"]), str(row["n_cases"]), *cells(row))
    table.add_row("[bold]mean[/]", "", "", *cells(result["mean"]))
    table.add_row("sd", "", "", *cells(result["sd"]))
    console.print(table)  # piped, the shared console is wide enough to keep every number
    console.print(f"wrote {json_path} and {csv_path}")
