"""`sbatch slurm/train.sh` on a real one-node SLURM cluster (select with `pytest -k slurm`).

The cluster is started by the test (Debian's slurmctld/slurmd/munge, installed when missing and
allowed), with its own slurm.conf in a temporary folder, and stopped afterwards.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from conftest import write_raw
from slurm_cluster import Cluster, SlurmUnavailable

from mtcmkd.preprocessing import preprocess

REPO = Path(__file__).resolve().parents[1]
# The defaults in slurm/train.sh are for a GPU node; a 2-CPU test node overrides them on the
# command line, as users do.
CPU_NODE = ["--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=15"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        c = Cluster(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as exc:
        pytest.skip(f"no SLURM here: {exc}")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def slurm_store(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("slurm_data")
    write_raw(tmp / "raw", "2021", n=4, shape=(24, 28, 20))
    assert not preprocess(tmp / "raw", tmp / "store", n_folds=2).failed
    return tmp / "store"


def _config(tmp: Path, **train) -> Path:
    """tiny.yaml with 16^3 patches and the given train settings (--export splits on commas,
    so list values cannot travel in MTCMKD_ARGS)."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["data"]["patch_size"] = [16, 16, 16]
    cfg["train"].update(val_cases=1, **train)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _submit(cluster: Cluster, tmp: Path, store: Path, out: Path, config: Path, name: str,
            args: str = "") -> str:
    env_vars = {
        "CONFIG": str(config),
        "STORE": str(store),
        "OUT": str(out),
        "MTCMKD_PYTHON": sys.executable,
        "MTCMKD_ARGS": args,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    export = "ALL," + ",".join(f"{k}={v}" for k, v in env_vars.items())
    return cluster.sbatch([*CPU_NODE, f"--job-name={name}", f"--output={tmp}/%x-%j.log",
                           f"--export={export}", str(REPO / "slurm" / "train.sh")], cwd=REPO)


def _log(tmp: Path, name: str, job: str) -> str:
    p = tmp / f"{name}-{job}.log"
    return p.read_text() if p.exists() else "(no job log)"


@pytest.mark.integration
def test_slurm_sbatch_trains_with_two_ranks(cluster, slurm_store, tmp_path):
    out = tmp_path / "run"
    config = _config(tmp_path, epochs=1, iters_per_epoch=2)
    job = _submit(cluster, tmp_path, slurm_store, out, config, "mtcmkd-ok")
    state = cluster.wait(job, timeout=600)
    assert state == "COMPLETED", f"{state}\n{_log(tmp_path, 'mtcmkd-ok', job)[-4000:]}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    assert (out / "student.pt").is_file()
    log = _log(tmp_path, "mtcmkd-ok", job)
    assert "2 tasks on 1 node(s)" in log


@pytest.mark.integration
def test_slurm_preemption_signal_requeues_and_resumes(cluster, slurm_store, tmp_path):
    out = tmp_path / "run"
    config = _config(tmp_path, epochs=2, iters_per_epoch=15, ckpt_every=50)
    name = "mtcmkd-preempt"
    job = _submit(cluster, tmp_path, slurm_store, out, config, name)
    log_file = out / "log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:  # wait until training is under way
        if log_file.exists() and '"step": 3' in log_file.read_text():
            break
        assert cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), _log(
            tmp_path, name, job)[-4000:]
        time.sleep(0.5)
    else:
        pytest.fail(f"training did not start\n{_log(tmp_path, name, job)[-4000:]}")
    cluster.signal_job(job, "USR1")
    state = cluster.wait(job, timeout=900)
    log = _log(tmp_path, name, job)
    assert state == "COMPLETED", f"{state}\n{log[-4000:]}"
    assert cluster.restart_count(job) >= 1, log[-4000:]
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    preempted = [r for r in records if r["kind"] == "preempted"]
    assert len(preempted) == 1, log[-4000:]
    assert "requeueing job" in log and "resumed from" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 30 and summary["preempted"] is False
    assert not (out / "PREEMPTED").exists()  # the resumed attempt removed it
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps[-1] == 30 and max(steps) == 30


@pytest.mark.parametrize(("srun_rc", "marker", "requeued", "exit_code"), [
    (3, False, True, 0),     # the run's own "requeue me"
    (143, True, True, 0),    # srun killed the other ranks after rank 0 exited 3
    (143, False, False, 143),  # a real failure: no requeue, its exit code
    (0, False, False, 0),
])
def test_train_sh_requeue_decision(tmp_path, srun_rc, marker, requeued, exit_code):
    """slurm/train.sh's requeue logic with stand-ins for srun and scontrol (no cluster)."""
    import os
    import subprocess

    bin_dir, out = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    out.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n" + (f"echo '{{}}' > '{out}/PREEMPTED'\n" if marker else "")
        + f"exit {srun_rc}\n")
    (bin_dir / "scontrol").write_text(
        f"#!/bin/bash\necho \"$@\" >> '{calls}'\n"
        "if [ \"$1 $2\" = 'show hostnames' ]; then echo node1; fi\n")
    for f in ("srun", "scontrol"):
        (bin_dir / f).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node1", "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_JOB_NAME": "t"}
    r = subprocess.run(["bash", str(REPO / "slurm" / "train.sh"), "configs/tiny.yaml", "store",
                        str(out)], env=env, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == exit_code, r.stdout + r.stderr
    assert ("requeue 7" in (calls.read_text() if calls.exists() else "")) is requeued
