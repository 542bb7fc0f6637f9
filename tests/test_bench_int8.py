"""`benchmarks/bench_int8.py`: its core on a tiny network (the JSON keys, a finite window
agreement per int8 route), the traceable copy of the student, what the FX route quantises, and
the accuracy comparison on a tiny store (calibration from training cases only)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from conftest import load_script
from test_evaluate import student_env

from mtcmkd.models import build_network
from mtcmkd.models.norms import GroupNorm3d

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench_int8.py"
ORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script(BENCH)


def needs_ort() -> None:
    for name in ORT_PACKAGES:
        pytest.importorskip(name)


def finite_fraction(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0


def test_traceable_network_is_the_student(bench: ModuleType) -> None:
    torch.manual_seed(0)
    net = build_network("resunet", 1, 4, (4, 8, 16)).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(bench.TraceablePatchNetwork(net)(x), net(x))
    with pytest.raises(TypeError, match="ResidualUNet"):
        bench.TraceablePatchNetwork(build_network("kdnet", 1, 4, (4, 8, 16)))


@pytest.mark.integration  # several seconds: quantises and runs a network
def test_fx_route_quantises_every_3d_conv_and_keeps_group_norm_float(bench: ModuleType) -> None:
    torch.manual_seed(0)
    net = build_network("resunet", 1, 4, (4, 8, 16)).eval()
    calibration = bench.random_calibration(2, 16, seed=0)
    module, info = bench.fx_int8(net, calibration)
    counts = info["modules"]
    # The convs logits need (not the two deep-supervision heads, which inference never runs).
    convs = sum(isinstance(m, torch.nn.Conv3d) for m in net.modules()) - 2
    assert counts["int8 Conv3d"] == convs
    assert counts["int8 ConvTranspose3d"] == sum(
        isinstance(m, torch.nn.ConvTranspose3d) for m in net.modules())
    assert counts["float GroupNorm"] == sum(isinstance(m, GroupNorm3d) for m in net.modules())
    assert "float Conv3d" not in counts
    with torch.no_grad():
        out = module(calibration[0])
    assert out.shape == (1, 4, 16, 16, 16) and bool(torch.isfinite(out).all())


@pytest.mark.integration  # several seconds: quantises and runs a network
@pytest.mark.parametrize("route", ["fx", "ort"])
def test_quick_core_yields_the_json_keys_and_a_finite_agreement(bench: ModuleType,
                                                                 tmp_path: Path,
                                                                 route: str) -> None:
    if route == "ort":
        needs_ort()
    out = tmp_path / "int8.json"
    assert bench.main(["--quick", "--threads", "1", "--routes", route, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"settings", "machine", "load_before", "load_after", "timing", "accuracy",
            "command"} <= set(result)
    row = result["timing"]["tiny"]
    assert {"fp32_s", "bf16_cl_s", "bf16_cl_window_agreement", "parameters", "routes"} <= set(row)
    entry = row["routes"][route]
    assert entry["status"] == "ok", entry
    assert entry["int8_s"] > 0
    assert finite_fraction(entry["int8_window_agreement"])
    # Random weights give small logit margins, but int8 must still track float32 mostly.
    assert entry["int8_window_agreement"] > 0.5
    if route == "ort":
        assert entry["fp32_window_agreement"] > 0.99  # the same network in another runtime
        assert entry["session_graph_ops"].get("QLinearConv", 0) > 0


def test_a_failing_route_is_recorded_not_raised(bench: ModuleType) -> None:
    def broken() -> tuple[dict, dict]:
        raise RuntimeError("no int8 kernel for this\nsecond line")

    x = torch.zeros(1, 1, 16, 16, 16)
    entry = bench._timed_route(broken, 16, x, x.argmax(1), repeats=1)
    assert entry == {"status": "failed", "error": "RuntimeError: no int8 kernel for this"}


def test_summarise_dice_deltas_and_agreement(bench: ModuleType) -> None:
    ref_labels = {"a": np.array([[[0, 1], [2, 3]]]), "b": np.zeros((1, 2, 2), dtype=int)}
    labels = {"a": np.array([[[0, 1], [2, 2]]]), "b": np.zeros((1, 2, 2), dtype=int)}
    ref = {"a": {"WT": 0.8, "TC": 0.6, "ET": 0.5}, "b": {"WT": 1.0, "TC": 1.0, "ET": 1.0}}
    got = {"a": {"WT": 0.8, "TC": 0.5, "ET": 0.49}, "b": {"WT": 1.0, "TC": 1.0, "ET": 1.0}}
    s = bench.summarise(got, labels, ref, ref_labels)
    assert s["dice_delta_vs_fp32"]["TC"] == pytest.approx(-0.05)
    assert s["dice_delta_vs_fp32"]["ET"] == pytest.approx(-0.005)
    assert s["max_abs_case_delta"]["TC"] == pytest.approx(0.1)
    assert s["agreement"] == pytest.approx(7 / 8)
    assert s["agreement_tumour"] == pytest.approx(2 / 3)  # tumour voxels: 1, 2, 3 of case a
    assert s["within_0.005"] is False  # TC moved by 0.05


@pytest.mark.integration  # several seconds: quantises and runs a network
def test_student_accuracy_calibrates_on_training_cases_only(bench: ModuleType,
                                                             tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    env = student_env(tmp_path)
    ids = env["ids"]
    (env["run"] / "splits.json").write_text(json.dumps({"train": ids[:2], "test": ids[2:]}))
    calibrated: list[str] = []
    original = bench.calibration_patches

    def recording(store, case_ids, *args, **kwargs):  # type: ignore[no-untyped-def]
        calibrated.extend(case_ids)
        return original(store, case_ids, *args, **kwargs)

    monkeypatch.setattr(bench, "calibration_patches", recording)
    result = bench.student_accuracy(env["run"], env["store"], ids[2:], ["fx"], threads=1,
                                    workdir=tmp_path / "work", n_calib=2)
    assert sorted(set(calibrated)) == sorted(ids[:2])  # the run's training cases, no other
    assert result["calibration"]["from_training_cases"] == 2
    fp32, int8 = result["variants"]["fp32"], result["variants"]["fx_int8"]
    assert set(fp32["per_case"]) == set(ids[2:])
    assert fp32["dice_delta_vs_fp32"] == {"WT": 0.0, "TC": 0.0, "ET": 0.0}
    assert int8.get("status") != "failed", int8
    assert finite_fraction(int8["agreement"]) and finite_fraction(int8["agreement_tumour"])
    with pytest.raises(ValueError, match="overlap"):
        bench.student_accuracy(env["run"], env["store"], ids[1:], ["fx"], threads=1,
                               workdir=tmp_path / "work", n_calib=2)
