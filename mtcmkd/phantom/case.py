"""One phantom case: warp the anatomy, grow a tumour, render four sequences; redraw on a miss."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import Resampled, anatomy_name, resampled
from .contrasts import render_images
from .tumours import draw_tumour_plan, grow_tumour
from .warp import draw_pose, sample_brain

_MIN_SHAPE = 16
_MAX_ATTEMPTS = 8


@dataclass(frozen=True)
class PhantomCase:
    """One synthetic case.

    Attributes:
        images: "t1", "t1ce", "t2", "flair" -> float32 arrays of the requested shape on a raw
            MRI-like scale (roughly 0..3000, different per modality); exactly 0 outside the
            brain and strictly positive inside.
        label: uint8, canonical labels 0 background, 1 NCR/NETC, 2 ED, 3 ET. Labels 1 and 2
            always occur, 3 exactly when `has_et` (each on >= 10 voxels).
        has_et: False for the ~15% LGG-like cases whose core does not enhance.
        anatomy: "mni152" (template warped per case) or "procedural" (fallback brain).
    """

    images: dict[str, np.ndarray]
    label: np.ndarray
    has_et: bool
    anatomy: str


def make_case(
    shape: tuple[int, int, int], seed: int, index: int, *, use_template: bool = True
) -> PhantomCase:
    """Synthesise case `index` of the phantom dataset `seed`.

    Deterministic: the same (shape, seed, index) gives bit-identical arrays in any process
    (same numpy/scipy build); no BLAS call touches the volumes, so thread counts do not matter.
    The anatomy is the MNI152 template when `use_template` and nilearn is installed, else the
    procedural brain (reported in `PhantomCase.anatomy`).

    Raises:
        ValueError: a dimension below 16 voxels or a negative seed/index.
        RuntimeError: no tumour with every required label fitted in 8 tries (not seen in
            sweeps down to 16 x 16 x 16, where ~1-3% of cases need a second try).
    """
    dims = _check_args(shape, seed, index)
    anatomy = anatomy_name(use_template)
    res = resampled(anatomy, dims)
    rng = np.random.default_rng([seed, index])
    for _ in range(_MAX_ATTEMPTS):
        case = _attempt(rng, res, dims, anatomy)
        if case is not None:
            return case
    raise RuntimeError(
        f"phantom case (shape={dims}, seed={seed}, index={index}) found no tumour placement "
        f"with all labels after {_MAX_ATTEMPTS} tries; use a larger shape"
    )


def _check_args(shape: tuple[int, int, int], seed: int, index: int) -> tuple[int, int, int]:
    dims = tuple(int(n) for n in shape)
    if len(dims) != 3 or min(dims) < _MIN_SHAPE:
        raise ValueError(f"shape must be three sizes >= {_MIN_SHAPE}, got {shape!r}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return dims[0], dims[1], dims[2]


def _attempt(
    rng: np.random.Generator, res: Resampled, shape: tuple[int, int, int], anatomy: str
) -> PhantomCase | None:
    """One try at a case; None when the tumour missed a required label (then redraw).

    The order of the steps is the order of the draws from `rng`: changing it changes every
    case of every dataset (tests/test_phantom.py pins digests of a few).
    """
    dims = np.array(shape, dtype=np.float64)
    pose = draw_pose(rng, res, dims)
    plan = draw_tumour_plan(rng, res, pose)
    brain = sample_brain(rng, res, pose, dims, plan.centre, plan.r_core, plan.has_et)
    tumour = grow_tumour(rng, plan, brain, res.vox_per_mm)
    if tumour is None:
        return None
    images = render_images(rng, brain, tumour, plan.has_et, shape, res.vox_per_mm)
    label = np.zeros(shape, dtype=np.uint8)
    (x0, y0, z0), (x1, y1, z1) = brain.lo, brain.hi
    label[x0:x1, y0:y1, z0:z1][tumour.slices] = tumour.label
    return PhantomCase(images=images, label=label, has_et=plan.has_et, anatomy=anatomy)
