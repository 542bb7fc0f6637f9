"""Rater-like label noise: the whole-tumour boundary moved in and out by a smooth random amount.

Why this exists: the phantom's labels are exact, real BraTS labels are not. Raters disagree
mostly at the edema boundary (inter-rater whole-tumour Dice about 0.85-0.90, tumour core much
more stable), so a method compared on noise-free phantom labels is judged on an easier task
than the real one. `jitter_edema` reproduces that disagreement on one label volume;
`noisy_copy` writes a copy of a raw BraTS folder with it applied to chosen cases (arm F of the
decisive study, issue 16).

The model: the signed distance to the whole-tumour (WT) boundary plus a smooth random field is
thresholded at zero. The distance is in voxels and negative inside WT; the boundary surface
lies halfway between a WT voxel and its non-WT neighbour, so a zero field reproduces WT
exactly. Where the field is positive WT shrinks, where it is negative WT grows, by about the
field's value in voxels. Tumour core labels never change: only edema and background trade
places, as when one rater draws the edema a little wider than another.

Calibration (measured 2026-11-30, `smoothness` 6 voxels, `noisy_copy` seeds 0-4) on the 8
cases of `mtcmkd synth --layout 2021 --shape 64 64 48 --cases 8 --seed 100` (64 x 64 x 48
voxels of about 3.2-3.75 mm): WT Dice clean vs noisy, mean over the 8 cases for seed 0, mean
over seeds 0-4, range of the five seed means, and range over all 40 case-seed pairs:

    amplitude    seed 0   seeds 0-4   seed means   single cases
    0.5          0.972    0.962       0.943-0.972  0.910-1.000
    0.75         0.914    0.910       0.883-0.930  0.818-0.988
    1 (default)  0.863    0.862       0.832-0.891  0.753-0.956
    1.25         0.820    0.820       0.786-0.855  0.698-0.927
    1.5          0.782    0.784       0.748-0.825  0.661-0.901
    2            0.718    0.722       0.681-0.772  0.590-0.851
    3            0.628    0.632       0.586-0.693  0.474-0.794

Amplitude 1 voxel puts the mean in the inter-rater range 0.85-0.90 at this shape (one seed's
8-case mean varies by about +-0.03). Both the displacement and the smoothness are in voxels,
so the same amplitude costs less Dice on a finer grid: on 4 full-size cases (240 x 240 x 155,
`--seed 100`, noise seed 0) the mean was 0.918 at amplitude 1, 0.876 at 1.5 and 0.839 at 2.
Calibrate again for another shape.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from mtcmkd.brats import release_of_case_id
from mtcmkd.nifti_io import read_nifti, write_label_nifti

#: Default field std (voxels): the calibration above puts the WT Dice of the 64 x 64 x 48
#: phantom in the inter-rater range 0.85-0.90 at this value.
DEFAULT_AMPLITUDE = 1.0
#: Default correlation length (voxels) of the displacement field (gaussian sigma).
DEFAULT_SMOOTHNESS = 6.0

_CANONICAL_EDEMA = 2  # canonical label of edema (mtcmkd.brats.CANONICAL_LABELS)


def jitter_edema(
    seg: np.ndarray,
    *,
    rng: np.random.Generator,
    amplitude: float = DEFAULT_AMPLITUDE,
    smoothness: float = DEFAULT_SMOOTHNESS,
    edema_label: int = 2,
    brain: np.ndarray | None = None,
) -> np.ndarray:
    """A copy of `seg` whose whole-tumour outer boundary moves by a smooth random displacement.

    WT is every non-zero voxel. The new WT is ``{signed_distance + field < 0}``: the signed
    distance (voxels) to the WT boundary, negative inside, plus gaussian-filtered white noise
    (sigma `smoothness` voxels) rescaled to std `amplitude` voxels over the volume. A positive
    field pulls the boundary inwards, a negative one pushes it outwards.

    Labels: tumour core (every non-zero label other than `edema_label`) never changes and stays
    in WT. Voxels that leave WT (always edema, then) become 0; voxels that join WT become
    `edema_label`. Nothing else changes, so only 0 <-> `edema_label` swaps occur.

    Args:
        seg: integer label volume in the release's raw values (2021: 0, 1, 2, 4).
        rng: the only source of randomness: the same generator state gives the same output.
            Exactly one ``standard_normal(seg.shape)`` draw is taken.
        amplitude: std of the displacement in voxels (>= 0); 0 returns an unchanged copy.
        smoothness: gaussian sigma of the field in voxels (> 0); larger is smoother.
        edema_label: the raw value of edema (2 in every release but MSD, where it is 1).
        brain: optional boolean mask of `seg`'s shape; voxels outside it never join WT.

    Returns:
        New array, same shape and dtype as `seg`. A volume without tumour, or one that is
        tumour everywhere (no boundary), is returned as an unchanged copy.

    Raises:
        ValueError: `amplitude` < 0, `smoothness` <= 0, `edema_label` 0, a non-integer `seg`
            or a `brain` of another shape.
    """
    seg = np.asarray(seg)
    if seg.dtype.kind not in "ui":
        raise ValueError(f"seg must hold integer labels, got dtype {seg.dtype}")
    if not amplitude >= 0:
        raise ValueError(f"amplitude must be >= 0 voxels, got {amplitude}")
    if not smoothness > 0:
        raise ValueError(f"smoothness must be > 0 voxels, got {smoothness}")
    if edema_label == 0:
        raise ValueError("edema_label must be a non-zero label")
    if brain is not None and np.shape(brain) != seg.shape:
        raise ValueError(f"brain shape {np.shape(brain)} does not match seg shape {seg.shape}")
    # The one random draw comes first, so the generator advances the same way for every input.
    white = rng.standard_normal(seg.shape, dtype=np.float32)
    out = seg.copy()
    wt = seg != 0
    if amplitude == 0 or not wt.any() or wt.all():
        return out
    field = ndi.gaussian_filter(white, sigma=smoothness, mode="reflect")
    std = float(field.std())
    if std == 0.0:  # a single voxel volume, say: no field to rescale
        return out
    field *= np.float32(amplitude / std)
    # The distance transforms dominate the cost (~3 s on a full 240 x 240 x 155 volume), so
    # they run on WT's bounding box plus a margin the field cannot bridge; the result is the
    # same as on the whole volume (beyond the margin, distance > max |field|: nothing joins).
    box = _padded_box(wt, int(np.ceil(np.abs(field).max())) + 2)
    wt_box = wt[box]
    # Signed distance to the surface halfway between voxel centres: +-0.5 next to it.
    signed = ndi.distance_transform_edt(~wt_box) - ndi.distance_transform_edt(wt_box)
    signed -= np.where(wt_box, -0.5, 0.5)
    new_wt = (signed + field[box]) < 0
    if brain is not None:
        new_wt &= np.asarray(brain, dtype=bool)[box] | wt_box
    new_wt |= wt_box & (seg[box] != edema_label)  # the core stays, whatever the field says
    out_box = out[box]  # a view: the writes below land in `out`
    out_box[wt_box & ~new_wt] = 0
    out_box[new_wt & ~wt_box] = edema_label
    return out


def _padded_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of `mask`'s bounding box grown by `margin` voxels per side, clipped to the array."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - margin, 0),
                         min(int(hits[-1]) + margin + 1, mask.shape[axis])))
    return tuple(box)


def whole_tumour_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of the whole tumour (non-zero voxels) of two label volumes; 1.0 when both are empty.

    Same rule as `mtcmkd.metrics.dice` on the WT masks, without importing torch here (`mtcmkd
    synth` imports this package and stays torch-free).
    """
    wa, wb = np.asarray(a) != 0, np.asarray(b) != 0
    total = int(wa.sum()) + int(wb.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(wa & wb)) / total


