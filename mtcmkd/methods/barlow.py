"""Single-stage KD with Barlow Twins (Choi et al., CMPB 2023), as far as the abstract states it.

Facts from METHODS.md section 3 (no public code; the details below are our documented choices).
A teacher path on ``teacher_modalities`` (default all four) and a student path on the student's
one or two modalities (the paper: flair + t1ce) are trained together in every step; no stage,
no frozen teacher. Per step, with y the labels and y_half their nearest x2 downsampling:

    L = L_seg(y, t) + L_seg(y, s)                                    teacher/seg, student/seg
      + ds_weight * (CE(y_half, t_ds) + CE(y_half, s_ds))             teacher/ds,  student/ds
      + barlow_weight * BT(z_t, z_s) / D                              barlow/latent

- L_seg: the segmentation loss of the output kind (MTCM-KD's (Dice + Jaccard + CE) / 3, or the
  region loss), on each path's full-resolution logits.
- Deep supervision "with cross-entropy on the backbones": plain softmax cross-entropy of each
  path's 1/2-resolution head (binary cross-entropy over WT/TC/ET for the region output),
  weighted by ``ds_weight`` (0.10).
- Latent transfer: ``z = bottleneck_embeddings(bottleneck, pool=barlow_pool)``: every (pooled)
  bottleneck voxel of every batch item is one sample, the D bottleneck channels are the
  embedding dimensions; teacher and student voxels of the same patch are paired. BT is the
  Barlow Twins loss with ``barlow_lambda_offdiag``. It is a sum over the D dimensions (up to
  ~D at initialisation: 256 with the default widths), so we divide by D: with
  ``barlow_weight = 1`` the term is a per-dimension mean, on the scale of the segmentation loss
  instead of dominating it ~256-fold.
- Neither path is detached in BT: in the single-stage method both learn from it (the teacher is
  also pulled towards representations the student can reach), which is how we read "trained
  simultaneously" with latent-level transfer.

Groups: ``teachers`` (the teacher path), ``student``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from mtcmkd.config import RunConfig
from mtcmkd.losses import (
    barlow_twins_loss,
    bottleneck_embeddings,
    cross_entropy,
    downsample_labels,
    region_targets,
)
from mtcmkd.methods.base import (
    OneTeacherMethod,
    dice_stats,
    take_channels,
    target_labels,
)
from mtcmkd.methods.options import BarlowOptions
from mtcmkd.methods.registry import register_method


@register_method
class BarlowKD(OneTeacherMethod):
    """Teacher path + student path, Barlow Twins on the bottlenecks, DS cross-entropy."""

    Options = BarlowOptions
    options: BarlowOptions

    def __init__(self, cfg: RunConfig, channels: Sequence[str]) -> None:
        super().__init__(cfg, channels)
        self.embedding_dim: int = cfg.model.effective_widths[-1]

    def _ds_loss(self, logits: Tensor, target_half: Tensor) -> Tensor:
        if self.output == "softmax":
            return cross_entropy(logits, target_half)
        return F.binary_cross_entropy_with_logits(logits.float(), region_targets(target_half))

    def compute_terms(
        self, batch: Mapping[str, Any], epoch: int
    ) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        m = self.options
        image, labels = self._unpack(batch)
        target = target_labels(labels, self.output)
        target_half = downsample_labels(target, 2)
        online = not self.teachers_offline  # offline: a frozen teacher, only the student learns
        teacher_input = take_channels(image, self._teacher_index)
        if online:
            teacher = self.teacher.forward_features(teacher_input)
        else:  # in method.teacher_precision; its logits only feed the teacher's Dice stats
            teacher = self.frozen_teacher_features(self.teacher, teacher_input,
                                                   ("logits", "bottleneck"))
        student = self.student.forward_features(self._student_input(image))
        z_teacher = bottleneck_embeddings(teacher["bottleneck"], m.barlow_pool)
        z_student = bottleneck_embeddings(student["bottleneck"], m.barlow_pool)
        barlow = barlow_twins_loss(z_teacher, z_student, lambda_offdiag=m.barlow_lambda_offdiag)
        terms: dict[str, Tensor] = {}
        if online:
            terms["teacher/seg"] = self._seg(teacher["logits"], target)
        terms["student/seg"] = self._seg(student["logits"], target)
        if online:
            terms["teacher/ds"] = m.ds_weight * self._ds_loss(teacher["ds_half"], target_half)
        terms["student/ds"] = m.ds_weight * self._ds_loss(student["ds_half"], target_half)
        terms["barlow/latent"] = (m.barlow_weight / self.embedding_dim) * barlow
        stats = dice_stats("teacher", teacher["logits"], labels, self.output)
        stats.update(dice_stats("student", student["logits"], labels, self.output))
        return terms, student["logits"], stats

    def describe(self) -> dict[str, Any]:
        m = self.options
        ds = "CE" if self.output == "softmax" else "BCE"
        terms: list[tuple[str, float, str, str]] = [
            ("teacher/seg", 1.0, "all", "teacher segmentation loss"),
            ("student/seg", 1.0, "all", "student segmentation loss"),
            ("teacher/ds", m.ds_weight, "all", f"teacher 1/2-res DS head {ds} vs y_half"),
            ("student/ds", m.ds_weight, "all", f"student 1/2-res DS head {ds} vs y_half"),
            ("barlow/latent", m.barlow_weight / self.embedding_dim, "all",
             f"Barlow Twins on bottlenecks / D (D={self.embedding_dim}), "
             f"lambda_offdiag={m.barlow_lambda_offdiag:g}, pool={m.barlow_pool}; both paths"),
        ]
        return self._describe(
            self._networks(),
            terms,
            {"barlow_weight": m.barlow_weight, "barlow_pool": m.barlow_pool,
             "embedding_dim": self.embedding_dim},
        )
