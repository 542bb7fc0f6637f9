"""Training validation that costs what the user chooses (issue 20, item 1).

`train.validation: patch` (nnU-Net's pseudo Dice on fixed held-out patches) or `full` (the
sliding window over whole cases), `val_every: 0`, `val_full_every`, `val_overlap`; the final
full pass that gives the best student a real Dice; best-model and plateau decisions that never
compare a patch estimate with a full Dice; validation time kept out of the meter's step time.

Unit tests call the pieces directly; the loop tests train on one gloo rank in-process.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import gloo_world_of_one, write_raw
from torch import nn

from mtcmkd.config import ConfigError, config_from_dict, load_config, to_dict
from mtcmkd.data import StoreInfo, split_cases
from mtcmkd.engine import trainer, validation
from mtcmkd.engine.checkpointer import Preemption
from mtcmkd.engine.meter import Meter
from mtcmkd.engine.state import LoopState
from mtcmkd.engine.validation import (
    ValidationPatches,
    ValidationResult,
    Validator,
    draw_validation_patches,
    pseudo_dice,
    region_counts,
    selecting_kind,
    validate_patches,
)
from mtcmkd.preprocessing import preprocess
from mtcmkd.student_weights import load_student

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SMALL = ["train.epochs=2", "train.iters_per_epoch=2", "train.ckpt_every=100",
         "train.val_cases=null", "train.val_patches=4", "data.patch_size=[16,16,16]",
         "method.name=baseline"]
DICE = ("WT", "TC", "ET")


def _cfg(store: Path | None = None, *overrides: str):
    extra = [] if store is None else [f"data.store={json.dumps(str(store))}"]
    return load_config(TINY, [*SMALL, *extra, *overrides])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """6 blob cases, 2 folds: 3 validation cases for fold 0."""
    tmp = tmp_path_factory.mktemp("valmodes")
    write_raw(tmp / "raw", "2021", n=6, shape=(24, 28, 20))
    assert not preprocess(tmp / "raw", tmp / "store", n_folds=2).failed
    return tmp / "store"


def _val_ids(store: Path) -> list[str]:
    return split_cases(StoreInfo.read(store), 0)[1]


# ---- config ----------------------------------------------------------------------------------


def test_new_keys_are_written_only_when_set_and_checked() -> None:
    plain = to_dict(load_config(TINY))["train"]
    assert not {"validation", "val_patches", "val_full_every", "val_overlap"} & set(plain)
    assert to_dict(_cfg())["train"]["val_patches"] == 4
    cfg = _cfg(None, "train.validation=full", "train.val_overlap=0.25", "train.val_every=0")
    written = to_dict(cfg)["train"]
    assert written["validation"] == "full" and written["val_overlap"] == 0.25
    assert written["val_every"] == 0 and "val_full_every" not in written
    assert config_from_dict(to_dict(cfg)) == cfg
    assert to_dict(_cfg(None, "train.val_full_every=3"))["train"]["val_full_every"] == 3
    for bad, message in [("train.val_every=-1", "val_every: must be >= 0"),
                         ("train.val_patches=0", "val_patches: must be >= 1"),
                         ("train.val_overlap=1.0", "val_overlap: must be in"),
                         ("train.validation=windows", "validation: must be one of")]:
        with pytest.raises(ConfigError, match=message):
            _cfg(None, bad)
    with pytest.raises(ConfigError, match="val_full_every: applies to validation: patch only"):
        _cfg(None, "train.validation=full", "train.val_full_every=2")


# ---- pseudo Dice -----------------------------------------------------------------------------


def test_pseudo_dice_pools_the_counts_of_all_patches() -> None:
    # patch 1: truth WT 4 voxels (label 2), prediction hits 2 of them; patch 2: 1 ET voxel hit.
    truth = torch.zeros(2, 4, 4, 4, dtype=torch.uint8)
    pred = torch.zeros_like(truth)
    truth[0, 0, 0, :4] = 2
    pred[0, 0, 0, :2] = 2
    truth[1, 1, 1, 1] = 3
    pred[1, 1, 1, 1] = 3
    counts = region_counts(pred, truth)
    # WT: tp 3, fp 0, fn 2; TC (1, 3): tp 1; ET: tp 1
    assert counts.tolist() == [[3, 0, 2], [1, 0, 0], [1, 0, 0]]
    dice = pseudo_dice(counts)
    # pooled 2*3/(6+2) = 0.75, not the mean of per-patch Dice ((2/3 + 1) / 2)
    assert dice == {"WT": pytest.approx(0.75), "TC": 1.0, "ET": 1.0}
    # a region absent from truth and prediction everywhere: 1 (BraTS rule); predicted only: 0
    assert pseudo_dice(torch.zeros(3, 3, dtype=torch.float64)) == dict.fromkeys(DICE, 1.0)
    assert pseudo_dice(torch.tensor([[0, 5, 0]] * 3, dtype=torch.float64))["ET"] == 0.0


class _EchoLabels(nn.Module):
    """A 'network' whose input channel holds the labels to predict (softmax logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        classes = torch.arange(4, dtype=x.dtype).view(1, 4, 1, 1, 1)
        return -self.scale * (x - classes).abs()


def test_validate_patches_scores_the_networks_labels(monkeypatch) -> None:
    monkeypatch.setattr(validation, "all_reduce", lambda t: t)  # one rank, no process group
    labels = torch.zeros(3, 8, 8, 8, dtype=torch.uint8)
    labels[0, 2:4, 2:4, 2:4] = 2
    labels[1, 3:6, 3:6, 3:6] = 3
    perfect = ValidationPatches(labels[:, None].to(torch.float16), labels, 3)
    cfg = _cfg()
    net = _EchoLabels()
    assert validate_patches(net, perfect, cfg, batch_size=2) == dict.fromkeys(DICE, 1.0)
    assert net.training  # put back in the mode it was in
    # predicting edema (2) where the truth is ET (3): WT perfect, TC and ET missed
    wrong = labels.clone()
    wrong[wrong == 3] = 2
    dice = validate_patches(net, ValidationPatches(wrong[:, None].half(), labels, 3), cfg)
    assert dice == {"WT": 1.0, "TC": 0.0, "ET": 0.0}


def test_validation_patches_are_fixed_foreground_biased_and_split_over_ranks(store) -> None:
    ids = _val_ids(store)
    cfg = _cfg(store, "train.val_patches=6", "data.fg_fraction=1.0")
    one = draw_validation_patches(cfg, ids, ("t1ce",))
    again = draw_validation_patches(cfg, ids, ("t1ce",))  # a resumed process draws anew
    assert one.images.shape == (6, 1, 16, 16, 16) and one.labels.shape == (6, 16, 16, 16)
    assert torch.equal(one.images, again.images) and torch.equal(one.labels, again.labels)
    assert all(bool((p > 0).any()) for p in one.labels)  # fg_fraction 1: tumour in every patch
    halves = [draw_validation_patches(cfg, ids, ("t1ce",), rank, 2) for rank in (0, 1)]
    assert [h.total for h in halves] == [6, 6]
    assert torch.equal(torch.cat([halves[0].labels, halves[1].labels]),
                       one.labels[[0, 2, 4, 1, 3, 5]])
    other_seed = draw_validation_patches(_cfg(store, "train.val_patches=6", "train.seed=1",
                                              "data.fg_fraction=1.0"), ids, ("t1ce",))
    assert not torch.equal(other_seed.labels, one.labels)
    # channels by name: the store's t1ce channel
    both = draw_validation_patches(cfg, ids, ("t1", "t1ce"))
    assert torch.equal(both.images[:, 1:], one.images)


def test_the_validator_scores_the_same_patches_every_epoch_and_after_a_resume(
        store, monkeypatch) -> None:
    monkeypatch.setattr(validation, "all_reduce", lambda t: t)
    seen: list[torch.Tensor] = []
    real = validation.validate_patches

    def spy(network, patches, cfg, batch_size=1):
        seen.append(patches.images.clone())
        return real(network, patches, cfg, batch_size)

    monkeypatch.setattr(validation, "validate_patches", spy)
    cfg = _cfg(store, "train.epochs=3")
    torch.manual_seed(0)
    net = nn.Conv3d(1, 4, 1)
    method = SimpleNamespace(student_channels=lambda: ("t1ce",), student_network=lambda: net,
                             frozen_groups=lambda epoch: set())
    saver = SimpleNamespace(save_best=lambda *a: None)
    opt = SimpleNamespace(param_groups=[{"name": "student", "lr": 1e-3}])
    one_rank = SimpleNamespace(rank=0, world_size=1)
    first = Validator(method, cfg, _val_ids(store), one_rank, opt, saver, lambda msg: None)
    dice = []
    for epoch in (0, 1):
        dice.append(first.run("patch", epoch).dice)
    resumed = Validator(method, cfg, _val_ids(store), one_rank, opt, saver, lambda msg: None)
    dice.append(resumed.run("patch", 1).dice)
    assert len(seen) == 3 and all(torch.equal(seen[0], x) for x in seen[1:])
    assert dice[0] == dice[1] == dice[2]  # same weights, same patches: the same estimate
    assert seen[0].shape == (4, 1, 16, 16, 16)


# ---- the validator's decisions (scripted validations) ----------------------------------------


class _Saver:
    def __init__(self) -> None:
        self.best: list[tuple[int, float, str]] = []
        self.loaded = 0
        self.full: list[tuple[int, dict, dict]] = []

    def save_best(self, state, val, mean, kind) -> None:
        self.best.append((state.epoch, mean, kind))

    def load_best(self, like):
        self.loaded += 1
        return like, 7, self.best[-1][0]  # what best_student.pt holds: the last best's epoch

    def save_best_full(self, network, step, epoch, full, estimate) -> None:
        self.full.append((epoch, full, estimate))


def _scripted(monkeypatch, scores: dict[tuple[str, int], float]) -> list[tuple[str, int]]:
    """Validator.run returns `scores[(kind, epoch)]` for every region; returns the calls."""
    calls: list[tuple[str, int]] = []

    def run(self, kind, epoch, network=None, weights_epoch=None):
        calls.append((kind, epoch))
        return ValidationResult(kind, dict.fromkeys(DICE, scores[(kind, epoch)]), 0.5, 4,
                                epoch if weights_epoch is None else weights_epoch,
                                None if kind == "patch" else 0.5)

    monkeypatch.setattr(Validator, "run", run)
    monkeypatch.setattr(validation, "all_reduce", lambda t: t)
    return calls


def _validator(cfg, saver, said):
    method = SimpleNamespace(frozen_groups=lambda epoch: set(), student_network=lambda: None)
    opt = SimpleNamespace(param_groups=[{"name": "student", "lr": 1e-3}])
    return Validator(method, cfg, ["c1"], SimpleNamespace(rank=0, world_size=1), opt, saver,
                     said.append)


def _epochs(validator, n: int) -> tuple[LoopState, list]:
    state, done = LoopState(), []
    for epoch in range(n):
        state.epoch = epoch
        done.append(validator.end_epoch(state))
    return state, done


def test_patch_estimates_choose_the_best_and_full_passes_never_compete(monkeypatch) -> None:
    # The full passes score far higher than the estimates: if they were compared, the periodic
    # full pass at epoch 1 would take the best and the plateau would see epoch 2 as bad.
    calls = _scripted(monkeypatch, {("patch", 0): 0.2, ("patch", 1): 0.5, ("full", 1): 0.9,
                                    ("patch", 2): 0.3, ("patch", 3): 0.4, ("full", 3): 0.8})
    saver, said = _Saver(), []
    cfg = _cfg(None, "train.epochs=4", "train.val_full_every=2", "train.plateau_start_epoch=0",
               "train.plateau_patience=0", "train.plateau_factor=0.5")
    validator = _validator(cfg, saver, said)
    state, done = _epochs(validator, 4)
    # patch every epoch; full at 1 and 3 (val_full_every 2); the final pass of the best
    # (epoch 1) reuses epoch 1's full Dice
    assert calls == [("patch", 0), ("patch", 1), ("full", 1), ("patch", 2), ("patch", 3),
                     ("full", 3)]
    assert saver.best == [(0, pytest.approx(0.2), "patch"), (1, pytest.approx(0.5), "patch")]
    assert (state.best_epoch, state.best_metric) == (1, pytest.approx(0.5))
    assert selecting_kind(state) == "patch"
    # the best's weights were scored full at epoch 1: reused, not run again (read back only to
    # write best_student.pt with that Dice)
    assert saver.loaded == 1 and saver.full == [(1, dict.fromkeys(DICE, 0.9),
                                                 dict.fromkeys(DICE, 0.5))]
    # plateau on estimates only: 0.2 -> 0.5 better, 0.3 bad (patience 0: halve), 0.4 bad
    assert validator.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)
    assert done[1].record()["val_kind"] == "patch"
    assert done[1].record()["val_full/dice_WT"] == 0.9 and "val_full/dice_WT" not in \
        done[2].record()
    assert done[3].record()["val_full/dice_WT"] == 0.8  # the last weights' periodic pass
    assert done[3].record()["val_full/weights_epoch"] == 3
    assert validation.best_full_dice(state) == dict.fromkeys(DICE, 0.9)
    assert any(line.startswith("epoch 1 full validation (full, 4 cases, overlap 0.5) 0.5 s "
                               "dice WT 0.900") for line in said)
    assert "epoch 0 validation (patch, 4 patches) 0.5 s dice WT 0.200 TC 0.200 ET 0.200" in said


