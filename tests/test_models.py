"""Unit tests for mtcmkd.models: parameter counts from METHODS.md, shapes, TorchScript, errors.

Everything except the parameter counts uses tiny widths so the file runs in seconds on 2 CPUs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import needs_cxx
from torch import nn

from mtcmkd.models import (
    CDSFL,
    ChannelAttentionGate,
    KDNetUNet,
    ResidualBlock,
    ResidualUNet,
    build_network,
    count_parameters,
)

# TorchScript works in torch 2.13 but warns that it is deprecated; the export path relies on it.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"
)

TINY = (4, 8, 12, 16)  # 3 downsamplings: sizes must be multiples of 8
TINY_KDNET_5 = (4, 8, 8, 12, 16)  # KD-Net's 5 levels: sizes must be multiples of 16
SIZES = [(16, 16, 16), (24, 16, 32)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _tiny_networks(in_channels: int = 1) -> list[torch.nn.Module]:
    return [
        ResidualUNet(in_channels, 4, TINY).eval(),
        KDNetUNet(in_channels, 4, TINY).eval(),
    ]


# ---------------------------------------------------------------- parameter counts (METHODS.md)


def test_residual_unet_parameter_count_matches_paper() -> None:
    assert count_parameters(ResidualUNet(in_channels=1, n_classes=4)) == 9_459_478


def test_residual_block_parameter_count() -> None:
    assert count_parameters(ResidualBlock(32, 64, stride=2)) == 221_696


def test_channel_attention_gate_parameter_counts() -> None:
    assert count_parameters(ChannelAttentionGate(384)) == 18_840
    assert count_parameters(ChannelAttentionGate(64)) == 580


def test_cdsfl_parameter_count() -> None:
    assert count_parameters(CDSFL()) == 2_540
    assert count_parameters(CDSFL(n_teachers=1)) == 580 + 260 + 20


def test_count_parameters_trainable_only() -> None:
    net = ChannelAttentionGate(64)
    net.mlp[0].requires_grad_(False)
    assert count_parameters(net) == 580
    assert count_parameters(net, trainable_only=True) == 580 - (64 * 4 + 4)


# ---------------------------------------------------------------- shapes


@pytest.mark.integration
@pytest.mark.parametrize("size", SIZES)
def test_residual_unet_shapes(size: tuple[int, int, int]) -> None:
    net = ResidualUNet(1, 4, TINY).eval()
    d, h, w = size
    x = torch.randn(2, 1, d, h, w)
    with torch.no_grad():
        logits = net(x)
        feats = net.forward_features(x)
    assert logits.shape == (2, 4, d, h, w)
    assert set(feats) == {"logits", "ds_half", "ds_quarter", "features_half", "bottleneck"}
    assert feats["logits"].shape == (2, 4, d, h, w)
    assert feats["ds_half"].shape == (2, 4, d // 2, h // 2, w // 2)
    assert feats["ds_quarter"].shape == (2, 4, d // 4, h // 4, w // 4)
    assert feats["features_half"].shape == (2, TINY[1], d // 2, h // 2, w // 2)
    assert feats["bottleneck"].shape == (2, TINY[-1], d // 8, h // 8, w // 8)
    torch.testing.assert_close(feats["logits"], logits)


@pytest.mark.parametrize("size", SIZES)
def test_kdnet_shapes(size: tuple[int, int, int]) -> None:
    net = KDNetUNet(1, 4, TINY).eval()
    d, h, w = size
    x = torch.randn(2, 1, d, h, w)
    with torch.no_grad():
        logits = net(x)
        feats = net.forward_features(x)
    assert logits.shape == (2, 4, d, h, w)
    assert {"logits", "ds_half", "features_half", "bottleneck"} <= set(feats)
    assert feats["ds_half"].shape == (2, 4, d // 2, h // 2, w // 2)
    assert feats["features_half"].shape == (2, TINY[1], d // 2, h // 2, w // 2)
    assert feats["bottleneck"].shape == (2, TINY[-1], d // 8, h // 8, w // 8)
    torch.testing.assert_close(feats["logits"], logits)


def test_kdnet_five_levels_has_four_skips() -> None:
    net = KDNetUNet(4, 4, TINY_KDNET_5).eval()
    assert net.size_multiple == 16
    assert len(net.up) == 4
    x = torch.randn(1, 4, 16, 32, 16)
    with torch.no_grad():
        feats = net.forward_features(x)
    assert feats["logits"].shape == (1, 4, 16, 32, 16)
    assert feats["bottleneck"].shape == (1, 16, 1, 2, 1)


@pytest.mark.parametrize("in_channels", [1, 4])
def test_one_and_four_channel_inputs(in_channels: int) -> None:
    for net in _tiny_networks(in_channels):
        with torch.no_grad():
            out = net(torch.randn(1, in_channels, 16, 16, 16))
        assert out.shape == (1, 4, 16, 16, 16)
        assert torch.isfinite(out).all()


# ---------------------------------------------------------------- TorchScript


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["resunet", "kdnet"])
def test_torchscript_matches_eager_at_two_sizes(kind: str, tmp_path: Path) -> None:
    net = build_network(kind, 1, 4, TINY).eval()
    scripted = torch.jit.script(net)
    # Round trip through a file, as the export does.
    path = tmp_path / f"{kind}.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    for d, h, w in SIZES:
        x = torch.randn(1, 1, d, h, w)
        with torch.no_grad():
            expected = net(x)
            torch.testing.assert_close(scripted(x), expected, rtol=0.0, atol=1e-5)
            torch.testing.assert_close(loaded(x), expected, rtol=0.0, atol=1e-5)
            eager_feats = net.forward_features(x)
            scripted_feats = scripted.forward_features(x)
        assert set(scripted_feats) == set(eager_feats)
        for key, value in eager_feats.items():
            torch.testing.assert_close(scripted_feats[key], value, rtol=0.0, atol=1e-5)


def test_torchscript_keeps_size_check() -> None:
    scripted = torch.jit.script(ResidualUNet(1, 4, TINY).eval())
    # A scripted `raise ValueError` surfaces as torch.jit.Error with the original message.
    with pytest.raises(torch.jit.Error, match="multiple of 8"):
        scripted(torch.randn(1, 1, 12, 16, 16))


def test_cdsfl_scripts() -> None:
    fusion = CDSFL(3, 8, 4).eval()
    scripted = torch.jit.script(fusion)
    feats = [torch.randn(1, 8, 4, 6, 8) for _ in range(3)]
    with torch.no_grad():
        torch.testing.assert_close(scripted(feats), fusion(feats), rtol=0.0, atol=1e-5)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kind", ["resunet", "kdnet"])
def test_non_multiple_size_raises_value_error(kind: str) -> None:
    net = build_network(kind, 1, 4, TINY)
    with pytest.raises(ValueError, match="multiple of 8"):
        net.forward_features(torch.randn(1, 1, 16, 20, 16))
    with pytest.raises(ValueError, match="multiple of 8"):
        net(torch.randn(1, 1, 12, 16, 16))
    with pytest.raises(ValueError, match="5D input"):
        net(torch.randn(1, 16, 16, 16))


def test_build_network_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="'unet3d'"):
        build_network("unet3d", 1, 4, None)


def test_build_network_defaults() -> None:
    assert build_network("resunet", 1, 4, None).widths == (32, 64, 128, 256)
    assert build_network("kdnet", 4, 4, None).widths == (16, 32, 64, 128, 256)


def test_bad_widths_raise_value_error() -> None:
    with pytest.raises(ValueError, match="divide by 6 or 4"):
        ResidualUNet(1, 4, (4, 10, 12, 16))
    with pytest.raises(ValueError, match="at least 3 widths"):
        ResidualUNet(1, 4, (4, 8))


def test_cdsfl_rejects_wrong_inputs() -> None:
    fusion = CDSFL(3, 8, 4)
    good = torch.randn(1, 8, 4, 4, 4)
    with pytest.raises(ValueError, match="one feature tensor per teacher"):
        fusion([good, good])
    with pytest.raises(ValueError, match="same shape"):
        fusion([good, good, torch.randn(1, 6, 4, 4, 4)])


# ---------------------------------------------------------------- CDSFL behaviour


def test_cdsfl_output_shape_and_gradient_reaches_every_teacher_input() -> None:
    fusion = CDSFL(n_teachers=3, channels=8, n_classes=4)
    feats = [torch.randn(2, 8, 4, 6, 8, requires_grad=True) for _ in range(3)]
    fused = fusion(feats)
    assert fused.shape == (2, 4, 4, 6, 8)
    fused.square().mean().backward()
    for f in feats:
        assert f.grad is not None
        assert f.grad.abs().sum() > 0


@pytest.mark.integration
def test_cdsfl_gradient_reaches_every_teacher_network() -> None:
    """The cooperative part of MTCM-KD: the fusion loss trains all teachers."""
    teachers = [ResidualUNet(1, 4, TINY) for _ in range(3)]
    fusion = CDSFL(n_teachers=3, channels=TINY[1], n_classes=4)
    x = torch.randn(1, 1, 16, 16, 16)
    fused = fusion([t.forward_features(x)["features_half"] for t in teachers])
    assert fused.shape == (1, 4, 8, 8, 8)
    fused.square().mean().backward()
    for teacher in teachers:
        grad = teacher.stem.shortcut.weight.grad
        assert grad is not None and grad.abs().sum() > 0


# ---------------------------------------------------------------- mixed precision


def test_bf16_autocast_cpu_gives_finite_outputs() -> None:
    x = torch.randn(1, 1, 16, 16, 16)
    fusion = CDSFL(3, TINY[1], 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for net in _tiny_networks():
            feats = net.forward_features(x)
            for value in feats.values():
                assert torch.isfinite(value.float()).all()
        fused = fusion([feats["features_half"]] * 3)
        assert torch.isfinite(fused.float()).all()


def _out_of_place_copy(net: ResidualUNet) -> ResidualUNet:
    """The same weights with every in-place step of the network turned off (the layers as
    they were before inference dropped its extra full-size tensors)."""
    import copy

    twin = copy.deepcopy(net)
    for m in twin.modules():
        if isinstance(m, nn.LeakyReLU):
            m.inplace = False
    return twin


@pytest.mark.parametrize("autocast", [False, True])
def test_inference_forward_gives_the_training_forward_bit_for_bit(autocast: bool) -> None:
    """`forward` under no_grad (skips dropped, gate and residual sums in place) computes the
    same logits as with autograd on and as `forward_features`, and leaves its input alone."""
    net = ResidualUNet(1, 4, TINY).eval()
    x = torch.randn(2, 1, 16, 24, 16)
    before = x.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad():
            lean = net(x)
        with_grad = net(x).detach()
        features = net.forward_features(x)["logits"].detach()
    assert torch.equal(x, before)
    assert torch.equal(lean, with_grad) and torch.equal(lean, features)
    assert lean.dtype == (torch.bfloat16 if autocast else torch.float32)


def test_gate_pools_channels_last_bf16_in_place_with_the_same_result() -> None:
    """bf16 channels-last maps take the gate's matrix-product mean: the same factors (to bf16
    rounding) as the plain mean of the same values laid out contiguously."""
    gate = ChannelAttentionGate(24).eval()
    x = (torch.randn(2, 24, 8, 12, 10) + torch.linspace(-3, 3, 24)[None, :, None, None, None])
    x = x.to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = gate.scale(x.contiguous())
        fast = gate.scale(x.contiguous(memory_format=torch.channels_last_3d))
        pooled = x.float().flatten(2).mean(-1)
    assert fast.shape == plain.shape == (2, 24, 1, 1, 1) and fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), plain.float(), atol=2e-2, rtol=0)
    assert pooled.std() > 1  # channels differ, so a mixed-up channel order would show


def test_in_place_layers_leave_the_gradients_unchanged() -> None:
    """In-place LeakyReLU and residual sums give the gradients of the out-of-place layers,
    bit for bit (training takes the in-place path too)."""
    net = ResidualUNet(1, 4, TINY).train()
    twin = _out_of_place_copy(net)
    x = torch.randn(2, 1, 16, 16, 16)
    grads = []
    for model in (net, twin):
        feats = model.forward_features(x)
        loss = sum(v.float().square().mean() for v in feats.values())
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize("groups, affine", [(4, True), (6, False), (24, True)])
def test_group_norm_by_reduction_matches_torch(groups, affine):
    """The GPU path of GroupNorm3d (run here on the CPU) against F.group_norm in float64."""
    import torch.nn.functional as F

    from mtcmkd.models.norms import group_norm_by_reduction

    g = torch.Generator().manual_seed(groups)
    x = (torch.randn(2, 24, 12, 10, 8, generator=g) * 0.5 + 3).requires_grad_()
    w = (torch.randn(24, generator=g) if affine else None)
    b = (torch.randn(24, generator=g) if affine else None)
    upstream = torch.randn(x.shape, generator=g)
    ours = group_norm_by_reduction(x, groups, w, b, 1e-5)
    (grad_ours,) = torch.autograd.grad(ours, x, upstream)
    x64 = x.detach().double().requires_grad_()
    ref = F.group_norm(x64, groups, None if w is None else w.double(),
                       None if b is None else b.double(), 1e-5)
    (grad_ref,) = torch.autograd.grad(ref, x64, upstream.double())
    assert ours.dtype == torch.float32
    assert (ours.double() - ref).abs().max() < 1e-5
    assert (grad_ours.double() - grad_ref).abs().max() < 1e-4
    # bfloat16 in, bfloat16 out, statistics in float32
    out16 = group_norm_by_reduction(x.detach().bfloat16(), groups, w, b, 1e-5)
    assert out16.dtype == torch.bfloat16
    assert (out16.double() - ref.detach()).abs().max() < 0.1


def test_norm_layers_keep_the_published_layers_and_state_dict():
    """GroupNorm3d / instance_norm3d are drop-ins: same outputs on the CPU, same state keys."""
    from mtcmkd.models.norms import GroupNorm3d, instance_norm3d

    x = torch.randn(1, 24, 8, 8, 8) * 2 + 1
    assert torch.equal(GroupNorm3d(6, 24)(x), nn.GroupNorm(6, 24)(x))
    assert (instance_norm3d(24)(x) - nn.InstanceNorm3d(24)(x)).abs().max() < 1e-5
    assert set(instance_norm3d(24, affine=True).state_dict()) == set(
        nn.InstanceNorm3d(24, affine=True).state_dict())
    assert list(instance_norm3d(24).state_dict()) == []
    scripted = torch.jit.script(GroupNorm3d(4, 24))
    assert torch.equal(scripted(x), nn.GroupNorm(4, 24)(x))


def test_group_norm_function_gradients_are_exact():
    """The hand-written backward of the training path against finite differences (float64)."""
    from mtcmkd.models.norms import _GroupNormFunction

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 6, 3, 4, 2, generator=g, dtype=torch.float64) + 2).requires_grad_()
    w = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_()
    for groups in (2, 3, 6):
        assert torch.autograd.gradcheck(
            lambda x, w, b, groups=groups: _GroupNormFunction.apply(x, w, b, groups, 1e-5),
            (x, w, b))
    assert torch.autograd.gradcheck(
        lambda x: _GroupNormFunction.apply(x, None, None, 3, 1e-5), (x,))


def test_group_norm_function_keeps_only_the_input_for_backward():
    """bf16 training: the function saves x as it is (2 bytes a voxel) plus per-group scalars;
    autograd through the plain formula saves float32 copies (at least 4x the bytes)."""
    from mtcmkd.models.norms import _GroupNormFunction, group_norm_by_reduction

    x = (torch.randn(1, 8, 16, 16, 16) * 2 + 1).bfloat16().requires_grad_()
    w = torch.randn(8).bfloat16().requires_grad_()
    b = torch.randn(8).bfloat16().requires_grad_()

    def saved_bytes(fn) -> int:
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return sum(sizes), out

    ours, out_fn = saved_bytes(lambda: _GroupNormFunction.apply(x, w, b, 4, 1e-5))
    plain, out_plain = saved_bytes(lambda: group_norm_by_reduction(x, 4, w, b, 1e-5))
    x_bytes = x.numel() * x.element_size()
    assert x_bytes <= ours < x_bytes + 1024
    assert plain >= 4 * x_bytes
    assert torch.equal(out_fn, out_plain)  # the same forward arithmetic
    upstream = torch.randn(x.shape).bfloat16()
    grads_fn = torch.autograd.grad(out_fn, (x, w, b), upstream)
    grads_plain = torch.autograd.grad(out_plain, (x, w, b), upstream)
    for a, c in zip(grads_fn, grads_plain, strict=True):
        assert a.dtype == c.dtype == torch.bfloat16
        assert (a.float() - c.float()).abs().max() <= 0.02 * c.float().abs().max() + 1e-3


@pytest.mark.integration
@needs_cxx
def test_group_norm_function_compiles_in_one_graph():
    """train.compile on a GPU traces the norms' training path: no graph break, same gradients."""
    from mtcmkd.models.norms import _GroupNormFunction, group_norm_by_reduction

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1, 8, 8, 8, 8, generator=g) + 1).requires_grad_()
    w = torch.randn(8, generator=g).requires_grad_()
    b = torch.randn(8, generator=g).requires_grad_()
    compiled = torch.compile(
        lambda x, w, b: _GroupNormFunction.apply(x, w, b, 4, 1e-5).square().sum(), fullgraph=True)
    got = torch.autograd.grad(compiled(x, w, b), (x, w, b))
    want = torch.autograd.grad(group_norm_by_reduction(x, 4, w, b, 1e-5).square().sum(),
                               (x, w, b))
    for a, c in zip(got, want, strict=True):
        assert (a - c).abs().max() <= 1e-5 * c.abs().max() + 1e-6
