"""Reading one case's files for `mtcmkd predict` and `evaluate`: images and segmentations.

Every read goes through :func:`mtcmkd.nifti_io.read_nifti` (header checked before any array
exists); every problem is an :class:`InputError` naming the file. Images come back as raw
intensities in the student's channel order; segmentations as canonical labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtcmkd.brats import release
from mtcmkd.evaluation.prediction_inputs import PredictionInput
from mtcmkd.nifti_io import AFFINE_ATOL_MM, InputError, NiftiVolume, read_nifti, read_shape

__all__ = [
    "LoadedInput",
    "check_prediction_input",
    "load_prediction_input",
    "load_truth",
    "read_labels",
]


def _expected_dims(index: int | None) -> str:
    return "a 4D MSD volume with 4 channels" if index is not None else "a 3D volume"


def check_prediction_input(item: PredictionInput) -> None:
    """Cheap header-only checks of one case, to refuse bad inputs before any output is written.

    Catches unreadable files, wrong dimensionality (2D images, 4D files where 3D is expected) and
    channels of different shapes; truncated data is found later by
    :func:`load_prediction_input`.

    Raises:
        InputError: the first problem, naming the file.
    """
    first: tuple[Path, tuple[int, ...]] | None = None
    for path, index in item.channel_files.values():
        shape = read_shape(path)
        want = 4 if index is not None else 3
        if len(shape) != want or (index is not None and shape[3] <= index):
            hint = " (a 4D MSD file needs --year msd)" if len(shape) == 4 and want == 3 else ""
            raise InputError(path, f"expected {_expected_dims(index)}, got "
                                   f"{len(shape)}D shape {shape}{hint}")
        if first is not None and shape[:3] != first[1][:3]:
            raise InputError(path, f"shape {shape[:3]} differs from {first[0].name}'s "
                                   f"{first[1][:3]}")
        first = first or (path, shape)


@dataclass
class LoadedInput:
    """One case's student channels on the native grid.

    Attributes:
        image: (C, D, H, W) float32 raw intensities, channels in the student's order.
        affine: voxel-to-world matrix of the reference file.
        spacing: voxel size in mm along the three array axes.
    """

    image: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]


def load_prediction_input(item: PredictionInput) -> LoadedInput:
    """Read the student's channels of one case.

    Raises:
        InputError: truncated or corrupt data, wrong dimensionality, NaN/Inf, an all-zero
            channel (no brain to segment), or channels on different grids.
    """
    channels: list[np.ndarray] = []
    affine: np.ndarray | None = None
    spacing: tuple[float, ...] = ()
    for channel, (path, index) in item.channel_files.items():
        volume_file = read_nifti(path)
        data, file_affine = np.asarray(volume_file.data), np.asarray(volume_file.affine)
        want = 4 if index is not None else 3
        if data.ndim != want:
            raise InputError(path, f"expected {_expected_dims(index)}, got {data.ndim}D "
                                   f"shape {tuple(data.shape)}")
        volume = np.asarray(data[..., index] if index is not None else data, dtype=np.float32)
        if not np.all(np.isfinite(volume)):
            raise InputError(path, f"{channel} contains NaN or Inf")
        if not np.any(volume):
            raise InputError(path, f"{channel} is all zero: no brain to segment")
        if affine is not None:
            if volume.shape != channels[0].shape:
                raise InputError(path, f"shape {volume.shape} differs from the first channel's "
                                       f"{channels[0].shape}")
            if float(np.abs(file_affine - affine).max()) > AFFINE_ATOL_MM:
                raise InputError(path, "affine differs from the first channel's")
        else:
            affine, spacing = file_affine, volume_file.zooms
        channels.append(volume)
    assert affine is not None
    return LoadedInput(np.stack(channels), affine, (spacing[0], spacing[1], spacing[2]))


def load_truth(path: Path, release_name: str, case_id: str) -> np.ndarray:
    """A segmentation file -> canonical uint8 labels (the release's values mapped).

    `case_id` is not used: the file is named in every error; it stays for callers.

    Raises:
        InputError: unreadable, not 3D, or values the release does not define (the message lists
            them: e.g. 3 in a 2021 file, or 4 where 2023 predictions were expected).
    """
    return read_labels(path, release_name)[0]


def read_labels(path: Path, release_name: str) -> tuple[np.ndarray, NiftiVolume]:
    """:func:`load_truth`, plus the file as read (its affine and voxel size: one read).

    Raises:
        InputError: as :func:`load_truth`.
    """
    volume = read_nifti(path)
    data = np.asarray(volume.data)
    if data.ndim != 3:
        raise InputError(path, f"expected a 3D label volume, got {data.ndim}D shape "
                               f"{tuple(data.shape)}")
    try:
        return release(release_name).map_labels(data), volume
    except ValueError as exc:
        raise InputError(path, str(exc)) from None
