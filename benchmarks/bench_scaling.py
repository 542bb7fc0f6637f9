"""Step time and gradient all-reduce share of data-parallel training on N ranks (docs/SCALING.md).

Every rank builds a configuration's method and DeepSpeed engine as `mtcmkd train` does (the
package's `setup_distributed`, `build_method`, `deepspeed_config`: the config's ZeRO stage and
precision), then times each optimiser step on random data, synchronised, in four parts:

- forward;
- backward, compute only (DeepSpeed's own gradient reduction switched off for this timer);
- the gradient all-reduce: DeepSpeed's `allreduce_gradients`, the call its backward makes at
  the end (at ZeRO 0 and 1 it runs after the whole backward, in buckets of 5e8 elements: one
  bucket for these networks, so nothing of it overlaps with compute in the trainer either);
- the optimiser step.

It also counts the bytes that reduction hands to `torch.distributed.all_reduce`, and measures a
bare all-reduce of a buffer of that size: algorithm bandwidth (bytes / time) and bus bandwidth
(x 2(N-1)/N, what a ring moves per link). Per config, the slowest rank's means are reported.

    # GPU node: one rank per GPU
    torchrun --nproc_per_node=8 benchmarks/bench_scaling.py --json-out .bench/scaling_8.json
    srun --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 \\
        python benchmarks/bench_scaling.py --json-out .bench/scaling_32.json
    # CPU, gloo, N processes of this machine (a smoke test at a small size)
    python benchmarks/bench_scaling.py --spawn 2 --patch 16 --widths 8 16 24 32 --steps 3

Defaults: the paper MTCM-KD and the baseline at 128^3, batch 1, `train.precision=auto` (bf16
on a GPU, fp32 on a CPU), KD on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

PHASES = ("forward", "backward", "allreduce", "optimizer")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def counted_all_reduce(counter: list[int]) -> Iterator[None]:
    """Add the bytes of every tensor passed to torch.distributed.all_reduce to counter[0]."""
    real = torch.distributed.all_reduce

    def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        counter[0] += tensor.numel() * tensor.element_size()
        return real(tensor, *args, **kwargs)

    torch.distributed.all_reduce = counting
    try:
        yield
    finally:
        torch.distributed.all_reduce = real


def bare_all_reduce(nbytes: int, dtype: torch.dtype, device: torch.device, world: int,
                    reps: int) -> dict[str, float]:
    """Seconds per all-reduce of `nbytes`, algorithm and bus bandwidth (GB/s); a one-rank world
    moves nothing (0 s)."""
    if world == 1 or nbytes == 0:
        return {"s": 0.0, "algbw_gbs": 0.0, "busbw_gbs": 0.0}
    buf = torch.ones(nbytes // torch.tensor([], dtype=dtype).element_size(), dtype=dtype,
                     device=device)
    torch.distributed.all_reduce(buf)  # warm-up: connections, NCCL channels
    _sync(device)
    torch.distributed.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.distributed.all_reduce(buf)
    _sync(device)
    s = (time.perf_counter() - t0) / reps
    algbw = nbytes / s / 1e9
    return {"s": s, "algbw_gbs": algbw, "busbw_gbs": algbw * 2 * (world - 1) / world}


def measure(config: str, overrides: list[str], steps: int, warmup: int, reps: int,
            dist: Any) -> dict[str, Any]:
    """One configuration on this rank: mean seconds per phase, bytes reduced per step, the
    bare all-reduce of that many bytes; the slowest rank's values (MAX over ranks)."""
    import deepspeed

    from mtcmkd.brats import CHANNELS
    from mtcmkd.config import load_config
    from mtcmkd.engine.build import deepspeed_config, resolve_precision
    from mtcmkd.engine.dist import all_reduce
    from mtcmkd.methods import build_method

    cfg = load_config(config, overrides)
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg, CHANNELS).to(dist.device)
    precision = resolve_precision(cfg.train.precision, dist.device)
    groups = [{"params": [p for p in params if p.requires_grad], "name": name}
              for name, params in method.param_groups().items()]
    optimizer = torch.optim.Adam([g for g in groups if g["params"]], lr=cfg.train.lr)
    engine, _, _, _ = deepspeed.initialize(
        model=method, optimizer=optimizer, dist_init_required=False,
        config=deepspeed_config(cfg, dist.world_size, precision))
    engine.enable_backward_allreduce = False  # the all-reduce gets a timer of its own
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    b, patch = cfg.train.batch_size, tuple(cfg.data.patch_size)
    batch = {"image": torch.randn(b, len(CHANNELS), *patch, device=dist.device, dtype=dtype),
             "label": torch.randint(0, cfg.model.n_classes, (b, *patch), device=dist.device)}
    params = sum(p.numel() for p in method.parameters() if p.requires_grad)
    times = {k: 0.0 for k in PHASES}
    reduced = [0]
    for i in range(warmup + steps):
        marks = []
        _sync(dist.device)
        torch.distributed.barrier()
        marks.append(time.perf_counter())
        out = engine(batch, 1)  # epoch 1: KD on (kd_start_epoch is 1 in every preset)
        _sync(dist.device)
        marks.append(time.perf_counter())
        engine.backward(out.loss)
        _sync(dist.device)
        marks.append(time.perf_counter())
        count = [0]
        with counted_all_reduce(count):
            engine.allreduce_gradients()
        _sync(dist.device)
        marks.append(time.perf_counter())
        engine.step()
        _sync(dist.device)
        marks.append(time.perf_counter())
        if i >= warmup:
            for k, a, z in zip(PHASES, marks[:-1], marks[1:], strict=True):
                times[k] += (z - a) / steps
            reduced[0] = count[0]
    grad_dtype = next((p.grad.dtype for p in method.parameters() if p.grad is not None),
                      torch.float32)
    grad_bytes = reduced[0] or params * torch.tensor([], dtype=grad_dtype).element_size()
    bare = bare_all_reduce(grad_bytes, grad_dtype if reduced[0] else torch.float32,
                           dist.device, dist.world_size, reps)
    local = torch.tensor([times[k] for k in PHASES], dtype=torch.float64)
    local = all_reduce(local, op=torch.distributed.ReduceOp.MAX)
    slowest = dict(zip(PHASES, local.tolist(), strict=True))
    step = sum(slowest.values())
    return {"config": config, "world_size": dist.world_size, "device": str(dist.device),
            "backend": dist.backend, "precision": precision, "zero_stage": cfg.train.zero_stage,
            "patch": list(patch), "batch_size": b, "parameters": params,
            "hosts": sorted(set(dist.hosts)), "steps": steps, "warmup": warmup,
            **{f"{k}_s": v for k, v in slowest.items()}, "step_s": step,
            "allreduce_share": slowest["allreduce"] / step if step else 0.0,
            "reduced_bytes_per_step": reduced[0], "grad_bytes": grad_bytes,
            "bare_allreduce": bare,
            "samples_per_s": b * dist.world_size / step if step else 0.0}


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'config':<14} {'N':>3} {'prec':>5} {'fwd ms':>8} {'bwd ms':>8} {'allred ms':>9} "
            f"{'opt ms':>7} {'step ms':>8} {'comm %':>6} {'grad MB':>8} {'busbw GB/s':>10} "
            f"{'samples/s':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{Path(r['config']).stem:<14} {r['world_size']:>3} {r['precision']:>5} "
            f"{r['forward_s'] * 1e3:>8.1f} {r['backward_s'] * 1e3:>8.1f} "
            f"{r['allreduce_s'] * 1e3:>9.1f} {r['optimizer_s'] * 1e3:>7.1f} "
            f"{r['step_s'] * 1e3:>8.1f} {100 * r['allreduce_share']:>6.1f} "
            f"{r['grad_bytes'] / 1e6:>8.2f} {r['bare_allreduce']['busbw_gbs']:>10.3f} "
            f"{r['samples_per_s']:>9.2f}")
    return "\n".join(lines)


