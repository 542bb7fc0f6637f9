"""The whole inference of a student compiled ahead of time with AOTInductor (``.pt2`` package).

The package computes what the TorchScript file computes (``mtcmkd predict --reference`` at the
exported overlap): raw volume of the student's modality in, release label values out, with the
metadata JSON and the weights digest inside. It is the way out of TorchScript (deprecated in the
PyTorch docs since 2.9, runtime warnings since 2.10) for Python
(``torch._inductor.aoti_load_package``) and C++ (``torch::inductor::AOTIModelPackageLoader``,
``export/cpp/aoti_main.cpp``).

``torch.export`` cannot trace the pipeline's Python-side shape arithmetic (a crop to the brain
box whose size is data, a window loop whose length is data, value checks that ``raise``), so
:class:`ExportablePipeline` expresses the same computation in an export-friendly form, without a
single data-dependent tensor size:

- the brain box is six integer tensors (first/last non-zero index per axis, from ``argmax`` over
  the axis profiles), never a slice;
- the z-score runs over the whole volume: outside the box every voxel is zero, so the non-zero
  voxels, hence the mean and the population std, are those of the box;
- the windows are the pipeline's windows (:func:`~mtcmkd.inference.window_starts`, the same
  order) counted in tensors, and a ``while_loop`` runs the network once per window: the window
  is gathered from the normalised volume with index tensors (voxels the pipeline would
  zero-pad read 0; voxels of the volume outside the box are 0 already), its probabilities
  (:meth:`SlidingWindow._predict_windows`, mirrors included) times the Gaussian map are
  ``index_add``-ed into sums over the volume grid; voxels off the grid go to one spare slot;
- blend, labels (:func:`~mtcmkd.inference.probabilities_to_labels`) and the label lookup as the
  pipeline; outside the box background;
- the checks (NaN/inf, all zero, constant brain) are ``torch._assert_async``: they raise at run
  time with the pipeline's messages (Python ``RuntimeError``, C++ ``std::exception``).

Each voxel inside the box receives the same window contributions, in the same order, as in
:class:`~mtcmkd.inference.SlidingWindow`, and the eager :class:`ExportablePipeline` gives the
pipeline's labels exactly (tests/test_export_aoti.py). Compiled, only the kernels differ
(Inductor's fused reductions in the normalisation layers and the float64 statistics round
differently from eager's), so a voxel at a near-tie could change label; :func:`verify_aoti`
requires identical labels on the two volumes of the TorchScript check at export.

The compiled code assumes a C-contiguous float32 input and does not check strides:
:class:`AotiModel` (what :func:`load_aoti` returns) converts its input first.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch._higher_order_ops.while_loop import while_loop

from mtcmkd.atomic import atomic_output
from mtcmkd.inference import InferencePipeline, probabilities_to_labels
from mtcmkd.integrity import WEIGHTS_DIGEST_KEY, warn_unverified, weights_digest
from mtcmkd.messages import first_line
from mtcmkd.student_weights import StudentBundle, resolve_student_path

from .patch_network import network_stride
from .source import ExportError, VerificationError, load_export_source
from .torchscript import (
    METADATA_FILE,
    VerificationCase,
    build_inference_module,
    export_metadata,
    reference_prediction,
    synthetic_volume,
    verification_shapes,
    verification_volumes,
)

__all__ = [
    "AOTI_FORMAT",
    "DIGEST_RECORD",
    "MAX_SIZE",
    "AotiExport",
    "AotiModel",
    "ExportablePipeline",
    "compile_package",
    "export_aoti",
    "load_aoti",
    "package_digest",
    "verify_aoti",
]

AOTI_FORMAT = "mtcmkd-aoti"
#: Largest spatial size (voxels per axis) the package accepts; the smallest is 2.
MAX_SIZE = 1024


class ExportablePipeline(nn.Module):
    """:class:`~mtcmkd.inference.InferencePipeline` (float32, windows) in a form
    ``torch.export`` traces with dynamic D, H, W: raw (1, C, D, H, W) -> uint8 labels
    (1, D, H, W). See the module docstring for how each step maps to the pipeline's.

    Args:
        pipeline: the eager pipeline to mirror; its ``SlidingWindow`` (network, patch, steps,
            Gaussian map, mirrors), label lookup and channel count are shared, not copied.

    Raises:
        ValueError: a pipeline this form does not cover (bf16, the box layout, no crop or no
            z-score).
    """

    def __init__(self, pipeline: InferencePipeline) -> None:
        super().__init__()
        if pipeline.precision != "fp32" or pipeline.whole_box or not pipeline.crop \
                or not pipeline.zscore:
            raise ValueError("the AOTI export covers the float32 windows pipeline with crop "
                             "and z-score (the reference settings)")
        self.window = pipeline.window
        self.register_buffer("label_lut", pipeline.label_lut.clone())
        self.output: str = pipeline.output
        self.n_channels: int = pipeline.n_channels
        self.eps: float = float(pipeline.normalize.eps)

    def _zscore(self, x: Tensor) -> Tensor:
        """BrainZScore's arithmetic, its `raise` as a run-time assert."""
        brain = x != 0
        values = x.to(torch.float64)
        weight = brain.to(torch.float64)
        count = weight.sum(dim=[2, 3, 4], keepdim=True).clamp(min=1.0)
        mean = (values * weight).sum(dim=[2, 3, 4], keepdim=True) / count
        centred = (values - mean) * weight
        std = ((centred * centred).sum(dim=[2, 3, 4], keepdim=True) / count).sqrt()
        has_brain = brain.any(dim=4).any(dim=3).any(dim=2).view(std.shape)
        torch._assert_async(~(has_brain & (std < self.eps)).any(),
                            "constant intensity inside the brain; cannot normalise")
        scaled = centred * (1.0 / std.clamp(min=self.eps))
        return torch.where(brain, scaled, torch.zeros_like(scaled)).to(torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(torch.float32)
        torch._assert_async(torch.isfinite(x).all(), "the volume holds NaN or infinite values")
        brain = (x[0] != 0).any(dim=0)
        profiles = [brain.any(dim=2).any(dim=1), brain.any(dim=2).any(dim=0),
                    brain.any(dim=1).any(dim=0)]
        torch._assert_async(profiles[0].any(),
                            "the image is all zero: no brain voxels to segment")
        x = self._zscore(x)

        sizes = [x.size(2), x.size(3), x.size(4)]
        patch = self.window.patch_size
        # Per axis, as 0-d int64 tensors: box start, the box padded to the patch (the grid the
        # pipeline's windows live on), its zero-padding before the box, and the window count.
        first: list[Tensor] = []
        grid: list[Tensor] = []
        pad_lo: list[Tensor] = []
        count: list[Tensor] = []
        for axis in range(3):
            profile = profiles[axis].to(torch.int64)
            lo = torch.argmax(profile)
            hi = sizes[axis] - torch.argmax(profile.flip(0))
            extent = hi - lo
            pad = torch.clamp(patch[axis] - extent, min=0)
            padded = extent + pad
            first.append(lo)
            grid.append(padded)
            pad_lo.append(torch.div(pad, 2, rounding_mode="floor"))
            # window_starts: 0, step, ... while start + patch < size, then size - patch.
            count.append(torch.div(padded - patch[axis] + self.window.steps[axis] - 1,
                                   self.window.steps[axis], rounding_mode="floor") + 1)
        n_windows = count[0] * count[1] * count[2]

        n_voxels = sizes[0] * sizes[1] * sizes[2]
        flat_x = x[0].reshape(x.size(1), n_voxels)
        offsets = [torch.arange(p, dtype=torch.int64, device=x.device) for p in patch]
        importance = self.window.importance.to(device=x.device, dtype=torch.float32)
        n_classes = self.window.n_classes
        # One spare slot (index n_voxels) takes what falls off the volume grid.
        probs_sum = torch.zeros([n_classes, n_voxels + 1], dtype=torch.float32, device=x.device)
        weight_sum = torch.zeros([n_voxels + 1], dtype=torch.float32, device=x.device)
        index = torch.zeros([], dtype=torch.int64, device=x.device)

        def more(i: Tensor, probs_acc: Tensor, weight_acc: Tensor) -> Tensor:
            return i < n_windows

        def one_window(i: Tensor, probs_acc: Tensor, weight_acc: Tensor
                       ) -> tuple[Tensor, Tensor, Tensor]:
            ids = [torch.div(i, count[1] * count[2], rounding_mode="floor"),
                   torch.remainder(torch.div(i, count[2], rounding_mode="floor"), count[1]),
                   torch.remainder(i, count[2])]
            coords: list[Tensor] = []
            inside: list[Tensor] = []
            for axis in range(3):
                start = torch.minimum(ids[axis] * self.window.steps[axis],
                                      grid[axis] - patch[axis])
                c = first[axis] - pad_lo[axis] + start + offsets[axis]
                coords.append(c)
                inside.append((c >= 0) & (c < sizes[axis]))
            valid = (inside[0][:, None, None] & inside[1][None, :, None]
                     & inside[2][None, None, :]).reshape(-1)
            flat = ((coords[0].clamp(0, sizes[0] - 1) * sizes[1])[:, None, None]
                    + coords[1].clamp(0, sizes[1] - 1)[None, :, None]) * sizes[2] \
                + coords[2].clamp(0, sizes[2] - 1)[None, None, :]
            flat = flat.reshape(-1)
            values = torch.index_select(flat_x, 1, flat)
            values = torch.where(valid[None, :], values, torch.zeros_like(values))
            batch = values.reshape(1, flat_x.size(0), patch[0], patch[1], patch[2])
            probs = self.window._predict_windows(batch)[0] * importance
            target = torch.where(valid, flat, torch.full_like(flat, n_voxels))
            probs_acc = probs_acc.index_add(1, target, probs.reshape(n_classes, -1))
            weight_acc = weight_acc.index_add(0, target, importance.reshape(-1))
            return i + 1, probs_acc, weight_acc

        _, probs_sum, weight_sum = while_loop(more, one_window, (index, probs_sum, weight_sum))

        shape = [n_classes, sizes[0], sizes[1], sizes[2]]
        blended = probs_sum[:, :n_voxels] / weight_sum[:n_voxels].clamp(min=1e-30)
        canonical = probabilities_to_labels(blended.reshape(shape), self.output)
        labels = self.label_lut[canonical.long()]
        box = self._box_mask(profiles)
        return torch.where(box, labels, torch.zeros_like(labels))[None]

    @staticmethod
    def _box_mask(profiles: list[Tensor]) -> Tensor:
        """(D, H, W) bool: inside the bounding box of the non-zero profile entries."""
        spans: list[Tensor] = []
        for profile in profiles:
            hits = profile.to(torch.int64)
            # Inside the box: at or after the first hit and at or before the last one.
            after_first = torch.cumsum(hits, 0) > 0
            before_last = torch.flip(torch.cumsum(torch.flip(hits, [0]), 0), [0]) > 0
            spans.append(after_first & before_last)
        return spans[0][:, None, None] & spans[1][None, :, None] & spans[2][None, None, :]


#: The digest's entry inside the package archive (``<archive>/extra/weights_sha256``).
DIGEST_RECORD = "extra/" + WEIGHTS_DIGEST_KEY


def _dynamic_sizes() -> dict[int, Any]:
    # torch.export specialises a size of 1, so the smallest accepted size is 2.
    return {axis: torch.export.Dim(name, min=2, max=MAX_SIZE)
            for axis, name in ((2, "depth"), (3, "height"), (4, "width"))}


def compile_package(module: ExportablePipeline, out: Path, metadata: dict[str, Any],
                    example_shape: Sequence[int]) -> None:
    """``torch.export`` `module` with dynamic D, H, W and compile it into the package `out`
    (AOTInductor, CPU) with `metadata` as the package metadata ``mtcmkd.json``, then add the
    weights digest of what was compiled (:func:`package_digest`) as :data:`DIGEST_RECORD`.

    Raises:
        ExportError: export or compilation failed (the first line of torch's message).
    """
    example = torch.from_numpy(synthetic_volume(example_shape, module.n_channels, seed=0))[None]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            program = torch.export.export(module, (example,), dynamic_shapes=(_dynamic_sizes(),))
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(out),
                inductor_configs={"aot_inductor.metadata": {METADATA_FILE: json.dumps(metadata)}})
    except Exception as exc:  # torch.export and Inductor raise many error types
        raise ExportError(f"the inference does not compile with AOTInductor "
                          f"({first_line(exc)})") from None
    digest = package_digest(out)
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as archive:
        # Entries live under one top folder (the archive's name at writing time).
        top = archive.namelist()[0].split("/", 1)[0]
        archive.writestr(f"{top}/{DIGEST_RECORD}", digest)


