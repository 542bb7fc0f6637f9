"""`mtcmkd export`: a trained student as TorchScript or an AOTI package (whole inference, Python
and C++), ONNX or .pt2 (network at patch level).

Thin layer over :mod:`mtcmkd.export`: parse, one library call, a summary table. One vocabulary
in every export: the release of the label values is ``--year``, the self-check after writing is
``--check/--no-check`` (on by default); the older spellings of ``export torchscript``
(``--labels``, ``--verify``) still work, hidden from the help. Refusals (missing file, run
folder without student, not a student file, weights that do not fit, bad options) are one
``error:`` line and exit code 2; a failed check is exit code 1 and removes the file it checked,
so a mismatching artefact is never left behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .console import console, err_console, failer

fail = failer("export")

export_app = typer.Typer(
    name="export",
    help="Export a trained student: an AOTInductor package or TorchScript (whole inference, "
         "Python and C++), ONNX or .pt2 (network at patch level).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_SOURCE_HELP = "Run folder (best_student.pt, else student.pt) or a student weights file."
_YEAR_HELP = "Release whose label values the output uses: 2021 (ET=4, also 2018-2020), 2023 " \
             "(ET=3) or msd."
_CHECK_HELP = "Reload the written file and compare it with eager inference; a mismatch removes " \
              "the file (exit 1)."


def _release_option(year: str, labels: str | None) -> tuple[str, str]:
    """(release, the option that named it): the hidden `--labels` alias wins when given, so an
    error names the option the user typed."""
    from mtcmkd.brats import release

    value, flag = (labels, "--labels") if labels is not None else (year, "--year")
    try:
        release(value)
    except ValueError as exc:
        fail(f"{flag}: {exc}")
    return value, flag


def _old_spellings_note(labels: str | None, verify: bool) -> None:
    """After a successful export (so that an error stays one line): the old option names used."""
    old = [f"{a} (now {b})" for a, b, given in (("--labels", "--year", labels is not None),
                                                ("--verify", "--check", verify)) if given]
    if old:
        err_console.print(f"note: {' and '.join(old)}: the old spelling works for a while",
                          markup=False, highlight=False, soft_wrap=True)


def _summary(title: str, rows: list[tuple[str, Any]]) -> None:
    table = Table(title=title, show_header=False)
    table.add_column("field")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)


def _dice(meta: dict[str, Any]) -> str:
    dice = meta.get("val_dice") or {}
    return ", ".join(f"{k} {float(v):.3f}" for k, v in dice.items()) or "-"


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


@export_app.command("torchscript")
def export_torchscript_cmd(
    source: Annotated[Path, typer.Argument(help=_SOURCE_HELP)],
    out: Annotated[Path, typer.Option("--out", "-o", help="TorchScript file to write (.pt).")],
    year: Annotated[str, typer.Option("--year", help=_YEAR_HELP)] = "2021",
    overlap: Annotated[float, typer.Option(
        help="Sliding-window overlap in [0, 1), fixed into the file.")] = 0.5,
    mirror: Annotated[bool, typer.Option(
        "--mirror", help="Mirror test-time augmentation (8 passes per window).")] = False,
    check: Annotated[bool, typer.Option(
        "--check/--no-check", help=_CHECK_HELP + " Two volume sizes; probabilities within "
                                   "1e-4, identical labels.")] = True,
    labels: Annotated[str | None, typer.Option("--labels", hidden=True)] = None,
    verify: Annotated[bool, typer.Option("--verify", hidden=True)] = False,
) -> None:
    """The whole inference (crop, z-score, sliding window, labels) as one TorchScript file."""
    # --labels and --verify: the older names of --year and --check, kept working, hidden.
    from mtcmkd.export.source import ExportError, check_export_target
    from mtcmkd.export.torchscript import export_torchscript, verify_export

    try:
        check_export_target(source, out)
    except ExportError as exc:
        fail(str(exc))
    chosen, flag = _release_option(year, labels)

    try:
        with console.status(f"scripting {source}"):
            result = export_torchscript(source, out, labels=chosen, overlap=overlap,
                                        mirror=mirror)
    except ExportError as exc:
        fail(str(exc).replace("--labels", flag))
    meta = result.metadata
    _summary("TorchScript export", [
        ("file", f"{result.path} ({_size(result.path)})"),
        ("input", f"{', '.join(meta['modalities'])}: float32 (1, {len(meta['modalities'])}, "
                  "D, H, W), raw"),
        ("labels", f"{meta['label_convention']}: "
                   + ", ".join(f"{v} {k}" for k, v in meta["label_values"].items())),
        ("window", f"patch {'x'.join(map(str, meta['patch_size']))}, overlap {meta['overlap']}"
                   + (", mirror TTA" if meta["mirror"] else "")),
        ("student", f"{meta['method'] or '?'} / {meta['config_name'] or '?'}, config "
                    f"{meta['config_hash']}, mtcmkd {meta['mtcmkd_version']}"),
        ("val Dice", _dice(meta)),
    ])
    if not (check or verify):
        _old_spellings_note(labels, verify)
        return

    try:
        with console.status("verifying") as status:
            cases = verify_export(result.path, result.bundle,
                                  progress=lambda msg: status.update(f"verifying {msg}"))
    except ExportError as exc:  # the reloaded file is unreadable or fails its digest
        result.path.unlink(missing_ok=True)
        fail(f"{exc}; file removed", code=1)
    table = Table(title="verification: reloaded file vs eager predict_volume")
    for column in ("volume", "max |dp|", "labels", "exported s", "eager s"):
        table.add_column(column, justify="right")
    for case in cases:
        table.add_row("x".join(map(str, case.shape)), f"{case.max_probability_difference:.2e}",
                      "identical" if case.labels_equal else f"{case.n_label_differences} differ",
                      f"{case.seconds_exported:.2f}", f"{case.seconds_eager:.2f}")
    console.print(table)
    bad = [c for c in cases if not c.ok]
    if bad:
        result.path.unlink(missing_ok=True)
        case = bad[0]
        fail(f"{result.path}: verification failed at volume {case.shape}: max probability "
             f"difference {case.max_probability_difference:.3g} (tolerance "
             f"{case.tolerance:g}), {case.n_label_differences} label(s) differ; file removed",
             code=1)
    console.print("verified: identical labels, probabilities within 1e-4")
    _old_spellings_note(labels, verify)


def _patch_rows(result: Any) -> list[tuple[str, Any]]:
    meta = result.metadata  # its "n_out" (the number of output channels) keeps its historical name
    rows: list[tuple[str, Any]] = [
        ("file", f"{result.path} ({_size(result.path)})"),
        ("input", f"{', '.join(meta['modalities'])} z-scored: float32 (B, "
                  f"{len(meta['modalities'])}, D, H, W), D/H/W multiples of {meta['stride']}"),
        ("output", f"logits (B, {meta['n_out']}, D, H, W), {meta['network_output']}"),
        ("tiling", f"patch {'x'.join(map(str, meta['patch_size']))}, Gaussian sigma "
                   f"{meta['sigma_scale']} x patch (see export/README.md)"),
        ("val Dice", _dice(meta)),
    ]
    for shape, diff in result.parity.items():
        rows.append((f"parity {'x'.join(map(str, shape))}", f"max |d logit| {diff:.2e}"))
    return rows


@export_app.command("onnx")
def export_onnx_cmd(
    source: Annotated[Path, typer.Argument(help=_SOURCE_HELP)],
    out: Annotated[Path, typer.Option("--out", "-o", help="ONNX file to write (.onnx).")],
    check: Annotated[bool, typer.Option(
        "--check/--no-check", help="Compare with eager in ONNX Runtime (needs onnxruntime).")
    ] = True,
) -> None:
    """The student network at patch level as ONNX (dynamic batch and spatial sizes)."""
    from mtcmkd.export.onnx_export import export_onnx
    from mtcmkd.export.source import ExportError, VerificationError, check_export_target

    try:
        check_export_target(source, out)
    except ExportError as exc:
        fail(str(exc))

    try:
        with console.status(f"exporting {source} to ONNX"):
            result = export_onnx(source, out, check=check)
    except VerificationError as exc:
        fail(str(exc), code=1)
    except ExportError as exc:
        fail(str(exc))
    _summary("ONNX export", _patch_rows(result))


@export_app.command("pt2")
def export_pt2_cmd(
    source: Annotated[Path, typer.Argument(help=_SOURCE_HELP)],
    out: Annotated[Path, typer.Option("--out", "-o", help="torch.export archive (.pt2).")],
    check: Annotated[bool, typer.Option(
        "--check/--no-check", help=_CHECK_HELP + " Two input shapes, logits within 1e-4.")
    ] = True,
) -> None:
    """The student network at patch level as a torch.export program (torch.export.load)."""
    from mtcmkd.export.patch_network import export_pt2
    from mtcmkd.export.source import ExportError, VerificationError, check_export_target

    try:
        check_export_target(source, out)
    except ExportError as exc:
        fail(str(exc))

    try:
        with console.status(f"exporting {source} with torch.export"):
            result = export_pt2(source, out, check=check)
    except VerificationError as exc:
        fail(str(exc), code=1)
    except ExportError as exc:
        fail(str(exc))
    _summary("torch.export (.pt2) export", _patch_rows(result))


@export_app.command("aoti")
def export_aoti_cmd(
    source: Annotated[Path, typer.Argument(help=_SOURCE_HELP)],
    out: Annotated[Path, typer.Option("--out", "-o", help="AOTInductor package to write (.pt2).")],
    year: Annotated[str, typer.Option("--year", help=_YEAR_HELP)] = "2021",
    overlap: Annotated[float, typer.Option(
        help="Sliding-window overlap in [0, 1), fixed into the package.")] = 0.5,
    mirror: Annotated[bool, typer.Option(
        "--mirror", help="Mirror test-time augmentation (8 passes per window).")] = False,
    check: Annotated[bool, typer.Option(
        "--check/--no-check", help=_CHECK_HELP + " Two volume sizes; identical labels.")
    ] = True,
) -> None:
    """The whole inference (crop, z-score, sliding window, labels) compiled with AOTInductor:
    a .pt2 package for Python (torch._inductor.aoti_load_package) and C++
    (export/cpp mtcmkd_segment_aoti). Compiling takes about a minute."""
    from mtcmkd.export.aoti import export_aoti
    from mtcmkd.export.source import ExportError, VerificationError, check_export_target

    try:
        check_export_target(source, out)
    except ExportError as exc:
        fail(str(exc))
    if out.suffix != ".pt2":
        fail(f"{out}: an AOTI package must end in .pt2")
    chosen, flag = _release_option(year, None)

    try:
        with console.status(f"compiling {source} with AOTInductor") as status:
            result = export_aoti(source, out, labels=chosen, overlap=overlap, mirror=mirror,
                                 check=check, progress=lambda msg: status.update(msg))
    except VerificationError as exc:
        fail(str(exc), code=1)
    except ExportError as exc:
        fail(str(exc).replace("--labels", flag))
    meta = result.metadata
    rows: list[tuple[str, Any]] = [
        ("file", f"{result.path} ({_size(result.path)}), compiled in "
                 f"{result.compile_seconds:.0f} s"),
        ("input", f"{', '.join(meta['modalities'])}: float32 (1, {len(meta['modalities'])}, "
                  f"D, H, W), raw; each size {meta['min_size']}-{meta['max_size']}"),
        ("labels", f"{meta['label_convention']}: "
                   + ", ".join(f"{v} {k}" for k, v in meta["label_values"].items())),
        ("window", f"patch {'x'.join(map(str, meta['patch_size']))}, overlap {meta['overlap']}"
                   + (", mirror TTA" if meta["mirror"] else "")),
        ("student", f"{meta['method'] or '?'} / {meta['config_name'] or '?'}, config "
                    f"{meta['config_hash']}, mtcmkd {meta['mtcmkd_version']}"),
        ("val Dice", _dice(meta)),
    ]
    for case in result.cases:
        rows.append((f"check {'x'.join(map(str, case.shape))}",
                     f"labels identical to eager ({case.seconds_exported:.2f} s package, "
                     f"{case.seconds_eager:.2f} s eager)"))
    _summary("AOTInductor (.pt2) export", rows)
