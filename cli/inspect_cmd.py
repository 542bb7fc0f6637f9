"""`mtcmkd inspect`: show what a config builds (networks, parameters, modalities, loss terms)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mtcmkd.brats import CHANNELS
from mtcmkd.config import ConfigError, config_hash, load_config, preset_names, preset_path

from .console import console, failer

fail = failer("inspect")


def inspect_config(
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="Run config YAML file or preset name; without it, list the "
        "shipped presets.")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override values: section.key=value (a YAML value); several pairs "
                 "after one --set, or --set repeated.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Validate a config and show its networks (parameters, modalities) and loss terms; list
    the shipped presets without --config."""
    if config is None:
        list_presets(as_json)
        return
    try:
        cfg = load_config(config, overrides or ())
    except ConfigError as exc:
        fail(str(exc))
    # torch and the networks only once the config is valid: a bad config reports at once.
    import torch

    from mtcmkd.methods.build import build_method

    # Parameters on the meta device: counting needs no memory and no initialisation.
    try:
        with torch.device("meta"):
            method = build_method(cfg, CHANNELS)
    except ValueError as exc:
        fail(f"{config}: {exc}")
    info: dict[str, Any] = {"config": str(config), "name": cfg.name, "hash": config_hash(cfg)}
    info.update(method.describe())
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return

    console.print(f"[bold]{cfg.name}[/]  method {info['method']}  output {info['output']} "
                  f"({info['n_classes']} channels)  hash {info['hash']}")
    networks = Table(title="networks")
    networks.add_column("network")
    networks.add_column("modalities")
    networks.add_column("parameters", justify="right")
    networks.add_column("optimiser group")
    total = 0
    for name, net in info["networks"].items():
        total += net["params"]
        networks.add_row(name, ", ".join(net["modalities"]), f"{net['params']:,}", net["group"])
    networks.add_row("[bold]total[/]", "", f"[bold]{total:,}[/]", "")
    console.print(networks)

    terms = Table(title="loss terms (weights as applied)")
    terms.add_column("term")
    terms.add_column("weight", justify="right")
    terms.add_column("epochs")
    terms.add_column("what")
    for row in info["loss_terms"]:
        terms.add_row(row["term"], f"{row['weight']:.4g}", row["epochs"], row["note"])
    console.print(terms)
    if info["settings"]:
        console.print("settings: " + ", ".join(f"{k}={v}" for k, v in info["settings"].items()))


def list_presets(as_json: bool) -> None:
    """The shipped presets: name, method, student and teacher inputs, hash."""
    rows = []
    for name in preset_names():
        cfg = load_config(name)
        rows.append({"preset": name, "method": cfg.method.name,
                     "student": list(cfg.method.student_modalities),
                     "teachers": list(cfg.method.effective_teacher_modalities),
                     "hash": config_hash(cfg), "file": str(preset_path(name))})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="presets (--config NAME, or a path to your own YAML)")
    for col in ("preset", "method", "student", "teachers", "hash"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["preset"], r["method"], ", ".join(r["student"]),
                      ", ".join(r["teachers"]) or "-", r["hash"])
    console.print(table)
