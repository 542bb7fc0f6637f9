"""`Checkpointer`: the run's checkpoints, student files and preemption, around `checkpoint.py`.

`engine/checkpoint.py` owns the format (a step counts only once COMPLETE exists, with the
SHA-256 of its files; `latest` names the newest; loads are weights-only). This object owns when
and what a run saves:

- `save(state)`: every rank writes its part through DeepSpeed, rank 0 marks it complete, then
  writes `student.pt` (the student network alone, for inference and export);
- `save_best(state, val, mean, kind)`: `best_student.pt` and `best.json` when validation
  improved; `save_best_full`: the full Dice of a best chosen on a patch estimate (the
  end of training), `load_best`: its weights read back for that pass;
- `finish(state)`: the end-of-run checkpoint (or only the student file when the last step was
  just saved);
- `preemption_requested()`: SIGUSR1/SIGTERM (SLURM's `--signal` warning, scancel) on any rank,
  agreed on by all ranks at a step end; `mark_preempted` then writes `RUN/PREEMPTED`.

Client state of a checkpoint (besides weights and optimiser): `LoopState.to_client()` +
`torch_rng` + `config_hash`. Its key names are part of every checkpoint written so far.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mtcmkd.atomic import atomic_write_text
from mtcmkd.config import RunConfig, config_hash, to_dict
from mtcmkd.engine import checkpoint as ckpt
from mtcmkd.engine.dist import DistInfo, all_reduce
from mtcmkd.engine.errors import TrainError
from mtcmkd.engine.run_folder import mark_preempted
from mtcmkd.engine.state import LoopState
from mtcmkd.messages import first_line
from mtcmkd.student_weights import load_student, save_student


class Preemption:
    """Turns SIGUSR1/SIGTERM into a flag read at step ends (the handlers stay installed)."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        """Put back the handlers found at construction (in-process tests)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def verify_resume(ckpt_dir: Path, tag: str, complete: dict[str, Any], dist: DistInfo,
                  echo: Callable[[str], None]) -> None:
    """Check a checkpoint's files against COMPLETE's digests before anything loads them.

    Rank 0 hashes the step's files; the others wait for its verdict, so that a refusal never
    leaves a rank inside a collective. A checkpoint written before digests existed resumes
    unverified, with a warning.

    Raises:
        CheckpointError: a file is missing or changed (on every rank).
    """
    verdict = torch.tensor([0.0])
    problem: ckpt.CheckpointError | None = None
    if dist.is_main:
        try:
            if not ckpt.verify_files(ckpt_dir, tag, complete):
                echo(f"warning: {ckpt_dir / tag}: checkpoint without content digests "
                     "(written before mtcmkd recorded them); resumed unverified")
        except ckpt.CheckpointError as exc:
            problem, verdict = exc, torch.tensor([1.0])
    if all_reduce(verdict, op=torch.distributed.ReduceOp.MAX).item() > 0:
        raise problem or ckpt.CheckpointError(
            f"{ckpt_dir / tag}: refused on rank 0 (damaged checkpoint file)")


