"""Paired comparison of two evaluations of the same cases (`mtcmkd compare A B`).

The question a user asks of distillation is paired: on the same test cases, does model B score
better than model A? Per region this module gives the mean paired difference ``B - A`` over
cases, a 95% percentile-bootstrap confidence interval of that mean, the Wilcoxon signed-rank p
(two-sided), Holm-adjusted over the regions compared, and an equivalence verdict for a margin.

Inputs are ``metrics.json`` files written by `mtcmkd evaluate` (or folders holding one). Several
files per side are several seeds of the same model: each case's value is first averaged over
the seeds, so the unit of analysis is the case (seeds are not independent samples of cases).

Rules, each tested in tests/test_compare.py:
- both sides must hold exactly the same case ids; a case on one side only is an error naming
  it (a silent intersection is how a comparison ends up on different cases);
- every seed file of one side must hold the same case ids;
- a NaN value (e.g. an undefined metric) is an error naming the file and case;
- with fewer than 2 cases, or all differences zero, the Wilcoxon p is 1.0 (no evidence);
- ``positive_only``: each region is compared on the cases whose truth has it (``truth_voxels``
  > 0 in the A files, which must agree across seeds), so a region's ``n_cases`` may be smaller
  than the number of paired cases. A case without the region scores Dice 1 or 0 by the empty
  rules alone (one spurious voxel flips it), which can swamp a small difference on the rest.
  A file without ``truth_voxels`` (an older evaluation) is an error saying to re-run evaluate;
  a region no case has is an error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from mtcmkd.brats import REGIONS

METRICS_NAME = "metrics.json"
N_BOOTSTRAP = 10_000
CONFIDENCE = 0.95


class CompareError(ValueError):
    """An input cannot be compared; the message names the file and the reason."""


@dataclass(frozen=True)
class RegionComparison:
    """One region's paired statistics; ``diff`` is always ``B - A``."""

    region: str
    n_cases: int
    mean_a: float
    mean_b: float
    mean_diff: float
    ci_low: float
    ci_high: float
    wilcoxon_p: float
    holm_p: float
    verdict: str


def resolve_metrics_file(path: Path) -> Path:
    """`path` itself when it is a file, else `path/metrics.json` or `path/eval/metrics.json`."""
    if path.is_file():
        return path
    for candidate in (path / METRICS_NAME, path / "eval" / METRICS_NAME):
        if candidate.is_file():
            return candidate
    if not path.exists():
        raise CompareError(f"{path}: no such file or folder")
    raise CompareError(f"{path}: holds no {METRICS_NAME} (nor eval/{METRICS_NAME}); "
                       "run `mtcmkd evaluate` first")


