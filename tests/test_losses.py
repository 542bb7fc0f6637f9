"""Unit tests for mtcmkd.losses against hand-computed values and float64 numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtcmkd.losses import (
    barlow_twins_loss,
    bottleneck_embeddings,
    bottleneck_kl,
    cross_entropy,
    downsample_labels,
    kd_kl,
    kdnet_gt_loss,
    kdnet_kd_loss,
    region_kd_kl,
    region_segmentation_loss,
    region_targets,
    segmentation_loss,
    soft_dice_loss,
    soft_jaccard_loss,
    teacher_weights,
)

EPS = 1e-5
LOG3 = math.log(3.0)


# ----------------------------------------------------------------------------------------------
# float64 numpy references, written independently of the implementation
# ----------------------------------------------------------------------------------------------


def np_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def np_one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(B, *spatial) -> (B, C, *spatial) float64."""
    return np.stack([(labels == c).astype(np.float64) for c in range(num_classes)], axis=1)


def np_bce(prob: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean(-(target * np.log(prob) + (1 - target) * np.log(1 - prob))))


def np_seg_terms(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """Volume soft Dice loss, soft Jaccard loss, cross-entropy (float64)."""
    p = np_softmax(logits, 1)
    y = np_one_hot(labels, logits.shape[1])
    dims = tuple(range(2, logits.ndim))
    inter = (p * y).sum(dims)
    sp, sy = p.sum(dims), y.sum(dims)
    dice = (2 * inter + EPS) / (sp + sy + EPS)
    iou = (inter + EPS) / (sp + sy - inter + EPS)
    ce = -np.mean(np.log((p * y).sum(1)))
    return float(1 - dice.mean()), float(1 - iou.mean()), float(ce)


def np_slice_dice_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """The published code's slip: one Dice per slice along the first spatial axis, averaged."""
    p = np_softmax(logits, 1)
    y = np_one_hot(labels, logits.shape[1])
    inter = (p * y).sum((3, 4))
    dice = (2 * inter + EPS) / (p.sum((3, 4)) + y.sum((3, 4)) + EPS)  # (B, C, D)
    return float(1 - dice.mean())


def np_kd_kl(student: np.ndarray, teacher: np.ndarray, t: float, scaling: str) -> float:
    log_p = np_log_softmax(student / t, 1)
    log_q = np_log_softmax(teacher / t, 1)
    kl = (np.exp(log_q) * (log_q - log_p)).sum(1)
    if scaling == "default":
        return float(kl.mean() * t**2)
    return float(kl.sum() / student.shape[0] * t)


def np_global_dice(a: np.ndarray, b: np.ndarray) -> float:
    dims = tuple(range(1, a.ndim))
    return float(np.mean((2 * (a * b).sum(dims) + EPS) / (a.sum(dims) + b.sum(dims) + EPS)))


def np_barlow(za: np.ndarray, zb: np.ndarray, lam: float) -> float:
    a = (za - za.mean(0)) / np.sqrt(za.var(0) + EPS)
    b = (zb - zb.mean(0)) / np.sqrt(zb.var(0) + EPS)
    c = a.T @ b / za.shape[0]
    off = c - np.diag(np.diag(c))
    return float(((1 - np.diag(c)) ** 2).sum() + lam * (off**2).sum())


def to_np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# ----------------------------------------------------------------------------------------------
# segmentation
# ----------------------------------------------------------------------------------------------


def hand_example() -> tuple[torch.Tensor, torch.Tensor]:
    """B=1, C=2, 2x2x2 volume with class-1 probabilities 3/4, 1/4 or 1/2.

    logit difference (class 1 - class 0) of log 3 gives p1 = 3/4, -log 3 gives 1/4, 0 gives 1/2.
    Voxels (flattened): target y1 = [1, 1, 1, 1, 0, 0, 0, 0],
                        p1        = [3/4, 3/4, 1/2, 1/4, 1/4, 1/4, 1/2, 3/4].
    """
    diff = torch.tensor([LOG3, LOG3, 0.0, -LOG3, -LOG3, -LOG3, 0.0, LOG3])
    logits = torch.stack([torch.zeros(8), diff]).reshape(1, 2, 2, 2, 2)
    target = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0]).reshape(1, 2, 2, 2)
    return logits, target


