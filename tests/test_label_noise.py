"""Rater-like label noise (`mtcmkd.phantom.label_noise`): only the edema boundary moves.

Volumes are tiny spheres built here (raw 2021 values: 1 NCR, 2 edema, 4 ET) and raw folders of
the shared blob cases (tests/conftest.py), so the whole file runs in a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import tree_digest, write_raw
from scipy import ndimage as ndi

from mtcmkd.metrics import dice
from mtcmkd.phantom import jitter_edema, noisy_copy
from mtcmkd.phantom.label_noise import whole_tumour_dice

SHAPE = (32, 30, 28)


def sphere_seg(shape: tuple[int, int, int] = SHAPE, centre: tuple[float, ...] | None = None,
               radius: float = 9.0, dtype: type = np.uint16) -> np.ndarray:
    """Edema shell around a core (NCR centre, ET ring): raw 2021 labels 0, 1, 2, 4."""
    centre = tuple(s / 2 for s in shape) if centre is None else centre
    grid = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    r = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
    seg = np.zeros(shape, dtype=dtype)
    seg[r < radius] = 2
    seg[r < radius / 2] = 4
    seg[r < radius / 4] = 1
    return seg


def jitter(seg: np.ndarray, seed: int = 0, **kwargs: object) -> np.ndarray:
    kwargs.setdefault("amplitude", 2.0)
    kwargs.setdefault("smoothness", 3.0)
    return jitter_edema(seg, rng=np.random.default_rng(seed), **kwargs)


def reference_jitter(seg: np.ndarray, seed: int, amplitude: float, smoothness: float,
                     edema_label: int = 2) -> np.ndarray:
    """The documented rule on the whole volume, written out independently (no cropping)."""
    white = np.random.default_rng(seed).standard_normal(seg.shape, dtype=np.float32)
    field = ndi.gaussian_filter(white, sigma=smoothness)
    field = field * np.float32(amplitude / field.std())
    wt = seg != 0
    inside, outside = ndi.distance_transform_edt(wt), ndi.distance_transform_edt(~wt)
    signed = np.where(wt, 0.5 - inside, outside - 0.5)
    new_wt = (signed + field < 0) | (wt & (seg != edema_label))
    out = np.where(new_wt & ~wt, edema_label, seg)
    return np.where(wt & ~new_wt, 0, out).astype(seg.dtype)


# ------------------------------------------------------------------------------ jitter_edema


def test_core_labels_never_change() -> None:
    seg = sphere_seg()
    noisy = jitter(seg, amplitude=4.0)
    for label in (1, 4):
        assert np.array_equal(noisy == label, seg == label), label


def test_only_background_and_edema_swap() -> None:
    seg = sphere_seg()
    noisy = jitter(seg, amplitude=3.0)
    changed = noisy != seg
    assert changed.any()
    pairs = {(int(a), int(b)) for a, b in zip(seg[changed], noisy[changed], strict=True)}
    assert pairs == {(0, 2), (2, 0)}  # the boundary moved both ways


def test_same_seed_same_output_other_seed_other_output() -> None:
    seg = sphere_seg()
    assert np.array_equal(jitter(seg, seed=3), jitter(seg, seed=3))
    assert not np.array_equal(jitter(seg, seed=3), jitter(seg, seed=4))


def test_zero_amplitude_returns_an_unchanged_copy() -> None:
    seg = sphere_seg()
    noisy = jitter(seg, amplitude=0.0, brain=np.zeros(SHAPE, dtype=bool))
    assert np.array_equal(noisy, seg)
    assert noisy is not seg


def test_larger_amplitude_lowers_whole_tumour_dice() -> None:
    seg = sphere_seg()
    scores = [whole_tumour_dice(seg, jitter(seg, seed=1, amplitude=a))
              for a in (0.5, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(scores, scores[1:], strict=False)), scores
    assert scores[0] < 1.0


@pytest.mark.parametrize("fill", [0, 2])
def test_volume_without_boundary_is_unchanged(fill: int) -> None:
    seg = np.full(SHAPE, fill, dtype=np.uint8)  # no tumour, or tumour everywhere
    rng = np.random.default_rng(0)
    noisy = jitter_edema(seg, rng=rng, amplitude=3.0)
    assert np.array_equal(noisy, seg) and noisy.dtype == seg.dtype
    # The one draw is still taken, so a shared generator advances the same for every case.
    reference = np.random.default_rng(0)
    reference.standard_normal(SHAPE, dtype=np.float32)
    assert rng.random() == reference.random()


def test_dtype_shape_and_input_kept() -> None:
    seg = sphere_seg(dtype=np.uint8)
    before = seg.copy()
    noisy = jitter(seg)
    assert noisy.dtype == np.uint8 and noisy.shape == seg.shape
    assert np.array_equal(seg, before)


@pytest.mark.parametrize("centre", [None, (4.0, 15.0, 14.0)])  # inside; cut by the volume edge
def test_matches_the_rule_on_the_whole_volume(centre: tuple[float, ...] | None) -> None:
    seg = sphere_seg(centre=centre)
    assert np.array_equal(jitter(seg, seed=5, amplitude=2.5, smoothness=3.0),
                          reference_jitter(seg, 5, 2.5, 3.0))


def test_positive_field_shrinks_negative_field_grows() -> None:
    seg = sphere_seg()
    white = np.random.default_rng(2).standard_normal(SHAPE, dtype=np.float32)
    field = ndi.gaussian_filter(white, 3.0)  # the field of seed 2, up to its positive scale
    noisy = jitter(seg, seed=2, amplitude=2.0, smoothness=3.0)
    assert np.all(field[(seg == 2) & (noisy == 0)] > 0)  # left WT where the field is positive
    assert np.all(field[(seg == 0) & (noisy == 2)] < 0)  # joined WT where it is negative


def test_voxels_outside_the_brain_never_join() -> None:
    seg = sphere_seg()
    brain = np.zeros(SHAPE, dtype=bool)
    brain[:, :15] = True  # half the tumour is outside: its edema may shrink there, not grow
    noisy = jitter(seg, amplitude=3.0, brain=brain)
    assert not np.any((noisy != 0) & (seg == 0) & ~brain)
    assert np.any((noisy != 0) & (seg == 0) & brain)


def test_other_edema_label() -> None:
    seg = sphere_seg()
    msd = np.select([seg == 2, seg == 4, seg == 1], [1, 3, 2], 0).astype(np.uint8)  # MSD values
    noisy = jitter(msd, amplitude=3.0, edema_label=1)
    assert np.array_equal(noisy >= 2, msd >= 2)
    assert set(np.unique(noisy[noisy != msd]).tolist()) == {0, 1}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"amplitude": -1.0}, "amplitude"),
    ({"smoothness": 0.0}, "smoothness"),
    ({"edema_label": 0}, "edema_label"),
    ({"brain": np.ones((3, 3, 3), dtype=bool)}, "brain shape"),
])
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        jitter(sphere_seg(), **kwargs)


def test_float_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="integer"):
        jitter(sphere_seg().astype(np.float32))


def test_whole_tumour_dice_agrees_with_the_metrics_package() -> None:
    seg = sphere_seg()
    noisy = jitter(seg, amplitude=3.0)
    assert whole_tumour_dice(seg, noisy) == pytest.approx(dice(noisy != 0, seg != 0))
    empty = np.zeros(SHAPE, dtype=np.uint8)
    assert whole_tumour_dice(empty, empty) == dice(empty != 0, empty != 0) == 1.0


# -------------------------------------------------------------------------------- noisy_copy


@pytest.fixture
def raw(tmp_path: Path) -> tuple[Path, list[str]]:
    folder = tmp_path / "raw"
    return folder, write_raw(folder, "2021", n=4)


def _seg(root: Path, cid: str) -> nib.Nifti1Image:
    return nib.load(root / cid / f"{cid}_seg.nii.gz")


def test_noisy_copy_touches_only_the_chosen_segs(raw: tuple[Path, list[str]],
                                                 tmp_path: Path) -> None:
    folder, ids = raw
    chosen = ids[1:3]
    out = tmp_path / "noisy"
    scores = noisy_copy(folder, out, reversed(chosen), seed=0, amplitude=2.0, smoothness=3.0)
    assert sorted(scores) == chosen
    before, after = tree_digest(folder), tree_digest(out)
    assert sorted(before) == sorted(after)
    changed = sorted(name for name in before if before[name] != after[name])
    assert changed == [f"{cid}/{cid}_seg.nii.gz" for cid in chosen]
    for cid in chosen:
        clean, noisy = _seg(folder, cid), _seg(out, cid)
        assert noisy.get_data_dtype() == clean.get_data_dtype() == np.uint16
        assert np.array_equal(noisy.affine, clean.affine)
        assert noisy.header.get_qform(coded=True)[1] == clean.header.get_qform(coded=True)[1]
        a, b = np.asarray(clean.dataobj), np.asarray(noisy.dataobj)
        assert not np.array_equal(a, b)
        assert scores[cid] == pytest.approx(whole_tumour_dice(a, b)) and scores[cid] < 1.0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_noisy_copy_noise_does_not_depend_on_the_other_cases(raw: tuple[Path, list[str]],
                                                             tmp_path: Path) -> None:
    folder, ids = raw
    kwargs = {"seed": 7, "amplitude": 2.0, "smoothness": 3.0}
    noisy_copy(folder, tmp_path / "one", [ids[2]], **kwargs)
    noisy_copy(folder, tmp_path / "all", ids[::-1], **kwargs)
    noisy_copy(folder, tmp_path / "seed8", ids, **{**kwargs, "seed": 8})
    one, every, other = (np.asarray(_seg(tmp_path / name, ids[2]).dataobj)
                         for name in ("one", "all", "seed8"))
    assert np.array_equal(one, every)
    assert not np.array_equal(one, other)


def test_noisy_copy_unknown_case_ids(raw: tuple[Path, list[str]], tmp_path: Path) -> None:
    folder, ids = raw
    out = tmp_path / "noisy"
    with pytest.raises(ValueError, match=r"BraTS2021_99998.*BraTS2021_99999"):
        noisy_copy(folder, out, [ids[0], "BraTS2021_99999", "BraTS2021_99998"], seed=0,
                   amplitude=1.0)
    assert not out.exists()


def test_noisy_copy_refuses_an_existing_out(raw: tuple[Path, list[str]], tmp_path: Path) -> None:
    folder, ids = raw
    out = tmp_path / "noisy"
    out.mkdir()
    with pytest.raises(FileExistsError, match="noisy"):
        noisy_copy(folder, out, ids[:1], seed=0, amplitude=1.0)
    assert list(out.iterdir()) == []


def test_noisy_copy_failure_leaves_nothing(raw: tuple[Path, list[str]], tmp_path: Path) -> None:
    folder, ids = raw
    (folder / ids[3] / f"{ids[3]}_flair.nii.gz").unlink()
    out = tmp_path / "noisy"
    with pytest.raises(FileNotFoundError, match="flair"):
        noisy_copy(folder, out, ids, seed=0, amplitude=1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no out, no partial copy
