"""Faults at the I/O edges: NIfTI headers that lie about their size (Python reader and C++
client), gzip bombs, MTCMKD_ARGS in slurm/train.sh, SLURM test daemons left running.

Memory is measured as the peak RSS of a fresh child process (`resource.getrusage(
RUSAGE_CHILDREN)` in a small wrapper), so the bounds do not depend on what this test process
has already run.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_raw
from slurm_cluster import Cluster, kill_leftovers, process_identity

from mtcmkd import nifti_header
from mtcmkd.export import build_cpp_client, cpp_toolchain_missing
from mtcmkd.preprocessing.convert import CaseError, read_nifti

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
#: Generous bound on a child's peak memory; the unchecked readers peaked at 3.4-3.6 GB.
PEAK_MB = 600

_PEAK = textwrap.dedent("""
    import json, resource, subprocess, sys
    done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr,
                      "peak_mb": peak}))
""")


def peak_run(cmd: list[str], cwd: Path | None = None) -> dict:
    """Run `cmd` in a fresh wrapper; rc, stdout, stderr and the peak RSS (MB) of `cmd`."""
    done = subprocess.run([sys.executable, "-c", _PEAK, *cmd], capture_output=True, text=True,
                          timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def header_bytes(shape: tuple[int, ...], *, dtype=np.int16, slope: float = 1.0,
                 vox_offset: float = 352.0) -> bytes:
    """A NIfTI-1 header (+ the 4-byte extension flag) with the given fields forced."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    block = bytearray(header.binaryblock)
    struct.pack_into("<fff", block, 108, vox_offset, slope, 0.0)
    return bytes(block) + b"\0" * 4


def lying_gzip(path: Path, shape=(1200, 1200, 1200), slope: float = 2.0) -> Path:
    """The issue's probe: a ~24 KB .nii.gz whose header claims 1200^3 int16 with scl_slope 2."""
    noise = np.random.default_rng(0).integers(0, 256, 24_000, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(header_bytes(shape, slope=slope) + noise))
    return path