def test_segmentation_terms_by_hand() -> None:
    logits, target = hand_example()
    # Class 1: I = 3/4 + 3/4 + 1/2 + 1/4 = 9/4, sum p = 4, sum y = 4.
    # Class 0: p0 = 1 - p1 on the other four voxels gives the same I = 9/4, sums 4 and 4.
    dice = (2 * 9 / 4 + EPS) / (8 + EPS)  # 0.5625 for both classes
    iou = (9 / 4 + EPS) / (8 - 9 / 4 + EPS)  # 9/23 for both classes
    # True-class probabilities: 3/4 four times, 1/2 twice, 1/4 twice.
    ce = (4 * math.log(4 / 3) + 2 * math.log(2) + 2 * math.log(4)) / 8
    assert soft_dice_loss(logits, target).item() == pytest.approx(1 - dice, abs=1e-6)
    # The eps-free fractions 7/16 and 14/23 are off by ~5e-7 and ~1e-6 because of eps.
    assert soft_dice_loss(logits, target).item() == pytest.approx(7 / 16, abs=1e-5)
    assert soft_jaccard_loss(logits, target).item() == pytest.approx(1 - iou, abs=1e-6)
    assert soft_jaccard_loss(logits, target).item() == pytest.approx(14 / 23, abs=1e-5)
    assert cross_entropy(logits, target).item() == pytest.approx(ce, abs=1e-6)
    expected = ((1 - dice) + (1 - iou) + ce) / 3
    assert segmentation_loss(logits, target).item() == pytest.approx(expected, abs=1e-6)


def test_segmentation_terms_match_numpy(rng: torch.Generator) -> None:
    logits = torch.randn(2, 4, 3, 4, 5, generator=rng) * 2
    target = torch.randint(0, 4, (2, 3, 4, 5), generator=rng)
    target[1][target[1] == 3] = 2  # an empty class in sample 1
    dice, iou, ce = np_seg_terms(to_np(logits), target.numpy())
    assert soft_dice_loss(logits, target).item() == pytest.approx(dice, abs=1e-6)
    assert soft_jaccard_loss(logits, target).item() == pytest.approx(iou, abs=1e-6)
    assert cross_entropy(logits, target).item() == pytest.approx(ce, abs=1e-6)
    assert segmentation_loss(logits, target).item() == pytest.approx(
        (dice + iou + ce) / 3, abs=1e-6
    )


def test_perfect_prediction_gives_zero_dice_and_jaccard(rng: torch.Generator) -> None:
    target = torch.randint(0, 4, (2, 4, 4, 4), generator=rng)
    target[:, 0, 0, 0] = torch.tensor([0, 1])
    logits = 100.0 * F.one_hot(target, 4).movedim(-1, 1).float()
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_jaccard_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    assert cross_entropy(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    # Classes absent from both target and (hard) prediction count as perfect, not as 0.
    sparse = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    sparse[0, 1, 1, 1] = 3
    assert soft_dice_loss(100.0 * F.one_hot(sparse, 4).movedim(-1, 1).float(), sparse).item() == (
        pytest.approx(0.0, abs=1e-6)
    )


def test_empty_class_with_predicted_mass_scores_zero() -> None:
    # Class 1 absent from the target, but predicted with probability 1/2 on all 8 voxels:
    # its Dice is eps / (4 + eps) ~ 0; class 0 has I = 4, sum p = 4, sum y = 8: Dice 2/3.
    logits = torch.zeros(1, 2, 2, 2, 2)
    target = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    dice0 = (8 + EPS) / (12 + EPS)
    dice1 = EPS / (4 + EPS)
    expected = 1 - (dice0 + dice1) / 2
    assert soft_dice_loss(logits, target).item() == pytest.approx(expected, abs=1e-6)


def test_volume_dice_differs_from_slice_averaged_dice() -> None:
    # Slice 0 (first spatial index): 4 tumour voxels, all predicted. Slice 1: 1 tumour voxel,
    # missed. Volume Dice of class 1: 2*4 / (4 + 5) = 8/9. Slice-averaged: (1 + 0) / 2.
    target = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    target[0, 0] = 1
    target[0, 1, 0, 0] = 1
    pred = torch.zeros_like(target)
    pred[0, 0] = 1
    logits = 50.0 * F.one_hot(pred, 2).movedim(-1, 1).float()
    # Class 0: volume I = 3, sum p = 4, sum y = 3 -> 6/7.
    volume = 1 - (8 / 9 + 6 / 7) / 2
    got = soft_dice_loss(logits, target).item()
    assert got == pytest.approx(volume, abs=1e-5)
    slice_averaged = np_slice_dice_loss(to_np(logits), target.numpy())
    assert slice_averaged == pytest.approx(1 - (1 + 0 + 1 + 2 * 3 / 7) / 4, abs=1e-5)
    assert abs(got - slice_averaged) > 0.1


def test_segmentation_loss_gradient_and_validation(rng: torch.Generator) -> None:
    logits = torch.randn(1, 4, 4, 4, 4, generator=rng, requires_grad=True)
    target = torch.randint(0, 4, (1, 4, 4, 4), generator=rng)
    segmentation_loss(logits, target).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="does not match"):
        segmentation_loss(logits, target[:, :2])
    with pytest.raises(ValueError, match="integer class labels"):
        segmentation_loss(logits, target.float())
    with pytest.raises(RuntimeError):
        segmentation_loss(logits.detach(), torch.full_like(target, 4))


