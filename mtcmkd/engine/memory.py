"""The memory estimate checked before training starts: refuse a patch x batch that cannot fit.

A run that would run out of memory is refused up front, on every rank at once, instead of
failing in its first step (or, on a CPU, pushing the node into swap).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mtcmkd.config import RunConfig
from mtcmkd.engine.dist import DistInfo, all_reduce, local_world_size
from mtcmkd.engine.errors import TrainError
from mtcmkd.models import KDNetUNet, ResidualUNet

#: Bytes of saved activations per (network width x voxel) of each level, measured with
#: autograd's saved-tensor hooks on one training forward (resunet 25-30, kdnet 11-14, in
#: float32 elements), rounded up; backward adds the activation gradients of one level at a time.
ACTIVATION_FACTOR: dict[str, float] = {"resunet": 32.0, "kdnet": 16.0}
#: Optimiser-side bytes per parameter: weights, gradients and Adam's two moments (float32).
BYTES_PER_PARAMETER = 16
#: Head room for the backward pass's activation gradients and allocator slack.
BACKWARD_OVERHEAD = 1.25


def estimate_training_memory(widths: tuple[int, ...], kind: str, n_networks: int,
                             n_parameters: int, patch_size: tuple[int, int, int],
                             batch_size: int, bytes_per_activation: int) -> int:
    """Bytes one rank needs beyond the loaded process: activations of every network of the
    method at `patch_size` x `batch_size`, plus optimiser state.

    An activation unit is one channel of one voxel at a level: a network of widths w_0..w_L
    on a patch of V voxels has sum_l w_l V / 8^l of them; a training forward saves about
    :data:`ACTIVATION_FACTOR` [kind] tensors' worth of them per unit.
    """
    voxels = float(np.prod(patch_size))
    units = sum(w * voxels / 8**level for level, w in enumerate(widths))
    activations = (units * ACTIVATION_FACTOR[kind] * bytes_per_activation * batch_size
                   * n_networks * BACKWARD_OVERHEAD)
    return int(activations + n_parameters * BYTES_PER_PARAMETER)


def available_memory(device: torch.device) -> int | None:
    """Free bytes for this process: the GPU's free memory, else MemAvailable of
    /proc/meminfo capped by a cgroup limit; None where neither can be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:  # a container's limit is lower than the host's MemAvailable
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def check_memory(cfg: RunConfig, method: nn.Module, precision: str, dist: DistInfo) -> None:
    """Refuse, on every rank, a patch x batch whose estimate exceeds the memory available.

    A collective: every rank calls it, and all refuse when one would not fit.

    Raises:
        TrainError: the estimate exceeds the memory of this or another rank.
    """
    networks = [m for m in method.modules() if isinstance(m, (ResidualUNet, KDNetUNet))]
    widths = cfg.model.effective_widths
    need = estimate_training_memory(
        widths, cfg.model.kind, max(len(networks), 1),
        sum(p.numel() for p in method.parameters()), tuple(cfg.data.patch_size),
        cfg.train.batch_size, 2 if precision == "bf16" else 4)
    have = available_memory(dist.device)
    # Ranks of one node share its CPU memory.
    share = have if have is None or dist.device.type == "cuda" else have // local_world_size()
    short = torch.tensor([1.0 if share is not None and need > share else 0.0])
    if all_reduce(short, op=torch.distributed.ReduceOp.MAX).item() > 0:
        patch = "x".join(map(str, cfg.data.patch_size))
        where = "on another rank" if share is None or need <= share else (
            f"{share / 2**30:.1f} GiB available on {dist.device.type}")
        raise TrainError(f"data.patch_size={patch} x train.batch_size={cfg.train.batch_size}: "
                         f"estimated {need / 2**30:.1f} GiB to train {len(networks)} "
                         f"network(s), {where}; use a smaller patch or batch (or "
                         "--no-memory-check to try anyway)")
