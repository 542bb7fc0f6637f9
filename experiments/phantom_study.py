"""The phantom study: does distillation help a T1ce-only student where T1ce hides the edema?

On the phantom (``mtcmkd synth``) edema is 0.92-1.00 of the surrounding white matter on T1ce
but 1.7-2x normal brain on FLAIR, so teachers that see FLAIR/T2 know something the student
cannot easily see. This script trains, with one budget and three seeds each,

- ``baseline``: the T1ce student alone (configs/baseline.yaml),
- ``mtcmkd`` and ``mtcmkd-paper``: MTCM-KD, default and paper presets (three online teachers),
- ``kdnet``: KD-Net (4-modality teacher stage, then the T1ce student),
- ``barlow``: single-stage Barlow Twins KD with a T1ce student (the paper's student also sees
  FLAIR; here it sees T1ce only so that every student has the same input),
- ``teacher-flair`` and ``teacher-all``: the baseline recipe on FLAIR and on all four
  modalities, the references the teachers stand for,

then scores each student on the held-out fold with ``mtcmkd evaluate --year 2021`` (BraTS rules,
native space) and writes ``results.json``, ``results.csv`` and ``RESULTS.md`` (mean +- sd over
seeds of the per-seed case means) to ``--out``.

Equal budget: every student takes the same number of optimiser steps on the same patches per
step (``--epochs`` x ``--iters``, batch ``--batch``). KD-Net's two stages run back to back, so its
teacher gets that budget first and its student the same budget after (twice the epochs).
Validation runs once, after the last epoch, so the scored weights are the final ones (no model
selection on the scored fold). That is why this study, unlike the default, scores the validation
fold (``--split validation``) and preprocesses without a test set (``--test-fraction 0``): its
store and numbers stay those of docs/RESULTS.md.

Resumable: a run with ``summary.json`` and ``eval/metrics.json`` is not redone.

    python experiments/phantom_study.py --out study_out            # ~45 min on 2 CPU cores
    python experiments/phantom_study.py --out smoke --cases 8 --epochs 1 --iters 2 --seeds 0
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
REGIONS = ("WT", "TC", "ET")

#: name -> (config file, overrides of that preset). Shared settings come from `common`.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("baseline.yaml", {}),
    "mtcmkd": ("mtcmkd.yaml", {}),
    "mtcmkd-paper": ("mtcmkd-paper.yaml", {}),
    "kdnet": ("kdnet.yaml", {}),
    "barlow": ("barlow.yaml", {"method.student_modalities": ["t1ce"]}),
    "teacher-flair": ("baseline.yaml", {"method.student_modalities": ["flair"]}),
    "teacher-all": ("baseline.yaml", {"method.student_modalities": ["t1", "t1ce", "t2", "flair"]}),
}
#: The student's input per variant (the table says it).
INPUTS = {"teacher-flair": "flair", "teacher-all": "t1+t1ce+t2+flair"}


def common(args: argparse.Namespace, variant: str, seed: int) -> dict[str, Any]:
    """Overrides every variant shares: data, network size, budget, schedule, validation."""
    epochs = args.epochs
    widths = [8, 16, 24, 32]
    over: dict[str, Any] = {
        "data.store": str(args.out / "store"),
        "data.fold": 0,
        "data.patch_size": [args.patch] * 3,
        "data.num_workers": 0,
        "data.augment": True,
        "model.widths": widths,
        "train.iters_per_epoch": args.iters,
        "train.batch_size": args.batch,
        "train.lr": args.lr,
        "train.precision": "fp32",
        "train.seed": seed,
        "train.log_every": 10,
        "train.val_cases": None,
    }
    if variant == "kdnet":
        # KD-Net's own U-Net needs 5 levels; 8..40 keeps it the size of the 4-level ResUNet.
        over["model.widths"] = [8, 16, 24, 32, 40]
        over["method.kdnet_teacher_epochs"] = epochs
        epochs = 2 * epochs
    over.update({
        "train.epochs": epochs,
        "train.val_every": epochs,  # one validation, after the last epoch
        "train.ckpt_every": epochs * args.iters,  # steps: one checkpoint, at the end
        "train.plateau_start_epoch": epochs,  # no LR schedule within this short budget
    })
    return over


def run_variant(args: argparse.Namespace, variant: str, seed: int, threads: int) -> dict[str, Any]:
    """Train then evaluate one (variant, seed); returns the evaluation means."""
    name = f"{variant}-{args.tag}" if args.tag else variant
    run_dir = args.out / "runs" / f"{name}-s{seed}"
    metrics = run_dir / "eval" / "metrics.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    log = args.out / "logs" / f"{name}-s{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not (run_dir / "summary.json").is_file():
        config_file, extra = VARIANTS[variant]
        over = {**common(args, variant, seed), **extra, **dict(args.set)}
        cmd = [sys.executable, "-m", "mtcmkd", "train", "-c", str(CONFIGS / config_file),
               "--out", str(run_dir)]
        if (run_dir / "checkpoints").is_dir():
            cmd.append("--resume")
        for key, value in over.items():
            cmd += ["--set", f"{key}={json.dumps(value)}"]
        with log.open("a") as fh:
            subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, env=env)
    train_s = time.perf_counter() - start
    if not metrics.is_file():
        with log.open("a") as fh:
            subprocess.run([sys.executable, "-m", "mtcmkd", "evaluate", "--year", "2021",
                            "--run", str(run_dir), "--split", "validation",
                            "--overlap", "0.5", "--device", "cpu"],
                           check=True, stdout=fh, stderr=subprocess.STDOUT, env=env)
    result = json.loads(metrics.read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"variant": name, "seed": seed, "cases": len(result["cases"]),
            "dice": result["mean"]["dice"], "hd95": result["mean"]["hd95"],
            "train_seconds": summary.get("seconds"), "wall_seconds": train_s,
            "diagnostics": diagnostics(run_dir / "log.jsonl")}


def diagnostics(log_path: Path) -> dict[str, Any]:
    """From the training log: the last epoch's training Dice (student, teachers) and teacher
    weights, and each loss term's share of the total over the last quarter of the steps."""
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    steps = [r for r in records if r.get("kind") == "train"]
    last = epochs[-1] if epochs else {}
    out: dict[str, Any] = {k: v for k, v in last.items()
                           if k.startswith(("teacher_wt_dice", "alpha/", "student_wt_dice"))}
    tail = steps[-max(1, len(steps) // 4):]
    terms = sorted({k for r in tail for k in r if k.startswith("loss/")})
    totals = {k: sum(r.get(k, 0.0) for r in tail) for k in terms}
    whole = sum(totals.values()) or 1.0
    out["loss_share"] = {k[len("loss/"):]: v / whole for k, v in totals.items()}
    return out


def prepare_data(args: argparse.Namespace) -> None:
    raw, store = args.out / "raw", args.out / "store"
    if not raw.is_dir():
        subprocess.run([sys.executable, "-m", "mtcmkd", "synth", str(raw), "--cases",
                        str(args.cases), "--layout", "2021", "--shape", *map(str, args.shape),
                        "--seed", str(args.data_seed)], check=True)
    if not store.is_dir():
        subprocess.run([sys.executable, "-m", "mtcmkd", "preprocess", str(raw), str(store),
                        "--workers", str(args.jobs), "--folds", str(args.folds),
                        "--test-fraction", "0"], check=True)


def mean_sd(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def aggregate(rows: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    table = []
    for v in variants:
        runs = [r for r in rows if r["variant"] == v]
        if not runs:
            continue
        student_input = next((INPUTS[k] for k in INPUTS if v == k or v.startswith(k + "-")),
                             "t1ce")
        entry: dict[str, Any] = {"variant": v, "input": student_input,
                                 "seeds": sorted(r["seed"] for r in runs)}
        for metric in ("dice", "hd95"):
            for region in REGIONS:
                entry[f"{metric}_{region}"] = mean_sd([r[metric][region] for r in runs])
        entry["train_minutes"] = mean_sd([(r["train_seconds"] or 0.0) / 60 for r in runs])[0]
        table.append(entry)
    return table


def write_outputs(args: argparse.Namespace, rows: list[dict[str, Any]],
                  table: list[dict[str, Any]]) -> None:
    out = args.out
    (out / "results.json").write_text(json.dumps(
        {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
         "runs": rows, "summary": table}, indent=2) + "\n")
    with (out / "results.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["variant", "seed", "cases"] + [f"dice_{r}" for r in REGIONS]
                   + [f"hd95_{r}" for r in REGIONS] + ["train_seconds"])
        for r in rows:
            w.writerow([r["variant"], r["seed"], r["cases"]]
                       + [f"{r['dice'][k]:.4f}" for k in REGIONS]
                       + [f"{r['hd95'][k]:.2f}" for k in REGIONS] + [f"{r['train_seconds']:.1f}"])
    lines = ["| method | input | Dice WT | Dice TC | Dice ET | HD95 WT | HD95 TC | HD95 ET | "
             "train min/run |", "|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        dice = [f"{e[f'dice_{k}'][0]:.3f} +- {e[f'dice_{k}'][1]:.3f}" for k in REGIONS]
        hd = [f"{e[f'hd95_{k}'][0]:.1f} +- {e[f'hd95_{k}'][1]:.1f}" for k in REGIONS]
        lines.append(f"| {e['variant']} | {e['input']} | " + " | ".join(dice + hd)
                     + f" | {e['train_minutes']:.1f} |")
    lines += ["", "| run | student WT Dice (train) | teacher WT Dice (train, last epoch) | "
              "share of the loss in the last quarter |", "|---|---|---|---|"]
    for r in rows:
        d = r.get("diagnostics", {})
        teachers = ", ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in d.items()
                             if k.startswith("teacher_wt_dice"))
        shares = ", ".join(f"{k} {v:.0%}" for k, v in d.get("loss_share", {}).items()
                           if v >= 0.005)
        student = d.get("student_wt_dice")
        lines.append(f"| {r['variant']} s{r['seed']} | "
                     f"{'-' if student is None else f'{student:.2f}'} | {teachers or '-'} | "
                     f"{shares} |")
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _override(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key, yaml.safe_load(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("study_out"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--cases", type=int, default=32)
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--shape", nargs=3, type=int, default=[64, 64, 48])
    p.add_argument("--data-seed", type=int, default=100)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--jobs", type=int, default=2, help="Runs in parallel (one thread each).")
    p.add_argument("--set", action="append", default=[], type=_override, metavar="KEY=VALUE",
                   help="Config override for every run (YAML value), e.g. method.kd_temperature=4")
    p.add_argument("--tag", default="", help="Suffix of the run names (for --set experiments).")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    prepare_data(args)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    todo = [(v, s) for s in args.seeds for v in args.variants]
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_variant, args, v, s, threads): (v, s) for v, s in todo}
        for fut in as_completed(futures):
            v, s = futures[fut]
            try:
                row = fut.result()
            except subprocess.CalledProcessError:
                failed.append(f"{v}-s{s}")
                print(f"FAILED {v} seed {s}: see {args.out / 'logs' / f'{v}-s{s}.log'}",
                      flush=True)
                continue
            rows.append(row)
            d = row["dice"]
            print(f"done {v} seed {s}: Dice WT {d['WT']:.3f} TC {d['TC']:.3f} ET {d['ET']:.3f}"
                  f" ({row['train_seconds']:.0f} s)", flush=True)
    names = [f"{v}-{args.tag}" if args.tag else v for v in args.variants]
    rows.sort(key=lambda r: (names.index(r["variant"]), r["seed"]))
    write_outputs(args, rows, aggregate(rows, names))
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