def test_region_targets_nested_regions_and_rc() -> None:
    labels = torch.tensor([0, 1, 2, 3, 4, 3, 1, 0]).reshape(1, 2, 2, 2)
    regions = region_targets(labels)
    assert regions.shape == (1, 3, 2, 2, 2) and regions.dtype == torch.float32
    flat = regions.reshape(3, 8)
    #                 labels: 0  1  2  3  4  3  1  0
    assert flat[0].tolist() == [0, 1, 1, 1, 0, 1, 1, 0]  # WT = {1, 2, 3}
    assert flat[1].tolist() == [0, 1, 0, 1, 0, 1, 1, 0]  # TC = {1, 3}
    assert flat[2].tolist() == [0, 0, 0, 1, 0, 1, 0, 0]  # ET = {3}
    # Nesting: ET within TC within WT.
    assert bool((flat[2] <= flat[1]).all() and (flat[1] <= flat[0]).all())


def test_region_segmentation_loss_matches_numpy(rng: torch.Generator) -> None:
    logits = torch.randn(2, 3, 4, 4, 4, generator=rng)
    labels = torch.randint(0, 5, (2, 4, 4, 4), generator=rng)
    r = np.stack(
        [np.isin(labels.numpy(), members) for members in ((1, 2, 3), (1, 3), (3,))], axis=1
    ).astype(np.float64)
    p = np_sigmoid(to_np(logits))
    dice = (2 * (p * r).sum((2, 3, 4)) + EPS) / (p.sum((2, 3, 4)) + r.sum((2, 3, 4)) + EPS)
    expected = ((1 - dice.mean()) + np_bce(p, r)) / 2
    assert region_segmentation_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="WT, TC, ET"):
        region_segmentation_loss(torch.randn(2, 4, 4, 4, 4), labels)


def test_downsample_labels_matches_nearest_interpolation(rng: torch.Generator) -> None:
    labels = torch.randint(0, 5, (2, 8, 6, 4), generator=rng)
    half = downsample_labels(labels)
    assert half.shape == (2, 4, 3, 2) and half.dtype == labels.dtype
    reference = F.interpolate(labels[:, None].float(), scale_factor=0.5, mode="nearest")[:, 0]
    assert torch.equal(half, reference.long())
    assert torch.equal(half, labels[:, ::2, ::2, ::2])
    assert torch.equal(downsample_labels(labels, factor=1), labels)
    with pytest.raises(ValueError, match="not divisible"):
        downsample_labels(labels, factor=4)
    with pytest.raises(ValueError, match="positive integer"):
        downsample_labels(labels, factor=0)


# ----------------------------------------------------------------------------------------------
# distillation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaling", ["default", "paper"])
def test_kd_kl_matches_numpy_and_is_zero_for_equal_logits(
    rng: torch.Generator, scaling: str
) -> None:
    student = torch.randn(2, 4, 3, 4, 5, generator=rng) * 3
    teacher = torch.randn(2, 4, 3, 4, 5, generator=rng) * 3
    for t in (1.0, 5.0, 20.0):
        expected = np_kd_kl(to_np(student), to_np(teacher), t, scaling)
        got = kd_kl(student, teacher, t, scaling=scaling).item()  # type: ignore[arg-type]
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
        same = kd_kl(student, student.clone(), t, scaling=scaling)  # type: ignore[arg-type]
        assert same.item() == pytest.approx(0.0, abs=1e-5)


