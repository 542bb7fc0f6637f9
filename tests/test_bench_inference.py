"""`benchmarks/bench_inference.py`: its --quick mode end to end (the JSON schema, agreement with
the reference), and its measuring helpers (agreement, Dice vs truth, skipped AOTI rows)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from conftest import load_script

from mtcmkd.nifti_io import read_nifti, write_label_nifti

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench_inference.py"
ROW_KEYS = {"size", "path", "status", "case_seconds", "wall_s_per_case", "process_wall_s",
            "cpu_s", "cpu_s_per_case", "peak_rss_mb", "agreement", "agreement_tumour", "dice"}


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script(BENCH)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    """One --quick run (no AOTI rows: compiling a package takes minutes)."""
    work = tmp_path_factory.mktemp("bench-inference")
    out = work / "quick.json"
    r = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--threads", "1", "--work", str(work / "w"),
         "--paths", "reference", "monai", "auto", "box-fp32", "torchscript",
         "--json-out", str(out)],
        capture_output=True, text=True, timeout=1800, cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "whole-case inference" in r.stdout  # the table
    return {"result": json.loads(out.read_text()), "work": work / "w"}


@pytest.mark.integration
@pytest.mark.slow
def test_quick_mode_schema_and_reference_agreement(quick) -> None:
    result = quick["result"]
    assert set(result) >= {"machine", "load_before", "load_after", "settings", "weights",
                           "rows", "exports"}
    assert result["settings"]["quick"] is True and result["settings"]["threads"] == 1
    assert len(result["settings"]["case_ids"]) == 1
    assert result["weights"]["tiny"]["trained"] is False
    rows = {r["path"]: r for r in result["rows"]}
    assert list(rows) == ["reference", "monai", "auto", "box-fp32", "torchscript"]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert len(row["case_seconds"]) == 1 and row["wall_s_per_case"] > 0
        assert row["process_wall_s"] >= row["wall_s_per_case"]
        assert row["cpu_s"] > 0 and row["peak_rss_mb"] > 50
        assert row["dice"] is None  # random weights: no Dice
        assert 0.0 <= row["agreement"] <= 1.0
    assert rows["reference"]["agreement"] == 1.0 == rows["reference"]["agreement_tumour"]
    # the TorchScript file is the reference pipeline scripted: the same labels
    assert rows["torchscript"]["agreement"] == 1.0
    assert rows["reference"]["precision_used"] == "fp32"
    assert rows["box-fp32"]["layout"] == "box"
    # MONAI's Gaussian windows on the same probabilities: the same segmentation up to blending
    assert rows["monai"]["agreement_tumour"] > 0.9
    assert rows["monai"]["speedup_vs_monai"] == 1.0


@pytest.mark.integration
@pytest.mark.slow
def test_agreement_and_dice_helpers(bench, quick, tmp_path: Path) -> None:
    cases = quick["work"] / "cases"
    reference = quick["work"] / "out" / "tiny" / "reference"
    assert bench.agreement(reference, reference) == {"agreement": 1.0,
                                                      "agreement_tumour": 1.0}
    # one tumour voxel changed: agreement drops by exactly one voxel
    changed = tmp_path / "changed"
    changed.mkdir()
    (case_file,) = bench.label_files(reference).values()
    labels = np.asarray(read_nifti(case_file).data).copy()
    where = tuple(np.argwhere(labels != 0)[0])
    labels[where] = 0
    write_label_nifti(labels, case_file, changed / case_file.name)
    got = bench.agreement(changed, reference)
    assert got["agreement"] == pytest.approx(1 - 1 / labels.size)
    assert got["agreement_tumour"] < 1.0
    # the truth as prediction: Dice 1 in every region
    truth_as_pred = tmp_path / "truth"
    truth_as_pred.mkdir()
    (item,) = bench._cases(cases)
    shutil.copy(item.truth, truth_as_pred / f"{item.case_id}.nii.gz")
    assert bench.dice_vs_truth(truth_as_pred, cases) == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
    assert bench.dice_vs_truth(reference, cases)["WT"] < 1.0  # random weights


def test_aoti_rows_skip_with_a_reason(bench, tmp_path: Path) -> None:
    args = Namespace(threads=1, aoti_runner=tmp_path / "absent")
    assert bench.find_aoti_runner(tmp_path / "absent") is None
    row = bench.run_path(args, "aoti-cpp", "tiny", tmp_path / "s.pt", tmp_path, tmp_path,
                         {"aoti-python": (None, "no `mtcmkd export aoti` command")})
    assert row["status"] == "skipped" and "export aoti" in row["reason"]
    row = bench.run_path(args, "aoti-cpp", "tiny", tmp_path / "s.pt", tmp_path, tmp_path,
                         {"aoti-python": (tmp_path / "s.pt2", None)})
    assert row["status"] == "skipped" and "mtcmkd_segment_aoti" in row["reason"]
    row = bench.run_path(args, "aoti-python", "tiny", tmp_path / "s.pt", tmp_path, tmp_path,
                         {"aoti-python": (None, "compile failed")})
    assert row == {"size": "tiny", "path": "aoti-python", "status": "skipped",
                   "reason": "compile failed"}


def test_dice_vs_seconds_pairs_sizes_and_settings_of_both_files(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import plot_dice_vs_seconds as plot
    finally:
        sys.path.pop(0)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": [
        {"size": "nano", "path": "reference", "cpu_s_per_case": 50.0},
        {"size": "nano", "path": "box-bf16", "cpu_s_per_case": 10.0},
        {"size": "nano", "path": "monai", "cpu_s_per_case": 52.0},  # no Dice for MONAI
        {"size": "paper", "path": "reference", "cpu_s_per_case": 250.0}]}))  # no paper Dice
    dice = {"WT": 0.5, "TC": 0.6, "ET": 0.7}
    study = tmp_path / "study.json"
    study.write_text(json.dumps({"summary": {"nano": {
        "reference": {"dice_mean": dice}, "box-auto": {"dice_mean": {**dice, "TC": 0.4}}}}}))
    pts = plot.points([bench], study)
    assert [(p["size"], p["path"], p["cpu_s"], p["dice"]["TC"]) for p in pts] == [
        ("nano", "reference", 50.0, 0.6), ("nano", "box-bf16", 10.0, 0.4)]
    plot.plot(pts, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