def small_volume(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def _read(path: Path, **kw) -> str:
    with pytest.raises(CaseError) as caught:
        read_nifti(path, "c", **kw)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


# --- Python reader: header checks before any array -------------------------------------------


def test_lying_scaled_header_fails_as_truncated_without_allocating(tmp_path):
    probe = lying_gzip(tmp_path / "BraTS2021_00000_t1.nii.gz")
    assert probe.stat().st_size < 30_000
    code = ("import sys; from pathlib import Path\n"
            "from mtcmkd.preprocessing.convert import CaseError, read_nifti\n"
            "try:\n    read_nifti(Path(sys.argv[1]), 'c')\n"
            "except CaseError as exc:\n    print(exc)\n")
    done = peak_run([sys.executable, "-c", code, str(probe)])
    assert done["rc"] == 0, done["stderr"]
    assert "NIfTI data shorter than its header says (truncated file)" in done["stdout"]
    assert "1200x1200x1200 int16" in done["stdout"]
    assert done["peak_mb"] < PEAK_MB, done


@pytest.mark.integration
def test_preprocess_fails_the_lying_case_alone_with_small_memory(tmp_path):
    raw = tmp_path / "raw"
    ids = sorted(write_raw(raw, "2021", n=2))
    lying_gzip(raw / ids[1] / f"{ids[1]}_t1.nii.gz")
    done = peak_run([str(REPO / ".venv" / "bin" / "mtcmkd"), "preprocess", str(raw),
                     str(tmp_path / "store"), "--workers", "1"])
    assert done["rc"] == 1, done["stderr"]
    output = " ".join((done["stdout"] + done["stderr"]).split())  # rich wraps long lines
    assert f"failed case {ids[1]}:" in output and "(truncated file)" in output, done
    assert "1200x1200x1200 int16" in output, done
    assert done["peak_mb"] < PEAK_MB, done


def test_voxel_limit_names_the_declared_size_and_is_overridable(tmp_path):
    huge = tmp_path / "huge.nii.gz"
    huge.write_bytes(gzip.compress(header_bytes((2000, 2000, 2000)) + b"\0" * 100))
    message = _read(huge)
    assert "2000x2000x2000 int16" in message and "8,000,000,000 voxels" in message
    assert f"limit of {nifti_header.MAX_VOXELS:,} voxels" in message
    small = small_volume(tmp_path / "small.nii", np.ones((4, 5, 6), np.int16))
    assert read_nifti(small, "c").data.shape == (4, 5, 6)
    assert "above the limit of 100 voxels" in _read(small, max_voxels=100)


@pytest.mark.parametrize(("offset", "fragment"), [
    (1e20, "vox_offset 1e+20"), (float("nan"), "vox_offset nan"), (100.0, "vox_offset 100"),
    (352.5, "vox_offset 352.5")])
def test_bad_vox_offset_is_a_bad_header(tmp_path, offset, fragment):
    path = tmp_path / "v.nii"
    path.write_bytes(header_bytes((8, 8, 8), vox_offset=offset) + b"\0" * 1024)
    message = _read(path)
    assert "not a valid NIfTI file (bad header" in message and fragment in message


def test_negative_dim_is_a_bad_header(tmp_path):
    block = bytearray(header_bytes((8, 8, 8)))
    struct.pack_into("<h", block, 44, -8)  # dim[2]
    (tmp_path / "d.nii").write_bytes(bytes(block) + b"\0" * 1024)
    assert "dim[2] is -8" in _read(tmp_path / "d.nii")


@pytest.mark.integration
def test_gzip_bomb_behind_a_small_header_is_not_inflated(tmp_path):
    """8^3 int16 declared (1 KB), 512 MB of zeros behind it: refused after ~1 MB of inflation."""
    bomb = tmp_path / "bomb.nii.gz"
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(2**20)
    with bomb.open("wb") as sink:
        sink.write(packer.compress(header_bytes((8, 8, 8))))
        for _ in range(512):
            sink.write(packer.compress(chunk))
        sink.write(packer.flush())
    code = ("import sys; from pathlib import Path\n"
            "from mtcmkd.preprocessing.convert import CaseError, read_nifti\n"
            "try:\n    read_nifti(Path(sys.argv[1]), 'c')\n"
            "except CaseError as exc:\n    print(exc)\n")
    done = peak_run([sys.executable, "-c", code, str(bomb)])
    assert "gzip data inflate beyond the 1,376 bytes its header declares" in done["stdout"], done
    assert done["peak_mb"] < 300, done


def test_gzip_members_padding_and_truncation(tmp_path):
    """Several gzip members (as gzip.decompress reads them) still read; a cut stream does not."""
    plain = small_volume(tmp_path / "v.nii", np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    raw = plain.read_bytes()
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[:200]) + b"\0" * 8 + gzip.compress(raw[200:]))
    np.testing.assert_array_equal(read_nifti(multi, "c").data, read_nifti(plain, "c").data)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(raw)[:-30])
    assert "truncated or corrupt gzip data" in _read(cut)


# --- C++ client: the same checks before allocation ------------------------------------------


@pytest.fixture(scope="module")
def cpp(tmp_path_factory):
    """(client, exported module) built once for this file."""
    reason = cpp_toolchain_missing()
    if reason:
        pytest.skip(f"C++ client not built: {reason}")
    sys.path.insert(0, str(TESTS))
    from test_export import write_student

    from mtcmkd.export import export_torchscript

    tmp = tmp_path_factory.mktemp("cpp-faults")
    client = build_cpp_client(tmp / "build", jobs=1)
    module = export_torchscript(write_student(tmp / "best_student.pt"), tmp / "student.pt")
    return client, module.path


def _client(cpp, source: Path, out: Path, *extra: str) -> dict:
    client, module = cpp
    return peak_run([str(client), str(module), str(source), str(out), "--threads", "1", *extra])


