"""Evaluation and prediction on native BraTS files: what `mtcmkd predict` and `evaluate` run.

Three parts, each a set of small functions the thin CLI strings together:

1. Prediction inputs: find the student's modality in a case folder of any release, a folder of
   cases, or a single NIfTI (:func:`find_prediction_inputs`); check and read it
   (:func:`check_prediction_input`, :func:`load_prediction_input`); segment one case and write
   the result with the source header in the release's label values (:func:`predict_case`,
   :func:`write_prediction`). Only the student's modalities are needed: the other files of a
   case may be absent.
2. Scoring: :func:`score_predictions` scores canonical label volumes on the native grid by the
   legacy BraTS per-case rules (plus the 2023+ lesion-wise rules, and optionally the MTCM-KD
   authors' slice-averaged Dice, clearly labelled); :func:`write_metrics` writes
   ``metrics.json`` and ``metrics.csv``. Cases come from a run's held-out store cases
   (:func:`run_evaluation_inputs`, :func:`store_scoring_cases`: predictions and truth are put
   back on the original grid first) or from prediction files of any tool
   (:func:`match_prediction_files`, :func:`prediction_file_cases`).
3. :data:`REFERENCE_NUMBERS`: published results to print next to ours, with whether each one is
   comparable (most are not; docs/METHODS.md explains why).

Label volumes here are canonical (0 background, 1 NCR/NETC, 2 ED/SNFH, 3 ET, 4 RC) unless a
name says otherwise; files on disk use their release's values (`mtcmkd.brats`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mtcmkd.atomic import atomic_write_text
from mtcmkd.brats import (
    REGIONS,
    RELEASE_INFO,
    LesionWiseParameters,
    Release,
    release,
    release_of_case_id,
    subchallenge,
)

if TYPE_CHECKING:
    import torch

    from mtcmkd.data import StoreInfo
    from mtcmkd.student_weights import StudentBundle

__all__ = [
    "HD95_DEFINITION",
    "REFERENCE_NUMBERS",
    "CaseFailure",
    "CasePrediction",
    "Evaluation",
    "EvaluationError",
    "EvaluationSettings",
    "InputError",
    "LoadedInput",
    "NotTaken",
    "PredictionInput",
    "PredictionInputs",
    "PredictionPair",
    "RecordedSplit",
    "ReferenceResult",
    "RunEvaluationInputs",
    "ScoringCase",
    "check_output_folder",
    "check_prediction_input",
    "discover_prediction_inputs",
    "find_prediction_inputs",
    "load_prediction_input",
    "load_truth",
    "match_prediction_files",
    "modality_in_file_name",
    "postprocess_labels",
    "predict_case",
    "prediction_file_cases",
    "read_recorded_split",
    "run_evaluation_inputs",
    "score_case_record",
    "score_predictions",
    "store_scoring_cases",
    "write_metrics",
    "write_prediction",
]

#: Largest affine difference (mm) between a prediction and its truth, as in preprocessing.
AFFINE_ATOL_MM = 1e-2


class EvaluationError(ValueError):
    """Something a user can fix; ``str()`` is one line that names the file or folder."""


class InputError(EvaluationError):
    """A bad input file or folder. ``str()`` is ``<path>: <reason>``, the one-line CLI error."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


# ----------------------------------------------------------------------------- inputs on disk


def _is_nifti(name: str) -> bool:
    return (name.endswith(".nii.gz") or name.endswith(".nii")) and not name.startswith(".")


def _strip_nifti(name: str) -> str:
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]


def _find_nifti(folder: Path, stem: str) -> Path | None:
    """`folder/stem.nii.gz` or `folder/stem.nii`; both present is ambiguous (InputError)."""
    found = [folder / f"{stem}{ext}" for ext in (".nii.gz", ".nii")
             if (folder / f"{stem}{ext}").is_file()]
    if len(found) > 1:
        raise InputError(found[0], f"both {found[0].name} and {found[1].name} present; keep one")
    return found[0] if found else None


