"""The `mtcmkd` command line: one thin command per file, registered here."""

from __future__ import annotations

from typing import Any

import typer
import typer.main
from typer.core import TyperCommand

from . import compare as _compare
from . import demo as _demo
from . import evaluate as _evaluate
from . import export_cmd as _export
from . import inspect_cmd as _inspect
from . import predict as _predict
from . import preprocess as _preprocess
from . import report as _report
from . import store_info as _store_info
from . import summary as _summary
from . import synth as _synth
from . import train as _train

app = typer.Typer(
    name="mtcmkd",
    help="Multi-teacher cross-modal knowledge distillation for brain-tumour segmentation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("synth")(_synth.synth)
app.command("preprocess")(_preprocess.preprocess)
app.command("store-info")(_store_info.store_info)


def expand_set_pairs(args: list[str]) -> list[str]:
    """``--set a=1 b=2`` -> ``--set a=1 --set b=2``: every word after a ``--set`` value up to
    the next option is one more pair (the commands with --set take no positional argument).

    A word without ``=`` becomes a ``--set`` of its own, so the config's one-line error names
    it ("expected KEY=VALUE") rather than click's usage box about an extra argument.
    """
    out: list[str] = []
    pairs = False  # inside a run of --set values
    expect_value = False
    for i, word in enumerate(args):
        if word == "--":
            return out + args[i:]
        if expect_value:
            out.append(word)
            expect_value, pairs = False, True
        elif word == "--set":
            out.append(word)
            expect_value = True
        elif word.startswith("--set="):
            out.append(word)
            pairs = True
        elif pairs and not word.startswith("-"):
            out += ["--set", word]
        else:
            out.append(word)
            pairs = False
    return out


class SetPairsCommand(TyperCommand):
    """A command whose repeatable ``--set`` also takes several KEY=VALUE after one flag."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_set_pairs(list(args)))


app.command("train", cls=SetPairsCommand)(_train.train)
app.command("inspect", cls=SetPairsCommand)(_inspect.inspect_config)
app.command("predict")(_predict.predict)
app.command("evaluate")(_evaluate.evaluate)
app.command("report")(_report.report)
app.command("compare")(_compare.compare_cmd)
app.command("summary")(_summary.summary_cmd)
app.add_typer(_export.export_app, name="export")
app.command("demo")(_demo.demo)


def _tidy_help(command: Any) -> Any:
    """Help without type placeholders where they say nothing: on/off flags (``--help``
    included) show no ``<bool>``, a repeatable option its item type (``<path>``, not
    ``<list[Path]>``), ``--set`` shows ``KEY=VALUE...`` (several pairs after one
    ``--set``, or ``--set`` repeated).

    Works on the click command Typer builds (duck-typed: Typer ships its own click)."""
    ctx = type(command).context_class(command)
    for param in command.get_params(ctx):
        if not hasattr(param, "is_flag") or param.metavar is not None:
            continue
        if param.is_flag:
            param.metavar = " "
        elif "--set" in param.opts:
            param.metavar = "KEY=VALUE..."
        elif getattr(param, "multiple", False):  # e.g. predict --run: not `<list[Path]>`
            item = getattr(getattr(param, "type_descriptor", None), "annotation", None)
            args = getattr(item, "__args__", ())
            param.metavar = f"<{args[0].__name__.lower()}>" if args else None
    for sub in (getattr(command, "commands", None) or {}).values():
        _tidy_help(sub)
    return command


def main() -> None:
    """The console entry point: the app as a click command with tidied help."""
    _tidy_help(typer.main.get_command(app))(prog_name="mtcmkd")


@app.callback()
def _main() -> None:
    """Pipeline: synth (phantom) -> preprocess (BraTS -> Zarr) -> train -> evaluate -> export."""


if __name__ == "__main__":
    main()