@pytest.mark.integration
@pytest.mark.parametrize(("name", "content", "fragment"), [
    ("huge.nii.gz", lambda: gzip.compress(header_bytes((32767,) * 3) + b"\0" * 1000),
     "32767x32767x32767 int16 = 35181150961663 voxels, above the limit of 2147483648"),
    ("offset.nii", lambda: header_bytes((8, 8, 8), vox_offset=1e20) + b"\0" * 1024,
     "bad vox_offset 1e+20"),
    ("nan_offset.nii", lambda: header_bytes((8, 8, 8), vox_offset=float("nan")) + b"\0" * 1024,
     "bad vox_offset nan"),
    ("lying.nii.gz", None, "truncated?): the header declares 1200x1200x1200 int16"),
])
def test_cpp_client_checks_header_before_allocating(cpp, tmp_path, name, content, fragment):
    source = tmp_path / name
    if content is None:
        lying_gzip(source)
    else:
        source.write_bytes(content())
    out = tmp_path / "seg.nii.gz"
    done = _client(cpp, source, out)
    err = done["stderr"].strip()
    assert done["rc"] == 2, done  # before: 134 (uncaught std::bad_alloc) for the first two
    assert err.startswith(f"error: {source}: ") and len(err.splitlines()) == 1, err
    assert fragment in err, err
    assert done["peak_mb"] < PEAK_MB, done
    assert not out.exists()


@pytest.mark.integration
def test_cpp_client_max_voxels_option(cpp, tmp_path):
    source = small_volume(tmp_path / "v.nii", np.arange(1, 1081, dtype=np.int16).reshape(12, 10, 9))
    done = _client(cpp, source, tmp_path / "seg.nii", "--max-voxels", "100")
    assert done["rc"] == 2 and "1080 voxels, above the limit of 100" in done["stderr"], done
    done = _client(cpp, source, tmp_path / "seg.nii", "--max-voxels", "ten")
    assert done["rc"] == 2 and "--max-voxels must be a positive integer" in done["stderr"]


@pytest.mark.integration
def test_cpp_client_checks_the_weights_digest(cpp, tmp_path):
    """The C++ client recomputes the export's weights_sha256: a flipped tensor is refused."""
    import shutil

    from test_faults_runs import flip_tensor_bytes

    _, module = cpp
    source = small_volume(tmp_path / "v.nii", np.arange(1, 1081, dtype=np.int16).reshape(12, 10, 9))
    good = _client(cpp, source, tmp_path / "seg.nii")
    assert good["rc"] == 0 and "digest" not in good["stderr"], good
    damaged = tmp_path / "damaged.pt"
    shutil.copy(module, damaged)
    flip_tensor_bytes(damaged)
    client, _ = cpp
    done = peak_run([str(client), str(damaged), str(source), str(tmp_path / "s2.nii"),
                     "--threads", "1"])
    err = done["stderr"].strip()
    assert done["rc"] == 2, done
    assert err == (f"error: {damaged}: weights do not match the digest recorded at export "
                   "(the file is damaged); export it again"), err
    assert not (tmp_path / "s2.nii").exists()


# --- slurm/train.sh: MTCMKD_ARGS is a word list, never globbed or run ------------------------


def _train_sh(tmp_path: Path, args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """slurm/train.sh with a stub srun that records its argv (NUL-separated), run in a folder
    holding the files that `data.patch_size=[64,64,64]` and `x=[4]` glob to."""
    bin_dir, cwd = tmp_path / "bin", tmp_path / "submit"
    bin_dir.mkdir()
    cwd.mkdir()
    for name in ("6", "4", "data.patch_size=6", "x=4"):
        (cwd / name).touch()
    argv = tmp_path / "srun.argv"
    (bin_dir / "srun").write_text(f"#!/bin/bash\nprintf '%s\\0' \"$@\" > '{argv}'\n")
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node1\n")
    for f in ("srun", "scontrol"):
        (bin_dir / f).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node1", "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "1",
           "MTCMKD_PYTHON": sys.executable, "MTCMKD_ARGS": args}
    done = subprocess.run(["bash", str(REPO / "slurm" / "train.sh"), "c.yaml", "store", "out"],
                          env=env, capture_output=True, text=True, cwd=cwd, timeout=60)
    return done, argv


