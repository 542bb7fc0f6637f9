"""Cheaper offline teacher forwards (``method.teacher_precision``, issue 16 item 4).

What must hold: the key is written to config.yaml only when not fp32 (old hashes hold) and only
makes sense with ``teachers_from``; fp32 offline teachers compute exactly what they computed
before; bf16 teachers run in bf16 with channels-last weights and hand the losses contiguous
float32 outputs close to the fp32 ones, with no gradient anywhere near a teacher; the faster
hard masks of the training Dice equal argmax's; a student trains end to end with bf16 teachers.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import gloo_world_of_one, write_raw
from typer.testing import CliRunner

from mtcmkd.cli.main import app
from mtcmkd.config import ConfigError, config_from_dict, config_hash, load_config, to_dict
from mtcmkd.engine.teachers import MODEL_STATES
from mtcmkd.integrity import safe_torch_load
from mtcmkd.methods.base import hard_region_masks
from mtcmkd.methods.build import build_method

CH = ("t1", "t1ce", "t2", "flair")
WIDTHS = [8, 16, 24, 32]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


pytestmark = pytest.mark.usefixtures("one_thread_and_seed")


def make_cfg(name: str, precision: str | None = None, **method_kw: object):
    method = {"name": name, "teachers_from": "somewhere", **method_kw}
    if precision is not None:
        method["teacher_precision"] = precision
    return config_from_dict({
        "name": "test", "data": {"patch_size": [16] * 3},
        "model": {"kind": "kdnet" if name == "kdnet" else "resunet",
                  "widths": [8, 16, 24] if name == "kdnet" else WIDTHS},
        "method": method,
    })


def offline_method(name: str, precision: str | None = None, **method_kw: object):
    """A method whose teachers (all of them, CDSFL included) are frozen as if loaded; the same
    weights for every precision (seeded)."""
    if name == "barlow":  # 16^3 patches: pool 1 keeps >= 2 bottleneck samples
        method_kw = {"barlow_pool": 1, **method_kw}
    torch.manual_seed(0)
    method = build_method(make_cfg(name, precision, **method_kw), CH)
    method.freeze_offline(set(method.teacher_networks()))
    method.train()
    return method


def blob_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(2, 4, 16, 16, 16, generator=gen)
    label = torch.zeros(2, 16, 16, 16, dtype=torch.long)
    label[:, 4:12, 4:12, 4:12] = 2
    label[:, 6:10, 6:10, 6:10] = 1
    label[:, 7:9, 7:9, 7:9] = 3
    return {"image": image, "label": label}


# ----------------------------------------------------------------------------- config


def test_teacher_precision_is_written_only_when_not_fp32_so_old_hashes_hold() -> None:
    implicit = make_cfg("mtcmkd")
    explicit = make_cfg("mtcmkd", "fp32")
    assert "teacher_precision" not in to_dict(implicit)["method"]
    assert explicit == implicit and config_hash(explicit) == config_hash(implicit)
    assert config_hash(config_from_dict({"method": {"name": "mtcmkd"}})) == "40ca9aca3c2f8749"
    bf16 = make_cfg("mtcmkd", "bf16")
    assert to_dict(bf16)["method"]["teacher_precision"] == "bf16"
    assert config_from_dict(to_dict(bf16)) == bf16
    assert config_hash(bf16) != config_hash(implicit)


@pytest.mark.parametrize(("method", "message"), [
    ({"name": "mtcmkd", "teacher_precision": "bf16"},
     "method.teacher_precision: bf16 applies to frozen offline teachers only"),
    ({"name": "kdnet", "teacher_precision": "bf16"},
     "method.teacher_precision: bf16 applies to frozen offline teachers only"),
    ({"name": "mtcmkd", "teachers_from": "r", "teacher_precision": "fp16"},
     "method.teacher_precision: must be one of 'fp32', 'bf16'"),
])
def test_bad_teacher_precisions_are_refused_with_the_key(method: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"method": method})


def test_train_refuses_bf16_online_teachers_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [
        "train", "-c", str(CONFIGS / "tiny.yaml"), "-o", str(tmp_path / "run"),
        "--set", "method.teacher_precision=bf16"])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "method.teacher_precision: bf16 applies to frozen offline teachers only" in lines[0]
    assert lines[0].startswith(f"error: {CONFIGS / 'tiny.yaml'}: method.teacher_precision")
    assert lines[0].endswith("(see docs/TROUBLESHOOTING.md#train)")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------- teacher forwards


def test_fp32_offline_teachers_compute_exactly_the_plain_forward() -> None:
    method = offline_method("mtcmkd")
    net = method.teachers["flair"]
    x = blob_batch()["image"][:, 3:4]
    got = method.frozen_teacher_features(net, x, ("logits", "features_half"))
    with torch.no_grad():
        want = net.forward_features(x)
    assert set(got) == {"logits", "features_half"}
    assert torch.equal(got["logits"], want["logits"])
    assert torch.equal(got["features_half"], want["features_half"])
    assert all(p.is_contiguous() for p in net.parameters())  # weights left as loaded


@pytest.mark.parametrize("name", ["mtcmkd", "kdnet", "barlow"])
def test_offline_fp32_terms_equal_an_offline_run_without_the_key(name: str) -> None:
    # fp32 given explicitly or left out: the same terms to the bit (the old offline path).
    batch = blob_batch()
    a = offline_method(name).compute_terms(batch, 1)[0]
    b = offline_method(name, "fp32").compute_terms(batch, 1)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_teachers_run_in_bf16_channels_last_and_return_float32_close_to_fp32() -> None:
    fp32, bf16 = offline_method("mtcmkd"), offline_method("mtcmkd", "bf16")
    x = blob_batch()["image"][:, 3:4]
    keys = ("logits", "features_half")
    want = fp32.frozen_teacher_features(fp32.teachers["flair"], x, keys)
    net = bf16.teachers["flair"]
    got = bf16.frozen_teacher_features(net, x, keys)
    for key in keys:
        assert got[key].dtype == torch.float32 and got[key].is_contiguous()
        assert not got[key].requires_grad
        # bf16 ran (not the fp32 kernels) and stayed within bf16 rounding of fp32.
        assert not torch.equal(got[key], want[key])
        scale = want[key].abs().max()
        assert (got[key] - want[key]).abs().max() <= 0.05 * scale, key
    soft = ((got["logits"] / 20).softmax(1) - (want["logits"] / 20).softmax(1)).abs().max()
    assert soft < 1e-2  # what MTCM-KD's KD term (T = 20) sees
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d)
               for p in net.parameters() if p.dim() == 5)
    assert all(p.is_contiguous() for p in bf16.student.parameters())  # the student untouched


@pytest.mark.parametrize("name", ["mtcmkd", "kdnet", "barlow"])
def test_bf16_offline_step_trains_only_the_student_with_terms_close_to_fp32(name: str) -> None:
    batch = blob_batch()
    want = offline_method(name).compute_terms(batch, 1)[0]
    method = offline_method(name, "bf16")
    terms, logits, stats = method.compute_terms(batch, 1)
    assert terms.keys() == want.keys()
    assert not any(k.startswith(("teacher", "cdsfl")) for k in terms)
    for key, value in terms.items():
        value, ref = value.detach(), want[key].detach()
        assert torch.isfinite(value) and value.dtype == torch.float32
        assert abs(float(value) - float(ref)) <= 0.02 * abs(float(ref)) + 1e-4, key
    # The step used the bf16 teachers (channels-last weights, terms off fp32 by rounding).
    assert any(not torch.equal(terms[k].detach(), want[k].detach()) for k in terms)
    for net_name, (module, mods) in method.teacher_networks().items():
        if mods is not None:
            assert all(p.is_contiguous(memory_format=torch.channels_last_3d)
                       for p in module.parameters() if p.dim() == 5), net_name
    torch.stack(list(terms.values())).sum().backward()
    assert method.student.head.weight.grad is not None  # the student learns
    for net_name, (module, _) in method.teacher_networks().items():
        assert all(p.grad is None and not p.requires_grad for p in module.parameters()), net_name


def test_bf16_teachers_with_a_cdsfl_to_train_give_it_float32_features() -> None:
    torch.manual_seed(0)
    method = build_method(make_cfg("mtcmkd", "bf16"), CH)
    method.freeze_offline({f"teachers.{m}" for m in ("flair", "t2", "t1")})
    method.train()
    terms = method.compute_terms(blob_batch(), 1)[0]
    assert "cdsfl/seg" in terms and terms["cdsfl/seg"].dtype == torch.float32
    terms["cdsfl/seg"].backward()
    assert all(p.grad is not None for p in method.cdsfl.parameters())
    assert all(p.grad is None for p in method.teachers.parameters())


# ------------------------------------------------------------------ training Dice masks


def test_hard_masks_take_argmax_first_maximum_and_nan_as_argmax_does() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (2, 4, 6, 5, 4), generator=gen).float()  # many ties
    logits[0, 2, 0, 0, 0] = float("nan")
    logits[1, :, 1, 1, 1] = float("nan")
    pred = logits.argmax(dim=1)
    wt, tc = hard_region_masks(logits, "softmax")
    assert torch.equal(wt, pred != 0)
    assert torch.equal(tc, (pred == 1) | (pred == 3))
    assert bool(wt[0, 0, 0, 0])  # the NaN class 2 wins, as with argmax


# ------------------------------------------------------------------------- end to end


@pytest.mark.integration
def test_a_student_trains_with_bf16_teachers_that_stay_unchanged(tmp_path: Path) -> None:
    from mtcmkd.engine.trainer import train
    from mtcmkd.preprocessing import preprocess

    write_raw(tmp_path / "raw", "2021", n=5, shape=(24, 28, 20))
    assert not preprocess(tmp_path / "raw", tmp_path / "store", n_folds=2,
                          test_fraction=0.2).failed

    def cfg(*extra: str):
        return load_config(CONFIGS / "tiny.yaml", [
            "train.epochs=1", "train.iters_per_epoch=2", "train.val_cases=1",
            "data.patch_size=[16,16,16]", "train.ckpt_every=100",
            f"data.store={json.dumps(str(tmp_path / 'store'))}", *extra])

    def module_state(run: Path) -> dict[str, torch.Tensor]:
        tag = (run / "checkpoints" / "latest").read_text().strip()
        return safe_torch_load(run / "checkpoints" / tag / MODEL_STATES)["module"]

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        with gloo_world_of_one():
            train(cfg(), tmp_path / "src", echo=lambda msg: None)
            train(cfg(f"method.teachers_from={json.dumps(str(tmp_path / 'src'))}",
                      "method.teacher_precision=bf16", "method.kd_start_epoch=0"),
                  tmp_path / "run", echo=lambda msg: None)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    before, after = module_state(tmp_path / "src"), module_state(tmp_path / "run")
    frozen = [k for k in before if k.startswith(("teachers.", "cdsfl."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("student."))
    assert load_config(tmp_path / "run" / "config.yaml").method.teacher_precision == "bf16"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any("loss/student/kd_flair" in row for row in log)
