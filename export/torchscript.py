"""The whole inference of a student as one TorchScript file, for Python and C++ without mtcmkd.

The exported module is :class:`mtcmkd.inference.InferencePipeline` itself, scripted: the one
pipeline `predict` and `evaluate` run, in its float32 reference settings, so a deployment gives
the labels the evaluation measured:

    raw volume (1, C, D, H, W), voxel order of the NIfTI file, not normalised
      -> brain bounding box (voxels non-zero in any channel); outside it: background
      -> z-score on the non-zero voxels of the crop (:class:`~mtcmkd.inference.BrainZScore`)
      -> Gaussian-blended sliding window (:class:`~mtcmkd.inference.SlidingWindow`), any size
      -> canonical labels (:func:`~mtcmkd.inference.probabilities_to_labels`)
      -> label values of the release chosen at export (2021: {0, 1, 2, 4}), uint8 (1, D, H, W)

``probabilities(x)`` returns the WT/TC/ET probabilities (1, 3, D, H, W) float32 of the same run
(0 outside the brain box). What the file holds is described in ``export/README.md``; the
metadata travels inside it as the extra file :data:`METADATA_FILE` (JSON), and the
:func:`~mtcmkd.integrity.weights_digest` of the scripted module's ``state_dict()`` as the extra
file ``weights_sha256``, checked by :func:`load_exported` (and by the C++ client).

TorchScript is deprecated in PyTorch 2.x but still the only format that ``torch::jit::load``
reads from C++ with dynamic control flow (the window loop depends on the volume size); the
deprecation warnings are silenced here, not the errors.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtcmkd import __version__
from mtcmkd.atomic import atomic_output
from mtcmkd.brats import CANONICAL_LABELS, REGIONS, release
from mtcmkd.inference import (
    InferencePipeline,
    InferenceSettings,
    build_pipeline,
    predict_volume,
    to_release_labels,
)
from mtcmkd.integrity import WEIGHTS_DIGEST_KEY, warn_unverified, weights_digest
from mtcmkd.messages import first_line
from mtcmkd.student_weights import StudentBundle, resolve_student_path

from .source import ExportError, frozen_network, load_export_source

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_FILE",
    "ExportResult",
    "InferencePipeline",
    "VerificationCase",
    "build_inference_module",
    "export_metadata",
    "export_torchscript",
    "label_lookup",
    "load_exported",
    "reference_prediction",
    "synthetic_volume",
    "verification_volumes",
    "verification_shapes",
    "verify_export",
]

FORMAT = "mtcmkd-torchscript"
FORMAT_VERSION = 1
#: Name of the JSON metadata inside the TorchScript archive (``_extra_files`` in Python,
#: ``torch::jit::ExtraFilesMap`` in C++).
METADATA_FILE = "mtcmkd.json"
#: Channel order of ``probabilities(x)``.
REGION_ORDER: tuple[str, ...] = ("WT", "TC", "ET")


@contextmanager
def _quiet_jit() -> Iterator[None]:
    """Silence TorchScript's deprecation notices (script/save/load), nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
        yield


def label_lookup(labels: str | int, output: str, n_classes: int) -> list[int]:
    """Release label value of every canonical label the student can predict.

    Args:
        labels: release whose label values the file writes ("2021", "2023", "msd", ...).
        output: "softmax" (canonical labels 0..n_classes-1) or "regions" (canonical 0..3).
        n_classes: network output channels.

    Returns:
        ``lut`` with ``lut[canonical] = release value``.

    Raises:
        ExportError: unknown release, or the student predicts a canonical label the release has
            no value for (resection cavity before 2023).
    """
    try:
        info = release(labels)
    except ValueError as exc:
        raise ExportError(f"--labels: {exc}") from None
    n_labels = n_classes if output == "softmax" else 4
    canonical = np.arange(n_labels)
    try:
        values = info.unmap_labels(canonical)
    except ValueError:
        missing = [f"{c} ({CANONICAL_LABELS.get(c, '?')})" for c in range(n_classes)
                   if c not in info.label_map.values()]
        raise ExportError(f"--labels {info.name}: the student predicts canonical label(s) "
                          f"{', '.join(missing)} that release {info.name} has no value for; "
                          "choose --labels 2023") from None
    return [int(v) for v in values]


