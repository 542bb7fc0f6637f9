"""Look-up tables over small-integer volumes: one gather per voxel, written in C order.

BraTS images are int16 and segmentations uint8/uint16, so any per-voxel function of the value
(label mapping, z-scoring) is a table of at most 65536 entries indexed by the voxel's bits.
nibabel returns NIfTI data in Fortran order and the store holds C order, so the gather also
transposes. A whole-volume strided gather or copy walks memory a cache line per voxel; one
plane of the middle axis at a time keeps source and destination in cache (1.6x faster on a
BraTS crop, see docs/PERFORMANCE.md).
"""

from __future__ import annotations

import numpy as np

#: dtypes whose every value has a table entry (the table is indexed by the unsigned view).
LUT_DTYPES = (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.uint16), np.dtype(np.int16))


def table_index(values: np.ndarray) -> np.ndarray:
    """`values` as table indices: the unsigned view of the same bits (int16 -1 -> 65535)."""
    if values.dtype not in LUT_DTYPES:
        raise TypeError(f"no look-up table for dtype {values.dtype}")
    return values.view(np.dtype(f"u{values.dtype.itemsize}"))


def table_values(dtype: np.dtype) -> np.ndarray:
    """The value each table entry stands for, as float64 (entry i holds `table_index`^-1(i))."""
    dtype = np.dtype(dtype)
    unsigned = np.arange(2 ** (8 * dtype.itemsize), dtype=f"u{dtype.itemsize}")
    return unsigned.view(dtype).astype(np.float64)


def lookup(table: np.ndarray, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """`table[values]` for a `LUT_DTYPES` array, into `out` (C-ordered when not given).

    `table` must have 2 ** (8 * itemsize) entries. 3D inputs in Fortran order go plane by plane
    along the middle axis, which transposes in cache.
    """
    index = table_index(values)
    if len(table) != 2 ** (8 * values.dtype.itemsize):
        raise ValueError(f"table has {len(table)} entries, {values.dtype} needs "
                         f"{2 ** (8 * values.dtype.itemsize)}")
    if out is None:
        out = np.empty(values.shape, dtype=table.dtype)
    elif out.shape != values.shape:
        raise ValueError(f"out has shape {out.shape}, values {values.shape}")
    if values.ndim == 3 and index.strides[0] < index.strides[2]:
        for j in range(index.shape[1]):
            out[:, j, :] = np.take(table, index[:, j, :])
    else:
        out[...] = np.take(table, index)
    return out
