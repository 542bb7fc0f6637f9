"""The phantom: determinism, array contract, label rules and the modality contrasts.

The contrast tests encode why the phantom exists: ET is obvious on T1ce, edema is obvious on
FLAIR but nearly invisible on T1ce, so a T1ce-only student needs the FLAIR teacher.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from mtcmkd.phantom import MODALITIES, PhantomCase, make_case, synthesize, template_path

SHAPE = (64, 64, 48)
N_CASES = 40
HAS_NILEARN = importlib.util.find_spec("nilearn") is not None


@pytest.fixture(scope="module")
def cases() -> list[PhantomCase]:
    return [make_case(SHAPE, 7, i) for i in range(N_CASES)]


def _digest(case: PhantomCase) -> str:
    h = hashlib.sha256(case.label.tobytes())
    for name in MODALITIES:
        h.update(case.images[name].tobytes())
    return h.hexdigest()


def _shell(case: PhantomCase, width: int = 3) -> np.ndarray:
    """Normal brain within `width` voxels of the whole tumour."""
    tumour = case.label > 0
    brain = case.images["t1"] > 0
    return ndi.binary_dilation(tumour, iterations=width) & ~tumour & brain


def test_same_arguments_give_identical_arrays() -> None:
    a, b = make_case(SHAPE, 3, 5), make_case(SHAPE, 3, 5)
    assert a.has_et == b.has_et and a.anatomy == b.anatomy
    assert np.array_equal(a.label, b.label)
    for name in MODALITIES:
        assert np.array_equal(a.images[name], b.images[name])


@pytest.mark.integration
def test_identical_in_a_fresh_process() -> None:
    """No hidden state (caches, BLAS threads) may change a case between processes."""
    here = _digest(make_case(SHAPE, 3, 5))
    code = (
        "import hashlib; from mtcmkd.phantom import MODALITIES, make_case\n"
        f"c = make_case({SHAPE!r}, 3, 5)\n"
        "h = hashlib.sha256(c.label.tobytes())\n"
        "[h.update(c.images[m].tobytes()) for m in MODALITIES]\n"
        "print(h.hexdigest())\n"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == here


# Digests of a few outputs, recorded with these versions when mtcmkd.phantom became a package
# (the arrays then were bit-identical to the single-module phantom's). A change of the phantom
# must keep them: the same seed gives the same dataset. Other numpy/scipy/nibabel builds may
# round differently, so with those the test skips and says why.
_RECORDED_WITH = {"numpy": "2.4.6", "scipy": "1.17.1", "nibabel": "5.4.2"}
_PROCEDURAL_DIGEST = "2a115c9e472b795f74e7d012a3ed9278d185a8c2ee2cbffb383fca20e31d4d82"
_MNI_DIGEST = "97921ca50b2c9f2d840a31c20976aca415b1e2767cb03f8f7de704e8ee1bd643"
_FILES_DIGEST = "28a98db0a39f283b4c970801eb0b457f441590cebc990a71ef6d69002402273c"


def test_outputs_match_the_recorded_digests(tmp_path: Path) -> None:
    versions = {name: importlib.metadata.version(name) for name in _RECORDED_WITH}
    if versions != _RECORDED_WITH:
        pytest.skip(f"digests recorded with {_RECORDED_WITH}, here {versions}")
    assert _digest(make_case((40, 36, 30), 11, 3, use_template=False)) == _PROCEDURAL_DIGEST
    if HAS_NILEARN:
        assert _digest(make_case((40, 36, 30), 11, 3)) == _MNI_DIGEST
    raw = tmp_path / "raw"
    synthesize(raw, n_cases=2, layout="2021", shape=(24, 24, 20), seed=4, use_template=False)
    h = hashlib.sha256()
    for path in sorted(raw.rglob("*.nii.gz")):  # the contents: gzip headers hold a time
        h.update(str(path.relative_to(raw)).encode())
        h.update(gzip.decompress(path.read_bytes()))
    assert h.hexdigest() == _FILES_DIGEST


def test_different_indices_and_seeds_differ(cases: list[PhantomCase]) -> None:
    digests = {_digest(c) for c in cases[:10]}
    assert len(digests) == 10
    assert _digest(make_case(SHAPE, 8, 0)) != _digest(cases[0])
    # Different cases differ in anatomy pose too, not only in the tumour.
    brains = [c.images["t1"] > 0 for c in cases[:2]]
    assert not np.array_equal(*brains)


def test_shapes_and_dtypes() -> None:
    shape = (56, 64, 40)  # not cubic, odd aspect: axes must not be swapped
    case = make_case(shape, 0, 1)
    assert set(case.images) == {"t1", "t1ce", "t2", "flair"}
    for image in case.images.values():
        assert image.shape == shape and image.dtype == np.float32
    assert case.label.shape == shape and case.label.dtype == np.uint8
    assert isinstance(case.has_et, bool)
    assert case.anatomy == ("mni152" if HAS_NILEARN else "procedural")


def test_outside_is_exactly_zero_and_brain_is_positive(cases: list[PhantomCase]) -> None:
    for case in cases[:10]:
        brain = case.images["t1"] > 0
        assert 0.05 < brain.mean() < 0.6
        for image in case.images.values():
            assert np.all(np.isfinite(image))
            assert np.array_equal(image > 0, brain)  # one mask shared by all sequences
            assert np.all(image[~brain] == 0.0)
            assert image[brain].min() > 0.0
        assert not np.any(case.label[~brain])  # tumour only inside the brain


def test_labels_follow_the_canonical_rules(cases: list[PhantomCase]) -> None:
    for case in cases:
        counts = np.bincount(case.label.ravel(), minlength=4)
        assert len(counts) == 4  # nothing above 3
        assert counts[1] > 0 and counts[2] > 0
        assert (counts[3] > 0) == case.has_et
        assert counts[1:].sum() >= 200  # small volumes still get a real tumour


def test_some_cases_have_no_enhancing_tumour(cases: list[PhantomCase]) -> None:
    no_et = [c for c in cases if not c.has_et]
    assert 1 <= len(no_et) <= 15  # ~15% of 40
    for case in no_et:
        assert not np.any(case.label == 3)


def test_raw_intensity_scale(cases: list[PhantomCase]) -> None:
    """Raw-MRI-like numbers (not z-scores), per-sequence levels, per-case scanner scale."""
    t1ce_medians = []
    for case in cases[:10]:
        brain = case.images["t1"] > 0
        medians = {m: float(np.median(case.images[m][brain])) for m in MODALITIES}
        assert all(50 < v < 3000 for v in medians.values())
        assert max(medians.values()) > 1.1 * min(medians.values())
        assert max(float(case.images[m].max()) for m in MODALITIES) < 5000
        t1ce_medians.append(medians["t1ce"])
    assert max(t1ce_medians) > 1.2 * min(t1ce_medians)


def test_normal_tissue_contrasts(cases: list[PhantomCase]) -> None:
    """T1: WM bright, CSF dark; T2 reverses it; FLAIR suppresses CSF.

    The phantom returns no tissue maps, so classes are read off the images in normal brain:
    T1's brightest half is mostly WM, its darkest 3% and T2's brightest 3% mostly CSF.
    """
    for case in cases[:10]:
        normal = (case.images["t1"] > 0) & ~ndi.binary_dilation(case.label > 0, iterations=2)
        t1, t2, flair = (case.images[m][normal] for m in ("t1", "t2", "flair"))
        wm = t1 > np.quantile(t1, 0.5)
        dark_t1 = t1 < np.quantile(t1, 0.03)
        bright_t2 = t2 > np.quantile(t2, 0.97)
        assert t2[dark_t1].mean() > 1.5 * t2[wm].mean()
        assert t1[bright_t2].mean() < 0.75 * t1[wm].mean()
        assert flair[bright_t2].mean() < 0.85 * flair[wm].mean()
        assert np.corrcoef(t1, t2)[0, 1] < -0.5


def test_enhancing_rim_is_bright_on_t1ce_only(cases: list[PhantomCase]) -> None:
    for case in (c for c in cases if c.has_et):
        et, edema, shell = case.label == 3, case.label == 2, _shell(case)
        t1ce, t1 = case.images["t1ce"], case.images["t1"]
        assert t1ce[et].mean() > 1.4 * t1ce[edema].mean()
        assert t1ce[et].mean() > 1.4 * t1ce[shell].mean()
        # On plain T1 the rim is only mildly visible.
        assert 0.8 < t1[et].mean() / t1[shell].mean() < 1.25


def test_edema_is_bright_on_flair_but_subtle_on_t1ce(cases: list[PhantomCase]) -> None:
    """Edema is +40% or more on FLAIR but within ~10-15% of its surroundings on T1ce.

    Edema favours white matter, so on T1ce it lies between the mean of all surrounding normal
    tissue (which includes darker GM and CSF) and that of the WM-like (bright on T1) part of it:
    a few percent darker than WM, as in real scans.
    """
    to_wm = []
    for case in cases:
        edema, shell = case.label == 2, _shell(case)
        brain = case.images["t1"] > 0
        normal = brain & ~ndi.binary_dilation(case.label > 0, iterations=2)
        flair, t1ce, t1 = case.images["flair"], case.images["t1ce"], case.images["t1"]
        flair_ratio = flair[edema].mean() / np.median(flair[normal])
        assert flair_ratio > 1.4
        wm_like = shell & (t1 > np.median(t1[shell]))
        ratio_wm = t1ce[edema].mean() / t1ce[wm_like].mean()
        ratio_all = t1ce[edema].mean() / t1ce[shell].mean()
        assert 0.82 < ratio_wm < 1.05
        assert 0.95 < ratio_all < 1.18
        # What a T1ce-only student must learn to see is far fainter than the FLAIR signal.
        assert max(abs(ratio_wm - 1), abs(ratio_all - 1)) < 0.4 * (flair_ratio - 1)
        to_wm.append(ratio_wm)
    assert 0.9 < np.mean(to_wm) < 1.0  # a few percent darker than WM on average


def test_necrosis_is_dark_on_t1ce_and_bright_on_t2(cases: list[PhantomCase]) -> None:
    for case in cases:
        necrosis, shell = case.label == 1, _shell(case)
        t1ce, t2 = case.images["t1ce"], case.images["t2"]
        assert t2[necrosis].mean() > 1.3 * t2[shell].mean()
        if case.has_et:
            assert t1ce[necrosis].mean() < 0.6 * t1ce[case.label == 3].mean()
            if necrosis.sum() >= 200:  # small cores are mostly partial volume with the rim
                assert t1ce[necrosis].mean() < 0.9 * t1ce[shell].mean()
        else:  # the non-enhancing core stays below the white matter around it
            wm_like = shell & (case.images["t1"] > np.median(case.images["t1"][shell]))
            assert t1ce[necrosis].mean() < 0.95 * t1ce[wm_like].mean()


def test_procedural_fallback() -> None:
    case = make_case(SHAPE, 1, 2, use_template=False)
    assert case.anatomy == "procedural"
    brain = case.images["t1"] > 0
    assert 0.05 < brain.mean() < 0.6
    counts = np.bincount(case.label.ravel(), minlength=4)
    assert counts[1] > 0 and counts[2] > 0 and (counts[3] > 0) == case.has_et
    again = make_case(SHAPE, 1, 2, use_template=False)
    assert np.array_equal(case.images["flair"], again.images["flair"])


@pytest.mark.skipif(not HAS_NILEARN, reason="nilearn not installed")
def test_template_found_in_the_nilearn_wheel() -> None:
    folder = template_path()
    assert folder is not None and folder.is_dir()
    assert sorted(p.name for p in folder.glob("mni_icbm152_*_tal_nlin_sym_09a_converted.nii.gz"))
    assert make_case(SHAPE, 0, 0).anatomy == "mni152"


def test_template_lookup_does_not_import_nilearn() -> None:
    code = (
        "import sys; from mtcmkd.phantom import template_path; template_path(); "
        "print('nilearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("shape", "seed", "index"), [((8, 64, 48), 0, 0), ((64, 64), 0, 0), (SHAPE, -1, 0)]
)
def test_bad_arguments_are_rejected(shape: tuple[int, ...], seed: int, index: int) -> None:
    with pytest.raises(ValueError):
        make_case(shape, seed, index)  # type: ignore[arg-type]


@pytest.mark.integration
@pytest.mark.slow
def test_full_brats_size_case() -> None:
    case = make_case((240, 240, 155), 0, 0)
    brain = case.images["t1ce"] > 0
    # A real adult brain at 1 mm is ~1.1-1.6 million voxels; BraTS 2021 case 00410: 1.36 M.
    assert 0.9e6 < brain.sum() < 2.0e6
    assert case.label[brain].any() and not case.label[~brain].any()
