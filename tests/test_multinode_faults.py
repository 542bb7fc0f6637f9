"""Faults across nodes (select with `pytest -m multinode`): the time-limit warning, a lost rank,
a node that dies, a node that dies while a checkpoint is written.

The jobs run on the two-node SLURM cluster of `slurm_cluster.TwoNodeCluster` (one rank per
node, DeepSpeed over gloo on CPU), each rank under a probe interpreter (`_PROBE`, as in
tests/test_multinode.py) that

- appends `attempt step digest` to `RUN/steps-rank<R>.txt` after every optimiser step (a
  SHA-256 of the method's parameters; the attempt is `<job id>.<SLURM_RESTART_COUNT>`), so every
  attempt of a job, the failed ones included, is compared step by step with an uninterrupted
  two-node run (`reference`);
- holds every rank after optimiser step PROBE_HOLD_STEP (writes `held-rank<R>`, waits for the
  file `release`; writes `warned-rank<R>` once a preemption signal reached the rank): the test
  acts on a job at a known step, not at a moment;
- holds rank PROBE_SAVE_HOLD_RANK in the middle of checkpoint PROBE_SAVE_HOLD_STEP, after
  DeepSpeed's part and before its own `rank_state_<R>.pt` (writes `saving-rank<R>`, then waits
  until killed), while the other ranks finish theirs (`saved-rank<R>-<tag>` after DeepSpeed's
  part): a node dies while the checkpoint is being written;
- writes its host and whether it stopped for a preemption (`rank<R>-<attempt>.json`), and its
  final weights (`rank<R>.pt`), at the end of an attempt.

The faults come as SLURM and failing machines deliver them: SIGUSR1 through `scancel --signal`
to the job's steps (what `#SBATCH --signal=USR1@300` sends), to the steps and the batch shell
(`--full`), to the batch shell alone (`--batch`, as `--signal=B:USR1@300`); SIGKILL of the rank
on node 2 (its kernel closes the connections: noticed at once); node 2 going dark (its link
down first, then every process on it killed: no FIN reaches node 1, only a timeout can tell the
survivor), at a step and in the middle of a checkpoint.

Killing node 2's slurmd and slurmstepd with its link up, then restarting slurmd, was tried too:
the survivor failed at once with the lost rank named, but srun then waited for the orphaned step
of node 2 and the job stayed RUNNING (more than 10 minutes, until cancelled): SLURM's business,
not the training's, so the tests take the node's link down, as a dead machine's would be.

What happened before this file's fixes (same scenarios, 2026-11-30):
- SIGUSR1 to the steps: checkpoint, exit 3, requeue and resume worked, but the resumed run's
  weights differed from the uninterrupted run's from the first step of the next epoch: rank 1
  resumed rank 0's epoch statistics (DeepSpeed keeps rank 0's client state alone at ZeRO 0), so
  the epoch's reduced statistics, and MTCM-KD's teacher weights from them, changed;
- SIGUSR1 with `--full`: bash's default action ended the batch shell, so the job FAILED with
  the checkpoint written and was never requeued;
- SIGKILL of rank 1: the job failed within seconds (srun's --kill-on-bad-exit), the survivor
  with a 60-line gloo traceback naming an address, not a rank or host;
- node 2 dark: the survivor hung in its all-reduce until slurmctld declared node 2 down
  (SlurmdTimeout 300 s; 6.6 minutes here) and cancelled the job; DeepSpeed's own 10-minute
  timeout would have ended it with a message naming no rank.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import write_raw
from slurm_cluster import SlurmUnavailable, TwoNodeCluster, netns_pids

from mtcmkd.preprocessing import preprocess

REPO = Path(__file__).resolve().parents[1]
CPU_TASK = ["--cpus-per-task=1", "--gpus-per-node=0", "--time=30"]
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", *CPU_TASK]
#: Optimiser steps of every job here: 2 epochs of 4, a checkpoint every 2 steps.
STEPS = 8
#: train.collective_timeout_s of the jobs whose node goes dark (the default is 600 s).
SHORT_TIMEOUT_S = 60
#: How long a test waits for a job to reach a point (this 2-core machine may be busy).
WAIT_S = 1800

_PROBE = """
import hashlib, json, os, runpy, socket, sys, time
from pathlib import Path
if sys.argv[1:3] != ["-m", "mtcmkd"]:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
import torch
from mtcmkd.engine import trainer

