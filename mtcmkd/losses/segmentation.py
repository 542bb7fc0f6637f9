"""Segmentation losses against integer label volumes.

Conventions shared by every function here:

- ``logits`` have shape ``(B, C, *spatial)`` (any number of spatial dims, 3 for volumes) and may
  be in any floating dtype; they are cast to float32 inside, so the reductions stay accurate under
  ``torch.autocast`` with bfloat16. Every loss returns a float32 scalar.
- ``target`` / ``labels`` have shape ``(B, *spatial)`` and an integer dtype. For the softmax
  losses a label is a class index in ``[0, C)``; an index outside that range raises (on CPU) or
  triggers a device-side assert (on CUDA), it is never silently ignored.
- Canonical BraTS labels: 0 background, 1 NCR/NETC, 2 ED/SNFH, 3 ET, 4 RC (resection cavity,
  BraTS 2024 post-treatment data only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mtcmkd.losses._checks import check_labels, check_logits_and_labels

__all__ = [
    "REGION_LABELS",
    "cross_entropy",
    "downsample_labels",
    "one_hot",
    "region_segmentation_loss",
    "region_targets",
    "segmentation_loss",
    "soft_dice_loss",
    "soft_jaccard_loss",
]

#: Labels that make up each nested tumour region, in the output-channel order WT, TC, ET.
REGION_LABELS: tuple[tuple[int, ...], ...] = ((1, 2, 3), (1, 3), (3,))


def one_hot(target: Tensor, num_classes: int) -> Tensor:
    """One-hot encode labels with the class axis second.

    Args:
        target: ``(B, *spatial)`` integer labels in ``[0, num_classes)``.
        num_classes: number of classes ``C``.

    Returns:
        ``(B, C, *spatial)`` float32 tensor of 0 / 1.
    """
    encoded = F.one_hot(check_labels(target), num_classes)  # (B, *spatial, C)
    return encoded.movedim(-1, 1).float()


def _overlap_terms(probs: Tensor, onehot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per (sample, class) sums over the whole volume: intersection, sum(p), sum(y).

    Each output has shape ``(B, C)``.
    """
    spatial = tuple(range(2, probs.ndim))
    intersection = (probs * onehot).sum(dim=spatial)
    return intersection, probs.sum(dim=spatial), onehot.sum(dim=spatial)


def _soft_dice_per_class(probs: Tensor, onehot: Tensor, eps: float) -> Tensor:
    """Soft Dice coefficient ``(2 I + eps) / (sum p + sum y + eps)`` per (sample, class)."""
    intersection, sum_p, sum_y = _overlap_terms(probs, onehot)
    return (2.0 * intersection + eps) / (sum_p + sum_y + eps)


def soft_dice_loss(logits: Tensor, target: Tensor, *, eps: float = 1e-5) -> Tensor:
    """Soft Dice loss over the softmax classes, background included.

    ``p = softmax(logits)`` over the class axis and ``y`` the one-hot target. For every
    (sample, class) pair the sums run over the **whole volume**::

        dice[b, c] = (2 * sum(p * y) + eps) / (sum(p) + sum(y) + eps)

    and the loss is ``1 - mean_{b, c} dice[b, c]``, in ``[0, 1]``.

    The MTCM-KD authors' published code reduces over the two in-plane axes only, i.e. it computes
    one Dice per axial slice and averages the slices (a reduction slip); this implementation
    follows the paper's intent and uses the volume.

    Args:
        logits: ``(B, C, *spatial)`` unnormalised class scores.
        target: ``(B, *spatial)`` integer labels in ``[0, C)``.
        eps: smoothing added to numerator and denominator (a count of voxels, so 1e-5 is
            negligible next to any non-empty class).

    Edge cases: a class absent from the target **and** (near) absent from the prediction scores
    ``eps / (sum(p) + eps) ~ 1`` (no loss); a class absent from the target but given a predicted
    mass ``m >> eps`` scores ``~ 0``, so the loss pushes the predicted mass of absent classes to
    zero (the nnU-Net / MONAI convention).

    Returns:
        float32 scalar.
    """
    labels = check_logits_and_labels(logits, target)
    probs = torch.softmax(logits.float(), dim=1)
    dice = _soft_dice_per_class(probs, one_hot(labels, logits.shape[1]), eps)
    return 1.0 - dice.mean()


