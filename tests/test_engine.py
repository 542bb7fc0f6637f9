"""The training loop's pieces in-process: meter, log, loop state, plateau rule, validator,
run-folder checks, checkpointer and the loop itself on one gloo rank (no subprocess).

`tests/test_train.py` runs `mtcmkd train` as a user does (subprocesses, torchrun); these tests
call the objects directly, so a failure points at the piece that broke.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import gloo_world_of_one, write_raw

from mtcmkd.config import config_hash, dump_config, load_config
from mtcmkd.engine import checkpoint as ckpt
from mtcmkd.engine import validation
from mtcmkd.engine.build import (
    apply_frozen_groups,
    build_run,
    deepspeed_config,
    resolve_precision,
)
from mtcmkd.engine.checkpointer import Preemption
from mtcmkd.engine.errors import TrainError
from mtcmkd.engine.meter import PHASES, Meter, RunLog, learning_rates
from mtcmkd.engine.run_folder import PREEMPTED_MARKER, check_run_folder
from mtcmkd.engine.state import LoopState
from mtcmkd.engine.trainer import train, train_step
from mtcmkd.engine.validation import Validator, mean_dice, plateau_step
from mtcmkd.methods import MethodOutput, build_method
from mtcmkd.preprocessing import preprocess
from mtcmkd.student_weights import load_student

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SMALL = ["train.epochs=2", "train.iters_per_epoch=3", "train.ckpt_every=1", "train.val_cases=1",
         "data.patch_size=[16,16,16]", "method.name=baseline"]


def _cfg(store: Path | None = None, *overrides: str):
    extra = [] if store is None else [f"data.store={json.dumps(str(store))}"]
    return load_config(TINY, [*SMALL, *extra, *overrides])


class FakeClock:
    """Seconds that advance only when a test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _output(loss: float, **terms: float) -> MethodOutput:
    return MethodOutput(loss=torch.tensor(loss), prediction=torch.zeros(1),
                        terms={k: torch.tensor(v) for k, v in terms.items()},
                        stats={"n": torch.tensor(1.0)})


# ---- meter and log -----------------------------------------------------------------------


def test_meter_averages_terms_and_phases_and_counts_samples() -> None:
    clock = FakeClock()
    meter = Meter(samples_per_micro_batch=4, clock=clock)
    for i, wait in enumerate((0.5, 1.5)):
        with meter.time("forward"):
            clock.now += 0.25
        meter.seconds["data"] += wait
        meter.add(_output(1.0 + i, **{"student/seg": 0.5 + i}))
    clock.now += 1.5  # 2 micro-batches x 4 samples over 2 s since the meter started
    record = meter.record(step=7, epoch=1, lrs={"lr/student": 0.1})
    assert list(record) == ["kind", "step", "epoch", "loss/student/seg", "loss",
                            *[f"time/{p}" for p in PHASES], "samples_per_s", "lr/student"]
    assert record["kind"] == "train" and record["step"] == 7 and record["epoch"] == 1
    assert record["loss"] == pytest.approx(1.5) and record["loss/student/seg"] == pytest.approx(1.0)
    assert record["time/forward"] == pytest.approx(0.25)
    assert record["time/data"] == pytest.approx(1.0)
    assert record["time/step"] == 0.0
    assert record["samples_per_s"] == pytest.approx(8 / 2.0)
    # a record starts the next window: nothing counted, the clock restarts
    assert meter.count == 0 and meter.sums == {} and meter.since == clock.now


def test_meter_times_each_batch_wait_but_not_the_final_empty_one() -> None:
    clock = FakeClock()
    meter = Meter(1, clock=clock)

    def slow_batches():
        for i in range(3):
            clock.now += 2.0  # producing a batch takes 2 s
            yield i
        clock.now += 50.0  # the exhausted loader's last wait

    assert list(meter.timed_batches(slow_batches())) == [0, 1, 2]
    assert meter.seconds["data"] == pytest.approx(6.0)


