"""What every exporter starts from: a student weights file, loaded or refused in one line.

Exporters accept the same inputs as inference (a ``student.pt``/``best_student.pt`` file or a
run folder holding one) and must refuse anything else before they write a file, with a message
a user can act on: which path, what is wrong. :func:`load_export_source` turns the several
exceptions of :func:`mtcmkd.student_weights.load_student` into one :class:`ExportError`.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from mtcmkd.integrity import CheckpointError, safe_torch_load
from mtcmkd.models import build_network
from mtcmkd.student_weights import StudentBundle, load_student, resolve_student_path

__all__ = ["ExportError", "VerificationError", "check_export_target", "frozen_network",
           "load_export_source"]

#: Files a run folder holds (mtcmkd.engine.run_folder.RUN_FILES plus the ones written beside
#: them); an export never replaces one of them.
_RUN_OWN_FILES = frozenset({"config.yaml", "ds_config.json", "log.jsonl", "student.pt",
                            "best_student.pt", "best.json", "summary.json", "splits.json",
                            "teachers.json", "PREEMPTED"})


class ExportError(ValueError):
    """An export input or option was refused, or a verification failed; the message is one
    line that names the file and what is wrong."""


class VerificationError(ExportError):
    """A written file does not reproduce eager PyTorch within tolerance (it has been removed)."""


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


def load_export_source(path: str | Path) -> StudentBundle:
    """Load the student network to export from a weights file or a run folder.

    Raises:
        ExportError: missing path, a run folder without student weights, a file that is not a
            student weights file (another method's checkpoint, a tampered or foreign file), or
            weights that do not fit the network its config describes.
    """

    try:
        resolved = resolve_student_path(Path(path))
    except FileNotFoundError as exc:
        raise ExportError(_one_line(str(exc))) from None
    try:
        bundle = load_student(resolved)
    except CheckpointError:
        raise ExportError(f"{resolved}: not a student weights file (torch.load with "
                          "weights_only=True cannot read it: another format, a checkpoint that "
                          "needs arbitrary code to unpickle, or a damaged file)") from None
    except ValueError as exc:
        if "do not fit" in str(exc):
            raise ExportError(_describe_mismatch(resolved)) from None
        raise ExportError(_one_line(str(exc))) from None
    except (KeyError, TypeError) as exc:
        # A file with the student format tag but a broken payload (hand-edited or truncated).
        raise ExportError(f"{path}: malformed student weights file (missing or bad field "
                          f"{_one_line(str(exc))})") from None
    if bundle.output not in ("softmax", "regions"):
        raise ExportError(f"{path}: unknown network output kind {bundle.output!r} "
                          "(expected 'softmax' or 'regions')")
    if bundle.output == "softmax" and bundle.n_classes < 4:
        raise ExportError(f"{path}: a softmax student needs at least 4 classes "
                          f"(background, NCR, ED, ET), this one has {bundle.n_classes}")
    if bundle.output == "regions" and bundle.n_classes != 3:
        raise ExportError(f"{path}: a region student has 3 outputs (WT, TC, ET), this one has "
                          f"{bundle.n_classes}")
    if len(bundle.patch_size) != 3 or min(bundle.patch_size) < 1:
        raise ExportError(f"{path}: bad patch size {bundle.patch_size} in the weights file")
    return bundle


def check_export_target(source: str | Path, out: str | Path) -> None:
    """Refuse an output path that would overwrite the source or one of a run's own files.

    README's first export example once wrote ``--out RUN/student.pt``, which silently replaced
    the run's weights with the TorchScript file. Checked before anything is loaded or written.

    Raises:
        ExportError: ``out`` is the student file being exported, a file of a run folder
            (``student.pt``, ``best_student.pt``, ``config.yaml``, ...), or inside a run's
            ``checkpoints/``.
    """
    out_path = Path(out).resolve()
    try:
        src = resolve_student_path(Path(source)).resolve()
    except FileNotFoundError:
        src = None  # load_export_source reports it
    folder = out_path.parent
    is_run = (folder / "config.yaml").is_file() and (
        (folder / "student.pt").exists() or (folder / "checkpoints").is_dir())
    if out_path == src or (is_run and out_path.name in _RUN_OWN_FILES) or any(
            p.name == "checkpoints" and (p.parent / "config.yaml").is_file()
            for p in out_path.parents):
        suggestion = folder / "export" / f"{out_path.stem}_export{out_path.suffix or '.pt'}"
        raise ExportError(f"{out}: is the run's own file (its weights or records); an export "
                          f"never overwrites it: choose another --out, e.g. {suggestion}")


def _describe_mismatch(path: Path) -> str:
    """Name the first parameter that does not fit, instead of torch's multi-line report."""

    payload = safe_torch_load(path)
    model = payload["config"]["model"]
    widths = model.get("student_widths") or model.get("widths")
    n_classes = int(payload["n_out"])  # the student file's key keeps its historical name
    network = build_network(model["kind"], len(payload["channels"]), n_classes,
                            None if widths is None else tuple(widths))
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in payload["state_dict"].items()}
    what = f"the {model['kind']} network of its config (widths {widths or 'default'})"
    for key, shape in expected.items():
        if key not in found:
            return f"{path}: weights do not fit {what}: parameter {key} is missing"
        if found[key] != shape:
            return (f"{path}: weights do not fit {what}: {key} has shape {found[key]} in the "
                    f"file, {shape} in the network")
    extra = sorted(set(found) - set(expected))
    return f"{path}: weights do not fit {what}: unexpected parameter {extra[0] if extra else '?'}"


def frozen_network(bundle: StudentBundle) -> nn.Module:
    """A copy of the student network in eval mode with gradients off.

    Exported graphs must not record autograd state (C++ and ONNX users never train), and the
    caller's bundle stays untouched.
    """
    network = copy.deepcopy(bundle.network).eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network