env = os.environ
attempt = f"{env.get('SLURM_JOB_ID', '0')}.{env.get('SLURM_RESTART_COUNT', '0')}"
hold_step = int(env.get("PROBE_HOLD_STEP", "0"))
save_hold = (int(env.get("PROBE_SAVE_HOLD_RANK", "-1")), int(env.get("PROBE_SAVE_HOLD_STEP", "0")))
_step, _finish = trainer.train_step, trainer._finish

def digest(method):
    h = hashlib.sha256()
    for name, p in method.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

def wait_for(path, limit=3600):
    deadline = time.monotonic() + limit
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)

def train_step(run, batch, meter):
    stepped = _step(run, batch, meter)
    if stepped:
        rank, step = run.dist.rank, run.state.step
        with open(run.out / f"steps-rank{rank}.txt", "a") as f:
            f.write(f"{attempt} {step} {digest(run.method)}\\n")
        if step == hold_step and not (run.out / "release").exists():
            (run.out / f"held-rank{rank}").write_text(str(os.getpid()))
            warned = run.out / f"warned-rank{rank}"
            while not (run.out / "release").exists():
                if run.checkpointer.preemption.requested and not warned.exists():
                    warned.write_text("")  # this rank's SIGUSR1/SIGTERM handler ran
                time.sleep(0.1)
    return stepped

def finish(run, summary):
    rank = run.dist.rank
    torch.save({k: v.detach().cpu().clone() for k, v in run.method.state_dict().items()},
               run.out / f"rank{rank}.pt")
    (run.out / f"rank{rank}-{attempt}.json").write_text(json.dumps({
        "rank": rank, "host": socket.gethostname(), "preempted": summary["preempted"],
        "step": run.state.step}))
    return _finish(run, summary)

trainer.train_step, trainer._finish = train_step, finish

if save_hold[0] >= 0:
    from deepspeed.runtime.engine import DeepSpeedEngine
    _save = DeepSpeedEngine.save_checkpoint

    def save_checkpoint(self, save_dir, tag=None, *args, **kw):
        # DeepSpeed's save has collectives of its own: hold after it, where this rank still has
        # its own part (rank_state_<rank>.pt) to write and the others wait for it.
        rank, out = int(env["RANK"]), Path(save_dir).parent
        result = _save(self, save_dir, tag, *args, **kw)
        (out / f"saved-rank{rank}-{tag}").write_text("")
        if rank == save_hold[0] and tag == f"step_{save_hold[1]:08d}":
            (out / f"saving-rank{rank}").write_text(str(os.getpid()))
            wait_for(out / "never")
        return result

    DeepSpeedEngine.save_checkpoint = save_checkpoint