def test_learning_rates_are_named_by_group() -> None:
    optimizer = SimpleNamespace(param_groups=[{"name": "student", "lr": 0.1}, {"lr": 0.2}])
    assert learning_rates(optimizer) == {"lr/student": 0.1, "lr/1": 0.2}


def test_run_log_writes_json_lines_on_the_main_rank_only(tmp_path: Path) -> None:
    lines: list[str] = []
    log = RunLog(tmp_path, enabled=True, echo=lines.append)
    log.write({"kind": "epoch", "x": torch.tensor(2.5), "v": torch.tensor([1.0, 2.0]),
               "bad": math.nan})
    log.write_train({"kind": "train", "step": 3, "epoch": 0, "loss": 1.25, "time/data": 0.002,
                     "samples_per_s": 4.0})
    log.close()
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records[0] == {"kind": "epoch", "x": 2.5, "v": [1.0, 2.0], "bad": None}
    assert records[1]["step"] == 3
    assert lines == ["epoch 0 step 3 loss 1.2500 4.00 samples/s (data 2 ms)"]
    other = tmp_path / "rank1"
    other.mkdir()
    quiet = RunLog(other, enabled=False, echo=lines.append)
    quiet.write_train({"kind": "train", "step": 1, "epoch": 0, "loss": 1.0, "time/data": 0.0,
                       "samples_per_s": 1.0})
    assert not (other / "log.jsonl").exists() and len(lines) == 1


# ---- loop state, step, plateau, validator ------------------------------------------------------


def test_loop_state_round_trips_through_the_checkpoint_client_state() -> None:
    state = LoopState(epoch=3, micro_in_epoch=5, step=17, best_metric=0.5, best_epoch=2,
                      plateau_best=0.4, plateau_bad_epochs=1,
                      val_history=[{"epoch": 2, "WT": 0.9, "TC": 0.5, "ET": 0.1}])
    state.add_stats({"a": torch.tensor(1.0, dtype=torch.float32)})
    state.add_stats({"a": torch.tensor(2.0, dtype=torch.float32)})
    assert state.epoch_stats["a"].dtype == torch.float64 and state.epoch_stats["a"].item() == 3
    client = state.to_client()
    assert set(client) == {"epoch", "micro_in_epoch", "step", "epoch_stats", "best_metric",
                           "best_epoch", "plateau_best", "plateau_bad_epochs", "val_history"}
    back = LoopState.from_client(client)
    assert back == state
    back.next_epoch()
    assert (back.epoch, back.micro_in_epoch, back.epoch_stats, back.step) == (4, 0, {}, 17)


def test_mid_epoch_resume_keeps_the_statistics_of_a_checkpoint_from_before_dice_tally() -> None:
    """A checkpoint's epoch_stats as earlier versions wrote them (keys spelled by hand) merge
    with the steps after a mid-epoch resume, and the method's end_epoch reads the sum."""
    method = build_method(_cfg(None, "method.name=mtcmkd"), ("t1", "t1ce", "t2", "flair"))
    networks = [f"teacher/{m}" for m in method.teacher_modalities] + ["student"]
    old: dict[str, torch.Tensor] = {}
    for who in networks:  # the spelling of the code before DiceTally
        stem, _, name = who.partition("/")
        suffix = f"/{name}" if name else ""
        for region in ("wt", "tc"):
            old[f"{stem}_{region}_dice_sum{suffix}"] = torch.tensor(1.5, dtype=torch.float64)
            old[f"{stem}_{region}_dice_count{suffix}"] = torch.tensor(2.0, dtype=torch.float64)
    client = LoopState(micro_in_epoch=3, step=3, epoch_stats=old).to_client()
    state = LoopState.from_client(client)
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(2, 4, 16, 16, 16, generator=gen),
             "label": torch.randint(0, 4, (2, 16, 16, 16), generator=gen)}
    _, _, step_stats = method.compute_terms(batch, 0)
    state.add_stats(step_stats)
    assert set(state.epoch_stats) == set(old)  # the same keys: nothing spelled differently
    logs = method.end_epoch(state.epoch_stats)
    flair = (1.5 + step_stats["teacher_wt_dice_sum/flair"].item()) / (
        2.0 + step_stats["teacher_wt_dice_count/flair"].item())
    assert logs["teacher_wt_dice/flair"] == pytest.approx(flair)
    student = (1.5 + step_stats["student_tc_dice_sum"].item()) / (
        2.0 + step_stats["student_tc_dice_count"].item())
    assert logs["student_tc_dice"] == pytest.approx(student)


