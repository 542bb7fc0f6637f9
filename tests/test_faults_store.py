"""The store is never damaged, never taken over, never silently partial (issue 14).

Each test reproduces one probe of the issue: two concurrent `preprocess` runs, an incomplete
case left behind, folds reshuffled by added cases, raw entries skipped without a word, a
foreign Zarr group taken over, options checked after the store was created, tracebacks for
impossible paths.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import tree_digest, write_raw
from typer.testing import CliRunner

from mtcmkd.cli.main import app
from mtcmkd.data.store import StoreFormatError, StoreInfo, check_store_complete, incomplete_cases
from mtcmkd.preprocessing import DatasetError, preprocess
from mtcmkd.preprocessing import convert as convert_mod
from mtcmkd.preprocessing.discover import scan_raw
from mtcmkd.preprocessing.driver import (
    LOCK_NAME,
    StoreLockedError,
    fold_assignment,
    stable_fold_assignment,
)

runner = CliRunner()
MTCMKD = [sys.executable, "-c", "from mtcmkd.cli.main import app; app()"]


def one_line_error(result) -> str:
    err = result.stderr.strip()
    assert result.exit_code == 2, result.output
    assert err.startswith("error:") and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


def assigned_folds(store: Path) -> dict[str, int]:
    return dict(zarr.open_group(str(store), mode="r").attrs["folds"]["assignment"])


@pytest.fixture
def lock_holder(tmp_path):
    """A second real process holding STORE/.lock (as a running preprocess does)."""
    procs = []

    def hold(store: Path) -> subprocess.Popen:
        store.mkdir(parents=True, exist_ok=True)
        code = ("import fcntl, os, sys\n"
                f"fd = os.open({str(store / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "os.pwrite(fd, f'{os.getpid()}\\n'.encode(), 0)\n"
                "print('locked', flush=True)\n"
                "sys.stdin.read()\n")
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "locked"
        procs.append(proc)
        return proc

    yield hold
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=30)


# ---------------------------------------------------------------- 1. one writer at a time


def test_second_writer_stops_at_once_naming_the_holder(tmp_path, raw2021, lock_holder):
    store = tmp_path / "store"
    holder = lock_holder(store)
    result = runner.invoke(app, ["preprocess", str(raw2021), str(store), "--folds", "2"])
    err = one_line_error(result)
    assert str(store) in err and f"pid {holder.pid}" in err and "--wait" in err
    # nothing written under the other writer's feet
    assert sorted(p.name for p in store.iterdir()) == [LOCK_NAME]
    with pytest.raises(StoreLockedError, match=f"pid {holder.pid}"):
        preprocess(raw2021, store)


@pytest.mark.integration
def test_wait_starts_when_the_holder_ends(tmp_path, raw2021, lock_holder):
    store = tmp_path / "store"
    holder = lock_holder(store)
    waiter = subprocess.Popen([*MTCMKD, "preprocess", str(raw2021), str(store), "--wait"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the waiter says so before blocking; only then let the holder go (no timing guess)
    line = waiter.stderr.readline()
    assert f"waiting for pid {holder.pid}" in line, line
    assert not (store / "cases").exists()
    holder.stdin.close()
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    assert incomplete_cases(store) == {} and len(assigned_folds(store)) == 3
    assert (store / LOCK_NAME).read_text() == ""  # no stale pid once released


@pytest.mark.integration
def test_two_concurrent_runs_leave_a_complete_store(tmp_path):
    """The probe: two `preprocess` runs started together on one store."""
    raw, store = tmp_path / "raw", tmp_path / "store"
    write_raw(raw, "2021", n=6)
    cmd = [*MTCMKD, "preprocess", str(raw), str(store), "--folds", "2"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert any(rc == 0 for rc, _ in outcomes), outcomes
    for rc, err in outcomes:
        # the loser (if they overlapped) stops at once with the lock message, no traceback
        assert rc == 0 or (rc == 2 and "is writing this store" in err
                           and "Traceback" not in err), err
    assert incomplete_cases(store) == {}
    assert len(StoreInfo.read(store).cases) == 6
    assert runner.invoke(app, ["store-info", str(store)]).exit_code == 0


def test_each_run_stages_in_its_own_folder_and_clears_stale_staging(tmp_path, monkeypatch):
    raw, store = tmp_path / "raw", tmp_path / "store"
    ids = sorted(write_raw(raw, "2021", n=3))
    real_write = convert_mod.write_case_group
    staged: list[Path] = []

    def spy(path, *args, **kwargs):
        staged.append(Path(path))
        real_write(path, *args, **kwargs)

    monkeypatch.setattr(convert_mod, "write_case_group", spy)
    preprocess(raw, store, n_folds=2)
    # STORE/.staging/<pid>-<random>/<case>: two runs never share a staging folder
    assert {p.parent.parent for p in staged} == {store / ".staging"}
    (run_dir,) = {p.parent.name for p in staged}
    assert run_dir.startswith(f"{os.getpid()}-")

    # a killed run's staging (old flat layout and per-run layout) is stale under the lock
    shutil.rmtree(store / "cases" / ids[0])
    for stale in (store / ".staging" / ids[0], store / ".staging" / "999-dead" / ids[1]):
        stale.mkdir(parents=True)
        (stale / "zarr.json").write_text("{}")
    report = preprocess(raw, store)
    # the deleted case was listed in the root attributes: re-converted as a repair
    assert report.count("repaired") == 1 and report.count("skipped") == 2
    assert not (store / ".staging").exists()


# ---------------------------------------------------------------- 1. completeness, repair


def test_rerun_repairs_a_case_without_its_image(tmp_path):
    raw = tmp_path / "raw"
    ids = sorted(write_raw(raw, "2021", n=3))
    preprocess(raw, tmp_path / "clean", n_folds=2)
    store = tmp_path / "store"
    preprocess(raw, store, n_folds=2)
    shutil.rmtree(store / "cases" / ids[1] / "image")  # the probe's damage
    assert "image" in incomplete_cases(store)[ids[1]]
    with pytest.raises(StoreFormatError, match=ids[1]):
        check_store_complete(store)

    report = preprocess(raw, store)
    assert report.count("repaired") == 1 and report.count("skipped") == 2
    assert [r.case_id for r in report.results if r.status == "repaired"] == [ids[1]]
    saved = json.loads((store / "preprocess_report.json").read_text())
    assert saved["n_repaired"] == 1
    assert saved["incomplete_found"][0]["case_id"] == ids[1]
    assert incomplete_cases(store) == {}
    a, b = tree_digest(tmp_path / "clean"), tree_digest(store)
    a.pop("preprocess_report.json"), b.pop("preprocess_report.json")
    assert a == b


def test_rerun_removes_incomplete_cases_it_cannot_reconvert(tmp_path):
    raw, store = tmp_path / "raw", tmp_path / "store"
    ids = sorted(write_raw(raw, "2021", n=3))
    preprocess(raw, store, n_folds=2)
    shutil.rmtree(store / "cases" / ids[2] / "label")
    shutil.rmtree(raw / ids[2])
    result = runner.invoke(app, ["preprocess", str(raw), str(store)])
    assert result.exit_code == 0, result.output
    assert f"incomplete {ids[2]}" in result.output and "removed (not in RAW)" in result.output
    assert json.loads((store / "preprocess_report.json").read_text())[
        "removed_incomplete"] == [ids[2]]
    assert StoreInfo.read(store).cases == tuple(ids[:2]) and incomplete_cases(store) == {}


def test_store_info_names_incomplete_cases_in_one_line(tmp_path, raw2021):
    store = tmp_path / "store"
    preprocess(raw2021, store, n_folds=2)
    cid = sorted(p.name for p in (store / "cases").iterdir())[0]
    shutil.rmtree(store / "cases" / cid / "image")
    err = one_line_error(runner.invoke(app, ["store-info", str(store)]))
    assert cid in err and "incomplete" in err and "mtcmkd preprocess" in err


@pytest.mark.parametrize("cases", [["BraTS2021_09999"], ["../escape"], [7], "BraTS2021_00000"],
                         ids=["missing", "path", "number", "string"])
def test_store_info_on_invalid_case_ids_is_one_line(tmp_path, raw2021, cases):
    store = tmp_path / "store"
    preprocess(raw2021, store, n_folds=2)
    meta = store / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["cases"] = cases
    meta.write_text(json.dumps(doc))
    err = one_line_error(runner.invoke(app, ["store-info", str(store)]))
    assert str(store) in err


def test_a_killed_first_run_is_recognised_and_resumed(tmp_path, raw2021, monkeypatch):
    store = tmp_path / "store"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_mod, "write_case_group", killed)
    with pytest.raises(KeyboardInterrupt):
        preprocess(raw2021, store)
    monkeypatch.undo()
    # the marker says "ours, unfinished": readers say so, the next run takes it
    err = one_line_error(runner.invoke(app, ["store-info", str(store)]))
    assert "never finished" in err
    assert preprocess(raw2021, store).count("converted") == 3


# ---------------------------------------------------------------- 4. stable folds


def test_stable_fold_assignment_keeps_old_cases_and_fills_small_folds():
    old = {"a": 0, "b": 0, "c": 1, "d": 2}
    out = stable_fold_assignment(["a", "b", "c", "d", "e", "f"], 3, 0, old)
    assert {k: out[k] for k in old} == old
    assert sorted(np.bincount(list(out.values()), minlength=3)) == [2, 2, 2]
    assert out == stable_fold_assignment(["f", "e", "d", "c", "b", "a"], 3, 0, old)
    # no previous folds: the plain deal, so a new store is unchanged by this rule
    ids = [f"c{i}" for i in range(7)]
    assert stable_fold_assignment(ids, 3, 5, None) == fold_assignment(ids, 3, 5)


def test_adding_cases_keeps_every_fold(tmp_path):
    """The probe: two cases added, preprocess re-run; fold 0 must not change."""
    more = tmp_path / "more"
    all_ids = sorted(write_raw(more, "2021", n=8))
    raw, store = tmp_path / "raw", tmp_path / "store"
    raw.mkdir()
    for cid in all_ids[:6]:
        shutil.copytree(more / cid, raw / cid)
    # no test set: every case is in a fold (the test set's own stability: tests/test_splits.py)
    preprocess(raw, store, n_folds=2, seed=0, test_fraction=0.0)
    before = assigned_folds(store)
    for cid in all_ids[6:]:
        shutil.copytree(more / cid, raw / cid)
    report = preprocess(raw, store)  # no --folds/--test-fraction: the store's are kept
    after = assigned_folds(store)
    assert {c: after[c] for c in before} == before
    assert sorted(np.bincount(list(after.values()))) == [4, 4]
    assert report.folds["kept"] == 6 and report.folds["dealt"] == all_ids[6:]
    assert report.folds["redealt_from"] is None


def test_changed_folds_are_redealt_and_said(tmp_path, raw2021):
    store = tmp_path / "store"
    preprocess(raw2021, store, n_folds=2)
    result = runner.invoke(app, ["preprocess", str(raw2021), str(store), "--folds", "3"])
    assert result.exit_code == 0, result.output
    assert "folds re-dealt" in result.output and "2 folds" in result.output
    saved = json.loads((store / "preprocess_report.json").read_text())
    assert saved["folds"]["redealt_from"] == {"n_folds": 2, "seed": 0}
    assert zarr.open_group(str(store), mode="r").attrs["folds"]["n_folds"] == 3


# ---------------------------------------------------------------- 5. nothing skipped silently


def test_symlinked_case_folder_is_followed_and_loops_end(tmp_path):
    shared, raw = tmp_path / "shared", tmp_path / "raw"
    ids = sorted(write_raw(shared, "2021", n=3))
    raw.mkdir()
    shutil.copytree(shared / ids[0], raw / ids[0])
    (raw / ids[1]).symlink_to(shared / ids[1], target_is_directory=True)
    (raw / "loop").symlink_to(raw, target_is_directory=True)  # a cycle must not hang
    scan = scan_raw(raw)
    assert [c.case_id for c in scan.cases] == ids[:2]
    assert [str(e.path) for e in scan.not_taken] == [str(raw / "loop")]
    report = preprocess(raw, tmp_path / "store")
    assert report.count("converted") == 2


def test_odd_folder_names_are_named_with_a_reason(tmp_path):
    raw, store = tmp_path / "raw", tmp_path / "store"
    ids = sorted(write_raw(raw, "2021", n=2))
    shutil.copytree(raw / ids[0], raw / f"{ids[0]} copy")
    shutil.copytree(raw / ids[1], raw / "BraTS2021_0000é")
    (raw / "notes.txt").write_text("x")
    (raw / ".DS_Store").write_text("x")
    result = runner.invoke(app, ["preprocess", str(raw), str(store), "--folds", "2"])
    assert result.exit_code == 0, result.output
    saved = {Path(e["path"]).name: e["reason"] for e in
             json.loads((store / "preprocess_report.json").read_text())["not_taken"]}
    assert set(saved) == {f"{ids[0]} copy", "BraTS2021_0000é", "notes.txt", ".DS_Store"}
    assert "a copy?" in saved[f"{ids[0]} copy"]
    assert "non-ASCII" in saved["BraTS2021_0000é"]
    for name in (f"{ids[0]} copy", "BraTS2021_0000é", "notes.txt"):
        assert f"not taken {raw / name}" in result.output.replace("\n", " ")


def test_msd_beside_brats_folders_is_refused_not_half_read(tmp_path):
    raw = tmp_path / "raw"
    write_raw(raw, "msd", n=2)
    brats = sorted(write_raw(raw, "2021", n=2))
    err = one_line_error(runner.invoke(app, ["preprocess", str(raw), str(tmp_path / "s")]))
    assert "imagesTr" in err and brats[0] in err and "--year" in err
    assert not (tmp_path / "s").exists()
    # forced, each layout is read whole and the other is named
    msd = scan_raw(raw, "msd")
    assert len(msd.cases) == 2 and {str(raw / c) for c in brats} <= {
        str(e.path) for e in msd.not_taken}
    only = scan_raw(raw, "2021")
    assert [c.case_id for c in only.cases] == brats
    assert str(raw / "imagesTr") in {str(e.path) for e in only.not_taken}


# ---------------------------------------------------------------- 8. foreign Zarr groups


def test_a_foreign_zarr_group_is_refused_untouched(tmp_path, raw2021):
    store = tmp_path / "theirs"
    group = zarr.open_group(str(store), mode="w", zarr_format=3)
    group.attrs["owner"] = "another lab"
    group.create_array("volume", shape=(4,), dtype="int16")[...] = 1
    before = tree_digest(store)
    err = one_line_error(runner.invoke(app, ["preprocess", str(raw2021), str(store)]))
    assert "not an mtcmkd store" in err
    assert tree_digest(store) == before


def test_an_empty_group_of_our_own_is_taken(tmp_path, raw2021):
    store = tmp_path / "store"
    zarr.open_group(str(store), mode="w", zarr_format=3).create_group("cases")
    assert preprocess(raw2021, store).count("converted") == 3


# ---------------------------------------------------------------- 10. options and paths


@pytest.mark.parametrize("args, expect", [
    (["--codec", "gzip"], "--codec"),
    (["--folds", "4"], "--folds 4 is more than the 3 labelled cases"),
    (["--folds", "1"], "--folds must be >= 2"),
    (["--dtype", "int8"], "--dtype"),
])
def test_options_are_checked_before_anything_is_created(tmp_path, raw2021, args, expect):
    store = tmp_path / "store"
    err = one_line_error(runner.invoke(app, ["preprocess", str(raw2021), str(store), *args]))
    assert expect in err
    assert not store.exists()


def test_one_labelled_case_cannot_be_split(tmp_path):
    raw, store = tmp_path / "raw", tmp_path / "store"
    write_raw(raw, "2021", n=1)
    err = one_line_error(runner.invoke(app, ["preprocess", str(raw), str(store), "--folds", "2"]))
    assert "only 1 labelled case" in err and "cannot be split" in err
    assert not store.exists()
    # without --folds it converts, and says the store cannot be split
    result = runner.invoke(app, ["preprocess", str(raw), str(store)])
    assert result.exit_code == 0 and "cannot be split" in result.output


def test_default_folds_fit_a_small_store(tmp_path, raw2021):
    preprocess(raw2021, tmp_path / "store")
    assert zarr.open_group(str(tmp_path / "store"), mode="r").attrs["folds"]["n_folds"] == 3


def test_impossible_store_paths_are_one_line(tmp_path, raw2021):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for store in (a_file, a_file / "store", Path("/proc/mtcmkd-store")):
        err = one_line_error(runner.invoke(app, ["preprocess", str(raw2021), str(store)]))
        assert str(store) in err
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        preprocess(raw2021, a_file / "deeper" / "store")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_store_is_one_line(tmp_path, raw2021):
    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o555)
    try:
        err = one_line_error(runner.invoke(app, ["preprocess", str(raw2021), str(store)]))
        assert "cannot write the store" in err
    finally:
        store.chmod(0o755)


def test_synth_into_an_existing_file_is_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out in (a_file, a_file / "raw"):
        err = one_line_error(runner.invoke(app, ["synth", str(out), "--cases", "1",
                                                 "--shape", "16", "16", "16", "--procedural"]))
        assert str(out) in err
    assert a_file.read_text() == "x"


def test_lock_is_flock_on_the_store_file(tmp_path, raw2021):
    """Held in this process too: a separate open file description conflicts."""
    store = tmp_path / "store"
    store.mkdir()
    fd = os.open(store / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(StoreLockedError, match="another process|pid"):
            preprocess(raw2021, store)
    finally:
        os.close(fd)
    assert preprocess(raw2021, store).count("converted") == 3
