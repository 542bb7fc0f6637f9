"""A run's held-out cases as the cases to score (`mtcmkd evaluate --run`).

The cases are one of the run's recorded splits (``RUN/splits.json``, written by training),
never recomputed from the store, whose folds change when cases are added: by default its TEST
cases, which the run never saw; its validation cases, which selected the model and are so
scored optimistically, only when asked for. The store must be the one the run saw (its
fingerprint is compared with the recorded one). Each case is predicted on the store's brain
crop and put back on the original grid with its truth (:func:`store_scoring_cases`), so scores
count every voxel of the source volume.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtcmkd.config import ConfigError, load_config
from mtcmkd.data import StoreFormatError, StoreInfo, open_store, split_cases
from mtcmkd.data.store import check_store_complete, store_fingerprint
from mtcmkd.evaluation.errors import EvaluationError
from mtcmkd.evaluation.prediction import student_pipeline
from mtcmkd.evaluation.rules import ScoringCase
from mtcmkd.inference import InferenceSettings, segment_volume, uncrop
from mtcmkd.integrity import CheckpointError
from mtcmkd.nifti_io import InputError
from mtcmkd.student_weights import StudentBundle, load_student, resolve_student_path

__all__ = [
    "SPLITS",
    "SPLITS_FILE",
    "RecordedSplit",
    "RunEvaluationInputs",
    "VALIDATION_NOTE",
    "normalise_split",
    "read_recorded_split",
    "run_evaluation_inputs",
    "store_case_releases",
    "store_scoring_cases",
    "trained_releases",
]


#: The file in which `mtcmkd train` records its split and the store it saw.
SPLITS_FILE = "splits.json"
#: What `evaluate --run --split` accepts, the default first; "val" is read as "validation".
SPLITS = ("test", "validation", "all")
#: Said on the console and in metrics.json whenever the validation split is scored.
VALIDATION_NOTE = ("these cases selected the model (best checkpoint, plateau schedule): their "
                   "scores are optimistic; the test split is the honest estimate")


@dataclass(frozen=True)
class RecordedSplit:
    """A run's ``splits.json``: the cases it trained and validated on, and the store's
    fingerprint at that time (:func:`mtcmkd.data.store_fingerprint`)."""

    path: Path
    store: str | None
    store_fingerprint: str
    fold: int | None
    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]


def read_recorded_split(run_dir: Path) -> RecordedSplit | None:
    """``RUN/splits.json``, or None for a run trained before runs recorded their split.

    Raises:
        InputError: the file exists but is unreadable or lacks the expected keys.
    """
    path = Path(run_dir) / SPLITS_FILE
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        lists = {key: tuple(str(c) for c in doc.get(key) or ())
                 for key in ("train", "validation", "test")}
        fingerprint = doc["store_fingerprint"]
        fold = doc.get("fold")
        if not isinstance(fingerprint, str) or not (fold is None or isinstance(fold, int)):
            raise TypeError("store_fingerprint must be a string and fold an integer")
        store = doc.get("store")
        return RecordedSplit(path, None if store is None else str(store), fingerprint, fold,
                             lists["train"], lists["validation"], lists["test"])
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read it ({exc})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(path, f"not a valid split record ({type(exc).__name__}: {exc}); "
                               "expected store, store_fingerprint, fold, train, validation, "
                               "test") from None


def _shown(ids: Sequence[str], limit: int = 5) -> str:
    return ", ".join(ids[:limit]) + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")


def _store_changes(recorded: RecordedSplit, info: StoreInfo) -> dict[str, Any]:
    """How the store's labelled cases differ from the recorded split (as far as one can tell)."""
    before = set(recorded.train) | set(recorded.validation) | set(recorded.test)
    now = set(info.labelled_cases)
    changes: dict[str, Any] = {"added": sorted(now - before), "removed": sorted(before - now)}
    if recorded.fold is not None:
        try:
            held_out_now = split_cases(info, recorded.fold)[1]
        except ValueError:
            held_out_now = []
        # The danger: cases the run trained on now sit in its held-out fold.
        changes["trained_on_now_held_out"] = sorted(set(held_out_now) & set(recorded.train))
    # ...or in the store's test set (re-dealt since): scoring "test" anew would count them.
    seen = set(recorded.train) | set(recorded.validation)
    changes["seen_now_test"] = sorted((set(info.test_cases) - set(recorded.test)) & seen)
    return changes


