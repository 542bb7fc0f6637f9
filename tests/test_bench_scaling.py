"""`benchmarks/bench_scaling.py` in its CPU form: two gloo ranks of this machine, small networks
(docs/SCALING.md uses its GPU form's numbers; this checks that the measurement works)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_bench_scaling_measures_two_cpu_ranks(tmp_path):
    out = tmp_path / "scaling.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_scaling.py"), "--spawn", "2",
         "--config", "mtcmkd-paper", "baseline", "--patch", "16", "--widths", "8", "16", "24",
         "32", "--steps", "2", "--warmup", "1", "--reps", "2", "--json-out", str(out)],
        capture_output=True, text=True, timeout=1800, cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "config" in r.stdout and "comm %" in r.stdout  # the table
    rows = {row["config"]: row for row in json.loads(out.read_text())}
    paper, base = rows["mtcmkd-paper"], rows["baseline"]
    for row in (paper, base):
        assert row["world_size"] == 2 and row["backend"] == "gloo" and row["precision"] == "fp32"
        # DeepSpeed hands every gradient to all_reduce once per step, in fp32
        assert row["reduced_bytes_per_step"] == row["grad_bytes"] == 4 * row["parameters"]
        assert all(row[f"{k}_s"] > 0 for k in ("forward", "backward", "allreduce", "optimizer"))
        assert row["step_s"] == pytest.approx(sum(row[f"{k}_s"] for k in
                                                  ("forward", "backward", "allreduce",
                                                   "optimizer")))
        assert 0 < row["allreduce_share"] < 1
        assert row["bare_allreduce"]["busbw_gbs"] == pytest.approx(
            row["bare_allreduce"]["algbw_gbs"])  # 2(N-1)/N = 1 at N = 2
    # MTCM-KD reduces the gradients of four U-Nets (three teachers and the student) and CDSFL
    assert 4 * base["parameters"] < paper["parameters"] < 4.01 * base["parameters"]


@pytest.mark.multinode
@pytest.mark.integration
def test_bench_scaling_runs_across_the_two_node_cluster(tmp_path):
    """docs/SCALING.md section 3's driver: one rank per node, and every gradient byte of every
    step crosses node 2's veth (the kernel's counter), as the model's 2(N-1)/N x S says."""
    out = tmp_path / "two_nodes.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_scaling_two_nodes.py"),
         "--config", "baseline", "--patch", "16", "--widths", "8", "16", "24", "32",
         "--steps", "2", "--warmup", "1", "--reps", "2", "--json-out", str(out)],
        capture_output=True, text=True, timeout=1200, cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if r.returncode == 2 and "no two-node SLURM here" in r.stderr:
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = {x["layout"]: x for x in json.loads(out.read_text())["results"]}
    two, one = results["two_nodes"], results["one_node"]
    (row,) = two["rows"]
    assert row["hosts"] == ["mtcmkdnode1", "mtcmkdnode2"] and row["world_size"] == 2
    assert len(one["rows"][0]["hosts"]) == 1
    # warm-up + timed steps, the bare all-reduce's warm-up + reps: S bytes each at N = 2
    crossings = (1 + 2) + (1 + 2)
    assert two["node2_veth_bytes"]["tx_bytes"] >= 0.9 * crossings * row["grad_bytes"]
    assert one["node2_veth_bytes"]["tx_bytes"] < 0.1 * row["grad_bytes"]  # stayed on one node
