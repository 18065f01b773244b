"""The Lab's diagnostics engine (POST /lab/diagnostics/run): a health check of a model in four sections.

heads         previous-token, duplicate-token and induction scores of every (layer, head) on BOS + R + R
              random-token sequences, plus the in-context-learning signal (loss on the repeated half vs
              the first half). Scores follow TransformerLens `head_detector.py` (detect_head with
              error_measure="mul"): the fraction of a head's attention mass that falls on the cells of the
              role's detection pattern, summed over all query rows, averaged over sequences. Of its
              options we use exclude_bos=True (the BOS/key-0 column is zeroed before the division, so
              attention sinks do not dilute the score; a head whose whole mass is on BOS scores 0) and
              exclude_current_token=False (the diagonal stays in the denominator). Patterns, as in TL:
                previous-token  cell (i, i-1)
                duplicate-token cells (i, j), j < i, tokens[j] == tokens[i]
                induction       cells (i, j+1), j < i, tokens[j] == tokens[i]   (kept if j+1 <= i)
              With BOS excluded an exact previous-token head scores exactly 1, and a sequence without
              repeated tokens has empty duplicate/induction patterns, so it scores exactly 0.
spectra       per 2-D parameter (diagnostics_spectra): sigma_max, stable/effective rank, condition number,
              NaN/Inf/near-zero counts, robust outlier flags within each matrix kind.
probes        log-prob margin on the shipped probe sets (lab_engines/probes/*.jsonl) and user items.
memorization  Min-K% probability, zlib ratio and canary exposure (diagnostics_memorization).
The result is written to report.json, report.md and PNGs by diagnostics_report."""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import msgspec
import torch

from lab_engines.context import JobContext
from lab_engines.diagnostics_spec import (
    CHUNK,
    LIMITS,
    PRESETS,
    ROLES,
    SECTIONS,
    TOKEN_BUDGET,
    DiagnosticsSpec,
    ProbeItem,
)
from lab_engines.model_access import ModelView, eager_attention

__all__ = [
    "PRESETS",
    "PROBE_DIR",
    "SECTIONS",
    "DiagnosticsSpec",
    "ProbeItem",
    "detection_patterns",
    "head_roles",
    "json_safe",
    "load_probe_set",
    "probe_margins",
    "probe_set_names",
    "random_repeated_tokens",
    "role_scores",
    "run_diagnostics",
    "score_probes",
    "sequence_logprobs",
    "text_ids",
    "token_logprobs",
]

PROBE_DIR = Path(__file__).resolve().parent / "probes"
NOT_DEFAULT_SETS = {"regression"}
MIN_RANDOM_ID = 100  # low ids are special/control/byte tokens in most vocabularies


def run_diagnostics(view: ModelView, spec: DiagnosticsSpec, ctx: JobContext) -> dict:
    """Run the spec's sections on view, write report.json / report.md / PNGs, return the report."""
    from lab_engines.diagnostics_memorization import memorization
    from lab_engines.diagnostics_report import recommendations, write_report
    from lab_engines.diagnostics_spectra import spectra

    started = time.perf_counter()
    settings = _settings(view, spec)
    ctx.progress(0.0, "starting diagnostics")
    result: dict = {"model": _model_info(view), "mode": spec.mode, "seed": spec.seed, "settings": settings}
    steps = {"heads": (head_roles, 1.0), "spectra": (spectra, 1.0), "probes": (score_probes, 1.0),
             "memorization": (memorization, 0.8)}  # relative run times, roughly
    chosen = [name for name in SECTIONS if name in spec.sections]
    scale = 0.95 / max(sum(steps[name][1] for name in chosen), 1e-9)
    done = 0.0
    for name in chosen:
        fn, weight = steps[name]
        ctx.check()
        ctx.progress(done, name)
        result[name] = fn(view, spec, settings, _SubProgress(ctx, done, weight * scale, name))
        done += weight * scale
    ctx.check()
    ctx.progress(0.95, "writing the report")
    result["recommendations"] = recommendations(result, spec)
    result["elapsed_s"] = round(time.perf_counter() - started, 3)
    result = json_safe(result)
    result["artifacts"] = write_report(result, ctx.artifact_dir)
    ctx.progress(1.0, "done")
    return result


