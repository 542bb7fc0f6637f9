"""The data stage: read the Zarr store, sample foreground-aware training patches, augment them.

`store` owns the store format checks, its root attributes and the fold split; `patches` owns
the patch sampler (`PatchDataset`) and the augmentation.
"""

from __future__ import annotations

from mtcmkd.data.patches import PatchDataset, augment_patch, patch_bounds
from mtcmkd.data.store import (
    STORE_FORMAT,
    STORE_FORMAT_VERSION,
    StoreFormatError,
    StoreInfo,
    open_store,
    split_cases,
)

__all__ = [
    "STORE_FORMAT",
    "STORE_FORMAT_VERSION",
    "PatchDataset",
    "StoreFormatError",
    "StoreInfo",
    "augment_patch",
    "open_store",
    "patch_bounds",
    "split_cases",
]
