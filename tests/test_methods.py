"""The methods behind one interface: hand-computed loss terms, gradient isolation, teacher
weights (also across two gloo ranks), KD-Net's stages, Barlow's two paths, bf16, overfitting.

Tiny networks (widths 4/8/12/16) on 16^3 patches, one torch thread (the tests are latency
bound, and a shared 2-core machine punishes OpenMP spinning), so the file runs in seconds.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtcmkd.config import ConfigError, RunConfig, config_from_dict, dump_config, load_config
from mtcmkd.losses import (
    barlow_twins_loss,
    bottleneck_embeddings,
    bottleneck_kl,
    cross_entropy,
    kd_kl,
    kdnet_gt_loss,
    kdnet_kd_loss,
    segmentation_loss,
)
from mtcmkd.methods import (
    METHODS,
    MTCMKD,
    BarlowKD,
    DiceTally,
    KDNet,
    Method,
    MethodOutput,
    build_method,
    dice_stats,
    method_names,
    registry,
)
from mtcmkd.methods.base import target_labels
from mtcmkd.methods.options import MethodOptions
from mtcmkd.methods.registry import register_method
from mtcmkd.metrics import slice_dice_legacy

CH = ("t1", "t1ce", "t2", "flair")
TINY = [4, 8, 12, 16]  # GroupNorm-valid (also the concatenations 28, 20, 12); stride 8
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


pytestmark = pytest.mark.usefixtures("one_thread_and_seed")


def make_cfg(
    method: str,
    *,
    patch: int = 16,
    widths: list[int] | None = None,
    kind: str = "resunet",
    output: str = "softmax",
    epochs: int = 5,
    batch: int = 2,
    **method_kw: object,
) -> RunConfig:
    if method == "barlow":
        method_kw.setdefault("barlow_pool", None)
    return config_from_dict({
        "name": "test",
        "data": {"patch_size": [patch] * 3},
        "model": {"kind": kind, "widths": widths or TINY, "output": output},
        "method": {"name": method, **method_kw},
        "train": {"epochs": epochs, "batch_size": batch},
    })


def blob_batch(
    batch: int = 2, patch: int = 16, seed: int = 0, rc: bool = False
) -> dict[str, torch.Tensor]:
    """Images whose intensities depend on the labels (each modality differently) plus noise,
    and a 3-compartment spherical tumour per sample at a random centre."""
    gen = torch.Generator().manual_seed(seed)
    axis = torch.arange(patch, dtype=torch.float32)
    labels = []
    for _ in range(batch):
        c = (patch / 2 + torch.randint(-2, 3, (3,), generator=gen)).float()
        r = ((axis[:, None, None] - c[0]) ** 2 + (axis[None, :, None] - c[1]) ** 2
             + (axis[None, None, :] - c[2]) ** 2).sqrt()
        label = torch.zeros((patch,) * 3, dtype=torch.int64)
        label[r < patch / 3.5] = 2
        label[r < patch / 5] = 3
        label[r < patch / 9] = 1
        if rc:
            label[:2, :2, :2] = 4
        labels.append(label)
    label = torch.stack(labels)
    contrast = torch.tensor([[0.0, 0.3, 1.0, 0.5], [0.0, 0.2, -0.5, 1.5],
                             [0.0, 1.0, 0.8, 0.2], [0.0, 0.8, 1.2, 0.1]])  # channel x label
    image = contrast[:, label.clamp(max=3)].movedim(0, 1)  # (B, 4, D, H, W)
    image = image + 0.3 * torch.randn(image.shape, generator=gen)
    return {"image": image, "label": label}


def group_ids(method: Method) -> dict[str, set[int]]:
    return {g: {id(p) for p in ps} for g, ps in method.param_groups().items()}


def one(image: torch.Tensor, modality: str) -> torch.Tensor:
    i = CH.index(modality)
    return image[:, i : i + 1]


# --------------------------------------------------------------------- construction, groups


def test_paper_parameter_counts_via_describe() -> None:
    with torch.device("meta"):
        method = build_method(load_config(CONFIGS / "mtcmkd-paper.yaml"), CH)
    nets = method.describe()["networks"]
    assert {k: v["params"] for k, v in nets.items()} == {
        "teacher_flair": 9_459_478, "teacher_t2": 9_459_478, "teacher_t1": 9_459_478,
        "cdsfl": 2_540, "student": 9_459_478,
    }
    assert nets["teacher_t2"]["modalities"] == ["t2"] and nets["student"]["modalities"] == ["t1ce"]
    sizes = {g: sum(p.numel() for p in ps) for g, ps in method.param_groups().items()}
    assert sizes == {"student": 9_459_478, "teachers": 3 * 9_459_478 + 2_540}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_param_groups_partition_the_parameters(name: str) -> None:
    method = build_method(make_cfg(name), CH)
    groups = group_ids(method)
    assert "student" in groups
    # The trained student network (mdsd deploys a fold of it: tests/test_mdsd.py).
    assert {id(p) for p in method.student.parameters()} == groups["student"]
    union = set().union(*groups.values())
    assert sum(len(g) for g in groups.values()) == len(union)  # disjoint
    assert union == {id(p) for p in method.parameters()}  # complete
    assert method.student_channels() == ("t1ce",)


def test_build_method_picks_the_class_and_checks_channels() -> None:
    assert type(build_method(make_cfg("kdnet"), CH)) is KDNet
    with pytest.raises(ValueError, match="needs modality 't1'"):
        build_method(make_cfg("mtcmkd"), ("t1ce", "t2", "flair"))
    method = build_method(make_cfg("baseline"), CH)
    with pytest.raises(ValueError, match=r"batch\['image'\] must be \(B, 4"):
        method({"image": torch.zeros(1, 3, 16, 16, 16),
                "label": torch.zeros(1, 16, 16, 16, dtype=torch.long)}, 0)


def test_inputs_are_picked_by_channel_name() -> None:
    cfg = make_cfg("mtcmkd")
    a = build_method(cfg, CH)
    order = ("flair", "t1ce", "t1", "t2")
    b = build_method(cfg, order)
    b.load_state_dict(a.state_dict())
    batch = blob_batch()
    permuted = {"image": batch["image"][:, [CH.index(m) for m in order]],
                "label": batch["label"]}
    out_a, out_b = a(batch, 1), b(permuted, 1)
    assert torch.equal(out_a.loss, out_b.loss)
    assert out_a.terms.keys() == out_b.terms.keys()


# ------------------------------------------------------------------------- MTCM-KD details


def test_kd_terms_off_before_kd_start_epoch_and_on_after() -> None:
    method = build_method(make_cfg("mtcmkd", kd_start_epoch=2), CH)
    batch = blob_batch()
    base = {"teacher_flair/seg", "teacher_t2/seg", "teacher_t1/seg", "cdsfl/seg", "student/seg"}
    kd = {"student/kd_flair", "student/kd_t2", "student/kd_t1", "student/ds_seg",
          "student/ds_kd"}
    for epoch in (0, 1):
        out = method(batch, epoch)
        assert set(out.terms) == base
        student = method.student(one(batch["image"], "t1ce"))
        assert out.terms["student/seg"] == pytest.approx(
            segmentation_loss(student, batch["label"]).item(), rel=1e-5)  # weight 1 without KD
    out = method(batch, 2)
    assert set(out.terms) == base | kd
    assert all(out.terms[k] > 0 for k in kd)


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_total_loss_equals_hand_computed_weighted_terms(preset: str) -> None:
    method = build_method(make_cfg("mtcmkd", preset=preset), CH)
    assert isinstance(method, MTCMKD)
    with torch.no_grad():
        method.alpha.copy_(torch.tensor([0.08, 0.05, 0.02]))
    batch = blob_batch(rc=True)  # RC (4) trains as background in the 4-class softmax
    out = method(batch, 1)

    image = batch["image"]
    y = batch["label"].masked_fill(batch["label"] == 4, 0)
    y_half = y[:, ::2, ::2, ::2]
    T = 20.0

    def kd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return kd_kl(s, t, T, scaling=preset)

    with torch.no_grad():
        t = {m: method.teachers[m].forward_features(one(image, m)) for m in ("flair", "t2", "t1")}
        fused = method.cdsfl([t[m]["features_half"] for m in ("flair", "t2", "t1")])
        s = method.student.forward_features(one(image, "t1ce"))
        expected = {f"teacher_{m}/seg": segmentation_loss(t[m]["logits"], y) for m in t}
        expected["cdsfl/seg"] = 0.10 * segmentation_loss(fused, y_half)
        expected["student/seg"] = 0.75 * segmentation_loss(s["logits"], y)
        for a, m in zip((0.08, 0.05, 0.02), ("flair", "t2", "t1"), strict=True):
            expected[f"student/kd_{m}"] = a * kd(s["logits"], t[m]["logits"])
        expected["student/ds_seg"] = 0.10 * 0.7 * segmentation_loss(s["ds_half"], y_half)
        expected["student/ds_kd"] = 0.10 * 0.3 * kd(s["ds_half"], fused)
    assert out.terms.keys() == expected.keys()
    for key, value in expected.items():
        assert out.terms[key].item() == pytest.approx(value.item(), rel=1e-5), key
    total = sum(v.item() for v in expected.values())
    assert out.loss.item() == pytest.approx(total, rel=1e-5)
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.terms.values()), rel=1e-6)
    assert torch.equal(out.prediction, s["logits"]) and not out.prediction.requires_grad
    assert all(not v.requires_grad for v in out.terms.values())
    if preset == "paper":  # the authors' scaling: KD ~ V / T times the default
        ratio = kd(s["logits"], t["flair"]["logits"]) / kd_kl(
            s["logits"], t["flair"]["logits"], T)
        assert ratio.item() == pytest.approx(16**3 / T, rel=1e-4)


def test_student_terms_reach_no_teacher_or_cdsfl_parameter() -> None:
    method = build_method(make_cfg("mtcmkd"), CH)
    terms, _, _ = method.compute_terms(blob_batch(), 1)
    student_loss = sum(v for k, v in terms.items() if k.startswith("student/"))
    assert {k for k in terms if k.startswith("student/kd_")}  # KD is in there
    student_loss.backward()
    groups = method.param_groups()
    assert all(p.grad is None for p in groups["teachers"])
    assert sum(p.grad.abs().sum().item() for p in groups["student"] if p.grad is not None) > 0


def test_teacher_terms_reach_no_student_parameter() -> None:
    method = build_method(make_cfg("mtcmkd"), CH)
    terms, _, _ = method.compute_terms(blob_batch(), 1)
    sum(v for k, v in terms.items() if not k.startswith("student/")).backward()
    assert all(p.grad is None for p in method.param_groups()["student"])


def test_cdsfl_loss_reaches_all_three_teachers() -> None:
    method = build_method(make_cfg("mtcmkd"), CH)
    assert isinstance(method, MTCMKD)
    terms, _, _ = method.compute_terms(blob_batch(), 0)
    terms["cdsfl/seg"].backward()
    for m, teacher in method.teachers.items():
        assert teacher.stem.main[0].weight.grad.abs().sum() > 0, m  # through features_half
        assert teacher.head.weight.grad is None, m  # the full-resolution head is not on the path
    assert all(p.grad is not None for p in method.cdsfl.parameters())
    assert all(p.grad is None for p in method.student.parameters())


def test_dice_stats_hand_computed() -> None:
    """Three 4x4x4 samples: partial overlap, empty-empty (skipped), false positive (0)."""
    truth = torch.zeros(3, 4, 4, 4, dtype=torch.long)
    pred = torch.zeros(3, 4, 4, 4, dtype=torch.long)
    truth[0, :2, :2, :2] = 2  # WT 8 voxels, TC 0
    truth[0, 0, 0, 0] = 1  # ... of which 1 voxel TC
    pred[0, :1, :2, :2] = 3  # WT 4 voxels inside, TC 4 voxels (1 overlapping)
    pred[2, 3, 3, :2] = 2  # 2 false-positive WT voxels, no TC
    logits = torch.nn.functional.one_hot(pred, 4).movedim(-1, 1).float()
    stats = dice_stats("teacher", logits, truth, "softmax", modality="flair")
    assert stats["teacher_wt_dice_sum/flair"].item() == pytest.approx(2 * 4 / (8 + 4))
    assert stats["teacher_wt_dice_count/flair"].item() == 2  # sample 1 skipped
    assert stats["teacher_tc_dice_sum/flair"].item() == pytest.approx(2 * 1 / (1 + 4))
    assert stats["teacher_tc_dice_count/flair"].item() == 1
    # Region output: channel 0 = WT, 1 = TC, logit > 0 means inside.
    regions = torch.full((3, 3, 4, 4, 4), -1.0)
    regions[:, 0][pred > 0] = 1.0
    regions[:, 1][(pred == 1) | (pred == 3)] = 1.0
    same = dice_stats("student", regions, truth, "regions")
    assert same["student_wt_dice_sum"].item() == pytest.approx(2 / 3)
    assert same["student_tc_dice_count"].item() == 1


def test_dice_stats_slice2d_is_the_authors_slice_dice() -> None:
    """slice2d: per sample the mean over first-axis slices of the 2D Dice, empty slices 1."""
    truth = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    pred = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    truth[0, 0, :2, :2] = 2  # slice 0: 4 truth voxels
    pred[0, 0, :1, :2] = 2  # slice 0: 2 predicted, both inside -> 2*2/6
    pred[0, 3, 0, 0] = 2  # slice 3: one false positive -> 0; slices 1, 2 empty -> 1
    # sample 1: empty truth and prediction -> every slice 1, and it is counted
    logits = torch.nn.functional.one_hot(pred, 4).movedim(-1, 1).float()
    stats = dice_stats("teacher", logits, truth, "softmax", "slice2d", modality="t2")
    first = (2 * 2 / 6 + 1 + 1 + 0) / 4
    assert stats["teacher_wt_dice_sum/t2"].item() == pytest.approx(first + 1.0)
    assert stats["teacher_wt_dice_count/t2"].item() == 2
    legacy = slice_dice_legacy((pred[0] > 0).numpy(), (truth[0] > 0).numpy(), axis=0)
    assert legacy == pytest.approx(first)
    # The 3D reading of the same batch differs: 2*2/(4+3) on sample 0, sample 1 skipped.
    patch = dice_stats("teacher", logits, truth, "softmax", modality="t2")
    assert patch["teacher_wt_dice_sum/t2"].item() == pytest.approx(4 / 7)
    assert patch["teacher_wt_dice_count/t2"].item() == 1


@pytest.mark.parametrize(("tally", "part", "key"), [
    (DiceTally("student", "wt"), "sum", "student_wt_dice_sum"),
    (DiceTally("student", "tc"), "count", "student_tc_dice_count"),
    (DiceTally("teacher", "wt"), "count", "teacher_wt_dice_count"),
    (DiceTally("teacher", "tc", "flair"), "sum", "teacher_tc_dice_sum/flair"),
    (DiceTally("teacher", "wt", "t1ce"), "count", "teacher_wt_dice_count/t1ce"),
    (DiceTally("teacher_x", "tc", "t1"), "sum", "teacher_x_tc_dice_sum/t1"),  # "_" in a name
])
def test_dice_tally_keys_are_the_stored_strings_and_read_back(tally, part, key) -> None:
    """The stats keys are in every checkpoint's epoch_stats: byte-identical to the strings
    written before DiceTally existed, and parse() is their inverse."""
    assert tally.key(part) == key
    assert DiceTally.parse(key) == (tally, part)


def test_dice_tally_log_keys_and_refusals() -> None:
    assert DiceTally("student", "wt").log_key == "student_wt_dice"
    assert DiceTally("teacher", "tc").log_key == "teacher_tc_dice"
    assert DiceTally("teacher", "wt", "flair").log_key == "teacher_wt_dice/flair"
    for key in ("student/seg", "alpha/flair", "student_wt_dice", "student_et_dice_sum",
                "student_wt_dice_sum/", "teacher_wt_dice_sum/a/b", "_wt_dice_sum"):
        with pytest.raises(ValueError, match="not a Dice tally key"):
            DiceTally.parse(key)
    with pytest.raises(ValueError, match="without '/'"):
        DiceTally("teacher/flair", "wt")  # the old "who" spelling would not read back
    with pytest.raises(ValueError, match="region"):
        DiceTally("student", "et")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="part"):
        DiceTally("student", "wt").key("mean")  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "networks"), [
    ("baseline", [("student", "")]),
    ("kdnet", [("teacher", ""), ("student", "")]),
    ("barlow", [("teacher", ""), ("student", "")]),
    ("mtcmkd", [("teacher", "flair"), ("teacher", "t2"), ("teacher", "t1"), ("student", "")]),
])
def test_each_method_writes_and_logs_todays_stat_strings(name, networks) -> None:
    """Pinned strings: a step's stats keys (checkpoints' epoch_stats) and end_epoch's log keys
    (log.jsonl), in order, for every built-in method."""
    method = build_method(make_cfg(name), CH)
    _, _, stats = method.compute_terms(blob_batch(), 0)
    expected = []
    for network, mod in networks:
        suffix = f"/{mod}" if mod else ""
        expected += [f"{network}_{r}_dice_{p}{suffix}" for r in ("wt", "tc")
                     for p in ("sum", "count")]
    assert list(stats) == expected
    logs = method.end_epoch(stats)
    student = ["student_wt_dice", "student_tc_dice"]
    if name == "baseline":
        assert list(logs) == student
    elif name == "mtcmkd":
        assert list(logs) == student + [
            k for m in ("flair", "t2", "t1")
            for k in (f"teacher_wt_dice/{m}", f"teacher_tc_dice/{m}", f"alpha/{m}")]
    else:
        assert list(logs) == student + ["teacher_wt_dice", "teacher_tc_dice"]
    for key in stats:  # every key reads back as one of this method's tallies
        tally, _ = DiceTally.parse(key)
        assert (tally.network, tally.modality) in networks
        assert logs[tally.log_key] == pytest.approx(
            stats[tally.key("sum")].item() / stats[tally.key("count")].item()
            if stats[tally.key("count")].item() > 0 else 1.0)


def test_paper_preset_measures_teachers_with_slice_dice() -> None:
    cfg = load_config(CONFIGS / "mtcmkd-paper.yaml")
    assert cfg.method.options.performance_dice == "slice2d"
    default = load_config(CONFIGS / "mtcmkd.yaml")
    assert default.method.options.performance_dice == "patch3d"


def test_end_epoch_sets_alpha_from_reduced_teacher_dice() -> None:
    method = build_method(make_cfg("mtcmkd"), CH)
    assert isinstance(method, MTCMKD)
    assert torch.allclose(method.alpha, torch.full((3,), 0.05))  # equal before any epoch
    stats: dict[str, torch.Tensor] = {}
    for m, total, count in (("flair", 1.8, 2.0), ("t2", 1.2, 2.0), ("t1", 0.3, 1.0)):
        stats[f"teacher_wt_dice_sum/{m}"] = torch.tensor(total)
        stats[f"teacher_wt_dice_count/{m}"] = torch.tensor(count)  # WT = 0.9, 0.6, 0.3
    logs = method.end_epoch(stats)
    expected = [0.15 * w / 1.8 for w in (0.9, 0.6, 0.3)]  # 0.075, 0.05, 0.025
    assert method.alpha.tolist() == pytest.approx(expected, rel=1e-6)
    assert method.alpha.sum().item() == pytest.approx(0.15)
    assert logs["alpha/flair"] > logs["alpha/t2"] > logs["alpha/t1"]
    assert logs["teacher_wt_dice/t2"] == pytest.approx(0.6)

    # alpha is a buffer: saved, restored, and used by the next step's KD terms.
    state = method.state_dict()
    assert torch.equal(state["alpha"], method.alpha)
    fresh = build_method(make_cfg("mtcmkd"), CH)
    fresh.load_state_dict(state)
    assert fresh.alpha.tolist() == pytest.approx(expected, rel=1e-6)
    terms, _, _ = fresh.compute_terms(blob_batch(), 1)
    s = fresh.student(one(blob_batch()["image"], "t1ce"))
    t = fresh.teachers["t1"](one(blob_batch()["image"], "t1"))
    assert terms["student/kd_t1"].item() == pytest.approx(
        expected[2] * kd_kl(s, t, 20.0).item(), rel=1e-5)


def test_end_epoch_wt_tc_metric_and_empty_epoch() -> None:
    method = build_method(make_cfg("mtcmkd", student_modalities=["t1"],
                                   performance_metric="wt_tc"), CH)
    assert isinstance(method, MTCMKD)
    assert method.teacher_modalities == ("flair", "t2", "t1ce")
    one_ = torch.tensor(1.0)
    stats = {f"teacher_wt_dice_sum/{m}": torch.tensor(v) for m, v in
             (("flair", 0.8), ("t2", 0.8), ("t1ce", 0.4))}
    stats |= {f"teacher_tc_dice_sum/{m}": torch.tensor(v) for m, v in
              (("flair", 0.2), ("t2", 0.6), ("t1ce", 1.0))}
    stats |= {f"teacher_{r}_dice_count/{m}": one_ for r in ("wt", "tc")
              for m in ("flair", "t2", "t1ce")}
    method.end_epoch(stats)  # perf = 0.5, 0.7, 0.7
    assert method.alpha.tolist() == pytest.approx([0.15 * p / 1.9 for p in (0.5, 0.7, 0.7)])
    # Nothing counted (every patch empty and predicted empty): every teacher scores 1.
    method.end_epoch({})
    assert method.alpha.tolist() == pytest.approx([0.05] * 3)


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # identical networks on both ranks
        method = build_method(make_cfg("mtcmkd"), CH)
        assert isinstance(method, MTCMKD)
        epoch_stats: dict[str, torch.Tensor] = {}
        for step in range(2):  # each rank sees its own data
            out = method(blob_batch(seed=100 * rank + step), 0)
            for key, value in out.stats.items():
                epoch_stats[key] = epoch_stats.get(key, torch.zeros(())) + value
        local = method.teacher_performance(epoch_stats)
        for key in sorted(epoch_stats):
            dist.all_reduce(epoch_stats[key], op=dist.ReduceOp.SUM)
        method.end_epoch(epoch_stats)
        gathered = [torch.zeros(3) for _ in range(world)]
        dist.all_gather(gathered, method.alpha.clone())
        torch.save({"alpha": gathered, "local_perf": local}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_two_gloo_ranks_hold_identical_alpha(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in results:
        a0, a1 = result["alpha"]
        assert torch.equal(a0, a1)
        assert a0.sum().item() == pytest.approx(0.15)
    # The ranks saw different data (their local performances differ), yet agree on alpha.
    assert not torch.equal(results[0]["local_perf"], results[1]["local_perf"])


# ---------------------------------------------------------------------------------- KD-Net


def test_kdnet_stage_one_trains_only_the_teacher_stage_two_only_the_student() -> None:
    method = build_method(make_cfg("kdnet", kind="kdnet", widths=[4, 8, 16],
                                   kdnet_teacher_epochs=2), CH)
    assert isinstance(method, KDNet)
    method.train()
    groups = method.param_groups()
    optimiser = torch.optim.Adam([{"params": p} for p in groups.values()], lr=1e-2)
    batch = blob_batch()

    for epoch in (0, 1):  # stage 1: the student gets no gradient and does not move
        assert method.frozen_groups(epoch) == {"student"}
        before = [p.detach().clone() for p in groups["student"]]
        optimiser.zero_grad(set_to_none=True)
        out = method(batch, epoch)
        assert set(out.terms) == {"teacher/gt"}
        out.loss.backward()
        assert all(p.grad is None for p in groups["student"])
        assert all(p.grad is not None for n, p in method.teacher.named_parameters()
                   if not n.startswith("ds_"))  # its DS head is unused in KD-Net
        optimiser.step()
        assert all(torch.equal(a, b) for a, b in zip(before, groups["student"], strict=True))

    # Stage 2: the teacher is frozen even though Adam holds momentum for it from stage 1.
    assert method.frozen_groups(2) == {"teachers"}
    teacher_before = [p.detach().clone() for p in groups["teachers"]]
    student_before = [p.detach().clone() for p in groups["student"]]
    optimiser.zero_grad(set_to_none=True)
    out = method(batch, 2)
    assert set(out.terms) == {"student/kd", "student/gt", "student/kl"}
    assert not method.teacher.training and method.student.training
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in groups["teachers"])
    optimiser.step()
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, groups["teachers"], strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(student_before, groups["student"],
                                                      strict=True))


def test_kdnet_stage_two_terms_hand_computed() -> None:
    method = build_method(make_cfg("kdnet"), CH)
    assert isinstance(method, KDNet)
    batch = blob_batch(rc=True)
    out = method(batch, 1)
    y = batch["label"].masked_fill(batch["label"] == 4, 0)
    with torch.no_grad():
        t = method.teacher.forward_features(batch["image"])  # all four, in store order
        s = method.student.forward_features(one(batch["image"], "t1ce"))
    expected = {
        "student/kd": 0.75 * kdnet_kd_loss(s["logits"], t["logits"], 5.0),
        "student/gt": 0.25 * kdnet_gt_loss(s["logits"], y),
        "student/kl": 10.0 * bottleneck_kl(s["bottleneck"], t["bottleneck"]),
    }
    for key, value in expected.items():
        assert out.terms[key].item() == pytest.approx(value.item(), rel=1e-5), key
    assert out.loss.item() == pytest.approx(sum(v.item() for v in expected.values()), rel=1e-5)


# ---------------------------------------------------------------------------- Barlow Twins


@pytest.mark.parametrize("students", [["t1ce"], ["flair", "t1ce"]])
def test_barlow_both_paths_learn(students: list[str]) -> None:
    method = build_method(make_cfg("barlow", student_modalities=students), CH)
    assert isinstance(method, BarlowKD)
    assert method.student.in_channels == len(students) and method.teacher.in_channels == 4
    groups = method.param_groups()
    optimiser = torch.optim.Adam([{"params": p} for p in groups.values()], lr=1e-2)
    before = {g: [p.detach().clone() for p in ps] for g, ps in groups.items()}
    out = method(blob_batch(), 0)
    assert set(out.terms) == {"teacher/seg", "student/seg", "teacher/ds", "student/ds",
                              "barlow/latent"}
    out.loss.backward()
    for net in (method.teacher, method.student):  # every parameter but the unused 1/4 DS head
        assert all(p.grad is not None for n, p in net.named_parameters()
                   if not n.startswith("ds_quarter"))
    optimiser.step()
    for g in ("teachers", "student"):
        assert any(not torch.equal(a, b) for a, b in zip(before[g], groups[g], strict=True)), g


def test_barlow_terms_hand_computed_and_latent_reaches_both_paths() -> None:
    method = build_method(make_cfg("barlow", student_modalities=["flair", "t1ce"]), CH)
    assert isinstance(method, BarlowKD)
    batch = blob_batch()
    terms, _, _ = method.compute_terms(batch, 0)
    y = batch["label"]
    y_half = y[:, ::2, ::2, ::2]
    with torch.no_grad():
        t = method.teacher.forward_features(batch["image"])
        s = method.student.forward_features(batch["image"][:, [3, 1]])  # flair, t1ce
        bt = barlow_twins_loss(bottleneck_embeddings(t["bottleneck"]),
                               bottleneck_embeddings(s["bottleneck"]))
    expected = {
        "teacher/seg": segmentation_loss(t["logits"], y),
        "student/seg": segmentation_loss(s["logits"], y),
        "teacher/ds": 0.1 * cross_entropy(t["ds_half"], y_half),
        "student/ds": 0.1 * cross_entropy(s["ds_half"], y_half),
        "barlow/latent": bt / 16,  # divided by D = widths[-1]
    }
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value.item(), rel=1e-5), key
    terms["barlow/latent"].backward()  # neither side detached: both encoders get a gradient
    assert method.teacher.stem.main[0].weight.grad.abs().sum() > 0
    assert method.student.stem.main[0].weight.grad.abs().sum() > 0
    assert method.student.head.weight.grad is None  # the decoder is not on the latent path


# ------------------------------------------------------------------- regions, bf16, overfit


@pytest.mark.parametrize("name", ["baseline", "mtcmkd", "barlow"])
def test_region_output(name: str) -> None:
    method = build_method(make_cfg(name, output="regions"), CH)
    out = method(blob_batch(rc=True), 1)
    assert out.prediction.shape == (2, 3, 16, 16, 16)
    assert torch.isfinite(out.loss)
    if name == "mtcmkd":
        assert "student/kd_flair" in out.terms and method.cdsfl.n_classes == 3


CASES = [("baseline", {}), ("mtcmkd", {}), ("mtcmkd", {"preset": "paper"}),
         ("kdnet", {}), ("barlow", {}), ("mtcmkd", {"output": "regions"})]


@pytest.mark.parametrize(("name", "extra"), CASES)
def test_terms_finite_under_bf16_autocast(name: str, extra: dict) -> None:
    method = build_method(make_cfg(name, **extra), CH)
    batch = blob_batch(rc=True)
    for epoch in (0, 1):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = method(batch, epoch)
        assert isinstance(out, MethodOutput)
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
        assert all(torch.isfinite(v) for v in out.terms.values()), out.terms
        assert all(torch.isfinite(v) for v in out.stats.values())
        out.loss.backward()


def _train(method: Method, batch: dict[str, torch.Tensor], epoch: int, steps: int) -> list[float]:
    optimiser = torch.optim.Adam(
        [{"params": p} for p in method.param_groups().values()], lr=1e-3
    )
    losses = []
    for _ in range(steps):
        optimiser.zero_grad(set_to_none=True)
        out = method(batch, epoch)
        out.loss.backward()
        optimiser.step()
        losses.append(out.loss.item())
    return losses


@pytest.mark.integration
@pytest.mark.parametrize(("name", "extra", "ratio"), [
    ("baseline", {}, 0.85),
    ("mtcmkd", {"kd_start_epoch": 0}, 0.85),  # KD on from the first step
    ("barlow", {}, 0.6),
])
def test_overfit_two_patches(name: str, extra: dict, ratio: float) -> None:
    """20 Adam steps (lr 1e-3) on two 16^3 blob patches lower the loss clearly (seeded: the
    observed ratios are ~0.7, ~0.7 and ~0.4)."""
    method = build_method(make_cfg(name, **extra), CH)
    method.train()
    losses = _train(method, blob_batch(), 0, 20)
    assert losses[-1] < ratio * losses[0], losses


@pytest.mark.integration
def test_overfit_kdnet_student_in_stage_two() -> None:
    method = build_method(make_cfg("kdnet", kdnet_teacher_epochs=1), CH)
    method.train()
    batch = blob_batch()
    teacher = _train(method, batch, 0, 8)  # stage 1: the teacher learns
    assert teacher[-1] < 0.9 * teacher[0], teacher
    student = _train(method, batch, 1, 20)  # stage 2: the student learns from it
    assert student[-1] < 0.5 * student[0], student


# ------------------------------------------------------------- a new method is one module


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyOptions(MethodOptions):
    """The options of a method that exists only in this test file."""

    name: ClassVar[str] = "toy"
    student_count: ClassVar[tuple[int, int]] = (1, 2)
    has_teachers: ClassVar[bool] = False

    toy_weight: float = 0.5
    """Weight of the student's segmentation loss."""

    def _validate(self) -> None:
        self._require(self.toy_weight > 0, "toy_weight", "must be > 0")


