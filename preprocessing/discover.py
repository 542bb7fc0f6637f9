"""Find the cases of a raw BraTS folder, whatever the release.

Layouts handled (docs/BRATS.md of the shared docs): 2018/2019 `{HGG,LGG}/<case>/`, flat
2020/2021 `<case>/`, 2023+ `BraTS-GLI-xxxxx-xxx/` with t1n/t1c/t2w/t2f suffixes, MSD Task01
4D `imagesTr/` + `labelsTr/`; `.nii` or `.nii.gz`; macOS `._*` side files are ignored.
Problems found here (a missing modality, a duplicate case id) are attached to the case, so the
driver reports them with the other per-case failures instead of stopping the run. Every entry
of the tree that no case uses (a renamed copy of a case folder, a stray file, a hidden file) is
returned with its reason (`scan_raw(...).not_taken`): nothing is skipped silently. Symbolic
links to folders are followed, each real folder read once. A tree holding both MSD `imagesTr/`
and BraTS case folders is refused unless `year` says which to read.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mtcmkd.brats import (
    CHANNELS,
    RELEASE_INFO,
    Release,
    odd_segmentation_name,
    release,
    release_of_case_id,
)
from mtcmkd.nifti_io import is_nifti_name, strip_nifti_extension
from mtcmkd.raw_tree import NotTaken, RawFolder, walk_raw


class DatasetError(Exception):
    """The raw folder as a whole is unusable (missing, empty, not BraTS)."""


@dataclass
class CaseSource:
    """The files of one raw case.

    `files` maps roles to paths: "t1", "t1ce", "t2", "flair", "seg" for BraTS releases, or
    "image" (4D) and "seg" for MSD. `problem` is set when the case cannot be converted.
    """

    case_id: str
    release: str
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    problem: str | None = None
    problem_file: Path | None = None

    @property
    def has_seg(self) -> bool:
        return "seg" in self.files


def _find_role(files: list[str], case_id: str, info: Release, role: str) -> list[str]:
    suffix = info.seg_suffix if role == "seg" else info.modality_suffix[role]
    stem = f"{case_id}{info.separator}{suffix}"
    return [f for f in files if strip_nifti_extension(f) == stem]


def _brats_case(folder: Path, info: Release, files: list[str]) -> CaseSource:
    case_id = folder.name
    case = CaseSource(case_id=case_id, release=info.name, folder=folder)
    for role in (*CHANNELS, "seg"):
        found = _find_role(files, case_id, info, role)
        if len(found) > 1:
            case.problem = f"both {' and '.join(sorted(found))} present; keep one"
            case.problem_file = folder / found[0]
            return case
        if found:
            case.files[role] = folder / found[0]
        elif role == "seg":
            # A seg named otherwise (case 355 of some 2020 copies): brats.odd_segmentation_name.
            used = {p.name for p in case.files.values()}
            odd = odd_segmentation_name([f for f in files if f not in used])
            if odd is not None:
                case.files["seg"] = folder / odd
        else:
            expected = info.file_name(case_id, role)
            case.problem = f"missing {role} modality (expected {expected} or .nii)"
            case.problem_file = folder / expected
            return case
    return case


@dataclass
class RawScan:
    """What a raw tree holds: the cases, and every entry that is not part of one."""

    cases: list[CaseSource]
    not_taken: list[NotTaken]


def _not_a_case_reason(folder: RawFolder, forced: Release | None) -> str:
    """Why a folder holding NIfTI files is not read as a case, with what to do."""
    name = folder.path.name
    n = len(folder.niftis)
    if name in ("imagesTr", "imagesTs", "labelsTr"):
        if forced is not None:
            return f"{n} NIfTI file(s) of an MSD {name}/ folder; not read with --year {forced.name}"
        return (f"{n} NIfTI file(s) of an MSD {name}/ folder; MSD is read only from "
                "RAW/imagesTr/ (+ RAW/labelsTr/): point preprocess at the folder holding it")
    if forced is not None:
        return (f"{n} NIfTI file(s) whose names do not start with the folder name {name!r} "
                f"(--year {forced.name})")
    reason = f"{n} NIfTI file(s), but the folder name {name!r} is not a BraTS case id"
    for info in RELEASE_INFO.values():
        found = re.match(info.case_pattern, name)
        if found and not info.four_d:
            return f"{reason} (it starts like {found.group(0)}: a copy? rename or remove it)"
    if not name.isascii():
        return f"{reason} (it holds non-ASCII characters)"
    return f"{reason} (expected e.g. BraTS2021_00000 or BraTS-GLI-00000-000)"


def _scan_brats_folder(folder: RawFolder, forced: Release | None, cases: list[CaseSource],
                       not_taken: list[NotTaken]) -> None:
    """Take `folder` as one BraTS case when it is one; record what is not taken."""
    for name in folder.others:
        not_taken.append(NotTaken(folder.path / name, "not a NIfTI file (.nii or .nii.gz)"))
    if not folder.niftis:
        if folder.empty:
            not_taken.append(NotTaken(folder.path, "empty folder"))
        return
    info = forced or release_of_case_id(folder.path.name)
    if (info is None or info.four_d
            or (forced is not None and not any(f.startswith(folder.path.name)
                                               for f in folder.niftis))):
        not_taken.append(NotTaken(folder.path, _not_a_case_reason(folder, forced)))
        return
    case = _brats_case(folder.path, info, folder.niftis)
    cases.append(case)
    if case.problem is None:  # a failed case reports its own problem
        used = {p.name for p in case.files.values()}
        for name in folder.niftis:
            if name not in used:
                not_taken.append(NotTaken(folder.path / name,
                                          f"not one of case {case.case_id}'s files"))


def _scan_msd(raw: Path, not_taken: list[NotTaken]) -> list[CaseSource]:
    info = RELEASE_INFO["msd"]
    cases = []
    images_of_labels: set[str] = set()
    for images_dir, labels_dir in (("imagesTr", "labelsTr"), ("imagesTs", None)):
        d = raw / images_dir
        if not d.is_dir():
            continue
        for name in sorted(os.listdir(d)):
            if not is_nifti_name(name):
                continue  # reported by the walk
            case_id = strip_nifti_extension(name)
            case = CaseSource(case_id=case_id, release=info.name, folder=d)
            case.files["image"] = d / name
            if labels_dir is not None:
                images_of_labels.add(name)
            if labels_dir is not None and (raw / labels_dir / name).is_file():
                case.files["seg"] = raw / labels_dir / name
            elif labels_dir is not None:
                case.problem = f"missing label file {labels_dir}/{name}"
                case.problem_file = raw / labels_dir / name
            cases.append(case)
    labels = raw / "labelsTr"
    if labels.is_dir():
        for name in sorted(os.listdir(labels)):
            if is_nifti_name(name) and name not in images_of_labels:
                not_taken.append(NotTaken(labels / name, f"label without an image "
                                                         f"(no imagesTr/{name})"))
    return cases


def scan_raw(raw: Path, year: str | None = None) -> RawScan:
    """The cases under `raw` and every entry of the tree that is not part of a case.

    The one discovery of raw trees: `mtcmkd preprocess` and the prediction inputs use it, so a
    folder is never dropped without a reason (`RawScan.not_taken`).

    Args:
        raw: the folder as distributed (or any parent of the case folders).
        year: force a release ("2018" ... "2023", "msd"); by default each case folder's name
            decides, so trees mixing BraTS releases work. MSD (`RAW/imagesTr/`) is read when
            forced or when `RAW/imagesTr` or `RAW/imagesTs` exists.

    Raises:
        DatasetError: `raw` is missing, not a folder, holds no recognisable BraTS case, or
            holds both MSD folders and BraTS case folders without `year` saying which to read.
    """
    raw = Path(raw)
    if not raw.exists():
        raise DatasetError(f"{raw}: no such folder")
    if not raw.is_dir():
        raise DatasetError(f"{raw}: not a folder")
    forced = release(year) if year is not None else None
    msd_dirs = {raw / name for name in ("imagesTr", "imagesTs", "labelsTr")
                if (raw / name).is_dir()}
    read_msd = forced.four_d if forced is not None else bool(
        msd_dirs - {raw / "labelsTr"})

    not_taken: list[NotTaken] = []
    brats: list[CaseSource] = []
    for folder in walk_raw(raw, not_taken):
        if read_msd and folder.path in msd_dirs:
            for name in folder.others:
                not_taken.append(NotTaken(folder.path / name, "not a NIfTI file (.nii or .nii.gz)"))
            continue
        _scan_brats_folder(folder, None if read_msd else forced, brats, not_taken)

    if read_msd:
        if brats and forced is None:
            raise DatasetError(
                f"{raw}: holds both an MSD imagesTr/ folder and BraTS case folders (e.g. "
                f"{brats[0].folder.relative_to(raw)}); pass --year msd or --year <release> "
                "to read one of them, or split the folder")
        for case in brats:
            not_taken.append(NotTaken(case.folder, "a BraTS case folder; not read with "
                                                   "--year msd"))
        cases = _scan_msd(raw, not_taken)
    else:
        cases = brats

    if not cases:
        what = f"BraTS {forced.name}" if forced else "BraTS (any release)"
        raise DatasetError(f"{raw}: no {what} cases found (expected case folders such as "
                           "BraTS2021_00000/ or BraTS-GLI-00000-000/, or MSD imagesTr/)")

    by_id: dict[str, list[CaseSource]] = defaultdict(list)
    for case in cases:
        by_id[case.case_id].append(case)
    for case_id, same in by_id.items():
        if len(same) > 1:
            places = ", ".join(str(c.folder) for c in same)
            for case in same:
                case.problem = f"duplicate case id {case_id} (found in {places})"
                case.problem_file = case.folder
    not_taken.sort(key=lambda e: str(e.path))
    return RawScan(sorted(cases, key=lambda c: (c.case_id, str(c.folder))), not_taken)


def discover_cases(raw: Path, year: str | None = None) -> list[CaseSource]:
    """All cases under `raw`, sorted by case id (`scan_raw(raw, year).cases`).

    Raises:
        DatasetError: as `scan_raw`.
    """
    return scan_raw(raw, year).cases


