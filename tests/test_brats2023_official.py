"""`evaluate --year 2023` computes what the official BraTS 2023 lesion-wise script computes.

The official script (BraTS-2023-Metrics ``metrics.py``) is held against us three ways: values
derived by hand for small cases (in the comments), a slow direct transcription of its algorithm
written here (loops, full volumes, brute-force distances), and, where installed, DeepMind's
``surface-distance`` package that the script calls for HD95 (a test-only dependency).
"""

from __future__ import annotations

import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import typer
from conftest import write_raw
from scipy import ndimage
from scipy.spatial.distance import cdist
from typer.testing import CliRunner

from mtcmkd.brats import SUBCHALLENGES, subchallenge
from mtcmkd.cli.evaluate import evaluate
from mtcmkd.evaluation import EvaluationSettings, ScoringCase, score_case_record
from mtcmkd.metrics import (
    hd95,
    lesion_wise_scores,
    robust_hausdorff,
    surfel_area_table,
    surfel_distances,
    surfels,
)

ANISO = (1.0, 0.7, 2.5)
_FULL = np.ones((3, 3, 3), dtype=bool)


def _box(shape, lo, size) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, a + s) for a, s in zip(lo, size, strict=True))] = True
    return mask


def _blobs(rng: np.random.Generator, shape=(26, 24, 22), level=0.55) -> np.ndarray:
    return ndimage.gaussian_filter(rng.random(shape), 1.5) > level


# --- slow transcription of the official definitions ----------------------------------------


def _reference_area_table(spacing) -> np.ndarray:
    try:
        from surface_distance import lookup_tables
    except ImportError:  # the table is data: without the package, ours stands in for it
        return surfel_area_table(spacing)
    return lookup_tables.create_table_neighbour_code_to_surface_area(spacing)


