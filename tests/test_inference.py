"""Inference: z-score, sliding window (eager and TorchScript), labels, native space and NIfTI."""

from __future__ import annotations

import struct
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SHARED_SAMPLE
from torch import nn

from mtcmkd.brats import brats_affine
from mtcmkd.inference import (
    BrainZScore,
    SlidingWindow,
    brain_bbox,
    gaussian_importance_map,
    predict_volume,
    probabilities_to_labels,
    to_release_labels,
    uncrop,
    window_starts,
    write_label_nifti,
)
from mtcmkd.models import ResidualUNet
from mtcmkd.preprocessing import zscore_nonzero

PATCH = (16, 16, 16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks run fastest on one thread; on a shared 2-core machine, several threads per
    process oversubscribe the cores and make a 16^3 forward pass ~30x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _script(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice
        return torch.jit.script(module)


def _pointwise_net(in_channels: int = 1, n_classes: int = 4) -> nn.Conv3d:
    """A 1x1x1 convolution with fixed weights: each voxel's output depends on that voxel only."""
    conv = nn.Conv3d(in_channels, n_classes, kernel_size=1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen))
    return conv.eval()


def _flip_equivariant_net(n_classes: int = 4) -> nn.Conv3d:
    """3x3x3 convolution, zero padding, kernel symmetric under every axis flip."""
    conv = nn.Conv3d(1, n_classes, kernel_size=3, padding=1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        k = torch.randn(conv.weight.shape, generator=gen)
        for dims in ([2], [3], [4]):
            k = k + torch.flip(k, dims)
        conv.weight.copy_(k / 8)
        conv.bias.zero_()
    return conv.eval()


def _tiny_unet() -> ResidualUNet:
    torch.manual_seed(0)
    return ResidualUNet(1, 4, widths=(8, 16, 24, 32)).eval()


# --- gaussian map and window positions ------------------------------------------------------


@pytest.mark.parametrize("patch", [(16, 16, 16), (9, 12, 7)])
def test_gaussian_importance_map_properties(patch):
    g = gaussian_importance_map(patch, sigma_scale=0.125)
    assert g.shape == patch and g.dtype == torch.float32
    assert g.max().item() == pytest.approx(1.0)
    assert g.min().item() == pytest.approx(1e-4) and g.min().item() > 0
    for dim in range(3):  # centred: symmetric under every flip
        torch.testing.assert_close(g, torch.flip(g, [dim]))
    # peak in the middle, decreasing towards the border along each axis
    centre = tuple((p - 1) // 2 for p in patch)
    assert g[centre].item() == pytest.approx(1.0, abs=1e-6) or min(patch) % 2 == 0
    line = g[:, centre[1], centre[2]]
    half = line[: (patch[0] + 1) // 2]
    assert torch.all(half[1:] >= half[:-1])
    # wider sigma, flatter map
    assert gaussian_importance_map(patch, 0.5).min() > g.min()
    with pytest.raises(ValueError):
        gaussian_importance_map(patch, sigma_scale=0.0)


def test_window_starts_cover_exactly():
    assert window_starts(16, 16, 8) == [0]
    assert window_starts(40, 16, 8) == [0, 8, 16, 24]
    assert window_starts(37, 16, 8) == [0, 8, 16, 21]  # last window flush with the end
    for size in range(16, 60):
        starts = window_starts(size, 16, 6)
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s : s + 16] = True
        assert covered.all() and starts[-1] == size - 16
        assert all(b - a <= 6 for a, b in zip(starts, starts[1:], strict=False))


# --- sliding window ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 16, 16), (20, 37, 23), (9, 30, 16), (5, 7, 3)])
@pytest.mark.parametrize("overlap", [0.5, 0.25, 0.0])
def test_pointwise_network_gives_whole_volume_result(shape, overlap):
    """Blending identical per-voxel values is exact, so windows must not change anything."""
    net = _pointwise_net()
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(2))
    window = SlidingWindow(net, PATCH, n_classes=4, overlap=overlap, window_batch=3)
    with torch.no_grad():
        expected = torch.softmax(net(x), dim=1)
    out = window(x)
    assert out.shape == (1, 4, *shape) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(1, *shape), atol=1e-5, rtol=0)


def test_region_output_is_sigmoid():
    net = _pointwise_net(n_classes=3)
    x = torch.randn(1, 1, 21, 18, 17, generator=torch.Generator().manual_seed(3))
    out = SlidingWindow(net, PATCH, n_classes=3, output="regions")(x)
    with torch.no_grad():
        torch.testing.assert_close(out, torch.sigmoid(net(x)), atol=1e-6, rtol=1e-5)


def test_scripted_equals_eager_at_two_sizes():
    net = _tiny_unet()
    eager = SlidingWindow(net, PATCH, n_classes=4, overlap=0.5)
    scripted_both = _script(SlidingWindow(_script(net), PATCH, n_classes=4, overlap=0.5))
    scripted_wrapper = _script(SlidingWindow(net, PATCH, n_classes=4, overlap=0.5, window_batch=2))
    gen = torch.Generator().manual_seed(4)
    for shape in [(24, 20, 33), (12, 24, 17)]:  # the second is smaller than the patch in D
        x = torch.randn(1, 1, *shape, generator=gen)
        reference = eager(x)
        assert reference.shape == (1, 4, *shape)
        torch.testing.assert_close(scripted_both(x), reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(scripted_wrapper(x), reference, atol=1e-5, rtol=0)


def test_scripted_normalisation_and_window_in_one_module(tmp_path):
    """Raw intensities in, probabilities out: one TorchScript file, reloaded, any size."""
    net = _tiny_unet()
    pipeline = nn.Sequential(BrainZScore(), SlidingWindow(net, PATCH, n_classes=4, mirror=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notices
        torch.jit.save(_script(pipeline), str(tmp_path / "pipeline.pt"))
        loaded = torch.jit.load(str(tmp_path / "pipeline.pt"))
    x = torch.zeros(1, 1, 18, 20, 14)
    x[:, :, 2:16, 3:18, 2:12] = 100 + 20 * torch.rand(1, 1, 14, 15, 10)
    torch.testing.assert_close(loaded(x), pipeline(x), atol=1e-5, rtol=0)


def test_mirror_tta_equals_plain_for_flip_equivariant_network():
    net = _flip_equivariant_net()
    x = torch.randn(1, 1, 20, 17, 24, generator=torch.Generator().manual_seed(5))
    plain = SlidingWindow(net, PATCH, n_classes=4)(x)
    mirrored = SlidingWindow(net, PATCH, n_classes=4, mirror=True, window_batch=2)(x)
    torch.testing.assert_close(mirrored, plain, atol=1e-6, rtol=1e-5)
    # ... while for a network that is not equivariant, the 8 mirrors do change the result.
    unet = _tiny_unet()
    assert not torch.allclose(SlidingWindow(unet, PATCH, 4, mirror=True)(x),
                              SlidingWindow(unet, PATCH, 4)(x), atol=1e-4)


def test_window_batch_does_not_change_the_result():
    net = _tiny_unet()
    x = torch.randn(1, 1, 28, 20, 24, generator=torch.Generator().manual_seed(6))
    one = SlidingWindow(net, PATCH, n_classes=4, window_batch=1)(x)
    many = SlidingWindow(net, PATCH, n_classes=4, window_batch=5)(x)
    torch.testing.assert_close(many, one, atol=1e-5, rtol=0)


def test_sliding_window_input_checks():
    net = _pointwise_net(n_classes=4)
    with pytest.raises(ValueError, match="n_classes"):
        SlidingWindow(net, PATCH, n_classes=3)(torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="one volume"):
        SlidingWindow(net, PATCH, n_classes=4)(torch.randn(2, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="output"):
        SlidingWindow(net, PATCH, n_classes=4, output="logits")
    with pytest.raises(ValueError, match="overlap"):
        SlidingWindow(net, PATCH, n_classes=4, overlap=1.0)


# --- normalisation -----------------------------------------------------------------------


def test_brain_zscore_matches_preprocessing():
    rng = np.random.default_rng(7)
    volumes = []
    for _ in range(2):
        v = np.zeros((14, 16, 12), np.float32)
        v[2:12, 3:14, 1:11] = rng.normal(400, 60, (10, 11, 10)).astype(np.float32)
        volumes.append(v)
    x = torch.from_numpy(np.stack(volumes)[:, None])  # (2, 1, D, H, W): per-sample statistics
    out = BrainZScore()(x)
    assert out.dtype == torch.float32
    for i, v in enumerate(volumes):
        expected, _, _ = zscore_nonzero(v)
        np.testing.assert_allclose(out[i, 0].numpy(), expected, atol=1e-6, rtol=1e-6)
        assert (out[i, 0].numpy()[v == 0] == 0).all()
    # already normalised data stays (nearly) the same; scripted == eager
    torch.testing.assert_close(BrainZScore()(out), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_script(BrainZScore())(x), out, atol=0, rtol=0)


def test_brain_zscore_edge_cases():
    empty = torch.zeros(1, 1, 4, 4, 4)
    assert torch.equal(BrainZScore()(empty), empty)
    constant = torch.zeros(1, 1, 4, 4, 4)
    constant[0, 0, 1:3, 1:3, 1:3] = 5.0
    with pytest.raises(ValueError, match="constant"):
        BrainZScore()(constant)


# --- labels ------------------------------------------------------------------------------


def test_probabilities_to_labels_softmax_and_regions():
    softmax = torch.zeros(4, 2, 2, 1)
    softmax[0, 0, 0, 0] = 0.9  # background
    softmax[1, 0, 1, 0] = 0.9  # NCR
    softmax[2, 1, 0, 0] = 0.9  # ED
    softmax[3, 1, 1, 0] = 0.9  # ET
    expected = torch.tensor([[[0], [1]], [[2], [3]]], dtype=torch.uint8)
    labels = probabilities_to_labels(softmax[None], "softmax")
    assert labels.dtype == torch.uint8 and torch.equal(labels, expected)

    # channels WT, TC, ET per voxel -> nested labels
    regions = torch.tensor([
        [0.2, 0.0, 0.0],  # nothing -> 0
        [0.9, 0.1, 0.1],  # WT only -> 2
        [0.9, 0.8, 0.2],  # WT + TC -> 1
        [0.9, 0.8, 0.7],  # all -> 3
        [0.3, 0.6, 0.0],  # TC without WT -> 1 (applied after WT)
        [0.9, 0.2, 0.6],  # ET outside TC -> 3 (applied last)
        [0.5, 0.5, 0.5],  # exactly 0.5 is not above threshold -> 0
    ]).T.reshape(3, 7, 1, 1)
    expected = torch.tensor([0, 2, 1, 3, 1, 3, 0], dtype=torch.uint8).reshape(7, 1, 1)
    assert torch.equal(probabilities_to_labels(regions, "regions"), expected)
    scripted = _script(probabilities_to_labels)
    assert torch.equal(scripted(regions, "regions"), expected)
    assert torch.equal(scripted(softmax, "softmax"), probabilities_to_labels(softmax, "softmax"))
    with pytest.raises(ValueError):
        probabilities_to_labels(softmax, "regions")  # 4 channels
    with pytest.raises(ValueError):
        probabilities_to_labels(softmax, "argmax")


# --- native space ------------------------------------------------------------------------


def test_uncrop_round_trip_and_errors():
    full = np.zeros((10, 12, 8), np.uint8)
    full[2:7, 3:11, 1:6] = np.random.default_rng(8).integers(0, 4, (5, 8, 5))
    bbox = [[2, 7], [3, 11], [1, 6]]
    cropped = full[2:7, 3:11, 1:6]
    np.testing.assert_array_equal(uncrop(cropped, bbox, full.shape), full)
    assert uncrop(cropped, bbox, full.shape).dtype == np.uint8
    with pytest.raises(ValueError, match="axis 1"):
        uncrop(cropped, [[2, 7], [3, 12], [1, 6]], full.shape)
    with pytest.raises(ValueError, match="axis 0"):
        uncrop(cropped, [[6, 11], [3, 11], [1, 6]], full.shape)


def test_to_release_labels():
    canonical = np.array([[[0, 1, 2, 3]]], np.uint8)
    out = to_release_labels(canonical, "2021")
    assert out.dtype == np.uint8 and out.tolist() == [[[0, 1, 2, 4]]]
    assert to_release_labels(canonical, 2023).tolist() == [[[0, 1, 2, 3]]]
    assert to_release_labels(canonical, "msd").tolist() == [[[0, 2, 1, 3]]]
    with pytest.raises(ValueError):
        to_release_labels(np.array([[[4]]], np.uint8), "2021")  # RC does not exist before 2023


def _write_reference(path, shape=(10, 12, 8), zooms=(1.0, 0.9, 2.5), sform_code=0):
    """An int16 image with a BraTS-style header: diag(-1,-1,1) affine with y offset, qform 1.

    Written uncompressed, then its scl_slope / scl_inter are set to 2 / 1 in the file (nibabel
    recomputes them on save), so the test also sees a scaled reference.
    """
    affine = brats_affine(shape) @ np.diag([*zooms, 1.0])
    data = np.random.default_rng(9).integers(0, 900, shape).astype(np.int16)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine if sform_code else None, code=sform_code)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))
    raw = bytearray(path.read_bytes())
    struct.pack_into("<ff", raw, 112, 2.0, 1.0)  # scl_slope, scl_inter (NIfTI-1 offsets)
    path.write_bytes(bytes(raw))
    return nib.load(str(path))


@pytest.mark.parametrize("sform_code", [0, 2])
def test_write_label_nifti_keeps_reference_header(tmp_path, sform_code):
    ref = _write_reference(tmp_path / "t1ce.nii", sform_code=sform_code)
    assert (ref.dataobj.slope, ref.dataobj.inter) == (2.0, 1.0)  # the reference is scaled
    labels = np.random.default_rng(10).integers(0, 5, ref.shape).astype(np.int64)
    out = write_label_nifti(labels, tmp_path / "t1ce.nii", tmp_path / "pred" / "seg.nii.gz")
    assert sorted(p.name for p in out.parent.iterdir()) == ["seg.nii.gz"]  # no temp file left
    seg = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(seg.dataobj), labels)
    assert seg.get_data_dtype() == np.uint8 and np.asarray(seg.dataobj).dtype == np.uint8
    assert (seg.dataobj.slope, seg.dataobj.inter) == (1.0, 0.0)  # no scaling on disk
    np.testing.assert_array_equal(seg.affine, ref.affine)
    for key in ("qform_code", "sform_code", "pixdim", "xyzt_units", "quatern_b", "quatern_c",
                "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z",
                "dim"):
        np.testing.assert_array_equal(seg.header[key], ref.header[key], err_msg=key)
    assert int(seg.header["qform_code"]) == 1 and int(seg.header["sform_code"]) == sform_code
    assert seg.header.get_zooms() == pytest.approx((1.0, 0.9, 2.5))
    assert seg.affine[1, 3] == pytest.approx(11.0)  # the BraTS y offset, shape[1] - 1


def test_write_label_nifti_rejects_bad_input_without_writing(tmp_path):
    _write_reference(tmp_path / "ref.nii")
    target = tmp_path / "seg.nii.gz"
    with pytest.raises(ValueError, match="shape"):
        write_label_nifti(np.zeros((10, 12, 9), np.uint8), tmp_path / "ref.nii", target)
    with pytest.raises(ValueError, match="fit"):
        write_label_nifti(np.full((10, 12, 8), 300), tmp_path / "ref.nii", target)
    with pytest.raises(ValueError, match=".nii"):
        write_label_nifti(np.zeros((10, 12, 8), np.uint8), tmp_path / "ref.nii",
                          tmp_path / "seg.mha")
    assert not target.exists()


# --- predict_volume -------------------------------------------------------------------------


def test_predict_volume_crops_normalises_and_uncrops():
    rng = np.random.default_rng(11)
    image = np.zeros((1, 30, 26, 22), np.float32)
    image[0, 5:25, 4:20, 3:19] = rng.normal(500, 80, (20, 16, 16)).astype(np.float32)
    net = _pointwise_net()
    result = predict_volume(net, image, PATCH, n_classes=4)
    assert result.bbox == [[5, 25], [4, 20], [3, 19]]
    assert result.labels.shape == (30, 26, 22) and result.labels.dtype == np.uint8
    assert result.probabilities.shape == (4, 20, 16, 16)
    outside = np.ones((30, 26, 22), bool)
    outside[5:25, 4:20, 3:19] = False
    assert (result.labels[outside] == 0).all()
    # inside: the pointwise network applied to the z-scored crop, argmax
    z, _, _ = zscore_nonzero(image[0, 5:25, 4:20, 3:19])
    with torch.no_grad():
        expected = net(torch.from_numpy(z)[None, None]).argmax(1)[0].numpy()
    np.testing.assert_array_equal(result.labels[5:25, 4:20, 3:19], expected)
    # raw and already-normalised inputs give the same labels
    normalised = np.zeros_like(image)
    normalised[0, 5:25, 4:20, 3:19] = z
    again = predict_volume(net, normalised, PATCH, n_classes=4)
    np.testing.assert_array_equal(again.labels, result.labels)
    with pytest.raises(ValueError, match="all zero"):
        predict_volume(net, np.zeros((1, 8, 8, 8), np.float32), PATCH)


def test_brain_bbox():
    image = np.zeros((2, 6, 7, 8), np.float32)
    image[0, 1, 2, 3] = 1
    image[1, 4, 5, 6] = -2
    assert brain_bbox(image) == [[1, 5], [2, 6], [3, 7]]


@pytest.mark.real_data
@pytest.mark.skipif(not SHARED_SAMPLE.is_dir(), reason=f"no real BraTS sample at {SHARED_SAMPLE}")
def test_real_case_prediction_written_in_source_space(tmp_path):
    case = SHARED_SAMPLE / "BraTS2021_00410"
    t1ce = nib.load(str(case / "BraTS2021_00410_t1ce.nii.gz"))
    image = np.asarray(t1ce.dataobj, dtype=np.float32)[None]
    result = predict_volume(_pointwise_net(), image, (64, 64, 64), n_classes=4, window_batch=4)
    out = write_label_nifti(to_release_labels(result.labels, "2021"),
                            case / "BraTS2021_00410_t1ce.nii.gz", tmp_path / "00410.nii.gz")
    seg_ref = nib.load(str(case / "BraTS2021_00410_seg.nii.gz"))
    written = nib.load(str(out))
    assert written.shape == seg_ref.shape == (240, 240, 155)
    np.testing.assert_array_equal(written.affine, seg_ref.affine)
    assert int(written.header["qform_code"]) == int(seg_ref.header["qform_code"])
    assert int(written.header["sform_code"]) == int(seg_ref.header["sform_code"])
    assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1, 2, 4}
