"""The steps of `mtcmkd demo`: the main job end to end on the embedded phantom, in one command.

It lives in the CLI layer because it drives the other commands as a user types them (each
step is a `mtcmkd ...` or `torchrun ...` subprocess) and then runs the exported file; the
library below never calls it. `cli/demo.py` holds the options and the final table.

Steps (each printed as the command a user would type, with its output and its time):

1. ``mtcmkd synth``: a BraTS 2021-layout phantom (MNI152 anatomy, three-compartment tumours);
2. ``mtcmkd preprocess`` -> a chunked Zarr store, then ``mtcmkd store-info``;
3. ``torchrun ... mtcmkd train``: MTCM-KD (three online teachers + CDSFL + the T1ce student) on
   DeepSpeed with ``ranks`` processes (two CPU ranks by default);
4. ``mtcmkd evaluate --year 2021``: BraTS scores of the test set (the validation fold, said
   so, when the phantom is too small for one), overlay PNGs;
5. ``mtcmkd report``: training curves and report.md;
6. ``mtcmkd export torchscript``: the whole inference in one file, checked on reload;
7. the exported file on one held-out case, from Python (``torch.jit.load``) and from the C++
   client (built against the wheel's libtorch; skipped with the reason when no toolchain),
   and whether the two label maps agree.

A final table gives each step's time and result; ``demo_summary.json`` holds the same. The
sizes are chosen so the whole demo takes about 10 minutes on a 2-core CPU machine.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import yaml

from mtcmkd.atomic import atomic_write_text
from mtcmkd.data import StoreInfo, open_store, split_cases

__all__ = ["DemoError", "DemoSettings", "DemoStep", "demo_config", "run_demo"]


class DemoError(RuntimeError):
    """A step failed; the message names it (its own output is above)."""


@dataclass(frozen=True)
class DemoSettings:
    """What `mtcmkd demo` runs; the defaults take about 10 minutes on two CPU cores."""

    out: Path = Path("demo_out")
    cases: int = 12
    shape: tuple[int, int, int] = (64, 64, 48)
    folds: int = 4
    ranks: int = 2
    epochs: int = 6
    iters: int = 50
    seed: int = 0
    cpp: bool = True


@dataclass
class DemoStep:
    """One step's record: the command shown, seconds taken, a one-line result."""

    name: str
    command: str
    seconds: float = 0.0
    result: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def demo_config(settings: DemoSettings) -> dict[str, Any]:
    """The training config of the demo: MTCM-KD at CPU size (configs/mtcmkd.yaml, scaled down).

    Widths 8/16/24/32 (280k parameters per network, four networks), 32^3 patches, one patch per
    rank per step, KD from epoch 1, validation every other epoch on the held-out fold.
    """
    return {
        "name": "demo",
        "data": {"store": str(settings.out / "store"), "fold": 0,
                 "patch_size": [32, 32, 32], "fg_fraction": 0.3333333333333333,
                 "num_workers": 0, "augment": True},
        "model": {"kind": "resunet", "widths": [8, 16, 24, 32], "output": "softmax"},
        "method": {"name": "mtcmkd", "preset": "default", "student_modalities": ["t1ce"],
                   "kd_start_epoch": 1},
        "train": {"epochs": settings.epochs, "iters_per_epoch": settings.iters,
                  "batch_size": 1, "lr": 1.0e-3, "precision": "fp32", "seed": settings.seed,
                  "val_every": 2 if settings.epochs >= 2 else 1,
                  # steps: one resumable checkpoint per epoch
                  "ckpt_every": settings.iters,
                  "log_every": 10, "plateau_start_epoch": settings.epochs},
    }


def _shown(cmd: list[str]) -> str:
    """The command as a user types it (`mtcmkd ...`, `torchrun ...`)."""
    if cmd[:3] == [sys.executable, "-m", "mtcmkd"]:
        cmd = ["mtcmkd", *cmd[3:]]
    elif cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]:
        cmd = ["torchrun", *cmd[3:]]
    return shlex.join(cmd)


def _mtcmkd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mtcmkd", *args]


def _run(cmd: list[str], name: str, env: dict[str, str] | None = None) -> None:
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise DemoError(f"step '{name}' failed with exit code {rc} (its output is above): "
                        f"{_shown(cmd)}")


