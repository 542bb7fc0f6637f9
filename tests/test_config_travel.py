"""Configs and runs that travel: presets by name from anywhere, and a run's store found from
any working directory (issue 20)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtcmkd.cli.main import app
from mtcmkd.config import ConfigError, config_hash, load_config, preset_names, preset_path
from mtcmkd.evaluation.run_source import RecordedSplit, _run_store

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_shipped_file_is_a_preset_and_loads_by_name_from_anywhere(tmp_path,
                                                                       monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert preset_names() == sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    for name in preset_names():
        by_name = load_config(name)
        assert by_name == load_config(CONFIGS / f"{name}.yaml")
        assert config_hash(load_config(f"{name}.yaml")) == config_hash(by_name)


def test_a_file_of_the_same_name_wins_over_the_preset(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("mtcmkd").write_text("name: mine\nmethod: {name: baseline}\n")
    assert load_config("mtcmkd").method.name == "baseline"


def test_an_unknown_name_lists_the_presets(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"nope: no such config file, nor a preset name "
                                          r"\(presets: barlow, baseline, .*tiny\)"):
        load_config("nope")
    assert preset_path("../configs/mtcmkd") is None  # names only, never a path into the package


def test_inspect_without_config_lists_the_presets(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["inspect", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["preset"] for r in rows] == preset_names()
    paper = next(r for r in rows if r["preset"] == "mtcmkd-paper")
    assert paper["student"] == ["t1ce"] and paper["teachers"] == ["flair", "t2", "t1"]
    result = CliRunner().invoke(app, ["inspect", "--config", "baseline", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["method"] == "baseline"


def recorded(store: Path | None) -> RecordedSplit:
    return RecordedSplit(Path("splits.json"), None if store is None else str(store), "f", 0,
                         [], [], [])


def test_a_relative_store_is_found_through_the_recorded_absolute_path(tmp_path,
                                                                      monkeypatch) -> None:
    store = tmp_path / "work" / "brats.zarr"
    store.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # training ran in tmp/work with data.store=brats.zarr
    assert _run_store("brats.zarr", recorded(store)) == store
    monkeypatch.chdir(tmp_path / "work")  # from the training folder the typed path works
    assert _run_store("brats.zarr", recorded(store)) == Path("brats.zarr")
    # Nothing recorded (a run from before splits.json): the typed path, whose error names it.
    assert _run_store("brats.zarr", None) == Path("brats.zarr")
    assert _run_store(None, recorded(store)) == store
    assert _run_store(None, None) is None


@pytest.mark.parametrize("argv", [["train"], ["predict"], ["evaluate"], ["inspect"],
                                  ["export", "torchscript"], ["preprocess"], ["compare"]])
def test_help_has_no_placeholder_on_flags_and_names_set_pairs(argv, monkeypatch, capsys) -> None:
    from mtcmkd.cli.main import main

    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setattr("sys.argv", ["mtcmkd", *argv, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--help" in text and "<bool>" not in text
    if "--set" in text:
        assert "KEY=VALUE" in text and "<list[str]>" not in text
