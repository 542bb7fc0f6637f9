"""Probabilities -> canonical labels (TorchScript-compatible)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["probabilities_to_labels"]


def probabilities_to_labels(probs: Tensor, output: str = "softmax") -> Tensor:
    """Canonical uint8 labels (D, H, W) from probabilities (n_classes, D, H, W) or
    (1, n_classes, D, H, W).

    Args:
        probs: output of :class:`mtcmkd.inference.SlidingWindow` (batch dimension optional).
        output: "softmax": channels are the canonical classes (0 background, 1 NCR/NETC,
            2 ED/SNFH, 3 ET[, 4 RC]); the label is the argmax (ties go to the lower label).
            "regions": channels are WT, TC, ET probabilities; labels are nested, applied in this
            order: WT > 0.5 -> 2 (edema), then TC > 0.5 -> 1 (core), then ET > 0.5 -> 3
            (enhancing). So ET wins over TC and TC over WT, and a voxel with TC (or ET) above 0.5
            is tumour even if WT is not.

    Raises:
        ValueError: unknown `output`, wrong number of dims, or not 3 channels for "regions".
    """
    if probs.dim() == 5:
        if probs.size(0) != 1:
            raise ValueError("probabilities_to_labels takes one volume, got batch " +
                             str(probs.size(0)))
        probs = probs[0]
    if probs.dim() != 4:
        raise ValueError("expected probabilities (channels, D, H, W), got " + str(probs.dim())
                         + " dims")
    if output == "softmax":
        return torch.argmax(probs, dim=0).to(torch.uint8)
    if output == "regions":
        if probs.size(0) != 3:
            raise ValueError("region output needs 3 channels (WT, TC, ET), got "
                             + str(probs.size(0)))
        labels = torch.zeros(probs.shape[1:], dtype=torch.uint8, device=probs.device)
        labels = torch.where(probs[0] > 0.5, torch.full_like(labels, 2), labels)
        labels = torch.where(probs[1] > 0.5, torch.full_like(labels, 1), labels)
        labels = torch.where(probs[2] > 0.5, torch.full_like(labels, 3), labels)
        return labels
    raise ValueError("output must be 'softmax' or 'regions', got '" + output + "'")
