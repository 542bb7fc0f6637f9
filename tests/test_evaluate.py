"""predict / evaluate / report: native-space files, BraTS scoring outputs, pictures.

The commands run through a Typer app built here (registration in cli/main.py is not needed).
Students are untrained tiny networks saved with `save_student` (a residual U-Net as MTCM-KD
trains, and 2-level KD-Net U-Nets where only speed matters); one has its output layer set so
that it predicts ET everywhere in the brain crop, which makes its predictions exactly known.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
import typer
from conftest import SHARED_SAMPLE, write_raw
from typer.testing import CliRunner

from mtcmkd.brats import release
from mtcmkd.cli.evaluate import evaluate
from mtcmkd.cli.predict import predict
from mtcmkd.cli.report import report
from mtcmkd.config import config_hash, dump_config, load_config, to_dict
from mtcmkd.data import StoreInfo, split_cases
from mtcmkd.models import build_network
from mtcmkd.plots import overlay_png, tumour_centre
from mtcmkd.preprocessing import preprocess
from mtcmkd.student_weights import save_student

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHAPE = (24, 28, 20)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

app = typer.Typer(pretty_exceptions_enable=False)
app.command("predict")(predict)
app.command("evaluate")(evaluate)
app.command("report")(report)
runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def make_student(path: Path, store: Path | None, *, et_everywhere: bool = False,
                 kind: str = "resunet", widths=(4, 8, 12, 16), patch=(32, 32, 32)) -> Path:
    """A run folder (config.yaml + best_student.pt) or, for a .pt path, just the file."""
    overrides = [f"model.kind={kind}", f"model.widths={list(widths)}",
                 f"data.patch_size={list(patch)}"]
    if store is not None:
        overrides.append(f"data.store={json.dumps(str(store))}")
    cfg = load_config(CONFIGS / "tiny.yaml", overrides)
    torch.manual_seed(0)
    net = build_network(kind, 1, 4, widths)
    if et_everywhere:  # logits = bias: class 3 (ET) wins at every voxel
        with torch.no_grad():
            net.head.weight.zero_()
            net.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    if path.suffix != ".pt":
        path.mkdir(parents=True)
        dump_config(cfg, path / "config.yaml")
        target = path / "best_student.pt"
    else:
        target = path
    save_student(target, net, config=to_dict(cfg), config_hash=config_hash(cfg),
                 channels=("t1ce",), output="softmax", n_classes=4, patch_size=patch)
    return path


def student_env(root: Path, **student: Any) -> dict[str, Any]:
    """Four 2021 cases in a raw folder and a two-fold store under `root`, and a run folder
    with a student trained on nothing (`make_student(**student)`): what the CLI tests of
    evaluate, predict and their logs start from."""
    raw = root / "raw"
    ids = sorted(write_raw(raw, "2021", n=4, shape=SHAPE))
    store = root / "store"
    assert not preprocess(raw, store, n_folds=2).failed
    run = make_student(root / "run", store, **student)
    return {"root": root, "raw": raw, "ids": ids, "store": store, "run": run}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = student_env(tmp_path_factory.mktemp("evaluate"))
    env["et_run"] = make_student(env["root"] / "et_run", env["store"], et_everywhere=True,
                                 kind="kdnet", widths=(2, 4, 6))
    return env


def t1ce(raw: Path, case_id: str) -> Path:
    return raw / case_id / f"{case_id}_t1ce.nii.gz"


def assert_same_space(out: Path, reference: Path) -> np.ndarray:
    """The output carries the reference's grid, affine and header geometry; returns its data."""
    a, b = nib.load(out), nib.load(reference)
    assert a.shape == b.shape[:3]
    assert np.array_equal(a.affine, b.affine)
    assert np.array_equal(a.header.get_qform(), b.header.get_qform())
    assert np.array_equal(a.header.get_sform(), b.header.get_sform())
    for key in ("qform_code", "sform_code", "xyzt_units", "quatern_b", "quatern_c", "quatern_d",
                "qoffset_x", "qoffset_y", "qoffset_z"):
        assert a.header[key] == b.header[key], key
    assert np.array_equal(a.header["pixdim"][1:4], b.header["pixdim"][1:4])
    assert a.get_data_dtype() == np.uint8
    return np.asarray(a.dataobj)


def one_line_error(result) -> str:
    err = result.stderr.strip()
    assert result.exit_code != 0
    assert err.startswith("error:") and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------ predict


