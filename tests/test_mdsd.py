"""Modality-dropout self-distillation (mtcmkd/methods/mdsd.py): the folded student is exactly the
network's T1ce-only pass, the dropout masks, gradient isolation of the distillation terms, the
config, a short training through the method interface, the student file, and (integration)
the real loop on one gloo rank with an exact preempt + resume.

Tiny networks (widths 8/16/24/32) on 16^3 patches, one torch thread, like tests/test_methods.py.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import typer
from conftest import gloo_world_of_one, write_raw
from typer.testing import CliRunner

from mtcmkd.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    config_hash,
    dump_config,
    load_config,
    to_dict,
)
from mtcmkd.losses import kd_kl, segmentation_loss
from mtcmkd.methods.build import METHODS, build_method
from mtcmkd.methods.mdsd import MDSD, fold_input_channels, modality_keep_mask
from mtcmkd.methods.options import MDSDOptions
from mtcmkd.methods.options.mdsd import FOLDABLE_KINDS
from mtcmkd.models import KDNetUNet, ResidualUNet
from mtcmkd.student_weights import load_student, save_student

CH = ("t1", "t1ce", "t2", "flair")
T1CE = CH.index("t1ce")
WIDTHS = [8, 16, 24, 32]
REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


pytestmark = pytest.mark.usefixtures("one_thread_and_seed")


def make_cfg(*, kind: str = "resunet", widths: list[int] | None = None,
             output: str = "softmax", batch: int = 2, **method_kw: object) -> RunConfig:
    return config_from_dict({
        "name": "test",
        "data": {"patch_size": [16] * 3},
        "model": {"kind": kind, "widths": widths or WIDTHS, "output": output},
        "method": {"name": "mdsd", **method_kw},
        "train": {"batch_size": batch},
    })


def blob_batch(batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A spherical 3-compartment tumour per sample; every modality shows it differently."""
    gen = torch.Generator().manual_seed(seed)
    axis = torch.arange(16, dtype=torch.float32)
    labels = []
    for _ in range(batch):
        c = (8 + torch.randint(-2, 3, (3,), generator=gen)).float()
        r = ((axis[:, None, None] - c[0]) ** 2 + (axis[None, :, None] - c[1]) ** 2
             + (axis[None, None, :] - c[2]) ** 2).sqrt()
        label = torch.zeros((16,) * 3, dtype=torch.int64)
        label[r < 4.6] = 2
        label[r < 3.2] = 3
        label[r < 1.8] = 1
        labels.append(label)
    label = torch.stack(labels)
    contrast = torch.tensor([[0.0, 0.3, 1.0, 0.5], [0.0, 0.2, -0.5, 1.5],
                             [0.0, 1.0, 0.8, 0.2], [0.0, 0.8, 1.2, 0.1]])  # channel x label
    image = contrast[:, label].movedim(0, 1) + 0.3 * torch.randn((batch, 4, 16, 16, 16),
                                                                 generator=gen)
    return {"image": image, "label": label}


