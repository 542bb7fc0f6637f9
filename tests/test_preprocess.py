"""BraTS -> Zarr preprocessing: every layout, the maths, resumability and the bad-input catalogue."""

from __future__ import annotations

import gc
import gzip
import json
import os
import shutil
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr
from conftest import blob_case, tree_digest, write_raw

from mtcmkd.brats import CHANNELS, RELEASES, release
from mtcmkd.preprocessing import (
    DatasetError,
    discover_cases,
    fold_assignment,
    foreground_bbox,
    nonzero_box,
    preprocess,
    zscore_nonzero,
)
from mtcmkd.preprocessing import convert as convert_mod


def stored_cases(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "cases").iterdir() if p.is_dir())


# ---------------------------------------------------------------- maths


def test_zscore_on_nonzero_voxels_by_hand():
    x = np.array([[[0.0, 1.0], [3.0, 0.0]]])
    out, mean, std = zscore_nonzero(x)
    # brain voxels 1 and 3: mean 2, population std 1
    assert (mean, std) == (2.0, 1.0)
    np.testing.assert_array_equal(out, np.array([[[0.0, -1.0], [1.0, 0.0]]], dtype=np.float32))


@pytest.mark.parametrize("shape", [(1, 2, 2), (2, 2), (4,)])
def test_zscore_by_hand_on_integers_of_any_rank(shape):
    x = np.array([0, 1, 3, 0], dtype=np.int16).reshape(shape)
    out, mean, std = zscore_nonzero(x)
    assert (mean, std) == (2.0, 1.0)
    np.testing.assert_array_equal(out.ravel(), np.array([0.0, -1.0, 1.0, 0.0], dtype=np.float32))


def test_zscore_refuses_constant_brain():
    with pytest.raises(ValueError, match="constant intensity"):
        zscore_nonzero(np.array([[[0.0, 5.0, 5.0]]]))


def test_bbox_covers_images_and_seg_and_inverts():
    vol = np.zeros((10, 12, 8), dtype=np.int16)
    vol[2:5, 3:9, 1:2] = 7
    seg = np.zeros_like(vol)
    seg[6, 4, 5] = 2  # a label outside the image support still counts
    bbox = foreground_bbox([vol], seg)
    assert bbox == [[2, 7], [3, 9], [1, 6]]
    sl = tuple(slice(lo, hi) for lo, hi in bbox)
    restored = np.zeros_like(vol)
    restored[sl] = vol[sl]
    np.testing.assert_array_equal(restored, vol)
    restored_seg = np.zeros_like(seg)
    restored_seg[sl] = seg[sl]
    np.testing.assert_array_equal(restored_seg, seg)


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.uint8])
@pytest.mark.parametrize("out_dtype", [np.float16, np.float32])
def test_zscore_integer_path_gives_the_float_path_values(dtype, out_dtype):
    # BraTS images are int16: they take the exact integer path (sums in int64, one table).
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    vol = rng.integers(max(info.min, -900), min(info.max, 3000), size=(20, 18, 16))
    vol[rng.random(vol.shape) < 0.4] = 0  # background
    vol = np.asfortranarray(vol.astype(dtype))[2:17, 1:15, 3:14]  # a NIfTI-like crop view
    out, mean, std = zscore_nonzero(vol, out=np.empty(vol.shape, dtype=out_dtype))
    ref, ref_mean, ref_std = zscore_nonzero(vol.astype(np.float64),
                                            out=np.empty(vol.shape, dtype=out_dtype))
    assert mean == pytest.approx(ref_mean, rel=1e-14) and std == pytest.approx(ref_std, rel=1e-14)
    brain = vol != 0
    assert np.all(out[~brain] == 0)
    # Both round (v - mean) / std from float64 once; means and stds may differ in the last bit.
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    assert diff.max() <= np.spacing(np.abs(ref).astype(out_dtype)).astype(np.float64).max()
    assert np.count_nonzero(diff) <= brain.sum() // 1000


