"""What a run folder holds, and the checks that it belongs to the run about to start.

A run folder (`--out`) is `config.yaml`, `ds_config.json`, `splits.json`, `log.jsonl`,
`checkpoints/`, `student.pt`, `best_student.pt`, `best.json`, `summary.json` and, after a
preemption, `PREEMPTED`. The checks here need no process group, so a refusal costs no start-up:
a folder of another run is refused, the same run killed before its first checkpoint starts again
with the earlier attempt set aside, and `--resume` needs a complete checkpoint of the same
config and store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mtcmkd.atomic import atomic_write_text
from mtcmkd.config import ConfigError, RunConfig, config_hash, load_config
from mtcmkd.engine import checkpoint as ckpt
from mtcmkd.engine.dist import process_rank
from mtcmkd.engine.errors import TrainError

#: Written into the run folder, before any rank exits, when a run stopped for a preemption
#: warning. A launcher that kills the other ranks when the first one exits (srun
#: --kill-on-bad-exit) may report another exit code than 3; slurm/train.sh trusts this file.
PREEMPTED_MARKER = "PREEMPTED"
#: The run's record of its data: the store (path and fingerprint) and the case ids of its
#: train, validation and test splits.
SPLITS_FILE = "splits.json"
#: What a run writes into its folder; any of them means the folder belongs to a run.
RUN_FILES: tuple[str, ...] = ("config.yaml", "ds_config.json", "log.jsonl", "student.pt",
                              "best_student.pt", "best.json", "summary.json", SPLITS_FILE,
                              "tensorboard", PREEMPTED_MARKER)


def check_run_folder(cfg: RunConfig, out: Path, resume: bool,
                     echo: Callable[[str], None]) -> tuple[str | None, dict[str, Any]]:
    """Refuse a folder that cannot take this run; returns (checkpoint tag to resume, its COMPLETE).

    Without `resume`: `(None, {})`; the files of an unfinished attempt of the same config (no
    checkpoint) are moved to `out/attempt-<k>/` first. With `resume`: the newest complete tag
    and its COMPLETE record, whose config hash matches `cfg` (a config saved before a field was
    added counts as the same when today's loader reads it to the same hash).

    Raises:
        TrainError: `out` is a file; `--resume` without a checkpoint or with another config;
            a checkpoint or another run's files without `--resume`.
        CheckpointError: `latest` outside the run folder, or an unreadable COMPLETE.
    """
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
        if found and saved_config_hash(out) == chash:
            # The same run, killed before its first checkpoint (a node failure, a requeue):
            # start it again, keeping the earlier attempt's files apart so no log mixes two.
            set_aside_attempt(out, found, echo)
        elif found:
            raise TrainError(f"{out}: holds another run's files ({', '.join(found)}) and no "
                             "checkpoint to resume; choose a new --out folder (or --resume a "
                             "run that has checkpoints)")
        return None, {}
    assert existing is not None  # checked above; for the type checker
    complete = ckpt.read_complete(ckpt_dir, existing)
    saved_hash = complete["config_hash"]
    if saved_hash != chash and saved_config_hash(out, saved_hash) == chash:
        saved_hash = chash  # same settings; the code since added fields with defaults
    if saved_hash != chash:
        raise TrainError(f"{out}: the config differs from the one checkpoint {existing} was "
                         f"trained with (hash {saved_hash} vs {chash}); resume with the "
                         f"saved {out / 'config.yaml'} or start a new run")
    return existing, complete


def saved_config_hash(out: Path, written_as: str | None = None) -> str | None:
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


def set_aside_attempt(out: Path, found: list[str], echo: Callable[[str], None]) -> None:
    """Move an unfinished attempt's files to ``out/attempt-<k>/`` (rank 0 only; no checkpoint
    exists, so nothing there can be resumed)."""
    if process_rank() != 0:
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


def write_splits(out: Path, store: str | Path, fingerprint: str, fold: int,
                 train_ids: list[str], val_ids: list[str],
                 test_ids: Sequence[str] = ()) -> None:
    """`RUN/splits.json`: which store (absolute path, fingerprint) and cases the run used.

    `train` is what the run trained on, `validation` what selected its best model and drove
    the plateau schedule, `test` the store's held-out test cases, which it never saw (empty for
    a store without a test set). evaluate/predict compare it with the store they are given, so
    a model is never scored on its own training cases by mistake; `evaluate --run` scores
    `test` unless asked otherwise.
    """
    record = {"store": str(Path(store).resolve()), "store_fingerprint": fingerprint,
              "fold": int(fold), "train": list(train_ids), "validation": list(val_ids),
              "test": sorted(test_ids)}
    atomic_write_text(Path(out) / SPLITS_FILE, json.dumps(record, indent=2) + "\n")


def check_same_store(out: Path, store: str | Path, fingerprint: str) -> None:
    """On --resume: refuse when the store changed since the run started (cases, folds, test
    set)."""
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
                         f"{str(recorded)[:12]} in {path}, now {fingerprint[:12]}: cases, "
                         "folds or test set differ); resume with the original store or start a "
                         "new run")


def run_summary_path(out: Path) -> Path:
    return Path(out) / "summary.json"


def write_summary(out: Path, summary: dict) -> None:
    """`RUN/summary.json` (rank 0 only): what :func:`mtcmkd.engine.trainer.train` returned."""
    if process_rank() == 0:
        atomic_write_text(run_summary_path(out), json.dumps(summary, indent=2) + "\n")


def mark_preempted(out: Path, step: int) -> None:
    """Write `RUN/PREEMPTED` with the step of the checkpoint saved on the warning."""
    atomic_write_text(Path(out) / PREEMPTED_MARKER, json.dumps({"step": step}) + "\n")
