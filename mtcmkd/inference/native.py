"""Back to the native grid: uncrop, release label values; NIfTI writing (from nifti_io).

:func:`write_label_nifti` lives in :mod:`mtcmkd.nifti_io`, the one NIfTI reader and writer of
the package; it is re-exported here because inference is where callers look for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtcmkd.brats import release
from mtcmkd.nifti_io import write_label_nifti

__all__ = ["to_release_labels", "uncrop", "write_label_nifti"]


def uncrop(
    labels_cropped: np.ndarray,
    crop_bbox: Sequence[Sequence[int]],
    original_shape: Sequence[int],
    fill: int = 0,
) -> np.ndarray:
    """Place a cropped volume back into a full volume of `original_shape`.

    Args:
        labels_cropped: (d, h, w) array, e.g. canonical labels on the brain crop.
        crop_bbox: ``[[lo, hi], [lo, hi], [lo, hi]]`` half-open voxel ranges in the full volume
            (the store's ``crop_bbox`` attribute or :func:`mtcmkd.inference.brain_bbox`).
        original_shape: full volume shape (3 ints).
        fill: value outside the crop (0 = background).

    Returns:
        Array of `original_shape` and the dtype of `labels_cropped`.

    Raises:
        ValueError: the bbox does not fit the shape or does not match the cropped size.
    """
    shape = tuple(int(s) for s in original_shape)
    box = [(int(lo), int(hi)) for lo, hi in crop_bbox]
    if len(shape) != 3 or len(box) != 3 or labels_cropped.ndim != 3:
        raise ValueError("uncrop works on 3D volumes with a 3-axis bbox")
    for axis, ((lo, hi), size, n) in enumerate(zip(box, shape, labels_cropped.shape, strict=True)):
        if not 0 <= lo <= hi <= size or hi - lo != n:
            raise ValueError(
                f"axis {axis}: bbox [{lo}, {hi}) does not fit a volume of size {size} with a "
                f"crop of size {n}"
            )
    full = np.full(shape, fill, dtype=labels_cropped.dtype)
    full[tuple(slice(lo, hi) for lo, hi in box)] = labels_cropped
    return full


def to_release_labels(canonical: np.ndarray, release_name: str | int) -> np.ndarray:
    """Canonical labels -> the label values of a release (e.g. ET 3 -> 4 for 2017-2021), uint8.

    Raises:
        ValueError: unknown release, or a canonical label the release lacks (RC before 2023).
    """
    return release(release_name).unmap_labels(np.asarray(canonical)).astype(np.uint8)
