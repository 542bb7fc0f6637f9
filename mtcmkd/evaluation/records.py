"""An evaluation's results and its files: metrics.json, metrics.csv, and the output folder.

:func:`score_predictions` scores a stream of cases (one in memory at a time) into an
:class:`Evaluation`; :func:`write_metrics` writes it as ``metrics.json`` (the whole record:
rules, source, cases, means) and ``metrics.csv`` (one row per case and a mean row), each
atomically.
:func:`check_output_folder` refuses an unusable output folder before any work is done.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtcmkd.atomic import atomic_write_text
from mtcmkd.brats import REGIONS
from mtcmkd.evaluation.rules import (
    LEGACY_SLICE_DICE_NOTE,
    EvaluationSettings,
    ScoringCase,
    score_case_record,
)
from mtcmkd.nifti_io import InputError

__all__ = ["Evaluation", "check_output_folder", "score_predictions", "write_metrics"]


@dataclass
class Evaluation:
    """Scored cases plus how they were scored; :meth:`to_json` is metrics.json."""

    settings: EvaluationSettings
    cases: list[dict[str, Any]]
    source: dict[str, Any] = field(default_factory=dict)

    def mean(self) -> dict[str, dict[str, float]]:
        """Per metric and region, the mean over cases (NaN when there are no cases)."""
        return {
            metric: {
                region: (float(np.mean([c[metric][region] for c in self.cases]))
                         if self.cases else math.nan)
                for region in REGIONS
            }
            for metric in self.settings.metric_names
        }

    def to_json(self) -> dict[str, Any]:
        """The metrics.json document.

        Keys: ``year``, ``split`` (which of a run's splits was scored: "test", "validation" or
        "all", from ``source``; None for prediction files, which belong to no run),
        ``case_ids`` (exactly the cases scored, in order), ``rules``, ``hd95_definition``,
        ``postprocessing``, ``source`` (what was scored), ``cases`` (one record per case, see
        :func:`score_case_record`), ``mean``; plus ``split_note`` when the split is not an
        honest estimate (the validation split selected the model), ``lesion_wise``
        (sub-challenge and its parameters) for 2023+ and ``legacy_slice_dice_note`` only when
        that metric was asked for.
        """
        relabelled = (sum(bool(c.get("et_relabelled")) for c in self.cases)
                      if self.settings.postprocess_et is not None else None)
        doc: dict[str, Any] = {
            "year": self.settings.year_value,
            "split": self.source.get("split"),
        }
        if self.source.get("split_note"):
            doc["split_note"] = self.source["split_note"]
        doc |= {
            "case_ids": [c["case"] for c in self.cases],
            "rules": self.settings.rules,
            "hd95_definition": self.settings.hd95_definition,
            "postprocessing": self.settings.postprocessing(relabelled),
            "source": self.source,
            "cases": self.cases,
            "mean": self.mean(),
        }
        if self.settings.lesion_wise:
            params = self.settings.lesion_parameters
            doc["lesion_wise"] = {
                "subchallenge": params.subchallenge,
                "dilation_iterations": params.dilation_iterations,
                "dilation_structure": "18-neighbourhood (generate_binary_structure(3, 2))",
                "volume_threshold_mm3": params.volume_threshold_mm3,
            }
        if self.settings.legacy_slice_dice:
            doc["legacy_slice_dice_note"] = LEGACY_SLICE_DICE_NOTE
        return doc

    def csv_rows(self) -> tuple[list[str], list[list[str]]]:
        """Header, one row per case (``case``, ``<metric>_<region>``... as fractions and mm,
        like metrics.json), then a ``mean`` row; the post-processing columns only when
        post-processing was on (``postprocess_et`` = its voxel threshold, ``et_relabelled``
        0/1 per case and the count in the mean row)."""
        names = self.settings.metric_names
        post = self.settings.postprocess_et
        header = ["case"] + [f"{m}_{r}" for m in names for r in REGIONS]
        if post is not None:
            header += ["postprocess_et", "et_relabelled"]
        rows = []
        for c in self.cases:
            row = [c["case"]] + [f"{c[m][r]:.6g}" for m in names for r in REGIONS]
            if post is not None:
                row += [str(post), str(int(bool(c.get("et_relabelled"))))]
            rows.append(row)
        if self.cases:
            means = self.mean()
            row = ["mean"] + [f"{means[m][r]:.6g}" for m in names for r in REGIONS]
            if post is not None:
                row += [str(post), str(sum(bool(c.get("et_relabelled")) for c in self.cases))]
            rows.append(row)
        return header, rows


def score_predictions(cases: Iterable[ScoringCase], settings: EvaluationSettings, *,
                      source: dict[str, Any] | None = None,
                      on_case: Callable[[ScoringCase, dict[str, Any]], None] | None = None,
                      ) -> Evaluation:
    """Score every case of `cases` (consumed lazily: one case in memory at a time).

    Args:
        cases: canonical predictions and truths on the native grid.
        settings: year (rules), post-processing, legacy slice Dice.
        source: what was scored (run, store, prediction folder...), copied to metrics.json.
        on_case: called after each case with the case and its record (progress, overlays).

    Raises:
        ValueError: prediction and truth shapes differ.
    """
    records = []
    for case in cases:
        if case.prediction.shape != case.truth.shape:
            raise ValueError(f"case {case.case_id}: prediction shape {case.prediction.shape} "
                             f"differs from the truth's {case.truth.shape}")
        record = score_case_record(case, settings)
        records.append(record)
        if on_case is not None:
            on_case(case, record)
    return Evaluation(settings, records, dict(source or {}))


def write_metrics(evaluation: Evaluation, out_dir: Path) -> tuple[Path, Path]:
    """Write ``out_dir/metrics.json`` and ``out_dir/metrics.csv`` (each atomically).

    Returns:
        (json path, csv path).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / "metrics.json", out_dir / "metrics.csv"
    atomic_write_text(json_path, json.dumps(evaluation.to_json(), indent=2) + "\n")
    header, rows = evaluation.csv_rows()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(csv_path, buffer.getvalue())
    return json_path, csv_path


def check_output_folder(path: Path, files: Sequence[str] = ()) -> None:
    """Refuse an output folder that cannot hold the outputs, before any work is done.

    Nothing is created; what is checked: `path` is a folder or can be made one (its nearest
    existing ancestor is a writable folder, not a file), and none of `files` (names inside
    `path`) is a folder where a file must go.

    Raises:
        InputError: naming the path at fault.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, "exists and is not a folder; pass a folder for the outputs")
    for name in files:
        if (path / name).is_dir():
            raise InputError(path / name, "is a folder where an output file goes; remove or "
                                          "rename it")
    ancestor = path
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(ancestor, f"is not a folder, so {path} cannot be created")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(ancestor, "not writable")
