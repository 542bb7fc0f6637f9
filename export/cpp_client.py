"""Build the C++ programs (``export/cpp``) against the libtorch inside the installed torch wheel.

One function per program for the tests, the benchmark and users, so that all three build them
the same way: CMake with ``CMAKE_PREFIX_PATH`` at ``torch.utils.cmake_prefix_path`` (about 15 s
per program on two cores). Both programs share one CMake project, so one build folder serves
both and each call builds only its own target.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .source import ExportError

__all__ = ["AOTI_EXECUTABLE", "CPP_SOURCE", "EXECUTABLE", "build_aoti_runner", "build_cpp_client",
           "cpp_toolchain_missing"]

CPP_SOURCE = Path(__file__).resolve().parent / "cpp"
EXECUTABLE = "mtcmkd_segment"
#: The runner of AOTInductor packages (``export/cpp/aoti_main.cpp``).
AOTI_EXECUTABLE = "mtcmkd_segment_aoti"


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
    """Configure and build ``mtcmkd_segment`` (TorchScript client) in `build_dir`; returns the
    executable's path.

    Re-running reuses CMake's cache, so an up-to-date build costs about a second.

    Raises:
        ExportError: no toolchain, or CMake failed (the message ends with the build log's last
            error line; the full log is in `build_dir`/build-<program>.log).
    """
    return _build(build_dir, EXECUTABLE, jobs)


def build_aoti_runner(build_dir: str | os.PathLike[str], *, jobs: int | None = None) -> Path:
    """Configure and build ``mtcmkd_segment_aoti`` (AOTI package runner) in `build_dir`;
    returns the executable's path. Same folder, cache and errors as :func:`build_cpp_client`."""
    return _build(build_dir, AOTI_EXECUTABLE, jobs)


def _build(build_dir: str | os.PathLike[str], target: str, jobs: int | None) -> Path:
    reason = cpp_toolchain_missing()
    if reason:
        raise ExportError(f"cannot build the C++ client: {reason}")
    import torch

    build = Path(build_dir)
    build.mkdir(parents=True, exist_ok=True)
    log = build / f"build-{target}.log"
    steps = [
        ["cmake", "-S", str(CPP_SOURCE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
         f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        ["cmake", "--build", str(build), "--target", target, "-j",
         str(jobs or os.cpu_count() or 2)],
    ]
    with log.open("w") as sink:
        for step in steps:
            result = subprocess.run(step, stdout=sink, stderr=subprocess.STDOUT, text=True)
            if result.returncode != 0:
                sink.flush()
                lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
                errors = [ln for ln in lines if "error" in ln.lower()] or lines or ["no output"]
                raise ExportError(f"C++ client build failed ({errors[-1].strip()}); log: {log}")
    executable = build / target
    if not executable.is_file():
        raise ExportError(f"C++ client build produced no {executable}; log: {log}")
    return executable
