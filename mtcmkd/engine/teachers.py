"""Offline teachers: load converged, frozen teachers from an earlier run (``method.teachers_from``).

Teachers trained once per split can serve every student and seed; a student step then costs
the student's forward and backward plus the teachers' forwards (no teacher backward, no
teacher optimiser state). This module finds the source run's newest complete checkpoint,
checks it against the digests recorded at save, and hands each teacher network of the method
its weights, which the method then freezes (:meth:`mtcmkd.methods.Method.freeze_offline`).

Where each network comes from (``Method.teacher_networks`` names them as in ``state_dict``):

- the source's network of the same name (``teachers.flair`` of an MTCM-KD run, ``teacher`` of
  a KD-Net or Barlow run with the same teacher modalities, ``cdsfl``);
- else, for a teacher on modalities M, the *student* of a source run whose student modalities
  are exactly M (a T1ce baseline run is a T1ce teacher: the self-distillation control);
- else a fusion module (CDSFL) keeps training in this run on the frozen teachers' features, and
  a teacher network is an error.

Honesty checks, each a one-line :class:`TrainError` naming the file: the source must be a run
folder with a complete checkpoint, use the same ``model`` section, and must not have trained on
this run's validation or test cases, nor validated on its test cases (by case id, from the
source's ``splits.json``). The run folder records what was loaded in ``teachers.json`` (source,
checkpoint, file digests); a resumed run refuses a source whose checkpoint changed since.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mtcmkd.atomic import atomic_write_text
from mtcmkd.config import ConfigError, RunConfig, config_hash, load_config, to_dict
from mtcmkd.engine import checkpoint as ckpt
from mtcmkd.engine.errors import TrainError
from mtcmkd.integrity import safe_torch_load
from mtcmkd.messages import first_line
from mtcmkd.methods import Method

__all__ = ["TEACHERS_RECORD", "load_offline_teachers", "write_record"]

TEACHERS_RECORD = "teachers.json"
MODEL_STATES = "mp_rank_00_model_states.pt"


def load_offline_teachers(cfg: RunConfig, method: Method, *, out: Path,
                          train_ids: Sequence[str], val_ids: Sequence[str],
                          test_ids: Sequence[str], resume: bool,
                          echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Load and freeze ``method``'s teachers from ``cfg.method.teachers_from``.

    Returns:
        The record written to ``RUN/teachers.json`` (the caller writes it on rank 0).

    Raises:
        TrainError: not a finished run, another model, a case leak, weights that do not fit, or
            (with ``resume``) a source changed since this run started.
        CheckpointError: the source checkpoint's files differ from their recorded digests.
    """
    del train_ids  # the student's own training cases may overlap the teachers' freely
    source = Path(str(cfg.method.teachers_from))
    src_cfg = _source_config(source)
    _check_model(source, cfg, src_cfg)
    _check_no_leak(source, val_ids, test_ids)
    tag, meta, state = _source_weights(source, echo)
    record: dict[str, Any] = {
        "source": str(source.resolve()),
        "source_config_hash": config_hash(src_cfg),
        "source_method": src_cfg.method.name,
        "checkpoint": tag,
        "step": meta.get("step"),
        ckpt.FILES_SHA256: meta.get(ckpt.FILES_SHA256),
        "networks": {},
        "trained_here": [],
    }
    if resume:
        _check_same_source(out, record)
    loaded: set[str] = set()
    for name, (module, modalities) in method.teacher_networks().items():
        origin = _origin(name, modalities, state, src_cfg,
                         cfg.method.effective_teacher_modalities)
        if origin is None:
            if modalities is None:  # a fusion module: trained here on the frozen features
                record["trained_here"].append(name)
                continue
            raise TrainError(
                f"{source}: has no network for {name} (modalities {list(modalities)}): it is "
                f"a {src_cfg.method.name} run with teachers "
                f"{list(src_cfg.method.effective_teacher_modalities)} and student "
                f"{list(src_cfg.method.student_modalities)}")
        prefix = origin + "."
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            if modalities is None:  # a fusion module of another shape: trained here
                record["trained_here"].append(name)
                continue
            raise TrainError(f"{source / 'checkpoints' / tag / MODEL_STATES}: {origin} does not "
                             f"fit this run's {name}: {first_line(exc)}") from None
        loaded.add(name)
        record["networks"][name] = origin
    method.freeze_offline(loaded)
    echo(f"offline teachers from {source} ({tag}): "
         + ", ".join(f"{n} <- {o}" for n, o in record["networks"].items())
         + (f"; trained here: {', '.join(record['trained_here'])}"
            if record["trained_here"] else ""))
    return record


def write_record(out: Path, record: dict[str, Any]) -> None:
    """``RUN/teachers.json`` (rank 0)."""
    atomic_write_text(out / TEACHERS_RECORD, json.dumps(record, indent=2) + "\n")


