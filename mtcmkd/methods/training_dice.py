"""The training hard-Dice statistics of a method's networks, and their names.

Teacher / student performance statistics (:func:`dice_stats`) are per-patch whole-tumour (WT)
and tumour-core (TC) Dice of the hard prediction. A patch whose truth and prediction are both
empty for a region is skipped for that region (neither counted nor scored): per network and
region the stats hold the sum of Dice over the counted patches and their count, and the epoch
value is ``sum / count`` (1.0 when nothing was counted: every patch was empty and predicted
empty, a perfect score under the BraTS empty-case rule). :class:`DiceTally` names one such
(network, region) tally and is the only code that spells it as a stats or log.jsonl key.

The loop sums the stats over steps and ranks (:class:`mtcmkd.engine.state.LoopState`) and hands
them to ``Method.end_epoch``; MTCM-KD turns its teachers' tallies into the KD weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor

__all__ = [
    "TALLY_REGIONS",
    "DiceTally",
    "PerformanceDice",
    "dice_stats",
    "epoch_dice",
    "epoch_dice_logs",
    "hard_region_masks",
]


def hard_region_masks(logits: Tensor, output: str) -> tuple[Tensor, Tensor]:
    """Hard WT and TC masks ``(B, *spatial)`` (bool) of a prediction.

    Softmax: argmax class, WT = {1, 2, 3}, TC = {1, 3}. Regions: channel 0 (WT) and 1 (TC)
    with logit > 0 (probability > 0.5).
    """
    if output == "softmax":
        # max(dim).indices is argmax (the first maximum, NaN as the maximum) but ~10x faster on
        # a CPU for (B, C, D, H, W): argmax over a strided dim takes a slow path (~10 ms at
        # 2 x 4 x 32^3, a teacher's share of an offline step).
        pred = logits.max(dim=1).indices
        return pred != 0, (pred == 1) | (pred == 3)
    return logits[:, 0] > 0, logits[:, 1] > 0


def _true_region_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Truth WT = {1, 2, 3} and TC = {1, 3} from canonical labels (RC = 4 is in neither)."""
    wt = (labels >= 1) & (labels <= 3)
    tc = (labels == 1) | (labels == 3)
    return wt, tc