def test_the_final_pass_scores_the_best_students_weights(monkeypatch) -> None:
    calls = _scripted(monkeypatch, {("patch", 0): 0.6, ("patch", 1): 0.1, ("patch", 2): 0.2,
                                    ("full", 2): 0.7})
    saver, said = _Saver(), []
    validator = _validator(_cfg(None, "train.epochs=3"), saver, said)
    state, done = _epochs(validator, 3)
    assert calls == [("patch", 0), ("patch", 1), ("patch", 2), ("full", 2)]
    assert saver.loaded == 1  # the best (epoch 0) is not the last epoch's weights: read back
    assert saver.full == [(0, dict.fromkeys(DICE, 0.7), dict.fromkeys(DICE, 0.6))]
    record = done[2].record()
    assert record["val_kind"] == "patch" and record["val/dice_WT"] == 0.2
    assert record["val_full/dice_WT"] == 0.7 and record["val_full/weights_epoch"] == 0
    assert validation.best_full_dice(state) == dict.fromkeys(DICE, 0.7)
    assert "epoch 2 final validation of the best student (epoch 0) (full, 4 cases, overlap " \
           "0.5) 0.5 s dice WT 0.700 TC 0.700 ET 0.700" in said


def test_a_change_of_kind_starts_the_best_again(monkeypatch) -> None:
    """A run whose checkpoint chose its best on full Dice (entries without a kind, written
    before kinds existed), resumed with patch validation: never compared with the estimate."""
    _scripted(monkeypatch, {("patch", 5): 0.3, ("patch", 6): 0.2, ("full", 6): 0.5})
    saver, said = _Saver(), []
    validator = _validator(_cfg(None, "train.epochs=7"), saver, said)
    state = LoopState(epoch=5, best_metric=0.8, best_epoch=4, plateau_best=0.2,
                      plateau_bad_epochs=2,
                      val_history=[{"epoch": 4, "WT": 0.8, "TC": 0.8, "ET": 0.8}])
    assert selecting_kind(state) == "full"
    validator.end_epoch(state)
    assert "the best student so far was chosen on full Dice, not comparable with patch Dice: " \
           "the best and the plateau start again" in said
    assert saver.best == [(5, pytest.approx(0.3), "patch")]  # lower than 0.8, still the best
    assert (state.best_epoch, state.plateau_best, state.plateau_bad_epochs) == (
        5, pytest.approx(0.7), 0)
    state.epoch = 6
    validator.end_epoch(state)
    assert saver.best == [(5, pytest.approx(0.3), "patch")] and state.best_epoch == 5
    assert sum("start again" in line for line in said) == 1


