"""Write a file so readers see the old one or the complete new one, never a partial file."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; it replaces `path` when the block succeeds.

    `suffix` ends the temporary name, for writers that choose the format from the extension
    (e.g. ".nii.gz" for nibabel). On an error the temporary file is removed and `path` is
    untouched. The rename is atomic on one file system.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """`Path.write_text` (UTF-8) through `atomic_output`."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
