"""The one inference pipeline: raw volume -> labels, as a module TorchScript can compile.

Every whole-volume prediction of mtcmkd runs through :class:`InferencePipeline`: `mtcmkd
predict` and `evaluate` (via :func:`mtcmkd.inference.predict_volume`, a numpy adapter),
training's validation (on the store's crops, already normalised) and the TorchScript export
(the scripted module itself, for Python and the C++ client). The steps:

    raw volume (1, C, D, H, W)
      -> brain box: voxels non-zero in any channel; outside it background (``crop``)
      -> z-score on the non-zero voxels of the box (:class:`BrainZScore`, ``normalize``)
      -> Gaussian-blended sliding windows of the patch size, or one pass over the box padded to
         the network's stride (:class:`SlidingWindow`, ``layout``), float32 or bf16 autocast
      -> canonical labels (:func:`probabilities_to_labels`) -> label values (``label_values``)

Every size-dependent step runs inside the methods, so one scripted module serves any volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtcmkd.inference.labels import probabilities_to_labels
from mtcmkd.inference.normalization import BrainZScore
from mtcmkd.inference.settings import LAYOUTS, InferenceSettings, resolve_precision
from mtcmkd.inference.sliding_window import SlidingWindow

__all__ = ["InferencePipeline", "build_pipeline"]


class InferencePipeline(nn.Module):
    """Raw volume -> labels (``forward``), plus the cropped probabilities (``segment``) and the
    WT/TC/ET probabilities on the full grid (``probabilities``). Compiles with
    ``torch.jit.script`` when ``precision`` is "fp32".

    Args:
        network: patch network, eval mode, (B, C, *patch) -> logits (B, n_classes, *patch).
        patch_size, n_classes, output, overlap, sigma_scale, mirror, window_batch, stride: as
            :class:`~mtcmkd.inference.SlidingWindow`.
        label_values: the value written for each canonical label (``lut[canonical]``, e.g.
            the 2021 values 0, 1, 2, 4); default the canonical labels themselves.
        n_channels: input modalities (1 for a T1ce student).
        label_convention: name of the label values (a release, or "canonical"), kept as an
            attribute so C++ can print it.
        layout: "windows" (sliding windows) or "box" (one pass over the brain box).
        precision: "fp32" or "bf16" (autocast; eager only), already resolved for the device
            (:func:`~mtcmkd.inference.resolve_precision`; :func:`build_pipeline` does it).
        channels_last: channels-last weights and windows (the fast bf16 path on a CPU).
        normalize: z-score the box (off for inputs already normalised, e.g. store crops).
        crop: cut the brain box first (off: the whole input is the box, as for store crops).
        input_dtype: dtype the network's input is cast to after normalisation: float32, or the
            weights' dtype for a network held in bf16 (training under DeepSpeed's bf16 mode).

    Raises:
        ValueError: an unknown layout or precision (and what :class:`SlidingWindow` refuses);
            in the methods, a volume of the wrong shape, NaN/inf values, an all-zero volume
            (with ``crop``) or a constant brain (with ``normalize``).
    """

    def __init__(self, network: nn.Module, patch_size: Sequence[int], n_classes: int,
                 output: str = "softmax", *, label_values: Sequence[int] | None = None,
                 n_channels: int = 1, label_convention: str = "canonical",
                 overlap: float = 0.5, sigma_scale: float = 0.125, mirror: bool = False,
                 window_batch: int = 1, layout: str = "windows", precision: str = "fp32",
                 channels_last: bool = False, normalize: bool = True, crop: bool = True,
                 input_dtype: torch.dtype = torch.float32, stride: int | None = None) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16' (resolve 'auto' first), got "
                             f"{precision!r}")
        self.normalize = BrainZScore()
        self.window = SlidingWindow(network, patch_size, n_classes, overlap=overlap,
                                    sigma_scale=sigma_scale, output=output, mirror=mirror,
                                    window_batch=window_batch, bf16=precision == "bf16",
                                    channels_last=channels_last, stride=stride)
        self.output: str = output
        self.sigmoid: bool = output == "regions"
        self.n_channels: int = int(n_channels)
        self.label_convention: str = str(label_convention)
        self.whole_box: bool = layout == "box"
        self.precision: str = precision
        self.zscore: bool = bool(normalize)
        self.crop: bool = bool(crop)
        self.input_dtype: torch.dtype = input_dtype
        if label_values is None:
            label_values = range(n_classes if output == "softmax" else 4)
        self.register_buffer("label_lut", torch.tensor(list(label_values), dtype=torch.uint8))

    def _checked(self, x: Tensor) -> Tensor:
        if x.dim() != 5 or x.size(0) != 1 or x.size(1) != self.n_channels:
            raise ValueError("expected one raw volume of shape (1, " + str(self.n_channels)
                             + ", D, H, W), got " + str(list(x.shape)))
        x = x.to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("the volume holds NaN or infinite values")
        return x

    def _brain_box(self, x: Tensor) -> list[int]:
        """[d0, d1, h0, h1, w0, w1]: half-open box of voxels non-zero in any channel (the whole
        volume without ``crop``)."""
        if not self.crop:
            return [0, x.size(2), 0, x.size(3), 0, x.size(4)]
        brain = (x[0] != 0).any(dim=0)
        profiles = [brain.any(dim=2).any(dim=1), brain.any(dim=2).any(dim=0),
                    brain.any(dim=1).any(dim=0)]
        box: list[int] = []
        for profile in profiles:
            index = torch.nonzero(profile).flatten()
            if index.numel() == 0:
                raise ValueError("the image is all zero: no brain voxels to segment")
            box.append(int(index[0]))
            box.append(int(index[-1]) + 1)
        return box

    def _box_probabilities(self, x: Tensor) -> tuple[Tensor, list[int]]:
        """Network probabilities (1, n_classes, d, h, w) float32 on the brain box, and the box."""
        box = self._brain_box(x)
        if self.crop:
            # contiguous(): the memory layout of a numpy crop, so the z-score reduces in the
            # same order as it always has (bit-identical inputs to the network).
            x = x[:, :, box[0]:box[1], box[2]:box[3], box[4]:box[5]].contiguous()
        if self.zscore:
            x = self.normalize(x)
        x = x.to(self.input_dtype)
        if self.whole_box:
            return self.window.whole(x), box
        return self.window(x), box

    def _regions(self, probs: Tensor) -> Tensor:
        if self.sigmoid:
            return probs
        return torch.stack([probs[1] + probs[2] + probs[3], probs[1] + probs[3], probs[3]])

    @torch.jit.export
    def segment(self, x: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        """Raw (1, C, D, H, W) -> (labels (1, D, H, W) uint8 in ``label_values``, probabilities
        (1, n_classes, d, h, w) float32 on the brain box, the box [d0, d1, h0, h1, w0, w1])."""
        x = self._checked(x)
        with torch.no_grad():
            probs, box = self._box_probabilities(x)
            canonical = probabilities_to_labels(probs, self.output)
            labels = torch.zeros([1, x.size(2), x.size(3), x.size(4)], dtype=torch.uint8,
                                 device=x.device)
            lut = self.label_lut.to(canonical.device)
            labels[0, box[0]:box[1], box[2]:box[3], box[4]:box[5]] = lut[canonical.long()]
        return labels, probs, box

    def forward(self, x: Tensor) -> Tensor:
        """Raw (1, C, D, H, W) -> uint8 labels (1, D, H, W) in ``label_values``."""
        return self.segment(x)[0]

    @torch.jit.export
    def probabilities(self, x: Tensor) -> Tensor:
        """Raw (1, C, D, H, W) -> WT, TC, ET probabilities (1, 3, D, H, W) float32, 0 outside
        the brain box."""
        x = self._checked(x)
        with torch.no_grad():
            probs, box = self._box_probabilities(x)
            out = torch.zeros([1, 3, x.size(2), x.size(3), x.size(4)], dtype=torch.float32,
                              device=x.device)
            out[0, :, box[0]:box[1], box[2]:box[3], box[4]:box[5]] = self._regions(probs[0])
        return out


def build_pipeline(network: nn.Module, patch_size: Sequence[int], n_classes: int,
                   output: str = "softmax", settings: InferenceSettings | None = None, *,
                   device: torch.device | str | None = None, n_channels: int = 1,
                   normalize: bool = True, label_values: Sequence[int] | None = None,
                   label_convention: str = "canonical") -> InferencePipeline:
    """An :class:`InferencePipeline` in eval mode for `settings` on `device`.

    Resolves ``settings.precision`` for the device (bf16 + channels-last on a CPU with native
    bf16 when "auto"; see :func:`~mtcmkd.inference.resolve_precision`). The network is put in
    eval mode and, for the CPU bf16 path, its 5D weights are made channels-last in place; it is
    not moved: call ``.to(device)`` on it first.

    Args:
        device: where the network runs; default its parameters' device (CPU without any).
        settings: default :meth:`InferenceSettings.reference`.
    """
    settings = settings or InferenceSettings.reference()
    if device is None:
        first = next(network.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    precision = resolve_precision(settings.precision, device)
    # Channels-last pays off on a CPU (oneDNN's bf16 kernels); on GPUs it was measured slower
    # for these networks (docs/PERFORMANCE.md), so bf16 there is autocast alone.
    channels_last = precision == "bf16" and torch.device(device).type == "cpu"
    network.eval()
    return InferencePipeline(network, patch_size, n_classes, output, label_values=label_values,
                             n_channels=n_channels, label_convention=label_convention,
                             overlap=settings.overlap, sigma_scale=settings.sigma_scale,
                             mirror=settings.mirror, window_batch=settings.window_batch,
                             layout=settings.layout, precision=precision,
                             channels_last=channels_last, normalize=normalize).eval()
