"""BraTS scoring as small pure functions on numpy masks and label volumes.

- Legacy per-case rules (2017-2021): :func:`dice`, :func:`hd95` (mm), :func:`sensitivity`,
  :func:`specificity` for one binary region; :func:`score_case` for WT/TC/ET of a canonical
  label volume.
- 2023+ rules (the official BraTS 2023 script): :func:`robust_hausdorff` (HD95 from
  area-weighted surface elements, legacy and lesion-wise alike) and :func:`lesion_wise_scores`
  for one region.
- :func:`slice_dice_legacy`: the MTCM-KD authors' slice-averaged Dice, NOT the BraTS Dice.
- :func:`relabel_small_et`: optional ET post-processing (never applied implicitly).

Shapes: 3D arrays in the same axis order as `spacing` (voxel size in mm per array axis).
Empty-case rules are in each function's docstring.
"""

from __future__ import annotations

from mtcmkd.metrics.lesion_wise import LESION_MISSED_HD95, lesion_wise_scores
from mtcmkd.metrics.overlap import (
    ConfusionCounts,
    confusion_counts,
    dice,
    sensitivity,
    specificity,
)
from mtcmkd.metrics.per_case import SCORE_NAMES, score_case
from mtcmkd.metrics.postprocessing import relabel_small_et
from mtcmkd.metrics.slice_dice import slice_dice_legacy
from mtcmkd.metrics.surface import (
    LEGACY_EMPTY_HD95,
    SURFACE_STRUCTURE,
    directed_surface_distances,
    hd95,
    surface_voxels,
)
from mtcmkd.metrics.surface_distance import (
    BRATS2023_EMPTY_HD95,
    robust_hausdorff,
    surfel_area_table,
    surfel_distances,
    surfels,
)

__all__ = [
    "BRATS2023_EMPTY_HD95",
    "LEGACY_EMPTY_HD95",
    "LESION_MISSED_HD95",
    "SCORE_NAMES",
    "SURFACE_STRUCTURE",
    "ConfusionCounts",
    "confusion_counts",
    "dice",
    "directed_surface_distances",
    "hd95",
    "lesion_wise_scores",
    "relabel_small_et",
    "robust_hausdorff",
    "score_case",
    "sensitivity",
    "slice_dice_legacy",
    "specificity",
    "surface_voxels",
    "surfel_area_table",
    "surfel_distances",
    "surfels",
]
