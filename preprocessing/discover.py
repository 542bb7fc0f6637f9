"""Find the cases of a raw BraTS folder, whatever the release.

Layouts handled (docs/BRATS.md of the shared docs): 2018/2019 `{HGG,LGG}/<case>/`, flat
2020/2021 `<case>/`, 2023+ `BraTS-GLI-xxxxx-xxx/` with t1n/t1c/t2w/t2f suffixes, MSD Task01
4D `imagesTr/` + `labelsTr/`; `.nii` or `.nii.gz`; macOS `._*` side files are ignored.
Problems found here (a missing modality, a duplicate case id) are attached to the case, so the
driver reports them with the other per-case failures instead of stopping the run.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mtcmkd.brats import CHANNELS, RELEASE_INFO, Release, release, release_of_case_id


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


def _is_nifti(name: str) -> bool:
    return (name.endswith(".nii") or name.endswith(".nii.gz")) and not name.startswith(".")


def _strip_ext(name: str) -> str:
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]


def _find_role(files: list[str], case_id: str, info: Release, role: str) -> list[str]:
    suffix = info.seg_suffix if role == "seg" else info.modality_suffix[role]
    stem = f"{case_id}{info.separator}{suffix}"
    return [f for f in files if _strip_ext(f) == stem]


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
            # Some 2020 copies name case 355's seg differently (e.g. W39_1998.09.19_Segm.nii):
            # accept exactly one other NIfTI whose name says "seg".
            used = {p.name for p in case.files.values()}
            others = [f for f in files if f not in used and "seg" in f.lower()]
            if len(others) == 1:
                case.files["seg"] = folder / others[0]
        else:
            expected = info.file_name(case_id, role)
            case.problem = f"missing {role} modality (expected {expected} or .nii)"
            case.problem_file = folder / expected
            return case
    return case


def _discover_msd(raw: Path) -> list[CaseSource]:
    info = RELEASE_INFO["msd"]
    cases = []
    for images_dir, labels_dir in (("imagesTr", "labelsTr"), ("imagesTs", None)):
        d = raw / images_dir
        if not d.is_dir():
            continue
        for name in sorted(os.listdir(d)):
            if not _is_nifti(name):
                continue
            case_id = _strip_ext(name)
            case = CaseSource(case_id=case_id, release=info.name, folder=d)
            case.files["image"] = d / name
            if labels_dir is not None and (raw / labels_dir / name).is_file():
                case.files["seg"] = raw / labels_dir / name
            elif labels_dir is not None:
                case.problem = f"missing label file {labels_dir}/{name}"
                case.problem_file = raw / labels_dir / name
            cases.append(case)
    return cases


def discover_cases(raw: Path, year: str | None = None) -> list[CaseSource]:
    """All cases under `raw`, sorted by case id.

    Args:
        raw: the folder as distributed (or any parent of the case folders).
        year: force a release ("2018" ... "2023", "msd"); by default each case folder's name
            decides, so mixed trees work.

    Raises:
        DatasetError: `raw` is missing, not a folder, or holds no recognisable BraTS case.
    """
    raw = Path(raw)
    if not raw.exists():
        raise DatasetError(f"{raw}: no such folder")
    if not raw.is_dir():
        raise DatasetError(f"{raw}: not a folder")
    forced = release(year) if year is not None else None

    if (forced is not None and forced.four_d) or (
        forced is None and ((raw / "imagesTr").is_dir() or (raw / "imagesTs").is_dir())
    ):
        cases = _discover_msd(raw)
    else:
        cases = []
        for dirpath, dirnames, filenames in os.walk(raw):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            niftis = sorted(f for f in filenames if _is_nifti(f))
            if not niftis:
                continue
            folder = Path(dirpath)
            info = forced or release_of_case_id(folder.name)
            if info is None or info.four_d:
                continue
            if forced is not None and not any(f.startswith(folder.name) for f in niftis):
                continue
            cases.append(_brats_case(folder, info, niftis))

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
    return sorted(cases, key=lambda c: (c.case_id, str(c.folder)))


def is_valid_case_id(case_id: str) -> bool:
    """Case ids become folder names in the store: keep them to a safe character set."""
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", case_id) is not None
