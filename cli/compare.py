"""`mtcmkd compare A B`: paired difference of two evaluations of the same cases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mtcmkd.brats import REGIONS
from mtcmkd.compare import CompareError, compare

from .console import console, err_console, failer

fail = failer("compare")


def _paths(side: str) -> list[Path]:
    return [Path(p) for p in side.split(",") if p]


def compare_cmd(
    a: Annotated[str, typer.Argument(
        help="Side A: a metrics.json of `mtcmkd evaluate`, or a folder holding one; several "
             "joined by commas are seeds of one model (averaged per case).")],
    b: Annotated[str, typer.Argument(help="Side B, same form as A. Differences are B - A.")],
    metric: Annotated[str, typer.Option(
        help="Per-case metric to compare: dice, hd95, sensitivity, specificity, "
             "lesion_wise_dice, ...")] = "dice",
    region: Annotated[list[str] | None, typer.Option(
        help="Regions to compare (repeatable; default WT, TC, ET). Holm's correction runs "
             "over the regions given.")] = None,
    margin: Annotated[float | None, typer.Option(
        help="Equivalence margin: the verdict is 'equivalent' when the 95% CI of the mean "
             "difference lies within +-margin.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap resampling.")] = 0,
    positive_only: Annotated[bool, typer.Option(
        "--positive-only", help="Compare each region only on the cases whose truth has it "
        "(truth_voxels > 0 in A's files): where the truth lacks a region its Dice is 1 or 0 "
        "by the empty rules alone. Each region's number of cases is shown.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the result as JSON (for scripts) instead of a table.")] = False,
) -> None:
    """Paired comparison of two models on the same cases: per region the mean difference
    B - A, its 95% bootstrap CI over cases, the Wilcoxon signed-rank p (Holm-adjusted over
    regions) and the number of cases. Several files per side are seeds: averaged per case
    first. Cases present on one side only are an error. --positive-only scores each region on
    the cases whose truth contains it.
    """
    regions = tuple(region) if region else tuple(REGIONS)
    unknown = [r for r in regions if r not in REGIONS]
    if unknown:
        fail(f"unknown region {unknown[0]!r} (choose from {', '.join(REGIONS)})")
    if margin is not None and not margin > 0:
        fail(f"--margin must be positive (got {margin})")
    try:
        result = compare(_paths(a), _paths(b), metric=metric, regions=regions, margin=margin,
                         seed=seed, positive_only=positive_only)
    except CompareError as err:
        fail(str(err))
    scored = {result["splits"]["a"][0], result["splits"]["b"][0]} if all(
        len(v) == 1 for v in result["splits"].values()) else {"mixed"}
    if "validation" in scored or "mixed" in scored or len(scored) > 1:
        err_console.print(f"note: the sides were scored on split(s) A {result['splits']['a']}, "
                          f"B {result['splits']['b']}; only a test split that selected neither "
                          "model gives an unbiased comparison", soft_wrap=True)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    seeds = f"{len(result['a'])} vs {len(result['b'])} file(s) per side, seeds averaged per case"
    which = "; each region on the cases whose truth has it" if positive_only else ""
    table = Table(title=f"{metric}: B - A over {result['n_cases']} paired cases ({seeds}{which})")
    for column in ("region", "cases", "mean A", "mean B", "B - A", "95% CI", "Wilcoxon p",
                   "Holm p", "verdict"):
        table.add_column(column, justify="left" if column in ("region", "verdict") else "right")
    for row in result["regions"]:
        table.add_row(row["region"], str(row["n_cases"]), f"{row['mean_a']:.4f}",
                      f"{row['mean_b']:.4f}", f"{row['mean_diff']:+.4f}",
                      f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]",
                      f"{row['wilcoxon_p']:.3g}", f"{row['holm_p']:.3g}", row["verdict"])
    console.print(table)  # piped, the shared console is wide enough to keep every number
