"""NIfTI header sanity and size checks, run before any voxel array is allocated.

A header is 348 (NIfTI-1) or 540 (NIfTI-2) bytes that say how large the data are; nibabel
trusts them and allocates the (scaled) array first, so a 24 KB gzip file whose header claims
1200^3 voxels with `scl_slope` costs gigabytes before it fails as truncated. Every NIfTI reader
of the package (`mtcmkd.nifti_io.read_nifti`, used by preprocess, predict and
evaluate) parses the header here first and checks:

- `dim[0]` in 1..7 and every used `dim[i]` >= 1;
- a known datatype (its size in bytes per voxel);
- `vox_offset` finite, integral, past the header and at most :data:`MAX_VOX_OFFSET`;
- the voxel count at most a limit (:data:`MAX_VOXELS` unless the caller passes another);
- `vox_offset + voxels x bytes per voxel` against the bytes the file really holds (truncated).

:func:`inflate_limit` bounds how far a gzip member may be decompressed for a header: the data
the header declares plus :data:`TRAILING_SLACK`, so a gzip bomb is never inflated fully.
The C++ client (export/cpp/nifti.cpp) applies the same limits.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

#: Largest voxel count a header may declare (2^31, about 1290^3; a BraTS volume has 9e6).
#: Callers pass `max_voxels` to read larger volumes.
MAX_VOXELS = 2**31
#: Largest `vox_offset` (header plus extensions) accepted, in bytes; real extensions are KBs.
MAX_VOX_OFFSET = 2**30
#: Bytes a gzip member may inflate to beyond the end of the data its header declares.
TRAILING_SLACK = 2**20
#: Enough leading bytes of any file to parse a NIfTI-1 or NIfTI-2 header.
HEADER_PREFIX = 540

#: NIfTI datatype code -> (name, bytes per voxel); the codes of nifti1.h that nibabel reads.
DATATYPES: dict[int, tuple[str, int]] = {
    2: ("uint8", 1), 4: ("int16", 2), 8: ("int32", 4), 16: ("float32", 4),
    32: ("complex64", 8), 64: ("float64", 8), 128: ("rgb24", 3), 256: ("int8", 1),
    512: ("uint16", 2), 768: ("uint32", 4), 1024: ("int64", 8), 1280: ("uint64", 8),
    1536: ("float128", 16), 1792: ("complex128", 16), 2048: ("complex256", 32),
    2304: ("rgba32", 4),
}


class NiftiHeaderError(ValueError):
    """The header is invalid or does not fit the file. `reason` is the one-line message
    (without the file name, which the caller adds)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


BAD_HEADER = "not a valid NIfTI file (bad header)"
TRUNCATED = "NIfTI data shorter than its header says (truncated file)"


@dataclass(frozen=True)
class NiftiLayout:
    """Where a file's voxel data lie, from its header.

    Attributes:
        version: 1 or 2 (NIfTI-1 or NIfTI-2).
        shape: the used dims, `dim[1..dim[0]]`.
        datatype: the NIfTI datatype code; `dtype_name`/`bytes_per_voxel` describe it.
        vox_offset: byte offset of the first voxel in the (decompressed) file.
    """

    version: int
    shape: tuple[int, ...]
    datatype: int
    dtype_name: str
    bytes_per_voxel: int
    vox_offset: int

    @property
    def n_voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def data_bytes(self) -> int:
        return self.n_voxels * self.bytes_per_voxel

    @property
    def end(self) -> int:
        """Byte count the file needs: header, extensions and voxel data."""
        return self.vox_offset + self.data_bytes

    def describe(self) -> str:
        """E.g. "1200x1200x1200 int16 (3.46 GB)"."""
        dims = "x".join(str(n) for n in self.shape)
        return f"{dims} {self.dtype_name} ({_size(self.data_bytes)})"


