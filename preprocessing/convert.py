"""Convert one raw BraTS case into the store: load, check, crop, normalise, write atomically.

The case is written to the run's own staging folder (`STORE/.staging/<run>/<case_id>`) and
renamed into `STORE/cases/<case_id>` only when complete, so a killed run never leaves a
half-written case where readers look. The layout is documented in docs/STORE.md.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from mtcmkd import nifti_io
from mtcmkd.brats import CHANNELS, REGIONS, release
from mtcmkd.data.store import case_problem
from mtcmkd.lut import LUT_DTYPES, lookup, table_values
from mtcmkd.nifti_io import (
    AFFINE_ATOL_MM,
    InputError,
    NiftiVolume,
    array_view,
    gunzip_nifti,
    inflate,
)

from .discover import CaseSource

#: Foreground coordinates kept per region for patch sampling; plenty for uniform draws.
MAX_FOREGROUND_COORDS = 10_000


class CaseError(Exception):
    """A case cannot be converted. `str()` is the one-line message shown to users."""

    def __init__(self, case_id: str, path: Path | str | None, reason: str):
        self.case_id, self.path, self.reason = case_id, path, reason
        where = f" {path}:" if path is not None else ""
        super().__init__(f"case {case_id}:{where} {reason}")


@dataclass(frozen=True)
class ConvertOptions:
    """Settings of a conversion, identical for all cases of a run."""

    image_dtype: str = "float16"
    chunk: int = 64
    codec: str = "lz4"  # Blosc inner codec: "lz4" (fast patch reads) or "zstd" (smaller)
    clevel: int = 1
    labels_required: bool = True
    raw_root: str = "."
    #: this run's staging folder; "" for `STORE/.staging/<pid>` (the driver gives each run
    #: its own, so two runs never share one)
    staging: str = ""


@dataclass(frozen=True)
class CaseResult:
    case_id: str
    status: str  # "converted", "skipped" (already in the store) or "failed"
    seconds: float = 0.0
    shape: tuple[int, ...] | None = None
    error: str | None = None
    file: str | None = None


#: Old name of :class:`mtcmkd.nifti_io.NiftiVolume` (kept for imports of it).
_Volume = NiftiVolume
# Old names of the reader's helpers, now in mtcmkd.nifti_io (tests and benchmarks import them).
_gunzip, _inflate, _array_view = gunzip_nifti, inflate, array_view


def read_nifti(path: Path, case_id: str, *, max_voxels: int | None = None) -> NiftiVolume:
    """:func:`mtcmkd.nifti_io.read_nifti` for one file of case `case_id`.

    Raises:
        CaseError: unreadable, truncated or corrupt file (the reason says which), naming the
            case and the file.
    """
    try:
        return nifti_io.read_nifti(path, max_voxels=max_voxels)
    except InputError as exc:
        raise CaseError(case_id, path, exc.reason) from None


def _check_volume(vol: NiftiVolume, case_id: str, path: Path, role: str,
                  ref: NiftiVolume | None, ref_role: str | None) -> list[list[int]] | None:
    """Check one file's volume; returns its non-zero box (computed here, while in cache)."""
    if vol.data.ndim != 3:
        raise CaseError(case_id, path, f"expected a 3D volume, got {vol.data.ndim}D shape "
                        f"{tuple(vol.data.shape)}")
    if ref is not None:
        if vol.data.shape != ref.data.shape:
            raise CaseError(case_id, path, f"shape {tuple(vol.data.shape)} differs from "
                            f"{ref_role}'s {tuple(ref.data.shape)}")
        diff = float(np.abs(vol.affine - ref.affine).max())
        if diff > AFFINE_ATOL_MM:
            raise CaseError(case_id, path, f"affine differs from {ref_role}'s "
                            f"(max difference {diff:.3g})")
    if np.issubdtype(vol.data.dtype, np.floating):
        n_bad = int(np.count_nonzero(~np.isfinite(vol.data)))
        if n_bad:
            raise CaseError(case_id, path, f"contains NaN or Inf ({n_bad} voxels)")
    box = nonzero_box(vol.data)
    if role != "seg" and box is None:
        raise CaseError(case_id, path, "all-zero volume")
    return box


