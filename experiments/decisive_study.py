"""The decisive study (issue 16): does distillation help a T1ce-only student on held-out cases?

One command builds the data, trains every arm for every seed, scores each student on the store's
test set (never trained or validated on) and writes the analysis:

    python experiments/decisive_study.py --out study16                  # the full study
    python experiments/decisive_study.py --out smoke --cases 12 --shape 40 40 32 --patch 16 \\
        --widths 4 8 12 16 --test-fraction 0.25 --folds 8 --epochs 1 --iters 2 --seeds 0 1 \\
        --teacher-steps 2                                               # a smoke run

Data: a phantom of ``--cases`` cases (``mtcmkd synth``, 2021 layout), preprocessed with a fixed
test set (``--test-fraction``) and ``--folds`` folds of the rest; fold 0 is the validation set
(best-model choice only: `mtcmkd evaluate --run` scores the run's best_student.pt), the other
folds train. 160 cases, 0.3 and 7 folds give 48 test, 16 validation and 96 training cases.
Arm F's store is a copy of the raw data whose training and validation labels have a jittered
edema boundary (`mtcmkd.phantom.label_noise.noisy_copy`); its test labels stay clean, and its
test set and folds must equal the clean store's (checked).

Arms (same student network, steps, patch, batch and seeds):

- A ``baseline``: the T1ce student alone (configs/baseline.yaml);
- B ``offline-kd``: MTCM-KD with frozen teachers (flair, t2, t1) loaded from the ``teachers``
  source run (``method.teachers_from``), KD from step 0;
- C ``self-kd``: the same with one T1ce teacher from the ``t1ce-teacher`` source run: KD with no
  privileged information (the control for B);
- D ``mdsd``: modality-dropout self-distillation (configs/mdsd.yaml);
- E ``online-kd``: MTCM-KD as published, teachers trained online (configs/mtcmkd.yaml);
- F ``baseline-noisy``, ``offline-kd-noisy``, ``mdsd-noisy``: A, B, D on the noisy store (B's
  teachers from the ``teachers`` source trained on the noisy store).

Teacher sources train once per store, with seed 100 and ``--teacher-steps`` steps (default twice
the students'): ``teachers`` = configs/mtcmkd.yaml trained online (its teachers serve, its
student is ignored), ``t1ce-teacher`` = configs/baseline.yaml (a T1ce network).

Analysis, written whether or not every run succeeded (failed runs are listed):

- ``OUT/study.json``: settings (arguments, commit, store case counts, the noise calibration),
  per arm and seed the per-case test metrics (Dice and HD95 per region, truth voxels), the
  training seconds, the validation WT Dice trajectory and a convergence flag (WT at the last
  validation within 0.005 of WT at the last validation at or before 80% of the steps), and the
  comparisons, each the dict of `mtcmkd.compare.compare` on the seeds' metrics.json files
  (seed-averaged per case; each region on the cases whose truth has it, so ET on the
  ET-positive cases; Holm over the regions of one comparison), plus a family-wise Holm
  correction over the WT (primary endpoint) p values of all comparisons;
- ``OUT/study.md``: one table per comparison, the arm means (+- sd over seeds) and convergence;
- ``OUT/paired_differences.png``: the per-case paired WT differences of each comparison.

Resumable: a run whose ``summary.json`` says it finished (not preempted) and that has
``eval/metrics.json`` is not redone; a preempted run is resumed and scored again. ``--jobs`` runs
train in parallel, each with ``--threads`` threads (OMP/MKL_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtcmkd.atomic import atomic_write_text
from mtcmkd.compare import CompareError, compare, holm
from mtcmkd.data import StoreInfo

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
REGIONS = ("WT", "TC", "ET")
#: The equivalence margin of the verdicts (Dice).
MARGIN = 0.02
#: Converged: validation WT Dice moved less than this over the last 20% of the steps.
CONVERGENCE_TOLERANCE = 0.005
CONVERGENCE_FROM = 0.8
#: Seed of the teacher source runs (one per store, serving every student seed).
TEACHER_SEED = 100
STORES = ("clean", "noisy")


@dataclass(frozen=True)
class Arm:
    """One arm: a config file, its overrides, where its frozen teachers come from, its store."""

    label: str
    config: str
    overrides: dict[str, Any] = field(default_factory=dict)
    teachers: str | None = None  # a key of TEACHER_SOURCES
    store: str = "clean"


#: Teacher source runs: name -> config file. Trained once per store that an arm needs.
TEACHER_SOURCES: dict[str, str] = {"teachers": "mtcmkd.yaml", "t1ce-teacher": "baseline.yaml"}

_OFFLINE = {"method.kd_start_epoch": 0}
ARMS: dict[str, Arm] = {
    "baseline": Arm("A", "baseline.yaml"),
    "offline-kd": Arm("B", "mtcmkd.yaml", _OFFLINE, "teachers"),
    "self-kd": Arm("C", "mtcmkd.yaml", {"method.teacher_modalities": ["t1ce"], **_OFFLINE},
                   "t1ce-teacher"),
    "mdsd": Arm("D", "mdsd.yaml"),
    "online-kd": Arm("E", "mtcmkd.yaml"),
    "baseline-noisy": Arm("F", "baseline.yaml", store="noisy"),
    "offline-kd-noisy": Arm("F", "mtcmkd.yaml", _OFFLINE, "teachers", store="noisy"),
    "mdsd-noisy": Arm("F", "mdsd.yaml", store="noisy"),
}


@dataclass(frozen=True)
class Comparison:
    """B - A on the test cases; ``name`` is how the tables call it."""

    name: str
    a: str
    b: str
    question: str


COMPARISONS: tuple[Comparison, ...] = (
    Comparison("B - A", "baseline", "offline-kd",
               "primary: offline cross-modal KD (frozen FLAIR/T2/T1 teachers) vs the student "
               "alone"),
    Comparison("C - A", "baseline", "self-kd", "KD without privileged information (T1ce "
               "teacher) vs the student alone"),
    Comparison("D - A", "baseline", "mdsd", "modality-dropout self-distillation vs the student "
               "alone"),
    Comparison("E - A", "baseline", "online-kd", "the published online MTCM-KD vs the student "
               "alone"),
    Comparison("B - C", "self-kd", "offline-kd", "privileged information: cross-modal teachers "
               "vs a T1ce teacher"),
    Comparison("B' - A'", "baseline-noisy", "offline-kd-noisy", "noisy training labels: "
               "offline cross-modal KD vs the student alone"),
    Comparison("D' - A'", "baseline-noisy", "mdsd-noisy", "noisy training labels: "
               "modality-dropout self-distillation vs the student alone"),
)


class StudyError(RuntimeError):
    """The study cannot go on; the message says what is wrong and what to do."""


# ---------------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class Task:
    """One training run (and its test evaluation for student arms)."""

    name: str
    run_dir: Path
    config: str
    overrides: dict[str, Any]
    deps: tuple[str, ...] = ()
    evaluate: bool = True


def teacher_run_name(source: str, store: str) -> str:
    return source if store == "clean" else f"{source}-noisy"


def student_run_name(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}"


def store_path(args: argparse.Namespace, store: str) -> Path:
    return args.out / ("store" if store == "clean" else "store-noisy")


def val_every(args: argparse.Namespace, epochs: int) -> int:
    return args.val_every if args.val_every else max(1, epochs // 5)


def common(args: argparse.Namespace, store: str, seed: int, epochs: int) -> dict[str, Any]:
    """Overrides every run shares: data, network size, budget, schedule, validation."""
    return {
        "data.store": str(store_path(args, store)),
        "data.fold": 0,
        "data.patch_size": [args.patch] * 3,
        "data.num_workers": 0,
        "data.augment": True,
        "model.widths": list(args.widths),
        "train.epochs": epochs,
        "train.iters_per_epoch": args.iters,
        "train.batch_size": args.batch,
        "train.lr": args.lr,
        "train.precision": "fp32",
        "train.seed": seed,
        "train.log_every": 10,
        "train.val_cases": None,
        "train.val_every": val_every(args, epochs),
        # the full sliding window every validation, as in docs/RESULTS.md (the trajectory and
        # the convergence rule read its Dice; a patch estimate is another quantity)
        "train.validation": "full",
        "train.ckpt_every": epochs * args.iters,  # steps: one checkpoint, at the end
        "train.plateau_start_epoch": epochs,  # no LR schedule within this budget
    }


def teacher_epochs(args: argparse.Namespace) -> int:
    return args.teacher_steps // args.iters


def plan(args: argparse.Namespace) -> list[Task]:
    """Every run the selected arms need: teacher sources first, then the students seed by seed."""
    runs = args.out / "runs"
    tasks: list[Task] = []
    sources = sorted({(ARMS[a].teachers, ARMS[a].store) for a in args.arms
                      if ARMS[a].teachers is not None},
                     key=lambda s: (STORES.index(s[1]), list(TEACHER_SOURCES).index(s[0])))
    for source, store in sources:
        name = teacher_run_name(source, store)
        over = {**common(args, store, TEACHER_SEED, teacher_epochs(args)), **dict(args.set)}
        tasks.append(Task(name, runs / name, TEACHER_SOURCES[source], over, evaluate=False))
    for seed in args.seeds:
        for arm_name in args.arms:
            arm = ARMS[arm_name]
            over = {**common(args, arm.store, seed, args.epochs), **arm.overrides}
            deps: tuple[str, ...] = ()
            if arm.teachers is not None:
                source = teacher_run_name(arm.teachers, arm.store)
                over["method.teachers_from"] = str(runs / source)
                deps = (source,)
            over.update(dict(args.set))
            name = student_run_name(arm_name, seed)
            tasks.append(Task(name, runs / name, arm.config, over, deps))
    return tasks


def run_task(args: argparse.Namespace, task: Task) -> float:
    """Train (unless summary.json exists) and evaluate on the test split (unless
    eval/metrics.json exists); returns the wall seconds. Raises CalledProcessError."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    log = log_path(args, task.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not is_trained(task.run_dir):
        # A preempted run (summary.json says so) is resumed, and its stale scores go.
        (task.run_dir / "eval" / "metrics.json").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "mtcmkd", "train", "-c", str(CONFIGS / task.config),
               "--out", str(task.run_dir)]
        if (task.run_dir / "checkpoints").is_dir():
            cmd.append("--resume")
        for key, value in task.overrides.items():
            cmd += ["--set", f"{key}={json.dumps(value)}"]
        with log.open("a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if task.evaluate and not (task.run_dir / "eval" / "metrics.json").is_file():
        cmd = [sys.executable, "-m", "mtcmkd", "evaluate", "--year", "2021", "--run",
               str(task.run_dir), "--split", args.split, "--device", args.device]
        with log.open("a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, env=env)
    return time.perf_counter() - start


def log_path(args: argparse.Namespace, name: str) -> Path:
    return args.out / "logs" / f"{name}.log"


def schedule(tasks: Sequence[Task], jobs: int, work: Callable[[Task], Any],
             report: Callable[[str, Task, Any], None] = lambda *_: None) -> dict[str, Any]:
    """Run `work` on every task, at most `jobs` at a time, each after the tasks it depends on.

    Returns name -> what `work` returned, or the exception it raised. A task whose dependency
    failed is not run: its entry is a :class:`StudyError` naming the dependency. `report`
    hears ("start" | "done" | "failed" | "skipped", task, result or exception).
    """
    pending = list(tasks)
    results: dict[str, Any] = {}
    running: dict[Future[Any], Task] = {}
    known = {t.name for t in tasks}
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        while pending or running:
            for task in list(pending):
                failed = [d for d in task.deps
                          if d not in known or isinstance(results.get(d), BaseException)]
                if failed:
                    pending.remove(task)
                    results[task.name] = StudyError(f"its teacher source {failed[0]} failed")
                    report("skipped", task, results[task.name])
            for task in list(pending):
                if len(running) >= max(1, jobs):
                    break
                if all(d in results for d in task.deps):
                    pending.remove(task)
                    report("start", task, None)
                    running[pool.submit(work, task)] = task
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                task = running.pop(future)
                try:
                    results[task.name] = future.result()
                    report("done", task, results[task.name])
                except Exception as err:  # noqa: BLE001 - one failed run must not stop the rest
                    results[task.name] = err
                    report("failed", task, err)
    return results


def failure_reason(args: argparse.Namespace, name: str, err: BaseException) -> str:
    if isinstance(err, subprocess.CalledProcessError):
        step = "evaluate" if "evaluate" in err.cmd else "train"
        return f"{step} exited with {err.returncode}; see {log_path(args, name)}"
    return f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------------------- the data


def git_commit() -> dict[str, Any]:
    """The code's commit and whether tracked files differed from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": head, "dirty": bool(dirty.strip())}


def mtcmkd_cli(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "mtcmkd", *argv], check=True)


def read_store(path: Path) -> StoreInfo | None:
    """The store's info, or None when it is absent or unfinished."""
    try:
        return StoreInfo.read(path)
    except Exception:  # noqa: BLE001 - absent, unfinished or foreign: (re)preprocess
        return None


def preprocess(args: argparse.Namespace, raw: Path, store: Path) -> StoreInfo:
    """`mtcmkd preprocess` unless the store is finished; returns its info."""
    info = read_store(store)
    if info is None:
        mtcmkd_cli("preprocess", str(raw), str(store), "--workers", str(args.jobs),
                   "--test-fraction", str(args.test_fraction), "--folds", str(args.folds),
                   "--seed", str(args.split_seed))
        info = StoreInfo.read(store)
    return info


def split_counts(info: StoreInfo, fold: int = 0) -> dict[str, Any]:
    """Case counts of the store: all, test, and the train/validation split of `fold`."""
    validation = sorted(c for c, f in info.folds.items() if f == fold)
    train = sorted(c for c, f in info.folds.items() if f != fold)
    return {"cases": len(info.cases), "labelled": len(info.labelled_cases),
            "test": len(info.test_cases), "validation": len(validation), "train": len(train),
            "folds": info.n_folds, "validation_fold": fold,
            "test_cases": list(info.test_cases), "validation_cases": validation}


def prepare_clean(args: argparse.Namespace) -> StoreInfo:
    raw = args.out / "raw"
    if not raw.is_dir():  # synth into a sibling, renamed when whole
        partial = args.out / "raw.partial"
        shutil.rmtree(partial, ignore_errors=True)
        mtcmkd_cli("synth", str(partial), "--cases", str(args.cases), "--layout", "2021",
                   "--shape", *map(str, args.shape), "--seed", str(args.data_seed))
        partial.rename(raw)
    info = preprocess(args, raw, store_path(args, "clean"))
    if len(info.cases) != args.cases or info.n_folds != args.folds:
        raise StudyError(f"{store_path(args, 'clean')}: {len(info.cases)} cases in "
                         f"{info.n_folds} folds, but --cases {args.cases} --folds {args.folds}; "
                         "use another --out, or the settings this folder was made with")
    counts = split_counts(info)
    if counts["test"] < 2 or counts["validation"] < 1 or counts["train"] < 1:
        raise StudyError(f"{store_path(args, 'clean')}: {counts['train']} train, "
                         f"{counts['validation']} validation, {counts['test']} test cases; "
                         "the study needs >= 1, >= 1 and >= 2: raise --cases or change "
                         "--test-fraction/--folds")
    return info


def noise_amplitude(args: argparse.Namespace) -> float:
    """--noise-amplitude, else the default of `jitter_edema` (calibrated to WT Dice ~0.85-0.9)."""
    if args.noise_amplitude is not None:
        return float(args.noise_amplitude)
    from mtcmkd.phantom.label_noise import jitter_edema

    return float(inspect.signature(jitter_edema).parameters["amplitude"].default)


def prepare_noisy(args: argparse.Namespace, clean: StoreInfo) -> tuple[StoreInfo, dict[str, Any]]:
    """The noisy raw copy (every case but the clean test cases jittered), its store, and the
    noise calibration (WT Dice clean vs noisy per jittered case).

    Raises:
        StudyError: the noisy store's test set or folds differ from the clean store's.
    """
    from mtcmkd.phantom.label_noise import noisy_copy

    raw, noisy_raw = args.out / "raw", args.out / "raw-noisy"
    calibration_file = args.out / "noise_calibration.json"
    amplitude = noise_amplitude(args)
    if not calibration_file.is_file():
        shutil.rmtree(noisy_raw, ignore_errors=True)  # from a run killed before the record
        jittered = sorted(set(clean.cases) - set(clean.test_cases))
        dice = noisy_copy(raw, noisy_raw, jittered, seed=args.noise_seed, amplitude=amplitude)
        values = list(dice.values())
        calibration = {
            "what": "WT Dice between the clean and the jittered seg of each jittered case "
                    "(mtcmkd.phantom.label_noise.noisy_copy); test cases are not jittered",
            "amplitude": amplitude, "seed": args.noise_seed, "jittered_cases": len(values),
            "wt_dice_mean": float(np.mean(values)) if values else None,
            "wt_dice_min": float(np.min(values)) if values else None,
            "wt_dice_max": float(np.max(values)) if values else None,
            "per_case": dict(sorted(dice.items())),
        }
        atomic_write_text(calibration_file, json.dumps(calibration, indent=2) + "\n")
    calibration = json.loads(calibration_file.read_text())
    if (calibration["amplitude"], calibration["seed"]) != (amplitude, args.noise_seed):
        raise StudyError(f"{calibration_file}: made with amplitude {calibration['amplitude']} "
                         f"seed {calibration['seed']}, not {amplitude} seed {args.noise_seed}; "
                         "remove it, raw-noisy, store-noisy and the noisy runs, or use another "
                         "--out")
    info = preprocess(args, noisy_raw, store_path(args, "noisy"))
    if tuple(info.test_cases) != tuple(clean.test_cases):
        only = sorted(set(info.test_cases) ^ set(clean.test_cases))
        raise StudyError(f"{store_path(args, 'noisy')}: its test cases differ from "
                         f"{store_path(args, 'clean')}'s (in one only: {', '.join(only[:5])}); "
                         "remove the noisy store and raw-noisy and run again")
    if dict(info.folds) != dict(clean.folds):
        raise StudyError(f"{store_path(args, 'noisy')}: its folds differ from "
                         f"{store_path(args, 'clean')}'s; remove the noisy store and run again")
    return info, calibration


# ---------------------------------------------------------------------------- the analysis


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    return records


def validation_trajectory(log: Path) -> list[dict[str, float]]:
    """``[{"epoch", "step", "WT"}]`` from the epoch records of log.jsonl that carry a
    validation Dice, in step order (a resumed run's repeated epochs: the last record wins)."""
    by_step: dict[int, dict[str, float]] = {}
    for record in read_log(log):
        if record.get("kind") == "epoch" and "val/dice_WT" in record:
            by_step[int(record["step"])] = {"epoch": int(record["epoch"]),
                                            "step": int(record["step"]),
                                            "WT": float(record["val/dice_WT"])}
    return [by_step[s] for s in sorted(by_step)]


def convergence(trajectory: Sequence[dict[str, float]], total_steps: int, *,
                tolerance: float = CONVERGENCE_TOLERANCE,
                fraction: float = CONVERGENCE_FROM) -> dict[str, Any]:
    """Did the validation WT Dice settle? Compares the last validation with the last one at or
    before `fraction` of `total_steps`; ``converged`` is None when there is no such earlier
    validation (e.g. only one validation)."""
    if not trajectory:
        return {"converged": None, "reason": "no validation in log.jsonl"}
    last = trajectory[-1]
    earlier = [v for v in trajectory if v["step"] <= fraction * total_steps
               and v["step"] < last["step"]]
    if not earlier:
        return {"converged": None, "reason": f"no validation at or before {fraction:.0%} of "
                                              f"the {total_steps} steps before the last one"}
    ref = earlier[-1]
    change = last["WT"] - ref["WT"]
    return {"converged": bool(abs(change) < tolerance), "tolerance": tolerance,
            "wt_last": last["WT"], "step_last": last["step"], "wt_reference": ref["WT"],
            "step_reference": ref["step"], "change": change}


def run_record(run_dir: Path, total_steps: int) -> dict[str, Any]:
    """What study.json keeps of one finished student run."""
    metrics_file = run_dir / "eval" / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    trajectory = validation_trajectory(run_dir / "log.jsonl")
    settled = convergence(trajectory, total_steps)
    cases = {str(r["case"]): {"dice": r["dice"], "hd95": r["hd95"],
                              "truth_voxels": r.get("truth_voxels")} for r in metrics["cases"]}
    return {"run": str(run_dir), "metrics": str(metrics_file), "split": metrics.get("split"),
            "train_seconds": summary.get("seconds"), "steps": total_steps,
            "validation_wt": trajectory, "convergence": settled,
            "converged": settled["converged"],
            "mean": metrics.get("mean", {}), "cases": cases}


def source_record(run_dir: Path, total_steps: int) -> dict[str, Any]:
    """What study.json keeps of a teacher source run: seconds, the validation WT trajectory of
    the network it validates (its student: for t1ce-teacher the teacher itself, for teachers
    the ignored T1ce student) and the teachers' training Dice per epoch."""
    summary = run_dir / "summary.json"
    log = run_dir / "log.jsonl"
    trajectory = validation_trajectory(log)
    teacher_dice = [{"epoch": r["epoch"], "step": r.get("step"),
                     **{k: v for k, v in r.items() if k.startswith("teacher_wt_dice/")}}
                    for r in read_log(log)
                    if r.get("kind") == "epoch" and any(k.startswith("teacher_wt_dice/")
                                                        for k in r)]
    return {"run": str(run_dir), "steps": total_steps, "finished": is_trained(run_dir),
            "train_seconds": (json.loads(summary.read_text()).get("seconds")
                              if summary.is_file() else None),
            "validation_wt": trajectory, "convergence": convergence(trajectory, total_steps),
            "teacher_train_wt_dice": teacher_dice}


def is_trained(run_dir: Path) -> bool:
    """Training finished: summary.json exists and does not say the run was preempted (a
    preempted run writes one too, with ``"preempted": true``, and must be resumed)."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return False
    try:
        return not json.loads(summary.read_text()).get("preempted", False)
    except (OSError, ValueError, AttributeError):
        return False


def is_finished(run_dir: Path, evaluated: bool = True) -> bool:
    return is_trained(run_dir) and (
        not evaluated or (run_dir / "eval" / "metrics.json").is_file())


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = float(np.mean(values))
    return m, (float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


def arm_summary(records: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean +- sd over seeds of each seed's case-mean Dice (ET over the ET-positive cases) and
    WT HD95, the convergence count and the training seconds."""
    seeds = sorted(records)
    out: dict[str, Any] = {"seeds": seeds}
    for region in REGIONS:
        per_seed = []
        for s in seeds:
            cases = records[s]["cases"].values()
            positive = [c["dice"][region] for c in cases
                        if c.get("truth_voxels") is None or c["truth_voxels"][region] > 0]
            per_seed.append(float(np.mean(positive)) if positive else math.nan)
        out[f"dice_{region}"] = mean_sd(per_seed)
    out["hd95_WT"] = mean_sd([float(np.mean([c["hd95"]["WT"]
                                             for c in records[s]["cases"].values()]))
                              for s in seeds])
    flags = [records[s]["converged"] for s in seeds]
    out["converged"] = {"yes": flags.count(True), "no": flags.count(False),
                        "unknown": flags.count(None)}
    out["train_seconds"] = mean_sd([records[s]["train_seconds"] or 0.0 for s in seeds])
    return out


def run_comparisons(arm_files: dict[str, dict[int, Path]], arms: Sequence[str]
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each comparison whose two arms were selected, by `compare` (positive cases per region,
    margin MARGIN), plus the family-wise Holm over the WT p values of those that ran."""
    out: list[dict[str, Any]] = []
    for c in COMPARISONS:
        entry: dict[str, Any] = {"name": c.name, "a": c.a, "b": c.b, "question": c.question}
        if c.a not in arms or c.b not in arms:
            entry["skipped"] = "an arm was not selected (--arms)"
            out.append(entry)
            continue
        a_seeds, b_seeds = sorted(arm_files.get(c.a, {})), sorted(arm_files.get(c.b, {}))
        entry["seeds"] = {"a": a_seeds, "b": b_seeds}
        missing = [arm for arm, seeds in ((c.a, a_seeds), (c.b, b_seeds)) if not seeds]
        if missing:
            entry["error"] = f"no finished run of {' and '.join(missing)}"
            out.append(entry)
            continue
        try:
            entry["result"] = compare([arm_files[c.a][s] for s in a_seeds],
                                      [arm_files[c.b][s] for s in b_seeds],
                                      margin=MARGIN, positive_only=True)
        except CompareError as err:
            entry["error"] = str(err)
        out.append(entry)
    ran = [e for e in out if "result" in e]
    wt_p = [next(r["wilcoxon_p"] for r in e["result"]["regions"] if r["region"] == "WT")
            for e in ran]
    adjusted = holm(wt_p) if wt_p else []
    for e, p in zip(ran, adjusted, strict=True):
        e["familywise_holm_p_WT"] = p
    familywise = {
        "what": "Holm-Bonferroni over the WT (primary endpoint) Wilcoxon p values of all "
                "comparisons that ran; each comparison's own holm_p adjusts over its regions "
                "only",
        "comparisons": [e["name"] for e in ran], "wilcoxon_p_WT": wt_p, "holm_p_WT": adjusted,
    }
    return out, familywise


def fmt_p(p: float) -> str:
    return f"{p:.3g}"


def named_verdict(verdict: str, b: str) -> str:
    """compare()'s verdict with its side "B" called by the arm's name."""
    return f"{b}{verdict[1:]}" if verdict.startswith("B ") else verdict


def markdown(study: dict[str, Any]) -> str:
    """study.md: settings, one table per comparison, the arm means and convergence."""
    s = study["settings"]
    counts = s["store"]
    lines = [
        "# Decisive study (issue 16)", "",
        f"Commit {s['commit']}{' (with local changes)' if s['dirty'] else ''}; "
        f"{counts['cases']} phantom cases: {counts['train']} train, {counts['validation']} "
        f"validation (fold 0, model selection only), {counts['test']} test (scored here). "
        f"Students: {s['epochs'] * s['iters']} steps ({s['epochs']} x {s['iters']}), batch "
        f"{s['batch']}, patch {s['patch']}^3, widths {s['widths']}; teachers: "
        f"{s['teacher_steps']} steps, seed {TEACHER_SEED}; seeds {s['seeds']}.", "",
        "Each comparison: `mtcmkd.compare.compare` on the seeds' metrics.json (per case averaged "
        "over seeds), each region on the cases whose truth has it (ET: ET-positive cases only); "
        "95% percentile-bootstrap CI of the mean paired difference; two-sided Wilcoxon "
        "signed-rank p; Holm over the three regions of the comparison; the family-wise Holm p "
        "over the WT p values of all comparisons is given under each table. Verdicts use a "
        f"margin of {MARGIN}.", "",
    ]
    if s.get("noise_calibration"):
        cal = s["noise_calibration"]
        lines += [f"Arm F: training/validation labels jittered at amplitude {cal['amplitude']} "
                  f"(WT Dice clean vs noisy {cal['wt_dice_mean']:.3f}, range "
                  f"{cal['wt_dice_min']:.3f}-{cal['wt_dice_max']:.3f}, "
                  f"{cal['jittered_cases']} cases); test labels clean.", ""]
    for entry in study["comparisons"]:
        if "skipped" in entry:
            continue
        a, b = entry["a"], entry["b"]
        lines += [f"## {entry['name']}: {b} minus {a}", "", entry["question"], ""]
        if "result" not in entry:
            lines += [f"Not computed: {entry['error']}", ""]
            continue
        lines += [f"| region | mean {a} | mean {b} | difference | 95% CI | Wilcoxon p | Holm p "
                  "| n cases | verdict |", "|---|---|---|---|---|---|---|---|---|"]
        for row in entry["result"]["regions"]:
            lines.append(
                f"| {row['region']} | {row['mean_a']:.4f} | {row['mean_b']:.4f} | "
                f"{row['mean_diff']:+.4f} | [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}] | "
                f"{fmt_p(row['wilcoxon_p'])} | {fmt_p(row['holm_p'])} | {row['n_cases']} | "
                f"{named_verdict(row['verdict'], b)} |")
        seeds = entry["seeds"]
        lines += ["", f"Seeds: {a} {seeds['a']}, {b} {seeds['b']}. Family-wise Holm p (WT): "
                      f"{fmt_p(entry['familywise_holm_p_WT'])}.", ""]
    skipped = [e["name"] for e in study["comparisons"] if "skipped" in e]
    if skipped:
        lines += [f"Not run (an arm not selected with --arms): {', '.join(skipped)}.", ""]
    lines += ["## Arms", "", "Mean +- sd over seeds of each seed's mean over the test cases "
              "(ET over the ET-positive cases). Converged: validation WT Dice moved < "
              f"{CONVERGENCE_TOLERANCE} over the last {1 - CONVERGENCE_FROM:.0%} of the steps "
              "(yes/no/unknown).", "",
              "| arm | seeds | Dice WT | Dice TC | Dice ET (ET+) | HD95 WT (mm) | converged | "
              "train s/run |", "|---|---|---|---|---|---|---|---|"]
    for name, summary in study["arms"].items():
        if not summary.get("seeds"):
            lines.append(f"| {ARMS[name].label} {name} | none finished | | | | | | |")
            continue
        dice = [f"{summary[f'dice_{r}'][0]:.4f} +- {summary[f'dice_{r}'][1]:.4f}"
                for r in REGIONS]
        conv = summary["converged"]
        lines.append(
            f"| {ARMS[name].label} {name} | {len(summary['seeds'])} | " + " | ".join(dice)
            + f" | {summary['hd95_WT'][0]:.2f} +- {summary['hd95_WT'][1]:.2f} | "
            f"{conv['yes']}/{conv['no']}/{conv['unknown']} | "
            f"{summary['train_seconds'][0]:.0f} |")
    if study["failed"]:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {f['run']}: {f['reason']}" for f in study["failed"]]
    return "\n".join(lines) + "\n"


def plot_paired_differences(study: dict[str, Any], out_path: Path) -> Path | None:
    """Per comparison, the per-case WT differences B - A (points), their mean and 95% CI."""
    from matplotlib.figure import Figure

    from mtcmkd.plots import save_png

    done = [e for e in study["comparisons"] if "result" in e]
    if not done:
        return None
    fig = Figure(figsize=(1.3 * len(done) + 2.5, 4.5))
    ax = fig.subplots()
    rng = np.random.default_rng(0)  # the horizontal jitter only
    ax.axhspan(-MARGIN, MARGIN, color="tab:green", alpha=0.12,
               label=f"equivalence margin +-{MARGIN}")
    ax.axhline(0.0, color="grey", linewidth=1)
    for i, entry in enumerate(done):
        diffs = np.array(list(entry["result"]["per_case"]["WT"].values()))
        ax.scatter(i + rng.uniform(-0.18, 0.18, diffs.size), diffs, s=10, alpha=0.6,
                   color="tab:blue", label="per case (seed mean)" if i == 0 else None)
        row = next(r for r in entry["result"]["regions"] if r["region"] == "WT")
        ax.errorbar([i + 0.3], [row["mean_diff"]],
                    yerr=[[row["mean_diff"] - row["ci_low"]], [row["ci_high"] - row["mean_diff"]]],
                    fmt="o", color="black", capsize=4,
                    label="mean, 95% bootstrap CI" if i == 0 else None)
    ax.set_xticks(range(len(done)), [e["name"] for e in done])
    ax.set_ylabel("test WT Dice difference (paired per case)")
    ax.set_title("Per-case paired WT Dice differences")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_png(fig, out_path)


def analyse(args: argparse.Namespace, settings: dict[str, Any],
            failed: list[dict[str, str]]) -> dict[str, Any]:
    """Read every finished run of the selected arms, compare, write study.json, study.md and
    paired_differences.png to ``args.out``; returns the study dict."""
    runs = args.out / "runs"
    total = args.epochs * args.iters
    records: dict[str, dict[int, dict[str, Any]]] = {}
    files: dict[str, dict[int, Path]] = {}
    for arm in args.arms:
        records[arm], files[arm] = {}, {}
        for seed in args.seeds:
            run_dir = runs / student_run_name(arm, seed)
            if is_finished(run_dir):
                records[arm][seed] = run_record(run_dir, total)
                files[arm][seed] = run_dir / "eval" / "metrics.json"
    sources = {task.name: source_record(task.run_dir, teacher_epochs(args) * args.iters)
               for task in plan(args) if not task.evaluate}
    comparisons, familywise = run_comparisons(files, args.arms)
    study = {
        "what": "issue 16's decisive study: T1ce-only students on a phantom, scored on the "
                "store's test set; per-case per-seed test metrics and paired comparisons "
                "(experiments/decisive_study.py)",
        "settings": settings,
        "arms": {arm: arm_summary(records[arm]) if records[arm] else {"seeds": []}
                 for arm in args.arms},
        "runs": {arm: {str(s): r for s, r in records[arm].items()} for arm in args.arms},
        "teacher_sources": sources,
        "failed": failed,
        "comparisons": comparisons,
        "familywise_holm": familywise,
    }
    atomic_write_text(args.out / "study.json", json.dumps(study, indent=2) + "\n")
    atomic_write_text(args.out / "study.md", markdown(study))
    plot_paired_differences(study, args.out / "paired_differences.png")
    return study


# ---------------------------------------------------------------------------- the command


def _override(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key, yaml.safe_load(value)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("study16"))
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--cases", type=int, default=160)
    p.add_argument("--shape", nargs=3, type=int, default=[64, 64, 48])
    p.add_argument("--data-seed", type=int, default=100, help="Seed of `mtcmkd synth`.")
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--folds", type=int, default=7, help="Folds of the non-test cases; fold 0 "
                   "is the validation set.")
    p.add_argument("--split-seed", type=int, default=0, help="Seed of the test set and folds.")
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--widths", nargs=4, type=int, default=[8, 16, 24, 32])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--iters", type=int, default=20, help="Optimiser steps per epoch.")
    p.add_argument("--teacher-steps", type=int, default=None,
                   help="Steps of the teacher source runs (a multiple of --iters); default "
                        "twice the students'.")
    p.add_argument("--val-every", type=int, default=None,
                   help="Validate every N epochs; default epochs // 5 (at least 1).")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--noise-amplitude", type=float, default=None,
                   help="Edema boundary jitter of arm F (voxels); default: jitter_edema's.")
    p.add_argument("--noise-seed", type=int, default=100)
    p.add_argument("--split", default="test", choices=["test", "validation"],
                   help="What `mtcmkd evaluate` scores (test: the honest default).")
    p.add_argument("--device", default="cpu", help="`mtcmkd evaluate --device` (auto on a GPU).")
    p.add_argument("--jobs", type=int, default=2, help="Runs in parallel.")
    p.add_argument("--threads", type=int, default=1, help="Threads per run (OMP/MKL).")
    p.add_argument("--set", action="append", default=[], type=_override, metavar="KEY=VALUE",
                   help="Config override for every run (YAML value).")
    args = p.parse_args(argv)
    if args.teacher_steps is None:
        args.teacher_steps = 2 * args.epochs * args.iters
    if args.teacher_steps < args.iters or args.teacher_steps % args.iters:
        p.error(f"--teacher-steps {args.teacher_steps} must be a positive multiple of "
                f"--iters {args.iters}")
    for name in ("epochs", "iters", "batch", "jobs", "threads", "cases", "patch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.val_every is not None and args.val_every < 1:
        p.error("--val-every must be >= 1")
    args.arms = list(dict.fromkeys(args.arms))
    args.seeds = list(dict.fromkeys(args.seeds))
    args.out = args.out.resolve()
    return args


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as JSON, the validation interval, the commit; the data prep adds the
    store counts and the noise calibration."""
    settings: dict[str, Any] = {k: (str(v) if isinstance(v, Path) else v)
                                for k, v in vars(args).items()}
    settings["set"] = [list(kv) for kv in args.set]
    settings["val_every"] = val_every(args, args.epochs)
    settings["student_steps"] = args.epochs * args.iters
    settings["teacher_seed"] = TEACHER_SEED
    settings["margin"] = MARGIN
    settings["convergence"] = {"tolerance": CONVERGENCE_TOLERANCE, "from": CONVERGENCE_FROM}
    return settings | git_commit()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    every = val_every(args, args.epochs)
    if args.epochs % every:
        print(f"note: {args.epochs} epochs is not a multiple of the validation interval {every}:"
              " the last epochs are not validated", flush=True)
    settings = settings_of(args)
    settings["command"] = " ".join(["python", "experiments/decisive_study.py",
                                    *(sys.argv[1:] if argv is None else argv)])
    try:
        clean = prepare_clean(args)
        settings["store"] = split_counts(clean)
        c = settings["store"]
        print(f"store: {c['cases']} cases, {c['train']} train / {c['validation']} validation "
              f"(fold 0) / {c['test']} test", flush=True)
        if any(ARMS[a].store == "noisy" for a in args.arms):
            noisy, calibration = prepare_noisy(args, clean)
            settings["noisy_store"] = split_counts(noisy)
            settings["noise_calibration"] = calibration
            print(f"noisy store: {calibration['jittered_cases']} cases jittered at amplitude "
                  f"{calibration['amplitude']}, WT Dice clean vs noisy "
                  f"{calibration['wt_dice_mean']:.3f}; test cases identical", flush=True)
    except (StudyError, ImportError, ValueError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    tasks = plan(args)
    finished = {t.name for t in tasks if is_finished(t.run_dir, t.evaluate)}
    print(f"{len(tasks)} runs, {len(finished)} already finished; {args.jobs} in "
          f"parallel, {args.threads} thread(s) each", flush=True)

    def report(event: str, task: Task, result: Any) -> None:
        if task.name in finished:
            return
        if event == "start":
            print(f"start {task.name}", flush=True)
        elif event == "done":
            print(f"done {task.name} ({result:.0f} s)", flush=True)
        else:
            print(f"FAILED {task.name}: {failure_reason(args, task.name, result)}", flush=True)

    results = schedule(tasks, args.jobs, lambda t: run_task(args, t), report)
    failed = [{"run": name, "reason": failure_reason(args, name, r)}
              for name, r in results.items() if isinstance(r, BaseException)]
    analyse(args, settings, failed)
    print((args.out / "study.md").read_text())
    wrote = [args.out / n for n in ("study.json", "study.md", "paired_differences.png")]
    print("wrote " + ", ".join(str(p) for p in wrote if p.is_file()))
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(f['run'] for f in failed)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
