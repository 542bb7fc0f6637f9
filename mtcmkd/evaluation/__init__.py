"""Evaluation and prediction on native BraTS files: what `mtcmkd predict` and `evaluate` run.

One module per concern; the thin CLI strings them together:

- :mod:`.prediction_inputs`: what predict segments under its input path (a case folder of
  any release, a folder of cases, MSD, one NIfTI), every case that cannot be, and every entry
  not taken (:func:`discover_prediction_inputs`).
- :mod:`.case_files`: reading one case's files, checked (:func:`check_prediction_input`,
  :func:`load_prediction_input`, :func:`load_truth`).
- :mod:`.prediction`: segment one case and write it in the release's label values with the
  source header through the one inference pipeline (:func:`student_pipeline`,
  :func:`predict_case`, :func:`write_prediction`).
- :mod:`.rules`: how cases are scored (:class:`EvaluationSettings`, :func:`score_case_record`:
  legacy BraTS per-case rules, 2023+ lesion-wise rules, the authors' slice Dice, labelled).
- :mod:`.records`: the scored cases and their files (:func:`score_predictions`,
  :class:`Evaluation`, :func:`write_metrics`: metrics.json and metrics.csv).
- :mod:`.run_source`: a run's held-out store cases as the cases to score, with the
  ``splits.json``/fingerprint check (:func:`run_evaluation_inputs`,
  :func:`store_scoring_cases`: predictions and truth are put back on the original grid).
- :mod:`.prediction_source`: prediction files of any tool as the cases to score
  (:func:`match_prediction_files`, :func:`prediction_file_cases`).
- :mod:`.segmentations`: the scored label maps of `evaluate --run` as NIfTI files in the
  release's values on the original grid (:class:`SegmentationWriter`).
- :mod:`.references`: published results to print next to ours (:data:`REFERENCE_NUMBERS`).
- :mod:`.errors`: :class:`InputError` (a path, ``<path>: <reason>``) and
  :class:`EvaluationError` (anything else the user must fix).

NIfTI reading and writing is :mod:`mtcmkd.nifti_io`; folder walking is
:func:`mtcmkd.raw_tree.walk_raw`; release naming is :mod:`mtcmkd.brats`.

Label volumes here are canonical (0 background, 1 NCR/NETC, 2 ED/SNFH, 3 ET, 4 RC) unless a
name says otherwise; files on disk use their release's values (`mtcmkd.brats`).
"""

from __future__ import annotations

from mtcmkd.evaluation.case_files import (
    LoadedInput,
    check_prediction_input,
    load_prediction_input,
    load_truth,
)
from mtcmkd.evaluation.errors import EvaluationError, InputError
from mtcmkd.evaluation.prediction import (
    CasePrediction,
    predict_case,
    student_pipeline,
    write_prediction,
)
from mtcmkd.evaluation.prediction_inputs import (
    CaseFailure,
    NotTaken,
    PredictionInput,
    PredictionInputs,
    discover_prediction_inputs,
    find_prediction_inputs,
    modality_in_file_name,
)
from mtcmkd.evaluation.prediction_source import (
    MISSING_POLICIES,
    PredictionPair,
    match_prediction_files,
    prediction_file_cases,
)
from mtcmkd.evaluation.records import (
    Evaluation,
    check_output_folder,
    score_predictions,
    write_metrics,
)
from mtcmkd.evaluation.references import REFERENCE_NUMBERS, ReferenceResult
from mtcmkd.evaluation.rules import (
    HD95_DEFINITION,
    HD95_DEFINITION_2023,
    LEGACY_RULES,
    LEGACY_RULES_2023,
    LEGACY_SLICE_DICE_NOTE,
    LESION_RULES,
    EvaluationSettings,
    ScoringCase,
    postprocess_labels,
    score_case_record,
)
from mtcmkd.evaluation.run_source import (
    SPLITS_FILE,
    RecordedSplit,
    RunEvaluationInputs,
    read_recorded_split,
    run_evaluation_inputs,
    store_case_releases,
    store_scoring_cases,
    trained_releases,
)
from mtcmkd.evaluation.segmentations import SegmentationWriter
from mtcmkd.nifti_io import AFFINE_ATOL_MM

__all__ = [
    "AFFINE_ATOL_MM",
    "HD95_DEFINITION",
    "HD95_DEFINITION_2023",
    "LEGACY_RULES",
    "LEGACY_RULES_2023",
    "LEGACY_SLICE_DICE_NOTE",
    "LESION_RULES",
    "MISSING_POLICIES",
    "REFERENCE_NUMBERS",
    "SPLITS_FILE",
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
    "SegmentationWriter",
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
    "store_case_releases",
    "store_scoring_cases",
    "student_pipeline",
    "trained_releases",
    "write_metrics",
    "write_prediction",
]
