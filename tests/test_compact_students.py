"""experiments/compact_students.py: the summary (means over seeds, paired differences against the
reference) on hand-made records, and one tiny run end to end, resumed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "compact_students.py"


@pytest.fixture(scope="module")
def cs() -> ModuleType:
    return load_script(SCRIPT)


def cases(wt: list[float], et: list[float | None]) -> dict[str, dict[str, float | None]]:
    return {f"c{i}": {"WT": w, "TC": w, "ET": e} for i, (w, e) in enumerate(zip(wt, et, strict=True))}


def test_summary_means_and_paired_differences(cs) -> None:
    records = {"nano": {
        0: {"variants": {"reference": cases([0.8, 0.6], [0.5, None]),
                         "box-fp32": cases([0.7, 0.6], [0.3, 0.9])}},
        1: {"variants": {"reference": cases([0.9, 0.7], [0.7, None]),
                         "box-fp32": cases([0.9, 0.5], [0.6, None])}},
    }}
    summary = cs.summarise(records)["nano"]
    ref, box = summary["reference"], summary["box-fp32"]
    assert ref["dice_mean"]["WT"] == pytest.approx((0.7 + 0.8) / 2)
    assert ref["dice_sd_over_seeds"]["WT"] == pytest.approx(0.0707107, abs=1e-6)
    assert ref["minus_reference_mean"] == {"WT": 0.0, "TC": 0.0, "ET": 0.0}
    assert box["dice_mean"]["WT"] == pytest.approx((0.65 + 0.7) / 2)
    # paired over the four (case, seed) pairs: -0.1, 0, 0, -0.2
    assert box["minus_reference_mean"]["WT"] == pytest.approx(-0.075)
    assert box["minus_reference_max_abs"]["WT"] == pytest.approx(0.2)
    # ET: undefined cases drop out of the means and out of the pairs (c1 has no reference ET)
    assert box["dice_mean"]["ET"] == pytest.approx(((0.3 + 0.9) / 2 + 0.6) / 2)
    assert box["minus_reference_mean"]["ET"] == pytest.approx((-0.2 - 0.1) / 2)
    assert box["seeds"] == 2
    assert "auto" not in summary  # a variant no seed has is left out


def test_size_contrasts_pair_cases_after_averaging_seeds(cs) -> None:
    records = {
        "paper": {0: {"variants": {"reference": cases([0.8, 0.6, 0.5], [0.5, None, 0.4])}},
                  1: {"variants": {"reference": cases([0.6, 0.6, 0.7], [0.7, None, 0.6])}}},
        "nano": {0: {"variants": {"reference": cases([0.6, 0.5, 0.5], [0.4, 0.9, 0.5])}}},
    }
    out = cs.size_contrasts(records)
    assert out["against"] == "paper" and list(out["sizes"]) == ["nano"]
    wt = out["sizes"]["nano"]["WT"]
    # per case: paper's seed means 0.7, 0.6, 0.6; nano 0.6, 0.5, 0.5 -> -0.1 each
    assert wt["mean"] == pytest.approx(-0.1) and wt["cases"] == 3
    assert wt["ci95"] == pytest.approx([-0.1, -0.1])
    et = out["sizes"]["nano"]["ET"]  # c1 has no paper ET: two pairs, -0.2 and 0.0
    assert et["cases"] == 2 and et["mean"] == pytest.approx(-0.1)
    assert et["ci95"][0] == pytest.approx(-0.2) and et["ci95"][1] == pytest.approx(0.0)
    assert cs.size_contrasts({"nano": records["nano"]}) == {}
    text = cs.markdown({"settings": {"cases": 3, "shape": [8, 8, 8], "store": {
        "train": 1, "validation": 1, "test": 3}, "patch": 8, "batch": 1, "student_steps": 1,
        "lr": 0.1, "seeds": [0, 1], "threads": 1, "load_at_start": [0.0], "load_at_end": [0.0]},
        "sizes": {}, "summary": {}, "runs": {}, "failed": [], "size_contrasts": out})
    assert "| nano | -0.100 [-0.100, -0.100] |" in text


@pytest.mark.integration
@pytest.mark.slow
def test_tiny_run_end_to_end_and_resumed(tmp_path: Path) -> None:
    out, copy = tmp_path / "cs", tmp_path / "docs" / "compact.json"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--cases", "10", "--shape", "40",
           "40", "32", "--patch", "16", "--width-divisor", "2", "--sizes", "nano",
           "--test-fraction", "0.3", "--folds", "3", "--epochs", "1", "--iters", "2",
           "--seeds", "0", "--threads", "1", "--variants", "reference", "box-fp32",
           "--json-out", str(copy)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    result = json.loads((out / "compact_students.json").read_text())
    assert json.loads(copy.read_text()) == result
    assert copy.with_suffix(".md").read_text().startswith("# Compact students")
    assert result["sizes"]["nano"]["widths"] == [4, 8, 16, 32]
    assert result["failed"] == []
    store = result["settings"]["store"]
    record = result["runs"]["nano"]["0"]
    assert set(record["variants"]) == {"reference", "box-fp32"}
    assert set(record["variants"]["reference"]) == set(store["test_cases"])
    summary = result["summary"]["nano"]
    assert summary["reference"]["minus_reference_mean"]["WT"] == 0.0
    assert 0.0 <= summary["box-fp32"]["dice_mean"]["WT"] <= 1.0
    # resumed: nothing is trained or scored again, the same numbers come out
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "trained nano-s0 (before)" in second.stdout
    again = json.loads((out / "compact_students.json").read_text())
    assert again["runs"] == result["runs"] and again["summary"] == result["summary"]