def test_kd_kl_paper_to_default_ratio_is_voxels_over_temperature(rng: torch.Generator) -> None:
    # paper = sum_{b,v} kl / B * T and default = sum_{b,v} kl / (B * V) * T^2, so
    # paper / default = V / T exactly, whatever the inputs.
    student = torch.randn(3, 4, 4, 6, 5, generator=rng)
    teacher = torch.randn(3, 4, 4, 6, 5, generator=rng)
    voxels = 4 * 6 * 5
    for t in (2.0, 20.0):
        ratio = kd_kl(student, teacher, t, scaling="paper") / kd_kl(student, teacher, t)
        assert ratio.item() == pytest.approx(voxels / t, rel=1e-5)


def test_kd_kl_detaches_teacher_and_validates(rng: torch.Generator) -> None:
    student = torch.randn(1, 4, 2, 2, 2, generator=rng, requires_grad=True)
    teacher = torch.randn(1, 4, 2, 2, 2, generator=rng, requires_grad=True)
    kd_kl(student, teacher, 20.0, scaling="paper").backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="scaling"):
        kd_kl(student, teacher, 20.0, scaling="hinton")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        kd_kl(student, teacher, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        kd_kl(student, teacher[:, :3], 20.0)


def test_teacher_weights() -> None:
    weights = teacher_weights(torch.tensor([0.8, 0.6, 0.2]))
    assert weights.sum().item() == pytest.approx(0.15)
    # 0.15 * perf / 1.6
    assert weights.tolist() == pytest.approx([0.075, 0.05625, 0.01875])
    assert torch.equal(torch.argsort(weights), torch.argsort(torch.tensor([0.8, 0.6, 0.2])))
    assert teacher_weights(torch.zeros(3)).tolist() == pytest.approx([0.05, 0.05, 0.05])
    assert teacher_weights(torch.tensor([0.0, 0.5]), total=1.0).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="non-negative"):
        teacher_weights(torch.tensor([0.5, -0.1, 0.2]))
    with pytest.raises(ValueError, match="1-D"):
        teacher_weights(torch.ones(2, 3))
    with pytest.raises(ValueError, match="1-D"):
        teacher_weights(torch.ones(0))
    with pytest.raises(ValueError, match="finite"):
        teacher_weights(torch.tensor([0.5, float("nan")]))


def test_kdnet_losses_match_numpy(rng: torch.Generator) -> None:
    # KD-Net Eq. 1-2: sigma is the softmax over classes, s = softmax(t / T), and the BCE target
    # is the teacher's binary prediction (one-hot of its argmax).
    student = torch.randn(2, 4, 3, 4, 4, generator=rng) * 2
    teacher = torch.randn(2, 4, 3, 4, 4, generator=rng) * 8
    labels = torch.randint(0, 4, (2, 3, 4, 4), generator=rng)
    s = np_softmax(to_np(teacher) / 5.0, 1)
    sig = np_softmax(to_np(student), 1)
    hard = np_one_hot(to_np(teacher).argmax(1), 4)
    assert (hard.sum(1) == 1).all()
    expected_kd = (1 - np_global_dice(s, sig)) + np_bce(sig, hard)
    assert kdnet_kd_loss(student, teacher).item() == pytest.approx(expected_kd, abs=1e-5)
    y = np_one_hot(labels.numpy(), 4)
    expected_gt = (1 - np_global_dice(y, sig)) + np_bce(sig, y)
    assert kdnet_gt_loss(student, labels).item() == pytest.approx(expected_gt, abs=1e-5)


def test_kdnet_kd_target_of_a_correct_teacher_is_the_truth(rng: torch.Generator) -> None:
    """A teacher whose argmax is the truth teaches the truth (not "no class anywhere").

    With a mildly confident teacher, softmax(t / 5) stays below 0.5 on every voxel, so a
    thresholded target (the old reading) was all-zero; the argmax target is one class per voxel.
    """
    labels = torch.randint(0, 4, (1, 4, 4, 4), generator=rng)
    teacher = 3.0 * F.one_hot(labels, 4).movedim(-1, 1).float()
    assert bool((torch.softmax(teacher / 5.0, 1) <= 0.5).all())
    student = torch.zeros(1, 4, 4, 4, 4, requires_grad=True)
    kdnet_kd_loss(student, teacher).backward()
    grad = student.grad
    assert grad is not None
    # Descent raises exactly the true class's logit at every voxel.
    true_grad = grad.gather(1, labels.unsqueeze(1))
    assert bool((true_grad < 0).all())
    assert bool((grad.sum(1).abs() < 1e-6).all())  # softmax: gradients sum to 0 over classes
    # A student that predicts the truth scores lower than one that predicts background.
    right = 6.0 * F.one_hot(labels, 4).movedim(-1, 1).float()
    wrong = 6.0 * F.one_hot(torch.zeros_like(labels), 4).movedim(-1, 1).float()
    assert kdnet_kd_loss(right, teacher).item() < kdnet_kd_loss(wrong, teacher).item()