sys.argv = ["mtcmkd", *sys.argv[3:]]
runpy.run_module("mtcmkd", run_name="__main__", alter_sys=True)
"""


# --- cluster, data, jobs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        c = TwoNodeCluster(tmp_path_factory.mktemp("two_nodes_faults")).start()
    except SlurmUnavailable as exc:
        pytest.skip(f"no two-node SLURM here: {exc}")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("faults_data")
    write_raw(tmp / "raw", "2021", n=4, shape=(24, 28, 20))
    assert not preprocess(tmp / "raw", tmp / "store", n_folds=2).failed
    return tmp / "store"


def _config(tmp: Path, **train) -> Path:
    """tiny.yaml, 16^3 patches, 2 epochs of 4 steps, a checkpoint every 2 steps."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["data"]["patch_size"] = [16, 16, 16]
    cfg["train"].update({"epochs": 2, "iters_per_epoch": STEPS // 2, "ckpt_every": 2,
                         "val_cases": 1, "seed": 7, **train})
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Job:
    """One `sbatch slurm/train.sh` of the probe into `out` (resubmitted into the same folder)."""

    def __init__(self, cluster: TwoNodeCluster, tmp: Path, store: Path, config: Path,
                 name: str) -> None:
        self.cluster, self.tmp, self.store, self.config, self.name = (cluster, tmp, store,
                                                                      config, name)
        self.out = tmp / name
        self.ids: list[str] = []

    def submit(self, **probe: int) -> str:
        """Submit (again); PROBE_* settings from `probe`. Returns the job id."""
        script, python = self.tmp / "rank_probe.py", self.tmp / "python"
        script.write_text(_PROBE)
        python.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
        python.chmod(0o755)
        env_vars = {"CONFIG": str(self.config), "STORE": str(self.store), "OUT": str(self.out),
                    "MTCMKD_PYTHON": str(python), "OMP_NUM_THREADS": "1",
                    "PYTHONWARNINGS": "ignore",
                    **{f"PROBE_{k.upper()}": str(v) for k, v in probe.items()}}
        export = "ALL," + ",".join(f"{k}={v}" for k, v in env_vars.items())
        job = self.cluster.sbatch([*TWO_NODES, f"--job-name={self.name}",
                                   f"--output={self.tmp}/%x-%j.log", f"--export={export}",
                                   str(REPO / "slurm" / "train.sh")], cwd=REPO)
        self.ids.append(job)
        return job

    @property
    def job(self) -> str:
        return self.ids[-1]

    def log(self, job: str | None = None) -> str:
        p = self.tmp / f"{self.name}-{job or self.job}.log"
        return p.read_text() if p.exists() else "(no job log)"

    def wait_for(self, *names: str, timeout: float = WAIT_S) -> None:
        """Until every file `names` exists in the run folder (the job still alive)."""
        deadline = time.time() + timeout
        while not all((self.out / n).exists() for n in names):
            state = self.cluster.job_state(self.job)  # UNKNOWN: scontrol timed out, retry
            if time.time() > deadline or state not in ("PENDING", "RUNNING", "CONFIGURING",
                                                        "UNKNOWN"):
                pytest.fail(f"waiting for {names}: job {state}\n{self.log()[-4000:]}")
            time.sleep(0.2)

    def finish(self, timeout: float = WAIT_S) -> str:
        state = self.cluster.wait(self.job, timeout=timeout)
        assert state == "COMPLETED", f"{state}\n{self.log()[-4000:]}"
        return state

    def steps(self, rank: int) -> list[tuple[str, int, str]]:
        """(attempt, step, digest) of every optimiser step rank `rank` took, all attempts."""
        path = self.out / f"steps-rank{rank}.txt"
        if not path.exists():
            return []
        return [(a, int(s), d) for a, s, d in
                (line.split() for line in path.read_text().splitlines())]

    def attempt(self, rank: int, attempt: str) -> dict:
        return json.loads((self.out / f"rank{rank}-{attempt}.json").read_text())


def rank_pid(cluster: TwoNodeCluster, node: int) -> int:
    """The training rank running on node `node` (the probe interpreter's process)."""
    for pid in netns_pids(cluster.nodes[node].netns):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 3 and argv[1].endswith(b"rank_probe.py") and argv[2:4] == [b"-m",
                                                                                b"mtcmkd"]:
            return pid
    raise AssertionError(f"no rank on node {cluster.nodes[node].name}")


def wait_until_gone(pid: int, timeout: float) -> float | None:
    """Seconds until process `pid` ends, or None when it is still there after `timeout`."""
    from slurm_cluster import process_identity

    t0 = time.monotonic()
    while process_identity(pid) is not None:
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(0.2)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def reference(cluster, store, tmp_path_factory):
    """The uninterrupted two-node run every fault is compared with: {step: digest} (both ranks
    agree at every step) and the folder (final rank0.pt, student.pt)."""
    tmp = tmp_path_factory.mktemp("reference")
    job = Job(cluster, tmp, store, _config(tmp), "reference")
    job.submit()
    job.finish()
    r0, r1 = job.steps(0), job.steps(1)
    assert [s for _, s, _ in r0] == list(range(1, STEPS + 1)) and r0 == r1, job.log()[-3000:]
    return {"digests": {s: d for _, s, d in r0}, "out": job.out}


def assert_same_run(job: Job, reference: dict) -> None:
    """Every optimiser step of every attempt, on both ranks, has the reference's weights; the
    last attempt ended at the last step with the reference's final weights and student."""
    from test_multinode import _assert_same_state, _bit_equal

    from mtcmkd.integrity import safe_torch_load

    for rank in (0, 1):
        steps = job.steps(rank)
        wrong = [(a, s) for a, s, d in steps if reference["digests"].get(s) != d]
        assert steps and wrong == [], f"rank {rank}: {wrong}\n{job.log()[-3000:]}"
        assert steps[-1][1] == STEPS
    _assert_same_state(job.out / "rank0.pt", reference["out"] / "rank0.pt")
    a = safe_torch_load(job.out / "student.pt")["state_dict"]
    b = safe_torch_load(reference["out"] / "student.pt")["state_dict"]
    assert a.keys() == b.keys() and [k for k in a if not _bit_equal(a[k], b[k])] == []


