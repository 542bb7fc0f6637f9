"""Export: TorchScript (whole inference) round trip, C++ client, ONNX and .pt2 parity, CLI.

Every artefact is checked the MONAI way: export -> reload the saved file -> compare with eager
inference of the same student. Networks are tiny (widths 8/16/24/32) so the suite stays fast;
the C++ client is built once per session (about 15 s) and skipped only without cmake or a C++
compiler.
"""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import typer
from conftest import SHARED_SAMPLE
from typer.testing import CliRunner

from mtcmkd.brats import brats_affine
from mtcmkd.cli.export_cmd import export_app
from mtcmkd.config import config_hash, load_config, to_dict
from mtcmkd.export import (
    ExportError,
    build_cpp_client,
    cpp_toolchain_missing,
    export_onnx,
    export_torchscript,
    load_exported,
    load_pt2,
    missing_onnx_packages,
    verify_export,
)
from mtcmkd.export.torchscript import (
    reference_prediction,
    synthetic_volume,
    verification_shapes,
)
from mtcmkd.models import build_network
from mtcmkd.student_weights import load_student, save_student

REPO = Path(__file__).resolve().parents[1]
PATCH = (16, 16, 16)
TINY_WIDTHS = (8, 16, 24, 32)
runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks run fastest on one thread; more oversubscribe a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_student(path: Path, *, patch=PATCH, output: str = "softmax", seed: int = 0,
                  widths=TINY_WIDTHS) -> Path:
    """A student weights file as training writes it, from the tiny config."""
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    n_classes = 3 if output == "regions" else 4
    torch.manual_seed(seed)
    net = build_network("resunet", 1, n_classes, widths)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_student(path, net, config=to_dict(cfg), config_hash=config_hash(cfg),
                 channels=("t1ce",), output=output, n_classes=n_classes, patch_size=patch,
                 val_dice={"WT": 0.81, "TC": 0.72, "ET": 0.65}, step=12, epoch=2)
    return path


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return write_student(tmp_path_factory.mktemp("student") / "best_student.pt")


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory):
    return export_torchscript(student, tmp_path_factory.mktemp("ts") / "student.pt")


