"""Diagnostics output: recommendations derived from the numbers, report.json, report.md and PNGs
(layer x head heatmaps per head role, sigma_max / effective rank per layer per matrix kind).
Figures through lab_engines.figures (matplotlib's Agg canvas, safe in job threads)."""
from __future__ import annotations

import json
from pathlib import Path
from statistics import median

from lab_engines.figures import new_figure, save_png

__all__ = ["ROLE_TITLES", "markdown", "recommendations", "write_report"]

ROLE_TITLES = {"previous_token": "previous-token", "duplicate_token": "duplicate-token", "induction": "induction"}
ICL_MIN_DROP = 0.1  # nats: a smaller drop on the repeated half is no in-context copying
CHANCE_SLACK = 0.1  # accuracy within this of chance counts as "at chance"


def _head(top: dict) -> str:
    return f"L{top['layer']}H{top['head']}"


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n - 1] + "\u2026"


# --- recommendations ------------------------------------------------------------------------------
def recommendations(result: dict, spec) -> list[str]:
    """Plain-language findings, most important first within each section."""
    out: list[str] = []
    if "heads" in result:
        out += _head_recs(result["heads"], spec.role_threshold)
    if "spectra" in result:
        out += _spectra_recs(result["spectra"]["summary"])
    if "probes" in result:
        out += _probe_recs(result["probes"])
    if "memorization" in result:
        out += _memo_recs(result["memorization"])
    return out


def _head_recs(heads: dict, thr: float) -> list[str]:
    out = []
    for role, consequence in (("induction", "in-context copying will be weak"),
                              ("previous_token", "induction circuits have no previous-token input")):
        best = heads["top"][role][0]
        n = sum(v > thr for row in heads["scores"][role] for v in row)
        if n == 0:
            out.append(f"No {ROLE_TITLES[role]} head found (max {best['score']:.2f} at {_head(best)} < {thr}): "
                       f"{consequence}.")
        else:
            out.append(f"{n} {ROLE_TITLES[role]} head(s) above {thr} (best {_head(best)} = {best['score']:.2f}).")
    icl = heads["icl"]
    if icl["difference"] < ICL_MIN_DROP:
        out.append(f"No in-context-learning signal: loss on the repeated half ({icl['loss_repeated_half']:.2f}) is "
                   f"not below the first half ({icl['loss_first_half']:.2f}).")
    else:
        out.append(f"In-context copying works: loss drops from {icl['loss_first_half']:.2f} to "
                   f"{icl['loss_repeated_half']:.2f} nats/token on the repeated half.")
    return out


def _spectra_recs(summary: dict) -> list[str]:
    out = []
    for what, key in (("NaN", "n_with_nan"), ("Inf", "n_with_inf")):
        if summary[key]:
            names = [f["name"] for f in summary["flagged"] if what.lower() in f["flags"]]
            out.append(f"{summary[key]} matrices with {what} ({', '.join(names[:3])}): the weights are corrupt; "
                       f"reload the model or roll back to a snapshot.")
    outliers = [f["name"] for f in summary["flagged"] if any(x.endswith("_outlier") for x in f["flags"])]
    if outliers:
        out.append(f"{len(outliers)} matrices stand out from the others of their kind (robust |z| > "
                   f"{summary['outlier_z']:g} in sigma_max or condition number): {', '.join(outliers[:5])}"
                   f"{f' (+{len(outliers) - 5} more)' if len(outliers) > 5 else ''}. Common in first and last "
                   f"layers; after an edit or a quantization, compare with a snapshot taken before it.")
    if summary["singular"]:
        out.append(f"{len(summary['singular'])} matrices are numerically rank-deficient (condition number inf, e.g. "
                   f"{summary['singular'][0]}): usual for attention projections, a problem for embeddings and MLPs.")
    zero_frac = summary["near_zero_total"] / max(summary["numel_total"], 1)
    if zero_frac > 0.5:
        out.append(f"{zero_frac:.0%} of all weights are near zero (|w| < {summary['near_zero_eps']:g}).")
    if not out:
        out.append(f"Spectra look healthy: no NaN/Inf or outlier matrices among {summary['n_matrices']}.")
    return out


