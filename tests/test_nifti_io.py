"""mtcmkd.nifti_io (the one NIfTI reader and writer) and the release-naming lookups that
preprocess, predict and evaluate share (mtcmkd.brats), plus predict's walk of input trees."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_raw

from mtcmkd.brats import SUFFIX_ROLES, case_id_of_file_stem, odd_segmentation_name
from mtcmkd.evaluation import InputError as EvaluationInputError
from mtcmkd.evaluation import discover_prediction_inputs
from mtcmkd.nifti_io import (
    InputError,
    find_nifti,
    is_nifti_name,
    nifti_extension,
    read_nifti,
    read_shape,
    strip_nifti_extension,
)
from mtcmkd.preprocessing.convert import CaseError
from mtcmkd.preprocessing.convert import read_nifti as read_case_nifti
from mtcmkd.preprocessing.discover import NotTaken as DiscoverNotTaken
from mtcmkd.preprocessing.discover import scan_raw


def save(path: Path, data: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> Path:
    img = nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0]))
    img.header.set_zooms(zooms[: data.ndim])
    nib.save(img, path)
    return path


# ------------------------------------------------------------------------------- file names


@pytest.mark.parametrize(("name", "nifti", "stem"), [
    ("a.nii.gz", True, "a"), ("a.nii", True, "a"), ("BraTS2021_00000_t1ce.nii.gz", True,
                                                     "BraTS2021_00000_t1ce"),
    ("._a.nii.gz", False, None), ("a.nii.gz.bak", False, None), ("a.txt", False, None),
])
def test_nifti_names(name, nifti, stem):
    assert is_nifti_name(name) is nifti
    if nifti:
        assert strip_nifti_extension(name) == stem


def test_nifti_extension_of_outputs():
    assert nifti_extension(Path("x/A.NII.GZ")) == ".nii.gz"
    assert nifti_extension(Path("a.nii")) == ".nii"
    with pytest.raises(ValueError, match="must end in .nii or .nii.gz"):
        nifti_extension(Path("a.nrrd"))


def test_find_nifti_refuses_both_extensions(tmp_path):
    assert find_nifti(tmp_path, "a") is None
    save(tmp_path / "a.nii", np.ones((2, 2, 2), np.int16))
    assert find_nifti(tmp_path, "a") == tmp_path / "a.nii"
    save(tmp_path / "a.nii.gz", np.ones((2, 2, 2), np.int16))
    with pytest.raises(InputError, match="both a.nii.gz and a.nii present"):
        find_nifti(tmp_path, "a")


# ---------------------------------------------------------------------------------- reading


def test_read_nifti_gives_data_affine_zooms_and_the_file_digest(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    path = save(tmp_path / "a.nii.gz", data, zooms=(1.0, 1.5, 2.0))
    vol = read_nifti(path)
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_array_equal(vol.affine, nib.load(path).affine)
    assert vol.zooms == (1.0, 1.5, 2.0)
    assert vol.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_shape(path) == (2, 3, 4)


@pytest.mark.parametrize(("content", "reason"), [
    (b"this is not a NIfTI file at all", "not a valid NIfTI file"),
    (gzip.compress(b"\0" * 10)[:-4], "truncated or corrupt gzip data"),
])
def test_a_bad_file_is_one_input_error_naming_it(tmp_path, content, reason):
    path = tmp_path / ("bad.nii.gz" if content.startswith(b"\x1f\x8b") else "bad.nii")
    path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        read_nifti(path)
    assert caught.value.path == path and reason in caught.value.reason
    assert str(caught.value) == f"{path}: {caught.value.reason}"
    # preprocessing's wrapper says the same, with the case id
    with pytest.raises(CaseError) as wrapped:
        read_case_nifti(path, "c1")
    assert wrapped.value.reason == caught.value.reason and str(wrapped.value).startswith("case c1:")


def test_read_shape_refuses_garbage_with_one_line(tmp_path):
    path = tmp_path / "x.nii"
    path.write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable NIfTI file"):
        read_shape(path)
    with pytest.raises(InputError, match="cannot read file"):
        read_nifti(tmp_path / "missing.nii")


def test_one_input_error_class_for_every_reader():
    # predict and evaluate raise and catch the same class the reader raises
    assert EvaluationInputError is InputError
    assert issubclass(InputError, ValueError)


# ---------------------------------------------------------------------- release naming facts


def test_suffix_roles_cover_every_release():
    assert {SUFFIX_ROLES[s] for s in ("t1", "t1n")} == {"t1"}
    assert {SUFFIX_ROLES[s] for s in ("t1ce", "t1c")} == {"t1ce"}
    assert {SUFFIX_ROLES[s] for s in ("t2", "t2w")} == {"t2"}
    assert {SUFFIX_ROLES[s] for s in ("flair", "t2f")} == {"flair"}
    assert SUFFIX_ROLES["seg"] == "seg"


@pytest.mark.parametrize(("stem", "case_id"), [
    ("BraTS2021_00000_t1ce", "BraTS2021_00000"), ("BraTS-GLI-00000-000-t1c", "BraTS-GLI-00000-000"),
    ("Brats18_TCIA01_123_1_flair", "Brats18_TCIA01_123_1"), ("BRATS_001", None), ("scan", None),
])
def test_case_id_of_file_stem(stem, case_id):
    assert case_id_of_file_stem(stem) == case_id


def test_odd_segmentation_name_takes_exactly_one():
    assert odd_segmentation_name(["W39_1998.09.19_Segm.nii"]) == "W39_1998.09.19_Segm.nii"
    assert odd_segmentation_name(["a_seg.nii", "b_SEG.nii"]) is None
    assert odd_segmentation_name(["notes.nii"]) is None


# ------------------------------------------------------------------- predict's walk of trees


def test_predict_and_preprocess_share_one_walk_and_one_not_taken(tmp_path):
    raw = tmp_path / "raw"
    a, b = sorted(write_raw(raw, "2021", n=2))
    (raw / "link").symlink_to(raw / a, target_is_directory=True)  # the same case twice
    (raw / a / "._side.nii.gz").write_bytes(b"x")  # a macOS side file
    (raw / "empty").mkdir()
    nested = raw / "group" / "deeper"
    nested.mkdir(parents=True)
    shutil.copytree(raw / b, nested / b)
    shutil.rmtree(raw / b)
    found = discover_prediction_inputs(raw, ("t1ce",))
    assert [c.case_id for c in found.cases] == [a, b] and not found.failed
    reasons = {e.path.relative_to(raw).as_posix(): e.reason for e in found.not_taken}
    assert set(reasons) == {"link", f"{a}/._side.nii.gz", "empty"}
    assert "symbolic link" in reasons["link"] and "read once" in reasons["link"]
    assert "hidden" in reasons[f"{a}/._side.nii.gz"] and reasons["empty"] == "empty folder"
    assert all(isinstance(e, DiscoverNotTaken) for e in found.not_taken)
    # preprocess names the same entries (its own reason for the empty folder included)
    scanned = {e.path.relative_to(raw).as_posix() for e in scan_raw(raw).not_taken}
    assert scanned == set(reasons)
