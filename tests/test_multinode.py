"""Multi-node for real: `sbatch --nodes=2 slurm/train.sh` on a two-node SLURM cluster (select
with `pytest -m multinode`).

The two nodes are network namespaces on this machine, created and removed by the test
(`slurm_cluster.TwoNodeCluster`): each has its own address, its own hostname and its own slurmd;
slurmctld runs on the first. The job trains with DeepSpeed over gloo on CPU, one rank per node.
Each rank runs under a probe interpreter (`_PROBE`: `python -m mtcmkd` with two hooks) that
writes, from inside the rank, its host, its rendezvous and a digest of its weights after every
optimiser step, and its final weights: what the ranks hold is compared file to file, not
through a collective of the engine under test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import write_raw
from slurm_cluster import (
    SlurmUnavailable,
    TwoNodeCluster,
    kill_leftovers,
    netns_exists,
    netns_pids,
    process_identity,
)

from mtcmkd.preprocessing import preprocess

pytestmark = pytest.mark.multinode

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# CPU nodes: train.sh's defaults are for GPU nodes (as in tests/test_slurm.py).
CPU_TASK = ["--cpus-per-task=1", "--gpus-per-node=0", "--time=15"]
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", *CPU_TASK]
ONE_NODE = ["--nodes=1", "--ntasks-per-node=2", *CPU_TASK]

# `python -m mtcmkd train ...` with two hooks, for the ranks of a test job (MTCMKD_PYTHON points
# at a script that runs this). Any other use of the interpreter (train.sh's `-c` parser) is
# passed through. rank<R>.json: host, rendezvous, a SHA-256 of the parameters after every
# optimiser step; rank<R>.pt: the method's final state_dict.
_PROBE = '''
import hashlib, json, os, runpy, socket, sys
from pathlib import Path
if sys.argv[1:3] != ["-m", "mtcmkd"]:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
import torch
from mtcmkd.engine import trainer

steps = []
_step, _finish = trainer.train_step, trainer._finish

def digest(method):
    h = hashlib.sha256()
    for name, p in method.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

def train_step(run, batch, meter):
    stepped = _step(run, batch, meter)
    if stepped:
        steps.append([run.state.step, digest(run.method)])
    return stepped

def finish(run, summary):
    rank, env = run.dist.rank, os.environ
    torch.save({k: v.detach().cpu().clone() for k, v in run.method.state_dict().items()},
               run.out / f"rank{rank}.pt")
    (run.out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": run.dist.world_size, "host": socket.gethostname(),
        "master_addr": env["MASTER_ADDR"], "master_port": env["MASTER_PORT"],
        "master_ip": socket.gethostbyname(env["MASTER_ADDR"]),
        "own_ip": socket.gethostbyname(socket.gethostname()),
        "slurm_nodeid": env.get("SLURM_NODEID"), "step_digests": steps}))
    return _finish(run, summary)

trainer.train_step, trainer._finish = train_step, finish
sys.argv = ["mtcmkd", *sys.argv[3:]]
runpy.run_module("mtcmkd", run_name="__main__", alter_sys=True)
'''


# --- the cluster ---------------------------------------------------------------------------


def _start(workdir: Path, registry: Path | None = None) -> TwoNodeCluster:
    kw = {} if registry is None else {"registry_dir": registry}
    try:
        return TwoNodeCluster(workdir, **kw).start()
    except SlurmUnavailable as exc:
        pytest.skip(f"no two-node SLURM here: {exc}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = _start(tmp_path_factory.mktemp("two_nodes"))
    yield c
    c.stop()


def _in_node(cluster: TwoNodeCluster, i: int, code: str, timeout: float = 60):
    return cluster.in_node(i, [sys.executable, "-c", textwrap.dedent(code)], timeout=timeout)


def _held(c: TwoNodeCluster) -> tuple[list[str], list[int]]:
    """The namespaces and the started processes a cluster holds (to check they go)."""
    return list(c.namespaces), [p.pid for p in c.procs]


def _left_behind(namespaces: list[str], pids: list[int]) -> list[str]:
    left = [f"namespace {ns}" for ns in namespaces if netns_exists(ns)]
    left += [f"process {pid} ({i['cmd']})" for pid in pids if (i := process_identity(pid))]
    return left


@pytest.mark.integration
def test_two_nodes_have_their_own_hosts_and_reach_only_each_other(cluster):
    a, b = cluster.nodes
    r = cluster.client(["sinfo", "-h", "-N", "-o", "%N %T"])
    assert sorted(r.stdout.split()) == sorted([a.name, "idle", b.name, "idle"]), r.stdout
    # A server on node 1's address; node 2 connects by name and is seen from its own address.
    server = subprocess.Popen(a.wrap([sys.executable, "-c", textwrap.dedent(f"""
        import socket
        s = socket.create_server(("{a.addr}", 7011))
        print("ready", flush=True)
        c, peer = s.accept()
        print(peer[0], c.recv(64).decode(), flush=True)
        """)]), stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        r = _in_node(cluster, 1, f"""
            import socket
            c = socket.create_connection(("{a.name}", 7011), timeout=10)
            c.sendall(socket.gethostname().encode())
            """)
        assert r.returncode == 0, r.stderr
        assert server.stdout.readline().split() == [b.addr, b.name]
    finally:
        server.kill()
        server.wait()
    # Inside a node: its hostname, both names resolve, only lo and the veth end, no route out.
    host_ip = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    r = _in_node(cluster, 1, f"""
        import socket
        print(socket.gethostname(), socket.gethostbyname("{a.name}"),
              socket.gethostbyname("{b.name}"))
        for ip in {host_ip!r} + ["1.1.1.1"]:
            try:
                socket.create_connection((ip, 22), timeout=3)
                print("reached", ip)
            except OSError as exc:
                print("unreachable", ip, exc.errno)
        """)
    lines = r.stdout.splitlines()
    assert lines[0].split() == [b.name, a.addr, b.addr], r.stdout + r.stderr
    assert [line.split()[1] for line in lines if line.startswith("unreachable")] \
        == [*host_ip, "1.1.1.1"], r.stdout + r.stderr
    links = cluster.in_node(1, ["ip", "-o", "link", "show"]).stdout
    assert sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines()) \
        == sorted(["lo", b.veth]), links
    routes = cluster.in_node(1, ["ip", "-4", "route", "show"]).stdout
    assert "default" not in routes and str(cluster.subnet) in routes, routes


@pytest.mark.integration
def test_stop_leaves_no_namespace_and_no_process(tmp_path):
    c = _start(tmp_path / "c", registry=tmp_path / "registry")
    job = c.sbatch(["--nodes=2", "--ntasks-per-node=1", "--wrap", "srun sleep 300"],
                   cwd=tmp_path)
    deadline = time.time() + 60
    while c.job_state(job) != "RUNNING" and time.time() < deadline:
        time.sleep(0.5)
    namespaces, pids = _held(c)
    assert len(namespaces) == 2 and all(netns_exists(ns) for ns in namespaces)
    assert all(netns_pids(ns) for ns in namespaces)  # daemons and the job's steps
    c.stop()
    assert _left_behind(namespaces, pids) == []
    assert not list((tmp_path / "registry").glob("*.json"))
    c.stop()  # twice is fine


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_interrupted_run_leaves_nothing_behind(tmp_path, sig):
    """A process holding a two-node cluster with a running job is interrupted. SIGTERM: its
    handler stops everything. SIGKILL: the daemons die with it (PR_SET_PDEATHSIG), the
    namespaces and the job's processes inside them are reaped by the next run's
    kill_leftovers."""
    registry = tmp_path / "registry"
    code = textwrap.dedent(f"""
        import json, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(TESTS)!r})
        from slurm_cluster import TwoNodeCluster
        c = TwoNodeCluster(Path({str(tmp_path / "c")!r}),
                           registry_dir=Path({str(registry)!r})).start()
        job = c.sbatch(["--nodes=2", "--ntasks-per-node=1", "--wrap", "srun sleep 300"],
                       cwd=Path({str(tmp_path)!r}))
        while c.job_state(job) != "RUNNING":
            time.sleep(0.2)
        print(json.dumps([c.namespaces, [p.pid for p in c.procs]]), flush=True)
        time.sleep(300)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline()
        if not line:
            err = holder.stderr.read()
            if "SlurmUnavailable" in err:
                pytest.skip(err.strip().splitlines()[-1])
            pytest.fail(err)
        namespaces, pids = json.loads(line)
        job_pids = [p for ns in namespaces for p in netns_pids(ns) if p not in pids]
        assert job_pids, "the job's processes should be inside the namespaces"
        holder.send_signal(sig)
        holder.wait(timeout=60)
        if sig == signal.SIGKILL:
            deadline = time.monotonic() + 20  # PDEATHSIG: the daemons go by themselves
            while _left_behind([], pids) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _left_behind([], pids) == []
            assert all(netns_exists(ns) for ns in namespaces)  # until the next run reaps them
            assert len(list(registry.glob("daemons-*.json"))) == 1
            kill_leftovers(registry, timeout=10)
        assert _left_behind(namespaces, pids + job_pids) == []
        assert not list(registry.glob("daemons-*.json"))
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        kill_leftovers(registry, timeout=10)


