"""Whole-case inference, every path side by side (issue 17, item 5): wall, CPU, peak RSS,
agreement with `mtcmkd predict --reference`, Dice vs truth.

Each path runs in its own process over the same cases with the same weights and thread count;
a path's process is timed from the outside (``os.wait4``: CPU seconds and peak RSS of that
process) and per case from the inside (reading and inference, as ``predict_report.json``
counts it). Paths (``PATHS``):

    monai         MONAI ``sliding_window_inference`` with its BraTS defaults (roi = the patch,
                  overlap 0.5, Gaussian, batch 1) on the same brain crop and z-score, softmax
                  blended: the anchor
    reference     mtcmkd predict --reference (fp32, windows, overlap 0.5, Gaussian)
    auto          mtcmkd predict (the default: --precision auto, windows)
    bf16-windows  mtcmkd predict --precision bf16 --layout windows
    auto-overlap25  mtcmkd predict --overlap 0.25 (the default with fewer windows)
    box-fp32      mtcmkd predict --precision fp32 --layout box (one pass over the brain box)
    box-bf16      mtcmkd predict --precision bf16 --layout box
    torchscript   `mtcmkd export torchscript` file, torch.jit.load in Python
    aoti-python   `mtcmkd export aoti` package, export.aoti.load_aoti in Python
    aoti-cpp      the same package, export/cpp's mtcmkd_segment_aoti (one process per case)

A path whose tool is not there (no `export aoti` command, no built C++ runner) is a row with
status "skipped" and the reason. Student sizes (``--sizes``): paper 32/64/128/256 (9.46 M
parameters), compact 16/32/64/128, nano 8/16/32/64; each size has one set of weights, random
(seed 0) unless ``--weights SIZE=FILE`` gives a student file (its patch is replaced by
``--patch`` so the windows are BraTS-sized: the networks are fully convolutional). Dice vs truth
is reported only for given weights (``--trained``): random or phantom-trained weights on real
cases measure nothing; the Dice of the layouts and precisions on held-out phantom cases is
experiments/compact_students.py's.

    python benchmarks/bench_inference.py --json-out docs/results/inference_bench.json
    python benchmarks/bench_inference.py --quick --json-out /tmp/quick.json   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

try:
    from mtcmkd.brats import REGIONS, release
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mtcmkd.brats import REGIONS, release
from mtcmkd.config import config_hash, load_config, to_dict
from mtcmkd.evaluation import discover_prediction_inputs, load_prediction_input, write_prediction
from mtcmkd.inference import brain_bbox, probabilities_to_labels, uncrop
from mtcmkd.inference.normalization import BrainZScore
from mtcmkd.metrics.overlap import dice
from mtcmkd.models import build_network
from mtcmkd.nifti_io import read_nifti, write_label_nifti
from mtcmkd.student_weights import load_student, save_student

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASES = Path("/work/shared/data/brats2021-sample")
SIZES: dict[str, tuple[int, int, int, int]] = {
    "paper": (32, 64, 128, 256),
    "compact": (16, 32, 64, 128),
    "nano": (8, 16, 32, 64),
}
#: --quick: one tiny network on one small phantom case.
QUICK_SIZE = ("tiny", (4, 8, 12, 16))
#: `mtcmkd predict` options of the predict paths.
PREDICT_OPTIONS: dict[str, tuple[str, ...]] = {
    "reference": ("--reference",),
    "auto": (),
    "bf16-windows": ("--precision", "bf16", "--layout", "windows"),
    "auto-overlap25": ("--overlap", "0.25"),
    "box-fp32": ("--precision", "fp32", "--layout", "box"),
    "box-bf16": ("--precision", "bf16", "--layout", "box"),
}
PATHS: tuple[str, ...] = ("monai", *PREDICT_OPTIONS, "torchscript", "aoti-python", "aoti-cpp")
#: Paths run for the compact and nano sizes unless --small-paths says otherwise.
SMALL_PATHS: tuple[str, ...] = ("reference", "auto", "box-bf16")
#: The C++ AOTI runner's name (export/cpp/CMakeLists.txt).
AOTI_RUNNER = "mtcmkd_segment_aoti"


# ------------------------------------------------------------------------------- workers


def _cases(input_dir: Path) -> list[Any]:
    return discover_prediction_inputs(input_dir, ("t1ce",), None).cases


def worker(kind: str, model: Path, input_dir: Path, output: Path, artifact: Path | None) -> None:
    """One path that is not `mtcmkd predict`: segment every case under `input_dir` into
    `output/<case>.nii.gz` (release label values) and write `output/worker_report.json` with the
    seconds of each case (reading and inference; writing is outside, as in predict's report)."""
    output.mkdir(parents=True, exist_ok=True)
    seconds: list[dict[str, Any]] = []
    if kind == "monai":
        from monai.inferers import sliding_window_inference

        bundle = load_student(model)
        net, zscore = bundle.network.eval(), BrainZScore()

        def predictor(window: torch.Tensor) -> torch.Tensor:
            # softmax before blending, as the reference blends probabilities
            return torch.softmax(net(window), dim=1)

        for item in _cases(input_dir):
            start = time.perf_counter()
            loaded = load_prediction_input(item)
            box = brain_bbox(loaded.image)
            crop = loaded.image[:, box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]]
            with torch.no_grad():
                x = zscore(torch.from_numpy(np.ascontiguousarray(crop))[None])
                probs = sliding_window_inference(x, list(bundle.patch_size), 1, predictor,
                                                 overlap=0.5, mode="gaussian")
                canonical = probabilities_to_labels(probs, bundle.output).numpy()
            labels = uncrop(canonical, box, loaded.image.shape[1:])
            seconds.append({"case": item.case_id, "seconds": time.perf_counter() - start})
            write_prediction(labels, item, output)
    else:
        if kind == "torchscript":
            module = torch.jit.load(str(artifact)).eval()
        elif kind == "aoti-python":
            from export.aoti import load_aoti

            module = load_aoti(str(artifact))[0]
        else:
            raise ValueError(f"unknown worker {kind!r}")
        for item in _cases(input_dir):
            start = time.perf_counter()
            loaded = load_prediction_input(item)
            with torch.no_grad():
                out = module(torch.from_numpy(loaded.image)[None])
            out = out[0] if isinstance(out, (tuple, list)) else out
            labels = out[0].cpu().numpy().astype(np.uint8)  # release values (exported as 2021)
            seconds.append({"case": item.case_id, "seconds": time.perf_counter() - start})
            write_label_nifti(labels, item.reference, output / f"{item.case_id}.nii.gz")
    (output / "worker_report.json").write_text(json.dumps({"cases": seconds}, indent=2) + "\n")


