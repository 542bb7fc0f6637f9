"""`mtcmkd preprocess`: raw BraTS (any release) -> one chunked Zarr v3 store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .console import CaseProgress, console, err_console, failer

if TYPE_CHECKING:
    from mtcmkd.preprocessing.discover import NotTaken

fail = failer("preprocess")


def preprocess(
    raw: Annotated[Path, typer.Argument(help="Raw BraTS folder as distributed.")],
    store: Annotated[Path, typer.Argument(help="Zarr store to create or complete.")],
    year: Annotated[str | None, typer.Option(
        help="Force the release (2018, 2019, 2020, 2021, 2023, msd); default: detect.")] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Parallel processes.")] = 1,
    folds: Annotated[int | None, typer.Option(
        help="Number of cross-validation folds; default: the store's, else 5 (fewer for fewer "
             "labelled cases). A value other than the store's re-deals every case.")] = None,
    seed: Annotated[int | None, typer.Option(
        help="Seed of the test set and fold split; default: the store's, else 0.")] = None,
    test_fraction: Annotated[float | None, typer.Option(
        "--test-fraction",
        help="Share of the labelled cases held out as the test set (never trained or validated "
             "on; what `evaluate --run` scores), in [0, 1); 0 holds out none. Default: the "
             "store's, else 0.2 (at least 1 case from 5 labelled cases on, none below). A value "
             "other than the store's re-deals the test set.")] = None,
    dtype: Annotated[str, typer.Option(help="Image dtype in the store: float16 or float32.")] = (
        "float16"),
    chunk: Annotated[int, typer.Option(help="Edge of the cubic inner chunks (voxels).")] = 64,
    codec: Annotated[str, typer.Option(
        help="Blosc codec: lz4 (fastest patch reads) or zstd (about 20% smaller).")] = "lz4",
    labels: Annotated[str, typer.Option(
        help="auto (a seg is required when any case has one), required, or optional.")] = "auto",
    report: Annotated[Path | None, typer.Option(
        help="Also write the JSON report here (always written to STORE/preprocess_report.json).")
    ] = None,
    wait: Annotated[bool, typer.Option(
        "--wait", help="If another preprocess is writing STORE, wait for it instead of "
                       "stopping.")] = False,
) -> None:
    """Convert every case: check, crop to the brain, z-score, store float16 + uint8 labels.

    Resumable: finished cases are kept, a killed run's leftovers are discarded and incomplete
    cases re-converted. One run writes a store at a time. Every entry of RAW that is not read
    is listed with the reason. Exit code 1 when any case failed (each failure is one line;
    details in the JSON report).
    """
    if labels not in ("auto", "required", "optional"):
        fail(f"--labels {labels!r}: expected auto, required or optional")
    if workers < 1:
        fail(f"--workers must be >= 1 (got {workers})")
    if chunk < 8:
        fail(f"--chunk must be >= 8 (got {chunk})")
    if test_fraction is not None and not 0.0 <= test_fraction < 1.0:
        fail(f"--test-fraction must be in [0, 1) (got {test_fraction}); 0 holds out no test set")
    if report is not None and report.is_dir():
        fail(f"{report}: --report is a folder; give a file path")
    from mtcmkd.preprocessing import DatasetError
    from mtcmkd.preprocessing import preprocess as run_preprocess

    # auto_refresh=False: no refresh thread exists when the worker processes are forked.
    progress = Progress(TextColumn("preprocess"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.description}"), console=console,
                        auto_refresh=False, transient=True)
    state: dict = {}

    def on_wait(pid: int | None) -> None:
        who = f"pid {pid}" if pid is not None else "another process"
        err_console.print(f"waiting for {who} to finish writing {store}", soft_wrap=True,
                          markup=False)

    def on_start(n: int) -> None:
        state["task"] = progress.add_task("", total=n)
        progress.refresh()
        if not console.is_terminal:  # a log: one line per case (the bar shows nothing there)
            state["lines"] = CaseProgress("preprocess", n).__enter__()

    def on_result(result) -> None:
        if result.status == "failed":
            progress.console.print(f"[red]failed[/] {result.error}", soft_wrap=True)
        progress.update(state["task"], advance=1, description=result.case_id, refresh=True)
        if "lines" in state:
            state["lines"].case_done(result.case_id,
                                     "" if result.status == "converted" else result.status)

    try:
        with progress:
            rep = run_preprocess(raw, store, year=year, workers=workers, n_folds=folds, seed=seed,
                                 test_fraction=test_fraction, image_dtype=dtype, chunk=chunk, codec=codec, labels=labels,
                                 wait=wait, on_wait=on_wait, on_start=on_start,
                                 on_result=on_result)
    except (DatasetError, ValueError) as exc:
        fail(str(exc))
    if report is not None:
        try:
            report.write_text(json.dumps(rep.to_json(), indent=2) + "\n")
        except OSError as exc:
            fail(f"{report}: cannot write the report ({exc.strerror})")

    print_not_taken(rep.not_taken, store)
    for cid, why in rep.incomplete.items():
        done = "removed (not in RAW)" if cid in rep.removed else "re-converted"
        console.print(f"[yellow]incomplete[/] {cid}: {why}; {done}", soft_wrap=True)
    print_test(rep.test)
    print_folds(rep.folds)
    table = Table(title=f"mtcmkd preprocess -> {store}")
    for col in ("converted", "repaired", "skipped", "failed", "releases", "seconds", "s/case"):
        table.add_column(col, justify="right")
    done = [r for r in rep.results if r.status in ("converted", "repaired")]
    per_case = sum(r.seconds for r in done) / max(len(done), 1)
    table.add_row(str(rep.count("converted")), str(rep.count("repaired")),
                  str(rep.count("skipped")), str(len(rep.failed)), ",".join(rep.releases), f"{rep.seconds:.1f}", f"{per_case:.2f}")
    console.print(table)
    if rep.failed:
        err_console.print(f"[bold red]{len(rep.failed)} case(s) failed[/]; report: "
                          f"{store / 'preprocess_report.json'}", soft_wrap=True)
        raise typer.Exit(1)


#: Not-taken entries printed before "... and N more (see the report)".
MAX_NOT_TAKEN_SHOWN = 20


def print_not_taken(entries: list[NotTaken], store: Path) -> None:
    """One line per raw entry that is not read, with its reason (hidden files counted)."""
    hidden = [e for e in entries if e.reason.startswith("hidden entry")]
    shown = [e for e in entries if e not in hidden]
    for entry in shown[:MAX_NOT_TAKEN_SHOWN]:
        console.print(f"[yellow]not taken[/] {escape(str(entry.path))}: {escape(entry.reason)}",
                      soft_wrap=True)
    more = len(shown) - MAX_NOT_TAKEN_SHOWN
    if more > 0:
        console.print(f"[yellow]not taken[/] ... and {more} more (see "
                      f"{escape(str(store / 'preprocess_report.json'))})", soft_wrap=True)
    if hidden:
        console.print(f"[dim]{len(hidden)} hidden entr{'y' if len(hidden) == 1 else 'ies'} "
                      "(names starting with '.') ignored; listed in the report[/]",
                      soft_wrap=True)


def print_folds(folds: dict) -> None:
    """Say when the folds changed for cases that had one (runs trained on them differ)."""
    if not folds:
        return
    if folds.get("redealt_from"):
        old = folds["redealt_from"]
        console.print(f"[yellow]folds re-dealt[/]: the store had {old['n_folds']} folds (seed "
                      f"{old['seed']}), this run asked for {folds['n_folds']} (seed "
                      f"{folds['seed']}); every case's fold may have changed, so runs trained "
                      "on the old folds no longer match this store", soft_wrap=True)
    elif folds.get("kept") and folds.get("dealt"):
        console.print(f"folds: {folds['kept']} case(s) kept their fold, "
                      f"{len(folds['dealt'])} new case(s) dealt to the smallest folds",
                      soft_wrap=True)
    if folds.get("note"):
        console.print(f"[yellow]note[/]: {escape(folds['note'])}", soft_wrap=True)


def print_test(test: dict) -> None:
    """Say how big the test set is, and when cases changed role (runs trained before differ)."""
    if not test:
        return
    moved = test.get("from_folds") or []
    trained = (f"; {len(moved)} of them had a fold, so runs trained on this store before may "
               "have trained on them" if moved else "")
    if test.get("folds_redealt"):
        trained += "; the folds are dealt anew over the other cases"
    if test.get("redealt_from"):
        old = test["redealt_from"]
        console.print(f"[yellow]test set re-dealt[/]: the store held out {old['fraction']:g} "
                      f"(seed {old['seed']}), this run asked for {test['fraction']:g} (seed "
                      f"{test['seed']}): {test['n_test']} test case(s){trained}", soft_wrap=True)
    elif test.get("created"):
        console.print(f"[yellow]test set created[/]: the store had none; {test['n_test']} "
                      f"labelled case(s) ({test['fraction']:g}) held out as the test set"
                      f"{trained}", soft_wrap=True)
    elif test["n_test"]:
        added = (f", {len(test['dealt'])} new" if test.get("kept") and test.get("dealt") else "")
        console.print(f"test set: {test['n_test']} labelled case(s) held out "
                      f"({test['fraction']:g}{added}); no run trains or validates on them",
                      soft_wrap=True)
    if test.get("note"):
        console.print(f"[yellow]note[/]: {escape(test['note'])}", soft_wrap=True)