def test_zscore_integer_path_refuses_constant_and_empty_brain():
    with pytest.raises(ValueError, match="constant intensity"):
        zscore_nonzero(np.array([[[0, 5, 5]]], dtype=np.int16))
    with pytest.raises(ValueError, match="constant intensity"):
        zscore_nonzero(np.zeros((2, 2, 2), dtype=np.int16))


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
@pytest.mark.parametrize("order", ["C", "F"])
def test_nonzero_box_is_the_box_of_np_nonzero(dtype, order):
    rng = np.random.default_rng(4)
    for trial in range(20):
        vol = np.zeros((11, 9, 7), dtype=dtype, order=order)
        n = int(rng.integers(1, 6))
        idx = tuple(rng.integers(0, s, size=n) for s in vol.shape)
        vol[idx] = rng.integers(1, 100, size=n).astype(dtype) * (-1 if dtype != np.uint8 else 1)
        expected = [[int(i.min()), int(i.max()) + 1] for i in np.nonzero(vol)]
        assert nonzero_box(vol) == expected, trial
    assert nonzero_box(np.zeros((3, 4, 5), dtype=dtype, order=order)) is None


def test_nonzero_box_treats_negative_zero_as_zero():
    vol = np.zeros((3, 3, 3), dtype=np.float32)
    vol[0, 0, 0] = -0.0
    vol[1, 2, 1] = 1.0
    assert nonzero_box(vol) == [[1, 2], [2, 3], [1, 2]]


def test_gunzip_reads_single_and_multi_member_files_and_rejects_corrupt_ones():
    # _gunzip reads NIfTI files only: it checks the header before inflating the rest (the
    # bounds themselves are tested in test_faults_io.py).
    volume = np.arange(100_000, dtype=np.int16).reshape(100, 50, 20)
    data = nib.Nifti1Image(volume, np.eye(4)).to_bytes()
    assert convert_mod._gunzip(gzip.compress(data)) == data
    # Two members (legal gzip): every member is read.
    assert convert_mod._gunzip(gzip.compress(data[:1000]) + gzip.compress(data[1000:])) == data
    corrupt = bytearray(gzip.compress(data))
    corrupt[-8] ^= 0xFF  # the CRC
    with pytest.raises((OSError, zlib.error)):
        convert_mod._gunzip(bytes(corrupt))
    with pytest.raises((EOFError, OSError, zlib.error)):
        convert_mod._gunzip(gzip.compress(data)[:-100])


def test_fold_assignment_is_deterministic_and_balanced():
    ids = [f"c{i:03d}" for i in range(23)]
    a = fold_assignment(ids, 5, seed=20)
    assert a == fold_assignment(list(reversed(ids)), 5, seed=20)
    sizes = np.bincount(list(a.values()), minlength=5)
    assert sizes.max() - sizes.min() <= 1
    assert a != fold_assignment(ids, 5, seed=21)


# ---------------------------------------------------------------- every release