def spawn(n: int, argv: list[str]) -> int:
    """Run this script as `n` CPU ranks of this machine (gloo); returns the worst exit code."""
    from mtcmkd.engine.dist import free_port

    port = str(free_port())
    procs = []
    for rank in range(n):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": os.environ.get(
                   "OMP_NUM_THREADS", "1")}
        procs.append(subprocess.Popen([sys.executable, __file__, *argv], env=env))
    return max(p.wait() for p in procs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", nargs="+", default=["mtcmkd-paper", "baseline"],
                    help="configs or preset names (default: the paper MTCM-KD and baseline)")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--widths", type=int, nargs="+", help="model.widths (default: the config's)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--zero-stage", type=int, default=None, choices=(0, 1),
                    help="override train.zero_stage (0 or 1: the all-reduce runs after backward)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10, help="bare all-reduce repetitions")
    ap.add_argument("--spawn", type=int, default=0,
                    help="start this many CPU ranks of this machine (gloo) and exit")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    if args.spawn:
        rest = list(argv if argv is not None else sys.argv[1:])
        i = rest.index("--spawn")
        return spawn(args.spawn, rest[:i] + rest[i + 2:])

    from mtcmkd.engine.dist import setup_distributed

    dist = setup_distributed()
    overrides = [f"data.patch_size=[{args.patch},{args.patch},{args.patch}]",
                 f"train.precision={args.precision}"]
    if args.widths:
        overrides.append(f"model.widths=[{','.join(map(str, args.widths))}]")
    if args.zero_stage is not None:
        overrides.append(f"train.zero_stage={args.zero_stage}")
    rows = [measure(c, overrides, args.steps, args.warmup, args.reps, dist)
            for c in args.config]
    if dist.is_main:
        print(table(rows), flush=True)
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(rows, indent=2) + "\n")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # Results are written and the group is gone: leave without the interpreter's teardown,
    # where a communication thread left joinable once aborted both ranks of a finished run
    # ("terminate called without an active exception", CI of 2026-11-30)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
