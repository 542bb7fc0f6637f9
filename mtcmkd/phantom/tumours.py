"""The phantom's tumour: size, kind and place, then an irregular three-compartment shape.

Like a glioma: a core (enhancing rim around necrosis, or a non-enhancing core in the ~15%
LGG-like cases) inside a larger edema that reaches further along white matter than into cortex.
Compartments are partial-volume fractions per brain voxel, so boundaries blur over a voxel as
in real scans; the label of a voxel is its dominant compartment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import Resampled
from .fields import broadcast_affine, rotation, smooth_noise, sub_box
from .warp import BrainSample, Pose

NO_ET_PROBABILITY = 0.15  # LGG-like cases: non-enhancing core, no label 3
MIN_CORE_RADIUS = 3.5  # voxels; keeps a tumour of several hundred voxels in tiny test volumes
MIN_COMPARTMENT = 10  # voxels; a label on fewer is partial-volume noise, not a compartment


@dataclass(frozen=True, eq=False)
class TumourPlan:
    """A tumour's size, kind and centre, drawn before the brain is warped (mass effect)."""

    r_core: float  # output voxels
    r_edema: float  # output voxels
    has_et: bool
    centre: np.ndarray  # (3,) output voxels


@dataclass(frozen=True, eq=False)
class Tumour:
    """Where the tumour is and how much of each compartment every brain voxel there holds."""

    slices: tuple[slice, ...]  # the tumour's box inside the brain box
    label: np.ndarray  # labels on that box (0 outside the brain)
    ids: np.ndarray  # positions in the brain vectors of the box's brain voxels
    necrosis: np.ndarray  # fractions at those voxels; the four sum to 1
    core: np.ndarray  # enhancing rim with ET, non-enhancing core without
    edema: np.ndarray
    normal: np.ndarray
    texture: np.ndarray  # smooth ~unit-std field for tumour heterogeneity


def draw_tumour_plan(rng: np.random.Generator, res: Resampled, pose: Pose) -> TumourPlan:
    """Tumour size and kind, and a centre chosen in template space so it lands in the right
    tissue (mostly hemispheric white matter), mapped to the output through `pose`."""
    extent = float(np.mean(res.brain_extent * pose.size))
    r_core = max(extent * (0.08 + 0.12 * rng.random() ** 1.3), MIN_CORE_RADIUS)
    r_edema = r_core * rng.uniform(1.35, 1.9)
    has_et = bool(rng.random() >= NO_ET_PROBABILITY)
    seed = _pick_seed(rng, res, r_core)
    centre = pose.to_output @ (seed - pose.half_tpl) + pose.centre_out
    return TumourPlan(r_core=r_core, r_edema=r_edema, has_et=has_et, centre=centre)


def _pick_seed(rng: np.random.Generator, res: Resampled, r_core: float) -> np.ndarray:
    """A tumour centre deep enough for the core: mostly hemispheric WM, sometimes anywhere."""
    if rng.random() < 0.85 and len(res.seeds_wm):
        seeds, depth = res.seeds_wm, res.depth_wm
    else:
        seeds, depth = res.seeds_any, res.depth_any
    ok = np.flatnonzero(depth >= 1.1 * r_core)
    if not len(ok):  # a large core in a thin brain: take the deepest 2% instead
        ok = np.argsort(depth)[-max(1, len(depth) // 50) :]
    return seeds[ok[rng.integers(len(ok))]].astype(np.float64)


def grow_tumour(
    rng: np.random.Generator, plan: TumourPlan, brain: BrainSample, vpm: float
) -> Tumour | None:
    """Labels and partial-volume fractions of an irregular three-compartment tumour.

    The core is an ellipsoid whose radius is perturbed by smooth noise; with ET, necrosis is
    the core minus a rim of varying thickness (nodular, >= 1 voxel); edema is a larger, more
    irregular halo that reaches further in white matter than in cortex, as vasogenic edema
    does. Fractions ramp over one voxel so boundaries have partial volume like real scans.
    `vpm` is output voxels per mm. Returns None when a required label has fewer than
    MIN_COMPARTMENT voxels in the brain (the caller then redraws the case).
    """
    r_core, r_edema, has_et = plan.r_core, plan.r_edema, plan.has_et
    ratios = rng.uniform(0.8, 1.25, 3)
    metric = np.diag(1.0 / ratios) @ rotation(rng.uniform(-np.pi, np.pi, 3))
    slices, off = sub_box(plan.centre - brain.lo, 2.1 * r_edema * ratios.max() + 2,
                          brain.where.shape)
    tshape = tuple(s.stop - s.start for s in slices)
    if min(tshape) == 0:
        return None
    ids_box = brain.where[slices]
    inside = ids_box >= 0
    ids = ids_box[inside]
    r2 = np.zeros(tshape, dtype=np.float32)
    for i in range(3):
        r2 += broadcast_affine(metric[i], off, 0.0) ** 2
    r = np.sqrt(r2)[inside]
    del r2
    picked = inside.ravel()
    n_core, n_rim, n_edema = np.clip(
        smooth_noise(rng, tshape, max(0.5 * r_core, 2.0), 3).reshape(3, -1)[:, picked], -2.0, 2.0
    )
    # Finer grain for the signal heterogeneity inside the tumour (~4 mm blobs).
    texture = np.clip(
        smooth_noise(rng, tshape, max(4.0 * vpm, 1.5), 1).reshape(-1)[picked], -2.5, 2.5
    )
    r_core_eff = r - np.float32(0.22 * r_core) * n_core
    w_core = np.clip(0.5 + (np.float32(r_core) - r_core_eff), 0.0, 1.0)
    # Edema runs along white-matter tracts and stops at the cortex: reach grows with WM.
    reach = (np.float32(r_edema) * (0.55 + 0.6 * brain.wm[ids])
             + np.float32(0.3 * r_edema) * n_edema)
    w_edema = np.maximum(np.clip(0.5 + (reach - r), 0.0, 1.0), w_core)
    if has_et:
        base = float(np.clip(rng.uniform(3.0, 8.0) * vpm, 1.5, 0.45 * r_core))
        thickness = np.clip(np.float32(base) * (1.0 - 0.6 * n_rim), 1.0, 0.6 * r_core)
        w_nec = np.minimum(np.clip(0.5 + (r_core - thickness - r_core_eff), 0.0, 1.0), w_core)
    else:
        w_nec = np.zeros_like(w_core)

    values = np.zeros(len(ids), dtype=np.uint8)
    values[w_edema >= 0.5] = 2
    values[w_core >= 0.5] = 3 if has_et else 1
    values[w_nec >= 0.5] = 1
    present = np.bincount(values, minlength=4)
    if min(present[1], present[2], present[3] if has_et else MIN_COMPARTMENT) < MIN_COMPARTMENT:
        return None
    label = np.zeros(tshape, dtype=np.uint8)
    label[inside] = values
    return Tumour(
        slices=slices,
        label=label,
        ids=ids,
        necrosis=w_nec,
        core=w_core - w_nec,
        edema=w_edema - w_core,
        normal=1.0 - w_edema,
        texture=texture,
    )
