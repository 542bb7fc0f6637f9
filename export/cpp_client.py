"""Build the C++ client (``export/cpp``) against the libtorch inside the installed torch wheel.

One function for the tests, the benchmark and users, so that all three build it the same way:
CMake with ``CMAKE_PREFIX_PATH`` at ``torch.utils.cmake_prefix_path`` (about 15 s on two cores).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .source import ExportError

__all__ = ["CPP_SOURCE", "EXECUTABLE", "build_cpp_client", "cpp_toolchain_missing"]

CPP_SOURCE = Path(__file__).resolve().parent / "cpp"
EXECUTABLE = "mtcmkd_segment"


def cpp_toolchain_missing() -> str | None:
    """Why the client cannot be built here (no cmake, no C++ compiler, no sources), or None."""
    if not (CPP_SOURCE / "CMakeLists.txt").is_file():
        return f"C++ sources not found at {CPP_SOURCE} (install mtcmkd from a source checkout)"
    if shutil.which("cmake") is None:
        return "cmake not found on PATH"
    compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        return "no C++ compiler found (looked for $CXX, c++, g++, clang++)"
    return None


def build_cpp_client(build_dir: str | os.PathLike[str], *, jobs: int | None = None) -> Path:
    """Configure and build ``mtcmkd_segment`` in `build_dir`; returns the executable's path.

    Re-running reuses CMake's cache, so an up-to-date build costs about a second.

    Raises:
        ExportError: no toolchain, or CMake failed (the message ends with the build log's last
            error line; the full log is in `build_dir`/build.log).
    """
    reason = cpp_toolchain_missing()
    if reason:
        raise ExportError(f"cannot build the C++ client: {reason}")
    import torch

    build = Path(build_dir)
    build.mkdir(parents=True, exist_ok=True)
    log = build / "build.log"
    steps = [
        ["cmake", "-S", str(CPP_SOURCE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
         f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        ["cmake", "--build", str(build), "-j", str(jobs or os.cpu_count() or 2)],
    ]
    with log.open("w") as sink:
        for step in steps:
            result = subprocess.run(step, stdout=sink, stderr=subprocess.STDOUT, text=True)
            if result.returncode != 0:
                sink.flush()
                lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
                errors = [ln for ln in lines if "error" in ln.lower()] or lines or ["no output"]
                raise ExportError(f"C++ client build failed ({errors[-1].strip()}); log: {log}")
    executable = build / EXECUTABLE
    if not executable.is_file():
        raise ExportError(f"C++ client build produced no {executable}; log: {log}")
    return executable
