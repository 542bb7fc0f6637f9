"""Baseline: the student network alone, trained on the ground truth.

One network on the student's modality (``t1ce`` by default) with the segmentation loss of the
output kind: L = L_seg(y, s), MTCM-KD's (soft Dice + soft Jaccard + CE) / 3 over 4 softmax
classes, or (Dice + BCE) / 2 over the WT/TC/ET regions. The reference every distillation
method must beat.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from mtcmkd.config import RunConfig
from mtcmkd.methods.base import Method, dice_stats, target_labels
from mtcmkd.methods.options import BaselineOptions
from mtcmkd.methods.registry import register_method


@register_method
class Baseline(Method):
    """The student alone. Terms: ``student/seg``. Groups: ``student``."""

    Options = BaselineOptions

    def __init__(self, cfg: RunConfig, channels: Sequence[str]) -> None:
        super().__init__(cfg, channels)
        self.student = self._student_network(len(cfg.method.student_modalities))

    def compute_terms(
        self, batch: Mapping[str, Any], epoch: int
    ) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        image, labels = self._unpack(batch)
        logits = self.student(self._student_input(image))
        terms = {"student/seg": self._seg(logits, target_labels(labels, self.output))}
        return terms, logits, dice_stats("student", logits, labels, self.output)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"student": list(self.student.parameters())}

    def describe(self) -> dict[str, Any]:
        return self._describe(
            {"student": (self.student, self.student_channels(), "student")},
            [("student/seg", 1.0, "all", "segmentation loss vs ground truth")],
            {},
        )
