"""PNG figures for a trace result: per-token attributions (bars), layer x position and layer x head
heatmaps (lab_engines.figures: matplotlib's Agg canvas, safe in job threads)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lab_engines.figures import new_figure, save_png

__all__ = ["plot_heatmap", "plot_tokens", "token_label"]


def token_label(token: str) -> str:
    """A token as a readable tick label: escapes (newlines, tabs) spelled out, spaces shown as a middle dot."""
    return repr(token)[1:-1].replace(" ", "\u00b7") or "\u2205"


def plot_tokens(path: Path, tokens: list[str], values: list[float], title: str) -> None:
    """Horizontal bars, one per prompt token, top to bottom in prompt order; red positive, blue negative."""
    n = len(tokens)
    fig = new_figure(7.0, min(1.2 + 0.28 * n, 40.0))
    ax = fig.add_subplot()
    vals = np.asarray(values, dtype=float)
    ax.barh(np.arange(n), vals, color=np.where(vals >= 0, "#c0392b", "#2e6fb7"))
    ax.set_yticks(np.arange(n), [token_label(t) for t in tokens], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.6)
    ax.set_xlabel("attribution")
    ax.set_title(title, fontsize=9)
    save_png(fig, path)


def plot_heatmap(path: Path, matrix: list[list[float]], columns: list[str], title: str,
                 xlabel: str, diverging: bool) -> None:
    """Rows = layers (0 at the top), columns labelled (as tokens); diverging = signed values around 0 (RdBu),
    else viridis."""
    data = np.asarray(matrix, dtype=float)
    n_rows, n_cols = data.shape
    fig = new_figure(min(3.0 + 0.35 * n_cols, 40.0), min(2.5 + 0.25 * n_rows, 30.0))
    ax = fig.add_subplot()
    if diverging:
        vmax = float(np.abs(data).max()) or 1.0
        image = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    else:
        image = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(np.arange(n_cols), [token_label(c) for c in columns], rotation=90, fontsize=7)
    ax.set_yticks(np.arange(n_rows), [str(i) for i in range(n_rows)], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    save_png(fig, path)
