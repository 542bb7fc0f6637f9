"""A summary over several evaluations: the folds of a cross-validation, or the seeds of one model
(`mtcmkd summary`).

nnU-Net users expect one table at the end of a cross-validation: each fold's mean per region and
metric, and the mean +- standard deviation over folds. Inputs are ``metrics.json`` files of
`mtcmkd evaluate` (or run folders / folders holding one, as for `mtcmkd compare`). The summary
says which split each input scored; a validation split selected its model, so its numbers are
optimistic and the summary says so.

Outputs (``summary.json``, ``summary.csv``) hold one row per input and two rows ``mean`` and
``sd`` (sample standard deviation over the inputs, 0 for one input), fractions for Dice and mm
for HD95, as metrics.json does.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtcmkd.atomic import atomic_write_text
from mtcmkd.brats import REGIONS
from mtcmkd.compare import CompareError, resolve_metrics_file

__all__ = ["SummaryError", "summarise", "write_summary"]

METRICS = ("dice", "hd95")


class SummaryError(ValueError):
    """An input cannot be summarised; the message names the file and the reason."""


def _read(path: Path) -> tuple[Path, dict[str, Any]]:
    try:
        file = resolve_metrics_file(Path(path))
    except CompareError as exc:
        raise SummaryError(str(exc)) from None
    try:
        doc = json.loads(file.read_text())
        means = doc["mean"]
        n_cases = len(doc["cases"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SummaryError(f"{file}: not a metrics.json of `mtcmkd evaluate` "
                           f"({type(exc).__name__}: {exc})") from None
    return file, {"means": means, "n_cases": n_cases, "split": doc.get("split"),
                  "year": doc.get("year"), "case_ids": doc.get("case_ids") or []}


def summarise(paths: Sequence[Path], *, metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """Per input its means, then the mean and sd over inputs, per metric and region.

    Raises:
        SummaryError: no input, an unreadable input, the same file twice, inputs of different
            BraTS years (different rules), or a metric missing from an input.
    """
    if not paths:
        raise SummaryError("no evaluation given; pass metrics.json files or run folders")
    rows: list[dict[str, Any]] = []
    case_sets: list[set[str]] = []
    seen: dict[Path, Path] = {}
    for path in paths:
        file, doc = _read(Path(path))
        resolved = file.resolve()
        if resolved in seen:
            raise SummaryError(f"{path}: the same metrics.json as {seen[resolved]} "
                               "(each fold or seed once)")
        seen[resolved] = Path(path)
        values: dict[str, dict[str, float]] = {}
        for metric in metrics:
            if metric not in doc["means"]:
                raise SummaryError(f"{file}: has no mean {metric!r} (has "
                                   f"{', '.join(sorted(doc['means']))})")
            values[metric] = {r: float(doc["means"][metric][r]) for r in REGIONS}
        case_sets.append(set(doc["case_ids"]))
        rows.append({"input": str(path), "file": str(file), "split": doc["split"],
                     "year": doc["year"], "n_cases": doc["n_cases"], **values})
    years = sorted({str(r["year"]) for r in rows})
    if len(years) > 1:
        raise SummaryError(f"{rows[-1]['file']}: scored with BraTS {rows[-1]['year']} rules, "
                           f"{rows[0]['file']} with {rows[0]['year']}; summarise one release")
    mean: dict[str, dict[str, float]] = {}
    sd: dict[str, dict[str, float]] = {}
    for metric in metrics:
        mean[metric], sd[metric] = {}, {}
        for region in REGIONS:
            xs = [r[metric][region] for r in rows]
            m = sum(xs) / len(xs)
            mean[metric][region] = m
            sd[metric][region] = (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
                                  if len(xs) > 1 else 0.0)
    splits = sorted({str(r["split"]) for r in rows})
    note = None
    if "validation" in splits or "all" in splits:
        note = ("some inputs scored a split that selected their model (validation) or that "
                "holds training cases (all): those numbers are optimistic")
    return {"n_inputs": len(rows), "metrics": list(metrics), "splits": splits, "note": note,
            "year": rows[0]["year"], "inputs": rows, "mean": mean, "sd": sd,
            "same_cases": all(c == case_sets[0] for c in case_sets)}


def write_summary(summary: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``out_dir/summary.json`` and ``out_dir/summary.csv`` (atomically); returns both."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / "summary.json", out_dir / "summary.csv"
    atomic_write_text(json_path, json.dumps(summary, indent=2) + "\n")
    metrics = summary["metrics"]
    header = ["input", "split", "n_cases"] + [f"{m}_{r}" for m in metrics for r in REGIONS]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in summary["inputs"]:
        writer.writerow([row["input"], row["split"], row["n_cases"]]
                        + [f"{row[m][r]:.6g}" for m in metrics for r in REGIONS])
    for name in ("mean", "sd"):
        writer.writerow([name, "", ""] + [f"{summary[name][m][r]:.6g}"
                                          for m in metrics for r in REGIONS])
    atomic_write_text(csv_path, buffer.getvalue())
    return json_path, csv_path
