"""What `mtcmkd predict` segments: the cases under its input path, and every entry it does not.

The input is one case folder of any release, a folder of case folders at any depth, an MSD
Task01 folder, or one NIfTI file. Only the student's modalities are looked for, so cases with
the other files absent are fine. Folders are walked by :func:`mtcmkd.raw_tree.walk_raw`, the
one walk of raw trees (preprocess uses it too), and every entry not taken is
named with its reason (:class:`~mtcmkd.raw_tree.NotTaken`): nothing is skipped
silently. A case that cannot be segmented is a :class:`CaseFailure` and does not stop the others.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mtcmkd.brats import (
    SUFFIX_ROLES,
    Release,
    case_id_of_file_stem,
    release,
    release_of_case_id,
)
from mtcmkd.nifti_io import InputError, find_nifti, is_nifti_name, strip_nifti_extension
from mtcmkd.raw_tree import NotTaken, RawFolder, walk_raw

__all__ = [
    "CaseFailure",
    "NotTaken",
    "PredictionInput",
    "PredictionInputs",
    "discover_prediction_inputs",
    "find_prediction_inputs",
    "modality_in_file_name",
]


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
        path = find_nifti(folder, f"{case_id}{info.separator}{info.modality_suffix[channel]}")
        if path is None:
            expected = folder / info.file_name(case_id, channel)
            raise InputError(expected, f"missing {channel}, the model's input modality "
                                       f"(expected {expected.name} or .nii)")
        files[channel] = (path, None)
    truth = find_nifti(folder, f"{case_id}{info.separator}{info.seg_suffix}")
    return PredictionInput(case_id, info.name, files, files[channels[0]][0], truth)


def _msd_input(path: Path, channels: Sequence[str], truth: Path | None) -> PredictionInput:
    info = release("msd")
    missing = [c for c in channels if c not in info.msd_channel_order]
    if missing:
        raise InputError(path, f"MSD images have no {', '.join(missing)} channel")
    files = {c: (path, info.msd_channel_order.index(c)) for c in channels}
    return PredictionInput(strip_nifti_extension(path.name), "msd", files, path, truth)


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


def modality_in_file_name(name: str) -> str | None:
    """The modality a NIfTI file's name says (``"flair"`` for ``BraTS2021_00000_flair.nii.gz``,
    ``"t1ce"`` for ``BraTS-GLI-00000-000-t1c.nii``, ``"seg"`` for a segmentation), or None
    when the name's last ``_``/``-``/``.``-separated token is no release's modality suffix.

    Case-insensitive (``..._FLAIR.nii.gz`` is FLAIR too).
    """
    stem = strip_nifti_extension(name) if is_nifti_name(name) else name
    match = re.search(r"[._-]([A-Za-z0-9]+)$", stem)
    return SUFFIX_ROLES.get(match.group(1).lower()) if match else None


def _case_of_named_file(stem: str) -> str:
    """``BraTS2021_00000_flair`` -> ``BraTS2021_00000``: the stem without its modality token."""
    return re.sub(r"[._-][A-Za-z0-9]+$", "", stem) if modality_in_file_name(stem) else stem


def _single_file_input(path: Path, channels: Sequence[str], year: str | None) -> PredictionInput:
    # The release decides the output's label values: never guess 2021 for a file whose name
    # says 2023 (ET would be written as 4, which 2023 reads as resection cavity).
    info = release(year) if year is not None else (
        _release_of_file(strip_nifti_extension(path.name), channels) or release("2021"))
    if info.four_d:
        return _msd_input(path, channels, None)
    if len(channels) != 1:
        raise InputError(path, f"the model needs {len(channels)} modalities "
                               f"({', '.join(channels)}); pass a case folder instead of one file")
    # A FLAIR file fed to a T1ce student runs without any error and gives a wrong segmentation:
    # refuse a file whose name says another modality (a name that says none is taken).
    stem = strip_nifti_extension(path.name)
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


def _case_folder_release(folder: RawFolder, forced: Release | None) -> Release | None:
    """The release of a case folder (by its name, or by its files' names when forced)."""
    name = folder.path.name
    if forced is not None:
        prefix = f"{name}{forced.separator}"
        return forced if any(n.startswith(prefix) for n in folder.niftis) else None
    info = release_of_case_id(name)
    return None if info is None or info.four_d else info


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


def _case_ids_in_names(names: Sequence[str]) -> list[str]:
    """Case ids of any release that NIfTI file names start with (``<id><sep><suffix>``)."""
    ids = {case_id_of_file_stem(strip_nifti_extension(n)) for n in names if is_nifti_name(n)}
    return sorted(i for i in ids if i is not None)


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


#: Why a NIfTI file right under the input folder is not segmented.
_LOOSE_FILE = ("a NIfTI file outside a case folder (pass one file at a time as --input, or put "
               "it in a folder named by its case id)")


def _add_case(folder: Path, info: Release, channels: Sequence[str],
              found: PredictionInputs) -> None:
    try:
        found.cases.append(_brats_case_input(folder, info, channels))
    except InputError as exc:
        found.failed.append(CaseFailure(folder.name, exc.path, exc.reason))


def _walk_case_folders(root: Path, channels: Sequence[str], forced: Release | None,
                       found: PredictionInputs) -> None:
    """The case folders under `root` (itself included) at any depth, by the one walk of raw
    trees (:func:`mtcmkd.raw_tree.walk_raw`: symbolic links followed, each real
    folder read once, hidden entries, broken links and unreadable folders named).

    A case folder is not looked into further (its other modalities are not needed); a folder
    that holds NIfTI files but is not a case folder is named once, with the reason, and not
    looked into either.
    """
    for folder in walk_raw(root, found.not_taken):
        info = _case_folder_release(folder, forced)
        if info is not None:
            _add_case(folder.path, info, channels, found)
            folder.subfolders.clear()
            continue
        top = folder.path == root
        if folder.niftis and not top:
            # Files of a case in a folder not named as one ("BraTS2021_00000 copy"): say so
            # once for the folder rather than once per file.
            found.not_taken.append(NotTaken(folder.path, _not_a_case_folder(
                folder.path, folder.niftis, forced)))
            folder.subfolders.clear()
            continue
        for name in folder.niftis:
            found.not_taken.append(NotTaken(folder.path / name, _LOOSE_FILE))
        for name in folder.others:
            found.not_taken.append(NotTaken(folder.path / name, "not a NIfTI file"))
        if folder.empty and not top:
            found.not_taken.append(NotTaken(folder.path, "empty folder"))


def _msd_inputs(path: Path, msd_dirs: list[Path], channels: Sequence[str],
                found: PredictionInputs) -> None:
    for folder in msd_dirs:
        labels = path / "labelsTr" if folder.name == "imagesTr" else None
        for name in sorted(os.listdir(folder)):
            if name.startswith("."):
                continue
            if not is_nifti_name(name):
                found.not_taken.append(NotTaken(folder / name, "not a NIfTI file"))
                continue
            case_id = strip_nifti_extension(name)
            try:
                truth = find_nifti(labels, case_id) if labels is not None else None
                found.cases.append(_msd_input(folder / name, channels, truth))
            except InputError as exc:
                found.failed.append(CaseFailure(case_id, exc.path, exc.reason))
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
        every entry of a walked folder that is not part of a case is in ``not_taken``, hidden
        ones (``._*``, ``.DS_Store``) too, as preprocess names them (an MSD folder is listed,
        not walked: its hidden files are passed over).

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
        if not is_nifti_name(path.name):
            raise InputError(path, "not a NIfTI file (.nii or .nii.gz)")
        try:
            found.cases.append(_single_file_input(path, channels, year))
        except InputError as exc:
            case_id = _case_of_named_file(strip_nifti_extension(path.name))
            found.failed.append(CaseFailure(case_id, exc.path, exc.reason))
        return found
    if not path.is_dir():
        raise InputError(path, "no such file or folder")

    msd_dirs = [path / d for d in ("imagesTr", "imagesTs") if (path / d).is_dir()]
    if (forced is not None and forced.four_d) or (forced is None and msd_dirs):
        _msd_inputs(path, msd_dirs or [path], channels, found)
    else:
        _walk_case_folders(path, channels, forced, found)
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
