"""Exports never overwrite a run's files, and an exported file handed to a command that takes
student weights gets one line saying what it is (issue 20, item 3)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mtcmkd.cli.main import app
from mtcmkd.config import config_from_dict, config_hash, dump_config, to_dict
from mtcmkd.export.source import ExportError, check_export_target, load_export_source
from mtcmkd.models import build_network
from mtcmkd.student_weights import exported_kind, load_student, save_student

WIDTHS = (4, 8, 12, 16)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run folder as training leaves it (config.yaml, student.pt, checkpoints/)."""
    cfg = config_from_dict({"data": {"patch_size": [16] * 3},
                            "model": {"widths": list(WIDTHS)}, "method": {"name": "baseline"}})
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    dump_config(cfg, folder / "config.yaml")
    save_student(folder / "student.pt", build_network("resunet", 1, 4, WIDTHS),
                 config=to_dict(cfg), config_hash=config_hash(cfg), channels=("t1ce",),
                 output="softmax", n_classes=4, patch_size=(16, 16, 16))
    return folder


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["torchscript", "onnx", "pt2"])
@pytest.mark.parametrize("target", ["student.pt", "best_student.pt", "config.yaml",
                                    "checkpoints/model.pt"])
def test_an_export_onto_a_run_file_is_refused_and_changes_nothing(run, kind, target) -> None:
    before = digest(run / "student.pt")
    result = CliRunner().invoke(app, ["export", kind, str(run), "--out", str(run / target)])
    assert result.exit_code == 2, result.output
    assert "an export never overwrites it" in result.output
    assert "export/" in result.output  # the suggestion
    assert digest(run / "student.pt") == before
    assert not (run / "checkpoints" / "model.pt").exists()


def test_the_source_file_itself_is_refused_even_outside_a_run(tmp_path, run) -> None:
    lone = tmp_path / "lone.pt"
    lone.write_bytes((run / "student.pt").read_bytes())
    with pytest.raises(ExportError, match="never overwrites"):
        check_export_target(lone, lone)
    check_export_target(run, run / "export" / "student_ts.pt")  # beside the run: fine
    check_export_target(run, tmp_path / "student.pt")  # a folder that is not a run: fine


class Tiny(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


@pytest.mark.parametrize("fmt", ["torchscript", "pt2", "onnx"])
def test_an_exported_file_given_as_weights_is_named_for_what_it_is(tmp_path, fmt) -> None:
    path = tmp_path / {"torchscript": "s.pt", "pt2": "s.pt2", "onnx": "s.onnx"}[fmt]
    if fmt == "torchscript":
        torch.jit.script(Tiny()).save(str(path))
    elif fmt == "pt2":
        torch.export.save(torch.export.export(Tiny(), (torch.ones(2),)), str(path))
    else:
        path.write_bytes(b"\x08\x07")  # any bytes: ONNX is told by its suffix
    words = {"torchscript": "TorchScript export", "pt2": ".pt2 export", "onnx": "ONNX export"}
    assert words[fmt] in exported_kind(path)
    with pytest.raises(ValueError, match=rf"{path.name}: an? .*{words[fmt]}.*not student "
                                         "weights; .* take a run folder or its student.pt"):
        load_student(path)
    with pytest.raises(ExportError, match=words[fmt]):
        load_export_source(path)


def test_a_student_file_is_not_mistaken_for_an_export(run) -> None:
    assert exported_kind(run / "student.pt") is None
    assert load_student(run / "student.pt").channels == ("t1ce",)
