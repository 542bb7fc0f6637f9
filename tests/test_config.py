"""The typed run config: ready-made files, overrides, rejections with key paths, hash, round
trip, and the `inspect` command."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from mtcmkd.brats import CHANNELS
from mtcmkd.config import (
    DEFAULT_WIDTHS,
    ConfigError,
    MethodConfig,
    RunConfig,
    config_from_dict,
    config_hash,
    dump_config,
    load_config,
    to_dict,
)
from mtcmkd.methods.options import BarlowOptions, KDNetOptions, MTCMKDOptions

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))


def _write(tmp_path: Path, data: dict, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    return str(info.value)


# ------------------------------------------------------------------------- ready-made files


def test_the_expected_config_files_exist() -> None:
    names = {p.stem for p in CONFIG_FILES}
    assert {"baseline", "mtcmkd", "mtcmkd-paper", "kdnet", "barlow", "tiny"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.name == path.stem
    assert len(config_hash(cfg)) == 16


def test_paper_config_is_the_published_setting() -> None:
    cfg = load_config(CONFIGS / "mtcmkd-paper.yaml")
    m = cfg.method
    assert isinstance(m.options, MTCMKDOptions)
    assert (m.name, m.options.preset, m.options.cdsfl_weight,
            m.options.kd_total_weight) == ("mtcmkd", "paper", 0.10, 0.15)
    assert m.options.effective_kd_temperature == 20.0
    assert m.effective_teacher_modalities == ("flair", "t2", "t1")
    assert cfg.data.patch_size == (128, 128, 128) and cfg.data.augment is False
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.epochs) == (1, 1e-4, 25)
    assert (cfg.train.plateau_patience, cfg.train.plateau_factor,
            cfg.train.plateau_start_epoch) == (5, 0.1, 4)
    assert cfg.model.effective_widths == (32, 64, 128, 256)


def test_barlow_and_tiny_configs() -> None:
    assert load_config(CONFIGS / "barlow.yaml").method.student_modalities == ("flair", "t1ce")
    tiny = load_config(CONFIGS / "tiny.yaml")
    assert tiny.method.name == "mtcmkd"
    assert tiny.data.patch_size == (32, 32, 32) and tiny.data.num_workers == 0
    assert (tiny.train.iters_per_epoch, tiny.train.epochs) == (2, 2)


def test_default_widths_agree_with_the_models() -> None:
    from mtcmkd.models import DEFAULT_WIDTHS as RESUNET
    from mtcmkd.models import KDNET_DEFAULT_WIDTHS

    assert DEFAULT_WIDTHS == {"resunet": RESUNET, "kdnet": KDNET_DEFAULT_WIDTHS}


# ---------------------------------------------------------------------------------- defaults


def test_method_defaults_resolve_per_method() -> None:
    mt = MethodConfig(name="mtcmkd")
    assert mt.effective_teacher_modalities == ("flair", "t2", "t1")
    assert mt.options == MTCMKDOptions() and mt.options.effective_kd_temperature == 20.0
    t1 = MethodConfig(name="mtcmkd", student_modalities=["t1"])  # list -> tuple
    assert t1.student_modalities == ("t1",)
    assert t1.effective_teacher_modalities == ("flair", "t2", "t1ce")
    kd = MethodConfig(name="kdnet")
    assert kd.effective_teacher_modalities == ("t1", "t1ce", "t2", "flair")
    assert kd.options.effective_kd_temperature == 5.0
    assert MethodConfig(name="baseline").effective_teacher_modalities == ()
    # Barlow Twins KD has no KD temperature at all (no softened outputs).
    assert not hasattr(MethodConfig(name="barlow").options, "kd_temperature")


def test_missing_sections_take_defaults_and_name_defaults_to_file_stem(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, {"method": {"name": "baseline"}}, "my-run.yaml"))
    assert cfg.name == "my-run"
    assert cfg.train.epochs == 25 and cfg.data.patch_size == (128, 128, 128)
    assert cfg.model.n_classes == 4 and cfg.model.stride == 8


# --------------------------------------------------------------------------------- overrides


def test_overrides_are_parsed_as_yaml_and_applied_in_order(tmp_path: Path) -> None:
    path = CONFIGS / "mtcmkd.yaml"
    cfg = load_config(path, [
        "train.lr=3e-4",                       # YAML 1.1 reads 3e-4 as a string: accepted
        "data.patch_size=[64,64,64]",
        "method.teacher_modalities=[flair, t2]",
        "method.kd_temperature=null",
        "data.augment=false",
        "train.epochs=3",
        "train.epochs=4",                      # the last one wins
        "name=renamed",
    ])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.data.patch_size == (64, 64, 64)
    assert cfg.method.teacher_modalities == ("flair", "t2")
    assert cfg.method.options.kd_temperature is None and cfg.data.augment is False
    assert cfg.train.epochs == 4 and cfg.name == "renamed"


def test_override_creates_a_missing_section(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, {"method": {"name": "baseline"}}), ["train.seed=7"])
    assert cfg.train.seed == 7


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrr=1", "train.lrr: unknown key; valid keys of train: epochs,"),
        ("trian.lr=1", "trian: unknown key; valid keys: name, data, model, method, train"),
        ("train.lr.x=1", "train.lr.x: unknown key"),
        ("train.lr", "expected KEY=VALUE"),
        ("data.patch_size=[64,64", "cannot parse the value"),
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ],
)
def test_bad_overrides_are_rejected(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "baseline.yaml", [override])
    message = str(info.value)
    assert expected in message
    assert message.startswith(str(CONFIGS / "baseline.yaml"))


# ------------------------------------------------------------------------------- rejections


def test_unknown_keys_in_the_file_name_the_key_path(tmp_path: Path) -> None:
    path = _write(tmp_path, {"method": {"name": "mtcmkd", "kd_temprature": 4}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "method.kd_temprature: unknown key" in message
    assert "kd_temperature" in message and "cdsfl_weight" in message  # the valid keys
    with pytest.raises(ConfigError, match=r"^.*: optimiser: unknown key; valid keys: name, data"):
        load_config(_write(tmp_path, {"method": {"name": "baseline"}, "optimiser": {}}))


def test_file_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: {name: baseline\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_the_error_message_format_of_the_issue() -> None:
    message = _error({"method": {"name": "mtcmkd", "kd_temperature": -1}})
    assert message == "method.kd_temperature: must be > 0 (got -1)"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, "method: required key is missing"),
        ({"method": {}}, "method.name: required key is missing"),
        ({"method": {"name": "distill"}}, "method.name: must be one of 'baseline'"),
        # mtcmkd teachers are cross-modal: the student cannot be one of them.
        ({"method": {"name": "mtcmkd", "teacher_modalities": ["flair", "t1ce"]}},
         "method.teacher_modalities: mtcmkd teachers are cross-modal"),
        # the default teachers of a flair student are the other three: fine; explicit clash not
        ({"method": {"name": "mtcmkd", "student_modalities": ["flair"],
                     "teacher_modalities": ["flair"]}}, "must not be a teacher"),
        ({"method": {"name": "barlow", "student_modalities": ["flair", "t1ce", "t2"]}},
         "method.student_modalities: barlow needs 1 or 2"),
        ({"method": {"name": "mtcmkd", "student_modalities": ["t1ce", "t1"]}},
         "method.student_modalities: mtcmkd needs exactly 1"),
        ({"method": {"name": "kdnet", "student_modalities": []}}, "kdnet needs exactly 1"),
        ({"method": {"name": "baseline", "student_modalities": []}}, "baseline needs at least 1"),
        ({"method": {"name": "baseline", "student_modalities": ["t1gd"]}},
         "method.student_modalities: unknown modality 't1gd'; valid: t1, t1ce, t2, flair"),
        ({"method": {"name": "barlow", "student_modalities": ["t1ce", "t1ce"]}},
         "must not repeat a modality"),
        ({"method": {"name": "baseline", "teacher_modalities": ["flair"]}},
         "method.teacher_modalities: baseline has no teachers"),
        ({"method": {"name": "baseline"}, "data": {"patch_size": [128, 128, 100]}},
         "data.patch_size: every axis must be a multiple of the network stride 8"),
        ({"method": {"name": "kdnet"}, "model": {"kind": "kdnet"},
          "data": {"patch_size": [136, 136, 136]}}, "multiple of the network stride 16"),
        ({"method": {"name": "baseline"}, "data": {"patch_size": [64, 64]}},
         "data.patch_size: expected a list of 3 values"),
        ({"method": {"name": "baseline"}, "model": {"widths": [6, 8, 16, 24]}},
         "model.widths: resunet's GroupNorm needs"),
        ({"method": {"name": "baseline"}, "model": {"widths": [8, 16, 24]}},
         "resunet needs at least 4 levels"),
        ({"method": {"name": "kdnet"}, "model": {"kind": "kdnet", "widths": [8, 16]}},
         "kdnet needs at least 3 levels"),
        ({"method": {"name": "kdnet", "kdnet_teacher_epochs": 0}},
         "method.kdnet_teacher_epochs: kdnet needs >= 1"),
        ({"method": {"name": "kdnet"}, "model": {"output": "regions"}},
         "model.output: kdnet's losses are defined on softmax classes"),
        ({"method": {"name": "kdnet", "kdnet_teacher_epochs": 25}},
         "method.kdnet_teacher_epochs: stage 1 must end before train.epochs (25)"),
        ({"method": {"name": "barlow", "barlow_pool": 3}}, "method.barlow_pool: must divide"),
        ({"method": {"name": "barlow", "barlow_pool": 2}, "data": {"patch_size": [16, 16, 16]}},
         "needs >= 2 samples per batch"),
        ({"method": {"name": "mtcmkd", "ds_seg_fraction": 1.5}},
         "method.ds_seg_fraction: must be in [0, 1] (got 1.5)"),
        ({"method": {"name": "baseline"}, "train": {"zero_stage": 4}},
         "train.zero_stage: must be 0, 1, 2 or 3 (got 4)"),
        ({"method": {"name": "baseline"}, "train": {"precision": "fp16"}},
         "train.precision: must be one of 'auto', 'fp32', 'bf16' (got 'fp16')"),
        ({"method": {"name": "baseline"}, "train": {"epochs": True}},
         "train.epochs: expected an integer, got True"),
        ({"method": {"name": "baseline"}, "train": {"epochs": 2.5}},
         "train.epochs: expected an integer, got 2.5"),
        ({"method": {"name": "baseline"}, "train": {"lr": None}}, "train.lr: must not be null"),
        ({"method": {"name": "baseline"}, "train": {"lr": "inf"}},
         "train.lr: must be a finite number"),
        ({"method": {"name": "baseline"}, "train": {"lr": float("nan")}},
         "train.lr: must be a finite number"),
        ({"method": {"name": "baseline"}, "data": {"fg_fraction": -0.1}},
         "data.fg_fraction: must be in [0, 1] (got -0.1)"),
        ({"method": {"name": "baseline"}, "name": "my run"}, "name: must be letters"),
        ({"method": {"name": "baseline"}, "train": 3}, "train: expected a mapping"),
    ],
)
def test_invalid_values_and_combinations_are_rejected(data: dict, expected: str) -> None:
    assert expected in _error(data)


def test_kdnet_student_may_be_a_teacher_modality() -> None:
    cfg = config_from_dict({"method": {"name": "kdnet", "teacher_modalities": ["t1ce", "flair"]}})
    assert cfg.method.effective_teacher_modalities == ("t1ce", "flair")


def test_replace_validates_again() -> None:
    cfg = config_from_dict({"method": {"name": "mtcmkd"}})
    with pytest.raises(ConfigError, match="method.kd_temperature"):
        dataclasses.replace(cfg.method.options, kd_temperature=0.0)
    with pytest.raises(ConfigError, match="method.student_modalities: mtcmkd needs exactly 1"):
        dataclasses.replace(cfg.method, student_modalities=("t1", "t2"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------- hash, round trip


def test_hash_is_stable_and_sensitive() -> None:
    a = load_config(CONFIGS / "mtcmkd.yaml")
    b = load_config(CONFIGS / "mtcmkd.yaml")
    assert config_hash(a) == config_hash(b)
    assert all(c in "0123456789abcdef" for c in config_hash(a))
    changed = load_config(CONFIGS / "mtcmkd.yaml", ["train.lr=2e-4"])
    assert config_hash(changed) != config_hash(a)
    # Same values reached differently hash the same (int 1 vs float 1.0 for a float field).
    again = load_config(CONFIGS / "mtcmkd.yaml", ["train.lr=0.0001", "method.barlow_weight=1"])
    assert config_hash(again) == config_hash(a)


def test_hash_is_the_sha256_of_the_canonical_json() -> None:
    import hashlib

    cfg = config_from_dict({"method": {"name": "baseline"}})
    canonical = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    assert config_hash(cfg) == hashlib.sha256(canonical.encode()).hexdigest()[:16]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_round_trip_through_dict_yaml_and_json(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    data = to_dict(cfg)
    json.dumps(data)  # plain data
    assert config_from_dict(json.loads(json.dumps(data))) == cfg
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(data))) == cfg
    for suffix in (".yaml", ".json"):
        out = tmp_path / f"dumped{suffix}"
        dump_config(cfg, out)
        again = load_config(out)
        assert again == cfg and config_hash(again) == config_hash(cfg)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temporary file


def test_to_dict_lists_sections_in_order() -> None:
    data = to_dict(config_from_dict({"method": {"name": "baseline"}}))
    assert list(data) == ["name", "data", "model", "method", "train"]
    assert data["data"]["patch_size"] == [128, 128, 128]


# ---------------------------------------------------------------------------- mtcmkd inspect


def _inspect_app() -> typer.Typer:
    from mtcmkd.cli.inspect_cmd import inspect_config

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("inspect")(inspect_config)

    @app.callback()
    def _main() -> None:
        """Test app."""

    return app


def test_inspect_json_reports_networks_and_terms() -> None:
    result = CliRunner().invoke(
        _inspect_app(),
        ["inspect", "--config", str(CONFIGS / "mtcmkd-paper.yaml"), "--json"],
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    nets = info["networks"]
    assert [nets[f"teacher_{m}"]["params"] for m in ("flair", "t2", "t1")] == [9_459_478] * 3
    assert nets["cdsfl"]["params"] == 2_540 and nets["student"]["params"] == 9_459_478
    assert nets["student"]["modalities"] == ["t1ce"]
    weights = {(t["term"], t["epochs"]): t["weight"] for t in info["loss_terms"]}
    assert weights[("cdsfl/seg", "all")] == pytest.approx(0.10)
    assert weights[("student/seg", ">= 1")] == pytest.approx(0.75)
    assert weights[("student/kd_flair", ">= 1")] == pytest.approx(0.05)
    assert weights[("student/ds_seg", ">= 1")] == pytest.approx(0.07)
    assert info["settings"]["kd_scaling"] == "paper"
    assert info["hash"] == config_hash(load_config(CONFIGS / "mtcmkd-paper.yaml"))


def test_inspect_table_and_overrides() -> None:
    result = CliRunner().invoke(
        _inspect_app(),
        ["inspect", "-c", str(CONFIGS / "kdnet.yaml"), "--set", "method.kdnet_beta=2"],
    )
    assert result.exit_code == 0, result.output
    assert "student/kl" in result.output and "t1, t1ce, t2, flair" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "train.lrr=1"],
        ["--set", "method.kd_temperature=-1"],
    ],
)
def test_inspect_bad_config_exits_2_with_one_line(args: list[str]) -> None:
    result = CliRunner().invoke(
        _inspect_app(), ["inspect", "--config", str(CONFIGS / "tiny.yaml"), *args]
    )
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert err.startswith("error:") and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_inspect_missing_file_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        _inspect_app(), ["inspect", "--config", str(tmp_path / "nope.yaml")]
    )
    assert result.exit_code == 2 and "no such config file" in result.stderr


def test_baseline_takes_any_modalities_as_full_modality_reference(tmp_path):
    path = tmp_path / "all.yaml"
    path.write_text("method:\n  name: baseline\n  student_modalities: [t1, t1ce, t2, flair]\n")
    cfg = load_config(path)
    assert cfg.method.student_modalities == ("t1", "t1ce", "t2", "flair")


# ------------------------------------------------- method options next to the method, v1 layout

#: config_hash of every shipped file, computed before the options moved next to the methods:
#: run folders, checkpoints and student files record it, so it must never change silently.
PINNED_HASHES = {
    "barlow.yaml": "ad24ef38bfbe4156",
    "baseline.yaml": "cfd259af45a79fa7",
    "kdnet.yaml": "25ffcc6b8b7dabca",
    "mdsd.yaml": "3a0ef73de3de2649",  # added with the method (issue 16), not a v1 file
    "mtcmkd-paper.yaml": "efc555d9e8cb50e7",
    "mtcmkd.yaml": "84329c25ce1caf20",
    "mtcmkd-compact.yaml": "c0f757a4553c479f",  # compact students (issue 17), not v1 files
    "mtcmkd-nano.yaml": "11a7183b1a9c0811",
    "tiny.yaml": "684ece4ee332c245",
}

#: The method section as the flat MethodConfig wrote it (the union of the four methods'
#: options), here for a baseline config; to_dict keeps writing exactly this.
V1_BASELINE_METHOD = {
    "name": "baseline", "student_modalities": ["t1ce"], "teacher_modalities": None,
    "preset": "default", "kd_temperature": None, "kd_total_weight": 0.15, "cdsfl_weight": 0.1,
    "seg_weight": 0.75, "ds_weight": 0.1, "ds_seg_fraction": 0.7, "kd_start_epoch": 1,
    "performance_metric": "wt", "performance_dice": "patch3d", "kdnet_lambda": 0.75,
    "kdnet_beta": 10.0, "kdnet_teacher_epochs": 1, "barlow_lambda_offdiag": 0.005,
    "barlow_weight": 1.0, "barlow_pool": 2,
}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_hash_of_every_shipped_file_is_unchanged(path: Path) -> None:
    assert config_hash(load_config(path)) == PINNED_HASHES[path.name]


@pytest.mark.parametrize(
    ("name", "expected"),
    [("baseline", "42958c335999174b"), ("mtcmkd", "40ca9aca3c2f8749"),
     ("kdnet", "310cfbe8ebaee546"), ("barlow", "5a3bf9fe71fd74da")],
)
def test_config_hash_of_each_method_with_defaults_is_unchanged(name: str, expected: str) -> None:
    assert config_hash(config_from_dict({"method": {"name": name}})) == expected


def test_to_dict_writes_the_v1_flat_method_section() -> None:
    data = to_dict(config_from_dict({"method": {"name": "baseline"}}))
    assert data["method"] == V1_BASELINE_METHOD
    assert list(data["method"]) == list(V1_BASELINE_METHOD)  # the order dump_config writes
    # A config.yaml written by an older version (every key of every method) loads as it was.
    cfg = config_from_dict({"method": V1_BASELINE_METHOD})
    assert cfg == config_from_dict({"method": {"name": "baseline"}})


def test_flat_keys_go_to_the_chosen_methods_options() -> None:
    cfg = config_from_dict({"method": {"name": "kdnet", "kdnet_lambda": 0.5, "kd_temperature": 3}})
    assert cfg.method.options == KDNetOptions(kdnet_lambda=0.5, kd_temperature=3.0)
    assert isinstance(config_from_dict({"method": {"name": "barlow"}}).method.options,
                      BarlowOptions)


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ({"name": "mtcmkd", "kdnet_lambda": 0.5},
         "method.kdnet_lambda: an option of method 'kdnet', not of 'mtcmkd'"),
        ({"name": "baseline", "kd_temperature": 4},
         "method.kd_temperature: an option of methods 'mtcmkd' and 'kdnet' and 'mdsd', not of "
         "'baseline'"),
        ({"name": "kdnet", "barlow_pool": 4}, "method.barlow_pool: an option of method 'barlow'"),
        ({"name": "barlow", "preset": "paper"}, "method.preset: an option of method 'mtcmkd'"),
        ({"name": 3}, "method.name: expected a string, got 3"),
        ({"name": "baseline", "options": {}}, "method.options: unknown key; valid keys: name, "
                                              "student_modalities, teacher_modalities"),
    ],
)
def test_a_key_of_another_method_names_its_owner(method: dict, expected: str) -> None:
    assert expected in _error({"method": method})


def test_switching_method_with_set_keeps_other_keys_at_their_defaults() -> None:
    # tiny.yaml is an mtcmkd file with kd_start_epoch: 1 (mtcmkd's default): kdnet takes it.
    cfg = load_config(CONFIGS / "tiny.yaml", ["method.name=kdnet"])
    assert isinstance(cfg.method.options, KDNetOptions)
    # mtcmkd-paper.yaml sets preset: paper, which kdnet does not have: refused, not ignored.
    with pytest.raises(ConfigError, match="method.preset: an option of method 'mtcmkd'"):
        load_config(CONFIGS / "mtcmkd-paper.yaml", ["method.name=kdnet"])
    with pytest.raises(ConfigError, match="method.nope: unknown key; valid keys of method: name"):
        load_config(CONFIGS / "tiny.yaml", ["method.nope=1"])


def test_options_classes_validate_alone_with_key_paths() -> None:
    with pytest.raises(ConfigError, match=r"^method.kdnet_lambda: must be in \[0, 1\] \(got 2\)$"):
        KDNetOptions(kdnet_lambda=2)
    with pytest.raises(ConfigError, match=r"^method.barlow_pool: must be >= 1 or null"):
        BarlowOptions(barlow_pool=0)
    with pytest.raises(ConfigError, match="method.options: KDNetOptions given for method 'mtcmkd'"):
        MethodConfig(name="mtcmkd", options=KDNetOptions())
    assert MethodConfig(name="mtcmkd", options={"seg_weight": 0.5}).options.seg_weight == 0.5


def test_loading_a_config_imports_no_torch() -> None:
    code = ("import sys; from mtcmkd.config import load_config; "
            f"load_config({str(CONFIGS / 'mtcmkd.yaml')!r}); "
            "import mtcmkd.methods; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_compact_student_has_its_own_widths_and_the_teachers_keep_theirs() -> None:
    from mtcmkd.methods.build import build_method
    from mtcmkd.models import count_parameters

    cfg = load_config(CONFIGS / "mtcmkd-compact.yaml")
    assert cfg.model.effective_widths == (32, 64, 128, 256)
    assert cfg.model.effective_student_widths == (16, 32, 64, 128)
    method = build_method(cfg, CHANNELS)
    assert count_parameters(method.teachers["flair"]) == 9_459_478
    assert count_parameters(method.student) == 2_367_473
    assert to_dict(cfg)["model"]["student_widths"] == [16, 32, 64, 128]
    assert "student_widths" not in to_dict(load_config(CONFIGS / "mtcmkd.yaml"))["model"]


@pytest.mark.parametrize(("model", "method", "message"), [
    ({"student_widths": [16, 32, 64]}, "mtcmkd", "needs as many levels as model.widths"),
    ({"student_widths": [10, 32, 64, 128]}, "mtcmkd", "student_widths: resunet's GroupNorm"),
    ({"kind": "kdnet", "widths": [8, 16, 24], "student_widths": [4, 8, 12]}, "kdnet",
     "kdnet needs the student and its teacher to be the same network"),
    ({"student_widths": [16, 32, 64, 128]}, "barlow", "barlow needs the student"),
    ({"student_widths": [16, 32, 64, 128]}, "mdsd", "mdsd needs the student"),
])
def test_student_widths_are_refused_where_they_cannot_work(model, method, message) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"model": model, "method": {"name": method}})


def test_a_compact_student_file_loads_with_its_own_widths(tmp_path) -> None:
    from mtcmkd.methods.build import build_method
    from mtcmkd.student_weights import load_student, save_student

    cfg = config_from_dict({"data": {"patch_size": [16] * 3},
                            "model": {"widths": [8, 16, 24, 32],
                                      "student_widths": [4, 8, 12, 16]},
                            "method": {"name": "mtcmkd"}})
    student = build_method(cfg, CHANNELS).student
    save_student(tmp_path / "s.pt", student, config=to_dict(cfg), config_hash=config_hash(cfg),
                 channels=("t1ce",), output="softmax", n_classes=4, patch_size=(16, 16, 16))
    loaded = load_student(tmp_path / "s.pt").network.state_dict()
    assert loaded.keys() == student.state_dict().keys()
    assert all(loaded[k].shape == v.shape for k, v in student.state_dict().items())
