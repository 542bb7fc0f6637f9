"""The training loop: DeepSpeed engine over a method, iteration-based epochs, exact resume.

Read top to bottom: `train` builds the run (`engine/build.py`: checks, data, method, engine,
resume), then for each epoch runs `train_step` on each micro-batch and, at each optimiser step,
logs (`engine/meter.py`), answers a preemption and checkpoints (`engine/checkpointer.py`); at
the end of an epoch the method's statistics are reduced over ranks and the student is validated
(`engine/validation.py`: best student, plateau rule). The loop never knows which method runs:
a method turns a batch into a `MethodOutput` (see `mtcmkd.methods`).

Exact resume: every random draw depends only on (seed, rank, epoch, index) (the patch sampler)
or on state saved in the checkpoint (weights, optimiser, method buffers, epoch statistics so
far, learning rates, the position in the epoch), so a run killed and resumed ends with the same
weights as an uninterrupted one on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mtcmkd.config import RunConfig
from mtcmkd.engine import checkpoint as ckpt
from mtcmkd.engine.build import (
    TrainRun,
    apply_frozen_groups,
    build_run,
    check_training_store,
    deepspeed_config,
    resolve_precision,
)
from mtcmkd.engine.dist import all_reduce, lost_ranks_named
from mtcmkd.engine.errors import EXIT_PREEMPTED, TrainError
from mtcmkd.engine.memory import (
    ACTIVATION_FACTOR,
    BACKWARD_OVERHEAD,
    BYTES_PER_PARAMETER,
    available_memory,
    estimate_training_memory,
)
from mtcmkd.engine.meter import Meter, learning_rates
from mtcmkd.engine.run_folder import (
    PREEMPTED_MARKER,
    RUN_FILES,
    SPLITS_FILE,
    run_summary_path,
    write_splits,
    write_summary,
)
from mtcmkd.engine.state import LoopState
from mtcmkd.engine.validation import best_full_dice, mean_dice, selecting_kind, validate

# The names callers imported from here before the loop was split into modules.
__all__ = [
    "ACTIVATION_FACTOR",
    "BACKWARD_OVERHEAD",
    "BYTES_PER_PARAMETER",
    "EXIT_PREEMPTED",
    "PREEMPTED_MARKER",
    "RUN_FILES",
    "SPLITS_FILE",
    "LoopState",
    "TrainError",
    "apply_frozen_groups",
    "available_memory",
    "check_training_store",
    "deepspeed_config",
    "estimate_training_memory",
    "resolve_precision",
    "run_summary_path",
    "train",
    "train_step",
    "validate",
    "write_splits",
    "write_summary",
]


def train(cfg: RunConfig, out: Path, *, resume: bool = False, memory_check: bool = True,
          echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `cfg` into the run folder `out`; returns a summary dict (rank 0's view).

    Args:
        memory_check: refuse a patch size x batch whose estimated training memory exceeds the
            memory available (:func:`estimate_training_memory`); False skips the check.

    Raises:
        TrainError: `--resume` without a checkpoint, a changed config or store, a run folder
            that already holds another run (checkpoints or run files) without `--resume`, a
            `--out` that is a file, a store or fold that does not fit, or a patch that cannot
            fit in memory.
        CheckpointError: a damaged checkpoint (digest mismatch, bad COMPLETE, `latest` outside
            the run folder).
        LostRankError: (a TrainError) a collective failed because a rank is gone: its process
            ended, or it did not answer within `train.collective_timeout_s`; the message names
            it, its host and the checkpoint to resume from.
    """
    run = build_run(cfg, out, resume=resume, memory_check=memory_check, echo=echo)
    t, state, checkpointer = cfg.train, run.state, run.checkpointer
    meter = Meter(samples_per_micro_batch=t.batch_size * run.dist.world_size)
    started = time.perf_counter()
    with lost_ranks_named(run.dist, t.collective_timeout_s, lambda: _resume_hint(run)):
        while state.epoch < t.epochs:
            run.start_epoch()
            for batch in meter.timed_batches(run.batches()):
                if not train_step(run, batch, meter):
                    continue  # accumulating gradients: no optimiser step yet
                if state.step % t.log_every == 0 and meter.count:
                    run.log.write_train(meter.record(state.step, state.epoch,
                                                     learning_rates(run.optimizer)))
                if checkpointer.preemption_requested():
                    checkpointer.save(state)
                    run.log.write({"kind": "preempted", "step": state.step,
                                   "epoch": state.epoch})
                    checkpointer.mark_preempted(state)  # before the barrier: no rank exits first
                    return _finish(run, {"preempted": True})
                checkpointer.maybe_save(state)
            with meter.paused():  # validation is not step time (its own seconds are logged)
                end_epoch(run)
        checkpointer.finish(state)
        return _finish(run, {"preempted": False, "seconds": time.perf_counter() - started,
                             "ranks_in_sync": ranks_in_sync(run.method)})


