"""Group and instance normalisation whose statistics use the whole GPU on 3D volumes.

PyTorch's CUDA ``GroupNorm`` computes each (sample, group) mean and variance in one thread block
(``RowwiseMomentsCUDAKernel``). A 3D segmentation network at batch 1 has 4-6 groups of millions
of voxels each, so 4-6 blocks do the work while the other ~125 multiprocessors of an H100/H200
idle: measured on an H200, that kernel took 58% of a baseline training step at 128^3 (5 ms per
call). :class:`GroupNorm3d` computes the same statistics with ``torch.var_mean``, whose
reduction splits a long row across many blocks, and applies them as one per-channel
``x * scale + shift``. On the CPU (and so in the C++ client on a CPU) it is exactly
``nn.GroupNorm``; on a GPU it equals it within float32 rounding (tested).

Instance normalisation is group normalisation with one group per channel:
:func:`instance_norm3d` is a :class:`GroupNorm3d` that stands in for ``nn.InstanceNorm3d``
(no running statistics, the same parameters and state-dict keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_norm_by_reduction(x: Tensor, num_groups: int, weight: Tensor | None,
                            bias: Tensor | None, eps: float) -> Tensor:
    """``F.group_norm`` as a ``var_mean`` reduction plus one ``x * scale + shift`` (any device).

    Statistics and the affine map in float32; the result in ``x``'s dtype.
    """
    n, c = x.shape[0], x.shape[1]
    var, mean = torch.var_mean(x.reshape(n, num_groups, -1).float(), dim=-1, correction=0)
    rstd = torch.rsqrt(var + eps)  # (n, groups)
    scale = rstd.repeat_interleave(c // num_groups, dim=1)  # (n, c)
    shift = -mean.repeat_interleave(c // num_groups, dim=1) * scale
    if weight is not None:
        scale = scale * weight.float()
        shift = shift * weight.float()
    if bias is not None:
        shift = shift + bias.float()
    shape = [n, c] + [1] * (x.dim() - 2)
    return torch.addcmul(shift.reshape(shape), x.float(), scale.reshape(shape)).to(x.dtype)


class GroupNorm3d(nn.GroupNorm):
    """``nn.GroupNorm`` with GPU statistics that parallelise over the voxels (see module)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda:
            return group_norm_by_reduction(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def instance_norm3d(channels: int, affine: bool = False, eps: float = 1e-5) -> GroupNorm3d:
    """Instance normalisation (``nn.InstanceNorm3d(channels, affine=affine)``, no running stats)."""
    return GroupNorm3d(channels, channels, eps=eps, affine=affine)
