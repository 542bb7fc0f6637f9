"""AOTI export (issue 17 item 3) and one export vocabulary (issue 20): the whole inference as an
AOTInductor package, from Python and from the C++ runner, against eager inference.

The export-friendly form of the pipeline (`ExportablePipeline`) is checked eagerly against
`InferencePipeline` at many sizes in milliseconds; the compiled package once per module (one
compile, about a minute on two cores), through the CLI, and the C++ runner once per session
(its CMake build folder is shared by the tests that need it).
"""

from __future__ import annotations

import subprocess
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_export import _cli, _python_path, _write_nifti, runner, write_student

from mtcmkd.export import ExportError, build_aoti_runner, cpp_toolchain_missing, load_exported
from mtcmkd.export.aoti import (
    DIGEST_RECORD,
    ExportablePipeline,
    load_aoti,
    package_digest,
)
from mtcmkd.export.patch_network import load_pt2
from mtcmkd.export.torchscript import (
    VerificationCase,
    build_inference_module,
    reference_prediction,
    synthetic_volume,
)
from mtcmkd.student_weights import load_student


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks run fastest on one thread; more oversubscribe a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return write_student(tmp_path_factory.mktemp("aoti-student") / "best_student.pt")


def _eager_pair(student_path: Path, **options):
    bundle = load_student(student_path)
    pipeline = build_inference_module(bundle, **options)
    return pipeline, ExportablePipeline(pipeline).eval()


# --- the export-friendly form, eagerly ------------------------------------------------------

# Volume sizes against the 16^3 patch: several windows per axis, a box smaller than the patch
# in some or all axes, a brain touching the volume's faces (the padding then reaches outside
# the volume), a volume smaller than the patch.
SHAPES = [(22, 20, 19), (40, 30, 20), (10, 12, 9), (17, 33, 16), (7, 6, 5)]


@pytest.mark.integration
@pytest.mark.parametrize(("options", "n_shapes"), [
    ({"labels": "2021", "overlap": 0.5}, len(SHAPES)),
    ({"labels": "2023", "overlap": 0.25}, 3),
    ({"labels": "2021", "overlap": 0.0, "mirror": True}, 2),
])
def test_exportable_form_equals_the_pipeline(student, options, n_shapes):
    pipeline, exportable = _eager_pair(student, **options)
    for i, shape in enumerate(SHAPES[:n_shapes]):
        volume = torch.from_numpy(synthetic_volume(shape, seed=i))[None]
        with torch.no_grad():
            expected = pipeline(volume)
            got = exportable(volume)
        assert got.dtype == torch.uint8 and got.shape == expected.shape, shape
        assert torch.equal(got, expected), (shape, int((got != expected).sum()))
    # A brain that fills the volume up to its faces: windows padded beyond the volume.
    full = torch.from_numpy(synthetic_volume((18, 14, 21), seed=7))[None]
    full[full == 0] = 3.0
    with torch.no_grad():
        assert torch.equal(exportable(full), pipeline(full))


def test_exportable_form_of_a_region_student(tmp_path):
    path = write_student(tmp_path / "regions.pt", output="regions", seed=3)
    pipeline, exportable = _eager_pair(path, labels="2023")
    volume = torch.from_numpy(synthetic_volume((25, 19, 30), seed=5))[None]
    with torch.no_grad():
        assert torch.equal(exportable(volume), pipeline(volume))


def test_exportable_form_refuses_what_the_pipeline_refuses(student):
    _, exportable = _eager_pair(student)
    bad_values = torch.from_numpy(synthetic_volume((12, 12, 12)))[None]
    bad_values[0, 0, 5, 5, 5] = float("nan")
    constant = torch.zeros(1, 1, 12, 12, 12)
    constant[..., 3:8, 3:8, 3:8] = 7.0
    cases = [(torch.zeros(1, 1, 12, 12, 12), "all zero"), (bad_values, "NaN or infinite"),
             (constant, "constant intensity")]
    for volume, fragment in cases:
        with pytest.raises(RuntimeError, match=fragment):
            exportable(volume)


def test_exportable_form_refuses_settings_it_does_not_cover(student):
    bundle = load_student(student)
    from mtcmkd.inference import InferencePipeline

    box = InferencePipeline(bundle.network, bundle.patch_size, 4, layout="box")
    with pytest.raises(ValueError, match="reference settings"):
        ExportablePipeline(box)


# --- one vocabulary (issue 20) ----------------------------------------------------------------


