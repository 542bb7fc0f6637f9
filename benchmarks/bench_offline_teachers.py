"""Student step cost with offline teachers (``method.teachers_from``) against a baseline step.

One training iteration (the method's forward, backward of its loss, one Adam step over the
trainable parameters) on the same batch, for

    baseline          the T1ce student alone (configs/baseline.yaml's method)
    offline           MTCM-KD with its three teachers and CDSFL loaded frozen: teacher forwards
                      under no_grad, the student's forward + backward, KD terms
    offline-bf16      the same with ``method.teacher_precision: bf16``: the frozen teachers'
                      forwards under bf16 autocast with channels-last-3d weights and inputs,
                      outputs back to float32 (worth it only where the CPU has native bf16)
    online            MTCM-KD as published: teachers and CDSFL train in the same step

The variants alternate iteration by iteration (drift on a shared machine hits all alike); the
table shows medians and each variant's ratio to the baseline step. Target (issue 16): offline
<= 1.5x baseline; online is about 4x. Every variant's hard-Dice statistics use the same
``hard_region_masks``, so a change there moves all rows alike.

    python benchmarks/bench_offline_teachers.py --patch 32 --widths 8 16 24 32 --iters 10
    python benchmarks/bench_offline_teachers.py --patch 64 --widths 16 32 48 64 --iters 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

try:
    from mtcmkd.brats import CHANNELS
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mtcmkd.brats import CHANNELS
from bench_method_overhead import blob_batch  # same batch as the overhead benchmark

from mtcmkd.config import config_from_dict
from mtcmkd.methods import build_method


def make_step(name: str, args: argparse.Namespace,
              batch: dict[str, torch.Tensor]) -> Callable[[], float]:
    method_cfg: dict = {"name": "baseline"} if name == "baseline" else {
        "name": "mtcmkd", "kd_start_epoch": 0}
    if name.startswith("offline"):
        method_cfg["teachers_from"] = "bench"  # the weights stay random: cost is what counts
    if name == "offline-bf16":
        method_cfg["teacher_precision"] = "bf16"
    cfg = config_from_dict({"data": {"patch_size": [args.patch] * 3},
                            "model": {"widths": args.widths},
                            "method": method_cfg, "train": {"batch_size": args.batch}})
    torch.manual_seed(0)
    method = build_method(cfg, CHANNELS)
    if name.startswith("offline"):
        method.freeze_offline(set(method.teacher_networks()))
    method.train()
    params = [p for p in method.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=1e-4)

    def step() -> float:
        optimiser.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = method(batch, 1)
        out.loss.backward()
        optimiser.step()
        return time.perf_counter() - t0

    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 16, 24, 32])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    ap.add_argument("--variants", nargs="+",
                    default=["baseline", "offline", "offline-bf16", "online"])
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch = blob_batch(args.patch, args.batch, seed=0)
    steps = {v: make_step(v, args, batch) for v in args.variants}
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for i in range(args.warmup + args.iters):
        for v, step in steps.items():
            t = step()
            if i >= args.warmup:
                times[v].append(t)
    med = {v: statistics.median(t) for v, t in times.items()}
    base = med.get("baseline")
    table = Table(title=f"one training iteration, patch {args.patch}^3, batch {args.batch}, "
                        f"widths {args.widths}, {args.threads} thread(s), median of {args.iters}")
    for col in ("variant", "ms/step", "x baseline", "min ms", "max ms"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for v in args.variants:
        table.add_row(v, f"{med[v] * 1e3:.0f}", f"{med[v] / base:.2f}" if base else "-",
                      f"{min(times[v]) * 1e3:.0f}", f"{max(times[v]) * 1e3:.0f}")
    Console(width=120).print(table)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count(), "threads": args.threads,
                        "torch": torch.__version__},
            "settings": {k: v for k, v in vars(args).items() if k != "json_out"},
            "seconds": times, "median_s": med,
            "ratio_to_baseline": {v: med[v] / base for v in med} if base else None,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