class _SubProgress:
    """A section's view of the job: its own 0..1 progress mapped into [start, start + weight]."""

    def __init__(self, ctx: JobContext, start: float, weight: float, name: str) -> None:
        self.ctx, self.start, self.weight, self.name = ctx, start, weight, name

    def progress(self, fraction: float, message: str = "") -> None:
        self.ctx.progress(self.start + self.weight * min(max(fraction, 0.0), 1.0), f"{self.name}: {message}")

    def check(self) -> None:
        self.ctx.check()


def _settings(view: ModelView, spec: DiagnosticsSpec) -> dict:
    """The spec's numbers with the mode's presets filled in, validated against the model."""
    preset = PRESETS[spec.mode]
    settings = {key: getattr(spec, key) if getattr(spec, key) is not None else value for key, value in preset.items()}
    for key, (low, high) in LIMITS.items():
        if not low <= settings[key] <= high:
            raise ValueError(f"{key} must be between {low} and {high}, got {settings[key]}.")
    n_ctx = _context_length(view)
    if n_ctx and 1 + 2 * settings["repeat_len"] > n_ctx:
        raise ValueError(f"repeat_len {settings['repeat_len']} is too long: 1 + 2 * repeat_len must fit the "
                         f"model's context of {n_ctx} tokens.")
    if not 0 < spec.min_k_percent <= 100:
        raise ValueError("min_k_percent must be in (0, 100].")
    unknown = sorted(set(spec.probe_sets or []) - set(probe_set_names()))
    if unknown:
        raise ValueError(f"Unknown probe set(s) {unknown}: one of {probe_set_names()}.")
    return settings


def _context_length(view: ModelView) -> int | None:
    return getattr(view.model.config, "max_position_embeddings", None)


def _check_fits(view: ModelView, seqs: list[list[int]]) -> None:
    n_ctx, longest = _context_length(view), max(map(len, seqs))
    if n_ctx and longest > n_ctx:
        raise ValueError(f"A text or probe is {longest} tokens long: more than the model's context of {n_ctx}.")


def _model_info(view: ModelView) -> dict:
    config = view.model.config
    return {"name": str(getattr(config, "_name_or_path", "") or ""), "architecture": type(view.model).__name__,
            "n_layers": view.n_layers, "n_heads": view.n_heads, "n_kv_heads": view.n_kv_heads,
            "d_model": view.d_model, "vocab_size": view.vocab_size,
            "n_params": int(sum(p.numel() for p in view.model.parameters()))}


