"""The parallel driver of `mtcmkd preprocess`: discover, convert every case, finalise the store."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zarr

from mtcmkd.brats import CANONICAL_LABELS, CHANNELS, REGIONS
from mtcmkd.data.store import STORE_FORMAT, STORE_FORMAT_VERSION

from .convert import CaseResult, ConvertOptions, convert_case
from .discover import CaseSource, DatasetError, discover_cases, is_valid_case_id

REPORT_NAME = "preprocess_report.json"


@dataclass
class PreprocessReport:
    raw: str
    store: str
    releases: list[str]
    results: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if r.status == "failed"]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    def to_json(self) -> dict:
        return {
            "raw": self.raw,
            "store": self.store,
            "releases": self.releases,
            "n_cases": len(self.results),
            "n_converted": self.count("converted"),
            "n_skipped": self.count("skipped"),
            "n_failed": self.count("failed"),
            "seconds": round(self.seconds, 3),
            "failures": [{"case_id": r.case_id, "file": r.file, "error": r.error}
                         for r in self.failed],
            "cases": [asdict(r) for r in self.results],
        }


def fold_assignment(case_ids: Iterable[str], n_folds: int, seed: int) -> dict[str, int]:
    """Deterministic k-fold split: sort, shuffle with `seed`, deal round-robin."""
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    return {ids[j]: int(pos % n_folds) for pos, j in enumerate(order)}


def _worker_init() -> None:
    # One process per core: let blosc use one thread so workers do not oversubscribe the CPU.
    from numcodecs import blosc

    blosc.set_nthreads(1)


def open_or_create_store(store: Path) -> zarr.Group:
    """Open an mtcmkd store for writing, creating it when absent; refuse foreign folders."""
    if store.exists() and not store.is_dir():
        raise DatasetError(f"{store}: exists and is not a folder")
    if store.is_dir() and any(store.iterdir()):
        meta = store / "zarr.json"
        if not meta.is_file():
            raise DatasetError(f"{store}: folder is not empty and is not an mtcmkd store; "
                               "choose a new path")
        root = zarr.open_group(str(store), mode="r+")
        fmt = root.attrs.get("format")
        if fmt not in (None, STORE_FORMAT):
            raise DatasetError(f"{store}: a Zarr store of another format ({fmt!r})")
    else:
        root = zarr.open_group(str(store), mode="a", zarr_format=3)
    if "cases" not in root:
        root.create_group("cases")
    return root


def finalise_store(store: Path, n_folds: int, seed: int, image_dtype: str) -> dict:
    """Recompute the root attributes from the finished cases (no timestamps: reproducible)."""
    root = zarr.open_group(str(store), mode="r+")
    cases_dir = store / "cases"
    ids = sorted(p.name for p in cases_dir.iterdir() if (p / "zarr.json").is_file())
    labelled = [cid for cid in ids if (cases_dir / cid / "label" / "zarr.json").is_file()]
    attrs = {
        "format": STORE_FORMAT,
        "format_version": STORE_FORMAT_VERSION,
        "channels": list(CHANNELS),
        "labels": {str(k): v for k, v in CANONICAL_LABELS.items()},
        "regions": {k: list(v) for k, v in REGIONS.items()},
        "cases": ids,
        "labelled_cases": labelled,
        "folds": {"n_folds": n_folds, "seed": seed,
                  "assignment": fold_assignment(labelled, n_folds, seed)},
        "image_dtype": image_dtype,
    }
    root.attrs.put(attrs)  # replace, not merge: keys of an older format must not linger
    return attrs


def _resolve_labels(cases: list[CaseSource], labels: str) -> bool:
    if labels == "required":
        return True
    if labels == "optional":
        return False
    # auto: a training release (any seg present) requires a seg for every case.
    return any(c.has_seg for c in cases)


def preprocess(raw: Path, store: Path, *, year: str | None = None, workers: int = 1,
               n_folds: int = 5, seed: int = 0, image_dtype: str = "float16", chunk: int = 64,
               codec: str = "lz4", labels: str = "auto",
               on_start: Callable[[int], None] | None = None,
               on_result: Callable[[CaseResult], None] | None = None) -> PreprocessReport:
    """Convert every case of `raw` into the Zarr store `store`.

    Resumable: finished cases are skipped, leftovers of a killed run are discarded. Cases that
    fail are reported (one line each) and leave nothing behind; the other cases still complete.

    Raises:
        DatasetError: `raw` holds no BraTS case or `store` is not usable.
    """
    if n_folds < 2:
        raise DatasetError(f"--folds must be >= 2 (got {n_folds})")
    if image_dtype not in ("float16", "float32"):
        raise DatasetError(f"--dtype must be float16 or float32 (got {image_dtype})")
    start = time.perf_counter()
    raw, store = Path(raw), Path(store)
    cases = discover_cases(raw, year)
    for case in cases:
        if case.problem is None and not is_valid_case_id(case.case_id):
            case.problem, case.problem_file = "case id has unsupported characters", case.folder
    open_or_create_store(store)
    shutil.rmtree(store / ".staging", ignore_errors=True)  # leftovers of a killed run
    if codec not in ("lz4", "zstd"):
        raise DatasetError(f"--codec must be lz4 or zstd (got {codec})")
    options = ConvertOptions(image_dtype=image_dtype, chunk=chunk, codec=codec,
                             labels_required=_resolve_labels(cases, labels), raw_root=str(raw))
    report = PreprocessReport(raw=str(raw), store=str(store),
                              releases=sorted({c.release for c in cases}))
    if on_start is not None:
        on_start(len(cases))

    def record(result: CaseResult) -> None:
        report.results.append(result)
        if on_result is not None:
            on_result(result)

    if workers <= 1:
        _worker_init()
        for case in cases:
            record(convert_case(case, store, options))
    else:
        # fork: workers start fast and inherit the imports; no threads exist yet at this point.
        ctx = mp.get_context("fork") if os.name == "posix" else mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                 initializer=_worker_init) as pool:
            futures = [pool.submit(convert_case, case, store, options) for case in cases]
            for fut in as_completed(futures):
                record(fut.result())
    report.results.sort(key=lambda r: r.case_id)
    finalise_store(store, n_folds, seed, image_dtype)
    shutil.rmtree(store / ".staging", ignore_errors=True)
    report.seconds = time.perf_counter() - start
    (store / REPORT_NAME).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report