def error_line(log: str) -> str:
    """The job log's `error: rank ...` line of the lost-rank message ('' when none)."""
    return next((line for line in log.splitlines() if line.startswith("error: rank ")), "")


# --- the faults ------------------------------------------------------------------------------


#: How the warning is sent: to the job's steps (what `#SBATCH --signal=USR1@300` does), to the
#: steps and the batch shell (`scancel --full`), to the batch shell alone (`--signal=B:USR1@300`,
#: which train.sh passes on to srun).
WARNINGS = {"steps": [], "full": ["--full"], "batch": ["--batch"]}


@pytest.mark.multinode
@pytest.mark.integration
@pytest.mark.parametrize("to", list(WARNINGS))
def test_time_limit_warning_reaches_both_nodes_and_the_requeued_job_resumes_on_both(
        cluster, store, reference, tmp_path, to):
    """SIGUSR1 (the time-limit warning) at step 3: both ranks checkpoint step 3 and stop with
    exit code 3, train.sh requeues the job, the next attempt resumes on both nodes and ends with
    the uninterrupted run's weights, bit for bit."""
    job = Job(cluster, tmp_path, store, _config(tmp_path), "usr1")
    job.submit(hold_step=3)
    job.wait_for("held-rank0", "held-rank1")
    r = cluster.client(["scancel", "--signal=USR1", *WARNINGS[to], job.job])
    assert r.returncode == 0, r.stderr
    job.wait_for("warned-rank0", "warned-rank1")  # the warning reached both nodes' ranks
    (job.out / "release").write_text("")
    job.finish()
    log = job.log()
    assert cluster.restart_count(job.job) == 1, log[-4000:]
    first, second = f"{job.job}.0", f"{job.job}.1"
    a, b = cluster.nodes
    for rank, node in enumerate((a, b)):  # both ranks stopped at step 3 for the warning ...
        assert job.attempt(rank, first) == {"rank": rank, "host": node.name, "preempted": True,
                                            "step": 3}
        # ... and the requeued attempt ran on both nodes again, from step 4
        assert job.attempt(rank, second) == {"rank": rank, "host": node.name,
                                             "preempted": False, "step": STEPS}
        assert [s for att, s, _ in job.steps(rank) if att == second][0] == 4
    # srun --kill-on-bad-exit ends the other task once the first exits 3, so only the first
    # one's exit code is certain to be 3 (either node's; the other may read "Terminated"); that
    # both ranks stopped for the warning at step 3 is what job.attempt() above checked
    assert re.search(r"mtcmkdnode[12]: task [01]: Exited with exit code 3", log), log[-4000:]
    assert "requeueing job" in log and "resumed from step_00000003" in log, log[-4000:]
    records = [json.loads(line) for line in (job.out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "preempted"] == [3]
    assert_same_run(job, reference)


@pytest.mark.multinode
@pytest.mark.integration
def test_a_killed_rank_on_the_second_node_fails_the_job_naming_it_and_resume_finishes(
        cluster, store, reference, tmp_path):
    """kill -9 of the rank on node 2 at step 3: the survivor fails at its next collective with
    one line naming rank 1 and its host (not a traceback), the job fails, and the job
    submitted again resumes from the last complete checkpoint (step 2) to the reference's
    weights."""
    job = Job(cluster, tmp_path, store, _config(tmp_path), "kill")
    job.submit(hold_step=3)
    job.wait_for("held-rank0", "held-rank1")
    survivor = rank_pid(cluster, 0)
    os.kill(rank_pid(cluster, 1), signal.SIGKILL)
    (job.out / "release").write_text("")
    # srun's --kill-on-bad-exit SIGKILLs the survivor KillWait (30 s) after rank 1 died: the
    # message comes before that, a roll call (ROLL_CALL_S) after the closed connection.
    assert wait_until_gone(survivor, 300) is not None
    assert cluster.wait(job.job, timeout=300) == "FAILED", job.log()[-4000:]
    line = error_line(job.log())
    b = cluster.nodes[1]
    assert line.startswith("error: rank 0 on mtcmkdnode1: a collective failed (gloo: "), \
        job.log()[-4000:]
    assert re.search(rf"\[{re.escape(b.addr)}\]:\d+:? Connection (closed|reset) by peer", line) \
        or re.search(rf"Connection (closed|reset) by peer \[{re.escape(b.addr)}\]", line), line
    assert ("lost rank 1 (mtcmkdnode2): no answer to a roll call within 10 s at step 3; the "
            "last complete checkpoint is step_00000002: submit again with --resume") in line
    assert "Traceback" not in job.log()
    first = job.job
    job.submit()  # train.sh passes --resume: checkpoints/latest exists
    job.finish()
    assert "resumed from step_00000002: epoch 0, step 2" in job.log(), job.log()[-4000:]
    for rank in (0, 1):
        assert [s for att, s, _ in job.steps(rank) if att == f"{first}.0"] == [1, 2, 3]
        assert [s for att, s, _ in job.steps(rank) if att == f"{job.job}.0"] == [3, 4, 5, 6,
                                                                                 7, 8]
    assert_same_run(job, reference)


@pytest.mark.multinode
@pytest.mark.integration
def test_a_checkpoint_being_written_when_the_node_dies_never_counts_as_complete(
        cluster, store, reference, tmp_path):
    """Node 2 dies (dark) while its rank writes checkpoint step 4, after rank 0 wrote its parts
    (DeepSpeed's files, a whole checkpoint at ZeRO 0, and its own rank state): rank 0 never
    writes COMPLETE, `latest` stays at step 2, and the job submitted again resumes from step 2,
    rewrites step 4 and ends with the reference's weights."""
    from mtcmkd.engine.checkpoint import COMPLETE, latest_tag

    job = Job(cluster, tmp_path, store,
              _config(tmp_path, collective_timeout_s=SHORT_TIMEOUT_S), "save")
    job.submit(save_hold_rank=1, save_hold_step=4)
    job.wait_for("saving-rank1", "saved-rank0-step_00000004")
    survivor = rank_pid(cluster, 0)
    partial = job.out / "checkpoints" / "step_00000004"
    deadline = time.time() + WAIT_S  # rank 0 writes its own part, then waits in the barrier
    while not (partial / "rank_state_00000.pt").is_file() and time.time() < deadline:
        time.sleep(0.2)
    cluster.node_dies(1)
    try:
        assert wait_until_gone(survivor, SHORT_TIMEOUT_S + 300) is not None
        ckpts = job.out / "checkpoints"
        # rank 0's parts are there (DeepSpeed's files: a whole checkpoint at ZeRO 0) ...
        assert (partial / "mp_rank_00_model_states.pt").is_file()
        assert (partial / "rank_state_00000.pt").is_file()
        assert not (partial / "rank_state_00001.pt").exists()
        assert not (partial / COMPLETE).exists()  # ... but the step never counts
        assert latest_tag(ckpts) == "step_00000002"
        assert (ckpts / "latest").read_text().strip() == "step_00000002"
        line = error_line(job.log())
        assert line.startswith("error: rank 0 on mtcmkdnode1: a collective failed"), \
            job.log()[-4000:]
        assert ("lost rank 1 (mtcmkdnode2): no answer to a roll call within 10 s at step 4; "
                "the last complete checkpoint is step_00000002") in line
    finally:
        cluster.revive_node(1)
    assert cluster.wait(job.job, timeout=600) == "FAILED", job.log()[-4000:]
    job.submit()
    job.finish()
    log = job.log()
    assert "resumed from step_00000002: epoch 0, step 2" in log, log[-4000:]
    assert "checkpoint step_00000004" in log  # written again, completely this time
    # no partial step folder is left (keep_last 2: steps 6 and 8)
    steps = sorted(p for p in (job.out / "checkpoints").iterdir() if p.is_dir())
    assert [p.name for p in steps] == ["step_00000006", "step_00000008"]
    assert all((p / COMPLETE).is_file() for p in steps)
    assert_same_run(job, reference)


@pytest.mark.multinode
@pytest.mark.integration
def test_a_node_gone_dark_fails_the_survivor_within_the_collective_timeout(
        cluster, store, reference, tmp_path):
    """Node 2 goes dark at step 3 (link down, then all its processes killed: nothing reaches
    node 1 any more). The survivor waits train.collective_timeout_s (60 s here) in its
    all-reduce, not forever, then fails naming rank 1 and its host; once node 2 is back, the
    job submitted again resumes from step 2 to the reference's weights."""
    from mtcmkd.engine.dist import ROLL_CALL_S

    job = Job(cluster, tmp_path, store,
              _config(tmp_path, collective_timeout_s=SHORT_TIMEOUT_S), "dark")
    job.submit(hold_step=3)
    job.wait_for("held-rank0", "held-rank1")
    survivor = rank_pid(cluster, 0)
    cluster.node_dies(1, link_down=True)
    try:
        (job.out / "release").write_text("")
        waited = wait_until_gone(survivor, SHORT_TIMEOUT_S + ROLL_CALL_S + 300)
        assert waited is not None, f"the survivor still waits\n{job.log()[-3000:]}"
        assert waited >= SHORT_TIMEOUT_S  # it waited the timeout: nothing else told it
        line = error_line(job.log())
        assert line.startswith("error: rank 0 on mtcmkdnode1: a collective failed (gloo: "
                               f"Timed out waiting {SHORT_TIMEOUT_S * 1000}ms"), \
            job.log()[-4000:]
        assert (f"train.collective_timeout_s={SHORT_TIMEOUT_S}); lost rank 1 (mtcmkdnode2): "
                "no answer to a roll call within 10 s at step 3; the last complete checkpoint "
                "is step_00000002") in line
    finally:
        cluster.revive_node(1)
    assert cluster.wait(job.job, timeout=900) == "FAILED", job.log()[-4000:]
    job.submit()
    job.finish()
    assert "resumed from step_00000002: epoch 0, step 2" in job.log(), job.log()[-4000:]
    assert_same_run(job, reference)


# --- exact resume on two ranks, without a cluster ----------------------------------------

_STOP_AND_DIGEST = """
import hashlib, os, runpy, sys
from mtcmkd.engine import trainer
_step = trainer.train_step
stop_at = int(os.environ.get("STOP_AT", "0"))

def train_step(run, batch, meter):
    stepped = _step(run, batch, meter)
    if stepped:
        h = hashlib.sha256()
        for p in run.method.parameters():
            h.update(p.detach().contiguous().numpy().tobytes())
        print("DIGEST", run.state.step, h.hexdigest(), flush=True)
        if run.state.step == stop_at and run.dist.rank == 1:  # the warning reaches rank 1 only
            run.checkpointer.preemption.requested = True
    return stepped

trainer.train_step = train_step
sys.argv = ["mtcmkd", *sys.argv[1:]]
runpy.run_module("mtcmkd", run_name="__main__", alter_sys=True)
"""


def _two_ranks(tmp: Path, args: list[str], stop_at: int = 0) -> list[list[str]]:
    """`mtcmkd train ARGS` as ranks 0 and 1 of this machine (gloo); each rank's DIGEST lines."""
    import subprocess

    from mtcmkd.engine.dist import free_port

    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "STOP_AT": str(stop_at)}
    procs = [subprocess.Popen([sys.executable, "-c", _STOP_AND_DIGEST, "train", *args],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=WAIT_S)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode in (0, 3), out[-3000:]
    return [[line for line in out.splitlines() if line.startswith("DIGEST")] for out in outs]


@pytest.mark.integration
def test_a_mid_epoch_resume_on_two_ranks_ends_as_an_uninterrupted_run(store, tmp_path):
    """Each rank resumes its own epoch statistics and RNG (`rank_state_<rank>.pt`). DeepSpeed
    keeps rank 0's client state alone at ZeRO 0: before, rank 1 resumed rank 0's statistics,
    the epoch's reduced statistics (MTCM-KD's teacher weights) changed, and every step of the
    next epoch differed from the uninterrupted run's."""
    config = _config(tmp_path, epochs=2, iters_per_epoch=2, ckpt_every=100)
    common = ["--config", str(config), "--store", str(store)]
    reference = _two_ranks(tmp_path, [*common, "--out", str(tmp_path / "ref")])
    assert len(reference[0]) == 4 and reference[0] == reference[1]
    first = _two_ranks(tmp_path, [*common, "--out", str(tmp_path / "run")], stop_at=1)
    second = _two_ranks(tmp_path, [*common, "--out", str(tmp_path / "run"), "--resume"])
    for rank in (0, 1):
        assert first[rank] + second[rank] == reference[rank]
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert sorted(p.name for p in step.glob("rank_state_*.pt")) == ["rank_state_00000.pt",
                                                                    "rank_state_00001.pt"]
    # the epoch-0 statistics each rank saved are its own
    from mtcmkd.integrity import safe_torch_load

    a, b = (safe_torch_load(step / f"rank_state_0000{r}.pt")["epoch_stats"] for r in (0, 1))
    assert a.keys() == b.keys() and any(not a[k].equal(b[k]) for k in a)


# --- the lost-rank message, on two gloo processes of this machine (no cluster) -------------

_LOSE_A_RANK = '''
import os, signal, socket, sys, torch
from datetime import timedelta
import torch.distributed as td
from mtcmkd.engine.dist import DistInfo, LostRankError, lost_ranks_named
mode, rank, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
td.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=3))
dist = DistInfo(rank=rank, world_size=2, local_rank=0, device=torch.device("cpu"),
                backend="gloo", launcher="test", hosts=("hosta", "hostb"))
td.all_reduce(torch.ones(4))
if rank == 1:
    os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
try:
    with lost_ranks_named(dist, 3.0, lambda: " at step 7"):
        td.all_reduce(torch.ones(4))
except LostRankError as exc:
    print(exc)
'''


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["kill", "stop"])
def test_a_lost_rank_is_named_with_its_host(tmp_path, mode):
    """Rank 1 is killed (its connections close: noticed at once) or stopped (silent: noticed
    after the 3 s collective timeout); rank 0's collective fails with one line naming rank 1
    and its host, within the timeout plus the roll call."""
    import subprocess

    from mtcmkd.engine.dist import free_port

    port = str(free_port())
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ranks = [subprocess.Popen([sys.executable, "-c", _LOSE_A_RANK, mode, str(r), port],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in (0, 1)]
    try:
        out, err = ranks[0].communicate(timeout=120)
    finally:
        ranks[1].kill()
        ranks[1].wait()
    line = out.strip()
    assert line.startswith("rank 0 on hosta: a collective failed (gloo: "), out + err
    assert "lost rank 1 (hostb): no answer to a roll call within 3 s" in line, line
    assert line.endswith(" at step 7"), line
    if mode == "kill":  # the peer's kernel closed the connection: FIN or RST, as it comes
        assert re.search(r"Connection (closed|reset) by peer", line), line
    else:
        assert "Timed out waiting 3000ms" in line, line
    assert "train.collective_timeout_s=3" in line


def test_lost_rank_message_when_the_store_is_gone_and_other_errors_pass():
    import torch

    from mtcmkd.engine.dist import DistInfo, is_collective_failure, lost_rank_message

    dist = DistInfo(rank=1, world_size=2, local_rank=0, device=torch.device("cpu"),
                    backend="gloo", launcher="slurm", hosts=("node1", "node2"))
    exc = RuntimeError("[/x/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                       "waiting 20000ms for recv operation to complete")
    assert is_collective_failure(exc)
    assert not is_collective_failure(RuntimeError("shape mismatch"))
    assert lost_rank_message(dist, exc, 20, None, 10) == (
        "rank 1 on node2: a collective failed (gloo: Timed out waiting 20000ms for recv "
        "operation to complete; train.collective_timeout_s=20); lost rank 0 (node1), the host "
        "of the rendezvous store, which did not answer within 10 s")
    assert lost_rank_message(dist, exc, 20, [], 10).endswith(
        "every rank answered a roll call: the network between the nodes failed")


def test_collective_timeout_is_written_only_when_not_the_default():
    from mtcmkd.config import COLLECTIVE_TIMEOUT_S, config_from_dict, config_hash, to_dict

    plain = config_from_dict({"method": {"name": "baseline"}})
    same = config_from_dict({"method": {"name": "baseline"},
                             "train": {"collective_timeout_s": COLLECTIVE_TIMEOUT_S}})
    short = config_from_dict({"method": {"name": "baseline"},
                              "train": {"collective_timeout_s": 20}})
    assert "collective_timeout_s" not in to_dict(plain)["train"]
    assert config_hash(same) == config_hash(plain) == "42958c335999174b"  # test_config's pin
    assert to_dict(short)["train"]["collective_timeout_s"] == 20.0
    assert config_from_dict(to_dict(short)) == short
    from mtcmkd.config import ConfigError

    with pytest.raises(ConfigError, match="train.collective_timeout_s: must be > 0"):
        config_from_dict({"method": {"name": "baseline"}, "train": {"collective_timeout_s": 0}})
