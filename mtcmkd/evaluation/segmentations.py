"""`evaluate --run --save-segmentations`: each scored case's label map as a NIfTI file.

The labels are the ones scored (post-processing applied), in the case's release values, on the
original grid. The header is the case's source image's, as `mtcmkd predict` writes it, when the
raw file the store was converted from is still where preprocessing read it (and has the
original grid); otherwise the file is written from the affine the store recorded (qform and
sform from it, code 1 "scanner"), which places it identically in any viewer but does not carry
the rest of the source header. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from mtcmkd.atomic import atomic_output
from mtcmkd.data import open_store
from mtcmkd.evaluation.rules import ScoringCase, postprocess_labels
from mtcmkd.inference import to_release_labels
from mtcmkd.nifti_io import read_shape, write_label_nifti

__all__ = ["SegmentationWriter"]

#: The report preprocessing leaves in the store; its "raw" is the folder it read.
_PREPROCESS_REPORT = "preprocess_report.json"
#: Roles whose source file can stand as a case's reference header, by preference.
_REFERENCE_ROLES = ("t1ce", "t1", "t2", "flair", "image")


class SegmentationWriter:
    """Writes ``out_dir/<case_id>.nii.gz`` for the scored cases of one store.

    Args:
        store: the store the cases were predicted from (case attributes: release, affine,
            source files).
        out_dir: the folder for the files (created; check it first with
            :func:`~mtcmkd.evaluation.check_output_folder`).
        postprocess_et: the scoring's ET post-processing, so the file holds what was scored.

    Attributes:
        headers: per case, where its header came from: ``"source"`` (the raw image) or
            ``"affine"`` (the store's recorded affine; the raw file was not found).
    """

    def __init__(self, store: Path, out_dir: Path, postprocess_et: int | None = None) -> None:
        self.store = Path(store)
        self.out_dir = Path(out_dir)
        self.postprocess_et = postprocess_et
        self.cases = open_store(self.store)["cases"]
        self.raw_root = _raw_root(self.store)
        self.headers: dict[str, str] = {}

    def write(self, case: ScoringCase) -> Path:
        """Write one case; returns the file.

        Raises:
            ValueError: a label the case's release cannot hold (RC before 2023).
            OSError: the file cannot be written (nothing is left half written).
        """
        attrs = self.cases[case.case_id].attrs
        labels, _ = postprocess_labels(case.prediction, self.postprocess_et)
        values = to_release_labels(labels, str(attrs["release"]))
        out = self.out_dir / f"{case.case_id}.nii.gz"
        reference = self._reference(attrs, values.shape)
        if reference is not None:
            write_label_nifti(values, reference, out)
            self.headers[case.case_id] = "source"
        else:
            _write_with_affine(values, np.asarray(attrs["affine"], dtype=np.float64),
                               [float(s) for s in attrs["spacing"]], out)
            self.headers[case.case_id] = "affine"
        return out

    def _reference(self, attrs: Any, shape: tuple[int, ...]) -> Path | None:
        """The case's raw source image when it is still there with the original grid."""
        if self.raw_root is None:
            return None
        files = attrs.get("source_files") or {}
        for role in _REFERENCE_ROLES:
            record = files.get(role)
            if not record:
                continue
            path = self.raw_root / record["path"]
            try:
                if path.is_file() and tuple(read_shape(path)[:3]) == tuple(shape):
                    return path
            except (OSError, ValueError):
                continue
        return None


def _raw_root(store: Path) -> Path | None:
    """The raw folder preprocessing read (from STORE/preprocess_report.json), or None."""
    try:
        raw = json.loads((store / _PREPROCESS_REPORT).read_text(encoding="utf-8"))["raw"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = Path(raw)
    return path if path.is_dir() else None


def _write_with_affine(values: np.ndarray, affine: np.ndarray, spacing: list[float],
                       out: Path) -> None:
    """A uint8 label NIfTI on `affine` (qform and sform, code 1), millimetres, atomically."""
    image = nib.Nifti1Image(np.asarray(values, dtype=np.uint8), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_zooms(spacing)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_slope_inter(1.0, 0.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out, suffix=".nii.gz") as tmp:
        nib.save(image, os.fspath(tmp))
