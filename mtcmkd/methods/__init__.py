"""The distillation methods: each turns a batch into named losses behind one interface.

``build_method(cfg, channels)`` returns the :class:`Method` named by ``cfg.method.name``; the
training loop uses only the interface (``forward``, ``param_groups``, ``end_epoch``,
``student_network``, ``student_channels``, ``describe``, ``frozen_groups``) and never knows which
method runs. One module per method: ``baseline``, ``mtcmkd``, ``kdnet``, ``barlow``.
"""

from __future__ import annotations

from collections.abc import Sequence

from mtcmkd.config import RunConfig
from mtcmkd.methods.barlow import BarlowKD
from mtcmkd.methods.base import Method, MethodOutput, dice_stats, epoch_dice
from mtcmkd.methods.baseline import Baseline
from mtcmkd.methods.kdnet import KDNet
from mtcmkd.methods.mtcmkd import MTCMKD, region_kd_kl

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Baseline, MTCMKD, KDNet, BarlowKD)
}
"""Method name (``method.name`` in the config) -> class."""

__all__ = [
    "METHODS",
    "MTCMKD",
    "BarlowKD",
    "Baseline",
    "KDNet",
    "Method",
    "MethodOutput",
    "build_method",
    "dice_stats",
    "epoch_dice",
    "region_kd_kl",
]


def build_method(cfg: RunConfig, channels: Sequence[str]) -> Method:
    """The method ``cfg.method.name`` with freshly initialised networks (seed torch first).

    Args:
        cfg: a validated run config.
        channels: the store's channel names in image-channel order (``StoreInfo.channels``).

    Raises:
        ValueError: a modality the method needs is missing from ``channels``.
    """
    return METHODS[cfg.method.name](cfg, channels)
