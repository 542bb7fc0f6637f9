"""Reading the mtcmkd Zarr store (format version 1, see docs/STORE.md).

This module only reads: the store is written by `mtcmkd preprocess`. Everything here works on
plain `zarr` groups, so a store can also be inspected by hand with the same calls.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr
import zarr.errors

STORE_FORMAT = "mtcmkd-brats-zarr"
"""Value of the root attribute `format` of every mtcmkd store."""

STORE_FORMAT_VERSION = 1
"""The `format_version` this reader understands."""


class StoreFormatError(ValueError):
    """The path exists but is not an mtcmkd store this version of the code can read."""


_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def is_valid_case_id(case_id: object) -> bool:
    """Case ids become folder names in the store: a string of a safe character set.

    Letters, digits, `_`, `.` and `-`, not starting with `.` or `-` (so never `..`, a hidden
    name or a path).
    """
    return isinstance(case_id, str) and _CASE_ID.fullmatch(case_id) is not None


def open_store(path: str | Path) -> zarr.Group:
    """Open an mtcmkd store read-only and check its format.

    Args:
        path: the store directory (the folder holding the root `zarr.json`).

    Returns:
        The root group, opened with `mode="r"` (writes raise).

    Raises:
        FileNotFoundError: `path` does not exist.
        StoreFormatError: `path` is not a Zarr v3 group, or its root attributes `format` /
            `format_version` are not those of an mtcmkd store of version 1. The message names
            the path and says how to make a valid store.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such store; create it with `mtcmkd preprocess RAW {path}`"
        )
    if not (path / "zarr.json").is_file():
        raise StoreFormatError(
            f"{path}: not a Zarr v3 store (no zarr.json at its root); "
            f"create it with `mtcmkd preprocess RAW {path}`"
        )
    try:
        group = zarr.open_group(store=str(path), mode="r", zarr_format=3)
    except (zarr.errors.NodeTypeValidationError, zarr.errors.GroupNotFoundError) as err:
        raise StoreFormatError(f"{path}: the root is not a Zarr group ({err})") from err

    found_format = group.attrs.get("format")
    if found_format != STORE_FORMAT:
        raise StoreFormatError(
            f"{path}: not an mtcmkd store (root attribute format={found_format!r}, "
            f"expected {STORE_FORMAT!r}); create one with `mtcmkd preprocess RAW STORE`"
        )
    found_version = group.attrs.get("format_version")
    if found_version != STORE_FORMAT_VERSION:
        raise StoreFormatError(
            f"{path}: store format_version={found_version!r}, this code reads version "
            f"{STORE_FORMAT_VERSION}; re-run `mtcmkd preprocess` with this version of mtcmkd"
        )
    if "cases" not in group.attrs:
        # `preprocess` marks a new store first and writes the other root attributes last.
        raise StoreFormatError(
            f"{path}: the store was never finished (its first `mtcmkd preprocess` run was "
            f"interrupted); re-run `mtcmkd preprocess RAW {path}`"
        )
    return group


