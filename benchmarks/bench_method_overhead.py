"""Framework overhead of one MTCM-KD training iteration against the networks' own passes.

The method's glue (picking channels by name, downsampling labels, the weighted loss terms,
detaching, the per-step Dice statistics) must cost nothing visible next to the networks
(target: <= 5 % of their forward + backward). Three variants run on the same input:

    networks   3 teachers + student ``forward_features`` + CDSFL forward, backward of the plain
               sum of the means of every output tensor (no loss functions, no optimiser)
    method     ``method(batch, epoch=1)`` (KD on: every term present), backward of
               ``out.loss``, one Adam step over all parameters (the whole training iteration)
    glue       ``method(batch, epoch=1)`` and backward with every network (and CDSFL) replaced
               by a replay of its cached outputs as leaf tensors: exactly the work the method
               adds around the networks, measured directly

``networks`` and ``method`` alternate iteration by iteration, so slow drift from other
processes on the machine hits both alike; ``glue`` is short and runs ``--glue-iters`` times
after each ``networks``/``method`` pair. Each phase (forward, backward, optimiser step) is timed
separately; the table shows medians. Reported overheads, all relative to the median
``networks`` forward + backward:

    end to end     method (forward + backward) - networks, and the same plus the Adam step;
                   a difference of two large, noisy numbers on a shared machine
    glue           glue forward + backward: the direct measure of the method's own cost
    adam           the optimiser step (any training loop pays it; shown for scale)

    python benchmarks/bench_method_overhead.py --patch 64 --widths 32 64 128 256 \\
        --iters 5 --warmup 2 --json-out .bench/bench_method_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

try:
    from mtcmkd.brats import CHANNELS
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mtcmkd.brats import CHANNELS
from mtcmkd.config import config_from_dict
from mtcmkd.methods import MTCMKD, build_method

Phases = dict[str, float]
PHASES = ("forward", "backward", "step")


def blob_batch(patch: int, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Random images and a 3-compartment spherical tumour label in the patch centre."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, len(CHANNELS), patch, patch, patch, generator=gen)
    axis = torch.arange(patch, dtype=torch.float32) - patch / 2
    r = (axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2).sqrt()
    label = torch.zeros(patch, patch, patch, dtype=torch.int64)
    label[r < patch / 4] = 2
    label[r < patch / 6] = 3
    label[r < patch / 10] = 1
    return {"image": image, "label": label.expand(batch, -1, -1, -1).clone()}


@contextmanager
def replayed_networks(method: MTCMKD, batch: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, every network and CDSFL returns its cached outputs (computed once,
    outside the timing) as fresh leaf tensors that require grad, so the method's forward and
    backward do everything except the networks' own work."""
    image = batch["image"]
    with torch.no_grad():
        cached = {
            m: net.forward_features(image[:, CHANNELS.index(m)].unsqueeze(1))
            for m, net in method.teachers.items()
        }
        fused = method.cdsfl([cached[m]["features_half"] for m in method.teachers])
        student = method.student.forward_features(image[:, CHANNELS.index("t1ce")].unsqueeze(1))

    def replay(outputs: dict[str, torch.Tensor]) -> Callable[..., dict[str, torch.Tensor]]:
        return lambda *_: {k: v.detach().requires_grad_() for k, v in outputs.items()}

    patched: list[torch.nn.Module] = [*method.teachers.values(), method.student]
    for m, net in method.teachers.items():
        net.forward_features = replay(cached[m])  # type: ignore[method-assign]
    method.student.forward_features = replay(student)  # type: ignore[method-assign]
    method.cdsfl.forward = lambda *_: fused.detach().requires_grad_()  # type: ignore[method-assign]
    try:
        yield
    finally:
        for net in patched:
            del net.forward_features
        del method.cdsfl.forward


