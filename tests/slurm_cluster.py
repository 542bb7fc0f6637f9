"""Real SLURM clusters for the tests (Debian's packages; PLATFORM.md recipe): `Cluster`, one
node on this host, and `TwoNodeCluster`, two nodes on this one machine in network namespaces.

Runs as root only. Installs the packages when missing (apt), writes a private slurm.conf in a
temporary folder (exported to clients through SLURM_CONF, so a machine's own configuration is
never touched), starts munged, slurmctld and slurmd, and stops what it started.

Daemons never outlive the test run: `stop()` runs from the fixture's teardown, at interpreter
exit (atexit) and on SIGINT/SIGTERM; the daemons get SIGTERM from the kernel if the test
process dies (PR_SET_PDEATHSIG); and each started daemon is recorded (pid, start time, command)
in a per-run file under REGISTRY_DIR, so the next start stops what a run killed with SIGKILL
left behind. A recorded process is signalled only while its pid, start time and command all
match and the run that recorded it is gone: daemons this code did not start are never touched.

Two nodes (`TwoNodeCluster`): each node is a network namespace created by the test, with its own
address on one veth pair (a private /24 in 10.200-254.x.0 that no route of this host covers) and
no other link, so traffic flows only between the two; loopback is up in each. Every daemon of a
node runs inside `nsenter --net` + `unshare --uts --mount`: the node's name as hostname and a
hosts file of the cluster bound over /etc/hosts (both node names resolve on both nodes, as a
cluster's DNS would); the rest of the file system is shared. (`ip netns exec` would remount
/sys, and slurmd then finds no cgroup file system.) slurmctld runs on the first node, one
slurmd per node (per-node spool, pid and log paths from `%n`); munged (a Unix socket, not the
network) is shared. Client commands (`sbatch`, `scontrol`, ...) run in the first node's network
namespace. The namespaces join the same teardown: recorded in the registry before they exist,
and removed (with every process still in them: job steps, ranks) by `stop()` and by the next
run's `kill_leftovers`.
"""

from __future__ import annotations

import atexit
import ctypes
import ipaddress
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
#: What the two-node cluster needs on top (`ip netns`; `unshare` and `hostname` are essential).
NETNS_PACKAGES = ("iproute2",)
#: Where each running test cluster lists the daemons it started (one JSON file per run).
REGISTRY_DIR = Path(tempfile.gettempdir()) / "mtcmkd-test-slurm"
_PR_SET_PDEATHSIG = 1
_instances = itertools.count()  # tells apart the clusters of one process (registry, names)


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
        for name in run.get("netns", []):
            remove_netns(name)
        path.unlink(missing_ok=True)
    return killed


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def ensure_packages(binaries: tuple[str, ...] = ("slurmctld", "slurmd", "sbatch", "munged"),
                    packages: tuple[str, ...] = PACKAGES) -> None:
    """Install `packages` (apt, as root) unless every one of `binaries` is on PATH."""
    if all(shutil.which(b) for b in binaries):
        return
    what = " ".join(packages)
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{what} missing and not root (cannot apt-get install)")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable(f"{what} missing and no apt-get on this machine")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = _run(["apt-get", "update", "-qq"], env=env, timeout=600)
    r = _run(["apt-get", "install", "-y", "-qq", *packages], env=env, timeout=900)
    if r.returncode != 0:
        raise SlurmUnavailable(f"apt-get install {what} failed: "
                               f"{r.stderr.strip().splitlines()[-1:]}")


# --- network namespaces: the "hosts" of the two-node cluster ----------------------------------

def netns_pids(name: str) -> list[int]:
    """Pids of the processes inside network namespace `name` ([] when it does not exist)."""
    r = _run(["ip", "netns", "pids", name])
    return [int(w) for w in r.stdout.split()] if r.returncode == 0 else []


def netns_exists(name: str) -> bool:
    return (Path("/run/netns") / name).exists()


def remove_netns(name: str, grace: float = 2) -> None:
    """Stop every process inside namespace `name` (SIGTERM, SIGKILL after `grace` seconds:
    slurmstepd ignores SIGTERM), then delete the namespace (its veth end, and so the pair,
    goes with it). Everything in a namespace the test created is the test's own."""
    pids = netns_pids(name)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while (pids := [p for p in pids if process_identity(p) is not None]) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        if not pids:
            break
    if netns_exists(name):
        _run(["ip", "netns", "del", name])


