"""What every chart tunelab draws shares: a headless pyplot, titles wrapped to fit, bars that carry their values.

Charts are read as files (a README, W&B, the board), never on a display, so each rule here is about a PNG
read cold: a zero must look like a zero, not like a missing bar, and a title must not run off the edge.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: files only, no display on clusters and CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fit_title(fig: Any, text: Any, margin_px: float = 4.0) -> None:
    """Re-wrap `text` (a figure or axes title) at word boundaries until it lies inside the figure's width.

    Measured with the figure's own renderer and font, so it holds for any title length and figure size; a
    layout engine (constrained layout) then makes room for the extra lines."""
    original = " ".join(text.get_text().split())
    renderer = fig.canvas.get_renderer()
    limit = fig.bbox.width - 2 * margin_px
    width = len(original)
    while True:
        text.set_text(textwrap.fill(original, width=width, break_long_words=False, break_on_hyphens=False))
        if text.get_window_extent(renderer).width <= limit or width <= 8:
            return
        width = max(8, int(width * 0.85))


def label_bars(
    ax: Any,
    xs: Sequence[float],
    values: Sequence[float | None],
    tops: Sequence[float | None],
    width: float,
    color: Any,
    digits: int = 3,
    fontsize: float = 7.0,
) -> None:
    """A value label on every bar, above its whisker (`tops`, or the bar's end), below a negative bar; a bar too
    short to see (zero included) gets a thick mark of its colour at its value, and a missing value says n/a, so
    a zero never reads as a missing bar and a missing one never as a zero."""
    low, high = ax.get_ylim()
    span = (high - low) or 1.0
    for x, value, top in zip(xs, values, tops, strict=True):
        if value is None:
            ax.annotate(
                "n/a",
                (x, 0.0),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=fontsize,
                color="0.4",
            )
            continue
        if abs(value) < 0.006 * span:  # under ~2 px at our sizes: draw it as a mark on top of the axis line
            ax.hlines(value, x - width / 2, x + width / 2, colors=[color], linewidth=3.0, zorder=3)
        end = value if top is None else top
        below = value < 0
        ax.annotate(
            f"{value:.{digits}f}",
            (x, end),
            xytext=(0, -2 if below else 2),
            textcoords="offset points",
            ha="center",
            va="top" if below else "bottom",
            fontsize=fontsize,
        )
