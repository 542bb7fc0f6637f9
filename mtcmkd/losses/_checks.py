"""Input validation shared by the loss modules (shape and dtype checks, no device sync)."""

from __future__ import annotations

from torch import Tensor


def check_same_shape(student: Tensor, teacher: Tensor, what: str) -> None:
    """Raise ValueError unless the student and teacher tensors have the same shape."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher {what} must have the same shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )


def check_logits(logits: Tensor) -> None:
    """Raise ValueError unless ``logits`` is ``(B, C, *spatial)`` with a spatial dim."""
    if logits.ndim < 3:
        raise ValueError(
            f"logits must have shape (B, C, *spatial) with at least one spatial dim, "
            f"got {tuple(logits.shape)}"
        )


def check_labels(target: Tensor, name: str = "target") -> Tensor:
    """Return ``target`` as int64 after checking that it holds integer labels."""
    if target.is_floating_point() or target.is_complex():
        raise ValueError(
            f"{name} must hold integer class labels, got dtype {target.dtype}; "
            "pass the label volume, not probabilities or logits"
        )
    return target.long()


def check_logits_and_labels(logits: Tensor, target: Tensor) -> Tensor:
    """Validate ``(B, C, *spatial)`` logits against ``(B, *spatial)`` labels; return int64 labels."""
    check_logits(logits)
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}: "
            f"expected (B, *spatial) = {expected}"
        )
    return check_labels(target)
