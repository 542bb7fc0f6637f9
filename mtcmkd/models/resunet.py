"""The MTCM-KD network: a 3D residual U-Net with channel attention on the decoder skips.

All four networks of MTCM-KD (three unimodal teachers and the student) are this class and differ
only in ``in_channels``. Layout (widths w0..wL, default 32/64/128/256):

    stem           in -> w0 at full resolution
    encoder        ResidualBlock(w[i-1] -> w[i], stride 2), i = 1..L; the last one is the bridge
    decoder        per stage: ConvTranspose3d(w[i] -> w[i], k2, s2) -> concat skip w[i-1]
                   -> ChannelAttentionGate(w[i] + w[i-1]) -> ResidualBlock(-> w[i-1], stride 1)
    heads          conv1x1x1(w0 -> n_classes) at full resolution, plus two deep-supervision heads:
                   conv1x1x1(w1 -> n) at 1/2 and conv1x1x1(w2 -> n) at 1/4 resolution

With the default widths, one input channel and four classes the network has 9,459,478 parameters
(both deep-supervision heads included). Input spatial sizes must be multiples of 2**L.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtcmkd.models.attention import LEAKY_SLOPE, ChannelAttentionGate
from mtcmkd.models.norms import GroupNorm3d, instance_norm3d

DEFAULT_WIDTHS: tuple[int, ...] = (32, 64, 128, 256)
"""Encoder widths of the published network: full, 1/2, 1/4 resolution and the 1/8 bridge."""


def group_norm_groups(channels: int) -> int:
    """Number of GroupNorm groups the published code uses: 6 if it divides C, else 4.

    Raises:
        ValueError: when neither 6 nor 4 divides ``channels`` (GroupNorm would fail later with a
            less helpful message).
    """
    if channels % 6 == 0:
        return 6
    if channels % 4 == 0:
        return 4
    raise ValueError(
        f"GroupNorm needs the channel count to divide by 6 or 4, got {channels}; "
        "choose widths that are multiples of 4"
    )


def _conv3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv3d:
    """3x3x3 convolution with bias and 'same' padding (halves the size when stride is 2)."""
    return nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=True)


def _residual_sum(out: Tensor, shortcut: Tensor) -> Tensor:
    """``out + shortcut``, in place into `out` when the dtypes agree (`out` comes from a conv,
    which does not keep its output for backward): one full-size tensor less at the peak."""
    if out.dtype != shortcut.dtype:  # e.g. a float32 norm beside a bf16 conv under autocast
        return out + shortcut
    out += shortcut
    return out


class Stem(nn.Module):
    """conv3(in -> C) -> InstanceNorm (not affine) -> LeakyReLU -> conv3(C -> C), plus a
    parallel conv3(in -> C) shortcut; the two are summed, no activation after the sum.

    Shapes: (B, in, D, H, W) -> (B, C, D, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            _conv3(in_channels, out_channels),
            instance_norm3d(out_channels),  # as nn.InstanceNorm3d: not affine, no running stats
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            _conv3(out_channels, out_channels),
        )
        self.shortcut = _conv3(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return _residual_sum(self.main(x), self.shortcut(x))


class ResidualBlock(nn.Module):
    """Pre-activation residual block.

    main:     GroupNorm(in) -> LeakyReLU -> conv3(in -> out, stride)
              -> GroupNorm(out) -> LeakyReLU -> conv3(out -> out)
    shortcut: conv3(in -> out, stride) -> GroupNorm(out)
    output = main + shortcut (no activation after the sum).

    ``ResidualBlock(32, 64, stride=2)`` has 221,696 parameters.

    Shapes: (B, in, D, H, W) -> (B, out, D / stride, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.main = nn.Sequential(
            GroupNorm3d(group_norm_groups(in_channels), in_channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            _conv3(in_channels, out_channels, stride),
            GroupNorm3d(group_norm_groups(out_channels), out_channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            _conv3(out_channels, out_channels),
        )
        self.shortcut = nn.Sequential(
            _conv3(in_channels, out_channels, stride),
            GroupNorm3d(group_norm_groups(out_channels), out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return _residual_sum(self.main(x), self.shortcut(x))


class DecoderStage(nn.Module):
    """Up x2 (transposed conv, channel count kept) -> concat skip -> attention gate -> block.

    One module per stage so the network loops over a single ModuleList (TorchScript cannot
    ``zip`` several ModuleLists).

    Shapes: x (B, C, d, h, w), skip (B, S, 2d, 2h, 2w) -> (B, out, 2d, 2h, 2w).
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        concat = in_channels + skip_channels
        self.up = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2, bias=True)
        self.gate = ChannelAttentionGate(concat)
        self.block = ResidualBlock(concat, out_channels, stride=1)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = torch.cat([self.up(x), skip], dim=1)
        if torch.is_grad_enabled():
            return self.block(self.gate(x))
        # Inference: scale the concatenation in place (nothing else reads it), one full-size
        # tensor fewer at the full-resolution stage (docs/PERFORMANCE.md, peak memory)
        return self.block(x.mul_(self.gate.scale(x)))


