"""The parallel driver of `mtcmkd preprocess`: discover, convert every case, finalise the store.

One writer at a time: a run holds `STORE/.lock` (flock) from before its first write to after
its last, stages cases in its own `STORE/.staging/<pid>-<random>/`, and at its start removes
what killed runs left (staging, incomplete cases). See docs/STORE.md.
"""

from __future__ import annotations

import fcntl
import gc
import json
import math
import multiprocessing as mp
import os
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import zarr

from mtcmkd.brats import CANONICAL_LABELS, CHANNELS, REGIONS
from mtcmkd.data.store import (
    STORE_FORMAT,
    STORE_FORMAT_VERSION,
    incomplete_cases,
    is_valid_case_id,
)

from .convert import CaseResult, ConvertOptions, convert_case
from .discover import CaseSource, DatasetError, NotTaken, scan_raw

REPORT_NAME = "preprocess_report.json"
LOCK_NAME = ".lock"
STAGING_NAME = ".staging"
DEFAULT_FOLDS = 5
DEFAULT_SEED = 0
#: Share of the labelled cases held out as the test set when neither the run nor the store says.
DEFAULT_TEST_FRACTION = 0.2
#: With fewer labelled cases no test set is held out: the folds need the cases more.
MIN_CASES_FOR_TEST = 5
#: Second entropy word of the test deal's generator, so it is not the folds' shuffle replayed.
_TEST_STREAM = 1
#: What `preprocess` itself puts at a store's root (anything else makes a folder foreign).
_OWN_ENTRIES = frozenset({"zarr.json", "cases", LOCK_NAME, STAGING_NAME, REPORT_NAME})


class StoreLockedError(DatasetError):
    """Another `mtcmkd preprocess` holds the store's lock (and `wait` was not asked for)."""


@dataclass
class PreprocessReport:
    raw: str
    store: str
    releases: list[str]
    results: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0
    not_taken: list[NotTaken] = field(default_factory=list)
    #: incomplete cases found in the store at the start (removed; re-converted when in RAW)
    incomplete: dict[str, str] = field(default_factory=dict)
    #: how the folds were decided (`finalise_store`)
    folds: dict = field(default_factory=dict)
    #: how the test set was decided (`finalise_store`)
    test: dict = field(default_factory=dict)

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def removed(self) -> list[str]:
        """Incomplete cases removed from the store and not re-converted (not in RAW)."""
        taken = {r.case_id for r in self.results}
        return [cid for cid in self.incomplete if cid not in taken]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    def to_json(self) -> dict:
        return {
            "raw": self.raw,
            "store": self.store,
            "releases": self.releases,
            "n_cases": len(self.results),
            "n_converted": self.count("converted"),
            "n_repaired": self.count("repaired"),
            "n_skipped": self.count("skipped"),
            "n_failed": self.count("failed"),
            "seconds": round(self.seconds, 3),
            "failures": [{"case_id": r.case_id, "file": r.file, "error": r.error}
                         for r in self.failed],
            "incomplete_found": [{"case_id": cid, "reason": why}
                                 for cid, why in self.incomplete.items()],
            "removed_incomplete": self.removed,
            "folds": self.folds,
            "test": self.test,
            "not_taken": [e.to_json() for e in self.not_taken],
            "cases": [asdict(r) for r in self.results],
        }


def fold_assignment(case_ids: Iterable[str], n_folds: int, seed: int) -> dict[str, int]:
    """Deterministic k-fold split: sort, shuffle with `seed`, deal round-robin."""
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    return {ids[j]: int(pos % n_folds) for pos, j in enumerate(order)}


def stable_fold_assignment(case_ids: Iterable[str], n_folds: int, seed: int,
                           previous: Mapping[str, int] | None) -> dict[str, int]:
    """Folds that keep every case of `previous` where it was; new cases go to the smallest folds.

    Without previous folds (a new store) this is `fold_assignment`. Otherwise the cases of
    `previous` that are still in `case_ids` keep their fold, and the new ones, in the order of
    a `seed` shuffle of their sorted ids, are each dealt to the fold with the fewest cases
    (the lowest index on ties). `previous` must come from the same `n_folds` and `seed`.
    """
    ids = sorted(set(case_ids))
    kept = {c: int(previous[c]) for c in ids
            if previous and c in previous and 0 <= int(previous[c]) < n_folds}
    if not kept:
        return fold_assignment(ids, n_folds, seed)
    new = [c for c in ids if c not in kept]
    sizes = [0] * n_folds
    for fold in kept.values():
        sizes[fold] += 1
    out = dict(kept)
    for j in np.random.default_rng(seed).permutation(len(new)):
        fold = min(range(n_folds), key=lambda k: (sizes[k], k))
        out[new[j]] = fold
        sizes[fold] += 1
    return dict(sorted(out.items()))


