"""Voxel-overlap metrics of one region by the legacy BraTS rules: Dice, sensitivity, specificity.

Inputs are binary 3D masks of the same shape (any dtype; non-zero means inside the region), on
the native-resolution volume the challenge scores. What comes from where:

- The confusion counts (TP, FP, TN, FN) come from torchmetrics
  (``torchmetrics.functional.classification.binary_stat_scores``), which computes exactly these.
  To keep a 240 x 240 x 155 case fast it is given only the voxels inside either mask; every other
  voxel is a true negative and is added to TN, so the counts are exact.
- The formulas and the empty-case rules are written here, because torchmetrics' own Dice and
  recall use other conventions for empty masks (0 or NaN) than the BraTS evaluation does.

Empty-case rules (one region, one case):

- Dice: both masks empty -> 1.0; exactly one empty -> 0.0 (the 2017-2021 challenge rule).
- Sensitivity TP / (TP + FN): truth empty -> 1.0 when the prediction is empty too, else 0.0 (the
  rule of the BraTS 2023 evaluation code; the ratio itself is undefined there).
- Specificity TN / (TN + FP): defined whenever the truth does not fill the whole volume; in the
  degenerate case of no truth-negative voxels it is 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional.classification import binary_stat_scores

from mtcmkd.metrics._masks import as_mask_pair

__all__ = [
    "ConfusionCounts",
    "confusion_counts",
    "dice",
    "sensitivity",
    "specificity",
]


@dataclass(frozen=True)
class ConfusionCounts:
    """Voxel counts of one binary region: true/false positives and negatives.

    The derived scores follow the BraTS empty-case rules of this module.
    """

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def dice(self) -> float:
        """2 TP / (2 TP + FP + FN); 1.0 when both masks are empty (no TP, FP or FN)."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 1.0 if denominator == 0 else 2.0 * self.tp / denominator

    @property
    def sensitivity(self) -> float:
        """TP / (TP + FN); truth empty: 1.0 if the prediction is empty too, else 0.0."""
        if self.tp + self.fn == 0:
            return 1.0 if self.fp == 0 else 0.0
        return self.tp / (self.tp + self.fn)

    @property
    def specificity(self) -> float:
        """TN / (TN + FP); 1.0 when the truth fills the whole volume (no negatives)."""
        negatives = self.tn + self.fp
        return 1.0 if negatives == 0 else self.tn / negatives


def confusion_counts(pred: np.ndarray, truth: np.ndarray) -> ConfusionCounts:
    """TP, FP, TN, FN voxel counts of a binary prediction against a binary truth.

    Args:
        pred, truth: 3D masks of the same shape (non-zero = inside).

    Counted by torchmetrics' ``binary_stat_scores`` on the voxels inside either mask; all other
    voxels are true negatives by construction and are added to TN.
    """
    p, t = as_mask_pair(pred, truth)
    return _counts(p, t, n_total=int(p.size))


def _counts(p: np.ndarray, t: np.ndarray, n_total: int) -> ConfusionCounts:
    """Counts of bool masks `p`, `t` (the volume or any crop of it holding both masks);
    `n_total` voxels in the volume, those not inside either mask being true negatives."""
    union = np.flatnonzero(p | t)
    if union.size == 0:  # both empty (torchmetrics does not take empty inputs)
        return ConfusionCounts(tp=0, fp=0, tn=n_total, fn=0)
    tp, fp, tn, fn, _ = binary_stat_scores(
        torch.from_numpy(p.reshape(-1)[union]),
        torch.from_numpy(t.reshape(-1)[union]),
        validate_args=False,
    ).tolist()
    return ConfusionCounts(tp=tp, fp=fp, tn=tn + n_total - union.size, fn=fn)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient 2|P & T| / (|P| + |T|) of two binary 3D masks, in [0, 1].

    Both empty -> 1.0, exactly one empty -> 0.0 (legacy BraTS rule).
    """
    return confusion_counts(pred, truth).dice


def sensitivity(pred: np.ndarray, truth: np.ndarray) -> float:
    """Sensitivity (recall) TP / (TP + FN) of two binary 3D masks, in [0, 1].

    Truth empty: 1.0 if the prediction is empty too, else 0.0.
    """
    return confusion_counts(pred, truth).sensitivity


def specificity(pred: np.ndarray, truth: np.ndarray) -> float:
    """Specificity TN / (TN + FP) of two binary 3D masks over the whole volume, in [0, 1].

    It depends on the volume size (background dominates, so values near 1 are normal for
    BraTS); 1.0 if the truth fills the whole volume.
    """
    return confusion_counts(pred, truth).specificity