def test_kdnet_losses_finite_when_saturated() -> None:
    z = torch.tensor([30.0, -30.0, 0.0, 0.0]).reshape(1, 4, 1, 1, 1).requires_grad_(True)
    loss = kdnet_gt_loss(z, torch.ones(1, 1, 1, 1, dtype=torch.long))
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(z.grad).all())
    assert loss.item() > 10  # the true class has p ~ 1e-13


def test_kdnet_kd_loss_detaches_teacher(rng: torch.Generator) -> None:
    student = torch.randn(1, 4, 2, 2, 2, generator=rng, requires_grad=True)
    teacher = torch.randn(1, 4, 2, 2, 2, generator=rng, requires_grad=True)
    kdnet_kd_loss(student, teacher, 5.0).backward()
    assert teacher.grad is None and student.grad is not None


def test_bottleneck_kl(rng: torch.Generator) -> None:
    a = torch.randn(2, 8, 2, 2, 2, generator=rng)
    b = torch.randn(2, 8, 2, 2, 2, generator=rng)
    assert bottleneck_kl(a, a.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # Softmax is shift-invariant: a per-sample constant offset changes nothing.
    assert bottleneck_kl(a + 3.0, a).item() == pytest.approx(0.0, abs=1e-5)
    ab, ba = bottleneck_kl(a, b).item(), bottleneck_kl(b, a).item()
    assert ab > 0 and ba > 0 and abs(ab - ba) > 1e-3
    # Reference: q from the teacher (second argument), p from the student (first).
    q = np_softmax(to_np(b).reshape(2, -1), 1)
    log_p = np_log_softmax(to_np(a).reshape(2, -1), 1)
    expected = float(np.mean((q * (np.log(q) - log_p)).sum(1)))
    assert ab == pytest.approx(expected, rel=1e-5)
    student = a.clone().requires_grad_(True)
    teacher = b.clone().requires_grad_(True)
    bottleneck_kl(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


# ----------------------------------------------------------------------------------------------
# Barlow Twins
# ----------------------------------------------------------------------------------------------


def hadamard_columns() -> torch.Tensor:
    """(8, 4): zero-mean, unit-variance, mutually orthogonal (whitened) +-1 columns."""
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    h8 = torch.kron(torch.kron(h2, h2), h2)
    return h8[:, 1:5]


def test_barlow_twins_whitened_identical_is_near_zero() -> None:
    z = hadamard_columns()
    # C = I / (1 + eps): on-diagonal term 4 * (eps / (1 + eps))^2 ~ 4e-10, off-diagonal 0.
    assert barlow_twins_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-8)
    # Invariant to a per-dimension affine map of either view.
    scaled = z * torch.tensor([2.0, 0.5, 3.0, 1.0]) + torch.tensor([1.0, -2.0, 0.0, 5.0])
    assert barlow_twins_loss(z, scaled).item() == pytest.approx(0.0, abs=1e-5)


def test_barlow_twins_permuted_dims_by_hand() -> None:
    # Student dims are the teacher dims shifted cyclically: C is a permutation matrix with an
    # empty diagonal, so loss = sum_i (1 - 0)^2 + lambda * (4 ones off the diagonal) = 4 + 4 lambda
    # (up to the 1 / (1 + eps) standardisation factor).
    z = hadamard_columns()
    lam = 5e-3
    loss = barlow_twins_loss(z, z[:, [1, 2, 3, 0]], lambda_offdiag=lam).item()
    assert loss == pytest.approx(4 + 4 * lam / (1 + EPS) ** 2, abs=1e-6)


def test_barlow_twins_matches_numpy(rng: torch.Generator) -> None:
    za = torch.randn(64, 16, generator=rng)
    zb = 0.7 * za + 0.5 * torch.randn(64, 16, generator=rng)
    for lam in (5e-3, 0.1):
        expected = np_barlow(to_np(za), to_np(zb), lam)
        assert barlow_twins_loss(za, zb, lambda_offdiag=lam).item() == pytest.approx(
            expected, rel=1e-5
        )
    with pytest.raises(ValueError, match="N >= 2"):
        barlow_twins_loss(za[:1], zb[:1])
    with pytest.raises(ValueError, match="same shape"):
        barlow_twins_loss(za, zb[:, :8])


def test_bottleneck_embeddings_shapes_and_order(rng: torch.Generator) -> None:
    feat = torch.randn(2, 16, 4, 4, 4, generator=rng)
    every = bottleneck_embeddings(feat, None)
    assert every.shape == (2 * 64, 16)
    b, z, y, x = 1, 2, 3, 1
    assert torch.equal(every[((b * 4 + z) * 4 + y) * 4 + x], feat[b, :, z, y, x])
    pooled = bottleneck_embeddings(feat, 2)
    assert pooled.shape == (2 * 8, 16)
    # Row 0: sample 0, the first 2x2x2 block.
    assert torch.allclose(pooled[0], feat[0, :, :2, :2, :2].mean(dim=(1, 2, 3)), atol=1e-6)
    # Row 8 + 7: sample 1, the last block (z, y, x) = (1, 1, 1).
    assert torch.allclose(pooled[15], feat[1, :, 2:, 2:, 2:].mean(dim=(1, 2, 3)), atol=1e-6)
    assert torch.equal(bottleneck_embeddings(feat, 1), every)
    with pytest.raises(ValueError, match="not divisible"):
        bottleneck_embeddings(feat, 3)
    with pytest.raises(ValueError, match="B, C, d, h, w"):
        bottleneck_embeddings(feat[0], None)


# ----------------------------------------------------------------------------------------------
# bfloat16 autocast
# ----------------------------------------------------------------------------------------------


def test_every_loss_is_finite_float32_under_bf16_autocast(rng: torch.Generator) -> None:
    shape = (2, 4, 8, 8, 8)
    student = (torch.randn(*shape, generator=rng) * 4).bfloat16().requires_grad_(True)
    teacher = (torch.randn(*shape, generator=rng) * 4).bfloat16()
    labels = torch.randint(0, 5, (2, 8, 8, 8), generator=rng)
    classes = labels.clamp(max=3)
    regions = (torch.randn(2, 3, 8, 8, 8, generator=rng) * 4).bfloat16()
    feat_t = torch.randn(2, 32, 4, 4, 4, generator=rng).bfloat16()
    feat_s = torch.randn(2, 32, 4, 4, 4, generator=rng).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = {
            "dice": soft_dice_loss(student, classes),
            "jaccard": soft_jaccard_loss(student, classes),
            "ce": cross_entropy(student, classes),
            "seg": segmentation_loss(student, classes),
            "region": region_segmentation_loss(regions, labels),
            "kd_default": kd_kl(student, teacher, 20.0),
            "kd_paper": kd_kl(student, teacher, 20.0, scaling="paper"),
            "kdnet_kd": kdnet_kd_loss(student, teacher),
            "kdnet_gt": kdnet_gt_loss(student, classes),
            "bottleneck_kl": bottleneck_kl(feat_s, feat_t),
            "barlow": barlow_twins_loss(
                bottleneck_embeddings(feat_t, None), bottleneck_embeddings(feat_s, None)
            ),
            "barlow_pooled": barlow_twins_loss(
                bottleneck_embeddings(feat_t, 2), bottleneck_embeddings(feat_s, 2)
            ),
        }
        total = sum(losses.values())
    for name, value in losses.items():
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value), name
    total.backward()
    assert student.grad is not None and torch.isfinite(student.grad.float()).all()
    # The Barlow matrix product runs in float32 even inside the autocast region.
    plain = barlow_twins_loss(
        bottleneck_embeddings(feat_t.float(), None), bottleneck_embeddings(feat_s.float(), None)
    )
    assert losses["barlow"].item() == pytest.approx(plain.item(), rel=1e-5)


def test_region_kd_kl_hand_computed() -> None:
    s = torch.tensor([0.0, 2.0, -1.0]).reshape(1, 3, 1)
    t = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1)
    T = 2.0

    def bkl(q: float, p: float) -> float:
        return q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))

    sig = torch.sigmoid
    per_voxel = sum(bkl(sig(t[0, r, 0] / T).item(), sig(s[0, r, 0] / T).item())
                    for r in range(3))
    assert region_kd_kl(s, t, T).item() == pytest.approx(per_voxel * T**2, rel=1e-5)
    assert region_kd_kl(s, t, T, scaling="paper").item() == pytest.approx(per_voxel * T, rel=1e-5)
    assert region_kd_kl(t, t, T).item() == pytest.approx(0.0, abs=1e-7)
