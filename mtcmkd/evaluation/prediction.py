"""Segment one case from its files, and write the result as the release would.

:func:`predict_case` reads the student's channels (:mod:`.case_files`) and runs the one
inference pipeline (:func:`student_pipeline`, an :class:`mtcmkd.inference.InferencePipeline`:
brain crop, z-score, windows or box, labels on the full grid); nothing here re-implements
inference. :func:`write_prediction` writes the labels in the release's values with the input's
affine and header.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtcmkd.evaluation.case_files import LoadedInput, load_prediction_input
from mtcmkd.evaluation.prediction_inputs import PredictionInput
from mtcmkd.evaluation.rules import postprocess_labels
from mtcmkd.inference import (
    InferencePipeline,
    InferenceSettings,
    build_pipeline,
    segment_volume,
    to_release_labels,
)
from mtcmkd.inference.predict import PipelineEnsemble
from mtcmkd.nifti_io import InputError, write_label_nifti
from mtcmkd.student_weights import StudentBundle

__all__ = ["CasePrediction", "predict_case", "student_pipeline", "write_prediction"]


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


def student_pipeline(bundle: StudentBundle, settings: InferenceSettings | None = None, *,
                     device: torch.device | str | None = None,
                     normalize: bool = True) -> InferencePipeline:
    """The student's inference pipeline for `settings` (default: the reference) on `device`.

    The network is moved to `device` (default: where it is) and, for the bf16 CPU path, its
    weights made channels-last (values unchanged). Build it once and reuse it for every case.

    Args:
        normalize: z-score the brain box (raw inputs); off for store crops, already z-scored.
    """
    if device is not None:
        bundle.network.to(device)
    first = next(bundle.network.parameters(), None)
    where = first.device if first is not None else torch.device("cpu")
    return build_pipeline(bundle.network, bundle.patch_size, bundle.n_classes, bundle.output,
                          settings, device=where, n_channels=len(bundle.channels),
                          normalize=normalize).to(where)


def predict_case(bundle: StudentBundle, item: PredictionInput, *,
                 pipeline: InferencePipeline | PipelineEnsemble | None = None,
                 settings: InferenceSettings | None = None, postprocess_et: int | None = None,
                 device: torch.device | str | None = None) -> CasePrediction:
    """Segment one case from its raw files (brain crop, z-score, windows or box, uncrop).

    The same normalisation as preprocessing: each channel z-scored on its non-zero voxels of the
    brain crop. Nothing is written.

    Args:
        pipeline: the student's pipeline (:func:`student_pipeline`), or several students'
            (:class:`~mtcmkd.inference.predict.PipelineEnsemble`); built from `settings` and
            `device` when not given.

    Raises:
        InputError: a bad file (see :func:`load_prediction_input`), or a brain of constant
            intensity that cannot be normalised.
    """
    start = time.perf_counter()
    if pipeline is None:
        pipeline = student_pipeline(bundle, settings, device=device)
    loaded = load_prediction_input(item)
    try:
        result = segment_volume(pipeline, loaded.image)
    except ValueError as exc:  # all-zero or constant brain
        raise InputError(item.reference, str(exc)) from None
    labels, relabelled = postprocess_labels(result.labels, postprocess_et)
    return CasePrediction(labels, loaded, relabelled, time.perf_counter() - start)


def write_prediction(labels: np.ndarray, item: PredictionInput, out_dir: Path) -> Path:
    """Write ``out_dir/<case_id>.nii.gz``: release label values, the input's affine and header.

    Atomic (temporary name, then rename): the file is complete or absent.
    """
    return write_label_nifti(to_release_labels(labels, item.release), item.reference,
                             Path(out_dir) / f"{item.case_id}.nii.gz")