@pytest.mark.parametrize(("overrides", "expected"), [
    # val_every 0: nothing per epoch; the final full pass selects the best
    (["train.val_every=0"], [("full", 2)]),
    # val_every 0 with val_full_every: the full passes select
    (["train.val_every=0", "train.val_full_every=2"], [("full", 1), ("full", 2)]),
    # full every epoch: the last one is the final pass, nothing extra
    (["train.validation=full"], [("full", 0), ("full", 1), ("full", 2)]),
    # full every 2 epochs of 3: the last epoch gets the final pass
    (["train.validation=full", "train.val_every=2"], [("full", 1), ("full", 2)]),
    # patch every 5 epochs of 3: none ran, the final full pass chooses the best
    (["train.val_every=5"], [("full", 2)]),
])
def test_full_selection_runs_once_per_epoch_and_at_the_end(monkeypatch, overrides,
                                                          expected) -> None:
    calls = _scripted(monkeypatch, {("full", e): 0.1 * (e + 1) for e in range(3)})
    saver = _Saver()
    state, done = _epochs(_validator(_cfg(None, "train.epochs=3", *overrides), saver, []), 3)
    assert calls == expected
    assert [b[2] for b in saver.best] == ["full"] * len(expected)
    assert saver.full == [] and saver.loaded == 0  # chosen on a full Dice: nothing to rescore
    assert done[2].record()["val_kind"] == "full" and state.best_epoch == 2
    assert validation.best_full_dice(state) == dict.fromkeys(DICE, pytest.approx(0.3))


