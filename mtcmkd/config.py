"""Typed run configuration: one frozen dataclass per component, validated once, hashed, dumped.

A run is described by a :class:`RunConfig` with four sections, each a frozen dataclass that
checks its own fields in ``__post_init__`` (types, ranges, names) and raises
:class:`ConfigError` with the full key path in the message, e.g.
``method.kd_temperature: must be > 0 (got -1)``. Checks that involve two sections (the patch
size against the network stride, a method against the output kind) live in
``RunConfig.__post_init__`` and in each method's ``check_run``.

The method section holds the method's name, its modalities and the method's own options, a
dataclass that lives next to the method (:mod:`mtcmkd.methods.options`) and is looked up by
name in the method registry (:mod:`mtcmkd.methods.registry`): this module knows no method.

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
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from mtcmkd.atomic import atomic_write_text
from mtcmkd.brats import CHANNELS
from mtcmkd.config_fields import ConfigError, Section, coerce, fmt, hints
from mtcmkd.methods.options import BUILTIN_METHODS, MethodOptions
from mtcmkd.methods.registry import method_names, option_owners, options_class

__all__ = [
    "DEFAULT_WIDTHS",
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
    "preset_names",
    "preset_path",
    "to_dict",
]

MODALITIES: tuple[str, ...] = CHANNELS
"""Valid modality names (the store's channel names): t1, t1ce, t2, flair."""

DEFAULT_WIDTHS: dict[str, tuple[int, ...]] = {
    "resunet": (32, 64, 128, 256),
    "kdnet": (16, 32, 64, 128, 256),
}
"""Default widths per network kind: the one copy, here because this module must stay
torch-free; ``mtcmkd.models`` (``DEFAULT_WIDTHS``, ``KDNET_DEFAULT_WIDTHS``) takes its values
from it."""

COLLECTIVE_TIMEOUT_S = 600.0
"""Default of ``train.collective_timeout_s``: 10 minutes, NCCL's and DeepSpeed's own default."""

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ------------------------------------------------------------------------------------ sections


@dataclass(frozen=True, kw_only=True)
class DataConfig(Section):
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
class ModelConfig(Section):
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
    student_widths: tuple[int, ...] | None = None
    """The student's own widths, for a compact student next to full-size teachers (MTCM-KD
    and baseline; same number of levels as ``widths``). ``None``: the student has ``widths``.
    Written to a config file only when set, so earlier config hashes are unchanged."""

    @property
    def effective_widths(self) -> tuple[int, ...]:
        """``widths``, or the kind's default when ``None``."""
        return DEFAULT_WIDTHS[self.kind] if self.widths is None else self.widths

    @property
    def effective_student_widths(self) -> tuple[int, ...]:
        """``student_widths``, or :attr:`effective_widths` when ``None``."""
        return self.effective_widths if self.student_widths is None else self.student_widths

    def to_flat(self) -> dict[str, Any]:
        """The mapping a file holds under ``model:`` (``student_widths`` only when set)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "student_widths" or self.student_widths is not None}

    @property
    def n_classes(self) -> int:
        """Output channels per voxel: 4 (softmax classes) or 3 (WT, TC, ET regions)."""
        return 4 if self.output == "softmax" else 3

    @property
    def stride(self) -> int:
        """Total downsampling factor 2**(levels - 1); patch sizes must be multiples of it."""
        return 2 ** (len(self.effective_widths) - 1)

    def _validate(self) -> None:
        if self.student_widths is not None:
            self._require(len(self.student_widths) == len(self.effective_widths),
                          "student_widths", f"needs as many levels as model.widths "
                          f"({len(self.effective_widths)}): the patch stride and the deep "
                          "supervision heads are shared")
            self._check_widths("student_widths", self.student_widths)
        if self.widths is not None:
            self._check_widths("widths", self.widths)

    def _check_widths(self, key: str, widths: tuple[int, ...]) -> None:
        self._require(all(w >= 1 for w in widths), key, "every width must be >= 1")
        if self.kind == "resunet":
            # Deep supervision reads the decoder at 1/2 and 1/4 resolution: three decoder levels.
            self._require(len(widths) >= 4, key, "resunet needs at least 4 levels")
            # GroupNorm uses 6 groups when 6 divides C, else 4: every block input must divide by
            # one of them, including the decoder's concatenations w[i] + w[i-1].
            sizes = list(widths) + [widths[i] + widths[i - 1] for i in range(1, len(widths))]
            bad = [c for c in sizes if c % 6 and c % 4]
            self._require(
                not bad,
                key,
                f"resunet's GroupNorm needs every width and every sum of neighbouring widths "
                f"to divide by 6 or 4 ({', '.join(map(str, bad))} do not); use multiples of 4",
            )
        else:
            # forward_features reads the decoder at 1/2 resolution: two decoder levels.
            self._require(len(widths) >= 3, key, "kdnet needs at least 3 levels")


def _flat_layout_v1() -> dict[str, Any]:
    """Every option key of the built-in methods with its default, in their order.

    The method section was one flat dataclass (the union of the four methods' options) until
    the options moved next to the methods, and the config hash of every existing run, its
    checkpoints and its student files was computed over that layout. So :func:`to_dict` still
    writes it: the chosen method's options, and every other built-in option at its default.
    Reading such a file back accepts those keys at those defaults (they change nothing).
    """
    layout: dict[str, Any] = {}
    for options in BUILTIN_METHODS:
        for f in dataclasses.fields(options):
            # Two methods sharing a key must share its default, or the layout is ambiguous.
            assert layout.get(f.name, f.default) == f.default, f"{f.name}: two defaults"
            layout[f.name] = f.default
    return layout


_FLAT_LAYOUT_V1: dict[str, Any] = _flat_layout_v1()


def _is_layout_default(key: str, value: Any) -> bool:
    """Whether ``method.<key>: value`` is an entry of the v1 layout at its default."""
    if key not in _FLAT_LAYOUT_V1:
        return False
    owner = next(o for o in BUILTIN_METHODS if key in o.field_names())
    try:
        return coerce(value, hints(owner)[key], f"method.{key}") == _FLAT_LAYOUT_V1[key]
    except ConfigError:
        return False


@dataclass(frozen=True, kw_only=True)
class MethodConfig(Section):
    """Which method runs, what its networks see, and the method's own options.

    In a file the options sit flat next to the name (``method: {name: mtcmkd,
    kd_total_weight: 0.15}``); :meth:`from_dict` hands each key to the chosen method's options
    class. A key of another method is an error naming that method, except at the default the
    v1 layout writes (see :func:`_flat_layout_v1`).
    """

    _path: ClassVar[str] = "method"
    _COMMON: ClassVar[tuple[str, ...]] = ("name", "student_modalities", "teacher_modalities",
                                          "teachers_from", "teacher_precision")
    # Written to a file only when not at their default (see to_flat), so the hash of every run
    # without them (every run before they existed) stays what it was.
    _WRITTEN_WHEN_SET: ClassVar[dict[str, Any]] = {"teachers_from": None,
                                                   "teacher_precision": "fp32"}

    name: str
    """A registered method: baseline (the student alone), mtcmkd (3 unimodal teachers + CDSFL
    + student, online), kdnet (one multimodal teacher, two stages), barlow (single-stage Barlow
    Twins KD); docs/METHODS.md."""
    student_modalities: tuple[str, ...] = ("t1ce",)
    """What the student (the exported network) sees; how many the method allows is its
    ``student_count`` (one for mtcmkd and kdnet, one or two for barlow, any for baseline)."""
    teacher_modalities: tuple[str, ...] | None = None
    """mtcmkd: one unimodal teacher per entry (default: the other modalities in the order
    flair, t2, t1, t1ce); kdnet/barlow: the input channels of the one multimodal teacher
    (default all four); baseline: must stay null."""
    teachers_from: str | None = None
    """Offline teachers: a finished run folder whose converged teachers this run loads, frozen,
    instead of training its own (methods with teachers only). A teacher is taken from the
    source's network of the same name, or from the student of a source run whose student
    modalities are exactly the teacher's (e.g. a T1ce baseline run as a T1ce teacher). The
    source must share this run's store, and must not have trained on this run's validation or
    test cases. ``null``: the teachers train in this run (online), as each method publishes."""
    teacher_precision: Literal["fp32", "bf16"] = "fp32"
    """How the frozen offline teachers (``teachers_from``) run their forward passes: "fp32",
    or "bf16": bfloat16 autocast with channels-last-3d inputs, about 2x cheaper on a CPU with
    native bf16 (AVX512-BF16, AMX) or on a GPU, much slower on a CPU without it. The student
    then learns from teacher logits within ~1e-2 of the fp32 ones (docs/PERFORMANCE.md).
    Needs ``teachers_from``: teachers that train in the run keep float32."""
    options: MethodOptions = None  # type: ignore[assignment]  # filled in __post_init__
    """The chosen method's options (its options class, e.g. ``MTCMKDOptions``); ``None`` or a
    mapping on construction: the method's defaults, or built from the mapping."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ConfigError(f"method.name: expected a string, got {fmt(self.name)}")
        options_type = options_class(self.name)
        options: Any = self.options
        if options is None:
            options = options_type()
        elif isinstance(options, Mapping):
            options = options_type.from_dict(options)
        elif type(options) is not options_type:
            raise ConfigError(f"method.options: {type(options).__name__} given for method "
                              f"{self.name!r}, which takes {options_type.__name__}")
        object.__setattr__(self, "options", options)
        super().__post_init__()

    @classmethod
    def from_dict(cls, data: Any, path: str | None = None) -> MethodConfig:
        """Build the section from the flat mapping under ``method:``.

        Raises:
            ConfigError: no ``name``, an unknown name, a key of another method (the message
                names it) or a key of none.
        """
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"method: expected a mapping of keys, got {fmt(data)}")
        if "name" not in data:
            raise ConfigError("method.name: required key is missing")
        name = data["name"]
        if not isinstance(name, str):
            raise ConfigError(f"method.name: expected a string, got {fmt(name)}")
        options_type = options_class(name)
        own = options_type.field_names()
        common: dict[str, Any] = {}
        options: dict[str, Any] = {}
        for key, value in data.items():
            if key in cls._COMMON:
                common[key] = value
            elif key in own:
                options[key] = value
            elif not _is_layout_default(key, value):
                raise _foreign_key_error(name, str(key), value, own)
        return cls(**common, options=options_type.from_dict(options))

    @classmethod
    def known_keys(cls) -> tuple[str, ...]:
        """Every key ``method:`` may hold for some registered method (for ``--set``)."""
        keys = dict.fromkeys(cls._COMMON)
        for name in method_names():
            keys.update(dict.fromkeys(options_class(name).field_names()))
        return tuple(keys)

    def to_flat(self) -> dict[str, Any]:
        """The flat mapping a file holds under ``method:`` (the v1 layout, see
        :func:`_flat_layout_v1`): name, modalities, then the options."""
        data: dict[str, Any] = {
            key: getattr(self, key) for key in self._COMMON
            if key not in self._WRITTEN_WHEN_SET
            or getattr(self, key) != self._WRITTEN_WHEN_SET[key]}
        data.update(_FLAT_LAYOUT_V1)
        data.update({f.name: getattr(self.options, f.name)
                     for f in dataclasses.fields(self.options)})
        return data

    @property
    def effective_teacher_modalities(self) -> tuple[str, ...]:
        """The teachers' modalities after the method's defaults; () for baseline."""
        if self.teacher_modalities is not None:
            return self.teacher_modalities
        return self.options.default_teacher_modalities(self.student_modalities)

    def _check_modalities(self, name: str, values: tuple[str, ...]) -> None:
        unknown = [m for m in values if m not in MODALITIES]
        if unknown:
            raise ConfigError(
                f"{self._key(name)}: unknown modality {fmt(unknown[0])}; valid: "
                f"{', '.join(MODALITIES)}"
            )
        self._require(len(set(values)) == len(values), name, "must not repeat a modality")

    def _validate(self) -> None:
        options = self.options
        self._check_modalities("student_modalities", self.student_modalities)
        low, high = options.student_count
        self._require(low <= len(self.student_modalities) <= high, "student_modalities",
                      f"{self.name} needs {options.student_count_rule()}")
        if self.teacher_modalities is not None:
            self._check_modalities("teacher_modalities", self.teacher_modalities)
            if not options.has_teachers:
                raise ConfigError(
                    f"{self._key('teacher_modalities')}: {self.name} has no teachers; leave "
                    f"it null (got {fmt(self.teacher_modalities)})"
                )
        teachers = self.effective_teacher_modalities
        if options.has_teachers:
            self._require(len(teachers) >= 1, "teacher_modalities", "needs at least 1")
        if self.teachers_from is not None:
            if not (options.has_teachers and options.separate_teachers):
                what = ("has no teachers" if not options.has_teachers
                        else "has no separate teacher networks to load")
                raise ConfigError(
                    f"{self._key('teachers_from')}: {self.name} {what}; leave it null "
                    f"(got {fmt(self.teachers_from)})")
            self._require(isinstance(self.teachers_from, str) and self.teachers_from.strip(),
                          "teachers_from", "must be a run folder (a non-empty path) or null")
        if self.teacher_precision != "fp32" and self.teachers_from is None:
            raise ConfigError(
                f"{self._key('teacher_precision')}: {self.teacher_precision} applies to frozen "
                "offline teachers only; set method.teachers_from, or leave it fp32 "
                "(teachers that train in the run keep float32)")
        options.check_modalities(self.student_modalities, teachers,
                                 offline=self.teachers_from is not None)


def _foreign_key_error(name: str, key: str, value: Any, own: tuple[str, ...]) -> ConfigError:
    """The error for a key under ``method:`` that the chosen method does not take."""
    owners = [m for m in option_owners(key) if m != name]
    if owners:
        which = ("method " if len(owners) == 1 else "methods ") + " and ".join(map(repr, owners))
        return ConfigError(
            f"method.{key}: an option of {which}, not of {name!r}; remove it, or set "
            f"method.name to the method it belongs to (got {fmt(value)})"
        )
    valid = ", ".join((*MethodConfig._COMMON, *own))
    return ConfigError(f"method.{key}: unknown key; valid keys: {valid}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Section):
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
    """Validate (``validation``) every this many epochs; 0: never during training, only the
    final full pass at the end."""
    val_cases: int | None = None
    """Validate on the first N cases of the held-out fold; ``None``: all of them."""
    validation: Literal["patch", "full"] = "patch"
    """What the per-epoch validation runs: "patch", nnU-Net's pseudo Dice (WT/TC/ET Dice of
    the pooled voxels of ``val_patches`` fixed held-out patches; seconds), or "full", the
    sliding window over whole cropped cases (minutes on real cases). A full pass also runs
    at the end of training so that ``best_student.pt`` and the summary carry a real Dice.
    Written to config.yaml only when "full", so the hash of every earlier run stands (those
    ran "full"; resumed with this version they validate on patches)."""
    val_patches: int = 64
    """Patches of the "patch" validation: drawn once per run from the validation cases (fixed
    by ``seed``, foreground-biased as ``data.fg_fraction``), the same every epoch. 64 patches
    of 128^3 took 1.6 s on an H200 (a full pass: 4.7 s per case)."""
    val_full_every: int | None = None
    """With "patch" validation: also run the full pass every this many epochs (reported, not
    used for the best model); ``None``: only at the end."""
    val_overlap: float = 0.5
    """Sliding-window overlap of the full pass, in [0, 1): 0.5 covers each interior voxel with
    8 windows; 0.25 with about 2.4, and took 0.3x the time of 0.5 on a CPU (on a GPU the
    host's share of a pass, reading and scoring, dominates; docs/PERFORMANCE.md)."""
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
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S
    """Seconds a rank waits in one collective (a gradient all-reduce, a barrier) for the other
    ranks before the run fails with the lost rank's host named (docs/SCALING.md). Longer than
    any step, checkpoint or validation imbalance between ranks; a rank that died silently (its
    node off the network) is noticed after this long. Written to config.yaml only when not the
    default, so every earlier run's config hash stands."""

    # Written to a file only when not at their default (see to_flat), so the hash of every run
    # without them (every run before they existed) stays what it was.
    _WRITTEN_WHEN_SET: ClassVar[dict[str, Any]] = {
        "validation": "patch", "val_patches": 64, "val_full_every": None, "val_overlap": 0.5,
        "collective_timeout_s": COLLECTIVE_TIMEOUT_S}

    def to_flat(self) -> dict[str, Any]:
        """The mapping a file holds under ``train:`` (the keys of ``_WRITTEN_WHEN_SET`` only
        when not at their default)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in self._WRITTEN_WHEN_SET
                or getattr(self, f.name) != self._WRITTEN_WHEN_SET[f.name]}

    def _validate(self) -> None:
        for name in ("epochs", "iters_per_epoch", "batch_size", "grad_accum", "ckpt_every",
                     "keep_last", "log_every", "val_patches"):
            self._require(getattr(self, name) >= 1, name, "must be >= 1")
        self._require(self.val_every >= 0, "val_every",
                      "must be >= 0 (0: only the final full validation)")
        if self.val_full_every is not None:
            self._require(self.val_full_every >= 1, "val_full_every", "must be >= 1 or null")
            self._require(self.validation == "patch", "val_full_every",
                          "applies to validation: patch only (validation: full already runs "
                          "the full pass every val_every epochs); set it to null")
        self._require(0.0 <= self.val_overlap < 1.0, "val_overlap", "must be in [0, 1)")
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
        self._require(self.collective_timeout_s > 0, "collective_timeout_s", "must be > 0")


@dataclass(frozen=True, kw_only=True)
class RunConfig(Section):
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
                f"(2**(len(model.widths) - 1)) (got {fmt(self.data.patch_size)})"
            )
        if self.model.student_widths is not None and not self.method.options.compact_student:
            raise ConfigError(
                f"model.student_widths: {self.method.name} needs the student and its teacher "
                "to be the same network (its losses compare their features); use it with "
                f"mtcmkd or baseline (got {fmt(self.model.student_widths)})")
        self.method.options.check_run(self)


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
    section_type = hints(RunConfig)[parts[0]]
    if not (dataclasses.is_dataclass(section_type) and isinstance(section_type, type)):
        if len(parts) != 1:
            raise ConfigError(f"--set {item}: {parts[0]} is a value, not a section")
        raw[parts[0]] = value
        return
    if section_type is MethodConfig:
        valid = list(MethodConfig.known_keys())  # the chosen method checks its own later
    else:
        valid = [f.name for f in dataclasses.fields(section_type)]
    if len(parts) != 2 or parts[1] not in valid:
        raise ConfigError(
            f"--set {item}: {key}: unknown key; valid keys of {parts[0]}: {', '.join(valid)}"
        )
    section = raw.get(parts[0])
    if section is None:
        section = raw[parts[0]] = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{parts[0]}: expected a mapping of keys, got {fmt(section)}")
    section[parts[1]] = value


PRESETS_PACKAGE = "mtcmkd.presets"
"""The shipped configs: ``configs/`` of the repository, installed under this package name."""


def _presets_folder() -> Path | None:
    from importlib import resources

    try:
        folder = resources.files(PRESETS_PACKAGE)
    except ModuleNotFoundError:
        return None
    return Path(str(folder)) if Path(str(folder)).is_dir() else None


def preset_names() -> list[str]:
    """Names of the shipped presets (``mtcmkd``, ``baseline``, ...), sorted."""
    folder = _presets_folder()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder is not None else []


def preset_path(name: str) -> Path | None:
    """The file of preset ``name`` (``"mtcmkd"`` or ``"mtcmkd.yaml"``), or None."""
    folder = _presets_folder()
    if folder is None or "/" in name or "\\" in name:
        return None
    candidate = folder / (name if name.endswith(".yaml") else f"{name}.yaml")
    return candidate if candidate.is_file() else None


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config, apply ``--set`` overrides in order, validate.

    Args:
        path: the YAML file, or the name of a shipped preset (:func:`preset_names`) when no
            such file exists; a missing top-level ``name`` defaults to the file's stem.
        overrides: ``"section.key=value"`` strings (``"train.lr=3e-4"``,
            ``"data.patch_size=[64,64,64]"``); values are parsed with ``yaml.safe_load``.

    Raises:
        ConfigError: missing or unreadable file, invalid YAML, unknown keys (the message names
            the full key path and the valid keys), wrong types or values, invalid combinations.
            The message starts with the file path.
    """
    path = Path(path)
    if not path.exists():
        path = preset_path(str(path)) or path
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        presets = ", ".join(preset_names())
        raise ConfigError(f"{path}: no such config file, nor a preset name (presets: "
                          f"{presets})") from err
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
        raise ConfigError(f"{path}: expected a mapping of sections, got {fmt(raw)}")
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
        if isinstance(value, (MethodConfig, TrainConfig, ModelConfig)):
            return {k: plain(v) for k, v in value.to_flat().items()}
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
