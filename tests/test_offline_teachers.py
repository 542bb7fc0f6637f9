"""Offline teachers (``method.teachers_from``): frozen teachers loaded from an earlier run.

What must hold: a frozen teacher gets no gradient, no loss term and no optimiser state and
stays in eval mode; the loaded weights are exactly the source's; a T1ce run can teach a T1ce
student (the self-distillation control); the source may not have seen this run's validation or
test cases; a resumed run refuses a source that changed; configs without the key hash as before.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import gloo_world_of_one, write_raw

from mtcmkd.config import ConfigError, config_from_dict, config_hash, load_config, to_dict
from mtcmkd.engine.errors import TrainError
from mtcmkd.engine.teachers import MODEL_STATES, TEACHERS_RECORD
from mtcmkd.integrity import safe_torch_load
from mtcmkd.methods.build import build_method

CH = ("t1", "t1ce", "t2", "flair")
WIDTHS = [8, 16, 24, 32]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


pytestmark = pytest.mark.usefixtures("one_thread_and_seed")


def make_cfg(name: str, **method_kw: object):
    return config_from_dict({
        "name": "test", "data": {"patch_size": [16] * 3},
        "model": {"kind": "kdnet" if name == "kdnet" else "resunet",
                  "widths": [8, 16, 24] if name == "kdnet" else WIDTHS},
        "method": {"name": name, "teachers_from": "somewhere", **method_kw},
    })


def blob_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(2, 4, 16, 16, 16, generator=gen)
    label = torch.zeros(2, 16, 16, 16, dtype=torch.long)
    label[:, 4:12, 4:12, 4:12] = 2
    label[:, 6:10, 6:10, 6:10] = 1
    label[:, 7:9, 7:9, 7:9] = 3
    return {"image": image, "label": label}


def frozen_all(method) -> None:
    method.freeze_offline(set(method.teacher_networks()))


# ----------------------------------------------------------------------------- config


def test_teachers_from_is_written_only_when_set_so_old_hashes_hold() -> None:
    plain = config_from_dict({"method": {"name": "mtcmkd"}})
    assert "teachers_from" not in to_dict(plain)["method"]
    assert config_hash(plain) == "40ca9aca3c2f8749"  # pinned in tests/test_config.py too
    offline = config_from_dict({"method": {"name": "mtcmkd", "teachers_from": "runs/t"}})
    assert to_dict(offline)["method"]["teachers_from"] == "runs/t"
    assert config_from_dict(to_dict(offline)) == offline
    assert config_hash(offline) != config_hash(plain)


@pytest.mark.parametrize(("method", "message"), [
    ({"name": "baseline", "teachers_from": "r"}, "baseline has no teachers"),
    ({"name": "mdsd", "teachers_from": "r"}, "no separate teacher networks"),
    ({"name": "mtcmkd", "teachers_from": ""}, "must be a run folder"),
    ({"name": "mtcmkd", "teacher_modalities": ["t1ce"]}, "except for offline teachers"),
])
def test_bad_uses_are_refused_with_the_key(method: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"method": method})


def test_a_t1ce_teacher_for_a_t1ce_student_is_allowed_offline() -> None:
    cfg = config_from_dict({"method": {"name": "mtcmkd", "teacher_modalities": ["t1ce"],
                                       "teachers_from": "r"}})
    assert cfg.method.effective_teacher_modalities == ("t1ce",)


# ----------------------------------------------------------------------------- methods


def test_frozen_mtcmkd_teachers_get_no_loss_no_gradient_and_stay_in_eval() -> None:
    method = build_method(make_cfg("mtcmkd", kd_start_epoch=0), CH)
    frozen_all(method)
    method.train()
    assert not any(t.training for t in method.teachers.values()) and not method.cdsfl.training
    assert method.student.training
    out = method(blob_batch(), epoch=0)
    assert not [k for k in out.terms if k.startswith(("teacher_", "cdsfl/"))]
    assert {"student/seg", "student/kd_flair", "student/ds_kd"} <= set(out.terms)
    out.loss.backward()
    assert all(p.grad is None for p in method.teachers.parameters())
    assert all(p.grad is None for p in method.cdsfl.parameters())
    assert any(p.grad is not None for p in method.student.parameters())
    groups = {n: [p for p in ps if p.requires_grad] for n, ps in method.param_groups().items()}
    assert groups["teachers"] == []  # the engine leaves the empty group out of the optimiser
    assert out.stats["teacher_wt_dice_sum/flair"].numel() == 1  # alpha still measured


def test_frozen_teachers_with_a_cdsfl_to_train_give_only_cdsfl_a_gradient() -> None:
    method = build_method(make_cfg("mtcmkd", kd_start_epoch=0), CH)
    method.freeze_offline({f"teachers.{m}" for m in method.teacher_modalities})
    method.train()
    out = method(blob_batch(), epoch=0)
    assert "cdsfl/seg" in out.terms and not [k for k in out.terms if k.startswith("teacher_")]
    out.loss.backward()
    assert all(p.grad is None for p in method.teachers.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.cdsfl.parameters())


def test_offline_kdnet_has_no_teacher_stage_and_offline_barlow_no_teacher_terms() -> None:
    kdnet = build_method(make_cfg("kdnet", kdnet_teacher_epochs=3), CH)
    frozen_all(kdnet)
    out = kdnet(blob_batch(), epoch=0)
    assert set(out.terms) == {"student/kd", "student/gt", "student/kl"}
    barlow = build_method(make_cfg("barlow", student_modalities=["t1ce"], barlow_pool=1), CH)
    frozen_all(barlow)
    out = barlow(blob_batch(), epoch=0)
    assert set(out.terms) == {"student/seg", "student/ds", "barlow/latent"}
    out.loss.backward()
    assert all(p.grad is None for p in barlow.teacher.parameters())


def test_online_methods_are_unchanged() -> None:
    method = build_method(make_cfg("mtcmkd", kd_start_epoch=0), CH)
    object.__setattr__(method.cfg.method, "teachers_from", None)
    out = method(blob_batch(), epoch=0)
    assert {"teacher_flair/seg", "cdsfl/seg"} <= set(out.terms)


# ------------------------------------------------------------------- loading from a run


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[Path]:
    """A 5-case store (1 test case), a gloo group of one, and two finished source runs: an
    MTCM-KD run (teachers flair, t2, t1 + CDSFL) and a T1ce baseline run."""
    from mtcmkd.engine.trainer import train
    from mtcmkd.preprocessing import preprocess

    tmp = tmp_path_factory.mktemp("offline")
    write_raw(tmp / "raw", "2021", n=5, shape=(24, 28, 20))
    assert not preprocess(tmp / "raw", tmp / "store", n_folds=2, test_fraction=0.2).failed
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    with gloo_world_of_one():
        for name in ("mtcmkd", "baseline"):
            train(run_cfg(tmp, name), tmp / f"src-{name}", echo=lambda msg: None)
        yield tmp
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def run_cfg(tmp: Path, name: str, *extra: str):
    return load_config(CONFIGS / "tiny.yaml", [
        f"method.name={name}", "train.epochs=1", "train.iters_per_epoch=2",
        "train.val_cases=1", "data.patch_size=[16,16,16]", "train.ckpt_every=100",
        f"data.store={json.dumps(str(tmp / 'store'))}", *extra])


def module_state(run: Path) -> dict[str, torch.Tensor]:
    tag = (run / "checkpoints" / "latest").read_text().strip()
    return safe_torch_load(run / "checkpoints" / tag / MODEL_STATES)["module"]


def same(a: dict, b: dict, prefix_a: str, prefix_b: str) -> bool:
    ka = sorted(k for k in a if k.startswith(prefix_a))
    kb = sorted(k for k in b if k.startswith(prefix_b))
    return len(ka) == len(kb) > 0 and all(
        torch.equal(a[x], b[y]) for x, y in zip(ka, kb, strict=True))


@pytest.mark.integration
def test_a_student_trains_with_the_source_runs_teachers_unchanged(world, tmp_path) -> None:
    from mtcmkd.engine.trainer import train

    src = world / "src-mtcmkd"
    cfg = run_cfg(world, "mtcmkd", f"method.teachers_from={json.dumps(str(src))}",
                  "method.kd_start_epoch=0")
    train(cfg, tmp_path / "run", echo=lambda msg: None)
    before, after = module_state(src), module_state(tmp_path / "run")
    for name in ("teachers.flair.", "teachers.t2.", "teachers.t1.", "cdsfl."):
        assert same(before, after, name, name), name  # loaded and never moved
    assert not same(before, after, "student.", "student.")  # the student trained
    record = json.loads((tmp_path / "run" / TEACHERS_RECORD).read_text())
    assert record["networks"]["teachers.flair"] == "teachers.flair"
    assert record["trained_here"] == [] and record["source_method"] == "mtcmkd"
    assert record["files_sha256"]


@pytest.mark.integration
def test_a_t1ce_baseline_run_teaches_a_t1ce_student(world, tmp_path) -> None:
    from mtcmkd.engine.trainer import train

    src = world / "src-baseline"
    cfg = run_cfg(world, "mtcmkd", f"method.teachers_from={json.dumps(str(src))}",
                  'method.teacher_modalities=["t1ce"]', "method.kd_start_epoch=0")
    train(cfg, tmp_path / "run", echo=lambda msg: None)
    before, after = module_state(src), module_state(tmp_path / "run")
    assert same(before, after, "student.", "teachers.t1ce.")
    record = json.loads((tmp_path / "run" / TEACHERS_RECORD).read_text())
    assert record["networks"] == {"teachers.t1ce": "student"}
    assert record["trained_here"] == ["cdsfl"]  # no CDSFL in a baseline run: trained here


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.integration
@pytest.mark.parametrize("role", ["train", "validation"])
def test_teachers_that_saw_a_test_case_are_refused(world, tmp_path, role) -> None:
    from mtcmkd.data import StoreInfo
    from mtcmkd.engine.trainer import train

    src = copy_run(world / "src-mtcmkd", tmp_path / "src")
    splits = json.loads((src / "splits.json").read_text())
    test_case = StoreInfo.read(world / "store").test_cases[0]
    splits[role] = [*splits[role], test_case]
    (src / "splits.json").write_text(json.dumps(splits))
    cfg = run_cfg(world, "mtcmkd", f"method.teachers_from={json.dumps(str(src))}")
    word = "trained" if role == "train" else "validated"
    with pytest.raises(TrainError, match=f"{word} on 1 of this run's test cases .*{test_case}"):
        train(cfg, tmp_path / "run", echo=lambda msg: None)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.integration
@pytest.mark.parametrize(("extra", "message"), [
    (["model.widths=[8,16,24,40]"], "model.widths is"),
    (["method.name=kdnet", "model.kind=kdnet", "model.widths=[8,16,24]"], "model.kind is"),
    # An MTCM-KD run has unimodal teachers and a T1ce student: no 4-modality network.
    (["method.name=barlow", "method.barlow_pool=1"],
     r"has no network for teacher \(modalities \['t1', 't1ce', 't2', 'flair'\]\)"),
])
def test_teachers_that_do_not_fit_are_refused(world, tmp_path, extra, message) -> None:
    from mtcmkd.engine.trainer import train

    src = world / "src-mtcmkd"
    cfg = run_cfg(world, "mtcmkd", f"method.teachers_from={json.dumps(str(src))}", *extra)
    with pytest.raises(TrainError, match=message):
        train(cfg, tmp_path / "run", echo=lambda msg: None)


@pytest.mark.integration
def test_not_a_finished_run_is_refused(world, tmp_path) -> None:
    from mtcmkd.engine.trainer import train

    for folder, message in ((tmp_path / "nope", "not a folder"),
                            (tmp_path, "not a run folder")):
        cfg = run_cfg(world, "mtcmkd", f"method.teachers_from={json.dumps(str(folder))}")
        with pytest.raises(TrainError, match=message):
            train(cfg, tmp_path / "run", echo=lambda msg: None)
    src = copy_run(world / "src-mtcmkd", tmp_path / "src")
    shutil.rmtree(src / "checkpoints")
    cfg = run_cfg(world, "mtcmkd", f"method.teachers_from={json.dumps(str(src))}")
    with pytest.raises(TrainError, match="no complete checkpoint"):
        train(cfg, tmp_path / "run2", echo=lambda msg: None)


@pytest.mark.integration
def test_resume_refuses_teachers_that_changed(world, tmp_path) -> None:
    from mtcmkd.engine.trainer import train

    src = copy_run(world / "src-mtcmkd", tmp_path / "src")
    cfg = run_cfg(world, "mtcmkd", f"method.teachers_from={json.dumps(str(src))}")
    train(cfg, tmp_path / "run", echo=lambda msg: None)
    # The source moves on to a newer checkpoint: the student run must not continue with it.
    ckpts = src / "checkpoints"
    tag = (ckpts / "latest").read_text().strip()
    shutil.copytree(ckpts / tag, ckpts / "step_09999999")
    (ckpts / "latest").write_text("step_09999999\n")
    with pytest.raises(TrainError, match="teachers' run changed since this run started"):
        train(cfg, tmp_path / "run", resume=True, echo=lambda msg: None)
