"""The distillation methods: each turns a batch into named losses behind one interface.

One method is one module (``baseline``, ``mtcmkd``, ``kdnet``, ``barlow``) plus its options in
``options/<name>.py``; the registry (:mod:`mtcmkd.methods.registry`) maps a name to both.
``build_method(cfg, channels)`` (:mod:`mtcmkd.methods.build`) returns the :class:`Method` named
by ``cfg.method.name``; the training loop uses only the interface (``forward``,
``param_groups``, ``end_epoch``, ``student_network``, ``student_channels``, ``describe``,
``frozen_groups``) and never knows which method runs.

This package's own import is torch-free, because :mod:`mtcmkd.config` reads the options from
it; the torch side (the method classes, ``build_method``) is imported on first use of one of
its names here, or directly from :mod:`mtcmkd.methods.build`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mtcmkd.methods.options import (
    BarlowOptions,
    BaselineOptions,
    KDNetOptions,
    MethodOptions,
    MTCMKDOptions,
)
from mtcmkd.methods.registry import (
    method_class,
    method_names,
    options_class,
    register_method,
    register_options,
)

if TYPE_CHECKING:
    from mtcmkd.methods.build import (
        METHODS,
        MTCMKD,
        BarlowKD,
        Baseline,
        DiceTally,
        KDNet,
        Method,
        MethodOutput,
        build_method,
        dice_stats,
        epoch_dice,
        region_kd_kl,
    )

__all__ = [
    "METHODS",
    "MTCMKD",
    "BarlowKD",
    "BarlowOptions",
    "Baseline",
    "BaselineOptions",
    "DiceTally",
    "KDNet",
    "KDNetOptions",
    "MTCMKDOptions",
    "Method",
    "MethodOptions",
    "MethodOutput",
    "build_method",
    "dice_stats",
    "epoch_dice",
    "method_class",
    "method_names",
    "options_class",
    "region_kd_kl",
    "register_method",
    "register_options",
]

_TORCH_SIDE = frozenset({
    "METHODS", "MTCMKD", "BarlowKD", "Baseline", "DiceTally", "KDNet", "Method", "MethodOutput",
    "build_method", "dice_stats", "epoch_dice", "region_kd_kl",
})


def __getattr__(name: str) -> Any:
    """The torch side of the package, imported on first use (PEP 562) so that loading a config
    (which imports the options from here) does not import torch."""
    if name in _TORCH_SIDE:
        from mtcmkd.methods import build  # heavy: torch and the networks

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
