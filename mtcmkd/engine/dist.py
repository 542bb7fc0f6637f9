"""Rank discovery and process-group set-up, the same for every launcher.

One process with no launcher, `torchrun`, `deepspeed` and `srun` all end up here. torchrun and
deepspeed export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under `srun` (one task per
GPU) only the SLURM variables exist, and DeepSpeed's own `--launcher slurm` does not map them,
so we do: RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID, and the
master is the first host of the allocation.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launcher: str  # "none", "torchrun/deepspeed" or "slurm"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A free TCP port on localhost (for single-process and test runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # "node[01-04],gpu7" -> "node01": good enough when scontrol is not on PATH
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def export_launcher_env() -> str:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from what the launcher set; returns its name."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        return "torchrun/deepspeed"
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _first_slurm_host(env.get("SLURM_JOB_NODELIST",
                                                               env.get("SLURM_NODELIST", ""))))
        # A port derived from the job id: the same on every task, rarely in use.
        job, restart = int(env.get("SLURM_JOB_ID", "0")), int(env.get("SLURM_RESTART_COUNT", "0"))
        env.setdefault("MASTER_PORT", str(20000 + (job * 7 + restart) % 20000))
        return "slurm"
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = "0", "1", "0"
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))
    return "none"


def process_rank() -> int:
    """This process's global rank as its launcher set it, readable before the process group
    exists (the run-folder checks, the CLI's output): RANK (torchrun, deepspeed, or filled in
    from SLURM by :func:`export_launcher_env`), else SLURM_PROCID (srun), else 0 (no launcher).
    """
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def local_world_size() -> int:
    """Ranks on this node as torchrun/deepspeed report it (LOCAL_WORLD_SIZE); 1 when unset."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


def rank_banner(backend: str) -> str:
    """One line naming this rank, its host and the rendezvous it joins, e.g.
    ``rank 1 of 2 on node2 (local rank 0): gloo rendezvous at node1:20007 (10.0.0.1)``."""
    env = os.environ
    addr = env.get("MASTER_ADDR", "?")
    try:
        resolved = socket.gethostbyname(addr)
    except OSError:
        resolved = "unresolved"
    return (f"rank {env.get('RANK', '?')} of {env.get('WORLD_SIZE', '?')} on "
            f"{socket.gethostname()} (local rank {env.get('LOCAL_RANK', '?')}): {backend} "
            f"rendezvous at {addr}:{env.get('MASTER_PORT', '?')} ({resolved})")


def setup_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU).

    With more than one rank, every rank prints :func:`rank_banner` before joining, so a job log
    names each rank's host, also when the rendezvous never completes.
    """
    launcher = export_launcher_env()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device, backend = torch.device("cpu"), "gloo"
    if int(os.environ["WORLD_SIZE"]) > 1 and not torch.distributed.is_initialized():
        print(rank_banner(backend), flush=True)
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistInfo(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                    local_rank=local_rank, device=device, backend=backend, launcher=launcher)


def all_reduce(tensor: torch.Tensor,
               op: torch.distributed.ReduceOp.RedOpType = torch.distributed.ReduceOp.SUM
               ) -> torch.Tensor:
    """`torch.distributed.all_reduce` for a tensor on any device; returns the reduced tensor.

    NCCL reduces CUDA tensors only, so a host tensor (the loop's statistics and flags live on
    the CPU) makes a round trip through this rank's GPU; on gloo it is reduced in place. Every
    collective of the training loop goes through here.
    """
    if torch.distributed.get_backend() == "nccl" and tensor.device.type != "cuda":
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.all_reduce(on_gpu, op=op)
        return on_gpu.to(tensor.device)
    torch.distributed.all_reduce(tensor, op=op)
    return tensor
