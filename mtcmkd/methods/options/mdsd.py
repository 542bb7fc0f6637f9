"""Options of modality-dropout self-distillation (one network on every modality, whose full pass
distils into its own modality-dropout pass; deployed on the student's modality alone).

docs/METHODS.md section 3.5 has the loss and the folding argument behind the deployment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mtcmkd.config_fields import ConfigError
from mtcmkd.methods.options.base import MethodOptions

if TYPE_CHECKING:  # types only, see MethodOptions.check_run
    from mtcmkd.config import RunConfig

__all__ = ["FOLDABLE_KINDS", "MDSDOptions"]

FOLDABLE_KINDS: tuple[str, ...] = ("resunet", "kdnet")
"""Network kinds whose image is read only by convolutions (nothing mixes the input channels
before them), so a dropped, all-zero channel can be folded away exactly. A new kind must be
checked (the folding test in tests/test_mdsd.py) before it joins."""


@dataclass(frozen=True, kw_only=True)
class MDSDOptions(MethodOptions):
    """MDSD's dropout rate, loss weights and KD temperature.

    ``teacher_modalities`` are the input channels of the one network (its full pass; default
    all four); they must include the student's modalities, which the dropout pass always keeps,
    and at least one more to drop.
    """

    name: ClassVar[str] = "mdsd"
    student_count: ClassVar[tuple[int, int]] = (1, 3)
    separate_teachers: ClassVar[bool] = False  # its teacher is its own full-modality pass

    mdsd_keep_prob: float = 0.25
    """Probability that the dropout pass keeps each non-student modality, drawn independently
    per patch and modality (a dropped one is all zeros). At 0.25 with three of them, the pass is
    student-only with probability 0.75^3 = 0.42. 0: always student-only; 1: no dropout."""
    mdsd_full_seg_weight: float = 1.0
    """Weight of the segmentation loss of the full pass (it trains the in-network teacher)."""
    mdsd_dropout_seg_weight: float = 1.0
    """Weight of the segmentation loss of the dropout pass."""
    kd_temperature: float | None = None
    """KD softening temperature T; ``None``: 4 (:attr:`effective_kd_temperature`)."""
    mdsd_kd_weight: float = 0.5
    """Weight of the logit KD from the (detached) full pass into the dropout pass:
    ``kd_kl`` at temperature T with the default scaling (voxel mean x T^2)."""
    mdsd_feature_weight: float = 0.1
    """Weight of the bottleneck feature distillation: the mean squared error between the
    dropout pass's bottleneck and the detached full pass's."""

    @property
    def effective_kd_temperature(self) -> float:
        """``kd_temperature``, or MDSD's 4 when ``None``."""
        return 4.0 if self.kd_temperature is None else self.kd_temperature

    def check_modalities(self, student: tuple[str, ...], teachers: tuple[str, ...], *,
                         offline: bool = False) -> None:
        unseen = [m for m in student if m not in teachers]
        if unseen:
            raise self._error(
                "teacher_modalities",
                f"mdsd's one network must see the student's modality {unseen[0]!r} (its "
                f"dropout pass always keeps it)", teachers)
        if len(teachers) == len(student):
            raise self._error(
                "teacher_modalities",
                "mdsd needs at least one modality besides the student's to drop", teachers)

    def check_run(self, run: RunConfig) -> None:
        if run.model.kind not in FOLDABLE_KINDS:
            raise ConfigError(
                f"model.kind: mdsd folds its network to the student's modality, which is "
                f"checked for {', '.join(FOLDABLE_KINDS)} only (got {run.model.kind!r})")

    def _validate(self) -> None:
        if self.kd_temperature is not None:
            self._require(self.kd_temperature > 0, "kd_temperature", "must be > 0")
        self._require(0.0 <= self.mdsd_keep_prob <= 1.0, "mdsd_keep_prob", "must be in [0, 1]")
        for name in ("mdsd_full_seg_weight", "mdsd_dropout_seg_weight", "mdsd_kd_weight",
                     "mdsd_feature_weight"):
            self._require(getattr(self, name) >= 0, name, "must be >= 0")
