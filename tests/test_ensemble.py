"""Issue 20, item 8: `predict` ensembles fold models (nnU-Net style: the mean of the models'
class probabilities gives the labels), and refuses models that cannot be averaged."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import blob_case, write_raw
from test_evaluate import make_student
from typer.testing import CliRunner

from mtcmkd.cli.main import app
from mtcmkd.evaluation import trained_releases
from mtcmkd.inference import (
    InferenceSettings,
    build_pipeline,
    probabilities_to_labels,
    segment_volume,
)
from mtcmkd.inference.predict import PipelineEnsemble
from mtcmkd.models import build_network
from mtcmkd.preprocessing import preprocess
from mtcmkd.student_weights import load_student

SHAPE = (24, 28, 20)
runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output + result.stderr
    err = result.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


def pipeline(seed: int, output: str = "softmax", label_values=None):
    torch.manual_seed(seed)
    n_classes = 3 if output == "regions" else 4
    net = build_network("kdnet", 1, n_classes, (2, 4, 6))
    return build_pipeline(net, (16, 16, 16), n_classes, output, InferenceSettings.reference(),
                          device="cpu", label_values=label_values)


def volume(seed: int = 0) -> np.ndarray:
    return blob_case(SHAPE, seed=seed).images["t1ce"][None]


# ------------------------------------------------------------------------------ the library


def test_ensemble_of_one_is_that_model():
    member = pipeline(1)
    image = volume()
    alone, ensemble = segment_volume(member, image), segment_volume(PipelineEnsemble([member]),
                                                                   image)
    np.testing.assert_array_equal(alone.labels, ensemble.labels)
    np.testing.assert_array_equal(alone.probabilities, ensemble.probabilities)
    assert alone.bbox == ensemble.bbox


@pytest.mark.parametrize("output", ["softmax", "regions"])
def test_ensemble_of_two_labels_the_mean_probabilities(output):
    values = [0, 1, 2, 4]  # the 2021 values
    members = [pipeline(1, output, values), pipeline(2, output, values)]
    image = volume()
    each = [segment_volume(m, image) for m in members]
    mean = (each[0].probabilities + each[1].probabilities) / 2
    (d0, d1), (h0, h1), (w0, w1) = each[0].bbox
    expected = np.zeros(SHAPE, np.uint8)
    canonical = probabilities_to_labels(torch.from_numpy(mean), output).numpy()
    expected[d0:d1, h0:h1, w0:w1] = np.asarray(values, np.uint8)[canonical]

    result = segment_volume(PipelineEnsemble(members), image)
    np.testing.assert_allclose(result.probabilities, mean, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(result.labels, expected)
    # the two models disagree somewhere, so the ensemble is neither of them
    assert not np.array_equal(each[0].labels, each[1].labels)
    assert set(np.unique(result.labels).tolist()) <= set(values)


def test_ensemble_refuses_members_of_another_kind():
    with pytest.raises(ValueError, match="member 1 differs"):
        PipelineEnsemble([pipeline(1, "softmax"), pipeline(2, "regions")])
    with pytest.raises(ValueError, match="member 1 differs"):
        PipelineEnsemble([pipeline(1, label_values=[0, 1, 2, 3]),
                          pipeline(2, label_values=[0, 1, 2, 4])])
    with pytest.raises(ValueError, match="at least one"):
        PipelineEnsemble([])


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    raw = root / "raw"
    ids = sorted(write_raw(raw, "2021", n=4, shape=SHAPE))
    store = root / "store"
    assert not preprocess(raw, store, n_folds=2).failed
    runs = []
    for fold, widths in enumerate([(2, 4, 6), (3, 5, 7)]):
        run = make_student(root / f"fold{fold}", store, kind="kdnet", widths=widths)
        # two folds: other weights (make_student seeds 0), the same kind of model
        bundle = load_student(run / "best_student.pt")
        torch.manual_seed(fold + 10)
        with torch.no_grad():
            for p in bundle.network.parameters():
                p.add_(0.3 * torch.randn_like(p))
        from mtcmkd.student_weights import save_student

        meta = bundle.meta
        save_student(run / "best_student.pt", bundle.network, config=meta["config"],
                     config_hash=meta["config_hash"], channels=bundle.channels,
                     output=bundle.output, n_classes=bundle.n_classes,
                     patch_size=bundle.patch_size)
        runs.append(run)
    return {"root": root, "raw": raw, "ids": ids, "store": store, "runs": runs}


def reference_labels(runs, t1ce) -> np.ndarray:
    """The ensemble's labels computed here: each model's probabilities on the brain box
    (reference inference), their mean, argmax, the 2021 values, on the full grid."""
    image = np.asarray(nib.load(t1ce).dataobj, dtype=np.float32)[None]
    probs, box = [], None
    for run in runs:
        bundle = load_student(run / "best_student.pt")
        pipe = build_pipeline(bundle.network, bundle.patch_size, bundle.n_classes,
                              bundle.output, InferenceSettings.reference(), device="cpu")
        result = segment_volume(pipe, image)
        probs.append(result.probabilities)
        box = result.bbox
    canonical = np.argmax(np.mean(probs, axis=0), axis=0)
    labels = np.zeros(image.shape[1:], np.uint8)
    (d0, d1), (h0, h1), (w0, w1) = box
    labels[d0:d1, h0:h1, w0:w1] = np.array([0, 1, 2, 4], np.uint8)[canonical]
    return labels


@pytest.mark.integration
def test_predict_with_two_runs_writes_the_labels_of_the_mean_probabilities(env, tmp_path):
    case_id = env["ids"][0]
    case = tmp_path / "raw" / case_id
    shutil.copytree(env["raw"] / case_id, case)
    out = tmp_path / "ens"
    result = invoke("predict", "--run", env["runs"][0], "--run", env["runs"][1], "--input", case,
                    "--out", out, "--reference")
    assert result.exit_code == 0, result.output + result.stderr
    assert "ensemble of 2 models" in result.stdout
    written = np.asarray(nib.load(out / f"{case_id}.nii.gz").dataobj)
    expected = reference_labels(env["runs"], case / f"{case_id}_t1ce.nii.gz")
    np.testing.assert_array_equal(written, expected)
    report = json.loads((out / "predict_report.json").read_text())
    assert report["models"] == [str(r / "best_student.pt") for r in env["runs"]]

    # neither fold alone gives these labels: the ensemble is not a pass-through
    singles = []
    for i, run in enumerate(env["runs"]):
        assert invoke("predict", "--run", run, "-i", case, "--out", tmp_path / f"s{i}",
                      "--reference").exit_code == 0
        singles.append(np.asarray(nib.load(tmp_path / f"s{i}" / f"{case_id}.nii.gz").dataobj))
    assert not np.array_equal(singles[0], singles[1])
    assert not (np.array_equal(written, singles[0]) and np.array_equal(written, singles[1]))

    # an ensemble of one run is that run, and of one run twice too
    twice = tmp_path / "twice"
    assert invoke("predict", "--run", env["runs"][0], "--run", env["runs"][0], "-i", case,
                  "--out", twice, "--reference").exit_code == 0
    np.testing.assert_array_equal(np.asarray(nib.load(twice / f"{case_id}.nii.gz").dataobj),
                                  singles[0])


def test_predict_refuses_runs_of_another_patch_or_modality(env, tmp_path):
    other_patch = make_student(tmp_path / "other_patch", env["store"], kind="kdnet",
                               widths=(2, 4, 6), patch=(16, 16, 16))
    err = one_line_error(invoke("predict", "--run", env["runs"][0], "--run", other_patch,
                                "-i", env["raw"], "--out", tmp_path / "o"))
    assert f"{other_patch / 'best_student.pt'}: its patch size 16+16+16 differ" in err
    assert "(see docs/TROUBLESHOOTING.md#predict)" in err
    assert not (tmp_path / "o").exists()


def test_predict_refuses_runs_trained_on_another_release(env, tmp_path):
    raw23 = tmp_path / "raw23"
    write_raw(raw23, "2023", n=2, shape=SHAPE)
    store23 = tmp_path / "store23"
    assert not preprocess(raw23, store23, n_folds=2).failed
    run23 = make_student(tmp_path / "run23", store23, kind="kdnet", widths=(2, 4, 6))
    assert trained_releases(run23) == ("2023",)
    assert trained_releases(env["runs"][0]) == ("2021",)
    err = one_line_error(invoke("predict", "--run", env["runs"][0], "--run", run23, "-i",
                                env["raw"], "--out", tmp_path / "o"))
    assert f"{run23 / 'best_student.pt'}: trained on BraTS 2023" in err and "2021" in err
    assert not (tmp_path / "o").exists()