@dataclass(frozen=True)
class AotiExport:
    """A written AOTI package: where, its metadata, the student, seconds to export+compile and
    (with the check) one :class:`~mtcmkd.export.torchscript.VerificationCase` per volume."""

    path: Path
    metadata: dict[str, Any]
    bundle: StudentBundle
    compile_seconds: float
    cases: list[Any]


def export_aoti(source: str | os.PathLike[str], out: str | os.PathLike[str], *,
                labels: str | int = "2021", overlap: float = 0.5, mirror: bool = False,
                check: bool = True,
                progress: Callable[[str], None] | None = None) -> AotiExport:
    """Compile the whole inference of a student into an AOTInductor package, atomically.

    Args:
        source: student weights file or run folder (best_student.pt, else student.pt).
        out: the ``.pt2`` file to write (parents created); replaced only once complete.
        labels, overlap, mirror: fixed into the package, as for the TorchScript export.
        check: reload the package and compare its labels with eager ``predict_volume`` on the
            two volumes of :func:`~mtcmkd.export.torchscript.verification_shapes`.
        progress: called with a short message before each stage.

    Raises:
        ExportError: refused input or options, or a failed compilation.
        VerificationError: (with `check`) labels differ from eager; the file is removed.
    """
    bundle = load_export_source(Path(source))
    pipeline = build_inference_module(bundle, labels, overlap, mirror=mirror)
    module = ExportablePipeline(pipeline).eval()
    metadata = export_metadata(bundle, labels, overlap, mirror=mirror,
                               source=resolve_student_path(Path(source)))
    metadata.update(format=AOTI_FORMAT, max_size=MAX_SIZE, min_size=2,
                    stride=network_stride(bundle.network),
                    aoti_computes="forward only (labels); windows as --reference at the "
                                  "exported overlap")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if progress is not None:
        progress("torch.export + AOTInductor compile")
    with atomic_output(out, suffix=".pt2") as tmp:
        # The example volume spans two windows along one axis, like the verification's first.
        compile_package(module, tmp, metadata, verification_shapes(bundle.patch_size)[0])
    seconds = time.perf_counter() - start
    try:
        cases = verify_aoti(out, bundle, progress=progress) if check else []
    except ExportError as exc:  # the reloaded package is unreadable or fails its digest
        out.unlink(missing_ok=True)
        raise VerificationError(f"{exc}; file removed") from None
    bad = [c for c in cases if not c.ok]
    if bad:
        out.unlink(missing_ok=True)
        case = bad[0]
        raise VerificationError(f"{out}: labels differ from eager inference at volume "
                                f"{case.shape} ({case.n_label_differences} voxel(s)); file "
                                "removed")
    return AotiExport(path=out, metadata=metadata, bundle=bundle, compile_seconds=seconds,
                      cases=cases)