# ------------------------------------------------------------------------------- measuring


def measured(cmd: Sequence[str], threads: int, log: Path) -> dict[str, Any]:
    """Run `cmd` as a child with `threads` threads; its wall and CPU seconds, peak RSS (MB),
    exit code. ``os.wait4`` gives this child's own resource use (and that of its children)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write("$ " + " ".join(map(str, cmd)) + "\n")
        fh.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(list(map(str, cmd)), stdout=fh, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "process_wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024.0}  # ru_maxrss is KiB on Linux


def label_files(folder: Path) -> dict[str, Path]:
    return {p.name[: -len(".nii.gz")]: p for p in sorted(folder.glob("*.nii.gz"))}


def agreement(folder: Path, reference: Path) -> dict[str, float | None]:
    """Fraction of voxels whose label equals the reference's: over every voxel, and over the
    voxels labelled tumour by either (1.0 when neither labels any)."""
    mine, ref = label_files(folder), label_files(reference)
    if not ref or set(mine) != set(ref):
        return {"agreement": None, "agreement_tumour": None}
    equal = total = equal_fg = total_fg = 0
    for case, path in ref.items():
        a, b = np.asarray(read_nifti(mine[case]).data), np.asarray(read_nifti(path).data)
        union = (a != 0) | (b != 0)
        equal += int((a == b).sum())
        total += a.size
        equal_fg += int((a == b)[union].sum())
        total_fg += int(union.sum())
    return {"agreement": equal / total,
            "agreement_tumour": equal_fg / total_fg if total_fg else 1.0}


def dice_vs_truth(folder: Path, input_dir: Path) -> dict[str, float] | None:
    """Mean Dice per region of the predictions against the cases' segmentations."""
    scores: dict[str, list[float]] = {r: [] for r in REGIONS}
    for item in _cases(input_dir):
        path = folder / f"{item.case_id}.nii.gz"
        if item.truth is None or not path.is_file():
            return None
        rel = release(item.release)
        pred = rel.map_labels(np.asarray(read_nifti(path).data))
        truth = rel.map_labels(np.asarray(read_nifti(item.truth).data))
        for region, values in REGIONS.items():
            scores[region].append(dice(np.isin(pred, values), np.isin(truth, values)))
    return {r: float(np.mean(v)) for r, v in scores.items()}