def _cli() -> typer.Typer:
    """The export commands mounted the way cli/main.py will mount them."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.add_typer(export_app, name="export")

    @app.callback()
    def _root() -> None:
        """mtcmkd (test mount)."""

    return app


def _run(module, volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = torch.from_numpy(volume)[None]
    return module(x)[0].numpy(), module.probabilities(x)[0].numpy()


# --- TorchScript: round trip, labels, metadata ----------------------------------------------


def test_reloaded_file_matches_eager_at_two_sizes(exported):
    shapes = verification_shapes(PATCH)
    assert any(s < p for s, p in zip(shapes[0], PATCH, strict=True))  # padding path
    assert any(s > p + 4 for s, p in zip(shapes[0], PATCH, strict=True))  # two windows
    cases = verify_export(exported.path, exported.bundle)
    assert [c.shape for c in cases] == shapes
    for case in cases:
        assert case.ok, case
        assert case.labels_equal and case.max_probability_difference <= 1e-4


@pytest.mark.integration
def test_label_conventions(student, exported, tmp_path):
    volume = synthetic_volume(verification_shapes(PATCH)[0], seed=3)
    module, _ = load_exported(exported.path)
    raw = module(torch.from_numpy(volume)[None])
    assert raw.dtype == torch.uint8 and tuple(raw.shape) == (1, *volume.shape[1:])
    labels_2021, _ = _run(module, volume)
    assert set(np.unique(labels_2021).tolist()) == {0, 1, 2, 4}

    other = export_torchscript(student, tmp_path / "s2023.pt", labels="2023")
    labels_2023, _ = _run(load_exported(other.path)[0], volume)
    assert set(np.unique(labels_2023).tolist()) == {0, 1, 2, 3}
    # Same segmentation, only the ET value differs.
    np.testing.assert_array_equal(np.where(labels_2021 == 4, 3, labels_2021), labels_2023)

    msd = export_torchscript(student, tmp_path / "msd.pt", labels="msd")
    labels_msd, _ = _run(load_exported(msd.path)[0], volume)
    swapped = np.select([labels_2023 == 1, labels_2023 == 2], [2, 1], labels_2023.astype(int))
    np.testing.assert_array_equal(labels_msd, swapped)  # MSD: 1 edema, 2 non-enhancing


def test_metadata_inside_the_file(exported, student):
    _, meta = load_exported(exported.path)
    payload = torch.load(student, weights_only=True)
    assert meta["modality"] == "t1ce" and meta["modalities"] == ["t1ce"]
    assert meta["label_convention"] == "2021"
    assert meta["label_values"] == {"background": 0, "NCR/NETC": 1, "ED/SNFH": 2, "ET": 4}
    assert meta["regions"] == {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}
    assert meta["probabilities_channels"] == ["WT", "TC", "ET"]
    assert meta["patch_size"] == list(PATCH) and meta["overlap"] == 0.5
    assert meta["mtcmkd_version"] == payload["mtcmkd_version"]
    assert meta["config_hash"] == payload["config_hash"]
    assert meta["val_dice"] == {"WT": 0.81, "TC": 0.72, "ET": 0.65}
    # The code says n_classes; both files keep the documented key "n_out".
    assert meta["n_out"] == payload["n_out"] == 4 and "n_classes" not in meta
    # Plain zip + JSON: readable by any tool, not only torch.
    with zipfile.ZipFile(exported.path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("extra/mtcmkd.json"))
        assert json.loads(archive.read(name)) == meta


def test_probabilities_method(exported):
    volume = synthetic_volume((21, 18, 24), seed=5)
    module, _ = load_exported(exported.path)
    labels, probs = _run(module, volume)
    assert probs.dtype == np.float32 and probs.shape == (3, *volume.shape[1:])
    assert probs.min() >= 0.0 and probs.max() <= 1.0 + 1e-6
    wt, tc, et = probs
    assert np.all(wt + 1e-6 >= tc) and np.all(tc + 1e-6 >= et)  # nested regions
    outside = volume[0] == 0  # the zero margin: outside the brain box on every axis
    outside[2:-2, 2:-2, 2:-2] = False
    assert np.all(probs[:, outside] == 0) and np.all(labels[outside] == 0)


def test_region_student_exports_and_verifies(tmp_path):
    source = write_student(tmp_path / "regions.pt", output="regions", seed=4)
    result = export_torchscript(source, tmp_path / "regions_ts.pt", labels="2023", overlap=0.25)
    assert all(case.ok for case in verify_export(result.path, result.bundle))
    assert result.metadata["network_output"] == "regions"


@pytest.mark.integration
def test_loads_without_mtcmkd_importable(exported, tmp_path):
    volume = synthetic_volume((19, 23, 17), seed=7)
    torch.save(torch.from_numpy(volume)[None], tmp_path / "x.pt")
    script = tmp_path / "standalone.py"
    script.write_text(textwrap.dedent("""
        import importlib.abc, sys
        repo, model, inp, out = sys.argv[1:5]
        # Drop the checkout (and the working directory), keep the venv's site-packages.
        sys.path[:] = [p for p in sys.path if p not in ("", ".", repo) and not (
            p.startswith(repo + "/") and not p.startswith(sys.prefix))]

        class NoMtcmkd(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "mtcmkd" or name.startswith("mtcmkd."):
                    raise ModuleNotFoundError("mtcmkd is blocked in this test")
                return None

        sys.meta_path.insert(0, NoMtcmkd())
        try:
            import mtcmkd  # noqa: F401
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit("mtcmkd is importable: the test would prove nothing")
        import torch
        torch.set_num_threads(1)
        extra = {"mtcmkd.json": ""}
        module = torch.jit.load(model, _extra_files=extra)
        x = torch.load(inp)
        result = {"labels": module(x), "probs": module.probabilities(x),
                  "meta": extra["mtcmkd.json"].decode()}
        assert not [m for m in sys.modules if m.split(".")[0] == "mtcmkd"]
        torch.save(result, out)
    """))
    done = subprocess.run([sys.executable, "-I", str(script), str(REPO), str(exported.path),
                           str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = torch.load(tmp_path / "y.pt", weights_only=True)
    labels, probs = _run(load_exported(exported.path)[0], volume)
    np.testing.assert_array_equal(result["labels"][0].numpy(), labels)
    np.testing.assert_allclose(result["probs"][0].numpy(), probs, atol=1e-6, rtol=0)
    assert json.loads(result["meta"])["label_convention"] == "2021"


def test_input_errors_of_the_exported_module(exported):
    module, _ = load_exported(exported.path)
    with pytest.raises(torch.jit.Error, match="all zero"):
        module(torch.zeros(1, 1, 8, 9, 10))
    with pytest.raises(torch.jit.Error, match=r"\(1, 1, D, H, W\)"):
        module(torch.ones(1, 2, 8, 9, 10))
    with pytest.raises(torch.jit.Error, match="NaN"):
        module(torch.full((1, 1, 8, 9, 10), float("nan")))


# --- refusals ---------------------------------------------------------------------------------


def _refusal_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "empty_run").mkdir()
    torch.save({"format": "something-else", "state_dict": {}}, tmp_path / "other.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    # Weights of another shape under the tiny config (which says 8/16/24/32).
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    save_student(tmp_path / "mismatch.pt", build_network("resunet", 1, 4, (4, 8, 12, 16)),
                 config=to_dict(cfg), config_hash=config_hash(cfg), channels=("t1ce",),
                 output="softmax", n_classes=4, patch_size=PATCH)
    return {
        "missing": (tmp_path / "nope.pt", "no such file"),
        "run folder without student": (tmp_path / "empty_run", "no student weights"),
        "another format": (tmp_path / "other.pt", "not an mtcmkd student"),
        "not a checkpoint": (tmp_path / "notes.pt", "not a student weights file"),
        "mismatched weights": (tmp_path / "mismatch.pt", "stem.main.0.weight has shape"),
    }


def test_refusals_are_one_line_errors(tmp_path):
    for name, (path, fragment) in _refusal_cases(tmp_path).items():
        with pytest.raises(ExportError) as info:
            export_torchscript(path, tmp_path / "out.pt")
        message = str(info.value)
        assert fragment in message and "\n" not in message, (name, message)
        assert not (tmp_path / "out.pt").exists(), name


def test_cli_refusals_exit_2_with_one_line(tmp_path, student):
    app = _cli()
    cases = list(_refusal_cases(tmp_path).values())
    cases += [(student, "--labels"), (student, "--overlap")]
    options = [[]] * (len(cases) - 2) + [["--labels", "2017"], ["--overlap", "1.0"]]
    for (path, fragment), extra in zip(cases, options, strict=True):
        result = runner.invoke(app, ["export", "torchscript", str(path), "--out",
                                     str(tmp_path / "o.pt"), *extra])
        assert result.exit_code == 2, (path, result.output)
        err = result.stderr.strip()
        assert err.startswith("error:") and fragment in err, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.integration
def test_cli_torchscript_from_run_folder_with_verify(tmp_path, student):
    result = runner.invoke(_cli(), ["export", "torchscript", str(student.parent), "--out",
                                    str(tmp_path / "deploy" / "s.pt"), "--labels", "2023",
                                    "--overlap", "0.25", "--verify"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "verified" in result.output and "identical" in result.output
    _, meta = load_exported(tmp_path / "deploy" / "s.pt")
    assert meta["label_convention"] == "2023" and meta["overlap"] == 0.25
    assert meta["source"] == "best_student.pt"


def test_cli_failed_verification_exits_1_and_removes_the_file(tmp_path, student, monkeypatch):
    import mtcmkd.export.torchscript as ts

    def mismatching(path, bundle, **kwargs):
        return [ts.VerificationCase(shape=(9, 9, 9), max_probability_difference=0.3,
                                    labels_equal=False, n_label_differences=12,
                                    seconds_exported=0.0, seconds_eager=0.0, tolerance=1e-4)]

    monkeypatch.setattr(ts, "verify_export", mismatching)
    out = tmp_path / "s.pt"
    result = runner.invoke(_cli(), ["export", "torchscript", str(student), "--out", str(out),
                                    "--verify"])
    assert result.exit_code == 1
    assert "verification failed" in result.stderr and "12 label" in result.stderr
    assert not out.exists()


# --- C++ client -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cpp_client(tmp_path_factory) -> Path:
    reason = cpp_toolchain_missing()
    if reason:
        pytest.skip(f"C++ client not built: {reason}")
    return build_cpp_client(tmp_path_factory.mktemp("cpp-build"))


def _write_nifti(path: Path, data: np.ndarray, *, slope: float = 1.0, inter: float = 0.0,
                 big_endian: bool = False) -> None:
    """Write with nibabel, then force scl_slope/scl_inter in the header bytes (nibabel would
    otherwise choose its own scaling), gzip for .nii.gz."""
    header = nib.Nifti1Header(endianness=">" if big_endian else "<")
    header.set_data_dtype(data.dtype)
    image = nib.Nifti1Image(data, brats_affine(data.shape), header)
    image.set_qform(brats_affine(data.shape), code=1)
    plain = path.with_name(path.name.removesuffix(".gz"))
    nib.save(image, str(plain))
    raw = bytearray(plain.read_bytes())
    struct.pack_into(">ff" if big_endian else "<ff", raw, 112, slope, inter)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(bytes(raw)))
        plain.unlink()
    else:
        path.write_bytes(bytes(raw))


def _python_path(path: Path) -> np.ndarray:
    """What mtcmkd's Python side feeds the exported module for a NIfTI file."""
    return nib.load(str(path)).get_fdata(dtype=np.float64).astype(np.float32)


def _run_client(client: Path, model: Path, inp: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(client), str(model), str(inp), str(out), "--threads", "1"],
                          capture_output=True, text=True, timeout=600)


