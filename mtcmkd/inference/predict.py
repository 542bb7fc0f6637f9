"""Numpy in, numpy out: the adapter between image arrays and :class:`InferencePipeline`.

:func:`segment_volume` runs a built pipeline on one (C, D, H, W) array; :func:`predict_volume`
builds the pipeline for a network and runs it (one call, for library users and tests).
:class:`PipelineEnsemble` runs several models' pipelines (the folds of a cross-validation) on one
input and labels the mean of their probabilities, as nnU-Net ensembles folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from mtcmkd.inference.labels import probabilities_to_labels
from mtcmkd.inference.pipeline import InferencePipeline, build_pipeline
from mtcmkd.inference.settings import InferenceSettings

__all__ = ["PipelineEnsemble", "VolumePrediction", "brain_bbox", "predict_volume",
           "segment_volume"]


@dataclass(frozen=True)
class VolumePrediction:
    """Result of :func:`predict_volume` and :func:`segment_volume`.

    Attributes:
        labels: (D, H, W) uint8 labels on the full input grid (0 outside the brain): canonical,
            or the pipeline's ``label_values``.
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


class PipelineEnsemble(nn.Module):
    """Several models on one input: the mean of their class probabilities, then labels.

    Each member is a whole :class:`InferencePipeline` (its own windows, blending and settings);
    the members' probabilities on the brain box are averaged with equal weights and turned into
    labels once (argmax of the mean for softmax, the nested 0.5 thresholds of the mean for
    regions), which is how nnU-Net ensembles the models of its folds. Averaging labels instead
    would lose the confidence of each model. One member gives that member's result exactly.
    Duck-types :meth:`InferencePipeline.segment` and ``label_lut``, so :func:`segment_volume`
    and every caller of a pipeline take an ensemble unchanged (eager only: not scripted).

    Raises:
        ValueError: no member, or members that disagree on the output kind, the number of
            input channels, the label values or the input handling (crop, z-score); in
            :meth:`segment`, members whose brain boxes or probability shapes differ.
    """

    def __init__(self, pipelines: Sequence[InferencePipeline]) -> None:
        super().__init__()
        if not pipelines:
            raise ValueError("an ensemble needs at least one pipeline")
        first = pipelines[0]
        for i, other in enumerate(pipelines[1:], start=1):
            same = (other.output == first.output and other.n_channels == first.n_channels
                    and other.crop == first.crop and other.zscore == first.zscore
                    and torch.equal(other.label_lut.cpu(), first.label_lut.cpu()))
            if not same:
                raise ValueError(f"ensemble member {i} differs from member 0 in its output "
                                 "kind, input channels, label values or input handling")
        self.members = nn.ModuleList(pipelines)
        self.output: str = first.output
        self.register_buffer("label_lut", first.label_lut.clone())

    def segment(self, x: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        """As :meth:`InferencePipeline.segment`, with the members' mean probabilities."""
        if len(self.members) == 1:
            return self.members[0].segment(x)
        total: Tensor | None = None
        box: list[int] = []
        for i, member in enumerate(self.members):
            _, probs, member_box = member.segment(x)
            if total is None:
                total, box = probs.clone(), member_box
            elif member_box != box or probs.shape != total.shape:
                raise ValueError(f"ensemble member {i} saw another brain box or gave "
                                 f"probabilities of another shape ({list(probs.shape)} vs "
                                 f"{list(total.shape)})")
            else:
                total += probs
        assert total is not None
        mean = total / len(self.members)
        with torch.no_grad():
            canonical = probabilities_to_labels(mean, self.output)
            labels = torch.zeros([1, x.size(2), x.size(3), x.size(4)], dtype=torch.uint8,
                                 device=x.device)
            lut = self.label_lut.to(canonical.device)
            labels[0, box[0]:box[1], box[2]:box[3], box[4]:box[5]] = lut[canonical.long()]
        return labels, mean, box

    def forward(self, x: Tensor) -> Tensor:
        """Raw (1, C, D, H, W) -> uint8 labels (1, D, H, W) in the label values."""
        return self.segment(x)[0]


def segment_volume(pipeline: InferencePipeline | PipelineEnsemble,
                   image_channels: np.ndarray) -> VolumePrediction:
    """Run `pipeline` on one (C, D, H, W) array on the pipeline's device; results on the host.

    Raises:
        ValueError: not (C, D, H, W), or what the pipeline refuses (wrong channel count,
            NaN/inf, an all-zero image, a constant brain).
    """
    image = np.asarray(image_channels)
    if image.ndim != 4:
        raise ValueError(f"image_channels must be (channels, D, H, W), got shape {image.shape}")
    lut = pipeline.label_lut
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(lut.device)
    with torch.inference_mode():
        labels, probs, box = pipeline.segment(x)
    return VolumePrediction(
        labels=labels[0].cpu().numpy(),
        probabilities=probs[0].cpu().numpy(),
        bbox=[[box[0], box[1]], [box[2], box[3]], [box[4], box[5]]],
    )


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
    precision: str = "fp32",
    layout: str = "windows",
) -> VolumePrediction:
    """Segment one case: brain crop -> z-score -> windows (or box) -> labels on the full grid.

    Builds an :class:`InferencePipeline` (:func:`build_pipeline`) and runs it
    (:func:`segment_volume`). The defaults are the reference result
    (:meth:`InferenceSettings.reference`).

    Args:
        network: patch network (B, C, *patch) -> logits (B, n_classes, *patch); set to eval mode
            and moved to `device`.
        image_channels: (C, D, H, W) float32 intensities on the native grid, channels in the
            order the network was trained with (e.g. just ``t1ce`` for the student). Raw values
            or values already z-scored on the brain (z-scoring is then a no-op).
        patch_size, n_classes, output, overlap, sigma_scale, mirror, window_batch: as
            :class:`SlidingWindow`.
        normalize: z-score each channel on its non-zero voxels of the crop, as preprocessing does
            (:class:`BrainZScore`); turn off only for inputs normalised some other way.
        device: where to run; default: the network's parameters' device (CPU without any).
        precision, layout: as :class:`InferenceSettings` ("auto" resolved for `device`).

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
    settings = InferenceSettings(precision=precision, layout=layout, overlap=overlap,
                                 mirror=mirror, sigma_scale=sigma_scale, window_batch=window_batch)
    if device is None:
        first = next(network.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    pipeline = build_pipeline(network, patch_size, n_classes, output, settings, device=device,
                              n_channels=image.shape[0], normalize=normalize).to(device)
    return segment_volume(pipeline, image)
