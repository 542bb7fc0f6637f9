"""The run report (`mtcmkd report`): a run's ``log.jsonl`` read back, its curves and report.md.

Reading the log keeps the last record of each step and epoch (a resumed run logs again the
steps after its checkpoint) and skips unreadable lines (the partial last line of a killed run).
The curves are drawn with `mtcmkd.plots`; report.md is written atomically.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mtcmkd.atomic import atomic_write_text
from mtcmkd.brats import REGIONS
from mtcmkd.plots import line_plot

__all__ = ["RunReport", "TrainingLog", "plot_training_curves", "read_training_log",
           "write_run_report"]


# ---------------------------------------------------------------------------- the log


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


# ------------------------------------------------------------------------ training curves


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
        figures["losses"] = line_plot(out_dir / "losses.png",
                                      [("loss", losses, "loss/", True)], "step",
                                      "training losses (total and per term)")
    alpha = _series(log.epochs, "epoch", "alpha/")
    if alpha:
        panels = [("teacher weight alpha", alpha, "alpha/", False)]
        teacher_dice = _series(log.epochs, "epoch", "teacher_wt_dice/")
        if teacher_dice:
            panels.append(("teacher training WT Dice", teacher_dice, "teacher_wt_dice/", False))
        figures["teacher_weights"] = line_plot(out_dir / "teacher_weights.png", panels,
                                               "epoch", "teacher weights (performance-aware KD)")
    val = _series(log.epochs, "epoch", "val/dice_")
    if val:
        figures["val_dice"] = line_plot(out_dir / "val_dice.png",
                                        [("validation Dice", val, "val/dice_", False)], "epoch",
                                        "validation Dice (BraTS Dice, cropped store volumes)",
                                        mark_x=best_epoch)
    lr = _series(log.train, "step", "lr/")
    if lr:
        figures["learning_rate"] = line_plot(out_dir / "learning_rate.png",
                                             [("learning rate", lr, "lr/", True)], "step",
                                             "learning rate per parameter group")
    return figures


# --------------------------------------------------------------------------- report.md


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
        dice = {r: record.get(f"val/dice_{r}") for r in REGIONS}
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
                     + ", ".join(f"{r} {_fmt(dice.get(r))}" for r in REGIONS)))
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
    atomic_write_text(markdown, "\n".join(lines))
    return RunReport(markdown, figures, best)