def make_variants(
    method: MTCMKD, optimiser: torch.optim.Optimizer, batch: dict[str, torch.Tensor]
) -> dict[str, Callable[[], Phases]]:
    """Callables that run one iteration of a variant and return seconds per phase."""
    image = batch["image"]
    index = {m: CHANNELS.index(m) for m in CHANNELS}

    def networks() -> Phases:
        optimiser.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        outs = [
            net.forward_features(image[:, index[m] : index[m] + 1])
            for m, net in method.teachers.items()
        ]
        fused = method.cdsfl([o["features_half"] for o in outs])
        s = method.student.forward_features(image[:, index["t1ce"] : index["t1ce"] + 1])
        total = fused.mean()
        for out in [*outs, s]:
            for value in out.values():
                total = total + value.mean()
        t1 = time.perf_counter()
        total.backward()
        t2 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "step": 0.0}

    def full_method() -> Phases:
        optimiser.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = method(batch, 1)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        optimiser.step()
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "step": t3 - t2}

    def glue() -> Phases:
        with replayed_networks(method, batch):
            t0 = time.perf_counter()
            out = method(batch, 1)
            t1 = time.perf_counter()
            out.loss.backward()
            t2 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "step": 0.0}

    return {"networks": networks, "method": full_method, "glue": glue}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, default=64, help="cubic patch edge in voxels")
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per variant")
    parser.add_argument("--glue-iters", type=int, default=3,
                        help="glue-only iterations after each networks/method pair")
    parser.add_argument("--preset", choices=["default", "paper"], default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    cfg = config_from_dict({
        "name": "bench",
        "data": {"patch_size": [args.patch] * 3},
        "model": {"widths": args.widths},
        "method": {"name": "mtcmkd", "preset": args.preset},
        "train": {"batch_size": args.batch},
    })
    method = build_method(cfg, CHANNELS)
    assert isinstance(method, MTCMKD)
    method.train()
    optimiser = torch.optim.Adam(
        [{"params": p} for p in method.param_groups().values()], lr=1e-4
    )
    batch = blob_batch(args.patch, args.batch, args.seed)
    variants = make_variants(method, optimiser, batch)
    times: dict[str, dict[str, list[float]]] = {
        n: {p: [] for p in (*PHASES, "total")} for n in variants
    }

    def record(name: str, timed: bool) -> None:
        result = variants[name]()
        if timed:
            for phase, seconds in result.items():
                times[name][phase].append(seconds)
            times[name]["total"].append(sum(result.values()))

    console = Console()
    for it in range(args.warmup + args.iters):
        timed = it >= args.warmup
        for name in ("networks", "method") if it % 2 == 0 else ("method", "networks"):
            record(name, timed)
        for _ in range(args.glue_iters):
            record("glue", timed)
        console.print(f"iteration {it + 1}/{args.warmup + args.iters}"
                      + ("" if timed else " (warm-up)"), style="dim")

    median = {n: {p: statistics.median(v) for p, v in t.items()} for n, t in times.items()}
    net, meth, glue = median["networks"], median["method"], median["glue"]
    net_fb = net["forward"] + net["backward"]
    overhead = {
        "end_to_end_without_adam": (meth["forward"] + meth["backward"]) / net_fb - 1.0,
        "end_to_end_with_adam": meth["total"] / net_fb - 1.0,
        "glue": (glue["forward"] + glue["backward"]) / net_fb,
        "adam_step": meth["step"] / net_fb,
    }
    table = Table(title=f"MTCM-KD iteration, patch {args.patch}^3, widths {args.widths}, "
                        f"batch {args.batch}, {torch.get_num_threads()} threads "
                        f"(medians, seconds)")
    table.add_column("variant")
    table.add_column("n", justify="right")
    for phase in (*PHASES, "total"):
        table.add_column(phase, justify="right")
    table.add_column("total min-max", justify="right")
    for name, t in times.items():
        table.add_row(name, str(len(t["total"])),
                      *(f"{median[name][p]:.3f}" for p in (*PHASES, "total")),
                      f"{min(t['total']):.3f}-{max(t['total']):.3f}")
    console.print(table)
    console.print(
        f"overhead vs the networks' forward + backward: glue {overhead['glue']:+.2%} "
        f"(target <= 5%); end to end {overhead['end_to_end_without_adam']:+.1%} without and "
        f"{overhead['end_to_end_with_adam']:+.1%} with the Adam step "
        f"(adam alone {overhead['adam_step']:+.1%})"
    )

    result = {
        "benchmark": "method_overhead",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": times,
        "median_s": median,
        "overhead": overhead,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "device": "cpu",
    }
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