@pytest.mark.parametrize("layout", RELEASES)
def test_every_release_converts_to_canonical_store(tmp_path, layout):
    raw, store = tmp_path / "raw", tmp_path / "store"
    ids = write_raw(raw, layout, n=3)
    cases = discover_cases(raw)
    assert [c.case_id for c in cases] == sorted(ids)
    assert {c.release for c in cases} == {release(layout).name}
    report = preprocess(raw, store, n_folds=2)
    assert report.count("converted") == 3 and not report.failed

    root = zarr.open_group(str(store), mode="r")
    assert root.attrs["format"] == "mtcmkd-brats-zarr"
    assert root.attrs["channels"] == list(CHANNELS)
    assert root.attrs["cases"] == sorted(ids)
    assert set(root.attrs["folds"]["assignment"]) == set(ids)
    for i in range(3):
        cid = ids[i]
        src = blob_case(seed=i, has_et=i % 3 != 2)
        g = root["cases"][cid]
        bbox = g.attrs["crop_bbox"]
        sl = tuple(slice(lo, hi) for lo, hi in bbox)
        # labels arrive canonical whatever the release wrote on disk
        np.testing.assert_array_equal(g["label"][...], src.label[sl])
        image = g["image"][...].astype(np.float32)
        assert image.shape == (4, *g["label"].shape)
        for c, name in enumerate(CHANNELS):
            brain = image[c] != 0
            assert abs(image[c][brain].mean()) < 1e-2
            assert abs(image[c][brain].std() - 1) < 1e-2
            # the stored statistics reproduce the normalisation from the raw channel
            norm = g.attrs["normalization"][name]
            raw_ch = np.rint(src.images[name][sl]) if layout != "msd" else src.images[name][sl]
            expect = np.where(raw_ch != 0, (raw_ch - norm["mean"]) / norm["std"], 0)
            np.testing.assert_allclose(image[c], expect, atol=2e-2)
        assert g.attrs["original_shape"] == [24, 28, 20]
        assert g.attrs["release"] == release(layout).name
        et = g["foreground"]["ET"][...]
        assert (len(et) > 0) == (i % 3 != 2)
        assert np.all(g["label"][...][tuple(et.T)] == 3)


def test_unlabelled_release_is_accepted(tmp_path):
    raw, store = tmp_path / "raw", tmp_path / "store"
    write_raw(raw, "2021", n=2)
    for seg in raw.rglob("*_seg.nii.gz"):
        seg.unlink()
    report = preprocess(raw, store)
    assert report.count("converted") == 2
    root = zarr.open_group(str(store), mode="r")
    assert root.attrs["labelled_cases"] == []
    g = root["cases"][root.attrs["cases"][0]]
    assert g.attrs["labelled"] is False and "label" not in g


def test_two_workers_give_identical_content(tmp_path):
    raw = tmp_path / "raw"
    write_raw(raw, "2021", n=4)
    preprocess(raw, tmp_path / "a", workers=1)
    preprocess(raw, tmp_path / "b", workers=2)
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    a.pop("preprocess_report.json"), b.pop("preprocess_report.json")
    assert a == b


class _Garbage:
    """Cyclic garbage whose destructor notes the process it runs in (as an object owning a
    C++ thread pool would need to be destroyed in the process that has the threads)."""

    def __init__(self, log: Path) -> None:
        self.log, self.me = log, self

    def __del__(self) -> None:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")


def test_workers_never_collect_the_callers_garbage(tmp_path):
    """The caller's pending garbage is collected in the caller before the workers fork, and the
    workers cannot collect the caller's objects (CI once aborted in a worker that did)."""
    raw, log = tmp_path / "raw", tmp_path / "deleted_in.txt"
    write_raw(raw, "2021", n=4)
    gc.disable()  # only the driver's own collection may run
    try:
        _Garbage(log)
        preprocess(raw, tmp_path / "store", workers=2)
        assert log.read_text().split() == [str(os.getpid())]
        assert gc.get_freeze_count() == 0  # unfrozen again for the caller
    finally:
        gc.enable()


