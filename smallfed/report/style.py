"""One look for every figure smallfed draws: sizes and fonts that survive being put in a
paper as they are (6.5 x 4 in, text >= 8 pt), saved as PNG and as vector PDF."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and boards
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

FIGSIZE = (6.5, 4.0)  # inches: a page's text width
DPI = 200
CHAR_IN = 0.055  # the width of a character of an 8 pt legend, in inches (about)
ROW_IN = 0.17  # the height of a legend row
RC = {
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "xtick.labelsize": 8,
    "ytick.labelsize": 8, "legend.fontsize": 8, "figure.titlesize": 10,
    "axes.grid": True, "grid.alpha": 0.3, "pdf.fonttype": 42,  # text stays text in PDFs
}


@contextmanager
def paper() -> Iterator[None]:
    """Draw and save inside this: fonts are fixed when text is created, so the style
    has to hold for both; a context leaves the caller's rcParams alone."""
    with plt.rc_context(RC):
        yield


def figure(figsize: tuple[float, float] = FIGSIZE) -> Figure:
    """A figure whose layout keeps titles, labels and an outside legend inside it
    (call within :func:`paper`)."""
    return plt.figure(figsize=figsize, layout="constrained")


def legend_below(fig: Figure, ax: Axes) -> list[str]:
    """The axes' legend under them, in as many columns as its labels fit across, the
    figure made taller by its rows (a legend beside the axes squeezes them, one inside
    hides points); the labels, as drawn."""
    handles, labels = ax.get_legend_handles_labels()
    column = max(map(len, labels)) * CHAR_IN + 0.5  # + the marker and the gaps
    ncols = max(1, min(len(labels), int(fig.get_figwidth() // column)))
    fig.set_figheight(fig.get_figheight() + ROW_IN * -(-len(labels) // ncols))
    legend = fig.legend(handles, labels, loc="outside lower center", ncols=ncols)
    return [text.get_text() for text in legend.get_texts()]


def save(fig: Figure, png: Path) -> tuple[Path, Path]:
    """``png`` at 200 dpi and the same figure as a PDF beside it; the figure is closed."""
    pdf = png.with_suffix(".pdf")
    try:
        for path in (png, pdf):
            fig.savefig(path, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return png, pdf


def drop(png: Path) -> None:
    """Remove a plot's PNG and PDF left by an earlier report that drew it."""
    for path in (png, png.with_suffix(".pdf")):
        path.unlink(missing_ok=True)