def _size(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{n_bytes} bytes"


def _byte_order(prefix: bytes) -> tuple[int, str]:
    """(version, struct byte order) from `sizeof_hdr`, which is 348 or 540 in either order."""
    if len(prefix) < 4:
        raise NiftiHeaderError(BAD_HEADER)
    for order in "<>":
        size = struct.unpack_from(f"{order}i", prefix)[0]
        if size == 348:
            return 1, order
        if size == 540:
            return 2, order
    raise NiftiHeaderError(BAD_HEADER)


def parse_header(prefix: bytes, *, max_voxels: int | None = None) -> NiftiLayout:
    """Check a header and return its data layout; touches no voxel data.

    Args:
        prefix: the first bytes of the (decompressed) file; :data:`HEADER_PREFIX` suffice.
        max_voxels: the voxel-count limit; None means :data:`MAX_VOXELS`.

    Raises:
        NiftiHeaderError: not a NIfTI header (the message is :data:`BAD_HEADER`), or fields
            that no valid file has (negative dims, unknown datatype, a `vox_offset` inside the
            header, beyond :data:`MAX_VOX_OFFSET` or not finite), or more voxels than the limit.
    """
    version, order = _byte_order(prefix)
    header_size = 348 if version == 1 else 540
    if len(prefix) < header_size:
        raise NiftiHeaderError(BAD_HEADER)
    if version == 1:
        dim = struct.unpack_from(f"{order}8h", prefix, 40)
        datatype = struct.unpack_from(f"{order}h", prefix, 70)[0]
        offset = float(struct.unpack_from(f"{order}f", prefix, 108)[0])
        if prefix[344:348] not in (b"n+1\0", b"ni1\0"):
            raise NiftiHeaderError(BAD_HEADER)
    else:
        datatype = struct.unpack_from(f"{order}h", prefix, 12)[0]
        dim = struct.unpack_from(f"{order}8q", prefix, 16)
        offset = float(struct.unpack_from(f"{order}q", prefix, 168)[0])
        if prefix[4:8] not in (b"n+2\0", b"ni2\0"):
            raise NiftiHeaderError(BAD_HEADER)
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise NiftiHeaderError(f"{BAD_HEADER[:-1]}: dim[0] is {ndim}, not 1..7)")
    shape = tuple(int(n) for n in dim[1:ndim + 1])
    for i, n in enumerate(shape, start=1):
        if n < 1:
            raise NiftiHeaderError(f"{BAD_HEADER[:-1]}: dim[{i}] is {n})")
    if datatype not in DATATYPES:
        raise NiftiHeaderError(f"{BAD_HEADER[:-1]}: unknown datatype {datatype})")
    name, size = DATATYPES[datatype]
    if not (math.isfinite(offset) and offset == int(offset)
            and header_size <= offset <= MAX_VOX_OFFSET):
        raise NiftiHeaderError(f"{BAD_HEADER[:-1]}: vox_offset {offset:g} is not a byte offset "
                               f"in {header_size}..{MAX_VOX_OFFSET})")
    layout = NiftiLayout(version, shape, datatype, name, size, int(offset))
    limit = MAX_VOXELS if max_voxels is None else max_voxels
    if layout.n_voxels > limit:
        raise NiftiHeaderError(
            f"header declares {layout.describe()} = {layout.n_voxels:,} voxels, above the limit "
            f"of {limit:,} voxels (mtcmkd.nifti_header.MAX_VOXELS; pass max_voxels to read "
            "larger volumes)")
    return layout


def check_length(layout: NiftiLayout, available: int) -> None:
    """Raise the truncated-file error when the file holds fewer bytes than `layout` needs.

    Raises:
        NiftiHeaderError: :data:`TRUNCATED` with the declared and the present sizes.
    """
    if available < layout.end:
        raise NiftiHeaderError(
            f"{TRUNCATED}: the header declares {layout.describe()} from byte "
            f"{layout.vox_offset}, the file holds {available:,} bytes")


def inflate_limit(layout: NiftiLayout) -> int:
    """Most bytes worth decompressing for `layout`: the declared data plus the slack."""
    return layout.end + TRAILING_SLACK