def _load_case(source: CaseSource, labels_required: bool
               ) -> tuple[dict[str, np.ndarray], np.ndarray | None, NiftiVolume, dict[str, dict],
                          list[list[int]]]:
    """Load and check all files.

    Returns channels, source seg, reference volume, file records and the union non-zero box.
    """
    info = release(source.release)
    cid = source.case_id
    records: dict[str, dict] = {}
    channels: dict[str, np.ndarray] = {}
    boxes: list[list[list[int]] | None] = []
    if info.four_d:
        path = source.files["image"]
        vol = read_nifti(path, cid)
        records["image"] = {"path": path, "sha256": vol.sha256}
        if vol.data.ndim != 4 or vol.data.shape[3] != len(info.msd_channel_order):
            raise CaseError(cid, path, f"expected a 4D volume with {len(info.msd_channel_order)} "
                            f"channels, got shape {tuple(vol.data.shape)}")
        if np.issubdtype(vol.data.dtype, np.floating) and not np.all(np.isfinite(vol.data)):
            raise CaseError(cid, path, "contains NaN or Inf")
        for i, name in enumerate(info.msd_channel_order):
            channels[name] = vol.data[..., i]
            boxes.append(nonzero_box(channels[name]))
            if boxes[-1] is None:
                raise CaseError(cid, path, f"all-zero volume in channel {i} ({name})")
        ref, ref_role = NiftiVolume(vol.data[..., 0], vol.affine, vol.zooms, vol.sha256), "image"
    else:
        ref, ref_role = None, None
        for role in CHANNELS:
            path = source.files[role]
            vol = read_nifti(path, cid)
            boxes.append(_check_volume(vol, cid, path, role, ref, ref_role))
            records[role] = {"path": path, "sha256": vol.sha256}
            channels[role] = vol.data
            if ref is None:
                ref, ref_role = vol, role
    assert ref is not None
    seg = None
    if "seg" in source.files:
        path = source.files["seg"]
        vol = read_nifti(path, cid)
        boxes.append(_check_volume(vol, cid, path, "seg", ref, ref_role))
        records["seg"] = {"path": path, "sha256": vol.sha256}
        seg = vol.data  # mapped to canonical labels after cropping (cheaper)
    elif labels_required:
        expected = source.folder / (info.file_name(cid, "seg") if not info.four_d else cid)
        raise CaseError(cid, expected, "missing segmentation (labels are required for this "
                        "dataset; pass --labels optional for unlabelled releases)")
    return channels, seg, ref, records, union_box(boxes)


def nonzero_box(volume: np.ndarray) -> list[list[int]] | None:
    """Half-open bounding box `[[lo, hi], ...]` of a volume's non-zero voxels; None if all zero.

    One pass over the volume: an OR (integers) or any (other dtypes) over the outermost axis in
    memory gives the extents of the two inner axes; the outer axis's extent comes from testing
    its slices inward from both ends, which stops at the first non-zero slice.
    """
    # NIfTI data is Fortran-ordered: its transposed view is C-ordered, outermost axis first.
    fortran = volume.flags.f_contiguous and not volume.flags.c_contiguous
    m = volume.T if fortran else volume
    if m.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    if m.dtype.kind in "ui":
        plane = np.bitwise_or.reduce(m, axis=0) != 0
    else:
        plane = np.logical_or.reduce(m != 0, axis=0)
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    if not len(rows):
        return None
    lo = next(i for i in range(m.shape[0]) if np.any(m[i]))
    hi = next(i for i in reversed(range(m.shape[0])) if np.any(m[i])) + 1
    box = [[lo, hi], [int(rows[0]), int(rows[-1]) + 1], [int(cols[0]), int(cols[-1]) + 1]]
    return box[::-1] if fortran else box


def union_box(boxes: list[list[list[int]] | None]) -> list[list[int]]:
    """The bounding box of the union of boxes (None: an empty volume, ignored)."""
    present = [b for b in boxes if b is not None]
    if not present:
        raise ValueError("every volume is all zero")
    return [[min(b[k][0] for b in present), max(b[k][1] for b in present)]
            for k in range(len(present[0]))]


