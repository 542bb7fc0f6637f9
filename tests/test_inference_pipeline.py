"""The one inference pipeline: reference bit for bit, bf16, box layout, threads, precision auto.

"Today's" result is pinned by :func:`_todays_predict_volume`, a frozen copy of the inference
every earlier version computed (numpy brain crop, z-score, Gaussian-blended windows, argmax,
uncrop), written with the primitive modules only, so the pipeline and every caller can be
checked against it bit for bit.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import typer
from conftest import write_raw
from typer.testing import CliRunner

from mtcmkd.cli.evaluate import evaluate
from mtcmkd.cli.predict import predict
from mtcmkd.config import config_hash, dump_config, load_config, to_dict
from mtcmkd.data import open_store
from mtcmkd.engine import validation
from mtcmkd.evaluation import store_scoring_cases
from mtcmkd.export.torchscript import synthetic_volume
from mtcmkd.inference import (
    BrainZScore,
    InferencePipeline,
    InferenceSettings,
    SlidingWindow,
    brain_bbox,
    build_pipeline,
    default_threads,
    predict_volume,
    probabilities_to_labels,
    resolve_precision,
    uncrop,
)
from mtcmkd.metrics import score_case
from mtcmkd.models import ResidualUNet, build_network
from mtcmkd.preprocessing import preprocess
from mtcmkd.student_weights import save_student

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PATCH = (16, 16, 16)
runner = CliRunner()
app = typer.Typer(pretty_exceptions_enable=False)
app.command("predict")(predict)
app.command("evaluate")(evaluate)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks run fastest on one thread on a shared 2-core machine; the CLI tests set
    their own count, which is restored here."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _no_native_bf16(monkeypatch, native: bool) -> None:
    """Pretend the CPU does (or does not) have AVX512-BF16 / AMX."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: native, raising=False)


def _tiny_unet(n_classes: int = 4, seed: int = 0) -> ResidualUNet:
    torch.manual_seed(seed)
    return ResidualUNet(1, n_classes, widths=(8, 16, 24, 32)).eval()


def _todays_predict_volume(network, image: np.ndarray, patch, n_classes: int = 4,
                           output: str = "softmax", *, normalize: bool = True):
    """The inference as every version before the pipeline computed it (frozen here)."""
    bbox = brain_bbox(image)
    crop = image[(slice(None), *(slice(lo, hi) for lo, hi in bbox))]
    window = SlidingWindow(network, patch, n_classes, overlap=0.5, output=output)
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None]
        if normalize:
            x = BrainZScore()(x)
        probs = window(x)[0]
        labels = probabilities_to_labels(probs, output).numpy()
    return uncrop(labels, bbox, image.shape[1:]), probs.numpy(), bbox


def _script(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice
        return torch.jit.script(module)


# --- settings ---------------------------------------------------------------------------------


def test_settings_reference_and_checks():
    ref = InferenceSettings.reference()
    assert (ref.precision, ref.layout, ref.overlap, ref.mirror, ref.sigma_scale,
            ref.window_batch) == ("fp32", "windows", 0.5, False, 0.125, 1)
    assert ref.is_reference and not ref.with_(precision="auto").is_reference
    for bad in ({"precision": "fp16"}, {"layout": "tiles"}, {"overlap": 1.0},
                {"window_batch": 0}, {"sigma_scale": 0.0}):
        with pytest.raises(ValueError):
            InferenceSettings(**bad)


def test_precision_auto_follows_the_cpu(monkeypatch):
    _no_native_bf16(monkeypatch, False)
    assert resolve_precision("auto", "cpu") == "fp32"
    pipeline = build_pipeline(_tiny_unet(), PATCH, 4, settings=InferenceSettings(precision="auto"))
    assert not pipeline.window.bf16 and not pipeline.window.channels_last

    _no_native_bf16(monkeypatch, True)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("auto", "cuda") == "fp32"  # GPUs keep float32 predict
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cuda") == "bf16"
    net = _tiny_unet()
    pipeline = build_pipeline(net, PATCH, 4, settings=InferenceSettings(precision="auto"))
    assert pipeline.window.bf16 and pipeline.window.channels_last
    weights = [p for p in net.parameters() if p.dim() == 5]
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in weights)
    assert any(not p.is_contiguous() for p in weights)
    with pytest.raises(ValueError):
        resolve_precision("fast", "cpu")


def test_default_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 4}, raising=False)
    assert default_threads() == 5


