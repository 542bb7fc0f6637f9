"""`mtcmkd evaluate`: BraTS scores of a run's test cases, or of any tool's predictions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from mtcmkd.messages import first_line

from .console import CaseProgress, console, err_console, failer
from .predict import describe_inference, inference_settings, resolve_device

fail = failer("evaluate")

if TYPE_CHECKING:
    from mtcmkd.evaluation import Evaluation, ScoringCase, SegmentationWriter

#: Per-case rows shown on the console; more cases show only the mean (all are in the files).
MAX_CASE_ROWS = 25


def evaluate(
    year: Annotated[str | None, typer.Option(
        help="Release whose rules (2023+: also lesion-wise) and label values apply: 2018, 2019, "
             "2020, 2021, 2023 (and later), msd. Default: detected from the store's cases "
             "(--run) or the ground truth's case names (--pred).")] = None,
    run: Annotated[Path | None, typer.Option(
        help="Run folder: predict and score its held-out cases (--split: the test set by "
             "default).")] = None,
    store: Annotated[Path | None, typer.Option(
        help="With --run: the Zarr store (default: the run config's data.store).")] = None,
    split: Annotated[str, typer.Option(
        help="With --run: test (the store's test set, which the run never saw), validation "
             "(its validation fold, which selected the model: optimistic, and labelled so; "
             "'val' also accepted) or all (every labelled case, training cases included).")
    ] = "test",
    pred: Annotated[Path | None, typer.Option(
        help="Folder of <case_id>.nii.gz predictions (any tool, the release's label values).")
    ] = None,
    gt: Annotated[Path | None, typer.Option(
        help="With --pred: raw data in the release's layout holding the *_seg files.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o",
        help="Output folder for metrics.json / metrics.csv (default RUN/eval or ./eval).")
    ] = None,
    save_segmentations: Annotated[Path | None, typer.Option(
        "--save-segmentations",
        help="With --run: also write each scored case's labels here as <case_id>.nii.gz (the "
             "release's label values, the source image's grid and header, as predict writes).")
    ] = None,
    png: Annotated[Path | None, typer.Option(help="Also write an overlay PNG per case here.")
                   ] = None,
    legacy_slice_dice: Annotated[bool, typer.Option(
        "--legacy-slice-dice", help="Also report the MTCM-KD authors' slice-averaged Dice "
                                    "(NOT the BraTS Dice; labelled as such).")] = False,
    postprocess_et: Annotated[int | None, typer.Option(
        "--postprocess-et", help="Relabel a predicted ET of fewer voxels than this as NCR before "
                                 "scoring (off by default; reported in the outputs).")] = None,
    mirror: Annotated[bool, typer.Option(
        "--mirror", help="With --run: test-time flips (8x slower).")] = False,
    overlap: Annotated[float | None, typer.Option(
        help="With --run: sliding-window overlap in [0, 1).", show_default="0.5")] = None,
    precision: Annotated[str | None, typer.Option(
        help="With --run: auto (bf16 on a CPU with native bf16, else fp32), fp32 or bf16. "
             "The default is the reference, so scores stay comparable across runs.",
        show_default="fp32")] = None,
    layout: Annotated[str | None, typer.Option(
        help="With --run: windows (sliding windows of the training patch) or box (one pass "
             "over the brain box).", show_default="windows")] = None,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads (torch.set_num_threads).",
        show_default="OMP_NUM_THREADS, else the cores this process may use")] = None,
    reference: Annotated[bool, typer.Option(
        "--reference", help="With --run: the reference inference (fp32, windows, overlap 0.5, "
                            "no mirrors; the default today), whatever the defaults become.")
    ] = False,
    device: Annotated[str, typer.Option(help="With --run: auto, cpu, cuda or cuda:N.")] = "auto",
    missing: Annotated[str, typer.Option(
        help="With --pred: a ground-truth case without a prediction file is an error (error), "
             "scored as an empty prediction as the challenge does (empty), or left out (skip)."
    )] = "error",
    allow_changed_store: Annotated[bool, typer.Option(
        "--allow-changed-store", help="With --run: score even when the store changed since "
                                      "training (said in the output and metrics.json).")
    ] = False,
    subchallenge: Annotated[str | None, typer.Option(
        help="With --year 2023: the sub-challenge whose lesion-wise parameters apply: GLI "
             "(default), SSA, PED (3 dilations, lesions <= 50 mm^3 dropped), MEN (1, 50 mm^3), "
             "MET (1, 2 mm^3).")] = None,
) -> None:
    """Score segmentations by the BraTS rules in native space: per case and region (WT, TC,
    ET) Dice, HD95 (mm), sensitivity, specificity; lesion-wise Dice/HD95 for 2023+.

    Either --run RUN_DIR (predict its test cases, uncropped to the original grid) or
    --pred PRED_DIR --gt RAW_DIR (score existing files). Writes metrics.json and metrics.csv
    and prints the means next to published reference numbers.
    """
    from mtcmkd.evaluation import (
        MISSING_POLICIES,
        EvaluationError,
        EvaluationSettings,
        InputError,
        SegmentationWriter,
        check_output_folder,
        match_prediction_files,
        prediction_file_cases,
        run_evaluation_inputs,
        score_predictions,
        store_scoring_cases,
        write_metrics,
    )

    if (run is None) == (pred is None):
        fail("pass either --run RUN_DIR or --pred PRED_DIR --gt RAW_DIR")
    if pred is not None and gt is None:
        fail("--pred needs --gt RAW_DIR (the ground truth in the release's layout)")
    unpredicted: list[str] = []
    writer: SegmentationWriter | None = None  # --save-segmentations
    how: str | None = None  # the inference, as run (--run)
    if run is None and (store is not None or split != "test" or allow_changed_store):
        fail("--store, --split and --allow-changed-store go with --run")
    if missing not in MISSING_POLICIES:
        fail(f"--missing {missing!r}: expected one of {', '.join(MISSING_POLICIES)}")
    if run is not None and missing != "error":
        fail("--missing goes with --pred (--run scores every held-out case of the store)")
    if run is None and (precision is not None or layout is not None or reference):
        fail("--precision, --layout and --reference go with --run")
    if run is None and save_segmentations is not None:
        fail("--save-segmentations goes with --run (with --pred the segmentations are the "
             "files already)")
    from mtcmkd.inference import (
        InferenceSettings,
        apply_threads,
        resolve_precision,
        window_progress,
    )

    inference = inference_settings(fail, reference=reference, precision=precision,
                                   layout=layout, overlap=overlap, mirror=mirror,
                                   threads=threads, defaults=InferenceSettings.reference())

    def scoring_settings(year: str) -> EvaluationSettings:
        try:
            settings = EvaluationSettings(year, postprocess_et, legacy_slice_dice,
                                          subchallenge=subchallenge or "GLI")
        except ValueError as exc:
            fail(f"--year/--postprocess-et/--subchallenge: {exc}")
        if subchallenge is not None and not settings.lesion_wise:
            fail(f"--subchallenge goes with --year 2023 (lesion-wise rules); BraTS {year} has "
                 "none")
        return settings

    if year is not None:  # a bad --year is refused before any work
        scoring_settings(year)

    out_dir = out if out is not None else (run / "eval" if run is not None else Path("eval"))
    try:
        # A bad output folder is found now, not after every case has been scored.
        check_output_folder(out_dir, ["metrics.json", "metrics.csv"])
        if png is not None:
            check_output_folder(png)
        if save_segmentations is not None:
            check_output_folder(save_segmentations)
    except (EvaluationError, InputError) as exc:
        fail(str(exc))

    try:
        if run is not None:
            inputs = run_evaluation_inputs(run, store, split,
                                           allow_changed_store=allow_changed_store)
            for note in inputs.notes:
                err_console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
            year = year if year is not None else _store_year(inputs.store, inputs.case_ids)
            if save_segmentations is not None:
                writer = SegmentationWriter(inputs.store, save_segmentations, postprocess_et)
            dev = resolve_device(device)
            n_threads = apply_threads(threads)
            precision_used = resolve_precision(inference.precision, dev)
            n_cases = len(inputs.case_ids)
            cases = store_scoring_cases(inputs.bundle, inputs.store, inputs.case_ids,
                                        settings=inference, device=dev,
                                        with_image=png is not None)
            how = describe_inference(inference, precision_used, n_threads)
            source: dict[str, Any] = {
                "mode": "run", "run": str(run), "model": str(inputs.student_path),
                "config_hash": inputs.bundle.meta.get("config_hash"),
                "channels": list(inputs.bundle.channels), "store": str(inputs.store),
                "fold": inputs.fold, "split": inputs.split, "split_note": inputs.split_note,
                "mirror": inference.mirror, "overlap": inference.overlap,
                "precision": inference.precision, "precision_used": precision_used,
                "layout": inference.layout, "threads": n_threads,
                "reference": inference.is_reference,
                "space": "native (store crops put back on the original grid)",
                "split_recorded": inputs.split_recorded, "store_check": inputs.store_check,
                "notes": inputs.notes,
            }
        else:
            assert pred is not None and gt is not None
            year = year if year is not None else _truth_year(gt)
            pairs, unpredicted = match_prediction_files(pred, gt, year, missing)
            n_cases = len(pairs)
            cases = prediction_file_cases(pairs, year, with_image=png is not None)
            source = {"mode": "predictions", "pred": str(pred), "gt": str(gt),
                      "missing": missing,
                      "scored_as_empty": unpredicted if missing == "empty" else [],
                      "unscored_truth_cases": len(unpredicted) if missing == "skip" else 0}

        settings = scoring_settings(year)

        def on_case(case: ScoringCase, record: dict[str, Any]) -> None:
            if writer is not None:
                try:
                    writer.write(case)
                except (OSError, ValueError) as exc:
                    fail(f"{save_segmentations / (case.case_id + '.nii.gz')}: cannot write the "
                         f"segmentation ({first_line(exc)})")
            if png is not None:
                from mtcmkd.plots import overlay_png

                overlay_png(png / f"{case.case_id}.png", case.image, truth=case.truth,
                            prediction=case.prediction, affine=case.affine,
                            spacing=case.spacing, title=f"{case.case_id}  Dice " + ", ".join(
                                f"{r} {record['dice'][r]:.3f}" for r in ("WT", "TC", "ET")))
            progress.case_done(case.case_id)

        with CaseProgress("evaluate", n_cases) as progress, window_progress(progress.windows):
            evaluation = score_predictions(cases, settings, source=source, on_case=on_case)
        if writer is not None:
            evaluation.source["segmentations"] = {"folder": str(save_segmentations),
                                                  "headers": writer.headers}
    except (EvaluationError, InputError) as exc:
        fail(str(exc))
    except ValueError as exc:  # e.g. prediction/truth shapes differ
        fail(str(exc))

    json_path, csv_path = write_metrics(evaluation, out_dir)
    if writer is not None:
        _print_segmentations(writer, save_segmentations)
    _print_split(evaluation)
    if how is not None:
        console.print(f"inference: {escape(how)}", soft_wrap=True)
    _print_tables(evaluation)
    console.print(f"wrote {json_path} and {csv_path}", soft_wrap=True)
    if unpredicted:
        shown = ", ".join(unpredicted[:5]) + (" ..." if len(unpredicted) > 5 else "")
        what = ("were scored as empty predictions (--missing empty)" if missing == "empty"
                else "were not scored (--missing skip)")
        err_console.print(f"[yellow]warning:[/] {len(unpredicted)} ground-truth case(s) have no "
                          f"prediction and {what}: {escape(shown)}", soft_wrap=True)
    if run is not None and inputs.store_check.get("allowed"):
        err_console.print("[yellow]warning:[/] the store changed since training "
                          "(--allow-changed-store); see source.store_check in metrics.json",
                          soft_wrap=True)


def _store_year(store: Path, case_ids: list[str]) -> str:
    """--year from the release the store's cases to score were converted from."""
    from mtcmkd.evaluation import store_case_releases

    try:
        releases = store_case_releases(store, case_ids)
    except (KeyError, OSError, ValueError) as exc:
        fail(f"{store}: cannot read the cases' release ({first_line(exc)}); pass --year")
    if len(releases) != 1:
        fail(f"{store}: the cases to score come from several releases ({', '.join(releases)}); "
             "pass --year for the rules to score them by")
    return releases[0]


