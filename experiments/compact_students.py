"""Compact students (issue 17, item 4): the T1ce student at paper size, 2x and 4x narrower,
trained alike on one phantom store, and what the inference layout and precision do to each.

    nice -n 19 python experiments/compact_students.py --out /tmp/compact   # the run behind
                                                  # docs/results/compact_students.{json,md}
    python experiments/compact_students.py --out smoke --cases 12 --shape 40 40 32 --patch 16 \\
        --width-divisor 2 --test-fraction 0.25 --folds 3 --epochs 1 --iters 2 --seeds 0 \\
        --threads 1                                                      # a smoke run

Arms: configs/baseline.yaml (the T1ce student alone, trained on the truth) with the student
widths of the three sizes (``--sizes``):

- ``paper``   32/64/128/256 (9.46 M parameters; configs/mtcmkd.yaml's student)
- ``compact`` 16/32/64/128  (2.37 M; configs/mtcmkd-compact.yaml)
- ``nano``    8/16/32/64    (0.59 M; configs/mtcmkd-nano.yaml)

Same store, patch, batch, steps, learning rate and seeds for every size. The data and the
training recipe are decisive_study.py's (its helpers are imported: ``mtcmkd synth`` 2021
layout, a fixed test split, fold 0 validates). Each trained student is then scored on the test
split by `mtcmkd evaluate --run` four times (``VARIANTS``):

- ``reference``  --reference: fp32, windows of the patch, overlap 0.5, Gaussian
- ``auto``       predict's default: --precision auto (bf16 + channels-last here), windows
- ``box-fp32``   --layout box --precision fp32: one pass over the brain box
- ``box-auto``   --layout box --precision auto

``box`` computes GroupNorm statistics over the whole box instead of a patch; the paired
per-case Dice difference against ``reference`` is what that (and bf16) costs.

Output: ``OUT/compact_students.json`` (settings, per size/seed/variant per-case Dice, means,
paired differences against the reference) and ``OUT/compact_students.md``. Resumable: a
trained run (summary.json, not preempted) is not retrained; an existing
``eval-<variant>/metrics.json`` is not recomputed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from mtcmkd.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
REGIONS = ("WT", "TC", "ET")
#: Student widths per size name; --width-divisor divides them (smoke runs).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "paper": (32, 64, 128, 256),
    "compact": (16, 32, 64, 128),
    "nano": (8, 16, 32, 64),
}
#: evaluate options per inference variant (see the module docstring).
VARIANTS: dict[str, tuple[str, ...]] = {
    "reference": ("--reference",),
    "auto": ("--precision", "auto", "--layout", "windows"),
    "box-fp32": ("--precision", "fp32", "--layout", "box"),
    "box-auto": ("--precision", "auto", "--layout", "box"),
}


def load_decisive_study() -> ModuleType:
    """experiments/decisive_study.py as a module (experiments/ is not a package)."""
    path = ROOT / "experiments" / "decisive_study.py"
    spec = importlib.util.spec_from_file_location("decisive_study", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


study = load_decisive_study()


def widths_of(args: argparse.Namespace, size: str) -> list[int]:
    return [w // args.width_divisor for w in SIZES[size]]


def run_name(size: str, seed: int) -> str:
    return f"{size}-s{seed}"


def train(args: argparse.Namespace, size: str, seed: int) -> tuple[Path, float | None]:
    """Train the size's T1ce student for one seed (unless trained); returns the run folder and
    its training seconds (None when it was trained before)."""
    run_dir = args.out / "runs" / run_name(size, seed)
    if study.is_trained(run_dir):
        return run_dir, None
    over = study.common(args, "clean", seed, args.epochs)
    over["model.widths"] = widths_of(args, size)
    task = study.Task(run_name(size, seed), run_dir, "baseline.yaml", over, evaluate=False)
    return run_dir, study.run_task(args, task)


def evaluate(args: argparse.Namespace, run_dir: Path, variant: str) -> tuple[Path, float | None]:
    """`mtcmkd evaluate --run` on the test split with the variant's inference options; its
    metrics.json and the seconds the command took (kept next to it, so a resumed study reports
    the seconds of the run that scored; None for scores made before they were kept)."""
    out = run_dir / f"eval-{variant}"
    metrics, timing = out / "metrics.json", out / "seconds.json"
    if metrics.is_file():
        if not timing.is_file():
            return metrics, None
        return metrics, float(json.loads(timing.read_text())["seconds"])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "mtcmkd", "evaluate", "--year", "2021", "--run", str(run_dir),
           "--split", "test", "--device", "cpu", "--threads", str(args.threads), "--out",
           str(out), *VARIANTS[variant]]
    log = study.log_path(args, run_dir.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, env=env)
        seconds = time.perf_counter() - start
    atomic_write_text(timing, json.dumps({"seconds": round(seconds, 1)}) + "\n")
    return metrics, round(seconds, 1)


def per_case_dice(metrics_file: Path) -> dict[str, dict[str, float | None]]:
    """case -> region -> Dice (None where evaluate leaves it undefined or NaN)."""
    metrics = json.loads(metrics_file.read_text())
    return {str(r["case"]): {k: _finite(r["dice"].get(k)) for k in REGIONS}
            for r in metrics["cases"]}


def _finite(value: object) -> float | None:
    if value is None:
        return None
    number = float(value)  # type: ignore[arg-type]
    return None if math.isnan(number) else number


def parameter_count(widths: Sequence[int]) -> int:
    from mtcmkd.models import build_network

    return sum(p.numel() for p in build_network("resunet", 1, 4, tuple(widths)).parameters())


def nanmean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None


def summarise(records: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per size: per variant the mean Dice per region (cases, then seeds, averaged), its sd over
    seeds, and the paired per-case difference against the reference (mean, max |.|)."""
    out: dict[str, Any] = {}
    for size, seeds in records.items():
        entry: dict[str, Any] = {}
        for variant in VARIANTS:
            per_seed: dict[str, list[float]] = {r: [] for r in REGIONS}
            diffs: dict[str, list[float]] = {r: [] for r in REGIONS}
            for record in seeds.values():
                cases = record["variants"].get(variant)
                ref = record["variants"].get("reference")
                if cases is None:
                    continue
                for r in REGIONS:
                    mean = nanmean([c[r] for c in cases.values()])
                    if mean is not None:
                        per_seed[r].append(mean)
                    if ref is not None:
                        diffs[r] += [cases[c][r] - ref[c][r] for c in cases
                                     if c in ref and cases[c][r] is not None
                                     and ref[c][r] is not None]
            if not any(per_seed.values()):
                continue
            entry[variant] = {
                "dice_mean": {r: float(np.mean(v)) if v else None for r, v in per_seed.items()},
                "dice_sd_over_seeds": {r: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
                                       for r, v in per_seed.items()},
                "minus_reference_mean": {r: float(np.mean(d)) if d else None
                                         for r, d in diffs.items()},
                "minus_reference_max_abs": {r: float(np.max(np.abs(d))) if d else None
                                            for r, d in diffs.items()},
                "seeds": len(per_seed["WT"]),
            }
        out[size] = entry
    return out