def soft_jaccard_loss(logits: Tensor, target: Tensor, *, eps: float = 1e-5) -> Tensor:
    """Soft Jaccard (IoU) loss over the softmax classes, background included.

    Per (sample, class), with sums over the whole volume (not per slice, see
    :func:`soft_dice_loss`)::

        iou[b, c] = (sum(p * y) + eps) / (sum(p) + sum(y) - sum(p * y) + eps)

    and the loss is ``1 - mean_{b, c} iou[b, c]``, in ``[0, 1]``.

    Args:
        logits: ``(B, C, *spatial)`` unnormalised class scores.
        target: ``(B, *spatial)`` integer labels in ``[0, C)``.
        eps: smoothing added to numerator and denominator (in voxels).

    Edge cases: identical to :func:`soft_dice_loss`: an empty class predicted empty scores ~1,
    an empty class given predicted mass scores ~0.

    Returns:
        float32 scalar.
    """
    labels = check_logits_and_labels(logits, target)
    probs = torch.softmax(logits.float(), dim=1)
    intersection, sum_p, sum_y = _overlap_terms(probs, one_hot(labels, logits.shape[1]))
    iou = (intersection + eps) / (sum_p + sum_y - intersection + eps)
    return 1.0 - iou.mean()


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Softmax cross-entropy, mean over every voxel of every sample (nats per voxel).

    Args:
        logits: ``(B, C, *spatial)`` unnormalised class scores.
        target: ``(B, *spatial)`` integer labels in ``[0, C)``.

    Returns:
        float32 scalar, ``mean_{b, voxel} -log softmax(logits)[b, target, voxel]``.
    """
    labels = check_logits_and_labels(logits, target)
    return F.cross_entropy(logits.float(), labels)


def segmentation_loss(logits: Tensor, target: Tensor, *, eps: float = 1e-5) -> Tensor:
    """MTCM-KD segmentation loss: ``(soft Dice + soft Jaccard + cross-entropy) / 3``.

    All three terms are over the softmax classes (4 for BraTS: background, NCR, ED, ET) with
    the volume-level Dice / Jaccard of :func:`soft_dice_loss` and :func:`soft_jaccard_loss`
    and the voxel-mean cross-entropy of :func:`cross_entropy`; the softmax and one-hot are
    computed once and shared by the three terms.

    Args:
        logits: ``(B, C, *spatial)`` unnormalised class scores.
        target: ``(B, *spatial)`` integer labels in ``[0, C)``.
        eps: Dice / Jaccard smoothing in voxels (see :func:`soft_dice_loss` for empty classes).

    Returns:
        float32 scalar.
    """
    labels = check_logits_and_labels(logits, target)
    logits32 = logits.float()
    probs = torch.softmax(logits32, dim=1)
    intersection, sum_p, sum_y = _overlap_terms(probs, one_hot(labels, logits.shape[1]))
    dice = (2.0 * intersection + eps) / (sum_p + sum_y + eps)
    iou = (intersection + eps) / (sum_p + sum_y - intersection + eps)
    ce = F.cross_entropy(logits32, labels)
    return ((1.0 - dice.mean()) + (1.0 - iou.mean()) + ce) / 3.0


def region_targets(labels: Tensor) -> Tensor:
    """Nested BraTS region masks from canonical labels.

    Channels, in order: WT (whole tumour) = {1, 2, 3}, TC (tumour core) = {1, 3},
    ET (enhancing tumour) = {3}. Label 0 (background), label 4 (RC, resection cavity) and any
    other value belong to no region.

    Args:
        labels: ``(B, *spatial)`` integer labels.

    Returns:
        ``(B, 3, *spatial)`` float32 tensor of 0 / 1, on the labels' device.
    """
    labels = check_labels(labels, "labels")
    masks = []
    for members in REGION_LABELS:
        mask = torch.zeros_like(labels, dtype=torch.bool)
        for value in members:
            mask |= labels == value
        masks.append(mask)
    return torch.stack(masks, dim=1).float()


def region_segmentation_loss(logits3: Tensor, labels: Tensor, *, eps: float = 1e-5) -> Tensor:
    """Nested-region loss: ``(soft Dice loss + binary cross-entropy) / 2`` on WT, TC, ET.

    The region-output variant used by recent BraTS winners: three independent sigmoid
    channels (WT, TC, ET, see :func:`region_targets`) instead of a softmax over disjoint classes.
    With ``p = sigmoid(logits3)`` and ``r`` the region masks, the Dice term is
    ``1 - mean_{b, region} (2 sum(p r) + eps) / (sum(p) + sum(r) + eps)`` with sums over the
    whole volume, and the BCE term is the mean over every element (computed from the logits,
    which is numerically stable).

    Args:
        logits3: ``(B, 3, *spatial)`` region logits in the order WT, TC, ET.
        labels: ``(B, *spatial)`` canonical integer labels (0..4).
        eps: Dice smoothing in voxels; an empty region predicted empty scores ~1.

    Returns:
        float32 scalar.
    """
    if logits3.ndim < 3 or logits3.shape[1] != len(REGION_LABELS):
        raise ValueError(
            f"logits3 must have shape (B, 3, *spatial) for WT, TC, ET, got {tuple(logits3.shape)}"
        )
    labels = check_logits_and_labels(logits3, labels)
    logits32 = logits3.float()
    regions = region_targets(labels)
    dice = _soft_dice_per_class(torch.sigmoid(logits32), regions, eps)
    bce = F.binary_cross_entropy_with_logits(logits32, regions)
    return ((1.0 - dice.mean()) + bce) / 2.0


def downsample_labels(labels: Tensor, factor: int = 2) -> Tensor:
    """Nearest-neighbour downsampling of a label volume by an integer factor.

    Keeps every ``factor``-th voxel along each spatial axis, starting at index 0; this is
    exactly what ``F.interpolate(labels.float(), scale_factor=1 / factor, mode="nearest")``
    selects, without the float round trip. Used to supervise half-resolution outputs (the
    deep-supervision head and the CDSFL fusion).

    Args:
        labels: ``(B, *spatial)`` integer labels; every spatial size must be divisible by
            ``factor`` (otherwise slicing and interpolation disagree on the output size).
        factor: positive integer downsampling factor; 1 returns the input unchanged.

    Returns:
        ``(B, *[s // factor for s in spatial])`` tensor with the input's dtype (a view).
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    if labels.ndim < 2:
        raise ValueError(f"labels must have shape (B, *spatial), got {tuple(labels.shape)}")
    check_labels(labels, "labels")
    spatial = tuple(labels.shape[1:])
    if any(size % factor for size in spatial):
        raise ValueError(
            f"spatial shape {spatial} is not divisible by factor {factor}; crop or pad the "
            "volume to a multiple of the factor first"
        )
    index = (slice(None),) + (slice(None, None, factor),) * len(spatial)
    return labels[index]
