"""Content digests of the weights files mtcmkd writes, checked at every load.

`torch.load(weights_only=True)` refuses tampered pickles but not flipped bytes inside a tensor:
a damaged checkpoint or student file loads and silently produces wrong weights. Every weights
file therefore carries a digest of its tensors, recorded at save and verified at load:

- student files (`student.pt`, `best_student.pt`): the field `weights_sha256` of the saved dict,
  the :func:`weights_digest` of its `state_dict`;
- checkpoints: the SHA-256 of every file of the step folder, in the step's `COMPLETE` file
  (:func:`file_sha256`);
- TorchScript exports: the extra file `weights_sha256`, the :func:`weights_digest` of the
  scripted module's `state_dict()` (the C++ client computes the same digest);
- `.pt2` exports: the same extra file, over the exported program's `state_dict`.

Files written before digests existed carry none; they still load, with a one-line warning
(:func:`warn_unverified`).

The digest is defined byte for byte so that other languages can reproduce it: hex SHA-256 over
the entries sorted by name, each fed as `name`, NUL, dtype name without "torch." (`float32`),
NUL, the shape as comma-separated integers (empty for a scalar), NUL, then the raw bytes of the
contiguous tensor on the CPU in native (little-endian) byte order.
"""

from __future__ import annotations

import hashlib
import pickle
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mtcmkd.messages import first_line

__all__ = [
    "CheckpointError",
    "WEIGHTS_DIGEST_KEY",
    "WeightsIntegrityError",
    "file_sha256",
    "safe_torch_load",
    "warn_unverified",
    "weights_digest",
]

#: Name of the digest: a key of the student dict, the TorchScript / .pt2 extra file.
WEIGHTS_DIGEST_KEY = "weights_sha256"

_CHUNK = 1 << 20


class WeightsIntegrityError(ValueError):
    """A weights file's content does not match the digest recorded when it was written."""


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # A 1-D uint8 view reads the bytes of any dtype (bf16 included) without conversion; the
    # reshape makes a 0-dim tensor viewable.
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 of a state dict: names, dtypes, shapes and raw bytes, sorted by name.

    Args:
        state: parameter/buffer name -> tensor (any device, any dtype).

    Returns:
        64 lower-case hex digits; equal for equal tensors, whatever their device or strides.
    """
    if sys.byteorder != "little":  # the definition is little-endian; no such host in use
        raise RuntimeError("weights_digest is defined for little-endian hosts only")
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(str(t.dtype).removeprefix("torch.").encode())
        digest.update(b"\0")
        digest.update(",".join(map(str, t.shape)).encode())
        digest.update(b"\0")
        digest.update(_tensor_bytes(t))
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


_warned: set[str] = set()


def warn_unverified(path: str | Path, what: str = "weights file") -> None:
    """One line on stderr, once per file and process: `path` has no digest to verify.

    Files written before digests existed still load; the warning says that their content
    cannot be checked, and how to get a file that can be (re-save or re-export it).
    """
    key = str(path)
    if key in _warned:
        return
    _warned.add(key)
    print(f"warning: {path}: {what} without a content digest (written before mtcmkd recorded "
          "one); loaded unverified", file=sys.stderr)


#: What torch.save writes: a zip archive (since torch 1.6) or a legacy pickle (protocol 2+).
_PICKLE_MAGIC = b"\x80"


class CheckpointError(RuntimeError):
    """A weights file (checkpoint, student file) is missing, incomplete, tampered with or from another configuration."""


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """`torch.load` restricted to tensors and plain containers (weights_only=True).

    Raises:
        CheckpointError: not a file `torch.save` wrote (a text file, say), a file that needs
            arbitrary objects to unpickle, or a damaged one; the message names the file.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc.strerror or exc})") from None
    # torch.load on a text file fails in many ways (KeyError, IndexError "pop from empty
    # list", UnpicklingError "Unsupported operand"): look at the first bytes instead.
    if not (zipfile.is_zipfile(path) or head.startswith(_PICKLE_MAGIC)):
        raise CheckpointError(f"{path}: not a PyTorch weights file (torch.save writes a zip "
                              "archive; this file is not one)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = first_line(exc)
        raise CheckpointError(f"{path}: refused to load: the file holds objects other than "
                              f"weights and plain values (tampered or foreign file?): {first}"
                              ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError,
            zipfile.BadZipFile) as exc:
        first = first_line(exc)
        raise CheckpointError(f"{path}: unreadable checkpoint file ({first})") from None
