"""The training loop: DeepSpeed engine over a method, iteration-based epochs, exact resume.

Read top to bottom: set up ranks -> build data, method, optimiser, engine -> maybe resume ->
for each epoch: for each micro-batch: forward, backward, step, log, checkpoint -> end of epoch:
reduce method statistics, validate, keep the best student. The loop never knows which method
runs: a method turns a batch into a `MethodOutput` (see `mtcmkd.methods`).

Exact resume: every random draw depends only on (seed, rank, epoch, index) (the patch sampler)
or on state saved in the checkpoint (weights, optimiser, method buffers, epoch statistics so
far, learning rates, the position in the epoch), so a run killed and resumed ends with the same
weights as an uninterrupted one on CPU.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtcmkd.config import ConfigError, RunConfig, config_hash, dump_config, load_config, to_dict
from mtcmkd.data.store import (
    StoreInfo,
    check_store_complete,
    split_cases,
    store_fingerprint,
)
from mtcmkd.engine import checkpoint as ckpt
from mtcmkd.engine.dist import DistInfo, all_reduce, setup_distributed

EXIT_PREEMPTED = 3  # the run saved a checkpoint after a warning signal and wants a requeue
#: Written into the run folder, before any rank exits, when a run stopped for a preemption
#: warning. A launcher that kills the other ranks when the first one exits (srun
#: --kill-on-bad-exit) may report another exit code than 3; slurm/train.sh trusts this file.
PREEMPTED_MARKER = "PREEMPTED"
#: The run's record of its data: the store (path and fingerprint) and the fold's case ids.
SPLITS_FILE = "splits.json"
#: What a run writes into its folder; any of them means the folder belongs to a run.
RUN_FILES: tuple[str, ...] = ("config.yaml", "ds_config.json", "log.jsonl", "student.pt",
                              "best_student.pt", "best.json", "summary.json", SPLITS_FILE,
                              "tensorboard", PREEMPTED_MARKER)


def _saved_config_hash(out: Path, written_as: str | None = None) -> str | None:
    """Hash of ``out/config.yaml`` read with today's loader (new fields get their defaults).

    With ``written_as``, only a file whose header says it was written with that hash counts
    (the config a checkpoint was trained with). None when there is no usable file.
    """
    path = out / "config.yaml"
    try:
        header = path.read_text().partition("\n")[0]
        if written_as is not None and not header.endswith(f"hash {written_as}"):
            return None
        return config_hash(load_config(path))
    except (OSError, ConfigError):
        return None


def _set_aside_attempt(out: Path, found: list[str], echo: Callable[[str], None]) -> None:
    """Move an unfinished attempt's files to ``out/attempt-<k>/`` (rank 0 only; no checkpoint
    exists, so nothing there can be resumed)."""
    if os.environ.get("RANK", "0") != "0":
        return
    k = 1
    while (out / f"attempt-{k}").exists():
        k += 1
    dest = out / f"attempt-{k}"
    dest.mkdir()
    for name in found:
        os.replace(out / name, dest / name)
    echo(f"{out}: same config, no checkpoint: starting again; the earlier attempt's files "
         f"are in {dest}")


class TrainError(RuntimeError):
    """A user-facing problem (bad resume, store without cases for this fold, ...)."""


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "bf16" and device.type != "cuda":
        raise TrainError("train.precision=bf16 needs a GPU; use fp32 (or auto) on CPU")
    return precision


def deepspeed_config(cfg: RunConfig, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON, generated from the typed config (never edited by hand)."""
    t = cfg.train
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # our own logging
        "wall_clock_breakdown": False,
        # Always explicit: DeepSpeed's default is 1.0, a clip of the global norm over every
        # parameter, which couples the networks of a method (a student's large KD gradients
        # shrink the teachers' updates) and is not what `grad_clip: null` means.
        "gradient_clipping": 0.0 if t.grad_clip is None else t.grad_clip,
    }
    return ds


