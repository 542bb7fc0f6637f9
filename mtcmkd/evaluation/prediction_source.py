"""Prediction files of any tool as the cases to score (`mtcmkd evaluate --pred --gt`).

:func:`match_prediction_files` pairs every ``<case_id>.nii.gz`` with its ground truth in the
release's layout (case folders with ``*_seg`` files, or MSD ``labelsTr/``) and decides what a
truth case without a prediction means (an error by default); :func:`prediction_file_cases`
reads each pair as canonical labels, refusing a prediction that is not on the truth's grid.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtcmkd.brats import Release, odd_segmentation_name, release
from mtcmkd.evaluation.case_files import read_labels
from mtcmkd.evaluation.errors import EvaluationError
from mtcmkd.evaluation.rules import ScoringCase
from mtcmkd.nifti_io import (
    AFFINE_ATOL_MM,
    InputError,
    find_nifti,
    is_nifti_name,
    read_nifti,
    strip_nifti_extension,
)

__all__ = [
    "MISSING_POLICIES",
    "PredictionPair",
    "match_prediction_files",
    "prediction_file_cases",
]


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
            for name in sorted(n for n in os.listdir(folder) if is_nifti_name(n)):
                index.setdefault(strip_nifti_extension(name), folder / name)
        return index
    suffix = f"{info.separator}{info.seg_suffix}"
    for dirpath, dirnames, filenames in os.walk(gt_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            stem = strip_nifti_extension(name) if is_nifti_name(name) else ""
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
            # As preprocessing does: a seg named otherwise (case 355 of some 2020 copies).
            odd = odd_segmentation_name([n for n in filenames if is_nifti_name(n)])
            if odd is not None:
                index[folder.name] = folder / odd
    return index


def _overlay_image(truth: Path, case_id: str, info: Release, gt_dir: Path
                   ) -> tuple[Path | None, int | None]:
    if info.four_d:
        images = gt_dir / "imagesTr"
        found = find_nifti(images, case_id) if images.is_dir() else None
        return found, (info.msd_channel_order.index("t1ce") if found else None)
    stem = f"{case_id}{info.separator}{info.modality_suffix['t1ce']}"
    return find_nifti(truth.parent, stem), None


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
    names = sorted(n for n in os.listdir(pred_dir) if is_nifti_name(n))
    if not names:
        raise InputError(pred_dir, "no prediction files (<case_id>.nii.gz)")
    truths = _truth_index(gt_dir, info)
    pairs: list[PredictionPair] = []
    seen: set[str] = set()
    for name in names:
        case_id = strip_nifti_extension(name)
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
    name = release(year).name
    for pair in pairs:
        truth, truth_file = read_labels(pair.truth, name)
        if pair.prediction is None:  # no prediction file: scored as an empty prediction
            prediction = np.zeros(truth.shape, dtype=np.uint8)
            pred_affine = truth_file.affine
        else:
            prediction, pred_file = read_labels(pair.prediction, name)
            pred_affine = pred_file.affine
        if prediction.shape != truth.shape:
            raise InputError(pair.prediction or pair.truth,
                             f"shape {prediction.shape} differs from the ground truth's "
                             f"{truth.shape} ({pair.truth})")
        diff = float(np.abs(pred_affine - truth_file.affine).max())
        if diff > AFFINE_ATOL_MM:
            raise InputError(pair.prediction or pair.truth,
                             f"affine differs from the ground truth's (max difference "
                             f"{diff:.3g}); write predictions on the source image's grid")
        zooms = truth_file.zooms
        image = None
        if with_image and pair.image is not None:
            data = read_nifti(pair.image).data
            if pair.image_index is not None and data.ndim == 4:
                data = data[..., pair.image_index]
            image = np.asarray(data, dtype=np.float32) if data.shape == truth.shape else None
        yield ScoringCase(pair.case_id, prediction, truth,
                          (float(zooms[0]), float(zooms[1]), float(zooms[2])), image=image,
                          affine=np.asarray(truth_file.affine, dtype=np.float64))
