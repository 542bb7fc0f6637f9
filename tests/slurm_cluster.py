"""A real one-node SLURM cluster for the tests (Debian's packages; PLATFORM.md recipe).

Runs as root only. Installs the packages when missing (apt), writes a private slurm.conf in a
temporary folder (exported to clients through SLURM_CONF, so a machine's own configuration is
never touched), starts munged, slurmctld and slurmd, and stops what it started.

Daemons never outlive the test run: `stop()` runs from the fixture's teardown, at interpreter
exit (atexit) and on SIGINT/SIGTERM; the daemons get SIGTERM from the kernel if the test
process dies (PR_SET_PDEATHSIG); and each started daemon is recorded (pid, start time, command)
in a per-run file under REGISTRY_DIR, so the next start stops what a run killed with SIGKILL
left behind. A recorded process is signalled only while its pid, start time and command all
match and the run that recorded it is gone: daemons this code did not start are never touched.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
#: Where each running test cluster lists the daemons it started (one JSON file per run).
REGISTRY_DIR = Path(tempfile.gettempdir()) / "mtcmkd-test-slurm"
_PR_SET_PDEATHSIG = 1


class SlurmUnavailable(Exception):
    """SLURM cannot run here; the message is the skip reason."""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def process_identity(pid: int) -> dict[str, Any] | None:
    """pid, kernel start time (clock ticks since boot) and executable name; None when gone.

    The start time tells a process from a later one that reuses its pid.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except (OSError, IndexError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] == "Z":  # a zombie has exited already
        return None
    return {"pid": pid, "start": int(fields[19]), "cmd": os.path.basename(argv0)}


def _matches(record: dict[str, Any]) -> bool:
    now = process_identity(int(record["pid"]))
    return now is not None and now["start"] == record["start"] and now["cmd"] == record["cmd"]


def _terminate(records: list[dict[str, Any]], timeout: float = 20) -> list[int]:
    """SIGTERM each still-matching recorded process, SIGKILL those alive after `timeout`."""
    alive = [r for r in records if _matches(r)]
    for r in alive:
        os.kill(int(r["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_matches(r) for r in alive) and time.monotonic() < deadline:
        time.sleep(0.1)
    for r in alive:
        if _matches(r):
            os.kill(int(r["pid"]), signal.SIGKILL)
    return [int(r["pid"]) for r in alive]


def kill_leftovers(registry_dir: Path = REGISTRY_DIR, timeout: float = 20) -> list[int]:
    """Stop the daemons recorded by earlier runs that are gone (killed before their teardown).

    A file whose run is still alive (its owner's pid and start time match) belongs to another
    test session and is left alone. Returns the pids that were signalled.
    """
    killed: list[int] = []
    for path in sorted(Path(registry_dir).glob("daemons-*.json")):
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _matches(run["owner"]):
            continue
        killed += _terminate(run["daemons"], timeout)
        path.unlink(missing_ok=True)
    return killed


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


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
    def __init__(self, workdir: Path, cpus: int | None = None,
                 registry_dir: Path = REGISTRY_DIR) -> None:
        self.workdir = Path(workdir)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 2
        self.conf = self.workdir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []
        self.registry_dir = Path(registry_dir)
        self.registry = self.registry_dir / f"daemons-{os.getpid()}.json"
        self._previous_handlers: dict[int, Any] = {}

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

    # --- daemons: start, record, stop ------------------------------------------------------

    def launch(self, cmd: list[str], log: Path, **popen: Any) -> subprocess.Popen:
        """Start one daemon in the foreground, dying with this process, and record it."""
        self._install_teardown()
        with open(log, "w") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=sink, preexec_fn=_die_with_parent,
                                    **popen)
        self.procs.append(proc)
        self._write_registry()
        return proc

    def _write_registry(self) -> None:
        daemons = [i for p in self.procs if (i := process_identity(p.pid)) is not None]
        run = {"owner": process_identity(os.getpid()), "daemons": daemons}
        self.registry_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.registry.with_suffix(".tmp")
        tmp.write_text(json.dumps(run))
        tmp.replace(self.registry)

    def _install_teardown(self) -> None:
        """stop() at exit and on SIGINT/SIGTERM (then the signal's previous behaviour)."""
        if self._previous_handlers:
            return
        atexit.register(self.stop)
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: atexit and PDEATHSIG still apply
                pass

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        previous = self._previous_handlers.get(signum, signal.SIG_DFL)
        self.stop()
        if callable(previous):
            previous(signum, frame)  # e.g. KeyboardInterrupt for SIGINT
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _start_munge(self) -> None:
        if _run(["pgrep", "-x", "munged"]).returncode == 0:
            return  # someone else's munged: use it, never stop it
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        # In the foreground (-F) as our own child, so its pid is known and recorded.
        log = self.workdir / "log" / "munged.out"
        proc = self.launch(["munged", "-F", "--force"], log, user="munge", group="munge",
                           extra_groups=[])
        deadline = time.time() + 20
        while _run(["munge", "-n"]).returncode != 0:
            if proc.poll() is not None or time.time() > deadline:
                raise SlurmUnavailable(f"munged failed to start: {log.read_text()[-400:]}")
            time.sleep(0.2)

    def start(self, timeout: float = 60) -> Cluster:
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmctld/slurmd needs root")
        ensure_packages()
        kill_leftovers(self.registry_dir)
        self._write_conf()
        self._start_munge()
        for daemon in ("slurmctld", "slurmd"):
            self.launch([daemon, "-D", "-f", str(self.conf)],
                        self.workdir / "log" / f"{daemon}.out", env=self.env)
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
        """Cancel the jobs and stop the daemons this cluster started (slurm first, munged
        last); safe to call more than once and from a signal handler."""
        if any(p.args[0] == "slurmctld" and p.poll() is None for p in self.procs):
            try:  # jobs first, while the controller still answers
                _run(["scancel", "--full", "-u", "root"], env=self.env, timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        self.registry.unlink(missing_ok=True)
        self._restore_handlers()
        atexit.unregister(self.stop)