@dataclass
class LoopState:
    """Everything besides weights and optimiser that an exact resume needs."""

    epoch: int = 0
    micro_in_epoch: int = 0  # next micro-batch index within the epoch
    step: int = 0  # optimiser steps done
    epoch_stats: dict[str, torch.Tensor] = field(default_factory=dict)
    best_metric: float = -math.inf
    best_epoch: int = -1
    plateau_best: float = math.inf
    plateau_bad_epochs: int = 0
    val_history: list[dict] = field(default_factory=list)

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


class _Preemption:
    """Turns SIGUSR1/SIGTERM (SLURM's --signal warning, scancel) into a flag read at step ends."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True


def _all_reduce_sum(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: all_reduce(tensors[k].detach().double().clone()) for k in sorted(tensors)}


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class JsonlLog:
    def __init__(self, path: Path, enabled: bool):
        self.enabled = enabled
        self.fh = open(path, "a") if enabled else None  # noqa: SIM115

    def write(self, record: dict) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
            self.fh.flush()


def _batches(dataset: Any, start: int, batch_size: int, num_workers: int) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, sampler=range(start, len(dataset)),
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      drop_last=True)


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
    """
    from mtcmkd.data import PatchDataset, finish_batch
    from mtcmkd.methods import build_method

    # The checks that need no process group come first: a refusal costs no start-up.
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    chash = config_hash(cfg)
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out}: --out is an existing file, not a run folder; choose a folder")
    existing = ckpt.latest_tag(ckpt_dir)
    if resume and existing is None:
        raise TrainError(f"{out}: --resume given but no complete checkpoint in {ckpt_dir}")
    if not resume and existing is not None:
        raise TrainError(f"{out}: run folder already holds checkpoint {existing}; pass --resume "
                         "to continue it or choose a new --out")
    if not resume:
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found and _saved_config_hash(out) == chash:
            # The same run, killed before its first checkpoint (a node failure, a requeue):
            # start it again, keeping the earlier attempt's files apart so no log mixes two.
            _set_aside_attempt(out, found, echo)
        elif found:
            raise TrainError(f"{out}: holds another run's files ({', '.join(found)}) and no "
                             "checkpoint to resume; choose a new --out folder (or --resume a "
                             "run that has checkpoints)")
    complete: dict[str, Any] = {}
    if resume:
        complete = ckpt.read_complete(ckpt_dir, existing)
        saved_hash = complete["config_hash"]
        if saved_hash != chash and _saved_config_hash(out, saved_hash) == chash:
            saved_hash = chash  # same settings; the code since added fields with defaults
        if saved_hash != chash:
            raise TrainError(f"{out}: the config differs from the one checkpoint {existing} was "
                             f"trained with (hash {saved_hash} vs {chash}); resume with the "
                             f"saved {out / 'config.yaml'} or start a new run")

    if cfg.data.store is None:
        raise TrainError("data.store is not set (pass --store)")
    info, train_ids, val_ids = check_training_store(cfg.data.store, cfg.data.fold)
    fingerprint = store_fingerprint(cfg.data.store)
    if resume:
        _check_same_store(out, cfg.data.store, fingerprint)

    import deepspeed

    dist: DistInfo = setup_distributed()
    if len(train_ids) < dist.world_size:
        raise TrainError(f"{cfg.data.store}: fold {cfg.data.fold} leaves {len(train_ids)} "
                         f"training cases for {dist.world_size} ranks")
    if resume:
        # Rank 0 hashes the step's files; the others wait for its verdict, so that a refusal
        # never leaves a rank inside a collective.
        verdict = torch.tensor([0.0])
        problem: ckpt.CheckpointError | None = None
        if dist.is_main:
            try:
                if not ckpt.verify_files(ckpt_dir, existing, complete):
                    echo(f"warning: {ckpt_dir / existing}: checkpoint without content digests "
                         "(written before mtcmkd recorded them); resumed unverified")
            except ckpt.CheckpointError as exc:
                problem, verdict = exc, torch.tensor([1.0])
        if all_reduce(verdict, op=torch.distributed.ReduceOp.MAX).item() > 0:
            raise problem or ckpt.CheckpointError(
                f"{ckpt_dir / existing}: refused on rank 0 (damaged checkpoint file)")
    t = cfg.train
    seed = t.seed
    torch.manual_seed(seed + dist.rank)
    np.random.seed((seed + dist.rank) % 2**32)
    micro_per_epoch = t.iters_per_epoch * t.grad_accum
    dataset = PatchDataset(cfg.data.store, train_ids, patch_size=cfg.data.patch_size,
                           samples_per_epoch=micro_per_epoch * t.batch_size,
                           fg_fraction=cfg.data.fg_fraction, seed=seed, rank=dist.rank,
                           world_size=dist.world_size, augment=cfg.data.augment,
                           defer_to_device=cfg.data.defer_to_device)

    method = build_method(cfg, info.channels).to(dist.device)
    precision = resolve_precision(t.precision, dist.device)
    if memory_check:
        _check_memory(cfg, method, precision, dist)
    groups = [{"params": [p for p in params if p.requires_grad], "name": name, "lr": t.lr}
              for name, params in method.param_groups().items()]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)
    ds_cfg = deepspeed_config(cfg, dist.world_size, precision)
    engine, optimizer, _, _ = deepspeed.initialize(model=method, optimizer=optimizer,
                                                   config=ds_cfg, dist_init_required=False)
    engine.checkpoint_engine = ckpt.make_safe_checkpoint_engine(engine.checkpoint_engine)
    if t.compile:
        engine.compile()  # in place: module names and checkpoints stay as they are

    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / PREEMPTED_MARKER).unlink(missing_ok=True)  # this attempt has not been preempted
        dump_config(cfg, out / "config.yaml")
        write_splits(out, cfg.data.store, fingerprint, cfg.data.fold, train_ids, val_ids)
        ckpt.atomic_write_text(out / "ds_config.json", json.dumps(ds_cfg, indent=2) + "\n")
    torch.distributed.barrier()
    log = JsonlLog(out / "log.jsonl", dist.is_main)
    tb = None
    if t.tensorboard and dist.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            echo("tensorboard not installed; train.tensorboard ignored")

    state = LoopState()
    if resume:
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=existing)
        if client is None:
            raise TrainError(f"{ckpt_dir / existing}: DeepSpeed could not load the checkpoint")
        state = LoopState.from_client(client)
        torch.set_rng_state(client["torch_rng"])
        echo(f"resumed from {existing}: epoch {state.epoch}, step {state.step}")

    preempt = _Preemption()
    student_group = next((i for i, g in enumerate(optimizer.param_groups)
                          if g.get("name") == "student"), None)

    def client_state() -> dict[str, Any]:
        return {**state.to_client(), "torch_rng": torch.get_rng_state(), "config_hash": chash}

    def save_checkpoint() -> None:
        meta = {"config_hash": chash, "epoch": state.epoch, "step": state.step,
                "micro_in_epoch": state.micro_in_epoch, "world_size": dist.world_size}
        tag = ckpt.save(engine, ckpt_dir, state.step, client_state(), meta, t.keep_last,
                        dist.is_main)
        if dist.is_main:
            _save_student(out / "student.pt", method, cfg, chash, state, val_dice={})
        echo(f"checkpoint {tag}")

    summary: dict[str, Any] = {"preempted": False}
    timers = {"data": 0.0, "forward": 0.0, "backward": 0.0, "step": 0.0}
    n_timed = 0
    term_sums: dict[str, float] = {}
    run_start = time.perf_counter()
    samples_since_log, log_clock = 0, time.perf_counter()

    while state.epoch < t.epochs:
        dataset.set_epoch(state.epoch)
        _apply_frozen_groups(method, optimizer, state.epoch)
        engine.train()
        tic = time.perf_counter()
        for batch in _batches(dataset, state.micro_in_epoch * t.batch_size, t.batch_size,
                              cfg.data.num_workers):
            image, label = finish_batch(
                batch, dist.device, torch.bfloat16 if precision == "bf16" else torch.float32)
            timers["data"] += time.perf_counter() - tic  # waiting for the batch + finishing it
            inputs = {"image": image, "label": label}
            t0 = time.perf_counter()
            result = engine(inputs, state.epoch)
            t1 = time.perf_counter()
            engine.backward(result.loss)
            t2 = time.perf_counter()
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            t3 = time.perf_counter()
            timers["forward"] += t1 - t0
            timers["backward"] += t2 - t1
            timers["step"] += t3 - t2
            n_timed += 1
            for k, v in result.stats.items():
                state.epoch_stats[k] = state.epoch_stats.get(k, 0) + v.detach().double().cpu()
            for k, v in result.terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + float(v)
            term_sums["loss"] = term_sums.get("loss", 0.0) + float(result.loss.detach())
            state.micro_in_epoch += 1
            samples_since_log += t.batch_size * dist.world_size
            if boundary:
                state.step += 1
                if state.step % t.log_every == 0 and n_timed:
                    now = time.perf_counter()
                    record = {"kind": "train", "step": state.step, "epoch": state.epoch,
                              **{f"loss/{k}" if k != "loss" else k: v / n_timed
                                 for k, v in term_sums.items()},
                              **{f"time/{k}": v / n_timed for k, v in timers.items()},
                              "samples_per_s": samples_since_log / max(now - log_clock, 1e-9),
                              **{f"lr/{g.get('name', i)}": g["lr"]
                                 for i, g in enumerate(optimizer.param_groups)},
                              **_method_extras(method)}
                    log.write(record)
                    if tb is not None:
                        for k, v in record.items():
                            if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                                tb.add_scalar(k, v, state.step)
                    if dist.is_main:
                        echo(f"epoch {state.epoch} step {state.step} loss "
                             f"{record['loss']:.4f} {record['samples_per_s']:.2f} samples/s "
                             f"(data {record['time/data'] * 1e3:.0f} ms)")
                    timers = dict.fromkeys(timers, 0.0)
                    term_sums, n_timed = {}, 0
                    samples_since_log, log_clock = 0, now
                flag = torch.tensor([1.0 if preempt.requested else 0.0])
                flag = all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                if flag.item() > 0:
                    save_checkpoint()
                    summary["preempted"] = True
                    log.write({"kind": "preempted", "step": state.step, "epoch": state.epoch})
                    if dist.is_main:  # before _finish's barrier: no rank exits without it
                        ckpt.atomic_write_text(out / PREEMPTED_MARKER,
                                               json.dumps({"step": state.step}) + "\n")
                    return _finish(summary, state, out, dist)
                if t.ckpt_every and state.step % t.ckpt_every == 0:
                    save_checkpoint()
            tic = time.perf_counter()

        # ---- end of epoch: method statistics over all ranks, validation, plateau
        reduced = _all_reduce_sum(state.epoch_stats) if state.epoch_stats else {}
        extras = method.end_epoch(reduced)
        record = {"kind": "epoch", "epoch": state.epoch, "step": state.step, **extras}
        val = None
        if val_ids and t.val_every and (state.epoch + 1) % t.val_every == 0:
            val = validate(method, cfg, val_ids, dist)
            record.update({f"val/dice_{k}": v for k, v in val.items()})
            state.val_history.append({"epoch": state.epoch, **val})
            mean_dice = float(np.mean([val["WT"], val["TC"], val["ET"]]))
            if mean_dice > state.best_metric:
                state.best_metric, state.best_epoch = mean_dice, state.epoch
                if dist.is_main:
                    _save_student(out / "best_student.pt", method, cfg, chash, state, val)
                    ckpt.atomic_write_text(out / "best.json", json.dumps(
                        {"epoch": state.epoch, "step": state.step, "mean_dice": mean_dice,
                         "dice": val}, indent=2) + "\n")
            if "student" not in method.frozen_groups(state.epoch):
                # A frozen student (KD-Net's stage 1) neither improves nor stalls.
                _plateau(state, 1.0 - mean_dice, t, optimizer, student_group, echo)
        log.write(record)
        if dist.is_main:
            echo(f"epoch {state.epoch} done" + (
                "" if val is None else " val dice " + " ".join(
                    f"{k} {v:.3f}" for k, v in val.items())))
        state.epoch += 1
        state.micro_in_epoch = 0
        state.epoch_stats = {}

    if ckpt.latest_tag(ckpt_dir) != ckpt.step_tag(state.step) or not t.ckpt_every:
        save_checkpoint()
    else:  # the last step was just checkpointed: only the end-of-run student file is missing
        if dist.is_main:
            _save_student(out / "student.pt", method, cfg, chash, state, val_dice={})
    summary["seconds"] = time.perf_counter() - run_start
    summary["ranks_in_sync"] = _ranks_in_sync(method)
    return _finish(summary, state, out, dist)