def _describe_changes(changes: dict[str, Any], fold: int | None) -> str:
    parts = [f"{len(changes['added'])} case(s) added" + (
                 f" ({_shown(changes['added'])})" if changes["added"] else ""),
             f"{len(changes['removed'])} removed" + (
                 f" ({_shown(changes['removed'])})" if changes["removed"] else "")]
    leaked = changes.get("trained_on_now_held_out") or []
    if leaked:
        parts.append(f"fold {fold} now holds {len(leaked)} case(s) the run trained on "
                     f"({_shown(leaked)})")
    seen = changes.get("seen_now_test") or []
    if seen:
        parts.append(f"the test set now holds {len(seen)} case(s) the run trained or validated "
                     f"on ({_shown(seen)})")
    if not changes["added"] and not changes["removed"] and not leaked and not seen:
        parts.append("cases re-converted or folds re-dealt")
    return ", ".join(parts)


@dataclass
class RunEvaluationInputs:
    """What `evaluate --run` scores: the run's student, its store and the chosen cases.

    Attributes:
        split: which cases are scored: "test", "validation" or "all".
        split_note: a warning to show with the scores (the validation split selected the
            model; "all" includes training cases), or None for the test split.
        split_recorded: the run has ``splits.json`` (its cases are the recorded ones); False
            for older runs (the store's current fold is used).
        store_check: the fingerprint comparison, copied into metrics.json's ``source``.
        notes: one-line notes for the user (an unrecorded split, a changed store allowed).
    """

    bundle: StudentBundle
    student_path: Path
    store: Path
    fold: int
    case_ids: list[str]
    split: str = "test"
    split_note: str | None = None
    split_recorded: bool = False
    store_check: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _run_store(configured: str | None, recorded: RecordedSplit | None) -> Path | None:
    """The store a run trained on: ``data.store`` as typed when it exists from here (an
    absolute path, or a relative one from the folder training ran in), else the absolute path
    ``splits.json`` recorded at training, so ``evaluate --run`` works from any folder."""
    absolute = Path(recorded.store) if recorded is not None and recorded.store else None
    if configured is None:
        return absolute
    typed = Path(configured)
    if not typed.exists() and absolute is not None and absolute.exists():
        return absolute
    return typed


def normalise_split(split: str) -> str:
    """`--split` as given -> one of `SPLITS` ("val", the spelling before test sets, is read as
    "validation").

    Raises:
        EvaluationError: any other value.
    """
    split = "validation" if split == "val" else split
    if split not in SPLITS:
        raise EvaluationError(f"--split {split!r}: expected test, validation or all")
    return split