def _first_held_out_case(settings: DemoSettings) -> str:
    """The first test case, else (a store too small for a test set) the first of fold 0."""
    info = StoreInfo.from_group(open_store(settings.out / "store"))
    held_out = list(info.test_cases) or split_cases(info, 0)[1]
    if not held_out:
        raise DemoError(f"{settings.out / 'store'}: neither a test set nor fold 0 holds a case")
    return sorted(held_out)[0]


def _run_exported_python(module_path: Path, image_path: Path, out_path: Path) -> tuple[Any, float]:
    """Run the exported TorchScript file on one NIfTI from Python; returns (labels, seconds)."""
    # torch and mtcmkd.inference (which imports torch, ~2 s) only here: cli/main.py imports
    # every command module, and `mtcmkd --help` or `mtcmkd synth` must not pay for them.
    import torch

    from mtcmkd.inference import write_label_nifti

    module = torch.jit.load(str(module_path))
    volume = np.asarray(nib.load(str(image_path)).dataobj, dtype=np.float32)
    start = time.perf_counter()
    with torch.inference_mode():
        labels = module(torch.from_numpy(volume)[None, None])[0].numpy()
    seconds = time.perf_counter() - start
    write_label_nifti(labels, image_path, out_path)
    return labels, seconds


def run_demo(settings: DemoSettings, *, say: Callable[[str], None] = print,
             rule: Callable[[str], None] | None = None) -> list[DemoStep]:
    """Run every step; raises DemoError naming the first step that fails."""
    out = settings.out
    if out.exists() and any(out.iterdir()):
        raise DemoError(f"{out}: folder exists and is not empty (remove it or pass --out)")
    out.mkdir(parents=True, exist_ok=True)
    rule = rule or (lambda title: say(f"== {title}"))
    raw, store, run_dir = out / "raw", out / "store", out / "run"
    threads = max(1, (os.cpu_count() or 1) // settings.ranks)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    config_path = out / "demo_config.yaml"
    atomic_write_text(config_path, yaml.safe_dump(demo_config(settings), sort_keys=False))
    module_path = out / "student_ts.pt"

    plan: list[tuple[str, list[str]]] = [
        ("synth", _mtcmkd("synth", str(raw), "--cases", str(settings.cases), "--layout", "2021",
                          "--shape", *map(str, settings.shape), "--seed", str(settings.seed))),
        ("preprocess", _mtcmkd("preprocess", str(raw), str(store), "--workers", "2",
                               "--folds", str(settings.folds))),
        ("store-info", _mtcmkd("store-info", str(store))),
        ("train", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", str(settings.ranks), "-m", "mtcmkd", "train",
                   "--config", str(config_path), "--out", str(run_dir)]),
        ("evaluate", _mtcmkd("evaluate", "--year", "2021", "--run", str(run_dir),
                             "--png", str(out / "overlays"))),
        ("report", _mtcmkd("report", str(run_dir))),
        ("export", _mtcmkd("export", "torchscript", str(run_dir), "--out", str(module_path),
                           "--check")),
    ]
    steps: list[DemoStep] = []
    total = len(plan) + 1
    for i, (name, cmd) in enumerate(plan, start=1):
        if name == "evaluate" and not StoreInfo.read(store).test_cases:
            # Fewer than 5 phantom cases hold out no test set: score the validation fold,
            # which the command line and the scores then name as such.
            cmd = [*cmd, "--split", "validation"]
        rule(f"[{i}/{total}] {name}")
        say(f"$ {_shown(cmd)}")
        step = DemoStep(name, _shown(cmd))
        start = time.perf_counter()
        _run(cmd, name, env)
        step.seconds = time.perf_counter() - start
        _describe(step, settings)
        steps.append(step)

    rule(f"[{total}/{total}] exported file on one held-out case: Python and C++")
    steps.append(_inference_step(settings, module_path, say))
    atomic_write_text(out / "demo_summary.json", json.dumps(
        {"settings": {k: (str(v) if isinstance(v, Path) else v)
                      for k, v in asdict(settings).items()},
         "steps": [asdict(s) for s in steps]}, indent=2) + "\n")
    return steps


