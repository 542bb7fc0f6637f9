"""`mtcmkd predict`: segment BraTS cases from the student's modality, NIfTI out per case."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .console import console, err_console, failer

fail = failer("predict")

if TYPE_CHECKING:
    from mtcmkd.evaluation import CasePrediction, PredictionInput


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device}: no CUDA device is visible")
    return device


def predict(
    model: Annotated[Path, typer.Option(
        "--model", "-m", help="Run folder (best_student.pt, else student.pt) or student file.")],
    input_: Annotated[Path, typer.Option(
        "--input", "-i", help="A case folder of any release, a folder of cases, an MSD folder, "
                              "or one NIfTI of the student's modality.")],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Folder for <case_id>.nii.gz (created).")],
    png: Annotated[Path | None, typer.Option(
        help="Also write an overlay PNG per case here.")] = None,
    mirror: Annotated[bool, typer.Option(
        "--mirror", help="Test-time augmentation: average over the 8 axis flips (8x slower).")
    ] = False,
    overlap: Annotated[float, typer.Option(
        help="Overlap of neighbouring sliding windows, in [0, 1).")] = 0.5,
    postprocess_et: Annotated[int | None, typer.Option(
        "--postprocess-et", help="Relabel a predicted ET of fewer voxels than this as NCR "
                                 "(off by default; 500 is common).")] = None,
    year: Annotated[str | None, typer.Option(
        help="Release of the input (file naming, output label values): 2018-2021 write ET as 4, "
             "2023+ as 3, msd its own. Default: from each case folder's (or file's) name; 2021 "
             "for a single file named otherwise.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Segment every case with the student (T1ce only): labels in the release's values, the
    input's affine and header, one file per case, written atomically.

    Bad input stops the command with one line naming the file and a non-zero exit; every
    case's headers are checked before the first output is written, and no file is ever left
    half written.
    """
    if not 0.0 <= overlap < 1.0:
        fail(f"--overlap must be in [0, 1) (got {overlap})")
    if postprocess_et is not None and postprocess_et < 1:
        fail(f"--postprocess-et must be >= 1 voxel (got {postprocess_et})")
    from mtcmkd.engine.checkpoint import CheckpointError
    from mtcmkd.evaluation import (
        EvaluationError,
        check_prediction_input,
        find_prediction_inputs,
        predict_case,
        write_prediction,
    )
    from mtcmkd.student_weights import load_student, resolve_student_path

    try:
        student_path = resolve_student_path(model)
        bundle = load_student(student_path)
    except (FileNotFoundError, ValueError, CheckpointError) as exc:
        fail(str(exc))
    dev = resolve_device(device)
    bundle.network.to(dev)
    try:
        inputs = find_prediction_inputs(input_, bundle.channels, year)
        for item in inputs:
            check_prediction_input(item)
    except EvaluationError as exc:
        fail(str(exc))

    rows = []
    progress = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.description}"), console=console,
                        transient=True)
    with progress:
        task = progress.add_task("", total=len(inputs))
        for item in inputs:
            progress.update(task, description=item.case_id)
            try:
                result = predict_case(bundle, item, overlap=overlap, mirror=mirror,
                                      postprocess_et=postprocess_et, device=dev)
                out = write_prediction(result.labels, item, output)
                if png is not None:
                    _overlay(item, result, png)
            except EvaluationError as exc:
                fail(str(exc))
            counts = [int(((result.labels >= 1) & (result.labels <= 3)).sum()),
                      int(((result.labels == 1) | (result.labels == 3)).sum()),
                      int((result.labels == 3).sum())]
            rows.append((out.name, item.release, *map(str, counts),
                         "yes" if result.et_relabelled else "", f"{result.seconds:.1f}"))
            progress.advance(task)

    table = Table(title=f"mtcmkd predict -> {output} ({student_path.name}, "
                        f"{'+'.join(bundle.channels)}, {dev}; voxels per region)")
    table.add_column("file", no_wrap=True)
    for col in ("release", "WT", "TC", "ET", "ET->NCR", "s"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    post = ("off" if postprocess_et is None
            else f"ET < {postprocess_et} voxels relabelled as NCR")
    console.print(f"{len(rows)} case(s); mirror {'on' if mirror else 'off'}, overlap {overlap}, "
                  f"ET post-processing {post}", soft_wrap=True)


def _overlay(item: PredictionInput, result: CasePrediction, png: Path) -> None:
    """Overlay PNG of one prediction; the case's own segmentation is shown when present.

    The segmentation is not needed for prediction, so a bad one only costs the truth row
    (with a warning), not the case.
    """
    from mtcmkd.evaluation import EvaluationError, load_truth
    from mtcmkd.figures import overlay_png

    truth = None
    if item.truth is not None:
        try:
            truth = load_truth(item.truth, item.release, item.case_id)
        except EvaluationError as exc:
            err_console.print(f"[yellow]warning:[/] overlay without truth: {exc}",
                              soft_wrap=True)
        if truth is not None and truth.shape != result.labels.shape:
            err_console.print(f"[yellow]warning:[/] overlay without truth: {item.truth}: shape "
                              f"{truth.shape} differs from the image's", soft_wrap=True)
            truth = None
    overlay_png(png / f"{item.case_id}.png", result.loaded.image[0], truth=truth,
                prediction=result.labels, affine=result.loaded.affine,
                spacing=result.loaded.spacing, title=item.case_id)