def check_training_store(store: str | Path, fold: int) -> tuple[StoreInfo, list[str], list[str]]:
    """The store's info and the fold's (train, validation) ids, or a one-line refusal.

    Checked before anything is built, so a bad store never fails after step 1: every case
    completely written (`check_store_complete`), the fold in range with cases on both sides,
    and a `label` array with data for every case the run will read.

    Raises:
        StoreFormatError: not a store, or incomplete cases. TrainError: a fold out of range, a
            store with too few labelled cases for the split, or a case without its labels.
    """
    check_store_complete(store)
    info = StoreInfo.read(store)
    if not info.labelled_cases:
        raise TrainError(f"{store}: the store has no labelled cases; training needs labels "
                         "(preprocess a raw folder with segmentations)")
    try:
        train_ids, val_ids = split_cases(info, fold)
    except ValueError as exc:
        raise TrainError(f"{store}: data.fold={fold}: {exc}") from None
    cases = Path(store) / "cases"
    for cid in [*train_ids, *val_ids]:
        label = cases / cid / "label"
        if not (label / "zarr.json").is_file() or not (label / "c").exists():
            raise TrainError(f"{label}: labelled case {cid} has no label array; re-run "
                             "`mtcmkd preprocess` on the same raw folder to repair it")
    return info, train_ids, val_ids


