"""Pictures: segmentation overlays of one case and line plots, drawn on matplotlib's Agg canvas.

Everything draws on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``, never
``pyplot``): no display is needed, no global backend state is touched, and figures are freed
when they go out of scope. PNGs are written to a temporary name and renamed
(`mtcmkd.atomic.atomic_output`), so a reader never sees half a file. What to plot from a run's
log is `mtcmkd.run_report`'s business; this module only draws.

Overlay colours (canonical labels, the usual BraTS figure colours):
NCR/NETC red, ED/SNFH green, ET yellow, RC (resection cavity, 2024+) blue.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel.orientations as nio
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from mtcmkd.atomic import atomic_output
from mtcmkd.brats import REGIONS

__all__ = ["LABEL_COLOURS", "legend_labels", "line_plot", "overlay_png", "save_png", "series_styles",
           "tumour_centre"]

#: Canonical label -> (name, colour) of the overlays.
LABEL_COLOURS: dict[int, tuple[str, str]] = {
    1: ("NCR/NETC", "#ff0000"),
    2: ("ED/SNFH", "#00c800"),
    3: ("ET", "#ffff00"),
    4: ("RC", "#2080ff"),
}
_OVERLAY_ALPHA = 0.55


def save_png(fig: Figure, out_path: Path, dpi: int = 100) -> Path:
    """Render `fig` with Agg and write it atomically as PNG (parents created); returns the path."""
    FigureCanvasAgg(fig)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return out_path


# ------------------------------------------------------------------------------ overlays


def tumour_centre(truth: np.ndarray | None, prediction: np.ndarray | None,
                  shape: Sequence[int]) -> tuple[int, int, int]:
    """Voxel to slice through: the centre of mass of the truth's whole tumour (WT, labels 1-3).

    Falls back to the prediction's tumour when the truth is absent or empty, then to the
    centre of the volume, so every case gets a picture.
    """
    for labels in (truth, prediction):
        if labels is None:
            continue
        tumour = np.isin(labels, REGIONS["WT"])
        if tumour.any():
            coords = np.argwhere(tumour).mean(axis=0)
            return (int(round(coords[0])), int(round(coords[1])), int(round(coords[2])))
    return (int(shape[0]) // 2, int(shape[1]) // 2, int(shape[2]) // 2)


def _to_ras(volumes: list[np.ndarray | None], affine: np.ndarray | None,
            spacing: Sequence[float]) -> tuple[list[np.ndarray | None], tuple[float, ...]]:
    """Reorient voxel arrays to the closest RAS axes (flips and permutations only)."""
    if affine is None:
        return volumes, tuple(float(s) for s in spacing)
    ornt = nio.io_orientation(np.asarray(affine, dtype=np.float64))
    out = [None if v is None else nio.apply_orientation(v, ornt) for v in volumes]
    new_spacing = [1.0, 1.0, 1.0]
    for axis, (target, _) in enumerate(ornt):
        new_spacing[int(target)] = float(spacing[axis])
    return out, tuple(new_spacing)


def _label_rgba(labels: np.ndarray) -> np.ndarray:
    rgba = np.zeros((*labels.shape, 4), dtype=np.float32)
    for value, (_, colour) in LABEL_COLOURS.items():
        rgb = tuple(int(colour[i: i + 2], 16) / 255.0 for i in (1, 3, 5))
        rgba[labels == value] = (*rgb, _OVERLAY_ALPHA)
    return rgba


def legend_labels(*volumes: np.ndarray | None) -> list[int]:
    """The overlay legend's labels: those present in any of the volumes (no RC entry on data
    of a release without a resection cavity); NCR, ED, ET when none is present."""
    present: set[int] = set()
    for labels in volumes:
        if labels is not None:
            present.update(int(v) for v in np.unique(labels))
    return [value for value in LABEL_COLOURS if value in present] or [1, 2, 3]


def overlay_png(out_path: Path, image: np.ndarray | None, *, truth: np.ndarray | None = None,
                prediction: np.ndarray | None = None, affine: np.ndarray | None = None,
                spacing: Sequence[float] = (1.0, 1.0, 1.0), title: str = "") -> Path:
    """Axial, coronal and sagittal slices through the tumour centre, with labels overlaid.

    One row per label volume given (ground truth, then prediction; the image alone when
    neither is given), three columns (axial, coronal, sagittal). Slices go through
    :func:`tumour_centre`. With `affine`, volumes are reoriented to RAS and shown in the
    neurological convention (patient's right on the right, anterior up in axial views,
    superior up otherwise); without it, array axes are shown as they are. Intensities are
    windowed to the 0.5-99.5 percentiles of the non-zero voxels; zero (background) is black.
    Colours: :data:`LABEL_COLOURS`.

    Args:
        out_path: PNG file to write (parents created).
        image: 3D intensities (any scale) or None for a black background.
        truth, prediction: canonical label volumes of the image's shape, or None.
        affine: voxel-to-world matrix of the volumes (orientation only).
        spacing: voxel size in mm per array axis (sets the aspect ratio).
        title: figure title (e.g. the case id).

    Returns:
        `out_path`.
    """
    shape = next(v.shape for v in (image, truth, prediction) if v is not None)
    base = np.zeros(shape, dtype=np.float32) if image is None else np.asarray(image, np.float32)
    (base, truth_r, pred_r), sp = _to_ras([base, truth, prediction], affine, spacing)
    assert base is not None
    centre = tumour_centre(truth_r, pred_r, base.shape)
    brain = base[base != 0]
    lo, hi = (np.percentile(brain, [0.5, 99.5]) if brain.size else (0.0, 1.0))
    if hi <= lo:
        hi = lo + 1.0
    # Outside the brain is 0, which z-scored images put mid-grey: show it black instead.
    base = np.where(base != 0, base, lo)

    def views(volume: np.ndarray) -> list[tuple[str, np.ndarray, float]]:
        x, y, z = centre
        # Transposed so rows are the second axis; origin="lower" puts it upwards.
        return [
            ("axial", volume[:, :, z].T, sp[1] / sp[0]),
            ("coronal", volume[:, y, :].T, sp[2] / sp[0]),
            ("sagittal", volume[x, :, :].T, sp[2] / sp[1]),
        ]

    rows = [(name, lab) for name, lab in (("ground truth", truth_r), ("prediction", pred_r))
            if lab is not None] or [("image", None)]
    fig = Figure(figsize=(9.6, 3.3 * len(rows) + 0.7))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for r, (row_name, labels) in enumerate(rows):
        image_views = views(base)
        label_views = views(labels) if labels is not None else [None] * 3
        for c, ((view, plane, aspect), label_view) in enumerate(
                zip(image_views, label_views, strict=True)):
            ax = axes[r][c]
            ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect,
                      interpolation="nearest")
            if label_view is not None:
                ax.imshow(_label_rgba(label_view[1]), origin="lower", aspect=aspect,
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(view, fontsize=10)
            if c == 0:
                ax.set_ylabel(row_name, fontsize=10)
    handles = [Patch(facecolor=LABEL_COLOURS[v][1], edgecolor="none", label=LABEL_COLOURS[v][0])
               for v in legend_labels(truth_r, pred_r)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
               fontsize=9)
    fig.suptitle(f"{title}  (slices through voxel {centre} of the RAS-reoriented volume)"
                 if affine is not None else f"{title}  (slices through voxel {centre})",
                 fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.99, top=0.9, bottom=0.12, wspace=0.04, hspace=0.08)
    return save_png(fig, out_path)


# ----------------------------------------------------------------------------- line plots


def series_styles(names: Sequence[str]) -> dict[str, dict[str, object]]:
    """A distinct colour per series (tab10 up to 10 series, tab20 up to 20, then the 20 again
    with dashes), and the student's series drawn on top, thicker: when its values equal a
    teacher's (a shared learning rate) it is still seen."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    n = cmap.N
    styles: dict[str, dict[str, object]] = {}
    for i, name in enumerate(names):
        student = "student" in name
        styles[name] = {"color": cmap(i % n), "linestyle": "-" if i < n else "--",
                        "linewidth": 2.2 if student else 1.3, "zorder": 3 if student else 2}
    return styles


