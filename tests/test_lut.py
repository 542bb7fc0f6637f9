"""Look-up tables over integer volumes (mtcmkd.lut) and the label mapping that uses them."""

from __future__ import annotations

import numpy as np
import pytest

from mtcmkd.brats import release
from mtcmkd.lut import LUT_DTYPES, lookup, table_index, table_values


@pytest.mark.parametrize("dtype", LUT_DTYPES)
def test_table_values_invert_table_index(dtype):
    info = np.iinfo(dtype)
    values = np.array([info.min, -1 if info.min < 0 else 1, 0, info.max], dtype=dtype)
    np.testing.assert_array_equal(table_values(dtype)[table_index(values)],
                                  values.astype(np.float64))


@pytest.mark.parametrize("dtype", LUT_DTYPES)
@pytest.mark.parametrize("order", ["C", "F"])
def test_lookup_is_table_of_values_in_c_order(dtype, order):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    full = rng.integers(info.min, info.max, size=(9, 7, 5), endpoint=True).astype(dtype)
    values = np.asarray(full, order=order)[1:8, 2:6, 1:4]  # a crop: a strided view
    table = rng.standard_normal(2 ** (8 * np.dtype(dtype).itemsize)).astype(np.float32)
    out = lookup(table, values)
    assert out.flags.c_contiguous and out.dtype == np.float32
    # Entry i of the table stands for the value whose unsigned bits are i.
    np.testing.assert_array_equal(out, table[values.astype(np.int64) % len(table)])
    into = np.full(values.shape, np.nan, dtype=np.float32)
    assert lookup(table, values, out=into) is into
    np.testing.assert_array_equal(into, out)


def test_lookup_refuses_wrong_dtype_table_and_shape():
    with pytest.raises(TypeError, match="int32"):
        lookup(np.zeros(2**16), np.zeros((2, 2, 2), dtype=np.int32))
    with pytest.raises(ValueError, match="needs 256"):
        lookup(np.zeros(10), np.zeros((2, 2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="out has shape"):
        lookup(np.zeros(256), np.zeros((2, 2, 2), dtype=np.uint8), out=np.zeros((2, 2)))


@pytest.mark.parametrize("dtype", LUT_DTYPES)
@pytest.mark.parametrize("order", ["C", "F"])
def test_map_labels_table_path_matches_generic_path(dtype, order):
    rng = np.random.default_rng(1)
    seg = np.asarray(rng.choice([0, 1, 2, 4], size=(8, 6, 5)).astype(dtype), order=order)
    info = release("2021")
    fast = info.map_labels(seg)  # small-integer dtypes take the table
    generic = info.map_labels(seg.astype(np.int64))  # int64 takes the bincount path
    assert fast.dtype == np.uint8 and fast.flags.c_contiguous
    np.testing.assert_array_equal(fast, generic)


@pytest.mark.parametrize(("dtype", "bad"), [(np.uint16, [3, 5]), (np.uint8, [3, 200]),
                                            (np.int16, [-1, 3])])
def test_map_labels_table_path_names_the_bad_values(dtype, bad):
    seg = np.zeros((4, 4, 4), dtype=dtype, order="F")
    seg[0, 0, :2] = bad
    seg[1, 1, 1] = 4
    with pytest.raises(ValueError, match=rf"unexpected label values \[{bad[0]}, {bad[1]}\] "
                                         r"\(release 2021 allows \[0, 1, 2, 4\]\)"):
        release("2021").map_labels(seg)
