"""experiments/decisive_study.py: the plan of runs, the scheduler, convergence, the analysis on
synthetic run folders (checked against `mtcmkd.compare.compare`), and one tiny end-to-end run."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from conftest import load_script

from mtcmkd.compare import compare, holm

STUDY_FILE = Path(__file__).resolve().parents[1] / "experiments" / "decisive_study.py"
REGIONS = ("WT", "TC", "ET")


@pytest.fixture(scope="module")
def study() -> ModuleType:
    return load_script(STUDY_FILE)


# --- convergence ------------------------------------------------------------------------------


def write_log(path: Path, wt: dict[int, float], iters: int = 10) -> Path:
    """log.jsonl with train records, one epoch record per epoch, WT Dice at the given steps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for step, value in wt.items():
        lines.append(json.dumps({"kind": "train", "step": step, "epoch": step // iters - 1,
                                 "loss": 1.0}))
        lines.append(json.dumps({"kind": "epoch", "epoch": step // iters - 1, "step": step,
                                 "val/dice_WT": value, "val/dice_TC": 0.5, "val/dice_ET": 0.4}))
    lines.append(json.dumps({"kind": "epoch", "epoch": 99, "step": 999}))  # no validation
    path.write_text("\n".join(lines) + "\n{\"kind\": \"epo")  # a line cut by a kill
    return path


