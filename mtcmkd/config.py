"""Typed run configuration: one frozen dataclass per component, validated once, hashed, dumped.

A run is described by a :class:`RunConfig` with four sections, each a frozen dataclass that
checks its own fields in ``__post_init__`` (types, ranges, names) and raises
:class:`ConfigError` with the full key path in the message, e.g.
``method.kd_temperature: must be > 0 (got -1)``. Checks that involve two sections (the patch
size against the network stride, a method against the output kind) live in
``RunConfig.__post_init__``.

Sources, in order: a YAML file (:func:`load_config`), then ``--set``-style overrides
``section.key=value`` whose values are parsed with ``yaml.safe_load`` (so ``[64,64,64]``,
``null``, ``true`` work). Unknown keys are errors everywhere, never silently ignored.

Fields left at ``None`` mean "the default of the thing they configure" and stay ``None`` in the
config (so a dumped config reads as written and a changed student re-derives its teachers); the
resolved values are the ``effective_*`` properties. Because the dataclasses are frozen, change a
config with :func:`dataclasses.replace`, which validates again.

The module imports no torch: the CLI can load and report a bad config without paying for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from mtcmkd.atomic import atomic_write_text
from mtcmkd.brats import CHANNELS

__all__ = [
    "MODALITIES",
    "ConfigError",
    "DataConfig",
    "MethodConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "config_from_dict",
    "config_hash",
    "dump_config",
    "load_config",
    "to_dict",
]

MODALITIES: tuple[str, ...] = CHANNELS
"""Valid modality names (the store's channel names): t1, t1ce, t2, flair."""

#: Default widths per network kind; equal to mtcmkd.models.DEFAULT_WIDTHS / KDNET_DEFAULT_WIDTHS
#: (duplicated so this module stays torch-free; a test checks that they agree).
DEFAULT_WIDTHS: dict[str, tuple[int, ...]] = {
    "resunet": (32, 64, 128, 256),
    "kdnet": (16, 32, 64, 128, 256),
}

#: MTCM-KD's teacher preference order: a student's teachers are the other modalities, in this
#: order (t1ce student -> flair, t2, t1; t1 student -> flair, t2, t1ce, as in the paper).
_MTCMKD_TEACHER_ORDER: tuple[str, ...] = ("flair", "t2", "t1", "t1ce")

#: Default KD temperature per method (MTCM-KD: 20; KD-Net: 5); methods without KD have none.
_DEFAULT_TEMPERATURE: dict[str, float] = {"mtcmkd": 20.0, "kdnet": 5.0}

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the offending key path."""


# ----------------------------------------------------------------------------- coercion helpers


def _fmt(value: Any) -> str:
    """Show a value in an error message the way a user wrote it (-1.0 -> -1, 'x' -> 'x')."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and normalise it (lists -> tuples,
    ints -> floats for float fields, a mapping -> the section dataclass).

    Strings are accepted for float fields when they parse as a number, because YAML 1.1 (what
    PyYAML implements) reads ``1e-4`` (no dot) as a string.
    """
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            if len(options) < len(get_args(tp)):
                return None
            raise ConfigError(f"{path}: must not be null")
        if len(options) == 1:
            return _coerce(value, options[0], path)
        raise TypeError(f"unsupported annotation {tp}")  # not used by the config classes
    if value is None:
        raise ConfigError(f"{path}: must not be null (expected {_type_name(tp)})")
    if origin is Literal:
        choices = get_args(tp)
        if not isinstance(value, str) or value not in choices:
            raise ConfigError(
                f"{path}: must be one of {', '.join(repr(c) for c in choices)} (got {_fmt(value)})"
            )
        return value
    if origin is tuple:
        args = get_args(tp)
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{path}: expected a list, got {_fmt(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(
                f"{path}: expected a list of {len(args)} values (got {_fmt(tuple(value))})"
            )
        pairs = zip(value, args, strict=True)
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(pairs))
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        return tp.from_dict(value, path)  # type: ignore[attr-defined]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{path}: must be a finite number (got {_fmt(value)})")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported annotation {tp}")
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_fmt(value)}")


class _Section:
    """Shared machinery of the config dataclasses: coerce fields to their annotations, then
    run the section's own ``_validate``. ``_path`` is the section's key path in messages."""

    _path: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _coerce(getattr(self, f.name), hints[f.name], self._key(f.name))
            object.__setattr__(self, f.name, value)
        self._validate()

    def _key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def _validate(self) -> None:
        """Range and cross-field checks of the section (after coercion)."""

    def _require(self, ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{self._key(name)}: {rule} (got {_fmt(getattr(self, name))})")

    @classmethod
    def from_dict(cls, data: Any, path: str | None = None) -> Any:
        """Build the section from a mapping; unknown keys are rejected with the valid ones.

        ``None`` (an empty YAML section such as ``train:``) means all defaults.
        """
        path = cls._path if path is None else path
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {_fmt(data)}")
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        for key in data:
            if key not in names:
                where = f"{path}.{key}" if path else str(key)
                raise ConfigError(f"{where}: unknown key; valid keys: {', '.join(names)}")
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            required = dataclasses.MISSING is f.default and dataclasses.MISSING is f.default_factory
            if required and f.name not in data:
                where = f"{path}.{f.name}" if path else f.name
                raise ConfigError(f"{where}: required key is missing")
        return cls(**dict(data))


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


# ------------------------------------------------------------------------------------ sections


@dataclass(frozen=True, kw_only=True)
class DataConfig(_Section):
    """Where the training patches come from and how they are sampled."""

    _path: ClassVar[str] = "data"

    store: str | None = None
    """Path to the Zarr store written by ``mtcmkd preprocess``; relative paths are taken from
    the working directory. ``None`` is allowed here (``inspect`` needs no data) and is rejected
    by the training command."""
    fold: int = 0
    """Cross-validation fold held out for validation (the store's ``folds`` attribute)."""
    patch_size: tuple[int, int, int] = (128, 128, 128)
    """Training patch (D, H, W) in voxels; every axis a multiple of the network stride."""
    fg_fraction: float = 1 / 3
    """Probability of centring a patch on tumour (nnU-Net's oversampling), in [0, 1]."""
    num_workers: int = 2
    """DataLoader worker processes per rank; 0 loads in the training process."""
    augment: bool = True
    """Random flips and intensity augmentation (the published MTCM-KD used none)."""
    defer_to_device: bool = True
    """Loader returns float16 images and uint8 labels; the casts and the intensity augmentation
    run after the transfer, on the training device (same result, about 2x the patches/s of the
    float32 loader; docs/PERFORMANCE.md). ``false``: everything on the host."""

    def _validate(self) -> None:
        self._require(self.fold >= 0, "fold", "must be >= 0")
        self._require(all(p >= 1 for p in self.patch_size), "patch_size", "must be positive")
        self._require(0.0 <= self.fg_fraction <= 1.0, "fg_fraction", "must be in [0, 1]")
        self._require(self.num_workers >= 0, "num_workers", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class ModelConfig(_Section):
    """The network architecture shared by every network of a method (teachers and student)."""

    _path: ClassVar[str] = "model"

    kind: Literal["resunet", "kdnet"] = "resunet"
    """"resunet": MTCM-KD's residual U-Net with channel attention; "kdnet": KD-Net's plain
    nnU-Net-like U-Net."""
    widths: tuple[int, ...] | None = None
    """Channels per resolution level, full resolution first, the last is the bottleneck.
    ``None``: the kind's default (resunet 32/64/128/256, kdnet 16/32/64/128/256)."""
    output: Literal["softmax", "regions"] = "softmax"
    """"softmax": 4 classes (background, NCR/NETC, ED/SNFH, ET); "regions": 3 nested sigmoid
    outputs WT, TC, ET (the BraTS-winner variant)."""

    @property
    def effective_widths(self) -> tuple[int, ...]:
        """``widths``, or the kind's default when ``None``."""
        return DEFAULT_WIDTHS[self.kind] if self.widths is None else self.widths

    @property
    def n_classes(self) -> int:
        """Output channels per voxel: 4 (softmax classes) or 3 (WT, TC, ET regions)."""
        return 4 if self.output == "softmax" else 3

    @property
    def stride(self) -> int:
        """Total downsampling factor 2**(levels - 1); patch sizes must be multiples of it."""
        return 2 ** (len(self.effective_widths) - 1)

    def _validate(self) -> None:
        if self.widths is None:
            return
        widths = self.widths
        self._require(all(w >= 1 for w in widths), "widths", "every width must be >= 1")
        if self.kind == "resunet":
            # Deep supervision reads the decoder at 1/2 and 1/4 resolution: three decoder levels.
            self._require(len(widths) >= 4, "widths", "resunet needs at least 4 levels")
            # GroupNorm uses 6 groups when 6 divides C, else 4: every block input must divide by
            # one of them, including the decoder's concatenations w[i] + w[i-1].
            sizes = list(widths) + [widths[i] + widths[i - 1] for i in range(1, len(widths))]
            bad = [c for c in sizes if c % 6 and c % 4]
            self._require(
                not bad,
                "widths",
                f"resunet's GroupNorm needs every width and every sum of neighbouring widths "
                f"to divide by 6 or 4 ({', '.join(map(str, bad))} do not); use multiples of 4",
            )
        else:
            # forward_features reads the decoder at 1/2 resolution: two decoder levels.
            self._require(len(widths) >= 3, "widths", "kdnet needs at least 3 levels")


@dataclass(frozen=True, kw_only=True)
class MethodConfig(_Section):
    """Which distillation method runs and its loss weights (METHODS.md has the facts)."""

    _path: ClassVar[str] = "method"

    name: Literal["baseline", "mtcmkd", "kdnet", "barlow"]
    """baseline: the student alone; mtcmkd: 3 unimodal teachers + CDSFL + student, online;
    kdnet: one multimodal teacher, two stages; barlow: single-stage Barlow Twins KD."""
    student_modalities: tuple[str, ...] = ("t1ce",)
    """What the student (the exported network) sees. One modality for baseline, mtcmkd and
    kdnet; one or two for barlow."""
    teacher_modalities: tuple[str, ...] | None = None
    """mtcmkd: one unimodal teacher per entry (default: the other modalities in the order
    flair, t2, t1, t1ce, i.e. flair/t2/t1 for a t1ce student and flair/t2/t1ce for t1);
    kdnet/barlow: the input channels of the one multimodal teacher (default all four);
    baseline: must stay null."""
    preset: Literal["default", "paper"] = "default"
    """mtcmkd's KD scaling: "default" = voxel mean x T^2; "paper" = the authors' code (sum over
    voxels / batch x T, ~1e5 times larger at 128^3). Other methods have no such choice."""
    kd_temperature: float | None = None
    """KD softening temperature T; ``None``: the method's default (mtcmkd 20, kdnet 5)."""
    kd_total_weight: float = 0.15
    """MTCM-KD's P: the teacher weights alpha_i sum to it."""
    cdsfl_weight: float = 0.10
    """MTCM-KD's lambda_c: weight of the CDSFL fusion loss in the teachers' loss (0.08 in the
    authors' final code, 0.10 for the reported results)."""
    seg_weight: float = 0.75
    """MTCM-KD: weight of the student's own segmentation loss once KD is on."""
    ds_weight: float = 0.10
    """Deep-supervision weight: MTCM-KD's student half-resolution head; Barlow's DS CE terms."""
    ds_seg_fraction: float = 0.7
    """MTCM-KD: share of the DS weight for the DS segmentation term; the rest (0.3) goes to
    KD from the CDSFL fusion."""
    kd_start_epoch: int = 1
    """MTCM-KD: first epoch (0-based) with KD; before it the student trains on L_seg alone."""
    performance_metric: Literal["wt", "wt_tc"] = "wt"
    """MTCM-KD teacher performance: whole-tumour Dice, or (WT + TC) / 2 (what the authors used
    for the t1 student)."""
    performance_dice: Literal["patch3d", "slice2d"] = "patch3d"
    """MTCM-KD: how a teacher's Dice (its performance, hence its weight alpha) is measured.
    "patch3d": the 3D hard Dice of each training patch, patches empty in truth and prediction
    skipped (the BraTS reading). "slice2d": the authors' code, the mean over 2D slices with a
    slice empty in both scoring 1, which keeps every teacher near 1 and alpha nearly uniform
    (docs/METHODS.md section 3.2)."""
    kdnet_lambda: float = 0.75
    """KD-Net lambda: L = lambda L_KD + (1 - lambda) L_GT + beta L_KL."""
    kdnet_beta: float = 10.0
    """KD-Net beta: weight of the bottleneck KL term."""
    kdnet_teacher_epochs: int = 1
    """KD-Net stage-1 length: epochs [0, this) train the teacher, the rest the student."""
    barlow_lambda_offdiag: float = 5e-3
    """Barlow Twins redundancy weight on the off-diagonal correlations."""
    barlow_weight: float = 1.0
    """Weight of the Barlow Twins term. The method divides the loss (a sum over the D
    bottleneck channels) by D, so 1.0 puts it on the scale of the segmentation loss."""
    barlow_pool: int | None = 2
    """Average-pool the bottleneck over k^3 blocks before the Barlow Twins loss (fewer, less
    correlated samples); ``None`` uses every bottleneck voxel."""

    @property
    def effective_teacher_modalities(self) -> tuple[str, ...]:
        """The teachers' modalities after defaults; () for baseline."""
        if self.teacher_modalities is not None:
            return self.teacher_modalities
        if self.name == "baseline":
            return ()
        if self.name == "mtcmkd":
            return tuple(m for m in _MTCMKD_TEACHER_ORDER if m not in self.student_modalities)
        return MODALITIES

    @property
    def effective_kd_temperature(self) -> float | None:
        """``kd_temperature`` or the method's default; ``None`` for methods without KD."""
        if self.kd_temperature is not None:
            return self.kd_temperature
        return _DEFAULT_TEMPERATURE.get(self.name)

    def _check_modalities(self, name: str, values: tuple[str, ...]) -> None:
        unknown = [m for m in values if m not in MODALITIES]
        if unknown:
            raise ConfigError(
                f"{self._key(name)}: unknown modality {_fmt(unknown[0])}; valid: "
                f"{', '.join(MODALITIES)}"
            )
        self._require(len(set(values)) == len(values), name, "must not repeat a modality")

    def _validate(self) -> None:
        self._check_modalities("student_modalities", self.student_modalities)
        n_student = len(self.student_modalities)
        if self.name == "barlow":
            self._require(1 <= n_student <= 2, "student_modalities", "barlow needs 1 or 2")
        elif self.name == "baseline":
            # A plain supervised network on any inputs: also the full-modality reference.
            self._require(n_student >= 1, "student_modalities", "baseline needs at least 1")
        else:
            self._require(n_student == 1, "student_modalities", f"{self.name} needs exactly 1")
        if self.teacher_modalities is not None:
            self._check_modalities("teacher_modalities", self.teacher_modalities)
            if self.name == "baseline":
                raise ConfigError(
                    f"{self._key('teacher_modalities')}: baseline has no teachers; leave it "
                    f"null (got {_fmt(self.teacher_modalities)})"
                )
        teachers = self.effective_teacher_modalities
        if self.name != "baseline":
            self._require(len(teachers) >= 1, "teacher_modalities", "needs at least 1")
        if self.name == "mtcmkd":
            shared = [m for m in self.student_modalities if m in teachers]
            if shared:
                raise ConfigError(
                    f"{self._key('teacher_modalities')}: mtcmkd teachers are cross-modal, the "
                    f"student's modality {shared[0]!r} must not be a teacher "
                    f"(got {_fmt(teachers)})"
                )
        # kdnet/barlow: the multimodal teacher may (and by default does) include the student's
        # modalities; that is the published setting of both.
        if self.kd_temperature is not None:
            self._require(self.kd_temperature > 0, "kd_temperature", "must be > 0")
        for name in ("kd_total_weight", "cdsfl_weight", "seg_weight", "ds_weight",
                     "kdnet_beta", "barlow_lambda_offdiag", "barlow_weight"):
            self._require(getattr(self, name) >= 0, name, "must be >= 0")
        self._require(0.0 <= self.ds_seg_fraction <= 1.0, "ds_seg_fraction", "must be in [0, 1]")
        self._require(0.0 <= self.kdnet_lambda <= 1.0, "kdnet_lambda", "must be in [0, 1]")
        self._require(self.kd_start_epoch >= 0, "kd_start_epoch", "must be >= 0")
        self._require(self.kdnet_teacher_epochs >= 0, "kdnet_teacher_epochs", "must be >= 0")
        if self.name == "kdnet":
            # Stage 2 distils from the stage-1 teacher: with no stage 1 it would be untrained.
            self._require(self.kdnet_teacher_epochs >= 1, "kdnet_teacher_epochs",
                          "kdnet needs >= 1 (stage 1 trains the teacher)")
        if self.barlow_pool is not None:
            self._require(self.barlow_pool >= 1, "barlow_pool", "must be >= 1 or null")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(_Section):
    """Optimisation, precision, parallelism, checkpoints and logging of the training loop."""

    _path: ClassVar[str] = "train"

    epochs: int = 25
    """Number of epochs; an epoch is ``iters_per_epoch`` optimiser steps."""
    iters_per_epoch: int = 250
    """Optimiser steps per epoch (each of ``grad_accum`` micro-batches)."""
    batch_size: int = 1
    """Patches per micro-batch per rank (global batch = batch_size x grad_accum x ranks)."""
    lr: float = 1e-4
    """Adam learning rate of every parameter group."""
    weight_decay: float = 0.0
    """Adam(W) weight decay; 0 as published."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; ``None`` disables clipping."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimiser step."""
    seed: int = 0
    """Seed of weights initialisation and patch sampling."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """"auto": bf16 on a GPU that supports it (DeepSpeed's bf16 mode: bf16 weights and
    activations, float32 master weights in the optimiser), else fp32."""
    compile: bool = False
    """``torch.compile`` the method (DeepSpeed's ``engine.compile()``): the networks, CDSFL and
    losses of one step. The first steps pay the compilation (36 s for the baseline on an H200);
    there the baseline's bf16 step then took half the time (docs/PERFORMANCE.md). Needs a C++
    compiler on the CPU."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0..3."""
    val_every: int = 1
    """Validate every this many epochs."""
    val_cases: int | None = None
    """Validate on the first N cases of the held-out fold; ``None``: all of them."""
    ckpt_every: int = 100
    """Checkpoint every this many optimiser steps (and at each epoch end)."""
    keep_last: int = 2
    """Number of step checkpoints kept on disk."""
    log_every: int = 10
    """Log the loss terms every this many optimiser steps."""
    plateau_patience: int = 5
    """ReduceLROnPlateau patience (epochs) on the student's validation mean Dice (as 1 - Dice).

    The published code watches the validation loss; we watch the BraTS Dice the run is selected
    on, which every method computes the same way (docs/METHODS.md)."""
    plateau_factor: float = 0.1
    """ReduceLROnPlateau factor applied to the student's learning rate."""
    plateau_start_epoch: int = 4
    """First epoch at which the plateau scheduler may act (the authors' 4)."""
    tensorboard: bool = False
    """Also write TensorBoard event files."""

    def _validate(self) -> None:
        for name in ("epochs", "iters_per_epoch", "batch_size", "grad_accum", "val_every",
                     "ckpt_every", "keep_last", "log_every"):
            self._require(getattr(self, name) >= 1, name, "must be >= 1")
        self._require(self.lr > 0, "lr", "must be > 0")
        self._require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        if self.grad_clip is not None:
            self._require(self.grad_clip > 0, "grad_clip", "must be > 0 or null")
        self._require(0 <= self.zero_stage <= 3, "zero_stage", "must be 0, 1, 2 or 3")
        if self.val_cases is not None:
            self._require(self.val_cases >= 1, "val_cases", "must be >= 1 or null")
        self._require(self.plateau_patience >= 0, "plateau_patience", "must be >= 0")
        self._require(0.0 < self.plateau_factor < 1.0, "plateau_factor", "must be in (0, 1)")
        self._require(self.plateau_start_epoch >= 0, "plateau_start_epoch", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class RunConfig(_Section):
    """A whole run: what :func:`load_config` returns and every run folder stores."""

    _path: ClassVar[str] = ""

    name: str = "run"
    """Run name (letters, digits, '.', '_', '-'): names the run folder. From a file without a
    ``name`` key, the file's stem."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig
    """Required: at least ``method.name``."""
    train: TrainConfig = field(default_factory=TrainConfig)

    def _validate(self) -> None:
        self._require(bool(_NAME_PATTERN.match(self.name)), "name",
                      "must be letters, digits, '.', '_' or '-', starting with a letter or digit")
        stride = self.model.stride
        if any(p % stride for p in self.data.patch_size):
            raise ConfigError(
                f"data.patch_size: every axis must be a multiple of the network stride {stride} "
                f"(2**(len(model.widths) - 1)) (got {_fmt(self.data.patch_size)})"
            )
        method = self.method
        if method.name == "kdnet":
            if self.model.output == "regions":
                raise ConfigError(
                    "model.output: kdnet's losses are defined on softmax classes (the teacher's "
                    "softmax soft targets); use 'softmax' with kdnet (got 'regions')"
                )
            if method.kdnet_teacher_epochs >= self.train.epochs:
                raise ConfigError(
                    f"method.kdnet_teacher_epochs: stage 1 must end before train.epochs "
                    f"({self.train.epochs}) so the student trains "
                    f"(got {method.kdnet_teacher_epochs})"
                )
        if method.name == "barlow":
            bottleneck = [p // stride for p in self.data.patch_size]
            pool = method.barlow_pool or 1
            if any(b % pool for b in bottleneck):
                raise ConfigError(
                    f"method.barlow_pool: must divide the bottleneck size {_fmt(tuple(bottleneck))}"
                    f" (data.patch_size / {stride}) (got {pool})"
                )
            samples = self.train.batch_size
            for b in bottleneck:
                samples *= b // pool
            if samples < 2:
                raise ConfigError(
                    f"method.barlow_pool: the Barlow Twins loss needs >= 2 samples per batch, "
                    f"this gives {samples} (train.batch_size x pooled bottleneck voxels); use a "
                    f"smaller pool or a larger patch (got {pool})"
                )


# ------------------------------------------------------------------------- load / dump / hash


def config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from plain data (what :func:`to_dict` returns).

    Raises:
        ConfigError: unknown or missing keys, wrong types, invalid values or combinations.
    """
    return RunConfig.from_dict(data, "")


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` (or ``name=value``) override to the raw mapping."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item}: cannot parse the value {text!r} as YAML ({err})") from err
    parts = key.split(".")
    sections = {f.name: f for f in dataclasses.fields(RunConfig)}
    if parts[0] not in sections:
        raise ConfigError(
            f"--set {item}: {parts[0]}: unknown key; valid keys: {', '.join(sections)}"
        )
    section_type = _hints(RunConfig)[parts[0]]
    if not (dataclasses.is_dataclass(section_type) and isinstance(section_type, type)):
        if len(parts) != 1:
            raise ConfigError(f"--set {item}: {parts[0]} is a value, not a section")
        raw[parts[0]] = value
        return
    valid = [f.name for f in dataclasses.fields(section_type)]
    if len(parts) != 2 or parts[1] not in valid:
        raise ConfigError(
            f"--set {item}: {key}: unknown key; valid keys of {parts[0]}: {', '.join(valid)}"
        )
    section = raw.get(parts[0])
    if section is None:
        section = raw[parts[0]] = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{parts[0]}: expected a mapping of keys, got {_fmt(section)}")
    section[parts[1]] = value


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config, apply ``--set`` overrides in order, validate.

    Args:
        path: the YAML file; a missing top-level ``name`` defaults to the file's stem.
        overrides: ``"section.key=value"`` strings (``"train.lr=3e-4"``,
            ``"data.patch_size=[64,64,64]"``); values are parsed with ``yaml.safe_load``.

    Raises:
        ConfigError: missing or unreadable file, invalid YAML, unknown keys (the message names
            the full key path and the valid keys), wrong types or values, invalid combinations.
            The message starts with the file path.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: no such config file") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from err
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from err
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {_fmt(raw)}")
    raw.setdefault("name", path.stem)
    try:
        for item in overrides:
            _apply_override(raw, item)
        return config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict of the config (tuples as lists), JSON- and YAML-serialisable, in field
    order; ``config_from_dict(to_dict(cfg)) == cfg``."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def config_hash(cfg: RunConfig) -> str:
    """First 16 hex digits of the SHA-256 of the canonical JSON of :func:`to_dict`.

    Every field counts, ``name`` and logging settings included, and ``None`` fields are hashed
    as written (not resolved): the hash identifies the configuration as stored in a run folder.
    """
    canonical = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def dump_config(cfg: RunConfig, path: str | os.PathLike[str]) -> None:
    """Write the config as YAML (JSON when ``path`` ends in ``.json``), atomically: a reader
    sees the old file or the complete new one, never a partial file."""
    path = Path(path)
    data = to_dict(cfg)
    if path.suffix == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        text = f"# mtcmkd run config, hash {config_hash(cfg)}\n" + yaml.safe_dump(
            data, sort_keys=False, default_flow_style=None
        )
    atomic_write_text(path, text)