def _describe(step: DemoStep, settings: DemoSettings) -> None:
    """Fill the step's one-line result from the files it wrote."""
    out = settings.out
    if step.name == "synth":
        step.result = f"{settings.cases} cases, {'x'.join(map(str, settings.shape))}, 2021 layout"
    elif step.name == "preprocess":
        report = json.loads((out / "store" / "preprocess_report.json").read_text()) \
            if (out / "store" / "preprocess_report.json").is_file() else {}
        step.result = (f"{report.get('n_converted', '?')} cases converted, "
                       f"{report.get('n_failed', '?')} failed -> {out / 'store'}")
    elif step.name == "train":
        summary = json.loads((out / "run" / "summary.json").read_text())
        step.details = summary
        step.result = (f"{summary['step']} steps on {summary['world_size']} ranks, best val mean "
                       f"Dice {summary.get('best_mean_dice') or 0:.3f} (epoch "
                       f"{summary.get('best_epoch')})")
    elif step.name == "evaluate":
        metrics = json.loads((out / "run" / "eval" / "metrics.json").read_text())
        d, h = metrics["mean"]["dice"], metrics["mean"]["hd95"]
        split = metrics.get("split") or "held-out"
        step.details = {"dice": d, "hd95": h, "cases": len(metrics["cases"]), "split": split}
        which = ("validation cases (they selected the model)" if split == "validation"
                 else f"{split} cases")
        step.result = (f"{len(metrics['cases'])} {which}: Dice WT {d['WT']:.3f} TC "
                       f"{d['TC']:.3f} ET {d['ET']:.3f}; HD95 WT {h['WT']:.1f} mm")
    elif step.name == "report":
        step.result = f"{out / 'run' / 'report' / 'report.md'} + curves"
    elif step.name == "export":
        size = (out / "student_ts.pt").stat().st_size / 2**20
        step.result = f"{out / 'student_ts.pt'} ({size:.1f} MiB), verified on reload"


def _inference_step(settings: DemoSettings, module_path: Path,
                    say: Callable[[str], None]) -> DemoStep:
    out = settings.out
    case = _first_held_out_case(settings)
    image = out / "raw" / case / f"{case}_t1ce.nii.gz"
    py_out = out / "exported" / "python" / f"{case}.nii.gz"
    step = DemoStep("run export", f"torch.jit.load({module_path.name}) on {image}")
    start = time.perf_counter()
    say(f"python: torch.jit.load('{module_path}') on {image}")
    py_labels, py_seconds = _run_exported_python(module_path, image, py_out)
    step.details = {"case": case, "python_seconds": py_seconds, "python_output": str(py_out)}
    result = [f"{case}: Python {py_seconds:.1f} s"]
    if settings.cpp:
        # mtcmkd.export imports torch: lazily, as in _run_exported_python.
        from mtcmkd.export.cpp_client import build_cpp_client, cpp_toolchain_missing
        from mtcmkd.export.source import ExportError

        reason = cpp_toolchain_missing()
        if reason is None:
            try:
                say("building the C++ client (export/cpp, CMake + the wheel's libtorch)")
                exe = build_cpp_client(out / "cpp-build")
            except ExportError as exc:
                reason = f"build failed: {exc}"
        if reason is None:
            cpp_out = out / "exported" / "cpp" / f"{case}.nii.gz"
            cpp_out.parent.mkdir(parents=True, exist_ok=True)
            cmd = [str(exe), str(module_path), str(image), str(cpp_out)]
            say(f"$ {shlex.join(cmd)}")
            t0 = time.perf_counter()
            _run(cmd, "C++ client")
            cpp_seconds = time.perf_counter() - t0
            cpp_labels = np.asarray(nib.load(str(cpp_out)).dataobj)
            agree = float(np.mean(cpp_labels == py_labels))
            step.details.update({"cpp_seconds": cpp_seconds, "cpp_output": str(cpp_out),
                                 "cpp_python_voxel_agreement": agree})
            result.append(f"C++ {cpp_seconds:.1f} s (end to end), labels identical: "
                          f"{'yes' if agree == 1.0 else f'no ({agree:.6f} of voxels)'}")
            if agree != 1.0:
                step.result = "; ".join(result)
                raise DemoError(f"C++ and Python labels differ on {case} ({agree:.6f} agree)")
        else:
            step.details["cpp_skipped"] = reason
            result.append(f"C++ skipped: {reason}")
    else:
        step.details["cpp_skipped"] = "--no-cpp"
        result.append("C++ skipped (--no-cpp)")
    step.seconds = time.perf_counter() - start
    step.result = "; ".join(result)
    return step