def _truth_year(gt: Path) -> str:
    """--year from the case names of the ground-truth folder."""
    from mtcmkd.preprocessing import DatasetError
    from mtcmkd.preprocessing.discover import scan_raw

    try:
        releases = sorted({case.release for case in scan_raw(gt).cases})
    except DatasetError as exc:
        fail(str(exc))
    if len(releases) != 1:
        fail(f"{gt}: {'no case' if not releases else 'cases of several releases'} "
             f"({', '.join(releases) or 'none'}) to tell the release from; pass --year")
    return releases[0]


def _print_segmentations(writer: SegmentationWriter, folder: Path) -> None:
    """Where the segmentations went, and which carry the store's affine only."""
    from_affine = sorted(c for c, how in writer.headers.items() if how == "affine")
    console.print(f"wrote {len(writer.headers)} segmentation(s) to {escape(str(folder))}",
                  soft_wrap=True)
    if from_affine:
        err_console.print(f"[yellow]note:[/] {len(from_affine)} segmentation(s) carry the "
                          "store's recorded affine, not the source header (the raw files "
                          "preprocessing read are not where they were)", soft_wrap=True)


def _print_split(evaluation: Evaluation) -> None:
    """Which of the run's splits the scores are of; a warning when it is not the test set."""
    split, note = evaluation.source.get("split"), evaluation.source.get("split_note")
    if split is None:
        return  # prediction files: no run, no split
    n = len(evaluation.cases)
    if note:
        console.print(f"[bold yellow]split: {split}[/] ({n} cases): {escape(note)}",
                      soft_wrap=True)
    else:
        console.print(f"split: {split} ({n} cases the run never trained or validated on)",
                      soft_wrap=True)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _score_table(title: str, evaluation: Evaluation,
                 columns: list[tuple[str, str, str]]) -> Table:
    """Rows per case (up to MAX_CASE_ROWS) and the mean; columns: (header, metric, region)."""
    table = Table(title=title)
    table.add_column("case", no_wrap=True)
    for header, _, _ in columns:
        table.add_column(header, justify="right")

    def cells(scores: dict[str, Any]) -> list[str]:  # the units of metrics.json and .csv
        return [f"{scores[m][r]:.2f}" if "hd95" in m else f"{scores[m][r]:.3f}"
                for _, m, r in columns]

    if len(evaluation.cases) <= MAX_CASE_ROWS:
        for case in evaluation.cases:
            table.add_row(case["case"], *cells(case))
    table.add_row("mean", *cells(evaluation.mean()), style="bold")
    return table