class FakeEngine:
    """DeepSpeed's step protocol: the optimiser steps every `accum` micro-batches."""

    def __init__(self, accum: int) -> None:
        self.accum, self.calls, self.steps = accum, 0, 0

    def __call__(self, batch: dict, epoch: int) -> MethodOutput:
        return _output(float(batch["x"]), **{"student/seg": float(batch["x"])})

    def backward(self, loss: torch.Tensor) -> None:
        self.calls += 1

    def is_gradient_accumulation_boundary(self) -> bool:
        return self.calls % self.accum == 0

    def step(self) -> None:
        self.steps += self.is_gradient_accumulation_boundary()


def test_train_step_counts_optimiser_steps_at_accumulation_boundaries() -> None:
    run = SimpleNamespace(engine=FakeEngine(accum=2), state=LoopState())
    meter = Meter(1)
    stepped = [train_step(run, {"x": i}, meter) for i in range(5)]
    assert stepped == [False, True, False, True, False]
    assert run.state.step == 2 == run.engine.steps and run.state.micro_in_epoch == 5
    assert run.state.epoch_stats["n"].item() == 5 and meter.count == 5
    assert meter.sums["loss"] == pytest.approx(0 + 1 + 2 + 3 + 4)


def _optimizer(lr: float = 1e-3) -> SimpleNamespace:
    return SimpleNamespace(param_groups=[{"name": "teachers", "lr": lr},
                                         {"name": "student", "lr": lr}])


def test_plateau_lowers_only_the_student_rate_after_patience_bad_epochs() -> None:
    t = _cfg(None, "train.plateau_patience=1", "train.plateau_factor=0.5",
             "train.plateau_start_epoch=1").train
    opt, state, said = _optimizer(), LoopState(), []
    losses = [0.9, 0.5, 0.6, 0.5, 0.7, 0.4]  # epoch 0 is before plateau_start_epoch
    for epoch, loss in enumerate(losses):
        state.epoch = epoch
        plateau_step(state, loss, t, opt, 1, said.append)
    # epoch 1 best 0.5; epochs 2, 3 bad (0.5 is no improvement) -> halve at epoch 3; epoch 4
    # bad (1 of 1 allowed); epoch 5 improves
    assert opt.param_groups[1]["lr"] == pytest.approx(5e-4)
    assert opt.param_groups[0]["lr"] == 1e-3
    assert said == ["student learning rate -> 0.0005"]
    assert state.plateau_best == 0.4 and state.plateau_bad_epochs == 0
    plateau_step(state, 2.0, t, opt, None, said.append)  # no student group: nothing happens
    assert state.plateau_bad_epochs == 0


def test_frozen_groups_get_rate_zero_and_get_their_rate_back() -> None:
    opt = _optimizer()
    method = SimpleNamespace(frozen_groups=lambda epoch: {"student"} if epoch == 0 else set())
    apply_frozen_groups(method, opt, 0)
    apply_frozen_groups(method, opt, 0)  # twice in a row: the saved rate stays the real one
    assert opt.param_groups[1]["lr"] == 0.0 and opt.param_groups[1]["lr_before_freeze"] == 1e-3
    apply_frozen_groups(method, opt, 1)
    assert opt.param_groups[1] == {"name": "student", "lr": 1e-3}


