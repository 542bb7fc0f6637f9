"""Issue 20, items 2 and 7: progress where people look (a log file under SLURM or nohup, not
only a terminal), and tables that keep every number when piped.

`predict` and `evaluate` print one line per case with its time and an ETA when their output is
not a terminal (rich's bar prints nothing there until the end); the C++ client says what it
does on stderr during a long step; rich tables are not cut at 80 columns in a log.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_raw
from rich.table import Table
from test_evaluate import make_student, student_env
from typer.testing import CliRunner

from mtcmkd.cli.console import PIPED_WIDTH, CaseProgress, _LogFriendlyConsole, format_duration
from mtcmkd.cli.main import app

SHAPE = (24, 28, 20)
runner = CliRunner()
#: A per-case progress line: `case 3/12 BraTS2021_00005 41.2 s, ETA 6 min`.
CASE_LINE = re.compile(r"^case (\d+)/(\d+) (\S+) \d+\.\d s( failed)?, (ETA|all done in) .+$")


def invoke(*args: object, **env: str):
    return runner.invoke(app, [str(a) for a in args], env=env or None)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return student_env(tmp_path_factory.mktemp("progress"), kind="kdnet", widths=(2, 4, 6))


class FakeClock:
    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


# --------------------------------------------------------------------------- the progress lines


def test_case_progress_prints_one_line_per_case_with_eta_when_not_a_terminal():
    buffer = io.StringIO()
    out = _LogFriendlyConsole(file=buffer, highlight=False)  # a StringIO is not a terminal
    # start at 0; cases end at 40, 100 and 130 s
    with CaseProgress("predict", 3, out=out, clock=FakeClock(0.0, 40.0, 100.0, 130.0)) as bar:
        assert bar.case_done("BraTS2021_00000") == "case 1/3 BraTS2021_00000 40.0 s, ETA 80 s"
        bar.case_done("BraTS2021_00001", "failed")
        bar.case_done("BraTS2021_00002")
    assert buffer.getvalue().splitlines() == [
        "case 1/3 BraTS2021_00000 40.0 s, ETA 80 s",
        "case 2/3 BraTS2021_00001 60.0 s failed, ETA 50 s",  # 100 s / 2 cases * 1 left
        "case 3/3 BraTS2021_00002 30.0 s, all done in 2 min",  # 130 s
    ]


def test_case_progress_keeps_the_bar_and_prints_no_lines_on_a_terminal():
    buffer = io.StringIO()
    out = _LogFriendlyConsole(file=buffer, force_terminal=True, highlight=False)
    with CaseProgress("predict", 2, out=out, clock=FakeClock(0.0, 1.0, 2.0)) as bar:
        bar.case_done("a")
        bar.case_done("b")
    assert "case 1/2" not in buffer.getvalue()  # the bar drew itself instead (transient)


def test_progress_within_a_case_every_30_s_when_not_a_terminal():
    buffer = io.StringIO()
    out = _LogFriendlyConsole(file=buffer, highlight=False)
    # start 0; windows reported at 10, 35, 50, 70 s; the case ends at 80 s
    with CaseProgress("predict", 2, out=out,
                      clock=FakeClock(0.0, 10.0, 35.0, 50.0, 70.0, 80.0)) as bar:
        assert bar.windows(100, 1000) is None  # 10 s into the case: too early
        assert bar.windows(350, 1000) == "case 1/2: windows 350/1000, 65 s left in the case"
        assert bar.windows(500, 1000) is None  # 15 s after the last line
        assert bar.windows(700, 1000) == "case 1/2: windows 700/1000, 30 s left in the case"
        bar.case_done("BraTS2021_00000")
    assert buffer.getvalue().splitlines()[:2] == [
        "case 1/2: windows 350/1000, 65 s left in the case",
        "case 1/2: windows 700/1000, 30 s left in the case"]


def test_sliding_window_reports_its_windows_eagerly_and_scripts_unchanged():
    from mtcmkd.inference import SlidingWindow, window_progress

    net = torch.nn.Conv3d(1, 2, 1)
    window = SlidingWindow(net, (8, 8, 8), 2, overlap=0.5, window_batch=2)
    x = torch.rand(1, 1, 16, 12, 8)
    calls: list[tuple[int, int]] = []
    with window_progress(lambda done, total: calls.append((done, total))):
        eager = window(x)
        scripted = torch.jit.script(window)(x)
    # 3 x 2 x 1 windows of 8 with step 4, two per network call
    assert calls == [(2, 6), (4, 6), (6, 6)]
    assert torch.equal(eager, scripted)
    window(x)  # outside the block: no callback
    assert len(calls) == 3


@pytest.mark.parametrize(("seconds", "text"), [
    (0.4, "0 s"), (41.2, "41 s"), (89, "89 s"), (90, "2 min"), (360, "6 min"),
    (89 * 60, "89 min"), (2 * 3600 + 5 * 60, "2 h 05 min")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_predict_prints_per_case_lines_in_a_log(env, tmp_path):
    # One case without its T1ce: it fails, and its line says so; the others are timed.
    raw = tmp_path / "raw"
    for case_id in env["ids"][:3]:
        (raw / case_id).mkdir(parents=True)
        for f in (env["raw"] / case_id).iterdir():
            (raw / case_id / f.name).write_bytes(f.read_bytes())
    broken = env["ids"][1]
    (raw / broken / f"{broken}_t1ce.nii.gz").write_bytes(b"not a NIfTI")
    result = invoke("predict", "--run", env["run"], "--input", raw, "--out", tmp_path / "p")
    assert result.exit_code == 1, result.output + result.stderr
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("case ")]
    # the unreadable file is found by the header check before inference: 2 cases are run
    assert [CASE_LINE.match(ln).group(3) for ln in lines] == [env["ids"][0], env["ids"][2]], lines
    assert lines[0].startswith("case 1/2 ") and ", ETA " in lines[0]
    assert lines[1].startswith("case 2/2 ") and ", all done in " in lines[1]


def test_predict_marks_a_case_that_fails_during_inference(env, tmp_path):
    import nibabel as nib

    case_id = env["ids"][0]
    t1ce = env["raw"] / case_id / f"{case_id}_t1ce.nii.gz"
    zero = tmp_path / f"{case_id}_t1ce.nii.gz"  # readable, but an all-zero brain
    image = nib.load(t1ce)
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.int16), image.affine), zero)
    result = invoke("predict", "--run", env["run"], "--input", zero, "--out", tmp_path / "p")
    assert result.exit_code == 1
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("case ")]
    assert len(lines) == 1 and CASE_LINE.match(lines[0]).group(4) == " failed", lines


def test_evaluate_run_prints_per_case_lines_in_a_log(env, tmp_path):
    result = invoke("evaluate", "--run", env["run"], "--split", "validation", "--out",
                    tmp_path / "e")
    assert result.exit_code == 0, result.output + result.stderr
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("case ")]
    assert lines and all(CASE_LINE.match(ln) for ln in lines), lines
    n = len(lines)
    assert [int(CASE_LINE.match(ln).group(1)) for ln in lines] == list(range(1, n + 1))
    assert lines[-1].startswith(f"case {n}/{n} ") and "all done in" in lines[-1]


# ------------------------------------------------------------------------- tables in a log


def test_piped_console_is_wide_even_when_columns_says_80():
    out = _LogFriendlyConsole(file=io.StringIO(), highlight=False, _environ={"COLUMNS": "80"})
    assert out.width == PIPED_WIDTH
    on_terminal = _LogFriendlyConsole(file=io.StringIO(), force_terminal=True,
                                      _environ={"COLUMNS": "80"})
    assert on_terminal.width == 80  # a terminal keeps its own width


def test_a_wide_table_keeps_every_number_when_piped():
    buffer = io.StringIO()
    out = _LogFriendlyConsole(file=buffer, highlight=False, _environ={"COLUMNS": "80"})
    table = Table(title="wide")
    numbers = [f"{1234567.891 * (i + 1):.3f}" for i in range(12)]
    for i in range(12):
        table.add_column(f"column {i}", justify="right")
    table.add_row(*numbers)
    out.print(table)
    text = buffer.getvalue()
    assert "…" not in text and all(n in text for n in numbers), text


def test_evaluate_tables_are_not_cut_in_a_log(env, tmp_path):
    # 2023 case ids are long and the lesion-wise table has 7 columns: at 80 columns rich cut
    # the ids and numbers ("BraTS-GLI-0…").
    raw = tmp_path / "raw"
    ids = write_raw(raw, "2023", n=2, shape=SHAPE)
    pred = tmp_path / "pred"
    pred.mkdir()
    for case_id in ids:
        (pred / f"{case_id}.nii.gz").write_bytes((raw / case_id / f"{case_id}-seg.nii.gz")
                                                 .read_bytes())
    result = invoke("evaluate", "--pred", pred, "--gt", raw, "--out", tmp_path / "e",
                    "--legacy-slice-dice", COLUMNS="80")
    assert result.exit_code == 0, result.output + result.stderr
    out = result.stdout
    assert "…" not in out, out
    # Every header and row on one line: at 80 columns rich broke "Dice TC" over two lines,
    # "this evaluation" too, and a long case id would be cut.
    for header in ("Dice TC", "HD95 WT", "slice Dice ET", "this evaluation", "BraTS 2023, 2 cases"):
        assert header in out, (header, out)
    rows = [ln for ln in out.splitlines() if ln.startswith("│ BraTS-GLI-")]
    assert len(rows) == 3 * len(ids), out  # legacy, lesion-wise and slice tables
    cells = [[c.strip() for c in ln.split("│")[2:-1]] for ln in rows]
    # perfect predictions: Dice 1.000 (fractions, as in metrics.csv), HD95 0.00 mm
    assert all(len(c) in (3, 6) and set(c) <= {"1.000", "0.00"} for c in cells), rows


# --------------------------------------------------------------------------- the C++ client


@pytest.fixture(scope="module")
def cpp(tmp_path_factory):
    from mtcmkd.export import export_torchscript
    from mtcmkd.export.cpp_client import build_cpp_client, cpp_toolchain_missing

    reason = cpp_toolchain_missing()
    if reason:
        pytest.skip(f"C++ client not built: {reason}")
    root = tmp_path_factory.mktemp("cpp_progress")
    client = build_cpp_client(root / "build")
    student = make_student(root / "student.pt", None, kind="kdnet", widths=(2, 4, 6),
                           patch=(16, 16, 16))
    module = export_torchscript(student, root / "exported.pt").path
    return client, module


@pytest.mark.integration
def test_cpp_client_says_what_it_does_on_stderr_and_writes_the_same_file(cpp, env, tmp_path):
    client, module = cpp
    case_id = env["ids"][0]
    source = env["raw"] / case_id / f"{case_id}_t1ce.nii.gz"

    def run(out: Path, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(client), str(module), str(source), str(out), "--threads",
                               "1"], capture_output=True, text=True, timeout=300,
                              env={**os.environ, **extra})

    quiet_default = run(tmp_path / "a.nii.gz")  # a quick run: no step lasts 10 s
    announced = run(tmp_path / "b.nii.gz", MTCMKD_SEGMENT_PROGRESS_S="0")
    assert quiet_default.returncode == 0 and announced.returncode == 0, announced.stderr
    assert quiet_default.stderr == ""
    lines = announced.stderr.splitlines()
    expected = [f"loading {module}", f"reading {source}",
                f"segmenting {source} ({SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]}, labels 2021, 1 "
                f"threads)", f"writing {tmp_path / 'b.nii.gz'}"]
    starts = [ln for ln in lines if ln.endswith(" ...")]
    assert starts == [f"mtcmkd_segment: {what} ..." for what in expected], lines
    dones = [ln for ln in lines if re.search(r" done in \d+\.\d s$", ln)]
    assert len(dones) == 4, lines
    # the output files are the same bytes whatever is said on stderr
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    assert quiet_default.stdout.startswith(f"wrote {tmp_path / 'a.nii.gz'} (")


def test_preprocess_prints_per_case_lines_in_a_log(tmp_path):
    raw = tmp_path / "raw"
    ids = sorted(write_raw(raw, "2021", n=3, shape=SHAPE))
    result = invoke("preprocess", raw, tmp_path / "store")
    assert result.exit_code == 0, result.output + result.stderr
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("case ")]
    assert sorted(CASE_LINE.match(ln).group(3) for ln in lines) == ids, lines
    assert lines[-1].startswith("case 3/3 ") and "all done in" in lines[-1]
