"""How cases are scored: the BraTS rules, the settings that choose them, one case's record.

:class:`EvaluationSettings` says which rules apply (the release: legacy per-case rules, plus
the lesion-wise rules for 2023+; optional ET post-processing; the MTCM-KD authors' slice Dice,
clearly labelled); :func:`score_case_record` scores one :class:`ScoringCase` by them with the
pure functions of :mod:`mtcmkd.metrics`. The rule texts here are copied into metrics.json, so a
file says how its numbers were computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mtcmkd.brats import REGIONS, LesionWiseParameters, Release, release, subchallenge
from mtcmkd.metrics import (
    BRATS2023_EMPTY_HD95,
    lesion_wise_scores,
    relabel_small_et,
    robust_hausdorff,
    score_case,
    slice_dice_legacy,
)

__all__ = [
    "HD95_DEFINITION",
    "HD95_DEFINITION_2023",
    "LEGACY_RULES",
    "LEGACY_RULES_2023",
    "LEGACY_SLICE_DICE_NOTE",
    "LESION_RULES",
    "EvaluationSettings",
    "ScoringCase",
    "postprocess_labels",
    "score_case_record",
]

LEGACY_RULES = (
    "BraTS legacy per-case rules (2017-2021): Dice, HD95 (mm), sensitivity and specificity "
    "per region (WT, TC, ET) on the full native-resolution volume; truth and prediction both "
    "empty: Dice 1, HD95 0; exactly one empty: Dice 0, HD95 373.13 mm; means over cases include "
    "these values."
)
#: The per-case rules of the official BraTS 2023 script (it reports these next to the
#: lesion-wise scores): as legacy, but its HD95 (HD95_DEFINITION_2023) and 374 mm when one is empty.
LEGACY_RULES_2023 = (
    "BraTS 2023+ per-case (\"legacy\") scores as the official BraTS 2023 script reports them: "
    "Dice, HD95 (mm), sensitivity and specificity per region (WT, TC, ET) on the full "
    "native-resolution volume; truth and prediction both empty: Dice 1, HD95 0; exactly one "
    "empty: Dice 0, HD95 374 mm; means over cases include these values."
)
LESION_RULES = (
    " Plus BraTS 2023+ lesion-wise Dice and HD95 as the official BraTS 2023 script computes "
    "them ({subchallenge} parameters: truth dilated {dilation}x with the 18-neighbourhood, "
    "truth components in one dilated 26-connected component form one lesion, 26-connected "
    "predicted components match a lesion when they touch it dilated {dilation}x again, truth "
    "lesions of <= {threshold:g} mm^3 dropped, missed lesions and unmatched predicted "
    "components Dice 0 and HD95 374 mm, score = sum over lesions / (TP + FN + FP), nothing to "
    "score Dice 1 and HD95 0)."
)

#: Which HD95 this project reports (the libraries disagree; docs/BRATS.md).
HD95_DEFINITION = (
    "MONAI's HD95: surfaces are the voxels one erosion with the 3D cross removes; the 95th "
    "percentile (linear interpolation) of each directed set of surface distances (Euclidean, in "
    "mm from the voxel spacing), then the larger of the two. medpy pools both directions "
    "before the percentile and gives smaller values."
)
#: The HD95 of the BraTS 2023+ evaluation (legacy and lesion-wise).
HD95_DEFINITION_2023 = (
    "The official BraTS 2023 HD95 (DeepMind surface-distance compute_robust_hausdorff, 95): "
    "surface elements on the voxel-corner lattice (2x2x2 neighbourhood codes), each weighted by "
    "its marching-cubes area in mm^2; per direction the distance (mm) at which the cumulative "
    "area of the elements sorted by distance reaches 95 % (no interpolation), then the larger "
    "of the two."
)

LEGACY_SLICE_DICE_NOTE = (
    "legacy_slice_dice is NOT the BraTS Dice: it is the MTCM-KD authors' metric, a 2D Dice per "
    "slice along the first array axis averaged over all slices, slices empty in both prediction "
    "and truth scoring 1 (computed here on the native grid; the authors used 128^3 resized "
    "volumes). It is far higher than the BraTS Dice for the same prediction; do not compare it "
    "with BraTS results."
)

_LEGACY_METRICS = ("dice", "hd95", "sensitivity", "specificity")
_LESION_METRICS = ("lesion_wise_dice", "lesion_wise_hd95")


@dataclass(frozen=True)
class EvaluationSettings:
    """How cases are scored.

    Attributes:
        year: the release ("2018" ... "2021", "2023" and later, "msd"); decides the rules
            (lesion-wise for 2023+) and, for prediction files, the label values expected.
        postprocess_et: relabel a predicted ET of fewer voxels than this as NCR/NETC before
            scoring; None = off (the default; any use must be reported, and is).
        legacy_slice_dice: also compute the MTCM-KD authors' slice-averaged Dice.
        subchallenge: the BraTS 2023+ sub-challenge whose lesion-wise parameters apply
            (GLI, SSA, PED, MEN, MET; :data:`mtcmkd.brats.SUBCHALLENGES`). Only 2023+ uses it.
    """

    year: str
    postprocess_et: int | None = None
    legacy_slice_dice: bool = False
    subchallenge: str = "GLI"

    def __post_init__(self) -> None:
        release(self.year)  # ValueError for an unknown year
        subchallenge(self.subchallenge)  # ValueError listing the sub-challenges
        if self.postprocess_et is not None and self.postprocess_et < 1:
            raise ValueError(f"postprocess_et must be >= 1 voxel, got {self.postprocess_et}")

    @property
    def release(self) -> Release:
        return release(self.year)

    @property
    def lesion_wise(self) -> bool:
        """2023 and later releases are scored lesion-wise too (MSD and 2017-2021 are not)."""
        return self.release.name == "2023"

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Per-region metrics in each case record, in output order."""
        names = _LEGACY_METRICS + (_LESION_METRICS if self.lesion_wise else ())
        return names + (("legacy_slice_dice",) if self.legacy_slice_dice else ())

    @property
    def lesion_parameters(self) -> LesionWiseParameters:
        """Dilations and volume threshold of the lesion-wise rules (the sub-challenge's)."""
        return subchallenge(self.subchallenge)

    @property
    def rules(self) -> str:
        if not self.lesion_wise:
            return LEGACY_RULES
        params = self.lesion_parameters
        return LEGACY_RULES_2023 + LESION_RULES.format(
            subchallenge=params.subchallenge, dilation=params.dilation_iterations,
            threshold=params.volume_threshold_mm3)

    @property
    def hd95_definition(self) -> str:
        return HD95_DEFINITION_2023 if self.lesion_wise else HD95_DEFINITION

    @property
    def year_value(self) -> int | str:
        """The year as JSON writes it: an int for numbered releases, else "msd"."""
        return int(self.year) if self.year.isdigit() else self.year

    def postprocessing(self, cases_relabelled: int | None = None) -> dict[str, Any]:
        """The post-processing note of metrics.json."""
        on = self.postprocess_et is not None
        note: dict[str, Any] = {
            "applied": on,
            "et_min_voxels": self.postprocess_et,
            "description": (
                f"a predicted ET of fewer than {self.postprocess_et} voxels (whole case) was "
                "relabelled as NCR/NETC before scoring" if on else
                "none: predictions scored as given (no ET post-processing)"
            ),
        }
        if cases_relabelled is not None:
            note["cases_relabelled"] = cases_relabelled
        return note


