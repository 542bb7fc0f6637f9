"""Surface-distance metrics: the 95th-percentile Hausdorff distance (HD95) in millimetres.

Definition used (MONAI's, and the one of the BraTS evaluation tools): surfaces are the mask
voxels removed by one binary erosion with the 3D cross (6-connectivity,
``scipy.ndimage.generate_binary_structure(3, 1)``; voxels outside the array count as
background, so a mask touching the volume border has surface there). For each surface voxel of
one mask take the Euclidean distance in mm to the nearest surface voxel of the other mask; take
the 95th percentile (linear interpolation) of each of the two *directed* sets separately, and
report the larger of the two. This equals MONAI's
``compute_hausdorff_distance(..., percentile=95, spacing=spacing)``.

medpy's ``hd95`` pools the two directed sets before taking the percentile, which gives a smaller
value whenever a small part of one surface lies far away (e.g. a small spurious component). We
follow MONAI for the 2017-2021 rules; the tests pin this choice against MONAI and show an
example where medpy differs. The BraTS 2023+ evaluation also takes the percentile of each
direction and then the maximum, but on area-weighted surface elements between voxels (DeepMind's
``surface-distance``): that definition is :mod:`mtcmkd.metrics.surface_distance`, used for 2023+.

The distances are exact Euclidean distances between voxel centres, scaled per axis by the
voxel spacing (anisotropic spacing is fine). Cost: surfaces are found by checking the 6 face
neighbours of each mask voxel (the same voxels the erosion removes), and distances with a k-d
tree over the surface coordinates rather than a dense distance transform. So most of the work
grows with the masks, and only a few cheap passes with their bounding box, which a single stray
predicted blob far from the tumour stretches across the brain.
(``distance_transform_edt(~surface, sampling=spacing)`` gives the same numbers; a test checks.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from mtcmkd.metrics._masks import as_mask_pair, as_spacing, bbox_crop

__all__ = [
    "LEGACY_EMPTY_HD95",
    "SURFACE_STRUCTURE",
    "directed_surface_distances",
    "hd95",
    "surface_voxels",
]

#: HD95 in mm when exactly one of prediction and truth is empty: the diagonal of a
#: 240 x 240 x 155 mm volume (legacy BraTS rule).
LEGACY_EMPTY_HD95: float = 373.13

#: Erosion structure that defines surfaces: the 3D cross (6-connected neighbours).
SURFACE_STRUCTURE: np.ndarray = ndimage.generate_binary_structure(3, 1)


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Surface of a 3D bool mask: the voxels one erosion with the 3D cross removes.

    Outside the array counts as background, so mask voxels on the array border are surface.
    A mask of one voxel is its own surface. (Reference form; the metrics use the equivalent
    :func:`_surface_points`, which touches only the mask's voxels.)
    """
    return mask & ~ndimage.binary_erosion(mask, structure=SURFACE_STRUCTURE)


def _surface_points(mask: np.ndarray) -> np.ndarray:
    """(N, 3) int coordinates of the surface voxels of `mask`, as :func:`surface_voxels`.

    A voxel is interior iff its 6 face neighbours are all inside the mask; checking that by
    indexing at the mask's own voxels costs a few passes over N voxels instead of a dense
    erosion of the whole box. The padding makes everything outside the array background.
    """
    padded = np.pad(mask, 1)
    i, j, k = np.nonzero(padded)
    interior = padded[i - 1, j, k] & padded[i + 1, j, k]
    interior &= padded[i, j - 1, k]
    interior &= padded[i, j + 1, k]
    interior &= padded[i, j, k - 1]
    interior &= padded[i, j, k + 1]
    edge = ~interior
    return np.stack([i[edge], j[edge], k[edge]], axis=1) - 1


def _directed(points_a: np.ndarray, points_b: np.ndarray, spacing: tuple[float, ...]
              ) -> np.ndarray:
    """Distance (mm) from each voxel coordinate in `points_a` to the nearest in `points_b`."""
    scale = np.asarray(spacing, dtype=np.float64)
    distances, _ = cKDTree(points_b * scale).query(points_a * scale, k=1)
    return distances


def directed_surface_distances(
    from_mask: np.ndarray,
    to_mask: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Distance in mm from each surface voxel of `from_mask` to the nearest surface voxel of
    `to_mask` (float64, one entry per surface voxel of `from_mask`, in C order).

    Args:
        from_mask, to_mask: non-empty 3D masks of the same shape.
        spacing: voxel size in mm along each array axis.

    Raises:
        ValueError: either mask is empty (the distance set is undefined), or bad shapes/spacing.
    """
    a, b = as_mask_pair(from_mask, to_mask)
    sp = as_spacing(spacing)
    crop = bbox_crop(a | b, margin=0)
    if crop is None or not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    return _directed(_surface_points(a[crop]), _surface_points(b[crop]), sp)


def hd95(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    empty_distance: float = LEGACY_EMPTY_HD95,
    percentile: float = 95.0,
) -> float:
    """95th-percentile Hausdorff distance in mm between two binary 3D masks (definition above).

    Args:
        pred, truth: 3D masks of the same shape (non-zero = inside).
        spacing: voxel size in mm along each array axis (e.g. the NIfTI zooms in array order).
        empty_distance: the value when exactly one mask is empty (373.13 mm, the legacy BraTS
            rule; the 2023 lesion-wise rules use 374).
        percentile: 95 for HD95; 100 gives the plain Hausdorff distance.

    Returns:
        max(P95(d(pred surface -> truth surface)), P95(d(truth surface -> pred surface))) in mm;
        0.0 when both masks are empty; `empty_distance` when exactly one is empty.
    """
    p, t = as_mask_pair(pred, truth)
    sp = as_spacing(spacing)
    # Both masks lie inside their union's bounding box; _surface_points treats the outside as
    # background, which it is (or is the array's outside), so the crop changes nothing.
    crop = bbox_crop(p | t, margin=0)
    if crop is None:
        return 0.0
    points_p, points_t = _surface_points(p[crop]), _surface_points(t[crop])
    if len(points_p) == 0 or len(points_t) == 0:
        return float(empty_distance)
    forward = np.percentile(_directed(points_p, points_t, sp), percentile)
    backward = np.percentile(_directed(points_t, points_p, sp), percentile)
    return float(max(forward, backward))
