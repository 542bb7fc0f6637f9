"""Checkpoints that count only when complete, loaded without unpickling arbitrary objects.

Layout of a run folder's `checkpoints/`:

    step_00000100/            DeepSpeed's files (every rank writes its own part)
    step_00000100/rank_state_00001.pt
                              what only that rank knows (its epoch statistics so far, its RNG):
                              DeepSpeed keeps the client state of rank 0 alone at ZeRO 0, and a
                              rank resumed from rank 0's would continue another rank's epoch
    step_00000100/COMPLETE    written by rank 0 after every rank finished (a barrier): JSON
                              meta, with `files_sha256` = {file name: SHA-256} of the step's files
    latest                    the tag of the newest complete checkpoint, replaced atomically

A crash while saving leaves a folder without COMPLETE, which is never loaded and is deleted by
the next save. Loading uses `torch.load(weights_only=True)`: a file that needs arbitrary Python
objects to unpickle (a tampered or foreign file) is refused with a clear message. Flipped bytes
inside a tensor unpickle fine, so `--resume` first checks every file against the digests in
COMPLETE (:func:`verify_files`); checkpoints written before digests existed resume unverified,
with a warning. `latest` must name a step folder of this `checkpoints/` (never a path outside).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from mtcmkd.atomic import atomic_write_text

# CheckpointError and safe_torch_load live in mtcmkd.integrity (every reader of a weights file
# needs them, so they sit below the engine); importing them from here keeps working.
from mtcmkd.integrity import CheckpointError, file_sha256, safe_torch_load
from mtcmkd.messages import first_line

COMPLETE = "COMPLETE"
LATEST = "latest"
#: Key of COMPLETE's JSON: file name (relative to the step folder) -> SHA-256 of its bytes.
FILES_SHA256 = "files_sha256"
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
    """The newest complete checkpoint, or None. `latest` is trusted only if it is complete.

    Raises:
        CheckpointError: `latest` names something other than a step folder of `ckpt_dir` (an
            absolute path, `..`, a symbolic link out): resuming from it would mix in another
            run's weights.
    """
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if tag:
            _check_inside(ckpt_dir, tag)
            if (ckpt_dir / tag / COMPLETE).is_file():
                return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def _check_inside(ckpt_dir: Path, tag: str) -> None:
    target = ckpt_dir / tag
    inside = ("/" not in tag and "\\" not in tag and tag not in (".", "..")
              and not Path(tag).is_absolute())
    if inside and target.exists():
        # A step folder that is a link elsewhere is as foreign as `../x`.
        inside = target.resolve().parent == ckpt_dir.resolve()
    if not inside:
        raise CheckpointError(f"{ckpt_dir / LATEST}: points outside the run folder ({tag!r}); "
                              "it must hold the name of a step folder of this checkpoints/ "
                              "folder, e.g. step_00000100")


def read_complete(ckpt_dir: Path, tag: str) -> dict:
    """The JSON of a step's COMPLETE file.

    Raises:
        CheckpointError: the file is not a JSON object (edited or damaged).
    """
    path = ckpt_dir / tag / COMPLETE
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        first = first_line(exc)
        raise CheckpointError(f"{path}: unreadable COMPLETE file ({first}); resume from an "
                              "earlier checkpoint by removing this step folder") from None
    if not isinstance(meta, dict) or "config_hash" not in meta:
        raise CheckpointError(f"{path}: COMPLETE is not a checkpoint record (no config_hash); "
                              "resume from an earlier checkpoint by removing this step folder")
    return meta


def step_files_sha256(step_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of a step folder (COMPLETE excluded), by relative name."""
    return {str(p.relative_to(step_dir)): file_sha256(p)
            for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != COMPLETE}


def verify_files(ckpt_dir: Path, tag: str, meta: dict) -> bool:
    """Check the step's files against the digests COMPLETE recorded at save.

    Returns:
        True when verified, False for a checkpoint written before digests existed (no
        `files_sha256` in COMPLETE): it loads unverified and the caller warns.

    Raises:
        CheckpointError: a recorded file is missing or its bytes changed since the save.
    """
    recorded = meta.get(FILES_SHA256)
    if recorded is None:
        return False
    step_dir = ckpt_dir / tag
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{step_dir / COMPLETE}: {FILES_SHA256} is not a mapping")
    for name, digest in sorted(recorded.items()):
        path = step_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from checkpoint {tag} (recorded at save)")
        if file_sha256(path) != digest:
            raise CheckpointError(f"{path}: content differs from the digest recorded at save "
                                  "(damaged or modified file); resume from an earlier "
                                  "checkpoint by removing this step folder")
    return True


def rank_state_name(rank: int) -> str:
    return f"rank_state_{rank:05d}.pt"


def load_rank_state(ckpt_dir: Path, tag: str, rank: int) -> dict[str, Any] | None:
    """This rank's own part of checkpoint `tag` (weights-only load), or None when the step has
    none (a checkpoint written before ranks saved their own state)."""
    path = ckpt_dir / tag / rank_state_name(rank)
    return safe_torch_load(path) if path.is_file() else None


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict, meta: dict,
         keep_last: int, is_main: bool, rank_state: tuple[int, dict] | None = None) -> str:
    """Save through DeepSpeed on every rank, then mark complete and prune (rank 0).

    Args:
        rank_state: (rank, tensors) that only this rank holds, written as
            `rank_state_<rank>.pt` into the step folder (see the module docstring).
    """
    tag = step_tag(step)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if is_main and (ckpt_dir / tag).exists() and not (ckpt_dir / tag / COMPLETE).exists():
        shutil.rmtree(ckpt_dir / tag)  # a partial save of an earlier, killed attempt
    torch.distributed.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    if rank_state is not None:
        (ckpt_dir / tag).mkdir(exist_ok=True)
        torch.save(rank_state[1], ckpt_dir / tag / rank_state_name(rank_state[0]))
    # Every rank's files are on disk before rank 0 hashes them and writes COMPLETE: a rank lost
    # before this point (its node gone mid-save) fails this barrier on every other rank, so a
    # step folder without all its parts never gets COMPLETE.
    torch.distributed.barrier()
    if is_main:
        meta = {**meta, FILES_SHA256: step_files_sha256(ckpt_dir / tag)}
        atomic_write_text(ckpt_dir / tag / COMPLETE, json.dumps(meta, indent=2) + "\n")
        atomic_write_text(ckpt_dir / LATEST, tag + "\n")
        for old in complete_tags(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        for p in ckpt_dir.iterdir():  # partial folders of killed saves
            if p.is_dir() and not (p / COMPLETE).exists() and p.name != tag:
                shutil.rmtree(p, ignore_errors=True)
    torch.distributed.barrier()
    return tag
