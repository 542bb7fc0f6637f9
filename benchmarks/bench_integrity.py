"""What the safety checks of issue 14 cost, and what they save.

- weights digest of the paper-size student (9.46 M parameters): seconds, and its share of
  `load_student`;
- checkpoint verification on resume: SHA-256 throughput over the step folder's bytes, and the
  time for a paper MTCM-KD checkpoint (its size computed from the parameter count: fp32
  weights plus Adam's two moments, as DeepSpeed writes them);
- the crafted 24 KB .nii.gz that claims 1200^3 int16 voxels with scl_slope 2: the reader's peak
  RSS in a fresh process (with `--old-python`, also under another checkout's interpreter, e.g.
  the code before the header checks).

    python benchmarks/bench_integrity.py [--old-python /path/to/old/.venv/bin/python] [--json F]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from mtcmkd.config import config_hash, load_config, to_dict
from mtcmkd.integrity import file_sha256, weights_digest
from mtcmkd.methods import build_method
from mtcmkd.student_weights import load_student, save_student

ROOT = Path(__file__).resolve().parents[1]

# Reads one NIfTI with the pipeline's reader and prints the peak RSS (MB) of this process.
_READ_PEAK = """
import resource, sys
from pathlib import Path
from mtcmkd.preprocessing.convert import CaseError, read_nifti
try:
    read_nifti(Path(sys.argv[1]), "probe")
    outcome = "read"
except CaseError as exc:
    outcome = str(exc)
except MemoryError:
    outcome = "MemoryError"
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(outcome)
"""


def _median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def paper_method():
    cfg = load_config(ROOT / "configs" / "mtcmkd-paper.yaml")
    return cfg, build_method(cfg, ("t1", "t1ce", "t2", "flair"))


def digest_figures(cfg, method, repeat: int, tmp: Path) -> dict:
    net = method.student_network()
    state = net.state_dict()
    n_params = sum(p.numel() for p in net.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    digest_s = _median_seconds(lambda: weights_digest(state), repeat)
    path = tmp / "student.pt"
    save_student(path, net, config=to_dict(cfg), config_hash=config_hash(cfg),
                 channels=("t1ce",), output=cfg.model.output, n_classes=cfg.model.n_classes,
                 patch_size=tuple(cfg.data.patch_size))
    load_s = _median_seconds(lambda: load_student(path), repeat)
    plain_s = _median_seconds(lambda: torch.load(path, weights_only=True), repeat)
    return {"student_params": n_params, "student_bytes": nbytes,
            "weights_digest_s": round(digest_s, 4), "load_student_s": round(load_s, 4),
            "torch_load_s": round(plain_s, 4),
            "digest_share_of_load_student": round(digest_s / load_s, 3)}


def checkpoint_figures(method, repeat: int, tmp: Path) -> dict:
    n_params = sum(p.numel() for p in method.parameters())
    ckpt_bytes = n_params * 4 * 3  # fp32 weights + Adam exp_avg + exp_avg_sq
    sample = tmp / "sample.bin"
    size = 256 * 2**20
    with open(sample, "wb") as fh:
        fh.write(os.urandom(size))
    sha_s = _median_seconds(lambda: file_sha256(sample), repeat)
    mb_per_s = size / 2**20 / sha_s
    return {"paper_mtcmkd_params": n_params, "paper_checkpoint_mb": round(ckpt_bytes / 2**20, 1),
            "sha256_mb_per_s": round(mb_per_s, 1),
            "paper_checkpoint_verify_s": round(ckpt_bytes / 2**20 / mb_per_s, 3)}


def crafted_header(tmp: Path) -> Path:
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((1200, 1200, 1200))
    block = bytearray(header.binaryblock)
    struct.pack_into("<fff", block, 108, 352.0, 2.0, 0.0)  # vox_offset, scl_slope, scl_inter
    noise = np.random.default_rng(0).integers(0, 256, 24_000, dtype=np.uint8).tobytes()
    path = tmp / "BraTS2021_00000_t1.nii.gz"
    path.write_bytes(gzip.compress(bytes(block) + b"\0" * 4 + noise))
    return path


# Linux keeps a process's peak RSS across fork and exec, so the reader is started from a small
# wrapper process rather than from this one (which holds torch and the paper networks).
_WRAP = """
import subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stdout.write(done.stdout)
sys.stderr.write(done.stderr)
sys.exit(done.returncode)
"""


def header_figures(python: str, probe: Path) -> dict:
    done = subprocess.run([sys.executable, "-S", "-c", _WRAP, python, "-c", _READ_PEAK,
                           str(probe)], capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or len(lines) < 2:
        return {"python": python, "error": done.stderr.strip().splitlines()[-1:]}
    return {"python": python, "peak_rss_mb": round(float(lines[0]), 1), "outcome": lines[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--old-python", help="another checkout's interpreter, for comparison")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        probe = crafted_header(tmp)
        cfg, method = paper_method()
        result = {
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__},
            "digest": digest_figures(cfg, method, args.repeat, tmp),
            "checkpoint": checkpoint_figures(method, args.repeat, tmp),
            "crafted_header": {"file_bytes": probe.stat().st_size,
                               "new": header_figures(sys.executable, probe)},
        }
        if args.old_python:
            result["crafted_header"]["old"] = header_figures(args.old_python, probe)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
