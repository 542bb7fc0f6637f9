"""Group and instance normalisation rewritten for ONNX Runtime's float32 precision.

ONNX Runtime's CPU kernels reduce a long axis in float32 with an error that grows with its
length: the ``InstanceNormalization`` node that the exporter makes of ``GroupNorm`` and
``InstanceNorm3d`` (and a plain ``ReduceMean`` over a flattened group) normalise a 128^3 window
of the paper's student with errors of ~4e-3 against float64, where PyTorch's kernels stay below
1e-6 (measured on one GroupNorm(4, 32) over 128^3 voxels, mean 3, sd 0.5). Through the network's
twenty normalisations that becomes a 3e-3 gap in the output probabilities.

:class:`TwoLevelGroupNorm` computes the same statistics as two shorter reductions, first over
the flattened H x W plane, then over the group's channels and depth (equal-sized parts, so the
mean of means is the mean), and the variance from centred values (two passes, no
``E[x^2] - E[x]^2`` cancellation). In ONNX Runtime that brings the single layer to ~3e-6.
:func:`onnx_friendly_norms` swaps every GroupNorm and InstanceNorm3d of a network copy for it,
weights included; in PyTorch the swapped network matches the original within ~1e-6.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["TwoLevelGroupNorm", "onnx_friendly_norms"]


class TwoLevelGroupNorm(nn.Module):
    """GroupNorm over ``(N, C, D, H, W)`` with two-level, two-pass statistics (see module)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float,
                 weight: Tensor | None = None, bias: Tensor | None = None) -> None:
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"{num_channels} channels do not split into {num_groups} groups")
        self.num_groups = int(num_groups)
        self.num_channels = int(num_channels)
        self.eps = float(eps)
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone(),
                                                               requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        n, d = x.shape[0], x.shape[2]
        y = x.reshape(n, self.num_groups, self.num_channels // self.num_groups, d, -1)
        mean = y.mean(dim=-1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        centred = y - mean
        var = (centred * centred).mean(dim=-1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        out = (centred * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if self.weight is not None:
            out = out * self.weight.reshape(1, -1, 1, 1, 1)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1, 1)
        return out


def _replacement(module: nn.Module) -> nn.Module | None:
    if isinstance(module, nn.GroupNorm):
        return TwoLevelGroupNorm(module.num_groups, module.num_channels, module.eps,
                                 module.weight if module.affine else None,
                                 module.bias if module.affine else None)
    if isinstance(module, nn.InstanceNorm3d):
        if module.track_running_stats:
            return None  # uses stored statistics at inference: nothing to reduce
        return TwoLevelGroupNorm(module.num_features, module.num_features, module.eps,
                                 module.weight if module.affine else None,
                                 module.bias if module.affine else None)
    return None


def onnx_friendly_norms(network: nn.Module) -> nn.Module:
    """A copy of `network` (eval mode) with every GroupNorm / InstanceNorm3d swapped."""
    network = copy.deepcopy(network).eval()
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            new = _replacement(child)
            if new is not None:
                setattr(parent, name, new)
    return network