NIFTI_CASES = [
    # dtype, raw from volume, slope, inter, file name, big-endian
    ("int16", lambda v: np.round((v - 1.0) / 2.0), 2.0, 1.0, "int16_scaled.nii.gz", False),
    ("uint8", lambda v: np.clip(np.round(v / 5.0), 0, 255), 1.0, 0.0, "uint8.nii", False),
    ("uint16", lambda v: v * 3.0, 0.5, 0.0, "uint16.nii.gz", False),
    ("int32", lambda v: v - 10.0 * (v > 0), 1.0, 0.0, "int32.nii", False),
    ("float32", lambda v: v * 0.37, 0.0, 0.0, "float32_noscale.nii.gz", False),
    ("float64", lambda v: v / 7.0, 1.0, 0.0, "float64.nii", False),
    ("int16", lambda v: np.round(v), 1.0, 0.0, "int16_big_endian.nii", True),
]


@pytest.mark.integration
def test_cpp_client_matches_python_on_synthetic_niftis(cpp_client, exported, tmp_path):
    volume = synthetic_volume((22, 20, 19), seed=11)[0]
    module, _ = load_exported(exported.path)
    for dtype, make_raw, slope, inter, name, big_endian in NIFTI_CASES:
        source = tmp_path / name
        _write_nifti(source, make_raw(volume).astype(dtype), slope=slope, inter=inter,
                     big_endian=big_endian)
        out = tmp_path / f"seg_{name}"
        done = _run_client(cpp_client, exported.path, source, out)
        assert done.returncode == 0, (name, done.stderr)
        seg = nib.load(str(out))
        image = _python_path(source)
        python_labels = module(torch.from_numpy(image)[None, None])[0].numpy()
        eager_labels, _ = reference_prediction(exported.bundle, image[None], labels="2021",
                                               overlap=0.5)
        np.testing.assert_array_equal(np.asarray(seg.dataobj), python_labels, err_msg=name)
        np.testing.assert_array_equal(python_labels, eager_labels, err_msg=name)
        assert seg.get_data_dtype() == np.uint8 and seg.shape == image.shape, name
        np.testing.assert_array_equal(seg.affine, nib.load(str(source)).affine, err_msg=name)
        assert (seg.dataobj.slope, seg.dataobj.inter) == (1.0, 0.0), name
        assert set(np.unique(python_labels).tolist()) <= {0, 1, 2, 4}, name


