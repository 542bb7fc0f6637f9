"""Barlow Twins redundancy-reduction loss for latent-level teacher -> student transfer.

Single-stage KD with Barlow Twins (Choi et al., CMPB 2023) aligns the teacher's and the
student's bottleneck features with the Barlow Twins loss (Zbontar et al., 2021). The loss needs
a set of paired samples; :func:`bottleneck_embeddings` makes one from 3D bottlenecks by letting
every bottleneck voxel (or pooled block) of every batch item be one sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mtcmkd.losses._checks import check_same_shape

__all__ = ["barlow_twins_loss", "bottleneck_embeddings"]


def _standardise(z: Tensor, eps: float) -> Tensor:
    """Zero-mean, unit-variance columns: ``(z - mean) / sqrt(var + eps)``, biased variance.

    This is ``BatchNorm1d(affine=False)`` in training mode, as in the Barlow Twins paper.
    """
    mean = z.mean(dim=0, keepdim=True)
    var = z.var(dim=0, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def barlow_twins_loss(
    z_teacher: Tensor,
    z_student: Tensor,
    *,
    lambda_offdiag: float = 5e-3,
    eps: float = 1e-5,
) -> Tensor:
    """Barlow Twins loss between paired teacher and student embeddings.

    Each of the ``D`` dimensions is standardised over the ``N`` samples (mean 0, biased
    variance 1, with ``eps`` added to the variance), the cross-correlation matrix is
    ``C = a^T b / N`` (``D x D``; ``C_ij`` is the correlation of teacher dim ``i`` with student
    dim ``j``), and::

        loss = sum_i (1 - C_ii)**2 + lambda_offdiag * sum_{i != j} C_ij**2

    The first term makes matching dimensions agree, the second decorrelates different ones. The
    loss is a sum over dimensions (not a mean), so it grows with ``D``; it is 0 only for
    perfectly correlated, mutually decorrelated dimensions, and invariant to a per-dimension
    affine rescaling of either input. Neither input is detached: in the single-stage method
    both paths learn from it; detach the teacher in the caller if that is wanted.

    The matrix product runs with autocast disabled, in float32, so the result does not depend
    on a surrounding bfloat16 autocast region.

    Args:
        z_teacher: ``(N, D)`` teacher embeddings (``N >= 2`` samples).
        z_student: ``(N, D)`` student embeddings, row ``n`` paired with teacher row ``n``.
        lambda_offdiag: weight of the off-diagonal (redundancy) term, ``~5e-3`` in the paper.
        eps: added to each variance; a constant dimension standardises to 0 instead of NaN.

    Returns:
        float32 scalar, ``>= 0``.
    """
    check_same_shape(z_student, z_teacher, "embeddings")
    if z_teacher.ndim != 2 or z_teacher.shape[0] < 2:
        raise ValueError(
            f"embeddings must have shape (N, D) with N >= 2 samples, got {tuple(z_teacher.shape)}"
        )
    with torch.autocast(device_type=z_teacher.device.type, enabled=False):
        a = _standardise(z_teacher.float(), eps)
        b = _standardise(z_student.float(), eps)
        corr = a.T @ b / a.shape[0]
        on_diag = torch.diagonal(corr)
        on_term = (1.0 - on_diag).pow(2).sum()
        off_term = corr.pow(2).sum() - on_diag.pow(2).sum()
    return on_term + lambda_offdiag * off_term


def bottleneck_embeddings(feat: Tensor, pool: int | None = None) -> Tensor:
    """Turn 3D bottleneck features into ``(N, C)`` samples for :func:`barlow_twins_loss`.

    Choice (documented as METHODS.md asks): the ``C`` channels are the embedding dimensions and
    every spatial position of every batch item is one sample, so ``N = B * d * h * w``. Teacher
    and student bottlenecks of the same input patch are aligned voxel by voxel, which gives the
    pairing the loss needs, and a batch of 1 (the usual 3D setting) still yields many samples
    for the per-dimension statistics. With ``pool = k`` the features are first averaged over
    non-overlapping ``k x k x k`` blocks, giving fewer, less spatially correlated samples and a
    ``k**3``-times smaller correlation computation.

    Rows are ordered batch-major then ``(z, y, x)`` row-major: row
    ``((b * d + z) * h + y) * w + x`` holds ``feat[b, :, z, y, x]`` (pooled coordinates when
    ``pool`` is set).

    Args:
        feat: ``(B, C, d, h, w)`` bottleneck features.
        pool: ``None`` for every voxel, or a block size ``k >= 1`` dividing ``d``, ``h`` and ``w``.

    Returns:
        ``(B * d' * h' * w', C)`` tensor in the input's dtype, with ``d' = d // k`` etc.
    """
    if feat.ndim != 5:
        raise ValueError(
            f"bottleneck features must have shape (B, C, d, h, w), got {tuple(feat.shape)}"
        )
    if pool is not None:
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ValueError(f"pool must be None or a positive integer, got {pool!r}")
        spatial = tuple(feat.shape[2:])
        if any(size % pool for size in spatial):
            raise ValueError(
                f"bottleneck spatial shape {spatial} is not divisible by pool={pool}; "
                "choose a pool size that divides it, or pool=None"
            )
        if pool > 1:
            feat = F.avg_pool3d(feat, kernel_size=pool, stride=pool)
    channels = feat.shape[1]
    return feat.movedim(1, -1).reshape(-1, channels)
