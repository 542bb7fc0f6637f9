"""int8 post-training quantisation of the student for CPU inference (issue 17, the int8 lever).

Question: does int8 PTQ of the student's network make whole-case CPU inference materially
faster than today's default (bf16 autocast + channels-last windows) while per-region Dice stays
within 0.005 of float32? Three routes, each recorded whether it works or not:

    pt2e  torch.export + torchao's X86InductorQuantizer (prepare_pt2e / convert_pt2e), then
          torch.compile (Inductor, freezing). The stock quantizer annotates Conv2d/Linear only,
          so the probe also forces the 3-D convs to be annotated and looks at what Inductor's
          generated code runs for them (an int8 oneDNN ``qconv`` or a float convolution between
          quantize/dequantize). Needs ``torchao`` (not a dependency of mtcmkd; the probe is
          skipped with the reason when it is absent; a copy installed with ``pip install
          --target DIR torchao`` is found through ``MTCMKD_TORCHAO_PATH=DIR``). It is
          exported and calibrated at the timing window's shape. Timed on the first --nets
          entry only (each compile costs a minute or more on two cores).
    fx    FX graph-mode PTQ (``prepare_fx`` / ``convert_fx``, the x86 engine's default qconfig
          mapping): quantised Conv3d, ConvTranspose3d, Linear and LeakyReLU; GroupNorm stays
          float (dequantise -> group_norm -> quantise around every norm). The network is traced
          through :class:`TraceablePatchNetwork` (the same modules and weights, with a forward
          FX can trace: no shape checks, no dtype branches), checked bit-equal to the student.
    ort   ONNX Runtime static int8 (``quantize_static``, QDQ, per-channel int8 weights, uint8
          activations) of the ONNX patch network (``mtcmkd.export``'s torch.export program with
          ONNX-friendly norms); ONNX Runtime float32 of the same file is timed beside it.

Measured:
    timing    one window of --size^3 (default 128) through the pipeline's SlidingWindow (the
              network call plus softmax and blending), best of --repeats after one warm-up, in
              one process, --threads threads: float32, bf16 + channels-last (what
              ``InferenceSettings(precision="bf16")`` builds), and each int8 route; seeded random
              weights (speed only) for each --nets size; plus the voxels of that window whose
              argmax equals float32's.
    accuracy  for each ``--student NAME=RUN`` (a trained run folder): calibration on
              --calib-patches patches of the run's patch size cut (seeded) from the run's
              TRAINING cases of --store (never test or validation cases), then whole-case
              inference of the --cases-json test cases (``settings.store.test_cases``) with the
              same windows (the reference settings) for float32, bf16 and every int8 route:
              per-case and mean Dice of WT/TC/ET (``mtcmkd.metrics.per_case.score_case``),
              mean minus float32's, the largest per-case change, and the voxels equal to
              float32's labels (all voxels / voxels labelled tumour by either).

The JSON (--out) holds the figures, the machine, torch/ONNX Runtime versions, the thread count
and the load average before and after. Run (about 25 minutes on two busy cores)::

    .venv/bin/python benchmarks/bench_int8.py --out docs/results/int8.json \\
        --store /tmp/int8-data/store --cases-json /tmp/int8-data/compact_students.json \\
        --student nano=/tmp/int8-data/runs/nano-s0 --student compact=/tmp/int8-data/runs/compact-s0

``--quick`` runs a tiny network on a 16^3 window without the pt2e probe (tests use it).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mtcmkd.data.store import open_store
from mtcmkd.evaluation.run_source import store_scoring_cases
from mtcmkd.inference import InferenceSettings, SlidingWindow, build_pipeline
from mtcmkd.messages import first_line
from mtcmkd.metrics.per_case import score_case
from mtcmkd.models import build_network
from mtcmkd.models.norms import GroupNorm3d
from mtcmkd.models.resunet import ResidualUNet
from mtcmkd.student_weights import StudentBundle, load_student

ROUTES: tuple[str, ...] = ("pt2e", "fx", "ort")
#: Student widths by name (configs/mtcmkd.yaml's model, configs/mtcmkd-nano.yaml's student).
NETS: dict[str, tuple[int, ...]] = {"paper": (32, 64, 128, 256), "compact": (16, 32, 64, 128),
                                    "nano": (8, 16, 32, 64), "tiny": (4, 8, 16)}
REGIONS: tuple[str, ...] = ("WT", "TC", "ET")


# ---------------------------------------------------------------- networks an int8 route takes


class TraceablePatchNetwork(nn.Module):
    """The student's logits from its own modules, in a forward FX can trace symbolically.

    ``ResidualUNet.forward`` checks the input's shape and its blocks branch on dtypes (for
    autocast on a GPU); FX cannot trace either. This forward computes the same thing from the
    same submodules (stem, encoder, decoder stages, head): ``main + shortcut`` per block,
    transposed conv, concat, the channel attention gate, the block. GroupNorm3d layers are
    replaced by ``nn.GroupNorm`` with the same parameters (equal on a CPU by construction), a
    leaf module FX leaves float.
    """

    def __init__(self, network: ResidualUNet) -> None:
        super().__init__()
        if not isinstance(network, ResidualUNet):
            raise TypeError(f"expected a ResidualUNet, got {type(network).__name__}")
        net = copy.deepcopy(network).eval()
        _plain_group_norms(net)
        self.stem, self.encoder, self.decoder, self.head = (net.stem, net.encoder, net.decoder,
                                                            net.head)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem.main(x) + self.stem.shortcut(x)
        skips: list[Tensor] = []
        for block in self.encoder:
            skips.append(x)
            x = block.main(x) + block.shortcut(x)
        for k, stage in enumerate(self.decoder):
            x = torch.cat([stage.up(x), skips[len(skips) - 1 - k]], dim=1)
            flat = x.flatten(2)
            mlp = stage.gate.mlp
            scale = torch.sigmoid(mlp(flat.mean(dim=-1)) + mlp(flat.amax(dim=-1)))
            x = x * scale[:, :, None, None, None]
            x = stage.block.main(x) + stage.block.shortcut(x)
        return self.head(x)


def _plain_group_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, GroupNorm3d):
            plain = nn.GroupNorm(child.num_groups, child.num_channels, child.eps, child.affine)
            plain.load_state_dict(child.state_dict())
            setattr(module, name, plain)
        else:
            _plain_group_norms(child)


def module_counts(module: nn.Module) -> dict[str, int]:
    """How many modules of each quantised / float kind a converted network holds."""
    counts: dict[str, int] = {}
    for m in module.modules():
        kind = type(m)
        if kind.__module__.startswith("torch.ao.nn.quantized") or kind in (
                nn.Conv3d, nn.ConvTranspose3d, nn.Linear, nn.GroupNorm):
            name = ("int8 " if "quantized" in kind.__module__ else "float ") + kind.__name__
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def fx_int8(network: ResidualUNet, calibration: Sequence[Tensor], engine: str = "x86"
            ) -> tuple[nn.Module, dict[str, Any]]:
    """FX graph-mode PTQ of the network (the `fx` route): (int8 module, what was quantised)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = engine
    traceable = TraceablePatchNetwork(network).eval()
    example = calibration[0]
    with torch.no_grad():
        equal = torch.equal(traceable(example), network(example))
    if not equal:  # the traced forward must be the student's, or the comparison means nothing
        raise RuntimeError("TraceablePatchNetwork differs from the student's forward")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices, once per call
        prepared = prepare_fx(traceable, get_default_qconfig_mapping(engine),
                              example_inputs=(example,))
        with torch.no_grad():
            for patch in calibration:
                prepared(patch)
        converted = convert_fx(prepared).eval()
    return converted, {"engine": engine, "modules": module_counts(converted)}


