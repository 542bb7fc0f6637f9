"""Build the method a config names: imports every built-in method (registering its class) and
looks the name up in the registry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mtcmkd.config import RunConfig
from mtcmkd.losses import region_kd_kl
from mtcmkd.methods.barlow import BarlowKD
from mtcmkd.methods.base import DiceTally, Method, MethodOutput, dice_stats, epoch_dice
from mtcmkd.methods.baseline import Baseline
from mtcmkd.methods.kdnet import KDNet
from mtcmkd.methods.mdsd import MDSD
from mtcmkd.methods.mtcmkd import MTCMKD
from mtcmkd.methods.registry import method_class, registered_classes

__all__ = [
    "METHODS",
    "MTCMKD",
    "BarlowKD",
    "Baseline",
    "DiceTally",
    "KDNet",
    "MDSD",
    "Method",
    "MethodOutput",
    "build_method",
    "dice_stats",
    "epoch_dice",
    "region_kd_kl",
]

METHODS: Mapping[str, type[Method]] = registered_classes()
"""Method name (``method.name`` in the config) -> class: a live, read-only view of the
registry (a method registered later appears in it)."""


def build_method(cfg: RunConfig, channels: Sequence[str]) -> Method:
    """The method ``cfg.method.name`` with freshly initialised networks (seed torch first).

    Args:
        cfg: a validated run config.
        channels: the store's channel names in image-channel order (``StoreInfo.channels``).

    Raises:
        ValueError: a modality the method needs is missing from ``channels``.
    """
    return method_class(cfg.method.name)(cfg, channels)