def write_splits(out: Path, store: str | Path, fingerprint: str, fold: int,
                 train_ids: list[str], val_ids: list[str]) -> None:
    """`RUN/splits.json`: which store (absolute path, fingerprint) and cases the run used.

    evaluate/predict compare it with the store they are given, so a model is never scored on
    its own training cases by mistake.
    """
    record = {"store": str(Path(store).resolve()), "store_fingerprint": fingerprint,
              "fold": int(fold), "train": list(train_ids), "validation": list(val_ids),
              "test": []}
    ckpt.atomic_write_text(Path(out) / SPLITS_FILE, json.dumps(record, indent=2) + "\n")


def _check_same_store(out: Path, store: str | Path, fingerprint: str) -> None:
    """On --resume: refuse when the store changed since the run started (cases, folds)."""
    path = Path(out) / SPLITS_FILE
    if not path.is_file():
        return  # a run from before splits.json: nothing to compare, it is written now
    try:
        recorded = json.loads(path.read_text()).get("store_fingerprint")
    except (OSError, ValueError, AttributeError):
        raise TrainError(f"{path}: unreadable splits record; restore it or start a new run"
                         ) from None
    if recorded != fingerprint:
        raise TrainError(f"{store}: the store changed since the run started (fingerprint "
                         f"{str(recorded)[:12]} in {path}, now {fingerprint[:12]}: cases or "
                         "folds differ); resume with the original store or start a new run")