def held_out_count(n_labelled: int, fraction: float) -> int:
    """How many of `n_labelled` cases a new test set holds for the share `fraction`.

    `fraction * n_labelled` rounded half up, at least 1 and at most `n_labelled - 2` (two cases
    stay for the folds). 0 when `fraction` is 0 or fewer than `MIN_CASES_FOR_TEST` cases are
    labelled: a store that small is a smoke test, and every case is needed to train.
    """
    if fraction <= 0 or n_labelled < MIN_CASES_FOR_TEST:
        return 0
    return min(max(1, math.floor(fraction * n_labelled + 0.5)), n_labelled - 2)


def stable_test_cases(case_ids: Iterable[str], fraction: float, seed: int,
                      previous_test: Collection[str] | None,
                      previous_cases: Collection[str] = ()) -> list[str]:
    """The test set: cases of `previous_test` stay in it, new cases fill it up to the target.

    A new store (`previous_test` None): sort the ids, shuffle them with `seed` (a stream of its
    own, not the folds' shuffle) and take the first `held_out_count` of them. Otherwise the
    cases of `previous_test` still in `case_ids` stay test cases, the cases of
    `previous_cases` (every labelled case the store held before) keep their place in the
    folds, and the new ones, in the order of a `seed` shuffle of their sorted ids, go to the
    test set until it holds `held_out_count` cases of all of `case_ids` (fewer when too few
    new cases came), the rest to the folds. `previous_test` must come from the same
    `fraction` and `seed`.

    Returns:
        The test case ids, sorted.
    """
    ids = sorted(set(case_ids))
    target = held_out_count(len(ids), fraction)
    kept = set(previous_test or ()) & set(ids)
    before = set(previous_cases) | kept if previous_test is not None else set()
    new = [c for c in ids if c not in before]
    order = np.random.default_rng([seed, _TEST_STREAM]).permutation(len(new))
    taken = [new[j] for j in order[:max(0, target - len(kept))]]
    return sorted(kept | set(taken))


def _worker_init() -> None:
    # One process per core: let blosc use one thread so workers do not oversubscribe the CPU.
    from numcodecs import blosc

    blosc.set_nthreads(1)


def inspect_store(store: Path) -> dict | None:
    """Check, without writing, that `preprocess` may write `store`; return its root attributes.

    Accepted: a path that does not exist yet (under a folder), an empty folder, or an mtcmkd
    store of this format version, including one whose first run was killed (only our own
    entries: `.lock`, `.staging`, a root group with no attributes or only the format marker).
    Any other Zarr group is foreign and refused: its attributes and arrays are someone else's.

    Returns:
        The root attributes of an existing store; None when the store is new or empty.

    Raises:
        DatasetError: anything else (a file, a foreign folder or Zarr group, another format
            version, a path under a file).
    """
    if store.is_symlink() and not store.exists():
        raise DatasetError(f"{store}: a broken symbolic link; choose a new path")
    if not store.exists():
        ancestor = store.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise DatasetError(f"{store}: cannot create the store: {ancestor} is a file, "
                               "not a folder")
        return None
    if not store.is_dir():
        raise DatasetError(f"{store}: exists and is not a folder")
    try:
        entries = {p.name for p in store.iterdir()}
    except OSError as exc:
        raise DatasetError(f"{store}: cannot read the folder ({exc.strerror})") from None
    foreign = sorted(entries - _OWN_ENTRIES)
    if "zarr.json" not in entries:
        if entries - {LOCK_NAME, STAGING_NAME}:
            raise DatasetError(f"{store}: folder is not empty and is not an mtcmkd store "
                               f"(holds {foreign[0] if foreign else 'cases/'}); choose a new "
                               "path")
        return None
    try:
        doc = json.loads((store / "zarr.json").read_text())
    except (OSError, ValueError):
        raise DatasetError(f"{store}: zarr.json is not readable JSON; not an mtcmkd store, "
                           "choose a new path") from None
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        raise DatasetError(f"{store}: not a Zarr v3 group, so not an mtcmkd store; choose a new "
                           "path")
    attrs = doc.get("attributes") or {}
    fmt = attrs.get("format") if isinstance(attrs, dict) else None
    if fmt is None:
        if attrs or foreign:
            what = f"attributes {sorted(attrs)[:3]}" if attrs else f"entries {foreign[:3]}"
            raise DatasetError(f"{store}: a Zarr group that is not an mtcmkd store (no 'format' "
                               f"attribute; holds {what}); preprocess never writes into another "
                               "store: choose a new path")
        return None  # the empty group of an older version's killed first run
    if fmt != STORE_FORMAT:
        raise DatasetError(f"{store}: a Zarr store of another format ({fmt!r}); choose a new "
                           "path")
    if attrs.get("format_version") != STORE_FORMAT_VERSION:
        raise DatasetError(f"{store}: an mtcmkd store of format_version "
                           f"{attrs.get('format_version')!r}; this version writes "
                           f"{STORE_FORMAT_VERSION}: choose a new path")
    return attrs if "cases" in attrs else None