@pytest.mark.integration
def test_predict_folder_of_cases_keeps_affine_and_header(env, tmp_path):
    out = tmp_path / "pred"
    result = invoke("predict", "--model", env["run"], "--input", env["raw"], "--output", out)
    assert result.exit_code == 0, result.output
    assert "mtcmkd predict" in result.output and "post-processing off" in result.output
    assert sorted(p.name for p in out.iterdir()) == [f"{c}.nii.gz" for c in env["ids"]] + [
        "predict_report.json"]
    for case_id in env["ids"]:
        data = assert_same_space(out / f"{case_id}.nii.gz", t1ce(env["raw"], case_id))
        assert set(np.unique(data).tolist()) <= {0, 1, 2, 4}


@pytest.mark.parametrize(("layout", "et_value"), [("2021", 4), ("2023", 3), ("msd", 3)])
def test_output_label_values_follow_the_release(env, tmp_path, layout, et_value):
    raw = tmp_path / "raw"
    (case_id,) = write_raw(raw, layout, n=1, shape=SHAPE)
    out = tmp_path / "pred"
    result = invoke("predict", "-m", env["et_run"] / "best_student.pt", "-i", raw, "-o", out)
    assert result.exit_code == 0, result.output
    info = release(layout)
    reference = (raw / "imagesTr" / f"{case_id}.nii.gz" if info.four_d
                 else raw / case_id / info.file_name(case_id, "t1ce"))
    data = assert_same_space(out / f"{case_id}.nii.gz", reference)
    assert data.ndim == 3
    assert set(np.unique(data).tolist()) == {0, et_value}


def test_predict_single_nifti_and_year_option(env, tmp_path):
    case_id = env["ids"][0]
    source = t1ce(env["raw"], case_id)
    out = tmp_path / "pred"
    result = invoke("predict", "-m", env["et_run"], "-i", source, "-o", out)
    assert result.exit_code == 0, result.output
    data = assert_same_space(out / f"{case_id}.nii.gz", source)
    assert set(np.unique(data).tolist()) == {0, 4}  # default --year 2021
    # A file named in the 2023 style, with --year 2023: case id from the name, ET written as 3.
    renamed = tmp_path / "BraTS-GLI-00001-000-t1c.nii"
    nib.save(nib.load(source), renamed)
    result = invoke("predict", "-m", env["et_run"], "-i", renamed, "-o", out, "--year", "2023")
    assert result.exit_code == 0, result.output
    data = assert_same_space(out / "BraTS-GLI-00001-000.nii.gz", renamed)
    assert set(np.unique(data).tolist()) == {0, 3}
    # Without --year the 2023 file name decides: ET is never written as 4 (2023's RC).
    (out / "BraTS-GLI-00001-000.nii.gz").unlink()
    assert invoke("predict", "-m", env["et_run"], "-i", renamed, "-o", out).exit_code == 0
    assert set(np.unique(nib.load(out / "BraTS-GLI-00001-000.nii.gz").dataobj).tolist()) == {0, 3}


def test_predict_case_folder_with_only_t1ce(env, tmp_path):
    case_id = env["ids"][1]
    folder = tmp_path / case_id
    folder.mkdir()
    shutil.copy(t1ce(env["raw"], case_id), folder)
    full, alone = tmp_path / "full", tmp_path / "alone"
    assert invoke("predict", "-m", env["run"], "-i", env["raw"] / case_id, "-o", full
                  ).exit_code == 0
    result = invoke("predict", "-m", env["run"], "-i", folder, "-o", alone)
    assert result.exit_code == 0, result.output
    a = assert_same_space(alone / f"{case_id}.nii.gz", t1ce(env["raw"], case_id))
    assert np.array_equal(a, np.asarray(nib.load(full / f"{case_id}.nii.gz").dataobj))


@pytest.mark.parametrize("problem", ["2d", "4d", "unreadable", "missing_t1ce"])
def test_predict_bad_input_one_line_per_failed_case(env, tmp_path, problem):
    raw = tmp_path / "raw"
    good, bad = env["ids"][0], env["ids"][1]
    shutil.copytree(env["raw"] / good, raw / good)  # a good case first: nothing written either
    shutil.copytree(env["raw"] / bad, raw / bad)
    target = t1ce(raw, bad)
    affine = nib.load(target).affine
    if problem == "2d":
        nib.save(nib.Nifti1Image(np.ones((24, 28), np.int16), affine), target)
    elif problem == "4d":
        nib.save(nib.Nifti1Image(np.ones((*SHAPE, 2), np.int16), affine), target)
    elif problem == "unreadable":
        target.write_bytes(b"this is not a NIfTI file at all")
    else:
        target.unlink()
    out = tmp_path / "pred"
    # The bad case fails (exit 1, one line naming the file); the good one is still written.
    result = invoke("predict", "-m", env["run"], "-i", raw, "-o", out)
    assert result.exit_code == 1 and "Traceback" not in result.stderr, result.stderr
    (err,) = [ln for ln in result.stderr.splitlines() if ln.startswith("failed")]
    assert target.name in err
    expected = {"2d": "got 2D", "4d": "got 4D", "unreadable": "not a readable NIfTI",
                "missing_t1ce": "missing t1ce"}[problem]
    assert expected in err
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{good}.nii.gz"]


