"""Options of the baseline (the student alone, on the ground truth): none beyond the modalities.

The student may see any modalities, which makes the baseline also the full-modality reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mtcmkd.methods.options.base import MethodOptions

__all__ = ["BaselineOptions"]


@dataclass(frozen=True, kw_only=True)
class BaselineOptions(MethodOptions):
    """The baseline has no options of its own and no teachers."""

    name: ClassVar[str] = "baseline"
    compact_student: ClassVar[bool] = True  # the student is the only network
    student_count: ClassVar[tuple[int, int]] = (1, 4)
    has_teachers: ClassVar[bool] = False
