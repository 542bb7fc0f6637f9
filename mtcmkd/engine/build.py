"""Building a run apart from running it: checks, data, method, DeepSpeed engine, resume.

`build_run` does, in this order (the order is part of exact resume: the seeds come before the
method's weights are drawn):

1. the checks that need no process group (run folder, `--resume`, store, fold, labels), so a
   refusal costs no start-up;
2. the process group (`setup_distributed`), the rank-0 digest check of the checkpoint to resume;
3. seeds, the patch dataset, the method, the memory estimate, the optimiser groups, the
   DeepSpeed engine (weights-only loads, optional `torch.compile`);
4. the run folder's files (config, splits, DeepSpeed JSON), `log.jsonl`, the resumed state,
   and the preemption handlers.

The result, a `TrainRun`, holds everything the loop in `engine/trainer.py` touches.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mtcmkd.atomic import atomic_write_text
from mtcmkd.config import RunConfig, dump_config
from mtcmkd.data import StoreInfo, check_store_complete, split_cases, store_fingerprint
from mtcmkd.data.patches import PatchDataset, finish_batch
from mtcmkd.engine import checkpoint as ckpt
from mtcmkd.engine.checkpointer import Checkpointer, verify_resume
from mtcmkd.engine.dist import DistInfo, setup_distributed
from mtcmkd.engine.errors import TrainError
from mtcmkd.engine.memory import check_memory
from mtcmkd.engine.meter import RunLog
from mtcmkd.engine.run_folder import (
    PREEMPTED_MARKER,
    check_run_folder,
    check_same_store,
    write_splits,
)
from mtcmkd.engine.state import LoopState
from mtcmkd.engine.teachers import load_offline_teachers
from mtcmkd.engine.teachers import write_record as write_teachers_record
from mtcmkd.engine.validation import Validator
from mtcmkd.methods import Method, build_method


@dataclass
class TrainRun:
    """A built run: what the training loop reads and steps (rank-local objects)."""

    cfg: RunConfig
    out: Path
    dist: DistInfo
    dataset: PatchDataset
    method: Method
    engine: Any  # deepspeed.DeepSpeedEngine wrapping `method`
    optimizer: Any  # the optimiser DeepSpeed returned (param groups named as the method's)
    precision: str  # "fp32" or "bf16"
    state: LoopState
    checkpointer: Checkpointer
    validator: Validator
    log: RunLog
    echo: Callable[[str], None]

    def start_epoch(self) -> None:
        """Select the epoch's patches, freeze the groups the method freezes, train mode."""
        self.dataset.set_epoch(self.state.epoch)
        apply_frozen_groups(self.method, self.optimizer, self.state.epoch)
        self.engine.train()

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of this epoch's micro-batches, from `state.micro_in_epoch` on, on the
        device: ``{"image": (B, C, *patch), "label": (B, *patch)}``."""
        t = self.cfg.train
        loader = DataLoader(self.dataset, batch_size=t.batch_size,
                            sampler=range(self.state.micro_in_epoch * t.batch_size,
                                          len(self.dataset)),
                            num_workers=self.cfg.data.num_workers,
                            pin_memory=torch.cuda.is_available(), drop_last=True)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        for batch in loader:
            image, label = finish_batch(batch, self.dist.device, dtype)
            yield {"image": image, "label": label}


def build_run(cfg: RunConfig, out: Path, *, resume: bool = False, memory_check: bool = True,
              echo: Callable[[str], None] = print) -> TrainRun:
    """Check, set up and (with `resume`) restore a run; see the module docstring for the order.

    Raises:
        TrainError, CheckpointError, StoreFormatError: as :func:`mtcmkd.engine.trainer.train`.
    """
    out = Path(out)
    existing, complete = check_run_folder(cfg, out, resume, echo)
    if cfg.data.store is None:
        raise TrainError("data.store is not set (pass --store)")
    info, train_ids, val_ids = check_training_store(cfg.data.store, cfg.data.fold)
    fingerprint = store_fingerprint(cfg.data.store)
    if resume:
        check_same_store(out, cfg.data.store, fingerprint)

    # Imported here, not at module top: importing deepspeed detects an accelerator (and warns
    # on a CPU machine) and costs seconds, which the refusals above and every module that only
    # needs the engine's checks should not pay.
    import deepspeed

    dist = setup_distributed(cfg.train.collective_timeout_s)
    if len(train_ids) < dist.world_size:
        raise TrainError(f"{cfg.data.store}: fold {cfg.data.fold} leaves {len(train_ids)} "
                         f"training cases for {dist.world_size} ranks")
    if existing is not None:
        verify_resume(out / "checkpoints", existing, complete, dist, echo)

    t = cfg.train
    torch.manual_seed(t.seed + dist.rank)
    np.random.seed((t.seed + dist.rank) % 2**32)
    dataset = PatchDataset(cfg.data.store, train_ids, patch_size=cfg.data.patch_size,
                           samples_per_epoch=t.iters_per_epoch * t.grad_accum * t.batch_size,
                           fg_fraction=cfg.data.fg_fraction, seed=t.seed, rank=dist.rank,
                           world_size=dist.world_size, augment=cfg.data.augment,
                           defer_to_device=cfg.data.defer_to_device)
    method = build_method(cfg, info.channels)
    teachers_record = None
    if cfg.method.teachers_from is not None:
        teachers_record = load_offline_teachers(
            cfg, method, out=out, train_ids=train_ids, val_ids=val_ids,
            test_ids=info.test_cases, resume=existing is not None, echo=echo)
    method = method.to(dist.device)
    precision = resolve_precision(t.precision, dist.device)
    if memory_check:
        check_memory(cfg, method, precision, dist)
    groups = [{"params": [p for p in params if p.requires_grad], "name": name, "lr": t.lr}
              for name, params in method.param_groups().items()]
    optimizer = torch.optim.Adam([g for g in groups if g["params"]], lr=t.lr,
                                 weight_decay=t.weight_decay)
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
        write_splits(out, cfg.data.store, fingerprint, cfg.data.fold, train_ids, val_ids,
                     info.test_cases)
        atomic_write_text(out / "ds_config.json", json.dumps(ds_cfg, indent=2) + "\n")
        if teachers_record is not None:
            write_teachers_record(out, teachers_record)
    torch.distributed.barrier()
    log = RunLog(out, dist.is_main, tensorboard=t.tensorboard, echo=echo)
    checkpointer = Checkpointer(engine, method, cfg, out, dist, echo)
    state = LoopState()
    if existing is not None:
        state = checkpointer.load(existing)
        echo(f"resumed from {existing}: epoch {state.epoch}, step {state.step}")
    checkpointer.listen_for_preemption()
    validator = Validator(method, cfg, val_ids, dist, optimizer, checkpointer, echo)
    return TrainRun(cfg=cfg, out=out, dist=dist, dataset=dataset, method=method, engine=engine,
                    optimizer=optimizer, precision=precision, state=state,
                    checkpointer=checkpointer, validator=validator, log=log, echo=echo)


def check_training_store(store: str | Path, fold: int) -> tuple[StoreInfo, list[str], list[str]]:
    """The store's info and the fold's (train, validation) ids, or a one-line refusal.

    The store's test cases are in neither list (`split_cases`): a run never trains on them, and
    never selects its best model or steps its schedule on them.

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


def resolve_precision(precision: str, device: torch.device) -> str:
    """`train.precision` on this device: "auto" is bf16 on a GPU that supports it, else fp32.

    Raises:
        TrainError: bf16 asked for on a CPU.
    """
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
    return {
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


def apply_frozen_groups(method: Method, optimizer: Any, epoch: int) -> None:
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