# --- the reference, bit for bit -------------------------------------------------------------


@pytest.mark.parametrize("output", ["softmax", "regions"])
@pytest.mark.parametrize("shape", [(29, 19, 15), (12, 14, 10)])
def test_reference_equals_todays_inference_bit_for_bit(output, shape):
    n = 4 if output == "softmax" else 3
    net = _tiny_unet(n, seed=3)
    image = synthetic_volume(shape, seed=1)
    labels, probs, bbox = _todays_predict_volume(net, image, PATCH, n, output)
    result = predict_volume(net, image, PATCH, n, output)  # library defaults: the reference
    assert result.bbox == bbox
    assert np.array_equal(result.labels, labels) and result.labels.dtype == np.uint8
    assert np.array_equal(result.probabilities, probs)
    assert len(np.unique(labels)) > 1  # not a vacuous comparison
    # the store path (already z-scored, no normalisation) and the scripted module too
    z = BrainZScore()(torch.from_numpy(image)[None]).numpy()[0]
    expected, _, _ = _todays_predict_volume(net, z, PATCH, n, output, normalize=False)
    assert np.array_equal(predict_volume(net, z, PATCH, n, output, normalize=False).labels,
                          expected)
    scripted = _script(build_pipeline(net, PATCH, n, output))
    assert np.array_equal(scripted(torch.from_numpy(image)[None])[0].numpy(), labels)


def test_reference_after_a_bf16_run_on_the_same_network(monkeypatch):
    """The bf16 path makes the weights channels-last; a later reference run must compute on
    contiguous weights again, exactly as on a freshly loaded network."""
    _no_native_bf16(monkeypatch, True)
    net = _tiny_unet(seed=5)
    image = synthetic_volume((26, 21, 18), seed=2)
    before = predict_volume(net, image, PATCH, 4)
    predict_volume(net, image, PATCH, 4, precision="auto")
    assert any(not p.is_contiguous() for p in net.parameters() if p.dim() == 5)
    after = predict_volume(net, image, PATCH, 4)
    assert all(p.is_contiguous() for p in net.parameters() if p.dim() == 5)
    assert np.array_equal(after.probabilities, before.probabilities)


def test_validation_runs_the_pipeline_as_before(tmp_path, monkeypatch):
    """Training's validation: store crops as they are, windows at overlap 0.5, the network's
    own dtype; the same labels as the sliding window it ran before (bf16 weights included)."""
    raw, store = tmp_path / "raw", tmp_path / "store"
    ids = sorted(write_raw(raw, "2021", n=2, shape=(24, 28, 20)))
    assert not preprocess(raw, store, n_folds=2).failed
    cfg = load_config(CONFIGS / "tiny.yaml", [f"data.store={json.dumps(str(store))}",
                                              "data.patch_size=[16, 16, 16]",
                                              "train.val_cases=null"])
    monkeypatch.setattr(validation, "all_reduce", lambda t: t)  # one rank, no process group
    scored: list[np.ndarray] = []

    def recording_score(pred, truth, spacing):
        scored.append(pred)
        return score_case(pred, truth, spacing)

    monkeypatch.setattr(validation, "score_case", recording_score)
    root = open_store(store)
    channel = list(root.attrs["channels"]).index("t1ce")
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(1)
        net = build_network("resunet", 1, cfg.model.n_classes, (8, 16, 24, 32)).to(dtype)
        method = SimpleNamespace(student_network=lambda net=net: net,
                                 student_channels=lambda: ("t1ce",))
        scored.clear()
        validation.validate(method, cfg, ids, SimpleNamespace(rank=0, world_size=1))
        assert len(scored) == len(ids)
        for cid, got in zip(ids, scored, strict=True):  # the code validation ran before
            image = np.asarray(root["cases"][cid]["image"][[channel]], dtype=np.float32)
            window = SlidingWindow(net.eval(), (16, 16, 16), cfg.model.n_classes, overlap=0.5,
                                   output=cfg.model.output)
            probs = window(torch.from_numpy(image)[None].to(dtype))
            before = probabilities_to_labels(probs[0], cfg.model.output).numpy()
            assert np.array_equal(got, before) and len(np.unique(before)) > 1, (dtype, cid)


# --- bf16 -------------------------------------------------------------------------------------


def _smooth_field(shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, *shape, generator=gen)
    kernel = torch.ones(1, 1, 5, 5, 5) / 125
    for _ in range(2):
        x = F.conv3d(F.pad(x, [2] * 6, mode="replicate"), kernel)
    return (x - x.mean()) / x.std()


