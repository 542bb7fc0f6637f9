"""CDSFL: cooperative deep-supervision fusion learning (MTCM-KD's teacher fusion module).

Each teacher's 64-channel decoder features at 1/2 resolution pass through the teacher's own
channel attention gate and a 1x1x1 projection to class logits; the per-teacher logits are summed
and mixed by one more 1x1x1 convolution. The result (fused logits at 1/2 resolution) is trained
against labels downsampled to 1/2 resolution and distilled into the student's deep-supervision
head. The gradient of that loss reaches every teacher, which is the "cooperative" part.

We follow the published code: no activation after the sum (the paper's figure draws one).
"""

from __future__ import annotations

from torch import Tensor, nn

from mtcmkd.models.attention import ChannelAttentionGate


class TeacherBranch(nn.Module):
    """ChannelAttentionGate(C) -> conv1x1x1(C -> n_classes): 580 + 260 parameters for C=64, n=4."""

    def __init__(self, channels: int, n_classes: int) -> None:
        super().__init__()
        self.gate = ChannelAttentionGate(channels)
        self.project = nn.Conv3d(channels, n_classes, kernel_size=1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.gate(x))


class CDSFL(nn.Module):
    """Fuse the teachers' 1/2-resolution decoder features into one set of logits.

    Args:
        n_teachers: number of teachers (3 in MTCM-KD); each has its own branch weights.
        channels: feature channels per teacher (64 = widths[1] of the residual U-Net).
        n_classes: output logits per voxel (4).

    The default configuration has 2,540 parameters (3 x (580 + 260) + 20).

    ``forward`` takes a *list* of tensors, one per teacher in a fixed order, each
    (B, channels, d, h, w) with the same shape, and returns fused logits (B, n_classes, d, h, w).
    A list rather than a stacked tensor so callers pass the teachers' ``features_half`` directly,
    without a copy, and so the gradient path to each teacher is explicit.
    """

    def __init__(self, n_teachers: int = 3, channels: int = 64, n_classes: int = 4) -> None:
        super().__init__()
        if n_teachers < 1 or channels < 1 or n_classes < 1:
            raise ValueError(
                f"CDSFL needs n_teachers, channels and n_classes >= 1, got "
                f"{n_teachers}, {channels}, {n_classes}"
            )
        self.n_teachers = n_teachers
        self.channels = channels
        self.n_classes = n_classes
        self.branches = nn.ModuleList(
            [TeacherBranch(channels, n_classes) for _ in range(n_teachers)]
        )
        self.fuse = nn.Conv3d(n_classes, n_classes, kernel_size=1, bias=True)

    def forward(self, features: list[Tensor]) -> Tensor:
        """Fused logits (B, n_classes, d, h, w) from ``n_teachers`` tensors (B, channels, d, h, w).

        Raises:
            ValueError: when the number of tensors is not ``n_teachers``, or a tensor has the
                wrong channel count or a shape different from the first one.
        """
        if len(features) != self.n_teachers:
            raise ValueError(
                "CDSFL expects one feature tensor per teacher ("
                + str(self.n_teachers)
                + "), got "
                + str(len(features))
            )
        reference = features[0].shape
        for f in features:
            if f.dim() != 5 or f.shape[1] != self.channels or f.shape != reference:
                raise ValueError(
                    "CDSFL inputs must all be (B, "
                    + str(self.channels)
                    + ", d, h, w) with the same shape; got "
                    + str(f.shape)
                    + " next to "
                    + str(reference)
                )
        total: Tensor | None = None
        for i, branch in enumerate(self.branches):
            out = branch(features[i])
            total = out if total is None else total + out
        assert total is not None  # n_teachers >= 1, checked in __init__
        return self.fuse(total)
