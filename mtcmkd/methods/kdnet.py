"""KD-Net (Hu et al. 2021): one multimodal teacher, one unimodal student, two stages in one run.

Facts from METHODS.md section 2. The teacher sees ``teacher_modalities`` (default all four,
the student's included) as input channels; the student sees its one modality. Both are built
from the one ``model`` section (``kind: kdnet`` for KD-Net's own U-Net), so their bottlenecks
have the same shape, which the KL term needs.

The paper trains the teacher to convergence, then the student; here both stages are epochs of
the same run, split at ``kdnet_teacher_epochs``:

- stage 1, ``epoch < kdnet_teacher_epochs``: the teacher trains with KD-Net's ground-truth loss
  ``L_GT(y, t) = (1 - Dice(y, softmax(t))) + BCE(y, softmax(t))`` (term ``teacher/gt``). The
  student only runs under ``no_grad`` (its logits are the step's ``prediction``): it gets no
  gradient, its loss is 0.
- stage 2, later epochs: the teacher is frozen (``requires_grad`` off, eval mode, forward under
  ``no_grad``) and the student trains with
  ``L = lambda L_KD + (1 - lambda) L_GT + beta L_KL`` (terms ``student/kd``, ``student/gt``,
  ``student/kl``): L_KD against the teacher's soft targets ``softmax(t / T)`` (T = 5, Dice)
  and its binary prediction (argmax one-hot, BCE),
  L_KL = KL(teacher || student) between the flattened, softmax-normalised bottlenecks.

The stage is a pure function of ``epoch``, so a resumed run needs no extra state. Because the
teacher's parameters stay in the optimiser (group "teachers"), :meth:`KDNet.frozen_groups`
tells the loop which group must not step (see :meth:`Method.frozen_groups`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtcmkd.config import RunConfig
from mtcmkd.losses import bottleneck_kl, kdnet_gt_loss, kdnet_kd_loss
from mtcmkd.methods.base import (
    OneTeacherMethod,
    dice_stats,
    take_channels,
    target_labels,
)
from mtcmkd.methods.options import KDNetOptions
from mtcmkd.methods.registry import register_method


@register_method
class KDNet(OneTeacherMethod):
    """Multimodal teacher + unimodal student. Groups: ``teachers``, ``student``."""

    Options = KDNetOptions
    options: KDNetOptions

    def __init__(self, cfg: RunConfig, channels: Sequence[str]) -> None:
        super().__init__(cfg, channels)
        self.temperature: float = self.options.effective_kd_temperature

    def in_stage_one(self, epoch: int) -> bool:
        """True while the teacher trains (epochs [0, kdnet_teacher_epochs)); never with an
        offline teacher (``method.teachers_from``: stage 1 happened in the source run)."""
        return not self.teachers_offline and epoch < self.options.kdnet_teacher_epochs

    def _set_teacher_frozen(self, frozen: bool) -> None:
        for p in self.teacher.parameters():
            p.requires_grad_(not frozen)
        # The loop calls method.train() every epoch; keep a frozen teacher in eval mode.
        self.teacher.train(self.training and not frozen)

    def compute_terms(
        self, batch: Mapping[str, Any], epoch: int
    ) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        m = self.options
        image, labels = self._unpack(batch)
        target = target_labels(labels, self.output)
        teacher_input = take_channels(image, self._teacher_index)
        student_input = self._student_input(image)
        terms: dict[str, Tensor] = {}
        if self.in_stage_one(epoch):
            self._set_teacher_frozen(False)
            teacher_logits = self.teacher(teacher_input)
            terms["teacher/gt"] = kdnet_gt_loss(teacher_logits, target)
            with torch.no_grad():
                logits = self.student(student_input)
        else:
            self._set_teacher_frozen(True)
            if self.teachers_offline:  # loaded frozen: in method.teacher_precision
                teacher = self.frozen_teacher_features(self.teacher, teacher_input,
                                                       ("logits", "bottleneck"))
            else:
                with torch.no_grad():
                    teacher = self.teacher.forward_features(teacher_input)
            teacher_logits = teacher["logits"]
            student = self.student.forward_features(student_input)
            logits = student["logits"]
            terms["student/kd"] = m.kdnet_lambda * kdnet_kd_loss(
                logits, teacher_logits, self.temperature
            )
            terms["student/gt"] = (1.0 - m.kdnet_lambda) * kdnet_gt_loss(logits, target)
            terms["student/kl"] = m.kdnet_beta * bottleneck_kl(
                student["bottleneck"], teacher["bottleneck"]
            )
        stats = dice_stats("teacher", teacher_logits, labels, self.output)
        stats.update(dice_stats("student", logits, labels, self.output))
        return terms, logits, stats

    def frozen_groups(self, epoch: int) -> frozenset[str]:
        return frozenset({"student"} if self.in_stage_one(epoch) else {"teachers"})

    def describe(self) -> dict[str, Any]:
        m = self.options
        k = 0 if self.cfg.method.teachers_from is not None else m.kdnet_teacher_epochs
        stage2 = f">= {k}"
        terms: list[tuple[str, float, str, str]] = [] if k == 0 else [
            ("teacher/gt", 1.0, f"< {k}", "stage 1: teacher Dice + BCE vs ground truth")]
        terms += [
            ("student/kd", m.kdnet_lambda, stage2,
             f"stage 2: Dice + BCE vs teacher softmax(t/T), T={self.temperature:g}"),
            ("student/gt", 1.0 - m.kdnet_lambda, stage2, "stage 2: Dice + BCE vs ground truth"),
            ("student/kl", m.kdnet_beta, stage2, "stage 2: KL(teacher || student) bottlenecks"),
        ]
        return self._describe(
            self._networks(),
            terms,
            {"kd_temperature": self.temperature, "teacher_epochs": k,
             "lambda": m.kdnet_lambda, "beta": m.kdnet_beta},
        )
