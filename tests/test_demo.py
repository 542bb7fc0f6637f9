"""`mtcmkd demo`: the main job end to end (tiny sizes), and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from mtcmkd.cli.demo_steps import DemoSettings, demo_config
from mtcmkd.cli.main import app
from mtcmkd.export.cpp_client import cpp_toolchain_missing

runner = CliRunner()


@pytest.mark.integration
def test_demo_end_to_end(tmp_path):
    """Every step runs and leaves files others can open; Python and C++ labels agree."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "mtcmkd", "demo", "--out", str(out), "--cases", "4",
           "--shape", "40", "40", "32", "--ranks", "1", "--epochs", "1", "--iters", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # each step shows the command a user would type
    for shown in ("$ mtcmkd synth", "$ mtcmkd preprocess", "$ torchrun --standalone",
                  "$ mtcmkd evaluate --year 2021", "$ mtcmkd export torchscript"):
        assert shown in result.stdout
    summary = json.loads((out / "demo_summary.json").read_text())
    names = [s["name"] for s in summary["steps"]]
    assert names == ["synth", "preprocess", "store-info", "train", "evaluate", "report",
                     "export", "run export"]
    train = summary["steps"][3]["details"]
    assert train["step"] == 2 and train["world_size"] == 1
    evaluated = summary["steps"][4]["details"]
    assert evaluated["cases"] == 1 and set(evaluated["dice"]) == {"WT", "TC", "ET"}
    assert list((out / "overlays").glob("*.png"))
    assert (out / "run" / "report" / "report.md").is_file()
    run_export = summary["steps"][-1]["details"]
    case = run_export["case"]
    source = nib.load(str(out / "raw" / case / f"{case}_t1ce.nii.gz"))
    labels = nib.load(run_export["python_output"])
    assert labels.shape == source.shape and np.allclose(labels.affine, source.affine)
    assert set(np.unique(np.asarray(labels.dataobj))) <= {0, 1, 2, 4}
    reason = cpp_toolchain_missing()
    if reason is None:
        assert run_export["cpp_python_voxel_agreement"] == 1.0
        assert "labels identical: yes" in result.stdout
    else:
        assert run_export["cpp_skipped"] == reason


def test_demo_refuses_non_empty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert f"{tmp_path}: folder exists and is not empty" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize(("args", "message"), [
    (["--cases", "3"], "--cases 3: need at least 4"),
    (["--epochs", "0"], "must be >= 1"),
])
def test_demo_bad_options(tmp_path, args, message):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), *args])
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "d").exists()


def test_demo_config_is_a_valid_mtcmkd_config(tmp_path):
    import yaml

    from mtcmkd.config import load_config

    settings = DemoSettings(out=tmp_path, epochs=3, iters=5)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(demo_config(settings)))
    cfg = load_config(path)
    assert cfg.method.name == "mtcmkd" and cfg.method.student_modalities == ("t1ce",)
    assert cfg.train.epochs == 3 and cfg.train.iters_per_epoch == 5
    assert cfg.train.ckpt_every == 5  # steps: one checkpoint per epoch
    assert cfg.data.store == str(tmp_path / "store")
