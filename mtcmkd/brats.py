"""Facts about the BraTS releases, in one place.

Every other module asks this one how a release names its files, which label values it uses and
how they map to the canonical labels of the project:

    0 background, 1 NCR/NETC, 2 ED/SNFH, 3 ET, 4 RC (resection cavity, 2024+ only)

with regions WT = {1, 2, 3}, TC = {1, 3}, ET = {3}. The classic trap this avoids: assuming ET is
label 4 yields an empty ET on 2023+ and MSD data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from mtcmkd.lut import LUT_DTYPES, lookup, table_index

#: Canonical channel order of the project (nnU-Net's). Never rely on position elsewhere: the
#: store records the names, and code looks channels up by name.
CHANNELS: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")

CANONICAL_LABELS: dict[int, str] = {
    0: "background",
    1: "NCR/NETC",
    2: "ED/SNFH",
    3: "ET",
    4: "RC",
}

#: Nested evaluation regions in canonical labels. RC belongs to none of them.
REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}

RELEASES: tuple[str, ...] = ("2018", "2019", "2020", "2021", "2023", "msd")

_INVALID = 255  # table entry of a label value the release does not define


@dataclass(frozen=True)
class Release:
    """How one BraTS release lays out a case on disk.

    Attributes:
        name: release key ("2018" ... "msd").
        case_pattern: regular expression matching a case folder name (or, for MSD, a file stem).
        modality_suffix: canonical channel -> file suffix used by the release.
        seg_suffix: suffix of the segmentation file.
        separator: character between case id and suffix ("_" or "-").
        label_names: source label value -> name, as the release documents it.
        label_map: source label value -> canonical label value. Values not listed are invalid.
        image_dtype / seg_dtype: on-disk dtypes of the distributed files (used by the phantom).
        extension: usual file extension.
        grouped: cases live under HGG/ and LGG/ folders (2018, 2019).
        four_d: images are one 4D file per case (MSD Task01), channels in `msd_channel_order`.
    """

    name: str
    case_pattern: str
    modality_suffix: dict[str, str]
    seg_suffix: str
    separator: str
    label_names: dict[int, str]
    label_map: dict[int, int]
    image_dtype: str
    seg_dtype: str
    extension: str = ".nii.gz"
    grouped: bool = False
    four_d: bool = False
    msd_channel_order: tuple[str, ...] = field(default_factory=tuple)

    def file_name(self, case_id: str, role: str) -> str:
        """File name of `role` ("t1" ... "flair" or "seg") for `case_id` in this release."""
        suffix = self.seg_suffix if role == "seg" else self.modality_suffix[role]
        return f"{case_id}{self.separator}{suffix}{self.extension}"

    def map_labels(self, seg: np.ndarray) -> np.ndarray:
        """Map a source segmentation to canonical uint8 labels.

        Raises:
            ValueError: the volume holds a value this release does not define (e.g. 3 in 2021
                data, 5 anywhere, or a non-integer value); the message lists the bad values.
        """
        if seg.dtype in LUT_DTYPES:
            # One table over every value of the dtype; values the release does not define map
            # to 255 and are looked up afterwards, only for the message.
            table = np.full(2 ** (8 * seg.dtype.itemsize), _INVALID, dtype=np.uint8)
            keys = np.array(list(self.label_map), dtype=np.int64)
            valid = (keys >= np.iinfo(seg.dtype).min) & (keys <= np.iinfo(seg.dtype).max)
            table[table_index(keys[valid].astype(seg.dtype))] = [
                self.label_map[int(k)] for k in keys[valid]]
            out = lookup(table, seg)
            if out.size and out.max() == _INVALID:
                raise self._unexpected(np.unique(seg[out == _INVALID]).astype(np.int64).tolist())
            return out
        if seg.dtype.kind in "ui" and seg.size and 0 <= seg.min() and seg.max() < 4096:
            values = np.flatnonzero(np.bincount(seg.reshape(-1)))  # much faster than unique
        else:
            values = np.unique(seg)
        if not np.all(np.equal(np.mod(values, 1), 0)):
            bad = values[np.mod(values, 1) != 0][:5]
            raise ValueError(f"non-integer label values {bad.tolist()}")
        values = values.astype(np.int64)
        bad = [int(v) for v in values if int(v) not in self.label_map]
        if bad:
            raise self._unexpected(bad)
        lut = np.zeros(max(int(values.max()), max(self.label_map)) + 1, dtype=np.uint8)
        for src, dst in self.label_map.items():
            lut[src] = dst
        return lut[seg.astype(np.int64)]

    def _unexpected(self, bad: list[int]) -> ValueError:
        return ValueError(f"unexpected label values {bad} (release {self.name} allows "
                          f"{sorted(self.label_map)})")

    def unmap_labels(self, labels: np.ndarray) -> np.ndarray:
        """Inverse of `map_labels`: canonical labels -> this release's label values."""
        inverse = {dst: src for src, dst in self.label_map.items()}
        lut = np.zeros(max(CANONICAL_LABELS) + 1, dtype=np.int64)
        for dst in CANONICAL_LABELS:
            lut[dst] = inverse.get(dst, 0)
        missing = [v for v in np.unique(labels).tolist() if v not in inverse]
        if missing:
            raise ValueError(f"release {self.name} has no label for canonical values {missing}")
        return lut[labels.astype(np.int64)]


