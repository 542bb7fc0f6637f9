"""Inference: the one pipeline from a raw volume to labels, its settings, and native space.

:class:`InferencePipeline` (brain box, :class:`BrainZScore`, :class:`SlidingWindow` windows or
one pass over the box, :func:`probabilities_to_labels`, label values) is the only whole-volume
inference of the package: `predict`, `evaluate`, training's validation and the TorchScript
export all run it, and it compiles with ``torch.jit.script`` (float32). Its options come from
:class:`InferenceSettings` (precision, layout, overlap, mirrors) through
:func:`build_pipeline`. :func:`segment_volume` / :func:`predict_volume` run it on a numpy
volume; :mod:`.native` puts the result back on the source grid and writes it as NIfTI with the
source header.
"""

from __future__ import annotations

from mtcmkd.inference.labels import probabilities_to_labels
from mtcmkd.inference.native import to_release_labels, uncrop, write_label_nifti
from mtcmkd.inference.normalization import BrainZScore
from mtcmkd.inference.pipeline import InferencePipeline, build_pipeline
from mtcmkd.inference.predict import VolumePrediction, brain_bbox, predict_volume, segment_volume
from mtcmkd.inference.settings import (
    LAYOUTS,
    PRECISIONS,
    PREDICT_DEFAULTS,
    InferenceSettings,
    apply_threads,
    cpu_has_native_bf16,
    default_threads,
    resolve_precision,
)
from mtcmkd.inference.sliding_window import (
    OUTPUTS,
    SlidingWindow,
    gaussian_importance_map,
    window_progress,
    window_starts,
)

__all__ = [
    "LAYOUTS",
    "OUTPUTS",
    "PRECISIONS",
    "PREDICT_DEFAULTS",
    "BrainZScore",
    "InferencePipeline",
    "InferenceSettings",
    "SlidingWindow",
    "VolumePrediction",
    "apply_threads",
    "brain_bbox",
    "build_pipeline",
    "cpu_has_native_bf16",
    "default_threads",
    "gaussian_importance_map",
    "predict_volume",
    "probabilities_to_labels",
    "resolve_precision",
    "segment_volume",
    "to_release_labels",
    "uncrop",
    "window_progress",
    "window_starts",
    "write_label_nifti",
]