def private_subnet(pid: int | None = None) -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0-10.254.255.0 that no address or route of this host's namespace
    overlaps, chosen from the pid (so two concurrent test runs rarely pick the same one; they
    would not see each other anyway, each pair of namespaces has only its own link)."""
    used = []
    for args in (["-4", "-o", "addr", "show"], ["-4", "route", "show", "table", "all"]):
        for word in _run(["ip", *args]).stdout.split():
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                continue
    used = [n for n in used if n.prefixlen > 0]  # "default" parses as nothing; 0/0 covers all
    start = (os.getpid() if pid is None else pid) % (55 * 256)
    for k in range(55 * 256):
        i = (start + k) % (55 * 256)
        net = ipaddress.ip_network(f"10.{200 + i // 256}.{i % 256}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise SlurmUnavailable("no free private /24 in 10.200-254.x.0 for the test namespaces")


@dataclass(frozen=True)
class Node:
    """One "host" of the two-node cluster: a network namespace with one veth end."""

    name: str  # SLURM NodeName, the hostname inside its UTS namespace, resolvable on both nodes
    netns: str
    veth: str
    addr: str
    hosts: Path  # this node's /etc/hosts: both nodes' names and addresses

    def wrap(self, cmd: list[str]) -> list[str]:
        """`cmd` run inside this node: its network namespace, a UTS namespace whose hostname is
        the node's name, and a mount namespace where `hosts` is /etc/hosts (the rest of the
        file system, /sys and its cgroups included, is this machine's). Exec all the way:
        the pid of the wrapper is cmd's."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--uts", "--mount",
                "--", "sh", "-c", 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && '
                'exec "$@"', self.name, str(self.hosts), *cmd]


def create_nodes(prefix: str, names: tuple[str, str], subnet: ipaddress.IPv4Network,
                 workdir: Path) -> list[Node]:
    """Two network namespaces `{prefix}-1/-2` joined by one veth pair (ends `{prefix}v1/v2`,
    so `prefix` has at most 12 characters), addresses .1 and .2 of `subnet`, loopback up;
    `workdir/hosts` names both nodes (each node's /etc/hosts)."""
    hosts = list(subnet.hosts())
    table = Path(workdir) / "hosts"
    nodes = [Node(name=n, netns=f"{prefix}-{i + 1}", veth=f"{prefix}v{i + 1}",
                  addr=str(hosts[i]), hosts=table) for i, n in enumerate(names)]
    a, b = nodes
    steps = [["netns", "add", a.netns], ["netns", "add", b.netns],
             ["link", "add", a.veth, "netns", a.netns, "type", "veth",
              "peer", "name", b.veth, "netns", b.netns]]
    for n in nodes:
        steps += [["-n", n.netns, "addr", "add", f"{n.addr}/{subnet.prefixlen}", "dev", n.veth],
                  ["-n", n.netns, "link", "set", "lo", "up"],
                  ["-n", n.netns, "link", "set", n.veth, "up"]]
    for step in steps:
        r = _run(["ip", *step])
        if r.returncode != 0:
            raise SlurmUnavailable(f"ip {' '.join(step)}: {r.stderr.strip()}")
    table.write_text("127.0.0.1 localhost\n" + "".join(f"{n.addr} {n.name}\n" for n in nodes))
    return nodes


