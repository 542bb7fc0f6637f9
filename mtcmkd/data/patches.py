"""Foreground-aware random patch sampling from the mtcmkd store, with light augmentation.

Every sample is a pure function of `(seed, rank, epoch, index)`: the random generator is built
from those four numbers, so the patches of an epoch do not depend on how many DataLoader workers
there are or in which order they run, and no `worker_init_fn` is needed.

Only the patch's own slice of a case is read from Zarr (`image[:, z0:z1, y0:y1, x0:x1]`), which
with the store's 64^3 inner chunks touches at most 3 x 3 x 3 chunks per channel for a 128^3
patch, never the whole case.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numcodecs.blosc
import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from mtcmkd.data.store import StoreFormatError, StoreInfo, open_store

Shape3 = tuple[int, int, int]


def patch_bounds(
    shape: Sequence[int],
    patch_size: Sequence[int],
    centre: Sequence[int] | None,
    rng: np.random.Generator,
) -> list[tuple[int, int]]:
    """The half-open box `[lo, hi)` per spatial axis to read for one patch.

    Args:
        shape: the volume's spatial shape `(D, H, W)`.
        patch_size: the patch's spatial shape `(pd, ph, pw)`.
        centre: a voxel to centre the patch on, or None for a uniformly random position.
        rng: drawn from only for random positions on axes longer than the patch.

    Returns:
        One `(lo, hi)` per axis, inside the volume. On an axis at least as long as the patch,
        `hi - lo` equals the patch size: the patch is shifted (clamped) to lie inside the volume,
        so a centre near the border is still inside the patch, just not in its middle. On an
        axis shorter than the patch the whole axis is read (`(0, size)`); the caller pads.
    """
    centre_list = [None] * len(shape) if centre is None else list(centre)
    bounds = []
    for size, patch, c in zip(shape, patch_size, centre_list, strict=True):
        if size <= patch:
            lo = 0
        elif c is None:
            lo = int(rng.integers(0, size - patch + 1))
        else:
            lo = min(max(int(c) - patch // 2, 0), size - patch)
        bounds.append((lo, min(lo + patch, size)))
    return bounds


def draw_augmentation(
    rng: np.random.Generator,
    n_channels: int,
    *,
    flip_probability: float = 0.5,
    scale_range: tuple[float, float] = (0.9, 1.1),
    shift_range: tuple[float, float] = (-0.1, 0.1),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw, in this order, one flip decision per spatial axis, one scale and one shift per
    channel: `(flips (3,) bool, scales (C,), shifts (C,))`."""
    flips = rng.random(3) < flip_probability
    scales = rng.uniform(*scale_range, size=n_channels)
    shifts = rng.uniform(*shift_range, size=n_channels)
    return flips, scales, shifts