@dataclass(frozen=True)
class StoreInfo:
    """The root attributes of a store that the data pipeline needs.

    Attributes:
        channels: modality names in the order of the image's first axis,
            e.g. `("t1", "t1ce", "t2", "flair")`.
        cases: every case id in the store, sorted.
        labelled_cases: the ids of the cases that have a `label` array, sorted.
        folds: case id -> fold index in `[0, n_folds)`, for the labelled cases.
        n_folds: the number of cross-validation folds.
        fold_seed: the seed the folds were dealt with (recorded for provenance).
        regions: region name -> canonical labels it contains, in store order
            (`{"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}`).
        test_cases: the labelled cases held out as the test set, sorted: in no fold, never
            trained or validated on. Empty for a store written before test sets existed
            (no `test_cases` attribute) or preprocessed with `--test-fraction 0`.
    """

    channels: tuple[str, ...]
    cases: tuple[str, ...]
    labelled_cases: tuple[str, ...]
    folds: Mapping[str, int]
    n_folds: int
    fold_seed: int
    regions: Mapping[str, tuple[int, ...]]
    test_cases: tuple[str, ...] = ()

    @classmethod
    def from_group(cls, group: zarr.Group) -> StoreInfo:
        """Read the info from the root group returned by `open_store`.

        Raises:
            StoreFormatError: a required root attribute is missing or malformed; the message
                names the attribute and the store.
        """
        attrs: Mapping[str, Any] = group.attrs.asdict()
        where = str(group.store)
        try:
            folds = attrs["folds"]
            info = cls(
                channels=tuple(str(c) for c in attrs["channels"]),
                cases=tuple(str(c) for c in attrs["cases"]),
                labelled_cases=tuple(str(c) for c in attrs["labelled_cases"]),
                folds={str(k): int(v) for k, v in folds["assignment"].items()},
                n_folds=int(folds["n_folds"]),
                fold_seed=int(folds["seed"]),
                regions={str(k): tuple(int(x) for x in v) for k, v in attrs["regions"].items()},
                # absent in stores written before test sets existed: they have none
                test_cases=tuple(sorted(str(c) for c in attrs.get("test_cases") or ())),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise StoreFormatError(
                f"{where}: malformed root attributes ({type(err).__name__}: {err}); "
                "see docs/STORE.md for the expected keys"
            ) from err
        for key in ("cases", "labelled_cases", "test_cases"):
            # A string is iterable too: "cases": "abc" would read as three cases.
            if key in attrs and not isinstance(attrs[key], list):
                raise StoreFormatError(
                    f"{where}: malformed root attributes ({key} is a "
                    f"{type(attrs[key]).__name__}, not a list); see docs/STORE.md"
                )
        bad = [c for key in ("cases", "labelled_cases") for c in attrs[key]
               if not is_valid_case_id(c)]
        if bad:
            raise StoreFormatError(
                f"{where}: invalid case id(s) in the root attributes: {bad[:3]!r} (expected "
                "names like BraTS2021_00000); re-run `mtcmkd preprocess` into a new store"
            )
        unlabelled_test = sorted(set(info.test_cases) - set(info.labelled_cases))
        if unlabelled_test:
            raise StoreFormatError(
                f"{where}: test_cases that are not labelled cases: {unlabelled_test[:5]}; "
                "see docs/STORE.md"
            )
        unassigned = [c for c in info.labelled_cases
                      if c not in info.folds and c not in info.test_cases]
        if unassigned:
            raise StoreFormatError(
                f"{where}: labelled cases without a fold in folds.assignment: {unassigned[:5]}"
            )
        return info

    @classmethod
    def read(cls, path: str | Path) -> StoreInfo:
        """`open_store(path)` then `from_group`; same errors as both."""
        return cls.from_group(open_store(path))


def split_cases(info: StoreInfo, fold: int) -> tuple[list[str], list[str]]:
    """Training and validation case ids of one cross-validation fold.

    Args:
        info: the store's info.
        fold: the held-out fold, in `[0, info.n_folds)`.

    Returns:
        `(train_ids, val_ids)`, both sorted: the validation ids are the labelled cases assigned
        to `fold`, the training ids all other labelled cases. Unlabelled cases and the test
        cases (`held_out_test_ids`) are in neither.

    Raises:
        ValueError: `fold` is out of range, or the split leaves either side empty (e.g. a store
            with a single fold or fewer cases than folds).
    """
    if not 0 <= fold < info.n_folds:
        raise ValueError(f"fold {fold} out of range: the store has {info.n_folds} folds")
    test = set(info.test_cases)
    # Test cases never carry a fold, but a hand-edited store might: they stay out regardless.
    in_folds = [c for c in info.labelled_cases if c not in test]
    val_ids = sorted(c for c in in_folds if info.folds[c] == fold)
    train_ids = sorted(c for c in in_folds if info.folds[c] != fold)
    if not val_ids or not train_ids:
        raise ValueError(
            f"fold {fold} gives {len(train_ids)} training and {len(val_ids)} validation cases "
            f"({len(info.labelled_cases)} labelled cases in {info.n_folds} folds); "
            "both must be non-empty"
        )
    return train_ids, val_ids


def held_out_test_ids(info: StoreInfo) -> list[str]:
    """The store's test case ids, sorted: disjoint from every fold's training and validation
    ids; empty for a store without a test set (written before test sets existed, or with
    `--test-fraction 0`)."""
    return sorted(info.test_cases)


def incomplete_cases(path: str | Path) -> dict[str, str]:
    """Cases of the store at `path` that are not completely written, with the reason for each.

    A case is complete when its group carries its attributes (written last by `preprocess`)
    and every array the attributes promise has its metadata and its data: `image`, and for a
    labelled case `label` and `foreground/{WT,TC,ET}`. A case listed in the root attribute
    `cases` without its folder is incomplete too, as is a case folder whose name is not a
    valid case id. Only the file system is inspected, so this is cheap (no chunk is
    decompressed).

    Returns:
        case id -> one-line reason, for every incomplete case, sorted by id; empty when all
        are complete.
    """
    path = Path(path)
    cases_dir = path / "cases"
    problems: dict[str, str] = {}
    if cases_dir.is_dir():
        for case_dir in sorted(p for p in cases_dir.iterdir() if p.is_dir()):
            reason = (case_problem(case_dir) if is_valid_case_id(case_dir.name)
                      else "not a valid case id (a stray folder)")
            if reason is not None:
                problems[case_dir.name] = reason
    listed = _root_attributes(path).get("cases")
    for cid in listed if isinstance(listed, list) else []:
        if is_valid_case_id(cid) and not (cases_dir / cid).is_dir():
            problems[cid] = "listed in the root attributes but its folder is missing"
    return dict(sorted(problems.items()))


def _root_attributes(path: Path) -> dict[str, Any]:
    """The root group's attributes as written, or {} when unreadable (checked elsewhere)."""
    try:
        doc = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return {}
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    return attrs if isinstance(attrs, dict) else {}


def case_problem(case_dir: Path) -> str | None:
    """Why the case group at `case_dir` is incomplete, or None when it is complete."""
    meta = case_dir / "zarr.json"
    if not meta.is_file():
        return "no zarr.json"
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError) as err:
        return f"unreadable zarr.json ({err})"
    if not isinstance(attrs, dict) or attrs.get("case_id") != case_dir.name:
        return "group attributes missing (the case was never finished)"
    # A foreground array of an empty region (a case without ET) holds no chunk: metadata only.
    arrays = {"image": True}
    if attrs.get("labelled"):
        arrays.update({"label": True, "foreground/WT": False, "foreground/TC": False,
                       "foreground/ET": False})
    for name, needs_data in arrays.items():
        arr = case_dir / name
        if not (arr / "zarr.json").is_file():
            return f"array {name!r} missing"
        if needs_data and not (arr / "c").exists():
            return f"array {name!r} has no data"
    return None


