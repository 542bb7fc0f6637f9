"""What the loop measures and where it goes: `Meter` (phase timers, loss-term means, samples/s
between two log records) and `RunLog` (log.jsonl on rank 0, TensorBoard, the console line).

A train record of log.jsonl::

    {"kind": "train", "step", "epoch", "loss", "loss/<network>/<term>", ...,
     "time/data", "time/forward", "time/backward", "time/step",   # seconds per micro-batch
     "samples_per_s",                                              # over all ranks
     "lr/<param group>", ...}

Loss values and times are means over the micro-batches since the previous record; `time/data`
is the wait for the next batch including moving it to the device (`finish_batch`).
`samples_per_s` counts training time only: the loop runs the epoch end (validation) inside
`Meter.paused()`, whose time it reports on its own (the epoch record's `val/seconds`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

from mtcmkd.methods import MethodOutput

T = TypeVar("T")
#: The phases of one micro-batch, timed separately (seconds).
PHASES: tuple[str, ...] = ("data", "forward", "backward", "step")


class Meter:
    """Sums since the last train record: phase seconds, weighted loss terms, samples.

    Args:
        samples_per_micro_batch: patches one micro-batch trains over all ranks
            (batch size x world size), for `samples_per_s`.
        clock: seconds, monotonic (a fake one in tests).
    """

    def __init__(self, samples_per_micro_batch: int,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.samples_per_micro_batch = samples_per_micro_batch
        self.clock = clock
        self._reset(clock())

    def _reset(self, now: float) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.sums: dict[str, float] = {}  # term name (or "loss") -> sum over micro-batches
        self.count = 0  # micro-batches since the last record
        self.samples = 0
        self.since = now

    @contextmanager
    def time(self, phase: str) -> Iterator[None]:
        start = self.clock()
        yield
        self.seconds[phase] += self.clock() - start

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time that is not training (validation at an epoch end): the window of the next
        record starts that much later, so `samples_per_s` and the phase means ignore it."""
        start = self.clock()
        try:
            yield
        finally:
            self.since += self.clock() - start

    def timed_batches(self, batches: Iterable[T]) -> Iterator[T]:
        """`batches`, timing each wait as the `data` phase (the final, empty wait is not)."""
        it = iter(batches)
        while True:
            start = self.clock()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.seconds["data"] += self.clock() - start
            yield batch

    def add(self, out: MethodOutput) -> None:
        """Count one micro-batch: its terms, its total loss and its samples (a host sync)."""
        for k, v in out.terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.sums["loss"] = self.sums.get("loss", 0.0) + float(out.loss.detach())
        self.count += 1
        self.samples += self.samples_per_micro_batch

    def record(self, step: int, epoch: int, lrs: Mapping[str, float]) -> dict[str, Any]:
        """The train record of the micro-batches counted since the last one; starts a new one.

        Args:
            lrs: ``{"lr/<group>": learning rate}`` (:func:`learning_rates`).
        """
        now, n = self.clock(), max(self.count, 1)
        record = {"kind": "train", "step": step, "epoch": epoch,
                  **{f"loss/{k}" if k != "loss" else k: v / n for k, v in self.sums.items()},
                  **{f"time/{k}": v / n for k, v in self.seconds.items()},
                  "samples_per_s": self.samples / max(now - self.since, 1e-9), **lrs}
        self._reset(now)
        return record


def learning_rates(optimizer: Any) -> dict[str, float]:
    """``{"lr/<group name or index>": lr}`` of every parameter group."""
    return {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf
    return v


class RunLog:
    """`RUN/log.jsonl` (appended; one JSON object a line) and, optionally, TensorBoard scalars.

    Only the main rank writes (`enabled`); on the others every call is a no-op.
    """

    def __init__(self, out: Path, enabled: bool, tensorboard: bool = False,
                 echo: Callable[[str], None] = print) -> None:
        self.enabled, self.echo = enabled, echo
        self.fh = open(Path(out) / "log.jsonl", "a") if enabled else None  # noqa: SIM115
        self.tb: Any = None
        if tensorboard and enabled:
            try:
                # optional dependency: the tensorboard package is not required to train
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out) / "tensorboard"))
            except ImportError:
                echo("tensorboard not installed; train.tensorboard ignored")

    def write(self, record: dict[str, Any]) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
            self.fh.flush()

    def write_train(self, record: dict[str, Any]) -> None:
        """A train record: log.jsonl, TensorBoard (every number but step and epoch), a line."""
        self.write(record)
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, record["step"])
        if self.enabled:
            self.echo(f"epoch {record['epoch']} step {record['step']} loss "
                      f"{record['loss']:.4f} {record['samples_per_s']:.2f} samples/s "
                      f"(data {record['time/data'] * 1e3:.0f} ms)")

    def close(self) -> None:
        """Close log.jsonl and flush TensorBoard's pending events."""
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
