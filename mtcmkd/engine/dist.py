"""Rank discovery and process-group set-up, the same for every launcher.

One process with no launcher, `torchrun`, `deepspeed` and `srun` all end up here. torchrun and
deepspeed export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under `srun` (one task per
GPU) only the SLURM variables exist, and DeepSpeed's own `--launcher slurm` does not map them,
so we do: RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID, and the
master is the first host of the allocation.

A rank lost mid-run (its process killed, its node gone) ends every other rank's next collective:
at once when its connections close, after `train.collective_timeout_s` when they go silent.
`lost_ranks_named` turns that failure into one line naming the lost rank and its host.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from mtcmkd.config import COLLECTIVE_TIMEOUT_S
from mtcmkd.engine.errors import TrainError

#: Seconds a rank whose collective failed waits for the other ranks to answer a roll call
#: (at most the collective timeout): the survivors of one failed collective arrive within a
#: step's imbalance of each other, and srun kills them all KillWait (30 s) after the first exits.
ROLL_CALL_S = 10.0


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launcher: str  # "none", "torchrun/deepspeed" or "slurm"
    hosts: tuple[str, ...] = ()  # every rank's host name, by rank (gathered at set-up)

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


def setup_distributed(timeout_s: float = COLLECTIVE_TIMEOUT_S) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU).

    With more than one rank, every rank prints :func:`rank_banner` before joining, so a job log
    names each rank's host, also when the rendezvous never completes.

    Args:
        timeout_s: how long a rank waits for the others in the rendezvous and in every
            collective (`train.collective_timeout_s`); then the collective raises (gloo) or
            NCCL's watchdog ends the process.
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
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=timeout_s))
    hosts: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(hosts, socket.gethostname())
    return DistInfo(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                    local_rank=local_rank, device=device, backend=backend, launcher=launcher,
                    hosts=tuple(str(h) for h in hosts))


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


# --- a rank lost in the middle of a run ----------------------------------------------------


class LostRankError(TrainError):
    """A collective failed because another rank is gone (its process ended, its node died or
    left the network); the message names the lost rank(s) and host(s)."""


def is_collective_failure(exc: BaseException) -> bool:
    """True for the errors of a collective whose peers are gone: torch.distributed's own
    (`DistError`: NCCL, the store) and gloo's transport errors (a peer closed its connection,
    a wait timed out), which reach Python as a RuntimeError naming a gloo source file."""
    first = str(exc).split("\n", 1)[0]
    return isinstance(exc, torch.distributed.DistError) or "/gloo/" in first


def roll_call(dist: DistInfo, wait_s: float) -> list[int] | None:
    """The ranks that do not answer within `wait_s` seconds, asked through the rendezvous store
    (a TCP server in rank 0's process), which a broken collective does not use: every rank whose
    collective failed posts `mtcmkd/alive/<rank>` there and waits for the others.

    Returns:
        The ranks that did not answer (sorted; [] when all did), or None when the store itself
        did not answer: rank 0, its host, is gone.
    """
    from torch.distributed import distributed_c10d

    keys = [f"mtcmkd/alive/{r}" for r in range(dist.world_size)]
    try:
        store = distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=wait_s))
        store.set(keys[dist.rank], socket.gethostname())
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except (RuntimeError, ValueError):  # DistStoreError (a RuntimeError): no store, no answer
        return None


def _host(dist: DistInfo, rank: int) -> str:
    return dist.hosts[rank] if rank < len(dist.hosts) else "unknown host"


def lost_rank_message(dist: DistInfo, exc: BaseException, timeout_s: float,
                      missing: list[int] | None, wait_s: float) -> str:
    """One line: this rank, the lost rank(s) and their hosts, how it was noticed (the
    backend's first line: a closed connection names the peer's address; a timeout only its
    length)."""
    cause = str(exc).split("\n", 1)[0]
    if cause.startswith("[") and "] " in cause:  # gloo's "[/path/to/pair.cc:553] ..."
        cause = cause.split("] ", 1)[1]
    cause = cause.split(". ", 1)[0]
    if missing is None:
        lost = (f"lost rank 0 ({_host(dist, 0)}), the host of the rendezvous store, which did "
                f"not answer within {wait_s:g} s")
    elif missing:
        names = ", ".join(f"rank {r} ({_host(dist, r)})" for r in missing)
        lost = f"lost {names}: no answer to a roll call within {wait_s:g} s"
    else:
        lost = "every rank answered a roll call: the network between the nodes failed"
    return (f"rank {dist.rank} on {_host(dist, dist.rank)}: a collective failed ({dist.backend}: "
            f"{cause}; train.collective_timeout_s={timeout_s:g}); {lost}")


@contextmanager
def lost_ranks_named(dist: DistInfo, timeout_s: float,
                     context: Callable[[], str] = lambda: "") -> Iterator[None]:
    """Turn a collective that failed because a rank is gone into a `LostRankError` naming it
    (:func:`roll_call`, :func:`lost_rank_message`), with `context()` (e.g. the step and the
    checkpoint to resume from) appended. Other errors, and every error of a one-rank run, pass
    through unchanged.

    Under NCCL a collective that times out never returns to Python: the watchdog ends the
    process after `timeout_s` with its own message (the collective, not the peer).
    """
    try:
        yield
    except RuntimeError as exc:
        if dist.world_size == 1 or not is_collective_failure(exc):
            raise
        wait_s = min(ROLL_CALL_S, timeout_s)
        message = lost_rank_message(dist, exc, timeout_s, roll_call(dist, wait_s), wait_s)
        raise LostRankError(f"{message}{context()}") from exc