def check_store_complete(path: str | Path) -> None:
    """Raise `StoreFormatError` naming the incomplete cases of the store at `path`, if any."""
    problems = incomplete_cases(path)
    if problems:
        shown = "; ".join(f"{cid}: {why}" for cid, why in list(problems.items())[:3])
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise StoreFormatError(
            f"{path}: {len(problems)} incomplete case(s): {shown}{more}; re-run "
            "`mtcmkd preprocess` on the same raw folder to repair them"
        )


def store_fingerprint(path: str | Path) -> str:
    """SHA-256 over what a trained model depends on: every case's attributes, folds, test set.

    Two stores with the same fingerprint hold the same cases converted from the same source
    files (the case attributes carry each source file's SHA-256) with the same fold and test
    assignment. Adding, removing or re-converting a case, or re-dealing the folds or the test
    set, changes it. An empty test set is not hashed, so a store written before test sets
    existed keeps its fingerprint (and its runs stay valid) when re-preprocessed with
    `--test-fraction 0`. Reads only `zarr.json` files.
    """
    path = Path(path)
    digest = hashlib.sha256()
    root_attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    split: dict[str, Any] = {"cases": root_attrs.get("cases"), "folds": root_attrs.get("folds")}
    if root_attrs.get("test_cases"):
        split["test_cases"] = root_attrs["test_cases"]
    digest.update(json.dumps(split, sort_keys=True).encode())
    for cid in root_attrs.get("cases") or []:
        meta = path / "cases" / str(cid) / "zarr.json"
        attrs = json.loads(meta.read_text()).get("attributes", {}) if meta.is_file() else None
        digest.update(json.dumps([cid, attrs], sort_keys=True).encode())
    return digest.hexdigest()
