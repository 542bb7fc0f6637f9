"""How the four MRI sequences render the phantom's tissues and tumour.

The contrasts reproduce the asymmetry that makes cross-modal distillation meaningful: the
enhancing rim is obvious on T1ce, edema is obvious on FLAIR/T2 but only a few percent darker
than white matter on T1/T1ce, so a T1ce-only student has to learn it from the teachers. Each
case adds a scanner scale, per-sequence levels, enhancing sulcal vessels (T1ce), a smooth
multiplicative bias field and Rician noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .fields import smooth_noise
from .tumours import Tumour
from .warp import BrainSample

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")


@dataclass(frozen=True)
class _Contrast:
    """Mean intensities of one modality relative to its white matter.

    `edema` is the edema level at white matter; `edema_keep` is how much of the underlying
    GM/WM/CSF contrast survives inside edema (1: edema only shifts the tissue, as on T1/T1ce;
    small: edema looks flat and bright, as on FLAIR/T2).
    """

    wm: float  # raw white-matter level before the per-case scanner scale
    gm: float
    csf: float
    necrosis: float
    necrosis_mix: float  # heterogeneity of necrosis (large on FLAIR: partly bright, partly dark)
    enhancing: float
    nonenhancing: float
    edema: float
    edema_keep: float
    vessel: float  # extra brightness of enhancing sulcal vessels (T1ce only)


# Loosely guided by the four BraTS 2021 sample cases (ET ~1.4-1.7x normal brain on T1ce; edema
# and necrosis ~1.5-2x on T2/FLAIR). Edema on T1/T1ce is kept subtler than there (real: ~0.8-0.95
# of normal brain) on purpose: it is the signal a T1ce-only student must learn from teachers.
# Columns: wm, gm, csf, necrosis, necrosis_mix, enhancing, nonenhancing, edema, edema_keep, vessel
_CONTRASTS: dict[str, _Contrast] = {
    "t1": _Contrast(800.0, 0.75, 0.32, 0.55, 0.10, 0.90, 0.72, 0.94, 1.0, 0.0),
    "t1ce": _Contrast(850.0, 0.80, 0.34, 0.50, 0.10, 1.85, 0.74, 0.95, 1.0, 0.9),
    "t2": _Contrast(600.0, 1.40, 3.10, 2.90, 0.12, 1.75, 2.30, 2.10, 0.35, 0.0),
    "flair": _Contrast(520.0, 1.22, 0.35, 1.30, 0.45, 1.60, 1.75, 1.95, 0.30, 0.0),
}


def render_images(
    rng: np.random.Generator,
    brain: BrainSample,
    tumour: Tumour,
    has_et: bool,
    shape: tuple[int, int, int],
    vpm: float,
) -> dict[str, np.ndarray]:
    """The four sequences of one case as float32 volumes of `shape`.

    Exactly 0 outside the brain and >= 1 inside (the Rician magnitude is floored at 1), on a
    raw MRI-like scale. `vpm` is output voxels per mm (sets the size of vessels and bias).
    """
    # Sulcal vessels that enhance on T1ce: thin tubes where two smooth fields both cross zero.
    v1, v2 = smooth_noise(rng, brain.box_shape, 9.0 * vpm, 2).reshape(2, -1)[:, brain.flat]
    vessels = np.clip(1.0 - np.maximum(np.abs(v1), np.abs(v2)) / np.float32(0.15), 0.0, 1.0)
    vessels *= brain.csf
    del v1, v2
    # Scanner-dependent smooth multiplicative bias, one per sequence, within +-15%.
    biases = smooth_noise(rng, brain.box_shape, 60.0 * vpm, len(MODALITIES)).reshape(4, -1)[
        :, brain.flat
    ]

    full_index = np.ravel_multi_index(
        tuple(
            i + o
            for i, o in zip(np.unravel_index(brain.flat, brain.box_shape), brain.lo, strict=True)
        ),
        shape,
    )
    wm, gm, csf = brain.wm, brain.gm, brain.csf
    n_voxels = len(brain.flat)
    images = {}
    scanner = math.exp(rng.uniform(math.log(0.6), math.log(1.4)))
    for name, bias in zip(MODALITIES, biases, strict=True):
        c = _CONTRASTS[name]
        level = np.float32(c.wm * scanner * rng.uniform(0.88, 1.12))
        jitter = rng.uniform(0.96, 1.04, 2)
        img = level * (wm + np.float32(c.gm * jitter[0]) * gm + np.float32(c.csf * jitter[1]) * csf)
        if c.vessel:
            img += np.float32(c.vessel) * level * vessels
        _paint_tumour(img, tumour, c, level, has_et)
        img *= 1.0 + np.clip(np.float32(rng.uniform(0.04, 0.08)) * bias, -0.15, 0.15)
        # Rician noise: the magnitude of a complex signal with Gaussian noise on both parts.
        sigma = np.float32(rng.uniform(0.015, 0.04)) * level
        real = img + sigma * rng.standard_normal(n_voxels, dtype=np.float32)
        imag = sigma * rng.standard_normal(n_voxels, dtype=np.float32)
        out = np.zeros(shape, dtype=np.float32)
        out.reshape(-1)[full_index] = np.maximum(np.sqrt(real * real + imag * imag), 1.0)
        images[name] = out
    return images


def _paint_tumour(
    img: np.ndarray, tumour: Tumour, c: _Contrast, level: np.float32, has_et: bool
) -> None:
    """Blend the tumour compartments into one modality's normal-tissue vector, in place."""
    normal = img[tumour.ids]
    # Edema keeps part of the tissue contrast beneath it and shifts WM to `c.edema`.
    edema = level * np.float32(c.edema) + (normal - level) * np.float32(c.edema_keep)
    core_level = c.enhancing if has_et else c.nonenhancing
    core = level * np.float32(core_level) * (1.0 + np.float32(0.1) * tumour.texture)
    mix = np.float32(c.necrosis_mix * 0.5)
    necrosis = level * np.float32(c.necrosis) * (1.0 + mix * tumour.texture)
    img[tumour.ids] = (
        normal * tumour.normal
        + edema * tumour.edema
        + core * tumour.core
        + necrosis * tumour.necrosis
    )
