"""Published results to print beside ours, each with whether it is comparable (most are not).

docs/METHODS.md ("Results as published", section 1, and section 4) explains each number and
why the definitions differ; `mtcmkd evaluate` prints them under its own means.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["REFERENCE_NUMBERS", "ReferenceResult"]


@dataclass(frozen=True)
class ReferenceResult:
    """A published T1ce-only (or full-modality) result to show beside ours.

    Attributes:
        source: paper / code and the setting.
        data: data set and split.
        dice: Dice in percent per region (None where not published).
        mean_dice: mean Dice in percent when only the mean is published.
        comparable: "yes" (standard 3D BraTS Dice, T1ce only: same definition, though on other
            cases), "roughly" (3D Dice but resampled volumes or own split), or "no".
        note: why.
    """

    source: str
    data: str
    dice: dict[str, float | None]
    comparable: str
    note: str
    mean_dice: float | None = None


#: docs/METHODS.md, "Results as published" (section 1) and section 4.
REFERENCE_NUMBERS: tuple[ReferenceResult, ...] = (
    ReferenceResult(
        source="MTCM-KD README, t1ce",
        data="BraTS 2021 (their CV)",
        dice={"WT": 87.14, "TC": 91.56, "ET": None},
        comparable="no",
        note="Ahmad et al. 2024: slice-averaged 2D Dice at 128^3 resized volumes, slices empty "
             "in both scored 1 (see --legacy-slice-dice); not the BraTS Dice",
    ),
    ReferenceResult(
        source="DeMoSeg 2024, t1ce only",
        data="BraTS 2020 test split",
        dice={"WT": 82.1, "TC": 85.7, "ET": 81.4},
        comparable="yes",
        note="standard 3D BraTS Dice, same definition; other cases (2020 split), ET "
             "post-processing may differ",
    ),
    ReferenceResult(
        source="KD-Net, t1ce student",
        data="BraTS 2018, 3-fold CV",
        dice={"WT": 77.0, "TC": 81.5, "ET": 71.7},
        comparable="roughly",
        note="Hu et al. 2021: 3D Dice, but on a 128^3 central crop subsampled to 64^3 and "
             "BraTS 2018 cases",
    ),
    ReferenceResult(
        source="nnU-Net, 4 modalities",
        data="BraTS 2021, 5-fold CV",
        dice={"WT": None, "TC": None, "ET": None},
        mean_dice=91.2,
        comparable="no",
        note="full-modality upper bound (t1, t1ce, t2, flair), not a T1ce-only result",
    ),
)