@pytest.mark.integration
def test_cpp_client_errors_are_one_line(cpp_client, exported, tmp_path):
    zeros = tmp_path / "zeros.nii.gz"
    _write_nifti(zeros, np.zeros((12, 10, 9), np.int16))
    four_d = tmp_path / "four_d.nii"
    _write_nifti(four_d, np.ones((8, 8, 8, 2), np.int16))
    (tmp_path / "junk.nii").write_bytes(b"\0" * 400)
    cases = [
        (exported.path, zeros, 1, "all zero"),
        (exported.path, four_d, 2, "one 3D volume"),
        (exported.path, tmp_path / "junk.nii", 2, "not a NIfTI-1 file"),
        (exported.path, tmp_path / "missing.nii", 2, "cannot open"),
        (tmp_path / "junk.nii", zeros, 2, "cannot load the module"),
    ]
    for model, source, code, fragment in cases:
        done = _run_client(cpp_client, model, source, tmp_path / "out.nii.gz")
        err = done.stderr.strip()
        assert done.returncode == code, (source, err)
        assert err.startswith("error:") and fragment in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out.nii.gz").exists()


@pytest.mark.integration
@pytest.mark.real_data
@pytest.mark.skipif(not SHARED_SAMPLE.is_dir(), reason=f"real BraTS sample not found at "
                                                        f"{SHARED_SAMPLE} (needs ../shared)")
