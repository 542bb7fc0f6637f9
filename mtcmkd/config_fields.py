"""The field machinery of the typed config sections: coercion to annotations, unknown-key
errors, and :class:`ConfigError`.

A section is a frozen dataclass deriving from :class:`Section`: on construction every field is
checked against its annotation and normalised (lists -> tuples, ints -> floats for float fields,
a mapping -> the nested section), then the section's own ``_validate`` runs. Error messages
start with the key path (``method.kd_temperature: must be > 0 (got -1)``).

This module sits below both :mod:`mtcmkd.config` (the run's sections) and
:mod:`mtcmkd.methods.options` (each method's options), which is why it is not part of either.
It imports no torch and no other project module.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

__all__ = ["ConfigError", "Section", "coerce", "fmt", "hints"]


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the offending key path."""


# ----------------------------------------------------------------------------- coercion helpers


def fmt(value: Any) -> str:
    """Show a value in an error message the way a user wrote it (-1.0 -> -1, 'x' -> 'x')."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and normalise it (lists -> tuples,
    ints -> floats for float fields, a mapping -> the section dataclass).

    Strings are accepted for float fields when they parse as a number, because YAML 1.1 (what
    PyYAML implements) reads ``1e-4`` (no dot) as a string.
    """
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            if len(options) < len(get_args(tp)):
                return None
            raise ConfigError(f"{path}: must not be null")
        if len(options) == 1:
            return coerce(value, options[0], path)
        raise TypeError(f"unsupported annotation {tp}")  # not used by the config classes
    if value is None:
        raise ConfigError(f"{path}: must not be null (expected {_type_name(tp)})")
    if origin is Literal:
        choices = get_args(tp)
        if not isinstance(value, str) or value not in choices:
            raise ConfigError(
                f"{path}: must be one of {', '.join(repr(c) for c in choices)} (got {fmt(value)})"
            )
        return value
    if origin is tuple:
        args = get_args(tp)
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{path}: expected a list, got {fmt(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(
                f"{path}: expected a list of {len(args)} values (got {fmt(tuple(value))})"
            )
        pairs = zip(value, args, strict=True)
        return tuple(coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(pairs))
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        return tp.from_dict(value, path)  # type: ignore[attr-defined]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{path}: must be a finite number (got {fmt(value)})")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported annotation {tp}")
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {fmt(value)}")


class Section:
    """Shared machinery of the config dataclasses: coerce fields to their annotations, then
    run the section's own ``_validate``. ``_path`` is the section's key path in messages."""

    _path: ClassVar[str] = ""

    def __post_init__(self) -> None:
        annotations = hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = coerce(getattr(self, f.name), annotations[f.name], self._key(f.name))
            object.__setattr__(self, f.name, value)
        self._validate()

    def _key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def _validate(self) -> None:
        """Range and cross-field checks of the section (after coercion)."""

    def _require(self, ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{self._key(name)}: {rule} (got {fmt(getattr(self, name))})")

    @classmethod
    def from_dict(cls, data: Any, path: str | None = None) -> Any:
        """Build the section from a mapping; unknown keys are rejected with the valid ones.

        ``None`` (an empty YAML section such as ``train:``) means all defaults.
        """
        path = cls._path if path is None else path
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {fmt(data)}")
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        for key in data:
            if key not in names:
                where = f"{path}.{key}" if path else str(key)
                raise ConfigError(f"{where}: unknown key; valid keys: {', '.join(names)}")
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            required = dataclasses.MISSING is f.default and dataclasses.MISSING is f.default_factory
            if required and f.name not in data:
                where = f"{path}.{f.name}" if path else f.name
                raise ConfigError(f"{where}: required key is missing")
        return cls(**dict(data))


_HINTS: dict[type, dict[str, Any]] = {}


def hints(cls: type) -> dict[str, Any]:
    """The resolved field annotations of a section class (cached: resolving them is slow)."""
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]
