"""GPU training throughput of the paper configuration (MTCM-KD, 128^3, batch 1): fp32 vs bf16.

Runs the `mtcmkd` method (3 teachers + CDSFL + student, KD on) forward + backward + Adam step on
random data, for each variant: fp32 (what the authors run, on two GPUs), bf16 autocast,
bf16 + channels-last, bf16 + torch.compile. Prints samples/s and writes JSON.

    python benchmarks/bench_train_gpu.py --iters 20 --json-out .bench/train_gpu.json

Needs a CUDA GPU; exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mtcmkd.brats import CHANNELS
from mtcmkd.config import load_config
from mtcmkd.methods import build_method


def run(variant: str, cfg_path: Path, patch: int, iters: int, warmup: int) -> dict:
    cfg = load_config(cfg_path, [f"data.patch_size=[{patch},{patch},{patch}]",
                                 "method.kd_start_epoch=0"])
    method = build_method(cfg, CHANNELS).cuda()
    opt = torch.optim.Adam(method.parameters(), lr=1e-4)
    step_fn = method
    if "channels_last" in variant:
        method = method.to(memory_format=torch.channels_last_3d)
    if "compile" in variant:
        step_fn = torch.compile(method)
    dtype = torch.bfloat16 if "bf16" in variant else None
    image = torch.randn(1, 4, patch, patch, patch, device="cuda")
    if "channels_last" in variant:
        image = image.to(memory_format=torch.channels_last_3d)
    label = torch.randint(0, 4, (1, patch, patch, patch), device="cuda")
    batch = {"image": image, "label": label}

    def step() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            out = step_fn(batch, 1)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters
    return {"variant": variant, "s_per_step": dt, "samples_per_s": 1 / dt,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/mtcmkd-paper.yaml"))
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--variants", nargs="+",
                    default=["fp32", "bf16", "bf16+channels_last", "bf16+compile"])
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train_gpu: no CUDA GPU here; run it on a GPU node")
    torch.backends.cudnn.benchmark = True
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    for v in args.variants:
        r = run(v, args.config, args.patch, args.iters, args.warmup)
        results["runs"].append(r)
        print(f"{v:22s} {r['samples_per_s']:.2f} samples/s  {r['s_per_step'] * 1e3:.0f} ms/step  "
              f"{r['peak_mem_gb']:.1f} GiB")
    base = results["runs"][0]["samples_per_s"]
    for r in results["runs"]:
        r["speedup_vs_fp32"] = r["samples_per_s"] / base
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
