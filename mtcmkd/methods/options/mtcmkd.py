"""Options of MTCM-KD (three unimodal teachers + CDSFL + a student, trained online).

docs/METHODS.md section 1 has the facts behind the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from mtcmkd.methods.options.base import MethodOptions

__all__ = ["TEACHER_ORDER", "MTCMKDOptions"]

TEACHER_ORDER: tuple[str, ...] = ("flair", "t2", "t1", "t1ce")
"""Teacher preference order: a student's teachers are the other modalities, in this order
(t1ce student -> flair, t2, t1; t1 student -> flair, t2, t1ce, as in the paper)."""


@dataclass(frozen=True, kw_only=True)
class MTCMKDOptions(MethodOptions):
    """MTCM-KD's loss weights, KD scaling and teacher-performance measure."""

    name: ClassVar[str] = "mtcmkd"
    compact_student: ClassVar[bool] = True  # KD on logits only: any student width

    preset: Literal["default", "paper"] = "default"
    """KD scaling: "default" = voxel mean x T^2; "paper" = the authors' code (sum over
    voxels / batch x T, ~1e5 times larger at 128^3)."""
    kd_temperature: float | None = None
    """KD softening temperature T; ``None``: 20 (:attr:`effective_kd_temperature`)."""
    kd_total_weight: float = 0.15
    """P: the teacher weights alpha_i sum to it."""
    cdsfl_weight: float = 0.10
    """lambda_c: weight of the CDSFL fusion loss in the teachers' loss (0.08 in the authors'
    final code, 0.10 for the reported results)."""
    seg_weight: float = 0.75
    """Weight of the student's own segmentation loss once KD is on."""
    ds_weight: float = 0.10
    """Deep-supervision weight of the student's half-resolution head."""
    ds_seg_fraction: float = 0.7
    """Share of the DS weight for the DS segmentation term; the rest (0.3) goes to KD from the
    CDSFL fusion."""
    kd_start_epoch: int = 1
    """First epoch (0-based) with KD; before it the student trains on L_seg alone."""
    performance_metric: Literal["wt", "wt_tc"] = "wt"
    """Teacher performance: whole-tumour Dice, or (WT + TC) / 2 (what the authors used for the
    t1 student)."""
    performance_dice: Literal["patch3d", "slice2d"] = "patch3d"
    """How a teacher's Dice (its performance, hence its weight alpha) is measured.
    "patch3d": the 3D hard Dice of each training patch, patches empty in truth and prediction
    skipped (the BraTS reading). "slice2d": the authors' code, the mean over 2D slices with a
    slice empty in both scoring 1, which keeps every teacher near 1 and alpha nearly uniform
    (docs/METHODS.md section 3.2)."""

    @property
    def effective_kd_temperature(self) -> float:
        """``kd_temperature``, or MTCM-KD's 20 when ``None``."""
        return 20.0 if self.kd_temperature is None else self.kd_temperature

    def default_teacher_modalities(self, student: tuple[str, ...]) -> tuple[str, ...]:
        """One unimodal teacher per modality the student does not see, in
        :data:`TEACHER_ORDER`."""
        return tuple(m for m in TEACHER_ORDER if m not in student)

    def check_modalities(self, student: tuple[str, ...], teachers: tuple[str, ...], *,
                         offline: bool = False) -> None:
        # Offline, a teacher on the student's own modality is allowed: self-distillation from a
        # converged network of the same input, the control for "KD without privileged input".
        shared = [m for m in student if m in teachers]
        if shared and not offline:
            raise self._error(
                "teacher_modalities",
                f"mtcmkd teachers are cross-modal, the student's modality {shared[0]!r} must "
                f"not be a teacher (except for offline teachers, method.teachers_from)",
                teachers)

    def _validate(self) -> None:
        if self.kd_temperature is not None:
            self._require(self.kd_temperature > 0, "kd_temperature", "must be > 0")
        for name in ("kd_total_weight", "cdsfl_weight", "seg_weight", "ds_weight"):
            self._require(getattr(self, name) >= 0, name, "must be >= 0")
        self._require(0.0 <= self.ds_seg_fraction <= 1.0, "ds_seg_fraction", "must be in [0, 1]")
        self._require(self.kd_start_epoch >= 0, "kd_start_epoch", "must be >= 0")
