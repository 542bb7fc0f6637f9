"""CPU training throughput and step-time breakdown (data wait, forward, backward, optimiser).

Writes a phantom store (8 cases), trains MTCM-KD for a few steps with `mtcmkd train` in one
process and reads the breakdown from the run's log.jsonl (the trainer times each phase).

    python benchmarks/bench_train_cpu.py --patch 64 --widths 16 32 48 64 --steps 12
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

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 32, 48, 64])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        mtcmkd = [sys.executable, "-m", "mtcmkd"]
        subprocess.run([*mtcmkd, "synth", str(tmp / "raw"), "--cases", "8", "--shape", "96",
                        "96", "72"], check=True, capture_output=True)
        subprocess.run([*mtcmkd, "preprocess", str(tmp / "raw"), str(tmp / "store"), "--folds",
                        "4"], check=True, capture_output=True)
        widths = "[" + ",".join(map(str, args.widths)) + "]"
        p = args.patch
        cmd = [*mtcmkd, "train", "--config", str(REPO / "configs" / "tiny.yaml"), "--store",
               str(tmp / "store"), "--out", str(tmp / "run"),
               "--set", f"model.widths={widths}", "--set", f"data.patch_size=[{p},{p},{p}]",
               "--set", "train.epochs=2", "--set", f"train.iters_per_epoch={args.steps // 2}",
               "--set", "train.val_every=1000", "--set", "train.ckpt_every=1000",
               "--set", "train.log_every=1", "--set", f"data.num_workers={args.workers}",
               "--set", "method.kd_start_epoch=0"]
        r = subprocess.run(cmd, capture_output=True, text=True,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if r.returncode != 0:
            raise SystemExit(r.stdout[-2000:] + r.stderr[-2000:])
        records = [json.loads(x) for x in (tmp / "run" / "log.jsonl").read_text().splitlines()]
    train = [x for x in records if x["kind"] == "train"][2:]  # skip warm-up steps
    keys = ("time/data", "time/forward", "time/backward", "time/step")
    mean = {k: float(np.mean([x[k] for x in train])) for k in keys}
    total = sum(mean.values())
    result = {"patch": p, "widths": args.widths, "steps_measured": len(train),
              "samples_per_s": float(np.mean([x["samples_per_s"] for x in train])),
              **{k.replace("time/", "s_"): v for k, v in mean.items()},
              "data_wait_fraction": mean["time/data"] / total, "cpus": os.cpu_count()}
    for k, v in result.items():
        print(f"{k:20s} {v}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