def _reference_surface(mask: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Corner points and areas, one corner at a time from its 8 voxels (outside = 0)."""
    table = _reference_area_table(spacing)
    padded = np.pad(mask.astype(np.uint8), 1)
    points, areas = [], []
    for c in np.ndindex(*(n + 1 for n in mask.shape)):
        code = 0
        for k in np.ndindex(2, 2, 2):
            if padded[c[0] + k[0], c[1] + k[1], c[2] + k[2]]:
                code += 2 ** (7 - (4 * k[0] + 2 * k[1] + k[2]))
        if code not in (0, 255):
            points.append(c)
            areas.append(table[code])
    return np.array(points, dtype=float), np.array(areas)


def _reference_hd95(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return 374.0  # the package's infinity, replaced by the script
    (pp, pa), (tp, ta) = _reference_surface(pred, spacing), _reference_surface(truth, spacing)
    scale = np.asarray(spacing, dtype=float)
    worst = 0.0
    for points, areas, other in ((tp, ta, pp), (pp, pa, tp)):
        nearest = cdist(points * scale, other * scale).min(axis=1)
        pairs = sorted(zip(nearest.tolist(), areas.tolist(), strict=True))
        total, running = sum(a for _, a in pairs), 0.0
        value = pairs[-1][0]
        for distance, area in pairs:
            running += area
            if running / total >= 0.95 - 1e-12:
                value = distance
                break
        worst = max(worst, value)
    return worst


def _reference_lesion_wise(pred, truth, spacing, dilations, threshold_mm3, hd=_reference_hd95):
    """The official get_LesionWiseScores + score formula, on full volumes, lesion by lesion."""
    structure = ndimage.generate_binary_structure(3, 2)
    truth_cc, _ = ndimage.label(truth, structure=_FULL)
    pred_cc, n_pred = ndimage.label(pred, structure=_FULL)
    dilated_cc, n_dilated = ndimage.label(
        ndimage.binary_dilation(truth, structure=structure, iterations=dilations), _FULL)
    combined = np.zeros_like(truth_cc)
    for comp in range(1, n_dilated + 1):
        combined[(dilated_cc == comp) & (truth_cc > 0)] = comp
    voxel_volume = spacing[0] * spacing[1] * spacing[2]
    matched_any: set[int] = set()
    kept_dice, kept_hd = [], []
    for comp in range(1, int(combined.max()) + 1):
        lesion = combined == comp
        region = ndimage.binary_dilation(lesion, structure=structure, iterations=dilations)
        matched = sorted(set(np.unique(pred_cc[region]).tolist()) - {0})
        matched_any.update(matched)
        if lesion.sum() * voxel_volume <= threshold_mm3:
            continue
        matched_pred = np.isin(pred_cc, matched)
        kept_dice.append(2 * (matched_pred & lesion).sum() / (matched_pred.sum() + lesion.sum()))
        kept_hd.append(hd(matched_pred, lesion, spacing) if matched else 374.0)
    fp = n_pred - len(matched_any)
    denominator = len(kept_dice) + fp
    if denominator == 0:
        return 1.0, 0.0
    return sum(kept_dice) / denominator, (sum(kept_hd) + 374.0 * fp) / denominator


# --- HD95: area-weighted surface elements ---------------------------------------------------


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), ANISO, (0.9375, 0.9375, 3.0)])
def test_area_table_equals_the_reference_package(spacing):
    lookup_tables = pytest.importorskip("surface_distance.lookup_tables")
    expected = lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
    np.testing.assert_array_equal(surfel_area_table(spacing), expected)


def test_area_table_hand_values():
    table = surfel_area_table((1.0, 2.0, 4.0))
    # Code 15: the four voxels with k0 = 1 inside -> a flat face normal to axis 0: s1 * s2.
    assert table[15] == pytest.approx(8.0)
    assert table[0b11110000] == pytest.approx(8.0)
    # Code 1: one voxel -> a corner triangle with area vector (1, 1, 1) / 8 scaled.
    assert table[1] == pytest.approx(math.sqrt(8.0**2 + 4.0**2 + 2.0**2) / 8)
    assert table[0] == table[255] == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_surfels_and_hd95_equal_the_reference_package(seed):
    sd = pytest.importorskip("surface_distance")
    rng = np.random.default_rng(seed)
    spacing = [(1.0, 1.0, 1.0), ANISO, (0.9375, 0.9375, 3.0), (1.2, 0.8, 1.0)][seed]
    for _ in range(5):
        a, b = _blobs(rng), _blobs(rng)
        a[0, :4, :3] = True  # a component on the array border
        ref = sd.compute_surface_distances(b, a, spacing)  # truth first, as the script
        for percent in (95, 100, 50):
            assert robust_hausdorff(a, b, spacing, percentile=percent) == pytest.approx(
                sd.compute_robust_hausdorff(ref, percent), rel=1e-12, abs=1e-12)
        distances, areas = surfel_distances(b, a, spacing)
        np.testing.assert_allclose(distances, ref["distances_gt_to_pred"], rtol=1e-12)
        # Distances equal in exact arithmetic may differ in the last bit (e.g. 2 x 1.2 mm and
        # 3 x 0.8 mm), which reorders such ties: compare elements sorted on rounded distances.
        ours = np.lexsort((areas, np.round(distances, 9)))
        theirs = np.lexsort((ref["surfel_areas_gt"], np.round(ref["distances_gt_to_pred"], 9)))
        np.testing.assert_allclose(areas[ours], ref["surfel_areas_gt"][theirs], rtol=1e-12)


def test_hd95_equals_a_slow_transcription():
    rng = np.random.default_rng(7)
    for spacing in ((1.0, 1.0, 1.0), ANISO):
        a, b = _blobs(rng, (12, 11, 10)), _blobs(rng, (12, 11, 10))
        assert robust_hausdorff(a, b, spacing) == pytest.approx(_reference_hd95(a, b, spacing),
                                                                 rel=1e-12)


def test_surfels_sit_on_the_corner_lattice():
    points, areas = surfels(_box((5, 5, 5), (1, 1, 1), (1, 1, 1)))
    # One voxel: its 8 corners, each a corner triangle of area sqrt(3)/8.
    assert sorted(map(tuple, points.tolist())) == [
        (i, j, k) for i in (1, 2) for j in (1, 2) for k in (1, 2)]
    np.testing.assert_allclose(areas, math.sqrt(3) / 8)


def test_anisotropic_hd95_weights_surface_elements_by_area():
    # Spacing (1, 1, 4). Truth: a box of 8 x 8 x 3 voxels. Prediction: the box plus a plate of
    # 3 x 3 x 1 voxels one empty slice above it. Truth -> prediction is 0 everywhere (the box is
    # in both); prediction -> truth is 0 on the box, 4 mm on the plate's 16 lower corners and
    # 8 mm on its 16 upper corners. By count the 8 mm corners are 16 of 258 elements (6.2 %,
    # over 5 %): 8 mm. By area each plate layer is 4 face elements (1 mm^2), 8 edge elements
    # (2 x |(1, 0, 1/4)| = 2.06 mm^2) and 4 corners (|(4, 4, 1)| / 8 = 0.72 mm^2): 23.4 mm^2,
    # under 5 % of the total (box 420-890 mm^2 keeps it between the two layers): 4 mm.
    spacing = (1.0, 1.0, 4.0)
    truth = _box((20, 20, 12), (2, 2, 1), (8, 8, 3))
    plate = _box((20, 20, 12), (2, 2, 5), (3, 3, 1))
    pred = truth | plate
    box_area = surfels(truth, spacing)[1].sum()
    plate_points, plate_areas = surfels(plate, spacing)
    assert len(plate_points) == 32 and len(surfels(truth)[0]) == 226
    layer = 4 * 1.0 + 8 * 2 * math.hypot(1.0, 0.25) + 4 * math.sqrt(33) / 8
    assert plate_areas.sum() == pytest.approx(2 * layer)
    assert 420 < box_area < 890
    assert robust_hausdorff(pred, truth, spacing) == 4.0
    distances, areas = surfel_distances(pred, truth, spacing)
    by_count = distances[int(np.ceil(0.95 * len(distances))) - 1]
    assert by_count == 8.0  # what an unweighted percentile over the same elements gives
    assert hd95(pred, truth, spacing) != pytest.approx(4.0)  # the 2017-2021 (MONAI) HD95


def test_hd95_empty_rules():
    empty, some = np.zeros((6, 6, 6), bool), _box((6, 6, 6), (1, 1, 1), (2, 2, 2))
    assert robust_hausdorff(empty, empty) == 0.0
    assert robust_hausdorff(some, empty) == robust_hausdorff(empty, some) == 374.0
    assert robust_hausdorff(some, some) == 0.0


# --- lesion-wise ----------------------------------------------------------------------------


def test_two_diagonal_lesions_are_one_lesion_as_in_the_official_script():
    # Two 6-voxel cubes 6 voxels apart along two axes. Three 18-neighbourhood dilations reach 3
    # voxels along both axes at once, so the dilated cubes touch diagonally: one lesion of 432
    # voxels. Predicting the first cube: Dice 2 * 216 / (216 + 432) = 2/3. HD95: prediction ->
    # truth is 0; truth -> prediction is 0 on the first cube (194.2 mm^2 of 388.3) and
    # sqrt((x - 11)^2 + (y - 11)^2) from a corner (x, y) of the second cube (corners 17..23)
    # to the first (corners 5..11). The farthest elements: (23, 23) 3.97 mm^2, (23, 22) and
    # (22, 23) 12.83 mm^2, together 16.8 < 5 % of the total (19.4); adding (23, 21) and
    # (21, 23) passes it: HD95 = sqrt(12^2 + 10^2) = 15.62 mm.
    shape = (32, 32, 20)
    truth = _box(shape, (5, 5, 5), (6, 6, 6)) | _box(shape, (17, 17, 5), (6, 6, 6))
    pred = _box(shape, (5, 5, 5), (6, 6, 6))
    scores = lesion_wise_scores(pred, truth)
    assert (scores["tp"], scores["fn"], scores["fp"]) == (1, 0, 0)
    assert scores["dice"] == pytest.approx(2 / 3)
    assert scores["hd95"] == pytest.approx(math.sqrt(244))
    # The 3D cross (the old rule) keeps them apart: 0.5 and 187.
    cross = lesion_wise_scores(pred, truth, dilation_connectivity=1)
    assert (cross["dice"], cross["hd95"]) == (0.5, 187.0)


def test_volume_threshold_is_in_mm3():
    shape = (30, 30, 20)
    big = _box(shape, (2, 2, 2), (5, 5, 5))
    small = np.zeros(shape, bool)
    small[20:23, 20:23, 10:13] = True  # 27 voxels, far from the big lesion
    # At 1 x 1 x 2 mm: 54 mm^3 > 50, kept (missed: FN). By voxel count (27 <= 50) it was dropped.
    spacing = (1.0, 1.0, 2.0)
    assert lesion_wise_scores(big, big | small, spacing)["fn"] == 1
    # 25 voxels at 2 mm^3 = 50.0 mm^3: dropped (the rule is "<="); 26 = 52 mm^3: kept.
    exact = np.zeros(shape, bool)
    exact[20:25, 20:25, 10] = True
    assert lesion_wise_scores(big, big | exact, spacing)["fn"] == 0
    exact[25, 20, 10] = True
    assert lesion_wise_scores(big, big | exact, spacing)["fn"] == 1
    # At 0.5 mm isotropic, 125 voxels are 15.6 mm^3: dropped.
    assert lesion_wise_scores(big, big | _box(shape, (20, 20, 10), (5, 5, 5)),
                              (0.5, 0.5, 0.5))["fn"] == 0


def test_subchallenge_parameters():
    assert {k: (v.dilation_iterations, v.volume_threshold_mm3) for k, v in SUBCHALLENGES.items()} \
        == {"GLI": (3, 50.0), "SSA": (3, 50.0), "PED": (3, 50.0), "MEN": (1, 50.0),
            "MET": (1, 2.0)}
    assert subchallenge("met") is subchallenge("BraTS-MET") is SUBCHALLENGES["MET"]
    with pytest.raises(ValueError, match="GLI, SSA, PED, MEN, MET"):
        subchallenge("XYZ")
    shape = (30, 30, 20)
    # Two cubes 4 voxels apart along one axis: 3 dilations merge them, 1 does not.
    truth = _box(shape, (2, 2, 2), (4, 4, 4)) | _box(shape, (10, 2, 2), (4, 4, 4))
    pred = _box(shape, (2, 2, 2), (4, 4, 4))
    for name in SUBCHALLENGES:
        params = SUBCHALLENGES[name]
        scores = lesion_wise_scores(pred, truth, dilation_iterations=params.dilation_iterations,
                                    volume_threshold_mm3=params.volume_threshold_mm3)
        assert scores["fn"] == (0 if params.dilation_iterations == 3 else 1), name
    # A 3-voxel lesion (3 mm^3) counts only for MET.
    tiny = np.zeros(shape, bool)
    tiny[20, 20, 10:13] = True
    met = lesion_wise_scores(pred, pred | tiny, dilation_iterations=1, volume_threshold_mm3=2.0)
    gli = lesion_wise_scores(pred, pred | tiny)
    assert (met["fn"], gli["fn"]) == (1, 0)


@pytest.mark.parametrize("seed", range(3))
def test_lesion_wise_equals_the_official_algorithm_on_random_multi_lesion_volumes(seed):
    rng = np.random.default_rng(100 + seed)
    spacing = [(1.0, 1.0, 1.0), ANISO, (0.9, 0.9, 2.0)][seed]
    for name in ("GLI", "MEN", "MET"):
        params = SUBCHALLENGES[name]
        truth = _blobs(rng, (22, 20, 18), 0.6)
        pred = _blobs(rng, (22, 20, 18), 0.6) | (truth & (rng.random(truth.shape) > 0.3))
        ours = lesion_wise_scores(pred, truth, spacing,
                                  dilation_iterations=params.dilation_iterations,
                                  volume_threshold_mm3=params.volume_threshold_mm3)
        expected = _reference_lesion_wise(pred, truth, spacing, params.dilation_iterations,
                                          params.volume_threshold_mm3)
        assert (ours["dice"], ours["hd95"]) == pytest.approx(expected, rel=1e-9), name


def test_lesion_wise_empty_rules():
    shape = (20, 20, 20)
    empty, some = np.zeros(shape, bool), _box(shape, (3, 3, 3), (4, 4, 4))
    assert lesion_wise_scores(empty, empty)["dice"] == 1.0
    assert lesion_wise_scores(empty, empty)["hd95"] == 0.0
    for pred, truth in ((some, empty), (empty, some)):
        scores = lesion_wise_scores(pred, truth)
        assert (scores["dice"], scores["hd95"]) == (0.0, 374.0)
        assert (scores["dice"], scores["hd95"]) == _reference_lesion_wise(pred, truth,
                                                                          (1, 1, 1), 3, 50.0)


# --- evaluate --year 2023 -------------------------------------------------------------------


def _labels(shape, boxes):
    labels = np.zeros(shape, np.uint8)
    for value, lo, size in boxes:
        labels[_box(shape, lo, size)] = value
    return labels


def test_year_2023_legacy_scores_use_the_official_hd95_and_374():
    shape = (24, 24, 16)
    truth = _labels(shape, [(2, (2, 2, 2), (10, 10, 8)), (3, (4, 4, 4), (4, 4, 3))])
    pred = _labels(shape, [(2, (3, 2, 2), (10, 10, 8))])  # no ET predicted
    case = ScoringCase("c", pred, truth, ANISO)
    new = score_case_record(case, EvaluationSettings("2023"))
    old = score_case_record(case, EvaluationSettings("2021"))
    wt = np.isin(pred, (1, 2, 3)), np.isin(truth, (1, 2, 3))
    assert new["hd95"]["WT"] == robust_hausdorff(*wt, ANISO)
    assert old["hd95"]["WT"] == hd95(*wt, ANISO)  # 2017-2021 unchanged
    assert new["hd95"]["ET"] == 374.0 and old["hd95"]["ET"] == 373.13
    assert new["lesion_wise_hd95"]["ET"] == 374.0 and new["lesion_wise_dice"]["ET"] == 0.0
    both_empty = score_case_record(ScoringCase("e", np.zeros(shape, np.uint8),
                                               np.zeros(shape, np.uint8), ANISO),
                                   EvaluationSettings("2023"))
    assert both_empty["hd95"]["ET"] == 0.0 and both_empty["lesion_wise_dice"]["ET"] == 1.0


app = typer.Typer(pretty_exceptions_enable=False)
app.command("evaluate")(evaluate)


def _invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args[1:]])  # one command: no name


def test_evaluate_subchallenge_option(tmp_path):
    raw = tmp_path / "raw"
    ids = write_raw(raw, "2023", n=1, shape=(24, 28, 20))
    pred = tmp_path / "pred"
    pred.mkdir()
    seg = raw / ids[0] / f"{ids[0]}-seg.nii.gz"
    # The prediction: the truth plus a 3-voxel spurious ET far away (a false positive).
    img = nib.load(seg)
    data = np.asarray(img.dataobj).astype(np.uint8)
    data[0, 0, 0:3] = 3
    nib.save(nib.Nifti1Image(data, img.affine, img.header), pred / f"{ids[0]}.nii.gz")
    shutil.copy(seg, tmp_path / "seg_copy.nii.gz")
    out = {}
    for name in ("GLI", "MET"):
        result = _invoke("evaluate", "--year", "2023", "--pred", pred, "--gt", raw, "--out",
                         tmp_path / name, "--subchallenge", name.lower())
        assert result.exit_code == 0, result.output
        out[name] = json.loads((tmp_path / name / "metrics.json").read_text())
        assert out[name]["lesion_wise"]["subchallenge"] == name
        assert "official BraTS 2023" in out[name]["hd95_definition"]
    assert out["MET"]["lesion_wise"]["volume_threshold_mm3"] == 2.0
    assert out["MET"]["lesion_wise"]["dilation_iterations"] == 1
    assert "MET parameters" in out["MET"]["rules"] and "2 mm^3" in out["MET"]["rules"]
    # Default GLI without the option.
    result = _invoke("evaluate", "--year", "2023", "--pred", pred, "--gt", raw, "--out",
                     tmp_path / "default")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "default" / "metrics.json").read_text())
    assert doc["lesion_wise"]["subchallenge"] == "GLI"
    # Bad name and wrong year: one line, nothing written.
    for args, text in (((2023, "XYZ"), "unknown BraTS sub-challenge"),
                       ((2021, "GLI"), "--subchallenge goes with --year 2023")):
        bad = tmp_path / f"bad{args[0]}"
        result = _invoke("evaluate", "--year", args[0], "--pred", pred, "--gt", raw, "--out",
                         bad, "--subchallenge", args[1])
        assert result.exit_code != 0
        assert text in result.output and "Traceback" not in result.output
        assert not (bad / "metrics.json").exists()