def _probe_recs(probes: dict) -> list[str]:
    out = []
    for name, res in probes.items():
        acc, chance = res["accuracy"], res["chance"]
        if acc <= chance + CHANCE_SLACK:
            out.append(f"Probe set {name} at or below chance: accuracy {acc:.0%} vs chance {chance:.0%} "
                       f"(mean margin {res['mean_margin']:+.2f}).")
        else:
            out.append(f"Probe set {name}: accuracy {acc:.0%} (chance {chance:.0%}, mean margin "
                       f"{res['mean_margin']:+.2f}).")
    return out


def _memo_recs(memo: dict) -> list[str]:
    out = []
    texts = memo["texts"]
    if len(texts) > 1:
        best = max(texts, key=lambda t: t["min_k_percent"])
        worst = min(texts, key=lambda t: t["min_k_percent"])
        out.append(f"Most likely seen in training: \"{_short(best['text'])}\" (Min-{best['k']:g}% "
                   f"{best['min_k_percent']:.2f} vs {worst['min_k_percent']:.2f}; zlib ratio "
                   f"{best['zlib_ratio']:.4f} vs {worst['zlib_ratio']:.4f}).")
    for can in memo["canaries"]:
        verdict = ("likely memorized: do not ship this model if the canary is a real secret"
                   if can["rank"] == 1 else "no evidence of memorization" if can["exposure"] < 0.5 *
                   can["max_exposure"] else "partly exposed: more controls or training data review advised")
        out.append(f"Canary \"{_short(can['canary'])}\": exposure {can['exposure']:.2f} of "
                   f"{can['max_exposure']:.2f} (rank {can['rank']} of {can['n_controls'] + 1}): {verdict}.")
    return out


# --- markdown -------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    model = result["model"]
    lines = [f"# Diagnostics: {model['name'] or model['architecture']} ({result['mode']})", "",
             (f"{model['n_layers']} layers, {model['n_heads']} heads ({model['n_kv_heads']} KV), d_model "
             f"{model['d_model']}, {model['n_params']:,} parameters. Seed {result['seed']}, "
             f"{result['elapsed_s']:.1f} s."), "", "## Recommendations", ""]
    lines += [f"- {r}" for r in result["recommendations"]]
    for key, fn in (("heads", _md_heads), ("spectra", _md_spectra), ("probes", _md_probes),
                    ("memorization", _md_memo)):
        if key in result:
            lines += ["", *fn(result[key])]
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(str(c) for c in row) + " |" for row in rows]]


def _md_heads(heads: dict) -> list[str]:
    icl = heads["icl"]
    lines = ["## Head roles", "", (f"{heads['n_sequences']} sequences of BOS + R + R, R = {heads['repeat_len']}; "
             "TransformerLens scores (fraction of non-BOS attention on the role's cells)."), ""]
    rows = [[ROLE_TITLES[role], ", ".join(f"{_head(t)} {t['score']:.3f}" for t in top)]
            for role, top in heads["top"].items()]
    lines += _table(["role", "top heads"], rows)
    lines += ["", (f"ICL: loss first half {icl['loss_first_half']:.3f}, repeated half "
              f"{icl['loss_repeated_half']:.3f}, difference {icl['difference']:+.3f} nats/token."), ""]
    lines += [f"![{ROLE_TITLES[r]}](heads_{r}.png)" for r in ROLE_TITLES]
    return lines


def _md_spectra(spectra: dict) -> list[str]:
    summary, kinds = spectra["summary"], _by_kind(spectra["matrices"])
    rows = []
    for kind, recs in kinds.items():
        ok = [r for r in recs if r["sigma_max"] is not None]
        conds = [r["condition_number"] for r in ok]
        rows.append([kind, len(recs), f"{median(r['sigma_max'] for r in ok):.3g}" if ok else "-",
                     f"{median(r['effective_rank'] for r in ok):.1f}" if ok else "-",
                     "inf" if any(c is None for c in conds) else f"{max(conds):.3g}" if conds else "-"])
    lines = ["## Spectra", "", (f"{summary['n_matrices']} matrices; {summary['n_with_nan']} with NaN, "
             f"{summary['n_with_inf']} with Inf; {summary['near_zero_total']:,} of {summary['numel_total']:,} "
             f"weights near zero (|w| < {summary['near_zero_eps']:g}); {len(summary['flagged'])} flagged."), ""]
    lines += _table(["kind", "count", "median sigma_max", "median eff. rank", "max condition"], rows)
    lines += [f"- flagged: {f['name']} ({', '.join(f['flags'])})" for f in summary["flagged"][:20]]
    return [*lines, "", "![spectra](spectra.png)"]


