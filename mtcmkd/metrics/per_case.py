"""Score one case by the legacy (2017-2021) BraTS per-case rules, on canonical labels.

Canonical labels: 0 background, 1 NCR/NETC, 2 ED/SNFH, 3 ET, 4 RC; regions WT = {1, 2, 3},
TC = {1, 3}, ET = {3} (RC belongs to none). Labels of a release (e.g. 4 = ET in 2017-2021)
must be mapped first with ``mtcmkd.brats.release(name).map_labels``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mtcmkd.brats import REGIONS
from mtcmkd.metrics._masks import as_spacing, bbox_crop
from mtcmkd.metrics.overlap import _counts
from mtcmkd.metrics.surface import LEGACY_EMPTY_HD95, hd95

__all__ = ["SCORE_NAMES", "score_case"]

#: Keys of the dict `score_case` returns, each mapping region name -> value.
SCORE_NAMES: tuple[str, ...] = ("dice", "hd95", "sensitivity", "specificity")


def _check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 3 or arr.dtype.kind not in "uib":
        raise ValueError(f"{name} must be a 3D integer label volume, got {arr.dtype} {arr.shape}")
    return arr


def score_case(
    pred_labels: np.ndarray,
    truth_labels: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    empty_hd95: float = LEGACY_EMPTY_HD95,
    hd95_function: Callable[..., float] = hd95,
) -> dict[str, dict[str, float]]:
    """Dice, HD95 (mm), sensitivity and specificity of WT, TC and ET for one case.

    Args:
        pred_labels, truth_labels: canonical label volumes (D, H, W) of the same shape, any
            integer dtype, on the native grid (the challenge scores the full volume).
        spacing: voxel size in mm along each array axis.
        empty_hd95: HD95 when exactly one of prediction and truth is empty.
        hd95_function: the HD95 definition, called as ``f(pred, truth, spacing,
            empty_distance=empty_hd95)``: :func:`mtcmkd.metrics.surface.hd95` (2017-2021,
            the default) or :func:`mtcmkd.metrics.surface_distance.robust_hausdorff` (2023+).

    Returns:
        ``{"dice": {"WT": .., "TC": .., "ET": ..}, "hd95": {...}, "sensitivity": {...},
        "specificity": {...}}`` with Python floats. Empty rules per region: both empty -> Dice 1,
        HD95 0; one empty -> Dice 0, HD95 `empty_hd95`; sensitivity and specificity as in
        :mod:`mtcmkd.metrics.overlap`. Definitions: :func:`mtcmkd.metrics.overlap.dice`,
        :func:`mtcmkd.metrics.surface.hd95`.

    Both volumes are cropped once to the bounding box of their tumour voxels; everything
    outside is true negative for every region, so all scores are exact.
    """
    pred = _check_labels(pred_labels, "pred_labels")
    truth = _check_labels(truth_labels, "truth_labels")
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth shapes differ: {pred.shape} vs {truth.shape}")
    sp = as_spacing(spacing)
    # Every region is a subset of labels {1, 2, 3} (WT): its bounding box bounds them all.
    tumour = ((pred >= 1) & (pred <= 3)) | ((truth >= 1) & (truth <= 3))
    crop = bbox_crop(tumour, margin=0)
    scores: dict[str, dict[str, float]] = {name: {} for name in SCORE_NAMES}
    for region, values in REGIONS.items():
        if crop is None:
            scores["dice"][region] = 1.0
            scores["hd95"][region] = 0.0
            scores["sensitivity"][region] = 1.0
            scores["specificity"][region] = 1.0
            continue
        p = np.isin(pred[crop], values)
        t = np.isin(truth[crop], values)
        counts = _counts(p, t, n_total=int(pred.size))
        scores["dice"][region] = counts.dice
        scores["hd95"][region] = hd95_function(p, t, sp, empty_distance=empty_hd95)
        scores["sensitivity"][region] = counts.sensitivity
        scores["specificity"][region] = counts.specificity
    return scores
