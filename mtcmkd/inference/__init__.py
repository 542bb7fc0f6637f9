"""Inference: normalisation, sliding window, labels, and the way back to native NIfTI files.

The nn.Modules here (:class:`BrainZScore`, :class:`SlidingWindow`) and
:func:`probabilities_to_labels` compile with ``torch.jit.script``, so normalisation plus
sliding-window prediction can be exported as one TorchScript file that works at any volume
size. :func:`predict_volume` strings them together for a numpy volume; :mod:`.native` puts the
result back on the source grid and writes it as NIfTI with the source header.
"""

from __future__ import annotations

from mtcmkd.inference.labels import probabilities_to_labels
from mtcmkd.inference.native import to_release_labels, uncrop, write_label_nifti
from mtcmkd.inference.normalization import BrainZScore
from mtcmkd.inference.predict import VolumePrediction, brain_bbox, predict_volume
from mtcmkd.inference.sliding_window import (
    OUTPUTS,
    SlidingWindow,
    gaussian_importance_map,
    window_starts,
)

__all__ = [
    "OUTPUTS",
    "BrainZScore",
    "SlidingWindow",
    "VolumePrediction",
    "brain_bbox",
    "gaussian_importance_map",
    "predict_volume",
    "probabilities_to_labels",
    "to_release_labels",
    "uncrop",
    "window_starts",
    "write_label_nifti",
]
