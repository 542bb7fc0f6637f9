"""Full-volume CPU inference of the paper-size student: eager vs TorchScript vs C++ (vs ONNX RT).

The student is ``build_network("resunet", 1, 4)`` (9.46M parameters, random init), patch
128^3, on one 240x240x155 T1ce volume: a real BraTS 2021 case from ../shared when present,
else a synthetic head. Each path runs in its own fresh process, so its peak RSS
(``ru_maxrss`` from ``os.wait4``) is its own:

    eager        mtcmkd.inference.predict_volume (crop, z-score, window, uncrop) in Python
    torchscript  the file `mtcmkd export torchscript` writes, torch.jit.load + forward
    cpp          export/cpp's mtcmkd_segment end to end (NIfTI in, NIfTI out)
    onnxruntime  the ONNX patch network tiled in numpy (export/README.md's recipe); only when
                 onnx, onnxscript and onnxruntime are installed
    onnxruntime-noarena  the same with ONNX Runtime's CPU memory arena off
                 (SessionOptions.enable_cpu_mem_arena = False)

Times: "inference" is the segmentation call alone (for eager, predict_volume; C++ reports its
forward time); "process" is the whole process (interpreter or library start, loading, I/O).
Each comes as wall time and as CPU time (user + sys of all threads): on a shared machine the
wall time depends on what else runs, the CPU time much less, so compare the CPU columns when
the load average is above the core count. Paths run interleaved, round by round.
A 128^3 window costs ~15 s on two CPU cores, so the default overlap is 0.0 (2x2x2 windows on a
typical brain box) to finish in minutes; the paper's 0.5 means 3x3x3 windows here (~3.4x).

    python benchmarks/bench_export.py                # ~7 min per round on 2 quiet cores
    python benchmarks/bench_export.py --paths eager torchscript --overlap 0.25
    python benchmarks/bench_export.py --device cuda --paths eager torchscript --overlap 0.5

`--device cuda` runs the eager and TorchScript paths on the GPU (the same exported file, moved
with `.to("cuda")`; times end after a synchronise); the C++ and ONNX paths stay on the CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_SAMPLE = REPO.parent / "shared" / "data" / "brats2021-sample"
PATHS = ("eager", "torchscript", "cpp", "onnxruntime", "onnxruntime-noarena")


# --- worker side: one path, one process --------------------------------------------------------


def _load_volume(path: Path) -> np.ndarray:
    import nibabel as nib

    return nib.load(str(path)).get_fdata(dtype=np.float64).astype(np.float32)


def _digest(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.uint8).tobytes()).hexdigest()[:16]


def _onnx_tiled(model: Path, volume: np.ndarray, patch: list[int], overlap: float,
                arena: bool = True) -> np.ndarray:
    """export/README.md's edge recipe: crop, z-score, Gaussian-blended windows, argmax."""
    import onnxruntime

    from mtcmkd.brats import release
    from mtcmkd.inference import gaussian_importance_map, window_starts

    options = onnxruntime.SessionOptions()
    options.enable_cpu_mem_arena = arena
    session = onnxruntime.InferenceSession(str(model), options,
                                           providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    nz = np.argwhere(volume != 0)
    lo, hi = nz.min(0), nz.max(0) + 1
    crop = volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float64)
    brain = crop != 0
    mean = crop[brain].mean()
    std = crop[brain].std()
    x = np.where(brain, (crop - mean) * (1.0 / std), 0.0).astype(np.float32)
    pads = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2)
            for p, s in zip(patch, x.shape, strict=True)]
    x = np.pad(x, pads)
    weight = gaussian_importance_map(patch).numpy()
    probs = np.zeros((4, *x.shape), np.float32)
    total = np.zeros(x.shape, np.float32)
    steps = [max(1, round(p * (1 - overlap))) for p in patch]
    for sd in window_starts(x.shape[0], patch[0], steps[0]):
        for sh in window_starts(x.shape[1], patch[1], steps[1]):
            for sw in window_starts(x.shape[2], patch[2], steps[2]):
                window = (slice(sd, sd + patch[0]), slice(sh, sh + patch[1]),
                          slice(sw, sw + patch[2]))
                (logits,) = session.run(None, {name: x[window][None, None]})
                e = np.exp(logits[0] - logits[0].max(0))
                probs[(slice(None), *window)] += e / e.sum(0) * weight
                total[window] += weight
    probs = probs / total
    probs = probs[:, pads[0][0]:pads[0][0] + crop.shape[0], pads[1][0]:pads[1][0] + crop.shape[1],
                  pads[2][0]:pads[2][0] + crop.shape[2]]
    labels = np.zeros(volume.shape, np.uint8)
    labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = np.argmax(probs, axis=0)
    return release("2021").unmap_labels(labels).astype(np.uint8)


