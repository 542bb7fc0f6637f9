"""Walking a raw data tree so that nothing is skipped silently.

`walk_raw` yields every folder of a tree (symbolic links followed, each real folder once) and
records every entry it does not hand on (hidden files, broken links, unreadable folders, second
links to one folder) as a `NotTaken` with its reason. Preprocessing (`preprocessing/discover.py`)
and predict (`mtcmkd/evaluation/prediction_inputs.py`) build their cases on top of it, so both
stages name what they leave out in the same words.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mtcmkd.nifti_io import is_nifti_name


@dataclass(frozen=True)
class NotTaken:
    """A file or folder of the raw tree that no case uses, and why (shown to the user)."""

    path: Path
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"path": str(self.path), "reason": self.reason}


@dataclass
class RawFolder:
    """One folder met by `walk_raw`: its sub-folders, NIfTI files and other files (names)."""

    path: Path
    subfolders: list[str]
    niftis: list[str]
    others: list[str]
    empty: bool = False


def walk_raw(root: Path, not_taken: list[NotTaken]) -> Iterator[RawFolder]:
    """Every folder under `root` (itself first), depth first in name order.

    Symbolic links to folders are followed (clusters often link case folders in from a shared
    copy); a folder reached twice (a second link to it, or a link cycle) is read once and the
    later path is recorded in `not_taken`, as are hidden entries (`.DS_Store`, macOS `._*`),
    broken links and unreadable folders. Nothing is skipped without an entry in `not_taken`.

    As with `os.walk`, a caller prunes the walk by editing the yielded folder's `subfolders`
    before asking for the next folder (`predict` does not look inside a case folder).
    """
    seen: dict[str, Path] = {}

    def visit(folder: Path) -> Iterator[RawFolder]:
        real = os.path.realpath(folder)
        if real in seen:
            not_taken.append(NotTaken(folder, f"same folder as {seen[real]} (a symbolic link); "
                                              "read once"))
            return
        seen[real] = folder
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            not_taken.append(NotTaken(folder, f"cannot read the folder ({exc.strerror})"))
            return
        here = RawFolder(folder, [], [], [], empty=not entries)
        for entry in entries:
            path = folder / entry.name
            if entry.name.startswith("."):
                not_taken.append(NotTaken(path, "hidden entry (names starting with '.' are "
                                                "ignored)"))
            elif entry.is_dir():  # follows symbolic links
                here.subfolders.append(entry.name)
            elif entry.is_file():
                (here.niftis if is_nifti_name(entry.name) else here.others).append(entry.name)
            elif entry.is_symlink():
                not_taken.append(NotTaken(path, "broken symbolic link"))
            else:
                not_taken.append(NotTaken(path, "not a regular file or folder"))
        yield here
        for name in here.subfolders:
            yield from visit(folder / name)

    yield from visit(root)