def _md_probes(probes: dict) -> list[str]:
    rows = [[name, r["n"], f"{r['accuracy']:.2f}", f"{r['chance']:.2f}", f"{r['mean_margin']:+.3f}"]
            for name, r in probes.items()]
    return ["## Capability probes", "", ("margin = log p(correct) - max log p(incorrect), summed over the "
            "continuation's tokens."), "", *_table(["set", "n", "accuracy", "chance", "mean margin"], rows)]


def _md_memo(memo: dict) -> list[str]:
    lines = ["## Memorization", ""]
    if memo["texts"]:
        lines += _table(["text", "tokens", "Min-K%", "log-ppl", "zlib ratio"],
                        [[_short(t["text"]).replace("|", "/"), t["n_tokens"], f"{t['min_k_percent']:.3f}",
                          f"{t['log_perplexity']:.3f}", f"{t['zlib_ratio']:.5f}"] for t in memo["texts"]])
    if memo["canaries"]:
        lines += ["", *_table(["canary", "rank", "controls", "exposure", "max"],
                              [[_short(c["canary"]).replace("|", "/"), c["rank"], c["n_controls"],
                                f"{c['exposure']:.2f}", f"{c['max_exposure']:.2f}"] for c in memo["canaries"]])]
    return lines


# --- files ----------------------------------------------------------------------------------------
def write_report(result: dict, out_dir: Path) -> list[str]:
    """Writes the PNGs, report.md and report.json (with the artifact list) and returns their names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = []
    if "heads" in result:
        for role, title in ROLE_TITLES.items():
            _heatmap(out_dir / f"heads_{role}.png", result["heads"]["scores"][role], f"{title} score (layer x head)")
            pngs.append(f"heads_{role}.png")
    if "spectra" in result and _plot_spectra(out_dir / "spectra.png", result["spectra"]["matrices"]):
        pngs.append("spectra.png")
    names = ["report.json", "report.md", *pngs]
    (out_dir / "report.md").write_text(markdown(result), encoding="utf-8")
    (out_dir / "report.json").write_text(json.dumps({**result, "artifacts": names}, indent=1, allow_nan=False),
                                         encoding="utf-8")
    return names


def _by_kind(records: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for rec in records:
        kinds.setdefault(rec["kind"], []).append(rec)
    return kinds


def _heatmap(path: Path, scores: list[list[float]], title: str) -> None:
    n_layers, n_heads = len(scores), len(scores[0])
    fig = new_figure(min(2.5 + 0.45 * n_heads, 14.0), min(1.5 + 0.22 * n_layers, 14.0))
    ax = fig.add_subplot()
    image = ax.imshow(scores, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    save_png(fig, path)


def _plot_spectra(path: Path, records: list[dict]) -> bool:
    """sigma_max and effective rank per layer, one line per matrix kind; False if no kind has layers."""
    kinds = {k: [r for r in v if r["layer"] is not None and r["sigma_max"] is not None]
             for k, v in _by_kind(records).items()}
    kinds = {k: sorted(v, key=lambda r: r["layer"]) for k, v in kinds.items() if v}
    if not kinds:
        return False
    fig = new_figure(11.0, 4.2)
    for i, (metric, label) in enumerate((("sigma_max", "sigma_max (log)"), ("effective_rank", "effective rank"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for kind, recs in kinds.items():
            ax.plot([r["layer"] for r in recs], [r[metric] for r in recs], marker=".", label=kind)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        if metric == "sigma_max":
            ax.set_yscale("log")
    ax.legend(fontsize=7)
    save_png(fig, path)
    return True
