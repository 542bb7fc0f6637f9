"""Pictures: segmentation overlays of one case, training curves and the run report.

Everything draws on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``, never
``pyplot``): no display is needed, no global backend state is touched, and figures are freed
when they go out of scope. PNGs are written to a temporary name and renamed, so a reader never
sees half a file.

Overlay colours (canonical labels, the usual BraTS figure colours):
NCR/NETC red, ED/SNFH green, ET yellow, RC (resection cavity, 2024+) blue.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

__all__ = [
    "LABEL_COLOURS",
    "RunReport",
    "TrainingLog",
    "overlay_png",
    "plot_training_curves",
    "read_training_log",
    "tumour_centre",
    "write_run_report",
]

#: Canonical label -> (name, colour) of the overlays.
LABEL_COLOURS: dict[int, tuple[str, str]] = {
    1: ("NCR/NETC", "#ff0000"),
    2: ("ED/SNFH", "#00c800"),
    3: ("ET", "#ffff00"),
    4: ("RC", "#2080ff"),
}
_OVERLAY_ALPHA = 0.55


def _save(fig: Figure, out_path: Path, dpi: int = 100) -> Path:
    """Render `fig` with Agg and write it atomically as PNG."""
    FigureCanvasAgg(fig)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.{uuid.uuid4().hex}.tmp.png")
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path


# ------------------------------------------------------------------------------ overlays


def tumour_centre(truth: np.ndarray | None, prediction: np.ndarray | None,
                  shape: Sequence[int]) -> tuple[int, int, int]:
    """Voxel to slice through: the centre of mass of the truth's tumour (labels 1-3).

    Falls back to the prediction's tumour when the truth is absent or empty, then to the
    centre of the volume, so every case gets a picture.
    """
    for labels in (truth, prediction):
        if labels is None:
            continue
        tumour = (labels >= 1) & (labels <= 3)
        if tumour.any():
            coords = np.argwhere(tumour).mean(axis=0)
            return (int(round(coords[0])), int(round(coords[1])), int(round(coords[2])))
    return (int(shape[0]) // 2, int(shape[1]) // 2, int(shape[2]) // 2)


def _to_ras(volumes: list[np.ndarray | None], affine: np.ndarray | None,
            spacing: Sequence[float]) -> tuple[list[np.ndarray | None], tuple[float, ...]]:
    """Reorient voxel arrays to the closest RAS axes (flips and permutations only)."""
    if affine is None:
        return volumes, tuple(float(s) for s in spacing)
    import nibabel.orientations as nio

    ornt = nio.io_orientation(np.asarray(affine, dtype=np.float64))
    out = [None if v is None else nio.apply_orientation(v, ornt) for v in volumes]
    new_spacing = [1.0, 1.0, 1.0]
    for axis, (target, _) in enumerate(ornt):
        new_spacing[int(target)] = float(spacing[axis])
    return out, tuple(new_spacing)


def _label_rgba(labels: np.ndarray) -> np.ndarray:
    rgba = np.zeros((*labels.shape, 4), dtype=np.float32)
    for value, (_, colour) in LABEL_COLOURS.items():
        rgb = tuple(int(colour[i: i + 2], 16) / 255.0 for i in (1, 3, 5))
        rgba[labels == value] = (*rgb, _OVERLAY_ALPHA)
    return rgba


def overlay_png(out_path: Path, image: np.ndarray | None, *, truth: np.ndarray | None = None,
                prediction: np.ndarray | None = None, affine: np.ndarray | None = None,
                spacing: Sequence[float] = (1.0, 1.0, 1.0), title: str = "") -> Path:
    """Axial, coronal and sagittal slices through the tumour centre, with labels overlaid.

    One row per label volume given (ground truth, then prediction; the image alone when
    neither is given), three columns (axial, coronal, sagittal). Slices go through
    :func:`tumour_centre`. With `affine`, volumes are reoriented to RAS and shown in the
    neurological convention (patient's right on the right, anterior up in axial views,
    superior up otherwise); without it, array axes are shown as they are. Intensities are
    windowed to the 0.5-99.5 percentiles of the non-zero voxels; zero (background) is black.
    Colours: :data:`LABEL_COLOURS`.

    Args:
        out_path: PNG file to write (parents created).
        image: 3D intensities (any scale) or None for a black background.
        truth, prediction: canonical label volumes of the image's shape, or None.
        affine: voxel-to-world matrix of the volumes (orientation only).
        spacing: voxel size in mm per array axis (sets the aspect ratio).
        title: figure title (e.g. the case id).

    Returns:
        `out_path`.
    """
    shape = next(v.shape for v in (image, truth, prediction) if v is not None)
    base = np.zeros(shape, dtype=np.float32) if image is None else np.asarray(image, np.float32)
    (base, truth_r, pred_r), sp = _to_ras([base, truth, prediction], affine, spacing)
    assert base is not None
    centre = tumour_centre(truth_r, pred_r, base.shape)
    brain = base[base != 0]
    lo, hi = (np.percentile(brain, [0.5, 99.5]) if brain.size else (0.0, 1.0))
    if hi <= lo:
        hi = lo + 1.0
    # Outside the brain is 0, which z-scored images put mid-grey: show it black instead.
    base = np.where(base != 0, base, lo)

    def views(volume: np.ndarray) -> list[tuple[str, np.ndarray, float]]:
        x, y, z = centre
        # Transposed so rows are the second axis; origin="lower" puts it upwards.
        return [
            ("axial", volume[:, :, z].T, sp[1] / sp[0]),
            ("coronal", volume[:, y, :].T, sp[2] / sp[0]),
            ("sagittal", volume[x, :, :].T, sp[2] / sp[1]),
        ]

    rows = [(name, lab) for name, lab in (("ground truth", truth_r), ("prediction", pred_r))
            if lab is not None] or [("image", None)]
    fig = Figure(figsize=(9.6, 3.3 * len(rows) + 0.7))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for r, (row_name, labels) in enumerate(rows):
        image_views = views(base)
        label_views = views(labels) if labels is not None else [None] * 3
        for c, ((view, plane, aspect), label_view) in enumerate(
                zip(image_views, label_views, strict=True)):
            ax = axes[r][c]
            ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect,
                      interpolation="nearest")
            if label_view is not None:
                ax.imshow(_label_rgba(label_view[1]), origin="lower", aspect=aspect,
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(view, fontsize=10)
            if c == 0:
                ax.set_ylabel(row_name, fontsize=10)
    handles = [Patch(facecolor=colour, edgecolor="none", label=name)
               for name, colour in LABEL_COLOURS.values()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
               fontsize=9)
    fig.suptitle(f"{title}  (slices through voxel {centre} of the RAS-reoriented volume)"
                 if affine is not None else f"{title}  (slices through voxel {centre})",
                 fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.99, top=0.9, bottom=0.12, wspace=0.04, hspace=0.08)
    return _save(fig, out_path)


# ------------------------------------------------------------------------ training curves


@dataclass
class TrainingLog:
    """The records of a run's ``log.jsonl``.

    Attributes:
        train: "train" records (per logged step), one per step, sorted by step.
        epochs: "epoch" records, one per epoch, sorted by epoch.
        skipped_lines: lines that were not JSON objects (e.g. the partial last line of a killed
            run); reported, not fatal.
    """

    train: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    skipped_lines: int = 0


def read_training_log(path: Path) -> TrainingLog:
    """Read ``log.jsonl``, keeping the last record of each step (train) and epoch.

    A resumed run restarts from its checkpoint and logs again the steps after it, into the same
    file; the later record is the one the finished run is made of.

    Raises:
        FileNotFoundError: no such file.
    """
    train: dict[int, dict[str, Any]] = {}
    epochs: dict[int, dict[str, Any]] = {}
    skipped = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if not isinstance(record, dict):
                skipped += 1
                continue
            if record.get("kind") == "train" and isinstance(record.get("step"), int):
                train[record["step"]] = record
            elif record.get("kind") == "epoch" and isinstance(record.get("epoch"), int):
                epochs[record["epoch"]] = record
    return TrainingLog([train[k] for k in sorted(train)], [epochs[k] for k in sorted(epochs)],
                       skipped)


def _series(records: list[dict[str, Any]], x_key: str, prefix: str
            ) -> dict[str, tuple[list[float], list[float]]]:
    """name -> (x, y) for every numeric key starting with `prefix` (null values skipped)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(prefix) and isinstance(value, (int, float)) and not isinstance(
                    value, bool) and math.isfinite(value):
                xs, ys = out.setdefault(key, ([], []))
                xs.append(float(record[x_key]))
                ys.append(float(value))
    return out