def flip_view(array: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """A view of `array` flipped along the last three axes where `flips` is True (no copy)."""
    spatial = tuple(slice(None, None, -1) if f else slice(None) for f in flips)
    return array[(Ellipsis, *spatial)]


def scale_shift_brain(image: np.ndarray, scales: np.ndarray, shifts: np.ndarray) -> None:
    """`x * scale + shift` per channel on brain voxels only, in place on float32 `(C, ...)`.

    The store's z-scored images are exactly 0 outside the brain (and in the padding) and must
    stay 0 so the background stays recognisable; a brain voxel that is exactly 0.0 after
    normalisation is treated as background (negligible).
    """
    for c in range(image.shape[0]):
        channel = image[c]
        channel *= np.float32(scales[c])  # scale > 0, so background zeros stay zero
        np.add(channel, np.float32(shifts[c]), out=channel, where=channel != 0)


def augment_patch(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    **ranges: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Random flips and per-channel intensity scale/shift of one patch.

    Draws with `draw_augmentation` (flips, then scales, then shifts), applies the intensity
    change in place on `image` (`(C, D, H, W)` float32) and returns flipped views of `image`
    and `label` (negative strides; the caller makes them contiguous once).
    """
    flips, scales, shifts = draw_augmentation(rng, image.shape[0], **ranges)
    scale_shift_brain(image, scales, shifts)
    return flip_view(image, flips), flip_view(label, flips)


@dataclass
class _CaseArrays:
    """Open Zarr handles of one case, cached per process."""

    image: zarr.Array
    label: zarr.Array
    foreground: dict[str, zarr.Array]  # region -> (N, 3) int32 coordinates; N may be 0

    @property
    def shape(self) -> Shape3:
        d, h, w = self.image.shape[1:]
        return d, h, w


class PatchDataset(Dataset[dict[str, Any]]):
    """Map-style dataset of random training patches from an mtcmkd store.

    Item `i` of epoch `e` on rank `r` is drawn with `np.random.default_rng([seed, r, e, i])`:
    it picks a case of this rank's shard uniformly, then with probability `fg_fraction` centres
    the patch on a random voxel of a random tumour region (WT, TC or ET, uniformly among those
    present in the case, then a voxel uniformly in the region), otherwise places it uniformly at
    random. The patch is clamped inside the volume and zero-padded (image 0.0, label 0, split
    evenly, the extra voxel after) on axes where the volume is smaller than the patch.

    Items are dicts:
        "image": float32 tensor `(C, pd, ph, pw)`, all channels of the store in the order of
            `self.channels` (teachers and student see the same voxels; methods pick channels
            by name).
        "label": int64 tensor `(pd, ph, pw)`, canonical labels (docs/STORE.md).
        "case_id": str.

    With `defer_to_device=True` the loader does only what must happen on the host (read, pad,
    flip) and leaves the casts and the intensity augmentation to :func:`finish_batch`, which
    runs them after the transfer, on the accelerator: "image" is then float16 (as stored),
    "label" uint8, and an augmented item carries "intensity", float32 `(2, C)` (scales, shifts).
    `finish_batch` of such a batch equals the float32 item exactly (same operations, same order).

    The store is opened lazily in the process that reads (first `__getitem__`), and the handle
    is dropped on pickling, so the dataset works with DataLoader workers under fork and spawn.

    Epochs: call `set_epoch(e)` before creating the epoch's DataLoader iterator. Workers get a
    copy of the dataset when the iterator starts, so with `persistent_workers=True` they would
    keep the epoch they started with; use non-persistent workers (the default).

    Args:
        store_path: the store directory.
        case_ids: the cases to sample from (e.g. the training ids of `split_cases`); all must be
            labelled cases of the store. Sorted, then rank `r` takes `sorted_ids[r::world_size]`.
        patch_size: spatial patch shape `(pd, ph, pw)`.
        samples_per_epoch: `len(self)`, the number of patches per epoch on this rank. The default
            is nnU-Net's 250 iterations of batch size 2.
        fg_fraction: probability in `[0, 1]` of centring a patch on tumour.
        seed: base seed of the run.
        rank, world_size: this process's data-parallel rank and the number of ranks.
        augment: apply `augment_patch` (flips and intensity).
        defer_to_device: return float16/uint8 items and defer the casts and the intensity
            augmentation to `finish_batch` (half the bytes per patch, and the host skips two
            passes over the patch; see above).

    Raises:
        ValueError: bad argument, or this rank's shard is empty (fewer cases than ranks).
        FileNotFoundError, StoreFormatError: see `open_store`; also when a case id is not a
            labelled case of the store.
    """

    def __init__(
        self,
        store_path: str | Path,
        case_ids: Sequence[str],
        patch_size: Sequence[int] = (128, 128, 128),
        samples_per_epoch: int = 500,
        fg_fraction: float = 1 / 3,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: bool = True,
        defer_to_device: bool = False,
    ) -> None:
        if len(patch_size) != 3 or any(int(p) < 1 for p in patch_size):
            raise ValueError(f"patch_size must be 3 positive ints, got {tuple(patch_size)}")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        if not 0.0 <= fg_fraction <= 1.0:
            raise ValueError(f"fg_fraction must be in [0, 1], got {fg_fraction}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, {world_size=}")
        if isinstance(case_ids, str):
            raise ValueError("case_ids must be a sequence of case ids, not one string")
        if len(set(case_ids)) != len(case_ids):
            raise ValueError("case_ids contains duplicates")
        shard = sorted(case_ids)[rank::world_size]
        if not shard:
            raise ValueError(
                f"rank {rank} of {world_size} gets no case: only {len(case_ids)} case ids; "
                "use fewer ranks or more cases"
            )

        self.store_path = Path(store_path)
        # Read the root attributes once here to fail early on a wrong store or case id; the
        # handle is not kept (each reading process opens its own, see _open).
        info = StoreInfo.read(self.store_path)
        not_labelled = sorted(set(case_ids) - set(info.labelled_cases))
        if not_labelled:
            raise StoreFormatError(
                f"{self.store_path}: {len(not_labelled)} case ids are not labelled cases of "
                f"the store, e.g. {not_labelled[:5]}"
            )
        self.channels: tuple[str, ...] = info.channels
        self.regions: tuple[str, ...] = tuple(info.regions)
        self.case_ids: tuple[str, ...] = tuple(shard)
        self.patch_size: Shape3 = (int(patch_size[0]), int(patch_size[1]), int(patch_size[2]))
        self.samples_per_epoch = int(samples_per_epoch)
        self.fg_fraction = float(fg_fraction)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.augment = bool(augment)
        self.defer_to_device = bool(defer_to_device)
        self.epoch = 0

        self._root: zarr.Group | None = None
        self._cases: dict[str, _CaseArrays] = {}
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose patches `__getitem__` returns (see the class docstring)."""
        self.epoch = int(epoch)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_root"] = None
        state["_cases"] = {}
        state["_pid"] = None
        return state

    def _open(self) -> zarr.Group:
        """The store handle of this process, opened on first use.

        Re-opened after a fork (a different pid), so a child never reuses a parent's handles.
        Blosc's own thread pool is set to one thread: parallelism comes from DataLoader worker
        processes (and zarr's chunk-level thread pool), and W workers each running a multi-
        threaded blosc pool would oversubscribe the cores. Zarr 3 already decodes with
        single-threaded blosc calls (it sets `numcodecs.blosc.use_threads = False`), so this is
        a guard should that change, not a speed-up.
        """
        pid = os.getpid()
        if self._root is None or self._pid != pid:
            numcodecs.blosc.set_nthreads(1)
            self._root = open_store(self.store_path)
            self._cases = {}
            self._pid = pid
        return self._root

    def _case(self, case_id: str) -> _CaseArrays:
        root = self._open()
        arrays = self._cases.get(case_id)
        if arrays is None:
            try:
                group = root[f"cases/{case_id}"]
                fg = group["foreground"]
                arrays = _CaseArrays(
                    image=group["image"],
                    label=group["label"],
                    foreground={region: fg[region] for region in self.regions},
                )
            except KeyError as err:
                raise StoreFormatError(
                    f"{self.store_path}: case {case_id!r} lacks {err} (docs/STORE.md)"
                ) from err
            if arrays.label.shape != arrays.image.shape[1:]:
                raise StoreFormatError(
                    f"{self.store_path}: case {case_id!r} has image {arrays.image.shape} but "
                    f"label {arrays.label.shape}"
                )
            self._cases[case_id] = arrays
        return arrays

    def _foreground_centre(
        self, arrays: _CaseArrays, rng: np.random.Generator
    ) -> np.ndarray | None:
        """A random voxel of a random non-empty region, or None if the case has no tumour."""
        present = [r for r in self.regions if arrays.foreground[r].shape[0] > 0]
        if not present:
            return None
        coords = arrays.foreground[present[int(rng.integers(len(present)))]]
        # One row: zarr reads just the chunk that holds it, not the whole coordinate list.
        return np.asarray(coords[int(rng.integers(coords.shape[0]))])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.samples_per_epoch:
            raise IndexError(f"index {index} out of range for {self.samples_per_epoch} samples")
        rng = np.random.default_rng([self.seed, self.rank, self.epoch, index])
        case_id = self.case_ids[int(rng.integers(len(self.case_ids)))]
        arrays = self._case(case_id)

        centre = self._foreground_centre(arrays, rng) if rng.random() < self.fg_fraction else None
        bounds = patch_bounds(arrays.shape, self.patch_size, centre, rng)
        box = tuple(slice(lo, hi) for lo, hi in bounds)
        image_part = arrays.image[(slice(None), *box)]  # float16 (C, <=pd, <=ph, <=pw)
        label_part = arrays.label[box]

        n_channels = image_part.shape[0]
        aug = draw_augmentation(rng, n_channels) if self.augment else None
        image_dtype = np.float16 if self.defer_to_device else np.float32
        if image_part.shape[1:] == self.patch_size:
            # Flip the freshly read block as a view, then copy once: the copy is the cast to
            # float32 (or a float16 copy when deferring) and makes the patch contiguous.
            if aug is not None:
                image_part, label_part = flip_view(image_part, aug[0]), flip_view(label_part, aug[0])
            image = np.ascontiguousarray(image_part, dtype=image_dtype)
            label = label_part
        else:
            # Pad: the cast happens while writing into the zero-filled patch.
            offsets = [
                (p - (hi - lo)) // 2 for p, (lo, hi) in zip(self.patch_size, bounds, strict=True)
            ]
            inner = tuple(
                slice(o, o + hi - lo) for o, (lo, hi) in zip(offsets, bounds, strict=True)
            )
            image = np.zeros((n_channels, *self.patch_size), dtype=image_dtype)
            image[(slice(None), *inner)] = image_part
            label = np.zeros(self.patch_size, dtype=label_part.dtype)
            label[inner] = label_part
            if aug is not None:
                image = np.ascontiguousarray(flip_view(image, aug[0]))
                label = flip_view(label, aug[0])
        if self.defer_to_device:
            item: dict[str, Any] = {
                "image": torch.from_numpy(image),
                "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.uint8)),
                "case_id": case_id,
            }
            if aug is not None:
                item["intensity"] = torch.from_numpy(
                    np.stack([aug[1], aug[2]]).astype(np.float32))
            return item
        if aug is not None:
            scale_shift_brain(image, aug[1], aug[2])
        return {
            "image": torch.from_numpy(image),
            "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),
            "case_id": case_id,
        }


def scale_shift_brain_batch(image: torch.Tensor, intensity: torch.Tensor) -> torch.Tensor:
    """`scale_shift_brain` for a batch `(B, C, ...)` on any device, out of place.

    `intensity` is `(B, 2, C)`: scales then shifts. Same operations in the same order as the
    numpy version (multiply, then add the shift where the scaled value is non-zero).
    """
    shape = (image.shape[0], image.shape[1]) + (1,) * (image.dim() - 2)
    scales, shifts = intensity[:, 0].reshape(shape), intensity[:, 1].reshape(shape)
    image = image * scales
    return image + torch.where(image != 0, shifts, torch.zeros((), device=image.device))


def finish_batch(batch: dict[str, Any], device: torch.device | str,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a collated batch to `device` and finish it there: `(image, label)`.

    For a deferred batch (`PatchDataset(defer_to_device=True)`): float16 -> float32, then the
    intensity augmentation `x * scale + shift` per item and channel on brain voxels (x != 0),
    exactly as `scale_shift_brain` does on the host; labels uint8 -> int64. A float32 batch is
    only moved. Finally the image is cast to `dtype` (bf16 training).
    """
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    if image.dtype != torch.float32:
        image = image.float()
    intensity = batch.get("intensity")
    if intensity is not None:
        if image.device.type == "cpu":
            # CPU training: numpy's in-place passes are several times faster than torch's
            # out-of-place ones here; `image` is the fresh float32 copy made just above.
            values, params = image.numpy(), intensity.numpy()
            for i in range(values.shape[0]):
                scale_shift_brain(values[i], params[i, 0], params[i, 1])
        else:
            image = scale_shift_brain_batch(image, intensity.to(device, non_blocking=True))
    if label.dtype != torch.int64:
        label = label.long()
    if dtype != torch.float32:
        image = image.to(dtype)
    return image, label