def test_predict_bad_model_one_line_error(env, tmp_path):
    err = one_line_error(invoke("predict", "-m", tmp_path / "nope", "-i", env["raw"], "-o",
                                tmp_path / "p"))
    assert "nope" in err


# ----------------------------------------------------------------------------------- evaluate


def write_predictions(env, out: Path, kind: str) -> Path:
    """Predictions in the 2021 convention: the truth itself ("perfect") or all zero ("empty")."""
    out.mkdir(parents=True, exist_ok=True)
    for case_id in env["ids"]:
        seg = env["raw"] / case_id / f"{case_id}_seg.nii.gz"
        if kind == "perfect":
            shutil.copy(seg, out / f"{case_id}.nii.gz")
        else:
            img = nib.load(seg)
            nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine, img.header),
                     out / f"{case_id}.nii.gz")
    return out


def truth_regions(env, case_id: str) -> dict[str, np.ndarray]:
    seg = np.asarray(nib.load(env["raw"] / case_id / f"{case_id}_seg.nii.gz").dataobj)
    return {"WT": np.isin(seg, (1, 2, 4)), "TC": np.isin(seg, (1, 4)), "ET": seg == 4}


def run_pred_eval(env, tmp_path, kind: str, *extra: object) -> tuple[dict, list[list[str]]]:
    pred = write_predictions(env, tmp_path / kind, kind)
    out = tmp_path / f"eval-{kind}"
    result = invoke("evaluate", "--year", "2021", "--pred", pred, "--gt", env["raw"], "--out",
                    out, *extra)
    assert result.exit_code == 0, result.output + result.stderr
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    return json.loads((out / "metrics.json").read_text()), rows


def test_perfect_predictions_score_dice_1_hd95_0(env, tmp_path):
    metrics, _ = run_pred_eval(env, tmp_path, "perfect")
    assert [c["case"] for c in metrics["cases"]] == env["ids"]
    for case in metrics["cases"]:
        for region in ("WT", "TC", "ET"):
            assert case["dice"][region] == 1.0 and case["hd95"][region] == 0.0
            assert case["sensitivity"][region] == 1.0 and case["specificity"][region] == 1.0
    assert metrics["mean"]["dice"] == {"WT": 1.0, "TC": 1.0, "ET": 1.0}


def test_empty_predictions_follow_the_legacy_empty_rules(env, tmp_path):
    metrics, _ = run_pred_eval(env, tmp_path, "empty")
    seen_empty_truth = False
    for case in metrics["cases"]:
        for region, mask in truth_regions(env, case["case"]).items():
            if mask.any():
                assert case["dice"][region] == 0.0
                assert case["hd95"][region] == pytest.approx(373.13)
            else:
                seen_empty_truth = True
                assert case["dice"][region] == 1.0 and case["hd95"][region] == 0.0
            assert case["truth_voxels"][region] == int(mask.sum())
    assert seen_empty_truth  # write_raw gives case 2 no ET


def test_console_table_has_the_units_of_the_csv(env, tmp_path):
    pred = write_predictions(env, tmp_path / "perfect", "perfect")
    result = invoke("evaluate", "--year", "2021", "--pred", pred, "--gt", env["raw"], "--out",
                    tmp_path / "eval")
    assert result.exit_code == 0, result.output + result.stderr
    mean_rows = [line for line in result.output.splitlines() if " mean " in line]
    # the score table's mean row: Dice as fractions (like metrics.csv), HD95 in mm
    cells = [c.strip() for c in mean_rows[0].split("│")[2:8]]
    assert cells == ["1.000"] * 3 + ["0.00"] * 3, mean_rows[0]


