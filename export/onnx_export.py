"""The student network at patch level as ONNX, checked against eager with ONNX Runtime.

The graph is the ``torch.export`` program of :mod:`.patch_network` (dynamic batch and spatial
sizes, multiples of the stride) converted by PyTorch's dynamo-based ONNX exporter, saved as one
self-contained file (weights inside) with the tiling metadata as the model's
``metadata_props["mtcmkd"]`` (JSON). How an edge runtime tiles with it: ``export/README.md``.

The exporter needs the ``onnx`` and ``onnxscript`` packages and the parity check needs
``onnxruntime``; none of them is a dependency of mtcmkd. :func:`missing_onnx_packages` names the
absent ones so callers can skip or refuse with that message instead of an ImportError.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtcmkd.atomic import atomic_output
from mtcmkd.messages import first_line

from .onnx_norms import onnx_friendly_norms
from .patch_network import (
    PatchExport,
    export_patch_program,
    network_stride,
    parity_shapes,
    patch_metadata,
    raise_on_mismatch,
)
from .source import ExportError, load_export_source

__all__ = [
    "EXPORT_PACKAGES",
    "INSTALL_HINT",
    "ONNX_METADATA_KEY",
    "RUNTIME_PACKAGES",
    "export_onnx",
    "missing_onnx_packages",
    "onnx_parity",
]

#: Packages the dynamo ONNX exporter of torch 2.13 imports (onnx-ir comes with onnxscript).
EXPORT_PACKAGES: tuple[str, ...] = ("onnx", "onnxscript")
#: Package the parity check runs the model with.
RUNTIME_PACKAGES: tuple[str, ...] = ("onnxruntime",)
INSTALL_HINT = "pip install 'onnx>=1.18' 'onnxscript>=0.7' 'onnxruntime>=1.22'"
ONNX_METADATA_KEY = "mtcmkd"


def missing_onnx_packages(check: bool = True) -> list[str]:
    """Names of the packages ONNX export (and, with `check`, its parity check) lacks here."""
    needed = EXPORT_PACKAGES + (RUNTIME_PACKAGES if check else ())
    return [name for name in needed if importlib.util.find_spec(name) is None]


def onnx_parity(path: str | os.PathLike[str], network: torch.nn.Module,
                shapes: list[tuple[int, ...]], seed: int = 0) -> dict[tuple[int, ...], float]:
    """Max |ONNX Runtime logits - eager logits| for random normal inputs of each shape."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    rng = np.random.default_rng(seed)
    parity: dict[tuple[int, ...], float] = {}
    for shape in shapes:
        x = rng.standard_normal(shape).astype(np.float32)
        (got,) = session.run(None, {input_name: x})
        with torch.inference_mode():
            want = network(torch.from_numpy(x)).numpy()
        parity[tuple(shape)] = float(np.abs(np.asarray(got) - want).max())
    return parity


@contextlib.contextmanager
def _exporter_quiet() -> Iterator[None]:
    """Keep the exporter's own noise off the console (its progress lines are `verbose=False`;
    its registry warnings, e.g. "torchvision is not installed", and deprecation warnings are
    not the user's business). A failure still raises with torch's message."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(source: str | os.PathLike[str], out: str | os.PathLike[str], *,
                check: bool = True, tolerance: float = 1e-4) -> PatchExport:
    """Export the student network to one ONNX file and (with `check`) compare it with eager.

    Args:
        source: student weights file or run folder.
        out: ``.onnx`` file to write (replaced only once complete).
        check: run the file with ONNX Runtime on two input shapes and require every logit
            within `tolerance` of eager PyTorch.

    Raises:
        ExportError: missing packages (the message names them and how to install them), refused
            input, export failure, or a parity failure.
    """
    missing = missing_onnx_packages(check)
    if missing:
        raise ExportError(f"ONNX export needs the package(s) {', '.join(missing)}, not "
                          f"installed here ({INSTALL_HINT})")
    bundle = load_export_source(Path(source))
    stride = network_stride(bundle.network)
    metadata: dict[str, Any] = patch_metadata(bundle, stride, "mtcmkd-onnx")
    # ONNX Runtime's float32 normalisation kernels lose ~3e-3 at 128^3: see .onnx_norms.
    program = export_patch_program(bundle, onnx_friendly_norms(bundle.network))
    try:
        with _exporter_quiet():
            onnx_program = torch.onnx.export(program, dynamo=True, input_names=["image"],
                                             output_names=["logits"], verbose=False)
    except Exception as exc:  # the exporter raises many error types
        first = first_line(exc)
        raise ExportError(f"{source}: ONNX conversion failed ({first})") from None
    if onnx_program is None:
        raise ExportError(f"{source}: ONNX conversion returned nothing")
    onnx_program.model.metadata_props[ONNX_METADATA_KEY] = json.dumps(metadata)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out, suffix=".onnx") as tmp:
        # One file with the weights inside (38 MB for the paper's student, far below 2 GB).
        onnx_program.save(str(tmp), external_data=False)
    parity: dict[tuple[int, ...], float] = {}
    if check:
        parity = onnx_parity(out, bundle.network, parity_shapes(bundle, stride))
        raise_on_mismatch(out, parity, tolerance)
    return PatchExport(path=out, metadata=metadata, parity=parity)
