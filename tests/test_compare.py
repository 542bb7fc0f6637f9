"""`mtcmkd compare`: paired statistics checked against scipy on known data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from mtcmkd.cli.main import app
from mtcmkd.compare import CompareError, bootstrap_ci, compare, holm, verdict, wilcoxon_p

REGIONS = ("WT", "TC", "ET")


def write_metrics(path: Path, values: dict[str, dict[str, float]],
                  metric: str = "dice", truth: dict[str, dict[str, int]] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cases = [{"case": c, metric: v, "hd95": {r: 1.0 for r in REGIONS}}
             for c, v in values.items()]
    if truth is not None:
        for record in cases:
            record["truth_voxels"] = truth[record["case"]]
    path.write_text(json.dumps({"year": "2021", "cases": cases}))
    return path


def side(rng: np.random.Generator, n: int, shift: float, base: np.ndarray | None = None
         ) -> dict[str, dict[str, float]]:
    base = rng.uniform(0.6, 0.9, size=(n, 3)) if base is None else base
    noise = rng.normal(0, 0.02, size=(n, 3))
    return {f"case_{i:03d}": {r: float(base[i, j] + shift + noise[i, j])
                              for j, r in enumerate(REGIONS)} for i in range(n)}


def test_matches_scipy_on_known_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    base = rng.uniform(0.6, 0.9, size=(30, 3))
    a = write_metrics(tmp_path / "a" / "metrics.json", side(rng, 30, 0.0, base))
    b = write_metrics(tmp_path / "b" / "metrics.json", side(rng, 30, 0.03, base))
    result = compare([a], [tmp_path / "b"])  # a folder holding metrics.json works too
    assert result["n_cases"] == 30
    va = json.loads(a.read_text())["cases"]
    vb = json.loads(b.read_text())["cases"]
    for j, row in enumerate(result["regions"]):
        region = REGIONS[j]
        diffs = np.array([y["dice"][region] - x["dice"][region] for x, y in zip(va, vb, strict=True)])
        assert row["mean_diff"] == pytest.approx(diffs.mean(), abs=1e-12)
        assert row["wilcoxon_p"] == pytest.approx(stats.wilcoxon(diffs).pvalue, rel=1e-12)
        ref = stats.bootstrap((diffs,), np.mean, confidence_level=0.95, method="percentile",
                              n_resamples=10_000, random_state=0).confidence_interval
        assert row["ci_low"] == pytest.approx(ref.low, abs=2e-3)
        assert row["ci_high"] == pytest.approx(ref.high, abs=2e-3)
        assert row["ci_low"] < diffs.mean() < row["ci_high"]
        assert row["verdict"] == "B better"
    assert [r["holm_p"] for r in result["regions"]] == pytest.approx(
        holm([r["wilcoxon_p"] for r in result["regions"]]))


def test_holm_by_hand() -> None:
    # sorted 0.01, 0.02, 0.04 -> 3*0.01, 2*0.02, 1*0.04, monotone
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_seeds_are_averaged_per_case_first(tmp_path: Path) -> None:
    ids = ["c1", "c2", "c3"]
    a1 = write_metrics(tmp_path / "a1.json", {c: dict.fromkeys(REGIONS, 0.5) for c in ids})
    a2 = write_metrics(tmp_path / "a2.json", {c: dict.fromkeys(REGIONS, 0.7) for c in ids})
    b = write_metrics(tmp_path / "b.json", {c: dict.fromkeys(REGIONS, 0.6) for c in ids})
    result = compare([a1, a2], [b])
    for row in result["regions"]:
        assert row["mean_a"] == pytest.approx(0.6)
        assert row["mean_diff"] == pytest.approx(0.0)
        assert row["wilcoxon_p"] == 1.0  # all differences zero: no evidence


def test_cases_on_one_side_only_are_named(tmp_path: Path) -> None:
    a = write_metrics(tmp_path / "a.json", {c: dict.fromkeys(REGIONS, 0.5) for c in "xyz"})
    b = write_metrics(tmp_path / "b.json", {c: dict.fromkeys(REGIONS, 0.5) for c in "xyw"})
    with pytest.raises(CompareError, match="only in A: z; only in B: w"):
        compare([a], [b])
    seed2 = write_metrics(tmp_path / "a2.json", {c: dict.fromkeys(REGIONS, 0.5) for c in "xy"})
    with pytest.raises(CompareError, match="a2.json: its cases differ"):
        compare([a, seed2], [a])


def test_nan_and_bad_files_are_refused(tmp_path: Path) -> None:
    a = write_metrics(tmp_path / "a.json", {"c": {"WT": float("nan"), "TC": 0.1, "ET": 0.1}})
    with pytest.raises(CompareError, match="case c has NaN dice for WT"):
        compare([a], [a])
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(CompareError, match="bad.json: not a metrics.json"):
        compare([bad], [bad])
    with pytest.raises(CompareError, match="holds no metrics.json"):
        compare([tmp_path], [tmp_path])


def test_verdicts() -> None:
    assert verdict(0.01, 0.03, None) == "B better"
    assert verdict(-0.03, -0.01, None) == "B worse"
    assert verdict(-0.01, 0.01, None) == "no difference resolved"
    assert verdict(-0.01, 0.01, 0.02).startswith("equivalent")
    assert verdict(-0.01, 0.03, 0.02) == "inconclusive"
    assert verdict(0.5, 1.0, None, higher_is_better=False) == "B worse"  # larger HD95


def test_bootstrap_and_wilcoxon_edge_cases() -> None:
    assert wilcoxon_p(np.array([0.1])) == 1.0
    low, high = bootstrap_ci(np.full(10, 0.25))
    assert low == high == pytest.approx(0.25)


def test_cli_table_json_and_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 0.9, size=(12, 3))
    a = write_metrics(tmp_path / "a.json", side(rng, 12, 0.0, base))
    b = write_metrics(tmp_path / "b.json", side(rng, 12, 0.001, base))
    runner = CliRunner()
    res = runner.invoke(app, ["compare", str(a), str(b), "--margin", "0.05"])
    assert res.exit_code == 0, res.output
    assert "paired cases" in res.output and "equivalent" in res.output
    res = runner.invoke(app, ["compare", f"{a},{a}", str(b), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["n_cases"] == 12 and len(doc["a"]) == 2
    assert set(doc["per_case"]) == set(REGIONS)
    other = write_metrics(tmp_path / "c.json", {"only_here": dict.fromkeys(REGIONS, 0.5)})
    res = runner.invoke(app, ["compare", str(a), str(other)])
    assert res.exit_code == 2
    assert "only in B: only_here" in res.output


def test_validation_split_is_noted(tmp_path: Path) -> None:
    values = {c: dict.fromkeys(REGIONS, 0.5) for c in ("x", "y")}
    a = write_metrics(tmp_path / "a.json", values)
    doc = json.loads(a.read_text())
    doc["split"] = "validation"
    a.write_text(json.dumps(doc))
    b = write_metrics(tmp_path / "b.json", values)
    doc = json.loads(b.read_text())
    doc["split"] = "test"
    b.write_text(json.dumps(doc))
    assert compare([a], [b])["splits"] == {"a": ["validation"], "b": ["test"]}
    res = CliRunner().invoke(app, ["compare", str(a), str(b)])
    assert res.exit_code == 0
    assert "note: the sides were scored on split(s)" in res.output



# --- --positive-only: each region on the cases whose truth has it ---------------------------


def et_negative_study(tmp_path: Path) -> tuple[list[Path], Path, list[str], dict]:
    """Two seeds of A and one B over 20 cases, 6 of which have no ET in the truth: there A
    scores ET Dice 1 (both empty) and B 0 (a spurious voxel), the rest differ by ~+0.03."""
    rng = np.random.default_rng(7)
    ids = [f"case_{i:02d}" for i in range(20)]
    no_et = set(ids[::3][:6])
    truth = {c: {"WT": 900, "TC": 300, "ET": 0 if c in no_et else 120} for c in ids}
    base = rng.uniform(0.6, 0.9, size=(20, 3))
    sides = []
    for shift, offset in ((0.0, 0.01), (0.0, -0.01), (0.03, 0.0)):
        values = {c: {r: float(base[i, j] + shift + offset + rng.normal(0, 0.02))
                      for j, r in enumerate(REGIONS)} for i, c in enumerate(ids)}
        for c in no_et:
            values[c]["ET"] = 0.0 if shift else 1.0
        sides.append(values)
    a = [write_metrics(tmp_path / f"a{k}.json", sides[k], truth=truth) for k in (0, 1)]
    b = write_metrics(tmp_path / "b.json", sides[2], truth=truth)
    return a, b, sorted(c for c in ids if c not in no_et), sides


def test_positive_only_matches_scipy_on_the_positive_cases(tmp_path: Path) -> None:
    a, b, et_cases, sides = et_negative_study(tmp_path)
    everything = compare(a, [b])
    result = compare(a, [b], positive_only=True)
    assert result["positive_only"] is True and everything["positive_only"] is False
    assert result["n_cases"] == 20
    wt, tc, et = result["regions"]
    assert (wt["n_cases"], tc["n_cases"], et["n_cases"]) == (20, 20, 14)
    assert everything["regions"][2]["n_cases"] == 20
    assert sorted(result["per_case"]["ET"]) == et_cases
    assert len(result["per_case"]["WT"]) == 20
    for row in result["regions"]:
        region = row["region"]
        cases = et_cases if region == "ET" else sorted(sides[0])
        va = np.array([(sides[0][c][region] + sides[1][c][region]) / 2 for c in cases])
        vb = np.array([sides[2][c][region] for c in cases])
        diffs = vb - va
        assert row["mean_a"] == pytest.approx(va.mean(), abs=1e-12)
        assert row["mean_diff"] == pytest.approx(diffs.mean(), abs=1e-12)
        assert row["wilcoxon_p"] == pytest.approx(stats.wilcoxon(diffs).pvalue, rel=1e-12)
        ref = stats.bootstrap((diffs,), np.mean, confidence_level=0.95, method="percentile",
                              n_resamples=10_000, random_state=0).confidence_interval
        assert row["ci_low"] == pytest.approx(ref.low, abs=2e-3)
        assert row["ci_high"] == pytest.approx(ref.high, abs=2e-3)
        assert row["verdict"] == "B better"
    assert [r["holm_p"] for r in result["regions"]] == pytest.approx(
        holm([r["wilcoxon_p"] for r in result["regions"]]))
    # On every case the empty-truth ET cases (1 -> 0) swamp the +0.03 of the others.
    assert everything["regions"][2]["mean_diff"] < 0 < et["mean_diff"]
    # A region alone: n_cases and Holm over that one region.
    only_et = compare(a, [b], regions=("ET",), positive_only=True)["regions"]
    assert only_et[0]["n_cases"] == 14 and only_et[0]["holm_p"] == only_et[0]["wilcoxon_p"]


def test_positive_only_refuses_files_without_truth_voxels(tmp_path: Path) -> None:
    a, b, _, sides = et_negative_study(tmp_path)
    old = write_metrics(tmp_path / "old" / "metrics.json", sides[0])
    compare([old], [b])  # without --positive-only, an older file is fine
    with pytest.raises(CompareError, match=r"old/metrics.json: case case_00 has no "
                                           r"truth_voxels.*re-run `mtcmkd evaluate`"):
        compare([old], [b], positive_only=True)
    with pytest.raises(CompareError, match="old/metrics.json: case case_00 has no truth_voxels"):
        compare([a[0], old], [b], positive_only=True)


def test_positive_only_refuses_disagreeing_truths_and_absent_regions(tmp_path: Path) -> None:
    ids = ["x", "y", "z"]
    values = {c: dict.fromkeys(REGIONS, 0.5) for c in ids}
    truth = {c: {"WT": 10, "TC": 5, "ET": 0} for c in ids}
    a1 = write_metrics(tmp_path / "a1.json", values, truth=truth)
    other = {**truth, "y": {"WT": 11, "TC": 5, "ET": 0}}
    a2 = write_metrics(tmp_path / "a2.json", values, truth=other)
    with pytest.raises(CompareError, match="a2.json: truth_voxels of case y differ from"):
        compare([a1, a2], [a1], positive_only=True)
    with pytest.raises(CompareError, match="a1.json: no case has ET in its truth"):
        compare([a1], [a1], positive_only=True)
    rows = compare([a1], [a1], regions=("WT", "TC"), positive_only=True)["regions"]
    assert [r["n_cases"] for r in rows] == [3, 3]


def test_cli_positive_only(tmp_path: Path) -> None:
    a, b, _, _ = et_negative_study(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["compare", f"{a[0]},{a[1]}", str(b), "--positive-only", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["positive_only"] is True
    assert [r["n_cases"] for r in doc["regions"]] == [20, 20, 14]
    res = runner.invoke(app, ["compare", str(a[0]), str(b), "--positive-only"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # the title may wrap
    assert "each region on the cases whose truth has it" in text
    assert "│ ET │ 14 │" in text and "│ WT │ 20 │" in text
    old = write_metrics(tmp_path / "old.json", {"case_00": dict.fromkeys(REGIONS, 0.5)})
    res = runner.invoke(app, ["compare", str(old), str(old), "--positive-only"])
    assert res.exit_code == 2
    assert "has no truth_voxels" in res.output
