"""Synthetic BraTS-like cases: brain anatomy, a three-compartment tumour and four MRI contrasts.

Why this exists: the whole pipeline (conversion, training, distillation, export) must run and be
tested without the real BraTS data, and cross-modal distillation only means something when
the modalities carry different information. The phantom therefore reproduces the asymmetry that
matters clinically: the enhancing rim is obvious on T1ce, edema is obvious on FLAIR/T2 but only
a few percent darker than white matter on T1/T1ce, so a T1ce-only student has to learn it.

Each case warps a source brain (the MNI152 2009 template of the `nilearn` wheel, or a
procedural brain) with a random pose and a smooth displacement, places an irregular tumour
(with mass effect) mostly in hemispheric white matter, and renders T1, T1ce, T2 and FLAIR with
tissue contrasts, a multiplicative bias field and Rician noise.

Arrays use the BraTS voxel order (affine diag(-1, -1, 1): x towards the left, y towards the
back, z upwards; see `mtcmkd.brats.brats_affine`). The shape is free: the brain fills ~90% of
it, so 240 x 240 x 155 gives ~1 mm voxels like BraTS and small shapes a proportionally smaller
brain with coarser voxels. A full-size case costs ~1 s on one core.

The modules, in the order a case is made:

- `anatomy`: the source brains (MNI152 or procedural), cropped and zoomed per output shape;
- `warp`: a case's pose, smooth displacement and the tumour's mass effect; tissue fractions;
- `tumours`: size, kind and place of the tumour, its three compartments with partial volume;
- `contrasts`: the four sequences (tissue levels, vessels, bias field, Rician noise);
- `case`: `make_case`, which runs the above with one seeded generator;
- `release_writers`: cases as files in a BraTS release's exact layout (`mtcmkd synth`);
- `fields`: the smooth random fields and geometry helpers all of them use.
"""

from __future__ import annotations

from .anatomy import template_path
from .case import PhantomCase, make_case
from .contrasts import MODALITIES
from .label_noise import jitter_edema, noisy_copy
from .release_writers import synthesize, write_case, write_msd_dataset_json

__all__ = [
    "MODALITIES",
    "PhantomCase",
    "jitter_edema",
    "make_case",
    "noisy_copy",
    "synthesize",
    "template_path",
    "write_case",
    "write_msd_dataset_json",
]
