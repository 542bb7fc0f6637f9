"""What the DeepSpeed engine adds to a method's step: the same step three ways in one process.

- bare: autocast bf16 + torch Adam (what `bench_train_gpu.py` times);
- ds: the DeepSpeed engine with the trainer's config (`deepspeed_config`, bf16 on a GPU);
- ds+syncs: the same plus the host reads the trainer makes every step (loss terms, method
  statistics, the preemption flag).

Then a torch.profiler table of three ds+syncs steps (top GPU and CPU operators). One rank,
random data, 128^3 by default:

    python benchmarks/profile_loop_gpu.py --config configs/mtcmkd-paper.yaml
    python benchmarks/profile_loop_gpu.py --device cpu --patch 32 --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch

from mtcmkd.brats import CHANNELS
from mtcmkd.config import load_config
from mtcmkd.engine.dist import all_reduce
from mtcmkd.engine.trainer import deepspeed_config
from mtcmkd.methods import build_method

KINDS = ("bare", "ds", "ds+syncs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/mtcmkd-paper.yaml"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per kind")
    args = ap.parse_args()

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533"), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    torch.backends.cudnn.benchmark = True
    p = args.patch
    cfg = load_config(args.config, [f"data.patch_size=[{p},{p},{p}]", "method.kd_start_epoch=0"])
    precision = "bf16" if cuda else "fp32"
    dtype = torch.bfloat16 if cuda else torch.float32
    label = torch.randint(0, 4, (1, p, p, p), device=device)
    image = torch.randn(1, 4, p, p, p, device=device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def make_step(kind: str) -> Any:
        torch.manual_seed(0)
        method = build_method(cfg, CHANNELS).to(device)
        groups = [{"params": [q for q in ps if q.requires_grad], "name": n}
                  for n, ps in method.param_groups().items()]
        opt = torch.optim.Adam([g for g in groups if g["params"]], lr=1e-4)
        if kind == "bare":
            def bare() -> None:
                with torch.autocast(device.type, dtype=dtype, enabled=cuda):
                    out = method({"image": image, "label": label}, 1)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return bare
        engine, _, _, _ = deepspeed.initialize(model=method, optimizer=opt,
                                               config=deepspeed_config(cfg, 1, precision),
                                               dist_init_required=False)
        batch = {"image": image.to(dtype), "label": label}
        stats: dict[str, torch.Tensor] = {}

        def ds() -> None:
            out = engine(batch, 1)
            engine.backward(out.loss)
            engine.step()
            if kind == "ds+syncs":  # the trainer's per-step host reads
                for k, v in out.stats.items():
                    stats[k] = stats.get(k, 0) + v.detach().double().cpu()
                _ = [float(v) for v in out.terms.values()]
                _ = float(out.loss.detach())
                _ = all_reduce(torch.tensor([0.0]), op=torch.distributed.ReduceOp.MAX).item()
        return ds

    for kind in KINDS:
        step = make_step(kind)
        for _ in range(3):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        print(f"{kind:10s} {(time.perf_counter() - start) / args.steps * 1e3:7.1f} ms/step",
              flush=True)
        if kind == KINDS[-1]:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:
                for _ in range(3):
                    step()
                sync()
            table = prof.key_averages()
            print(table.table(sort_by="cuda_time_total" if cuda else "cpu_time_total",
                              row_limit=25, max_name_column_width=60))
            print(table.table(sort_by="self_cpu_time_total", row_limit=15,
                              max_name_column_width=60))
        del step
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