@pytest.mark.integration
def test_torchscript_year_check_and_their_old_spellings(student, tmp_path):
    app = _cli()
    cases = [(["--year", "2023"], "2023", True), (["--labels", "2023"], "2023", True),
             (["--no-check"], "2021", False), (["--no-check", "--verify"], "2021", True)]
    for i, (extra, convention, checked) in enumerate(cases):
        out = tmp_path / f"s{i}.pt"
        result = runner.invoke(app, ["export", "torchscript", str(student), "--out", str(out),
                                     *extra])
        assert result.exit_code == 0, (extra, result.output + result.stderr)
        _, meta = load_exported(out)
        assert meta["label_convention"] == convention, extra
        assert ("verified" in result.output) is checked, extra
        # the old spellings say so, after the work (an error stays one line)
        old = {"--labels", "--verify"} & set(extra)
        assert ("the old spelling works for a while" in result.stderr) is bool(old), extra
        for flag in old:
            assert f"{flag} (now" in result.stderr, extra


def test_unknown_release_names_the_option_typed(student, tmp_path):
    app = _cli()
    for command, flag, out in (("torchscript", "--year", "s.pt"),
                                ("torchscript", "--labels", "s.pt"),
                                ("aoti", "--year", "s.pt2")):
        result = runner.invoke(app, ["export", command, str(student), "--out",
                                     str(tmp_path / out), flag, "2017"])
        err = result.stderr.strip()
        assert result.exit_code == 2, (command, flag, result.output)
        assert err.startswith("error:") and f"{flag}:" in err and len(err.splitlines()) == 1
        assert not (tmp_path / out).exists()


def test_help_shows_one_vocabulary(student):
    app = _cli()
    for command in ("torchscript", "aoti", "onnx", "pt2"):
        text = runner.invoke(app, ["export", command, "--help"], env={"COLUMNS": "200"}).output
        assert "--check" in text and "--no-check" in text, command
        assert "--verify" not in text and "--labels" not in text, command
    for command in ("torchscript", "aoti"):
        text = runner.invoke(app, ["export", command, "--help"], env={"COLUMNS": "200"}).output
        assert "--year" in text, command


