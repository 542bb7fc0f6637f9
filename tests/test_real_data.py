"""End to end on the four real BraTS 2021 cases in ../shared (skipped when absent)."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest
import zarr
from conftest import SHARED_SAMPLE

from mtcmkd.brats import CHANNELS, release
from mtcmkd.preprocessing import preprocess

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not SHARED_SAMPLE.is_dir(),
                       reason=f"real BraTS sample not found at {SHARED_SAMPLE} (needs ../shared)"),
]


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("real") / "store"
    report = preprocess(SHARED_SAMPLE, store, workers=2, n_folds=2)
    assert not report.failed, report.failed
    return store


@pytest.mark.integration
def test_store_holds_every_case(real_store):
    root = zarr.open_group(str(real_store), mode="r")
    assert root.attrs["cases"] == ["BraTS2021_00410", "BraTS2021_00620", "BraTS2021_00625",
                                   "BraTS2021_00652"]
    assert root.attrs["labelled_cases"] == root.attrs["cases"]
    assert sorted(set(root.attrs["folds"]["assignment"].values())) == [0, 1]


@pytest.mark.integration
@pytest.mark.parametrize("case_id", ["BraTS2021_00410", "BraTS2021_00652"])
def test_labels_invert_exactly_to_the_source(real_store, case_id):
    g = zarr.open_group(str(real_store), mode="r")["cases"][case_id]
    seg_path = SHARED_SAMPLE / case_id / f"{case_id}_seg.nii.gz"
    src = nib.load(seg_path)
    original = np.asanyarray(src.dataobj)
    restored = np.zeros(g.attrs["original_shape"], dtype=np.uint8)
    sl = tuple(slice(lo, hi) for lo, hi in g.attrs["crop_bbox"])
    restored[sl] = g["label"][...]
    np.testing.assert_array_equal(release("2021").unmap_labels(restored), original)
    np.testing.assert_allclose(np.array(g.attrs["affine"]), src.affine)
    assert g.attrs["spacing"] == [1.0, 1.0, 1.0]
    assert set(np.unique(g["label"][...]).tolist()) <= {0, 1, 2, 3}
    assert g.attrs["source_files"]["seg"]["sha256"] == hashlib.sha256(
        seg_path.read_bytes()).hexdigest()


@pytest.mark.integration
def test_normalisation_reproducible_from_one_modality(real_store):
    case_id = "BraTS2021_00620"
    g = zarr.open_group(str(real_store), mode="r")["cases"][case_id]
    sl = tuple(slice(lo, hi) for lo, hi in g.attrs["crop_bbox"])
    t1ce = np.asanyarray(nib.load(SHARED_SAMPLE / case_id / f"{case_id}_t1ce.nii.gz").dataobj)
    norm = g.attrs["normalization"]["t1ce"]
    expect = np.where(t1ce[sl] != 0, (t1ce[sl] - norm["mean"]) / norm["std"], 0)
    got = g["image"][CHANNELS.index("t1ce")].astype(np.float32)
    # float16 storage: relative precision 2^-11 on values of a few units
    np.testing.assert_allclose(got, expect, atol=1e-2, rtol=1e-3)
    brain = t1ce[sl] != 0
    assert abs(got[brain].mean()) < 1e-2 and abs(got[brain].std() - 1) < 1e-2


@pytest.mark.integration
def test_crop_keeps_the_whole_brain(real_store):
    case_id = "BraTS2021_00625"
    g = zarr.open_group(str(real_store), mode="r")["cases"][case_id]
    flair = np.asanyarray(nib.load(SHARED_SAMPLE / case_id / f"{case_id}_flair.nii.gz").dataobj)
    sl = tuple(slice(lo, hi) for lo, hi in g.attrs["crop_bbox"])
    assert np.count_nonzero(flair[sl]) == np.count_nonzero(flair)
    assert g["image"].shape[1:] == flair[sl].shape
    assert np.prod(flair[sl].shape) < 0.5 * flair.size  # the crop actually removes background