def case_seconds(folder: Path) -> list[float]:
    for name in ("predict_report.json", "worker_report.json"):
        if (folder / name).is_file():
            report = json.loads((folder / name).read_text())
            return [float(c["seconds"]) for c in report["cases"] if "seconds" in c]
    return []


# ------------------------------------------------------------------------------- set-up


def student_file(work: Path, size: str, widths: Sequence[int], patch: int,
                 given: Path | None) -> tuple[Path, dict[str, Any]]:
    """The size's student file with windows of `patch`: `given` re-saved with that patch, or a
    random network (seed 0)."""
    path = work / "weights" / f"{size}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if given is not None:
        bundle = load_student(given)
        net, meta = bundle.network, bundle.meta
        cfg_dict, digest = meta["config"], meta["config_hash"]
        source = f"{given} (trained; patch {list(bundle.patch_size)} -> {patch})"
        n_classes, output = bundle.n_classes, bundle.output
    else:
        cfg = load_config(ROOT / "configs" / "baseline.yaml",
                          [f"model.widths={json.dumps(list(widths))}",
                           f"data.patch_size={json.dumps([patch] * 3)}"])
        cfg_dict, digest = to_dict(cfg), config_hash(cfg)
        torch.manual_seed(0)
        net, n_classes, output = build_network("resunet", 1, 4, tuple(widths)), 4, "softmax"
        source = "random init (torch seed 0)"
    save_student(path, net, config=cfg_dict, config_hash=digest, channels=("t1ce",),
                 output=output, n_classes=n_classes, patch_size=(patch,) * 3)
    return path, {"source": source, "trained": given is not None,
                  "parameters": sum(p.numel() for p in net.parameters()),
                  "widths": list(load_student(path).meta["config"]["model"].get("student_widths")
                                 or load_student(path).meta["config"]["model"]["widths"])}


def case_folder(args: argparse.Namespace, work: Path) -> Path:
    """The input folder: --quick a phantom case; else the first --n-cases case folders of
    --cases as symbolic links (the real data is never copied)."""
    folder = work / "cases"
    if folder.exists():
        shutil.rmtree(folder)
    if args.quick:
        subprocess.run([sys.executable, "-m", "mtcmkd", "synth", str(folder), "--cases", "1",
                        "--layout", "2021", "--shape", "40", "40", "32", "--seed", "1"],
                       check=True, capture_output=True, cwd=ROOT)
        return folder
    cases = sorted(p for p in args.cases.iterdir() if p.is_dir())[: args.n_cases]
    if not cases:
        raise SystemExit(f"{args.cases}: no case folders")
    folder.mkdir(parents=True)
    for case in cases:
        (folder / case.name).symlink_to(case.resolve())
    return folder


def aoti_available() -> str | None:
    """None when `mtcmkd export aoti` exists, else why not."""
    r = subprocess.run([sys.executable, "-m", "mtcmkd", "export", "aoti", "--help"],
                       capture_output=True, text=True, cwd=ROOT)
    return None if r.returncode == 0 else "no `mtcmkd export aoti` command in this checkout"


def find_aoti_runner(given: Path | None) -> Path | None:
    if given is not None:
        return given if given.is_file() else None
    for candidate in sorted((ROOT / "export" / "cpp").glob(f"build*/{AOTI_RUNNER}")):
        return candidate
    found = shutil.which(AOTI_RUNNER)
    return Path(found) if found else None