#: Bytes of saved activations per (network width x voxel) of each level, measured with
#: autograd's saved-tensor hooks on one training forward (resunet 25-30, kdnet 11-14, in
#: float32 elements), rounded up; backward adds the activation gradients of one level at a time.
ACTIVATION_FACTOR: dict[str, float] = {"resunet": 32.0, "kdnet": 16.0}
#: Optimiser-side bytes per parameter: weights, gradients and Adam's two moments (float32).
BYTES_PER_PARAMETER = 16
#: Head room for the backward pass's activation gradients and allocator slack.
BACKWARD_OVERHEAD = 1.25


def estimate_training_memory(widths: tuple[int, ...], kind: str, n_networks: int,
                             n_parameters: int, patch_size: tuple[int, int, int],
                             batch_size: int, bytes_per_activation: int) -> int:
    """Bytes one rank needs beyond the loaded process: activations of every network of the
    method at `patch_size` x `batch_size`, plus optimiser state.

    An activation unit is one channel of one voxel at a level: a network of widths w_0..w_L
    on a patch of V voxels has sum_l w_l V / 8^l of them; a training forward saves about
    :data:`ACTIVATION_FACTOR` [kind] tensors' worth of them per unit.
    """
    voxels = float(np.prod(patch_size))
    units = sum(w * voxels / 8**level for level, w in enumerate(widths))
    activations = (units * ACTIVATION_FACTOR[kind] * bytes_per_activation * batch_size
                   * n_networks * BACKWARD_OVERHEAD)
    return int(activations + n_parameters * BYTES_PER_PARAMETER)