def test_mtcmkd_args_are_split_like_a_shell_but_not_expanded(tmp_path):
    args = ("--set data.patch_size=[64,64,64] --set 'train.note=two words' "
            "--set \"x=[4]\" $HOME $(touch pwned) *")
    done, argv = _train_sh(tmp_path, args)
    assert done.returncode == 0, done.stderr
    words = argv.read_bytes().decode().split("\0")[:-1]
    extra = words[words.index("out") + 1:]
    assert extra == ["--set", "data.patch_size=[64,64,64]", "--set", "train.note=two words",
                     "--set", "x=[4]", "$HOME", "$(touch", "pwned)", "*"], words
    assert not (tmp_path / "submit" / "pwned").exists()


def test_mtcmkd_args_with_unbalanced_quote_stop_the_job(tmp_path):
    done, argv = _train_sh(tmp_path, "--set 'train.note=oops")
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: MTCMKD_ARGS: No closing quotation")
    assert not argv.exists()  # srun never ran


# --- tests/slurm_cluster.py: daemons never outlive the test run ------------------------------


def _record(registry: Path, owner: dict | None, daemons: list[dict]) -> None:
    registry.mkdir(parents=True, exist_ok=True)
    (registry / f"daemons-{(owner or {}).get('pid', 1)}.json").write_text(
        json.dumps({"owner": owner, "daemons": daemons}))


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "300"])


def _gone(proc: subprocess.Popen, timeout: float = 10) -> bool:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_leftovers_of_a_dead_run_are_stopped(tmp_path):
    registry = tmp_path / "registry"
    daemon, dead_owner = _sleeper(), _sleeper()
    try:
        owner = process_identity(dead_owner.pid)
        ident = process_identity(daemon.pid)
        dead_owner.kill()
        dead_owner.wait()
        _record(registry, owner, [ident])
        assert kill_leftovers(registry, timeout=5) == [daemon.pid]
        assert _gone(daemon) and not list(registry.glob("*.json"))
    finally:
        for p in (daemon, dead_owner):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_leftover_cleanup_spares_live_runs_and_reused_pids(tmp_path):
    registry = tmp_path / "registry"
    mine, other = _sleeper(), _sleeper()
    try:
        # A live owner (this process): another session's cluster, not a leftover.
        _record(registry, process_identity(os.getpid()), [process_identity(mine.pid)])
        # A dead owner whose recorded pid now belongs to a different process (start time).
        stale = {**process_identity(other.pid), "start": 1}
        _record(registry, {"pid": 999_999_999, "start": 1, "cmd": "python"}, [stale])
        assert kill_leftovers(registry, timeout=5) == []
        time.sleep(0.2)  # a signal would have arrived by now; nothing may have been sent
        assert mine.poll() is None and other.poll() is None
    finally:
        for p in (mine, other):
            p.kill()
            p.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_run_stops_its_daemons(tmp_path, sig):
    """A process holding a Cluster with a (stand-in) daemon is interrupted: the daemon goes
    too, and the run's registry file is removed."""
    registry = tmp_path / "registry"
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(TESTS)!r})
        from slurm_cluster import Cluster
        c = Cluster(Path({str(tmp_path)!r}), registry_dir=Path({str(registry)!r}))
        p = c.launch(["sleep", "300"], Path({str(tmp_path / "daemon.log")!r}))
        print(p.pid, flush=True)
        time.sleep(300)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(holder.stdout.readline())
        assert process_identity(pid)["cmd"] == "sleep"
        assert len(list(registry.glob("daemons-*.json"))) == 1
        holder.send_signal(sig)
        holder.wait(timeout=30)
        deadline = time.monotonic() + 10
        while process_identity(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process_identity(pid) is None
        assert not list(registry.glob("daemons-*.json"))
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_cluster_stop_is_idempotent_without_slurm(tmp_path):
    c = Cluster(tmp_path, registry_dir=tmp_path / "registry")
    proc = c.launch(["sleep", "300"], tmp_path / "d.log")
    c.stop()
    assert proc.poll() is not None and not c.procs
    c.stop()
