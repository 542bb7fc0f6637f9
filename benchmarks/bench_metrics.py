"""Seconds to score one BraTS case (WT/TC/ET: Dice, HD95, sensitivity, specificity).

Truth: the real labels of the BraTS 2021 sample cases (labels {0, 1, 2, 4}, mapped to canonical
{0, 1, 2, 3}), 240 x 240 x 155 at 1 mm. Predictions: the truth perturbed three ways:

- shift:      rolled by (2, -1, 1) voxels;
- grow/erode: whole tumour grown by 2 voxels (new voxels edema), ET eroded by 1 (becomes NCR);
- spurious:   the shift plus two small false ET blobs far from the tumour (stretches the union
              bounding box across the brain: the case a dense distance transform pays for).

Compared, on the same masks: ``mtcmkd.metrics.score_case``; MONAI (``compute_dice``,
``compute_hausdorff_distance(percentile=95)``, confusion-matrix sensitivity / specificity, all
three regions as one one-hot batch); medpy (``dc``, ``hd95``, ``sensitivity``, ``specificity``
per region); and, for the design record, our HD95 with a dense ``distance_transform_edt`` on
the cropped volume instead of the k-d tree. Usage:

    python benchmarks/bench_metrics.py [--raw ../shared/data/brats2021-sample] [--repeat 3]
        [--json-out bench_metrics.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from mtcmkd.brats import REGIONS, release
from mtcmkd.metrics import lesion_wise_scores, score_case
from mtcmkd.metrics._masks import bbox_crop
from mtcmkd.metrics.surface import surface_voxels

Scores = dict[str, dict[str, float]]


def perturbations(truth: np.ndarray) -> dict[str, np.ndarray]:
    """Realistic imperfect predictions of a canonical label volume."""
    shifted = np.roll(truth, (2, -1, 1), axis=(0, 1, 2))
    grown = truth.copy()
    wt = truth > 0
    grown[ndimage.binary_dilation(wt, iterations=2) & ~wt] = 2
    et = truth == 3
    grown[et & ~ndimage.binary_erosion(et)] = 1
    spurious = shifted.copy()
    brain_far = [(30, 40, 20), (200, 190, 130)]
    for c in brain_far:
        spurious[c[0] : c[0] + 3, c[1] : c[1] + 3, c[2] : c[2] + 3] = 3
    return {"shift": shifted, "grow/erode": grown, "spurious": spurious}


def ours(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> Scores:
    return score_case(pred, truth, spacing)


def _one_hot_regions(labels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.isin(labels, v) for v in REGIONS.values()]))[None]


def monai_scores(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> Scores:
    from monai.metrics import (
        compute_confusion_matrix_metric,
        compute_dice,
        compute_hausdorff_distance,
        get_confusion_matrix,
    )

    p, t = _one_hot_regions(pred), _one_hot_regions(truth)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dice = compute_dice(p, t, include_background=True, ignore_empty=False)[0]
        hd = compute_hausdorff_distance(p, t, include_background=True, percentile=95,
                                        spacing=list(spacing))[0]
        confusion = get_confusion_matrix(p.float(), t.float(), include_background=True)
        sens = compute_confusion_matrix_metric("sensitivity", confusion)[0]
        spec = compute_confusion_matrix_metric("specificity", confusion)[0]
    names = list(REGIONS)
    return {
        "dice": dict(zip(names, dice.tolist(), strict=True)),
        "hd95": dict(zip(names, hd.tolist(), strict=True)),
        "sensitivity": dict(zip(names, sens.tolist(), strict=True)),
        "specificity": dict(zip(names, spec.tolist(), strict=True)),
    }


def medpy_scores(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> Scores:
    from medpy.metric import binary

    out: Scores = {"dice": {}, "hd95": {}, "sensitivity": {}, "specificity": {}}
    for region, values in REGIONS.items():
        p, t = np.isin(pred, values), np.isin(truth, values)
        out["dice"][region] = float(binary.dc(p, t))
        out["hd95"][region] = float(binary.hd95(p, t, voxelspacing=spacing))
        out["sensitivity"][region] = float(binary.sensitivity(p, t))
        out["specificity"][region] = float(binary.specificity(p, t))
    return out


def ours_edt_hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> Scores:
    """HD95 only, same definition, dense EDT on the union crop (design comparison)."""
    out: Scores = {"hd95": {}}
    for region, values in REGIONS.items():
        p, t = np.isin(pred, values), np.isin(truth, values)
        crop = bbox_crop(p | t, margin=1)
        sp, st = surface_voxels(p[crop]), surface_voxels(t[crop])
        to_t = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
        to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
        out["hd95"][region] = float(max(np.percentile(to_t, 95), np.percentile(to_p, 95)))
    return out


def lesion_wise(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> Scores:
    out: Scores = {"dice": {}, "hd95": {}}
    for region, values in REGIONS.items():
        s = lesion_wise_scores(np.isin(pred, values), np.isin(truth, values), spacing)
        out["dice"][region], out["hd95"][region] = float(s["dice"]), float(s["hd95"])
    return out


METHODS: dict[str, Callable[[np.ndarray, np.ndarray, tuple[float, ...]], Scores]] = {
    "mtcmkd score_case": ours,
    "MONAI": monai_scores,
    "medpy": medpy_scores,
    "mtcmkd HD95 via dense EDT (design check)": ours_edt_hd95,
    "mtcmkd lesion-wise (2023 rules)": lesion_wise,
}


def _max_diff(a: Scores, b: Scores, key: str) -> float | None:
    if key not in a or key not in b:
        return None
    return max(abs(a[key][r] - b[key][r]) for r in REGIONS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", type=Path, default=Path("../shared/data/brats2021-sample"))
    ap.add_argument("--repeat", type=int, default=3, help="timings per case (median kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (MONAI, torchmetrics)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    seg_files = sorted(args.raw.glob("*/*_seg.nii.gz"))
    if not seg_files:
        raise SystemExit(f"no *_seg.nii.gz under {args.raw}: pass --raw pointing at BraTS cases")
    info = release("2021")
    timings: dict[str, dict[str, list[float]]] = {m: {} for m in METHODS}
    diffs: dict[str, dict[str, list[float]]] = {m: {"dice": [], "hd95": []} for m in METHODS}
    for seg_file in seg_files:
        image = nib.load(str(seg_file))
        truth = info.map_labels(np.asarray(image.dataobj))
        spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
        for kind, pred in perturbations(truth).items():
            reference = ours(pred, truth, spacing)
            for name, method in METHODS.items():
                seconds = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    result = method(pred, truth, spacing)
                    seconds.append(time.perf_counter() - t0)
                timings[name].setdefault(kind, []).append(float(np.median(seconds)))
                for key in ("dice", "hd95"):
                    d = _max_diff(result, reference, key)
                    if d is not None and "lesion" not in name:
                        diffs[name][key].append(d)

    kinds = list(perturbations(np.zeros((4, 4, 4), np.uint8)))
    header = f"{'method':42s}" + "".join(f"{k:>12s}" for k in kinds) + f"{'max|dDice|':>12s}"
    header += f"{'max|dHD95|':>12s}"
    print(f"seconds per case (median of {args.repeat}, mean over {len(seg_files)} cases), "
          f"3 regions; differences vs mtcmkd score_case")
    print(header)
    summary: dict = {}
    for name in METHODS:
        means = {k: float(np.mean(timings[name][k])) for k in kinds}
        dd = max(diffs[name]["dice"]) if diffs[name]["dice"] else None
        dh = max(diffs[name]["hd95"]) if diffs[name]["hd95"] else None
        row = f"{name:42s}" + "".join(f"{means[k]:12.3f}" for k in kinds)
        row += f"{'-' if dd is None else f'{dd:.2e}':>12s}{'-' if dh is None else f'{dh:.2e}':>12s}"
        print(row)
        summary[name] = {"seconds_per_case": means, "max_abs_diff_dice": dd,
                         "max_abs_diff_hd95_mm": dh}

    results = {
        "machine": f"{platform.node()} ({os.cpu_count()} cores), load average "
                   f"{os.getloadavg()[0]:.1f} at the end",
        "torch_threads": args.threads,
        "cases": [p.parent.name for p in seg_files],
        "repeat": args.repeat,
        "methods": summary,
    }
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