def train_step(run: TrainRun, batch: dict[str, torch.Tensor], meter: Meter) -> bool:
    """One micro-batch: forward, backward, and DeepSpeed's step (the optimiser steps only at a
    gradient-accumulation boundary). Returns True when the optimiser stepped."""
    state = run.state
    with meter.time("forward"):
        out = run.engine(batch, state.epoch)
    with meter.time("backward"):
        run.engine.backward(out.loss)
    with meter.time("step"):
        stepped = run.engine.is_gradient_accumulation_boundary()
        run.engine.step()
    state.add_stats(out.stats)
    meter.add(out)
    state.micro_in_epoch += 1
    state.step += int(stepped)
    return stepped


def end_epoch(run: TrainRun) -> None:
    """The method's statistics summed over ranks (`Method.end_epoch`), validation (its own
    lines; at the last epoch also the final full pass), the epoch record of log.jsonl (the
    validation's keys: `Validator`'s `EpochValidation.record`); then the state moves to the
    next epoch."""
    state = run.state
    reduced = _all_reduce_sum(state.epoch_stats) if state.epoch_stats else {}
    record = {"kind": "epoch", "epoch": state.epoch, "step": state.step,
              **run.method.end_epoch(reduced)}
    val = run.validator.end_epoch(state)
    if val is not None:
        record.update(val.record())
    run.log.write(record)
    if run.dist.is_main:
        run.echo(f"epoch {state.epoch} done")
    state.next_epoch()


def _all_reduce_sum(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # sorted: every rank reduces the same keys in the same order
    return {k: all_reduce(tensors[k].detach().double().clone()) for k in sorted(tensors)}


def ranks_in_sync(method: torch.nn.Module) -> bool:
    """True when every rank holds bit-identical parameters (data parallelism kept them equal).

    Compares three position-weighted float64 sums of all parameters (min == max over ranks).
    """
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten().cpu() for p in method.parameters()])
        local = torch.tensor([flat.sum().item(), (flat * flat).sum().item(),
                              (flat * torch.arange(flat.numel(), dtype=torch.float64)
                               ).sum().item()], dtype=torch.float64)
    low = all_reduce(local.clone(), op=torch.distributed.ReduceOp.MIN)
    high = all_reduce(local.clone(), op=torch.distributed.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def _resume_hint(run: TrainRun) -> str:
    """Where a run that lost a rank stands: its step, and the checkpoint `--resume` takes."""
    try:
        tag = ckpt.latest_tag(run.out / "checkpoints")
    except ckpt.CheckpointError:
        tag = None
    where = f"the last complete checkpoint is {tag}" if tag else "no complete checkpoint yet"
    return f" at step {run.state.step}; {where}: submit again with --resume"


def _finish(run: TrainRun, summary: dict[str, Any]) -> dict[str, Any]:
    """The run's summary (what summary.json holds), after every rank got here (a barrier)."""
    state = run.state
    # The best student's full Dice when a full pass scored it (always at the end of a
    # finished run), else the estimate that chose it; best_val_kind says which.
    full = best_full_dice(state)
    best = None if state.best_epoch < 0 else state.best_metric
    summary.update({"epoch": state.epoch, "step": state.step,
                    "best_mean_dice": mean_dice(full) if full is not None else best,
                    "best_val_kind": "full" if full is not None
                    else selecting_kind(state) if best is not None else None,
                    "best_epoch": state.best_epoch, "run_dir": str(run.out),
                    "world_size": run.dist.world_size})
    run.log.close()
    torch.distributed.barrier()
    return summary
