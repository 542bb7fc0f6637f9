"""GPU training step of a configuration (default: the paper's MTCM-KD, 128^3, batch 1).

Runs the method (for MTCM-KD: 3 teachers + CDSFL + student, KD on) forward + backward + Adam
step on random data for each variant: fp32 (what the authors run, on two GPUs: PyTorch's
defaults, under which cuDNN convolutions use TF32), fp32-strict (TF32 off everywhere), bf16
autocast, bf16 + channels-last, bf16 + torch.compile. Also times `finish_batch` on
the device: the part of the loader's work that `data.defer_to_device` leaves to the GPU
(transfer, float16 -> float32, intensity augmentation, cast). Prints and writes JSON.

    python benchmarks/bench_train_gpu.py --iters 20 --json-out .bench/train_gpu.json
    python benchmarks/bench_train_gpu.py --config configs/baseline.yaml --variants fp32 bf16

`--device cpu` runs the same code on the CPU (a smoke test at a small `--patch`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mtcmkd.brats import CHANNELS
from mtcmkd.config import load_config
from mtcmkd.data import finish_batch
from mtcmkd.methods import build_method

VARIANTS = ("fp32", "fp32-strict", "bf16", "bf16+channels_last", "bf16+compile")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(variant: str, cfg_path: Path, overrides: list[str], patch: int, iters: int,
        warmup: int, device: torch.device) -> dict:
    cfg = load_config(cfg_path, [f"data.patch_size=[{patch},{patch},{patch}]",
                                 "method.kd_start_epoch=0", *overrides])
    torch.manual_seed(0)
    if device.type == "cuda":  # PyTorch's defaults, except for fp32-strict
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = variant != "fp32-strict"
    method = build_method(cfg, CHANNELS).to(device)
    if "channels_last" in variant:
        method = method.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-4)
    step_fn = torch.compile(method) if "compile" in variant else method
    dtype = torch.bfloat16 if "bf16" in variant else None
    image = torch.randn(cfg.train.batch_size, 4, patch, patch, patch, device=device)
    if "channels_last" in variant:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    label = torch.randint(0, 4, (cfg.train.batch_size, patch, patch, patch), device=device)
    batch = {"image": image, "label": label}
    epoch = 1  # KD is on from epoch 0 (override above)

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype or torch.float32,
                            enabled=dtype is not None):
            out = step_fn(batch, epoch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    t_compile = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    _sync(device)
    warm_s = time.perf_counter() - t_compile
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        loss = step()
    _sync(device)
    dt = (time.perf_counter() - t0) / iters
    return {"variant": variant, "s_per_step": dt, "samples_per_s": cfg.train.batch_size / dt,
            "warmup_s": warm_s, "final_loss": float(loss),
            "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                             if device.type == "cuda" else None)}


def time_finish(device: torch.device, patch: int, batch_size: int, iters: int) -> dict:
    """`finish_batch` of a deferred batch (float16 image, uint8 label, augmentation params)."""
    g = torch.Generator().manual_seed(0)
    pin = device.type == "cuda"
    image = torch.randn(batch_size, 4, patch, patch, patch, generator=g).half()
    batch = {"image": image.pin_memory() if pin else image,
             "label": torch.randint(0, 4, (batch_size, patch, patch, patch), generator=g,
                                    dtype=torch.uint8),
             "intensity": torch.stack([torch.rand(batch_size, 4, generator=g) * 0.2 + 0.9,
                                       torch.rand(batch_size, 4, generator=g) * 0.2 - 0.1],
                                      dim=1)}
    if pin:
        batch["label"] = batch["label"].pin_memory()
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for _ in range(3):
            finish_batch(batch, device, dtype)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            finish_batch(batch, device, dtype)
        _sync(device)
        out[f"finish_batch_{name}_ms_per_patch"] = (
            1000 * (time.perf_counter() - t0) / iters / batch_size)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/mtcmkd-paper.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS,
                    default=list(VARIANTS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_train_gpu: no CUDA GPU here; run it on a GPU node")
    torch.backends.cudnn.benchmark = True
    results = {"device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                          else "cpu"),
               "torch": torch.__version__, "config": str(args.config),
               "overrides": args.overrides, "patch": args.patch, "runs": []}
    for v in args.variants:
        r = run(v, args.config, args.overrides, args.patch, args.iters, args.warmup, device)
        results["runs"].append(r)
        mem = "" if r["peak_mem_gib"] is None else f"  {r['peak_mem_gib']:.1f} GiB"
        print(f"{args.config.stem} {v:20s} {r['samples_per_s']:7.2f} samples/s  "
              f"{r['s_per_step'] * 1e3:7.1f} ms/step  warm-up {r['warmup_s']:.0f} s{mem}",
              flush=True)
    base = results["runs"][0]["samples_per_s"]
    for r in results["runs"]:
        r["speedup_vs_first"] = r["samples_per_s"] / base
    results.update(time_finish(device, args.patch, 2, max(args.iters, 5)))
    print(f"finish_batch on {device.type}: "
          f"{results['finish_batch_fp32_ms_per_patch']:.2f} ms/patch (fp32), "
          f"{results['finish_batch_bf16_ms_per_patch']:.2f} ms/patch (bf16)", flush=True)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
