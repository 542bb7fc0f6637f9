"""Tests of mtcmkd.data: the store reader and the patch sampler, on tiny synthetic stores.

The stores are written here with plain zarr following docs/STORE.md, so these tests do not
depend on the preprocessing package.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
import zarr.codecs
from torch.utils.data import DataLoader

from mtcmkd.data import (
    PatchDataset,
    StoreFormatError,
    StoreInfo,
    augment_patch,
    finish_batch,
    open_store,
    patch_bounds,
    split_cases,
)
from mtcmkd.data.patches import scale_shift_brain_batch

CHANNELS = ["t1", "t1ce", "t2", "flair"]
REGIONS = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
PATCH = (16, 16, 16)


# --------------------------------------------------------------------------- store fixtures


def fold_assignment(case_ids: Sequence[str], n_folds: int, seed: int) -> dict[str, int]:
    """Folds as docs/STORE.md defines them: sort, shuffle with default_rng(seed), deal."""
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    return {ids[j]: k % n_folds for k, j in enumerate(order)}


def synthetic_case(
    shape: Sequence[int], rng: np.random.Generator, tumour_radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """A `(4, *shape)` float32 image, z-scored-like inside an ellipsoid brain and 0 outside,
    and a uint8 label with one spherical tumour: NCR (1) core, ET (3) shell, ED (2) rim.
    `tumour_radius <= 0` gives a case without tumour."""
    grid = np.indices(shape, dtype=np.float32)
    half = np.array(shape, dtype=np.float32).reshape(3, 1, 1, 1) / 2
    brain = (((grid + 0.5 - half) / (half * 0.95)) ** 2).sum(0) <= 1.0
    image = rng.standard_normal((4, *shape)).astype(np.float32) + 0.5
    image[image == 0] = 1.0  # keep every brain voxel non-zero
    image *= brain

    label = np.zeros(shape, dtype=np.uint8)
    if tumour_radius > 0:
        inside = np.argwhere(brain)
        margin = np.all((inside >= 2) & (inside < np.array(shape) - 2), axis=1)
        centre = inside[margin][rng.integers(margin.sum())].reshape(3, 1, 1, 1)
        dist = np.sqrt(((grid - centre) ** 2).sum(0))
        r = tumour_radius
        label[(dist <= 1.5 * r) & brain] = 2
        label[(dist <= r) & brain] = 3
        label[(dist <= r / 2) & brain] = 1
    return image, label


def write_case(
    cases: zarr.Group,
    case_id: str,
    image: np.ndarray,
    label: np.ndarray,
    chunk: int = 8,
    image_dtype: str = "float16",
) -> None:
    """Write one case as docs/STORE.md lays it out: sharded image and label (one shard per
    array, Blosc zstd), `foreground/{WT,TC,ET}` coordinates, and the case attributes."""
    spatial = image.shape[1:]
    shard = tuple(chunk * math.ceil(s / chunk) for s in spatial)
    blosc = [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")]
    group = cases.create_group(case_id)
    group.create_array(
        "image",
        data=image.astype(image_dtype),
        chunks=(1, chunk, chunk, chunk),
        shards=(image.shape[0], *shard),
        compressors=blosc,
    )
    group.create_array(
        "label", data=label.astype(np.uint8), chunks=(chunk,) * 3, shards=shard, compressors=blosc
    )
    fg = group.create_group("foreground")
    for region, values in REGIONS.items():
        coords = np.argwhere(np.isin(label, values)).astype(np.int32)
        fg.create_array(region, data=coords, chunks=(max(1, min(len(coords), 4096)), 3))
    brain = image != 0
    group.attrs.update(
        {
            "case_id": case_id,
            "release": "2021",
            "labelled": True,
            "crop_bbox": [[0, s] for s in spatial],
            "original_shape": list(spatial),
            "spacing": [1.0, 1.0, 1.0],
            "normalization": {
                ch: {"mean": float(image[c][brain[c]].mean()), "std": 1.0}
                for c, ch in enumerate(CHANNELS)
            },
        }
    )


def write_root_attrs(
    root: zarr.Group,
    case_ids: Sequence[str],
    n_folds: int = 2,
    fold_seed: int = 12345,
    image_dtype: str = "float16",
) -> None:
    """The root attributes of docs/STORE.md; every case is labelled."""
    ids = sorted(case_ids)
    root.attrs.update(
        {
            "format": "mtcmkd-brats-zarr",
            "format_version": 1,
            "channels": CHANNELS,
            "labels": {"0": "background", "1": "NCR/NETC", "2": "ED/SNFH", "3": "ET", "4": "RC"},
            "regions": REGIONS,
            "cases": ids,
            "labelled_cases": ids,
            "folds": {
                "n_folds": n_folds,
                "seed": fold_seed,
                "assignment": fold_assignment(ids, n_folds, fold_seed),
            },
            "image_dtype": image_dtype,
        }
    )


def make_store(
    path: Path,
    n_cases: int,
    shape: Sequence[int],
    seed: int,
    *,
    tumour_radius: float = 3.0,
    label_in_image: bool = False,
    n_folds: int = 2,
) -> Path:
    """A small labelled mtcmkd store of `n_cases` cases `case_000 ...` of spatial `shape`.

    `label_in_image=True` overwrites channel 0 with `10 * label + 5` inside the brain, so the
    label can be decoded from a (flipped, intensity-augmented) image: see `decode_label`.
    """
    rng = np.random.default_rng(seed)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    cases = root.create_group("cases")
    ids = [f"case_{k:03d}" for k in range(n_cases)]
    for case_id in ids:
        image, label = synthetic_case(shape, rng, tumour_radius)
        if label_in_image:
            image[0] = np.where(image[0] != 0, 10.0 * label + 5.0, 0.0)
        write_case(cases, case_id, image, label)
    write_root_attrs(root, ids, n_folds=n_folds)
    return path


def decode_label(image0: np.ndarray) -> np.ndarray:
    """Invert `label_in_image`: scale in [0.9, 1.1] and shift in [-0.1, 0.1] move
    `10 * label + 5` (label <= 3) by at most 3.6, less than half the step of 10."""
    return np.where(image0 == 0, 0, np.rint((image0 - 5.0) / 10.0)).astype(np.int64)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("s") / "store", 4, (20, 24, 18), seed=0)


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Volumes much larger than the 8^3 patches used with it, with a small tumour."""
    return make_store(
        tmp_path_factory.mktemp("b") / "store", 3, (32, 32, 32), seed=1, tumour_radius=1.5
    )