def test_validator_keeps_the_best_and_skips_the_plateau_while_the_student_is_frozen(
        monkeypatch) -> None:
    scores = iter([0.3, 0.6, 0.5, 0.2])
    monkeypatch.setattr(validation, "validate", lambda *a: dict.fromkeys(("WT", "TC", "ET"),
                                                                         next(scores)))
    saved: list[tuple[int, float]] = []
    saver = SimpleNamespace(save_best=lambda state, val, mean, kind: saved.append((state.epoch,
                                                                                   mean)))
    method = SimpleNamespace(frozen_groups=lambda epoch: {"student"} if epoch < 2 else set())
    cfg = _cfg(None, "train.val_every=2", "train.plateau_start_epoch=0",
               "train.plateau_patience=0", "train.plateau_factor=0.5", "train.validation=full")
    opt = _optimizer()
    validator = Validator(method, cfg, ["c1"], SimpleNamespace(), opt, saver, echo=print)
    state, results = LoopState(), []
    for epoch in range(8):
        state.epoch = epoch
        results.append(validator.end_epoch(state))
    assert results[0::2] == [None] * 4  # val_every 2: epochs 1, 3, 5, 7
    assert [e["epoch"] for e in state.val_history] == [1, 3, 5, 7]
    assert saved == [(1, pytest.approx(0.3)), (3, pytest.approx(0.6))]
    assert (state.best_epoch, state.best_metric) == (3, pytest.approx(0.6))
    # epoch 1 was frozen (no plateau); 3 sets the best loss 0.4; 5 and 7 are bad (patience 0)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-3 * 0.25)
    assert mean_dice({"WT": 0.9, "TC": 0.6, "ET": 0.3}) == pytest.approx(0.6)
    assert not Validator(method, cfg, [], SimpleNamespace(), opt, saver).due(1)


def test_deepspeed_config_and_precision() -> None:
    cfg = _cfg(None, "train.batch_size=2", "train.grad_accum=3")
    ds = deepspeed_config(cfg, world_size=4, precision="fp32")
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.0 and ds["bf16"]["enabled"] is False
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(TrainError, match="bf16 needs a GPU"):
        resolve_precision("bf16", torch.device("cpu"))


# ---- run folder checks (no process group) --------------------------------------------------


def test_run_folder_checks_refuse_before_anything_is_built(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "store")
    said: list[str] = []
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainError, match="existing file"):
        check_run_folder(cfg, tmp_path / "file", False, said.append)
    with pytest.raises(TrainError, match="no complete checkpoint"):
        check_run_folder(cfg, tmp_path / "empty", True, said.append)
    assert check_run_folder(cfg, tmp_path / "new", False, said.append) == (None, {})
    # the same config killed before its first checkpoint: its files are set aside
    same = tmp_path / "same"
    same.mkdir()
    dump_config(cfg, same / "config.yaml")
    (same / "log.jsonl").write_text("{}\n")
    assert check_run_folder(cfg, same, False, said.append) == (None, {})
    assert (same / "attempt-1" / "log.jsonl").is_file() and not (same / "log.jsonl").exists()
    assert "starting again" in said[-1]
    # another config's files are refused
    other = tmp_path / "other"
    other.mkdir()
    dump_config(_cfg(tmp_path / "store", "train.lr=0.5"), other / "config.yaml")
    with pytest.raises(TrainError, match="another run's files"):
        check_run_folder(cfg, other, False, said.append)


# ---- the loop on one gloo rank -------------------------------------------------------------



@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("engine")
    write_raw(tmp / "raw", "2021", n=4, shape=(24, 28, 20))
    report = preprocess(tmp / "raw", tmp / "store", n_folds=2)
    assert not report.failed
    return tmp / "store"


@pytest.fixture(scope="module")
def one_rank():
    """A gloo process group of world size 1 in this process (conftest.gloo_world_of_one)."""
    with gloo_world_of_one():
        yield


