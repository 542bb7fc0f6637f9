"""BraTS metrics: hand-computed values, empty-case rules, and MONAI / medpy as references."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from mtcmkd.metrics import (
    LEGACY_EMPTY_HD95,
    confusion_counts,
    dice,
    directed_surface_distances,
    hd95,
    lesion_wise_scores,
    relabel_small_et,
    score_case,
    sensitivity,
    slice_dice_legacy,
    specificity,
    surface_voxels,
)

ANISO = (1.0, 0.7, 2.5)


def _monai_hd95(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_hausdorff_distance(
            torch.from_numpy(pred)[None, None],
            torch.from_numpy(truth)[None, None],
            include_background=True,
            percentile=95,
            spacing=list(spacing),
        )
    return float(value.item())


def _medpy_hd95(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    from medpy.metric.binary import hd95 as medpy_hd95

    return float(medpy_hd95(pred, truth, voxelspacing=spacing))


def _monai_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = metric(
            y_pred=torch.from_numpy(pred)[None, None].float(),
            y=torch.from_numpy(truth)[None, None].float(),
        )
    return float(value.item())


def _blobs(rng: np.random.Generator, shape=(24, 30, 20), level=0.52) -> np.ndarray:
    """Random smooth blobs: several irregular components, a realistic test for surfaces."""
    return ndimage.gaussian_filter(rng.random(shape), 1.5) > level


def _cube(shape, lo, size) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, a + size) for a in lo)] = True
    return mask


# --- overlap: Dice, sensitivity, specificity ------------------------------------------------


def test_overlap_scores_hand_computed():
    shape = (4, 4, 4)  # 64 voxels
    truth = np.zeros(shape, dtype=bool)
    pred = np.zeros(shape, dtype=bool)
    truth.flat[[0, 1, 2, 3, 4]] = True  # 5 truth voxels
    pred.flat[[0, 1, 10]] = True  # 2 hits, 1 false positive
    counts = confusion_counts(pred, truth)
    assert (counts.tp, counts.fp, counts.fn, counts.tn) == (2, 1, 3, 58)
    assert dice(pred, truth) == pytest.approx(2 * 2 / (3 + 5))
    assert sensitivity(pred, truth) == pytest.approx(2 / 5)
    assert specificity(pred, truth) == pytest.approx(58 / 59)


def test_counts_on_crop_equal_full_volume_counts():
    rng = np.random.default_rng(1)
    pred, truth = _blobs(rng, (30, 26, 22)), _blobs(rng, (30, 26, 22))
    counts = confusion_counts(pred, truth)
    assert counts.tp == np.sum(pred & truth)
    assert counts.fp == np.sum(pred & ~truth)
    assert counts.fn == np.sum(~pred & truth)
    assert counts.tn == np.sum(~pred & ~truth)


@pytest.mark.parametrize("seed", range(4))
def test_dice_matches_monai(seed):
    rng = np.random.default_rng(seed)
    pred, truth = _blobs(rng), _blobs(rng)
    assert dice(pred, truth) == pytest.approx(_monai_dice(pred, truth), abs=1e-6)


def test_dice_empty_rules_match_monai_without_ignore_empty():
    empty, some = np.zeros((6, 6, 6), bool), _cube((6, 6, 6), (1, 1, 1), 2)
    assert dice(empty, empty) == 1.0 == _monai_dice(empty, empty)
    assert dice(some, empty) == 0.0 == _monai_dice(some, empty)
    assert dice(empty, some) == 0.0 == _monai_dice(empty, some)


def test_empty_rules_for_all_legacy_scores():
    empty, some = np.zeros((8, 8, 8), bool), _cube((8, 8, 8), (2, 2, 2), 3)
    # both empty
    assert (dice(empty, empty), hd95(empty, empty)) == (1.0, 0.0)
    assert (sensitivity(empty, empty), specificity(empty, empty)) == (1.0, 1.0)
    # truth empty, prediction not
    assert (dice(some, empty), hd95(some, empty)) == (0.0, LEGACY_EMPTY_HD95)
    assert sensitivity(some, empty) == 0.0
    assert specificity(some, empty) == pytest.approx((512 - 27) / 512)
    # prediction empty, truth not
    assert (dice(empty, some), hd95(empty, some)) == (0.0, 373.13)
    assert (sensitivity(empty, some), specificity(empty, some)) == (0.0, 1.0)


def test_bad_inputs_raise_clear_errors():
    a = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError, match="shapes differ"):
        dice(a, np.zeros((4, 4, 5), bool))
    with pytest.raises(ValueError, match="3D"):
        hd95(np.zeros((4, 4), bool), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="non-empty"):
        directed_surface_distances(a, a)


# --- HD95 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), ANISO])
def test_hd95_matches_monai_on_random_masks(seed, spacing):
    rng = np.random.default_rng(100 + seed)
    pred, truth = _blobs(rng), _blobs(rng)
    assert pred.any() and truth.any()
    assert hd95(pred, truth, spacing) == pytest.approx(
        _monai_hd95(pred, truth, spacing), rel=1e-4, abs=1e-4
    )


def test_hd95_matches_monai_on_edge_cases():
    shape = (12, 10, 9)
    cases = {
        "one voxel each, apart": (_cube(shape, (2, 2, 2), 1), _cube(shape, (6, 5, 3), 1)),
        "identical single voxel": (_cube(shape, (4, 4, 4), 1), _cube(shape, (4, 4, 4), 1)),
        "touching the border": (_cube(shape, (0, 0, 0), 5), _cube(shape, (0, 1, 0), 6)),
        "whole volume vs block": (np.ones(shape, bool), _cube(shape, (3, 3, 3), 4)),
        "nested": (_cube(shape, (1, 1, 1), 8), _cube(shape, (3, 3, 3), 3)),
    }
    for name, (pred, truth) in cases.items():
        ours = hd95(pred, truth, ANISO)
        assert ours == pytest.approx(_monai_hd95(pred, truth, ANISO), rel=1e-4, abs=1e-4), name


def test_hd95_hand_computed_with_anisotropic_spacing():
    shape = (6, 6, 6)
    a = _cube(shape, (1, 2, 3), 1)
    assert hd95(a, _cube(shape, (1, 2, 4), 1), ANISO) == pytest.approx(2.5)
    assert hd95(a, _cube(shape, (1, 3, 3), 1), ANISO) == pytest.approx(0.7)
    assert hd95(a, _cube(shape, (3, 2, 3), 1), ANISO) == pytest.approx(2.0)
    assert hd95(a, a, ANISO) == 0.0


def test_hd95_definition_is_monai_not_medpy():
    """The two library definitions differ; ours is pinned to MONAI's (max of directed P95s).

    Prediction = the truth cube plus a distant small cube holding just over 5% of the
    prediction's surface voxels: the directed prediction->truth P95 falls on the far cube,
    while pooling both directions (medpy) dilutes it below 5% and gives 0.
    """
    shape = (40, 40, 40)
    truth = _cube(shape, (5, 5, 5), 10)  # 488 surface voxels
    pred = truth | _cube(shape, (30, 30, 30), 3)  # + 26 surface voxels far away (5.06 %)
    ours = hd95(pred, truth)
    assert ours == pytest.approx(_monai_hd95(pred, truth, (1, 1, 1)), rel=1e-4)
    assert ours > 9.0
    assert _medpy_hd95(pred, truth, (1, 1, 1)) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("size", "shift"), [((6, 5, 4), (1, 0, 0)), ((7, 7, 3), (2, 1, 1)), ((3, 9, 5), (0, 3, 2))]
)
def test_hd95_agrees_with_medpy_where_the_definitions_coincide(size, shift):
    # A box and a translated copy: by point symmetry both directed distance sets are equal, so
    # pooling them (medpy) or taking the max of their P95s (MONAI, ours) agree, up to the linear
    # interpolation between order statistics (the pooled set has twice the samples).
    shape = (24, 24, 24)
    truth = np.zeros(shape, bool)
    truth[4 : 4 + size[0], 5 : 5 + size[1], 6 : 6 + size[2]] = True
    pred = np.roll(truth, shift, axis=(0, 1, 2))
    expected = _medpy_hd95(pred, truth, ANISO)
    assert hd95(pred, truth, ANISO) == pytest.approx(expected, abs=0.1)
    assert hd95(pred, truth, ANISO) == pytest.approx(_monai_hd95(pred, truth, ANISO), rel=1e-4)


def test_surface_uses_3d_cross_and_array_border():
    mask = np.zeros((5, 5, 5), bool)
    mask[1:4, 1:4, 1:4] = True
    assert surface_voxels(mask).sum() == 26  # 3x3x3 cube: all but the centre
    full = np.ones((3, 3, 3), bool)
    assert surface_voxels(full).sum() == 26  # outside the array is background
    single = np.zeros((3, 3, 3), bool)
    single[1, 1, 1] = True
    assert surface_voxels(single).sum() == 1


@pytest.mark.parametrize("seed", range(3))
def test_fast_surface_points_equal_erosion_surface(seed):
    from mtcmkd.metrics.surface import _surface_points

    rng = np.random.default_rng(300 + seed)
    mask = _blobs(rng, (15, 18, 11), level=0.5)  # touches the array border
    mask[0, 0, 0] = True
    expected = np.argwhere(surface_voxels(mask))
    np.testing.assert_array_equal(_surface_points(mask), expected)


def test_surface_distances_equal_distance_transform():
    rng = np.random.default_rng(7)
    a, b = _blobs(rng), _blobs(rng)
    dist = ndimage.distance_transform_edt(~surface_voxels(b), sampling=ANISO)
    expected = dist[surface_voxels(a)]
    np.testing.assert_allclose(directed_surface_distances(a, b, ANISO), expected, rtol=1e-12)


def test_hd95_independent_of_far_padding():
    # Cropping to the union bounding box must not change anything. The small masks are kept
    # off their array's border (a mask cut by the border has surface there).
    rng = np.random.default_rng(3)
    a, b = _blobs(rng, (16, 16, 16)), _blobs(rng, (16, 16, 16))
    interior = np.zeros((16, 16, 16), bool)
    interior[1:-1, 1:-1, 1:-1] = True
    a, b = a & interior, b & interior
    big_a, big_b = np.zeros((60, 50, 40), bool), np.zeros((60, 50, 40), bool)
    big_a[20:36, 10:26, 5:21] = a
    big_b[20:36, 10:26, 5:21] = b
    assert hd95(a, b, ANISO) == pytest.approx(hd95(big_a, big_b, ANISO), abs=1e-12)
    assert dice(a, b) == dice(big_a, big_b)


# --- score_case -----------------------------------------------------------------------------


def _labels_case():
    truth = np.zeros((20, 22, 18), np.uint8)
    truth[4:16, 4:18, 4:14] = 2  # edema
    truth[6:12, 7:15, 6:12] = 3  # enhancing
    truth[8:10, 9:13, 8:10] = 1  # necrosis
    pred = np.roll(truth, 1, axis=0)
    pred[pred == 1] = 3
    pred[0:2, 0:2, 0:2] = 4  # resection cavity: in no region
    return pred, truth


def test_score_case_matches_per_region_functions():
    pred, truth = _labels_case()
    scores = score_case(pred, truth, ANISO)
    assert set(scores) == {"dice", "hd95", "sensitivity", "specificity"}
    for region, values in {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}.items():
        p, t = np.isin(pred, values), np.isin(truth, values)
        assert set(scores["dice"]) == {"WT", "TC", "ET"}
        assert scores["dice"][region] == pytest.approx(dice(p, t))
        assert scores["hd95"][region] == pytest.approx(hd95(p, t, ANISO))
        assert scores["sensitivity"][region] == pytest.approx(sensitivity(p, t))
        assert scores["specificity"][region] == pytest.approx(specificity(p, t))
        assert isinstance(scores["dice"][region], float)
    # TC: the prediction turned necrosis into ET, so TC is unchanged up to the shift
    assert scores["dice"]["TC"] == pytest.approx(1 - 2 * 8 * 6 / (2 * 6 * 8 * 6))


def test_score_case_empty_region_rules():
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[2:6, 2:6, 2:6] = 2  # no ET, no TC in truth
    pred = truth.copy()
    pred[3, 3, 3] = 3  # one false ET voxel
    scores = score_case(pred, truth)
    assert scores["dice"]["ET"] == 0.0 and scores["hd95"]["ET"] == 373.13
    assert scores["sensitivity"]["ET"] == 0.0
    assert scores["dice"]["WT"] == 1.0 and scores["hd95"]["WT"] == 0.0
    both_empty = score_case(np.zeros_like(truth), np.zeros_like(truth))
    for region in ("WT", "TC", "ET"):
        assert both_empty["dice"][region] == 1.0
        assert both_empty["hd95"][region] == 0.0
        assert both_empty["sensitivity"][region] == 1.0
        assert both_empty["specificity"][region] == 1.0


def test_score_case_rejects_mismatched_or_float_labels():
    a = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="shapes differ"):
        score_case(a, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="integer"):
        score_case(a.astype(np.float32), a)


# --- lesion-wise (2023+) ------------------------------------------------------------------


SHAPE = (40, 40, 40)


def test_lesion_wise_two_lesions_one_missed():
    truth = _cube(SHAPE, (3, 3, 3), 4) | _cube(SHAPE, (25, 25, 25), 4)  # 64 voxels each
    pred = _cube(SHAPE, (3, 3, 3), 4)
    scores = lesion_wise_scores(pred, truth)
    assert (scores["tp"], scores["fn"], scores["fp"]) == (1, 1, 0)
    assert scores["dice"] == pytest.approx((1.0 + 0.0) / 2)
    assert scores["hd95"] == pytest.approx((0.0 + 374.0) / 2)


def test_lesion_wise_spurious_component():
    truth = _cube(SHAPE, (3, 3, 3), 4)
    pred = truth | _cube(SHAPE, (30, 30, 30), 2)
    scores = lesion_wise_scores(pred, truth)
    assert (scores["tp"], scores["fn"], scores["fp"]) == (1, 0, 1)
    assert scores["dice"] == pytest.approx(0.5)
    assert scores["hd95"] == pytest.approx(187.0)


def test_lesion_wise_drops_tiny_truth_lesion_and_its_match():
    big = _cube(SHAPE, (3, 3, 3), 4)  # 64 voxels: kept
    tiny = _cube(SHAPE, (30, 30, 30), 3)  # 27 voxels <= 50: dropped
    # Predicted or not, the tiny lesion changes nothing, and its match is no false positive.
    for pred in (big, big | tiny):
        scores = lesion_wise_scores(pred, big | tiny)
        assert (scores["dice"], scores["hd95"]) == (1.0, 0.0)
        assert (scores["tp"], scores["fn"], scores["fp"]) == (1, 0, 0)
    # A truth lesion of exactly 50 voxels is still dropped, 51 is kept.
    fifty = np.zeros(SHAPE, bool)
    fifty[30:35, 30:35, 30:32] = True  # 50
    assert lesion_wise_scores(big, big | fifty)["fn"] == 0
    fifty[35, 30, 30] = True  # 51
    assert lesion_wise_scores(big, big | fifty)["fn"] == 1


def test_lesion_wise_merges_close_truth_components_and_hand_dice():
    # Two truth cubes 5 voxels apart along axis 0: 3 cross dilations each make them touch,
    # so they form one lesion of 128 voxels. Predicting one cube gives Dice 2*64/(64+128).
    truth = _cube(SHAPE, (5, 5, 5), 4) | _cube(SHAPE, (14, 5, 5), 4)
    pred = _cube(SHAPE, (5, 5, 5), 4)
    scores = lesion_wise_scores(pred, truth)
    assert (scores["tp"], scores["fn"], scores["fp"]) == (1, 0, 0)
    assert scores["dice"] == pytest.approx(2 * 64 / 192)
    assert scores["hd95"] == pytest.approx(hd95(pred, truth))
    # 8 voxels apart they stay two lesions (one missed).
    apart = _cube(SHAPE, (5, 5, 5), 4) | _cube(SHAPE, (17, 5, 5), 4)
    assert lesion_wise_scores(pred, apart)["fn"] == 1


def test_lesion_wise_near_miss_is_a_match_with_dice_zero():
    # A prediction 2 voxels beside the lesion touches its dilated neighbourhood: TP, Dice 0.
    truth = _cube(SHAPE, (5, 5, 5), 4)
    pred = _cube(SHAPE, (11, 5, 5), 4)
    scores = lesion_wise_scores(pred, truth)
    assert (scores["tp"], scores["fn"], scores["fp"]) == (1, 0, 0)
    assert scores["dice"] == 0.0
    assert scores["hd95"] == pytest.approx(6.0)


def test_lesion_wise_partial_overlap_and_spacing():
    truth = _cube(SHAPE, (10, 10, 10), 4)
    pred = _cube(SHAPE, (11, 10, 10), 4)  # shifted one voxel: 48 of 64 shared
    scores = lesion_wise_scores(pred, truth, ANISO)
    assert scores["dice"] == pytest.approx(0.75)
    assert scores["hd95"] == pytest.approx(hd95(pred, truth, ANISO))


def test_lesion_wise_empty_cases():
    empty = np.zeros(SHAPE, bool)
    some = _cube(SHAPE, (3, 3, 3), 4) | _cube(SHAPE, (20, 20, 20), 4)
    assert lesion_wise_scores(empty, empty) == {"dice": 1.0, "hd95": 0.0, "tp": 0, "fn": 0,
                                                "fp": 0}
    spurious = lesion_wise_scores(some, empty)
    assert (spurious["dice"], spurious["hd95"], spurious["fp"]) == (0.0, 374.0, 2)
    missed = lesion_wise_scores(empty, some)
    assert (missed["dice"], missed["hd95"], missed["fn"]) == (0.0, 374.0, 2)
    # Only tiny truth lesions and nothing predicted: nothing to score, as both empty.
    tiny = _cube(SHAPE, (3, 3, 3), 2)
    assert lesion_wise_scores(empty, tiny)["dice"] == 1.0


def test_lesion_wise_border_lesion_and_official_connectivity_option():
    truth = _cube(SHAPE, (0, 0, 0), 5)  # touches three borders
    pred = _cube(SHAPE, (0, 1, 0), 5)
    for connectivity in (1, 2):
        scores = lesion_wise_scores(pred, truth, dilation_connectivity=connectivity)
        assert scores["tp"] == 1
        assert scores["dice"] == pytest.approx(dice(pred, truth))


def test_lesion_wise_diagonal_gap_depends_on_dilation_structure():
    # Corners 6 voxels apart on two axes (L1 12): three cross dilations reach 3 in L1 from each
    # side, so the dilated lesions stay apart (they would touch up to L1 8); three dilations with
    # the 18-neighbourhood of the official script reach 3 along both axes at once and join them.
    truth = _cube(SHAPE, (5, 5, 5), 4) | _cube(SHAPE, (14, 14, 5), 4)
    pred = _cube(SHAPE, (5, 5, 5), 4)
    assert lesion_wise_scores(pred, truth, dilation_connectivity=1)["fn"] == 1
    merged = lesion_wise_scores(pred, truth, dilation_connectivity=2)
    assert (merged["tp"], merged["fn"]) == (1, 0)


# --- legacy slice Dice and post-processing -------------------------------------------------


def test_slice_dice_legacy_rewards_empty_prediction():
    truth = np.zeros((128, 128, 128), bool)
    truth[60:73, 60:70, 60:70] = True  # small tumour in 13 of 128 slices along axis 0
    empty = np.zeros_like(truth)
    assert slice_dice_legacy(empty, truth) == pytest.approx(115 / 128)  # ~0.90
    assert slice_dice_legacy(empty, truth) > 0.89
    assert dice(empty, truth) == 0.0  # the BraTS Dice
    assert slice_dice_legacy(truth, truth) == 1.0


def test_slice_dice_legacy_hand_computed_and_axis():
    truth = np.zeros((4, 3, 3), bool)
    pred = np.zeros((4, 3, 3), bool)
    truth[0, 0, 0:2] = True
    pred[0, 0, 0] = True  # slice 0: 2*1/(1+2) = 2/3
    truth[1, 1, 1] = True  # slice 1: missed -> 0
    pred[2, 2, 2] = True  # slice 2: spurious -> 0; slice 3 empty in both -> 1
    assert slice_dice_legacy(pred, truth) == pytest.approx((2 / 3 + 0 + 0 + 1) / 4)
    # Along the last axis: slice 0 holds the shared voxel only (Dice 1), slice 1 the two missed
    # truth voxels (0), slice 2 the spurious one (0).
    expected = (1.0 + 0.0 + 0.0) / 3
    assert slice_dice_legacy(pred, truth, axis=2) == pytest.approx(expected)


def test_relabel_small_et():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:12, 2:12, 2:12] = 2
    labels[4:8, 4:8, 4:8] = 3  # 64 ET voxels
    out = relabel_small_et(labels, min_voxels=500)
    assert not (out == 3).any() and (out[4:8, 4:8, 4:8] == 1).all()
    assert (labels[4:8, 4:8, 4:8] == 3).all()  # input untouched
    removed = relabel_small_et(labels, min_voxels=500, to=0)
    assert (removed[4:8, 4:8, 4:8] == 0).all()
    kept = relabel_small_et(labels, min_voxels=64)
    np.testing.assert_array_equal(kept, labels)
    with pytest.raises(ValueError):
        relabel_small_et(labels, to=2)
