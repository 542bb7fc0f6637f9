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
        return x * self.scale(x)

    @torch.jit.export
    def scale(self, x: Tensor) -> Tensor:
        """The per-channel factor, (B, C, 1, 1, 1) in x's dtype (forward = x * scale(x))."""
        # Flatten the spatial dims so the pooling is independent of the number of them.
        flat = x.flatten(2)
        if x.dim() == 5 and x.dtype == torch.bfloat16 and not x.is_contiguous() \
                and x.is_contiguous(memory_format=torch.channels_last_3d):
            # bf16 channels-last (the CPU fast path): torch's mean over the strided voxel axis
            # copies the whole map and is slow; a ones-vector product reads it in place
            # (float32 accumulation, then bf16 as the mean itself gives)
            voxels = x.permute(0, 2, 3, 4, 1).reshape(x.shape[0], -1, x.shape[1])
            ones = torch.ones(x.shape[0], 1, voxels.shape[1], dtype=x.dtype, device=x.device)
            avg = torch.bmm(ones, voxels).squeeze(1) / voxels.shape[1]
        else:
            avg = flat.mean(dim=-1)
        peak = flat.amax(dim=-1)
        scale = torch.sigmoid(self.mlp(avg) + self.mlp(peak))
        return scale[:, :, None, None, None].to(x.dtype)
