"""Optional post-processing that BraTS papers apply and must state (off unless called)."""

from __future__ import annotations

import numpy as np

__all__ = ["relabel_small_et"]

_ET = 3


def relabel_small_et(labels: np.ndarray, min_voxels: int = 500, to: int = 1) -> np.ndarray:
    """Relabel the whole predicted ET (canonical label 3) when it has fewer than `min_voxels`.

    Why: the ET score is all-or-nothing for cases without ET (Dice 0 and HD95 373 for any false
    positive), so many BraTS papers replace a small predicted ET with necrosis; any comparison
    must state whether this was applied. The count is the total ET voxels of the case (not per
    component), as in the common nnU-Net BraTS post-processing.

    Args:
        labels: canonical label volume (any shape, integer dtype); not modified.
        min_voxels: ET with fewer voxels than this is relabelled (500 is common).
        to: the label it becomes: 1 (NCR/NETC, keeps TC and WT unchanged) or 0 (background).

    Returns:
        A copy of `labels` with ET relabelled, or an unchanged copy when ET is large enough
        (or absent).
    """
    if to not in (0, 1):
        raise ValueError(f"ET can be relabelled to 0 (background) or 1 (NCR/NETC), got {to}")
    out = np.array(labels, copy=True)
    et = out == _ET
    n_et = int(np.count_nonzero(et))
    if 0 < n_et < min_voxels:
        out[et] = to
    return out
