"""KD-Net's encoder-decoder (Hu et al., arXiv 2106.09564): an nnU-Net-like plain 3D U-Net.

The paper states the building blocks (Conv3d, InstanceNorm3d, LeakyReLU, MaxPool3d down,
trilinear up, four skip connections, softmax) but not the widths or the exact up-path, so these
are our choices and are documented here:

    level i (widths w0..w4, default 16/32/64/128/256, i.e. 5 levels = 4 skips):
        ConvBlock: 2 x [Conv3d 3x3x3 (bias) -> InstanceNorm3d (affine) -> LeakyReLU(0.01)]
    down:  MaxPool3d(2) then the next level's ConvBlock
    up:    trilinear x2 (align_corners=False) -> Conv3d 3x3x3 (w[i] -> w[i-1], bias)
           -> concat skip (w[i-1] + w[i-1]) -> ConvBlock(-> w[i-1])
    head:  conv1x1x1(w0 -> n_classes) logits (softmax is applied by the losses)
    extra: conv1x1x1(w1 -> n_classes) on the 1/2-resolution decoder stage, not in KD-Net, for
           methods that use deep supervision (Barlow Twins KD).

Input spatial sizes must be multiples of 2**(len(widths) - 1) (16 with the default widths).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtcmkd.models.attention import LEAKY_SLOPE
from mtcmkd.models.norms import instance_norm3d
from mtcmkd.models.resunet import check_spatial_size

KDNET_DEFAULT_WIDTHS: tuple[int, ...] = (16, 32, 64, 128, 256)
"""Our choice (the paper gives none): nnU-Net-like doubling from 16, five levels."""


class ConvBlock(nn.Module):
    """Two [Conv3d 3x3x3 -> InstanceNorm3d(affine) -> LeakyReLU] at constant resolution.

    Shapes: (B, in, D, H, W) -> (B, out, D, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=True),
            instance_norm3d(out_channels, affine=True),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=True),
            instance_norm3d(out_channels, affine=True),
            nn.LeakyReLU(LEAKY_SLOPE),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class UpStage(nn.Module):
    """Trilinear x2 -> conv3 (in -> out) -> concat skip -> ConvBlock(2 * out -> out).

    Shapes: x (B, in, d, h, w), skip (B, out, 2d, 2h, 2w) -> (B, out, 2d, 2h, 2w).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.project = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=True)
        self.block = ConvBlock(2 * out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        # Upsample to the skip's exact size (equal to 2x here since sizes are checked).
        x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
        x = torch.cat([self.project(x), skip], dim=1)
        return self.block(x)


class KDNetUNet(nn.Module):
    """KD-Net teacher/student encoder-decoder (identical except ``in_channels``).

    Args:
        in_channels: 4 for the multimodal teacher, 1 for the ``t1ce`` student.
        n_classes: output logits per voxel (4).
        widths: channels per level, full resolution first; the last is the bottleneck. At least
            two entries (``ds_half`` needs a 1/2-resolution decoder stage).

    ``forward`` returns full-resolution logits; ``forward_features`` adds the bottleneck (for
    KD-Net's KL term) and 1/2-resolution deep-supervision logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 4,
        widths: Sequence[int] = KDNET_DEFAULT_WIDTHS,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2:
            raise ValueError(f"KDNetUNet needs at least 2 widths, got {widths}")
        if in_channels < 1 or n_classes < 1 or min(widths) < 1:
            raise ValueError(
                f"in_channels, n_classes and widths must be >= 1, got {in_channels}, "
                f"{n_classes}, {widths}"
            )
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.widths = widths
        self.size_multiple: int = 2 ** (len(widths) - 1)

        self.levels = nn.ModuleList(
            [ConvBlock(in_channels, widths[0])]
            + [ConvBlock(widths[i - 1], widths[i]) for i in range(1, len(widths))]
        )
        self.pool = nn.MaxPool3d(kernel_size=2, stride=2)
        # Deepest stage first, so up[k] runs k-th.
        self.up = nn.ModuleList(
            [UpStage(widths[i], widths[i - 1]) for i in range(len(widths) - 1, 0, -1)]
        )
        self.head = nn.Conv3d(widths[0], n_classes, kernel_size=1, bias=True)
        self.ds_half_head = nn.Conv3d(widths[1], n_classes, kernel_size=1, bias=True)

    def _run(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Return (bottleneck, decoder stage outputs from coarsest to full resolution)."""
        check_spatial_size(x, self.size_multiple)
        skips: list[Tensor] = []
        for i, level in enumerate(self.levels):
            if i > 0:
                skips.append(x)
                x = self.pool(x)
            x = level(x)
        bottleneck = x
        decoded: list[Tensor] = []
        n_skips = len(skips)
        for k, stage in enumerate(self.up):
            x = stage(x, skips[n_skips - 1 - k])
            decoded.append(x)
        return bottleneck, decoded

    def forward(self, x: Tensor) -> Tensor:
        """Full-resolution logits (B, n_classes, D, H, W) for input (B, in_channels, D, H, W).

        Raises:
            ValueError: for a non-5D input or a spatial size not a multiple of ``size_multiple``.
        """
        _, decoded = self._run(x)
        return self.head(decoded[-1])

    @torch.jit.export
    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Logits plus intermediates.

        Keys (for input (B, in, D, H, W)):
            logits:        (B, n_classes, D, H, W)
            ds_half:       (B, n_classes, D/2, H/2, W/2)  extra deep-supervision head (ours)
            features_half: (B, widths[1], D/2, H/2, W/2)  the ds_half head's input
            bottleneck:    (B, widths[-1], D/2**L, ...)   the deepest encoder output

        Raises:
            ValueError: as ``forward``.
        """
        bottleneck, decoded = self._run(x)
        half = decoded[-2]
        return {
            "logits": self.head(decoded[-1]),
            "ds_half": self.ds_half_head(half),
            "features_half": half,
            "bottleneck": bottleneck,
        }