def foreground_bbox(channels: list[np.ndarray], seg: np.ndarray | None) -> list[list[int]]:
    """Half-open bounding box `[[lo, hi], ...]` of voxels non-zero in any channel or the seg."""
    return union_box([nonzero_box(v) for v in [*channels, *([] if seg is None else [seg])]])


def zscore_nonzero(channel: np.ndarray, out: np.ndarray | None = None
                   ) -> tuple[np.ndarray, float, float]:
    """Z-score on the channel's non-zero voxels; zero voxels stay exactly 0.

    Statistics in float64; the result is written into `out` (any float dtype, C-ordered when
    not given) when given. Returns (array, mean, std). Raises ValueError when the brain has a
    constant value.

    Integer volumes of at most 16 bits (BraTS stores int16) take a faster path with the same
    result: the sums in integers (exact), then one look-up table of (v - mean) / std computed in
    float64 and rounded once to the output dtype, as the float path rounds each voxel.
    """
    if out is None:
        out = np.empty(channel.shape, dtype=np.float32)
    if channel.dtype in LUT_DTYPES:
        n = int(np.count_nonzero(channel))
        total = int(channel.sum(dtype=np.int64))
        # int64 holds any sum of 16-bit squares over a volume below 2^33 voxels: exact.
        axes = "abcdefgh"[:channel.ndim]
        squares = int(np.einsum(f"{axes},{axes}->", channel, channel, dtype=np.int64))
        mean = total / n if n else 0.0
        std = math.sqrt(max(n * squares - total * total, 0) / (n * n)) if n else 0.0
        if std < 1e-8:
            raise ValueError("constant intensity inside the brain; cannot normalise")
        table = table_values(channel.dtype)
        table -= mean
        table *= 1.0 / std
        table[0] = 0.0  # entry 0 stands for the value 0: the background stays exactly 0
        lookup(table.astype(out.dtype), channel, out=out)
        return out, mean, std
    channel = np.ascontiguousarray(channel)
    mask = channel != 0
    values = channel[mask].astype(np.float64)
    mean = float(values.mean()) if values.size else 0.0
    std = float(values.std()) if values.size else 0.0
    if std < 1e-8:
        raise ValueError("constant intensity inside the brain; cannot normalise")
    out[...] = 0
    values -= mean
    values *= 1.0 / std
    out[mask] = values
    return out, mean, std


def foreground_coordinates(labels: np.ndarray, case_id: str) -> dict[str, np.ndarray]:
    """At most MAX_FOREGROUND_COORDS voxel coordinates per region, chosen reproducibly per case."""
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    lut = np.zeros(256, dtype=bool)
    out = {}
    for name, values in REGIONS.items():
        lut[:] = False
        lut[list(values)] = True
        flat = np.flatnonzero(lut[labels.reshape(-1)])
        if len(flat) > MAX_FOREGROUND_COORDS:
            flat = flat[np.sort(rng.choice(len(flat), MAX_FOREGROUND_COORDS, replace=False))]
        out[name] = np.stack(np.unravel_index(flat, labels.shape), axis=1).astype(np.int32)
    return out


def _chunks(shape: tuple[int, ...], chunk: int) -> tuple[int, ...]:
    return tuple(min(chunk, s) for s in shape)