@pytest.fixture
def keep_signals():
    """The loop installs SIGUSR1/SIGTERM handlers; give pytest its own back."""
    saved = {sig: signal.getsignal(sig) for sig in Preemption.SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_student(path).network.state_dict()


def test_checkpointer_saves_complete_steps_and_loads_them_back(store, one_rank, keep_signals,
                                                                tmp_path) -> None:
    cfg = _cfg(store)
    said: list[str] = []
    run = build_run(cfg, tmp_path / "run", echo=said.append)
    for name in ("config.yaml", "ds_config.json", "splits.json", "log.jsonl"):
        assert (tmp_path / "run" / name).is_file(), name
    saver, state = run.checkpointer, run.state
    state.step, state.epoch, state.micro_in_epoch, state.best_metric = 4, 1, 2, 0.25
    saver.save(state)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert ckpt.latest_tag(ckpt_dir) == "step_00000004" and said[-1] == "checkpoint step_00000004"
    meta = ckpt.read_complete(ckpt_dir, "step_00000004")
    assert meta["config_hash"] == config_hash(cfg) and meta["micro_in_epoch"] == 2
    assert ckpt.verify_files(ckpt_dir, "step_00000004", meta)
    assert load_student(tmp_path / "run" / "student.pt").channels == ("t1ce",)
    state.step = 5
    saver.maybe_save(state)  # ckpt_every 1
    saver.finish(state)  # the last step was just saved: only student.pt again
    assert ckpt.complete_tags(ckpt_dir) == ["step_00000004", "step_00000005"]
    assert said.count("checkpoint step_00000005") == 1
    restored = saver.load("step_00000004")
    assert (restored.step, restored.epoch, restored.micro_in_epoch) == (4, 1, 2)
    assert restored.best_metric == 0.25
    # a preemption signal on this rank is seen by the (one-rank) agreement
    assert not saver.preemption_requested()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert saver.preemption_requested()
    saver.mark_preempted(state)
    assert json.loads((tmp_path / "run" / PREEMPTED_MARKER).read_text()) == {"step": 5}


def test_preempted_and_resumed_run_ends_as_an_uninterrupted_one(store, one_rank, keep_signals,
                                                                 tmp_path) -> None:
    cfg = _cfg(store, "train.ckpt_every=100")
    ref = train(cfg, tmp_path / "ref", echo=lambda msg: None)
    assert ref["preempted"] is False and ref["step"] == 6 and ref["ranks_in_sync"] is True
    assert list(ref) == ["preempted", "seconds", "ranks_in_sync", "epoch", "step",
                         "best_mean_dice", "best_val_kind", "best_epoch", "run_dir", "world_size"]

    def warn_at_step_2(msg: str) -> None:  # the warning SLURM sends, mid-epoch
        if msg.startswith("epoch 0 step 2 "):
            os.kill(os.getpid(), signal.SIGUSR1)

    out = tmp_path / "pre"
    stopped = train(cfg, out, echo=warn_at_step_2)
    assert stopped["preempted"] is True and stopped["step"] == 2 and "seconds" not in stopped
    assert json.loads((out / PREEMPTED_MARKER).read_text()) == {"step": 2}
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1] == {"kind": "preempted", "step": 2, "epoch": 0}
    said: list[str] = []
    done = train(cfg, out, resume=True, echo=said.append)
    assert "resumed from step_00000002: epoch 0, step 2" in said
    assert done["step"] == 6 and not (out / PREEMPTED_MARKER).exists()
    a, b = _weights(tmp_path / "ref" / "student.pt"), _weights(out / "student.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_log = [json.loads(x) for x in (tmp_path / "ref" / "log.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in ref_log] == ["train"] * 3 + ["epoch"] + ["train"] * 3 + ["epoch"]
    assert all("val/dice_WT" in r for r in ref_log if r["kind"] == "epoch")