class OrtNetwork(nn.Module):
    """An ONNX Runtime session as a patch network (float32 numpy in and out) for SlidingWindow."""

    def __init__(self, path: Path, threads: int) -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(path), options,
                                                    providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.path = str(path)

    def forward(self, x: Tensor) -> Tensor:
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        (logits,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(np.asarray(logits))


def ort_networks(network: ResidualUNet, calibration: Sequence[Tensor], workdir: Path,
                 threads: int, patch: int) -> tuple[OrtNetwork, OrtNetwork, dict[str, Any]]:
    """The `ort` route: (ONNX Runtime float32, ONNX Runtime static int8, what was quantised)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from mtcmkd.export.onnx_norms import onnx_friendly_norms
    from mtcmkd.export.patch_network import export_patch_program

    bundle = StudentBundle(network=network, channels=("t1ce",) * network.in_channels,
                           output="softmax", n_classes=network.n_classes,
                           patch_size=(patch, patch, patch), meta={})
    program = export_patch_program(bundle, onnx_friendly_norms(copy.deepcopy(network)))
    float_path, int8_path = workdir / "network.onnx", workdir / "network_int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=["image"],
                                         output_names=["logits"], verbose=False)
    onnx_program.save(str(float_path), external_data=False)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"image": p.numpy()} for p in calibration])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(str(float_path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    ops: dict[str, int] = {}
    for node in onnx.load(str(int8_path)).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    info = {"format": "QDQ", "per_channel": True,
            "quantized_graph_ops": {k: ops[k] for k in sorted(ops) if k in (
                "QuantizeLinear", "DequantizeLinear", "Conv", "ConvTranspose", "Gemm")}}
    optimized = _ort_optimized_ops(int8_path, workdir / "network_int8.opt.onnx", threads)
    info["session_graph_ops"] = {k: optimized[k] for k in sorted(optimized) if k in (
        "QLinearConv", "Conv", "ConvTranspose", "Transpose", "QuantizeLinear",
        "DequantizeLinear")}
    return (OrtNetwork(float_path, threads), OrtNetwork(int8_path, threads), info)


def _ort_optimized_ops(path: Path, out: Path, threads: int) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime actually runs (after its fusions: QLinearConv etc.)."""
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.optimized_model_filepath = str(out)
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops: dict[str, int] = {}
    for node in onnx.load(str(out)).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def pt2e_probe(network: ResidualUNet, calibration: Sequence[Tensor], x: Tensor,
               repeats: int) -> dict[str, Any]:
    """The `pt2e` route: what the stock and a conv3d-forcing X86InductorQuantizer quantise,
    what Inductor runs for the 3-D convs, and the compiled timings (float32 compiled beside)."""
    sys_path = os.environ.get("MTCMKD_TORCHAO_PATH")  # torchao outside the venv, e.g. --target
    if sys_path and sys_path not in sys.path:
        sys.path.insert(0, sys_path)
    if importlib.util.find_spec("torchao") is None:
        return {"status": "skipped", "error": "torchao is not installed (torch 2.13 has no "
                "torch.ao.quantization.quantize_pt2e: PT2E moved to torchao)"}
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torch._inductor.utils import run_and_get_code
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    class Conv3dQuantizer(xiq.X86InductorQuantizer):
        """The stock quantizer plus the same int8 annotation on every aten.conv3d."""

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            for node in model.graph.nodes:
                if (node.op == "call_function" and node.target == torch.ops.aten.conv3d.default
                        and xiq.QUANT_ANNOTATION_KEY not in node.meta):
                    self._annotate_conv_node_helper(node, True, self.global_config)
            return model

    # torch.export specialises the example's shape (a guard then refuses any other size), so
    # this route is exported and calibrated at the timing window's shape.
    generator = torch.Generator().manual_seed(len(calibration))
    calibration = [torch.randn(x.shape, generator=generator) for _ in range(2)]
    import torchao

    result: dict[str, Any] = {"status": "ok", "torchao": torchao.__version__,
                              "calibration": "2 random windows of the timing size"}
    with torch.no_grad():
        reference = network(x)
        torch._dynamo.reset()
        with inductor_config.patch(freezing=True):
            compiled = torch.compile(copy.deepcopy(network))
            start = time.perf_counter()
            compiled(x)
            result["fp32_compiled"] = {"compile_s": time.perf_counter() - start,
                                       "s": best_of(lambda: compiled(x), repeats)}
        for name, quantizer_class in (("stock", xiq.X86InductorQuantizer),
                                      ("conv3d_forced", Conv3dQuantizer)):
            entry: dict[str, Any] = {}
            try:
                quantizer = quantizer_class()
                quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
                exported = torch.export.export(copy.deepcopy(network), (calibration[0],)).module()
                prepared = prepare_pt2e(exported, quantizer)
                for patch in calibration:
                    prepared(patch)
                converted = convert_pt2e(prepared)
                targets = [str(n.target) for n in converted.graph.nodes
                           if n.op == "call_function"]
                entry["graph"] = {
                    "conv3d": targets.count("aten.conv3d.default"),
                    "conv_transpose3d": targets.count("aten.conv_transpose3d.input"),
                    "linear": targets.count("aten.linear.default"),
                    "dequantize_per_channel (quantised weights)": targets.count(
                        "quantized_decomposed.dequantize_per_channel.default")}
                torch._dynamo.reset()
                with inductor_config.patch(freezing=True):
                    compiled_q = torch.compile(converted)
                    start = time.perf_counter()
                    out, codes = run_and_get_code(compiled_q, x)
                    entry["compile_s"] = time.perf_counter() - start
                    code = "\n".join(codes)
                    entry["inductor_code"] = {
                        "int8 qconv (onednn.qconv*)": code.count("torch.ops.onednn.qconv"),
                        "float convolution (extern_kernels.convolution)": code.count(
                            "extern_kernels.convolution("),
                        "mkldnn float conv kernels": code.count("torch.ops.mkldnn._convolution"),
                    }
                    entry["s"] = best_of(lambda f=compiled_q: f(x), repeats)
                entry["window_agreement"] = float(
                    (out.argmax(1) == reference.argmax(1)).float().mean())
            except Exception as exc:  # record what the route did, whatever failed
                entry["error"] = f"{type(exc).__name__}: {first_line(exc)}"
            result[name] = entry
    torch._dynamo.reset()
    return result


# ---------------------------------------------------------------- timing


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Best wall seconds of `repeats` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def window_of(network: nn.Module, size: int, precision: str = "fp32") -> SlidingWindow:
    """The pipeline's SlidingWindow for one window of `size`^3 (build_pipeline's settings)."""
    pipeline = build_pipeline(network, (size, size, size), 4,
                              settings=InferenceSettings(precision=precision),
                              device=torch.device("cpu"))
    return pipeline.window


def label_agreement(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float((a == b).mean())


def random_calibration(n: int, size: int, seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 1, size, size, size, generator=generator) for _ in range(n)]


def time_net(name: str, widths: tuple[int, ...], size: int, repeats: int, routes: Sequence[str],
             threads: int, workdir: Path, seed: int = 0, calib_size: int = 32,
             n_calib: int = 4, pt2e: bool = False) -> dict[str, Any]:
    """Timing rows of one network size (seeded random weights, one window of `size`^3)."""
    torch.manual_seed(seed)
    network = build_network("resunet", 1, 4, widths).eval()
    calibration = random_calibration(n_calib, max(calib_size, network.size_multiple * 2), seed)
    x = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(seed + 1))
    row: dict[str, Any] = {"widths": list(widths), "window": size,
                           "parameters": sum(p.numel() for p in network.parameters())}
    with torch.no_grad():
        fp32 = window_of(copy.deepcopy(network), size)
        reference = fp32(x)
        labels = reference.argmax(1)
        row["fp32_s"] = best_of(lambda: fp32(x), repeats)
        bf16 = window_of(copy.deepcopy(network), size, "bf16")
        row["bf16_cl_s"] = best_of(lambda: bf16(x), repeats)
        row["bf16_cl_window_agreement"] = label_agreement(bf16(x).argmax(1), labels)
        routes_out: dict[str, Any] = {}
        if "fx" in routes:
            routes_out["fx"] = _timed_route(lambda: _fx_route(network, calibration), size, x,
                                            labels, repeats)
        if "ort" in routes:
            routes_out["ort"] = _timed_route(
                lambda: _ort_route(network, calibration, workdir / f"ort-{name}", threads, size),
                size, x, labels, repeats)
        if "pt2e" in routes and pt2e:
            try:
                routes_out["pt2e"] = pt2e_probe(network, calibration, x, repeats)
            except Exception as exc:
                routes_out["pt2e"] = {"status": "failed",
                                      "error": f"{type(exc).__name__}: {first_line(exc)}"}
        elif "pt2e" in routes:
            routes_out["pt2e"] = {"status": "skipped", "error": "probed on the first net only"}
        row["routes"] = routes_out
    return row