def _line_plot(out_path: Path, panels: list[tuple[str, dict[str, tuple[list, list]], str, bool]],
               xlabel: str, title: str, mark_x: float | None = None) -> Path:
    fig = Figure(figsize=(7.0, 3.6 * len(panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False)
    for ax, (ylabel, series, legend_prefix, log_y) in zip(axes[:, 0], panels, strict=True):
        for name, (xs, ys) in sorted(series.items()):
            label = name[len(legend_prefix):] if name.startswith(legend_prefix) else name
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3,
                    label=label or name)
        if log_y and all(y > 0 for _, ys in series.values() for y in ys):
            ax.set_yscale("log")
        if mark_x is not None:
            ax.axvline(mark_x, color="grey", linestyle="--", linewidth=1, label="best epoch")
        ax.set_ylabel(ylabel)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_training_curves(log: TrainingLog, out_dir: Path, best_epoch: int | None = None
                         ) -> dict[str, Path]:
    """Write the training-curve PNGs whose data the log holds.

    Files (each only when the log has its values): ``losses.png`` (total loss and every
    ``loss/<term>`` per step), ``teacher_weights.png`` (``alpha/<teacher>`` and
    ``teacher_wt_dice/<teacher>`` per epoch: MTCM-KD's performance-aware weights),
    ``val_dice.png`` (``val/dice_WT|TC|ET`` per epoch, best epoch marked), ``learning_rate.png``
    (``lr/<group>`` per step).

    Returns:
        figure name ("losses", ...) -> path.
    """
    out_dir = Path(out_dir)
    figures: dict[str, Path] = {}
    losses = _series(log.train, "step", "loss")
    if losses:
        figures["losses"] = _line_plot(out_dir / "losses.png",
                                       [("loss", losses, "loss/", True)], "step",
                                       "training losses (total and per term)")
    alpha = _series(log.epochs, "epoch", "alpha/")
    if alpha:
        panels = [("teacher weight alpha", alpha, "alpha/", False)]
        teacher_dice = _series(log.epochs, "epoch", "teacher_wt_dice/")
        if teacher_dice:
            panels.append(("teacher training WT Dice", teacher_dice, "teacher_wt_dice/", False))
        figures["teacher_weights"] = _line_plot(out_dir / "teacher_weights.png", panels,
                                                "epoch", "teacher weights (performance-aware KD)")
    val = _series(log.epochs, "epoch", "val/dice_")
    if val:
        figures["val_dice"] = _line_plot(out_dir / "val_dice.png",
                                         [("validation Dice", val, "val/dice_", False)], "epoch",
                                         "validation Dice (BraTS Dice, cropped store volumes)",
                                         mark_x=best_epoch)
    lr = _series(log.train, "step", "lr/")
    if lr:
        figures["learning_rate"] = _line_plot(out_dir / "learning_rate.png",
                                              [("learning rate", lr, "lr/", True)], "step",
                                              "learning rate per parameter group")
    return figures


# --------------------------------------------------------------------------- run report


@dataclass
class RunReport:
    """What :func:`write_run_report` wrote."""

    markdown: Path
    figures: dict[str, Path]
    best: dict[str, Any] | None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _best_from_log(log: TrainingLog) -> dict[str, Any] | None:
    """Best validation epoch by mean Dice, when best.json is missing."""
    best: dict[str, Any] | None = None
    for record in log.epochs:
        dice = {r: record.get(f"val/dice_{r}") for r in ("WT", "TC", "ET")}
        if any(not isinstance(v, (int, float)) for v in dice.values()):
            continue
        mean = float(np.mean(list(dice.values())))
        if best is None or mean > best["mean_dice"]:
            best = {"epoch": record["epoch"], "step": record.get("step"), "mean_dice": mean,
                    "dice": dice}
    return best


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "-" if value is None else str(value)


def write_run_report(run_dir: Path, out_dir: Path | None = None) -> RunReport:
    """Training curves (PNG) and ``report.md`` for a run folder of `mtcmkd train`.

    The summary gives the best epoch and its validation Dice (``best.json``, else the best
    epoch record of the log), the losses of the last logged step, throughput (median
    samples/s over logged intervals, the first one skipped as warm-up when there are more, and
    mean data/forward/backward/step times), and the run's wall time (``summary.json``).

    Args:
        run_dir: the run folder (``log.jsonl`` required; config.yaml, best.json and
            summary.json used when present).
        out_dir: where to write; default ``run_dir/report``.

    Raises:
        FileNotFoundError: no ``log.jsonl`` in `run_dir`.
    """
    import yaml

    run_dir = Path(run_dir)
    log_path = run_dir / "log.jsonl"
    if not log_path.is_file():
        raise FileNotFoundError(f"{log_path}: no training log (is this a run folder of "
                                "`mtcmkd train`?)")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    log = read_training_log(log_path)
    best = _read_json(run_dir / "best.json") or _best_from_log(log)
    summary = _read_json(run_dir / "summary.json") or {}
    config: dict[str, Any] = {}
    try:
        loaded = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        config = loaded if isinstance(loaded, dict) else {}
    except (OSError, yaml.YAMLError):
        pass
    figures = plot_training_curves(log, out_dir,
                                   best_epoch=None if best is None else best.get("epoch"))

    def section(key: str) -> dict[str, Any]:
        value = config.get(key)
        return value if isinstance(value, dict) else {}

    lines = [f"# Training report: {config.get('name', run_dir.name)}", "",
             f"Run folder `{run_dir}`.", ""]
    rows = [
        ("method", section("method").get("name")),
        ("model", f"{section('model').get('kind', '-')} widths {section('model').get('widths')}"
                  f", {section('model').get('output', '-')} output"),
        ("student modalities", ", ".join(section("method").get("student_modalities") or [])
         or None),
        ("store / fold", f"{section('data').get('store')} / {section('data').get('fold')}"),
        ("steps logged", f"{len(log.train)} (last step "
                         f"{log.train[-1]['step'] if log.train else '-'})"),
        ("epochs logged", len(log.epochs)),
    ]
    if best is not None:
        dice = best.get("dice") or {}
        rows.append(("best epoch", f"{best.get('epoch')} (step {best.get('step')})"))
        rows.append(("best validation Dice", f"mean {_fmt(best.get('mean_dice'))}: "
                     + ", ".join(f"{r} {_fmt(dice.get(r))}" for r in ("WT", "TC", "ET"))))
    else:
        rows.append(("best epoch", "no validation logged"))
    if log.train:
        last = log.train[-1]
        terms = ", ".join(f"{k} {_fmt(v)}" for k, v in last.items()
                          if k == "loss" or k.startswith("loss/"))
        rows.append((f"final losses (step {last['step']})", terms or "-"))
        rates = [r["samples_per_s"] for r in log.train
                 if isinstance(r.get("samples_per_s"), (int, float))]
        if len(rates) > 1:
            rates = rates[1:]  # the first interval holds start-up (workers, allocator, JIT)
        if rates:
            rows.append(("throughput", f"{statistics.median(rates):.3g} samples/s (median of "
                                       f"{len(rates)} logged intervals)"))
        times = []
        for part in ("data", "forward", "backward", "step"):
            vals = [r[f"time/{part}"] for r in log.train
                    if isinstance(r.get(f"time/{part}"), (int, float))]
            if vals:
                times.append(f"{part} {1e3 * float(np.mean(vals)):.1f}")
        if times:
            rows.append(("time per micro-step (ms)", ", ".join(times)))
    if summary:
        rows.append(("wall time", f"{_fmt(summary.get('seconds'))} s, world size "
                                  f"{summary.get('world_size', '-')}, preempted "
                                  f"{summary.get('preempted', '-')}"))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows]
    lines += ["", "Validation Dice during training is the BraTS Dice on the brain-cropped store "
              "volumes of the held-out fold (`train.val_cases` of them), for model selection; "
              "report the numbers of `mtcmkd evaluate` (native space, all held-out cases).", ""]
    if log.skipped_lines:
        lines += [f"{log.skipped_lines} unreadable line(s) of log.jsonl skipped (e.g. the last "
                  "line of a killed run).", ""]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{name}]({path.name})" for name, path in figures.items()]
        lines.append("")
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = out_dir / "report.md"
    tmp = markdown.with_name(f".report.md.{uuid.uuid4().hex}.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, markdown)
    return RunReport(markdown, figures, best)
