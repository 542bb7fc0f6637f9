"""Sliding-window inference over a whole volume, written to compile with ``torch.jit.script``.

Everything that depends on the volume size (padding, window positions, blending) happens
inside ``forward`` in TorchScript-compatible code, so one scripted module serves any size; a
traced module would bake in the shapes of the example volume. The same module also runs the
network once over the whole volume padded to its stride (:meth:`SlidingWindow.whole`, the
"box" layout), and owns how the network is called: mirrors, bf16 autocast, channels-last.

Progress within a volume (:func:`window_progress`) is eager-only: the call sits under
``if not torch.jit.is_scripting()``, which TorchScript does not compile, so scripted and exported
modules are unchanged by it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OUTPUTS", "SlidingWindow", "gaussian_importance_map", "window_progress",
           "window_starts"]

# The callback of the innermost `window_progress` block (eager inference only).
_WINDOW_PROGRESS: list[Callable[[int, int], None]] = []


@contextmanager
def window_progress(callback: Callable[[int, int], None]) -> Iterator[None]:
    """Call ``callback(windows_done, windows_total)`` after every network call of every eager
    :class:`SlidingWindow` pass inside this block (a progress line within a long case)."""
    _WINDOW_PROGRESS.append(callback)
    try:
        yield
    finally:
        _WINDOW_PROGRESS.pop()


def _report_windows(done: int, total: int) -> None:
    if _WINDOW_PROGRESS:
        _WINDOW_PROGRESS[-1](done, total)

#: Output kinds: "softmax" = class probabilities (channels = classes, e.g. 4 canonical labels);
#: "regions" = independent sigmoid probabilities of WT, TC, ET (in that channel order).
OUTPUTS: tuple[str, ...] = ("softmax", "regions")


def gaussian_importance_map(
    patch_size: Sequence[int], sigma_scale: float = 0.125, min_weight: float = 1e-4
) -> Tensor:
    """Blending weights of one window, nnU-Net style: a centred 3D Gaussian, peak 1.

    Voxels near a window's border see less context, so their predictions count less where
    windows overlap.

    Args:
        patch_size: window size (3 ints) in voxels.
        sigma_scale: standard deviation per axis as a fraction of the patch size.
        min_weight: weights are clamped to at least this (relative to the peak 1), so every
            voxel has a positive weight and the blend never divides by ~0.

    Returns:
        float32 tensor of shape `patch_size`, separable (product of 1D Gaussians centred at
        (p - 1) / 2, so symmetric under flips), maximum 1, minimum >= `min_weight`.
    """
    sizes = [int(p) for p in patch_size]
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"patch_size must be 3 positive ints, got {tuple(patch_size)}")
    if not sigma_scale > 0 or not 0 < min_weight <= 1:
        raise ValueError(f"need sigma_scale > 0 and 0 < min_weight <= 1, got {sigma_scale}, "
                         f"{min_weight}")
    axes = []
    for p in sizes:
        offset = torch.arange(p, dtype=torch.float64) - (p - 1) / 2.0
        sigma = sigma_scale * p
        axes.append(torch.exp(-0.5 * (offset / sigma) ** 2))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights = weights / weights.max()
    return weights.clamp(min=min_weight).to(torch.float32)


def window_starts(size: int, patch: int, step: int) -> list[int]:
    """Start offsets of windows of length `patch` along an axis of length `size` >= `patch`.

    Windows start at 0, step, 2 step, ... and the last one is flush with the end
    (start `size - patch`), so the windows cover the axis exactly and none sticks out.
    """
    starts: list[int] = []
    start = 0
    while start + patch < size:
        starts.append(start)
        start += step
    starts.append(max(size - patch, 0))
    return starts


class SlidingWindow(nn.Module):
    """Whole-volume prediction from a patch network, Gaussian-blended, TorchScript-compatible.

    Args:
        network: maps (B, C, *patch_size) -> logits (B, n_classes, *patch_size); a plain or
            scripted module (e.g. ``mtcmkd.models.ResidualUNet``).
        patch_size: window size (3 ints), valid for the network (e.g. multiples of 8).
        n_classes: number of output channels of the network.
        overlap: fraction of a window shared with its neighbour, in [0, 1); the step is
            ``round(patch * (1 - overlap))`` (at least 1).
        sigma_scale: Gaussian sigma as a fraction of the patch size (see
            :func:`gaussian_importance_map`).
        output: "softmax" (probabilities over classes) or "regions" (sigmoid per channel).
        mirror: test-time augmentation: average over the identity and the 7 combinations of flips
            of the three spatial axes (8 network passes per window).
        window_batch: windows per network call.
        bf16: run the network under ``torch.autocast`` with bfloat16 (on the input's device
            type); probabilities and blending stay float32. Eager only: a scripted module runs
            float32 and refuses a ``bf16`` instance (the export is the float32 reference).
        channels_last: hand the network its input in ``torch.channels_last_3d`` memory format
            and convert its 5D weights to it here (in place; values unchanged), which is what
            lets oneDNN use its fast bf16 kernels on a CPU. Off: 5D weights left in another
            format by an earlier instance are made contiguous again, so a float32 run computes
            exactly as it would on a freshly loaded network.
        stride: the network's size multiple, used by :meth:`whole` to pad the volume; default
            the network's ``size_multiple`` attribute (the mtcmkd networks have one), else 1.

    ``forward`` takes one normalised volume (1, C, D, H, W) of any size and returns
    probabilities (1, n_classes, D, H, W) float32. A volume smaller than the patch in some axis is
    zero-padded (symmetrically) to the patch size there and the result cropped back; zero is
    background in z-scored images. Probabilities (not logits) are averaged over mirrors and
    blended over windows with the Gaussian weights, accumulated in one (n_classes, D, H, W) buffer
    plus a (D, H, W) weight map, so memory stays bounded by the volume, not by the window count.
    Gradients are not tracked.

    ``whole`` takes the same input and returns the same output from one network pass over the
    whole volume, zero-padded (symmetrically) to a multiple of ``stride``: no windows, no
    blending; normalisation layers then see the statistics of the whole volume rather than of
    a patch-size window.
    """

    def __init__(
        self,
        network: nn.Module,
        patch_size: Sequence[int],
        n_classes: int,
        overlap: float = 0.5,
        sigma_scale: float = 0.125,
        output: str = "softmax",
        mirror: bool = False,
        window_batch: int = 1,
        bf16: bool = False,
        channels_last: bool = False,
        stride: int | None = None,
    ) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if n_classes < 1 or window_batch < 1:
            raise ValueError(
                f"n_classes and window_batch must be >= 1, got {n_classes}, {window_batch}"
            )
        self.network = network
        self.patch_size: list[int] = [int(p) for p in patch_size]
        self.steps: list[int] = [max(1, int(round(p * (1.0 - overlap)))) for p in self.patch_size]
        self.n_classes: int = int(n_classes)
        self.output: str = output
        self.sigmoid: bool = output == "regions"
        self.n_mirrors: int = 8 if mirror else 1
        self.window_batch: int = int(window_batch)
        self.bf16: bool = bool(bf16)
        self.channels_last: bool = bool(channels_last)
        if stride is None:
            stride = int(getattr(network, "size_multiple", 1))
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.stride: int = int(stride)
        _set_weight_format(network, channels_last)
        self.register_buffer(
            "importance", gaussian_importance_map(self.patch_size, sigma_scale), persistent=False
        )

    def _activate(self, logits: Tensor) -> Tensor:
        logits = logits.to(torch.float32)
        if self.sigmoid:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1)

    def _logits(self, batch: Tensor) -> Tensor:
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        if self.bf16:
            return self._bf16_logits(batch)
        return self.network(batch)

    @torch.jit.unused
    def _bf16_logits(self, batch: Tensor) -> Tensor:
        # Autocast is eager-only here: TorchScript ignores it unless a global JIT flag is set,
        # and the exported file is the float32 reference anyway.
        with torch.autocast(device_type=batch.device.type, dtype=torch.bfloat16):
            return self.network(batch)

    def _predict_windows(self, batch: Tensor) -> Tensor:
        """Probabilities (B, n_classes, *patch) of a batch of windows, averaged over the mirrors."""
        total = self._activate(self._logits(batch))
        for m in range(1, self.n_mirrors):
            dims: list[int] = []
            if m & 1:
                dims.append(2)
            if m & 2:
                dims.append(3)
            if m & 4:
                dims.append(4)
            flipped = self._activate(self._logits(torch.flip(batch, dims)))
            total = total + torch.flip(flipped, dims)
        return total / float(self.n_mirrors)

    def forward(self, x: Tensor) -> Tensor:
        """(1, C, D, H, W) normalised volume -> (1, n_classes, D, H, W) float32 probabilities."""
        if x.dim() != 5 or x.size(0) != 1:
            raise ValueError(
                "SlidingWindow expects one volume (1, channels, depth, height, width), got shape "
                + str(x.shape)
            )
        with torch.no_grad():
            pd, ph, pw = self.patch_size[0], self.patch_size[1], self.patch_size[2]
            d, h, w = x.size(2), x.size(3), x.size(4)
            pad_d, pad_h, pad_w = max(pd - d, 0), max(ph - h, 0), max(pw - w, 0)
            lo_d, lo_h, lo_w = pad_d // 2, pad_h // 2, pad_w // 2
            if pad_d + pad_h + pad_w > 0:
                x = F.pad(x, [lo_w, pad_w - lo_w, lo_h, pad_h - lo_h, lo_d, pad_d - lo_d])
            size_d, size_h, size_w = x.size(2), x.size(3), x.size(4)

            windows: list[list[int]] = []
            for sd in window_starts(size_d, pd, self.steps[0]):
                for sh in window_starts(size_h, ph, self.steps[1]):
                    for sw in window_starts(size_w, pw, self.steps[2]):
                        windows.append([sd, sh, sw])

            importance = self.importance.to(device=x.device, dtype=torch.float32)
            probs_sum = torch.zeros(
                [self.n_classes, size_d, size_h, size_w], dtype=torch.float32, device=x.device
            )
            weight_sum = torch.zeros([size_d, size_h, size_w], dtype=torch.float32, device=x.device)
            for first in range(0, len(windows), self.window_batch):
                chunk = windows[first : first + self.window_batch]
                patches: list[Tensor] = []
                for s in chunk:
                    patches.append(x[0, :, s[0] : s[0] + pd, s[1] : s[1] + ph, s[2] : s[2] + pw])
                probs = self._predict_windows(torch.stack(patches))
                if probs.size(1) != self.n_classes:
                    raise ValueError(
                        "network returned "
                        + str(probs.size(1))
                        + " channels, SlidingWindow was built for n_classes="
                        + str(self.n_classes)
                    )
                for i, s in enumerate(chunk):
                    sd, sh, sw = s[0], s[1], s[2]
                    probs_sum[:, sd : sd + pd, sh : sh + ph, sw : sw + pw] += probs[i] * importance
                    weight_sum[sd : sd + pd, sh : sh + ph, sw : sw + pw] += importance
                if not torch.jit.is_scripting():  # not compiled by TorchScript: eager only
                    _report_windows(first + len(chunk), len(windows))
            blended = probs_sum / weight_sum
            blended = blended[:, lo_d : lo_d + d, lo_h : lo_h + h, lo_w : lo_w + w]
            return blended.unsqueeze(0)

    def whole(self, x: Tensor) -> Tensor:
        """(1, C, D, H, W) normalised volume -> (1, n_classes, D, H, W) float32 probabilities
        from one network pass over the volume zero-padded to a multiple of ``stride``."""
        if x.dim() != 5 or x.size(0) != 1:
            raise ValueError(
                "SlidingWindow expects one volume (1, channels, depth, height, width), got shape "
                + str(x.shape)
            )
        with torch.no_grad():
            s = self.stride
            d, h, w = x.size(2), x.size(3), x.size(4)
            pad_d, pad_h, pad_w = (s - d % s) % s, (s - h % s) % s, (s - w % s) % s
            lo_d, lo_h, lo_w = pad_d // 2, pad_h // 2, pad_w // 2
            if pad_d + pad_h + pad_w > 0:
                x = F.pad(x, [lo_w, pad_w - lo_w, lo_h, pad_h - lo_h, lo_d, pad_d - lo_d])
            probs = self._predict_windows(x)
            if probs.size(1) != self.n_classes:
                raise ValueError(
                    "network returned "
                    + str(probs.size(1))
                    + " channels, SlidingWindow was built for n_classes="
                    + str(self.n_classes)
                )
            return probs[:, :, lo_d : lo_d + d, lo_h : lo_h + h, lo_w : lo_w + w].contiguous()


# TorchScript compiles the call to an unused method from its __annotations__, without resolving
# the strings `from __future__ import annotations` leaves there: give it the types themselves.
SlidingWindow._bf16_logits.__annotations__ = {"batch": Tensor, "return": Tensor}


def _set_weight_format(network: nn.Module, channels_last: bool) -> None:
    """5D weights to channels-last (``channels_last``), or back to contiguous when an earlier
    instance left them channels-last; untouched otherwise (no re-assignment of parameters that
    already have the wanted format, which matters for engines that hold views of them)."""
    weights = [p for p in network.parameters() if p.dim() == 5]
    if channels_last:
        if any(not p.is_contiguous(memory_format=torch.channels_last_3d) for p in weights):
            network.to(memory_format=torch.channels_last_3d)
    elif any(not p.is_contiguous() for p in weights):
        network.to(memory_format=torch.contiguous_format)
