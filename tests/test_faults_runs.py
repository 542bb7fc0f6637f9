"""Weights integrity and runs that cannot be mixed (issue 14, items 2, 4, 7, 10).

Each test reproduces one probe of the issue: a weights file with 64 flipped bytes inside a
tensor (checkpoint, student file, TorchScript export), a run folder reused by another run, a
`latest` pointing outside the run, a store changed under a run, and the training refusals that
used to be tracebacks (fold out of range, unusable stores, `--out` a file, bad COMPLETE, a text
file as the model, a patch that cannot fit in memory).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_raw
from typer.testing import CliRunner

from mtcmkd.cli.main import app
from mtcmkd.config import config_hash, load_config, to_dict
from mtcmkd.engine import checkpoint as ckpt
from mtcmkd.engine.trainer import (
    ACTIVATION_FACTOR,
    BACKWARD_OVERHEAD,
    BYTES_PER_PARAMETER,
    TrainError,
    check_training_store,
    estimate_training_memory,
)
from mtcmkd.export.source import ExportError
from mtcmkd.export.torchscript import METADATA_FILE, export_torchscript, load_exported
from mtcmkd.integrity import WEIGHTS_DIGEST_KEY, WeightsIntegrityError, weights_digest
from mtcmkd.models import build_network
from mtcmkd.preprocessing import preprocess
from mtcmkd.student_weights import load_student, save_student

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
FAST = ["--set", "train.epochs=1", "--set", "train.iters_per_epoch=2", "--set",
        "train.ckpt_every=1", "--set", "train.val_cases=1", "--set", "data.patch_size=[16,16,16]"]
runner = CliRunner()
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.:DeprecationWarning")


# --- helpers ---------------------------------------------------------------------------------


def flip_tensor_bytes(path: Path, n: int = 64) -> str:
    """Overwrite `n` bytes in the middle of the largest tensor storage of a torch zip file.

    The archive stays valid (entries are stored uncompressed and torch does not check CRCs),
    so `torch.load` still succeeds: only the digest can tell. Returns the entry's name.
    """
    with zipfile.ZipFile(path) as archive:
        entries = [i for i in archive.infolist() if "/data/" in i.filename
                   and i.compress_type == zipfile.ZIP_STORED and i.file_size >= 4 * n]
        info = max(entries, key=lambda i: i.file_size)
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
        start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        fh.seek(start)
        old = fh.read(n)
        fh.seek(start)
        fh.write(bytes(b ^ 0x5A for b in old))
    return info.filename


def write_student(path: Path, *, digest: bool = True) -> Path:
    cfg = load_config(TINY)
    torch.manual_seed(0)
    net = build_network("resunet", 1, 4, (8, 16, 24, 32))
    save_student(path, net, config=to_dict(cfg), config_hash=config_hash(cfg),
                 channels=("t1ce",), output="softmax", n_classes=4, patch_size=(16, 16, 16))
    if not digest:  # a file as written before digests existed
        payload = torch.load(path, weights_only=True)
        del payload[WEIGHTS_DIGEST_KEY]
        torch.save(payload, path)
    return path


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu"}


def train_cmd(store: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mtcmkd", "train", "--config", str(TINY), "--store",
            str(store), "--out", str(out), *FAST, *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- the digest ------------------------------------------------------------------------------


def test_weights_digest_follows_the_spec():
    state = {
        "b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7,
        "a.steps": torch.tensor(5, dtype=torch.int64),
        "c.half": torch.tensor([[1.5, -2.25]], dtype=torch.bfloat16),
    }
    expected = hashlib.sha256()
    # An independent reading of the spec: numpy bytes, bf16 through its int16 bit pattern.
    for name, dtype, shape, raw in (
            ("a.steps", "int64", "", np.int64(5).tobytes()),
            ("b.weight", "float32", "2,3", (np.arange(6, dtype=np.float32) / 7).tobytes()),
            ("c.half", "bfloat16", "1,2", state["c.half"].view(torch.int16).numpy().tobytes())):
        expected.update(name.encode() + b"\0" + dtype.encode() + b"\0" + shape.encode() + b"\0")
        expected.update(raw)
    assert weights_digest(state) == expected.hexdigest()
    # Strides do not matter, values do.
    t = torch.arange(6, dtype=torch.float32).reshape(3, 2).t()
    assert weights_digest({"x": t}) == weights_digest({"x": t.contiguous()})
    changed = dict(state, **{"b.weight": state["b.weight"].clone()})
    changed["b.weight"][1, 2] += 1e-6
    assert weights_digest(changed) != weights_digest(state)


# --- student files ---------------------------------------------------------------------------


def test_flipped_student_file_is_refused_by_every_loader(tmp_path):
    student = write_student(tmp_path / "student.pt")
    load_student(student)  # intact: loads
    flip_tensor_bytes(student)
    torch.load(student, weights_only=True)  # the probe: torch alone does not notice
    with pytest.raises(WeightsIntegrityError, match="digest"):
        load_student(student)

    result = runner.invoke(app, ["export", "torchscript", str(student), "--out",
                                 str(tmp_path / "ts.pt"), "--verify"])
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert str(student) in line and "digest" in line
    assert not (tmp_path / "ts.pt").exists()

    case = tmp_path / "raw"
    write_raw(case, "2021", n=1)
    result = runner.invoke(app, ["predict", "--model", str(student), "--input",
                                 str(next(case.iterdir())), "--output", str(tmp_path / "pred")])
    assert result.exit_code == 2
    assert "digest" in one_error_line(result.stderr)


def test_student_file_without_digest_loads_with_one_warning(tmp_path, capsys):
    student = write_student(tmp_path / "old.pt", digest=False)
    bundle = load_student(student)
    assert bundle.n_classes == 4
    err = capsys.readouterr().err
    line = one_error_line(err)
    assert line.startswith("warning:") and str(student) in line


def test_text_file_as_model_is_a_one_line_refusal(tmp_path):
    for text in ("hello world\n", "model weights\nline two\n", "x" * 1000, ""):
        bad = tmp_path / "model.pt"
        bad.write_text(text)
        with pytest.raises(ckpt.CheckpointError, match="not a PyTorch weights file"):
            load_student(bad)
        result = runner.invoke(app, ["export", "torchscript", str(bad), "--out",
                                     str(tmp_path / "ts.pt")])
        assert result.exit_code == 2, result.output
        assert str(bad) in one_error_line(result.stderr)


# --- TorchScript export ----------------------------------------------------------------------


def test_torchscript_export_records_and_checks_its_digest(tmp_path):
    student = write_student(tmp_path / "student.pt")
    exported = export_torchscript(student, tmp_path / "ts.pt").path
    extra = {METADATA_FILE: "", WEIGHTS_DIGEST_KEY: ""}
    module = torch.jit.load(str(exported), _extra_files=extra)
    # What the C++ client recomputes: the digest of the scripted module's state_dict().
    assert extra[WEIGHTS_DIGEST_KEY].decode() == weights_digest(module.state_dict())
    load_exported(exported)

    flip_tensor_bytes(exported)
    torch.jit.load(str(exported))  # the probe: TorchScript alone does not notice
    with pytest.raises(ExportError, match="digest"):
        load_exported(exported)


def test_torchscript_export_without_digest_loads_with_one_warning(tmp_path, capsys):
    student = write_student(tmp_path / "student.pt")
    exported = export_torchscript(student, tmp_path / "ts.pt").path
    extra = {METADATA_FILE: ""}
    module = torch.jit.load(str(exported), _extra_files=extra)
    old = tmp_path / "old.pt"
    torch.jit.save(module, str(old), _extra_files=extra)  # as exported before digests
    capsys.readouterr()
    load_exported(old)
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("warning:") and str(old) in line


@pytest.mark.integration
def test_flipped_pt2_export_is_refused(tmp_path):
    from mtcmkd.export.patch_network import export_pt2, load_pt2

    exported = export_pt2(write_student(tmp_path / "student.pt"), tmp_path / "s.pt2",
                          check=False).path
    load_pt2(exported)
    flip_tensor_bytes(exported)
    with pytest.raises(ExportError, match="digest"):
        load_pt2(exported)


# --- checkpoints (library) -------------------------------------------------------------------


def _step(ckpt_dir: Path, tag: str = "step_00000001", *, digests: bool = True) -> Path:
    step = ckpt_dir / tag
    step.mkdir(parents=True)
    torch.save({"module": {"w": torch.randn(64, 64)}}, step / "mp_rank_00_model_states.pt")
    meta = {"config_hash": "abc", "step": 1}
    if digests:
        meta[ckpt.FILES_SHA256] = ckpt.step_files_sha256(step)
    (step / ckpt.COMPLETE).write_text(json.dumps(meta))
    (ckpt_dir / ckpt.LATEST).write_text(tag + "\n")
    return step


def test_checkpoint_digests_catch_a_flipped_tensor(tmp_path):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    step = _step(ckpt_dir)
    meta = ckpt.read_complete(ckpt_dir, step.name)
    assert ckpt.verify_files(ckpt_dir, step.name, meta) is True
    flip_tensor_bytes(step / "mp_rank_00_model_states.pt")
    with pytest.raises(ckpt.CheckpointError, match="mp_rank_00_model_states.pt: content differs"):
        ckpt.verify_files(ckpt_dir, step.name, meta)
    # A checkpoint from before digests: verified False, not refused.
    old_dir = tmp_path / "old" / "checkpoints"
    old = _step(old_dir, digests=False)
    assert ckpt.verify_files(old_dir, old.name, ckpt.read_complete(old_dir, old.name)) is False


def test_latest_must_name_a_step_folder_of_the_run(tmp_path):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    _step(ckpt_dir)
    assert ckpt.latest_tag(ckpt_dir) == "step_00000001"
    elsewhere = _step(tmp_path / "other" / "checkpoints", "step_00000009")
    for pointer in ("../../other/checkpoints/step_00000009", str(elsewhere)):
        (ckpt_dir / ckpt.LATEST).write_text(pointer + "\n")
        with pytest.raises(ckpt.CheckpointError, match="points outside the run folder"):
            ckpt.latest_tag(ckpt_dir)
    (ckpt_dir / "step_00000010").symlink_to(elsewhere)
    (ckpt_dir / ckpt.LATEST).write_text("step_00000010\n")
    with pytest.raises(ckpt.CheckpointError, match="points outside the run folder"):
        ckpt.latest_tag(ckpt_dir)


def test_bad_complete_file_is_a_checkpoint_error(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    step = _step(ckpt_dir)
    for text in ("{not json", "[1, 2]", "\xff"):
        (step / ckpt.COMPLETE).write_text(text, encoding="latin-1")
        with pytest.raises(ckpt.CheckpointError, match="COMPLETE"):
            ckpt.read_complete(ckpt_dir, step.name)


# --- training: store checks and memory estimate (library) ------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("faults")
    write_raw(tmp / "raw", "2021", n=4, shape=(24, 28, 20))
    report = preprocess(tmp / "raw", tmp / "store", n_folds=2)
    assert not report.failed
    return tmp / "store"


def test_store_checks_refuse_bad_folds_and_missing_labels(store, tmp_path):
    info, train_ids, val_ids = check_training_store(store, 0)
    assert train_ids and val_ids
    with pytest.raises(TrainError, match="fold 7 out of range"):
        check_training_store(store, 7)
    broken = tmp_path / "store"
    shutil.copytree(store, broken)
    shutil.rmtree(broken / "cases" / train_ids[0] / "label" / "c")
    with pytest.raises(Exception, match=train_ids[0]) as caught:
        check_training_store(broken, 0)
    assert caught.type.__name__ in ("TrainError", "StoreFormatError")


def test_store_checks_refuse_one_case_and_unlabelled_stores(tmp_path):
    write_raw(tmp_path / "one", "2021", n=1)
    assert not preprocess(tmp_path / "one", tmp_path / "s1").failed
    with pytest.raises(TrainError, match="both must be non-empty"):
        check_training_store(tmp_path / "s1", 0)
    raw = tmp_path / "nolabels"
    write_raw(raw, "2021", n=2)
    for seg in raw.rglob("*seg.nii.gz"):
        seg.unlink()
    assert not preprocess(raw, tmp_path / "s0").failed
    with pytest.raises(TrainError, match="no labelled cases"):
        check_training_store(tmp_path / "s0", 0)


def test_memory_estimate_counts_activations_from_the_widths():
    widths, patch = (8, 16, 24, 32), (32, 32, 32)
    units = 8 * 32**3 + 16 * 16**3 + 24 * 8**3 + 32 * 4**3
    want = units * ACTIVATION_FACTOR["resunet"] * 4 * 2 * 4 * BACKWARD_OVERHEAD + 1000 * \
        BYTES_PER_PARAMETER
    got = estimate_training_memory(widths, "resunet", 4, 1000, patch, 2, 4)
    assert got == int(want)
    # bf16 halves the activations; a 256^3 patch of the tiny MTCM-KD needs ~100 GiB.
    assert estimate_training_memory(widths, "resunet", 4, 0, patch, 2, 2) == int(
        units * ACTIVATION_FACTOR["resunet"] * 2 * 2 * 4 * BACKWARD_OVERHEAD)
    assert estimate_training_memory(widths, "resunet", 4, 0, (256,) * 3, 1, 4) > 64 * 2**30


# --- training: end to end (subprocess, one tiny run) -----------------------------------------


@pytest.fixture(scope="module")
def finished_run(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "ref"
    r = run(train_cmd(store, out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.mark.integration
def test_run_records_its_splits_and_checkpoint_digests(store, finished_run):
    splits = json.loads((finished_run / "splits.json").read_text())
    assert list(splits) == ["store", "store_fingerprint", "fold", "train", "validation", "test"]
    info, train_ids, val_ids = check_training_store(store, 0)
    assert splits["store"] == str(store.resolve()) and splits["fold"] == 0
    assert splits["train"] == train_ids and splits["validation"] == val_ids
    assert splits["test"] == []
    from mtcmkd.data.store import store_fingerprint

    assert splits["store_fingerprint"] == store_fingerprint(store)
    tag = ckpt.latest_tag(finished_run / "checkpoints")
    meta = ckpt.read_complete(finished_run / "checkpoints", tag)
    assert ckpt.verify_files(finished_run / "checkpoints", tag, meta) is True
    for name in ("student.pt", "best_student.pt"):
        assert WEIGHTS_DIGEST_KEY in torch.load(finished_run / name, weights_only=True)


@pytest.mark.integration
def test_resume_refuses_a_flipped_checkpoint(store, finished_run, tmp_path):
    out = tmp_path / "flipped"
    shutil.copytree(finished_run, out)
    tag = ckpt.latest_tag(out / "checkpoints")
    target = out / "checkpoints" / tag / "mp_rank_00_model_states.pt"
    flip_tensor_bytes(target)
    before = (out / "student.pt").read_bytes()
    r = run(train_cmd(store, out, "--resume"))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    line = one_error_line(r.stderr)
    assert str(target) in line and "digest" in line
    assert (out / "student.pt").read_bytes() == before


@pytest.mark.integration
def test_resume_of_a_checkpoint_without_digests_warns_and_runs(store, finished_run, tmp_path):
    out = tmp_path / "legacy"
    shutil.copytree(finished_run, out)
    tag = ckpt.latest_tag(out / "checkpoints")
    complete = out / "checkpoints" / tag / ckpt.COMPLETE
    meta = json.loads(complete.read_text())
    del meta[ckpt.FILES_SHA256]
    complete.write_text(json.dumps(meta))
    (out / "splits.json").unlink()  # runs from before splits.json resume too
    r = run(train_cmd(store, out, "--resume"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resumed unverified" in r.stdout and (out / "splits.json").is_file()


@pytest.mark.integration
def test_resume_refuses_a_changed_store(store, tmp_path):
    own = tmp_path / "store"
    shutil.copytree(store, own)
    out = tmp_path / "run"
    r = run(train_cmd(own, out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    case = sorted((own / "cases").iterdir())[0] / "zarr.json"
    meta = json.loads(case.read_text())
    meta["attributes"]["source_sha256"] = "re-converted"
    case.write_text(json.dumps(meta))
    r = run(train_cmd(own, out, "--resume"))
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert str(own) in line and "store changed" in line


@pytest.mark.integration
def test_train_refuses_a_folder_of_another_run(store, finished_run, tmp_path):
    out = tmp_path / "no_ckpt"
    shutil.copytree(finished_run, out)
    shutil.rmtree(out / "checkpoints")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    r = run(train_cmd(store, out, "--set", "train.seed=7"))  # another config: another run
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert "another run's files" in line and "config.yaml" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.integration
def test_same_run_without_checkpoint_starts_again_with_its_files_set_aside(
        store, finished_run, tmp_path):
    """A node failure before the first checkpoint: the requeued job (same config, no
    --resume) starts again; the attempt's files move to attempt-1/, so no log mixes two."""
    out = tmp_path / "requeued"
    shutil.copytree(finished_run, out)
    shutil.rmtree(out / "checkpoints")
    old_log = (out / "log.jsonl").read_bytes()
    r = run(train_cmd(store, out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "starting again" in r.stdout + r.stderr
    assert (out / "attempt-1" / "log.jsonl").read_bytes() == old_log
    assert (out / "attempt-1" / "config.yaml").is_file()
    assert ckpt.latest_tag(out / "checkpoints") is not None


@pytest.mark.integration
def test_resume_accepts_a_config_saved_before_a_new_field_with_its_default(
        store, finished_run, tmp_path):
    """Adding a config field (with a default) must not orphan older runs' checkpoints."""
    out = tmp_path / "older"
    shutil.copytree(finished_run, out)
    saved = out / "config.yaml"
    text = saved.read_text()
    assert "performance_dice: patch3d" in text
    # As an older version wrote it: without the field, and hashed without it.
    older = "\n".join(line for line in text.splitlines()[1:]
                      if "performance_dice" not in line) + "\n"
    data = yaml.safe_load(older)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    old_hash = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    saved.write_text(f"# mtcmkd run config, hash {old_hash}\n" + older)
    tag = ckpt.latest_tag(out / "checkpoints")
    complete = out / "checkpoints" / tag / "COMPLETE"
    meta = json.loads(complete.read_text())
    meta["config_hash"] = old_hash
    complete.write_text(json.dumps(meta))
    r = run(train_cmd(store, out, "--resume", "--set", "train.epochs=3"))
    # --set changes the config: refused as before, naming both hashes.
    assert r.returncode == 2 and "config differs" in one_error_line(r.stderr)
    r = run(train_cmd(store, out, "--resume"))
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.integration
def test_train_one_line_refusals(store, finished_run, tmp_path):
    as_file = tmp_path / "file"
    as_file.write_text("x")
    cases = [
        (train_cmd(store, as_file), "existing file"),
        (train_cmd(store, tmp_path / "f", "--set", "data.fold=5"), "fold 5 out of range"),
        (train_cmd(store, tmp_path / "m", "--set", "data.patch_size=[384,384,384]"),
         "GiB available"),
    ]
    outside = tmp_path / "outside"
    shutil.copytree(finished_run, outside)
    (outside / "checkpoints" / "latest").write_text("../../elsewhere\n")
    cases.append((train_cmd(store, outside, "--resume"), "points outside the run folder"))
    bad_json = tmp_path / "bad_json"
    shutil.copytree(finished_run, bad_json)
    tag = ckpt.latest_tag(bad_json / "checkpoints")
    (bad_json / "checkpoints" / tag / "COMPLETE").write_text("{oops")
    cases.append((train_cmd(store, bad_json, "--resume"), "unreadable COMPLETE"))
    # A checkpoint from before digests is still guarded by weights_only loading.
    evil = tmp_path / "evil"
    shutil.copytree(finished_run, evil)
    tag = ckpt.latest_tag(evil / "checkpoints")
    complete = evil / "checkpoints" / tag / "COMPLETE"
    meta = json.loads(complete.read_text())
    del meta[ckpt.FILES_SHA256]
    complete.write_text(json.dumps(meta))
    with open(evil / "checkpoints" / tag / "mp_rank_00_model_states.pt", "wb") as fh:
        pickle.dump({"module": _Evil(tmp_path / "pwned")}, fh)
    cases.append((train_cmd(store, evil, "--resume"), "refused to load"))
    for cmd, expected in cases:
        r = run(cmd)
        assert r.returncode == 2, (expected, r.stderr[-2000:])
        assert expected in one_error_line(r.stderr), expected
    assert not (tmp_path / "m").exists() and not (tmp_path / "f").exists()
    assert not (tmp_path / "pwned").exists()


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))
