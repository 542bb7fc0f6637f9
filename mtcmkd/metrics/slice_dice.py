"""LEGACY: the slice-averaged Dice of the MTCM-KD authors. NOT the BraTS Dice.

The MTCM-KD paper's Dice is a 2D Dice per slice along the first array axis, averaged over the
slices, with slices empty in both prediction and truth scored 1 (docs/METHODS.md, "Results as
published"). Most slices of a brain volume hold no tumour, so they all score 1 whatever the
network does, and the average says little about the tumour: an empty prediction for a small
tumour scores about 0.9, where the BraTS Dice (:func:`mtcmkd.metrics.dice`) is 0. Offered only
to reproduce and explain the published numbers; report the BraTS metrics.
"""

from __future__ import annotations

import numpy as np

from mtcmkd.metrics._masks import as_mask_pair

__all__ = ["slice_dice_legacy"]


def slice_dice_legacy(pred: np.ndarray, truth: np.ndarray, axis: int = 0) -> float:
    """LEGACY slice-averaged Dice (MTCM-KD authors' metric), in [0, 1]. Not the BraTS Dice.

    Args:
        pred, truth: binary 3D masks of one region, same shape (non-zero = inside).
        axis: slicing axis; the authors slice along the first array axis (0).

    Returns:
        Mean over all slices along `axis` of the 2D Dice 2|P & T| / (|P| + |T|); a slice empty
        in both scores 1, a slice empty in exactly one scores 0.
    """
    p, t = as_mask_pair(pred, truth)
    other = tuple(a for a in range(3) if a != axis % 3)
    intersection = np.count_nonzero(p & t, axis=other).astype(np.float64)
    sizes = (np.count_nonzero(p, axis=other) + np.count_nonzero(t, axis=other)).astype(np.float64)
    per_slice = np.ones_like(sizes)
    has_voxels = sizes > 0
    per_slice[has_voxels] = 2.0 * intersection[has_voxels] / sizes[has_voxels]
    return float(per_slice.mean())
