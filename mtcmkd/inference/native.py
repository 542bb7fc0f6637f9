"""Back to the native grid and to files: uncrop, release label values, NIfTI writing."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from mtcmkd.atomic import atomic_output
from mtcmkd.brats import release

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


def _nifti_extension(path: Path) -> str:
    name = path.name.lower()
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return ext
    raise ValueError(f"{path}: output must end in .nii or .nii.gz")


def write_label_nifti(
    labels: np.ndarray,
    reference_nifti_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    dtype: np.dtype | type = np.uint8,
) -> Path:
    """Write a label volume in the space and header of a reference NIfTI, atomically.

    The output keeps the reference's affine and header: qform and sform (matrices and codes),
    pixdim, xyzt units, orientation; so it overlays the source image in any viewer and the
    challenge portal accepts it. What changes: the data dtype (`dtype`, uint8 by default), the
    shape fields (a 4D reference such as MSD's gives a 3D output), scl_slope/scl_inter (no
    scaling: labels are stored as-is) and cal_min/cal_max (reset, they described the image's
    intensities).

    The file is written to a temporary name in the output folder and renamed into place, so
    `out_path` is either absent/old or complete, never half written.

    Args:
        labels: integer array whose shape is the reference's first three dimensions.
        reference_nifti_path: the case's source image (e.g. its T1ce file).
        out_path: ``.nii.gz`` or ``.nii`` path; parent folders are created.
        dtype: on-disk integer dtype.

    Returns:
        `out_path` as a Path.

    Raises:
        ValueError: shape mismatch, non-integer labels, values that do not fit `dtype`, or a
            bad extension.
    """
    out = Path(out_path)
    ext = _nifti_extension(out)
    reference = nib.load(os.fspath(reference_nifti_path))
    if not isinstance(reference, nib.Nifti1Image):
        raise ValueError(f"{reference_nifti_path}: reference must be a NIfTI-1 image")
    data = np.asarray(labels)
    if data.shape != reference.shape[:3]:
        raise ValueError(
            f"labels shape {data.shape} does not match reference {reference_nifti_path} "
            f"shape {reference.shape[:3]}"
        )
    target = np.dtype(dtype)
    if data.dtype.kind not in "uib" or target.kind not in "ui":
        raise ValueError(f"labels must be integers written as an integer dtype, got "
                         f"{data.dtype} -> {target}")
    info = np.iinfo(target)
    if data.size and (data.min() < info.min or data.max() > info.max):
        raise ValueError(f"label values [{data.min()}, {data.max()}] do not fit {target}")

    header = reference.header.copy()
    header.set_data_dtype(target)
    header["cal_min"] = 0
    header["cal_max"] = 0
    image = nib.Nifti1Image(data.astype(target), reference.affine, header)
    # Keep both transforms and their codes exactly (BraTS: qform code 1, sform code 0).
    image.set_qform(reference.header.get_qform(), code=int(reference.header["qform_code"]))
    image.set_sform(reference.header.get_sform(), code=int(reference.header["sform_code"]))
    image.header.set_slope_inter(1.0, 0.0)

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out, suffix=ext) as tmp:
        nib.save(image, os.fspath(tmp))
    return out