def _case_records(path: Path) -> list[dict[str, Any]]:
    """The per-case records (``cases``) of one metrics.json."""
    try:
        doc = json.loads(path.read_text())
        cases = doc["cases"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CompareError(f"{path}: not a metrics.json of `mtcmkd evaluate` "
                           f"({type(err).__name__}: {err})") from None
    return cases


def load_case_values(path: Path, metric: str) -> dict[str, dict[str, float]]:
    """case id -> region -> value of `metric` from one metrics.json."""
    values: dict[str, dict[str, float]] = {}
    for record in _case_records(path):
        try:
            case_id = str(record["case"])
            by_region = record[metric]
        except (KeyError, TypeError):
            raise CompareError(f"{path}: a case record has no {metric!r} "
                               f"(metrics there: {sorted(k for k in record if k != 'case')})"
                               ) from None
        if case_id in values:
            raise CompareError(f"{path}: case {case_id} appears twice")
        row = {}
        for region, value in by_region.items():
            value = float(value)
            if math.isnan(value):
                raise CompareError(f"{path}: case {case_id} has NaN {metric} for {region}")
            row[str(region)] = value
        values[case_id] = row
    if not values:
        raise CompareError(f"{path}: no cases")
    return values


def split_of(path: Path) -> str | None:
    """The split a metrics.json says it scored (`test`, `validation`, `all`), or None."""
    try:
        split = json.loads(path.read_text()).get("split")
    except (OSError, ValueError, AttributeError):
        return None
    return None if split is None else str(split)


def seed_average(paths: Sequence[Path], metric: str) -> dict[str, dict[str, float]]:
    """Per case and region, the mean over several metrics.json files (seeds) of one model."""
    per_seed = [(p, load_case_values(p, metric)) for p in paths]
    first_path, first = per_seed[0]
    for path, values in per_seed[1:]:
        if set(values) != set(first):
            only = sorted(set(values) ^ set(first))
            raise CompareError(f"{path}: its cases differ from {first_path}'s "
                               f"(in one only: {', '.join(only[:5])}"
                               f"{' ...' if len(only) > 5 else ''})")
    return {
        case: {region: float(np.mean([v[case][region] for _, v in per_seed]))
               for region in first[case]}
        for case in sorted(first)
    }


def load_truth_voxels(paths: Sequence[Path]) -> dict[str, dict[str, int]]:
    """case id -> region -> voxels of that region in the truth, the same in every file.

    Raises:
        CompareError: a record without ``truth_voxels`` (the file predates them: re-run
            evaluate), or files that disagree (the seeds were scored on different truths).
    """
    first_path: Path | None = None
    first: dict[str, dict[str, int]] = {}
    for path in paths:
        counts: dict[str, dict[str, int]] = {}
        for record in _case_records(path):
            case_id = str(record.get("case")) if isinstance(record, dict) else "?"
            by_region = record.get("truth_voxels") if isinstance(record, dict) else None
            if not isinstance(by_region, dict):
                raise CompareError(
                    f"{path}: case {case_id} has no truth_voxels (written by an older "
                    "`mtcmkd evaluate`); re-run `mtcmkd evaluate` to compare positive cases only")
            counts[case_id] = {str(r): int(v) for r, v in by_region.items()}
        if first_path is None:
            first_path, first = path, counts
        elif counts != first:
            differing = sorted(c for c in set(first) | set(counts) if first.get(c) != counts.get(c))
            raise CompareError(f"{path}: truth_voxels of case {differing[0]} differ from "
                               f"{first_path}'s; the files were scored against different truths")
    return first


def bootstrap_ci(diffs: np.ndarray, *, n_resamples: int = N_BOOTSTRAP,
                 confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of `diffs` (cases resampled with replacement)."""
    if diffs.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    index = rng.integers(0, diffs.size, size=(n_resamples, diffs.size))
    means = diffs[index].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p (scipy's defaults); 1.0 when it is undefined."""
    if diffs.size < 2 or not np.any(diffs != 0):
        return 1.0
    return float(stats.wilcoxon(diffs).pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def verdict(ci_low: float, ci_high: float, margin: float | None,
            higher_is_better: bool = True) -> str:
    """What the CI says: B better / B worse (CI excludes 0), equivalent (CI within +-margin).

    Equivalence uses the 95% CI, which is stricter than the two one-sided tests at 5% (a 90%
    CI).
    """
    if margin is not None and -margin < ci_low and ci_high < margin:
        return f"equivalent (CI within +-{margin:g})"
    if ci_low > 0:
        return "B better" if higher_is_better else "B worse"
    if ci_high < 0:
        return "B worse" if higher_is_better else "B better"
    return "no difference resolved" if margin is None else "inconclusive"


def compare(a_paths: Sequence[Path], b_paths: Sequence[Path], *, metric: str = "dice",
            regions: Sequence[str] = tuple(REGIONS), margin: float | None = None,
            seed: int = 0, positive_only: bool = False) -> dict[str, Any]:
    """Compare side A (one or more metrics.json, seeds of one model) with side B.

    Args:
        positive_only: compare each region on the cases whose truth has it (``truth_voxels``
            > 0 in the A files); each region's ``n_cases`` then says how many.

    Returns:
        A JSON-ready dict: ``metric``, ``a``/``b`` (files), ``cases`` (the paired ids),
        ``positive_only``, ``regions`` (one :class:`RegionComparison` each, as a dict),
        ``per_case`` (region -> case -> B - A, over the cases that region was compared on).

    Raises:
        CompareError: unreadable input, cases on one side only, NaN values; with
            `positive_only`, files without ``truth_voxels`` or a region no case has.
    """
    a_files = [resolve_metrics_file(Path(p)) for p in a_paths]
    b_files = [resolve_metrics_file(Path(p)) for p in b_paths]
    a, b = seed_average(a_files, metric), seed_average(b_files, metric)
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"only in A: {', '.join(only_a[:5])}{' ...' if len(only_a) > 5 else ''}")
        if only_b:
            parts.append(f"only in B: {', '.join(only_b[:5])}{' ...' if len(only_b) > 5 else ''}")
        raise CompareError(f"{b_files[0]}: not the same cases as {a_files[0]} "
                           f"({'; '.join(parts)})")
    cases = sorted(a)
    truth = load_truth_voxels(a_files) if positive_only else {}
    rows: list[RegionComparison] = []
    per_case: dict[str, dict[str, float]] = {}
    raw_p = []
    higher_is_better = "hd95" not in metric  # distances: lower is better
    for region in regions:
        missing = [c for c in cases if region not in a[c] or region not in b[c]]
        if missing:
            raise CompareError(f"region {region!r} missing for case {missing[0]}")
        scored = cases
        if positive_only:
            scored = [c for c in cases if truth[c].get(region, 0) > 0]
            if not scored:
                raise CompareError(f"{a_files[0]}: no case has {region} in its truth "
                                   "(truth_voxels 0 everywhere); nothing to compare")
        va = np.array([a[c][region] for c in scored])
        vb = np.array([b[c][region] for c in scored])
        diffs = vb - va
        per_case[region] = {c: float(d) for c, d in zip(scored, diffs, strict=True)}
        low, high = bootstrap_ci(diffs, seed=seed)
        raw_p.append(wilcoxon_p(diffs))
        rows.append(RegionComparison(region, len(scored), float(va.mean()), float(vb.mean()),
                                     float(diffs.mean()), low, high, raw_p[-1], math.nan,
                                     verdict(low, high, margin, higher_is_better)))
    adjusted = holm(raw_p)
    rows = [RegionComparison(**{**asdict(r), "holm_p": p}) for r, p in zip(rows, adjusted,
                                                                            strict=True)]
    return {
        "metric": metric,
        "a": [str(p) for p in a_files],
        "b": [str(p) for p in b_files],
        "n_cases": len(cases),
        "cases": cases,
        "positive_only": positive_only,
        "confidence": CONFIDENCE,
        "bootstrap_resamples": N_BOOTSTRAP,
        "margin": margin,
        "splits": {"a": sorted({str(split_of(p)) for p in a_files}),
                   "b": sorted({str(split_of(p)) for p in b_files})},
        "regions": [asdict(r) for r in rows],
        "per_case": per_case,
    }
