"""BraTS scoring as small pure functions on numpy masks and label volumes.

- Legacy per-case rules (2017-2021): :func:`dice`, :func:`hd95` (mm), :func:`sensitivity`,
  :func:`specificity` for one binary region; :func:`score_case` for WT/TC/ET of a canonical
  label volume.
- 2023+ lesion-wise rules: :func:`lesion_wise_scores` for one region.
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

__all__ = [
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
    "score_case",
    "sensitivity",
    "slice_dice_legacy",
    "specificity",
    "surface_voxels",
]
