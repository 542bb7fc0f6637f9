"""Write phantom cases in the exact on-disk layout of a BraTS release (`mtcmkd synth`).

File names, folder structure, dtypes, label values and affine/header style follow each
release (see `mtcmkd.brats`), so the preprocessing cannot tell the phantom from real data.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from mtcmkd.brats import CHANNELS, Release, brats_affine, release

from .case import PhantomCase, make_case


def _case_id(info: Release, index: int, case: PhantomCase) -> tuple[str, str]:
    """(relative folder, case id) of phantom case `index` in release `info`'s naming."""
    grade = "HGG" if case.has_et else "LGG"
    if info.name == "2018":
        cid = f"Brats18_PHA{index // 50 + 1:02d}_{100 + index}_1"
        return f"{grade}/{cid}", cid
    if info.name == "2019":
        cid = f"BraTS19_PHA{index // 50 + 1:02d}_{100 + index}_1"
        return f"{grade}/{cid}", cid
    if info.name == "2020":
        cid = f"BraTS20_Training_{index + 1:03d}"
        return cid, cid
    if info.name == "2021":
        # Real 2021 ids are not contiguous; neither are ours.
        cid = f"BraTS2021_{2 * index:05d}"
        return cid, cid
    if info.name == "2023":
        cid = f"BraTS-GLI-{2 * index:05d}-000"
        return cid, cid
    cid = f"BRATS_{index + 1:03d}"
    return "", cid


def _to_disk_dtype(image: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "int16":
        out = np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)
        out[(image > 0) & (out == 0)] = 1  # keep the brain mask exact after rounding
        return out
    return image.astype(dtype)


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    # The releases carry a qform (code 1, scanner) and no sform; so do we.
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=0)
    img.header.set_xyzt_units("mm", "sec")
    return img


def write_case(out: Path, info: Release, index: int, case: PhantomCase) -> str:
    """Write one phantom case under `out` in `info`'s layout; returns the case id."""
    folder, cid = _case_id(info, index, case)
    labels = info.unmap_labels(case.label).astype(info.seg_dtype)
    if info.four_d:
        affine = np.eye(4)
        stack = np.stack([case.images[c] for c in info.msd_channel_order], axis=-1)
        (out / "imagesTr").mkdir(parents=True, exist_ok=True)
        (out / "labelsTr").mkdir(parents=True, exist_ok=True)
        nib.save(_nifti(_to_disk_dtype(stack, info.image_dtype), affine),
                 out / "imagesTr" / f"{cid}.nii.gz")
        nib.save(_nifti(labels, affine), out / "labelsTr" / f"{cid}.nii.gz")
        return cid
    affine = brats_affine(case.label.shape)
    case_dir = out / folder
    case_dir.mkdir(parents=True, exist_ok=True)
    for channel in CHANNELS:
        data = _to_disk_dtype(case.images[channel], info.image_dtype)
        nib.save(_nifti(data, affine), case_dir / info.file_name(cid, channel))
    nib.save(_nifti(labels, affine), case_dir / info.file_name(cid, "seg"))
    return cid


def write_msd_dataset_json(out: Path, case_ids: list[str]) -> None:
    """The `dataset.json` of the Medical Segmentation Decathlon Task01 layout, for `case_ids`."""
    meta = {
        "name": "BRATS",
        "description": "mtcmkd phantom in the Medical Segmentation Decathlon Task01 layout",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor",
                   "3": "enhancing tumour"},
        "numTraining": len(case_ids),
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                     for c in case_ids],
        "test": [],
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=4) + "\n")


def synthesize(out: Path, *, n_cases: int, layout: str = "2021",
               shape: tuple[int, int, int] = (240, 240, 155), seed: int = 0,
               use_template: bool = True,
               on_case: Callable[[str], None] | None = None) -> list[str]:
    """Write `n_cases` phantom cases to `out` in the layout of release `layout`.

    `out` must not exist or be empty. Cases are written into `out/.partial` first and moved into
    place at the end, so an interrupted run never looks like a complete dataset.
    Returns the case ids.
    """
    info = release(layout)
    out = Path(out)
    if n_cases < 1:
        raise ValueError("--cases must be >= 1")
    if any(s < 16 for s in shape):
        raise ValueError(f"--shape {shape}: every dimension must be >= 16 voxels")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is a file, not a folder")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not an empty folder")
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
    except OSError as exc:
        # e.g. OUT under a file, or in a read-only folder: one line, nothing written
        raise FileExistsError(f"{out}: cannot create the folder ({exc.strerror})") from None
    ids = []
    try:
        for index in range(n_cases):
            case = make_case(tuple(shape), seed, index, use_template=use_template)
            ids.append(write_case(partial, info, index, case))
            if on_case is not None:
                on_case(ids[-1])
        if info.four_d:
            write_msd_dataset_json(partial, ids)
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise FileExistsError(f"{out}: cannot write the dataset ({exc.strerror})") from None
    return ids