_LEGACY_NAMES = {0: "background", 1: "NCR/NET", 2: "ED", 4: "ET"}
_LEGACY_MAP = {0: 0, 1: 1, 2: 2, 4: 3}
_LEGACY_SUFFIX = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}

RELEASE_INFO: dict[str, Release] = {
    "2018": Release(
        name="2018",
        case_pattern=r"Brats18_[A-Za-z0-9]+_[A-Za-z0-9]+_\d+",
        modality_suffix=_LEGACY_SUFFIX,
        seg_suffix="seg",
        separator="_",
        label_names=_LEGACY_NAMES,
        label_map=_LEGACY_MAP,
        image_dtype="int16",
        seg_dtype="uint8",
        grouped=True,
    ),
    "2019": Release(
        name="2019",
        case_pattern=r"BraTS19_[A-Za-z0-9]+_[A-Za-z0-9]+_\d+",
        modality_suffix=_LEGACY_SUFFIX,
        seg_suffix="seg",
        separator="_",
        label_names=_LEGACY_NAMES,
        label_map=_LEGACY_MAP,
        image_dtype="int16",
        seg_dtype="uint8",
        # Widely shared copies of 2019 are unzipped; the phantom writes that variant.
        extension=".nii",
        grouped=True,
    ),
    "2020": Release(
        name="2020",
        case_pattern=r"BraTS20_(?:Training|Validation|Testing)_\d+",
        modality_suffix=_LEGACY_SUFFIX,
        seg_suffix="seg",
        separator="_",
        label_names=_LEGACY_NAMES,
        label_map=_LEGACY_MAP,
        image_dtype="int16",
        seg_dtype="uint8",
    ),
    "2021": Release(
        name="2021",
        case_pattern=r"BraTS2021_\d{5}",
        modality_suffix=_LEGACY_SUFFIX,
        seg_suffix="seg",
        separator="_",
        label_names=_LEGACY_NAMES,
        label_map=_LEGACY_MAP,
        image_dtype="int16",
        seg_dtype="uint16",
    ),
    "2023": Release(
        name="2023",
        case_pattern=r"BraTS-[A-Z]+-\d{5}-\d{3}",
        modality_suffix={"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"},
        seg_suffix="seg",
        separator="-",
        label_names={0: "background", 1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"},
        label_map={0: 0, 1: 1, 2: 2, 3: 3, 4: 4},
        image_dtype="int16",
        seg_dtype="uint8",
    ),
    "msd": Release(
        name="msd",
        case_pattern=r"BRATS_\d{3}",
        modality_suffix={},
        seg_suffix="",
        separator="",
        label_names={0: "background", 1: "edema", 2: "non-enhancing tumour", 3: "enhancing tumour"},
        label_map={0: 0, 1: 2, 2: 1, 3: 3},
        image_dtype="float32",
        seg_dtype="uint8",
        four_d=True,
        msd_channel_order=("flair", "t1", "t1ce", "t2"),
    ),
}


def release(name: str | int) -> Release:
    """Look up a release by name ("2021", 2021, "msd"); ValueError lists the valid names."""
    key = str(name).lower()
    if key in ("2024", "2025", "gli"):
        key = "2023"
    try:
        return RELEASE_INFO[key]
    except KeyError:
        raise ValueError(f"unknown BraTS release {name!r}; expected one of {RELEASES}") from None


def release_of_case_id(case_id: str) -> Release | None:
    """The release whose case naming matches `case_id` exactly, or None."""
    for info in RELEASE_INFO.values():
        if re.fullmatch(info.case_pattern, case_id):
            return info
    return None


def _suffix_roles() -> dict[str, str]:
    # The suffixes of different releases never name different roles, so one table serves all.
    roles: dict[str, str] = {}
    for info in RELEASE_INFO.values():
        for channel, suffix in info.modality_suffix.items():
            roles[suffix.lower()] = channel
        if info.seg_suffix:
            roles[info.seg_suffix.lower()] = "seg"
    return roles


#: Lower-case file-name suffix of any release -> the role it names (a channel of CHANNELS, or
#: "seg"): 2021 and older ``t1/t1ce/t2/flair/seg``, 2023+ ``t1n/t1c/t2w/t2f/seg``.
SUFFIX_ROLES: dict[str, str] = _suffix_roles()


def case_id_of_file_stem(stem: str) -> str | None:
    """The case id a file stem starts with when it is named ``<case id><separator><suffix>`` as
    a BraTS release names a case's files (``BraTS2021_00000_t1ce`` -> ``BraTS2021_00000``), or
    None. MSD files are named by the case id alone and are not recognised here.
    """
    for info in RELEASE_INFO.values():
        if info.four_d:
            continue
        head, sep, _ = stem.rpartition(info.separator)
        if sep and re.fullmatch(info.case_pattern, head):
            return head
    return None


def odd_segmentation_name(names: list[str]) -> str | None:
    """The segmentation among a case folder's file names when it is not named as its release
    names it: the one name holding "seg" (any case), or None when none or several do.

    Some BraTS 2020 copies name case 355's segmentation ``W39_1998.09.19_Segm.nii`` instead of
    ``BraTS20_Training_355_seg.nii``. Pass the names not already taken as the case's images.
    """
    odd = [name for name in names if "seg" in name.lower()]
    return odd[0] if len(odd) == 1 else None


@dataclass(frozen=True)
class LesionWiseParameters:
    """Lesion-wise scoring parameters of one BraTS 2023+ sub-challenge (official script).

    Attributes:
        subchallenge: "GLI" (adult glioma), "SSA" (sub-Saharan Africa), "PED" (paediatric),
            "MEN" (meningioma) or "MET" (metastases).
        dilation_iterations: dilations of the truth (18-neighbourhood) that merge nearby truth
            components into one lesion and define the neighbourhood a prediction must touch.
        volume_threshold_mm3: truth lesions of this volume or less (mm^3, voxel count times
            the voxel volume) are left out of the score.
    """

    subchallenge: str
    dilation_iterations: int
    volume_threshold_mm3: float


#: Per sub-challenge parameters of the BraTS 2023 lesion-wise evaluation script.
SUBCHALLENGES: dict[str, LesionWiseParameters] = {
    "GLI": LesionWiseParameters("GLI", 3, 50.0),
    "SSA": LesionWiseParameters("SSA", 3, 50.0),
    "PED": LesionWiseParameters("PED", 3, 50.0),
    "MEN": LesionWiseParameters("MEN", 1, 50.0),
    "MET": LesionWiseParameters("MET", 1, 2.0),
}


def subchallenge(name: str) -> LesionWiseParameters:
    """Look up a sub-challenge ("GLI", "met", "BraTS-PED"); ValueError lists the valid names."""
    key = name.upper().removeprefix("BRATS-")
    try:
        return SUBCHALLENGES[key]
    except KeyError:
        raise ValueError(f"unknown BraTS sub-challenge {name!r}; expected one of "
                         f"{', '.join(SUBCHALLENGES)}") from None


def region_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean WT/TC/ET masks of a canonical label volume."""
    return {name: np.isin(labels, values) for name, values in REGIONS.items()}


def brats_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel-to-world matrix in the style of the BraTS releases (LPS-flipped x and y, 1 mm).

    Real 2021 files carry diag(-1, -1, 1) with the y offset at shape[1] - 1 (qform code 1,
    sform code 0); the phantom reproduces that so nothing downstream can tell it apart.
    """
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = shape[1] - 1
    return affine