def available_memory(device: torch.device) -> int | None:
    """Free bytes for this process: the GPU's free memory, else MemAvailable of
    /proc/meminfo capped by a cgroup limit; None where neither can be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:  # a container's limit is lower than the host's MemAvailable
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def _check_memory(cfg: RunConfig, method: Any, precision: str, dist: DistInfo) -> None:
    """Refuse, on every rank, a patch x batch whose estimate exceeds the memory available."""
    from mtcmkd.models import KDNetUNet, ResidualUNet

    networks = [m for m in method.modules() if isinstance(m, (ResidualUNet, KDNetUNet))]
    widths = cfg.model.effective_widths
    need = estimate_training_memory(
        widths, cfg.model.kind, max(len(networks), 1),
        sum(p.numel() for p in method.parameters()), tuple(cfg.data.patch_size),
        cfg.train.batch_size, 2 if precision == "bf16" else 4)
    have = available_memory(dist.device)
    # Ranks of one node share its CPU memory.
    share = have if have is None or dist.device.type == "cuda" else have // max(
        int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    short = torch.tensor([1.0 if share is not None and need > share else 0.0])
    if all_reduce(short, op=torch.distributed.ReduceOp.MAX).item() > 0:
        patch = "x".join(map(str, cfg.data.patch_size))
        where = "on another rank" if share is None or need <= share else (
            f"{share / 2**30:.1f} GiB available on {dist.device.type}")
        raise TrainError(f"data.patch_size={patch} x train.batch_size={cfg.train.batch_size}: "
                         f"estimated {need / 2**30:.1f} GiB to train {len(networks)} "
                         f"network(s), {where}; use a smaller patch or batch (or "
                         "--no-memory-check to try anyway)")


def _finish(summary: dict, state: LoopState, out: Path, dist: DistInfo) -> dict:
    summary.update({"epoch": state.epoch, "step": state.step, "best_mean_dice":
                    None if state.best_epoch < 0 else state.best_metric,
                    "best_epoch": state.best_epoch, "run_dir": str(out),
                    "world_size": dist.world_size})
    torch.distributed.barrier()
    return summary


def _apply_frozen_groups(method: Any, optimizer: Any, epoch: int) -> None:
    """Learning rate 0 for the groups a method freezes this epoch (KD-Net's stages).

    DeepSpeed fills missing gradients of trainable parameters with zeros and Adam then still
    moves a parameter by its momentum (and weight decay); lr 0 makes "frozen" exact. The
    previous rate is kept in the param group (so it is checkpointed) and restored on thaw.
    """
    frozen = method.frozen_groups(epoch)
    for group in optimizer.param_groups:
        name = group.get("name")
        if name in frozen:
            if "lr_before_freeze" not in group:
                group["lr_before_freeze"] = group["lr"]
            group["lr"] = 0.0
        elif "lr_before_freeze" in group:
            group["lr"] = group.pop("lr_before_freeze")


def _ranks_in_sync(method: Any) -> bool:
    """True when every rank holds bit-identical parameters (data parallelism kept them equal)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten().cpu() for p in method.parameters()])
        local = torch.tensor([flat.sum().item(), (flat * flat).sum().item(),
                              (flat * torch.arange(flat.numel(), dtype=torch.float64)
                               ).sum().item()], dtype=torch.float64)
    low = all_reduce(local.clone(), op=torch.distributed.ReduceOp.MIN)
    high = all_reduce(local.clone(), op=torch.distributed.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def _method_extras(method: Any) -> dict[str, float]:
    extras = getattr(method, "log_values", None)
    return extras() if callable(extras) else {}


def _plateau(state: LoopState, val_loss: float, t: Any, optimizer: Any,
             student_group: int | None, echo: Callable[[str], None]) -> None:
    """ReduceLROnPlateau on the student's group only, from `plateau_start_epoch` (the paper)."""
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


def _save_student(path: Path, method: Any, cfg: RunConfig, chash: str, state: LoopState,
                  val_dice: dict[str, float]) -> None:
    from mtcmkd.student_weights import save_student

    save_student(path, method.student_network(), config=to_dict(cfg), config_hash=chash,
                 channels=tuple(method.student_channels()), output=cfg.model.output,
                 n_out=4 if cfg.model.output == "softmax" else 3,
                 patch_size=tuple(cfg.data.patch_size), val_dice=val_dice, step=state.step,
                 epoch=state.epoch)


@torch.no_grad()
def validate(method: Any, cfg: RunConfig, val_ids: list[str], dist: DistInfo) -> dict[str, float]:
    """Mean BraTS Dice (WT/TC/ET) of the student on the held-out cases, full volumes.

    Sliding-window inference on the cropped store volumes (model selection only; the reported
    metrics come from `mtcmkd evaluate` in native space). Cases are split over ranks and the
    sums all-reduced, so every rank gets the same numbers.
    """
    from mtcmkd.data import open_store
    from mtcmkd.inference import SlidingWindow, probabilities_to_labels
    from mtcmkd.metrics import score_case

    t = cfg.train
    ids = val_ids if t.val_cases is None else val_ids[: t.val_cases]
    root = open_store(cfg.data.store)
    channels = list(root.attrs["channels"])
    student = method.student_network()
    was_training = student.training
    student.eval()
    n_out = 4 if cfg.model.output == "softmax" else 3
    window = SlidingWindow(student, tuple(cfg.data.patch_size), n_out, overlap=0.5,
                           output=cfg.model.output)
    idx = [channels.index(c) for c in method.student_channels()]
    sums = torch.zeros(3, dtype=torch.float64)
    for cid in ids[dist.rank::dist.world_size]:
        g = root["cases"][cid]
        image = torch.from_numpy(np.asarray(g["image"][idx], dtype=np.float32))[None]
        param = next(student.parameters())
        probs = window(image.to(device=param.device, dtype=param.dtype))
        pred = probabilities_to_labels(probs[0], cfg.model.output).cpu().numpy()
        scores = score_case(pred, np.asarray(g["label"][...]), tuple(g.attrs["spacing"]))
        sums += torch.tensor([scores["dice"][r] for r in ("WT", "TC", "ET")], dtype=torch.float64)
    count = torch.tensor([float(len(ids[dist.rank::dist.world_size]))], dtype=torch.float64)
    sums, count = all_reduce(sums), all_reduce(count)
    student.train(was_training)
    mean = (sums / count.clamp(min=1)).tolist()
    return {"WT": mean[0], "TC": mean[1], "ET": mean[2]}


def run_summary_path(out: Path) -> Path:
    return Path(out) / "summary.json"


def write_summary(out: Path, summary: dict) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        ckpt.atomic_write_text(run_summary_path(out), json.dumps(summary, indent=2) + "\n")