@pytest.fixture(scope="module")
def coded_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(
        tmp_path_factory.mktemp("c") / "store", 3, (20, 24, 18), seed=2, label_in_image=True
    )


def ids_of(path: Path) -> list[str]:
    return list(StoreInfo.read(path).labelled_cases)


def same_sample(a: dict, b: dict) -> bool:
    return (
        a["case_id"] == b["case_id"]
        and torch.equal(a["image"], b["image"])
        and torch.equal(a["label"], b["label"])
    )


# --------------------------------------------------------------------------- store.py


def test_store_info_and_folds(store: Path) -> None:
    info = StoreInfo.read(store)
    assert info.channels == tuple(CHANNELS)
    assert info.cases == info.labelled_cases == ("case_000", "case_001", "case_002", "case_003")
    assert info.n_folds == 2 and set(info.folds.values()) == {0, 1}
    assert tuple(info.regions) == ("WT", "TC", "ET")

    seen: list[str] = []
    for fold in range(info.n_folds):
        train, val = split_cases(info, fold)
        assert not set(train) & set(val)
        assert sorted(train + val) == list(info.labelled_cases)
        assert all(info.folds[c] == fold for c in val)
        seen += val
    assert sorted(seen) == list(info.labelled_cases)
    with pytest.raises(ValueError, match="out of range"):
        split_cases(info, 2)


def test_open_store_is_read_only(store: Path) -> None:
    root = open_store(store)
    assert root.attrs["format"] == "mtcmkd-brats-zarr"
    with pytest.raises(Exception):  # noqa: B017 - zarr's error type for read-only stores varies
        root.attrs["format"] = "changed"
    assert open_store(store).attrs["format"] == "mtcmkd-brats-zarr"


def test_open_store_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_store"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        open_store(missing)


