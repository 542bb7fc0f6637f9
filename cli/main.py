"""The `mtcmkd` command line: one thin command per file, registered here."""

from __future__ import annotations

import typer

from . import compare as _compare
from . import demo as _demo
from . import evaluate as _evaluate
from . import export_cmd as _export
from . import inspect_cmd as _inspect
from . import predict as _predict
from . import preprocess as _preprocess
from . import report as _report
from . import store_info as _store_info
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
app.command("train")(_train.train)
app.command("inspect")(_inspect.inspect_config)
app.command("predict")(_predict.predict)
app.command("evaluate")(_evaluate.evaluate)
app.command("report")(_report.report)
app.command("compare")(_compare.compare_cmd)
app.add_typer(_export.export_app, name="export")
app.command("demo")(_demo.demo)


@app.callback()
def _main() -> None:
    """Pipeline: synth (phantom) -> preprocess (BraTS -> Zarr) -> train -> evaluate -> export."""


if __name__ == "__main__":
    app()
