"""Release facts: label mapping per release, names, regions."""

from __future__ import annotations

import numpy as np
import pytest

from mtcmkd.brats import REGIONS, RELEASES, region_masks, release, release_of_case_id


@pytest.mark.parametrize(
    ("name", "source", "canonical"),
    [
        ("2018", [0, 1, 2, 4], [0, 1, 2, 3]),
        ("2019", [0, 1, 2, 4], [0, 1, 2, 3]),
        ("2020", [0, 1, 2, 4], [0, 1, 2, 3]),
        ("2021", [0, 1, 2, 4], [0, 1, 2, 3]),
        ("2023", [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]),
        # MSD: 1 edema, 2 non-enhancing, 3 enhancing -> canonical 2, 1, 3
        ("msd", [0, 1, 2, 3], [0, 2, 1, 3]),
    ],
)
def test_label_mapping_per_release(name, source, canonical):
    info = release(name)
    seg = np.array(source, dtype=np.uint16).reshape(1, 1, -1)
    assert info.map_labels(seg).ravel().tolist() == canonical
    assert info.map_labels(seg).dtype == np.uint8
    back = info.unmap_labels(info.map_labels(seg))
    assert back.ravel().tolist() == source


def test_enhancing_tumour_is_canonical_3_in_every_release():
    # The classic trap: ET = 4 only in 2017-2021. Each release's own ET value must land on 3.
    et_source = {"2018": 4, "2019": 4, "2020": 4, "2021": 4, "2023": 3, "msd": 3}
    for name in RELEASES:
        seg = np.array([[[et_source[name]]]])
        assert release(name).map_labels(seg).item() == 3, name


@pytest.mark.parametrize(("name", "bad"), [("2021", 3), ("2021", 5), ("2023", 5), ("msd", 4)])
def test_unexpected_labels_are_rejected(name, bad):
    with pytest.raises(ValueError, match=rf"unexpected label values \[{bad}\]"):
        release(name).map_labels(np.array([[[0, 1, bad]]]))


def test_non_integer_labels_are_rejected():
    with pytest.raises(ValueError, match="non-integer"):
        release("2021").map_labels(np.array([[[0.0, 1.5]]]))


def test_float_seg_with_integer_values_is_accepted():
    out = release("2021").map_labels(np.array([[[0.0, 4.0, 2.0]]], dtype=np.float32))
    assert out.ravel().tolist() == [0, 3, 2]


def test_regions_and_rc_outside_every_region():
    labels = np.array([0, 1, 2, 3, 4])
    masks = region_masks(labels)
    assert masks["WT"].tolist() == [False, True, True, True, False]
    assert masks["TC"].tolist() == [False, True, False, True, False]
    assert masks["ET"].tolist() == [False, False, False, True, False]
    assert set(REGIONS) == {"WT", "TC", "ET"}


@pytest.mark.parametrize(
    ("case_id", "name"),
    [
        ("Brats18_TCIA01_150_1", "2018"),
        ("Brats18_CBICA_AAB_1", "2018"),
        ("BraTS19_CBICA_AAB_1", "2019"),
        ("BraTS20_Training_001", "2020"),
        ("BraTS20_Validation_042", "2020"),
        ("BraTS2021_00000", "2021"),
        ("BraTS-GLI-00000-000", "2023"),
        ("BraTS-MEN-01234-001", "2023"),
        ("BRATS_001", "msd"),
    ],
)
def test_case_id_patterns(case_id, name):
    assert release_of_case_id(case_id).name == name


def test_file_names():
    assert release("2021").file_name("BraTS2021_00000", "t1ce") == "BraTS2021_00000_t1ce.nii.gz"
    assert release("2023").file_name("BraTS-GLI-00000-000", "flair") == (
        "BraTS-GLI-00000-000-t2f.nii.gz")
    assert release("2023").file_name("BraTS-GLI-00000-000", "t1") == "BraTS-GLI-00000-000-t1n.nii.gz"
    assert release("2019").file_name("BraTS19_X_1_1", "seg") == "BraTS19_X_1_1_seg.nii"


def test_unknown_release():
    with pytest.raises(ValueError, match="unknown BraTS release"):
        release("2017b")