def test_open_store_rejects_foreign_zarr(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w", zarr_format=3).attrs["hello"] = "world"
    with pytest.raises(StoreFormatError, match=f"{foreign}.*not an mtcmkd store"):
        open_store(foreign)

    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    with pytest.raises(StoreFormatError, match=f"{plain_dir}.*no zarr.json"):
        open_store(plain_dir)

    future = tmp_path / "future.zarr"
    zarr.open_group(str(future), mode="w", zarr_format=3).attrs.update(
        {"format": "mtcmkd-brats-zarr", "format_version": 2}
    )
    with pytest.raises(StoreFormatError, match=f"{future}.*format_version=2"):
        open_store(future)


def test_store_layout_matches_doc(store: Path) -> None:
    """Guard on the test fixture itself: the layout the loader relies on."""
    meta = json.loads((store / "cases" / "case_000" / "image" / "zarr.json").read_text())
    assert meta["data_type"] == "float16" and meta["shape"] == [4, 20, 24, 18]
    assert meta["codecs"][0]["name"] == "sharding_indexed"
    assert (store / "cases" / "case_000" / "foreground" / "ET" / "zarr.json").is_file()


# --------------------------------------------------------------------------- patch sampling


def test_shapes_and_dtypes(store: Path) -> None:
    ds = PatchDataset(store, ids_of(store), patch_size=PATCH, samples_per_epoch=8)
    assert len(ds) == 8 and ds.channels == tuple(CHANNELS)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (4, *PATCH)
        assert item["label"].dtype == torch.int64 and item["label"].shape == PATCH
        assert item["image"].is_contiguous() and item["label"].is_contiguous()
        assert item["case_id"] in ds.case_ids
        assert set(item["label"].unique().tolist()) <= {0, 1, 2, 3}
    with pytest.raises(IndexError):
        ds[8]


def test_determinism(store: Path) -> None:
    kwargs = {"patch_size": PATCH, "samples_per_epoch": 6, "seed": 7}
    a = PatchDataset(store, ids_of(store), **kwargs)
    b = PatchDataset(store, ids_of(store), **kwargs)
    first = [a[i] for i in range(6)]
    assert all(same_sample(first[i], b[i]) for i in range(6))
    assert all(same_sample(first[i], a[i]) for i in range(6))  # re-reading changes nothing
    assert not same_sample(first[0], first[1])

    a.set_epoch(1)
    assert not any(same_sample(first[i], a[i]) for i in range(6))
    a.set_epoch(0)
    assert same_sample(first[3], a[3])

    other_seed = PatchDataset(store, ids_of(store), **{**kwargs, "seed": 8})
    assert not same_sample(first[0], other_seed[0])


def test_dataloader_workers_do_not_change_samples(store: Path) -> None:
    ds = PatchDataset(store, ids_of(store), patch_size=PATCH, samples_per_epoch=10, seed=3)
    ds.set_epoch(2)
    ds[0]  # the parent has an open handle before the workers fork
    batches = {
        workers: list(DataLoader(ds, batch_size=3, num_workers=workers, shuffle=False))
        for workers in (0, 2)
    }
    assert len(batches[0]) == len(batches[2]) == 4
    for b0, b2 in zip(batches[0], batches[2], strict=True):
        assert b0["case_id"] == b2["case_id"]
        assert torch.equal(b0["image"], b2["image"]) and torch.equal(b0["label"], b2["label"])


@pytest.mark.integration
def test_spawned_workers_give_the_same_samples(store: Path) -> None:
    """Spawn pickles the dataset into fresh interpreters (the default on macOS and for CUDA)."""
    ds = PatchDataset(store, ids_of(store), patch_size=PATCH, samples_per_epoch=4, seed=5)
    ds[0]
    spawned = list(DataLoader(ds, batch_size=2, num_workers=1, multiprocessing_context="spawn"))
    for k, batch in enumerate(spawned):
        for j in range(2):
            assert same_sample(
                {key: batch[key][j] for key in ("image", "label", "case_id")}, ds[2 * k + j]
            )


def test_pickle_drops_the_handle(store: Path) -> None:
    ds = PatchDataset(store, ids_of(store), patch_size=PATCH, samples_per_epoch=4)
    before = ds[1]
    assert ds._root is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._root is None and clone._cases == {}
    assert same_sample(before, clone[1])


def test_ranks_get_disjoint_shards(store: Path) -> None:
    ids = ids_of(store)
    shards = [
        PatchDataset(store, ids, patch_size=PATCH, samples_per_epoch=20, rank=r, world_size=2)
        for r in range(2)
    ]
    assert not set(shards[0].case_ids) & set(shards[1].case_ids)
    assert sorted(shards[0].case_ids + shards[1].case_ids) == sorted(ids)
    for ds in shards:
        assert {ds[i]["case_id"] for i in range(len(ds))} <= set(ds.case_ids)
    # Same seed/epoch/index on the two ranks gives different samples.
    assert not same_sample(shards[0][0], shards[1][0])

    with pytest.raises(ValueError, match="rank 4 of 5 gets no case"):
        PatchDataset(store, ids, patch_size=PATCH, rank=4, world_size=5)


@pytest.mark.integration
def test_foreground_oversampling(big_store: Path) -> None:
    def tumour_fraction(fg_fraction: float) -> float:
        ds = PatchDataset(
            big_store,
            ids_of(big_store),
            patch_size=(8, 8, 8),
            samples_per_epoch=100,
            fg_fraction=fg_fraction,
            augment=False,
        )
        return float(np.mean([bool((ds[i]["label"] > 0).any()) for i in range(len(ds))]))

    assert tumour_fraction(1.0) == 1.0
    assert tumour_fraction(0.0) < 0.5  # about 0.1 on this store


def test_case_without_tumour_falls_back_to_random(tmp_path: Path) -> None:
    path = make_store(tmp_path / "store", 2, (20, 24, 18), seed=4, tumour_radius=0)
    ds = PatchDataset(path, ids_of(path), patch_size=PATCH, samples_per_epoch=5, fg_fraction=1.0)
    assert all(int(ds[i]["label"].max()) == 0 for i in range(len(ds)))


def test_padding_when_volume_is_smaller_than_patch(tmp_path: Path) -> None:
    path = make_store(tmp_path / "store", 2, (12, 20, 10), seed=5)
    ds = PatchDataset(path, ids_of(path), patch_size=PATCH, samples_per_epoch=6, augment=False)
    root = open_store(path)
    for i in range(len(ds)):
        item = ds[i]
        image, label = item["image"].numpy(), item["label"].numpy()
        assert image.shape == (4, 16, 16, 16)
        # Axis 0: 12 -> 2 zero slices before, 2 after; axis 2: 10 -> 3 before, 3 after.
        assert not image[:, :2].any() and not image[:, 14:].any()
        assert not image[..., :3].any() and not image[..., 13:].any()
        assert not label[:2].any() and not label[14:].any()
        inner_image, inner_label = image[:, 2:14, :, 3:13], label[2:14, :, 3:13]
        # Axis 1 (20 >= 16) is a window of 16: find it in the stored case.
        stored = root[f"cases/{item['case_id']}/image"][...].astype(np.float32)
        stored_label = root[f"cases/{item['case_id']}/label"][...]
        starts = [h0 for h0 in range(5) if np.array_equal(stored[:, :, h0 : h0 + 16], inner_image)]
        assert starts, "the padded patch's content is not a window of the case"
        assert np.array_equal(stored_label[:, starts[0] : starts[0] + 16], inner_label)


def test_only_the_patch_slice_is_read(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[tuple[int, ...]] = []
    original = zarr.Array.__getitem__

    def recording_getitem(self: zarr.Array, selection: object) -> object:
        out = original(self, selection)
        reads.append(tuple(np.shape(out)))
        return out

    monkeypatch.setattr(zarr.Array, "__getitem__", recording_getitem)
    ds = PatchDataset(store, ids_of(store), patch_size=PATCH, samples_per_epoch=12)
    for i in range(len(ds)):
        ds[i]
    assert (4, *PATCH) in reads and PATCH in reads
    # Every read is a patch (image or label) or one foreground coordinate, never a whole case.
    assert set(reads) <= {(4, *PATCH), PATCH, (3,)}


def test_flips_keep_image_and_label_aligned(coded_store: Path) -> None:
    ids = ids_of(coded_store)
    kwargs = {"patch_size": PATCH, "samples_per_epoch": 24, "seed": 9}
    plain = PatchDataset(coded_store, ids, augment=False, **kwargs)
    augmented = PatchDataset(coded_store, ids, augment=True, **kwargs)
    flipped_somewhere = 0
    for i in range(len(plain)):
        p, a = plain[i], augmented[i]
        assert p["case_id"] == a["case_id"]
        image, label = a["image"].numpy(), a["label"].numpy()
        assert np.array_equal(decode_label(image[0]), label)
        # The augmented patch is the same patch (same location), flipped along some axes.
        candidates = [
            axes
            for axes in [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
            if np.array_equal(np.flip(p["label"].numpy(), axes) if axes else p["label"], label)
            and np.array_equal(
                np.flip(p["image"].numpy() != 0, [x + 1 for x in axes])
                if axes
                else p["image"].numpy() != 0,
                image != 0,
            )
        ]
        assert candidates
        flipped_somewhere += () not in candidates
    assert flipped_somewhere > 0


def test_augment_patch_intensity_only_on_brain() -> None:
    rng = np.random.default_rng(0)
    image = rng.standard_normal((4, 6, 7, 8)).astype(np.float32) + 3.0
    image[:, :2] = 0.0
    label = (image[0] > 3).astype(np.uint8)
    original = image.copy()
    out_image, out_label = augment_patch(image, label, np.random.default_rng(1), flip_probability=0)
    assert np.array_equal(out_label, label)
    assert not out_image[:, :2].any()
    for c in range(4):
        brain = original[c] != 0
        scale, shift = np.polyfit(original[c][brain], out_image[c][brain], 1)
        assert 0.9 <= scale <= 1.1 and -0.1 <= shift <= 0.1


def test_patch_bounds_clamps_centre_inside() -> None:
    rng = np.random.default_rng(0)
    assert patch_bounds((20, 24, 18), PATCH, (0, 23, 9), rng) == [(0, 16), (8, 24), (1, 17)]
    assert patch_bounds((10, 30, 16), PATCH, None, rng)[0] == (0, 10)
    assert patch_bounds((10, 30, 16), PATCH, None, rng)[2] == (0, 16)


def test_bad_arguments(store: Path) -> None:
    ids = ids_of(store)
    with pytest.raises(ValueError, match="fg_fraction"):
        PatchDataset(store, ids, fg_fraction=1.5)
    with pytest.raises(ValueError, match="patch_size"):
        PatchDataset(store, ids, patch_size=(16, 16))
    with pytest.raises(StoreFormatError, match="not labelled cases"):
        PatchDataset(store, [*ids, "case_999"])


@pytest.mark.parametrize("augment", [True, False])
@pytest.mark.parametrize("shape", [(20, 24, 18), (12, 20, 10)])  # crop and pad paths
def test_deferred_items_finish_to_the_float32_items(tmp_path: Path, augment: bool,
                                                    shape: tuple[int, int, int]) -> None:
    """float16/uint8 items + finish_batch equal the host-side float32/int64 items exactly."""
    path = make_store(tmp_path / "store", 3, shape, seed=7)
    kw = dict(patch_size=PATCH, samples_per_epoch=8, seed=11, augment=augment)
    host = PatchDataset(path, ids_of(path), **kw)
    deferred = PatchDataset(path, ids_of(path), defer_to_device=True, **kw)
    item = deferred[0]
    assert item["image"].dtype == torch.float16 and item["label"].dtype == torch.uint8
    assert ("intensity" in item) == augment
    a = next(iter(DataLoader(host, batch_size=4)))
    b = next(iter(DataLoader(deferred, batch_size=4, num_workers=1)))
    image_a, label_a = finish_batch(a, "cpu")
    image_b, label_b = finish_batch(b, "cpu")
    assert image_b.dtype == torch.float32 and label_b.dtype == torch.int64
    assert torch.equal(image_a, image_b) and torch.equal(label_a, label_b)
    if augment:  # the intensity change really happened, and only on brain voxels
        assert not torch.equal(image_b, b["image"].float())
        assert torch.equal(image_b == 0, b["image"] == 0)
    # the accelerator path (torch ops), run here on CPU tensors, gives the same numbers
    torch_path = scale_shift_brain_batch(b["image"].float(), b["intensity"]) if augment else None
    assert torch_path is None or torch.equal(torch_path, image_b)
    bf16, _ = finish_batch(b, "cpu", torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, image_b.bfloat16())
