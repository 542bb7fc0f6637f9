"""BraTS 2023+ lesion-wise Dice and HD95 of one region (GLI rules, docs/BRATS.md).

Steps, on binary masks of one region (WT, TC or ET):

1. Truth lesions: dilate the truth `dilation_iterations` (3) times with the 3D cross; each
   26-connected component of the dilated mask is one lesion, made of the truth voxels inside it
   (so truth components closer than the dilation are merged into one lesion).
2. Predicted components: 26-connected components of the prediction.
3. Matching: a truth lesion is matched by every predicted component that overlaps the lesion
   dilated again `dilation_iterations` times (touching the neighbourhood is enough, overlap with
   the lesion itself is not needed). Its Dice and HD95 are computed between the lesion and the
   union of its matched components (HD95 as :func:`mtcmkd.metrics.surface.hd95`, in mm).
4. Truth lesions of `max_dropped_voxels` (50) voxels or fewer are dropped from the score;
   predicted components that match only a dropped lesion are not counted as false positives.
5. TP = kept lesions with a match, FN = kept lesions without (Dice 0, HD95 374 mm),
   FP = predicted components that match no truth lesion (Dice 0, HD95 374 mm each).
6. Score = sum of per-lesion values (FP contributing 0 to Dice and 374 to HD95) / (TP + FN + FP).

Edge cases: both masks empty -> Dice 1, HD95 0. Nothing left to score (only dropped truth
lesions and no false positive) is treated the same way, as the official script does after its
division by zero. Truth empty with a non-empty prediction -> Dice 0, HD95 374.

Differences from the official ``BraTS-2023-Metrics`` script, on purpose or by configuration:
it dilates with ``generate_binary_structure(3, 2)`` (18-neighbourhood) where docs/BRATS.md
says a 3D cross; pass ``dilation_connectivity=2`` to reproduce it. It thresholds the lesion
*volume in mm^3*; here the threshold is in voxels (the same at BraTS's 1 mm). It returns NaN
for both-empty cases in some versions; here it is Dice 1, HD95 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from mtcmkd.metrics._masks import as_mask_pair, as_spacing, bbox_crop
from mtcmkd.metrics.overlap import dice
from mtcmkd.metrics.surface import hd95

__all__ = ["LESION_MISSED_HD95", "lesion_wise_scores"]

#: HD95 in mm of a missed (FN) or spurious (FP) lesion under the 2023 rules.
LESION_MISSED_HD95: float = 374.0

_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connected components


def lesion_wise_scores(
    pred_mask: np.ndarray,
    truth_mask: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    dilation_iterations: int = 3,
    dilation_connectivity: int = 1,
    max_dropped_voxels: int = 50,
    missed_hd95: float = LESION_MISSED_HD95,
) -> dict[str, float | int]:
    """Lesion-wise Dice and HD95 (mm) of one region, with lesion counts.

    Args:
        pred_mask, truth_mask: 3D binary masks of one region, same shape (non-zero = inside).
        spacing: voxel size in mm along each array axis (used by HD95 only).
        dilation_iterations: dilations for merging truth lesions and for matching (3 for GLI).
        dilation_connectivity: 1 = 3D cross (docs/BRATS.md), 2 = 18-neighbourhood (official
            script).
        max_dropped_voxels: truth lesions with this many voxels or fewer are dropped.
        missed_hd95: HD95 of a missed or spurious lesion.

    Returns:
        ``{"dice": float, "hd95": float, "tp": int, "fn": int, "fp": int}`` (counts exclude
        dropped lesions). Rules in the module docstring.
    """
    pred, truth = as_mask_pair(pred_mask, truth_mask)
    sp = as_spacing(spacing)
    if dilation_iterations < 1:
        raise ValueError(f"dilation_iterations must be >= 1, got {dilation_iterations}")
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
        lesion = lesions == index
        if int(np.count_nonzero(lesion)) <= max_dropped_voxels:
            continue
        if matched.size == 0:
            fn += 1
            hd_sum += missed_hd95
            continue
        tp += 1
        matched_pred = np.isin(pred_components, matched)
        dice_sum += dice(matched_pred, lesion)
        hd_sum += hd95(matched_pred, lesion, sp, empty_distance=missed_hd95)

    fp = n_pred - len(matched_any)
    hd_sum += fp * missed_hd95
    scored = tp + fn + fp
    if scored == 0:
        return {"dice": 1.0, "hd95": 0.0, "tp": 0, "fn": 0, "fp": 0}
    return {"dice": dice_sum / scored, "hd95": hd_sum / scored, "tp": tp, "fn": fn, "fp": fp}
