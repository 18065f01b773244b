"""Result grids of the causal engines as JSON-ready dicts, PNG heatmaps and the result JSON file.
Matplotlib through its object API (Figure + Agg canvas): no pyplot global state in a server."""
from __future__ import annotations

import json
import math
from pathlib import Path

from lab_engines.context import JobContext
from lab_engines.figures import new_figure, save_png

__all__ = ["grid", "label", "normalize", "write_artifacts"]


def label(token: str) -> str:
    """A token as an axis label: whitespace made visible."""
    return token.replace("\n", "\\n").replace(" ", "\u00b7") or "\u2205"


def normalize(value: float, low: float, high: float) -> float | None:
    """(value - low) / (high - low); None when low == high (nothing to restore)."""
    return None if high == low else (value - low) / (high - low)


def grid(rows: list[str], cols: list[str], values: list[float], **extra) -> dict:
    """A row-major flat list as {"rows", "cols", "values": [[...]]} plus extra keys (lists of the same
    length are reshaped too)."""
    width = len(cols)

    def shape(flat):
        return [flat[i:i + width] for i in range(0, len(flat), width)]
    out = {"rows": rows, "cols": cols, "values": shape(values)}
    for key, value in extra.items():
        out[key] = shape(value) if isinstance(value, list) and len(value) == len(values) else value
    return out


def _heatmap(path: Path, data: dict, title: str) -> None:
    values = [[math.nan if v is None else v for v in row] for row in data["values"]]
    rows, cols = data["rows"], data["cols"]
    limit = max((abs(v) for row in values for v in row if not math.isnan(v)), default=1.0) or 1.0
    fig = new_figure(min(2 + 0.45 * len(cols), 24), min(1.5 + 0.3 * len(rows), 24))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=data.get("unit", ""))
    save_png(fig, path)


def write_artifacts(ctx: JobContext, result: dict, stem: str, extra: list[str] = ()) -> dict:
    """Writes one heatmap per result["grids"] entry and the result as <stem>.json; sets and returns
    result["artifacts"] (extra: files the engine wrote itself)."""
    names = list(extra)
    for name, data in result.get("grids", {}).items():
        ctx.check()
        file = f"{stem}_{name}.png"
        _heatmap(ctx.artifact_dir / file, data, f"{stem}: {name} ({data.get('unit', '')})")
        names.append(file)
    names.append(f"{stem}.json")
    result["artifacts"] = names
    (ctx.artifact_dir / f"{stem}.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    return result
