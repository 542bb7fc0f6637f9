"""Training-loop throughput and step-time breakdown (data wait, forward, backward, optimiser).

Writes a phantom store, trains with `mtcmkd train` (DeepSpeed, one rank, on the GPU when there
is one) for a few steps per DataLoader worker count, and reads the breakdown from each run's
log.jsonl (the trainer times each phase). The data wait is what the step spent waiting for its
batch, `finish_batch` on the device included: near zero means the loader keeps the step fed.

    # CPU, small (docs/PERFORMANCE.md "Training step on CPU")
    python benchmarks/bench_train_loop.py --patch 64 --widths 16 32 48 64 --steps 12
    # GPU: how many loader workers feed the paper configuration at 128^3
    python benchmarks/bench_train_loop.py --config configs/mtcmkd-paper.yaml --patch 128 \\
        --shape 240 240 155 --cases 8 --steps 40 --workers 0 1 2 --set train.precision=auto
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
PHASES = ("time/data", "time/forward", "time/backward", "time/step")


def train_once(store: Path, run: Path, args: argparse.Namespace, workers: int) -> dict:
    p = args.patch
    cmd = [sys.executable, "-m", "mtcmkd", "train", "--config", str(args.config),
           "--store", str(store), "--out", str(run),
           "--set", f"data.patch_size=[{p},{p},{p}]",
           "--set", "train.epochs=1", "--set", f"train.iters_per_epoch={args.steps}",
           "--set", "train.val_every=1000", "--set", "train.ckpt_every=1000",
           "--set", "train.log_every=1", "--set", f"data.num_workers={workers}",
           ]
    method = yaml.safe_load(Path(args.config).read_text()).get("method", {}).get("name")
    if method == "mtcmkd":  # KD from the first step, so every measured step has every term
        cmd += ["--set", "method.kd_start_epoch=0"]
    if args.widths:
        cmd += ["--set", "model.widths=[" + ",".join(map(str, args.widths)) + "]"]
    for o in args.overrides:
        cmd += ["--set", o]
    r = subprocess.run(cmd, capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if r.returncode != 0:
        raise SystemExit(r.stdout[-3000:] + r.stderr[-3000:])
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    train = [x for x in records if x["kind"] == "train"][args.skip:]  # warm-up steps
    mean = {k: float(np.mean([x[k] for x in train])) for k in PHASES}
    batch = yaml.safe_load((run / "config.yaml").read_text())["train"]["batch_size"]
    # Wall time per step from the logged throughput: on a GPU the phase timers see kernel
    # launches, not kernels (the loop does not synchronise), so their sum is not the step.
    step_s = float(np.mean([batch / x["samples_per_s"] for x in train]))
    return {"workers": workers, "steps_measured": len(train), "s_per_step": step_s,
            "samples_per_s": batch / step_s,
            **{k.replace("time/", "s_"): v for k, v in mean.items()},
            "data_wait_fraction": mean["time/data"] / step_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--widths", type=int, nargs="+", default=None,
                    help="network widths (default: the config's)")
    ap.add_argument("--cases", type=int, default=8, help="phantom cases in the store")
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 96, 72], help="phantom shape")
    ap.add_argument("--steps", type=int, default=12, help="steps per run")
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the means")
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="DataLoader workers")
    ap.add_argument("--store", type=Path, default=None,
                    help="phantom store to use; written there (and kept) when missing")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        store = args.store or tmp / "store"
        if not (store / "zarr.json").is_file():
            mtcmkd = [sys.executable, "-m", "mtcmkd"]
            subprocess.run([*mtcmkd, "synth", str(tmp / "raw"), "--cases", str(args.cases),
                            "--shape", *map(str, args.shape)], check=True, capture_output=True)
            subprocess.run([*mtcmkd, "preprocess", str(tmp / "raw"), str(store), "--folds", "4",
                            "--workers", str(min(8, os.cpu_count() or 1))],
                           check=True, capture_output=True)
        runs = []
        for w in args.workers:
            r = train_once(store, tmp / f"run_w{w}", args, w)
            runs.append(r)
            print(f"workers {w}: {r['samples_per_s']:.2f} samples/s, data wait "
                  f"{r['s_data'] * 1e3:.1f} ms ({100 * r['data_wait_fraction']:.1f}% of the "
                  f"{r['s_per_step'] * 1e3:.0f} ms step); timers: forward {r['s_forward'] * 1e3:.0f} ms, backward "
                  f"{r['s_backward'] * 1e3:.0f} ms, optimiser {r['s_step'] * 1e3:.0f} ms",
                  flush=True)
    result = {"config": str(args.config), "overrides": args.overrides, "patch": args.patch,
              "widths": args.widths, "shape": args.shape, "cases": args.cases,
              "cpus": os.cpu_count(), "runs": runs}
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
