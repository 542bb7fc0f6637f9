"""A real one-node SLURM cluster for the tests (Debian's packages; PLATFORM.md recipe).

Runs as root only. Installs the packages when missing (apt), writes a private slurm.conf in a
temporary folder (exported to clients through SLURM_CONF, so a machine's own configuration is
never touched), starts munged, slurmctld and slurmd, and stops what it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


class SlurmUnavailable(Exception):
    """SLURM cannot run here; the message is the skip reason."""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def ensure_packages() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("SLURM packages missing and not root (cannot apt-get install)")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("SLURM packages missing and no apt-get on this machine")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = _run(["apt-get", "update", "-qq"], env=env, timeout=600)
    r = _run(["apt-get", "install", "-y", "-qq", *PACKAGES], env=env, timeout=900)
    if r.returncode != 0:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: "
                               f"{r.stderr.strip().splitlines()[-1:]}")


class Cluster:
    def __init__(self, workdir: Path, cpus: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 2
        self.conf = self.workdir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []
        self.started_munge = False

    def _write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        w = self.workdir
        mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        self.conf.write_text(f"""\
ClusterName=mtcmkdtest
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/slurmd.pid
SlurmctldLogFile={w}/log/slurmctld.log
SlurmdLogFile={w}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
NodeName={self.host} CPUs={self.cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def _start_munge(self) -> None:
        if _run(["pgrep", "-x", "munged"]).returncode == 0:
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        r = _run(["runuser", "-u", "munge", "--", "munged", "--force"])
        if r.returncode != 0:
            raise SlurmUnavailable(f"munged failed to start: {r.stderr.strip()}")
        self.started_munge = True

    def start(self, timeout: float = 60) -> Cluster:
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmctld/slurmd needs root")
        ensure_packages()
        self._write_conf()
        self._start_munge()
        for daemon in ("slurmctld", "slurmd"):
            log = open(self.workdir / "log" / f"{daemon}.out", "w")  # noqa: SIM115
            self.procs.append(subprocess.Popen([daemon, "-D", "-f", str(self.conf)],
                                               env=self.env, stdout=log, stderr=log))
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = _run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env)
            if r.returncode == 0 and r.stdout.strip() in ("idle", "mixed"):
                return self
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        logs = "".join((self.workdir / "log" / f).read_text()[-400:]
                       for f in ("slurmctld.out", "slurmd.out") if (self.workdir / "log" / f).exists())
        self.stop()
        raise SlurmUnavailable(f"SLURM did not come up within {timeout} s: {logs}")

    def sbatch(self, args: list[str], cwd: Path) -> str:
        r = _run(["sbatch", "--parsable", *args], env=self.env, cwd=cwd)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed: {r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    def job_state(self, job_id: str) -> str:
        r = _run(["scontrol", "show", "job", job_id, "-o"], env=self.env)
        for field in r.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def restart_count(self, job_id: str) -> int:
        r = _run(["scontrol", "show", "job", job_id, "-o"], env=self.env)
        for field in r.stdout.split():
            if field.startswith("Restarts="):
                return int(field.split("=", 1)[1])
        return 0

    def wait(self, job_id: str, timeout: float) -> str:
        deadline = time.time() + timeout
        state = "UNKNOWN"
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                         "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
                return state
            time.sleep(1)
        return f"TIMEOUT_WAITING({state})"

    def signal_job(self, job_id: str, sig: str = "USR1") -> None:
        r = _run(["scancel", f"--signal={sig}", job_id], env=self.env)
        if r.returncode != 0:
            raise RuntimeError(f"scancel failed: {r.stderr.strip()}")

    def stop(self) -> None:
        _run(["scancel", "--full", "-u", "root"], env=self.env)
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()
        if self.started_munge:
            _run(["pkill", "-x", "munged"])
            self.started_munge = False