def test_resume_after_crash_leaves_identical_content(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    ids = write_raw(raw, "2021", n=4)
    preprocess(raw, tmp_path / "clean")

    store = tmp_path / "crashed"
    real_write = convert_mod.write_case_group
    calls = {"n": 0}

    def crash_on_third(path, *args, **kwargs):
        calls["n"] += 1
        real_write(path, *args, **kwargs)
        if calls["n"] == 3:  # the third case is fully staged but not yet renamed
            raise KeyboardInterrupt

    monkeypatch.setattr(convert_mod, "write_case_group", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        preprocess(raw, store)
    assert stored_cases(store) == sorted(ids)[:2]
    assert list((store / ".staging").glob(f"*/{sorted(ids)[2]}"))  # the run's own staging

    monkeypatch.setattr(convert_mod, "write_case_group", real_write)
    report = preprocess(raw, store)
    assert report.count("skipped") == 2 and report.count("converted") == 2
    assert not (store / ".staging").exists()
    a, b = tree_digest(tmp_path / "clean"), tree_digest(store)
    a.pop("preprocess_report.json"), b.pop("preprocess_report.json")
    assert a == b


def test_refuses_a_foreign_folder_as_store(tmp_path, raw2021):
    store = tmp_path / "notastore"
    store.mkdir()
    (store / "thesis.docx").write_text("x")
    with pytest.raises(DatasetError, match="not an mtcmkd store"):
        preprocess(raw2021, store)
    assert (store / "thesis.docx").exists()


# ---------------------------------------------------------------- bad input catalogue


def _nifti_like(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    ref = nib.load(path)
    img = nib.Nifti1Image(data, ref.affine if affine is None else affine)
    nib.save(img, path)


def _t(raw: Path, cid: str, role: str) -> Path:
    return raw / cid / release("2021").file_name(cid, role)


def _truncate(raw, cid):
    p = _t(raw, cid, "t1")
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    return p, "truncated or corrupt gzip"


def _garbage_gzip(raw, cid):
    p = _t(raw, cid, "t1ce")
    p.write_bytes(b"\x00\x01 definitely not gzip" * 10)
    return p, "truncated or corrupt gzip"


def _bad_header(raw, cid):
    p = _t(raw, cid, "t2")
    p.write_bytes(gzip.compress(b"not a nifti header" * 40))
    return p, "not a valid NIfTI"


def _short_data(raw, cid):
    p = _t(raw, cid, "flair")
    data = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(data[: len(data) - 500]))
    return p, "truncated"


def _missing_modality(raw, cid):
    p = _t(raw, cid, "t2")
    p.unlink()
    return p, "missing t2 modality"


def _missing_seg(raw, cid):
    p = _t(raw, cid, "seg")
    p.unlink()
    return p, "missing segmentation"


def _shape_mismatch(raw, cid):
    p = _t(raw, cid, "flair")
    _nifti_like(p, np.ones((24, 28, 19), dtype=np.int16))
    return p, r"shape \(24, 28, 19\) differs from t1's \(24, 28, 20\)"


def _affine_mismatch(raw, cid):
    p = _t(raw, cid, "t2")
    aff = nib.load(p).affine.copy()
    aff[0, 3] += 2.0
    _nifti_like(p, np.asanyarray(nib.load(p).dataobj), aff)
    return p, "affine differs from t1's"


def _nan(raw, cid):
    p = _t(raw, cid, "flair")
    data = np.asanyarray(nib.load(p).dataobj).astype(np.float32)
    data[5, 5, 5] = np.nan
    _nifti_like(p, data)
    return p, r"NaN or Inf \(1 voxels\)"


def _all_zero(raw, cid):
    p = _t(raw, cid, "t1")
    _nifti_like(p, np.zeros((24, 28, 20), dtype=np.int16))
    return p, "all-zero volume"


def _label_3_in_2021(raw, cid):
    p = _t(raw, cid, "seg")
    data = np.asanyarray(nib.load(p).dataobj).copy()
    data[12, 14, 10] = 3
    _nifti_like(p, data)
    return p, r"unexpected label values \[3\]"


def _label_5(raw, cid):
    p = _t(raw, cid, "seg")
    data = np.asanyarray(nib.load(p).dataobj).copy()
    data[0, 0, 0] = 5
    _nifti_like(p, data)
    return p, r"unexpected label values \[5\]"


def _four_d(raw, cid):
    p = _t(raw, cid, "t1ce")
    data = np.asanyarray(nib.load(p).dataobj)[..., None]
    _nifti_like(p, data)
    return p, r"expected a 3D volume, got 4D shape \(24, 28, 20, 1\)"


BAD_INPUTS = {
    "truncated-gz": _truncate,
    "corrupt-gz": _garbage_gzip,
    "bad-header": _bad_header,
    "short-data": _short_data,
    "missing-modality": _missing_modality,
    "missing-seg": _missing_seg,
    "shape-mismatch": _shape_mismatch,
    "affine-mismatch": _affine_mismatch,
    "nan": _nan,
    "all-zero": _all_zero,
    "label-3-in-2021": _label_3_in_2021,
    "label-5": _label_5,
    "4d-in-3d-release": _four_d,
}


@pytest.mark.parametrize("breaker", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_case_fails_alone_and_leaves_nothing(tmp_path, breaker):
    raw, store = tmp_path / "raw", tmp_path / "store"
    ids = sorted(write_raw(raw, "2021", n=3))
    bad = ids[1]
    path, reason = breaker(raw, bad)
    report = preprocess(raw, store)
    assert [r.case_id for r in report.failed] == [bad]
    err = report.failed[0].error
    assert "\n" not in err and bad in err and path.name in err
    assert __import__("re").search(reason, err), err
    assert stored_cases(store) == [ids[0], ids[2]]
    assert not (store / ".staging").exists()
    saved = json.loads((store / "preprocess_report.json").read_text())
    assert saved["n_failed"] == 1 and saved["failures"][0]["case_id"] == bad
    assert zarr.open_group(str(store), mode="r").attrs["cases"] == [ids[0], ids[2]]


def test_duplicate_case_ids_fail_both(tmp_path):
    raw, store = tmp_path / "raw", tmp_path / "store"
    ids = sorted(write_raw(raw, "2021", n=2))
    shutil.copytree(raw / ids[0], raw / "copy" / ids[0])
    report = preprocess(raw, store)
    failed = report.failed
    assert {r.case_id for r in failed} == {ids[0]} and len(failed) == 2
    assert all("duplicate case id" in r.error for r in failed)
    assert stored_cases(store) == [ids[1]]


def test_msd_three_d_image_is_rejected(tmp_path):
    raw, store = tmp_path / "raw", tmp_path / "store"
    ids = write_raw(raw, "msd", n=2)
    p = raw / "imagesTr" / f"{ids[0]}.nii.gz"
    _nifti_like(p, np.asanyarray(nib.load(p).dataobj)[..., 0])
    report = preprocess(raw, store)
    assert [r.case_id for r in report.failed] == [ids[0]]
    assert "expected a 4D volume with 4 channels" in report.failed[0].error


def test_macos_resource_files_are_ignored(tmp_path):
    raw = tmp_path / "raw"
    write_raw(raw, "msd", n=1)
    (raw / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00" * 10)
    assert [c.case_id for c in discover_cases(raw)] == ["BRATS_001"]


def test_empty_and_non_brats_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no BraTS"):
        preprocess(tmp_path / "empty", tmp_path / "s1")
    other = tmp_path / "other" / "patient7"
    other.mkdir(parents=True)
    (other / "scan.nii.gz").write_bytes(b"")
    with pytest.raises(DatasetError, match="no BraTS"):
        preprocess(tmp_path / "other", tmp_path / "s2")
    with pytest.raises(DatasetError, match="no such folder"):
        preprocess(tmp_path / "missing", tmp_path / "s3")
    assert not (tmp_path / "s1").exists() or not any((tmp_path / "s1").iterdir())


def test_2020_renamed_seg_of_case_355_is_found(tmp_path):
    raw = tmp_path / "raw"
    ids = write_raw(raw, "2020", n=1)
    seg = raw / ids[0] / f"{ids[0]}_seg.nii.gz"
    seg.rename(raw / ids[0] / "W39_1998.09.19_Segm.nii.gz")
    (case,) = discover_cases(raw)
    assert case.files["seg"].name == "W39_1998.09.19_Segm.nii.gz"


def test_forced_year_and_nii_files(tmp_path):
    raw, store = tmp_path / "raw", tmp_path / "store"
    write_raw(raw, "2019", n=2)
    assert all(p.suffix == ".nii" for p in raw.rglob("*.nii*"))
    report = preprocess(raw, store, year="2019")
    assert report.count("converted") == 2
