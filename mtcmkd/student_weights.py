"""The student weights file: what inference, evaluation and export load.

`student.pt` is a `torch.save`d dict of tensors and plain values only (loaded with
`weights_only=True`):

    format "mtcmkd-student", format_version 1, state_dict (the student network),
    config (the run's resolved config as plain dicts), config_hash, channels (student
    modalities, e.g. ["t1ce"]), n_out (the number of output channels, `n_classes` in the code;
    the key keeps its historical name), output ("softmax" or "regions"), patch_size,
    val_dice ({"WT": .., "TC": .., "ET": ..} or {}), step, epoch, mtcmkd_version,
    weights_sha256 (:func:`mtcmkd.integrity.weights_digest` of state_dict, verified at every
    load; absent in files written before it existed, which load with a one-line warning).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtcmkd import __version__
from mtcmkd.atomic import atomic_output
from mtcmkd.integrity import (
    WEIGHTS_DIGEST_KEY,
    WeightsIntegrityError,
    safe_torch_load,
    warn_unverified,
    weights_digest,
)
from mtcmkd.messages import first_line
from mtcmkd.models import build_network

FORMAT = "mtcmkd-student"
FORMAT_VERSION = 1


@dataclass
class StudentBundle:
    network: nn.Module
    channels: tuple[str, ...]
    output: str
    n_classes: int
    patch_size: tuple[int, int, int]
    meta: dict[str, Any]


def save_student(path: Path, network: nn.Module, *, config: dict, config_hash: str,
                 channels: tuple[str, ...], output: str, n_classes: int,
                 patch_size: tuple[int, int, int], val_dice: dict[str, float] | None = None,
                 step: int = 0, epoch: int = 0) -> None:
    """Write the file atomically (temporary name, then rename)."""
    state = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
             for k, v in network.state_dict().items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": state,
        "config": config,
        "config_hash": config_hash,
        "channels": list(channels),
        "output": output,
        "n_out": int(n_classes),  # the on-disk key keeps its historical name
        "patch_size": [int(p) for p in patch_size],
        "val_dice": dict(val_dice or {}),
        "step": int(step),
        "epoch": int(epoch),
        "mtcmkd_version": __version__,
        WEIGHTS_DIGEST_KEY: weights_digest(state),
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def resolve_student_path(path: Path) -> Path:
    """A run folder -> its best (else last) student file; a file -> itself."""
    path = Path(path)
    if path.is_dir():
        for name in ("best_student.pt", "student.pt"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: run folder holds no student weights "
                                "(best_student.pt or student.pt); has training finished a step?")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or run folder")
    return path


def exported_kind(path: Path) -> str | None:
    """What an exported file is (a sentence naming the command that made it and what runs
    it), or None for anything else. Read from the archive's member names only."""
    import zipfile

    if path.suffix == ".onnx":
        return "an ONNX export of `mtcmkd export onnx` (run it with ONNX Runtime)"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    if any("/code/__torch__" in n or n.endswith("/constants.pkl") for n in names):
        return ("a TorchScript export of `mtcmkd export torchscript` (run it with torch.jit.load "
                "or the C++ client in export/cpp)")
    if any(n.endswith("/archive_format") or "/aotinductor/" in n or "/serialized_exported_program"
           in n or n.endswith("/models/model.json") for n in names):
        return "a .pt2 export of `mtcmkd export` (load it with torch.export.load)"
    return None


def load_student(path: Path) -> StudentBundle:
    """Rebuild the student network from a weights file or run folder.

    Raises:
        FileNotFoundError: nothing there. ValueError: not a student file, or weights that do not
        fit the network its config describes. WeightsIntegrityError (a ValueError): weights
        that differ from the digest recorded at save (a damaged file). CheckpointError: a
        tampered or non-PyTorch file.
    """

    path = resolve_student_path(path)
    kind = exported_kind(path)
    if kind is not None:
        raise ValueError(f"{path}: {kind}, not student weights; predict, evaluate and export "
                         "take a run folder or its student.pt / best_student.pt")
    payload = safe_torch_load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not an mtcmkd student weights file")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: student file format version {payload.get('format_version')} "
                         f"is not supported (expected {FORMAT_VERSION})")
    _verify_digest(path, payload)
    model_cfg = payload["config"]["model"]
    widths = model_cfg.get("student_widths") or model_cfg.get("widths")
    n_classes = int(payload["n_out"])  # the on-disk key keeps its historical name
    net = build_network(model_cfg["kind"], len(payload["channels"]), n_classes,
                        None if widths is None else tuple(widths))
    try:
        net.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        first = first_line(exc)
        raise ValueError(f"{path}: weights do not fit the student network of its config "
                         f"({first})") from None
    net.eval()
    return StudentBundle(network=net, channels=tuple(payload["channels"]),
                         output=payload["output"], n_classes=n_classes,
                         patch_size=tuple(payload["patch_size"]), meta=payload)


def _verify_digest(path: Path, payload: dict) -> None:
    """Refuse a file whose tensors differ from the digest recorded at save."""
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: malformed student weights file (state_dict is not a dict of "
                         "tensors)")
    recorded = payload.get(WEIGHTS_DIGEST_KEY)
    if recorded is None:
        warn_unverified(path, "student weights file")
        return
    if weights_digest(state) != recorded:
        raise WeightsIntegrityError(
            f"{path}: weights do not match the digest recorded when the file was written "
            "(damaged or modified file); use another copy or re-train")