def _fx_route(network: ResidualUNet, calibration: Sequence[Tensor]
              ) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    module, info = fx_int8(network, calibration)
    return {"int8": module}, info


def _ort_route(network: ResidualUNet, calibration: Sequence[Tensor], workdir: Path,
               threads: int, patch: int) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    workdir.mkdir(parents=True, exist_ok=True)
    float_net, int8_net, info = ort_networks(network, calibration, workdir, threads, patch)
    return {"fp32": float_net, "int8": int8_net}, info


def _timed_route(build: Callable[[], tuple[dict[str, nn.Module], dict[str, Any]]], size: int,
                 x: Tensor, labels: Tensor, repeats: int) -> dict[str, Any]:
    """Build a route's networks and time each in a window; a failure is recorded, not raised."""
    try:
        start = time.perf_counter()
        networks, info = build()
        entry: dict[str, Any] = {"status": "ok", "build_s": time.perf_counter() - start, **info}
        for kind, net in networks.items():
            window = window_of(net, size)
            entry[f"{kind}_s"] = best_of(lambda w=window: w(x), repeats)
            entry[f"{kind}_window_agreement"] = label_agreement(window(x).argmax(1), labels)
        return entry
    except Exception as exc:  # record what the route did, whatever failed
        return {"status": "failed", "error": f"{type(exc).__name__}: {first_line(exc)}"}