class Checkpointer:
    """Saves and loads the run's checkpoints and student files (see the module docstring).

    Args:
        engine: the DeepSpeed engine (`save_checkpoint`/`load_checkpoint`).
        method: the method (its student network goes into the student files).
        cfg: the run's config (its hash goes into every checkpoint and student file).
        out: the run folder; checkpoints go to `out/checkpoints`.
        dist: this rank; only rank 0 writes COMPLETE, `latest` and the student files.
        echo: where the "checkpoint <tag>" lines go.
    """

    def __init__(self, engine: Any, method: Any, cfg: RunConfig, out: Path, dist: DistInfo,
                 echo: Callable[[str], None] = print) -> None:
        self.engine, self.method, self.cfg, self.dist, self.echo = engine, method, cfg, dist, echo
        self.out = Path(out)
        self.ckpt_dir = self.out / "checkpoints"
        self.config_hash = config_hash(cfg)
        self.every = cfg.train.ckpt_every
        self.keep_last = cfg.train.keep_last
        self.preemption: Preemption | None = None

    # ---- checkpoints
    def save(self, state: LoopState) -> None:
        """A complete checkpoint of this step (a collective), then `student.pt` (rank 0)."""
        meta = {"config_hash": self.config_hash, "epoch": state.epoch, "step": state.step,
                "micro_in_epoch": state.micro_in_epoch, "world_size": self.dist.world_size}
        client = {**state.to_client(), "torch_rng": torch.get_rng_state(),
                  "config_hash": self.config_hash}
        own = {"epoch_stats": client["epoch_stats"], "torch_rng": client["torch_rng"]}
        tag = ckpt.save(self.engine, self.ckpt_dir, state.step, client, meta, self.keep_last,
                        self.dist.is_main, rank_state=(self.dist.rank, own))
        if self.dist.is_main:
            self.save_student("student.pt", state)
        self.echo(f"checkpoint {tag}")

    def maybe_save(self, state: LoopState) -> None:
        """`save` every `train.ckpt_every` optimiser steps."""
        if self.every and state.step % self.every == 0:
            self.save(state)

    def finish(self, state: LoopState) -> None:
        """The end of the run: a checkpoint of the last step unless it was just saved, in
        which case only `student.pt` is written again (it records the finished epoch)."""
        if ckpt.latest_tag(self.ckpt_dir) != ckpt.step_tag(state.step) or not self.every:
            self.save(state)
        elif self.dist.is_main:
            self.save_student("student.pt", state)

    def load(self, tag: str) -> LoopState:
        """Weights, optimiser, RNG and loop state of checkpoint `tag` (verify it first).

        The epoch statistics and the RNG are this rank's own (`rank_state_<rank>.pt`) when the
        checkpoint has them and was written by as many ranks as now run; else rank 0's, which
        DeepSpeed keeps in its client state (checkpoints written before, another world size).

        Raises:
            TrainError: DeepSpeed found no loadable checkpoint there.
        """
        _, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        if client is None:
            raise TrainError(f"{self.ckpt_dir / tag}: DeepSpeed could not load the checkpoint")
        state = LoopState.from_client(client)
        own = None
        if ckpt.read_complete(self.ckpt_dir, tag).get("world_size") == self.dist.world_size:
            own = ckpt.load_rank_state(self.ckpt_dir, tag, self.dist.rank)
        if own is not None:
            state.epoch_stats = dict(own["epoch_stats"])
        torch.set_rng_state((own or client)["torch_rng"])
        return state

    # ---- student files (rank 0 only; the callers check)
    def save_student(self, name: str, state: LoopState,
                     val_dice: dict[str, float] | None = None, *,
                     network: torch.nn.Module | None = None,
                     at: tuple[int, int] | None = None) -> None:
        """`RUN/<name>`: the student network (or `network`, e.g. the best one read back) with
        what inference needs to use it; `at` = (step, epoch) of those weights, default the
        state's."""
        cfg = self.cfg
        step, epoch = (state.step, state.epoch) if at is None else at
        save_student(self.out / name,
                     self.method.student_network() if network is None else network,
                     config=to_dict(cfg), config_hash=self.config_hash,
                     channels=tuple(self.method.student_channels()), output=cfg.model.output,
                     n_classes=cfg.model.n_classes,
                     patch_size=tuple(cfg.data.patch_size), val_dice=val_dice or {},
                     step=step, epoch=epoch)

    def save_best(self, state: LoopState, val: dict[str, float], mean_dice: float,
                  kind: str = "full") -> None:
        """`best_student.pt` and `best.json` of a validation that improved (rank 0 writes);
        `kind` ("patch" | "full") says what the Dice is (best.json's `val_kind`)."""
        if not self.dist.is_main:
            return
        self.save_student("best_student.pt", state, val)
        atomic_write_text(self.out / "best.json", json.dumps(
            {"epoch": state.epoch, "step": state.step, "mean_dice": mean_dice, "dice": val,
             "val_kind": kind}, indent=2) + "\n")

    def load_best(self, like: torch.nn.Module) -> tuple[torch.nn.Module, int, int]:
        """The weights of `best_student.pt` (every rank reads; the caller waits for rank 0 to
        have written it) in a network on `like`'s device and dtype, with their step and epoch.

        Raises:
            TrainError: the file is gone or unreadable.
        """
        path = self.out / "best_student.pt"
        try:
            bundle = load_student(path)
        except (OSError, ValueError, ckpt.CheckpointError) as exc:
            raise TrainError(f"{path}: cannot read the best student back for its final full "
                             f"validation ({first_line(exc)})") from None
        param = next(like.parameters())
        network = bundle.network.to(device=param.device, dtype=param.dtype)
        return network, int(bundle.meta.get("step", 0)), int(bundle.meta.get("epoch", 0))

    def save_best_full(self, network: torch.nn.Module, step: int, epoch: int,
                       full: dict[str, float], estimate: dict[str, float]) -> None:
        """`best_student.pt` and `best.json` again, with the full Dice of the best student
        chosen on the patch `estimate` (kept in best.json as `selected_on`); rank 0 writes."""
        if not self.dist.is_main:
            return
        self.save_student("best_student.pt", LoopState(), full, network=network,
                          at=(step, epoch))
        mean = float(sum(full.values()) / len(full))
        atomic_write_text(self.out / "best.json", json.dumps(
            {"epoch": epoch, "step": step, "mean_dice": mean, "dice": full, "val_kind": "full",
             "selected_on": {"val_kind": "patch",
                             "mean_dice": float(sum(estimate.values()) / len(estimate)),
                             "dice": estimate}}, indent=2) + "\n")

    # ---- preemption
    def listen_for_preemption(self) -> None:
        """Install the SIGUSR1/SIGTERM handlers (from here on a signal requests a save)."""
        self.preemption = Preemption()

    def preemption_requested(self) -> bool:
        """True on every rank when any rank got a preemption signal (a collective)."""
        asked = self.preemption is not None and self.preemption.requested
        flag = all_reduce(torch.tensor([1.0 if asked else 0.0]),
                          op=torch.distributed.ReduceOp.MAX)
        return flag.item() > 0

    def mark_preempted(self, state: LoopState) -> None:
        """`RUN/PREEMPTED` (rank 0), before any rank exits (see `run_folder.PREEMPTED_MARKER`)."""
        if self.dist.is_main:
            mark_preempted(self.out, state.step)