def open_or_create_store(store: Path) -> zarr.Group:
    """Open an mtcmkd store for writing, creating it when absent; refuse foreign folders.

    The root attributes `format` and `format_version` are written first (the marker that makes
    the folder recognisably ours if the run is killed); `finalise_store` writes the rest.
    """
    inspect_store(store)
    root = zarr.open_group(str(store), mode="a", zarr_format=3)
    if root.attrs.get("format") is None:
        root.attrs.put({"format": STORE_FORMAT, "format_version": STORE_FORMAT_VERSION})
    if "cases" not in root:
        root.create_group("cases")
    return root


@contextmanager
def store_lock(store: Path, *, wait: bool = False,
               on_wait: Callable[[int | None], None] | None = None) -> Iterator[None]:
    """Hold the store's write lock (`STORE/.lock`, an exclusive `flock`) for the block.

    The lock file holds the holder's pid while held and is emptied on release. The kernel
    releases the lock when the holder dies, so a killed run never leaves the store locked.

    Args:
        wait: block until the lock is free instead of refusing.
        on_wait: called with the holder's pid (None if unknown) before blocking.

    Raises:
        StoreLockedError: another process holds the lock and `wait` is False.
        DatasetError: the lock file cannot be created or locked (read-only store, a file
            system without locks).
    """
    path = store / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise DatasetError(f"{store}: cannot write the store ({exc.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            who = f"pid {holder}" if holder is not None else "another process"
            if not wait:
                raise StoreLockedError(
                    f"{store}: another `mtcmkd preprocess` ({who}) is writing this store; wait "
                    "for it to finish, or pass --wait to start when it does") from None
            if on_wait is not None:
                on_wait(holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise DatasetError(f"{store}: cannot lock the store ({exc.strerror}); the file "
                               "system must support flock") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a finished store carries no stale pid
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _lock_holder(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def _repair(store: Path) -> dict[str, str]:
    """Remove every incomplete case (and stale staging); returns case id -> reason.

    Only called with the lock held: any staging left is a killed run's, and an incomplete case
    is a killed (or, before the lock existed, a concurrent) run's leftover.
    """
    shutil.rmtree(store / STAGING_NAME, ignore_errors=True)
    problems = incomplete_cases(store)
    cases_dir = store / "cases"
    present = {p.name for p in cases_dir.iterdir()} if cases_dir.is_dir() else set()
    for cid in problems:
        if cid in present:  # never a path built from an attribute: only real children
            shutil.rmtree(cases_dir / cid)
    return problems


def finalise_store(store: Path, n_folds: int | None, seed: int | None, image_dtype: str,
                   previous: Mapping | None = None, test_fraction: float | None = None,
                   ) -> tuple[dict, dict, dict]:
    """Recompute the root attributes from the finished cases (no timestamps: reproducible).

    The test set is decided first (`stable_test_cases`), then the folds over the other labelled
    cases. Both are stable: with the `test_fraction`, `n_folds` and `seed` the store records in
    `previous` (the root attributes before this run), every case keeps its role and fold, and
    new cases fill the test set up to its share, then the smallest folds. Another fraction or
    seed re-deals the test set, and then the folds too, from scratch (as a new store would
    deal them); another `n_folds` re-deals the folds. None takes the recorded value, else the
    default (test fraction 0.2; `min(5, fold cases)` folds, at least 2; seed 0). A store
    written before test sets existed records no fraction: it gets a test set (and new folds)
    unless `test_fraction` is 0.

    Returns:
        The root attributes written, and summaries of the fold and of the test decision.
    """
    root = zarr.open_group(str(store), mode="r+")
    cases_dir = store / "cases"
    bad = incomplete_cases(store)
    ids = sorted(p.name for p in cases_dir.iterdir() if p.is_dir() and p.name not in bad)
    labelled = [cid for cid in ids if (cases_dir / cid / "label" / "zarr.json").is_file()]
    previous = previous or {}
    old = previous.get("folds") or {}
    old_assignment = old.get("assignment") if isinstance(old.get("assignment"), dict) else {}
    had_folds = bool(old_assignment) and {"n_folds", "seed"} <= set(old)
    if seed is None:
        seed = int(old["seed"]) if had_folds else DEFAULT_SEED

    old_test, old_fraction = previous.get("test_cases"), previous.get("test_fraction")
    had_test = isinstance(old_test, list) and isinstance(old_fraction, (int, float))
    old_seed = int(old["seed"]) if "seed" in old else None
    if test_fraction is None:
        test_fraction = float(old_fraction) if had_test else DEFAULT_TEST_FRACTION
    same_test = had_test and (float(old_fraction), old_seed) == (test_fraction, seed)
    before = [str(c) for c in previous.get("labelled_cases") or []]
    test = stable_test_cases(labelled, test_fraction, seed,
                             [str(c) for c in old_test] if same_test else None, before)
    kept_test = [c for c in test if same_test and c in old_test]
    test_summary: dict = {
        "fraction": test_fraction, "seed": seed, "n_test": len(test),
        "kept": len(kept_test),
        "dealt": sorted(c for c in test if c not in kept_test),
        # the cases a run trained on this store before may have seen: they now score it
        "from_folds": sorted(c for c in test if c in old_assignment and c not in kept_test),
        "redealt_from": ({"fraction": float(old_fraction), "seed": old_seed}
                         if had_test and not same_test else None),
        "created": bool(before) and not had_test and bool(test),
        "note": (f"{len(labelled)} labelled cases: fewer than {MIN_CASES_FOR_TEST}, so no test "
                 "set is held out; `mtcmkd evaluate --run` then needs --split validation"
                 if test_fraction > 0 and 0 < len(labelled) < MIN_CASES_FOR_TEST and not test
                 else None),
    }

    # A test set dealt anew (another fraction or seed, or a store that had none) deals the folds
    # anew too: keeping them would leave holes where cases left for the test set, and runs of
    # the old folds no longer match the store anyway (its fingerprint changed).
    test_redealt = (had_test and not same_test) or (not had_test and bool(before) and bool(test))
    test_summary["folds_redealt"] = test_redealt and had_folds
    in_folds = [c for c in labelled if c not in set(test)]
    if n_folds is None:
        n_folds = int(old["n_folds"]) if had_folds else max(2, min(DEFAULT_FOLDS, len(in_folds)))
    same = had_folds and (int(old["n_folds"]), int(old["seed"])) == (n_folds, seed)
    keep = same and not test_redealt
    assignment = stable_fold_assignment(in_folds, n_folds, seed,
                                        old_assignment if keep else None)
    kept = [c for c in in_folds if keep and c in old_assignment]
    summary: dict = {
        "n_folds": n_folds, "seed": seed,
        "kept": len(kept),
        "dealt": sorted(c for c in in_folds if c not in kept),
        "redealt_from": ({"n_folds": int(old["n_folds"]), "seed": int(old["seed"])}
                         if had_folds and not same else None),
        "note": (f"{len(in_folds)} labelled case(s): the store cannot be split into folds for "
                 "training (needs at least 2)" if len(in_folds) < 2 and in_folds
                 else f"{len(in_folds)} labelled cases for {n_folds} folds: some folds are "
                 "empty" if 2 <= len(in_folds) < n_folds else None),
    }
    attrs = {
        "format": STORE_FORMAT,
        "format_version": STORE_FORMAT_VERSION,
        "channels": list(CHANNELS),
        "labels": {str(k): v for k, v in CANONICAL_LABELS.items()},
        "regions": {k: list(v) for k, v in REGIONS.items()},
        "cases": ids,
        "labelled_cases": labelled,
        # sorted: the same folds give the same bytes, however they were decided
        "folds": {"n_folds": n_folds, "seed": seed, "assignment": dict(sorted(assignment.items()))},
        # held out of every fold: never trained or validated on, scored by `evaluate --run`
        "test_cases": test,
        "test_fraction": test_fraction,
        "image_dtype": image_dtype,
    }
    root.attrs.put(attrs)  # replace, not merge: keys of an older format must not linger
    return attrs, summary, test_summary


def _resolve_labels(cases: list[CaseSource], labels: str) -> bool:
    if labels == "required":
        return True
    if labels == "optional":
        return False
    # auto: a training release (any seg present) requires a seg for every case.
    return any(c.has_seg for c in cases)


def _check_options(n_folds: int | None, image_dtype: str, chunk: int, codec: str, labels: str,
                   workers: int, test_fraction: float | None = None) -> None:
    if n_folds is not None and n_folds < 2:
        raise DatasetError(f"--folds must be >= 2 (got {n_folds})")
    if test_fraction is not None and not 0.0 <= test_fraction < 1.0:
        raise DatasetError(f"--test-fraction must be in [0, 1) (got {test_fraction}); 0 holds "
                           "out no test set")
    if image_dtype not in ("float16", "float32"):
        raise DatasetError(f"--dtype must be float16 or float32 (got {image_dtype})")
    if codec not in ("lz4", "zstd"):
        raise DatasetError(f"--codec must be lz4 or zstd (got {codec})")
    if labels not in ("auto", "required", "optional"):
        raise DatasetError(f"--labels must be auto, required or optional (got {labels})")
    if chunk < 8:
        raise DatasetError(f"--chunk must be >= 8 (got {chunk})")
    if workers < 1:
        raise DatasetError(f"--workers must be >= 1 (got {workers})")


def _check_folds(n_folds: int | None, raw: Path, store: Path, cases: list[CaseSource],
                 existing: Mapping | None, test_fraction: float | None = None) -> None:
    """Refuse `--folds` larger than the labelled cases the folds will hold (before writing).

    The folds get the labelled cases less the test set; its size is estimated as a new store
    would deal it (`held_out_count`), with the store's recorded fraction when none is given.
    """
    if n_folds is None:
        return
    labelled = {c.case_id for c in cases if c.problem is None and c.has_seg}
    if existing:
        labelled |= {str(c) for c in existing.get("labelled_cases") or []}
    if test_fraction is None:
        recorded = (existing or {}).get("test_fraction")
        test_fraction = (float(recorded) if isinstance(recorded, (int, float))
                         else DEFAULT_TEST_FRACTION)
    n_test = held_out_count(len(labelled), test_fraction)
    in_folds = len(labelled) - n_test
    if n_folds <= in_folds:
        return
    where = f"{raw} and {store}" if existing else str(raw)
    if len(labelled) < 2:
        raise DatasetError(f"{store}: --folds {n_folds} but only {len(labelled)} labelled "
                           f"case(s) in {where}: fewer than 2 labelled cases cannot be split "
                           "into folds (omit --folds to convert them anyway)")
    if n_test:
        raise DatasetError(f"{store}: --folds {n_folds} is more than the {in_folds} labelled "
                           f"cases left for the folds in {where} ({n_test} of {len(labelled)} "
                           f"held out as the test set, --test-fraction {test_fraction:g}); use "
                           f"--folds {in_folds} or fewer, or a smaller --test-fraction")
    raise DatasetError(f"{store}: --folds {n_folds} is more than the {len(labelled)} labelled "
                       f"cases in {where}; use --folds {len(labelled)} or fewer")


def preprocess(raw: Path, store: Path, *, year: str | None = None, workers: int = 1,
               n_folds: int | None = None, seed: int | None = None,
               test_fraction: float | None = None, image_dtype: str = "float16", chunk: int = 64, codec: str = "lz4",
               labels: str = "auto", wait: bool = False,
               on_wait: Callable[[int | None], None] | None = None,
               on_start: Callable[[int], None] | None = None,
               on_result: Callable[[CaseResult], None] | None = None) -> PreprocessReport:
    """Convert every case of `raw` into the Zarr store `store`.

    Resumable and safe to start twice: the run holds the store's lock throughout (a second
    run refuses, or waits with `wait`), stages cases in its own `.staging/<run>/`, removes a
    killed run's leftovers and re-converts incomplete cases ("repaired"). Cases that fail are
    reported (one line each) and leave nothing behind; the other cases still complete.
    Everything the raw tree holds that is not a case is in `report.not_taken`.

    Args:
        n_folds, seed: the fold split; None keeps what the store records (else 5 folds, or
            fewer for a store with fewer labelled cases, and seed 0). Folds are stable: cases
            already in the store keep their fold unless `n_folds`/`seed` change.
        test_fraction: share of the labelled cases held out as the test set, in [0, 1) (0:
            none); None keeps what the store records, else 0.2. Stable like the folds: test
            cases stay test cases unless the fraction or `seed` changes (`stable_test_cases`).
        wait: wait for another run holding the store's lock instead of refusing.
        on_wait: called with the other run's pid before waiting.

    Raises:
        DatasetError: an option is invalid, `raw` holds no BraTS case, `store` is not usable
            (all checked before anything is written), or the store is locked (StoreLockedError).
    """
    _check_options(n_folds, image_dtype, chunk, codec, labels, workers, test_fraction)
    start = time.perf_counter()
    raw, store = Path(raw), Path(store)
    scan = scan_raw(raw, year)
    cases = scan.cases
    for case in cases:
        if case.problem is None and not is_valid_case_id(case.case_id):
            case.problem, case.problem_file = "case id has unsupported characters", case.folder
    labels_required = _resolve_labels(cases, labels)
    _check_folds(n_folds, raw, store, cases, inspect_store(store), test_fraction)
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"{store}: cannot create the store ({exc.strerror})") from None

    with store_lock(store, wait=wait, on_wait=on_wait):
        # Read again under the lock: another run may have written the store since.
        previous = inspect_store(store)
        try:
            open_or_create_store(store)
        except OSError as exc:
            raise DatasetError(f"{store}: cannot write the store ({exc.strerror})") from None
        incomplete = _repair(store)
        run_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        options = ConvertOptions(image_dtype=image_dtype, chunk=chunk, codec=codec,
                                 labels_required=labels_required, raw_root=str(raw),
                                 staging=str(store / STAGING_NAME / run_id))
        report = PreprocessReport(raw=str(raw), store=str(store),
                                  releases=sorted({c.release for c in cases}),
                                  not_taken=scan.not_taken, incomplete=incomplete)
        if on_start is not None:
            on_start(len(cases))

        def record(result: CaseResult) -> None:
            if result.status == "converted" and result.case_id in incomplete:
                result = replace(result, status="repaired")
            report.results.append(result)
            if on_result is not None:
                on_result(result)

        if workers <= 1:
            _worker_init()
            for case in cases:
                record(convert_case(case, store, options))
        else:
            # fork: workers start fast and inherit the imports. A long-lived caller (a notebook,
            # a test session) may hold garbage whose destructors own C++ threads (a torch or
            # ONNX Runtime pool); a worker that collected it would abort on threads it does not
            # have. So collect it here, where the threads exist, and freeze what remains so the
            # workers never collect the parent's objects (the gc docs' fork recipe).
            ctx = mp.get_context("fork") if os.name == "posix" else mp.get_context("spawn")
            gc.collect()
            caller_froze = gc.get_freeze_count() > 0  # theirs stays frozen: undo only ours
            gc.freeze()
            try:
                with ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                         initializer=_worker_init) as pool:
                    futures = [pool.submit(convert_case, case, store, options) for case in cases]
                    for fut in as_completed(futures):
                        record(fut.result())
            finally:
                if not caller_froze:
                    gc.unfreeze()
        report.results.sort(key=lambda r: r.case_id)
        _, report.folds, report.test = finalise_store(store, n_folds, seed, image_dtype,
                                                      previous, test_fraction)
        shutil.rmtree(store / STAGING_NAME, ignore_errors=True)
        report.seconds = time.perf_counter() - start
        (store / REPORT_NAME).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report