def _bands(x: torch.Tensor) -> torch.Tensor:
    """Four classes: bands of a smooth field (a task a tiny U-Net learns in seconds)."""
    return torch.bucketize(x[:, 0], torch.tensor([-0.5, 0.3, 1.0]))


@pytest.fixture(scope="module")
def trained_net() -> ResidualUNet:
    """A tiny U-Net trained 60 steps on :func:`_bands` (about 80% voxel accuracy): confident
    where the field is far from a band edge, as a real student is away from boundaries."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = ResidualUNet(1, 4, widths=(4, 8, 12, 16))
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    for step in range(60):
        x = _smooth_field(PATCH, step)
        loss = F.cross_entropy(net(x), _bands(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(previous)
    return net.eval()


@pytest.mark.integration
def test_bf16_agrees_with_fp32(trained_net):
    field = _smooth_field((40, 36, 28), 999)
    image = (500 + 100 * field[0]).numpy()  # raw-like intensities, every voxel brain
    fp32 = predict_volume(trained_net, image, PATCH, 4)
    bf16 = predict_volume(trained_net, image, PATCH, 4, precision="bf16")
    truth = _bands(field)[0].numpy()
    # The comparison means something only if fp32 segments the input into several classes
    # (a network predicting one class everywhere would make any bf16 output "agree").
    assert (fp32.labels == truth).mean() > 0.7
    assert (np.bincount(fp32.labels.ravel(), minlength=4) / fp32.labels.size).min() > 0.05
    assert not np.array_equal(bf16.probabilities, fp32.probabilities)  # bf16 really ran
    assert bf16.probabilities.dtype == np.float32
    agreement = (bf16.labels == fp32.labels).mean()
    assert agreement >= 0.99, agreement


def test_scripted_pipeline_is_fp32_only():
    """A scripted bf16 pipeline refuses to run instead of silently computing float32."""
    pipeline = _script(InferencePipeline(_tiny_unet(), PATCH, 4, precision="bf16"))
    with pytest.raises(torch.jit.Error, match="cannot be run"):
        pipeline(torch.from_numpy(synthetic_volume((18, 18, 18)))[None])


# --- box layout -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(20, 20, 20), (17, 20, 14)])
def test_box_equals_windows_when_the_box_fits_one_window(shape):
    """Brain boxes of 16^3 and 13x16x10: one window of the patch 16^3, and one box pass padded
    to the stride 8 = the same 16^3 input (the same symmetric padding), so the only difference
    is the Gaussian blend of one window, p * w / w."""
    net = _tiny_unet(seed=4)
    image = synthetic_volume(shape, seed=3)  # 2-voxel zero margin around the brain
    windows = predict_volume(net, image, PATCH, 4)
    box = predict_volume(net, image, PATCH, 4, layout="box")
    assert box.bbox == windows.bbox
    np.testing.assert_allclose(box.probabilities, windows.probabilities, atol=1e-6, rtol=0)
    assert np.array_equal(box.labels, windows.labels)


def test_box_layout_is_one_pass_and_scripts():
    net = _tiny_unet(seed=6)
    calls: list[tuple[int, ...]] = []
    hook = net.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    image = synthetic_volume((41, 30, 23), seed=4)  # box 37x26x19 -> padded to 40x32x24
    box = predict_volume(net, image, PATCH, 4, layout="box")
    assert calls == [(1, 1, 40, 32, 24)]
    windows = predict_volume(net, image, PATCH, 4)
    assert len(calls) > 2 and not np.array_equal(box.probabilities, windows.probabilities)
    hook.remove()  # TorchScript cannot compile the hook
    scripted = _script(build_pipeline(net, PATCH, 4, settings=InferenceSettings(layout="box")))
    x = torch.from_numpy(image)[None]
    assert np.array_equal(scripted(x)[0].numpy(), box.labels)


# --- the command line -------------------------------------------------------------------------


def _student_run(root: Path, seed: int = 0) -> Path:
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.widths=[8, 16, 24, 32]",
                                              "data.patch_size=[16, 16, 16]"])
    run = root / "run"
    run.mkdir(parents=True)
    dump_config(cfg, run / "config.yaml")
    torch.manual_seed(seed)
    save_student(run / "best_student.pt", build_network("resunet", 1, 4, (8, 16, 24, 32)),
                 config=to_dict(cfg), config_hash=config_hash(cfg), channels=("t1ce",),
                 output="softmax", n_classes=4, patch_size=PATCH)
    return run


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline_cli")
    ids = write_raw(root / "raw", "2021", n=2, shape=(24, 28, 20))
    return {"root": root, "raw": root / "raw", "ids": sorted(ids), "run": _student_run(root)}


def test_predict_reference_writes_todays_labels(cli_env, tmp_path):
    from mtcmkd.student_weights import load_student

    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", "-m", str(cli_env["run"]), "-i", str(cli_env["raw"]),
                                 "-o", str(out), "--reference", "--threads", "1"])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads((out / "predict_report.json").read_text())
    assert report["reference"] and report["precision_used"] == "fp32"
    assert (report["layout"], report["overlap"], report["threads"]) == ("windows", 0.5, 1)
    network = load_student(cli_env["run"] / "best_student.pt").network
    for case_id in cli_env["ids"]:
        source = cli_env["raw"] / case_id / f"{case_id}_t1ce.nii.gz"
        image = nib.load(str(source)).get_fdata(dtype=np.float32)[None]
        labels, _, _ = _todays_predict_volume(network, image, PATCH)
        written = np.asarray(nib.load(str(out / f"{case_id}.nii.gz")).dataobj)
        assert np.array_equal(written, np.where(labels == 3, 4, labels)), case_id


def test_predict_options_threads_and_refusals(cli_env, tmp_path, monkeypatch):
    _no_native_bf16(monkeypatch, False)
    torch.set_num_threads(2)
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", "-m", str(cli_env["run"]), "-i", str(cli_env["raw"]),
                                 "-o", str(out), "--threads", "1", "--layout", "box"])
    assert result.exit_code == 0, result.output + result.stderr
    assert torch.get_num_threads() == 1  # applied with torch.set_num_threads
    report = json.loads((out / "predict_report.json").read_text())
    assert (report["precision"], report["precision_used"]) == ("auto", "fp32")  # no bf16 CPU
    assert report["layout"] == "box" and not report["reference"]
    assert "fp32 (auto), box, 1 thread(s)" in result.output

    for extra, fragment in ((["--reference", "--precision", "bf16"], "drop --precision"),
                            (["--reference", "--mirror", "--overlap", "0.25"],
                             "drop --overlap, --mirror"),
                            (["--precision", "fp16"], "--precision 'fp16'"),
                            (["--layout", "tiles"], "--layout 'tiles'"),
                            (["--threads", "0"], "--threads must be >= 1")):
        result = runner.invoke(app, ["predict", "-m", str(cli_env["run"]), "-i",
                                     str(cli_env["raw"]), "-o", str(tmp_path / "x"), *extra])
        err = result.stderr.strip()
        assert result.exit_code == 2 and fragment in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "x").exists()


def test_evaluate_defaults_to_the_reference(tmp_path, monkeypatch):
    """`evaluate --run` scores with the reference inference unless asked otherwise, so scores
    stay comparable with every earlier evaluation; it records what it ran."""
    _no_native_bf16(monkeypatch, True)  # even where predict would pick bf16
    raw, store = tmp_path / "raw", tmp_path / "store"
    write_raw(raw, "2021", n=4, shape=(24, 28, 20))
    assert not preprocess(raw, store, n_folds=2).failed
    run = _student_run(tmp_path)
    calls: list[InferenceSettings | None] = []
    real = store_scoring_cases

    def recording(*args, settings=None, **kwargs):
        calls.append(settings)
        return real(*args, settings=settings, **kwargs)

    monkeypatch.setattr("mtcmkd.evaluation.store_scoring_cases", recording)
    result = runner.invoke(app, ["evaluate", "--year", "2021", "--run", str(run), "--store",
                                 str(store), "--split", "validation", "--out",
                                 str(tmp_path / "eval"), "--threads", "1"])
    assert result.exit_code == 0, result.output + result.stderr
    assert calls and calls[0].is_reference
    source = json.loads((tmp_path / "eval" / "metrics.json").read_text())["source"]
    assert source["reference"] and source["precision_used"] == "fp32" and source["threads"] == 1
    assert "inference: reference" in result.output
    result = runner.invoke(app, ["evaluate", "--year", "2021", "--pred", str(tmp_path),
                                 "--gt", str(raw), "--precision", "bf16"])
    assert result.exit_code == 2 and "go with --run" in result.stderr
