"""Figures readable at a glance: distinct colours, the student on top, legend only for the
labels present (issue 20, item 9)."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import to_hex

from mtcmkd.plots import legend_labels, line_plot, overlay_png, series_styles


def test_eleven_series_get_eleven_colours_and_the_student_is_on_top() -> None:
    names = [f"teacher_{i}/seg" for i in range(10)] + ["student/seg"]
    styles = series_styles(names)
    colours = {to_hex(s["color"]) for s in styles.values()}
    assert len(colours) == 11  # tab10 would repeat the first colour
    assert styles["student/seg"]["zorder"] > styles["teacher_0/seg"]["zorder"]
    assert styles["student/seg"]["linewidth"] > styles["teacher_0/seg"]["linewidth"]
    many = series_styles([f"s{i}" for i in range(25)])
    assert many["s20"]["linestyle"] == "--" and many["s0"]["linestyle"] == "-"


def test_legend_shows_only_the_labels_present() -> None:
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[1, 1, 1], truth[2, 2, 2] = 1, 3
    pred = np.zeros_like(truth)
    pred[0, 0, 0] = 2
    assert legend_labels(truth, pred) == [1, 2, 3]  # no RC on 2021 data
    pred[3, 3, 3] = 4
    assert legend_labels(truth, pred) == [1, 2, 3, 4]
    assert legend_labels(np.zeros_like(truth), None) == [1, 2, 3]


def test_pngs_are_written(tmp_path) -> None:
    out = line_plot(tmp_path / "l.png", [("loss", {"student/seg": ([0, 1, 2], [3.0, 2.0, 1.0]),
                                                   "teacher/seg": ([0, 1, 2], [3.0, 2.5, 2.0])},
                                          "", True)], "step", "losses")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    truth = np.zeros((8, 8, 8), np.uint8)
    truth[3:5, 3:5, 3:5] = 2
    png = overlay_png(tmp_path / "o.png", None, truth=truth, title="case  Dice WT 1.000")
    assert png.stat().st_size > 0
