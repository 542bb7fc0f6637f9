"""NIfTI files in and out: the one reader, the one label writer, and the file-name rules.

Every NIfTI file the package reads goes through :func:`read_nifti` (preprocess, predict and
evaluate): the header is checked before any array exists (:mod:`mtcmkd.nifti_header`), a gzip
member is never inflated beyond what the header declares, and the same bytes give the checksum
and the array. Every label volume the package writes goes through :func:`write_label_nifti`
(the reference image's affine and header, written atomically).

A file or folder the user must fix raises :class:`InputError`, whose ``str()`` is the one-line
``<path>: <reason>`` that the commands print. Callers with more context wrap it (preprocessing's
``CaseError`` adds the case id).
"""

from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from mtcmkd import nifti_header
from mtcmkd.atomic import atomic_output
from mtcmkd.messages import first_line

__all__ = [
    "AFFINE_ATOL_MM",
    "NIFTI_EXTENSIONS",
    "InputError",
    "NiftiVolume",
    "array_view",
    "find_nifti",
    "gunzip_nifti",
    "inflate",
    "is_nifti_name",
    "nifti_extension",
    "read_nifti",
    "read_shape",
    "strip_nifti_extension",
    "write_label_nifti",
]

#: Largest difference (mm, any entry of the 4x4 matrix) between two affines taken as one grid:
#: the channels of a case, or a prediction and its truth. Release files agree to 1e-4 mm or
#: better; a reoriented or resampled file is off by millimetres.
AFFINE_ATOL_MM = 1e-2

#: File name endings read as NIfTI, longest first (``.nii.gz`` before ``.nii``).
NIFTI_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")


class InputError(ValueError):
    """A bad input file or folder. ``str()`` is ``<path>: <reason>``, the one-line CLI error.

    Attributes:
        path: the file or folder at fault.
        reason: what is wrong with it, and what to do (one line, without the path).
    """

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


# ------------------------------------------------------------------------------ file names


def is_nifti_name(name: str) -> bool:
    """True for ``*.nii`` and ``*.nii.gz`` (case-sensitive, as the releases write them), except
    hidden names (macOS ``._*`` side files are not images)."""
    return name.endswith(NIFTI_EXTENSIONS) and not name.startswith(".")


def strip_nifti_extension(name: str) -> str:
    """``BraTS2021_00000_t1ce.nii.gz`` -> ``BraTS2021_00000_t1ce``; `name` must be a NIfTI name."""
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]


def nifti_extension(path: Path) -> str:
    """The NIfTI extension of an output path (``.nii.gz`` or ``.nii``, any case).

    Raises:
        ValueError: the name ends otherwise.
    """
    name = path.name.lower()
    for ext in NIFTI_EXTENSIONS:
        if name.endswith(ext):
            return ext
    raise ValueError(f"{path}: output must end in .nii or .nii.gz")