# ---------------------------------------------------------------- accuracy on trained students


def calibration_patches(store: Path, case_ids: Sequence[str], channels: Sequence[str],
                        patch: Sequence[int], n: int, seed: int) -> list[Tensor]:
    """`n` patches (1, C, *patch) cut at seeded random positions from the store's z-scored
    crops of `case_ids` (cycled), zero-padded where a crop is smaller than the patch."""
    root = open_store(store)
    index = [list(root.attrs["channels"]).index(c) for c in channels]
    rng = np.random.default_rng(seed)
    patches: list[Tensor] = []
    for i in range(n):
        image = np.asarray(root["cases"][case_ids[i % len(case_ids)]]["image"][index],
                           dtype=np.float32)
        pads = [(0, 0)] + [(0, max(0, p - s)) for p, s in zip(patch, image.shape[1:], strict=True)]
        image = np.pad(image, pads)
        starts = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch, image.shape[1:], strict=True)]
        crop = image[:, starts[0]:starts[0] + patch[0], starts[1]:starts[1] + patch[1],
                     starts[2]:starts[2] + patch[2]]
        patches.append(torch.from_numpy(np.ascontiguousarray(crop))[None])
    return patches


def score_variant(bundle: StudentBundle, store: Path, case_ids: Sequence[str],
                  settings: InferenceSettings) -> tuple[dict[str, dict[str, float]],
                                                        dict[str, np.ndarray], float]:
    """Per-case Dice, the predictions (for agreement), and inference seconds of one variant."""
    dice: dict[str, dict[str, float]] = {}
    labels: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    for case in store_scoring_cases(bundle, store, case_ids, settings=settings):
        dice[case.case_id] = score_case(case.prediction, case.truth, case.spacing)["dice"]
        labels[case.case_id] = case.prediction
    return dice, labels, time.perf_counter() - start


