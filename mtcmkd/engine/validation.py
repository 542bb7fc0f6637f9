"""Validation during training, best-model tracking and the plateau rule.

At the end of every `train.val_every`-th epoch the student is scored on the held-out fold
(BraTS Dice of WT, TC, ET on whole cropped volumes), its mean Dice selects `best_student.pt`,
and `1 - mean Dice` drives a ReduceLROnPlateau on the student's learning rate only, from
`train.plateau_start_epoch` (the MTCM-KD authors' schedule; docs/METHODS.md). Every number here
is the same on every rank (the Dice sums are all-reduced), so every rank takes the same
decisions. The state these rules keep (best so far, plateau counters, history) lives in
`LoopState`, so a resumed run decides as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from mtcmkd.brats import REGIONS
from mtcmkd.config import RunConfig, TrainConfig
from mtcmkd.data import open_store
from mtcmkd.engine.dist import DistInfo, all_reduce
from mtcmkd.engine.state import LoopState
from mtcmkd.inference import InferencePipeline
from mtcmkd.metrics import score_case

#: The regions whose mean Dice selects the best student, in log order: WT, TC, ET.
SELECTION_REGIONS: tuple[str, ...] = tuple(REGIONS)


@torch.no_grad()
def validate(method: Any, cfg: RunConfig, val_ids: list[str], dist: DistInfo) -> dict[str, float]:
    """Mean BraTS Dice (WT/TC/ET) of the student on the held-out cases, full volumes.

    The one inference pipeline (:class:`~mtcmkd.inference.InferencePipeline`) on the store's
    crops as they are (already cropped and z-scored: no crop, no normalisation), windows of the
    training patch, overlap 0.5, in the network's own dtype (bf16 weights under DeepSpeed's
    bf16 mode); model selection only: the reported metrics come from `mtcmkd evaluate` in
    native space. Cases are split over ranks and the sums all-reduced, so every rank gets the
    same numbers. With no case on any rank the means are 0.
    """
    t = cfg.train
    ids = val_ids if t.val_cases is None else val_ids[: t.val_cases]
    root = open_store(cfg.data.store)
    channels = list(root.attrs["channels"])
    student = method.student_network()
    was_training = student.training
    student.eval()
    idx = [channels.index(c) for c in method.student_channels()]
    param = next(student.parameters())
    pipeline = InferencePipeline(student, tuple(cfg.data.patch_size), cfg.model.n_classes,
                                 cfg.model.output, n_channels=len(idx), overlap=0.5,
                                 normalize=False, crop=False, input_dtype=param.dtype)
    sums = torch.zeros(3, dtype=torch.float64)
    for cid in ids[dist.rank::dist.world_size]:
        g = root["cases"][cid]
        image = torch.from_numpy(np.asarray(g["image"][idx], dtype=np.float32))[None]
        pred = pipeline(image.to(device=param.device))[0].cpu().numpy()
        scores = score_case(pred, np.asarray(g["label"][...]), tuple(g.attrs["spacing"]))
        sums += torch.tensor([scores["dice"][r] for r in SELECTION_REGIONS], dtype=torch.float64)
    count = torch.tensor([float(len(ids[dist.rank::dist.world_size]))], dtype=torch.float64)
    sums, count = all_reduce(sums), all_reduce(count)
    student.train(was_training)
    mean = (sums / count.clamp(min=1)).tolist()
    return dict(zip(SELECTION_REGIONS, mean, strict=True))


def mean_dice(val: dict[str, float]) -> float:
    """The selection metric: the mean of the WT, TC and ET Dice."""
    return float(np.mean([val[r] for r in SELECTION_REGIONS]))


def plateau_step(state: LoopState, val_loss: float, t: TrainConfig, optimizer: Any,
                 student_group: int | None, echo: Callable[[str], None]) -> None:
    """ReduceLROnPlateau on the student's group only, from `plateau_start_epoch` (the paper).

    An epoch counts as bad unless `val_loss` beats the best so far by more than 1e-8; after
    more than `plateau_patience` bad epochs in a row the student's learning rate is multiplied
    by `plateau_factor` and the count starts again. No student group: nothing to do.
    """
    if student_group is None or state.epoch < t.plateau_start_epoch:
        return
    if val_loss < state.plateau_best - 1e-8:
        state.plateau_best, state.plateau_bad_epochs = val_loss, 0
        return
    state.plateau_bad_epochs += 1
    if state.plateau_bad_epochs > t.plateau_patience:
        group = optimizer.param_groups[student_group]
        group["lr"] *= t.plateau_factor
        state.plateau_bad_epochs = 0
        echo(f"student learning rate -> {group['lr']:.3g}")


class BestSaver(Protocol):
    def save_best(self, state: LoopState, val: dict[str, float], mean_dice: float) -> None: ...


class Validator:
    """End-of-epoch validation with its two consequences: the best student and the plateau.

    Args:
        method: the method (its student is validated; `frozen_groups` pauses the plateau).
        cfg: the run config (`train.val_every`, `val_cases`, plateau settings).
        val_ids: the held-out fold's case ids; empty: never validates.
        dist: this rank (validation cases are split over ranks).
        optimizer: the optimiser whose `student` group the plateau rule lowers.
        saver: writes the best student (`Checkpointer.save_best`).
        echo: where a learning-rate change is announced.
    """

    def __init__(self, method: Any, cfg: RunConfig, val_ids: list[str], dist: DistInfo,
                 optimizer: Any, saver: BestSaver, echo: Callable[[str], None] = print) -> None:
        self.method, self.cfg, self.val_ids, self.dist = method, cfg, val_ids, dist
        self.optimizer, self.saver, self.echo = optimizer, saver, echo
        self.student_group = next((i for i, g in enumerate(optimizer.param_groups)
                                   if g.get("name") == "student"), None)

    def due(self, epoch: int) -> bool:
        every = self.cfg.train.val_every
        return bool(self.val_ids) and bool(every) and (epoch + 1) % every == 0

    def end_epoch(self, state: LoopState) -> dict[str, float] | None:
        """Validate if due: record the Dice in `state.val_history`, keep the best student,
        apply the plateau rule. Returns the Dice per region, or None when not due."""
        if not self.due(state.epoch):
            return None
        val = validate(self.method, self.cfg, self.val_ids, self.dist)
        state.val_history.append({"epoch": state.epoch, **val})
        mean = mean_dice(val)
        if mean > state.best_metric:
            state.best_metric, state.best_epoch = mean, state.epoch
            self.saver.save_best(state, val, mean)
        if "student" not in self.method.frozen_groups(state.epoch):
            # A frozen student (KD-Net's stage 1) neither improves nor stalls.
            plateau_step(state, 1.0 - mean, self.cfg.train, self.optimizer, self.student_group,
                         self.echo)
        return val