class Cluster:
    """One slurmd on this host (its hostname), slurmctld beside it."""

    def __init__(self, workdir: Path, cpus: int | None = None,
                 registry_dir: Path = REGISTRY_DIR) -> None:
        self.workdir = Path(workdir)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 2
        self.conf = self.workdir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []
        self.instance = next(_instances)
        self.registry_dir = Path(registry_dir)
        self.registry = self.registry_dir / f"daemons-{os.getpid()}-{self.instance}.json"
        self._previous_handlers: dict[int, Any] = {}

    # --- what differs between one node and two: the hook methods ----------------------------

    def node_names(self) -> list[str]:
        return [self.host]

    def _controller(self) -> str:
        return self.host

    def _node_lines(self, mem_mb: int) -> str:
        return f"NodeName={self.host} CPUs={self.cpus} RealMemory={mem_mb} State=UNKNOWN\n"

    def _daemon_paths(self) -> str:
        w = self.workdir
        return (f"SlurmdSpoolDir={w}/spool\nSlurmdPidFile={w}/slurmd.pid\n"
                f"SlurmdLogFile={w}/log/slurmd.log\n")

    def _client_cmd(self, cmd: list[str]) -> list[str]:
        """A client command (sbatch, scontrol, sinfo, scancel) as it must run to reach the
        controller."""
        return cmd

    def _start_slurm(self) -> None:
        self._write_conf()
        for daemon in ("slurmctld", "slurmd"):
            self.launch([daemon, "-D", "-f", str(self.conf)],
                        self.workdir / "log" / f"{daemon}.out", env=self.env)

    def _release(self) -> None:
        """What the cluster holds besides its daemons (stop() calls it after them)."""

    def _registry_extra(self) -> dict[str, Any]:
        return {}

    def _auth_info(self) -> str:
        """slurm.conf's AuthInfo: a requeued job may start again 30 s after (default 120 s)."""
        return "cred_expire=30"

    # --- configuration ----------------------------------------------------------------------

    def _write_conf(self) -> None:
        w = self.workdir
        nodes = len(self.node_names())
        mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8
                     / nodes)
        self.conf.write_text(f"""\
ClusterName=mtcmkdtest
SlurmctldHost={self._controller()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={w}/state
SlurmctldPidFile={w}/slurmctld.pid
SlurmctldLogFile={w}/log/slurmctld.log
{self._daemon_paths()}\
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo={self._auth_info()}
{self._node_lines(mem_mb)}\
PartitionName=debug Nodes={",".join(self.node_names())} Default=YES MaxTime=INFINITE State=UP
""")

    # --- daemons: start, record, stop ------------------------------------------------------

    def launch(self, cmd: list[str], log: Path, expect: str | None = None,
               **popen: Any) -> subprocess.Popen:
        """Start one daemon in the foreground, dying with this process, and record it.

        `expect`: the daemon's executable name when `cmd` is a wrapper that execs it
        (`Node.wrap`); the record is written once the process runs it, so that its identity is
        the daemon's and the leftover check recognises it.
        """
        self._install_teardown()
        with open(log, "w") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=sink, preexec_fn=_die_with_parent,
                                    **popen)
        self.procs.append(proc)
        deadline = time.monotonic() + 10
        while expect is not None and proc.poll() is None and time.monotonic() < deadline:
            ident = process_identity(proc.pid)
            if ident is not None and ident["cmd"] == expect:
                break
            time.sleep(0.02)
        self._write_registry()
        return proc

    def _write_registry(self) -> None:
        daemons = [i for p in self.procs if (i := process_identity(p.pid)) is not None]
        run = {"owner": process_identity(os.getpid()), "daemons": daemons,
               **self._registry_extra()}
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

    def _check_host(self) -> None:
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmctld/slurmd needs root")
        ensure_packages()

    def start(self, timeout: float = 60) -> Cluster:
        """Start munged (unless one runs), slurmctld and the slurmd(s); returns once every
        node is idle.

        Raises:
            SlurmUnavailable: not root, packages missing and not installable, or the cluster
                did not come up within `timeout` (what was started is stopped again).
        """
        self._check_host()
        kill_leftovers(self.registry_dir)
        try:
            for sub in ("state", "spool", "log"):
                (self.workdir / sub).mkdir(parents=True, exist_ok=True)
            self._start_munge()
            self._start_slurm()
        except BaseException:
            self.stop()
            raise
        deadline = time.time() + timeout
        nodes = len(self.node_names())
        while time.time() < deadline:
            r = self.client(["sinfo", "-h", "-N", "-o", "%T"])
            states = r.stdout.split()
            if r.returncode == 0 and len(states) == nodes \
                    and all(s in ("idle", "mixed") for s in states):
                return self
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        logs = "".join(f.read_text()[-400:] for f in sorted((self.workdir / "log").glob("*.out")))
        self.stop()
        raise SlurmUnavailable(f"SLURM did not come up within {timeout} s: {logs}")

    def client(self, cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster (its slurm.conf, its network)."""
        return _run(self._client_cmd(cmd), env=self.env, **kw)

    def sbatch(self, args: list[str], cwd: Path) -> str:
        r = self.client(["sbatch", "--parsable", *args], cwd=cwd)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed: {r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    def job_field(self, job_id: str, name: str) -> str | None:
        """One field of `scontrol show job` (e.g. "NodeList"), None when absent."""
        r = self.client(["scontrol", "show", "job", job_id, "-o"])
        for field in r.stdout.split():
            if field.startswith(f"{name}="):
                return field.split("=", 1)[1]
        return None

    def job_state(self, job_id: str) -> str:
        return self.job_field(job_id, "JobState") or "UNKNOWN"

    def restart_count(self, job_id: str) -> int:
        return int(self.job_field(job_id, "Restarts") or 0)

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
        r = self.client(["scancel", f"--signal={sig}", job_id])
        if r.returncode != 0:
            raise RuntimeError(f"scancel failed: {r.stderr.strip()}")

    def stop(self) -> None:
        """Cancel the jobs and stop the daemons this cluster started (slurm first, munged
        last), then release the rest (`_release`); safe to call more than once and from a
        signal handler."""
        if any("slurmctld" in p.args and p.poll() is None for p in self.procs):
            try:  # jobs first, while the controller still answers
                self.client(["scancel", "--full", "-u", "root"], timeout=30)
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
        self._release()
        self.registry.unlink(missing_ok=True)
        self._restore_handlers()
        atexit.unregister(self.stop)


class TwoNodeCluster(Cluster):
    """Two SLURM nodes on this machine, each a network namespace with its own address and
    hostname (see the module docstring): slurmctld and the first slurmd on node 1, the second
    slurmd on node 2, munged shared. `nodes[i].addr` is node i's address; client commands run
    on node 1.
    """

    NAMES = ("mtcmkdnode1", "mtcmkdnode2")

    def __init__(self, workdir: Path, cpus: int | None = None,
                 registry_dir: Path = REGISTRY_DIR) -> None:
        super().__init__(workdir, cpus, registry_dir)
        # Interface names have at most 15 characters: "mtk" + pid (<= 7 digits) + a letter + "v1".
        self.prefix = f"mtk{os.getpid()}{chr(ord('a') + self.instance % 26)}"
        self.subnet: ipaddress.IPv4Network | None = None
        self.nodes: list[Node] = []
        self.namespaces: list[str] = []  # recorded before they exist: a crash mid-way is reaped
        self.munge_dir: Path | None = None  # this cluster's own munged (socket, pid, seed, log)

    def node_names(self) -> list[str]:
        return list(self.NAMES)

    def _controller(self) -> str:
        return f"{self.NAMES[0]}({self.nodes[0].addr})"

    def _node_lines(self, mem_mb: int) -> str:
        return "".join(f"NodeName={n.name} NodeAddr={n.addr} NodeHostname={n.name} "
                       f"CPUs={self.cpus} RealMemory={mem_mb} State=UNKNOWN\n" for n in self.nodes)

    def _daemon_paths(self) -> str:
        w = self.workdir
        return (f"SlurmdSpoolDir={w}/spool/%n\nSlurmdPidFile={w}/slurmd-%n.pid\n"
                f"SlurmdLogFile={w}/log/slurmd-%n.log\n")

    def _client_cmd(self, cmd: list[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.nodes[0].netns}", *cmd]

    def _check_host(self) -> None:
        super()._check_host()
        missing = [b for b in ("nsenter", "unshare", "mount", "hostname") if not shutil.which(b)]
        if missing:
            raise SlurmUnavailable(f"{' '.join(missing)} not on PATH (util-linux, mount, "
                                   "hostname)")
        ensure_packages(("ip",), NETNS_PACKAGES)
        r = _run(["ip", "netns", "list"])
        if r.returncode != 0:
            raise SlurmUnavailable(f"`ip netns` does not work here: {r.stderr.strip()}")

    def _start_slurm(self) -> None:
        self._install_teardown()
        self.subnet = private_subnet()
        self.namespaces = [f"{self.prefix}-1", f"{self.prefix}-2"]
        self._write_registry()
        self.nodes = create_nodes(self.prefix, self.NAMES, self.subnet, self.workdir)
        self._write_conf()
        for n in self.nodes:
            (self.workdir / "spool" / n.name).mkdir(parents=True, exist_ok=True)
        log = self.workdir / "log"
        first = self.nodes[0]
        self.launch(first.wrap(["slurmctld", "-D", "-f", str(self.conf)]),
                    log / "slurmctld.out", expect="slurmctld", env=self.env)
        for n in self.nodes:
            self.launch(n.wrap(["slurmd", "-D", "-N", n.name, "-f", str(self.conf)]),
                        log / f"slurmd-{n.name}.out", expect="slurmd", env=self.env)

    def _registry_extra(self) -> dict[str, Any]:
        return {"netns": self.namespaces}

    def _release(self) -> None:
        for name in self.namespaces:
            remove_netns(name)
        self.namespaces = []
        self.nodes = []
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = None

    def _auth_info(self) -> str:
        return f"{super()._auth_info()},socket={self.munge_dir}/munge.socket"

    def _start_munge(self) -> None:
        """A munged of this cluster's own, on a socket of its own named in slurm.conf
        (AuthInfo=socket=...): a munged shared with another test session on this machine
        stops when that session ends, and this cluster's jobs would then fail to authenticate
        mid-run. The key is the machine's (created when missing, as `Cluster` does)."""
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        self.munge_dir = Path(tempfile.mkdtemp(prefix="mtcmkd-munge-"))  # /tmp: munge can reach it
        self.munge_dir.chmod(0o755)
        shutil.chown(self.munge_dir, "munge", "munge")
        d, log = self.munge_dir, self.workdir / "log" / "munged.out"
        proc = self.launch(["munged", "-F", "--force", f"--socket={d}/munge.socket",
                            f"--pid-file={d}/munged.pid", f"--seed-file={d}/munged.seed",
                            f"--log-file={d}/munged.log", "--num-threads=4"], log,
                           user="munge", group="munge", extra_groups=[])
        deadline = time.time() + 20
        while _run(["munge", "-n", f"--socket={d}/munge.socket"]).returncode != 0:
            if proc.poll() is not None or time.time() > deadline:
                raise SlurmUnavailable(f"munged failed to start: {log.read_text()[-400:]}")
            time.sleep(0.2)

    def in_node(self, i: int, cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
        """Run `cmd` on node `i` (0 or 1), as a job's process there would run."""
        return _run(self.nodes[i].wrap(cmd), env=self.env, **kw)

    # --- faults (tests/test_multinode_faults.py) ------------------------------------------

    def node_dies(self, i: int, link_down: bool = True) -> list[int]:
        """Node `i` dies: every process on it (slurmd, slurmstepd, the job's ranks) is killed.
        `link_down`: as a machine dies, its link goes down first, so nothing it sends (not
        even the FIN of a closing socket) reaches the other node; else its kernel still closes
        the connections, as when only the processes die. The namespace stays, as a dead
        machine's address does; `revive_node` brings the node back. Returns the pids killed."""
        n = self.nodes[i]
        if link_down:
            r = _run(["ip", "-n", n.netns, "link", "set", n.veth, "down"])
            if r.returncode != 0:
                raise RuntimeError(f"ip -n {n.netns} link set {n.veth} down: {r.stderr.strip()}")
        pids = netns_pids(n.netns)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def revive_node(self, i: int, timeout: float = 120) -> None:
        """Node `i` back after `node_dies`: link up, a new slurmd, and once SLURM lists
        the node as usable again (a node marked DOWN returns on registration:
        ReturnToService=2), return.

        Raises:
            RuntimeError: the node was not usable within `timeout` seconds.
        """
        n = self.nodes[i]
        r = _run(["ip", "-n", n.netns, "link", "set", n.veth, "up"])
        if r.returncode != 0:
            raise RuntimeError(f"ip -n {n.netns} link set {n.veth} up: {r.stderr.strip()}")
        revival = sum(1 for p in self.procs if n.name in " ".join(map(str, p.args)))
        self.launch(n.wrap(["slurmd", "-D", "-N", n.name, "-f", str(self.conf)]),
                    self.workdir / "log" / f"slurmd-{n.name}-{revival}.out", expect="slurmd",
                    env=self.env)
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            state = self.client(["sinfo", "-h", "-n", n.name, "-o", "%T"]).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"{n.name} not back within {timeout} s (state {state!r})")