def test_metrics_json_and_csv_shape(env, tmp_path):
    metrics, rows = run_pred_eval(env, tmp_path, "perfect")
    assert set(metrics) == {"year", "split", "case_ids", "rules", "hd95_definition",
                            "postprocessing", "source", "cases", "mean"}
    assert metrics["split"] is None  # prediction files belong to no run's split
    assert metrics["case_ids"] == [c["case"] for c in metrics["cases"]]
    assert metrics["year"] == 2021 and isinstance(metrics["year"], int)
    assert "373.13" in metrics["rules"] and "MONAI" in metrics["hd95_definition"]
    names = {"dice", "hd95", "sensitivity", "specificity"}
    for case in metrics["cases"]:
        assert set(case) == {"case", "truth_voxels"} | names
        assert all(set(case[m]) == {"WT", "TC", "ET"} for m in (*names, "truth_voxels"))
    assert set(metrics["mean"]) == names
    assert all(set(metrics["mean"][m]) == {"WT", "TC", "ET"} for m in names)
    header, body, mean = rows[0], rows[1:-1], rows[-1]
    assert len(body) == len(env["ids"]) == len({r[0] for r in body})
    assert header[:4] == ["case", "dice_WT", "dice_TC", "dice_ET"]
    # A mean row in the same units as the JSON (fractions, mm); no post-processing columns
    # when it was off.
    assert mean[0] == "mean" and len(mean) == len(header)
    for i, name in enumerate(header[1:], start=1):
        metric, region = name.rsplit("_", 1)
        assert float(mean[i]) == pytest.approx(metrics["mean"][metric][region], rel=1e-5)
    assert "et_relabelled" not in header and "postprocess_et" not in header
    assert "hd95_ET" in header and not any("legacy" in h for h in header)
    assert "lesion_wise_dice_WT" not in header  # 2021: legacy rules only


def test_legacy_slice_dice_only_when_asked(env, tmp_path):
    metrics, rows = run_pred_eval(env, tmp_path, "perfect", "--legacy-slice-dice")
    assert "NOT the BraTS Dice" in metrics["legacy_slice_dice_note"]
    assert all(c["legacy_slice_dice"] == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
               for c in metrics["cases"])
    assert "legacy_slice_dice" in metrics["mean"]
    assert {"legacy_slice_dice_WT", "legacy_slice_dice_ET"} <= set(rows[0])


def test_postprocessing_is_reported_and_applied(env, tmp_path):
    off, off_rows = run_pred_eval(env, tmp_path, "perfect")
    assert off["postprocessing"]["applied"] is False
    assert off["postprocessing"]["et_min_voxels"] is None
    assert "postprocess_et" not in off_rows[0] and "et_relabelled" not in off_rows[0]

    on, on_rows = run_pred_eval(env, tmp_path, "perfect", "--postprocess-et", 1000)
    post = on["postprocessing"]
    assert post["applied"] is True and post["et_min_voxels"] == 1000
    with_et = [c for c in env["ids"] if truth_regions(env, c)["ET"].any()]
    assert post["cases_relabelled"] == len(with_et)  # blob ETs are ~230 voxels < 1000
    for case in on["cases"]:
        assert case["et_relabelled"] is (case["case"] in with_et)
        assert case["dice"]["WT"] == 1.0 and case["dice"]["TC"] == 1.0  # ET -> NCR keeps TC
        assert case["dice"]["ET"] == (0.0 if case["case"] in with_et else 1.0)
    col = on_rows[0].index("postprocess_et")
    assert {r[col] for r in on_rows[1:]} == {"1000"}
    relabelled = on_rows[0].index("et_relabelled")
    cases = {r[0]: r[relabelled] for r in on_rows[1:-1]}
    assert cases == {c: str(int(c in with_et)) for c in env["ids"]}
    assert on_rows[-1][0] == "mean" and on_rows[-1][relabelled] == str(len(with_et))