def summarise(dice: dict[str, dict[str, float]], labels: dict[str, np.ndarray],
              ref_dice: dict[str, dict[str, float]], ref_labels: dict[str, np.ndarray]
              ) -> dict[str, Any]:
    mean = {r: float(np.mean([d[r] for d in dice.values()])) for r in REGIONS}
    ref_mean = {r: float(np.mean([d[r] for d in ref_dice.values()])) for r in REGIONS}
    equal = total = equal_fg = total_fg = 0
    for case, pred in labels.items():
        ref = ref_labels[case]
        equal += int((pred == ref).sum())
        total += pred.size
        tumour = ((pred >= 1) & (pred <= 3)) | ((ref >= 1) & (ref <= 3))
        equal_fg += int((pred[tumour] == ref[tumour]).sum())
        total_fg += int(tumour.sum())
    return {
        "dice_mean": mean,
        "dice_delta_vs_fp32": {r: mean[r] - ref_mean[r] for r in REGIONS},
        "max_abs_case_delta": {r: float(max(abs(dice[c][r] - ref_dice[c][r]) for c in dice))
                               for r in REGIONS},
        "agreement": equal / total if total else 1.0,
        "agreement_tumour": equal_fg / total_fg if total_fg else 1.0,
        "within_0.005": bool(all(abs(mean[r] - ref_mean[r]) <= 0.005 for r in REGIONS)),
    }


