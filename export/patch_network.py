"""The student network alone, at patch level, as a ``torch.export`` program (``.pt2``).

ONNX and ``.pt2`` users get the network, not the whole inference: sliding windows with
data-dependent loops do not fit these graph formats, and an edge runtime tiles with its own
code anyway (recipe in ``export/README.md``). The program takes a normalised batch
(B, C, D, H, W) whose spatial sizes are multiples of the network stride (8 for the default
widths, at least twice the stride) and returns logits (B, n_classes, D, H, W).

``torch.export`` needs the dynamic sizes declared as ``stride * Dim``; it specialises a size of
1 (in units of the stride), so the smallest accepted size is two strides.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtcmkd import __version__
from mtcmkd.atomic import atomic_output
from mtcmkd.integrity import WEIGHTS_DIGEST_KEY, warn_unverified, weights_digest
from mtcmkd.messages import first_line
from mtcmkd.student_weights import StudentBundle

from .source import ExportError, VerificationError, frozen_network, load_export_source

__all__ = [
    "MAX_BATCH",
    "MAX_SIZE",
    "PT2_METADATA_FILE",
    "PatchExport",
    "export_patch_program",
    "export_pt2",
    "load_pt2",
    "network_stride",
    "parity_shapes",
    "patch_metadata",
    "raise_on_mismatch",
]

#: Largest batch and spatial size (voxels) the exported programs accept.
MAX_BATCH = 64
MAX_SIZE = 512
PT2_METADATA_FILE = "mtcmkd.json"


def network_stride(network: torch.nn.Module) -> int:
    """Spatial sizes must be multiples of this (2 ** number of downsamplings)."""
    stride = getattr(network, "size_multiple", None)
    if stride is None:
        widths = getattr(network, "widths", None)
        stride = 2 ** (len(widths) - 1) if widths else 1
    return int(stride)


def patch_metadata(bundle: StudentBundle, stride: int, fmt: str) -> dict[str, Any]:
    """What an edge runtime needs to tile with the patch network (see export/README.md)."""
    meta = bundle.meta
    return {
        "format": fmt,
        "format_version": 1,
        "modalities": list(bundle.channels),
        "input": "float32 (B, C, D, H, W), each channel z-scored on its non-zero voxels "
                 "(mean/std of the brain, 0 outside); D, H, W multiples of the stride, "
                 f"at least {2 * stride}",
        "output": "float32 logits (B, n_out, D, H, W)",  # names the "n_out" key below
        "network_output": bundle.output,
        "n_out": bundle.n_classes,  # documented key (export/README.md): its historical name
        "stride": stride,
        "patch_size": list(bundle.patch_size),
        "sigma_scale": 0.125,
        "recommended_overlap": 0.5,
        "mtcmkd_version": meta.get("mtcmkd_version"),
        "exported_with": __version__,
        "config_hash": meta.get("config_hash"),
        "val_dice": dict(meta.get("val_dice") or {}),
    }


def export_patch_program(bundle: StudentBundle, network: torch.nn.Module | None = None
                         ) -> torch.export.ExportedProgram:
    """``torch.export`` the student with a dynamic batch and dynamic spatial sizes.

    Args:
        bundle: the student.
        network: a variant of the student's network to export instead (e.g. with ONNX-friendly
            normalisations); default the network itself.

    Raises:
        ExportError: the network does not export (the first line of torch's message).
    """
    network = frozen_network(bundle) if network is None else network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    stride = network_stride(network)
    blocks = [max(2, int(p) // stride) for p in bundle.patch_size]
    # Distinct example sizes keep torch.export from treating equal dims as one symbol.
    sizes = [stride * (b + i) for i, b in enumerate(blocks)]
    example = torch.zeros(2, len(bundle.channels), *sizes)
    top = max(2, MAX_SIZE // stride)
    spatial = {axis: stride * torch.export.Dim(name, min=2, max=top)
               for axis, name in ((2, "depth_blocks"), (3, "height_blocks"), (4, "width_blocks"))}
    dynamic = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH), **spatial}
    try:
        return torch.export.export(network, (example,), dynamic_shapes=(dynamic,))
    except Exception as exc:  # torch.export raises many error types
        first = first_line(exc)
        raise ExportError(f"the student network does not export with torch.export ({first})"
                          ) from None


def parity_shapes(bundle: StudentBundle, stride: int) -> list[tuple[int, ...]]:
    """Two input shapes for parity checks: the training patch (batch 1) and a smaller,
    non-cubic one (batch 2)."""
    c = len(bundle.channels)
    patch = tuple(max(2 * stride, int(p)) for p in bundle.patch_size)
    small = tuple(max(2 * stride, (int(p) // 2) // stride * stride) for p in bundle.patch_size)
    small = (small[0] + stride, small[1], small[2] + 2 * stride)
    return [(1, c, *patch), (2, c, *small)]


@dataclass(frozen=True)
class PatchExport:
    """A written patch-level export and its parity against eager (max |logit difference| per
    checked shape; empty when the check was skipped)."""

    path: Path
    metadata: dict[str, Any]
    parity: dict[tuple[int, ...], float]


def _eager_logits(bundle: StudentBundle, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return bundle.network(torch.from_numpy(x)).numpy()


def export_pt2(source: str | os.PathLike[str], out: str | os.PathLike[str], *,
               check: bool = True, tolerance: float = 1e-4) -> PatchExport:
    """Write the patch network as a ``torch.export`` archive (``torch.export.load``-able).

    Raises:
        ExportError: refused input, export failure, or (with `check`) a reloaded program that
            differs from eager by more than `tolerance`.
    """
    bundle = load_export_source(Path(source))
    program = export_patch_program(bundle)
    metadata = patch_metadata(bundle, network_stride(bundle.network), "mtcmkd-pt2")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out, suffix=".pt2") as tmp:
        torch.export.save(program, str(tmp), extra_files={
            PT2_METADATA_FILE: json.dumps(metadata),
            WEIGHTS_DIGEST_KEY: weights_digest(program.state_dict)})
    parity: dict[tuple[int, ...], float] = {}
    if check:
        module, _ = load_pt2(out)
        rng = np.random.default_rng(0)
        for shape in parity_shapes(bundle, metadata["stride"]):
            x = rng.standard_normal(shape).astype(np.float32)
            with torch.inference_mode():
                got = module(torch.from_numpy(x)).numpy()
            parity[shape] = float(np.abs(got - _eager_logits(bundle, x)).max())
        raise_on_mismatch(out, parity, tolerance)
    return PatchExport(path=out, metadata=metadata, parity=parity)


def load_pt2(path: str | os.PathLike[str]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Reload a ``.pt2`` export as a callable module plus its metadata.

    Raises:
        ExportError: the weights differ from the digest recorded at export (a damaged file).
            A file exported before digests existed loads with a one-line warning.
    """
    extra = {PT2_METADATA_FILE: "", WEIGHTS_DIGEST_KEY: ""}
    program = torch.export.load(str(path), extra_files=extra)
    recorded = str(extra[WEIGHTS_DIGEST_KEY] or "").strip()
    if not recorded:
        warn_unverified(path, ".pt2 export")
    elif weights_digest(program.state_dict) != recorded:
        raise ExportError(f"{path}: weights do not match the digest recorded at export "
                          f"({WEIGHTS_DIGEST_KEY}; damaged or modified file); export it again")
    return program.module(), json.loads(extra[PT2_METADATA_FILE] or "{}")


def raise_on_mismatch(path: Path, parity: dict[tuple[int, ...], float], tolerance: float
                       ) -> None:
    """Remove `path` and raise VerificationError unless every shape is within `tolerance`."""
    bad = {shape: diff for shape, diff in parity.items() if not diff <= tolerance}
    if bad:
        shape, diff = next(iter(bad.items()))
        Path(path).unlink(missing_ok=True)
        raise VerificationError(f"{path}: logits differ from eager by {diff:.3g} (> "
                                f"{tolerance:g}) at input shape {shape}; file removed")

