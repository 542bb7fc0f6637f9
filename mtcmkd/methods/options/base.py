"""What every method's options share: the ``method:`` key path, the modality rules, and the
hooks through which a method checks itself against the rest of the run.

A method's options are a frozen, torch-free dataclass deriving from :class:`MethodOptions`:
its fields are the keys the method reads under ``method:`` (flat, next to ``name`` and the
modalities), checked on construction like every config section, with the defaults of the
method. The class variables say how many student modalities the method takes and whether it has
teachers; the default teachers and any further rule are methods to override.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mtcmkd.brats import CHANNELS
from mtcmkd.config_fields import ConfigError, Section, fmt

if TYPE_CHECKING:  # types only: mtcmkd.config imports the options to validate ``method:``
    from mtcmkd.config import RunConfig

__all__ = ["MethodOptions"]


@dataclass(frozen=True, kw_only=True)
class MethodOptions(Section):
    """Base of a method's options (a method without options subclasses it with no fields).

    Class variables (set by each method):
        name: the method's name, ``method.name`` in a config.
        student_count: (fewest, most) student modalities; "most" >= 4 means "any number".
        has_teachers: False for a method without teachers (``teacher_modalities`` must stay
            null).
        separate_teachers: True when the teachers are networks of their own, which can be
            loaded frozen from another run (``method.teachers_from``); False for a method
            whose "teacher" is the student's own pass (mdsd).
        compact_student: True when the student may have widths of its own
            (``model.student_widths``): its losses never compare student and teacher features.
    """

    _path: ClassVar[str] = "method"  # flat under method: (method.kd_temperature, ...)
    name: ClassVar[str]
    student_count: ClassVar[tuple[int, int]] = (1, 1)
    has_teachers: ClassVar[bool] = True
    separate_teachers: ClassVar[bool] = True
    compact_student: ClassVar[bool] = False

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The option keys of this method, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def default_teacher_modalities(self, student: tuple[str, ...]) -> tuple[str, ...]:
        """The teachers' modalities when ``teacher_modalities`` is null: all four (one
        multimodal teacher), or () for a method without teachers."""
        del student
        return CHANNELS if self.has_teachers else ()

    def check_modalities(self, student: tuple[str, ...], teachers: tuple[str, ...], *,
                         offline: bool = False) -> None:
        """Checks of the method on its (known, distinct) student and teacher modalities after
        defaults, beyond the counts; raise :class:`ConfigError` naming
        ``method.<key>``. ``offline``: the teachers come frozen from another run
        (``method.teachers_from``). The base accepts anything."""

    def check_run(self, run: RunConfig) -> None:
        """Checks of the method against the other sections (model output, patch size,
        epochs); raise :class:`ConfigError` naming the key to change. The base accepts
        anything."""

    def student_count_rule(self) -> str:
        """The student-count rule in words: "exactly 1", "1 or 2", "at least 1"."""
        low, high = self.student_count
        if high >= len(CHANNELS):
            return f"at least {low}"
        if low == high:
            return f"exactly {low}"
        return f"{low} or {high}" if high == low + 1 else f"{low} to {high}"

    def _error(self, key: str, rule: str, value: object) -> ConfigError:
        return ConfigError(f"method.{key}: {rule} (got {fmt(value)})")
