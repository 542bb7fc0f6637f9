"""MTCM-KD: three unimodal teachers, CDSFL fusion and a unimodal student, trained online.

Facts from METHODS.md section 1; every network is built by ``build_network`` from the one
``model`` section. Per training step (y labels, y_half labels downsampled x2 by nearest, t_i the
teachers' logits, f the CDSFL fused logits at 1/2 resolution, s / s_ds the student's full and
1/2-resolution deep-supervision logits):

    teachers + CDSFL:  L_T = sum_i L_seg(y, t_i) + lambda_c * L_seg(y_half, f)
    student, epoch < kd_start_epoch:   L_S = L_seg(y, s)
    student, later:    L_S = 0.75 L_seg(y, s) + sum_i alpha_i KD_T(s, t_i)
                             + 0.10 * (0.7 L_seg(y_half, s_ds) + 0.3 KD_T(s_ds, f))

``t_i`` and ``f`` are detached in L_S, so the student's terms never reach a teacher or CDSFL;
the CDSFL term reaches all teachers through their 1/2-resolution features (the "cooperative"
part). The loop back-propagates L_T + L_S once; with Adam (per-parameter) and the two groups
"teachers" (teachers + CDSFL) and "student" this equals the authors' two optimisers.

Performance-aware weights: every step records each teacher's hard-prediction WT (and TC) Dice
sums (see :mod:`mtcmkd.methods.base`); ``end_epoch`` receives them summed over the epoch and
all ranks and sets ``alpha = teacher_weights(perf, P)`` with ``perf_i = WT_i`` or
``(WT_i + TC_i) / 2`` (``performance_metric: wt_tc``, the authors' choice for a t1 student),
each Dice the 3D Dice per patch (``performance_dice: patch3d``) or the authors' per-slice 2D
Dice with empty slices scored 1 (``slice2d``, the paper preset).
``alpha`` starts equal (P / n) and lives in a registered buffer, so it is in ``state_dict()``
and a resumed run continues with the weights it had.

Presets (the KD term KD_T, temperature T = 20 unless configured):

- ``default``: ``kd_kl(scaling="default")``, the KL averaged over voxels times T**2 (Hinton's
  scaling): the KD terms are of the order of the segmentation loss.
- ``paper``: ``kd_kl(scaling="paper")``, the authors' code: KL summed over voxels, divided by
  the batch size only, times T. For the same logits ``paper / default = V / T`` with V the
  voxels per sample (~1.05e5 at 128^3, T = 20), so KD dominates the student's loss by ~10^4,
  as in their logs. This preset exists to reproduce the published training, not as advice.

Region output (``model.output: regions``): L_seg is the region loss (Dice + BCE over WT, TC,
ET) and KD_T is :func:`mtcmkd.losses.region_kd_kl`, a per-region binary KL with the same
temperature and the same two scalings; CDSFL then fuses into 3 region logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtcmkd.config import RunConfig
from mtcmkd.losses import KDScaling, downsample_labels, kd_kl, region_kd_kl, teacher_weights
from mtcmkd.methods.base import (
    DiceTally,
    Method,
    dice_stats,
    epoch_dice,
    epoch_dice_logs,
    take_channels,
    target_labels,
)
from mtcmkd.methods.options import MTCMKDOptions
from mtcmkd.methods.registry import register_method
from mtcmkd.models import CDSFL


@register_method
class MTCMKD(Method):
    """Teachers (one per ``teacher_modalities`` entry) + CDSFL + student.

    Terms: ``teacher_<m>/seg`` (weight 1), ``cdsfl/seg`` (lambda_c), ``student/seg`` (1, then
    seg_weight), and from ``kd_start_epoch`` on ``student/kd_<m>`` (alpha_m),
    ``student/ds_seg`` (ds_weight * ds_seg_fraction), ``student/ds_kd``
    (ds_weight * (1 - ds_seg_fraction)). Groups: ``teachers`` (teachers and CDSFL), ``student``.
    Stats: WT/TC hard-Dice tallies per teacher (``DiceTally("teacher", region, <m>)``, keys
    ``teacher_wt_dice_sum/<m>`` ...) and the student's.
    """

    Options = MTCMKDOptions
    options: MTCMKDOptions

    def __init__(self, cfg: RunConfig, channels: Sequence[str]) -> None:
        super().__init__(cfg, channels)
        options = self.options
        self.teacher_modalities: tuple[str, ...] = cfg.method.effective_teacher_modalities
        self._teacher_index = {
            m: self._channel_index((m,), f"teacher {m!r}") for m in self.teacher_modalities
        }
        self.teachers = nn.ModuleDict({m: self._network(1) for m in self.teacher_modalities})
        self.cdsfl = CDSFL(
            n_teachers=len(self.teacher_modalities),
            channels=cfg.model.effective_widths[1],
            n_classes=self.n_classes,
        )
        self.student = self._student_network(1)
        n = len(self.teacher_modalities)
        # Teacher weights for the current epoch; equal until the first end_epoch.
        self.register_buffer("alpha", torch.full((n,), options.kd_total_weight / n))
        self.temperature: float = options.effective_kd_temperature
        self.scaling: KDScaling = options.preset

    def _kd(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        if self.output == "softmax":
            return kd_kl(student_logits, teacher_logits, self.temperature, scaling=self.scaling)
        return region_kd_kl(student_logits, teacher_logits, self.temperature,
                            scaling=self.scaling)

    def compute_terms(
        self, batch: Mapping[str, Any], epoch: int
    ) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        m = self.options
        image, labels = self._unpack(batch)
        target = target_labels(labels, self.output)
        target_half = downsample_labels(target, 2)
        terms: dict[str, Tensor] = {}

        # Teachers + CDSFL: L_T. Offline teachers (method.teachers_from) are frozen: forward
        # only (in method.teacher_precision), no loss; CDSFL trains on their features unless it
        # was loaded too.
        online = not self.teachers_offline
        teacher_logits: dict[str, Tensor] = {}
        features: list[Tensor] = []
        for mod, net in self.teachers.items():
            x = take_channels(image, self._teacher_index[mod])
            if online:
                out = net.forward_features(x)
            else:
                out = self.frozen_teacher_features(net, x, ("logits", "features_half"))
            teacher_logits[mod] = out["logits"]
            features.append(out["features_half"])
            if online:
                terms[f"teacher_{mod}/seg"] = self._seg(out["logits"], target)
        if "cdsfl" in self.offline:
            with torch.no_grad():
                fused = self.cdsfl(features)
        else:
            fused = self.cdsfl(features)
            terms["cdsfl/seg"] = m.cdsfl_weight * self._seg(fused, target_half)

        # Student: L_S, with every teacher-side tensor detached.
        student = self.student.forward_features(self._student_input(image))
        logits = student["logits"]
        if epoch < m.kd_start_epoch:
            terms["student/seg"] = self._seg(logits, target)
        else:
            terms["student/seg"] = m.seg_weight * self._seg(logits, target)
            for i, mod in enumerate(self.teacher_modalities):
                kd = self._kd(logits, teacher_logits[mod].detach())
                terms[f"student/kd_{mod}"] = self.alpha[i].float() * kd
            ds = student["ds_half"]
            terms["student/ds_seg"] = (m.ds_weight * m.ds_seg_fraction) * self._seg(
                ds, target_half
            )
            terms["student/ds_kd"] = (m.ds_weight * (1.0 - m.ds_seg_fraction)) * self._kd(
                ds, fused.detach()
            )

        stats: dict[str, Tensor] = {}
        for mod in self.teacher_modalities:
            stats.update(dice_stats("teacher", teacher_logits[mod], labels, self.output,
                                    self.options.performance_dice, modality=mod))
        stats.update(dice_stats("student", logits, labels, self.output))
        return terms, logits, stats

    def teacher_performance(self, epoch_stats: Mapping[str, Tensor]) -> Tensor:
        """``(n,)`` float32 performance per teacher from reduced stats (WT or (WT + TC) / 2)."""
        perf = []
        for mod in self.teacher_modalities:
            wt = epoch_dice(epoch_stats, DiceTally("teacher", "wt", mod))
            if self.options.performance_metric == "wt_tc":
                wt = (wt + epoch_dice(epoch_stats, DiceTally("teacher", "tc", mod))) / 2.0
            perf.append(wt)
        return torch.tensor(perf, dtype=torch.float32)

    def end_epoch(self, epoch_stats: Mapping[str, Tensor]) -> dict[str, float]:
        """Set alpha for the next epoch from this epoch's (rank-reduced) teacher Dice."""
        alpha = teacher_weights(self.teacher_performance(epoch_stats),
                                self.options.kd_total_weight)
        with torch.no_grad():
            self.alpha.copy_(alpha)
        logs = super().end_epoch(epoch_stats)
        for i, mod in enumerate(self.teacher_modalities):
            logs.update(epoch_dice_logs(epoch_stats, "teacher", mod))
            logs[f"alpha/{mod}"] = float(alpha[i])
        return logs

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "student": list(self.student.parameters()),
            "teachers": list(self.teachers.parameters()) + list(self.cdsfl.parameters()),
        }

    def teacher_networks(self) -> dict[str, tuple[nn.Module, tuple[str, ...] | None]]:
        networks: dict[str, tuple[nn.Module, tuple[str, ...] | None]] = {
            f"teachers.{mod}": (self.teachers[mod], (mod,)) for mod in self.teacher_modalities
        }
        networks["cdsfl"] = (self.cdsfl, None)
        return networks

    def describe(self) -> dict[str, Any]:
        m = self.options
        k = m.kd_start_epoch
        networks: dict[str, tuple[nn.Module, Sequence[str], str]] = {
            f"teacher_{mod}": (self.teachers[mod], (mod,), "teachers")
            for mod in self.teacher_modalities
        }
        networks["cdsfl"] = (self.cdsfl, self.teacher_modalities, "teachers")
        networks["student"] = (self.student, self.student_channels(), "student")
        kl = "KL" if self.output == "softmax" else "binary KL per region"
        kd_name = f"{kl}(T={self.temperature:g}, {self.scaling} scaling)"
        alpha = (
            [m.kd_total_weight / len(self.teacher_modalities)] * len(self.teacher_modalities)
            if self.alpha.is_meta
            else [float(a) for a in self.alpha]
        )
        terms: list[tuple[str, float, str, str]] = [
            (f"teacher_{mod}/seg", 1.0, "all", "teacher segmentation loss")
            for mod in self.teacher_modalities
        ]
        terms.append(("cdsfl/seg", m.cdsfl_weight, "all",
                      "fused 1/2-res logits vs y_half (reaches all teachers)"))
        if k > 0:
            terms.append(("student/seg", 1.0, f"< {k}", "student segmentation loss, no KD yet"))
        terms.append(("student/seg", m.seg_weight, f">= {k}", "student segmentation loss"))
        for i, mod in enumerate(self.teacher_modalities):
            terms.append((f"student/kd_{mod}", alpha[i], f">= {k}",
                          f"alpha_{mod} * {kd_name}; alpha = P*perf/sum(perf), "
                          f"P={m.kd_total_weight:g}, perf={m.performance_metric} "
                          f"({m.performance_dice} Dice), per epoch"))
        terms.append(("student/ds_seg", m.ds_weight * m.ds_seg_fraction, f">= {k}",
                      "student 1/2-res DS head vs y_half"))
        terms.append(("student/ds_kd", m.ds_weight * (1.0 - m.ds_seg_fraction), f">= {k}",
                      f"student DS head vs CDSFL fused logits, {kd_name}"))
        settings = {
            "preset": m.preset,
            "kd_temperature": self.temperature,
            "kd_scaling": self.scaling,
            "kd_start_epoch": k,
            "kd_total_weight": m.kd_total_weight,
            "performance_metric": m.performance_metric,
            "performance_dice": m.performance_dice,
            "teachers_from": self.cfg.method.teachers_from,
        }
        if self.cfg.method.teachers_from is not None:
            # Offline: the teachers (and CDSFL when the source has one) are frozen, no L_T.
            frozen = ("teacher_", "cdsfl/") if "cdsfl" in self.offline else ("teacher_",)
            terms = [t for t in terms if not t[0].startswith(frozen)]
        return self._describe(networks, terms, settings)