def build_inference_module(bundle: StudentBundle, labels: str | int = "2021",
                           overlap: float = 0.5, *, mirror: bool = False,
                           sigma_scale: float = 0.125) -> InferencePipeline:
    """The eager (not yet scripted) inference module of a loaded student.

    Raises:
        ExportError: unknown label convention, a label the release cannot express, or an
            overlap outside [0, 1).
    """
    if not 0.0 <= overlap < 1.0:
        raise ExportError(f"--overlap must be in [0, 1), got {overlap}")
    lut = label_lookup(labels, bundle.output, bundle.n_classes)
    # The reference settings (float32, windows) at the chosen overlap: TorchScript runs
    # float32 only, and C++ users get what `--reference` computes.
    settings = InferenceSettings(overlap=overlap, sigma_scale=sigma_scale, mirror=mirror)
    return build_pipeline(frozen_network(bundle), bundle.patch_size, bundle.n_classes,
                          bundle.output, settings, device="cpu",
                          n_channels=len(bundle.channels), label_values=lut,
                          label_convention=release(labels).name)


def export_metadata(bundle: StudentBundle, labels: str | int, overlap: float, *,
                    mirror: bool = False, sigma_scale: float = 0.125,
                    source: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What a deployment must know without mtcmkd: inputs, label values, provenance."""
    info = release(labels)
    lut = label_lookup(labels, bundle.output, bundle.n_classes)
    meta = bundle.meta
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "modality": bundle.channels[0] if len(bundle.channels) == 1 else None,
        "modalities": list(bundle.channels),
        "input": "float32 (1, C, D, H, W): raw intensities of the modalities, voxel order of "
                 "the NIfTI file (nibabel's array order), not normalised",
        "label_convention": info.name,
        "label_values": {CANONICAL_LABELS[c]: v for c, v in enumerate(lut)},
        "label_names": {str(v): info.label_names.get(v, CANONICAL_LABELS[c])
                        for c, v in enumerate(lut)},
        "regions": {name: sorted({lut[c] for c in members if c < len(lut)})
                    for name, members in REGIONS.items()},
        "probabilities_channels": list(REGION_ORDER),
        "network_output": bundle.output,
        "n_out": bundle.n_classes,  # documented key (export/README.md): its historical name
        "patch_size": list(bundle.patch_size),
        "overlap": float(overlap),
        "sigma_scale": float(sigma_scale),
        "mirror": bool(mirror),
        "mtcmkd_version": meta.get("mtcmkd_version"),
        "exported_with": __version__,
        "torch_version": torch.__version__,
        "config_hash": meta.get("config_hash"),
        "config_name": (meta.get("config") or {}).get("name"),
        "method": ((meta.get("config") or {}).get("method") or {}).get("name"),
        "val_dice": dict(meta.get("val_dice") or {}),
        "step": meta.get("step"),
        "epoch": meta.get("epoch"),
        "source": None if source is None else Path(source).name,
    }


@dataclass(frozen=True)
class ExportResult:
    """A written export: where, what it says about itself, and the student it came from."""

    path: Path
    metadata: dict[str, Any]
    bundle: StudentBundle


def export_torchscript(source: str | os.PathLike[str], out: str | os.PathLike[str], *,
                       labels: str | int = "2021", overlap: float = 0.5, mirror: bool = False,
                       sigma_scale: float = 0.125) -> ExportResult:
    """Script the whole inference of a student and save it, atomically, with its metadata.

    Args:
        source: student weights file or run folder (best_student.pt, else student.pt).
        out: the ``.pt`` file to write (parents created); replaced only once complete.
        labels, overlap, mirror, sigma_scale: fixed into the file.

    Raises:
        ExportError: refused input (see :func:`~mtcmkd.export.source.load_export_source`),
            bad options, or a network TorchScript cannot compile.
    """
    bundle = load_export_source(Path(source))
    module = build_inference_module(bundle, labels, overlap, mirror=mirror,
                                    sigma_scale=sigma_scale)
    metadata = export_metadata(bundle, labels, overlap, mirror=mirror, sigma_scale=sigma_scale,
                               source=resolve_student_path(Path(source)))
    try:
        with _quiet_jit():
            scripted = torch.jit.script(module)
    except Exception as exc:  # TorchScript front-end errors have many types
        first = first_line(exc)
        raise ExportError(f"{source}: the student network does not compile with TorchScript "
                          f"({first})") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = {METADATA_FILE: json.dumps(metadata),
             WEIGHTS_DIGEST_KEY: weights_digest(scripted.state_dict())}
    with atomic_output(out) as tmp, _quiet_jit():
        torch.jit.save(scripted, str(tmp), _extra_files=extra)
    return ExportResult(path=out, metadata=metadata, bundle=bundle)


def load_exported(path: str | os.PathLike[str]) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load an exported file (CPU) and its metadata, the way a deployment does.

    Raises:
        ExportError: the file is missing, not TorchScript, has no mtcmkd metadata, or holds
            weights that differ from its recorded digest (a damaged file). A file exported
            before digests existed loads with a one-line warning.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such exported file")
    extra = {METADATA_FILE: "", WEIGHTS_DIGEST_KEY: ""}
    try:
        with _quiet_jit():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except RuntimeError as exc:
        first = first_line(exc, "unreadable")
        raise ExportError(f"{path}: not a TorchScript file ({first})") from None
    raw = extra[METADATA_FILE]
    text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ExportError(f"{path}: TorchScript file without mtcmkd export metadata "
                          f"({METADATA_FILE})")
    raw_digest = extra[WEIGHTS_DIGEST_KEY]
    recorded = (raw_digest.decode("utf-8", "replace") if isinstance(raw_digest, bytes)
                else str(raw_digest)).strip()
    if not recorded:
        warn_unverified(path, "TorchScript export")
    elif weights_digest(module.state_dict()) != recorded:
        raise ExportError(f"{path}: weights do not match the digest recorded at export "
                          f"({WEIGHTS_DIGEST_KEY}; damaged or modified file); export it again")
    return module, metadata


# --- verification -------------------------------------------------------------------------


def verification_shapes(patch_size: Sequence[int]) -> list[tuple[int, int, int]]:
    """Two volume sizes that exercise every size-dependent branch at modest cost.

    The first brain box spans two windows along the first axis (blending) and is smaller than
    the patch in the other two (padding); the second is smaller than the patch in every axis
    (one padded window); all sizes are odd or off the network stride.
    """
    pd, ph, pw = (int(p) for p in patch_size)
    return [(pd + pd // 2 + 5, ph + 3, pw // 2 + 7), (pd // 2 + 9, ph // 2 + 6, pw + 3)]


def verification_volumes(bundle: StudentBundle) -> list[np.ndarray]:
    """The default check volumes of every whole-inference export: :func:`synthetic_volume` at
    the two :func:`verification_shapes` of the student's patch, one seed each."""
    return [synthetic_volume(shape, len(bundle.channels), seed=i)
            for i, shape in enumerate(verification_shapes(bundle.patch_size))]


def synthetic_volume(shape: Sequence[int], n_channels: int = 1, seed: int = 0) -> np.ndarray:
    """A head-like test volume (C, D, H, W) float32: an ellipsoid "brain" of integer scanner
    intensities with a bright blob, inside a zero background margin of 2 voxels.

    The zero margin makes the brain box smaller than the volume, so crop and uncrop are tested;
    integer values mimic int16 scanner data.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grids = np.meshgrid(*(np.arange(s, dtype=np.float64) for s in shape), indexing="ij")
    radius = [max((s - 4) / 2.0, 1.0) for s in shape]
    centre = [(s - 1) / 2.0 for s in shape]
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radius, strict=True))
    brain = r2 <= 1.0
    blob_centre = [c + r * f for c, r, f in zip(centre, radius, rng.uniform(-0.3, 0.3, 3),
                                                 strict=True)]
    blob = sum(((g - c) / max(r * 0.35, 1.0)) ** 2
               for g, c, r in zip(grids, blob_centre, radius, strict=True))
    channels = []
    for c in range(n_channels):
        smooth = np.sin(grids[0] / 5.0 + c) * np.cos(grids[1] / 7.0) * np.sin(grids[2] / 6.0 + 1)
        values = 500.0 + 120.0 * smooth + 400.0 * np.exp(-blob) + rng.normal(0, 25, shape)
        channels.append(np.where(brain, np.maximum(np.round(values), 1.0), 0.0))
    return np.stack(channels).astype(np.float32)


def reference_prediction(bundle: StudentBundle, volume: np.ndarray, *, labels: str | int,
                         overlap: float, mirror: bool = False, sigma_scale: float = 0.125
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The eager path (``predict_volume``) in the exported module's output form.

    Returns:
        (labels (D, H, W) uint8 in the release convention, WT/TC/ET probabilities
        (3, D, H, W) float32, 0 outside the brain box).
    """
    pred = predict_volume(bundle.network, volume, bundle.patch_size, bundle.n_classes,
                          bundle.output, overlap=overlap, sigma_scale=sigma_scale, mirror=mirror)
    p = pred.probabilities
    regions = p if bundle.output == "regions" else np.stack([p[1] + p[2] + p[3], p[1] + p[3],
                                                             p[3]])
    full = np.zeros((3, *volume.shape[1:]), dtype=np.float32)
    full[(slice(None), *(slice(lo, hi) for lo, hi in pred.bbox))] = regions
    return to_release_labels(pred.labels, labels), full


@dataclass(frozen=True)
class VerificationCase:
    """One volume of :func:`verify_export`: exported file against eager inference.

    ``seconds_exported`` times the file's ``forward`` (labels), ``seconds_eager`` the eager
    ``predict_volume``: the same work, so they compare.
    """

    shape: tuple[int, ...]
    max_probability_difference: float
    labels_equal: bool
    n_label_differences: int
    seconds_exported: float
    seconds_eager: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.labels_equal and self.max_probability_difference <= self.tolerance


def verify_export(path: str | os.PathLike[str], bundle: StudentBundle, *,
                  volumes: Sequence[np.ndarray] | None = None, tolerance: float = 1e-4,
                  progress: Callable[[str], None] | None = None) -> list[VerificationCase]:
    """Reload the saved file and compare it with eager inference of the same student.

    The settings (labels, overlap, mirror, sigma) are read from the file's metadata, so this
    checks the file as a deployment will use it.

    Args:
        path: the exported ``.pt`` file.
        bundle: the student it was exported from (:func:`load_export_source`).
        volumes: (C, D, H, W) raw volumes; default: :func:`synthetic_volume` at the two
            :func:`verification_shapes` of the student's patch size.
        tolerance: largest allowed absolute difference of a WT/TC/ET probability.
        progress: called with a short message before each volume.

    Returns:
        One :class:`VerificationCase` per volume (check ``ok``); nothing is raised for a
        mismatch, so callers can report all cases.
    """
    module, metadata = load_exported(path)
    if volumes is None:
        volumes = verification_volumes(bundle)
    cases = []
    for i, volume in enumerate(volumes):
        if progress is not None:
            progress(f"volume {i + 1}/{len(volumes)} {tuple(volume.shape[1:])}")
        x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None]
        start = time.perf_counter()
        labels = module(x)[0].numpy()
        exported_s = time.perf_counter() - start
        probs = module.probabilities(x)[0].numpy()
        start = time.perf_counter()
        ref_labels, ref_probs = reference_prediction(
            bundle, volume, labels=metadata["label_convention"], overlap=metadata["overlap"],
            mirror=metadata["mirror"], sigma_scale=metadata["sigma_scale"])
        eager_s = time.perf_counter() - start
        cases.append(VerificationCase(
            shape=tuple(int(s) for s in volume.shape[1:]),
            max_probability_difference=float(np.abs(probs - ref_probs).max()),
            labels_equal=bool(labels.dtype == np.uint8 and np.array_equal(labels, ref_labels)),
            n_label_differences=int(np.count_nonzero(labels != ref_labels)),
            seconds_exported=exported_s, seconds_eager=eager_s, tolerance=tolerance))
    return cases
