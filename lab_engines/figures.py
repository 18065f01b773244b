"""Matplotlib figures for the Lab's PNG artifacts, on the Agg canvas directly (no pyplot): no global
backend state, safe in job threads."""
from __future__ import annotations

import warnings
from pathlib import Path

__all__ = ["new_figure", "save_png"]


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs for exotic tokens are not worth a warning
        fig.tight_layout()
        fig.savefig(path, format="png")
