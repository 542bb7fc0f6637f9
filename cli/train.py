"""`mtcmkd train`: one command for a laptop, torchrun, deepspeed and srun."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .console import console, failer

fail = failer("train")


def train(
    config: Annotated[Path, typer.Option(
        "--config", "-c", help="YAML config, or a preset name (`mtcmkd inspect` lists them).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")],
    store: Annotated[Path | None, typer.Option(help="Zarr store (overrides data.store).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override config values, e.g. --set train.lr=3e-4 train.epochs=2 "
                 "(several pairs after one --set, or --set repeated).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the newest complete checkpoint of --out.")] = False,
    memory_check: Annotated[bool, typer.Option(
        "--memory-check/--no-memory-check",
        help="Refuse a patch size x batch whose estimated memory exceeds what is free.")
    ] = True,
    local_rank: Annotated[int | None, typer.Option(
        "--local_rank", "--local-rank", hidden=True,
        help="Set by the deepspeed launcher; LOCAL_RANK is used instead.")] = None,
) -> None:
    """Train the configured method with DeepSpeed (fp32 on CPU, bf16 on GPU by default).

    Exit code 3 means the run saved a checkpoint after a preemption warning (SIGUSR1/SIGTERM)
    and should be resumed with --resume (slurm/train.sh requeues itself).
    """
    # Imported on use, as in every command: `mtcmkd --help` and the other commands need not
    # load torch and the training stack.
    from mtcmkd.config import ConfigError, load_config

    overrides = list(set_ or [])
    if store is not None:
        overrides.append(f"data.store={json.dumps(str(store))}")
    try:
        cfg = load_config(config, overrides)
    except FileNotFoundError:
        fail(f"{config}: no such config file")
    except ConfigError as exc:
        fail(str(exc) if str(config) in str(exc) else f"{config}: {exc}")
    if cfg.data.store is None:
        fail("no store: pass --store or set data.store in the config")
    if not Path(cfg.data.store).is_dir():
        fail(f"{cfg.data.store}: no such store (run `mtcmkd preprocess` first)")

    from mtcmkd.data import StoreFormatError
    from mtcmkd.engine.checkpoint import CheckpointError
    from mtcmkd.engine.dist import process_rank
    from mtcmkd.engine.errors import EXIT_PREEMPTED, TrainError
    from mtcmkd.engine.run_folder import write_summary
    from mtcmkd.engine.trainer import train as run_train

    is_main = process_rank() == 0

    def echo(msg: str) -> None:
        if is_main:
            console.print(msg, highlight=False, soft_wrap=True)

    try:
        summary = run_train(cfg, out, resume=resume, memory_check=memory_check, echo=echo)
    except (TrainError, CheckpointError, StoreFormatError) as exc:
        fail(str(exc))
    write_summary(out, summary)
    if summary.get("preempted"):
        echo(f"preempted: checkpoint saved at step {summary['step']}; resume with --resume")
        raise typer.Exit(EXIT_PREEMPTED)
    if is_main:
        table = Table(title=f"mtcmkd train -> {out}", show_header=False)
        for key in ("epoch", "step", "world_size", "best_epoch", "best_mean_dice", "seconds"):
            v = summary.get(key)
            table.add_row(key, f"{v:.3f}" if isinstance(v, float) else str(v))
        console.print(table)