def test_evaluate_run_scores_in_native_space(env, tmp_path):
    out = tmp_path / "eval"
    # the store (4 cases) is too small for a test set: the validation fold, asked for by its
    # old spelling
    result = invoke("evaluate", "--year", "2021", "--run", env["et_run"], "--split", "val",
                    "--out", out)
    assert result.exit_code == 0, result.output + result.stderr
    assert "DeMoSeg" in result.output and "comparable" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    val_ids = split_cases(StoreInfo.read(env["store"]), 0)[1]
    assert [c["case"] for c in metrics["cases"]] == val_ids
    assert metrics["source"]["mode"] == "run" and metrics["source"]["split"] == "validation"
    n_total = int(np.prod(SHAPE))
    brain = np.zeros(SHAPE, bool)
    brain[2:-2, 3:-3, 2:-2] = True  # conftest.blob_case's brain box = the ET model's prediction
    for case in metrics["cases"]:
        et = truth_regions(env, case["case"])["ET"]
        # Specificity over the whole original volume; on the brain crop it would be 0.
        expected = (n_total - brain.sum()) / (n_total - et.sum())
        assert case["specificity"]["ET"] == pytest.approx(expected)
        assert case["sensitivity"]["ET"] == 1.0 if et.any() else True

    # The same model through predict -> evaluate --pred gives the same scores.
    pred = tmp_path / "pred"
    assert invoke("predict", "-m", env["et_run"], "-i", env["raw"], "-o", pred).exit_code == 0
    for case_id in env["ids"]:
        if case_id not in val_ids:
            (pred / f"{case_id}.nii.gz").unlink()
    result = invoke("evaluate", "--year", "2021", "--pred", pred, "--gt", env["raw"], "--out",
                    tmp_path / "eval2", "--missing", "skip")
    assert result.exit_code == 0, result.output
    assert "have no prediction" in result.stderr  # the training cases are reported, not scored
    again = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    for a, b in zip(metrics["cases"], again["cases"], strict=True):
        for m in ("dice", "hd95", "specificity"):
            assert a[m] == pytest.approx(b[m])


def test_year_2023_adds_lesion_wise_scores(tmp_path):
    raw = tmp_path / "raw"
    ids = write_raw(raw, "2023", n=2, shape=SHAPE)
    pred = tmp_path / "pred"
    pred.mkdir()
    for case_id in ids:
        shutil.copy(raw / case_id / f"{case_id}-seg.nii.gz", pred / f"{case_id}.nii.gz")
    result = invoke("evaluate", "--year", "2023", "--pred", pred, "--gt", raw, "--out",
                    tmp_path / "eval")
    assert result.exit_code == 0, result.output + result.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["year"] == 2023 and "lesion-wise" in metrics["rules"]
    for case in metrics["cases"]:
        assert case["lesion_wise_dice"] == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
        assert case["lesion_wise_hd95"] == {"WT": 0.0, "TC": 0.0, "ET": 0.0}


