"""Issue 14, predict / evaluate faults: never silent, never scoring the wrong thing.

Each test reproduces a probe of the issue: a FLAIR file fed to a T1ce student (rc 0 before),
a batch stopped at its first bad case, folders skipped without a word (a symlinked case
folder, `BraTS2021_00000 copy`, `BraTS2021_0000é`), a missing prediction averaged away, a run
scored on a store whose folds changed since training, and tracebacks for output paths of the
wrong kind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import typer
from conftest import blob_case
from test_evaluate import student_env
from typer.testing import CliRunner

from mtcmkd.brats import release
from mtcmkd.cli.evaluate import evaluate
from mtcmkd.cli.predict import predict
from mtcmkd.data import StoreInfo, split_cases
from mtcmkd.data.store import store_fingerprint
from mtcmkd.evaluation import discover_prediction_inputs, modality_in_file_name
from mtcmkd.phantom import write_case
from mtcmkd.preprocessing import preprocess

SHAPE = (24, 28, 20)

app = typer.Typer(pretty_exceptions_enable=False)
app.command("predict")(predict)
app.command("evaluate")(evaluate)
runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result, code: int = 2) -> str:
    """The one `error:` line of a refused command (warnings of other checks may precede it)."""
    assert result.exit_code == code, result.output + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return student_env(tmp_path_factory.mktemp("faults_predict"), kind="kdnet", widths=(2, 4, 6))


def t1ce(raw: Path, case_id: str) -> Path:
    return raw / case_id / f"{case_id}_t1ce.nii.gz"


def written(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.nii.gz")) if out.is_dir() else []


def report(out: Path) -> dict:
    return json.loads((out / "predict_report.json").read_text())


# ------------------------------------------------------------------- probe 6: wrong modality


@pytest.mark.parametrize(("name", "said"), [
    ("BraTS2021_00000_flair.nii.gz", "flair"), ("BraTS2021_00000_t1ce.nii.gz", "t1ce"),
    ("BraTS2021_00000_t1.nii", "t1"), ("BraTS2021_00000_T2.nii.gz", "t2"),
    ("BraTS-GLI-00000-000-t2f.nii.gz", "flair"), ("BraTS-GLI-00000-000-t1c.nii.gz", "t1ce"),
    ("BraTS-GLI-00000-000-t1n.nii.gz", "t1"), ("BraTS-GLI-00000-000-t2w.nii", "t2"),
    ("BraTS2021_00000_seg.nii.gz", "seg"), ("patient7.flair.nii.gz", "flair"),
    ("scan.nii.gz", None), ("BraTS2021_00000.nii.gz", None), ("t1ce_brain.nii.gz", None),
])
def test_modality_in_file_name(name, said):
    assert modality_in_file_name(name) == said


def test_predict_refuses_a_file_named_as_another_modality(env, tmp_path):
    case_id = env["ids"][0]
    flair = env["raw"] / case_id / f"{case_id}_flair.nii.gz"
    out = tmp_path / "p"
    result = invoke("predict", "--model", env["run"], "--input", flair, "--output", out)
    assert result.exit_code == 1, result.output + result.stderr  # was 0: FLAIR segmented
    assert "Traceback" not in result.stderr
    failed = [ln for ln in result.stderr.splitlines() if ln.startswith("failed")]
    assert len(failed) == 1 and str(flair) in failed[0] and "flair" in failed[0], result.stderr
    assert f"{case_id}_t1ce.nii.gz" in failed[0]  # says which file to pass instead
    assert written(out) == []
    assert report(out)["n_failed"] == 1 and report(out)["cases"][0]["file"] == str(flair)

    # 2023 naming and a segmentation are refused too; a name that says nothing is taken.
    for name in ("BraTS-GLI-00000-000-t2f.nii.gz", f"{case_id}_seg.nii.gz"):
        renamed = tmp_path / name
        shutil.copy(t1ce(env["raw"], case_id), renamed)
        result = invoke("predict", "-m", env["run"], "-i", renamed, "-o", tmp_path / "q")
        assert result.exit_code == 1 and name in result.stderr, result.stderr
    neutral = tmp_path / "scan.nii.gz"
    shutil.copy(t1ce(env["raw"], case_id), neutral)
    result = invoke("predict", "-m", env["run"], "-i", neutral, "-o", tmp_path / "r")
    assert result.exit_code == 0, result.output + result.stderr
    assert written(tmp_path / "r") == ["scan.nii.gz"]


# ----------------------------------------------------------- probe 6: go on past a bad case


def test_predict_goes_on_past_bad_cases_and_reports_every_failure(env, tmp_path):
    raw = tmp_path / "raw"
    for case_id in env["ids"][:3]:
        shutil.copytree(env["raw"] / case_id, raw / case_id)
    good, missing, broken = env["ids"][:3]
    t1ce(raw, missing).unlink()
    t1ce(raw, broken).write_bytes(b"this is not a NIfTI file at all")
    out = tmp_path / "pred"
    result = invoke("predict", "-m", env["run"], "-i", raw, "-o", out)
    # Before: exit 2 at the first bad case, no output for the good one.
    assert result.exit_code == 1, result.output + result.stderr
    assert "Traceback" not in result.stderr
    failed = [ln for ln in result.stderr.splitlines() if ln.startswith("failed")]
    assert len(failed) == 2, result.stderr
    assert any(missing in ln and "missing t1ce" in ln for ln in failed)
    assert any(f"{broken}_t1ce.nii.gz" in ln and "not a readable NIfTI" in ln for ln in failed)
    assert "2 case(s) failed" in result.stderr
    assert written(out) == [f"{good}.nii.gz"]
    rep = report(out)
    assert (rep["n_cases"], rep["n_written"], rep["n_failed"]) == (3, 1, 2)
    assert {c["case"]: c["status"] for c in rep["cases"]} == {
        good: "written", missing: "failed", broken: "failed"}


def test_predict_output_file_that_is_a_folder_fails_that_case_only(env, tmp_path):
    out = tmp_path / "pred"
    (out / f"{env['ids'][0]}.nii.gz").mkdir(parents=True)
    result = invoke("predict", "-m", env["run"], "-i", env["raw"], "-o", out)
    assert result.exit_code == 1 and "Traceback" not in result.stderr, result.stderr
    assert (out / f"{env['ids'][0]}.nii.gz").is_dir()
    assert all((out / f"{c}.nii.gz").is_file() for c in env["ids"][1:])
    assert report(out)["n_failed"] == 1 and report(out)["n_written"] == len(env["ids"]) - 1


# ------------------------------------------------------------ probe 5: nothing skipped silently


def test_predict_follows_symlinked_case_folders_and_names_every_entry_not_taken(env, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    a, b, c, d = env["ids"]
    shutil.copytree(env["raw"] / a, raw / a)
    (raw / b).symlink_to(env["raw"] / b, target_is_directory=True)  # clusters link cases in
    shutil.copytree(env["raw"] / c, raw / f"{c} copy")
    accented = raw / "BraTS2021_0000é"
    accented.mkdir()
    shutil.copy(t1ce(env["raw"], d), accented)
    (raw / "notes.txt").write_text("hello")
    out = tmp_path / "pred"
    result = invoke("predict", "-m", env["run"], "-i", raw, "-o", out)
    assert result.exit_code == 0, result.output + result.stderr
    assert written(out) == [f"{a}.nii.gz", f"{b}.nii.gz"]  # before: only a
    not_taken = {Path(e["path"]).name: e["reason"] for e in report(out)["not_taken"]}
    assert set(not_taken) == {f"{c} copy", "BraTS2021_0000é", "notes.txt"}
    assert "not a case id" in not_taken[f"{c} copy"] and c in not_taken[f"{c} copy"]
    assert d in not_taken["BraTS2021_0000é"]
    for name in not_taken:
        assert any(ln.startswith("not taken") and name in ln
                   for ln in result.stderr.splitlines()), (name, result.stderr)


def test_discovery_reports_bad_cases_without_stopping(env, tmp_path):
    raw = tmp_path / "raw"
    for case_id in env["ids"][:2]:
        shutil.copytree(env["raw"] / case_id, raw / "HGG" / case_id)
    shutil.copytree(env["raw"] / env["ids"][0], raw / "LGG" / env["ids"][0])  # duplicate id
    t1ce(raw / "HGG", env["ids"][1]).unlink()
    found = discover_prediction_inputs(raw, ("t1ce",))
    assert found.cases == []
    reasons = sorted(f.reason.split(" (")[0].split(";")[0] for f in found.failed)
    assert len(found.failed) == 3, found.failed
    assert sum("also comes from" in r for r in reasons) == 2
    assert sum("missing t1ce" in r for r in reasons) == 1


# --------------------------------------------------------- probe 6: missing predictions


def perfect_predictions(env, out: Path, ids: list[str]) -> Path:
    out.mkdir(parents=True)
    for case_id in ids:
        shutil.copy(env["raw"] / case_id / f"{case_id}_seg.nii.gz", out / f"{case_id}.nii.gz")
    return out


def test_evaluate_missing_prediction_is_an_error_or_scored_empty(env, tmp_path):
    dropped = env["ids"][0]
    pred = perfect_predictions(env, tmp_path / "pred", env["ids"][1:])
    args = ("evaluate", "--year", "2021", "--pred", pred, "--gt", env["raw"])
    # Before: a warning, and the mean over the other cases (Dice 1) with rc 0.
    err = error_line(invoke(*args, "--out", tmp_path / "e0"))
    assert f"{dropped}.nii.gz" in err and "missing prediction" in err and "--missing" in err
    assert not (tmp_path / "e0").exists()

    result = invoke(*args, "--out", tmp_path / "e1", "--missing", "empty")
    assert result.exit_code == 0, result.output + result.stderr
    assert "1 ground-truth case(s)" in result.stderr and "scored as empty" in result.stderr
    metrics = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert metrics["source"]["scored_as_empty"] == [dropped]
    assert [c["case"] for c in metrics["cases"]] == env["ids"]
    seg = np.asarray(nib.load(env["raw"] / dropped / f"{dropped}_seg.nii.gz").dataobj)
    record = metrics["cases"][0]
    for region, values in {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}.items():
        assert np.isin(seg, values).any()
        assert record["dice"][region] == 0.0
        assert record["hd95"][region] == pytest.approx(373.13)
    assert metrics["mean"]["dice"]["WT"] == pytest.approx(0.75)

    result = invoke(*args, "--out", tmp_path / "e2", "--missing", "skip")
    assert result.exit_code == 0 and "not scored" in result.stderr
    metrics = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert metrics["source"]["unscored_truth_cases"] == 1 and len(metrics["cases"]) == 3

    error_line(invoke(*args, "--missing", "zero"))


# ------------------------------------------------------- probe 4: the store the run saw


def recorded_run(env, tmp_path: Path, store: Path, validation: list[str] | None = None) -> Path:
    """A copy of the run folder with a hand-written splits.json (as training writes it)."""
    run = tmp_path / "run"
    shutil.copytree(env["run"], run)
    train, val = split_cases(StoreInfo.read(store), 0)
    if validation is not None:
        train = sorted(set(train) | set(val) - set(validation))
        val = validation
    (run / "splits.json").write_text(json.dumps({
        "store": str(store.resolve()), "store_fingerprint": store_fingerprint(store),
        "fold": 0, "train": train, "validation": val, "test": []}))
    return run


def test_evaluate_run_refuses_a_store_changed_since_training(env, tmp_path):
    raw, store = tmp_path / "raw", tmp_path / "store"
    shutil.copytree(env["raw"], raw)
    shutil.copytree(env["store"], store)
    run = recorded_run(env, tmp_path, store)
    recorded_val = json.loads((run / "splits.json").read_text())["validation"]
    added = [write_case(raw, release("2021"), i, blob_case(SHAPE, seed=i)) for i in (4, 5)]
    assert not preprocess(raw, store, n_folds=2).failed

    # Before: rc 0, scoring the store's current fold 0, whatever it now holds.
    err = error_line(invoke("evaluate", "--year", "2021", "--run", run, "--store", store,
                            "--split", "validation", "--out", tmp_path / "e"))
    assert "store changed since training" in err and "--allow-changed-store" in err
    assert all(case_id in err for case_id in added) and str(store) in err
    assert not (tmp_path / "e").exists()

    result = invoke("evaluate", "--year", "2021", "--run", run, "--store", store,
                    "--split", "validation", "--out", tmp_path / "e", "--allow-changed-store")
    assert result.exit_code == 0, result.output + result.stderr
    assert "store changed since training" in result.stderr
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    check = metrics["source"]["store_check"]
    assert check["changed"] is True and check["allowed"] is True and check["added"] == added
    assert [c["case"] for c in metrics["cases"]] == recorded_val


def test_evaluate_run_scores_the_recorded_validation_cases(env, tmp_path):
    # A recorded split unlike the store's current fold 0: the record wins.
    val_now = split_cases(StoreInfo.read(env["store"]), 0)[1]
    chosen = [c for c in env["ids"] if c not in val_now][:1]
    run = recorded_run(env, tmp_path, env["store"], validation=chosen)
    result = invoke("evaluate", "--year", "2021", "--run", run, "--split", "validation",
                    "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output + result.stderr
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert [c["case"] for c in metrics["cases"]] == chosen
    assert metrics["source"]["split_recorded"] is True
    assert metrics["source"]["store_check"]["changed"] is False
    assert "not recorded" not in result.stderr


def test_evaluate_run_without_splits_json_says_so(env, tmp_path):
    result = invoke("evaluate", "--year", "2021", "--run", env["run"], "--split", "validation",
                    "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output + result.stderr
    notes = [ln for ln in result.stderr.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "split was not recorded" in notes[0]
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["source"]["split_recorded"] is False


def test_evaluate_run_with_a_broken_splits_json_one_line(env, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(env["run"], run)
    (run / "splits.json").write_text("{not json")
    err = error_line(invoke("evaluate", "--year", "2021", "--run", run, "--out", tmp_path / "e"))
    assert "splits.json" in err


# ------------------------------------------------------- probe 10: paths of the wrong kind


@pytest.mark.parametrize("case", [
    "predict --output file", "predict --png file", "predict --input missing",
    "predict --output under a file",
    "evaluate --out file", "evaluate --png file", "evaluate --out metrics.json folder",
    "evaluate --pred file", "evaluate --gt file", "evaluate --run file", "evaluate --store file",
    "evaluate --out file (--pred)",
])
def test_paths_of_the_wrong_kind_give_one_line(env, tmp_path, case):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    run, raw = env["run"], env["raw"]
    pred = perfect_predictions(env, tmp_path / "pred", env["ids"])
    taken_out = tmp_path / "e"
    (taken_out / "metrics.json").mkdir(parents=True)
    args = {
        "predict --output file": ("predict", "-m", run, "-i", raw, "-o", a_file),
        "predict --png file": ("predict", "-m", run, "-i", raw, "-o", tmp_path / "p",
                               "--png", a_file),
        "predict --input missing": ("predict", "-m", run, "-i", tmp_path / "nope", "-o",
                                    tmp_path / "p"),
        "predict --output under a file": ("predict", "-m", run, "-i", raw, "-o", a_file / "p"),
        "evaluate --out file": ("evaluate", "--year", "2021", "--run", run, "--out", a_file),
        "evaluate --png file": ("evaluate", "--year", "2021", "--run", run, "--out",
                                tmp_path / "e2", "--png", a_file),
        "evaluate --out metrics.json folder": ("evaluate", "--year", "2021", "--run", run,
                                               "--out", taken_out),
        "evaluate --pred file": ("evaluate", "--year", "2021", "--pred", a_file, "--gt", raw),
        "evaluate --gt file": ("evaluate", "--year", "2021", "--pred", pred, "--gt", a_file),
        "evaluate --run file": ("evaluate", "--year", "2021", "--run", a_file),
        "evaluate --store file": ("evaluate", "--year", "2021", "--run", run, "--store", a_file,
                                  "--out", tmp_path / "e3"),
        "evaluate --out file (--pred)": ("evaluate", "--year", "2021", "--pred", pred, "--gt",
                                         raw, "--out", a_file),
    }[case]
    err = error_line(invoke(*args))
    assert "a_file" in err or "nope" in err or "metrics.json" in err, err
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").glob("*.nii.gz"))
