"""Each method's options: torch-free dataclasses the config layer loads ``method:`` into.

Importing this package registers the built-in methods' options, in the order error messages
list them (baseline, mtcmkd, kdnet, barlow, then mdsd): explicitly here rather than by
decorators, so the order does not depend on the order of the imports. One module per method, next to the method's own
module in :mod:`mtcmkd.methods`.
"""

from __future__ import annotations

from mtcmkd.methods.options.barlow import BarlowOptions
from mtcmkd.methods.options.base import MethodOptions
from mtcmkd.methods.options.baseline import BaselineOptions
from mtcmkd.methods.options.kdnet import KDNetOptions
from mtcmkd.methods.options.mdsd import MDSDOptions
from mtcmkd.methods.options.mtcmkd import MTCMKDOptions
from mtcmkd.methods.registry import register_options

__all__ = [
    "BUILTIN_METHODS",
    "BarlowOptions",
    "BaselineOptions",
    "KDNetOptions",
    "MDSDOptions",
    "MTCMKDOptions",
    "MethodOptions",
]

BUILTIN_METHODS: tuple[type[MethodOptions], ...] = (
    BaselineOptions, MTCMKDOptions, KDNetOptions, BarlowOptions,
)
"""The methods this package ships, in the order the flat v1 layout of ``method:`` lists their
options (see :func:`mtcmkd.config.MethodConfig.to_flat`)."""

for _options in BUILTIN_METHODS:
    register_options(_options)

# Methods added after the v1 layout was frozen: registered, but not in BUILTIN_METHODS, so their
# options never enter another method's serialised config (nor the config hash of existing runs).
register_options(MDSDOptions)