def test_cpp_client_on_a_real_case(cpp_client, tmp_path):
    """240x240x155 T1ce: C++ == exported module in Python == eager predict_volume.

    A patch of 72x88x72 without overlap puts 2x2x2 windows on the brain box (133x166x140), so
    cropping, blending and uncropping all run at full size in about 10 s per pass.
    """
    source = next(SHARED_SAMPLE.glob("*/*_t1ce.nii.gz"))
    student = write_student(tmp_path / "real_student.pt", patch=(72, 88, 72), seed=2)
    result = export_torchscript(student, tmp_path / "real.pt", overlap=0.0)
    out = tmp_path / "seg.nii.gz"
    # The client runs on the second core while Python computes its two references.
    client = subprocess.Popen([str(cpp_client), str(result.path), str(source), str(out),
                               "--threads", "1"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        image = _python_path(source)
        module, _ = load_exported(result.path)
        python_labels = module(torch.from_numpy(image)[None, None])[0].numpy()
        eager_labels, _ = reference_prediction(load_student(student), image[None],
                                               labels="2021", overlap=0.0)
        _, stderr = client.communicate(timeout=600)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, stderr
    np.testing.assert_array_equal(python_labels, eager_labels)
    seg = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(seg.dataobj), python_labels)
    np.testing.assert_array_equal(seg.affine, nib.load(str(source)).affine)
    assert seg.shape == (240, 240, 155) and len(np.unique(python_labels)) > 1


# --- patch-level formats: ONNX and torch.export -----------------------------------------------


@pytest.mark.integration
def test_onnx_parity_with_eager(student, tmp_path, capfd):
    missing = missing_onnx_packages()
    if missing:
        pytest.skip(f"ONNX parity not checked: package(s) {', '.join(missing)} not installed "
                    "(test extra: onnx, onnxscript, onnxruntime)")
    result = export_onnx(student, tmp_path / "student.onnx")
    # the exporter's own noise stays off the console (issue 20): no progress lines, no
    # registry warnings ("torchvision is not installed"), no deprecation warnings
    noise = capfd.readouterr()
    assert "[torch.onnx]" not in noise.out + noise.err, noise
    assert "torchvision" not in noise.err and "Warning" not in noise.err, noise.err
    assert len(result.parity) == 2
    assert all(diff <= 1e-4 for diff in result.parity.values()), result.parity
    import onnxruntime

    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["mtcmkd"])
    assert meta["stride"] == 8 and meta["patch_size"] == list(PATCH)