def _source_config(source: Path) -> RunConfig:
    path = source / "config.yaml"
    if not source.is_dir():
        raise TrainError(f"{source}: method.teachers_from is not a folder; it must be a "
                         "finished run folder (the --out of an earlier `mtcmkd train`)")
    if not path.is_file():
        raise TrainError(f"{source}: not a run folder (no config.yaml); method.teachers_from "
                         "must be the --out folder of an earlier `mtcmkd train`")
    try:
        return load_config(path)
    except ConfigError as exc:
        raise TrainError(f"{path}: the teachers' run config does not load: "
                         f"{first_line(exc)}") from None


def _check_model(source: Path, cfg: RunConfig, src_cfg: RunConfig) -> None:
    mine, theirs = to_dict(cfg)["model"], to_dict(src_cfg)["model"]
    for key in mine:
        if key == "student_widths":  # the students may differ; the teachers are `widths`
            continue
        if mine[key] != theirs.get(key):
            raise TrainError(f"{source / 'config.yaml'}: model.{key} is {theirs.get(key)!r}, "
                             f"this run's is {mine[key]!r}; offline teachers must be the same "
                             "networks as the ones this run builds")


def _check_no_leak(source: Path, val_ids: Sequence[str], test_ids: Sequence[str]) -> None:
    path = source / "splits.json"
    try:
        splits = json.loads(path.read_text())
        src_train, src_val = set(splits["train"]), set(splits.get("validation", []))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainError(f"{path}: cannot read the teachers' case split ({first_line(exc)}); "
                         "without it nobody can tell whether they saw this run's test "
                         "cases") from None
    for seen, role, ours, what in ((src_train, "trained", test_ids, "test"),
                                   (src_train, "trained", val_ids, "validation"),
                                   (src_val, "validated", test_ids, "test")):
        leaked = sorted(seen.intersection(ours))
        if leaked:
            raise TrainError(
                f"{path}: the teachers {role} on {len(leaked)} of this run's {what} cases "
                f"({', '.join(leaked[:3])}{' ...' if len(leaked) > 3 else ''}); train the "
                "teachers on the same store and fold as the student")


def _source_weights(source: Path,
                    echo: Callable[[str], None]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    ckpt_dir = source / "checkpoints"
    tag = ckpt.latest_tag(ckpt_dir)
    if tag is None:
        raise TrainError(f"{ckpt_dir}: no complete checkpoint; the teachers' run must have "
                         "finished (or saved) at least once")
    meta = ckpt.read_complete(ckpt_dir, tag)
    if not ckpt.verify_files(ckpt_dir, tag, meta):
        echo(f"warning: {ckpt_dir / tag}: written before checkpoint digests existed; loaded "
             "unverified")
    path = ckpt_dir / tag / MODEL_STATES
    if not path.is_file():
        raise TrainError(f"{path}: missing; the teachers' checkpoint has no model states "
                         "(a ZeRO stage 3 run keeps them sharded, which is not supported)")
    payload = safe_torch_load(path, map_location="cpu")
    module = payload.get("module") if isinstance(payload, dict) else None
    if not isinstance(module, dict):
        raise TrainError(f"{path}: no 'module' state in the checkpoint")
    return tag, meta, {k.removeprefix("_orig_mod."): v for k, v in module.items()
                       if isinstance(v, torch.Tensor)}


def _origin(name: str, modalities: tuple[str, ...] | None, state: dict[str, Any],
            src_cfg: RunConfig, run_teachers: tuple[str, ...]) -> str | None:
    """The source's state-dict prefix for this run's network ``name``, or None."""
    has = any(k.startswith(name + ".") for k in state)
    src_teachers = tuple(src_cfg.method.effective_teacher_modalities)
    if has and modalities is None:
        # A fusion module weighs the teachers in order: only the same teachers, same order.
        return name if src_teachers == run_teachers else None
    if has and name == "teacher":
        # A single teacher (KD-Net, Barlow) must see the same modalities in both runs.
        if modalities == src_teachers:
            return name
    elif has:
        return name  # "teachers.<m>" names its modality
    if modalities is not None and tuple(src_cfg.method.student_modalities) == modalities \
            and any(k.startswith("student.") for k in state):
        return "student"
    return None


def _check_same_source(out: Path, record: dict[str, Any]) -> None:
    path = out / TEACHERS_RECORD
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if before.get(ckpt.FILES_SHA256) != record.get(ckpt.FILES_SHA256) \
            or before.get("checkpoint") != record.get("checkpoint"):
        raise TrainError(f"{path}: the teachers' run changed since this run started "
                         f"({before.get('checkpoint')} -> {record.get('checkpoint')}); "
                         "resuming would mix two sets of teachers; start a new run")
