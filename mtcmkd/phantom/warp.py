"""Where each output voxel of one case samples the source brain: pose, deformation, mass effect.

The pose (small tilts, a per-axis size change, a shifted centre) and a smooth displacement make
every case's brain different; the mass effect pushes tissue away from the tumour centre. Only
the brain's bounding box in the output volume is computed, and the tissue fractions are then
kept as 1D vectors over its brain voxels (a third of the box), which is what keeps a full-size
case near one second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import Resampled
from .fields import broadcast_affine, interpolate, rotation, smooth_noise, sub_box


@dataclass(frozen=True, eq=False)
class Pose:
    """How the source brain is placed in the output volume (all in voxels)."""

    to_template: np.ndarray  # (3, 3) output offset -> template offset
    to_output: np.ndarray  # (3, 3) template offset -> output offset
    size: np.ndarray  # (3,) per-axis scale of the brain
    centre_out: np.ndarray  # (3,) where the template's centre lands in the output
    half_tpl: np.ndarray  # (3,) half the template's extent: its centre in template voxels


@dataclass(frozen=True, eq=False)
class BrainSample:
    """The warped brain of one case on its bounding box `lo:hi` of the output volume.

    Tissue fractions are vectors over the box's brain voxels (those whose sampled brain
    fraction is >= 0.5): `flat` gives their flat index in the box, `where` the inverse
    (box voxel -> position in the vectors, -1 outside the brain). wm + gm + csf = 1.
    """

    lo: np.ndarray  # (3,) int, first voxel of the box
    hi: np.ndarray  # (3,) int, one past the last voxel
    box_shape: tuple[int, int, int]
    flat: np.ndarray
    where: np.ndarray
    wm: np.ndarray
    gm: np.ndarray
    csf: np.ndarray


def draw_pose(rng: np.random.Generator, res: Resampled, dims: np.ndarray) -> Pose:
    """Small head tilts and a per-axis size change, so no two brains overlap exactly."""
    rot = rotation(np.deg2rad(rng.uniform(-1, 1, 3) * np.array([4.0, 3.0, 7.0])))
    size = rng.uniform(0.93, 1.04) * rng.uniform(0.97, 1.03, 3)
    # Shifted a little downwards: if a brain is cut, it is at the brainstem, as in BraTS.
    centre_out = (dims - 1) / 2 + rng.uniform(-0.025, 0.025, 3) * dims
    centre_out[2] -= 0.015 * dims[2]
    return Pose(
        to_template=rot @ np.diag(1.0 / size),
        to_output=np.diag(size) @ rot.T,
        size=size,
        centre_out=centre_out,
        half_tpl=(np.array(res.tissues.shape[1:]) - 1) / 2,
    )


def sample_brain(
    rng: np.random.Generator,
    res: Resampled,
    pose: Pose,
    dims: np.ndarray,
    tumour_centre: np.ndarray,
    r_core: float,
    has_et: bool,
) -> BrainSample:
    """Warp the source brain into the output volume: pose, displacement, then mass effect.

    `tumour_centre` is in output voxels, `r_core` in voxels; an enhancing tumour (`has_et`)
    pushes harder. Draws from `rng` in a fixed order (the phantom's bit-reproducibility).
    """
    # Bounding box of the warped brain in the output volume, with room for the displacement
    # (4 sigma) and the mass effect (at most 0.43 * strength * width, below).
    disp_sigma = rng.uniform(1.5, 3.0) * res.vox_per_mm
    half = np.abs(pose.to_output) @ pose.half_tpl + 4 * disp_sigma + 0.25 * r_core + 2
    lo = np.maximum(np.floor(pose.centre_out - half), 0).astype(int)
    hi = np.minimum(np.ceil(pose.centre_out + half) + 1, dims).astype(int)
    box_shape = (int(hi[0] - lo[0]), int(hi[1] - lo[1]), int(hi[2] - lo[2]))
    axes = [
        np.arange(lo[i], hi[i], dtype=np.float32) - np.float32(pose.centre_out[i])
        for i in range(3)
    ]

    # Sampling positions in the template: pose, then a smooth displacement of a few mm.
    coords = np.empty((3, *box_shape), dtype=np.float32)
    for i in range(3):
        coords[i] = broadcast_affine(pose.to_template[i], axes, pose.half_tpl[i])
    coords += smooth_noise(rng, box_shape, 35.0 * res.vox_per_mm, 3) * np.float32(disp_sigma)
    _push_from_tumour(rng, coords, pose, tumour_centre - lo, r_core, has_et)
    return _tissue_fractions(res, coords, lo, hi, box_shape)


def _push_from_tumour(
    rng: np.random.Generator,
    coords: np.ndarray,
    pose: Pose,
    centre: np.ndarray,
    r_core: float,
    has_et: bool,
) -> None:
    """Mass effect, in place: sample closer to the tumour centre (box voxels) near it, which
    pushes tissue outwards; a Gaussian bump of width 1.3 r_core."""
    strength = rng.uniform(0.15, 0.4) * (1.0 if has_et else 0.6)
    sig = 1.3 * r_core
    mslices, moff = sub_box(centre, 3 * sig, coords.shape[1:])
    bump = [np.exp(-((m / np.float32(sig)) ** 2)) for m in moff]
    push = np.float32(strength) * (
        bump[0][:, None, None] * bump[1][None, :, None] * bump[2][None, None, :]
    )
    for i in range(3):
        coords[i][mslices] -= push * broadcast_affine(pose.to_template[i], moff, 0.0)


def _tissue_fractions(
    res: Resampled,
    coords: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    box_shape: tuple[int, int, int],
) -> BrainSample:
    """Brain mask on the box, then tissue fractions only where it is brain."""
    total = np.empty(box_shape, dtype=np.float32)
    interpolate(res.tissues[0], coords, total)
    flat = np.flatnonzero(total >= 0.5)
    points = coords.reshape(3, -1)[:, flat]
    total_v = total.reshape(-1)[flat]
    wm = interpolate(res.tissues[1], points) / total_v
    gm = interpolate(res.tissues[2], points) / total_v
    over = np.maximum(wm + gm, np.float32(1.0))  # interpolation can overshoot by a hair
    wm /= over
    gm /= over
    csf = 1.0 - wm - gm
    where = np.full(box_shape, -1, dtype=np.int32)  # box voxel -> position in the vectors
    where.reshape(-1)[flat] = np.arange(len(flat), dtype=np.int32)
    return BrainSample(lo=lo, hi=hi, box_shape=box_shape, flat=flat, where=where, wm=wm, gm=gm,
                       csf=csf)
