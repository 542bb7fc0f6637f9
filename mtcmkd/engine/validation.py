"""Validation during training, best-model tracking and the plateau rule.

Two kinds of validation score the student on the held-out fold (`train.validation`):

- "patch" (the default): nnU-Net's pseudo Dice. A fixed set of `train.val_patches` patches is
  drawn once from the validation cases (the training sampler's foreground bias, no
  augmentation, fixed by the seed: the same patches every epoch and after a resume), the
  student predicts each patch, and the WT/TC/ET Dice is computed over the pooled voxels of all
  patches. Seconds per epoch; an estimate, comparable only with itself.
- "full": BraTS Dice of WT, TC, ET on whole cropped volumes through the one inference
  pipeline (sliding window at `train.val_overlap`), the mean over cases. Minutes on real cases.

The kind chosen for the epochs (every `train.val_every`-th; with `val_every: 0` the full kind)
selects `best_student.pt` by its mean Dice, and `1 - mean Dice` drives a ReduceLROnPlateau on
the student's learning rate only, from `train.plateau_start_epoch` (the MTCM-KD authors'
schedule; docs/METHODS.md). A patch estimate and a full Dice are never compared: the kind the
best was chosen on is the kind of the last selecting entry of `LoopState.val_history`, and a
validation of another kind (a run resumed after the default changed) starts the best and the
plateau counters again. With patch validation, a full pass also runs every
`train.val_full_every` epochs (reported only) and, at the end of training, on the best
student's weights, so that `best_student.pt`, `best.json` and the run's summary carry a real
Dice (the estimate that chose it stays in `best.json`).

Every number here is the same on every rank (sums are all-reduced), so every rank takes the
same decisions; the state these rules keep lives in `LoopState`, so a resumed run decides as an
uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from mtcmkd.brats import REGIONS
from mtcmkd.config import RunConfig, TrainConfig
from mtcmkd.data import open_store
from mtcmkd.data.patches import PatchDataset
from mtcmkd.engine.dist import DistInfo, all_reduce
from mtcmkd.engine.state import LoopState
from mtcmkd.inference import InferencePipeline
from mtcmkd.inference.labels import probabilities_to_labels
from mtcmkd.metrics import score_case

#: The regions whose mean Dice selects the best student, in log order: WT, TC, ET.
SELECTION_REGIONS: tuple[str, ...] = tuple(REGIONS)
#: The kinds of validation (`train.validation`).
VALIDATION_KINDS: tuple[str, ...] = ("patch", "full")
#: The epoch number the validation patches are drawn with (`PatchDataset` draws item i of epoch
#: e from (seed, rank, e, i)): no run trains this many epochs, so the validation draws never
#: repeat a training patch's random numbers.
VALIDATION_PATCH_EPOCH = 2**31 - 1


def validation_ids(cfg: RunConfig, val_ids: list[str]) -> list[str]:
    """The validation cases a run scores: the first `train.val_cases` (all when None)."""
    n = cfg.train.val_cases
    return list(val_ids) if n is None else list(val_ids)[:n]


@torch.no_grad()
def validate(method: Any, cfg: RunConfig, val_ids: list[str], dist: DistInfo,
             progress: Callable[[str], None] | None = None,
             network: nn.Module | None = None) -> dict[str, float]:
    """Mean BraTS Dice (WT/TC/ET) of the student on the held-out cases, full volumes.

    The one inference pipeline (:class:`~mtcmkd.inference.InferencePipeline`) on the store's
    crops as they are (already cropped and z-scored: no crop, no normalisation), windows of the
    training patch, overlap `train.val_overlap`, in the network's own dtype (bf16 weights under
    DeepSpeed's bf16 mode); model selection only: the reported metrics come from
    `mtcmkd evaluate` in native space. Cases are split over ranks and the sums all-reduced, so
    every rank gets the same numbers. With no case on any rank the means are 0.

    Args:
        progress: called with one line per case this rank scored (its time).
        network: the weights to score (the best student's, loaded); default the method's
            student. Its input channels are the method's `student_channels()`.
    """
    ids = validation_ids(cfg, val_ids)
    root = open_store(cfg.data.store)
    channels = list(root.attrs["channels"])
    student = method.student_network() if network is None else network
    was_training = student.training
    student.eval()
    idx = [channels.index(c) for c in method.student_channels()]
    param = next(student.parameters())
    pipeline = InferencePipeline(student, tuple(cfg.data.patch_size), cfg.model.n_classes,
                                 cfg.model.output, n_channels=len(idx),
                                 overlap=cfg.train.val_overlap, normalize=False, crop=False,
                                 input_dtype=param.dtype)
    sums = torch.zeros(3, dtype=torch.float64)
    mine = ids[dist.rank::dist.world_size]
    where = f" on rank {dist.rank}" if dist.world_size > 1 else ""
    for i, cid in enumerate(mine, 1):
        start = time.perf_counter()
        g = root["cases"][cid]
        image = torch.from_numpy(np.asarray(g["image"][idx], dtype=np.float32))[None]
        pred = pipeline(image.to(device=param.device))[0].cpu().numpy()
        scores = score_case(pred, np.asarray(g["label"][...]), tuple(g.attrs["spacing"]))
        sums += torch.tensor([scores["dice"][r] for r in SELECTION_REGIONS], dtype=torch.float64)
        if progress is not None:
            progress(f"  full validation: case {i}/{len(mine)}{where} {cid} "
                     f"{time.perf_counter() - start:.1f} s")
    count = torch.tensor([float(len(mine))], dtype=torch.float64)
    sums, count = all_reduce(sums), all_reduce(count)
    student.train(was_training)
    mean = (sums / count.clamp(min=1)).tolist()
    return dict(zip(SELECTION_REGIONS, mean, strict=True))


# ---- patch validation (nnU-Net's pseudo Dice) ---------------------------------------------


@dataclass
class ValidationPatches:
    """This rank's share of the fixed validation patches, in the store's float16 / uint8.

    `images` (n, C, *patch) holds the student's channels only; `labels` (n, *patch) canonical
    labels; `total` is the number of patches over all ranks.
    """

    images: torch.Tensor
    labels: torch.Tensor
    total: int


def draw_validation_patches(cfg: RunConfig, val_ids: list[str], channels: tuple[str, ...],
                            rank: int = 0, world_size: int = 1) -> ValidationPatches:
    """The `train.val_patches` validation patches, items `rank::world_size` of them.

    Drawn as the training sampler draws (`PatchDataset`: a case uniformly, then with
    probability `data.fg_fraction` centred on a tumour region), without augmentation, from the
    seed and :data:`VALIDATION_PATCH_EPOCH`: the same patches in every epoch, after a resume
    and for any number of ranks (only the split of the list changes).
    """
    t = cfg.train
    dataset = PatchDataset(cfg.data.store, validation_ids(cfg, val_ids),
                           patch_size=cfg.data.patch_size, samples_per_epoch=t.val_patches,
                           fg_fraction=cfg.data.fg_fraction, seed=t.seed, augment=False,
                           defer_to_device=True)  # float16 / uint8: half the memory held
    dataset.set_epoch(VALIDATION_PATCH_EPOCH)
    idx = [dataset.channels.index(c) for c in channels]
    items = [dataset[i] for i in range(rank, t.val_patches, world_size)]
    patch = tuple(cfg.data.patch_size)
    if not items:
        return ValidationPatches(torch.zeros((0, len(idx), *patch), dtype=torch.float16),
                                 torch.zeros((0, *patch), dtype=torch.uint8), t.val_patches)
    return ValidationPatches(torch.stack([it["image"][idx] for it in items]),
                             torch.stack([it["label"] for it in items]), t.val_patches)


def region_counts(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """True positives, false positives and false negatives of WT, TC, ET: (3 regions, 3) float64.

    Args:
        pred, truth: canonical label volumes of the same shape (any number of patches).
    """
    rows = []
    for values in REGIONS.values():
        allowed = torch.tensor(values, device=pred.device)
        p, t = torch.isin(pred, allowed), torch.isin(truth, allowed)
        rows.append(torch.stack([(p & t).sum(), (p & ~t).sum(), (~p & t).sum()]))
    return torch.stack(rows).double().cpu()


def pseudo_dice(counts: torch.Tensor) -> dict[str, float]:
    """Dice per region from pooled counts (:func:`region_counts`): 2 TP / (2 TP + FP + FN);
    a region absent from both the truth and the prediction of every patch scores 1 (the BraTS
    empty-case rule; nnU-Net leaves it out)."""
    out = {}
    for name, (tp, fp, fn) in zip(SELECTION_REGIONS, counts.tolist(), strict=True):
        denominator = 2 * tp + fp + fn
        out[name] = 1.0 if denominator == 0 else 2 * tp / denominator
    return out


@torch.no_grad()
def validate_patches(network: nn.Module, patches: ValidationPatches, cfg: RunConfig,
                     batch_size: int = 1) -> dict[str, float]:
    """Pseudo Dice (WT/TC/ET) of `network` over all ranks' validation patches.

    Each patch is predicted alone in eval mode (no blending), in the network's dtype, labels as
    the inference pipeline makes them (`probabilities_to_labels`); the counts of all patches of
    all ranks are summed (all-reduced) before the Dice is taken.
    """
    was_training = network.training
    network.eval()
    param = next(network.parameters())
    counts = torch.zeros(3, 3, dtype=torch.float64)
    for first in range(0, patches.images.shape[0], batch_size):
        # float16 -> float32 -> the network's dtype, as training batches are cast (finish_batch)
        x = patches.images[first:first + batch_size].to(param.device).float().to(param.dtype)
        logits = network(x).float()
        probs = torch.sigmoid(logits) if cfg.model.output == "regions" else logits.softmax(1)
        pred = torch.stack([probabilities_to_labels(p, cfg.model.output) for p in probs])
        counts += region_counts(pred, patches.labels[first:first + batch_size].to(pred.device))
    network.train(was_training)
    return pseudo_dice(all_reduce(counts))


# ---- results, selection, plateau -----------------------------------------------------------


@dataclass
class ValidationResult:
    """One validation: its kind, Dice per region, wall time, and what it scored.

    `count` is patches ("patch") or cases ("full") over all ranks; `weights_epoch` the epoch
    whose weights were scored (the best student's at the final pass).
    """

    kind: str
    dice: dict[str, float]
    seconds: float
    count: int
    weights_epoch: int
    overlap: float | None = None

    @property
    def mean(self) -> float:
        return mean_dice(self.dice)

    def describe(self) -> str:
        """``patch, 64 patches`` / ``full, 4 cases, overlap 0.5``."""
        if self.kind == "patch":
            return f"patch, {self.count} patches"
        return f"full, {self.count} cases, overlap {self.overlap:g}"

    def fields(self, prefix: str) -> dict[str, Any]:
        """log.jsonl keys: ``<prefix>/dice_WT`` ..., ``<prefix>/seconds``, ``<prefix>/patches``
        or ``<prefix>/cases``, ``<prefix>/weights_epoch``."""
        unit = "patches" if self.kind == "patch" else "cases"
        return {**{f"{prefix}/dice_{k}": v for k, v in self.dice.items()},
                f"{prefix}/seconds": self.seconds, f"{prefix}/{unit}": self.count,
                f"{prefix}/weights_epoch": self.weights_epoch}


@dataclass
class EpochValidation:
    """What validation ran at the end of one epoch.

    `selected` chose the best student and stepped the plateau (log keys ``val/...`` and
    ``val_kind``); `full` is a full pass that did not (with patch validation: every
    `val_full_every` epochs, and the final pass on the best student; keys ``val_full/...``).
    """

    selected: ValidationResult | None = None
    full: ValidationResult | None = None

    def record(self) -> dict[str, Any]:
        """The fields of the epoch record of log.jsonl."""
        out: dict[str, Any] = {}
        if self.selected is not None:
            out.update({"val_kind": self.selected.kind, **self.selected.fields("val")})
        if self.full is not None:
            out.update(self.full.fields("val_full"))
        return out


def mean_dice(val: dict[str, float]) -> float:
    """The selection metric: the mean of the WT, TC and ET Dice."""
    return float(np.mean([val[r] for r in SELECTION_REGIONS]))


def selecting_kind(state: LoopState) -> str | None:
    """The kind `state.best_metric` and the plateau counters were measured on: that of the last
    selecting validation in `val_history` (entries written before kinds existed: "full");
    None before any."""
    for entry in reversed(state.val_history):
        if entry.get("selects", True):
            return str(entry.get("kind", "full"))
    return None


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
    def save_best(self, state: LoopState, val: dict[str, float], mean_dice: float,
                  kind: str) -> None: ...

    def load_best(self, like: nn.Module) -> tuple[nn.Module, int, int]: ...

    def save_best_full(self, network: nn.Module, step: int, epoch: int,
                       full: dict[str, float], estimate: dict[str, float]) -> None: ...


class Validator:
    """End-of-epoch validation with its two consequences: the best student and the plateau.

    Args:
        method: the method (its student is validated; `frozen_groups` pauses the plateau).
        cfg: the run config (`train.validation`, `val_every`, `val_patches`, `val_full_every`,
            `val_overlap`, `val_cases`, plateau settings).
        val_ids: the held-out fold's case ids; empty: never validates.
        dist: this rank (validation cases and patches are split over ranks).
        optimizer: the optimiser whose `student` group the plateau rule lowers.
        saver: writes (and reads back) the best student (`Checkpointer`).
        echo: where validation lines, per-case progress and learning-rate changes go.
    """

    def __init__(self, method: Any, cfg: RunConfig, val_ids: list[str], dist: DistInfo,
                 optimizer: Any, saver: BestSaver, echo: Callable[[str], None] = print) -> None:
        self.method, self.cfg, self.val_ids, self.dist = method, cfg, val_ids, dist
        self.optimizer, self.saver, self.echo = optimizer, saver, echo
        self.student_group = next((i for i, g in enumerate(optimizer.param_groups)
                                   if g.get("name") == "student"), None)
        self.patches: ValidationPatches | None = None  # drawn at the first patch validation

    @property
    def kind(self) -> str:
        """The kind that selects the best student: `train.validation`, or "full" when there is
        no per-epoch validation (`val_every: 0`)."""
        t = self.cfg.train
        return t.validation if t.val_every else "full"

    def due(self, epoch: int) -> bool:
        """Is the selecting validation due at the end of `epoch` (not counting the final one)?"""
        every = self.cfg.train.val_every
        return bool(self.val_ids) and bool(every) and (epoch + 1) % every == 0

    def full_due(self, epoch: int) -> bool:
        """Is a periodic full pass due at the end of `epoch` (`val_full_every`)?"""
        every = self.cfg.train.val_full_every
        return bool(self.val_ids) and every is not None and (epoch + 1) % every == 0

    # ---- running one validation
    def run(self, kind: str, epoch: int, network: nn.Module | None = None,
            weights_epoch: int | None = None) -> ValidationResult:
        """One validation of `kind` of the student (or `network`), timed."""
        start = time.perf_counter()
        t = self.cfg.train
        if kind == "patch":
            if self.patches is None:
                self.patches = draw_validation_patches(
                    self.cfg, self.val_ids, tuple(self.method.student_channels()),
                    self.dist.rank, self.dist.world_size)
            student = self.method.student_network() if network is None else network
            dice = validate_patches(student, self.patches, self.cfg, t.batch_size)
            count, overlap = self.patches.total, None
        else:
            dice = validate(self.method, self.cfg, self.val_ids, self.dist, self.echo, network)
            count, overlap = len(validation_ids(self.cfg, self.val_ids)), t.val_overlap
        return ValidationResult(kind, dice, time.perf_counter() - start, count,
                                epoch if weights_epoch is None else weights_epoch, overlap)

    def _say(self, epoch: int, result: ValidationResult, what: str = "validation") -> None:
        dice = " ".join(f"{k} {v:.3f}" for k, v in result.dice.items())
        self.echo(f"epoch {epoch} {what} ({result.describe()}) {result.seconds:.1f} s "
                  f"dice {dice}")

    def _history(self, state: LoopState, result: ValidationResult, selects: bool) -> None:
        state.val_history.append({"epoch": state.epoch, **result.dice, "kind": result.kind,
                                  "selects": selects, "weights_epoch": result.weights_epoch,
                                  "seconds": result.seconds})

    def _select(self, state: LoopState, result: ValidationResult) -> None:
        """Record `result`, keep the best student, apply the plateau rule; only ever comparing
        with validations of the same kind."""
        tracked = selecting_kind(state)
        if tracked is not None and tracked != result.kind:
            self.echo(f"the best student so far was chosen on {tracked} Dice, not comparable "
                      f"with {result.kind} Dice: the best and the plateau start again")
            state.best_metric, state.best_epoch = -math.inf, -1
            state.plateau_best, state.plateau_bad_epochs = math.inf, 0
        self._history(state, result, selects=True)
        if result.mean > state.best_metric:
            state.best_metric, state.best_epoch = result.mean, state.epoch
            self.saver.save_best(state, result.dice, result.mean, result.kind)
        if "student" not in self.method.frozen_groups(state.epoch):
            # A frozen student (KD-Net's stage 1) neither improves nor stalls.
            plateau_step(state, 1.0 - result.mean, self.cfg.train, self.optimizer,
                         self.student_group, self.echo)

    # ---- the epoch end
    def end_epoch(self, state: LoopState) -> EpochValidation | None:
        """The validations due at the end of `state.epoch`: the selecting one (every
        `val_every` epochs), a periodic full pass (`val_full_every`), and at the last epoch
        the final full pass that gives the best student a real Dice. Returns what ran, or None
        when nothing did."""
        if not self.val_ids:
            return None
        epoch, done = state.epoch, EpochValidation()
        last = epoch == self.cfg.train.epochs - 1
        if self.due(epoch):
            done.selected = self.run(self.cfg.train.validation, epoch)
            self._say(epoch, done.selected)
            self._select(state, done.selected)
        elif self.kind == "full" and (self.full_due(epoch) or last):
            # No per-epoch validation (val_every 0 or not reached): the full passes select.
            done.selected = self.run("full", epoch)
            self._say(epoch, done.selected, "full validation" if self.full_due(epoch)
                      else "final validation")
            self._select(state, done.selected)
        if self.kind == "patch":
            if self.full_due(epoch) or (last and state.best_epoch < 0):
                done.full = self.run("full", epoch)
                if state.best_epoch < 0 and last:
                    # no patch validation ever ran (val_every > epochs): the last weights are
                    # the best, chosen on their full Dice
                    self._say(epoch, done.full, "final validation")
                    self._select(state, done.full)
                    done.selected, done.full = done.full, None
                else:
                    self._say(epoch, done.full, "full validation")
                    self._history(state, done.full, selects=False)
            if last:
                done.full = self._score_best(state) or done.full
        return done if done.selected or done.full else None

    def _score_best(self, state: LoopState) -> ValidationResult | None:
        """The best student chosen on a patch estimate gets its full Dice (reused when a full
        pass already scored those weights), written into best_student.pt and best.json.
        Returns the full pass it ran, if any."""
        if state.best_epoch < 0 or selecting_kind(state) != "patch":
            return None  # nothing chosen, or chosen on a full Dice: best_student.pt has it
        estimate = next(e for e in reversed(state.val_history)
                        if e.get("selects", True) and e["epoch"] == state.best_epoch)
        scored = next((e for e in reversed(state.val_history)
                       if e.get("kind") == "full" and e.get("weights_epoch") == state.best_epoch),
                      None)
        # rank 0 wrote best_student.pt; every rank waits for it before reading it back
        all_reduce(torch.zeros(1))
        if state.best_epoch == state.epoch:
            network, step, epoch = self.method.student_network(), state.step, state.epoch
        else:
            network, step, epoch = self.saver.load_best(self.method.student_network())
        result = None
        if scored is not None:
            full = {r: float(scored[r]) for r in SELECTION_REGIONS}
        else:
            result = self.run("full", state.epoch, network=network, weights_epoch=epoch)
            self._say(state.epoch, result,
                      f"final validation of the best student (epoch {epoch})")
            self._history(state, result, selects=False)
            full = result.dice
        self.saver.save_best_full(network, step, epoch, full,
                                  {r: float(estimate[r]) for r in SELECTION_REGIONS})
        return result


def best_full_dice(state: LoopState) -> dict[str, float] | None:
    """The full Dice of the best student's weights, when a full pass scored them."""
    if state.best_epoch < 0:
        return None
    for entry in reversed(state.val_history):
        if (entry.get("kind", "full") == "full"
                and entry.get("weights_epoch", entry["epoch"]) == state.best_epoch):
            return {r: float(entry[r]) for r in SELECTION_REGIONS}
    return None