def only(image: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """``image`` with every channel but ``keep`` zeroed (what the dropout pass sees)."""
    out = torch.zeros_like(image)
    out[:, keep] = image[:, keep]
    return out


def perturb(net: torch.nn.Module) -> None:
    """Move every weight off its initialisation (biases included), so a fold that dropped or
    mixed up a parameter cannot pass by chance."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))


# ---------------------------------------------------------------------- the folded student


@pytest.mark.parametrize(("kind", "widths"), [
    ("resunet", WIDTHS),
    ("resunet", [4, 8, 12, 16]),  # widths[0] == 4 == the modality count: still only the stem
    ("kdnet", WIDTHS),
])
def test_folded_student_is_the_t1ce_only_pass(kind: str, widths: list[int]) -> None:
    method = build_method(make_cfg(kind=kind, widths=widths), CH)
    assert isinstance(method, MDSD) and method.student.in_channels == 4
    perturb(method.student)
    student = method.student_network()
    assert type(student) is (ResidualUNet if kind == "resunet" else KDNetUNet)
    assert student.in_channels == 1 and method.student_channels() == ("t1ce",)
    image = blob_batch()["image"]
    with torch.no_grad():
        expected = method.student(only(image, [T1CE]))
        got = student(image[:, T1CE : T1CE + 1])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Only the convolutions that read the image lost channels; everything else is shared.
    source = method.student.state_dict()
    sliced = sorted(k for k, v in student.state_dict().items() if v.shape != source[k].shape)
    readers = (["stem.main.0.weight", "stem.shortcut.weight"] if kind == "resunet"
               else ["levels.0.layers.0.weight"])
    assert sliced == readers
    for key in readers:
        assert torch.equal(student.state_dict()[key], source[key][:, [T1CE]])


def test_folded_student_follows_the_student_modalities_order() -> None:
    """Two student modalities (flair first): the folded input channels are in that order."""
    method = build_method(make_cfg(student_modalities=["flair", "t1ce"]), CH)
    perturb(method.student)
    student = method.student_network()
    assert student.in_channels == 2 and method.student_channels() == ("flair", "t1ce")
    image = blob_batch()["image"]
    flair = CH.index("flair")
    with torch.no_grad():
        expected = method.student(only(image, [flair, T1CE]))
        got = student(image[:, [flair, T1CE]])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_student_network_is_fresh_current_and_draws_no_random_number() -> None:
    method = build_method(make_cfg(), CH)
    rng = torch.get_rng_state()
    first = method.student_network()
    assert torch.equal(torch.get_rng_state(), rng)  # a mid-run save keeps the random stream
    trained = {p.data_ptr() for p in method.student.parameters()}
    assert not {p.data_ptr() for p in first.parameters()} & trained  # no shared storage
    perturb(method.student)
    second = method.student_network()  # the current weights, not a cached copy
    key = "head.weight"
    assert torch.equal(second.state_dict()[key], method.student.state_dict()[key])
    assert not torch.equal(first.state_dict()[key], second.state_dict()[key])
    # The trained network's dtype and mode (DeepSpeed's bf16 module, validation's eval()).
    method.to(torch.bfloat16).eval()
    third = method.student_network()
    assert next(third.parameters()).dtype == torch.bfloat16 and not third.training


def test_fold_refuses_networks_that_differ_elsewhere() -> None:
    four = ResidualUNet(4, 4, WIDTHS).state_dict()
    with pytest.raises(ValueError, match="cannot fold head.weight"):
        fold_input_channels(four, ResidualUNet(1, 3, WIDTHS).state_dict(), [1])
    with pytest.raises(ValueError, match="parameters differ"):
        fold_input_channels(four, KDNetUNet(1, 4, WIDTHS).state_dict(), [1])


# -------------------------------------------------------------------------------- masks


def test_t1ce_is_never_dropped_and_the_rest_at_keep_prob() -> None:
    draws = 40_000
    keep = modality_keep_mask(draws, 4, [T1CE], 0.25, torch.Generator().manual_seed(1))
    assert keep.shape == (draws, 4) and keep.dtype == torch.bool and keep[:, T1CE].all()
    others = [i for i in range(4) if i != T1CE]
    rate = keep[:, others].float().mean(dim=0)
    # binomial standard error sqrt(.25 * .75 / 40000) = 0.0022: 4.5 of them
    assert torch.allclose(rate, torch.full((3,), 0.25), atol=0.01), rate
    t1ce_only = (~keep[:, others]).all(dim=1).float().mean()
    assert t1ce_only.item() == pytest.approx(0.75**3, abs=0.01)  # independent: 0.42
    both = (keep[:, others[0]] & keep[:, others[1]]).float().mean()
    assert both.item() == pytest.approx(0.25**2, abs=0.01)
    assert not modality_keep_mask(50, 4, [T1CE], 0.0)[:, others].any()
    assert modality_keep_mask(50, 4, [T1CE], 1.0).all()


def test_masks_are_a_function_of_the_seed_and_the_count_so_resume_is_exact() -> None:
    torch.manual_seed(7)
    a = build_method(make_cfg(), CH)
    torch.manual_seed(7)
    b = build_method(make_cfg(), CH)
    first = [a.draw_keep_mask(3) for _ in range(5)]
    assert all(torch.equal(m, b.draw_keep_mask(3)) for m in first)
    assert int(a.masks_drawn) == 5 and "masks_drawn" in a.state_dict()
    # A run resumed from a checkpoint taken after 2 masks continues the same stream.
    torch.manual_seed(7)
    resumed = build_method(make_cfg(), CH)
    resumed.load_state_dict({**a.state_dict(), "masks_drawn": torch.tensor(2)})
    assert all(torch.equal(first[i], resumed.draw_keep_mask(3)) for i in (2, 3, 4))
    torch.manual_seed(8)  # another seed (or rank): other masks
    other = build_method(make_cfg(), CH)
    assert not all(torch.equal(m, other.draw_keep_mask(3)) for m in first)


def test_the_dropout_pass_is_the_student_when_everything_else_is_dropped() -> None:
    """keep_prob 0: the step's prediction (the dropout pass) is the folded student on T1ce."""
    method = build_method(make_cfg(mdsd_keep_prob=0.0), CH)
    batch = blob_batch()
    out = method(batch, 0)
    with torch.no_grad():
        student = method.student_network()(batch["image"][:, T1CE : T1CE + 1])
    torch.testing.assert_close(out.prediction, student, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- loss terms


def test_terms_and_weights() -> None:
    method = build_method(make_cfg(mdsd_keep_prob=0.0, mdsd_kd_weight=0.3,
                                   mdsd_feature_weight=0.2, mdsd_full_seg_weight=0.7,
                                   kd_temperature=2.0), CH)
    batch = blob_batch()
    terms, logits, stats = method.compute_terms(batch, 0)
    assert list(terms) == ["full/seg", "dropout/seg", "dropout/kd", "dropout/feature"]
    with torch.no_grad():
        full = method.student.forward_features(batch["image"])
        drop = method.student.forward_features(only(batch["image"], [T1CE]))
    expected = {
        "full/seg": 0.7 * segmentation_loss(full["logits"], batch["label"]),
        "dropout/seg": segmentation_loss(drop["logits"], batch["label"]),
        "dropout/kd": 0.3 * kd_kl(drop["logits"], full["logits"], 2.0),
        "dropout/feature": 0.2 * ((drop["bottleneck"] - full["bottleneck"]) ** 2).mean(),
    }
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value.item(), rel=1e-4), key
    assert terms["dropout/kd"] > 0 and terms["dropout/feature"] > 0
    assert list(stats) == [f"{n}_{r}_dice_{p}" for n in ("full", "student")
                           for r in ("wt", "tc") for p in ("sum", "count")]
    logs = method.end_epoch(stats)
    assert {"student_wt_dice", "full_wt_dice", "full_tc_dice"} <= set(logs)
    assert logits.shape == (2, 4, 16, 16, 16)


def test_distillation_terms_give_the_full_pass_no_gradient() -> None:
    method = build_method(make_cfg(), CH)
    perturb(method.student)
    batch = blob_batch()
    image = batch["image"]
    # On the passes' tensors: kd + feature do not reach the full pass's activations at all.
    full = method.student.forward_features(image)
    drop = method.student.forward_features(only(image, [T1CE]))
    terms = method.pass_terms(full, drop, batch["label"])
    distil = terms["dropout/kd"] + terms["dropout/feature"]
    grads = torch.autograd.grad(distil, [full["logits"], full["bottleneck"], drop["logits"],
                                         drop["bottleneck"]], allow_unused=True)
    assert grads[0] is None and grads[1] is None
    assert grads[2].abs().sum() > 0 and grads[3].abs().sum() > 0
    # Through the step itself: the weights' gradient of kd + feature equals the one with the
    # full pass computed without any graph (keep_prob 0: the mask is known).
    method = build_method(make_cfg(mdsd_keep_prob=0.0), CH)
    perturb(method.student)
    terms, _, _ = method.compute_terms(batch, 0)
    (terms["dropout/kd"] + terms["dropout/feature"]).backward()
    got = {n: p.grad.clone() for n, p in method.student.named_parameters() if p.grad is not None}
    method.zero_grad(set_to_none=True)
    with torch.no_grad():
        full = method.student.forward_features(image)
    drop = method.student.forward_features(only(image, [T1CE]))
    (0.5 * kd_kl(drop["logits"], full["logits"], 4.0)
     + 0.1 * ((drop["bottleneck"] - full["bottleneck"]) ** 2).mean()).backward()
    want = {n: p.grad for n, p in method.student.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7)


def test_region_output_uses_the_region_losses() -> None:
    method = build_method(make_cfg(output="regions"), CH)
    out = method(blob_batch(), 0)
    assert out.prediction.shape == (2, 3, 16, 16, 16) and torch.isfinite(out.loss)
    assert method.student_network()(blob_batch()["image"][:, 1:2]).shape[1] == 3


def test_finite_under_bf16_autocast() -> None:
    method = build_method(make_cfg(), CH)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(blob_batch(), 0)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(torch.isfinite(v) for v in out.terms.values())
    out.loss.backward()


# ---------------------------------------------------------------------------- config


def test_a_config_dict_builds_and_round_trips(tmp_path: Path) -> None:
    cfg = config_from_dict({"method": {"name": "mdsd"}})
    assert cfg.method.options == MDSDOptions()
    assert cfg.method.effective_teacher_modalities == CH
    assert cfg.method.options.effective_kd_temperature == 4.0
    assert METHODS["mdsd"] is MDSD
    path = tmp_path / "mdsd.yaml"
    dump_config(make_cfg(mdsd_keep_prob=0.5), path)
    assert load_config(path) == make_cfg(mdsd_keep_prob=0.5)
    # The shipped file: baseline.yaml's network, patch and schedule, the T1ce student.
    shipped, baseline = load_config(CONFIGS / "mdsd.yaml"), load_config(CONFIGS / "baseline.yaml")
    assert shipped.name == "mdsd" and shipped.method.options == MDSDOptions()
    assert (shipped.model, shipped.data, shipped.train) == (baseline.model, baseline.data,
                                                           baseline.train)
    assert shipped.method.student_modalities == ("t1ce",)


def test_mdsd_options_stay_out_of_the_other_methods_configs() -> None:
    """The four v1 methods serialise (and hash) as before: no mdsd key in their method:."""
    for name in ("baseline", "mtcmkd", "kdnet", "barlow"):
        method = to_dict(config_from_dict({"method": {"name": name}}))["method"]
        assert not [k for k in method if k.startswith("mdsd_")], name
    with pytest.raises(ConfigError, match="method.mdsd_keep_prob: an option of method 'mdsd'"):
        config_from_dict({"method": {"name": "baseline", "mdsd_keep_prob": 0.5}})
    # Switching a shipped file to mdsd with --set keeps its other keys at their defaults.
    cfg = load_config(CONFIGS / "tiny.yaml", ["method.name=mdsd", "method.mdsd_keep_prob=0.5"])
    assert cfg.method.options == MDSDOptions(mdsd_keep_prob=0.5)
    assert config_hash(cfg) != config_hash(load_config(CONFIGS / "tiny.yaml"))


@pytest.mark.parametrize(("method", "message"), [
    ({"mdsd_keep_prob": 1.5}, r"method.mdsd_keep_prob: must be in \[0, 1\] \(got 1.5\)"),
    ({"mdsd_kd_weight": -1}, "method.mdsd_kd_weight: must be >= 0"),
    ({"kd_temperature": 0}, "method.kd_temperature: must be > 0"),
    ({"teacher_modalities": ["t1", "t2", "flair"]},
     "method.teacher_modalities: mdsd's one network must see the student's modality 't1ce'"),
    ({"teacher_modalities": ["t1ce"]},
     "method.teacher_modalities: mdsd needs at least one modality besides the student's"),
    ({"student_modalities": ["t1", "t1ce", "t2", "flair"]},
     "method.student_modalities: mdsd needs 1 to 3"),
])
def test_bad_options_are_refused_with_their_key(method: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"method": {"name": "mdsd", **method}})