def check_output_folder(path: Path, files: Sequence[str] = ()) -> None:
    """Refuse an output folder that cannot hold the outputs, before any work is done.

    Nothing is created; what is checked: `path` is a folder or can be made one (its nearest
    existing ancestor is a writable folder, not a file), and none of `files` (names inside
    `path`) is a folder where a file must go.

    Raises:
        InputError: naming the path at fault.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, "exists and is not a folder; pass a folder for the outputs")
    for name in files:
        if (path / name).is_dir():
            raise InputError(path / name, "is a folder where an output file goes; remove or "
                                          "rename it")
    ancestor = path
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(ancestor, f"is not a folder, so {path} cannot be created")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(ancestor, "not writable")


@dataclass(frozen=True)
class PredictionInput:
    """The files of one case to segment.

    Attributes:
        case_id: names the output, ``<case_id>.nii.gz``.
        release: release whose label values the output uses ("2021", "2023", "msd", ...).
        channel_files: student modality -> (file, index along the 4th axis for an MSD 4D file,
            else None), in the student's channel order.
        reference: the file whose affine and header the output copies (the first channel's).
        truth: the case's segmentation when present next to the images (overlays only).
    """

    case_id: str
    release: str
    channel_files: dict[str, tuple[Path, int | None]]
    reference: Path
    truth: Path | None = None


def _brats_case_input(folder: Path, info: Release, channels: Sequence[str]) -> PredictionInput:
    case_id = folder.name
    files: dict[str, tuple[Path, int | None]] = {}
    for channel in channels:
        if channel not in info.modality_suffix:
            raise InputError(folder, f"release {info.name} has no {channel} modality")
        path = _find_nifti(folder, f"{case_id}{info.separator}{info.modality_suffix[channel]}")
        if path is None:
            expected = folder / info.file_name(case_id, channel)
            raise InputError(expected, f"missing {channel}, the model's input modality "
                                       f"(expected {expected.name} or .nii)")
        files[channel] = (path, None)
    truth = _find_nifti(folder, f"{case_id}{info.separator}{info.seg_suffix}")
    return PredictionInput(case_id, info.name, files, files[channels[0]][0], truth)


def _msd_input(path: Path, channels: Sequence[str], truth: Path | None) -> PredictionInput:
    info = release("msd")
    missing = [c for c in channels if c not in info.msd_channel_order]
    if missing:
        raise InputError(path, f"MSD images have no {', '.join(missing)} channel")
    files = {c: (path, info.msd_channel_order.index(c)) for c in channels}
    return PredictionInput(_strip_nifti(path.name), "msd", files, path, truth)


def _release_of_file(stem: str, channels: Sequence[str]) -> Release | None:
    """The release whose naming the file follows (``<case id><sep><suffix>``, MSD: the id)."""
    info = release_of_case_id(stem)
    if info is not None and info.four_d:
        return info
    for candidate in (release(name) for name in ("2018", "2019", "2020", "2021", "2023")):
        suffix = f"{candidate.separator}{candidate.modality_suffix.get(channels[0], '?')}"
        if stem.endswith(suffix) and re.fullmatch(candidate.case_pattern, stem[: -len(suffix)]):
            return candidate
    return None


def _modality_tokens() -> dict[str, str]:
    """Lower-case file-name token -> what it names ("t1ce", ..., or "seg"), from every release.

    2021 and older: ``_t1/_t1ce/_t2/_flair/_seg``; 2023+: ``-t1n/-t1c/-t2w/-t2f/-seg``. The
    tokens of different releases never name different modalities, so one table serves all.
    """
    tokens: dict[str, str] = {}
    for info in RELEASE_INFO.values():
        for channel, suffix in info.modality_suffix.items():
            tokens[suffix.lower()] = channel
        if info.seg_suffix:
            tokens[info.seg_suffix.lower()] = "seg"
    return tokens


_MODALITY_TOKENS = _modality_tokens()


def modality_in_file_name(name: str) -> str | None:
    """The modality a NIfTI file's name says (``"flair"`` for ``BraTS2021_00000_flair.nii.gz``,
    ``"t1ce"`` for ``BraTS-GLI-00000-000-t1c.nii``, ``"seg"`` for a segmentation), or None
    when the name's last ``_``/``-``/``.``-separated token is no release's modality suffix.

    Case-insensitive (``..._FLAIR.nii.gz`` is FLAIR too).
    """
    stem = _strip_nifti(name) if _is_nifti(name) else name
    match = re.search(r"[._-]([A-Za-z0-9]+)$", stem)
    return _MODALITY_TOKENS.get(match.group(1).lower()) if match else None


def _case_of_named_file(stem: str) -> str:
    """``BraTS2021_00000_flair`` -> ``BraTS2021_00000``: the stem without its modality token."""
    return re.sub(r"[._-][A-Za-z0-9]+$", "", stem) if modality_in_file_name(stem) else stem


def _single_file_input(path: Path, channels: Sequence[str], year: str | None) -> PredictionInput:
    # The release decides the output's label values: never guess 2021 for a file whose name
    # says 2023 (ET would be written as 4, which 2023 reads as resection cavity).
    info = release(year) if year is not None else (
        _release_of_file(_strip_nifti(path.name), channels) or release("2021"))
    if info.four_d:
        return _msd_input(path, channels, None)
    if len(channels) != 1:
        raise InputError(path, f"the model needs {len(channels)} modalities "
                               f"({', '.join(channels)}); pass a case folder instead of one file")
    # A FLAIR file fed to a T1ce student runs without any error and gives a wrong segmentation:
    # refuse a file whose name says another modality (a name that says none is taken).
    stem = _strip_nifti(path.name)
    said = modality_in_file_name(path.name)
    if said is not None and said != channels[0]:
        what = "a segmentation" if said == "seg" else f"modality {said}"
        case = _case_of_named_file(stem)
        raise InputError(path, f"the file name says {what}, but the model reads "
                               f"{channels[0]} only; pass the case's {channels[0]} file "
                               f"({info.file_name(case, channels[0])})")
    suffix = f"{info.separator}{info.modality_suffix[channels[0]]}"
    # BraTS2021_00000_t1ce.nii.gz -> case id BraTS2021_00000; any other name keeps its stem.
    case_id = stem[: -len(suffix)] if stem.endswith(suffix) and len(stem) > len(suffix) else stem
    return PredictionInput(case_id, info.name, {channels[0]: (path, None)}, path, None)


def _case_folder_release(folder: Path, forced: Release | None) -> Release | None:
    """The release of a case folder (by its name, or by its files' names when forced)."""
    if forced is not None:
        prefix = f"{folder.name}{forced.separator}"
        try:
            names = os.listdir(folder)
        except OSError:
            return None
        return forced if any(_is_nifti(n) and n.startswith(prefix) for n in names) else None
    info = release_of_case_id(folder.name)
    return None if info is None or info.four_d else info


@dataclass(frozen=True)
class NotTaken:
    """An entry of the input tree that is not segmented, and why (reported, never silent)."""

    path: Path
    reason: str


@dataclass(frozen=True)
class CaseFailure:
    """A case that cannot be segmented. ``str()`` is ``<path>: <reason>``, the file at fault."""

    case_id: str
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class PredictionInputs:
    """What :func:`discover_prediction_inputs` found under the input path.

    Attributes:
        cases: the cases to segment, sorted by case id.
        failed: cases found but not segmentable (a missing student modality, a file named as
            another modality, two cases with one id), each naming the file at fault.
        not_taken: every other entry of the tree that is not part of a case, with the reason.
    """

    cases: list[PredictionInput] = field(default_factory=list)
    failed: list[CaseFailure] = field(default_factory=list)
    not_taken: list[NotTaken] = field(default_factory=list)


def _case_ids_in_names(names: Iterable[str]) -> list[str]:
    """Case ids of any release that NIfTI file names start with (``<id><sep><suffix>``)."""
    ids = set()
    for name in names:
        if not _is_nifti(name):
            continue
        stem = _strip_nifti(name)
        for info in RELEASE_INFO.values():
            if info.four_d:
                continue
            head, sep, _ = stem.rpartition(info.separator)
            if sep and re.fullmatch(info.case_pattern, head):
                ids.add(head)
    return sorted(ids)


def _not_a_case_folder(folder: Path, names: Sequence[str], forced: Release | None) -> str:
    """Why a folder holding NIfTI files is not read as a case folder (one line)."""
    if forced is not None:
        reason = (f"no file is named {folder.name}{forced.separator}<modality>, as BraTS "
                  f"{forced.name} names a case folder's files")
    else:
        reason = ("the folder name is not a case id of any BraTS release (e.g. BraTS2021_00000, "
                  "BraTS-GLI-00000-000)")
    ids = _case_ids_in_names(names)
    if ids:
        reason += (f"; its files name case {', '.join(ids[:3])}: rename the folder to the case "
                   "id (a copy?)")
    return reason


class _Walk:
    """Depth-first walk of a folder of case folders that reports every entry it does not take.

    Symbolic links to folders are followed (clusters often link case folders in); a link back
    to a folder already read is reported instead of read twice.
    """

    def __init__(self, channels: Sequence[str], forced: Release | None,
                 found: PredictionInputs) -> None:
        self.channels, self.forced, self.found = channels, forced, found
        self.visited: set[str] = set()

    def add_case(self, folder: Path, info: Release) -> None:
        try:
            self.found.cases.append(_brats_case_input(folder, info, self.channels))
        except InputError as exc:
            self.found.failed.append(CaseFailure(folder.name, exc.path, exc.reason))

    def visit(self, folder: Path, top: bool) -> bool:
        """Read `folder`; True when it gave a case, a failure or a not-taken entry."""
        real = os.path.realpath(folder)
        if real in self.visited:
            self.found.not_taken.append(NotTaken(folder, f"a link to {real}, read already"))
            return True
        self.visited.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            self.found.not_taken.append(NotTaken(folder, f"cannot list it ({exc.strerror})"))
            return True
        names = [e.name for e in entries]
        if not top and any(_is_nifti(n) for n in names):
            # Files of a case in a folder not named as one ("BraTS2021_00000 copy"): say so
            # once for the folder rather than once per file.
            self.found.not_taken.append(NotTaken(folder, _not_a_case_folder(
                folder, names, self.forced)))
            return True
        reported = False
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
                is_file = not is_dir and entry.is_file(follow_symlinks=True)
            except OSError:
                is_dir = is_file = False
            if entry.name.startswith(".") and not is_dir:
                continue  # hidden files: macOS ._* side files, .DS_Store
            reported = True
            if is_dir and entry.name.startswith("."):
                self.found.not_taken.append(NotTaken(path, "hidden folder"))
            elif is_dir and (info := _case_folder_release(path, self.forced)) is not None:
                self.add_case(path, info)
            elif is_dir:
                if not self.visit(path, top=False):
                    what = f"BraTS {self.forced.name}" if self.forced else "BraTS"
                    self.found.not_taken.append(NotTaken(path, f"no {what} case folder or "
                                                               "NIfTI file inside"))
            elif not is_file:
                self.found.not_taken.append(NotTaken(path, "a broken link or not a regular "
                                                           "file"))
            elif _is_nifti(entry.name):
                self.found.not_taken.append(NotTaken(path, _not_a_case_folder(
                    folder, [entry.name], self.forced) if not top else
                    "a NIfTI file outside a case folder (pass one file at a time as --input, "
                    "or put it in a folder named by its case id)"))
            else:
                self.found.not_taken.append(NotTaken(path, "not a NIfTI file"))
        return reported


def _msd_inputs(path: Path, msd_dirs: list[Path], channels: Sequence[str],
                found: PredictionInputs) -> None:
    for folder in msd_dirs:
        labels = path / "labelsTr" if folder.name == "imagesTr" else None
        for name in sorted(os.listdir(folder)):
            if name.startswith("."):
                continue
            if not _is_nifti(name):
                found.not_taken.append(NotTaken(folder / name, "not a NIfTI file"))
                continue
            try:
                truth = _find_nifti(labels, _strip_nifti(name)) if labels is not None else None
                found.cases.append(_msd_input(folder / name, channels, truth))
            except InputError as exc:
                found.failed.append(CaseFailure(_strip_nifti(name), exc.path, exc.reason))
    if any(folder != path for folder in msd_dirs):
        # The MSD layout's other entries are expected; anything else (e.g. BraTS case folders
        # beside imagesTr/) is named, never dropped silently.
        expected = {d.name for d in msd_dirs} | {"labelsTr", "dataset.json"}
        for name in sorted(os.listdir(path)):
            if name not in expected and not name.startswith("."):
                found.not_taken.append(NotTaken(path / name, "not part of the MSD layout "
                                                             "(imagesTr/, imagesTs/, labelsTr/); "
                                                             "pass --year to read BraTS case "
                                                             "folders instead"))


def discover_prediction_inputs(path: Path, channels: Sequence[str],
                               year: str | None = None) -> PredictionInputs:
    """Every case to segment under `path`, every case that cannot be, and every entry not taken.

    Args:
        path: one case folder of any release (its name as the release names cases, e.g.
            ``BraTS2021_00000/`` or ``BraTS-GLI-00000-000/``), a folder of such case folders at
            any depth (2018/2019 ``HGG/``, ``LGG/``; symbolic links followed), an MSD Task01
            folder (``imagesTr/``, ``imagesTs/``: one 4D file per case), or a single NIfTI of
            the student's modality.
        channels: the student's modalities in its input order (e.g. ``("t1ce",)``); only these
            files are looked for, so cases with the other modalities absent are fine.
        year: force the release (its file naming and label values). Default: each case folder's
            name decides; a single file's name decides when it follows a release's naming
            (``BraTS-GLI-00000-000-t1c.nii.gz`` is 2023), else 2021 (values 0, 1, 2, 4).

    Returns:
        :class:`PredictionInputs`: a bad case (missing student modality, a single file named as
        another modality, a duplicate case id) is in ``failed`` and does not stop the others;
        hidden files (``._*``, ``.DS_Store``) are the only entries passed over unnamed.

    Raises:
        InputError: the input as a whole is unusable: missing, a non-NIfTI file, an unknown
            release, or nothing at all found.
    """
    path = Path(path)
    try:
        forced = release(year) if year is not None else None
    except ValueError as exc:
        raise InputError(path, str(exc)) from None
    found = PredictionInputs()
    if path.is_file():
        if not _is_nifti(path.name):
            raise InputError(path, "not a NIfTI file (.nii or .nii.gz)")
        try:
            found.cases.append(_single_file_input(path, channels, year))
        except InputError as exc:
            found.failed.append(CaseFailure(_case_of_named_file(_strip_nifti(path.name)),
                                            exc.path, exc.reason))
        return found
    if not path.is_dir():
        raise InputError(path, "no such file or folder")

    msd_dirs = [path / d for d in ("imagesTr", "imagesTs") if (path / d).is_dir()]
    if (forced is not None and forced.four_d) or (forced is None and msd_dirs):
        _msd_inputs(path, msd_dirs or [path], channels, found)
    elif (info := _case_folder_release(path, forced)) is not None:
        _Walk(channels, forced, found).add_case(path, info)
    else:
        _Walk(channels, forced, found).visit(path, top=True)
    if not found.cases and not found.failed:
        what = f"BraTS {forced.name}" if forced is not None else "BraTS (any release)"
        skipped = f"; {len(found.not_taken)} entries not taken, e.g. {found.not_taken[0].path}: " \
                  f"{found.not_taken[0].reason}" if found.not_taken else ""
        raise InputError(path, f"no {what} case found (expected a case folder such as "
                               "BraTS2021_00000/ or BraTS-GLI-00000-000/, a folder of them, MSD "
                               "imagesTr/, or one NIfTI file; --year reads other folder names)"
                               f"{skipped}")
    by_id: dict[str, list[PredictionInput]] = {}
    for item in found.cases:
        by_id.setdefault(item.case_id, []).append(item)
    for case_id, same in by_id.items():
        if len(same) > 1:  # outputs would collide: fail every copy, keep the others going
            for item in same:
                others = ", ".join(str(o.reference) for o in same if o is not item)
                found.failed.append(CaseFailure(case_id, item.reference, f"case id {case_id} "
                                                f"also comes from {others}; outputs would "
                                                "collide"))
    found.cases = sorted((c for c in found.cases if len(by_id[c.case_id]) == 1),
                         key=lambda item: item.case_id)
    found.failed.sort(key=lambda f: (f.case_id, str(f.path)))
    return found


def find_prediction_inputs(path: Path, channels: Sequence[str],
                           year: str | None = None) -> list[PredictionInput]:
    """The cases to segment under `path`, sorted by case id; strict: the first bad case raises.

    The same search as :func:`discover_prediction_inputs` (see there for `path`, `channels`,
    `year`) for callers that want all cases or none.

    Raises:
        InputError: nothing to segment, a missing student modality (the message names the file
            expected), a single file named as another modality, two cases with one id, or an
            unknown release.
    """
    found = discover_prediction_inputs(path, channels, year)
    if found.failed:
        first = found.failed[0]
        raise InputError(first.path, first.reason)
    return found.cases


def _expected_dims(index: int | None) -> str:
    return "a 4D MSD volume with 4 channels" if index is not None else "a 3D volume"


def check_prediction_input(item: PredictionInput) -> None:
    """Cheap header-only checks of one case, to refuse bad inputs before any output is written.

    Catches unreadable files, wrong dimensionality (2D images, 4D files where 3D is expected) and
    channels of different shapes; truncated data is found later by
    :func:`load_prediction_input`.

    Raises:
        InputError: the first problem, naming the file.
    """
    import nibabel as nib

    first: tuple[Path, tuple[int, ...]] | None = None
    for path, index in item.channel_files.values():
        try:
            img = nib.load(os.fspath(path))
            shape = tuple(int(s) for s in img.shape)
        except Exception as exc:  # nibabel raises many types for garbage
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(path, f"not a readable NIfTI file ({reason})") from None
        want = 4 if index is not None else 3
        if len(shape) != want or (index is not None and shape[3] <= index):
            hint = " (a 4D MSD file needs --year msd)" if len(shape) == 4 and want == 3 else ""
            raise InputError(path, f"expected {_expected_dims(index)}, got "
                                   f"{len(shape)}D shape {shape}{hint}")
        if first is not None and shape[:3] != first[1][:3]:
            raise InputError(path, f"shape {shape[:3]} differs from {first[0].name}'s "
                                   f"{first[1][:3]}")
        first = first or (path, shape)


@dataclass
class LoadedInput:
    """One case's student channels on the native grid.

    Attributes:
        image: (C, D, H, W) float32 raw intensities, channels in the student's order.
        affine: voxel-to-world matrix of the reference file.
        spacing: voxel size in mm along the three array axes.
    """

    image: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]


