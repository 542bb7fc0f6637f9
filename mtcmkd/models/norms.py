"""Group and instance normalisation whose statistics use the whole GPU on 3D volumes.

PyTorch's CUDA ``GroupNorm`` computes each (sample, group) mean and variance in one thread block
(``RowwiseMomentsCUDAKernel``). A 3D segmentation network at batch 1 has 4-6 groups of millions
of voxels each, so 4-6 blocks do the work while the other ~125 multiprocessors of an H100/H200
idle: measured on an H200, that kernel took 58% of a baseline training step at 128^3 (5 ms per
call). :class:`GroupNorm3d` computes the same statistics with ``torch.var_mean``, whose
reduction splits a long row across many blocks, and applies them as one per-channel
``x * scale + shift``. On the CPU (and so in the C++ client on a CPU) it is exactly
``nn.GroupNorm``; on a GPU it equals it within float32 rounding (tested).

For training, :class:`_GroupNormFunction` gives the same forward an explicit backward (the
textbook group-norm gradient, with its reductions again spread over the GPU) that keeps only the
input in its own dtype plus the per-group mean and 1/std. Autograd through the plain formula
would keep two float32 copies of a bf16 input, 4x the bytes PyTorch's GroupNorm keeps.

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

    Statistics and the affine map in float32 (float64 for float64 input); the result in
    ``x``'s dtype.
    """
    mean, rstd = _group_stats(x, num_groups, eps)
    return _apply_stats(x, num_groups, weight, bias, mean, rstd)


class _GroupNormFunction(torch.autograd.Function):
    """`group_norm_by_reduction` that saves only (x, weight, mean, 1/std) for its backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int,
                eps: float) -> Tensor:
        mean, rstd = _group_stats(x, num_groups, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.num_groups = num_groups
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _apply_stats(x, num_groups, weight, bias, mean, rstd)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        n, c, g = x.shape[0], x.shape[1], ctx.num_groups
        per_group = c // g
        m = per_group * x[0, 0].numel()  # elements per (sample, group)
        acc = _compute_dtype(x)
        gf = grad.reshape(n, c, -1).to(acc)
        xf = x.reshape(n, c, -1).to(acc)
        mean_c, rstd_c = _per_channel(mean, per_group), _per_channel(rstd, per_group)  # (n, c)
        sum_g = gf.sum(dim=-1)  # (n, c)
        # A product then a plain reduction (rather than einsum's batched matmul, whose
        # 1 x L x 1 products may not spread over the GPU): the reduction kernel that
        # var_mean uses, known to split long rows across blocks.
        sum_g_xhat = rstd_c * ((gf * xf).sum(dim=-1) - mean_c * sum_g)
        w = torch.ones(c, device=x.device, dtype=acc) if weight is None else weight.to(acc)
        sum_gw = (w * sum_g).reshape(n, g, per_group).sum(dim=-1)  # (n, g)
        sum_gw_xhat = (w * sum_g_xhat).reshape(n, g, per_group).sum(dim=-1)
        # dx = rstd * (g w - mean(g w) - xhat * mean(g w xhat)), means over the group
        k_g = (rstd_c * w)[..., None]
        k_x = _per_channel(-(rstd * rstd) * sum_gw_xhat / m, per_group)[..., None]
        k_0 = _per_channel(-rstd * sum_gw / m, per_group)[..., None]
        dx = (gf * k_g + (xf - mean_c[..., None]) * k_x + k_0).reshape(x.shape).to(x.dtype)
        dweight = None
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = sum_g_xhat.sum(dim=0).to(weight.dtype)
        dbias = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            dbias = sum_g.sum(dim=0).to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None


def _apply_stats(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                 mean: Tensor, rstd: Tensor) -> Tensor:
    """``(x - mean) * rstd * weight + bias`` as one per-channel ``x * scale + shift``."""
    n, c = x.shape[0], x.shape[1]
    acc = _compute_dtype(x)
    scale = _per_channel(rstd, c // num_groups)  # (n, c)
    shift = -_per_channel(mean, c // num_groups) * scale
    if weight is not None:
        scale = scale * weight.to(acc)
        shift = shift * weight.to(acc)
    if bias is not None:
        shift = shift + bias.to(acc)
    shape = [n, c] + [1] * (x.dim() - 2)
    return torch.addcmul(shift.reshape(shape), x.to(acc), scale.reshape(shape)).to(x.dtype)


def _group_stats(x: Tensor, num_groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """Per (sample, group) mean and 1/std, ``(n, groups)`` each, in the compute dtype."""
    var, mean = torch.var_mean(x.reshape(x.shape[0], num_groups, -1).to(_compute_dtype(x)),
                               dim=-1, correction=0)
    return mean, torch.rsqrt(var + eps)


def _per_channel(per_group: Tensor, channels_per_group: int) -> Tensor:
    """``(n, groups)`` -> ``(n, channels)``: each group's value for each of its channels."""
    return per_group.repeat_interleave(channels_per_group, dim=1)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half, bfloat16 and float32 inputs; float64 stays float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class GroupNorm3d(nn.GroupNorm):
    """``nn.GroupNorm`` with GPU statistics that parallelise over the voxels (see module)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda:
            if not torch.jit.is_scripting():
                return _GroupNormFunction.apply(x, self.weight, self.bias, self.num_groups,
                                                self.eps)
            return group_norm_by_reduction(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def instance_norm3d(channels: int, affine: bool = False, eps: float = 1e-5) -> GroupNorm3d:
    """Instance normalisation (``nn.InstanceNorm3d(channels, affine=affine)``, no running stats)."""
    return GroupNorm3d(channels, channels, eps=eps, affine=affine)
