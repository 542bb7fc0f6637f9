"""The command line through Typer: exit codes, one-line errors, summaries."""

from __future__ import annotations

import json

import zarr
from conftest import write_raw
from typer.testing import CliRunner

from mtcmkd.cli.main import app

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "synth" in result.output and "preprocess" in result.output


def test_preprocess_ok_prints_summary(tmp_path, raw2021):
    result = runner.invoke(app, ["preprocess", str(raw2021), str(tmp_path / "store"), "--folds", "3"])
    assert result.exit_code == 0, result.output
    assert "converted" in result.output
    assert zarr.open_group(str(tmp_path / "store"), mode="r").attrs["folds"]["n_folds"] == 3


def test_preprocess_failed_case_exit_1_with_one_line(tmp_path):
    raw = tmp_path / "raw"
    ids = sorted(write_raw(raw, "2021", n=2))
    (raw / ids[0] / f"{ids[0]}_flair.nii.gz").unlink()
    report = tmp_path / "report.json"
    result = runner.invoke(app, ["preprocess", str(raw), str(tmp_path / "store"),
                                 "--report", str(report)])
    assert result.exit_code == 1
    lines = [ln for ln in result.stderr.splitlines() if "failed" in ln] + [
        ln for ln in result.output.splitlines() if ln.startswith("failed")]
    assert any(f"case {ids[0]}" in ln and "missing flair" in ln for ln in lines), result.output
    data = json.loads(report.read_text())
    assert data["n_failed"] == 1 and data["n_converted"] == 1


def test_preprocess_empty_folder_exit_2_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["preprocess", str(tmp_path / "empty"), str(tmp_path / "s")])
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert err.startswith("error:") and "no BraTS" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_preprocess_bad_option_values(tmp_path, raw2021):
    for args in (["--labels", "maybe"], ["--workers", "0"], ["--year", "2017b"],
                 ["--dtype", "int8"]):
        result = runner.invoke(app, ["preprocess", str(raw2021), str(tmp_path / "s"), *args])
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith("error:"), args


def test_synth_layout_validation(tmp_path):
    result = runner.invoke(app, ["synth", str(tmp_path / "x"), "--layout", "2017"])
    assert result.exit_code == 2 and "--layout" in result.stderr


def test_store_info_summarises_a_store(tmp_path, raw2021):
    store = tmp_path / "store"
    assert runner.invoke(app, ["preprocess", str(raw2021), str(store), "--folds", "3"]).exit_code == 0
    result = runner.invoke(app, ["store-info", str(store), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["cases"] == 3 and info["labelled"] == 3 and info["folds"] == [1, 1, 1]
    assert info["cases_with_et"] == 2 and info["channels"] == ["t1", "t1ce", "t2", "flair"]
    bad = runner.invoke(app, ["store-info", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and bad.stderr.startswith("error:")


def test_synth_then_preprocess_small_phantom(tmp_path):
    raw = tmp_path / "raw"
    result = runner.invoke(app, ["synth", str(raw), "--cases", "2", "--shape", "48", "48", "40",
                                 "--layout", "2023"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in raw.iterdir()) == ["BraTS-GLI-00000-000", "BraTS-GLI-00002-000"]
    again = runner.invoke(app, ["synth", str(raw), "--cases", "1"])
    assert again.exit_code == 2 and "not an empty folder" in again.stderr
    result = runner.invoke(app, ["preprocess", str(raw), str(tmp_path / "store"), "--folds", "2"])
    assert result.exit_code == 0, result.output


def _leaf_commands(command, path=()):
    subs = getattr(command, "commands", None)
    if subs:
        for name, sub in subs.items():
            yield from _leaf_commands(sub, (*path, name))
    else:
        yield path, command


def test_every_command_and_option_has_help():
    import typer.main

    leaves = list(_leaf_commands(typer.main.get_command(app)))
    assert len(leaves) >= 12
    for path, command in leaves:
        assert command.help and len(command.help) > 40, path
        for param in command.params:
            if not getattr(param, "hidden", False):
                assert getattr(param, "help", None), (path, param.name)
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        for param in command.params:
            if param.param_type_name == "option" and not getattr(param, "hidden", False):
                assert param.opts[0] in result.output, (path, param.opts[0])


def test_errors_point_to_their_troubleshooting_section(tmp_path):
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "TROUBLESHOOTING.md").read_text()
    sections = {line[3:].strip() for line in doc.splitlines() if line.startswith("## ")}
    import typer.main

    top = {path[0] for path, _ in _leaf_commands(typer.main.get_command(app))}
    assert top <= sections, top - sections
    result = runner.invoke(app, ["synth", str(tmp_path / "o"), "--layout", "2016"])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: --layout '2016': expected one of 2018, 2019, 2020, "
                                     "2021, 2023, msd (see docs/TROUBLESHOOTING.md#synth)")
    result = runner.invoke(app, ["store-info", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.strip().endswith("(see docs/TROUBLESHOOTING.md#store-info)")
