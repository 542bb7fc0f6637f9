"""The one interface every method implements, and the helpers the methods share.

A method owns its networks and turns a batch into named losses; the training loop only knows
:class:`Method`:

    out = method(batch, epoch)            # MethodOutput
    out.loss.backward(); optimiser.step()  # one optimiser, param groups from param_groups()
    epoch_stats += out.stats               # summed over steps, then all-reduced (sum) over ranks
    logs = method.end_epoch(epoch_stats)   # updates method state (MTCM-KD's teacher weights)

Gradient isolation between the groups of one method (e.g. "nothing flows from the student to a
teacher") is done by ``detach`` inside the method, so one backward of the summed loss trains
every group exactly as separate optimisers would (Adam is per-parameter).

Labels: canonical ``0..3`` plus ``4`` = RC (resection cavity, BraTS 2024 post-treatment). The
4-class softmax has no RC class, so RC is trained as background (label 0); the region output
(WT, TC, ET) already excludes RC (:func:`mtcmkd.losses.region_targets`).

Teacher / student performance statistics (``MethodOutput.stats``) are the training hard-Dice
tallies of :mod:`mtcmkd.methods.training_dice` (:func:`dice_stats`, :class:`DiceTally`),
re-exported here.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtcmkd.config import RunConfig
from mtcmkd.losses import region_segmentation_loss, segmentation_loss
from mtcmkd.methods.options import MethodOptions
from mtcmkd.methods.training_dice import (
    TALLY_REGIONS,
    DiceTally,
    dice_stats,
    epoch_dice,
    epoch_dice_logs,
    hard_region_masks,
)
from mtcmkd.models import build_network, count_parameters

__all__ = [
    "TALLY_REGIONS",
    "DiceTally",
    "Method",
    "MethodOutput",
    "OneTeacherMethod",
    "dice_stats",
    "epoch_dice",
    "epoch_dice_logs",
    "hard_region_masks",
    "seg_loss",
    "take_channels",
    "target_labels",
]

RC_LABEL = 4
"""Canonical label of the resection cavity (no class of its own in the 4-class softmax)."""


@dataclass
class MethodOutput:
    """What one training step of a method returns to the loop.

    Attributes:
        loss: float32 scalar to ``backward()``: the sum of every group's weighted terms.
        terms: the weighted terms that make up ``loss`` (detached, float32 scalars), named
            ``"<network>/<term>"``, e.g. ``"teacher_flair/seg"``, ``"cdsfl/seg"``,
            ``"student/kd_flair"``; ``loss == sum(terms.values())``. The set of names may
            change with the epoch (KD terms appear from ``kd_start_epoch``).
        prediction: the student's full-resolution logits ``(B, n_classes, *patch)`` (detached),
            for training metrics; ``n_classes`` is 4 (softmax) or 3 (regions WT, TC, ET).
        stats: per-step sums (detached, float32 scalars) for the loop to sum over steps and
            all-reduce (sum) over ranks before :meth:`Method.end_epoch`. The keys are the same
            in every step, epoch and rank of a method, so the reduction never mismatches.
    """

    loss: Tensor
    terms: dict[str, Tensor]
    prediction: Tensor
    stats: dict[str, Tensor]


# ------------------------------------------------------------------------- shared helpers


def target_labels(labels: Tensor, output: str) -> Tensor:
    """Labels for the losses: RC (4) as background for the 4-class softmax, unchanged for the
    region output (whose region masks ignore RC)."""
    if output == "softmax":
        return labels.masked_fill(labels == RC_LABEL, 0)
    return labels


def seg_loss(logits: Tensor, target: Tensor, output: str) -> Tensor:
    """The segmentation loss of the output kind: MTCM-KD's (Dice + Jaccard + CE) / 3 over the 4
    softmax classes, or (Dice + BCE) / 2 over the 3 nested regions."""
    if output == "softmax":
        return segmentation_loss(logits, target)
    return region_segmentation_loss(logits, target)


def take_channels(image: Tensor, index: tuple[int, ...]) -> Tensor:
    """``image[:, index]``: a view when the channels are consecutive (the usual case), else a
    gather."""
    first = index[0]
    if index == tuple(range(first, first + len(index))):
        return image[:, first : first + len(index)]
    return image.index_select(1, torch.tensor(index, device=image.device))


# ------------------------------------------------------------------------------- interface


class Method(nn.Module, abc.ABC):
    """Base class: a method owns its networks and turns a batch into losses.

    Args:
        cfg: the validated run config (``cfg.method.name`` selects the subclass).
        channels: the store's channel names in image-channel order (e.g.
            ``["t1", "t1ce", "t2", "flair"]``); inputs are picked by name.

    Raises:
        ValueError: a modality the method needs is not among ``channels``.
    """

    Options: ClassVar[type[MethodOptions]]
    """The method's options class (a subclass sets it; :func:`register_method` registers both
    under ``Options.name``)."""
    name: ClassVar[str]
    """The method's name, ``Options.name`` (set by :func:`register_method`)."""
    options: MethodOptions
    """``cfg.method.options``; a subclass narrows the annotation to its own options class."""
    student: nn.Module  # every method has one; set by the subclass

    def __init__(self, cfg: RunConfig, channels: Sequence[str]) -> None:
        super().__init__()
        if cfg.method.name != self.name:
            raise ValueError(f"{type(self).__name__} needs method.name={self.name!r}, "
                             f"got {cfg.method.name!r}")
        self.cfg = cfg
        self.options = cfg.method.options
        self.channels: tuple[str, ...] = tuple(channels)
        self.output: str = cfg.model.output
        self.n_classes: int = cfg.model.n_classes
        self._student_index = self._channel_index(cfg.method.student_modalities, "student")
        self._offline: frozenset[str] = frozenset()
        self.teacher_precision: str = cfg.method.teacher_precision

    # -- offline teachers (method.teachers_from)

    def teacher_networks(self) -> dict[str, tuple[nn.Module, tuple[str, ...] | None]]:
        """The networks ``method.teachers_from`` can load, by their name in ``state_dict()``
        (``"teachers.flair"``, ``"cdsfl"``, ``"teacher"``): module and the modalities it sees,
        ``None`` for a fusion module (which keeps training when the source has none to give).
        The base has none."""
        return {}

    @property
    def offline(self) -> frozenset[str]:
        """Names of the :meth:`teacher_networks` loaded frozen from another run."""
        return self._offline

    @property
    def teachers_offline(self) -> bool:
        """True when the teachers (every named network with modalities) are loaded frozen:
        the method then skips their losses and runs them under ``no_grad``."""
        named = [n for n, (_, mods) in self.teacher_networks().items() if mods is not None]
        return bool(named) and all(n in self._offline for n in named)

    def freeze_offline(self, names: set[str] | frozenset[str]) -> None:
        """Freeze the named teacher networks (weights loaded by the engine): no gradient, eval
        mode from now on (kept by :meth:`train`), out of every optimiser group."""
        networks = self.teacher_networks()
        unknown = sorted(set(names) - set(networks))
        if unknown:
            raise ValueError(f"not a teacher network of {self.name}: {unknown[0]!r}")
        for name in names:
            module = networks[name][0]
            module.requires_grad_(False)
            module.eval()
        self._offline = frozenset(names)

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        if self._offline:
            networks = self.teacher_networks()
            for name in self._offline:
                networks[name][0].eval()
        return self

    def frozen_teacher_features(self, network: nn.Module, x: Tensor,
                                keys: Sequence[str]) -> dict[str, Tensor]:
        """``network.forward_features(x)`` of a frozen offline teacher, without autograd: the
        entries ``keys`` only.

        ``method.teacher_precision: fp32`` runs exactly the float32 forward. ``bf16`` runs it
        under bfloat16 autocast with the input and the 5D weights in channels-last-3d memory
        (oneDNN's fast bf16 kernels need both; the weights are converted on the first call,
        values unchanged) and hands back contiguous float32 tensors, so every loss downstream
        computes as with fp32 teachers, on teacher outputs within bf16 rounding of them.
        """
        with torch.no_grad():
            if self.teacher_precision != "bf16":
                out = network.forward_features(x)
                return {k: out[k] for k in keys}
            _to_channels_last(network)
            x = x.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
                out = network.forward_features(x)
            return {k: out[k].to(torch.float32, memory_format=torch.contiguous_format)
                    for k in keys}

    # -- construction helpers

    def _channel_index(self, modalities: Sequence[str], who: str) -> tuple[int, ...]:
        missing = [m for m in modalities if m not in self.channels]
        if missing:
            raise ValueError(
                f"the {who} needs modality {missing[0]!r} but the store's channels are "
                f"{list(self.channels)}"
            )
        return tuple(self.channels.index(m) for m in modalities)

    def _network(self, in_channels: int) -> nn.Module:
        model = self.cfg.model
        return build_network(model.kind, in_channels, model.n_classes, model.effective_widths)

    def _student_network(self, in_channels: int) -> nn.Module:
        """The student: ``model.student_widths`` when set (a compact student), else as
        :meth:`_network`."""
        model = self.cfg.model
        return build_network(model.kind, in_channels, model.n_classes,
                             model.effective_student_widths)

    # -- step helpers

    def _unpack(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """(image, labels) after checking shapes against the store channels."""
        image, labels = batch["image"], batch["label"]
        if image.ndim != 5 or image.shape[1] != len(self.channels):
            raise ValueError(
                f"batch['image'] must be (B, {len(self.channels)}, D, H, W) for channels "
                f"{list(self.channels)}, got {tuple(image.shape)}"
            )
        if tuple(labels.shape) != (image.shape[0], *image.shape[2:]):
            raise ValueError(
                f"batch['label'] must be (B, D, H, W) = {(image.shape[0], *image.shape[2:])}, "
                f"got {tuple(labels.shape)}"
            )
        return image, labels

    def _student_input(self, image: Tensor) -> Tensor:
        return take_channels(image, self._student_index)

    def _seg(self, logits: Tensor, target: Tensor) -> Tensor:
        return seg_loss(logits, target, self.output)

    # -- the interface

    def forward(self, batch: Mapping[str, Any], epoch: int) -> MethodOutput:
        """One training step's losses for ``batch`` (``image`` (B, C, D, H, W) float,
        ``label`` (B, D, H, W) int64) at 0-based ``epoch``."""
        terms, prediction, stats = self.compute_terms(batch, epoch)
        loss = torch.stack(list(terms.values())).sum()
        return MethodOutput(
            loss=loss,
            terms={k: v.detach() for k, v in terms.items()},
            prediction=prediction.detach(),
            stats=stats,
        )

    @abc.abstractmethod
    def compute_terms(
        self, batch: Mapping[str, Any], epoch: int
    ) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        """(weighted terms, *not* detached; student logits; stats): what ``forward`` sums and
        packs. Public so tests can back-propagate one group's terms alone."""

    @abc.abstractmethod
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per optimiser group; every parameter in exactly one group. The group
        "student" holds the student network (the only one ReduceLROnPlateau acts on)."""

    def frozen_groups(self, epoch: int) -> frozenset[str]:
        """Groups that get no gradient in ``epoch`` (an addition to the interface).

        The loop should skip them in the optimiser step (e.g. learning rate 0): DeepSpeed
        fills missing gradients with zeros, and Adam's momentum (or weight decay) would then
        still move a frozen network.
        """
        del epoch
        return frozenset()

    def end_epoch(self, epoch_stats: Mapping[str, Tensor]) -> dict[str, float]:
        """Update method state from the epoch's reduced stats; return values to log.

        The base version logs the student's training WT/TC Dice and changes nothing.
        """
        return epoch_dice_logs(epoch_stats, "student")

    def student_network(self) -> nn.Module:
        """The network used at inference and exported (``forward(x) -> logits``)."""
        return self.student

    def student_channels(self) -> tuple[str, ...]:
        """Modalities of the student network's input channels, in order."""
        return self.cfg.method.student_modalities

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary for ``mtcmkd inspect``: networks (parameters, modalities,
        optimiser group), loss terms with weights and epochs, method settings."""

    def _describe(
        self,
        networks: dict[str, tuple[nn.Module, Sequence[str], str]],
        terms: list[tuple[str, float, str, str]],
        settings: dict[str, Any],
    ) -> dict[str, Any]:
        return {
            "method": self.name,
            "output": self.output,
            "n_classes": self.n_classes,
            "networks": {
                name: {"params": count_parameters(module), "modalities": list(mods),
                       "group": group}
                for name, (module, mods, group) in networks.items()
            },
            "loss_terms": [
                {"term": t, "weight": float(w), "epochs": e, "note": n} for t, w, e, n in terms
            ],
            "settings": settings,
        }


def _to_channels_last(network: nn.Module) -> None:
    """5D weights of ``network`` to channels-last-3d memory, once (a no-op when they are).

    Done at the first bf16 teacher forward rather than when the teachers are frozen, so the
    engine set-up (DeepSpeed's broadcast of the module) sees plain contiguous tensors."""
    if any(p.dim() == 5 and not p.is_contiguous(memory_format=torch.channels_last_3d)
           for p in network.parameters()):
        network.to(memory_format=torch.channels_last_3d)


class OneTeacherMethod(Method):
    """A method with one teacher network on ``teacher_modalities`` and one student (KD-Net,
    Barlow Twins): the two networks, their optimiser groups (``student``, ``teachers``), the
    teacher's logged training Dice and the networks part of ``describe``."""

    def __init__(self, cfg: RunConfig, channels: Sequence[str]) -> None:
        super().__init__(cfg, channels)
        self.teacher_modalities: tuple[str, ...] = cfg.method.effective_teacher_modalities
        self._teacher_index = self._channel_index(self.teacher_modalities, "teacher")
        self.teacher = self._network(len(self.teacher_modalities))
        self.student = self._network(len(cfg.method.student_modalities))

    def end_epoch(self, epoch_stats: Mapping[str, Tensor]) -> dict[str, float]:
        logs = super().end_epoch(epoch_stats)
        logs.update(epoch_dice_logs(epoch_stats, "teacher"))
        return logs

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "student": list(self.student.parameters()),
            "teachers": list(self.teacher.parameters()),
        }

    def teacher_networks(self) -> dict[str, tuple[nn.Module, tuple[str, ...] | None]]:
        return {"teacher": (self.teacher, self.teacher_modalities)}

    def _networks(self) -> dict[str, tuple[nn.Module, Sequence[str], str]]:
        """The ``networks`` argument of :meth:`Method._describe`."""
        return {
            "teacher": (self.teacher, self.teacher_modalities, "teachers"),
            "student": (self.student, self.student_channels(), "student"),
        }
