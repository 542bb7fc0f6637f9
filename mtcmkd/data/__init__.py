"""The data stage: read the Zarr store, sample foreground-aware training patches, augment them.

`store` owns the store format checks, its root attributes, the fold split and the test set;
`patches` owns the patch sampler (`PatchDataset`) and the augmentation.
"""

from __future__ import annotations

from typing import Any

from mtcmkd.data.store import (
    STORE_FORMAT,
    STORE_FORMAT_VERSION,
    StoreFormatError,
    StoreInfo,
    check_store_complete,
    held_out_test_ids,
    incomplete_cases,
    is_valid_case_id,
    open_store,
    split_cases,
    store_fingerprint,
)

__all__ = [
    "STORE_FORMAT",
    "STORE_FORMAT_VERSION",
    "PatchDataset",
    "StoreFormatError",
    "StoreInfo",
    "augment_patch",
    "check_store_complete",
    "finish_batch",
    "held_out_test_ids",
    "incomplete_cases",
    "is_valid_case_id",
    "open_store",
    "patch_bounds",
    "split_cases",
    "store_fingerprint",
]

_PATCH_NAMES = ("PatchDataset", "augment_patch", "finish_batch", "patch_bounds")


def __getattr__(name: str) -> Any:
    # The patch sampler needs torch; the store format does not. Loading it lazily lets the
    # preprocessing share the format constants of `store` without importing torch.
    if name in _PATCH_NAMES:
        from mtcmkd.data import patches

        return getattr(patches, name)
    raise AttributeError(f"module 'mtcmkd.data' has no attribute {name!r}")
