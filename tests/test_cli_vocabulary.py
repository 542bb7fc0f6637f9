"""Issue 20, items 6-8: one vocabulary of options (the old spellings still work, hidden),
`--year` detected where it can be, `--set a=1 b=2`, and `evaluate --run --save-segmentations`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import typer.main
from conftest import write_raw
from test_evaluate import assert_same_space, student_env
from typer.testing import CliRunner

from mtcmkd.cli.main import app, expand_set_pairs

SHAPE = (24, 28, 20)
runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, section: str) -> str:
    assert result.exit_code == 2, result.output + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    err = result.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert err.endswith(f"(see docs/TROUBLESHOOTING.md#{section})"), err
    return err


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return student_env(tmp_path_factory.mktemp("vocabulary"), et_everywhere=True, kind="kdnet", widths=(2, 4, 6))


def labels_of(folder: Path) -> dict[str, bytes]:
    return {p.name: np.asarray(nib.load(p).dataobj).tobytes()
            for p in sorted(folder.glob("*.nii.gz"))}


# ------------------------------------------------------------------- predict: --run and --out


@pytest.mark.integration
def test_predict_new_and_old_spellings_write_the_same_files(env, tmp_path):
    spellings = {
        "new": ("--run", env["run"], "--out", tmp_path / "new"),
        "short": ("--run", env["run"], "-o", tmp_path / "short"),
        "old": ("--model", env["run"], "--output", tmp_path / "old"),
        "old short": ("-m", env["run"], "-o", tmp_path / "old short"),
    }
    written = {}
    for name, options in spellings.items():
        result = invoke("predict", "-i", env["raw"], *options)
        assert result.exit_code == 0, (name, result.output + result.stderr)
        written[name] = labels_of(Path(options[-1]))
        notes = [line for line in result.stderr.splitlines() if "old spelling" in line]
        if name.startswith("old"):
            assert notes and "--model (now --run)" in notes[0], result.stderr
        else:
            assert not notes, result.stderr
    assert len(written["new"]) == len(env["ids"])
    assert all(files == written["new"] for files in written.values())


def test_help_shows_the_vocabulary_and_hides_the_old_spellings():
    command = typer.main.get_command(app)
    predict = command.commands["predict"]
    shown = {o for p in predict.params if not p.hidden for o in p.opts}
    hidden = {o for p in predict.params if p.hidden for o in p.opts}
    assert {"--run", "--out", "-o", "--input"} <= shown
    assert {"--model", "-m", "--output"} <= hidden
    evaluate = command.commands["evaluate"]
    assert {"--run", "--out", "-o", "--year", "--save-segmentations"} <= {
        o for p in evaluate.params for o in p.opts}
    year = next(p for p in evaluate.params if p.name == "year")
    assert not year.required and "Default: detected" in year.help


def test_predict_needs_a_run_and_an_out(env, tmp_path):
    err = one_line_error(invoke("predict", "-i", env["raw"], "--out", tmp_path / "o"), "predict")
    assert "pass --run RUN" in err
    err = one_line_error(invoke("predict", "-i", env["raw"], "--run", env["run"]), "predict")
    assert "pass --out FOLDER" in err
    err = one_line_error(invoke("predict", "-i", env["raw"], "--run", env["run"], "--out",
                                tmp_path / "a", "--output", tmp_path / "b"), "predict")
    assert "name different folders" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------ evaluate: --year


def test_evaluate_run_detects_the_year_from_the_store(env, tmp_path):
    result = invoke("evaluate", "--run", env["run"], "--split", "validation", "-o",
                    tmp_path / "e")
    assert result.exit_code == 0, result.output + result.stderr
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["year"] == 2021 and "BraTS 2021" in result.stdout


def test_evaluate_pred_detects_the_year_from_the_truth(tmp_path):
    raw = tmp_path / "raw"
    ids = write_raw(raw, "2023", n=2, shape=SHAPE)
    pred = tmp_path / "pred"
    pred.mkdir()
    for case_id in ids:
        shutil.copy(raw / case_id / f"{case_id}-seg.nii.gz", pred / f"{case_id}.nii.gz")
    result = invoke("evaluate", "--pred", pred, "--gt", raw, "-o", tmp_path / "e")
    assert result.exit_code == 0, result.output + result.stderr
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["year"] == 2023 and "lesion-wise" in metrics["rules"]


def test_evaluate_pred_with_truth_of_two_releases_asks_for_year(tmp_path):
    raw = tmp_path / "raw"
    ids = write_raw(raw, "2021", n=1, shape=SHAPE) + write_raw(raw, "2023", n=1, shape=SHAPE)
    pred = tmp_path / "pred"
    pred.mkdir()
    for case_id in ids:
        seg = next((raw / case_id).glob("*seg.nii.gz"))
        shutil.copy(seg, pred / f"{case_id}.nii.gz")
    err = one_line_error(invoke("evaluate", "--pred", pred, "--gt", raw, "-o", tmp_path / "e"),
                         "evaluate")
    assert f"{raw}: cases of several releases (2021, 2023)" in err and "pass --year" in err
    assert not (tmp_path / "e").exists()


# ------------------------------------------------------------------------------- --set pairs


@pytest.mark.parametrize(("args", "expanded"), [
    (["--set", "a=1", "b=2"], ["--set", "a=1", "--set", "b=2"]),
    (["--set", "a=1", "b=2", "--json"], ["--set", "a=1", "--set", "b=2", "--json"]),
    (["--set=a=1", "b=2", "-c", "x"], ["--set=a=1", "--set", "b=2", "-c", "x"]),
    (["--set", "a=1", "--set", "b=2"], ["--set", "a=1", "--set", "b=2"]),
    (["--set", "a=1", "oops"], ["--set", "a=1", "--set", "oops"]),
    (["-c", "x", "y=1"], ["-c", "x", "y=1"]),  # no --set: nothing changes
    (["--set", "a=1", "--", "b=2"], ["--set", "a=1", "--", "b=2"]),
])
def test_expand_set_pairs(args, expanded):
    assert expand_set_pairs(args) == expanded


def test_set_takes_several_pairs_after_one_flag():
    pairs = invoke("inspect", "--config", "tiny", "--set", "train.lr=0.5", "train.epochs=7",
                   "--json")
    repeated = invoke("inspect", "--config", "tiny", "--set", "train.lr=0.5", "--set",
                      "train.epochs=7", "--json")
    plain = invoke("inspect", "--config", "tiny", "--json")
    one = invoke("inspect", "--config", "tiny", "--set", "train.lr=0.5", "--json")
    for result in (pairs, repeated, plain, one):
        assert result.exit_code == 0, result.output + result.stderr
    hashes = [json.loads(r.stdout)["hash"] for r in (pairs, repeated, plain, one)]
    assert hashes[0] == hashes[1]  # both pairs applied, as with --set repeated
    assert len({hashes[0], hashes[2], hashes[3]}) == 3  # ... and not only the first


@pytest.mark.parametrize("command", [["inspect", "--config", "tiny"],
                                     ["train", "--config", "tiny", "--out", "never"]])
def test_set_word_without_equals_is_one_line(command, tmp_path):
    result = invoke(*command, "--set", "train.lr=0.5", "epochs")
    err = one_line_error(result, command[0])
    assert "--set 'epochs': expected KEY=VALUE" in err
    assert not Path("never").exists()


# ---------------------------------------------------------- evaluate --save-segmentations


def test_evaluate_saves_the_scored_segmentations_as_predict_writes_them(env, tmp_path):
    segs = tmp_path / "segs"
    result = invoke("evaluate", "--run", env["run"], "--split", "validation", "-o",
                    tmp_path / "e", "--save-segmentations", segs)
    assert result.exit_code == 0, result.output + result.stderr
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    scored = metrics["case_ids"]
    assert sorted(p.name for p in segs.iterdir()) == sorted(f"{c}.nii.gz" for c in scored)
    assert metrics["source"]["segmentations"] == {
        "folder": str(segs), "headers": {c: "source" for c in scored}}
    # the same files as `predict` writes for these cases: values, grid, affine, header
    pred = tmp_path / "pred"
    assert invoke("predict", "--run", env["run"], "-i", env["raw"], "-o", pred,
                  "--reference").exit_code == 0
    for case_id in scored:
        saved = assert_same_space(segs / f"{case_id}.nii.gz",
                                  env["raw"] / case_id / f"{case_id}_t1ce.nii.gz")
        np.testing.assert_array_equal(saved, np.asarray(nib.load(pred / f"{case_id}.nii.gz")
                                                        .dataobj))
        assert set(np.unique(saved).tolist()) == {0, 4}  # ET in the 2021 value, not 3


def test_evaluate_saves_with_the_store_affine_when_the_raw_files_moved(env, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(env["store"], store)
    report = json.loads((store / "preprocess_report.json").read_text())
    report["raw"] = str(tmp_path / "moved away")
    (store / "preprocess_report.json").write_text(json.dumps(report))
    segs = tmp_path / "segs"
    result = invoke("evaluate", "--run", env["run"], "--store", store, "--split", "validation",
                    "-o", tmp_path / "e", "--save-segmentations", segs)
    assert result.exit_code == 0, result.output + result.stderr
    assert "carry the store's recorded affine" in result.stderr
    for path in segs.iterdir():
        case_id = path.name.removesuffix(".nii.gz")
        source = nib.load(env["raw"] / case_id / f"{case_id}_t1ce.nii.gz")
        saved = nib.load(path)
        assert saved.shape == source.shape and saved.get_data_dtype() == np.uint8
        np.testing.assert_allclose(saved.affine, source.affine, atol=1e-5)
        np.testing.assert_allclose(saved.header.get_zooms(), source.header.get_zooms())


def test_save_segmentations_refusals_write_nothing(env, tmp_path):
    err = one_line_error(invoke("evaluate", "--pred", tmp_path, "--gt", env["raw"],
                                "--save-segmentations", tmp_path / "s"), "evaluate")
    assert "--save-segmentations goes with --run" in err
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    err = one_line_error(invoke("evaluate", "--run", env["run"], "--split", "validation", "-o",
                                tmp_path / "e", "--save-segmentations", blocker), "evaluate")
    assert str(blocker) in err
    assert not (tmp_path / "e").exists() and not (tmp_path / "s").exists()


@pytest.mark.integration
def test_help_of_a_repeatable_option_shows_its_item_type():
    # through the console entry point, which tidies the help (`main`)
    def help_of(command: str) -> str:
        done = subprocess.run([sys.executable, "-m", "mtcmkd", command, "--help"],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "COLUMNS": "200"})
        assert done.returncode == 0, done.stderr
        return done.stdout

    run_line = next(ln for ln in help_of("predict").splitlines() if ln.startswith("│    --run "))
    assert "<path>" in run_line and "list" not in run_line, run_line
    assert "KEY=VALUE..." in help_of("inspect")