@pytest.mark.integration
def test_pt2_no_check_skips_the_parity_check(student, tmp_path, monkeypatch):
    import mtcmkd.export.patch_network as patch_network

    def unexpected(*args, **kwargs):
        raise AssertionError("the check ran")

    monkeypatch.setattr(patch_network, "raise_on_mismatch", unexpected)
    result = runner.invoke(_cli(), ["export", "pt2", str(student), "--out",
                                    str(tmp_path / "n.pt2"), "--no-check"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "parity" not in result.output
    load_pt2(tmp_path / "n.pt2")


def test_aoti_refuses_an_output_that_is_not_pt2(student, tmp_path):
    result = runner.invoke(_cli(), ["export", "aoti", str(student), "--out",
                                    str(tmp_path / "s.pt")])
    assert result.exit_code == 2 and ".pt2" in result.stderr
    assert not (tmp_path / "s.pt").exists()


def test_aoti_failed_check_exits_1_and_removes_the_file(student, tmp_path, monkeypatch):
    import mtcmkd.export.aoti as aoti

    def fake_compile(module, out, metadata, example_shape):
        Path(out).write_bytes(b"compiled")

    def mismatching(path, bundle, **kwargs):
        return [VerificationCase(shape=(9, 9, 9), max_probability_difference=0.0,
                                 labels_equal=False, n_label_differences=5,
                                 seconds_exported=0.0, seconds_eager=0.0, tolerance=0.0)]

    monkeypatch.setattr(aoti, "compile_package", fake_compile)
    monkeypatch.setattr(aoti, "verify_aoti", mismatching)
    out = tmp_path / "s.pt2"
    result = runner.invoke(_cli(), ["export", "aoti", str(student), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "5 voxel" in result.stderr and "removed" in result.stderr
    assert not out.exists()


# --- the compiled package -------------------------------------------------------------------


@pytest.fixture(scope="module")
def package(student, tmp_path_factory) -> Path:
    """One compile for the module, through the CLI with its default check."""
    out = tmp_path_factory.mktemp("aoti") / "student.pt2"
    result = runner.invoke(_cli(), ["export", "aoti", str(student), "--out", str(out),
                                    "--year", "2023", "--overlap", "0.25"])
    assert result.exit_code == 0, result.output + result.stderr
    assert result.output.count("labels identical to eager") == 2, result.output
    return out


@pytest.mark.slow
@pytest.mark.integration
def test_package_from_python_matches_eager(package, student):
    model, meta = load_aoti(package)
    assert meta["format"] == "mtcmkd-aoti" and meta["label_convention"] == "2023"
    assert meta["overlap"] == 0.25 and meta["source"] == "best_student.pt"
    bundle = load_student(student)
    # Sizes the compile never saw, one smaller than the patch and one brain touching the faces.
    for i, shape in enumerate([(31, 26, 18), (9, 11, 8), (24, 40, 17)]):
        volume = synthetic_volume(shape, seed=20 + i)
        if i == 2:
            volume[volume == 0] = 5.0
        labels = model(torch.from_numpy(volume)[None])[0].numpy()
        expected, _ = reference_prediction(bundle, volume, labels="2023", overlap=0.25)
        np.testing.assert_array_equal(labels, expected, err_msg=str(shape))
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 3}
    with pytest.raises(RuntimeError, match="all zero"):
        model(torch.zeros(1, 1, 10, 10, 10))


def _tampered(package: Path, out: Path) -> Path:
    """The package with one byte in the middle of its largest compiled weight flipped."""
    with zipfile.ZipFile(package) as archive:
        names = archive.namelist()
        contents = {n: archive.read(n) for n in names}
    library = next(n for n in names if n.endswith(".so"))
    blob = bytearray(contents[library])
    marker = _first_weight_bytes(package)
    at = bytes(blob).find(marker)
    assert at > 0, "weight bytes not found in the compiled model"
    blob[at + len(marker) // 2] ^= 0x40
    contents[library] = bytes(blob)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in names:
            archive.writestr(name, contents[name])
    return out


def _first_weight_bytes(package: Path) -> bytes:
    """Raw bytes of the largest tensor the package holds (long enough to be unique)."""
    with zipfile.ZipFile(package) as archive:
        library = next(n for n in archive.namelist() if n.endswith(".so"))
        # A fresh folder each call: overwriting a loaded shared library crashes the process.
        path = archive.extract(library, tempfile.mkdtemp(prefix="aoti-test-"))
    constants = torch._C._aoti.AOTIModelContainerRunnerCpu(path, 1).extract_constants_map(False)
    largest = max(constants.values(), key=lambda t: t.numel())
    return largest.contiguous().numpy().tobytes()


@pytest.mark.slow
@pytest.mark.integration
def test_a_flipped_weight_is_refused(package, tmp_path):
    with zipfile.ZipFile(package) as archive:
        assert any(n.endswith("/" + DIGEST_RECORD) for n in archive.namelist())
    bad = _tampered(package, tmp_path / "bad.pt2")
    assert package_digest(bad) != package_digest(package)
    with pytest.raises(ExportError, match="do not match the digest"):
        load_aoti(bad)


# --- the C++ runner -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def aoti_runner(tmp_path_factory) -> Path:
    reason = cpp_toolchain_missing()
    if reason:
        pytest.skip(f"C++ runner not built: {reason}")
    return build_aoti_runner(tmp_path_factory.mktemp("cpp-aoti-build"))


def _run(program: Path, package: Path, inp: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), str(package), str(inp), str(out), "--threads", "1"],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.integration
def test_cpp_runner_matches_python(aoti_runner, package, student, tmp_path):
    volume = synthetic_volume((29, 21, 18), seed=11)[0]
    source = tmp_path / "t1ce.nii.gz"
    _write_nifti(source, np.round((volume - 1.0) / 2.0).astype(np.int16), slope=2.0, inter=1.0)
    out = tmp_path / "seg.nii.gz"
    done = _run(aoti_runner, package, source, out)
    assert done.returncode == 0, done.stderr
    assert "labels 2023" in done.stdout
    image = _python_path(source)
    model, _ = load_aoti(package)
    python_labels = model(torch.from_numpy(image)[None, None])[0].numpy()
    eager_labels, _ = reference_prediction(load_student(student), image[None], labels="2023",
                                           overlap=0.25)
    seg = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(seg.dataobj), python_labels)
    np.testing.assert_array_equal(python_labels, eager_labels)
    assert seg.get_data_dtype() == np.uint8 and seg.shape == image.shape
    np.testing.assert_array_equal(seg.affine, nib.load(str(source)).affine)


@pytest.mark.slow
@pytest.mark.integration
def test_cpp_runner_errors_are_one_line(aoti_runner, package, tmp_path):
    zeros = tmp_path / "zeros.nii.gz"
    _write_nifti(zeros, np.zeros((12, 10, 9), np.int16))
    (tmp_path / "junk.pt2").write_bytes(b"\0" * 400)
    tampered = _tampered(package, tmp_path / "tampered.pt2")
    cases = [
        (package, zeros, 1, "all zero"),
        (package, tmp_path / "missing.nii", 2, "cannot open"),
        (tmp_path / "junk.pt2", zeros, 2, "cannot load the package"),
        (tampered, zeros, 2, "do not match the digest"),
    ]
    for model, source, code, fragment in cases:
        done = _run(aoti_runner, model, source, tmp_path / "out.nii.gz")
        err = done.stderr.strip()
        assert done.returncode == code, (model, source, err)
        assert err.startswith("error:") and fragment in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out.nii.gz").exists()