def test_only_foldable_network_kinds_are_accepted() -> None:
    assert FOLDABLE_KINDS == ("resunet", "kdnet")  # both checked by the folding test above
    run = SimpleNamespace(model=SimpleNamespace(kind="transformer"))
    with pytest.raises(ConfigError, match="model.kind: mdsd folds its network"):
        MDSDOptions().check_run(run)  # type: ignore[arg-type]
    assert isinstance(make_cfg(kind="kdnet").method.options, MDSDOptions)


def test_inspect_shows_one_four_channel_network_and_the_deployed_size() -> None:
    from mtcmkd.cli.inspect_cmd import inspect_config

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("inspect")(inspect_config)

    @app.callback()
    def _main() -> None:
        """Test app."""

    result = CliRunner().invoke(app, ["inspect", "--config", str(CONFIGS / "mdsd.yaml"),
                                      "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["method"] == "mdsd" and list(info["networks"]) == ["network"]
    assert info["networks"]["network"]["modalities"] == list(CH)
    assert info["networks"]["network"]["params"] == 9_464_662  # 4-channel stem: + 2 x 2,592
    assert info["settings"]["deployed_params"] == 9_459_478  # the T1ce student of baseline
    assert info["settings"]["deployed_modalities"] == ["t1ce"]
    assert {t["term"]: t["weight"] for t in info["loss_terms"]} == {
        "full/seg": 1.0, "dropout/seg": 1.0, "dropout/kd": 0.5, "dropout/feature": 0.1}


# ---------------------------------------------------- training, the student file, the loop


def test_a_short_training_lowers_the_loss_and_the_student_file_round_trips(tmp_path) -> None:
    cfg = make_cfg()
    method = build_method(cfg, CH)
    method.train()
    optimiser = torch.optim.Adam(
        [{"params": p} for p in method.param_groups().values()], lr=2e-3)
    batch = blob_batch()
    losses = []
    for _ in range(8):  # seeded: 2.29, 1.83, 1.66 ... 1.30, 1.21, 1.14
        optimiser.zero_grad(set_to_none=True)
        out = method(batch, 0)
        out.loss.backward()
        optimiser.step()
        losses.append(out.loss.item())
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    # What the checkpointer writes as student.pt, and what predict/export load.
    path = tmp_path / "student.pt"
    save_student(path, method.student_network(), config=to_dict(cfg),
                 config_hash=config_hash(cfg), channels=method.student_channels(),
                 output=cfg.model.output, n_classes=cfg.model.n_classes,
                 patch_size=tuple(cfg.data.patch_size))
    bundle = load_student(path)
    assert bundle.channels == ("t1ce",) and bundle.network.in_channels == 1
    image = blob_batch(seed=3)["image"]
    with torch.no_grad():
        got = bundle.network(image[:, T1CE : T1CE + 1])
        expected = method.student(only(image, [T1CE]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)




@pytest.fixture(scope="module")
def one_rank_store(tmp_path_factory) -> Iterator[Path]:
    """A 4-case store and a gloo group of world size 1 in this process (as tests/test_engine.py);
    the environment and the group are restored afterwards."""
    from mtcmkd.preprocessing import preprocess

    tmp = tmp_path_factory.mktemp("mdsd")
    write_raw(tmp / "raw", "2021", n=4, shape=(24, 28, 20))
    assert not preprocess(tmp / "raw", tmp / "store", n_folds=2).failed
    saved_signals = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    with gloo_world_of_one():
        yield tmp / "store"
    for sig, handler in saved_signals.items():
        signal.signal(sig, handler)


@pytest.mark.integration
def test_the_loop_trains_mdsd_saves_a_t1ce_student_and_resumes_exactly(one_rank_store,
                                                                        tmp_path) -> None:
    from mtcmkd.engine.trainer import train

    cfg = load_config(CONFIGS / "tiny.yaml", [
        "method.name=mdsd", "train.epochs=2", "train.iters_per_epoch=3", "train.val_cases=1",
        "data.patch_size=[16,16,16]", "train.ckpt_every=100",
        f"data.store={json.dumps(str(one_rank_store))}"])
    ref = train(cfg, tmp_path / "ref", echo=lambda msg: None)
    assert ref["step"] == 6
    student = load_student(tmp_path / "ref" / "student.pt")
    assert student.channels == ("t1ce",) and student.network.in_channels == 1
    records = [json.loads(x) for x in (tmp_path / "ref" / "log.jsonl").read_text().splitlines()]
    epoch = [r for r in records if r["kind"] == "epoch"][-1]
    assert {"student_wt_dice", "full_wt_dice", "val/dice_WT"} <= set(epoch)

    def warn_at_step_2(msg: str) -> None:  # mid-epoch preemption, as in test_engine.py
        if msg.startswith("epoch 0 step 2 "):
            os.kill(os.getpid(), signal.SIGUSR1)

    out = tmp_path / "pre"
    assert train(cfg, out, echo=warn_at_step_2)["preempted"] is True
    assert train(cfg, out, resume=True, echo=lambda msg: None)["step"] == 6
    a = load_student(tmp_path / "ref" / "student.pt").network.state_dict()
    b = load_student(out / "student.pt").network.state_dict()
    # The masks drawn after the resume are the ones the uninterrupted run drew.
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
