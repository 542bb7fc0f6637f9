"""One call from raw image channels to a full-volume label map (library convenience)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mtcmkd.inference.labels import probabilities_to_labels
from mtcmkd.inference.native import uncrop
from mtcmkd.inference.normalization import BrainZScore
from mtcmkd.inference.sliding_window import SlidingWindow

__all__ = ["VolumePrediction", "brain_bbox", "predict_volume"]


@dataclass(frozen=True)
class VolumePrediction:
    """Result of :func:`predict_volume`.

    Attributes:
        labels: (D, H, W) uint8 canonical labels on the full input grid (0 outside the brain).
        probabilities: (n_classes, d, h, w) float32 probabilities on the brain crop only.
        bbox: ``[[lo, hi], [lo, hi], [lo, hi]]`` half-open crop of `probabilities` in the
            full volume.
    """

    labels: np.ndarray
    probabilities: np.ndarray
    bbox: list[list[int]]


def brain_bbox(image_channels: np.ndarray) -> list[list[int]]:
    """Half-open bounding box of the voxels non-zero in any channel of (C, D, H, W).

    Raises:
        ValueError: every voxel is zero (no brain to segment).
    """
    brain = np.any(image_channels != 0, axis=0)
    bbox = []
    for axis in range(3):
        extent = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        if extent.size == 0:
            raise ValueError("the image is all zero: no brain voxels to segment")
        bbox.append([int(extent[0]), int(extent[-1]) + 1])
    return bbox


def predict_volume(
    network: nn.Module,
    image_channels: np.ndarray,
    patch_size: Sequence[int],
    n_classes: int = 4,
    output: str = "softmax",
    *,
    overlap: float = 0.5,
    sigma_scale: float = 0.125,
    mirror: bool = False,
    window_batch: int = 1,
    normalize: bool = True,
    device: torch.device | str | None = None,
) -> VolumePrediction:
    """Segment one case: brain crop -> z-score -> sliding window -> labels on the full grid.

    Args:
        network: patch network (B, C, *patch) -> logits (B, n_classes, *patch); set to eval mode.
        image_channels: (C, D, H, W) float32 intensities on the native grid, channels in the
            order the network was trained with (e.g. just ``t1ce`` for the student). Raw values
            or values already z-scored on the brain (z-scoring is then a no-op).
        patch_size, n_classes, output, overlap, sigma_scale, mirror, window_batch: as
            :class:`SlidingWindow`.
        normalize: z-score each channel on its non-zero voxels of the crop, as preprocessing does
            (:class:`BrainZScore`); turn off only for inputs normalised some other way.
        device: where to run; default: the network's parameters' device (CPU without any).

    Returns:
        :class:`VolumePrediction` with canonical labels for the full volume (see
        :func:`probabilities_to_labels` for the "regions" nesting) and the cropped
        probabilities with their bbox.

    The brain crop is the bounding box of voxels non-zero in any channel; outside it the labels
    are background. Gradients are not tracked.
    """
    image = np.asarray(image_channels)
    if image.ndim != 4:
        raise ValueError(f"image_channels must be (channels, D, H, W), got shape {image.shape}")
    bbox = brain_bbox(image)
    crop = image[(slice(None), *(slice(lo, hi) for lo, hi in bbox))]
    if device is None:
        first = next(network.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    network.eval()
    window = SlidingWindow(network, patch_size, n_classes, overlap=overlap, sigma_scale=sigma_scale,
                           output=output, mirror=mirror, window_batch=window_batch).to(device)
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None].to(device)
        if normalize:
            x = BrainZScore()(x)
        probs = window(x)[0]
        labels = probabilities_to_labels(probs, output).cpu().numpy()
    return VolumePrediction(
        labels=uncrop(labels, bbox, image.shape[1:]),
        probabilities=probs.cpu().numpy(),
        bbox=bbox,
    )
