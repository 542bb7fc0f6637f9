"""Export a trained student for use without mtcmkd: AOTI and TorchScript (Python and C++), ONNX,
.pt2.

One module per format, plus what they share:

    source.py         student weights file or run folder -> StudentBundle, or a one-line refusal
    torchscript.py    the whole inference (crop, z-score, sliding window, labels) in one file;
                      reload-and-compare verification against eager ``predict_volume``
    patch_network.py  the network alone as a torch.export program (.pt2), dynamic sizes
    onnx_export.py    the same program as ONNX, parity-checked with ONNX Runtime
    aoti.py           the same whole inference compiled with AOTInductor (.pt2 package)
    cpp_client.py     builds the C++ programs in cpp/ (read NIfTI, run the TorchScript file or
                      the AOTI package)

The file formats and their contracts: ``export/README.md``.
"""

from __future__ import annotations

from .aoti import export_aoti, load_aoti
from .cpp_client import build_aoti_runner, build_cpp_client, cpp_toolchain_missing
from .onnx_export import export_onnx, missing_onnx_packages
from .patch_network import export_pt2, load_pt2
from .source import ExportError, load_export_source
from .torchscript import (
    METADATA_FILE,
    build_inference_module,
    export_torchscript,
    load_exported,
    verify_export,
)

__all__ = [
    "METADATA_FILE",
    "ExportError",
    "build_aoti_runner",
    "build_cpp_client",
    "build_inference_module",
    "cpp_toolchain_missing",
    "export_aoti",
    "export_onnx",
    "export_pt2",
    "export_torchscript",
    "load_aoti",
    "load_exported",
    "load_export_source",
    "load_pt2",
    "missing_onnx_packages",
    "verify_export",
]
