"""`mtcmkd summary`: per-fold means and the mean +- sd over folds, from metrics.json files."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtcmkd.cli.main import app
from mtcmkd.summary import SummaryError, summarise, write_summary

REGIONS = ("WT", "TC", "ET")


def metrics_file(folder: Path, dice: tuple[float, float, float], *, split: str = "test",
                 year: int = 2021, cases: tuple[str, ...] = ("a", "b")) -> Path:
    folder.mkdir(parents=True)
    records = [{"case": c, "dice": dict(zip(REGIONS, dice, strict=True)),
                "hd95": {r: 2.0 for r in REGIONS}} for c in cases]
    doc = {"year": year, "split": split, "case_ids": list(cases), "cases": records,
           "mean": {"dice": dict(zip(REGIONS, dice, strict=True)),
                    "hd95": {r: 2.0 for r in REGIONS}}}
    (folder / "metrics.json").write_text(json.dumps(doc))
    return folder


def test_mean_and_sd_over_folds_match_statistics(tmp_path) -> None:
    folds = [metrics_file(tmp_path / f"f{i}", d, cases=(f"c{i}",))
             for i, d in enumerate([(0.9, 0.8, 0.7), (0.8, 0.7, 0.5), (0.85, 0.9, 0.6)])]
    result = summarise(folds)
    for k, region in enumerate(REGIONS):
        xs = [[0.9, 0.8, 0.7], [0.8, 0.7, 0.5], [0.85, 0.9, 0.6]]
        values = [x[k] for x in xs]
        assert result["mean"]["dice"][region] == pytest.approx(statistics.mean(values))
        assert result["sd"]["dice"][region] == pytest.approx(statistics.stdev(values))
    assert result["same_cases"] is False and result["note"] is None
    json_path, csv_path = write_summary(result, tmp_path / "out")
    rows = list(csv.reader(csv_path.open()))
    assert rows[0][:4] == ["input", "split", "n_cases", "dice_WT"]
    assert [r[0] for r in rows[-2:]] == ["mean", "sd"]
    assert float(rows[-2][3]) == pytest.approx(0.85)
    assert json.loads(json_path.read_text())["n_inputs"] == 3


def test_one_input_has_sd_zero_and_a_validation_split_is_flagged(tmp_path) -> None:
    result = summarise([metrics_file(tmp_path / "v", (0.9, 0.9, 0.9), split="validation")])
    assert result["sd"]["dice"]["WT"] == 0.0
    assert "optimistic" in result["note"]


@pytest.mark.parametrize("case", ["twice", "years", "missing", "none"])
def test_bad_inputs_are_refused_naming_the_file(tmp_path, case) -> None:
    a = metrics_file(tmp_path / "a", (0.9, 0.9, 0.9))
    if case == "twice":
        paths, message = [a, a / "metrics.json"], "the same metrics.json as"
    elif case == "years":
        paths = [a, metrics_file(tmp_path / "b", (0.9, 0.9, 0.9), year=2023)]
        message = "summarise one release"
    elif case == "missing":
        paths, message = [a, tmp_path / "nope"], "nope: no such file or folder"
    else:
        paths, message = [], "no evaluation given"
    with pytest.raises(SummaryError, match=message):
        summarise(paths)


def test_the_command_prints_every_number_when_piped(tmp_path) -> None:
    a = metrics_file(tmp_path / "runs" / "f0" / "eval", (0.91234, 0.8, 0.7))
    b = metrics_file(tmp_path / "runs" / "f1" / "eval", (0.81234, 0.7, 0.6))
    result = CliRunner().invoke(app, ["summary", str(a.parent), str(b.parent),
                                      "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "0.9123" in result.output and "0.8623" in result.output  # fold and mean, uncut
    assert (tmp_path / "s" / "summary.csv").is_file()
    bad = CliRunner().invoke(app, ["summary", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "no such file or folder" in bad.output