def worker(mode: str, files: dict[str, str], overlap: float, out: Path,
           device: str = "cpu", calls: int = 1) -> None:
    """Run one path `calls` times on the volume; write {seconds (first call), digest} to `out`."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    volume = _load_volume(Path(files["volume"]))
    if mode == "eager":
        from mtcmkd.inference import predict_volume, to_release_labels
        from mtcmkd.student_weights import load_student

        bundle = load_student(Path(files["student"]))
        network = bundle.network.to(device)

        def infer() -> np.ndarray:
            pred = predict_volume(network, volume[None], bundle.patch_size, bundle.n_classes,
                                  bundle.output, overlap=overlap)
            return to_release_labels(pred.labels, "2021")
    elif mode == "torchscript":
        import warnings

        warnings.filterwarnings("ignore", category=DeprecationWarning)
        module = torch.jit.load(files["torchscript"], map_location=device)

        def infer() -> np.ndarray:
            return module(torch.from_numpy(volume)[None, None].to(device))[0].cpu().numpy()
    elif mode.startswith("onnxruntime"):
        patch = json.loads(files["patch"])

        def infer() -> np.ndarray:
            return _onnx_tiled(Path(files["onnx"]), volume, patch, overlap,
                               arena=mode == "onnxruntime")
    else:
        raise ValueError(mode)
    # The first call is what a one-shot CLI run pays; later calls in the same process are what
    # a server pays (TorchScript's profiling executor and cuDNN's algorithm choice are done).
    times = []
    for _ in range(calls):
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        labels = infer()
        sync()
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    seconds, cpu = times[0]
    np.save(out.with_suffix(".npy"), np.ascontiguousarray(labels, dtype=np.uint8))
    out.write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu,
                               "later_calls_s": [t for t, _ in times[1:]],
                               "digest": _digest(labels)}))


# --- driver side ---------------------------------------------------------------------------------


def _run_measured(cmd: list[str]) -> tuple[float, float, float, str]:
    """Run `cmd`: (wall s, CPU s (user + sys), peak RSS MiB, stdout) of that process alone.

    os.wait4 gives the rusage of this one child (ru_maxrss in KiB on Linux), unlike
    RUSAGE_CHILDREN, which is a maximum over every child waited for so far.
    """
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}): {stderr[-800:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0, stdout


def _synthetic_head(path: Path) -> None:
    import nibabel as nib

    from mtcmkd.brats import brats_affine
    from mtcmkd.export.torchscript import synthetic_volume

    vol = np.zeros((240, 240, 155), np.int16)
    vol[50:190, 40:215, 5:145] = synthetic_volume((140, 175, 140), seed=0)[0].astype(np.int16)
    nib.save(nib.Nifti1Image(vol, brats_affine(vol.shape)), str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--overlap", type=float, default=0.0)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    ap.add_argument("--volume", type=Path, default=None,
                    help="T1ce NIfTI (default: the first case of ../shared, else synthetic)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="interleaved rounds over the paths; the best time of each path counts")
    ap.add_argument("--device", default="cpu",
                    help="cpu or cuda[:N]: where the eager and TorchScript paths run")
    ap.add_argument("--calls", type=int, default=1,
                    help="inferences per process; the first is reported, later ones as "
                         "later_calls_s (warm: what a server pays)")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--worker", choices=PATHS[:2] + PATHS[3:], help=argparse.SUPPRESS)
    ap.add_argument("--files", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, json.loads(args.files), args.overlap, args.result, args.device,
               args.calls)
        return
    if args.device != "cpu" and set(args.paths) - {"eager", "torchscript"}:
        raise SystemExit("bench_export: --device applies to the eager and torchscript paths "
                         "only; pass --paths eager torchscript")

    import torch

    from mtcmkd.config import config_hash, load_config, to_dict
    from mtcmkd.export import build_cpp_client, export_torchscript, missing_onnx_packages
    from mtcmkd.models import build_network, count_parameters
    from mtcmkd.student_weights import save_student

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        volume = args.volume
        if volume is None:
            cases = sorted(SHARED_SAMPLE.glob("*/*_t1ce.nii.gz"))
            volume = cases[0] if cases else tmp / "synthetic_t1ce.nii.gz"
            if not cases:
                _synthetic_head(volume)
        cfg = load_config(REPO / "configs" / "mtcmkd.yaml")
        torch.manual_seed(0)
        net = build_network("resunet", 1, 4)
        patch = (args.patch,) * 3
        student = tmp / "student.pt"
        save_student(student, net, config=to_dict(cfg), config_hash=config_hash(cfg),
                     channels=("t1ce",), output="softmax", n_classes=4, patch_size=patch)
        exported = export_torchscript(student, tmp / "student_ts.pt", overlap=args.overlap)
        files = {"volume": str(volume), "student": str(student),
                 "torchscript": str(exported.path), "patch": json.dumps(list(patch))}
        image = _load_volume(volume)
        nzi = np.argwhere(image != 0)
        box = (nzi.max(0) + 1 - nzi.min(0)).tolist()
        print(f"student: resunet {count_parameters(net):,} parameters, patch {patch}, overlap "
              f"{args.overlap}; volume {volume.name} {image.shape}, brain box {box}; "
              f"{torch.get_num_threads()} threads", flush=True)

        # Prepare every path first, then run them interleaved round by round, so that load
        # from other processes on a shared machine hits every path alike; the best round counts.
        paths = list(args.paths)
        client = None
        if any(p.startswith("onnxruntime") for p in paths):
            missing = missing_onnx_packages()
            if missing:
                print(f"onnxruntime: skipped ({', '.join(missing)} not installed)")
                paths = [p for p in paths if not p.startswith("onnxruntime")]
            else:
                # In a child process: Linux carries a parent's peak RSS into the children it
                # forks, and the export with its 128^3 parity check peaks at several GB here.
                onnx_file = tmp / "student.onnx"
                subprocess.run([sys.executable, "-m", "mtcmkd", "export", "onnx", str(student),
                                "--out", str(onnx_file)], check=True, capture_output=True)
                files["onnx"] = str(onnx_file)
        if "cpp" in paths:
            start = time.perf_counter()
            client = build_cpp_client(tmp / "cpp-build")
            print(f"cpp: client built in {time.perf_counter() - start:.0f} s", flush=True)

        runs: dict[str, list[dict]] = {path: [] for path in paths}
        for round_ in range(args.repeats):
            for path in paths:
                runs[path].append(_run_path(path, client, files, exported.path, volume, tmp,
                                            args.overlap, args.device, args.calls))
                r = runs[path][-1]
                print(f"round {round_ + 1} {path:12s} inference {r['inference_s']:7.1f} s (cpu "
                      f"{r['inference_cpu_s']:7.1f})  process {r['process_s']:7.1f} s (cpu "
                      f"{r['process_cpu_s']:7.1f})  peak RSS {r['peak_rss_mib']:6.0f} MiB"
                      + (f"  later calls {', '.join(f'{t:.3f}' for t in r['later_calls_s'])} s"
                         if r.get("later_calls_s") else ""), flush=True)

        # Voxels whose label differs from the eager path's (last round of each path).
        eager_labels = tmp / "eager.npy"
        for path in paths:
            mine = tmp / f"{path}.npy"
            if path != "eager" and eager_labels.is_file() and mine.is_file():
                a, b = np.load(eager_labels), np.load(mine)
                n = int((a != b).sum())
                for r in runs[path]:
                    r["voxels_differing_from_eager"] = n
                print(f"{path}: {n} voxels of {a.size} ({n / a.size:.2e}) differ from eager; "
                      f"{int(((a != b) & ((a > 0) | (b > 0))).sum())} of them in either's tumour",
                      flush=True)
        keys = ("inference_s", "inference_cpu_s", "process_s", "process_cpu_s")
        results = {path: {**{k: min(r[k] for r in rs) for k in keys},
                          "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                          "digests": sorted({r["digest"] for r in rs}), "runs": rs}
                   for path, rs in runs.items()}
        reference = results.get("eager", {}).get("digests")
        print(f"\nbest of {args.repeats} round(s); 'vs eager' compares inference wall (cpu)")
        print("path         inference s  (cpu s)  process s  (cpu s)  peak RSS MiB  vs eager"
              "         labels")
        for path, r in results.items():
            eager = results.get("eager")
            ratio = r["inference_s"] / eager["inference_s"] if eager else float("nan")
            cpu_ratio = r["inference_cpu_s"] / eager["inference_cpu_s"] if eager else float("nan")
            same = ("-" if reference is None
                    else "identical" if r["digests"] == reference else "DIFFER")
            print(f"{path:12s} {r['inference_s']:11.1f} {r['inference_cpu_s']:8.1f} "
                  f"{r['process_s']:10.1f} {r['process_cpu_s']:8.1f} {r['peak_rss_mib']:13.0f}"
                  f"  {ratio:.3f}x ({cpu_ratio:.3f}x)  {same}")
        if args.json_out:
            args.json_out.write_text(json.dumps({
                "overlap": args.overlap, "patch": list(patch), "volume": str(volume),
                "brain_box": box, "threads": torch.get_num_threads(), "device": args.device,
                "gpu": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                        else None), "repeats": args.repeats,
                "load_average_after": os.getloadavg(), "results": results}, indent=2))


def _run_path(path: str, client: Path | None, files: dict[str, str], exported: Path,
              volume: Path, tmp: Path, overlap: float, device: str = "cpu",
              calls: int = 1) -> dict:
    """One measured run of one path in a fresh process."""
    if path == "cpp":
        import nibabel as nib

        assert client is not None
        out = tmp / "seg.nii.gz"
        wall, cpu, rss, stdout = _run_measured([str(client), str(exported), str(volume),
                                                str(out)])
        # "wrote OUT (XxYxZ, labels 2021, 12.3 s, cpu 24.1 s) ..."
        found = re.search(r", ([0-9.e+-]+) s, cpu ([0-9.e+-]+) s\)", stdout)
        if found is None:
            raise RuntimeError(f"unexpected client output: {stdout!r}")
        digest = _digest(np.asarray(nib.load(str(out)).dataobj))
        return {"inference_s": float(found[1]), "inference_cpu_s": float(found[2]),
                "process_s": wall, "process_cpu_s": cpu, "peak_rss_mib": rss, "digest": digest}
    result_file = tmp / f"{path}.json"
    cmd = [sys.executable, __file__, "--worker", path, "--files", json.dumps(files),
           "--overlap", str(overlap), "--result", str(result_file), "--device", device,
           "--calls", str(calls)]
    wall, cpu, rss, _ = _run_measured(cmd)
    data = json.loads(result_file.read_text())
    return {"inference_s": data["seconds"], "inference_cpu_s": data["cpu_seconds"],
            "process_s": wall, "process_cpu_s": cpu, "peak_rss_mib": rss,
            "later_calls_s": data["later_calls_s"], "digest": data["digest"]}


if __name__ == "__main__":
    main()
