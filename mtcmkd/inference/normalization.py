"""Intensity normalisation at inference time, as an nn.Module that TorchScript can compile."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BrainZScore"]


class BrainZScore(nn.Module):
    """Z-score every (sample, channel) on its non-zero (brain) voxels; zero voxels stay 0.

    The same normalisation as preprocessing (``mtcmkd.preprocessing.zscore_nonzero``): mean and
    population standard deviation (divide by N) over the non-zero voxels, computed in float64,
    ``(x - mean) * (1 / std)`` inside the brain, exactly 0 outside; the result is float32. Because
    a z-scored volume has mean 0 and std 1 on its non-zero voxels, applying it to data that is
    already normalised changes nothing (up to rounding).

    Args:
        eps: a brain whose standard deviation is below this cannot be normalised.

    Raises (in forward):
        ValueError: input is not 5D, or a channel has non-zero voxels of one constant value.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps: float = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, D, H, W) raw intensities -> (B, C, D, H, W) float32 z-scores.

        A channel with no non-zero voxel at all stays all zero.
        """
        if x.dim() != 5:
            raise ValueError(
                "BrainZScore expects (batch, channels, depth, height, width), got "
                + str(x.dim())
                + " dims"
            )
        brain = x != 0
        values = x.to(torch.float64)
        weight = brain.to(torch.float64)
        count = weight.sum(dim=[2, 3, 4], keepdim=True).clamp(min=1.0)
        mean = (values * weight).sum(dim=[2, 3, 4], keepdim=True) / count
        centred = (values - mean) * weight
        std = ((centred * centred).sum(dim=[2, 3, 4], keepdim=True) / count).sqrt()
        has_brain = brain.any(dim=4).any(dim=3).any(dim=2).view(std.shape)
        if bool((has_brain & (std < self.eps)).any()):
            raise ValueError("constant intensity inside the brain; cannot normalise")
        scaled = centred * (1.0 / std.clamp(min=self.eps))
        return torch.where(brain, scaled, torch.zeros_like(scaled)).to(torch.float32)