def run_evaluation_inputs(run_dir: Path, store: Path | None = None, split: str = "test", *,
                          allow_changed_store: bool = False) -> RunEvaluationInputs:
    """Load a run's best (else last) student and pick the cases to score.

    The cases of "test" and "validation" are the run's recorded ones (``RUN/splits.json``,
    written by training), never recomputed from the store's folds, which change when cases
    are added. The store must be the one the run saw: its fingerprint is compared with the
    recorded one, and a changed store is refused unless `allow_changed_store` (then the change
    is in ``store_check`` and ``notes``). A run without ``splits.json`` (trained before runs
    recorded their split) has no test set; its "validation" is the store's current fold
    ``data.fold``, with a note saying so.

    Args:
        run_dir: a run folder of `mtcmkd train` (config.yaml plus best_student.pt/student.pt).
        store: the Zarr store; default the run config's ``data.store`` (relative to the working
            directory, as in training), else the store recorded in ``splits.json``.
        split: "test" (default): the store's held-out test cases, which the run never saw;
            "validation" (or "val"): the run's validation fold, which selected the model
            (optimistic, and labelled so); "all": every labelled case of the store (training
            cases included: optimistic).
        allow_changed_store: score even when the store changed since training.

    Raises:
        EvaluationError: missing or invalid run files or store, an unknown split, a run with
            no test set asked for its test split, a store without the student's modalities, a
            store changed since training (not allowed), or recorded cases absent from the
            store (one line naming the file).
    """
    run_dir = Path(run_dir)
    split = normalise_split(split)
    if not run_dir.is_dir():
        raise InputError(run_dir, "not a run folder of `mtcmkd train`" if run_dir.exists()
                         else "no such run folder")
    try:
        cfg = load_config(run_dir / "config.yaml")
        student_path = resolve_student_path(run_dir)
        bundle = load_student(student_path)
    except (ConfigError, FileNotFoundError, ValueError, CheckpointError) as exc:
        raise EvaluationError(str(exc)) from None  # messages name the file
    recorded = read_recorded_split(run_dir)
    store_path = Path(store) if store is not None else _run_store(cfg.data.store, recorded)
    if store_path is None:
        raise InputError(run_dir / "config.yaml", "data.store is not set; pass --store")
    try:
        info = StoreInfo.read(store_path)
        check_store_complete(store_path)
    except (FileNotFoundError, StoreFormatError) as exc:
        raise EvaluationError(str(exc)) from None
    missing = [c for c in bundle.channels if c not in info.channels]
    if missing:
        raise InputError(store_path, f"the store has no {', '.join(missing)} channel "
                                     f"(has {', '.join(info.channels)})")
    if split == "test" and (recorded is None or not recorded.test):
        # Only the run's own record counts: the store's current test cases may have been in
        # a fold when the run trained (a store re-preprocessed since).
        why = (f"no {SPLITS_FILE} (the run predates recorded splits)" if recorded is None
               else f"{recorded.path} records none (its store was preprocessed without one: "
                    "written before test sets existed, or with --test-fraction 0)")
        raise InputError(run_dir, f"the run has no test set: {why}. Re-run `mtcmkd preprocess "
                                  "RAW STORE --test-fraction 0.2` and train again, or pass --split validation to score the cases that "
                                  "selected the model (optimistic, labelled as such)")

    notes: list[str] = []
    fold = cfg.data.fold
    store_check: dict[str, Any] = {"split_recorded": recorded is not None}
    if recorded is None:
        notes.append(f"{run_dir}: no {SPLITS_FILE} (the run predates recorded splits): its "
                     f"split was not recorded, so fold {fold} is taken as the store deals it "
                     "now; if cases were added since training it may hold training cases")
    else:
        fold = recorded.fold if recorded.fold is not None else fold
        try:
            current = store_fingerprint(store_path)
        except (OSError, ValueError) as exc:
            raise InputError(store_path, f"cannot fingerprint the store ({exc})") from None
        store_check.update({"recorded_fingerprint": recorded.store_fingerprint,
                            "fingerprint": current,
                            "changed": current != recorded.store_fingerprint})
        if current != recorded.store_fingerprint:
            changes = _store_changes(recorded, info)
            what = (f"store changed since training (its fingerprint differs from the one in "
                    f"{recorded.path}): {_describe_changes(changes, recorded.fold)}")
            scored = ("every labelled case" if split == "all"
                      else f"the run's recorded {split} cases")
            if not allow_changed_store:
                raise InputError(store_path, f"{what}; scores could count training cases as "
                                             f"held out. Pass --allow-changed-store to score "
                                             f"{scored} anyway")
            store_check.update(changes, allowed=True)
            notes.append(f"{store_path}: {what}; scoring {scored} (--allow-changed-store)")

    if split == "all":
        case_ids = list(info.labelled_cases)
    elif recorded is not None:
        case_ids = list(recorded.test if split == "test" else recorded.validation)
        absent = [c for c in case_ids if c not in set(info.labelled_cases)]
        if absent:
            raise InputError(store_path, f"{len(absent)} of the run's {len(case_ids)} recorded "
                                         f"{split} case(s) are not labelled cases of the "
                                         f"store ({_shown(absent)}); they cannot be scored")
    else:
        try:
            case_ids = split_cases(info, fold)[1]
        except ValueError as exc:
            raise InputError(store_path, str(exc)) from None
    if not case_ids:
        raise InputError(store_path, "no labelled case to evaluate")
    split_note = {"test": None, "validation": VALIDATION_NOTE,
                  "all": "every labelled case, the run's training cases included: its scores "
                         "are optimistic"}[split]
    return RunEvaluationInputs(bundle, student_path, store_path, fold, case_ids, split=split,
                               split_note=split_note, split_recorded=recorded is not None,
                               store_check=store_check, notes=notes)