def _case_folders(raw: Path) -> dict[str, Path]:
    """case id -> folder for a flat raw tree (one folder per case, named by the case id)."""
    folders = {}
    for entry in sorted(raw.iterdir()):
        if entry.is_dir() and not entry.name.startswith("."):
            folders[entry.name] = entry
    return folders


def noisy_copy(
    raw: Path,
    out: Path,
    case_ids: Iterable[str],
    *,
    seed: int,
    amplitude: float,
    smoothness: float = DEFAULT_SMOOTHNESS,
) -> dict[str, float]:
    """Copy a raw BraTS folder to `out` with `jitter_edema` applied to the segs of `case_ids`.

    `raw` holds one folder per case named by its case id, with the release's file names
    (`mtcmkd synth --layout 2021`: ``<id>/<id>_{t1,t1ce,t2,flair,seg}.nii.gz``; 2020 and 2023
    names work too; WT is every non-zero label, so a 2024 resection cavity, label 4, counts as
    core). Every file is copied byte-identical (`shutil.copy2`) except the seg of each
    case in `case_ids`, which is rewritten with the jittered labels in the original's dtype,
    affine and header (`mtcmkd.nifti_io.write_label_nifti`). The brain mask is ``flair > 0``.

    Case k (0-based, in the sorted order of all case folders of `raw`) draws its field from
    ``np.random.default_rng([seed, k])``: a case's noise depends neither on the order of
    `case_ids` nor on which other cases are jittered.

    The copy is written to a hidden temporary sibling of `out` and renamed at the end, so an
    interrupted run never leaves a partial `out` (only a ``.<name>.*.partial`` folder to delete).

    Returns:
        {case id: WT Dice between the clean and the noisy seg} for the jittered cases.

    Raises:
        FileExistsError: `out` exists.
        FileNotFoundError: `raw` is not a folder, or a jittered case lacks its seg or flair.
        ValueError: case ids not among `raw`'s case folders (all named), a case folder whose
            name no release uses, a seg of non-integer dtype, or a seg and flair of different
            shapes.
    """
    raw, out = Path(raw), Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: exists; noisy_copy writes a new folder, choose another")
    if not raw.is_dir():
        raise FileNotFoundError(f"{raw}: not a folder (expected a raw BraTS folder)")
    folders = _case_folders(raw)
    wanted = sorted(set(case_ids))
    unknown = [cid for cid in wanted if cid not in folders]
    if unknown:
        raise ValueError(f"{raw}: no case folder for {unknown} ({len(folders)} cases there)")
    index = {cid: k for k, cid in enumerate(folders)}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    dice = {}
    try:
        shutil.copytree(raw, partial, copy_function=shutil.copy2, dirs_exist_ok=True)
        for cid in wanted:
            info = release_of_case_id(cid)
            if info is None or info.grouped or info.four_d:
                raise ValueError(f"{folders[cid]}: not a case folder of a flat BraTS release "
                                 "(2020, 2021 or 2023 naming)")
            edema = next(src for src, dst in info.label_map.items() if dst == _CANONICAL_EDEMA)
            seg_path = folders[cid] / info.file_name(cid, "seg")
            flair_path = folders[cid] / info.file_name(cid, "flair")
            for path in (seg_path, flair_path):
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: missing (needed to jitter case {cid})")
            clean = read_nifti(seg_path).data
            flair = read_nifti(flair_path).data
            if clean.dtype.kind not in "ui":
                raise ValueError(f"{seg_path}: labels stored as {clean.dtype}, expected an "
                                 "integer dtype")
            if flair.shape[:3] != clean.shape:
                raise ValueError(f"{seg_path}: shape {clean.shape} does not match the flair's "
                                 f"{flair.shape}")
            noisy = jitter_edema(clean, rng=np.random.default_rng([seed, index[cid]]),
                                 amplitude=amplitude, smoothness=smoothness,
                                 edema_label=edema, brain=flair > 0)
            write_label_nifti(noisy, seg_path, partial / seg_path.relative_to(raw),
                              dtype=clean.dtype)
            dice[cid] = whole_tumour_dice(clean, noisy)
        if out.exists():  # made while we copied: rename would replace an empty folder
            raise FileExistsError(f"{out}: appeared while the copy was written")
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dice