def student_accuracy(run: Path, store: Path, test_cases: Sequence[str], routes: Sequence[str],
                     threads: int, workdir: Path, n_calib: int = 16, seed: int = 0
                     ) -> dict[str, Any]:
    """Dice of float32, bf16 and every int8 route of one trained student on the test cases."""
    bundle = load_student(run)
    train_cases = json.loads((Path(run) / "splits.json").read_text())["train"]
    overlap = sorted(set(train_cases) & set(test_cases))
    if overlap:
        raise ValueError(f"{run}: training and test cases overlap ({overlap[:3]})")
    calibration = calibration_patches(store, train_cases, bundle.channels, bundle.patch_size,
                                      n_calib, seed)
    out: dict[str, Any] = {"run": str(run), "patch_size": list(bundle.patch_size),
                           "calibration": {"patches": n_calib, "from_training_cases":
                                           len(set(train_cases[:n_calib])), "seed": seed},
                           "test_cases": list(test_cases), "variants": {}}
    reference = InferenceSettings.reference()
    ref_dice, ref_labels, ref_s = score_variant(replace(bundle, network=copy.deepcopy(
        bundle.network)), store, test_cases, reference)
    out["variants"]["fp32"] = {"seconds": ref_s, "per_case": ref_dice,
                               **summarise(ref_dice, ref_labels, ref_dice, ref_labels)}
    variants: dict[str, tuple[Callable[[], nn.Module], InferenceSettings]] = {
        "bf16_cl": (lambda: copy.deepcopy(bundle.network), InferenceSettings(precision="bf16"))}
    ort_cache: dict[str, tuple[OrtNetwork, OrtNetwork, dict[str, Any]]] = {}

    def ort_net(kind: int) -> nn.Module:
        if "nets" not in ort_cache:
            folder = workdir / f"ort-{Path(run).name}"
            folder.mkdir(parents=True, exist_ok=True)
            ort_cache["nets"] = ort_networks(bundle.network, calibration, folder, threads,
                                             bundle.patch_size[0])
        return ort_cache["nets"][kind]

    if "fx" in routes:
        variants["fx_int8"] = (lambda: fx_int8(bundle.network, calibration)[0], reference)
    if "ort" in routes:
        variants["ort_fp32"] = (lambda: ort_net(0), reference)
        variants["ort_int8"] = (lambda: ort_net(1), reference)
    for name, (make, settings) in variants.items():
        try:
            variant = replace(bundle, network=make())
            dice, labels, seconds = score_variant(variant, store, test_cases, settings)
            out["variants"][name] = {"seconds": seconds, "per_case": dice,
                                     **summarise(dice, labels, ref_dice, ref_labels)}
        except Exception as exc:  # record what the route did, whatever failed
            out["variants"][name] = {"status": "failed",
                                     "error": f"{type(exc).__name__}: {first_line(exc)}"}
    return out


