"""`mtcmkd store-info`: what a preprocessed store holds, at a glance (or as JSON)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from .console import console, failer

fail = failer("store-info")


def store_summary(path: Path) -> dict:
    """Plain-dict summary of a store (no mtcmkd needed to read the store itself).

    Raises:
        FileNotFoundError, StoreFormatError: not a store, malformed root attributes, or an
            incomplete case (checked up front, before any case is read).
    """
    from mtcmkd.data import StoreInfo, check_store_complete, open_store

    root = open_store(path)
    StoreInfo.from_group(root)  # the root attributes and their case ids are well formed
    check_store_complete(path)
    attrs = dict(root.attrs)
    cases = root["cases"]
    shapes, releases, et_cases = [], Counter(), 0
    for cid in attrs["cases"]:
        g = cases[cid]
        shapes.append(g["image"].shape[1:])
        releases[g.attrs.get("release", "?")] += 1
        if "label" in g and g["foreground"]["ET"].shape[0] > 0:
            et_cases += 1
    first = cases[attrs["cases"][0]]["image"] if attrs["cases"] else None
    sizes = Counter(attrs["folds"]["assignment"].values())
    return {
        "store": str(path),
        "format": f"{attrs['format']} v{attrs['format_version']}",
        "channels": attrs["channels"],
        "cases": len(attrs["cases"]),
        "labelled": len(attrs["labelled_cases"]),
        "cases_with_et": et_cases,
        "releases": dict(releases),
        "folds": [sizes.get(k, 0) for k in range(attrs["folds"]["n_folds"])],
        "image_dtype": attrs.get("image_dtype"),
        "chunks": list(first.chunks) if first is not None else None,
        "mean_cropped_shape": np.mean(shapes, axis=0).round(1).tolist() if shapes else None,
        "size_mb": round(sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
                         / 1e6, 1),
    }


def store_info(
    store: Annotated[Path, typer.Argument(help="A store written by `mtcmkd preprocess`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Summarise a preprocessed store: cases, labels, folds, shapes, size."""
    from mtcmkd.data import StoreFormatError

    try:
        summary = store_summary(store)
    except (FileNotFoundError, StoreFormatError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    table = Table(title=f"store {store}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value))
    console.print(table)
