"""docs/SCALING.md section 3: `bench_scaling.py` on this machine's two-node SLURM cluster.

Starts the two-node cluster of the test suite (tests/slurm_cluster.py: two network namespaces
joined by a veth pair, one slurmd each), runs `bench_scaling.py` as one SLURM job of two ranks
on the two nodes (`srun --nodes=2 --ntasks-per-node=1`) and as one of two ranks on one node,
and writes both tables' rows, with the bytes the kernel counted on node 2's veth during the
two-node job, to one JSON file. Needs root, `ip netns` and SLURM (as `pytest -m multinode`).

    python benchmarks/bench_scaling_two_nodes.py --json-out docs/results/scaling_two_nodes.json

The networks are the paper's (9.46 M parameters each): the bytes reduced per step are those of
the real configuration; a small patch keeps the CPU compute short (it does not change them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from slurm_cluster import SlurmUnavailable, TwoNodeCluster  # noqa: E402

CPU_TASK = ["--cpus-per-task=1", "--gpus-per-node=0", "--time=30"]
LAYOUTS = {"two_nodes": ["--nodes=2", "--ntasks-per-node=1"],
           "one_node": ["--nodes=1", "--ntasks-per-node=2"]}


def veth_bytes(cluster: TwoNodeCluster, node: int) -> dict[str, int]:
    """The kernel's byte counters of node `node`'s end of the veth pair."""
    n = cluster.nodes[node]
    # `ip -s -j`: the namespace's own counters (its /sys is the host's unless remounted)
    r = subprocess.run(["ip", "-n", n.netns, "-s", "-j", "link", "show", "dev", n.veth],
                       capture_output=True, text=True, check=True)
    stats = json.loads(r.stdout)[0]["stats64"]
    return {"tx_bytes": int(stats["tx"]["bytes"]), "rx_bytes": int(stats["rx"]["bytes"])}


def run_layout(cluster: TwoNodeCluster, layout: str, bench_args: list[str], work: Path,
               timeout: float) -> dict[str, Any]:
    out = work / f"{layout}.json"
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, str(REPO / "benchmarks" /
                                                                "bench_scaling.py"),
                                            *bench_args, "--json-out", str(out)])
    before = veth_bytes(cluster, 1)
    t0 = time.perf_counter()
    job = cluster.sbatch([*LAYOUTS[layout], *CPU_TASK, f"--output={work}/{layout}.log",
                          "--export=ALL,OMP_NUM_THREADS=1,PYTHONWARNINGS=ignore",
                          "--wrap", f"srun {cmd}"], cwd=work)
    state = cluster.wait(job, timeout)
    seconds = time.perf_counter() - t0
    after = veth_bytes(cluster, 1)
    log = (work / f"{layout}.log").read_text() if (work / f"{layout}.log").exists() else ""
    if state != "COMPLETED" or not out.exists():
        raise RuntimeError(f"{layout}: job {job} ended {state}:\n{log[-3000:]}")
    print(f"--- {layout} ({seconds:.0f} s)\n{log.strip()}", flush=True)
    return {"layout": layout, "job_seconds": seconds, "rows": json.loads(out.read_text()),
            "node2_veth_bytes": {k: after[k] - before[k] for k in after}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", nargs="+", default=["mtcmkd-paper", "baseline"])
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--widths", type=int, nargs="+", help="model.widths (default: the config's)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    ap.add_argument("--json-out", type=Path, required=True)
    args = ap.parse_args(argv)
    bench_args = ["--config", *args.config, "--patch", str(args.patch), "--precision", "fp32",
                  "--steps", str(args.steps), "--warmup", str(args.warmup),
                  "--reps", str(args.reps)]
    if args.widths:
        bench_args += ["--widths", *map(str, args.widths)]
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="mtcmkd-scaling-"))
    os.chmod(work, 0o755)
    try:
        cluster = TwoNodeCluster(work / "cluster").start()
    except SlurmUnavailable as exc:
        print(f"no two-node SLURM here: {exc}", file=sys.stderr)
        return 2
    try:
        results = [run_layout(cluster, layout, bench_args, work, args.timeout)
                   for layout in LAYOUTS]
    finally:
        cluster.stop()
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_before": load_before,
                          "load_after": os.getloadavg()},
              "bench_args": bench_args, "results": results}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