# ---------------------------------------------------------------- the run


def machine() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))
    try:
        import onnxruntime
        ort_version: str | None = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "onnxruntime": ort_version,
            "quantized_engines": list(torch.backends.quantized.supported_engines),
            **{flag: flag in flags for flag in ("avx512_vnni", "avx512_bf16", "amx_int8",
                                                "amx_bf16")}}


def run(nets: Sequence[str], size: int, repeats: int, routes: Sequence[str], threads: int,
        students: dict[str, Path], store: Path | None, test_cases: Sequence[str],
        workdir: Path, n_calib: int = 16, pt2e: bool = True) -> dict[str, Any]:
    """Every measurement; the dict the JSON holds."""
    torch.set_num_threads(threads)
    result: dict[str, Any] = {
        "settings": {"nets": list(nets), "window": size, "repeats": repeats,
                     "routes": list(routes), "threads": threads, "calibration_patches": n_calib,
                     "timing": "best of repeats after one warm-up, one process, seeded random "
                               "weights; SlidingWindow of one window (network, softmax, "
                               "blending)"},
        "machine": machine(), "load_before": list(os.getloadavg()), "timing": {},
        "accuracy": {}}
    for i, name in enumerate(nets):
        result["timing"][name] = time_net(name, NETS[name], size, repeats, routes, threads,
                                          workdir, pt2e=pt2e and i == 0)
        result["timing"][name]["load_after"] = list(os.getloadavg())
    for name, path in students.items():
        if store is None:
            raise ValueError("--student needs --store")
        result["accuracy"][name] = student_accuracy(path, store, test_cases, routes, threads,
                                                    workdir, n_calib)
        result["accuracy"][name]["load_after"] = list(os.getloadavg())
    result["load_after"] = list(os.getloadavg())
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON to write.")
    ap.add_argument("--nets", nargs="+", default=["nano", "paper"], choices=list(NETS))
    ap.add_argument("--size", type=int, default=128, help="Window edge of the timing.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--routes", nargs="+", default=list(ROUTES), choices=list(ROUTES))
    ap.add_argument("--student", action="append", default=[], metavar="NAME=RUN",
                    help="A trained run folder whose test-case Dice is compared.")
    ap.add_argument("--store", type=Path, help="The store the students were trained on.")
    ap.add_argument("--cases-json", type=Path,
                    help="JSON with settings.store.test_cases (compact_students.json).")
    ap.add_argument("--calib-patches", type=int, default=16)
    ap.add_argument("--no-pt2e-probe", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="Tiny network, 16^3 window, one repeat, no pt2e probe (for tests).")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    students = dict(item.split("=", 1) for item in args.student)
    test_cases: list[str] = []
    if args.cases_json is not None:
        test_cases = json.loads(args.cases_json.read_text())["settings"]["store"]["test_cases"]
    if students and not test_cases:
        raise SystemExit("--student needs --cases-json (the test cases to score)")
    nets, size, repeats = args.nets, args.size, args.repeats
    if args.quick:
        nets, size, repeats = ["tiny"], 16, 1
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        result = run(nets, size, repeats, args.routes, args.threads,
                     {k: Path(v) for k, v in students.items()}, args.store, test_cases,
                     Path(tmp), args.calib_patches, pt2e=not (args.quick or args.no_pt2e_probe))
    result["command"] = " ".join(sys.argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["timing"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
