"""Dice against CPU seconds per case for every student size and inference setting (issue 17).

Seconds: `bench_inference.py`'s CPU seconds per real case (2 threads); Dice: the mean Dice of
the same size and setting on the phantom's test cases (`experiments/compact_students.py`).
The two come from different data on purpose (real cases have no trained weights here; the
phantom has no real-size volume), so read the plot as "what each setting costs and what it
does to Dice", not as one experiment. Sizes or settings missing from either file are left out.

    python benchmarks/plot_dice_vs_seconds.py --bench docs/results/inference_bench.json \\
        docs/results/inference_bench_paper.json --dice docs/results/compact_students.json \\
        --out docs/results/dice_vs_seconds.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: bench_inference path -> compact_students variant (the same inference settings)
VARIANTS = {"reference": "reference", "auto": "auto", "box-fp32": "box-fp32",
            "box-bf16": "box-auto"}
REGIONS = ("WT", "TC", "ET")


def points(bench_files: list[Path], dice_file: Path) -> list[dict]:
    """One point per (size, path) present in both: CPU s per case and Dice per region."""
    summary = json.loads(dice_file.read_text())["summary"]
    out = []
    for path in bench_files:
        for row in json.loads(path.read_text())["rows"]:
            size, name = row.get("size"), row.get("path")
            variant = VARIANTS.get(name)
            cpu = row.get("cpu_s_per_case")
            if variant is None or cpu is None or variant not in summary.get(size, {}):
                continue
            out.append({"size": size, "path": name, "cpu_s": cpu,
                        "dice": summary[size][variant]["dice_mean"]})
    return out


def plot(pts: list[dict], out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharex=True)
    markers = {"reference": "o", "auto": "s", "box-fp32": "^", "box-bf16": "v"}
    colours = {"nano": "tab:blue", "compact": "tab:orange", "paper": "tab:green"}
    for ax, region in zip(axes, REGIONS, strict=True):
        for p in pts:
            ax.scatter(p["cpu_s"], p["dice"][region], marker=markers[p["path"]],
                       color=colours.get(p["size"], "grey"), s=50,
                       label=f"{p['size']} {p['path']}")
        ax.set_title(f"{region} Dice (phantom test cases)")
        ax.set_xlabel("CPU s per real case (2 threads)")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", type=Path, nargs="+", required=True)
    ap.add_argument("--dice", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    pts = points(args.bench, args.dice)
    if not pts:
        print("no (size, setting) is in both files", file=sys.stderr)
        return 1
    plot(pts, args.out)
    for p in pts:
        print(f"{p['size']:<8} {p['path']:<10} {p['cpu_s']:7.1f} CPU s  "
              + "  ".join(f"{r} {p['dice'][r]:.3f}" for r in REGIONS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
