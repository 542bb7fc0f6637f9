"""Whole-volume inference of the paper-size student on a GPU: the reference against the fast
settings of the one inference pipeline (issue 17: "the GPU path keeps its speed").

One NIfTI T1ce volume (a real case, or a phantom from `mtcmkd synth ... --shape 240 240 155`),
the paper student (`configs/mtcmkd.yaml`'s model, 9.46 M parameters) with seeded random weights
(timing and agreement only; no Dice), and per setting: seconds per case (CUDA-synchronised, best
and median of `--reps` after one warm-up), peak GPU memory, and the fraction of voxels whose
label equals the reference's.

    python benchmarks/bench_inference_gpu.py CASE_t1ce.nii.gz --json-out .bench/inference_gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtcmkd.config import load_config
from mtcmkd.inference import InferenceSettings, build_pipeline
from mtcmkd.models import build_network
from mtcmkd.nifti_io import read_nifti

#: name -> settings; "reference" is what `mtcmkd predict --reference` computes.
SETTINGS: dict[str, InferenceSettings] = {
    "reference (fp32, windows, overlap 0.5)": InferenceSettings.reference(),
    "bf16 windows": InferenceSettings(precision="bf16"),
    "bf16 windows, 4 per call": InferenceSettings(precision="bf16", window_batch=4),
    "fp32 box": InferenceSettings(layout="box"),
    "bf16 box": InferenceSettings(precision="bf16", layout="box"),
}


def run(pipeline: torch.nn.Module, x: torch.Tensor, reps: int) -> tuple[list[float], torch.Tensor]:
    times = []
    labels = torch.empty(0)
    with torch.inference_mode():
        for i in range(reps + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            labels = pipeline(x)
            torch.cuda.synchronize()
            if i:  # the first call is the warm-up (cuDNN autotuning, allocator)
                times.append(time.perf_counter() - t0)
    return times, labels.cpu()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("volume", type=Path, help="a T1ce NIfTI file")
    ap.add_argument("--config", default="mtcmkd", help="preset or config file (its model)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    cfg = load_config(args.config)
    torch.manual_seed(0)
    net = build_network(cfg.model.kind, 1, cfg.model.n_classes, cfg.model.widths).cuda()
    data = np.asarray(read_nifti(args.volume).data, np.float32)
    x = torch.from_numpy(data)[None, None].cuda()
    rows: list[dict[str, Any]] = []
    reference = None
    for name, settings in SETTINGS.items():
        pipeline = build_pipeline(net, cfg.data.patch_size, cfg.model.n_classes,
                                  cfg.model.output, settings, device="cuda")
        torch.cuda.reset_peak_memory_stats()
        times, labels = run(pipeline, x, args.reps)
        if reference is None:
            reference = labels
        rows.append({"setting": name, "best_s": min(times), "median_s": statistics.median(times),
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                     "agreement_with_reference": float((labels == reference).float().mean())})
        print(f"{name:<40} best {min(times):6.2f} s  median {statistics.median(times):6.2f} s  "
              f"peak {rows[-1]['peak_gib']:5.1f} GiB  agreement "
              f"{rows[-1]['agreement_with_reference']:.5f}", flush=True)
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "volume_shape": list(data.shape), "config": args.config,
              "parameters": sum(p.numel() for p in net.parameters()),
              "weights": "seeded random init (timing and agreement only)", "rows": rows}
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
