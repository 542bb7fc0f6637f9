"""The two errors of `mtcmkd predict` and `evaluate`; each ``str()`` is one line for the CLI.

- :class:`InputError` (from :mod:`mtcmkd.nifti_io`, the one for every file the package reads):
  a file or folder is wrong, ``<path>: <reason>``.
- :class:`EvaluationError`: anything else the user must fix (an option value, a run folder
  whose files another module refused with its own message naming the file).
"""

from __future__ import annotations

from mtcmkd.nifti_io import InputError

__all__ = ["EvaluationError", "InputError"]


class EvaluationError(ValueError):
    """Something a user can fix that is not one bad path; ``str()`` is one line."""