@dataclass
class ScoringCase:
    """One case to score: canonical labels on the native grid.

    Attributes:
        case_id: the id reported.
        prediction, truth: canonical label volumes of one shape (the original image's).
        spacing: voxel size in mm along the array axes (HD95).
        image: an intensity volume of the same grid for overlays (optional).
        affine: the voxel-to-world matrix (orients overlays; optional).
    """

    case_id: str
    prediction: np.ndarray
    truth: np.ndarray
    spacing: tuple[float, float, float]
    image: np.ndarray | None = None
    affine: np.ndarray | None = None


def score_case_record(case: ScoringCase, settings: EvaluationSettings) -> dict[str, Any]:
    """Score one case: ``{"case": id, "<metric>": {"WT": .., "TC": .., "ET": ..}, ...}``.

    Post-processing (when on) is applied to the prediction first, and the record then holds
    ``"et_relabelled"``. Metrics are those of ``settings.metric_names``; Dice, sensitivity and
    specificity are fractions in [0, 1], HD95 is in mm. ``"truth_voxels"`` counts each
    region's voxels in the truth (0: the region is absent, so its Dice is 1 or 0 by the empty
    rules alone; `mtcmkd compare --positive-only` leaves such cases out of that region).
    """
    prediction, relabelled = postprocess_labels(case.prediction, settings.postprocess_et)
    record: dict[str, Any] = {"case": case.case_id}
    if settings.lesion_wise:  # 2023+: the official script's HD95 and its 374 mm for one empty
        record.update(score_case(prediction, case.truth, case.spacing,
                                 empty_hd95=BRATS2023_EMPTY_HD95,
                                 hd95_function=robust_hausdorff))
    else:
        record.update(score_case(prediction, case.truth, case.spacing))
    params = settings.lesion_parameters
    if settings.lesion_wise or settings.legacy_slice_dice:
        lesion: dict[str, dict[str, float]] = {"lesion_wise_dice": {}, "lesion_wise_hd95": {}}
        slices: dict[str, float] = {}
        for region, values in REGIONS.items():
            p, t = np.isin(prediction, values), np.isin(case.truth, values)
            if settings.lesion_wise:
                scores = lesion_wise_scores(
                    p, t, case.spacing, dilation_iterations=params.dilation_iterations,
                    volume_threshold_mm3=params.volume_threshold_mm3)
                lesion["lesion_wise_dice"][region] = float(scores["dice"])
                lesion["lesion_wise_hd95"][region] = float(scores["hd95"])
            if settings.legacy_slice_dice:
                slices[region] = slice_dice_legacy(p, t, axis=0)
        if settings.lesion_wise:
            record.update(lesion)
        if settings.legacy_slice_dice:
            record["legacy_slice_dice"] = slices
    record["truth_voxels"] = {region: int(np.count_nonzero(np.isin(case.truth, values)))
                              for region, values in REGIONS.items()}
    if settings.postprocess_et is not None:
        record["et_relabelled"] = relabelled
    return record


def postprocess_labels(labels: np.ndarray, et_min_voxels: int | None) -> tuple[np.ndarray, bool]:
    """Relabel a predicted ET of fewer than `et_min_voxels` voxels as NCR/NETC (None: off).

    Returns the labels and whether anything changed. Relabelling to NCR/NETC (not background)
    keeps TC and WT unchanged and only moves the ET score (see
    :func:`mtcmkd.metrics.relabel_small_et`).
    """
    if et_min_voxels is None:
        return labels, False
    out = relabel_small_et(labels, et_min_voxels, to=1)
    return out, bool(np.any(out != labels))