def export_artifact(kind: str, model: Path, out: Path, threads: int, log: Path
                    ) -> tuple[Path | None, str | None, float]:
    """`mtcmkd export torchscript|aoti` of the student; (file, reason it failed, seconds)."""
    if out.is_file():
        return out, None, 0.0
    cmd = [sys.executable, "-m", "mtcmkd", "export", kind, str(model), "--out", str(out)]
    result = measured(cmd, threads, log)
    if result["returncode"] != 0 or not out.is_file():
        return None, f"`mtcmkd export {kind}` exited with {result['returncode']} (see {log})", \
            result["process_wall_s"]
    return out, None, result["process_wall_s"]


def run_path(args: argparse.Namespace, path: str, size: str, model: Path, cases: Path,
             work: Path, artifacts: dict[str, Any]) -> dict[str, Any]:
    """Run one path over every case; its row (without agreement and Dice)."""
    out = work / "out" / size / path
    if out.exists():
        shutil.rmtree(out)
    log = work / "logs" / f"{size}-{path}.log"
    row: dict[str, Any] = {"size": size, "path": path, "status": "ok"}
    me = [sys.executable, str(Path(__file__).resolve())]
    if path in PREDICT_OPTIONS:
        cmd = [sys.executable, "-m", "mtcmkd", "predict", "-m", str(model), "-i", str(cases),
               "-o", str(out), "--threads", str(args.threads), "--device", "cpu",
               *PREDICT_OPTIONS[path]]
        result = measured(cmd, args.threads, log)
    elif path == "monai":
        result = measured([*me, "--worker", "monai", "--model", str(model), "--input",
                           str(cases), "--output", str(out)], args.threads, log)
    elif path in ("torchscript", "aoti-python"):
        artifact, reason = artifacts.get(path, (None, "not exported"))
        if artifact is None:
            return {**row, "status": "skipped", "reason": reason}
        result = measured([*me, "--worker", path, "--model", str(model), "--input", str(cases),
                           "--output", str(out), "--artifact", str(artifact)], args.threads,
                          log)
    elif path == "aoti-cpp":
        artifact, reason = artifacts.get("aoti-python", (None, "not exported"))
        runner = find_aoti_runner(args.aoti_runner)
        if artifact is None or runner is None:
            why = reason if artifact is None else (
                f"no built {AOTI_RUNNER} (export/cpp/build*/ or PATH; or --aoti-runner)")
            return {**row, "status": "skipped", "reason": why}
        # One process per case, as a deployment runs it: startup counts in every case.
        out.mkdir(parents=True)
        parts, per_case = [], []
        for item in _cases(cases):
            r = measured([runner, artifact, item.channel_files["t1ce"][0],
                          out / f"{item.case_id}.nii.gz", "--threads", str(args.threads)],
                         args.threads, log)
            parts.append(r)
            per_case.append(r["process_wall_s"])
        result = {"returncode": max(r["returncode"] for r in parts),
                  "process_wall_s": sum(r["process_wall_s"] for r in parts),
                  "cpu_s": sum(r["cpu_s"] for r in parts),
                  "peak_rss_mb": max(r["peak_rss_mb"] for r in parts)}
        (out / "worker_report.json").write_text(json.dumps(
            {"cases": [{"case": "", "seconds": s} for s in per_case]}))
    else:
        raise ValueError(f"unknown path {path!r}")
    if result["returncode"] != 0:
        return {**row, "status": "failed", "reason": f"exit {result['returncode']}; see {log}"}
    seconds = case_seconds(out)
    row.update(result)
    row["case_seconds"] = seconds
    row["wall_s_per_case"] = float(np.mean(seconds)) if seconds else None
    row["cpu_s_per_case"] = result["cpu_s"] / max(1, len(seconds))
    if path in PREDICT_OPTIONS:
        report = json.loads((out / "predict_report.json").read_text())
        row["precision_used"], row["layout"] = report["precision_used"], report["layout"]
    row["output"] = str(out)
    return row


