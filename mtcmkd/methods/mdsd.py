"""Modality-dropout self-distillation (MDSD): one network on every modality distils its full pass
into its own modality-dropout pass, and is deployed on the student's modality alone.

The package's design in the family of the best published T1ce-only results (RFNet, mmFormer,
M3AE, DeMoSeg: one network trained with missing modalities, the full-modality path teaching the
missing-modality one), not a reproduction of any one paper; docs/METHODS.md section 3.5.

One network ``N`` (the configured ``model``) reads ``teacher_modalities`` (default all four) as
its input channels. Each step runs it twice on the same patch: the full pass ``f = N(x)`` and the
dropout pass ``d = N(m * x)``, where the mask ``m`` keeps the student's modalities always and
each other modality independently with probability ``mdsd_keep_prob`` (per patch). A dropped
modality is a channel of zeros, exactly what "absent" means in the store (z-scored, 0 outside
the brain). With ``y`` the labels, ``T`` the temperature and ``b`` the bottleneck:

    L = w_full L_seg(y, f) + w_drop L_seg(y, d)                     full/seg, dropout/seg
      + w_kd KD_T(d, sg(f)) + w_feat MSE(b_d, sg(b_f))               dropout/kd, dropout/feature

``sg`` is stop-gradient (detach): nothing of the dropout pass flows into the full pass's terms,
so the full pass is a teacher that learns only from the labels. KD_T is ``kd_kl`` with the
default scaling (``region_kd_kl`` for the region output).

Deployment (the folding argument). The image reaches the network only through the input
convolutions (the stem conv and the stem shortcut of the residual U-Net, the first conv of
KD-Net's U-Net). A convolution is a sum over input channels, and a channel of zeros adds
nothing (zero padding included), so on an input whose non-student channels are zero the
network equals the 1-channel-per-student-modality network whose input convolutions keep only
the student's slices ``w[:, student_positions]``; every other parameter is shared unchanged.
:meth:`MDSD.student_network` builds that network fresh from the current weights, so the student
file, validation and export see a plain student of the configured kind, with no change to the
student file format, the loaders or the export.

Randomness: the masks come from a generator seeded by (a base seed drawn at construction, after
the run seeded torch with ``seed + rank``; the count of masks drawn so far). The count is a
buffer, so it is in every checkpoint and a resumed run draws the masks it would have drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtcmkd.config import RunConfig
from mtcmkd.losses import kd_kl, region_kd_kl
from mtcmkd.methods.base import Method, dice_stats, epoch_dice_logs, take_channels, target_labels
from mtcmkd.methods.options.mdsd import MDSDOptions
from mtcmkd.methods.registry import register_method
from mtcmkd.models import count_parameters

__all__ = ["MDSD", "fold_input_channels", "modality_keep_mask"]


def modality_keep_mask(batch: int, n_channels: int, always: Sequence[int], keep_prob: float,
                       generator: torch.Generator | None = None) -> Tensor:
    """Which input channels the dropout pass keeps, per patch.

    Args:
        batch: patches in the batch.
        n_channels: the network's input channels.
        always: channel positions that are never dropped (the student's modalities).
        keep_prob: probability of keeping each other channel, drawn independently per patch and
            channel; 0 keeps only ``always``, 1 keeps everything.
        generator: CPU generator to draw from (``None``: torch's global generator).

    Returns:
        ``(batch, n_channels)`` bool on the CPU, True = kept.
    """
    keep = torch.rand((batch, n_channels), generator=generator, device="cpu") < keep_prob
    keep[:, list(always)] = True
    return keep


def fold_input_channels(source: Mapping[str, Tensor], target: Mapping[str, Tensor],
                        positions: Sequence[int]) -> dict[str, Tensor]:
    """The weights of a network with fewer input channels, taken from one with more.

    Every entry whose shape already fits ``target`` is copied; one that differs only in the
    input-channel axis (dim 1: the convolutions that read the image) is sliced to
    ``[:, positions]``. The entries to slice are found by comparing shapes with the target
    network, not by the channel count, so a width equal to the modality count is not sliced.

    Args:
        source: state dict of the trained network (e.g. 4 input channels).
        target: state dict (or meta-device state dict) of the same kind of network with
            ``len(positions)`` input channels: only its keys and shapes are read.
        positions: the source input channels to keep, in the target's channel order.

    Returns:
        New tensors (clones: training the source later does not change them).

    Raises:
        ValueError: the two networks differ in keys, or in a shape other than dim 1.
    """
    if source.keys() != target.keys():
        raise ValueError(f"cannot fold: the networks' parameters differ "
                         f"({sorted(set(source) ^ set(target))[:3]})")
    index = list(positions)
    folded: dict[str, Tensor] = {}
    for key, weight in source.items():
        want = tuple(target[key].shape)
        if tuple(weight.shape) == want:
            folded[key] = weight.detach().clone()
        elif (weight.ndim >= 2 and want[1] == len(index) and want[0] == weight.shape[0]
              and want[2:] == tuple(weight.shape[2:])):
            folded[key] = weight.detach()[:, index].clone()
        else:
            raise ValueError(f"cannot fold {key}: shape {tuple(weight.shape)} vs {want}")
    return folded


@register_method
class MDSD(Method):
    """One network, a full pass and a modality-dropout pass per step; the student is its fold.

    Terms: ``full/seg``, ``dropout/seg``, ``dropout/kd``, ``dropout/feature``. Groups:
    ``student`` (the one network). Stats: WT/TC hard-Dice tallies of the full pass (``full``)
    and of the dropout pass (``student``: the pass closest to the deployed student; the
    deployed student itself is what validation scores).
    """

    Options = MDSDOptions
    options: MDSDOptions

    def __init__(self, cfg: RunConfig, channels: Sequence[str]) -> None:
        super().__init__(cfg, channels)
        self.input_modalities: tuple[str, ...] = cfg.method.effective_teacher_modalities
        self._input_index = self._channel_index(self.input_modalities, "network")
        # Positions of the student's modalities among the network's inputs, in student order
        # (the folded network's channel order).
        self._student_positions = tuple(
            self.input_modalities.index(m) for m in cfg.method.student_modalities
        )
        self.student = self._network(len(self.input_modalities))
        self.temperature: float = self.options.effective_kd_temperature
        # Explicitly on the CPU: inspect builds the method under torch.device("meta").
        self._mask_seed = int(torch.randint(0, 2**62, (), device="cpu"))
        self.register_buffer("masks_drawn", torch.zeros((), dtype=torch.int64, device="cpu"))

    # -- the two passes

    def draw_keep_mask(self, batch: int) -> Tensor:
        """The next step's ``(batch, n_inputs)`` keep mask (CPU bool); advances the count."""
        drawn = int(self.masks_drawn)
        generator = torch.Generator().manual_seed((self._mask_seed + drawn) % 2**63)
        keep = modality_keep_mask(batch, len(self.input_modalities), self._student_positions,
                                  self.options.mdsd_keep_prob, generator)
        self.masks_drawn += 1
        return keep

    def _kd(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        if self.output == "softmax":
            return kd_kl(student_logits, teacher_logits, self.temperature)
        return region_kd_kl(student_logits, teacher_logits, self.temperature)

    def pass_terms(self, full: Mapping[str, Tensor], dropout: Mapping[str, Tensor],
                   target: Tensor) -> dict[str, Tensor]:
        """The weighted terms from the two passes' ``forward_features`` outputs; every
        full-pass tensor is detached in the distillation terms. Public so tests can check
        that nothing reaches the full pass."""
        m = self.options
        return {
            "full/seg": m.mdsd_full_seg_weight * self._seg(full["logits"], target),
            "dropout/seg": m.mdsd_dropout_seg_weight * self._seg(dropout["logits"], target),
            "dropout/kd": m.mdsd_kd_weight * self._kd(dropout["logits"],
                                                      full["logits"].detach()),
            "dropout/feature": m.mdsd_feature_weight * F.mse_loss(
                dropout["bottleneck"].float(), full["bottleneck"].detach().float()),
        }

    def compute_terms(
        self, batch: Mapping[str, Any], epoch: int
    ) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        image, labels = self._unpack(batch)
        target = target_labels(labels, self.output)
        x = take_channels(image, self._input_index)
        keep = self.draw_keep_mask(x.shape[0]).to(device=x.device, dtype=x.dtype)
        n = x.shape[0]
        # One forward over both passes: every norm of both network kinds is per sample
        # (instance / group norm), so this equals two forwards and runs as one larger batch.
        both = self.student.forward_features(torch.cat([x, x * keep[:, :, None, None, None]]))
        full = {k: v[:n] for k, v in both.items()}
        dropout = {k: v[n:] for k, v in both.items()}
        terms = self.pass_terms(full, dropout, target)
        stats = dice_stats("full", full["logits"], labels, self.output)
        stats.update(dice_stats("student", dropout["logits"], labels, self.output))
        return terms, dropout["logits"], stats

    # -- the interface

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"student": list(self.student.parameters())}

    def end_epoch(self, epoch_stats: Mapping[str, Tensor]) -> dict[str, float]:
        logs = super().end_epoch(epoch_stats)
        logs.update(epoch_dice_logs(epoch_stats, "full"))
        return logs

    def student_network(self) -> nn.Module:
        """The deployed student: a fresh network of the configured kind on the student's
        modalities, the trained weights with the input convolutions sliced to the student's
        channels (module docstring). It computes the network's student-only pass exactly, on
        the trained network's device and dtype, and shares no storage with it."""
        source = self.student
        # Built on the meta device: no allocation and no draw from the global generator (a
        # student saved mid-run must not shift the run's random stream).
        with torch.device("meta"):
            folded = self._network(len(self._student_positions))
        state = fold_input_channels(source.state_dict(), folded.state_dict(),
                                    self._student_positions)
        folded.load_state_dict(state, strict=True, assign=True)
        return folded.train(source.training)

    def describe(self) -> dict[str, Any]:
        m = self.options
        kd = "KL" if self.output == "softmax" else "binary KL per region"
        terms: list[tuple[str, float, str, str]] = [
            ("full/seg", m.mdsd_full_seg_weight, "all",
             f"segmentation loss of the full pass ({', '.join(self.input_modalities)})"),
            ("dropout/seg", m.mdsd_dropout_seg_weight, "all",
             f"segmentation loss of the dropout pass (keep each non-student modality with "
             f"p={m.mdsd_keep_prob:g})"),
            ("dropout/kd", m.mdsd_kd_weight, "all",
             f"{kd}(T={self.temperature:g}, default scaling) vs the detached full pass"),
            ("dropout/feature", m.mdsd_feature_weight, "all",
             "MSE of bottlenecks vs the detached full pass"),
        ]
        with torch.device("meta"):  # the deployed network's size; no allocation
            deployed = count_parameters(self._network(len(self._student_positions)))
        return self._describe(
            {"network": (self.student, self.input_modalities, "student")},
            terms,
            {"keep_prob": m.mdsd_keep_prob, "kd_temperature": self.temperature,
             "deployed_modalities": list(self.student_channels()),
             "deployed_params": deployed},
        )
