"""Networks: the MTCM-KD residual U-Net, KD-Net's U-Net, and the CDSFL fusion module.

Every segmentation network has the same interface: ``forward(x) -> logits`` (the exported
inference path, TorchScript-friendly) and ``forward_features(x) -> dict[str, Tensor]`` with at
least "logits", "ds_half", "features_half" and "bottleneck".
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mtcmkd.models.attention import ChannelAttentionGate
from mtcmkd.models.cdsfl import CDSFL, TeacherBranch
from mtcmkd.models.kdnet import KDNET_DEFAULT_WIDTHS, ConvBlock, KDNetUNet, UpStage
from mtcmkd.models.resunet import (
    DEFAULT_WIDTHS,
    DecoderStage,
    ResidualBlock,
    ResidualUNet,
    Stem,
)

NETWORK_KINDS: tuple[str, ...] = ("resunet", "kdnet")
"""Names accepted by :func:`build_network`."""

__all__ = [
    "CDSFL",
    "DEFAULT_WIDTHS",
    "KDNET_DEFAULT_WIDTHS",
    "NETWORK_KINDS",
    "ChannelAttentionGate",
    "ConvBlock",
    "DecoderStage",
    "KDNetUNet",
    "ResidualBlock",
    "ResidualUNet",
    "Stem",
    "TeacherBranch",
    "UpStage",
    "build_network",
    "count_parameters",
]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``module`` (all of them unless ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def build_network(
    kind: str,
    in_channels: int,
    n_classes: int,
    widths: Sequence[int] | None = None,
) -> ResidualUNet | KDNetUNet:
    """Build a segmentation network by name.

    Args:
        kind: "resunet" (MTCM-KD residual U-Net) or "kdnet" (KD-Net's plain U-Net).
        in_channels: number of input modalities.
        n_classes: output logits per voxel.
        widths: channels per resolution level; ``None`` for the kind's default
            (32/64/128/256 for "resunet", 16/32/64/128/256 for "kdnet").

    Raises:
        ValueError: for an unknown ``kind`` (the message lists the valid ones) or invalid sizes.
    """
    if kind == "resunet":
        return ResidualUNet(in_channels, n_classes, DEFAULT_WIDTHS if widths is None else widths)
    if kind == "kdnet":
        return KDNetUNet(in_channels, n_classes, KDNET_DEFAULT_WIDTHS if widths is None else widths)
    raise ValueError(f"unknown network kind {kind!r}; choose one of {', '.join(NETWORK_KINDS)}")