def _dice_sum_count(pred: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of per-sample hard Dice over the samples where pred or truth is non-empty, and the
    number of such samples (both float32 scalars; no host synchronisation)."""
    dims = tuple(range(1, pred.ndim))
    inter = (pred & truth).sum(dim=dims).float()
    total = pred.sum(dim=dims).float() + truth.sum(dim=dims).float()
    counted = total > 0
    dice = torch.where(counted, 2.0 * inter / total.clamp_min(1.0), torch.zeros_like(total))
    return dice.sum(), counted.float().sum()


def _slice_dice_sum_count(pred: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    """The MTCM-KD authors' performance Dice: per sample, the mean over the slices along the
    first spatial axis of the 2D hard Dice, a slice empty in both scoring 1; every sample is
    counted (an empty patch scores 1). Sum over samples and their count, as
    :func:`_dice_sum_count`."""
    dims = tuple(range(2, pred.ndim))  # (B, S, ...) -> per (sample, slice)
    inter = (pred & truth).sum(dim=dims).float()
    total = pred.sum(dim=dims).float() + truth.sum(dim=dims).float()
    per_slice = torch.where(total > 0, 2.0 * inter / total.clamp_min(1.0), torch.ones_like(total))
    return per_slice.mean(dim=1).sum(), torch.tensor(float(pred.shape[0]), device=pred.device)


PerformanceDice = Literal["patch3d", "slice2d"]
TallyRegion = Literal["wt", "tc"]
TallyPart = Literal["sum", "count"]
TALLY_REGIONS: tuple[TallyRegion, ...] = ("wt", "tc")
"""The regions of the training Dice statistics, in the order :func:`dice_stats` writes them."""

# Greedy network: the region and part are always the last "_"-separated fields, so a network
# name with "_" in it still decodes to itself.
_TALLY_KEY = re.compile(
    r"(?P<network>[^/]+)_(?P<region>wt|tc)_dice_(?P<part>sum|count)(?:/(?P<modality>[^/]+))?"
)


@dataclass(frozen=True)
class DiceTally:
    """One network's training hard-Dice tally for one region: the only code that spells it as
    the strings of a method's stats and of log.jsonl, and reads them back.

    A tally is two stats entries, the sum of per-patch Dice and the number of patches counted
    (:func:`dice_stats`); summed over steps and ranks, its epoch value is ``sum / count``
    (:func:`epoch_dice`).

    Attributes:
        network: the network's role, ``"teacher"`` or ``"student"`` (any name without "/").
        region: ``"wt"`` or ``"tc"``.
        modality: which of several networks of that role, by input modality (MTCM-KD's teacher
            per modality, e.g. ``"flair"``); ``""`` when the method has one of that role.

    The strings are in every checkpoint (``epoch_stats``, read back by a mid-epoch resume) and
    in log.jsonl, so they never change:

    - stats key ``<network>_<region>_dice_<sum|count>[/<modality>]``, e.g.
      ``student_wt_dice_sum``, ``teacher_tc_dice_count/flair`` (:meth:`key`, :meth:`parse`);
    - log key ``<network>_<region>_dice[/<modality>]``, e.g. ``teacher_wt_dice/flair``
      (:attr:`log_key`).

    Raises:
        ValueError: an empty ``network``, a "/" in ``network`` or ``modality`` (the key would
            read back as another tally), or a region other than "wt" and "tc".
    """

    network: str
    region: TallyRegion
    modality: str = ""

    def __post_init__(self) -> None:
        if not self.network or "/" in self.network or "/" in self.modality:
            raise ValueError(f"a Dice tally needs a network name and a modality without '/', "
                             f"got network={self.network!r}, modality={self.modality!r}")
        if self.region not in TALLY_REGIONS:
            raise ValueError(f"a Dice tally's region is one of {TALLY_REGIONS}, "
                             f"got {self.region!r}")

    @property
    def _suffix(self) -> str:
        return f"/{self.modality}" if self.modality else ""

    def key(self, part: TallyPart) -> str:
        """The stats key of the tally's ``part``: ``"sum"`` (of per-patch Dice) or ``"count"``
        (of patches counted)."""
        if part not in ("sum", "count"):
            raise ValueError(f"a Dice tally's part is 'sum' or 'count', got {part!r}")
        return f"{self.network}_{self.region}_dice_{part}{self._suffix}"

    @property
    def log_key(self) -> str:
        """The name of the tally's epoch value in ``Method.end_epoch``'s logs (log.jsonl)."""
        return f"{self.network}_{self.region}_dice{self._suffix}"

    @classmethod
    def parse(cls, key: str) -> tuple[DiceTally, TallyPart]:
        """The tally and part a stats key names: the inverse of :meth:`key`.

        Raises:
            ValueError: ``key`` is not the stats key of a tally.
        """
        match = _TALLY_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{key!r} is not a Dice tally key "
                             f"('<network>_<wt|tc>_dice_<sum|count>[/<modality>]')")
        region, part = cast(TallyRegion, match["region"]), cast(TallyPart, match["part"])
        return cls(match["network"], region, match["modality"] or ""), part


@torch.no_grad()
def dice_stats(network: str, logits: Tensor, labels: Tensor, output: str,
               dice: PerformanceDice = "patch3d", *, modality: str = "") -> dict[str, Tensor]:
    """Per-step WT and TC hard-Dice sums and counts of one network's prediction.

    Keys: ``DiceTally(network, region, modality).key("sum" | "count")`` for WT, then TC, e.g.
    ``student_wt_dice_sum`` or, with ``modality="flair"``, ``teacher_wt_dice_sum/flair``.
    See the module docstring for the empty-patch rule. ``dice="slice2d"`` gives the MTCM-KD
    authors' per-slice Dice instead (:func:`_slice_dice_sum_count`).
    """
    sum_count = _slice_dice_sum_count if dice == "slice2d" else _dice_sum_count
    pred_wt, pred_tc = hard_region_masks(logits.detach(), output)
    true_wt, true_tc = _true_region_masks(labels)
    stats: dict[str, Tensor] = {}
    for region, pred, truth in zip(TALLY_REGIONS, (pred_wt, pred_tc), (true_wt, true_tc),
                                   strict=True):
        tally = DiceTally(network, region, modality)
        stats[tally.key("sum")], stats[tally.key("count")] = sum_count(pred, truth)
    return stats


def epoch_dice(stats: Mapping[str, Tensor], tally: DiceTally) -> float:
    """Epoch mean hard Dice of ``tally`` from reduced :func:`dice_stats` sums: ``sum / count``,
    or 1.0 when no patch was counted (all empty and predicted empty). Missing keys count as no
    patch."""
    total = stats.get(tally.key("sum"))
    count = stats.get(tally.key("count"))
    if total is None or count is None or float(count) <= 0:
        return 1.0
    return float(total) / float(count)


def epoch_dice_logs(stats: Mapping[str, Tensor], network: str,
                    modality: str = "") -> dict[str, float]:
    """``{log_key: epoch_dice}`` of one network's WT and TC tallies, e.g.
    ``{"student_wt_dice": .., "student_tc_dice": ..}``: what ``end_epoch`` logs per network."""
    tallies = (DiceTally(network, region, modality) for region in TALLY_REGIONS)
    return {t.log_key: epoch_dice(stats, t) for t in tallies}