def store_scoring_cases(bundle: StudentBundle, store: Path, case_ids: Sequence[str], *,
                        settings: InferenceSettings | None = None,
                        device: torch.device | str | None = None,
                        with_image: bool = False) -> Iterator[ScoringCase]:
    """Predict store cases and put prediction and truth back on the original grid.

    The store holds brain-cropped, z-scored images (docs/STORE.md); the prediction runs on the
    brain box of the student's channels inside the crop without renormalising (it is already
    z-scored as the student was trained), through the one inference pipeline with `settings`
    (default: the reference, :meth:`InferenceSettings.reference`), and both prediction and
    truth are uncropped with the case's ``crop_bbox`` to ``original_shape``, so scores count
    every voxel of the source volume as BraTS does (specificity included).
    """
    root = open_store(store)
    channels = list(root.attrs["channels"])
    index = [channels.index(c) for c in bundle.channels]
    pipeline = student_pipeline(bundle, settings, device=device, normalize=False)
    for case_id in case_ids:
        group = root["cases"][case_id]
        if "label" not in group:
            raise InputError(Path(store) / "cases" / case_id, "case has no label to score")
        attrs = group.attrs
        bbox, shape = attrs["crop_bbox"], attrs["original_shape"]
        image = np.asarray(group["image"][index], dtype=np.float32)
        result = segment_volume(pipeline, image)
        yield ScoringCase(
            case_id=case_id,
            prediction=uncrop(result.labels, bbox, shape),
            truth=uncrop(np.asarray(group["label"][...]), bbox, shape),
            spacing=tuple(float(s) for s in attrs["spacing"]),  # type: ignore[arg-type]
            image=uncrop(image[0], bbox, shape) if with_image else None,
            affine=np.asarray(attrs["affine"], dtype=np.float64),
        )


def store_case_releases(store: Path, case_ids: Sequence[str]) -> tuple[str, ...]:
    """The releases (``"2021"``, ``"2023"``, ``"msd"`` ...) the store's `case_ids` were
    converted from, sorted, read from each case's attributes (one small JSON per case).

    Raises:
        StoreFormatError, KeyError: not a store, or a case it does not hold.
    """
    cases = open_store(store)["cases"]
    return tuple(sorted({str(cases[case_id].attrs["release"]) for case_id in case_ids}))


def trained_releases(run_dir: Path) -> tuple[str, ...] | None:
    """The releases of the cases a run trained on, from its store; None when that cannot be
    told (a student file rather than a run folder, or a store no longer reachable).

    Reads ``RUN/splits.json`` (its training cases and the store's absolute path) and the run's
    config; the store's labelled cases stand in for a run that predates recorded splits.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        return None
    try:
        recorded = read_recorded_split(run_dir)
        cfg = load_config(run_dir / "config.yaml")
        store = _run_store(cfg.data.store, recorded)
        if store is None or not store.is_dir():
            return None
        ids = (recorded.train if recorded is not None and recorded.train
               else StoreInfo.read(store).labelled_cases)
        return store_case_releases(store, ids)
    except (InputError, ConfigError, StoreFormatError, FileNotFoundError, KeyError, OSError):
        return None