class Toy(Method):
    """The student alone, its loss scaled by ``toy_weight``."""

    Options = ToyOptions
    options: ToyOptions

    def __init__(self, cfg: RunConfig, channels: Sequence[str]) -> None:
        super().__init__(cfg, channels)
        self.student = self._network(len(cfg.method.student_modalities))

    def compute_terms(self, batch, epoch):  # type: ignore[no-untyped-def]
        image, labels = self._unpack(batch)
        logits = self.student(self._student_input(image))
        loss = self.options.toy_weight * self._seg(logits, target_labels(labels, self.output))
        return {"student/seg": loss}, logits, dice_stats("student", logits, labels, self.output)

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"student": list(self.student.parameters())}

    def describe(self) -> dict[str, object]:
        return self._describe({"student": (self.student, self.student_channels(), "student")},
                              [("student/seg", self.options.toy_weight, "all", "toy")], {})


@pytest.fixture
def toy_registered() -> Iterator[None]:
    """Register the toy method for one test; the registry is as before afterwards."""
    saved = dict(registry._OPTIONS), dict(registry._CLASSES)
    register_method(Toy)
    yield
    for table, before in zip((registry._OPTIONS, registry._CLASSES), saved, strict=True):
        table.clear()
        table.update(before)


def test_a_method_defined_in_one_module_builds_from_a_config_dict(toy_registered, tmp_path):
    """Adding a method = one module (options + class + register_method) and one config: no
    edit to mtcmkd.config, the registry or the loop."""
    assert Toy.name == "toy" and METHODS["toy"] is Toy and "toy" in method_names()
    cfg = make_cfg("toy", toy_weight=2.0, student_modalities=["t1ce", "flair"])
    assert cfg.method.options == ToyOptions(toy_weight=2.0)
    assert cfg.method.effective_teacher_modalities == ()
    method = build_method(cfg, CH)
    assert type(method) is Toy and method.student_channels() == ("t1ce", "flair")
    out = method(blob_batch(), 0)
    assert out.terms.keys() == {"student/seg"} and torch.isfinite(out.loss)
    assert method.describe()["loss_terms"][0]["weight"] == 2.0
    # Its options are validated and typed like the built-in ones, with their key paths ...
    with pytest.raises(ConfigError, match=r"^method.toy_weight: must be > 0 \(got 0\)$"):
        make_cfg("toy", toy_weight=0)
    with pytest.raises(ConfigError, match="method.student_modalities: toy needs 1 or 2"):
        make_cfg("toy", student_modalities=["t1", "t1ce", "t2"])
    with pytest.raises(ConfigError, match="method.teacher_modalities: toy has no teachers"):
        make_cfg("toy", teacher_modalities=["t1"])
    # ... another method's option is refused with its owner named, and the toy's for them ...
    with pytest.raises(ConfigError, match="method.kdnet_beta: an option of method 'kdnet'"):
        make_cfg("toy", kdnet_beta=3.0)
    with pytest.raises(ConfigError, match="method.toy_weight: an option of method 'toy'"):
        make_cfg("mtcmkd", toy_weight=2.0)
    # ... and its config file round-trips and resolves through --set like any other.
    path = tmp_path / "toy.yaml"
    dump_config(cfg, path)
    assert load_config(path) == cfg
    again = load_config(CONFIGS / "tiny.yaml", ["method.name=toy", "method.toy_weight=2"])
    assert again.method.options.toy_weight == 2.0