def line_plot(out_path: Path, panels: list[tuple[str, dict[str, tuple[list, list]], str, bool]],
              xlabel: str, title: str, mark_x: float | None = None,
              integer_x: bool = True) -> Path:
    """One PNG of stacked panels of named series against a shared x axis.

    Each panel is (y label, name -> (xs, ys), prefix stripped from names in the legend, log
    scale wanted); the y axis turns logarithmic only when every value is positive. `mark_x`
    draws a dashed vertical line (the best epoch). Colours per :func:`series_styles`; the
    legend sits outside the axes (it never covers a curve); `integer_x` keeps ticks on whole
    steps/epochs. Returns `out_path`.
    """
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9.0, 3.6 * len(panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False)
    for ax, (ylabel, series, legend_prefix, log_y) in zip(axes[:, 0], panels, strict=True):
        names = sorted(series)
        styles = series_styles(names)
        for name in names:
            xs, ys = series[name]
            label = name[len(legend_prefix):] if name.startswith(legend_prefix) else name
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3,
                    label=label or name, **styles[name])  # type: ignore[arg-type]
        if log_y and all(y > 0 for _, ys in series.values() for y in ys):
            ax.set_yscale("log")
        if mark_x is not None:
            ax.axvline(mark_x, color="grey", linestyle=":", linewidth=1, label="best epoch")
        if integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                  frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_png(fig, out_path)