def test_validation_trajectory_and_convergence(study, tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.jsonl", {20: 0.5, 40: 0.6, 60: 0.7, 80: 0.8, 100: 0.804})
    trajectory = study.validation_trajectory(log)
    assert [v["step"] for v in trajectory] == [20, 40, 60, 80, 100]
    assert trajectory[-1] == {"epoch": 9, "step": 100, "WT": 0.804}
    settled = study.convergence(trajectory, 100)
    assert settled["converged"] is True and settled["step_reference"] == 80
    assert settled["change"] == pytest.approx(0.004)
    moving = [*trajectory[:-1], {"epoch": 9, "step": 100, "WT": 0.81}]
    assert study.convergence(moving, 100)["converged"] is False
    # 80% of 90 steps is 72: the reference is the validation at step 60.
    assert study.convergence(trajectory[:-1] + [{"epoch": 8, "step": 90, "WT": 0.7049}],
                             90)["step_reference"] == 60
    assert study.convergence(trajectory[-1:], 100)["converged"] is None
    assert study.convergence([], 100)["converged"] is None
    # A resumed run logs an epoch twice: the last record wins.
    twice = tmp_path / "twice.jsonl"
    twice.write_text(log.read_text().rsplit("\n", 1)[0] + "\n" + json.dumps(
        {"kind": "epoch", "epoch": 9, "step": 100, "val/dice_WT": 0.9}) + "\n")
    assert study.validation_trajectory(twice)[-1]["WT"] == 0.9


# --- the plan ---------------------------------------------------------------------------------


def test_plan_orders_teacher_sources_first_and_wires_teachers_from(study, tmp_path: Path
                                                                   ) -> None:
    args = study.parse_args(["--out", str(tmp_path), "--arms", "offline-kd-noisy", "baseline",
                             "self-kd", "--seeds", "3", "4", "--epochs", "10", "--iters", "5"])
    assert args.teacher_steps == 100  # twice the students' 50 steps
    tasks = study.plan(args)
    names = [t.name for t in tasks]
    assert names == ["t1ce-teacher", "teachers-noisy",
                     "offline-kd-noisy-s3", "baseline-s3", "self-kd-s3",
                     "offline-kd-noisy-s4", "baseline-s4", "self-kd-s4"]
    by_name = {t.name: t for t in tasks}
    teacher = by_name["teachers-noisy"]
    assert teacher.config == "mtcmkd.yaml" and not teacher.evaluate and teacher.deps == ()
    assert teacher.overrides["train.seed"] == 100 and teacher.overrides["train.epochs"] == 20
    assert teacher.overrides["data.store"] == str(tmp_path / "store-noisy")
    assert by_name["t1ce-teacher"].config == "baseline.yaml"
    noisy = by_name["offline-kd-noisy-s4"].overrides
    assert by_name["offline-kd-noisy-s4"].deps == ("teachers-noisy",)
    assert noisy["method.teachers_from"] == str(tmp_path / "runs" / "teachers-noisy")
    assert noisy["method.kd_start_epoch"] == 0 and noisy["train.seed"] == 4
    assert noisy["data.store"] == str(tmp_path / "store-noisy")
    self_kd = by_name["self-kd-s3"].overrides
    assert self_kd["method.teacher_modalities"] == ["t1ce"]
    assert self_kd["method.teachers_from"] == str(tmp_path / "runs" / "t1ce-teacher")
    base = by_name["baseline-s3"].overrides
    assert "method.teachers_from" not in base and by_name["baseline-s3"].deps == ()
    assert base["data.store"] == str(tmp_path / "store")
    assert (base["train.epochs"], base["train.iters_per_epoch"], base["train.val_every"],
            base["train.ckpt_every"], base["train.plateau_start_epoch"]) == (10, 5, 2, 50, 10)
    assert base["model.widths"] == [8, 16, 24, 32] and base["data.patch_size"] == [32] * 3
    assert base["data.fold"] == 0 and base["train.precision"] == "fp32"
    extra = study.parse_args(["--out", str(tmp_path), "--arms", "baseline", "--epochs", "3",
                              "--set", "train.lr=0.01"])
    assert study.plan(extra)[0].overrides["train.lr"] == 0.01
    assert study.plan(extra)[0].overrides["train.val_every"] == 1  # 3 // 5 -> at least 1


def test_bad_teacher_steps_are_refused(study, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        study.parse_args(["--out", str(tmp_path), "--iters", "4", "--teacher-steps", "6"])


# --- the scheduler ----------------------------------------------------------------------------


def test_schedule_runs_dependencies_first_and_skips_after_a_failure(study) -> None:
    Task = study.Task
    tasks = [Task("src", Path("src"), "c", {}), Task("bad", Path("bad"), "c", {}),
             Task("x", Path("x"), "c", {}, ("src",)), Task("y", Path("y"), "c", {}, ("bad",)),
             Task("z", Path("z"), "c", {})]
    order: list[str] = []
    lock = threading.Lock()
    active = [0, 0]  # now, most

    def work(task):
        with lock:
            order.append(task.name)
            active[0] += 1
            active[1] = max(active)
        time.sleep(0.02)
        with lock:
            active[0] -= 1
        if task.name == "bad":
            raise RuntimeError("boom")
        return task.name.upper()

    events: list[tuple[str, str]] = []
    results = study.schedule(tasks, 2, work, lambda e, t, _: events.append((e, t.name)))
    assert results["src"] == "SRC" and results["x"] == "X" and results["z"] == "Z"
    assert isinstance(results["bad"], RuntimeError)
    assert isinstance(results["y"], study.StudyError) and "bad" in str(results["y"])
    assert "y" not in order and order.index("x") > order.index("src")
    assert active[1] <= 2
    assert ("skipped", "y") in events and ("failed", "bad") in events


# --- the analysis on synthetic runs -----------------------------------------------------------


def fake_run(run_dir: Path, values: dict[str, dict[str, float]],
             truth: dict[str, dict[str, int]], wt: dict[int, float]) -> None:
    (run_dir / "eval").mkdir(parents=True)
    cases = [{"case": c, "dice": v, "hd95": dict.fromkeys(REGIONS, 5.0),
              "truth_voxels": truth[c]} for c, v in values.items()]
    (run_dir / "eval" / "metrics.json").write_text(json.dumps(
        {"year": 2021, "split": "test", "case_ids": list(values), "cases": cases}))
    (run_dir / "summary.json").write_text(json.dumps({"seconds": 120.0, "step": 100}))
    write_log(run_dir / "log.jsonl", wt)


@pytest.fixture
def synthetic(study, tmp_path: Path):
    """baseline and self-kd with seeds 0 and 1, offline-kd with seed 0 only (seed 1 failed);
    16 test cases, 4 of them without ET."""
    rng = np.random.default_rng(5)
    ids = [f"BraTS2021_{i:05d}" for i in range(16)]
    truth = {c: {"WT": 800, "TC": 200, "ET": 0 if i % 4 == 0 else 90} for i, c in enumerate(ids)}
    base = rng.uniform(0.6, 0.85, size=(16, 3))
    shifts = {"baseline": 0.0, "offline-kd": 0.03, "self-kd": 0.005}
    for arm, seeds in (("baseline", (0, 1)), ("offline-kd", (0,)), ("self-kd", (0, 1))):
        for seed in seeds:
            values = {c: {r: float(base[i, j] + shifts[arm] + rng.normal(0, 0.01))
                          for j, r in enumerate(REGIONS)} for i, c in enumerate(ids)}
            wt = {20: 0.5, 40: 0.6, 60: 0.7, 80: 0.8, 100: 0.801 if seed == 0 else 0.82}
            fake_run(tmp_path / "runs" / f"{arm}-s{seed}", values, truth, wt)
    args = study.parse_args(["--out", str(tmp_path), "--arms", "baseline", "offline-kd",
                             "self-kd", "--seeds", "0", "1", "--epochs", "10", "--iters", "10"])
    settings = study.settings_of(args)
    settings["store"] = {"cases": 60, "train": 30, "validation": 14, "test": 16}
    failed = [{"run": "offline-kd-s1", "reason": "train exited with 1; see the log"}]
    return args, settings, failed, truth


def test_analysis_is_compare_on_the_seed_files(study, synthetic, tmp_path: Path) -> None:
    args, settings, failed, truth = synthetic
    study.analyse(args, settings, failed)
    doc = json.loads((tmp_path / "study.json").read_text())
    runs = tmp_path / "runs"

    # per arm and seed: per-case metrics, truth voxels, seconds, trajectory, convergence
    record = doc["runs"]["baseline"]["0"]
    assert len(record["cases"]) == 16 and record["split"] == "test"
    case = record["cases"]["BraTS2021_00000"]
    assert set(case) == {"dice", "hd95", "truth_voxels"} and case["truth_voxels"]["ET"] == 0
    assert record["train_seconds"] == 120.0 and len(record["validation_wt"]) == 5
    assert record["converged"] is True and doc["runs"]["baseline"]["1"]["converged"] is False
    assert sorted(doc["runs"]["offline-kd"]) == ["0"]
    assert doc["arms"]["baseline"]["converged"] == {"yes": 1, "no": 1, "unknown": 0}

    by_name = {c["name"]: c for c in doc["comparisons"]}
    primary = by_name["B - A"]
    want = compare([runs / "baseline-s0/eval/metrics.json", runs / "baseline-s1/eval/metrics.json"],
                   [runs / "offline-kd-s0/eval/metrics.json"], margin=0.02, positive_only=True)
    assert primary["result"]["regions"] == want["regions"]
    assert primary["seeds"] == {"a": [0, 1], "b": [0]}
    assert [r["n_cases"] for r in primary["result"]["regions"]] == [16, 16, 12]
    assert by_name["B - C"]["a"] == "self-kd" and "result" in by_name["B - C"]
    assert "skipped" in by_name["D - A"] and "skipped" in by_name["B' - A'"]
    ran = [c for c in doc["comparisons"] if "result" in c]
    assert [c["name"] for c in ran] == ["B - A", "C - A", "B - C"]
    wt_p = [next(r["wilcoxon_p"] for r in c["result"]["regions"] if r["region"] == "WT")
            for c in ran]
    assert doc["familywise_holm"]["holm_p_WT"] == pytest.approx(holm(wt_p))
    assert [c["familywise_holm_p_WT"] for c in ran] == pytest.approx(holm(wt_p))
    assert doc["failed"] == failed

    md = (tmp_path / "study.md").read_text()
    wt = want["regions"][0]
    assert (f"| WT | {wt['mean_a']:.4f} | {wt['mean_b']:.4f} | {wt['mean_diff']:+.4f} | "
            f"[{wt['ci_low']:+.4f}, {wt['ci_high']:+.4f}]") in md
    assert "| ET |" in md and "| 12 |" in md  # ET on its 12 positive cases
    assert "offline-kd-s1: train exited with 1" in md
    assert "Not run (an arm not selected with --arms): D - A, E - A, B' - A', D' - A'" in md
    assert "| A baseline | 2 |" in md and "1/1/0" in md
    png = tmp_path / "paired_differences.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analysis_records_a_comparison_it_cannot_make(study, synthetic, tmp_path: Path) -> None:
    args, settings, _, _ = synthetic
    for seed in (0, 1):  # self-kd never finished
        (tmp_path / "runs" / f"self-kd-s{seed}" / "summary.json").unlink()
    doc = study.analyse(args, settings, [])
    by_name = {c["name"]: c for c in doc["comparisons"]}
    assert by_name["C - A"]["error"] == "no finished run of self-kd"
    assert doc["arms"]["self-kd"] == {"seeds": []}
    assert doc["familywise_holm"]["comparisons"] == ["B - A"]
    assert "Not computed: no finished run of self-kd" in (tmp_path / "study.md").read_text()


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.integration
def test_tiny_study_end_to_end(study, tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    argv = ["--out", str(out), "--cases", "12", "--shape", "40", "40", "32", "--patch", "16",
            "--widths", "4", "8", "12", "16", "--test-fraction", "0.25", "--folds", "8",
            "--epochs", "1", "--iters", "2", "--seeds", "0", "1", "--teacher-steps", "2",
            "--arms", "baseline", "mdsd", "--jobs", "1"]
    assert study.main(argv) == 0
    doc = json.loads((out / "study.json").read_text())
    store = doc["settings"]["store"]
    assert (store["test"], store["validation"], store["train"]) == (3, 2, 7)
    assert doc["failed"] == []
    for arm in ("baseline", "mdsd"):
        for seed in ("0", "1"):
            record = doc["runs"][arm][seed]
            assert record["split"] == "test"
            assert sorted(record["cases"]) == store["test_cases"]
            assert not set(record["cases"]) & set(store["validation_cases"])
            assert all(c["truth_voxels"]["WT"] > 0 for c in record["cases"].values())
    d_a = next(c for c in doc["comparisons"] if c["name"] == "D - A")
    assert d_a["result"]["n_cases"] == 3 and d_a["seeds"] == {"a": [0, 1], "b": [0, 1]}
    assert (out / "paired_differences.png").is_file() and (out / "study.md").is_file()
    stamp = (out / "runs" / "baseline-s0" / "eval" / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert study.main(argv) == 0  # resumed: nothing is redone
    assert "4 runs, 4 already finished" in capsys.readouterr().out
    assert (out / "runs" / "baseline-s0" / "eval" / "metrics.json").stat().st_mtime_ns == stamp


@pytest.mark.integration
def test_noisy_store_keeps_the_clean_test_set(study, tmp_path: Path) -> None:
    pytest.importorskip("mtcmkd.phantom.label_noise")
    args = study.parse_args(["--out", str(tmp_path), "--cases", "8", "--shape", "40", "40", "32",
                             "--test-fraction", "0.25", "--folds", "3", "--arms",
                             "baseline-noisy", "--jobs", "1", "--noise-amplitude", "1.5"])
    clean = study.prepare_clean(args)
    noisy, calibration = study.prepare_noisy(args, clean)
    assert noisy.test_cases == clean.test_cases and len(clean.test_cases) == 2
    assert dict(noisy.folds) == dict(clean.folds)
    assert calibration["amplitude"] == 1.5 and calibration["jittered_cases"] == 6
    assert sorted(calibration["per_case"]) == sorted(set(clean.cases) - set(clean.test_cases))
    assert 0 < calibration["wt_dice_min"] <= calibration["wt_dice_mean"] < 1
    for case in clean.test_cases:  # test labels stay clean
        name = f"{case}/{case}_seg.nii.gz"
        assert (tmp_path / "raw" / name).read_bytes() == (tmp_path / "raw-noisy" / name
                                                          ).read_bytes()
    others = tuple(sorted(set(clean.cases) - set(clean.test_cases))[:2])
    shuffled = dataclasses.replace(clean, test_cases=others)
    with pytest.raises(study.StudyError, match="its test cases differ from"):
        study.prepare_noisy(args, shuffled)


def test_a_preempted_run_is_not_finished_and_is_resumed(study, tmp_path: Path) -> None:
    """A run stopped by a preemption signal writes summary.json with "preempted": true; the
    study must resume it and score it again, never score its half-trained weights."""
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "metrics.json").write_text("{}")
    (run / "summary.json").write_text(json.dumps({"preempted": True, "step": 41}))
    assert not study.is_trained(run) and not study.is_finished(run)
    (run / "summary.json").write_text(json.dumps({"preempted": False, "step": 200}))
    assert study.is_trained(run) and study.is_finished(run)
    (run / "summary.json").write_text("not json")
    assert not study.is_trained(run)