def test_onnx_without_packages_is_a_clear_refusal(student, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("onnx") else real(name, *a))
    with pytest.raises(ExportError, match="onnx, onnxscript, onnxruntime"):
        export_onnx(student, tmp_path / "s.onnx")
    result = runner.invoke(_cli(), ["export", "onnx", str(student), "--out",
                                    str(tmp_path / "s.onnx")])
    assert result.exit_code == 2 and "pip install" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s.onnx").exists()


@pytest.mark.integration
def test_pt2_round_trip_at_three_sizes(student, tmp_path):
    out = tmp_path / "student.pt2"
    result = runner.invoke(_cli(), ["export", "pt2", str(student), "--out", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    assert result.output.count("max |d logit|") == 2  # parity at two shapes, after reload
    module, meta = load_pt2(out)
    assert meta["stride"] == 8 and meta["modalities"] == ["t1ce"]
    x = torch.randn(3, 1, 24, 16, 40)
    with torch.inference_mode():
        torch.testing.assert_close(module(x), load_student(student).network(x), atol=1e-4,
                                   rtol=0)


# --- ONNX-friendly normalisation ----------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: torch.nn.GroupNorm(4, 24),
    lambda: torch.nn.GroupNorm(6, 24, affine=False),
    lambda: torch.nn.InstanceNorm3d(24),
    lambda: torch.nn.InstanceNorm3d(24, affine=True),
])
def test_two_level_norm_equals_the_torch_norm(make):
    from mtcmkd.export.onnx_norms import onnx_friendly_norms

    torch.manual_seed(0)
    norm = make().eval()
    if getattr(norm, "weight", None) is not None:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    swapped = onnx_friendly_norms(torch.nn.Sequential(norm))
    assert type(swapped[0]).__name__ == "TwoLevelGroupNorm"
    for shape in [(2, 24, 8, 12, 6), (1, 24, 16, 8, 8)]:
        x = torch.randn(shape) * 2 + 3
        with torch.no_grad():
            torch.testing.assert_close(swapped(x), norm(x), rtol=1e-5, atol=1e-5)


def test_onnx_friendly_networks_match_eager():
    from mtcmkd.export.onnx_norms import TwoLevelGroupNorm, onnx_friendly_norms

    for kind, widths in (("resunet", (8, 16, 24, 32)), ("kdnet", (8, 16, 24))):
        torch.manual_seed(1)
        net = build_network(kind, 1, 4, widths).eval()
        swapped = onnx_friendly_norms(net)
        assert not any(isinstance(m, (torch.nn.GroupNorm, torch.nn.InstanceNorm3d))
                       for m in swapped.modules())
        assert any(isinstance(m, TwoLevelGroupNorm) for m in swapped.modules())
        x = torch.randn(1, 1, 32, 24, 40)
        with torch.no_grad():
            torch.testing.assert_close(swapped(x), net(x), rtol=1e-4, atol=1e-5)


@pytest.mark.integration
def test_onnx_runtime_norm_precision_on_a_large_window(tmp_path):
    """ONNX Runtime's own normalisation loses precision on long reductions; ours does not."""
    missing = missing_onnx_packages()
    if missing:
        pytest.skip(f"not checked: package(s) {', '.join(missing)} not installed")
    import onnxruntime

    from mtcmkd.export.onnx_norms import onnx_friendly_norms

    norm = torch.nn.Sequential(torch.nn.GroupNorm(2, 16, affine=False)).eval()
    torch.manual_seed(0)
    x = torch.randn(1, 16, 96, 96, 96) * 0.5 + 3.0  # 7M voxels per group, mean/sd 6
    reference = norm.double()(x.double()).numpy()
    errors = {}
    for name, module in (("onnx_default", norm.float()), ("two_level", onnx_friendly_norms(norm))):
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(module, (x,), str(path), dynamo=True, input_names=["x"])
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {"x": x.numpy()})
        errors[name] = float(np.abs(got - reference).max())
    assert errors["two_level"] < 2e-5, errors
    assert errors["onnx_default"] > 10 * errors["two_level"], errors  # what the swap is for