def find_nifti(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``, or None when neither is a file.

    Raises:
        InputError: both are present (which one is meant is ambiguous).
    """
    found = [folder / f"{stem}{ext}" for ext in NIFTI_EXTENSIONS
             if (folder / f"{stem}{ext}").is_file()]
    if len(found) > 1:
        raise InputError(found[0], f"both {found[0].name} and {found[1].name} present; keep one")
    return found[0] if found else None


# ---------------------------------------------------------------------------------- reading


@dataclass
class NiftiVolume:
    """One NIfTI file as read by :func:`read_nifti`.

    Attributes:
        data: the voxel array as nibabel returns it (Fortran order; a read-only view of the
            decompressed bytes when the file has no intensity scaling).
        affine: 4x4 voxel-to-world matrix (mm).
        zooms: voxel size in mm along the first three array axes.
        sha256: hex digest of the file's bytes as stored (compressed when gzipped).
    """

    data: np.ndarray
    affine: np.ndarray
    zooms: tuple[float, ...]
    sha256: str


def read_nifti(path: Path, *, max_voxels: int | None = None) -> NiftiVolume:
    """Read a .nii/.nii.gz once: the same bytes give the checksum and the array.

    The header is checked before any array exists (mtcmkd/nifti_header.py): a header that
    declares more voxels than `max_voxels` (None: `nifti_header.MAX_VOXELS`) or more data than
    the file holds fails here, instead of nibabel allocating the scaled array first.

    Raises:
        InputError: unreadable, truncated or corrupt file (the reason says which).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(path, f"cannot read file ({exc.strerror})") from None
    sha = hashlib.sha256(raw).hexdigest()
    try:
        if path.name.endswith(".gz"):
            try:
                raw = gunzip_nifti(raw, max_voxels)
            except (EOFError, OSError, zlib.error):
                raise InputError(path, "truncated or corrupt gzip data") from None
        layout = nifti_header.parse_header(raw[:nifti_header.HEADER_PREFIX],
                                           max_voxels=max_voxels)
        nifti_header.check_length(layout, len(raw))
    except nifti_header.NiftiHeaderError as exc:
        raise InputError(path, exc.reason) from None
    try:
        img = nib.Nifti1Image.from_bytes(raw)
    except Exception:
        try:
            img = nib.Nifti2Image.from_bytes(raw)
        except Exception:
            raise InputError(path, nifti_header.BAD_HEADER) from None
    try:
        data = array_view(img.dataobj, raw)
        if data is None:
            data = np.asanyarray(img.dataobj)
    except Exception:
        raise InputError(path, nifti_header.TRUNCATED) from None
    return NiftiVolume(data, img.affine, tuple(float(z) for z in img.header.get_zooms()[:3]),
                       sha)


def read_shape(path: Path) -> tuple[int, ...]:
    """The array shape a NIfTI file's header declares; the data are not read (cheap).

    For checking a batch of inputs before the long work starts; truncated data are found later
    by :func:`read_nifti`.

    Raises:
        InputError: not a readable NIfTI file (the first line of nibabel's reason).
    """
    try:
        return tuple(int(s) for s in nib.load(os.fspath(path)).shape)
    except Exception as exc:  # nibabel raises many types for garbage
        reason = first_line(exc)
        raise InputError(path, f"not a readable NIfTI file ({reason})") from None


def gunzip_nifti(data: bytes, max_voxels: int | None = None) -> bytes:
    """Decompress a gzipped NIfTI file held in memory, never beyond what its header needs.

    The header is inflated and checked first; then at most `nifti_header.inflate_limit` bytes
    are inflated, so neither a header declaring gigabytes nor a gzip bomb behind a small
    header costs more memory than the data the header may declare.

    Raises:
        NiftiHeaderError: an invalid header, more voxels than `max_voxels`, or data that inflate
            beyond the header's size plus `nifti_header.TRAILING_SLACK`.
        EOFError, zlib.error: truncated or corrupt gzip data.
    """
    layout = nifti_header.parse_header(inflate(data, nifti_header.HEADER_PREFIX),
                                       max_voxels=max_voxels)
    limit = nifti_header.inflate_limit(layout)
    out = inflate(data, limit + 1)
    if len(out) > limit:
        raise nifti_header.NiftiHeaderError(
            f"gzip data inflate beyond the {layout.end:,} bytes its header declares "
            f"({layout.describe()}): corrupt file or not a single NIfTI volume")
    return out


def inflate(data: bytes, max_length: int) -> bytes:
    """The first `max_length` bytes (or all, if fewer) of the gzip members in `data`.

    Like `gzip.decompress` (several members, zero padding between them), but bounded.

    Raises:
        EOFError: the data end inside a member before `max_length` bytes came out.
        zlib.error: corrupt data or a CRC/length mismatch.
    """
    parts: list[bytes] = []
    total = 0
    while total < max_length:
        member = zlib.decompressobj(31)
        parts.append(member.decompress(data, max_length - total))
        total += len(parts[-1])
        if total >= max_length:
            break
        if not member.eof:
            raise EOFError("gzip data end inside a member")
        data = member.unused_data.lstrip(b"\0")
        if not data:
            break
    return parts[0] if len(parts) == 1 else b"".join(parts)


def array_view(proxy: object, raw: bytes) -> np.ndarray | None:
    """The voxel array as a read-only view of the decompressed bytes, or None.

    nibabel copies the data out of its file object (about 11 ms per BraTS volume); when the
    file has no intensity scaling the bytes already are the array (Fortran order, as nibabel
    returns it). None when scaling applies or the proxy is not a plain ArrayProxy.
    Raises ValueError when the file holds fewer bytes than the header says.
    """
    if not isinstance(proxy, nib.arrayproxy.ArrayProxy) or proxy.order != "F":
        return None
    if float(proxy.slope) != 1.0 or float(proxy.inter) != 0.0:
        return None
    shape = tuple(int(n) for n in proxy.shape)
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(raw, dtype=proxy.dtype, count=count,
                         offset=int(proxy.offset)).reshape(shape, order="F")


# ---------------------------------------------------------------------------------- writing


def write_label_nifti(
    labels: np.ndarray,
    reference_nifti_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    dtype: np.dtype | type = np.uint8,
) -> Path:
    """Write a label volume in the space and header of a reference NIfTI, atomically.

    The output keeps the reference's affine and header: qform and sform (matrices and codes),
    pixdim, xyzt units, orientation; so it overlays the source image in any viewer and the
    challenge portal accepts it. What changes: the data dtype (`dtype`, uint8 by default), the
    shape fields (a 4D reference such as MSD's gives a 3D output), scl_slope/scl_inter (no
    scaling: labels are stored as-is) and cal_min/cal_max (reset, they described the image's
    intensities).

    The file is written to a temporary name in the output folder and renamed into place, so
    `out_path` is either absent/old or complete, never half written.

    Args:
        labels: integer array whose shape is the reference's first three dimensions.
        reference_nifti_path: the case's source image (e.g. its T1ce file).
        out_path: ``.nii.gz`` or ``.nii`` path; parent folders are created.
        dtype: on-disk integer dtype.

    Returns:
        `out_path` as a Path.

    Raises:
        ValueError: shape mismatch, non-integer labels, values that do not fit `dtype`, or a
            bad extension.
    """
    out = Path(out_path)
    ext = nifti_extension(out)
    reference = nib.load(os.fspath(reference_nifti_path))
    if not isinstance(reference, nib.Nifti1Image):
        raise ValueError(f"{reference_nifti_path}: reference must be a NIfTI-1 image")
    data = np.asarray(labels)
    if data.shape != reference.shape[:3]:
        raise ValueError(
            f"labels shape {data.shape} does not match reference {reference_nifti_path} "
            f"shape {reference.shape[:3]}"
        )
    target = np.dtype(dtype)
    if data.dtype.kind not in "uib" or target.kind not in "ui":
        raise ValueError(f"labels must be integers written as an integer dtype, got "
                         f"{data.dtype} -> {target}")
    info = np.iinfo(target)
    if data.size and (data.min() < info.min or data.max() > info.max):
        raise ValueError(f"label values [{data.min()}, {data.max()}] do not fit {target}")

    header = reference.header.copy()
    header.set_data_dtype(target)
    header["cal_min"] = 0
    header["cal_max"] = 0
    image = nib.Nifti1Image(data.astype(target), reference.affine, header)
    # Keep both transforms and their codes exactly (BraTS: qform code 1, sform code 0).
    image.set_qform(reference.header.get_qform(), code=int(reference.header["qform_code"]))
    image.set_sform(reference.header.get_sform(), code=int(reference.header["sform_code"]))
    image.header.set_slope_inter(1.0, 0.0)

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out, suffix=ext) as tmp:
        nib.save(image, os.fspath(tmp))
    return out