def check_spatial_size(x: Tensor, multiple: int) -> None:
    """Raise ValueError unless x is (B, C, D, H, W) with D, H, W multiples of ``multiple``.

    Written in the TorchScript subset so that ``forward`` of a scripted network keeps the check
    (a scripted ``raise ValueError`` surfaces as ``torch.jit.Error`` carrying the same message).
    """
    if x.dim() != 5:
        raise ValueError(
            "expected a 5D input (batch, channels, depth, height, width), got "
            + str(x.dim())
            + " dims"
        )
    for size in x.shape[2:]:
        if size % multiple != 0:
            raise ValueError(
                "spatial size "
                + str(x.shape[2:])
                + " must be a multiple of "
                + str(multiple)
                + " in every axis (the network downsamples that many times); pad or crop"
            )


class ResidualUNet(nn.Module):
    """The MTCM-KD 3D residual U-Net (teachers and student alike).

    Args:
        in_channels: number of input modalities (1 for every MTCM-KD network).
        n_classes: number of output logits per voxel (4: background, NCR/NETC, ED/SNFH, ET).
        widths: channels at full, 1/2, 1/4, ... resolution; the last entry is the bridge. At
            least three entries (the 1/4 deep-supervision head needs a 1/4 decoder stage); every
            entry a multiple of 4 (GroupNorm groups).

    ``forward`` returns full-resolution logits only (the exported inference path);
    ``forward_features`` returns everything the distillation methods need.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 4,
        widths: Sequence[int] = DEFAULT_WIDTHS,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 3:
            raise ValueError(
                f"ResidualUNet needs at least 3 widths (full, 1/2, 1/4 resolution), got {widths}"
            )
        if in_channels < 1 or n_classes < 1:
            raise ValueError(
                f"in_channels and n_classes must be >= 1, got {in_channels} and {n_classes}"
            )
        for w in widths:
            group_norm_groups(w)  # fail early with a clear message
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.widths = widths
        # Every entry after the first halves the resolution once.
        self.size_multiple: int = 2 ** (len(widths) - 1)

        self.stem = Stem(in_channels, widths[0])
        self.encoder = nn.ModuleList(
            [ResidualBlock(widths[i - 1], widths[i], stride=2) for i in range(1, len(widths))]
        )
        # Deepest stage first, so decoder[k] runs k-th.
        self.decoder = nn.ModuleList(
            [
                DecoderStage(widths[i], widths[i - 1], widths[i - 1])
                for i in range(len(widths) - 1, 0, -1)
            ]
        )
        self.head = nn.Conv3d(widths[0], n_classes, kernel_size=1, bias=True)
        self.ds_half_head = nn.Conv3d(widths[1], n_classes, kernel_size=1, bias=True)
        self.ds_quarter_head = nn.Conv3d(widths[2], n_classes, kernel_size=1, bias=True)

    def _encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Return (bridge output, skips from full resolution down)."""
        check_spatial_size(x, self.size_multiple)
        skips: list[Tensor] = []
        x = self.stem(x)
        for block in self.encoder:
            skips.append(x)
            x = block(x)
        return x, skips

    def _run(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Return (bridge output, decoder stage outputs from coarsest to full resolution)."""
        bottleneck, skips = self._encode(x)
        x = bottleneck
        decoded: list[Tensor] = []
        for stage in self.decoder:
            x = stage(x, skips.pop())
            decoded.append(x)
        return bottleneck, decoded

    def forward(self, x: Tensor) -> Tensor:
        """Full-resolution logits (B, n_classes, D, H, W) for input (B, in_channels, D, H, W).

        Raises:
            ValueError: for a non-5D input or a spatial size that is not a multiple of
                ``size_multiple`` (8 with the default widths).
        """
        # `_run` without its list of decoder outputs, and each skip dropped once its stage has
        # used it: inference holds about one full-size tensor fewer
        x, skips = self._encode(x)
        for stage in self.decoder:
            x = stage(x, skips.pop())
        return self.head(x)

    @torch.jit.export
    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Logits plus the intermediate tensors distillation needs.

        Keys (for input (B, in, D, H, W)):
            logits:        (B, n_classes, D, H, W)
            ds_half:       (B, n_classes, D/2, H/2, W/2)  deep-supervision logits
            ds_quarter:    (B, n_classes, D/4, H/4, W/4)  deep-supervision logits
            features_half: (B, widths[1], D/2, H/2, W/2)  the ds_half head's input (CDSFL input)
            bottleneck:    (B, widths[-1], D/2**L, ...)   the bridge output

        Raises:
            ValueError: as ``forward``.
        """
        bottleneck, decoded = self._run(x)
        half = decoded[-2]
        return {
            "logits": self.head(decoded[-1]),
            "ds_half": self.ds_half_head(half),
            "ds_quarter": self.ds_quarter_head(decoded[-3]),
            "features_half": half,
            "bottleneck": bottleneck,
        }
