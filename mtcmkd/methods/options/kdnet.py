"""Options of KD-Net (one multimodal teacher, then the student, two stages in one run).

docs/METHODS.md section 2 has the facts behind the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mtcmkd.config_fields import ConfigError
from mtcmkd.methods.options.base import MethodOptions

if TYPE_CHECKING:  # types only, see MethodOptions.check_run
    from mtcmkd.config import RunConfig

__all__ = ["KDNetOptions"]


@dataclass(frozen=True, kw_only=True)
class KDNetOptions(MethodOptions):
    """KD-Net's loss L = lambda L_KD + (1 - lambda) L_GT + beta L_KL and its two stages. The
    multimodal teacher may (and by default does) see the student's modality, as published."""

    name: ClassVar[str] = "kdnet"

    kd_temperature: float | None = None
    """KD softening temperature T; ``None``: 5 (:attr:`effective_kd_temperature`)."""
    kdnet_lambda: float = 0.75
    """lambda: weight of the KD term; the ground-truth term gets 1 - lambda."""
    kdnet_beta: float = 10.0
    """beta: weight of the bottleneck KL term."""
    kdnet_teacher_epochs: int = 1
    """Stage-1 length: epochs [0, this) train the teacher, the rest the student."""

    @property
    def effective_kd_temperature(self) -> float:
        """``kd_temperature``, or KD-Net's 5 when ``None``."""
        return 5.0 if self.kd_temperature is None else self.kd_temperature

    def check_run(self, run: RunConfig) -> None:
        if run.model.output == "regions":
            raise ConfigError(
                "model.output: kdnet's losses are defined on softmax classes (the teacher's "
                "softmax soft targets); use 'softmax' with kdnet (got 'regions')"
            )
        # Offline (method.teachers_from) there is no stage 1: the teacher comes trained.
        if run.method.teachers_from is None and self.kdnet_teacher_epochs >= run.train.epochs:
            raise self._error(
                "kdnet_teacher_epochs",
                f"stage 1 must end before train.epochs ({run.train.epochs}) so the student "
                f"trains", self.kdnet_teacher_epochs)

    def _validate(self) -> None:
        if self.kd_temperature is not None:
            self._require(self.kd_temperature > 0, "kd_temperature", "must be > 0")
        self._require(self.kdnet_beta >= 0, "kdnet_beta", "must be >= 0")
        self._require(0.0 <= self.kdnet_lambda <= 1.0, "kdnet_lambda", "must be in [0, 1]")
        # Stage 2 distils from the stage-1 teacher: with no stage 1 it would be untrained.
        self._require(self.kdnet_teacher_epochs >= 1, "kdnet_teacher_epochs",
                      "kdnet needs >= 1 (stage 1 trains the teacher)")
