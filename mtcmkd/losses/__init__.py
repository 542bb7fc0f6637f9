"""Pure loss functions: segmentation, distillation (MTCM-KD, KD-Net) and Barlow Twins.

Shapes: logits ``(B, C, *spatial)``, integer labels ``(B, *spatial)``. Every function computes
its reductions in float32 and returns a float32 scalar, also under a bfloat16 autocast region.
"""

from __future__ import annotations

from mtcmkd.losses.barlow import barlow_twins_loss, bottleneck_embeddings
from mtcmkd.losses.distillation import (
    KDScaling,
    bottleneck_kl,
    kd_kl,
    kdnet_gt_loss,
    kdnet_kd_loss,
    region_kd_kl,
    teacher_weights,
)
from mtcmkd.losses.segmentation import (
    REGION_LABELS,
    cross_entropy,
    downsample_labels,
    one_hot,
    region_segmentation_loss,
    region_targets,
    segmentation_loss,
    soft_dice_loss,
    soft_jaccard_loss,
)

__all__ = [
    "REGION_LABELS",
    "KDScaling",
    "barlow_twins_loss",
    "bottleneck_embeddings",
    "bottleneck_kl",
    "cross_entropy",
    "downsample_labels",
    "kd_kl",
    "kdnet_gt_loss",
    "kdnet_kd_loss",
    "one_hot",
    "region_kd_kl",
    "region_segmentation_loss",
    "region_targets",
    "segmentation_loss",
    "soft_dice_loss",
    "soft_jaccard_loss",
    "teacher_weights",
]
