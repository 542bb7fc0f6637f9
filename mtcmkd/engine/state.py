"""`LoopState`: the loop's position and history, saved in every checkpoint for exact resume."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LoopState:
    """Everything besides weights, optimiser and RNG that an exact resume needs.

    `to_client` / `from_client` are the checkpoint's client-state format: the key names are part
    of every checkpoint written so far, so they never change (a new field needs a default in
    `from_client`).
    """

    epoch: int = 0
    micro_in_epoch: int = 0  # next micro-batch index within the epoch
    step: int = 0  # optimiser steps done
    # The method's stats summed so far this epoch, under the method's own keys (e.g.
    # `DiceTally.key`): checkpoints store them, so a mid-epoch resume needs the same spelling.
    epoch_stats: dict[str, torch.Tensor] = field(default_factory=dict)
    best_metric: float = -math.inf  # best validation mean Dice so far
    best_epoch: int = -1  # -1: never validated
    plateau_best: float = math.inf  # lowest 1 - mean Dice seen by the plateau rule
    plateau_bad_epochs: int = 0
    val_history: list[dict] = field(default_factory=list)

    def add_stats(self, stats: dict[str, torch.Tensor]) -> None:
        """Sum one micro-batch's method statistics into the epoch's (float64, on the host)."""
        for k, v in stats.items():
            self.epoch_stats[k] = self.epoch_stats.get(k, 0) + v.detach().double().cpu()

    def next_epoch(self) -> None:
        self.epoch += 1
        self.micro_in_epoch = 0
        self.epoch_stats = {}

    def to_client(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch, "step": self.step,
            "epoch_stats": {k: v.detach().cpu() for k, v in self.epoch_stats.items()},
            "best_metric": self.best_metric, "best_epoch": self.best_epoch,
            "plateau_best": self.plateau_best, "plateau_bad_epochs": self.plateau_bad_epochs,
            "val_history": json.dumps(self.val_history),
        }

    @classmethod
    def from_client(cls, d: dict[str, Any]) -> LoopState:
        return cls(epoch=int(d["epoch"]), micro_in_epoch=int(d["micro_in_epoch"]),
                   step=int(d["step"]), epoch_stats=dict(d["epoch_stats"]),
                   best_metric=float(d["best_metric"]), best_epoch=int(d["best_epoch"]),
                   plateau_best=float(d["plateau_best"]),
                   plateau_bad_epochs=int(d["plateau_bad_epochs"]),
                   val_history=json.loads(d["val_history"]))