def json_safe(obj):
    """Plain JSON values: non-finite floats become None (JSON has no inf/nan), tensors become lists."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


# --- heads: role scores on BOS + R + R ------------------------------------------------------------
def random_repeated_tokens(view: ModelView, n_seq: int, repeat_len: int, gen: torch.Generator) -> torch.Tensor:
    """[n_seq, 1 + 2R] ids: a BOS (the tokenizer's, else its EOS) then R random ids repeated once.
    Ids are drawn uniformly from [MIN_RANDOM_ID, vocab) minus the tokenizer's special ids."""
    tok = view.tokenizer
    bos = view.bos_id if view.bos_id is not None else tok.eos_token_id
    if bos is None:
        raise ValueError("The tokenizer has neither a BOS nor an EOS token to start the sequences with.")
    high = min(len(tok), view.vocab_size)
    allowed = torch.arange(MIN_RANDOM_ID if high > 2 * MIN_RANDOM_ID else 0, high)
    allowed = allowed[~torch.isin(allowed, torch.tensor(sorted(set(tok.all_special_ids) | {bos})))]
    rand = allowed[torch.randint(len(allowed), (n_seq, repeat_len), generator=gen)]
    return torch.cat([torch.full((n_seq, 1), bos), rand, rand], dim=1)


def detection_patterns(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """TransformerLens detection patterns [batch, seq(query), seq(key)] (0/1 floats) for tokens [batch, seq]."""
    seq = tokens.shape[-1]
    prev = torch.diag(torch.ones(seq - 1), -1).expand(tokens.shape[0], seq, seq)
    earlier = torch.ones(seq, seq, dtype=torch.bool).tril(-1)
    dup = (tokens[:, :, None] == tokens[:, None, :]) & earlier
    ind = torch.zeros_like(dup)
    ind[:, :, 1:] = dup[:, :, :-1]  # shift right: attend to the token after the earlier copy
    ind &= torch.ones(seq, seq, dtype=torch.bool).tril()
    return {"previous_token": prev.clone(), "duplicate_token": dup.float(), "induction": ind.float()}


def role_scores(patterns: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sequence role scores [layers, batch, heads] from attention patterns [layers, batch, heads, q, k]:
    fraction of the non-BOS attention mass on the role's cells (0 where a head's whole mass is on BOS)."""
    attn = patterns.float().clone()
    attn[..., 0] = 0.0  # exclude_bos: the BOS column is an attention sink, not a role
    mass = attn.sum(dim=(-1, -2))
    out = {}
    for role, det in detection_patterns(tokens).items():
        hit = torch.einsum("lbhqk,bqk->lbh", attn, det.to(attn.device))
        out[role] = torch.where(mass > 0, hit / mass.clamp_min(1e-30), torch.zeros_like(mass))
    out["bos_mass"] = patterns[..., 0].float().mean(-1)  # attention-sink strength, for context
    return out


def _attend(view: ModelView, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One eager forward pass: attention patterns [layers, batch, heads, q, k] and logits [batch, seq, vocab]."""
    with torch.no_grad(), eager_attention(view):
        out = view.model(input_ids=ids.to(view.device), use_cache=False, output_attentions=True)
    return torch.stack([a.float().cpu() for a in out.attentions]), out.logits.float().cpu()


def head_roles(view: ModelView, spec: DiagnosticsSpec, settings: dict, ctx) -> dict:
    """Mean role scores [layer][head] over the BOS+R+R sequences, top heads, and the ICL losses."""
    n_seq, r = settings["n_sequences"], settings["repeat_len"]
    ids = random_repeated_tokens(view, n_seq, r, torch.Generator().manual_seed(spec.seed))
    sums: dict[str, torch.Tensor] = {}
    first, repeated = [], []
    for start in range(0, n_seq, CHUNK):
        ctx.check()
        chunk = ids[start:start + CHUNK]
        patterns, logits = _attend(view, chunk)
        for role, score in role_scores(patterns, chunk).items():
            sums[role] = sums.get(role, 0) + score.sum(dim=1)
        nll = -token_logprobs(logits[:, :-1], chunk[:, 1:])
        first.append(nll[:, :r])
        repeated.append(nll[:, r:])
        ctx.progress((start + len(chunk)) / n_seq, f"{start + len(chunk)}/{n_seq} sequences")
    scores = {role: (total / n_seq) for role, total in sums.items()}
    loss_first, loss_rep = torch.cat(first).mean().item(), torch.cat(repeated).mean().item()
    return {"scores": {role: s.tolist() for role, s in scores.items()},
            "top": {role: _top_heads(scores[role]) for role in ROLES},
            "icl": {"loss_first_half": loss_first, "loss_repeated_half": loss_rep,
                    "difference": loss_first - loss_rep},
            "n_sequences": n_seq, "repeat_len": r, "sequence_length": ids.shape[1]}


def _top_heads(scores: torch.Tensor, k: int = 5) -> list[dict]:
    values, flat = scores.flatten().topk(min(k, scores.numel()))
    n_heads = scores.shape[1]
    return [{"layer": int(i) // n_heads, "head": int(i) % n_heads, "score": float(v)}
            for v, i in zip(values, flat, strict=True)]


# --- scoring text ---------------------------------------------------------------------------------
def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] without materializing the [.., vocab] log-softmax."""
    logits = logits.float()
    return logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)


def _batches(lengths: list[int], budget: int = TOKEN_BUDGET) -> list[list[int]]:
    """Indices sorted by length, cut into batches of at most `budget` padded tokens (fewer, bigger forward
    passes: each pass has a fixed cost that dominates on a busy CPU)."""
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if out and (len(out[-1]) + 1) * lengths[i] <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _padded(rows: list[list[int]]) -> torch.Tensor:
    ids = torch.zeros(len(rows), max(1, max(len(r) for r in rows)), dtype=torch.long)
    for n, row in enumerate(rows):
        ids[n, :len(row)] = torch.tensor(row, dtype=torch.long)
    return ids


def sequence_logprobs(view: ModelView, seqs: list[list[int]], ctx=None) -> list[torch.Tensor]:
    """log p(t_i | t_<i) for i >= 1 of each id list (length len - 1). Batched with right padding: a
    causal model's logits at a position never see the padding after it, so no attention mask is needed."""
    _check_fits(view, seqs)
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    for rows in _batches([len(s) for s in seqs]):
        if ctx is not None:
            ctx.check()
        ids = _padded([seqs[i] for i in rows])
        with torch.no_grad():
            logp = token_logprobs(view.logits(ids.to(view.device))[:, :-1], ids[:, 1:].to(view.device)).cpu()
        for n, i in enumerate(rows):
            out[i] = logp[n, :len(seqs[i]) - 1]
    return out


def continuation_logprobs(view: ModelView, prompts: list[list[int]], conts: list[tuple[int, list[int]]],
                          ctx=None) -> list[torch.Tensor]:
    """log p(cont_j | prompt, cont_<j) for each (prompt index, continuation ids), every prompt run once: the
    prompts go in right-padded, masked batches; the last prompt position scores each continuation's first
    token, and continuations of 2+ tokens feed all but their last token on a copy of the prompts' KV cache,
    at their true positions (position_ids), the prompts' padding masked out."""
    _check_fits(view, [prompts[p] + cont for p, cont in conts])
    out: list[torch.Tensor] = [torch.empty(0)] * len(conts)
    for rows in _batches([len(p) for p in prompts]):
        if ctx is not None:
            ctx.check()
        slot = {p: n for n, p in enumerate(rows)}
        mine = [k for k, (p, _) in enumerate(conts) if p in slot]
        ids = _padded([prompts[p] for p in rows])
        mask = (torch.arange(ids.shape[1]) < torch.tensor([len(prompts[p]) for p in rows])[:, None]).long()
        with torch.no_grad():
            first = view.model(input_ids=ids.to(view.device), attention_mask=mask.to(view.device), use_cache=True)
        last = first.logits[[slot[conts[k][0]] for k in mine], [len(prompts[conts[k][0]]) - 1 for k in mine]]
        heads = token_logprobs(last.cpu(), torch.tensor([conts[k][1][0] for k in mine]))
        for n, k in enumerate(mine):
            out[k] = heads[n:n + 1]
        multi = [k for k in mine if len(conts[k][1]) > 1]
        for group in _batches([len(conts[k][1]) - 1 for k in multi]):
            if ctx is not None:
                ctx.check()
            ks = [multi[g] for g in group]
            tails = _continue(view, first.past_key_values, mask, [slot[conts[k][0]] for k in ks],
                              [len(prompts[conts[k][0]]) for k in ks], [conts[k][1] for k in ks])
            for k, tail in zip(ks, tails, strict=True):
                out[k] = torch.cat([out[k], tail])
    return out


def _continue(view: ModelView, cache, mask: torch.Tensor, rows: list[int], starts: list[int],
              conts: list[list[int]]) -> list[torch.Tensor]:
    """Token log-probs of conts[i][1:] given prompt row rows[i] (in cache) and conts[i][:-1]."""
    cache = copy.deepcopy(cache)  # batch_select_indices works in place; other groups need the original
    select = torch.tensor(rows)
    cache.batch_select_indices(select.to(view.device))
    feed, target = _padded([c[:-1] for c in conts]), _padded([c[1:] for c in conts])
    feed_mask = (torch.arange(feed.shape[1]) < torch.tensor([len(c) - 1 for c in conts])[:, None]).long()
    with torch.no_grad():
        logits = view.model(input_ids=feed.to(view.device), past_key_values=cache, use_cache=True,
                            attention_mask=torch.cat([mask[select], feed_mask], 1).to(view.device),
                            position_ids=(torch.tensor(starts)[:, None] + torch.arange(feed.shape[1])).to(view.device),
                            ).logits.cpu()
    lp = token_logprobs(logits, target)
    return [lp[n, :len(c) - 1] for n, c in enumerate(conts)]


def text_ids(view: ModelView, text: str, what: str) -> list[int]:
    ids = view.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"The {what} {text!r} has no tokens.")
    return list(ids)


# --- probes ---------------------------------------------------------------------------------------
def probe_set_names() -> list[str]:
    """The default probe sets: every shipped file but the teach engines' regression set (lab_engines.teach_eval),
    which is in the same format and can still be named in `probe_sets`."""
    return sorted(p.stem for p in PROBE_DIR.glob("*.jsonl") if p.stem not in NOT_DEFAULT_SETS)


def load_probe_set(name: str) -> list[ProbeItem]:
    lines = (PROBE_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [msgspec.json.decode(line, type=ProbeItem) for line in lines if line.strip()]


def score_probes(view: ModelView, spec: DiagnosticsSpec, settings: dict, ctx) -> dict:
    """Per probe set: accuracy (margin > 0), mean margin and chance level, with each item's scores."""
    sets = {name: load_probe_set(name) for name in (spec.probe_sets or probe_set_names())}
    if spec.probes:
        sets["user"] = list(spec.probes)
    ctx.progress(0.0, f"{sum(map(len, sets.values()))} items in {len(sets)} sets")
    scored = iter(probe_margins(view, [item for items in sets.values() for item in items], ctx))  # one batch
    out = {}
    for name, items in sets.items():
        mine = [next(scored) for _ in items]
        margins = [s["margin"] for s in mine]
        out[name] = {"n": len(items), "accuracy": sum(m > 0 for m in margins) / len(items),
                     "mean_margin": sum(margins) / len(items),
                     "chance": sum(1 / (1 + len(i.incorrect)) for i in items) / len(items), "items": mine}
    return out


def probe_margins(view: ModelView, items: list[ProbeItem], ctx=None) -> list[dict]:
    """margin = log p(correct | prompt) - max_incorrect log p(incorrect | prompt), each the sum of the
    continuation's token log-probs; prompt and continuation are tokenized separately (as concatenated ids)."""
    prompts, conts = [], []
    for n, item in enumerate(items):
        if not item.incorrect:
            raise ValueError(f"Probe {item.prompt!r} has no incorrect continuation to compare against.")
        prompts.append(text_ids(view, item.prompt, "probe prompt"))
        conts += [(n, text_ids(view, c, "probe continuation")) for c in (item.correct, *item.incorrect)]
    sums = [float(lp.sum()) for lp in continuation_logprobs(view, prompts, conts, ctx)]
    owners = [n for n, _ in conts]
    out = []
    for n, item in enumerate(items):
        mine = [s for s, o in zip(sums, owners, strict=True) if o == n]
        out.append({"prompt": item.prompt, "correct": item.correct, "logprob_correct": mine[0],
                    "logprob_best_incorrect": max(mine[1:]), "margin": mine[0] - max(mine[1:])})
    return out
