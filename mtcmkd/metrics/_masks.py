"""Shared input checks and cropping for the metric functions (private)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: A 3D crop as one slice per axis.
Crop = tuple[slice, slice, slice]


def as_mask(mask: np.ndarray, name: str) -> np.ndarray:
    """`mask` as a 3D bool array (non-zero = inside); ValueError names the argument otherwise."""
    arr = np.asarray(mask)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3D mask, got shape {arr.shape}")
    return arr if arr.dtype == bool else arr != 0


def as_mask_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as 3D bool arrays of the same shape."""
    p, t = as_mask(pred, "pred"), as_mask(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred and truth shapes differ: {p.shape} vs {t.shape}")
    return p, t


def as_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    """Voxel size in mm per array axis, validated (3 finite positive numbers)."""
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be 3 positive voxel sizes in mm, got {tuple(spacing)}")
    return values  # type: ignore[return-value]


def bbox_crop(mask: np.ndarray, margin: int) -> Crop | None:
    """Bounding box of the True voxels of `mask`, grown by `margin` voxels, clipped to the array.

    Returns None for an empty mask. Clipping at the array edge keeps results exact for the
    morphology done here: scipy treats everything outside the array as background
    (``border_value=0``), and a crop edge that is not an array edge has at least `margin`
    background voxels in front of it.
    """
    # Reduce the contiguous last axis first: much cheaper than three full reductions.
    plane = mask.any(axis=2)
    extents = (plane.any(axis=1), plane.any(axis=0), mask.reshape(-1, mask.shape[2]).any(axis=0))
    slices = []
    for extent, size in zip(extents, mask.shape, strict=True):
        idx = np.flatnonzero(extent)
        if idx.size == 0:
            return None
        slices.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, size)))
    return slices[0], slices[1], slices[2]