def _print_tables(evaluation: Evaluation) -> None:
    """Per-case scores (up to MAX_CASE_ROWS), the mean, references, and the fine print."""
    from mtcmkd.evaluation import REFERENCE_NUMBERS

    settings = evaluation.settings
    regions = ("WT", "TC", "ET")
    n = len(evaluation.cases)
    console.print(_score_table(
        f"BraTS {settings.year}, legacy per-case rules ({n} cases; Dice, HD95 mm)", evaluation,
        [(f"Dice {r}", "dice", r) for r in regions] + [(f"HD95 {r}", "hd95", r) for r in regions]))
    if settings.lesion_wise:
        console.print(_score_table(
            f"BraTS {settings.year} lesion-wise ({n} cases; Dice, HD95 mm)", evaluation,
            [(f"Dice {r}", "lesion_wise_dice", r) for r in regions]
            + [(f"HD95 {r}", "lesion_wise_hd95", r) for r in regions]))
    if settings.legacy_slice_dice:
        console.print(_score_table(
            "LEGACY slice-averaged Dice (MTCM-KD authors' metric, NOT the BraTS Dice)",
            evaluation, [(f"slice Dice {r}", "legacy_slice_dice", r) for r in regions]))

    mean = evaluation.mean()
    ref = Table(title="published reference numbers (Dice in %, as published)")
    for col in ("", "source", "data", "WT", "TC", "ET", "mean", "comparable"):
        ref.add_column(col, justify="right" if col in ("WT", "TC", "ET", "mean") else "left")
    mean_dice = [mean["dice"][r] for r in regions]
    ref.add_row("", "this evaluation", f"BraTS {settings.year}, {n} cases",
                *map(_pct, mean_dice), _pct(sum(mean_dice) / 3), "-", style="bold")
    for i, item in enumerate(REFERENCE_NUMBERS, start=1):
        dice = [item.dice.get(r) for r in regions]
        known = [d for d in dice if d is not None]
        mean_ref = item.mean_dice if item.mean_dice is not None else (
            sum(known) / 3 if len(known) == 3 else None)
        ref.add_row(f"[{i}]", item.source, item.data,
                    *("-" if d is None else f"{d:.1f}" for d in dice),
                    "-" if mean_ref is None else f"{mean_ref:.1f}", item.comparable)
    console.print(ref)
    for i, item in enumerate(REFERENCE_NUMBERS, start=1):
        console.print(f"  [{i}] {item.note}", soft_wrap=True, markup=False)
    post = ("off" if settings.postprocess_et is None
            else f"a predicted ET < {settings.postprocess_et} voxels relabelled as NCR")
    console.print(f"ET post-processing: {post}", soft_wrap=True)
    console.print(f"rules: {settings.rules}", soft_wrap=True)
    if settings.lesion_wise:
        console.print("HD95: the official BraTS 2023 definition (area-weighted surface elements, "
                      "per-direction 95th percentile, then the max), mm from the voxel spacing",
                      soft_wrap=True)
    else:
        console.print("HD95: MONAI definition (per-direction 95th percentile, then the max), mm "
                      "from the voxel spacing", soft_wrap=True)
    if settings.legacy_slice_dice:
        console.print("LEGACY slice Dice is NOT the BraTS Dice (MTCM-KD authors' slice-averaged "
                      "2D Dice, slices empty in both score 1); shown only to explain the "
                      "published numbers", soft_wrap=True)