def test_predictions_in_the_wrong_convention_fail_loudly(env, tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    case_id = env["ids"][0]
    seg = nib.load(env["raw"] / case_id / f"{case_id}_seg.nii.gz")
    data = np.asarray(seg.dataobj).astype(np.uint8)
    data[data == 4] = 3  # 2023-style ET in a 2021 evaluation
    nib.save(nib.Nifti1Image(data, seg.affine, seg.header), pred / f"{case_id}.nii.gz")
    err = one_line_error(invoke("evaluate", "--year", "2021", "--pred", pred, "--gt", env["raw"],
                                "--out", tmp_path / "eval", "--missing", "skip"))
    assert f"{case_id}.nii.gz" in err and "unexpected label values [3]" in err
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_evaluate_needs_one_source(env, tmp_path):
    # (--year is detected from the store or --gt: tests/test_cli_vocabulary.py)
    one_line_error(invoke("evaluate", "--year", "2021"))
    one_line_error(invoke("evaluate", "--year", "2021", "--pred", tmp_path))


# ----------------------------------------------------------------------------------- pictures


def test_overlay_pngs_from_evaluate(env, tmp_path):
    png = tmp_path / "png"
    pred = write_predictions(env, tmp_path / "perfect", "perfect")
    result = invoke("evaluate", "--year", "2021", "--pred", pred, "--gt", env["raw"], "--out",
                    tmp_path / "eval", "--png", png)
    assert result.exit_code == 0, result.output
    for case_id in env["ids"]:
        data = (png / f"{case_id}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000


def test_tumour_centre_falls_back_to_prediction_then_volume_centre(tmp_path):
    truth = np.zeros((10, 12, 8), np.uint8)
    pred = np.zeros_like(truth)
    pred[1:4, 2:5, 3:6] = 3
    assert tumour_centre(truth, pred, truth.shape) == (2, 3, 4)
    truth[6, 7, 2] = 1
    assert tumour_centre(truth, pred, truth.shape) == (6, 7, 2)
    assert tumour_centre(None, None, truth.shape) == (5, 6, 4)
    out = overlay_png(tmp_path / "x.png", None, prediction=np.zeros_like(truth), title="empty")
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_report_from_a_synthetic_log(env, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dump_config(load_config(CONFIGS / "tiny.yaml"), run / "config.yaml")
    records = []
    step = 0
    for epoch in range(3):
        for _ in range(2):
            step += 1
            records.append({"kind": "train", "step": step, "epoch": epoch,
                            "loss": 2.0 / step, "loss/seg": 1.0 / step, "loss/kd": 0.5 / step,
                            "lr/student": 1e-3 / (epoch + 1), "lr/teachers": 1e-3,
                            "samples_per_s": 10.0 + step, "time/data": 0.01,
                            "time/forward": 0.1, "time/backward": 0.2, "time/step": 0.01})
        records.append({"kind": "epoch", "epoch": epoch, "step": step,
                        **{f"alpha/{m}": 0.1 * (epoch + 1) for m in ("t1", "t2", "flair")},
                        **{f"teacher_wt_dice/{m}": 0.2 * epoch for m in ("t1", "t2", "flair")},
                        "val/dice_WT": 0.3 + 0.2 * (epoch == 1), "val/dice_TC": 0.2,
                        "val/dice_ET": 0.1})
    records.insert(3, {"kind": "train", "step": 2, "epoch": 0, "loss": 99.0})  # resumed rerun
    lines = [json.dumps(r) for r in records] + ['{"kind": "train", "st']  # killed mid-line
    (run / "log.jsonl").write_text("\n".join(lines))
    (run / "summary.json").write_text(json.dumps({"seconds": 12.5, "world_size": 2,
                                                  "preempted": False}))
    result = invoke("report", run)
    assert result.exit_code == 0, result.output
    out = run / "report"
    for name in ("losses", "teacher_weights", "val_dice", "learning_rate"):
        assert (out / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE), name
    text = (out / "report.md").read_text()
    assert "| best epoch | 1 (step 4) |" in text  # no best.json: from the log
    assert "mean 0.2667: WT 0.5, TC 0.2, ET 0.1" in text
    assert "final losses (step 6)" in text and "loss/kd 0.08333" in text
    assert "samples/s" in text and "12.5 s" in text
    assert "1 unreadable line" in text
    assert "| steps logged | 6 (last step 6) |" in text  # the resumed step 2 counted once
    assert "![losses](losses.png)" in text
    one_line_error(invoke("report", tmp_path))  # no log.jsonl


# ---------------------------------------------------------------------------- real BraTS data


@pytest.mark.integration
@pytest.mark.real_data
@pytest.mark.skipif(not SHARED_SAMPLE.is_dir(),
                    reason=f"real BraTS sample not found at {SHARED_SAMPLE} (needs ../shared)")
def test_predict_a_real_case_keeps_its_header(tmp_path):
    case_id = "BraTS2021_00410"
    # A 2-level KD-Net U-Net whose one window covers this case's brain crop: fast on a CPU.
    model = make_student(tmp_path / "real.pt", None, kind="kdnet", widths=(2, 4, 6),
                         patch=(160, 192, 160))
    out = tmp_path / "pred"
    result = invoke("predict", "-m", model, "-i", SHARED_SAMPLE / case_id, "-o", out)
    assert result.exit_code == 0, result.output + result.stderr
    source = SHARED_SAMPLE / case_id / f"{case_id}_t1ce.nii.gz"
    data = assert_same_space(out / f"{case_id}.nii.gz", source)
    assert data.shape == (240, 240, 155)
    assert set(np.unique(data).tolist()) <= {0, 1, 2, 4}


def test_evaluate_pred_finds_the_odd_2020_seg_name(tmp_path):
    """Some 2020 copies name case 355's seg W39_1998.09.19_Segm.nii: scored like the others."""
    raw = tmp_path / "raw"
    ids = write_raw(raw, "2020", n=2)
    odd = raw / ids[1] / f"{ids[1]}_seg.nii.gz"
    odd.rename(odd.with_name("W39_1998.09.19_Segm.nii.gz"))
    pred = tmp_path / "pred"
    pred.mkdir()
    for cid in ids:
        seg = raw / cid / f"{cid}_seg.nii.gz"
        if not seg.exists():
            seg = raw / cid / "W39_1998.09.19_Segm.nii.gz"
        nib.save(nib.load(str(seg)), str(pred / f"{cid}.nii.gz"))
    out = tmp_path / "eval"
    result = invoke("evaluate", "--year", "2020", "--pred", pred, "--gt", raw, "--out", out)
    assert result.exit_code == 0, result.output + result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [c["case"] for c in metrics["cases"]] == ids
    assert metrics["mean"]["dice"] == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
