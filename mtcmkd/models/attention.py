"""Channel attention gate (the channel half of CBAM), shared by the residual U-Net and CDSFL.

The gate rescales each channel of a 3D feature map by a weight in (0, 1) computed from two
global summaries of that channel (its mean and its maximum over all voxels), passed through one
shared two-layer MLP. It has no spatial parameters, so it works at any input size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

LEAKY_SLOPE = 0.01
"""Negative slope of every LeakyReLU in the MTCM-KD networks (PyTorch's default)."""


class ChannelAttentionGate(nn.Module):
    """scale = sigmoid(MLP(avg_pool(x)) + MLP(max_pool(x))); output = x * scale.

    MLP = Linear(C -> C // reduction) -> LeakyReLU(0.01) -> Linear(C // reduction -> C), both with
    biases, the same weights for the average and the maximum branch. With C = 384 and reduction 16
    this is 18,840 parameters; with C = 64, 580.

    The hidden width is ``max(1, C // reduction)`` so that the tiny widths used in tests (C < 16)
    still build; for the paper's widths (all >= 16) it equals ``C // reduction``.

    Args:
        channels: C, the number of input (and output) channels.
        reduction: the MLP bottleneck ratio (16 in the paper and in CBAM).

    Shapes:
        input (B, C, D, H, W) of any spatial size; output the same shape.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(
                f"ChannelAttentionGate needs channels >= 1 and reduction >= 1, got "
                f"channels={channels}, reduction={reduction}"
            )
        hidden = max(1, channels // reduction)
        self.channels = channels
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(hidden, channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        # Flatten the spatial dims so the pooling is independent of the number of them.
        flat = x.flatten(2)
        avg = flat.mean(dim=-1)
        peak = flat.amax(dim=-1)
        scale = torch.sigmoid(self.mlp(avg) + self.mlp(peak))
        return x * scale[:, :, None, None, None].to(x.dtype)
