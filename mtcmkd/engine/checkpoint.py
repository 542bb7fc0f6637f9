"""Checkpoints that count only when complete, loaded without unpickling arbitrary objects.

Layout of a run folder's `checkpoints/`:

    step_00000100/            DeepSpeed's files (every rank writes its own part)
    step_00000100/COMPLETE    written by rank 0 after every rank finished (a barrier)
    latest                    the tag of the newest complete checkpoint, replaced atomically

A crash while saving leaves a folder without COMPLETE, which is never loaded and is deleted by
the next save. Loading uses `torch.load(weights_only=True)`: a file that needs arbitrary Python
objects to unpickle (a tampered or foreign file) is refused with a clear message.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from mtcmkd.atomic import atomic_write_text

COMPLETE = "COMPLETE"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, tampered with or from another configuration."""


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """`torch.load` restricted to tensors and plain containers (weights_only=True)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refused to load: the file holds objects other than "
                              f"weights and plain values (tampered or foreign file?): {first}"
                              ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint file ({exc})") from None


def make_safe_checkpoint_engine(base_engine: Any) -> Any:
    """Wrap DeepSpeed's torch checkpoint engine so that every load is `weights_only`."""

    class SafeCheckpointEngine(type(base_engine)):  # type: ignore[misc]
        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_torch_load(path, map_location)

    safe = SafeCheckpointEngine.__new__(SafeCheckpointEngine)
    safe.__dict__.update(base_engine.__dict__)
    return safe


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir()
                  if p.is_dir() and p.name.startswith("step_") and (p / COMPLETE).is_file())


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint, or None. `latest` is trusted only if it is complete."""
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (ckpt_dir / tag / COMPLETE).is_file():
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def read_complete(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((ckpt_dir / tag / COMPLETE).read_text())


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict, meta: dict,
         keep_last: int, is_main: bool) -> str:
    """Save through DeepSpeed on every rank, then mark complete and prune (rank 0)."""
    tag = step_tag(step)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if is_main and (ckpt_dir / tag).exists() and not (ckpt_dir / tag / COMPLETE).exists():
        shutil.rmtree(ckpt_dir / tag)  # a partial save of an earlier, killed attempt
    torch.distributed.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.distributed.barrier()  # every rank's files are on disk
    if is_main:
        atomic_write_text(ckpt_dir / tag / COMPLETE, json.dumps(meta, indent=2) + "\n")
        atomic_write_text(ckpt_dir / LATEST, tag + "\n")
        for old in complete_tags(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        for p in ckpt_dir.iterdir():  # partial folders of killed saves
            if p.is_dir() and not (p / COMPLETE).exists() and p.name != tag:
                shutil.rmtree(p, ignore_errors=True)
    torch.distributed.barrier()
    return tag