def _shards(shape: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[int, ...]:
    # One shard covering the whole array: a multiple of the chunk shape, >= the array shape.
    return tuple(-(-s // c) * c for s, c in zip(shape, chunks, strict=True))


def write_case_group(path: Path, image: np.ndarray, labels: np.ndarray | None,
                     attrs: dict, options: ConvertOptions) -> None:
    """Write one case group at `path` (a fresh directory) in the documented layout."""
    compressor = BloscCodec(cname=options.codec, clevel=options.clevel, shuffle="shuffle")
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    # All channels in one chunk: every training read takes all four (teachers and student see
    # the same voxels), and 4x fewer chunks means 4x less per-chunk overhead in zarr.
    img_chunks = (image.shape[0], *_chunks(image.shape[1:], options.chunk))
    arr = group.create_array("image", shape=image.shape, dtype=image.dtype, chunks=img_chunks,
                             shards=_shards(image.shape, img_chunks), compressors=[compressor],
                             fill_value=0)
    arr[...] = image
    fg_group = group.create_group("foreground")
    if labels is not None:
        lab_chunks = _chunks(labels.shape, options.chunk)
        arr = group.create_array("label", shape=labels.shape, dtype="uint8", chunks=lab_chunks,
                                 shards=_shards(labels.shape, lab_chunks),
                                 compressors=[compressor], fill_value=0)
        arr[...] = labels
        for name, coords in foreground_coordinates(labels, attrs["case_id"]).items():
            fg = fg_group.create_array(name, shape=coords.shape, dtype="int32",
                                       chunks=(max(len(coords), 1), 3), compressors=[compressor],
                                       fill_value=0)
            if len(coords):
                fg[...] = coords
    group.update_attributes(attrs)  # one write of zarr.json (attrs.update writes one per key)


def convert_case(source: CaseSource, store: Path, options: ConvertOptions) -> CaseResult:
    """Convert one case into `store`; never raises for bad input (returns a failed result)."""
    start = time.perf_counter()
    final = store / "cases" / source.case_id
    if final.is_dir() and case_problem(final) is None:
        return CaseResult(source.case_id, "skipped")
    staging_root = Path(options.staging) if options.staging else store / ".staging" / str(
        os.getpid())
    staging = staging_root / source.case_id
    try:
        if source.problem is not None:
            raise CaseError(source.case_id, source.problem_file, source.problem)
        channels, seg, ref, records, bbox = _load_case(source, options.labels_required)
        sl = tuple(slice(lo, hi) for lo, hi in bbox)
        info = release(source.release)
        labels = None
        if seg is not None:
            # The bbox covers every non-zero seg voxel, so checking the crop checks the volume.
            try:
                labels = np.ascontiguousarray(info.map_labels(seg[sl]), dtype=np.uint8)
            except ValueError as exc:
                raise CaseError(source.case_id, records["seg"]["path"], str(exc)) from None
        image = np.empty((len(CHANNELS), *(hi - lo for lo, hi in bbox)), dtype=options.image_dtype)
        norm = {}
        for i, name in enumerate(CHANNELS):
            try:
                # The crop is a view of the Fortran-ordered NIfTI data; the z-score writes the
                # C-ordered store layout.
                _, mean, std = zscore_nonzero(channels[name][sl], out=image[i])
            except ValueError as exc:
                raise CaseError(source.case_id, records.get(name, records.get("image"))["path"],
                                str(exc)) from None
            norm[name] = {"mean": mean, "std": std}
        raw_root = Path(options.raw_root)
        attrs = {
            "case_id": source.case_id,
            "release": info.name,
            "labelled": labels is not None,
            "source_label_convention": {str(k): v for k, v in info.label_names.items()},
            "label_map": {str(k): v for k, v in info.label_map.items()},
            "affine": np.asarray(ref.affine, dtype=float).tolist(),
            "spacing": list(ref.zooms),
            "original_shape": list(ref.data.shape[:3]),
            "crop_bbox": bbox,
            "normalization": norm,
            "source_files": {
                role: {"path": os.path.relpath(rec["path"], raw_root), "sha256": rec["sha256"]}
                for role, rec in records.items()
            },
        }
        if staging.exists():
            shutil.rmtree(staging)
        staging.parent.mkdir(parents=True, exist_ok=True)
        write_case_group(staging, image, labels, attrs, options)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # an incomplete leftover (complete cases were skipped above)
            shutil.rmtree(final)
        os.rename(staging, final)  # atomic on one file system: the case appears complete
        return CaseResult(source.case_id, "converted", time.perf_counter() - start,
                          tuple(image.shape))
    except CaseError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        return CaseResult(source.case_id, "failed", time.perf_counter() - start, error=str(exc),
                          file=None if exc.path is None else str(exc.path))
    except Exception as exc:  # an unexpected failure must not take the other cases down
        shutil.rmtree(staging, ignore_errors=True)
        return CaseResult(source.case_id, "failed", time.perf_counter() - start,
                          error=f"case {source.case_id}: unexpected {type(exc).__name__}: {exc}")
