"""Patch-loading throughput: the Zarr store (`PatchDataset`) vs reading NIfTI files on the fly.

The store loader reads only the patch's chunks of the preprocessed float16 images. The baseline
is what a loader without preprocessing does for every patch: read the four `.nii.gz` modalities
and the segmentation of a case with nibabel, z-score each modality on its non-zero voxels, cut a
uniformly random patch. Both apply the same augmentation (`augment_patch`) and return the same
item (`image` float32 `(4, *patch)`, `label` int64 `(*patch)`, `case_id`), through a DataLoader
with the same batch size and worker count.

    python benchmarks/bench_loader.py --store STORE --raw /work/shared/data/brats2021-sample \\
        --patch 128 --n 50 --workers 0 1 2 --json-out .bench/bench_loader.json

Patches/s is measured after the first batch arrives (steady state, worker start-up excluded)
and also end to end (start-up included); each setting runs `--repeats` times, the two loaders
interleaved, and the table shows the median (the JSON has every run). The store is produced by `mtcmkd preprocess`; this
script only reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import zarr
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

try:
    from mtcmkd.data import PatchDataset, StoreInfo, augment_patch, finish_batch, patch_bounds
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mtcmkd.data import PatchDataset, StoreInfo, augment_patch, finish_batch, patch_bounds

MODALITIES = ("t1", "t1ce", "t2", "flair")
BRATS_2021_LABEL_MAP = {0: 0, 1: 1, 2: 2, 4: 3}  # source label -> canonical (docs/STORE.md)


class NiftiPatchDataset(Dataset[dict[str, Any]]):
    """Baseline: every item reads a whole BraTS 2021 case from `.nii.gz` and cuts one patch.

    Args:
        raw: a folder of case folders `<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`.
        patch_size: spatial patch shape; volumes are larger than it (240 x 240 x 155).
        n: `len(self)`.
        seed: item `i` uses `np.random.default_rng([seed, 0, 0, i])`, like `PatchDataset`.
        augment: apply `augment_patch`.
    """

    def __init__(
        self,
        raw: Path,
        patch_size: tuple[int, int, int],
        n: int,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        self.cases = sorted(p for p in raw.iterdir() if (p / f"{p.name}_seg.nii.gz").is_file())
        if not self.cases:
            raise FileNotFoundError(f"{raw}: no BraTS case folders (<case>/<case>_seg.nii.gz)")
        self.patch_size = patch_size
        self.n = n
        self.seed = seed
        self.augment = augment

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, 0, 0, index])
        case = self.cases[int(rng.integers(len(self.cases)))]
        volumes = [
            nib.load(case / f"{case.name}_{m}.nii.gz").get_fdata(dtype=np.float32)
            for m in MODALITIES
        ]
        seg = np.asanyarray(nib.load(case / f"{case.name}_seg.nii.gz").dataobj)
        bounds = patch_bounds(seg.shape, self.patch_size, None, rng)
        box = tuple(slice(lo, hi) for lo, hi in bounds)

        image = np.empty((len(MODALITIES), *self.patch_size), dtype=np.float32)
        for c, volume in enumerate(volumes):
            brain = volume[volume != 0]  # statistics over the whole volume's brain voxels
            mean, std = (float(brain.mean()), float(brain.std())) if brain.size else (0.0, 1.0)
            patch = volume[box]
            image[c] = np.where(patch != 0, (patch - mean) / max(std, 1e-8), 0.0)
        label = np.zeros(self.patch_size, dtype=np.uint8)
        for source, canonical in BRATS_2021_LABEL_MAP.items():
            label[seg[box] == source] = canonical

        if self.augment:
            image, label = augment_patch(image, label, rng)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),
            "case_id": case.name,
        }


def measure(dataset: Dataset, n: int, batch_size: int, workers: int) -> dict[str, float]:
    """Iterate one epoch of `dataset` (n items) through a DataLoader and time it."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    start = time.perf_counter()
    first = None
    seen = 0
    for batch in loader:
        seen += batch["image"].shape[0]
        if first is None:
            first, first_size = time.perf_counter(), seen
    end = time.perf_counter()
    assert seen == n and first is not None
    steady = (n - first_size) / (end - first) if n > first_size else float("nan")
    return {
        "patches_per_s": steady,
        "patches_per_s_incl_startup": n / (end - start),
        "seconds": end - start,
        "first_batch_s": first - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, help="mtcmkd Zarr store (`mtcmkd preprocess`)")
    parser.add_argument("--raw", type=Path, help="folder of raw BraTS 2021 case folders")
    parser.add_argument("--patch", type=int, default=128, help="cubic patch edge (voxels)")
    parser.add_argument("--n", type=int, default=50, help="patches per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; median kept")
    parser.add_argument("--fg-fraction", type=float, default=1 / 3, help="store loader only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, default=Path(".bench/bench_loader.json"))
    args = parser.parse_args(argv)
    if args.store is None and args.raw is None:
        parser.error("give --store, --raw or both")

    console = Console()
    patch = (args.patch,) * 3
    loaders: dict[str, Dataset] = {}
    if args.store is not None:
        info = StoreInfo.read(args.store)
        # "store": float32 items, all augmentation on the host. "deferred" (the training
        # default): float16 items, casts and intensity augmentation on the device
        # (finish_batch), whose host-side cost is measured separately below.
        for name, deferred in (("store", False), ("deferred", True)):
            loaders[name] = PatchDataset(
                args.store,
                info.labelled_cases,
                patch_size=patch,
                samples_per_epoch=args.n,
                fg_fraction=args.fg_fraction,
                seed=args.seed,
                augment=True,
                defer_to_device=deferred,
            )
    if args.raw is not None:
        loaders["nifti"] = NiftiPatchDataset(args.raw, patch, args.n, seed=args.seed)

    results: list[dict[str, Any]] = []
    for workers in args.workers:
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in loaders}
        for repeat in range(args.repeats):
            # Interleaved, so that both loaders see the same background load.
            for name, dataset in loaders.items():
                timing = measure(dataset, args.n, args.batch_size, workers)
                runs[name].append(timing)
                console.print(
                    f"{name:>8}  workers={workers}  run {repeat + 1}/{args.repeats}  "
                    f"{timing['patches_per_s']:7.2f} patches/s ({timing['seconds']:.1f} s)"
                )
        for name, timings in runs.items():
            rates = [t["patches_per_s"] for t in timings]
            results.append(
                {
                    "loader": name,
                    "workers": workers,
                    "patches_per_s": float(np.median(rates)),
                    "patches_per_s_min": min(rates),
                    "patches_per_s_max": max(rates),
                    "runs": timings,
                }
            )

    table = Table(title=f"patch loading, {args.patch}^3 x 4 channels, batch {args.batch_size}")
    table.add_column("workers", justify="right")
    for name in loaders:
        table.add_column(f"{name} patches/s (min-max)", justify="right")
    ratios = [name for name in loaders if name != "nifti"] if "nifti" in loaders else []
    for name in ratios:
        table.add_column(f"{name} / nifti", justify="right")
    speedup: dict[str, float] = {}
    for workers in args.workers:
        rows = {r["loader"]: r for r in results if r["workers"] == workers}
        rates = {name: row["patches_per_s"] for name, row in rows.items()}
        cells = [
            f"{r['patches_per_s']:.2f} ({r['patches_per_s_min']:.1f}-{r['patches_per_s_max']:.1f})"
            for r in rows.values()
        ]
        for name in ratios:
            speedup[f"{name}/{workers}"] = rates[name] / rates["nifti"]
            cells.append(f"{speedup[f'{name}/{workers}']:.1f}x")
        table.add_row(str(workers), *cells)
    console.print(table)

    finish_ms = None
    if "deferred" in loaders:
        # What the deferred loader leaves to the device, timed here on the CPU (an upper bound:
        # on a GPU it is a few elementwise kernels).
        batch = next(iter(DataLoader(loaders["deferred"], batch_size=args.batch_size)))
        times = []
        for _ in range(5):
            start = time.perf_counter()
            finish_batch(batch, "cpu")
            times.append(time.perf_counter() - start)
        finish_ms = 1000 * float(np.median(times)) / args.batch_size
        console.print(f"finish_batch on the CPU: {finish_ms:.1f} ms per patch")

    report = {
        "store": str(args.store) if args.store else None,
        "raw": str(args.raw) if args.raw else None,
        "patch": patch,
        "n": args.n,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "fg_fraction_store": args.fg_fraction,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "zarr": zarr.__version__, "numpy": np.__version__},
        "results": results,
        "speedup_over_nifti": speedup,
        "finish_batch_cpu_ms_per_patch": finish_ms,
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