def machine() -> dict[str, Any]:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=Path, default=DEFAULT_CASES,
                    help="Folder of BraTS case folders (2021 layout, with segmentations).")
    ap.add_argument("--n-cases", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--patch", type=int, default=128, help="Window edge (MONAI's roi too).")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS),
                    help="Paths of the first size (paper unless --sizes says otherwise).")
    ap.add_argument("--small-paths", nargs="+", default=list(SMALL_PATHS), choices=list(PATHS),
                    help="Paths of the other sizes.")
    ap.add_argument("--weights", action="append", default=[], metavar="SIZE=FILE",
                    help="Student weights of a size (else random init, seed 0).")
    ap.add_argument("--trained", action="store_true",
                    help="The given weights are trained for these cases: report Dice vs truth.")
    ap.add_argument("--aoti-runner", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="Scratch folder (default a temp).")
    ap.add_argument("--quick", action="store_true",
                    help="One tiny network on one 40x40x32 phantom case, patch 16 (tests).")
    ap.add_argument("--json-out", type=Path, default=None)
    # internal: one path's process
    ap.add_argument("--worker", choices=["monai", "torchscript", "aoti-python"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--artifact", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads < 1 or args.n_cases < 1 or args.patch < 8:
        ap.error("--threads and --n-cases must be >= 1, --patch >= 8")
    weights: dict[str, Path] = {}
    for item in args.weights:
        size, _, file = item.partition("=")
        if size not in SIZES or not file:
            ap.error(f"--weights {item!r}: expected SIZE=FILE with SIZE one of {list(SIZES)}")
        weights[size] = Path(file)
    args.weights = weights
    if args.quick:
        args.patch, args.n_cases = 16, 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        worker(args.worker, args.model, args.input, args.output, args.artifact)
        return 0
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-inference-{os.getpid()}"
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    cases = case_folder(args, work)
    sizes = {QUICK_SIZE[0]: QUICK_SIZE[1]} if args.quick else {s: SIZES[s] for s in args.sizes}
    wanted = {*args.paths, *args.small_paths}
    aoti_missing = (aoti_available() if wanted & {"aoti-python", "aoti-cpp"}
                    else "not requested")
    rows: list[list[dict[str, Any]]] = []
    weights_info: dict[str, Any] = {}
    exports: dict[str, Any] = {}
    for i, (size, widths) in enumerate(sizes.items()):
        model, weights_info[size] = student_file(work, size, widths, args.patch,
                                                 args.weights.get(size))
        paths = args.paths if i == 0 else args.small_paths
        # the reference first: every other path is compared with it
        paths = ["reference", *[p for p in paths if p != "reference"]]
        artifacts: dict[str, Any] = {}
        if "torchscript" in paths:
            file, reason, secs = export_artifact("torchscript", model, work / f"{size}.ts.pt",
                                                 args.threads, work / "logs" / "export.log")
            artifacts["torchscript"] = (file, reason)
            exports[f"{size}/torchscript"] = {"seconds": secs, "error": reason}
        if "aoti-python" in paths or "aoti-cpp" in paths:
            if aoti_missing:
                artifacts["aoti-python"] = (None, aoti_missing)
            else:
                file, reason, secs = export_artifact("aoti", model, work / f"{size}.pt2",
                                                     args.threads, work / "logs" / "export.log")
                artifacts["aoti-python"] = (file, reason)
                exports[f"{size}/aoti"] = {"seconds": secs, "error": reason}
        size_rows: list[dict[str, Any]] = []
        rows.append(size_rows)  # flattened in result()
        for path in paths:
            print(f"{size} {path} ...", flush=True)
            size_rows.append(run_path(args, path, size, model, cases, work, artifacts))
            finish_rows(size_rows, weights_info[size]["trained"], cases)
            # written after every row: a run cut short keeps what it measured
            write_result(args, result(args, load_before, rows, weights_info, exports))
    final = result(args, load_before, rows, weights_info, exports)
    print_table(final)
    write_result(args, final)
    return 0 if all(r["status"] != "failed" for r in final["rows"]) else 1


def finish_rows(size_rows: list[dict[str, Any]], trained: bool, cases: Path) -> None:
    """Agreement with the size's reference (its first row), ratios, Dice (trained weights)."""
    ref_row = size_rows[0]
    monai = next((r for r in size_rows if r["path"] == "monai" and r["status"] == "ok"), None)
    for row in size_rows:
        if row["status"] != "ok":
            continue
        if "agreement" not in row and ref_row["status"] == "ok":
            row.update(agreement(Path(row["output"]), Path(ref_row["output"])))
        if ref_row["status"] == "ok":
            row["wall_x_reference"] = ref_row["wall_s_per_case"] / row["wall_s_per_case"]
            row["cpu_x_reference"] = ref_row["cpu_s_per_case"] / row["cpu_s_per_case"]
        if monai is not None:
            row["speedup_vs_monai"] = monai["wall_s_per_case"] / row["wall_s_per_case"]
            row["cpu_speedup_vs_monai"] = monai["cpu_s_per_case"] / row["cpu_s_per_case"]
        if "dice" not in row:
            row["dice"] = dice_vs_truth(Path(row["output"]), cases) if trained else None


def result(args: argparse.Namespace, load_before: tuple[float, float, float],
           rows: list[list[dict[str, Any]]], weights_info: dict[str, Any],
           exports: dict[str, Any]) -> dict[str, Any]:
    flat = [row for size_rows in rows for row in size_rows]
    return {
        "machine": machine(),
        "load_before": list(load_before), "load_after": list(os.getloadavg()),
        "settings": {"cases": str(args.cases) if not args.quick else "phantom (quick)",
                     "case_ids": sorted(label_files(Path(flat[0]["output"])))
                     if flat and flat[0]["status"] == "ok" else [],
                     "n_cases": args.n_cases, "threads": args.threads, "patch": args.patch,
                     "quick": args.quick, "monai_overlap": 0.5, "monai_mode": "gaussian",
                     "command": " ".join(["python", "benchmarks/bench_inference.py",
                                          *sys.argv[1:]])},
        "weights": weights_info, "exports": exports, "rows": flat,
        "parent_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "notes": ["wall_s_per_case: reading + inference per case from inside the process "
                  "(predict_report.json; the workers count the same); process_wall_s, cpu_s "
                  "and peak_rss_mb: the whole process (imports, model load, writing "
                  "included); cpu_s_per_case = cpu_s / cases",
                  "agreement: voxels equal to the reference's labels; agreement_tumour: the "
                  "same over voxels labelled tumour by either",
                  "peak_rss_mb of a child cannot be below parent_peak_rss_mb: Linux carries "
                  "the parent's peak RSS into a forked child across exec"],
    }


def write_result(args: argparse.Namespace, value: dict[str, Any]) -> None:
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json_out.with_name(args.json_out.name + ".tmp")
        tmp.write_text(json.dumps(value, indent=2) + "\n")
        tmp.replace(args.json_out)


def print_table(result: dict[str, Any]) -> None:
    s = result["settings"]
    table = Table(title=f"whole-case inference, {s['n_cases']} case(s), {s['threads']} "
                        f"thread(s), windows {s['patch']}^3; load "
                        f"{result['load_before'][0]:.1f} -> {result['load_after'][0]:.1f}")
    for col in ("size", "path", "s/case", "CPU s/case", "peak RSS MB", "x MONAI",
                "agree", "agree tumour", "WT Dice", "status"):
        table.add_column(col, justify="left" if col in ("size", "path", "status") else "right")

    def f(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for row in result["rows"]:
        dice_wt = (row.get("dice") or {}).get("WT")
        table.add_row(row["size"], row["path"], f(row.get("wall_s_per_case"), ".2f"),
                      f(row.get("cpu_s_per_case"), ".1f"), f(row.get("peak_rss_mb"), ".0f"),
                      f(row.get("speedup_vs_monai"), ".2f"), f(row.get("agreement"), ".6f"),
                      f(row.get("agreement_tumour"), ".4f"), f(dice_wt, ".3f"),
                      row["status"] + (f": {row['reason']}" if row.get("reason") else ""))
    Console(width=160).print(table)


if __name__ == "__main__":
    raise SystemExit(main())