def size_contrasts(records: dict[str, dict[int, dict[str, Any]]], against: str = "paper",
                   variant: str = "reference", resamples: int = 10_000) -> dict[str, Any]:
    """Each other size minus `against`, paired over test cases: per case the Dice averaged over
    the seeds each size has, then the mean difference over cases and its 95% percentile
    bootstrap interval over cases (seed 0). Seed-to-seed spread is not in the interval (with
    few seeds it cannot be estimated); read it beside the sd over seeds of the summary."""

    def seed_means(size: str) -> dict[str, dict[str, float]]:
        per_case: dict[str, dict[str, list[float]]] = {}
        for record in records[size].values():
            for case, dice in record["variants"].get(variant, {}).items():
                for r in REGIONS:
                    if dice[r] is not None:
                        per_case.setdefault(case, {}).setdefault(r, []).append(dice[r])
        return {c: {r: float(np.mean(v)) for r, v in d.items()} for c, d in per_case.items()}

    if against not in records:
        return {}
    base = seed_means(against)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for size in records:
        if size == against:
            continue
        other = seed_means(size)
        entry: dict[str, Any] = {}
        for r in REGIONS:
            diffs = np.array([other[c][r] - base[c][r] for c in sorted(other)
                              if c in base and r in other[c] and r in base[c]])
            if diffs.size == 0:
                continue
            boot = diffs[rng.integers(0, diffs.size, (resamples, diffs.size))].mean(axis=1)
            entry[r] = {"mean": float(diffs.mean()),
                        "ci95": [float(np.percentile(boot, 2.5)),
                                 float(np.percentile(boot, 97.5))],
                        "cases": int(diffs.size)}
        out[size] = entry
    return {"against": against, "variant": variant, "sizes": out}


def fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.3f}"


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# Compact students on the phantom (issue 17, item 4)",
        "",
        f"T1ce student alone (configs/baseline.yaml), {s['cases']} phantom cases "
        f"{'x'.join(map(str, s['shape']))} ({s['store']['train']} train / "
        f"{s['store']['validation']} validation / {s['store']['test']} test), patch "
        f"{s['patch']}^3, batch {s['batch']}, {s['student_steps']} steps, lr {s['lr']}, seeds "
        f"{', '.join(map(str, s['seeds']))}; scored on the test split with `mtcmkd evaluate "
        "--run` (best_student.pt by validation Dice). Dice: mean over test cases (legacy BraTS "
        "rule: a region empty in truth and prediction scores 1, in one of them 0), then over "
        "seeds (+- sd over seeds). `evaluate s`: "
        f"the whole `mtcmkd evaluate` command over the test cases, {s['threads']} thread(s), "
        f"load {s['load_at_start'][0]:.1f} at the start, {s['load_at_end'][0]:.1f} at the end "
        "(shared machine: seconds are indicative only).",
        "",
        "| size | widths | parameters | train s/run | variant | evaluate s | WT | TC | ET | "
        "WT - ref | TC - ref | ET - ref | max abs WT - ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, entry in result["summary"].items():
        info = result["sizes"][size]
        train_s = [r["train_seconds"] for r in result["runs"][size].values()
                   if r.get("train_seconds")]
        train_text = f"{np.mean(train_s):.0f}" if train_s else "-"
        for variant, v in entry.items():
            dm, sd = v["dice_mean"], v["dice_sd_over_seeds"]
            d, mx = v["minus_reference_mean"], v["minus_reference_max_abs"]
            eval_s = [r["eval_seconds"].get(variant) for r in result["runs"][size].values()]
            eval_s = [x for x in eval_s if x is not None]
            eval_text = f"{np.mean(eval_s):.0f}" if eval_s else "-"
            lines.append(
                f"| {size} | {'/'.join(map(str, info['widths']))} | {info['parameters']:,} | "
                f"{train_text} | {variant} | {eval_text} | "
                + " | ".join(f"{fmt(dm[r])} +- {fmt(sd[r])}" for r in REGIONS) + " | "
                + " | ".join(fmt(d[r], True) for r in REGIONS) + f" | {fmt(mx['WT'])} |")
    lines += ["", "Variants: " + "; ".join(f"`{k}` = `{' '.join(v)}`"
                                          for k, v in VARIANTS.items()) + ".", ""]
    contrasts = result.get("size_contrasts") or {}
    if contrasts.get("sizes"):
        lines += [f"Each size minus {contrasts['against']} (`{contrasts['variant']}`), paired "
                  "over test cases (per case the mean over seeds), 95% bootstrap interval over "
                  "cases; seed-to-seed spread is not in the interval:", "",
                  "| size | " + " | ".join(f"{r} - {contrasts['against']}" for r in REGIONS)
                  + " |", "|---|---|---|---|"]
        for size, entry in contrasts["sizes"].items():
            cells = [f"{e['mean']:+.3f} [{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}]"
                     if (e := entry.get(r)) else "-" for r in REGIONS]
            lines.append(f"| {size} | " + " | ".join(cells) + " |")
        lines.append("")
    if result["failed"]:
        lines += ["Failed: " + "; ".join(f"{f['run']}: {f['reason']}" for f in result["failed"]),
                  ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("compact_students"))
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--width-divisor", type=int, default=1,
                   help="Divide every size's widths by this (smoke runs only).")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--cases", type=int, default=48)
    p.add_argument("--shape", nargs=3, type=int, default=[64, 64, 48])
    p.add_argument("--data-seed", type=int, default=100, help="Seed of `mtcmkd synth`.")
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--folds", type=int, default=4, help="Folds of the non-test cases; fold 0 "
                   "validates.")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--iters", type=int, default=30, help="Optimiser steps per epoch.")
    p.add_argument("--val-every", type=int, default=None,
                   help="Validate every N epochs; default epochs // 5 (at least 1).")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=2, help="Threads of each run (OMP/MKL).")
    p.add_argument("--json-out", type=Path, default=None,
                   help="Also copy the JSON here (e.g. docs/results/compact_students.json); "
                        "the .md goes next to it.")
    args = p.parse_args(argv)
    for name in ("epochs", "iters", "batch", "threads", "cases", "patch", "width_divisor"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if "reference" not in args.variants:
        p.error("--variants must include reference (the differences are taken against it)")
    # decisive_study's helpers read these
    args.jobs, args.split, args.device, args.widths = 1, "test", "cpu", list(SIZES["paper"])
    args.out = args.out.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {k: (str(v) if isinstance(v, Path) else v)
                                for k, v in vars(args).items()}
    settings["student_steps"] = args.epochs * args.iters
    settings["val_every"] = study.val_every(args, args.epochs)
    settings["command"] = " ".join(["python", "experiments/compact_students.py",
                                    *(sys.argv[1:] if argv is None else argv)])
    settings["load_at_start"] = os.getloadavg()
    settings |= study.git_commit()
    try:
        settings["store"] = study.split_counts(study.prepare_clean(args))
    except (study.StudyError, ValueError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    c = settings["store"]
    print(f"store: {c['cases']} cases, {c['train']} train / {c['validation']} validation / "
          f"{c['test']} test", flush=True)
    sizes = {s: {"widths": widths_of(args, s), "parameters": parameter_count(widths_of(args, s))}
             for s in args.sizes}
    runs: dict[str, dict[int, dict[str, Any]]] = {s: {} for s in args.sizes}
    failed: list[dict[str, str]] = []
    # Seed by seed, so that a cut run still has every size for the first seed.
    for seed in args.seeds:
        for size in args.sizes:
            name = run_name(size, seed)
            try:
                start = time.perf_counter()
                run_dir, seconds = train(args, size, seed)
                print(f"trained {name} ({'before' if seconds is None else f'{seconds:.0f} s'})",
                      flush=True)
                summary = json.loads((run_dir / "summary.json").read_text())
                record: dict[str, Any] = {"run": str(run_dir),
                                          "train_seconds": summary.get("seconds"),
                                          "variants": {}, "eval_seconds": {}}
                for variant in args.variants:
                    metrics, seconds = evaluate(args, run_dir, variant)
                    record["variants"][variant] = per_case_dice(metrics)
                    record["eval_seconds"][variant] = seconds
                runs[size][seed] = record
                print(f"scored {name} ({time.perf_counter() - start:.0f} s)", flush=True)
            except (subprocess.CalledProcessError, OSError, ValueError, KeyError) as err:
                failed.append({"run": name, "reason": study.failure_reason(args, name, err)})
                print(f"FAILED {name}: {failed[-1]['reason']}", flush=True)
    settings["load_at_end"] = os.getloadavg()
    result = {"settings": settings, "sizes": sizes, "summary": summarise(runs),
              "size_contrasts": size_contrasts(runs),
              "runs": {s: {str(k): v for k, v in r.items()} for s, r in runs.items()},
              "failed": failed}
    text = json.dumps(result, indent=2, allow_nan=False, default=_json_default) + "\n"
    md = markdown(result)
    targets = [args.out / "compact_students.json"]
    if args.json_out is not None:
        targets.append(args.json_out)
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, text)
        atomic_write_text(target.with_suffix(".md"), md)
    print(md)
    return 1 if failed else 0


def _json_default(value: object) -> object:
    raise TypeError(f"not JSON: {value!r}")


if __name__ == "__main__":
    raise SystemExit(main())