def package_digest(path: str | os.PathLike[str]) -> str:
    """:func:`~mtcmkd.integrity.weights_digest` of the tensors the package's compiled model
    holds, by their original names.

    Inductor keeps one copy of tensors with equal values and drops unused ones (the deep
    supervision heads), so this is not the digest of the student's ``state_dict``; it is what
    the C++ runner recomputes (``extract_constants_map``) and compares with
    :data:`DIGEST_RECORD`.

    Raises:
        ExportError: the archive holds no single compiled model.
    """
    with zipfile.ZipFile(path) as archive:
        libraries = [n for n in archive.namelist() if n.endswith(".so")
                     and "/data/aotinductor/model/" in n]
        if len(libraries) != 1:
            raise ExportError(f"{path}: not an mtcmkd AOTI package (expected one compiled "
                              f"model, found {len(libraries)})")
        with tempfile.TemporaryDirectory(prefix="mtcmkd-aoti-") as folder:
            library = archive.extract(libraries[0], folder)
            runner = torch._C._aoti.AOTIModelContainerRunnerCpu(library, 1)
            return weights_digest(runner.extract_constants_map(False))


def _recorded_digest(path: Path) -> str:
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.split("/", 1)[-1] == DIGEST_RECORD]
        return archive.read(names[0]).decode("utf-8", "replace").strip() if names else ""