def _read_volume(path: Path, case_id: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    from mtcmkd.preprocessing.convert import CaseError, read_nifti

    try:
        vol = read_nifti(path, case_id)
    except CaseError as exc:
        raise InputError(path, exc.reason) from None
    return np.asarray(vol.data), np.asarray(vol.affine), vol.zooms


def load_prediction_input(item: PredictionInput) -> LoadedInput:
    """Read the student's channels of one case.

    Raises:
        InputError: truncated or corrupt data, wrong dimensionality, NaN/Inf, an all-zero
            channel (no brain to segment), or channels on different grids.
    """
    channels: list[np.ndarray] = []
    affine: np.ndarray | None = None
    spacing: tuple[float, ...] = ()
    for channel, (path, index) in item.channel_files.items():
        data, file_affine, zooms = _read_volume(path, item.case_id)
        want = 4 if index is not None else 3
        if data.ndim != want:
            raise InputError(path, f"expected {_expected_dims(index)}, got {data.ndim}D "
                                   f"shape {tuple(data.shape)}")
        volume = np.asarray(data[..., index] if index is not None else data, dtype=np.float32)
        if not np.all(np.isfinite(volume)):
            raise InputError(path, f"{channel} contains NaN or Inf")
        if not np.any(volume):
            raise InputError(path, f"{channel} is all zero: no brain to segment")
        if affine is not None:
            if volume.shape != channels[0].shape:
                raise InputError(path, f"shape {volume.shape} differs from the first channel's "
                                       f"{channels[0].shape}")
            if float(np.abs(file_affine - affine).max()) > AFFINE_ATOL_MM:
                raise InputError(path, "affine differs from the first channel's")
        else:
            affine, spacing = file_affine, zooms
        channels.append(volume)
    assert affine is not None
    return LoadedInput(np.stack(channels), affine, (spacing[0], spacing[1], spacing[2]))


def load_truth(path: Path, release_name: str, case_id: str) -> np.ndarray:
    """A segmentation file -> canonical uint8 labels (the release's values mapped).

    Raises:
        InputError: unreadable, not 3D, or values the release does not define (the message lists
            them: e.g. 3 in a 2021 file, or 4 where 2023 predictions were expected).
    """
    data, _, _ = _read_volume(path, case_id)
    if data.ndim != 3:
        raise InputError(path, f"expected a 3D label volume, got {data.ndim}D shape "
                               f"{tuple(data.shape)}")
    try:
        return release(release_name).map_labels(data)
    except ValueError as exc:
        raise InputError(path, str(exc)) from None


@dataclass
class CasePrediction:
    """The result of :func:`predict_case`.

    Attributes:
        labels: canonical labels on the native grid (after post-processing, if any).
        loaded: the input channels (for overlays).
        et_relabelled: the post-processing turned this case's predicted ET into NCR/NETC.
        seconds: wall time of reading and inference.
    """

    labels: np.ndarray
    loaded: LoadedInput
    et_relabelled: bool
    seconds: float


def postprocess_labels(labels: np.ndarray, et_min_voxels: int | None) -> tuple[np.ndarray, bool]:
    """Relabel a predicted ET of fewer than `et_min_voxels` voxels as NCR/NETC (None: off).

    Returns the labels and whether anything changed. Relabelling to NCR/NETC (not background)
    keeps TC and WT unchanged and only moves the ET score (see
    :func:`mtcmkd.metrics.relabel_small_et`).
    """
    if et_min_voxels is None:
        return labels, False
    from mtcmkd.metrics import relabel_small_et

    out = relabel_small_et(labels, et_min_voxels, to=1)
    return out, bool(np.any(out != labels))


def predict_case(bundle: StudentBundle, item: PredictionInput, *, overlap: float = 0.5,
                 mirror: bool = False, postprocess_et: int | None = None,
                 device: torch.device | str | None = None) -> CasePrediction:
    """Segment one case from its raw files (brain crop, z-score, sliding window, uncrop).

    The same normalisation as preprocessing: each channel z-scored on its non-zero voxels of the
    brain crop (:func:`mtcmkd.inference.predict_volume`). Nothing is written.

    Raises:
        InputError: a bad file (see :func:`load_prediction_input`), or a brain of constant
            intensity that cannot be normalised.
    """
    from mtcmkd.inference import predict_volume

    start = time.perf_counter()
    loaded = load_prediction_input(item)
    try:
        result = predict_volume(bundle.network, loaded.image, bundle.patch_size, bundle.n_out,
                                bundle.output, overlap=overlap, mirror=mirror, device=device)
    except ValueError as exc:  # all-zero or constant brain
        raise InputError(item.reference, str(exc)) from None
    labels, relabelled = postprocess_labels(result.labels, postprocess_et)
    return CasePrediction(labels, loaded, relabelled, time.perf_counter() - start)


def write_prediction(labels: np.ndarray, item: PredictionInput, out_dir: Path) -> Path:
    """Write ``out_dir/<case_id>.nii.gz``: release label values, the input's affine and header.

    Atomic (temporary name, then rename): the file is complete or absent.
    """
    from mtcmkd.inference import to_release_labels, write_label_nifti

    return write_label_nifti(to_release_labels(labels, item.release), item.reference,
                             Path(out_dir) / f"{item.case_id}.nii.gz")


# ------------------------------------------------------------------------------------ scoring

LEGACY_RULES = (
    "BraTS legacy per-case rules (2017-2021): Dice, HD95 (mm), sensitivity and specificity "
    "per region (WT, TC, ET) on the full native-resolution volume; truth and prediction both "
    "empty: Dice 1, HD95 0; exactly one empty: Dice 0, HD95 373.13 mm; means over cases include "
    "these values."
)
#: The per-case rules of the official BraTS 2023 script (it reports these next to the
#: lesion-wise scores): as legacy, but its HD95 (HD95_DEFINITION_2023) and 374 mm when one is empty.
LEGACY_RULES_2023 = (
    "BraTS 2023+ per-case (\"legacy\") scores as the official BraTS 2023 script reports them: "
    "Dice, HD95 (mm), sensitivity and specificity per region (WT, TC, ET) on the full "
    "native-resolution volume; truth and prediction both empty: Dice 1, HD95 0; exactly one "
    "empty: Dice 0, HD95 374 mm; means over cases include these values."
)
LESION_RULES = (
    " Plus BraTS 2023+ lesion-wise Dice and HD95 as the official BraTS 2023 script computes "
    "them ({subchallenge} parameters: truth dilated {dilation}x with the 18-neighbourhood, "
    "truth components in one dilated 26-connected component form one lesion, 26-connected "
    "predicted components match a lesion when they touch it dilated {dilation}x again, truth "
    "lesions of <= {threshold:g} mm^3 dropped, missed lesions and unmatched predicted "
    "components Dice 0 and HD95 374 mm, score = sum over lesions / (TP + FN + FP), nothing to "
    "score Dice 1 and HD95 0)."
)

#: Which HD95 this project reports (the libraries disagree; docs/BRATS.md).
HD95_DEFINITION = (
    "MONAI's HD95: surfaces are the voxels one erosion with the 3D cross removes; the 95th "
    "percentile (linear interpolation) of each directed set of surface distances (Euclidean, in "
    "mm from the voxel spacing), then the larger of the two. medpy pools both directions "
    "before the percentile and gives smaller values."
)
#: The HD95 of the BraTS 2023+ evaluation (legacy and lesion-wise).
HD95_DEFINITION_2023 = (
    "The official BraTS 2023 HD95 (DeepMind surface-distance compute_robust_hausdorff, 95): "
    "surface elements on the voxel-corner lattice (2x2x2 neighbourhood codes), each weighted by "
    "its marching-cubes area in mm^2; per direction the distance (mm) at which the cumulative "
    "area of the elements sorted by distance reaches 95 % (no interpolation), then the larger "
    "of the two."
)

LEGACY_SLICE_DICE_NOTE = (
    "legacy_slice_dice is NOT the BraTS Dice: it is the MTCM-KD authors' metric, a 2D Dice per "
    "slice along the first array axis averaged over all slices, slices empty in both prediction "
    "and truth scoring 1 (computed here on the native grid; the authors used 128^3 resized "
    "volumes). It is far higher than the BraTS Dice for the same prediction; do not compare it "
    "with BraTS results."
)

_LEGACY_METRICS = ("dice", "hd95", "sensitivity", "specificity")
_LESION_METRICS = ("lesion_wise_dice", "lesion_wise_hd95")


@dataclass(frozen=True)
class EvaluationSettings:
    """How cases are scored.

    Attributes:
        year: the release ("2018" ... "2021", "2023" and later, "msd"); decides the rules
            (lesion-wise for 2023+) and, for prediction files, the label values expected.
        postprocess_et: relabel a predicted ET of fewer voxels than this as NCR/NETC before
            scoring; None = off (the default; any use must be reported, and is).
        legacy_slice_dice: also compute the MTCM-KD authors' slice-averaged Dice.
        subchallenge: the BraTS 2023+ sub-challenge whose lesion-wise parameters apply
            (GLI, SSA, PED, MEN, MET; :data:`mtcmkd.brats.SUBCHALLENGES`). Only 2023+ uses it.
    """

    year: str
    postprocess_et: int | None = None
    legacy_slice_dice: bool = False
    subchallenge: str = "GLI"

    def __post_init__(self) -> None:
        release(self.year)  # ValueError for an unknown year
        subchallenge(self.subchallenge)  # ValueError listing the sub-challenges
        if self.postprocess_et is not None and self.postprocess_et < 1:
            raise ValueError(f"postprocess_et must be >= 1 voxel, got {self.postprocess_et}")

    @property
    def release(self) -> Release:
        return release(self.year)

    @property
    def lesion_wise(self) -> bool:
        """2023 and later releases are scored lesion-wise too (MSD and 2017-2021 are not)."""
        return self.release.name == "2023"

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Per-region metrics in each case record, in output order."""
        names = _LEGACY_METRICS + (_LESION_METRICS if self.lesion_wise else ())
        return names + (("legacy_slice_dice",) if self.legacy_slice_dice else ())

    @property
    def lesion_parameters(self) -> LesionWiseParameters:
        """Dilations and volume threshold of the lesion-wise rules (the sub-challenge's)."""
        return subchallenge(self.subchallenge)

    @property
    def rules(self) -> str:
        if not self.lesion_wise:
            return LEGACY_RULES
        params = self.lesion_parameters
        return LEGACY_RULES_2023 + LESION_RULES.format(
            subchallenge=params.subchallenge, dilation=params.dilation_iterations,
            threshold=params.volume_threshold_mm3)

    @property
    def hd95_definition(self) -> str:
        return HD95_DEFINITION_2023 if self.lesion_wise else HD95_DEFINITION

    @property
    def year_value(self) -> int | str:
        """The year as JSON writes it: an int for numbered releases, else "msd"."""
        return int(self.year) if self.year.isdigit() else self.year

    def postprocessing(self, cases_relabelled: int | None = None) -> dict[str, Any]:
        """The post-processing note of metrics.json."""
        on = self.postprocess_et is not None
        note: dict[str, Any] = {
            "applied": on,
            "et_min_voxels": self.postprocess_et,
            "description": (
                f"a predicted ET of fewer than {self.postprocess_et} voxels (whole case) was "
                "relabelled as NCR/NETC before scoring" if on else
                "none: predictions scored as given (no ET post-processing)"
            ),
        }
        if cases_relabelled is not None:
            note["cases_relabelled"] = cases_relabelled
        return note


@dataclass
class ScoringCase:
    """One case to score: canonical labels on the native grid.

    Attributes:
        case_id: the id reported.
        prediction, truth: canonical label volumes of one shape (the original image's).
        spacing: voxel size in mm along the array axes (HD95).
        image: an intensity volume of the same grid for overlays (optional).
        affine: the voxel-to-world matrix (orients overlays; optional).
    """

    case_id: str
    prediction: np.ndarray
    truth: np.ndarray
    spacing: tuple[float, float, float]
    image: np.ndarray | None = None
    affine: np.ndarray | None = None


def score_case_record(case: ScoringCase, settings: EvaluationSettings) -> dict[str, Any]:
    """Score one case: ``{"case": id, "<metric>": {"WT": .., "TC": .., "ET": ..}, ...}``.

    Post-processing (when on) is applied to the prediction first, and the record then holds
    ``"et_relabelled"``. Metrics are those of ``settings.metric_names``; Dice, sensitivity and
    specificity are fractions in [0, 1], HD95 is in mm.
    """
    from mtcmkd.metrics import (
        BRATS2023_EMPTY_HD95,
        lesion_wise_scores,
        robust_hausdorff,
        score_case,
        slice_dice_legacy,
    )

    prediction, relabelled = postprocess_labels(case.prediction, settings.postprocess_et)
    record: dict[str, Any] = {"case": case.case_id}
    if settings.lesion_wise:  # 2023+: the official script's HD95 and its 374 mm for one empty
        record.update(score_case(prediction, case.truth, case.spacing,
                                 empty_hd95=BRATS2023_EMPTY_HD95,
                                 hd95_function=robust_hausdorff))
    else:
        record.update(score_case(prediction, case.truth, case.spacing))
    params = settings.lesion_parameters
    if settings.lesion_wise or settings.legacy_slice_dice:
        lesion: dict[str, dict[str, float]] = {"lesion_wise_dice": {}, "lesion_wise_hd95": {}}
        slices: dict[str, float] = {}
        for region, values in REGIONS.items():
            p, t = np.isin(prediction, values), np.isin(case.truth, values)
            if settings.lesion_wise:
                scores = lesion_wise_scores(
                    p, t, case.spacing, dilation_iterations=params.dilation_iterations,
                    volume_threshold_mm3=params.volume_threshold_mm3)
                lesion["lesion_wise_dice"][region] = float(scores["dice"])
                lesion["lesion_wise_hd95"][region] = float(scores["hd95"])
            if settings.legacy_slice_dice:
                slices[region] = slice_dice_legacy(p, t, axis=0)
        if settings.lesion_wise:
            record.update(lesion)
        if settings.legacy_slice_dice:
            record["legacy_slice_dice"] = slices
    if settings.postprocess_et is not None:
        record["et_relabelled"] = relabelled
    return record


@dataclass
class Evaluation:
    """Scored cases plus how they were scored; :meth:`to_json` is metrics.json."""

    settings: EvaluationSettings
    cases: list[dict[str, Any]]
    source: dict[str, Any] = field(default_factory=dict)

    def mean(self) -> dict[str, dict[str, float]]:
        """Per metric and region, the mean over cases (NaN when there are no cases)."""
        return {
            metric: {
                region: (float(np.mean([c[metric][region] for c in self.cases]))
                         if self.cases else math.nan)
                for region in REGIONS
            }
            for metric in self.settings.metric_names
        }

    def to_json(self) -> dict[str, Any]:
        """The metrics.json document.

        Keys: ``year``, ``rules``, ``hd95_definition``, ``postprocessing``, ``source`` (what was
        scored), ``cases`` (one record per case, see :func:`score_case_record`), ``mean``; plus
        ``lesion_wise`` (sub-challenge and its parameters) for 2023+ and
        ``legacy_slice_dice_note`` only when that metric was asked for.
        """
        relabelled = (sum(bool(c.get("et_relabelled")) for c in self.cases)
                      if self.settings.postprocess_et is not None else None)
        doc: dict[str, Any] = {
            "year": self.settings.year_value,
            "rules": self.settings.rules,
            "hd95_definition": self.settings.hd95_definition,
            "postprocessing": self.settings.postprocessing(relabelled),
            "source": self.source,
            "cases": self.cases,
            "mean": self.mean(),
        }
        if self.settings.lesion_wise:
            params = self.settings.lesion_parameters
            doc["lesion_wise"] = {
                "subchallenge": params.subchallenge,
                "dilation_iterations": params.dilation_iterations,
                "dilation_structure": "18-neighbourhood (generate_binary_structure(3, 2))",
                "volume_threshold_mm3": params.volume_threshold_mm3,
            }
        if self.settings.legacy_slice_dice:
            doc["legacy_slice_dice_note"] = LEGACY_SLICE_DICE_NOTE
        return doc

    def csv_rows(self) -> tuple[list[str], list[list[str]]]:
        """Header and one row per case: ``case``, ``<metric>_<region>``..., post-processing."""
        names = self.settings.metric_names
        header = ["case"] + [f"{m}_{r}" for m in names for r in REGIONS]
        header += ["postprocess_et", "et_relabelled"]
        post = "off" if self.settings.postprocess_et is None else str(self.settings.postprocess_et)
        rows = []
        for c in self.cases:
            row = [c["case"]] + [f"{c[m][r]:.6g}" for m in names for r in REGIONS]
            row += [post, "" if "et_relabelled" not in c else str(int(c["et_relabelled"]))]
            rows.append(row)
        return header, rows


def score_predictions(cases: Iterable[ScoringCase], settings: EvaluationSettings, *,
                      source: dict[str, Any] | None = None,
                      on_case: Callable[[ScoringCase, dict[str, Any]], None] | None = None,
                      ) -> Evaluation:
    """Score every case of `cases` (consumed lazily: one case in memory at a time).

    Args:
        cases: canonical predictions and truths on the native grid.
        settings: year (rules), post-processing, legacy slice Dice.
        source: what was scored (run, store, prediction folder...), copied to metrics.json.
        on_case: called after each case with the case and its record (progress, overlays).

    Raises:
        ValueError: prediction and truth shapes differ.
    """
    records = []
    for case in cases:
        if case.prediction.shape != case.truth.shape:
            raise ValueError(f"case {case.case_id}: prediction shape {case.prediction.shape} "
                             f"differs from the truth's {case.truth.shape}")
        record = score_case_record(case, settings)
        records.append(record)
        if on_case is not None:
            on_case(case, record)
    return Evaluation(settings, records, dict(source or {}))



def write_metrics(evaluation: Evaluation, out_dir: Path) -> tuple[Path, Path]:
    """Write ``out_dir/metrics.json`` and ``out_dir/metrics.csv`` (each atomically).

    Returns:
        (json path, csv path).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / "metrics.json", out_dir / "metrics.csv"
    atomic_write_text(json_path, json.dumps(evaluation.to_json(), indent=2) + "\n")
    header, rows = evaluation.csv_rows()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(csv_path, buffer.getvalue())
    return json_path, csv_path


# ----------------------------------------------------------------- cases from a run's store


#: The file in which `mtcmkd train` records its split and the store it saw.
SPLITS_FILE = "splits.json"


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
    from mtcmkd.data import split_cases

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
    if not changes["added"] and not changes["removed"] and not leaked:
        parts.append("cases re-converted or folds re-dealt")
    return ", ".join(parts)


@dataclass
class RunEvaluationInputs:
    """What `evaluate --run` scores: the run's student, its store and the chosen cases.

    Attributes:
        split_recorded: the run has ``splits.json`` (its validation cases are the recorded
            ones); False for older runs (the store's current fold is used).
        store_check: the fingerprint comparison, copied into metrics.json's ``source``.
        notes: one-line notes for the user (an unrecorded split, a changed store allowed).
    """

    bundle: StudentBundle
    student_path: Path
    store: Path
    fold: int
    case_ids: list[str]
    split_recorded: bool = False
    store_check: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def run_evaluation_inputs(run_dir: Path, store: Path | None = None, split: str = "val", *,
                          allow_changed_store: bool = False) -> RunEvaluationInputs:
    """Load a run's best (else last) student and pick the cases to score.

    The cases of "val" are the run's recorded validation cases (``RUN/splits.json``, written
    by training), never recomputed from the store's folds, which change when cases are added.
    The store must be the one the run saw: its fingerprint is compared with the recorded one,
    and a changed store is refused unless `allow_changed_store` (then the change is in
    ``store_check`` and ``notes``). A run without ``splits.json`` (trained before runs recorded
    their split) scores the store's current fold ``data.fold``, with a note saying so.

    Args:
        run_dir: a run folder of `mtcmkd train` (config.yaml plus best_student.pt/student.pt).
        store: the Zarr store; default the run config's ``data.store`` (relative to the working
            directory, as in training), else the store recorded in ``splits.json``.
        split: "val": the run's held-out cases; "all": every labelled case of the store
            (training cases included: optimistic).
        allow_changed_store: score even when the store changed since training.

    Raises:
        EvaluationError: missing or invalid run files or store, an unknown split, a store
            without the student's modalities, a store changed since training (not allowed),
            or recorded validation cases absent from the store (one line naming the file).
    """
    from mtcmkd.config import ConfigError, load_config
    from mtcmkd.data import StoreFormatError, StoreInfo, split_cases
    from mtcmkd.data.store import check_store_complete, store_fingerprint
    from mtcmkd.engine.checkpoint import CheckpointError
    from mtcmkd.student_weights import load_student, resolve_student_path

    run_dir = Path(run_dir)
    if split not in ("val", "all"):
        raise EvaluationError(f"--split {split!r}: expected val or all")
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
    store_path = Path(store) if store is not None else (
        Path(cfg.data.store) if cfg.data.store is not None else (
            Path(recorded.store) if recorded is not None and recorded.store else None))
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
            if not allow_changed_store:
                raise InputError(store_path, f"{what}; scores could count training cases as "
                                             "held out. Pass --allow-changed-store to score "
                                             "the run's recorded validation cases anyway")
            store_check.update(changes, allowed=True)
            notes.append(f"{store_path}: {what}; scoring the run's recorded validation cases "
                         "(--allow-changed-store)")

    if split == "all":
        case_ids = list(info.labelled_cases)
    elif recorded is not None:
        case_ids = list(recorded.validation)
        absent = [c for c in case_ids if c not in set(info.labelled_cases)]
        if absent:
            raise InputError(store_path, f"{len(absent)} of the run's {len(case_ids)} recorded "
                                         f"validation case(s) are not labelled cases of the "
                                         f"store ({_shown(absent)}); they cannot be scored")
    else:
        try:
            case_ids = split_cases(info, fold)[1]
        except ValueError as exc:
            raise InputError(store_path, str(exc)) from None
    if not case_ids:
        raise InputError(store_path, "no labelled case to evaluate")
    return RunEvaluationInputs(bundle, student_path, store_path, fold, case_ids,
                               split_recorded=recorded is not None, store_check=store_check,
                               notes=notes)


def store_scoring_cases(bundle: StudentBundle, store: Path, case_ids: Sequence[str], *,
                        overlap: float = 0.5, mirror: bool = False,
                        device: torch.device | str | None = None,
                        with_image: bool = False) -> Iterator[ScoringCase]:
    """Predict store cases and put prediction and truth back on the original grid.

    The store holds brain-cropped, z-scored images (docs/STORE.md); the prediction runs on the
    crop without renormalising (it is already z-scored as the student was trained), and both
    prediction and truth are uncropped with the case's ``crop_bbox`` to ``original_shape``, so
    scores count every voxel of the source volume as BraTS does (specificity included).
    """
    from mtcmkd.data import open_store
    from mtcmkd.inference import predict_volume, uncrop

    root = open_store(store)
    channels = list(root.attrs["channels"])
    index = [channels.index(c) for c in bundle.channels]
    for case_id in case_ids:
        group = root["cases"][case_id]
        if "label" not in group:
            raise InputError(Path(store) / "cases" / case_id, "case has no label to score")
        attrs = group.attrs
        bbox, shape = attrs["crop_bbox"], attrs["original_shape"]
        image = np.asarray(group["image"][index], dtype=np.float32)
        result = predict_volume(bundle.network, image, bundle.patch_size, bundle.n_out,
                                bundle.output, overlap=overlap, mirror=mirror, normalize=False,
                                device=device)
        yield ScoringCase(
            case_id=case_id,
            prediction=uncrop(result.labels, bbox, shape),
            truth=uncrop(np.asarray(group["label"][...]), bbox, shape),
            spacing=tuple(float(s) for s in attrs["spacing"]),  # type: ignore[arg-type]
            image=uncrop(image[0], bbox, shape) if with_image else None,
            affine=np.asarray(attrs["affine"], dtype=np.float64),
        )


# --------------------------------------------------------- cases from prediction files


@dataclass(frozen=True)
class PredictionPair:
    """A prediction file, its ground truth, and (if found) the case's T1ce image for overlays.

    ``prediction`` is None for a ground-truth case without a prediction file that is to be
    scored as an empty prediction (``missing="empty"``). ``image_index`` is the channel of an
    MSD 4D image, else None.
    """

    case_id: str
    prediction: Path | None
    truth: Path
    image: Path | None = None
    image_index: int | None = None


def _truth_index(gt_dir: Path, info: Release) -> dict[str, Path]:
    """case id -> segmentation file under `gt_dir`, by the release's file naming."""
    index: dict[str, Path] = {}
    if info.four_d:
        folders = [d for d in (gt_dir / "labelsTr", gt_dir) if d.is_dir()]
        for folder in folders[:1]:
            for name in sorted(n for n in os.listdir(folder) if _is_nifti(n)):
                index.setdefault(_strip_nifti(name), folder / name)
        return index
    suffix = f"{info.separator}{info.seg_suffix}"
    for dirpath, dirnames, filenames in os.walk(gt_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            stem = _strip_nifti(name) if _is_nifti(name) else ""
            if not stem.endswith(suffix):
                continue
            case_id = stem[: -len(suffix)]
            if re.fullmatch(info.case_pattern, case_id) is None and case_id != Path(dirpath).name:
                continue
            path = Path(dirpath) / name
            if case_id in index:
                raise InputError(path, f"second ground truth for case {case_id} (also "
                                       f"{index[case_id]})")
            index[case_id] = path
        folder = Path(dirpath)
        if folder.name not in index and re.fullmatch(info.case_pattern, folder.name):
            # As preprocessing does: some 2020 copies name case 355's seg differently (e.g.
            # W39_1998.09.19_Segm.nii); accept exactly one NIfTI whose name says "seg".
            odd = [n for n in filenames if _is_nifti(n) and "seg" in n.lower()]
            if len(odd) == 1:
                index[folder.name] = folder / odd[0]
    return index


def _overlay_image(truth: Path, case_id: str, info: Release, gt_dir: Path
                   ) -> tuple[Path | None, int | None]:
    if info.four_d:
        images = gt_dir / "imagesTr"
        found = _find_nifti(images, case_id) if images.is_dir() else None
        return found, (info.msd_channel_order.index("t1ce") if found else None)
    stem = f"{case_id}{info.separator}{info.modality_suffix['t1ce']}"
    return _find_nifti(truth.parent, stem), None


#: What :func:`match_prediction_files` does with a ground-truth case that has no prediction.
MISSING_POLICIES = ("error", "empty", "skip")


def match_prediction_files(pred_dir: Path, gt_dir: Path, year: str, missing: str = "error"
                           ) -> tuple[list[PredictionPair], list[str]]:
    """Pair every ``<case_id>.nii.gz`` (or ``.nii``) of `pred_dir` with its ground truth.

    Args:
        pred_dir: predictions of any tool, one file per case named by the case id, in the
            label values of release `year`.
        gt_dir: the raw data in its release's layout (case folders with ``*_seg.nii.gz``, or
            MSD ``labelsTr/``); other modalities may be absent.
        year: the release (file naming and label values).
        missing: a ground-truth case without a prediction file is an error ("error", the
            default: averaging only the predicted cases flatters a model that skipped its hard
            cases), scored as an empty prediction as the challenge does ("empty": Dice 0 and
            HD95 373.13 mm where the truth has the region), or left out ("skip").

    Returns:
        (pairs sorted by case id, the ids of truth cases without a prediction file: with
        "empty" they are also in the pairs, with ``prediction=None``; with "skip" they are
        not scored).

    Raises:
        InputError: missing folders, no prediction files, a prediction without truth, or
            (with "error") a truth without prediction, naming the prediction file expected.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    info = release(year)
    if missing not in MISSING_POLICIES:
        raise EvaluationError(f"--missing {missing!r}: expected one of "
                              f"{', '.join(MISSING_POLICIES)}")
    for folder in (pred_dir, gt_dir):
        if not folder.is_dir():
            raise InputError(folder, "not a folder" if folder.exists() else "no such folder")
    names = sorted(n for n in os.listdir(pred_dir) if _is_nifti(n))
    if not names:
        raise InputError(pred_dir, "no prediction files (<case_id>.nii.gz)")
    truths = _truth_index(gt_dir, info)
    pairs: list[PredictionPair] = []
    seen: set[str] = set()
    for name in names:
        case_id = _strip_nifti(name)
        if case_id in seen:
            raise InputError(pred_dir / name, f"second prediction for case {case_id}")
        seen.add(case_id)
        truth = truths.get(case_id)
        if truth is None:
            expected = case_id if info.four_d else info.file_name(case_id, "seg")
            raise InputError(pred_dir / name, f"no ground truth for case {case_id} under "
                                              f"{gt_dir} (expected {expected}, BraTS {info.name} "
                                              "naming)")
        image, image_index = _overlay_image(truth, case_id, info, gt_dir)
        pairs.append(PredictionPair(case_id, pred_dir / name, truth, image, image_index))
    unpredicted = sorted(set(truths) - seen)
    if unpredicted and missing == "error":
        shown = ", ".join(unpredicted[:5]) + (" ..." if len(unpredicted) > 5 else "")
        raise InputError(pred_dir / f"{unpredicted[0]}.nii.gz", f"missing prediction: "
                         f"{len(unpredicted)} ground-truth case(s) of {gt_dir} have no "
                         f"prediction file ({shown}); pass --missing empty to score them as "
                         "empty predictions (the challenge's rule) or --missing skip to score "
                         "only the predicted cases")
    if missing == "empty":
        for case_id in unpredicted:
            image, image_index = _overlay_image(truths[case_id], case_id, info, gt_dir)
            pairs.append(PredictionPair(case_id, None, truths[case_id], image, image_index))
        pairs.sort(key=lambda pair: pair.case_id)
    return pairs, unpredicted


def prediction_file_cases(pairs: Sequence[PredictionPair], year: str, *,
                          with_image: bool = False) -> Iterator[ScoringCase]:
    """Read prediction and truth files as canonical labels (lazily, one case at a time).

    Both files are mapped from release `year`'s values, so a prediction in another convention
    fails loudly (e.g. a 2021-style 4 = ET checked as 2023). Spacing comes from the truth's
    header.

    Raises:
        InputError: unreadable files, unexpected label values, or a prediction not on the
            truth's voxel grid (shape or affine differ: a reoriented file would be scored
            voxel by voxel against the wrong anatomy).
    """
    import nibabel as nib

    name = release(year).name
    for pair in pairs:
        truth = load_truth(pair.truth, name, pair.case_id)
        truth_img = nib.load(os.fspath(pair.truth))
        if pair.prediction is None:  # no prediction file: scored as an empty prediction
            prediction = np.zeros(truth.shape, dtype=np.uint8)
            pred_affine = truth_img.affine
        else:
            prediction = load_truth(pair.prediction, name, pair.case_id)
            pred_affine = nib.load(os.fspath(pair.prediction)).affine
        if prediction.shape != truth.shape:
            raise InputError(pair.prediction or pair.truth,
                             f"shape {prediction.shape} differs from the ground truth's "
                             f"{truth.shape} ({pair.truth})")
        diff = float(np.abs(pred_affine - truth_img.affine).max())
        if diff > AFFINE_ATOL_MM:
            raise InputError(pair.prediction or pair.truth,
                             f"affine differs from the ground truth's (max difference "
                             f"{diff:.3g}); write predictions on the source image's grid")
        zooms = truth_img.header.get_zooms()[:3]
        image = None
        if with_image and pair.image is not None:
            data, _, _ = _read_volume(pair.image, pair.case_id)
            if pair.image_index is not None and data.ndim == 4:
                data = data[..., pair.image_index]
            image = np.asarray(data, dtype=np.float32) if data.shape == truth.shape else None
        yield ScoringCase(pair.case_id, prediction, truth,
                          (float(zooms[0]), float(zooms[1]), float(zooms[2])), image=image,
                          affine=np.asarray(truth_img.affine, dtype=np.float64))


# -------------------------------------------------------------------- published references


@dataclass(frozen=True)
class ReferenceResult:
    """A published T1ce-only (or full-modality) result to show beside ours.

    Attributes:
        source: paper / code and the setting.
        data: data set and split.
        dice: Dice in percent per region (None where not published).
        mean_dice: mean Dice in percent when only the mean is published.
        comparable: "yes" (standard 3D BraTS Dice, T1ce only: same definition, though on other
            cases), "roughly" (3D Dice but resampled volumes or own split), or "no".
        note: why.
    """

    source: str
    data: str
    dice: dict[str, float | None]
    comparable: str
    note: str
    mean_dice: float | None = None


#: docs/METHODS.md, "Results as published" (section 1) and section 4.
REFERENCE_NUMBERS: tuple[ReferenceResult, ...] = (
    ReferenceResult(
        source="MTCM-KD README, t1ce",
        data="BraTS 2021 (their CV)",
        dice={"WT": 87.14, "TC": 91.56, "ET": None},
        comparable="no",
        note="Ahmad et al. 2024: slice-averaged 2D Dice at 128^3 resized volumes, slices empty in both scored 1 "
             "(see --legacy-slice-dice); not the BraTS Dice",
    ),
    ReferenceResult(
        source="DeMoSeg 2024, t1ce only",
        data="BraTS 2020 test split",
        dice={"WT": 82.1, "TC": 85.7, "ET": 81.4},
        comparable="yes",
        note="standard 3D BraTS Dice, same definition; other cases (2020 split), ET "
             "post-processing may differ",
    ),
    ReferenceResult(
        source="KD-Net, t1ce student",
        data="BraTS 2018, 3-fold CV",
        dice={"WT": 77.0, "TC": 81.5, "ET": 71.7},
        comparable="roughly",
        note="Hu et al. 2021: 3D Dice, but on a 128^3 central crop subsampled to 64^3 and BraTS 2018 cases",
    ),
    ReferenceResult(
        source="nnU-Net, 4 modalities",
        data="BraTS 2021, 5-fold CV",
        dice={"WT": None, "TC": None, "ET": None},
        mean_dice=91.2,
        comparable="no",
        note="full-modality upper bound (t1, t1ce, t2, flair), not a T1ce-only result",
    ),
)