# ---- the loop on one gloo rank ---------------------------------------------------------------


@pytest.fixture(scope="module")
def one_rank():
    with gloo_world_of_one():
        yield


@pytest.fixture
def keep_signals():
    saved = {sig: signal.getsignal(sig) for sig in Preemption.SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


class _Clock:
    """Seconds that advance 0.25 s per reading (every timed phase takes the same time)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.25
        return self.now


def test_the_meter_leaves_paused_time_out_of_samples_per_second() -> None:
    clock = _Clock()
    meter = Meter(samples_per_micro_batch=2, clock=clock)  # window starts at 0.25
    with meter.time("forward"):  # 0.5 -> 0.75
        pass
    meter.add(SimpleNamespace(terms={}, loss=torch.tensor(1.0)))
    with meter.paused():  # 1.0 -> 1001.25: not training
        clock.now += 1000.0
    record = meter.record(step=1, epoch=0, lrs={})  # read at 1001.5
    assert record["samples_per_s"] == pytest.approx(2 / (1001.5 - 0.25 - 1000.25))
    assert record["time/forward"] == pytest.approx(0.25)


@pytest.mark.integration
def test_samples_per_second_leaves_validation_out(store, one_rank, keep_signals, tmp_path,
                                                  monkeypatch) -> None:
    """Validation that takes 1000 s (on the meter's clock) must not lower samples/s of the
    next epoch's first record. Written against the loop alone: it fails on the loop that
    timed validation as step time."""
    clock = _Clock()
    monkeypatch.setattr(trainer, "Meter", functools.partial(Meter, clock=clock))
    real_end_epoch = Validator.end_epoch

    def slow_end_epoch(self, state):
        clock.now += 1000.0
        return real_end_epoch(self, state)

    monkeypatch.setattr(Validator, "end_epoch", slow_end_epoch)
    cfg = _cfg(store, "train.log_every=1", "train.iters_per_epoch=3")
    trainer.train(cfg, tmp_path / "run", echo=lambda msg: None)
    rates = [r["samples_per_s"] for r in _records(tmp_path / "run") if r["kind"] == "train"]
    assert len(rates) == 6
    assert max(rates) / min(rates) < 2.0, rates  # with validation counted: ~1000x


@pytest.mark.integration
def test_patch_run_logs_kinds_and_ends_with_a_full_pass(store, one_rank, keep_signals,
                                                        tmp_path) -> None:
    said: list[str] = []
    run = tmp_path / "run"
    cfg = _cfg(store, "train.val_cases=2")
    summary = trainer.train(cfg, run, echo=said.append)
    epochs = [r for r in _records(run) if r["kind"] == "epoch"]
    assert [r["val_kind"] for r in epochs] == ["patch", "patch"]
    assert all(r["val/patches"] == 4 and "val/dice_WT" in r for r in epochs)
    assert "val_full/dice_WT" not in epochs[0]
    # the final full pass, on the best student's weights, whichever epoch that was
    best = json.loads((run / "best.json").read_text())
    assert epochs[1]["val_full/cases"] == 2
    assert epochs[1]["val_full/weights_epoch"] == best["epoch"]
    assert best["val_kind"] == "full" and best["selected_on"]["val_kind"] == "patch"
    assert best["dice"] == {k: epochs[1][f"val_full/dice_{k}"] for k in DICE}
    assert best["selected_on"]["dice"] == {
        k: epochs[best["epoch"]][f"val/dice_{k}"] for k in DICE}
    student = load_student(run / "best_student.pt")
    assert student.meta["val_dice"] == best["dice"] and student.meta["epoch"] == best["epoch"]
    assert summary["best_val_kind"] == "full"
    assert summary["best_mean_dice"] == pytest.approx(best["mean_dice"])
    lines = [s for s in said if "validation" in s]
    assert lines[0].startswith("epoch 0 validation (patch, 4 patches) ")
    cases = [s for s in lines if "full validation: case" in s]
    assert [s.rsplit(" ", 2)[0] for s in cases] == [
        f"  full validation: case {i}/2 {cid}" for i, cid in enumerate(_val_ids(store)[:2], 1)]
    assert any(s.startswith("epoch 1 final validation of the best student (epoch "
                            f"{best['epoch']}) (full, 2 cases, overlap 0.5) ") for s in lines)


@pytest.mark.integration
def test_val_every_zero_validates_once_at_the_end(store, one_rank, keep_signals,
                                                   tmp_path) -> None:
    run = tmp_path / "run"
    summary = trainer.train(_cfg(store, "train.val_every=0", "train.val_overlap=0.25"), run,
                            echo=lambda msg: None)
    epochs = [r for r in _records(run) if r["kind"] == "epoch"]
    assert "val_kind" not in epochs[0] and epochs[1]["val_kind"] == "full"
    best = json.loads((run / "best.json").read_text())
    assert best["val_kind"] == "full" and best["epoch"] == 1 and "selected_on" not in best
    assert summary["best_val_kind"] == "full" and summary["best_epoch"] == 1


@pytest.mark.integration
@pytest.mark.slow
def test_patch_validation_of_a_resumed_run_is_the_uninterrupted_ones(
        store, one_rank, keep_signals, tmp_path) -> None:
    cfg = _cfg(store, "train.iters_per_epoch=3")
    trainer.train(cfg, tmp_path / "ref", echo=lambda msg: None)

    def warn_in_epoch_1(msg: str) -> None:  # the warning SLURM sends, after epoch 0's val
        if msg.startswith("epoch 1 step 5 "):
            os.kill(os.getpid(), signal.SIGUSR1)

    out = tmp_path / "pre"
    assert trainer.train(cfg, out, echo=warn_in_epoch_1)["preempted"] is True
    done = trainer.train(cfg, out, resume=True, echo=lambda msg: None)
    assert done["step"] == 6
    ref = [r for r in _records(tmp_path / "ref") if r["kind"] == "epoch"]
    got = [r for r in _records(out) if r["kind"] == "epoch"]
    keys = [f"val/dice_{k}" for k in DICE]
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in ref]
    assert math.isfinite(got[1]["val/dice_WT"])