class AotiModel:
    """A loaded package as a callable: ``model(x)`` with x (1, C, D, H, W) raw intensities returns
    uint8 labels (1, D, H, W).

    The input is made float32 and C-contiguous first: the compiled code assumes the layout of
    the example it was compiled with and does not check strides, so a Fortran-ordered array
    (what nibabel returns) or a transposed view would give wrong labels silently. Callers of
    ``torch._inductor.aoti_load_package`` directly must do the same.
    """

    def __init__(self, compiled: Any, metadata: dict[str, Any]) -> None:
        self.compiled = compiled
        self.metadata = metadata

    def __call__(self, x: Tensor) -> Tensor:
        return self.compiled(x.to(torch.float32).contiguous())


def load_aoti(path: str | os.PathLike[str]) -> tuple[AotiModel, dict[str, Any]]:
    """Load an AOTI package (CPU) and its metadata, checking the weights digest.

    Returns:
        (the model: ``model(x)`` with x (1, C, D, H, W) returns uint8 labels (1, D, H, W), see
        :class:`AotiModel`; the metadata dict).

    Raises:
        ExportError: missing or unreadable file, no mtcmkd metadata, or weights that differ
            from the digest recorded at export (a damaged file).
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such exported file")
    if not zipfile.is_zipfile(path):
        raise ExportError(f"{path}: not an AOTI package (not a .pt2 archive)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            model = torch._inductor.aoti_load_package(str(path))
        raw = model.get_metadata()
    except Exception as exc:  # the loader raises RuntimeError and friends
        raise ExportError(f"{path}: cannot load the AOTI package ({first_line(exc)})") from None
    try:
        metadata = json.loads(raw.get(METADATA_FILE, ""))
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict) or metadata.get("format") != AOTI_FORMAT:
        raise ExportError(f"{path}: AOTI package without mtcmkd export metadata")
    recorded = _recorded_digest(path)
    if not recorded:
        warn_unverified(path, "AOTI export")
    elif package_digest(path) != recorded:
        raise ExportError(f"{path}: weights do not match the digest recorded at export "
                          f"({WEIGHTS_DIGEST_KEY}; damaged or modified file); export it again")
    return AotiModel(model, metadata), metadata


def verify_aoti(path: str | os.PathLike[str], bundle: StudentBundle, *,
                volumes: Sequence[np.ndarray] | None = None,
                progress: Callable[[str], None] | None = None) -> list[VerificationCase]:
    """Reload the package and compare its labels with eager inference of the same student.

    The settings (labels, overlap, mirror, sigma) come from the package's metadata. The package
    returns labels only, so ``max_probability_difference`` is reported as 0 and ``ok`` means
    identical labels.

    Args:
        volumes: (C, D, H, W) raw volumes; default :func:`synthetic_volume` at the two
            :func:`verification_shapes` of the student's patch size.
    """
    model, metadata = load_aoti(path)
    if volumes is None:
        volumes = verification_volumes(bundle)
    cases = []
    for i, volume in enumerate(volumes):
        if progress is not None:
            progress(f"checking volume {i + 1}/{len(volumes)} {tuple(volume.shape[1:])}")
        x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None]
        start = time.perf_counter()
        labels = model(x)[0].numpy()
        exported_s = time.perf_counter() - start
        start = time.perf_counter()
        ref_labels, _ = reference_prediction(
            bundle, volume, labels=metadata["label_convention"], overlap=metadata["overlap"],
            mirror=metadata["mirror"], sigma_scale=metadata["sigma_scale"])
        eager_s = time.perf_counter() - start
        cases.append(VerificationCase(
            shape=tuple(int(s) for s in volume.shape[1:]), max_probability_difference=0.0,
            labels_equal=bool(labels.dtype == np.uint8 and np.array_equal(labels, ref_labels)),
            n_label_differences=int(np.count_nonzero(labels != ref_labels)),
            seconds_exported=exported_s, seconds_eager=eager_s, tolerance=0.0))
    return cases
