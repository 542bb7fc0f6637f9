"""How a volume is inferred: precision, pass layout, overlap, threads (one typed settings object).

:class:`InferenceSettings` is what `mtcmkd predict` and `evaluate` turn their options into and
what :func:`mtcmkd.inference.build_pipeline` builds a pipeline from. ``InferenceSettings()`` is
the reference: float32, windows of the run's patch, overlap 0.5, Gaussian blending, no mirrors,
one window per network call. That is the result every earlier version of mtcmkd computed, and
what ``mtcmkd predict --reference`` reproduces bit for bit (at the same thread count: reductions
split across threads round differently). :data:`PREDICT_DEFAULTS` are predict's defaults, which
may differ from the reference where the fast path is measured safe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

__all__ = [
    "LAYOUTS",
    "PRECISIONS",
    "PREDICT_DEFAULTS",
    "InferenceSettings",
    "apply_threads",
    "cpu_has_native_bf16",
    "default_threads",
    "resolve_precision",
]

#: "auto": bf16 (autocast, channels-last) on a CPU with native bf16 instructions, float32 on
#: other CPUs and on GPUs; "fp32"; "bf16" (on any device; slow where the CPU emulates it).
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
#: "windows": Gaussian-blended sliding windows of the patch size; "box": one network pass over
#: the brain box padded to the network's stride.
LAYOUTS: tuple[str, ...] = ("windows", "box")


@dataclass(frozen=True)
class InferenceSettings:
    """Everything that decides how one volume is segmented, besides the network.

    Attributes:
        precision: one of :data:`PRECISIONS`; resolved per device by :func:`resolve_precision`.
        layout: one of :data:`LAYOUTS`.
        overlap: fraction of a window shared with its neighbour, in [0, 1) (windows layout).
        mirror: test-time augmentation over the 8 axis flips (8 network passes each).
        sigma_scale: Gaussian blending sigma as a fraction of the patch size.
        window_batch: windows per network call (>= 1; more can change rounding, not results).

    Raises:
        ValueError: a value outside the ranges above.
    """

    precision: str = "fp32"
    layout: str = "windows"
    overlap: float = 0.5
    mirror: bool = False
    sigma_scale: float = 0.125
    window_batch: int = 1

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{self.precision!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if not self.sigma_scale > 0:
            raise ValueError(f"sigma_scale must be > 0, got {self.sigma_scale}")
        if self.window_batch < 1:
            raise ValueError(f"window_batch must be >= 1, got {self.window_batch}")

    @classmethod
    def reference(cls) -> InferenceSettings:
        """The reference result: float32, patch windows, overlap 0.5, Gaussian, no mirrors."""
        return cls()

    @property
    def is_reference(self) -> bool:
        return self == InferenceSettings.reference()

    def with_(self, **changes: object) -> InferenceSettings:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)  # type: ignore[arg-type]


#: `mtcmkd predict`'s defaults: bf16 where the CPU has it natively, windows, overlap 0.5.
#: The layout and overlap stay the reference's until their Dice is measured (issue 17).
PREDICT_DEFAULTS = InferenceSettings(precision="auto")


def cpu_has_native_bf16() -> bool:
    """This CPU has bf16 arithmetic in hardware (x86 AVX512-BF16 or AMX tiles).

    ``torch.backends.cpu.get_cpu_capability()`` only says "AVX512", which CPUs without bf16
    instructions also report (oneDNN then emulates bf16, slower than float32), so the
    instruction sets are asked for by name (``torch.cpu._is_avx512_bf16_supported``,
    ``_is_amx_tile_supported``; private in torch 2.13, hence looked up defensively).
    """
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and bool(probe()):
                return True
        except RuntimeError:
            continue
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """`precision` on `device` -> "fp32" or "bf16".

    "auto" is bf16 on a CPU with native bf16 (:func:`cpu_has_native_bf16`) and fp32 elsewhere,
    GPUs included: `predict` and `evaluate` have always run float32 there (training's
    validation keeps the network's own dtype, bf16 under DeepSpeed's bf16 mode).

    Raises:
        ValueError: `precision` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    return "bf16" if kind == "cpu" and cpu_has_native_bf16() else "fp32"


def default_threads() -> int:
    """Threads for inference: ``OMP_NUM_THREADS`` when set to a positive integer, else the
    cores this process may run on (its CPU affinity, which a container or ``taskset`` limits)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def apply_threads(threads: int | None) -> int:
    """``torch.set_num_threads`` with `threads` (None: :func:`default_threads`); returns it.

    Raises:
        ValueError: `threads` < 1.
    """
    n = default_threads() if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(n)
    return n
