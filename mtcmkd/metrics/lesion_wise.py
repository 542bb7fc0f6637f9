"""BraTS 2023+ lesion-wise Dice and HD95 of one region, as the official BraTS 2023 script
(``BraTS-2023-Metrics``) computes them.

Steps, on binary masks of one region (WT, TC or ET); N = `dilation_iterations` (GLI, SSA, PED:
3; MEN, MET: 1, see :data:`mtcmkd.brats.SUBCHALLENGES`):

1. Truth lesions: dilate the truth N times with the 18-neighbourhood
   (``scipy.ndimage.generate_binary_structure(3, 2)``; outside the array is background); each
   26-connected component of the dilated mask is one lesion, made of the truth voxels inside it
   (so truth components that come within reach of each other's dilation are one lesion).
2. Predicted components: 26-connected components of the prediction.
3. Matching: a truth lesion is matched by every predicted component that has a voxel in the
   lesion dilated N times again (touching the neighbourhood is enough; overlap with the lesion
   itself is not needed; one component may match several lesions). Its Dice and HD95 are
   computed between the lesion and the union of its matched components, HD95 as
   :func:`mtcmkd.metrics.surface_distance.robust_hausdorff` (area-weighted surface elements).
4. Truth lesions whose volume (voxels x voxel volume in mm^3 from `spacing`) is at most
   `volume_threshold_mm3` (50; MET: 2) are left out of the score and of the counts; predicted
   components that match only such a lesion are not false positives either.
5. TP = kept lesions with a match; FN = kept lesions without one (Dice 0, HD95 374 mm);
   FP = predicted components that match no truth lesion at all (Dice 0, HD95 374 mm each).
6. Score = sum over kept lesions of Dice (resp. HD95) plus 0 (resp. 374) per FP, divided by
   (TP + FN + FP).

Edge cases, as the official script ends up: nothing to divide by (both masks empty, or only
dropped truth lesions and no false positive) -> Dice 1, HD95 0; truth empty and a non-empty
prediction -> Dice 0, HD95 374 (all false positives); prediction empty and a kept truth lesion
-> Dice 0, HD95 374.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from mtcmkd.metrics._masks import as_mask_pair, as_spacing, bbox_crop
from mtcmkd.metrics.overlap import dice
from mtcmkd.metrics.surface_distance import BRATS2023_EMPTY_HD95, robust_hausdorff

__all__ = ["LESION_MISSED_HD95", "lesion_wise_scores"]

#: HD95 in mm of a missed (FN) or spurious (FP) lesion under the 2023 rules.
LESION_MISSED_HD95: float = BRATS2023_EMPTY_HD95

_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connected components


def lesion_wise_scores(
    pred_mask: np.ndarray,
    truth_mask: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    dilation_iterations: int = 3,
    volume_threshold_mm3: float = 50.0,
    dilation_connectivity: int = 2,
    missed_hd95: float = LESION_MISSED_HD95,
) -> dict[str, float | int]:
    """Lesion-wise Dice and HD95 (mm) of one region, with lesion counts (defaults: GLI).

    Args:
        pred_mask, truth_mask: 3D binary masks of one region, same shape (non-zero = inside).
        spacing: voxel size in mm along each array axis (lesion volumes and HD95).
        dilation_iterations: dilations for merging truth lesions and for matching.
        volume_threshold_mm3: truth lesions of this volume (mm^3) or less are dropped.
        dilation_connectivity: 2 = 18-neighbourhood (the official script); 1 = 3D cross
            (not what the challenge computes; kept for comparisons).
        missed_hd95: HD95 of a missed or spurious lesion.

    Returns:
        ``{"dice": float, "hd95": float, "tp": int, "fn": int, "fp": int}`` (counts exclude
        dropped lesions). Rules in the module docstring.
    """
    pred, truth = as_mask_pair(pred_mask, truth_mask)
    sp = as_spacing(spacing)
    if dilation_iterations < 1:
        raise ValueError(f"dilation_iterations must be >= 1, got {dilation_iterations}")
    if not np.isfinite(volume_threshold_mm3) or volume_threshold_mm3 < 0:
        raise ValueError(f"volume_threshold_mm3 must be >= 0, got {volume_threshold_mm3}")
    structure = ndimage.generate_binary_structure(3, dilation_connectivity)
    # Dilation reaches at most `dilation_iterations` voxels per axis: a crop with one more voxel
    # of margin changes nothing (see bbox_crop) and saves most of the work.
    crop = bbox_crop(pred | truth, margin=dilation_iterations + 1)
    if crop is None:
        return {"dice": 1.0, "hd95": 0.0, "tp": 0, "fn": 0, "fp": 0}
    pred, truth = pred[crop], truth[crop]

    dilated = ndimage.binary_dilation(truth, structure=structure, iterations=dilation_iterations)
    dilated_components, _ = ndimage.label(dilated, structure=_FULL_CONNECTIVITY)
    lesions = np.where(truth, dilated_components, 0)
    pred_components, n_pred = ndimage.label(pred, structure=_FULL_CONNECTIVITY)

    matched_any: set[int] = set()
    tp = fn = 0
    dice_sum = hd_sum = 0.0
    for index, box in enumerate(ndimage.find_objects(lesions), start=1):
        if box is None:  # a dilated component always holds truth voxels; kept for safety
            continue
        # The lesion's neighbourhood lies inside its box grown by the dilation reach.
        grown = tuple(
            slice(max(s.start - dilation_iterations, 0), min(s.stop + dilation_iterations, n))
            for s, n in zip(box, lesions.shape, strict=True)
        )
        lesion_local = lesions[grown] == index
        neighbourhood = ndimage.binary_dilation(
            lesion_local, structure=structure, iterations=dilation_iterations
        )
        matched = np.unique(pred_components[grown][neighbourhood])
        matched = matched[matched != 0]
        matched_any.update(int(m) for m in matched)
        # The official volume: voxel count times each spacing in turn (same rounding).
        volume = int(np.count_nonzero(lesion_local)) * sp[0] * sp[1] * sp[2]
        if volume <= volume_threshold_mm3:
            continue
        if matched.size == 0:
            fn += 1
            hd_sum += missed_hd95
            continue
        tp += 1
        lesion = lesions == index
        matched_pred = np.isin(pred_components, matched)
        dice_sum += dice(matched_pred, lesion)
        hd_sum += robust_hausdorff(matched_pred, lesion, sp, empty_distance=missed_hd95)

    fp = n_pred - len(matched_any)
    hd_sum += fp * missed_hd95
    scored = tp + fn + fp
    if scored == 0:
        return {"dice": 1.0, "hd95": 0.0, "tp": 0, "fn": 0, "fp": 0}
    return {"dice": dice_sum / scored, "hd95": hd_sum / scored, "tp": tp, "fn": fn, "fp": fp}