def test_unavailable_cluster_says_why(tmp_path, monkeypatch):
    import slurm_cluster

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SlurmUnavailable, match="needs root"):
        TwoNodeCluster(tmp_path).start()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(slurm_cluster, "ensure_packages", lambda *a: None)
    real_which = slurm_cluster.shutil.which
    monkeypatch.setattr(slurm_cluster.shutil, "which",
                        lambda b: None if b == "nsenter" else real_which(b))
    with pytest.raises(SlurmUnavailable, match="nsenter not on PATH"):
        TwoNodeCluster(tmp_path).start()
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda b: f"/usr/bin/{b}")
    monkeypatch.setattr(slurm_cluster, "_run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "Operation not permitted"))
    with pytest.raises(SlurmUnavailable, match="`ip netns` does not work here"):
        TwoNodeCluster(tmp_path).start()


# --- training across both nodes --------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("multinode_data")
    write_raw(tmp / "raw", "2021", n=4, shape=(24, 28, 20))
    assert not preprocess(tmp / "raw", tmp / "store", n_folds=2).failed
    return tmp / "store"


def _config(tmp: Path) -> Path:
    """tiny.yaml, 16^3 patches, 2 epochs of 2 steps (a checkpoint and a validation each)."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["data"]["patch_size"] = [16, 16, 16]
    cfg["train"].update(epochs=2, iters_per_epoch=2, val_cases=1, seed=7)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _submit(cluster: TwoNodeCluster, tmp: Path, store: Path, config: Path, name: str,
            layout: list[str]) -> tuple[str, Path]:
    probe, python = tmp / "rank_probe.py", tmp / "python"
    probe.write_text(_PROBE)
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {probe} \"$@\"\n")
    python.chmod(0o755)
    out = tmp / name
    env_vars = {"CONFIG": str(config), "STORE": str(store), "OUT": str(out),
                "MTCMKD_PYTHON": str(python), "OMP_NUM_THREADS": "1",
                "PYTHONWARNINGS": "ignore"}
    export = "ALL," + ",".join(f"{k}={v}" for k, v in env_vars.items())
    job = cluster.sbatch([*layout, f"--job-name={name}", f"--output={tmp}/%x-%j.log",
                          f"--export={export}", str(REPO / "slurm" / "train.sh")], cwd=REPO)
    return job, out


def _tx_bytes(cluster: TwoNodeCluster, i: int) -> int:
    """Bytes node `i` has sent over its veth end (its only link to the other node)."""
    node = cluster.nodes[i]
    r = subprocess.run(["ip", "-n", node.netns, "-j", "-s", "link", "show", node.veth],
                       capture_output=True, text=True, check=True)
    return int(json.loads(r.stdout)[0]["stats64"]["tx"]["bytes"])


@pytest.fixture(scope="module")
def runs(cluster, store, tmp_path_factory):
    """The same training twice, one job after the other: one rank on each node, then two ranks
    on one node. Also the bytes node 2 sent over the veth pair during the two-node job."""
    tmp = tmp_path_factory.mktemp("multinode_runs")
    config = _config(tmp)
    result = {}
    for key, name, layout in (("two_nodes", "two-nodes", TWO_NODES),
                              ("one_node", "one-node", ONE_NODE)):
        sent = _tx_bytes(cluster, 1)
        job, out = _submit(cluster, tmp, store, config, name, layout)
        state = cluster.wait(job, timeout=900)
        log_file = tmp / f"{name}-{job}.log"
        result[key] = {"job": job, "out": out, "state": state,
                       "log": log_file.read_text() if log_file.exists() else "(no job log)",
                       "nodes": cluster.job_field(job, "NodeList"),
                       "node2_sent": _tx_bytes(cluster, 1) - sent}
    return result


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.integration
def test_sbatch_two_nodes_trains_one_rank_per_node(cluster, runs):
    import torch

    run = runs["two_nodes"]
    assert run["state"] == "COMPLETED", f"{run['state']}\n{run['log'][-4000:]}"
    a, b = cluster.nodes
    assert run["nodes"] == "mtcmkdnode[1-2]"
    log = run["log"]
    assert "2 tasks on 2 node(s), master mtcmkdnode1:" in log, log[-3000:]
    # The log names every rank's host and the rendezvous each joined: node 1's address.
    port = _ranks(run["out"])[0]["master_port"]
    for rank, node in enumerate((a, b)):
        assert (f"rank {rank} of 2 on {node.name} (local rank 0): gloo rendezvous at "
                f"{a.name}:{port} ({a.addr})") in log, log[-3000:]
    ranks = _ranks(run["out"])
    assert [r["host"] for r in ranks] == [a.name, b.name]
    assert [r["own_ip"] for r in ranks] == [a.addr, b.addr]
    assert [r["slurm_nodeid"] for r in ranks] == ["0", "1"]
    assert {r["master_ip"] for r in ranks} == {a.addr}
    assert all(r["world_size"] == 2 for r in ranks)
    # Identical weights on both ranks after every optimiser step, and at the end.
    assert len(ranks[0]["step_digests"]) == 4
    assert ranks[0]["step_digests"] == ranks[1]["step_digests"]
    _assert_same_state(run["out"] / "rank0.pt", run["out"] / "rank1.pt")
    summary = json.loads((run["out"] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    assert summary["step"] == 4
    # The gradients crossed the veth pair: in a two-rank all-reduce each rank sends as many
    # values as it reduces, so node 2 sent at least (nearly) every parameter's gradient, in
    # fp32, at each of the 4 steps (measured: 18.09 MB for 4 x 4.48 MB).
    state = torch.load(run["out"] / "rank1.pt", weights_only=True)
    volume = 4 * sum(v.numel() * 4 for v in state.values() if v.is_floating_point())
    assert run["node2_sent"] > 0.9 * volume, (run["node2_sent"], volume)


@pytest.mark.integration
def test_two_nodes_equal_two_ranks_on_one_node(runs):
    """Same seed, same ranks, same data shards: the placement of the ranks must not change a
    bit (gloo sums two operands, and a + b == b + a exactly in floating point)."""
    one, two = runs["one_node"], runs["two_nodes"]
    assert one["state"] == "COMPLETED", f"{one['state']}\n{one['log'][-4000:]}"
    assert two["state"] == "COMPLETED", f"{two['state']}\n{two['log'][-4000:]}"
    one_ranks, two_ranks = _ranks(one["out"]), _ranks(two["out"])
    assert len({r["host"] for r in one_ranks}) == 1 and len({r["host"] for r in two_ranks}) == 2
    assert one_ranks[0]["step_digests"] == two_ranks[0]["step_digests"]
    _assert_same_state(one["out"] / "rank0.pt", two["out"] / "rank0.pt")
    from mtcmkd.integrity import safe_torch_load

    s1 = safe_torch_load(one["out"] / "student.pt")["state_dict"]
    s2 = safe_torch_load(two["out"] / "student.pt")["state_dict"]
    assert s1.keys() == s2.keys()
    assert [k for k in s1 if not _bit_equal(s1[k], s2[k])] == []


def _bit_equal(x, y) -> bool:
    return (x.dtype == y.dtype and x.shape == y.shape
            and x.cpu().contiguous().numpy().tobytes() == y.cpu().contiguous().numpy().tobytes())


def _assert_same_state(path_a: Path, path_b: Path) -> None:
    import torch

    a, b = (torch.load(p, weights_only=True) for p in (path_a, path_b))
    assert a.keys() == b.keys()
    assert [k for k in a if not _bit_equal(a[k], b[k])] == []
