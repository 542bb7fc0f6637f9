"""`mtcmkd predict`: segment BraTS cases from the student's modality, NIfTI out per case."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.markup import escape
from rich.table import Table

from mtcmkd.messages import first_line

from .console import CaseProgress, console, err_console, failer

fail = failer("predict")

if TYPE_CHECKING:
    from mtcmkd.evaluation import CaseFailure, CasePrediction, PredictionInput
    from mtcmkd.inference import InferenceSettings
    from mtcmkd.student_weights import StudentBundle


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device}: no CUDA device is visible")
    return device


def inference_settings(command_fail: Callable[[str], NoReturn], *, reference: bool,
                       precision: str | None, layout: str | None, overlap: float | None,
                       mirror: bool, threads: int | None,
                       defaults: InferenceSettings | None = None) -> InferenceSettings:
    """The command's inference options -> :class:`~mtcmkd.inference.InferenceSettings`, checked.

    Options left out take `defaults` (predict's: ``PREDICT_DEFAULTS``). ``--reference`` is the
    reference result whatever the defaults are, so it refuses options that would change it.
    """
    from mtcmkd.inference import LAYOUTS, PRECISIONS, PREDICT_DEFAULTS, InferenceSettings

    if threads is not None and threads < 1:
        command_fail(f"--threads must be >= 1 (got {threads})")
    if precision is not None and precision not in PRECISIONS:
        command_fail(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if layout is not None and layout not in LAYOUTS:
        command_fail(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if overlap is not None and not 0.0 <= overlap < 1.0:
        command_fail(f"--overlap must be in [0, 1) (got {overlap})")
    if reference:
        given = [name for name, value in (("--precision", precision), ("--layout", layout),
                                          ("--overlap", overlap)) if value is not None]
        given += ["--mirror"] if mirror else []
        if given:
            command_fail(f"--reference fixes the inference (fp32, the patch's windows, overlap "
                         f"0.5, Gaussian blending, no mirrors); drop {', '.join(given)}")
        return InferenceSettings.reference()
    base = defaults if defaults is not None else PREDICT_DEFAULTS
    return base.with_(precision=precision if precision is not None else base.precision,
                      layout=layout if layout is not None else base.layout,
                      overlap=overlap if overlap is not None else base.overlap,
                      mirror=mirror or base.mirror)


def describe_inference(settings: InferenceSettings, precision_used: str, threads: int) -> str:
    """One line for the summary: what the inference ran as."""
    if settings.is_reference:
        what = "reference (fp32, windows, overlap 0.5)"
    else:
        asked = "" if settings.precision == precision_used else f" ({settings.precision})"
        what = (f"{precision_used}{asked}, {settings.layout}"
                + (f", overlap {settings.overlap}" if settings.layout == "windows" else "")
                + (", mirror" if settings.mirror else ""))
    return f"{what}, {threads} thread(s)"


def predict(
    input_: Annotated[Path, typer.Option(
        "--input", "-i", help="A case folder of any release, a folder of cases, an MSD folder, "
                              "or one NIfTI of the student's modality.")],
    run: Annotated[list[Path] | None, typer.Option(
        "--run", help="Run folder (best_student.pt, else student.pt) or student file. Repeat "
                      "it for an ensemble (e.g. the folds of a cross-validation): the mean of "
                      "the models' probabilities gives the labels.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Folder for <case_id>.nii.gz (created).")] = None,
    model: Annotated[list[Path] | None, typer.Option(
        "--model", "-m", hidden=True, help="Old spelling of --run.")] = None,
    output_: Annotated[Path | None, typer.Option(
        "--output", hidden=True, help="Old spelling of --out.")] = None,
    png: Annotated[Path | None, typer.Option(
        help="Also write an overlay PNG per case here.")] = None,
    mirror: Annotated[bool, typer.Option(
        "--mirror", help="Test-time augmentation: average over the 8 axis flips (8x slower).")
    ] = False,
    overlap: Annotated[float | None, typer.Option(
        help="Overlap of neighbouring sliding windows, in [0, 1) (layout windows).",
        show_default="0.5")] = None,
    precision: Annotated[str | None, typer.Option(
        help="auto: bf16 (autocast, channels-last weights) on a CPU with native bf16 "
             "(AVX512-BF16 or AMX), fp32 on other CPUs and on GPUs; fp32; bf16. bf16 labels "
             "may differ from fp32 on a few voxels near class boundaries.", show_default="auto")] = None,
    layout: Annotated[str | None, typer.Option(
        help="windows: Gaussian-blended sliding windows of the training patch; box: one pass "
             "over the brain box padded to the network's stride (fewer voxels computed; "
             "normalisation statistics then span the box, not a patch).", show_default="windows")] = None,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads (torch.set_num_threads).",
        show_default="OMP_NUM_THREADS, else the cores this process may use")] = None,
    reference: Annotated[bool, typer.Option(
        "--reference", help="The reference result, whatever the defaults: fp32, windows of "
                            "the training patch, overlap 0.5, Gaussian blending, no mirrors "
                            "(bit for bit at the same thread count). Use it to check the "
                            "fast path.")] = False,
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

    Every case runs through mtcmkd's one inference pipeline (brain box, z-score, sliding
    windows or one pass over the box, labels). By default a CPU with native bf16 runs it in
    bf16 (--precision auto); --reference reproduces the float32 reference result exactly.

    With --run given several times (the folds of a cross-validation), every model segments
    the case and the mean of their probabilities gives the labels, as nnU-Net ensembles its
    folds; the models must share input modalities, patch size, output kind and release.

    A bad case (unreadable, wrong dimensionality, missing the student's modality, a file named
    as another modality) does not stop the others: each failure is one line naming the file,
    and the command ends with exit code 1 after segmenting every good case. Every entry of the
    input tree that is not taken is named with the reason. OUTPUT/predict_report.json lists
    every case, failure and entry not taken. Bad options, model or output folder stop the
    command at once with one line (exit 2); no file is ever left half written.
    """
    runs = [*(run or []), *(model or [])]
    if not runs:
        fail("pass --run RUN (a run folder or student file; repeat it for an ensemble)")
    if out is not None and output_ is not None and out != output_:
        fail(f"--out {out} and --output {output_} (its old spelling) name different folders")
    output = out if out is not None else output_
    if output is None:
        fail("pass --out FOLDER for the segmentations")
    settings = inference_settings(fail, reference=reference, precision=precision, layout=layout,
                                  overlap=overlap, mirror=mirror, threads=threads)
    if postprocess_et is not None and postprocess_et < 1:
        fail(f"--postprocess-et must be >= 1 voxel (got {postprocess_et})")
    from mtcmkd.evaluation import (
        CaseFailure,
        EvaluationError,
        InputError,
        check_output_folder,
        check_prediction_input,
        discover_prediction_inputs,
        predict_case,
        student_pipeline,
        write_prediction,
    )
    from mtcmkd.inference import apply_threads, resolve_precision, window_progress
    from mtcmkd.inference.predict import PipelineEnsemble
    from mtcmkd.integrity import CheckpointError
    from mtcmkd.student_weights import load_student, resolve_student_path

    try:
        check_output_folder(output, [REPORT_NAME])
        if png is not None:
            check_output_folder(png)
    except (EvaluationError, InputError) as exc:
        fail(str(exc))
    student_paths, bundles = [], []
    for path in runs:
        try:
            student_paths.append(resolve_student_path(path))
            bundles.append(load_student(student_paths[-1]))
        except (FileNotFoundError, ValueError, CheckpointError) as exc:
            fail(str(exc))
    _check_ensemble(runs, student_paths, bundles)
    student_path, bundle = student_paths[0], bundles[0]
    dev = resolve_device(device)
    n_threads = apply_threads(threads)
    precision_used = resolve_precision(settings.precision, dev)
    pipelines = [student_pipeline(b, settings, device=dev) for b in bundles]
    pipeline = pipelines[0] if len(pipelines) == 1 else PipelineEnsemble(pipelines)
    try:
        found = discover_prediction_inputs(input_, bundle.channels, year)
    except (EvaluationError, InputError) as exc:
        fail(str(exc))
    for entry in found.not_taken[:MAX_NOT_TAKEN_LINES]:
        err_console.print(f"[yellow]not taken[/] {escape(str(entry.path))}: "
                          f"{escape(entry.reason)}", soft_wrap=True)
    if len(found.not_taken) > MAX_NOT_TAKEN_LINES:
        more = len(found.not_taken) - MAX_NOT_TAKEN_LINES
        err_console.print(f"[yellow]not taken[/] ... and {more} more (all in "
                          f"{escape(str(output / REPORT_NAME))})", soft_wrap=True)

    failures: list[CaseFailure] = list(found.failed)
    for failure in failures:
        _print_failure(failure)
    # Headers first (cheap): a broken case is reported before the long inference starts.
    inputs = []
    for item in found.cases:
        try:
            check_prediction_input(item)
            inputs.append(item)
        except InputError as exc:
            failures.append(CaseFailure(item.case_id, exc.path, exc.reason))
            _print_failure(failures[-1])

    rows, written = [], []
    with CaseProgress("predict", len(inputs)) as progress, window_progress(progress.windows):
        for item in inputs:
            try:
                result = predict_case(bundle, item, pipeline=pipeline,
                                      postprocess_et=postprocess_et)
                out = write_prediction(result.labels, item, output)
                if png is not None:
                    _overlay(item, result, png)
            except InputError as exc:
                failures.append(CaseFailure(item.case_id, exc.path, exc.reason))
            except (OSError, ValueError) as exc:  # e.g. OUTPUT/<case>.nii.gz is a folder
                failures.append(CaseFailure(item.case_id, output / f"{item.case_id}.nii.gz",
                                            first_line(exc)))
            else:
                counts = [int(((result.labels >= 1) & (result.labels <= 3)).sum()),
                          int(((result.labels == 1) | (result.labels == 3)).sum()),
                          int((result.labels == 3).sum())]
                rows.append((out.name, item.release, *map(str, counts),
                             "yes" if result.et_relabelled else "", f"{result.seconds:.1f}"))
                written.append({"case": item.case_id, "status": "written", "file": str(out),
                                "release": item.release, "seconds": round(result.seconds, 3)})
            failed = bool(failures) and failures[-1].case_id == item.case_id
            if failed:
                _print_failure(failures[-1])
            progress.case_done(item.case_id, "failed" if failed else "")

    if rows:
        models = (student_path.name if len(bundles) == 1
                  else f"ensemble of {len(bundles)} models")
        table = Table(title=f"mtcmkd predict -> {output} ({models}, "
                            f"{'+'.join(bundle.channels)}, {dev}; voxels per region)")
        table.add_column("file", no_wrap=True)
        for col in ("release", "WT", "TC", "ET", "ET->NCR", "s"):
            table.add_column(col, justify="right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    post = ("off" if postprocess_et is None
            else f"ET < {postprocess_et} voxels relabelled as NCR")
    report = {
        "model": str(student_path), "models": [str(p) for p in student_paths],
        "input": str(input_), "output": str(output),
        "channels": list(bundle.channels), "device": dev, "mirror": settings.mirror,
        "overlap": settings.overlap, "precision": settings.precision,
        "precision_used": precision_used, "layout": settings.layout, "threads": n_threads,
        "reference": settings.is_reference, "postprocess_et": postprocess_et,
        "n_cases": len(found.cases) + len(found.failed), "n_written": len(written),
        "n_failed": len(failures), "n_not_taken": len(found.not_taken),
        "cases": sorted(written + [{"case": f.case_id, "status": "failed", "file": str(f.path),
                                    "reason": f.reason} for f in failures],
                        key=lambda c: (c["case"], c["status"])),
        "not_taken": [{"path": str(e.path), "reason": e.reason} for e in found.not_taken],
    }
    report_path = _write_report(output, report)
    console.print(f"{len(rows)} case(s) written, {len(failures)} failed, "
                  f"{len(found.not_taken)} entries not taken; inference "
                  f"{describe_inference(settings, precision_used, n_threads)}, "
                  f"ET post-processing {post}; report: {report_path}", soft_wrap=True)
    old = [f"{a} (now {b})" for a, b, given in (("--model", "--run", model),
                                                ("--output", "--out", output_)) if given]
    if old:  # at the end, so that an error stays the one line it is
        err_console.print(f"note: {' and '.join(old)}: the old spelling works for a while",
                          markup=False, highlight=False, soft_wrap=True)
    if failures:
        err_console.print(f"[bold red]{len(failures)} case(s) failed[/]; report: "
                          f"{escape(str(report_path))}", soft_wrap=True)
        raise typer.Exit(1)


#: Name of the JSON report written to the output folder.
REPORT_NAME = "predict_report.json"

#: Entries not taken shown on the console; all of them are in the report.
MAX_NOT_TAKEN_LINES = 20


def _check_ensemble(runs: list[Path], paths: list[Path], bundles: list[StudentBundle]) -> None:
    """Refuse an ensemble whose models could not average: other input modalities, patch size,
    output kind or classes, or trained on another release (when the runs' stores tell)."""
    if len(bundles) < 2:
        return
    from mtcmkd.evaluation import trained_releases

    first = bundles[0]
    releases = trained_releases(runs[0])
    for path, given, bundle in zip(paths[1:], runs[1:], bundles[1:], strict=True):
        for what, mine, theirs in (
                ("input modalities", bundle.channels, first.channels),
                ("patch size", bundle.patch_size, first.patch_size),
                ("output", (bundle.output, bundle.n_classes), (first.output, first.n_classes))):
            if tuple(mine) != tuple(theirs):
                fail(f"{path}: its {what} {_shown(mine)} differ from {paths[0]}'s "
                     f"{_shown(theirs)}; an ensemble averages models of one kind")
        other = trained_releases(given)
        if releases is not None and other is not None and other != releases:
            fail(f"{path}: trained on BraTS {'+'.join(other)}, {paths[0]} on "
                 f"{'+'.join(releases)}; an ensemble averages models of one release")


def _shown(value: object) -> str:
    return "+".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _print_failure(failure: CaseFailure) -> None:
    err_console.print(f"[red]failed[/] {escape(failure.case_id)}: {escape(str(failure))}",
                      soft_wrap=True)


def _write_report(output: Path, report: dict) -> Path:
    """Write OUTPUT/predict_report.json atomically (the folder is created when absent)."""
    from mtcmkd.atomic import atomic_write_text

    path = output / REPORT_NAME
    try:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    except OSError as exc:
        fail(f"{path}: cannot write the report ({first_line(exc)})")
    return path


def _overlay(item: PredictionInput, result: CasePrediction, png: Path) -> None:
    """Overlay PNG of one prediction; the case's own segmentation is shown when present.

    The segmentation is not needed for prediction, so a bad one only costs the truth row
    (with a warning), not the case.
    """
    from mtcmkd.evaluation import InputError, load_truth
    from mtcmkd.plots import overlay_png

    truth = None
    if item.truth is not None:
        try:
            truth = load_truth(item.truth, item.release, item.case_id)
        except InputError as exc:
            err_console.print(f"[yellow]warning:[/] overlay without truth: {exc}",
                              soft_wrap=True)
        if truth is not None and truth.shape != result.labels.shape:
            err_console.print(f"[yellow]warning:[/] overlay without truth: {item.truth}: shape "
                              f"{truth.shape} differs from the image's", soft_wrap=True)
            truth = None
    overlay_png(png / f"{item.case_id}.png", result.loaded.image[0], truth=truth,
                prediction=result.labels, affine=result.loaded.affine,
                spacing=result.loaded.spacing, title=item.case_id)
