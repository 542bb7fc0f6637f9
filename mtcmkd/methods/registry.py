"""The method registry: a method's name -> its options class and its method class.

Two halves, registered at different times on purpose:

- the options class (a torch-free dataclass, :class:`~mtcmkd.methods.options.MethodOptions`)
  is all the config layer needs to load and validate ``method:``; the built-in ones register
  when :mod:`mtcmkd.methods.options` is imported, which :mod:`mtcmkd.config` does;
- the method class (an ``nn.Module``) registers when its module is imported;
  :mod:`mtcmkd.methods.build` imports the built-in ones before building.

A new method is one module that defines both and decorates the class with
:func:`register_method`, which registers its options too (``tests/test_methods.py`` registers
a toy method from the test file alone). This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from mtcmkd.config_fields import ConfigError

if TYPE_CHECKING:  # types only: the options import this module to register themselves
    from mtcmkd.methods.options.base import MethodOptions

__all__ = [
    "method_class",
    "method_names",
    "option_owners",
    "options_class",
    "register_method",
    "register_options",
    "registered_classes",
]

_OPTIONS: dict[str, type[MethodOptions]] = {}
"""Method name -> options class, in registration order (the order error messages list)."""
_CLASSES: dict[str, type[Any]] = {}
"""Method name -> method class (a :class:`~mtcmkd.methods.base.Method` subclass)."""

OptionsT = TypeVar("OptionsT", bound="type[MethodOptions]")
ClassT = TypeVar("ClassT", bound=type)


def register_options(options: OptionsT) -> OptionsT:
    """Register an options class under its ``name`` (a class decorator).

    Raises:
        ValueError: another options class already holds the name (registering the same class
            again is a no-op, so re-importing a module is harmless).
    """
    held = _OPTIONS.get(options.name)
    if held is not None and held is not options:
        raise ValueError(f"method {options.name!r} is registered twice: {held.__qualname__} "
                         f"and {options.__qualname__}")
    _OPTIONS[options.name] = options
    return options


def register_method(cls: ClassT) -> ClassT:
    """Register a method class and its ``Options`` (a class decorator); names the class
    ``cls.name = cls.Options.name``, so the name is written once, in the options.

    Raises:
        ValueError: the name is already held by another options or method class.
    """
    options: type[MethodOptions] = cls.Options  # type: ignore[attr-defined]
    register_options(options)
    held = _CLASSES.get(options.name)
    if held is not None and held is not cls:
        raise ValueError(f"method {options.name!r} is registered twice: {held.__qualname__} "
                         f"and {cls.__qualname__}")
    cls.name = options.name  # type: ignore[attr-defined]
    _CLASSES[options.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_OPTIONS)


def options_class(name: str) -> type[MethodOptions]:
    """The options class of method ``name``.

    Raises:
        ConfigError: ``method.name: must be one of ...`` when no method has that name.
    """
    try:
        return _OPTIONS[name]
    except KeyError:
        choices = ", ".join(repr(n) for n in _OPTIONS)
        got = repr(name) if isinstance(name, str) else str(name)
        raise ConfigError(f"method.name: must be one of {choices} (got {got})") from None


def method_class(name: str) -> type[Any]:
    """The method class registered under ``name``.

    Raises:
        KeyError: options exist but no class was registered (its module was not imported).
    """
    try:
        return _CLASSES[name]
    except KeyError:
        raise KeyError(f"method {name!r} has options but no registered class; import the "
                       f"module that defines it (mtcmkd.methods.build imports the built-in "
                       f"ones)") from None


def registered_classes() -> Mapping[str, type[Any]]:
    """A live, read-only view of name -> method class."""
    return MappingProxyType(_CLASSES)


def option_owners(key: str) -> tuple[str, ...]:
    """The registered methods whose options have a field ``key`` (for error messages)."""
    return tuple(name for name, options in _OPTIONS.items() if key in options.field_names())
