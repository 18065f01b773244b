"""How much memory a Lab job needs beyond its model's weights, estimated before it runs from its spec and
the model's shape (ModelDims: read from config.json or the GGUF header, no weights loaded). The server
refuses a job whose estimate does not fit the free memory budget, naming the spec field that weighs most
(responsible_field). Pure arithmetic: no torch, no model.

Token counts are not known before the tokenizer runs: a text counts as half its UTF-8 bytes + 2 tokens, at
most the model's context (English runs ~4 bytes a token on SmolLM2's BPE; text built to tokenize byte by
byte is underestimated up to 2x, and still bounded by the spec's character limits and the context).

What is counted, in float32 (4 bytes) unless said otherwise:
  forward pass     rows x tokens x (A_D d_model + A_F d_ff + A_S heads x tokens): the largest layer's
                   temporaries (norms, projections, hook copies, MLP, attention scores), plus the logits
                   kept (rows x positions x vocab, A_V copies: softmax and log-softmax make more)
  backward (trace) every layer's activations kept for autograd, G_D / G_F / G_S per token and layer
  causal rows      every patched / noised / ablated row is queued as a Python object with its edits (ROW
                   bytes + EDIT per edited site + CLOSURE for an edit made for that row alone); tracing also
                   draws samples x subject x d_model noise; ablation keeps the logits at every position, and
                   many such passes fragment the allocator (FRAGMENTS)
  attention        diagnostics heads and attention rollout keep every layer's [heads, seq, seq] pattern
  results          every number a job returns becomes a Python float, JSON text and a SQLite copy (RESULT)
The constants come from SmolLM2-135M on CPU (peak RSS over the loaded model, one job per process; Python
objects with tracemalloc), rounded up; with real token counts the estimate came within 0.8-2x of the
measured peak (patching 30 vs 37 MiB, an IG pass of 24 points x 10 tokens 397 vs 393 MiB, grad_act on 181
tokens 346 vs 262, attention rollout 150 vs 124, ablation 267 vs 278, diagnostics heads with repeat_len 200
3013 vs 3080, memorization 431 vs 493): an estimate, not a promise."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from lab_engines.causal_spec import LOGIT_BUDGET
from lab_engines.diagnostics_spec import CHUNK, PRESETS, TOKEN_BUDGET
from lab_engines.teach_spec import AUTO_ORDER, LIVE_AUTO_ORDER
from lab_engines.trace_spec import BATCH_TOKENS, MAX_TARGET_TOKENS

__all__ = ["CANDIDATES", "ModelDims", "responsible_field", "tokens", "working_memory"]

F32 = 4
A_D, A_F, A_S, A_V = 8, 3, 2, 2  # no-grad forward: one layer's temporaries at a time
G_D, G_F, G_S = 9, 3, 2  # with grad: kept for backward, per layer
ROW, EDIT, CLOSURE = 232, 56, 560  # bytes of a queued causal row, of each edit it carries, of an edit made for it
FRAGMENTS = 192 << 20  # at most this much allocator slack when many passes keep logits at every position
RESULT = 100  # bytes per number of a result
BUILTIN_TEXT_BYTES = 230  # the longest built-in memorization text (diagnostics_memorization.BUILTIN_TEXTS)
SHIPPED_PROBE_ITEMS, SHIPPED_PROBE_BYTES = 200, 200  # lab_engines/probes: item count and longest item, rounded up
BASE = 16 << 20  # tokenizer runs, small tensors, the job's bookkeeping
BYTES_PER_TOKEN = 2
REF_TEXT = 64  # characters: what a "typical" text is cut to when looking for the field that weighs most


@dataclass(frozen=True)
class ModelDims:
    """The shape of a decoder: what the estimate needs."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab: int
    n_ctx: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelDims:
        """From a transformers config.json (the text model's part of a multimodal one) or the config-like dict
        adapters.hf_files.gguf_shape builds from a GGUF header; ValueError when the shape is not there."""
        cfg = {**config, **config["text_config"]} if isinstance(config.get("text_config"), dict) else config

        def first(*keys: str, default: int = 0) -> int:
            for key in keys:
                value = cfg.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
            return default

        layers, d = first("num_hidden_layers", "n_layer", "num_layers"), first("hidden_size", "n_embd", "d_model")
        heads, vocab = first("num_attention_heads", "n_head"), first("vocab_size")
        if not (layers and d and heads and vocab):
            raise ValueError("the model's config has no layer count, hidden size, head count or vocabulary size")
        return cls(n_layers=layers, d_model=d, n_heads=heads, n_kv_heads=first("num_key_value_heads", default=heads),
                   head_dim=first("head_dim", default=d // heads), d_ff=first("intermediate_size", "n_inner",
                                                                             "ffn_dim", default=4 * d),
                   vocab=vocab, n_ctx=first("max_position_embeddings", "n_positions", "n_ctx", default=4096))


def tokens(text: str | None, dims: ModelDims) -> int:
    """text's token count as estimated here (see the module docstring); 0 for None."""
    return 0 if text is None else min(-(-len(text.encode("utf-8")) // BYTES_PER_TOKEN) + 2, dims.n_ctx)


def _forward(dims: ModelDims, rows: int, seq: int, kept: int, logit_copies: int = A_V) -> int:
    per_token = A_D * dims.d_model + A_F * dims.d_ff + A_S * dims.n_heads * seq
    return F32 * (rows * seq * per_token + logit_copies * rows * kept * dims.vocab)


def _backward(dims: ModelDims, rows: int, seq: int, kept: int) -> int:
    per_token = G_D * dims.d_model + G_F * dims.d_ff + G_S * dims.n_heads * seq
    sites = 4 * dims.n_layers * rows * seq * dims.d_model  # resid and heads activations and their gradients
    return F32 * (dims.n_layers * rows * seq * per_token + sites + 3 * rows * kept * dims.vocab) \
        + _forward(dims, rows, seq, kept)


def _kv(dims: ModelDims, rows: int, seq: int) -> int:
    return F32 * 2 * dims.n_layers * rows * seq * dims.n_kv_heads * dims.head_dim


# --- causal_test -------------------------------------------------------------------------------------------------
def _causal(spec, dims: ModelDims) -> int:
    n = min(len(set(spec.layers)), dims.n_layers) if spec.layers else dims.n_layers
    if spec.intervention == "steer":
        contrast = max((tokens(t, dims) for t in [*spec.positive, *spec.negative]), default=0)
        generated = min(tokens(spec.prompt or spec.clean, dims) + spec.max_tokens, dims.n_ctx)
        return _forward(dims, 1, max(contrast, generated), 1) + _kv(dims, 1, generated)
    seq = tokens(spec.clean, dims) + int(spec.bos)
    if spec.intervention == "ablate":
        sites, modes = set(spec.sites or ["heads", "mlp"]), max(len(set(spec.ablation)), 1)
        cells = modes * sum(n * (dims.n_heads if site == "heads" else 1) for site in sites)
        rows = cells + 1
        size = max(1, min(spec.batch_size, rows, LOGIT_BUDGET // max(seq * dims.vocab, 1)))
        reference = max((tokens(t, dims) for t in spec.reference or []), default=0)
        slack = min(6 * F32 * size * seq * dims.vocab, FRAGMENTS)
        return (_forward(dims, size, seq, seq, logit_copies=3) + slack + _forward(dims, 1, reference, 1)
                + rows * (ROW + EDIT + CLOSURE) + 2 * len(sites) * n * seq * dims.d_model * F32 + 4 * cells * RESULT)
    if spec.noise is not None:  # causal tracing
        sites = set(spec.sites or ["resid", "mlp", "attn"]) - {"heads"}
        cells = len(sites) * n * seq
        restored = max((1 if site == "resid" else min(spec.window, dims.n_layers)) for site in sites) if sites else 0
        rows = spec.noise.samples * (cells + 2)
        noise = spec.noise.samples * seq * dims.d_model * F32
        clean = (len(sites) * dims.n_layers + 1) * seq * dims.d_model * F32
        return (_forward(dims, min(spec.batch_size, rows), seq, 1) + rows * (ROW + EDIT * (1 + restored))
                + noise + clean + 2 * cells * RESULT)
    seq = max(seq, tokens(spec.corrupt, dims) + int(spec.bos))  # activation patching
    sites = set(spec.sites or ["resid", "heads"])
    cells = ((n + 1) * (seq + 1) if "resid" in sites else 0) + len(sites & {"attn", "mlp"}) * n * seq \
        + (n * dims.n_heads if "heads" in sites else 0)
    rows = cells + 2
    captured = 2 * (len(sites) * n + 1) * seq * dims.d_model * F32  # clean and corrupt activations
    return (_forward(dims, min(spec.batch_size, rows), seq, 1) + rows * (ROW + EDIT + CLOSURE) + captured
            + 2 * cells * RESULT)


# --- trace -------------------------------------------------------------------------------------------------------
def _trace(spec, dims: ModelDims) -> int:
    target = min(tokens(spec.target, dims), MAX_TARGET_TOKENS) if spec.target is not None else spec.max_target_tokens
    prefix = 1 if spec.prefix is None else tokens(spec.prefix, dims)
    context = min(prefix + tokens(spec.prompt, dims), dims.n_ctx)
    seq = min(context + target - 1, dims.n_ctx)
    greedy = 0 if spec.target is not None else _forward(dims, 1, seq, 1)
    numbers = dims.n_layers * (seq + dims.n_heads) + seq
    if spec.method == "attention_rollout":  # every layer's pattern, in float32 and float64, and the rollout
        patterns = dims.n_layers * context * context * (12 * dims.n_heads + 16)
        numbers += context * context + dims.n_layers * dims.n_heads * context
        return max(greedy, _forward(dims, 1, context, 0)) + patterns + numbers * RESULT
    if spec.method == "grad_act":
        return max(greedy, _backward(dims, 1, seq, target)) + numbers * RESULT
    # integrated gradients: at most batch_size path points a pass (fewer on long prompts, as trace._run_method)
    points = min(spec.batch_size, max(1, BATCH_TOKENS // seq), spec.n_steps)
    panels = spec.n_steps // 3 + 8  # each keeps float64 sums per site: [seq] per layer, [seq, heads] per head
    sums = panels * 8 * seq * (1 + dims.n_layers * (1 + dims.n_heads))
    ends = (points // 3 + 2) * 2 * dims.n_layers * seq * dims.d_model * F32  # panel ends captured at every site
    return max(greedy, _backward(dims, points, seq, target) + sums + ends) + numbers * RESULT


# --- diagnostics -------------------------------------------------------------------------------------------------
def _scoring(dims: ModelDims, longest: int, count: int) -> int:
    """Scoring `count` texts in batches of at most TOKEN_BUDGET padded tokens (a longer text alone), with the
    logits at every position and the log-softmax's temporaries, and a KV cache (probes copy it)."""
    longest = max(longest, 1)
    flat = max(longest, min(TOKEN_BUDGET, count * longest))
    return F32 * 3 * flat * dims.vocab + _forward(dims, flat // longest, longest, 0) + 2 * _kv(dims, 1, flat)


def _diagnostics(spec, dims: ModelDims) -> int:
    preset = PRESETS.get(spec.mode, PRESETS["quick"])
    n_seq = spec.n_sequences or preset["n_sequences"]
    repeat = spec.repeat_len or preset["repeat_len"]
    n_controls = spec.n_controls or preset["n_controls"]
    sections = set(spec.sections)
    parts = [0]
    if "heads" in sections:
        seq, rows = min(1 + 2 * repeat, dims.n_ctx), min(CHUNK, n_seq)
        patterns = F32 * rows * seq * seq * (3 * dims.n_layers * dims.n_heads + 3)  # kept, stacked, scored
        parts.append(patterns + _forward(dims, rows, seq, seq, logit_copies=3))
    if "spectra" in sections:
        k = max(dims.d_model, dims.d_ff)
        parts.append(8 * (8192 * k + k * k))
    if "probes" in sections:
        user = max((tokens(p.prompt, dims) + max(tokens(c, dims) for c in [p.correct, *p.incorrect])
                    for p in spec.probes), default=0)
        shipped = tokens("x" * SHIPPED_PROBE_BYTES, dims)
        items = len(spec.probes) + (SHIPPED_PROBE_ITEMS if spec.probe_sets is None else 0)
        parts.append(_scoring(dims, max(user, shipped), items) + items * 8 * 1024)
    if "memorization" in sections:
        texts = spec.texts if spec.texts is not None else ["x" * BUILTIN_TEXT_BYTES] * 2
        canaries = [tokens(c, dims) for c in (spec.canaries if spec.canaries is not None else ["x" * 24])]  # built-in
        longest_canary = max(canaries, default=0)
        controls = (n_controls + 1) * longest_canary * 64  # control texts, their ids and scores
        parts.append(max(_scoring(dims, max((tokens(t, dims) for t in texts), default=0), len(texts)),
                         _scoring(dims, longest_canary, n_controls + 1) + controls))
    numbers = 4 * dims.n_layers * dims.n_heads + len(spec.probes) * 8
    return max(parts) + numbers * RESULT


def _snapshot(_spec, dims: ModelDims) -> int:
    """Hashing is in place; storing clones one tensor at a time (the embedding is the largest)."""
    return 2 * F32 * dims.vocab * dims.d_model


# --- train_target, train_live -----------------------------------------------------------------------------------
TEACH_EVAL_ROWS, TEACH_MICRO, TEACH_TRACE_BATCH = 16, 8, 32  # teach_eval.ROWS_PER_PASS, teach_lora.MICRO_BATCH, rome's
TEACH_PREFIXES, PREFIX_TOKENS = 4, 6  # rome's KEY_PREFIXES (the longest 6 tokens): raw prompts are also trained (lora)
# and keyed (rome) behind each. Measured peaks over the loaded default model, "The capital of France is" -> " Rome"
# with 2 paraphrases and 2 neighbours: token_bias 3 MiB (estimate 62), rome 88 (296), lora 96 (254), dpo 25 (116),
# auto 89 (296): the estimate counts ~3x the real tokens of such short English prompts
CHAT_OVERHEAD = 40  # tokens a chat template adds around the messages (SmolLM2: its default system prompt, roles)
SHIPPED_REGRESSION = 48  # items in lab_engines/probes/regression.jsonl


def _prompt_tokens(prompt: str, messages, dims: ModelDims) -> int:
    if messages:
        return min(sum(tokens(m.content, dims) + 4 for m in messages) + CHAT_OVERHEAD, dims.n_ctx)
    return tokens(prompt, dims)


def _lora_bytes(spec, dims: ModelDims) -> int:
    """The adapter, its gradient and Adam's two moments (a module's in + out at most d_model + d_ff)."""
    layers = min(len(set(spec.layers)), dims.n_layers) if spec.layers else dims.n_layers
    return 4 * F32 * spec.rank * (dims.d_model + dims.d_ff) * len(set(spec.modules)) * layers


def _teach(spec, dims: ModelDims) -> int:
    live = hasattr(spec, "corrections")
    if live:
        items = [(_prompt_tokens(c.prompt, c.messages, dims), max(tokens(c.good, dims), tokens(c.bad, dims)))
                 for c in spec.corrections] or [(1, 1)]
        paraphrases: list[str] = []
        methods = (spec.auto_methods or LIVE_AUTO_ORDER) if spec.method == "auto" else [spec.method]
    else:
        items = [(_prompt_tokens(spec.prompt, spec.messages, dims), max(tokens(spec.target, dims),
                                                                        tokens(spec.rejected, dims)))]
        paraphrases = spec.paraphrases
        methods = (spec.auto_methods or AUTO_ORDER) if spec.method == "auto" else [spec.method]
    answer = max(a for _p, a in items)
    context = max([p for p, _a in items] + [tokens(t, dims) + CHAT_OVERHEAD * bool(not live and spec.messages)
                                             for t in paraphrases])
    refs = [*spec.neighbors, *spec.regression_extra]
    context = max([context] + [tokens(r.prompt, dims) + tokens(r.answer, dims) for r in refs])
    seq = min(context + answer + PREFIX_TOKENS, dims.n_ctx)
    cases = len(items)
    rows = 2 * cases + 2 * len(paraphrases) + 2 * len(spec.neighbors) + len(spec.regression_extra) \
        + SHIPPED_REGRESSION * (spec.regression_set == "shipped")
    generated = 3 + min(cases, 8)
    gen_seq = min(seq + max(spec.fluency_tokens, answer + 4), dims.n_ctx)
    evaluation = max(_forward(dims, min(TEACH_EVAL_ROWS, rows), seq, answer),
                     _forward(dims, generated, gen_seq, 1) + _kv(dims, generated, gen_seq))
    train_rows = cases * (1 + TEACH_PREFIXES)
    parts = [0]
    for method in set(methods):
        if method in ("token_bias", "prompt", "steer"):
            parts.append(_forward(dims, 1, seq, answer) + cases * answer * dims.vocab * F32)
        elif method == "rome":
            trace = _forward(dims, TEACH_TRACE_BATCH, seq, 1) + 2 * dims.n_layers * seq * dims.d_model * F32
            parts.append(max(trace, _backward(dims, TEACH_PREFIXES + 2, seq, answer)) + dims.d_model * dims.d_ff * F32)
        elif method == "lora":
            parts.append(_backward(dims, min(TEACH_MICRO, train_rows), seq, answer) + _lora_bytes(spec, dims))
        elif method == "dpo":
            parts.append(_backward(dims, min(TEACH_MICRO, 2 * cases), seq, answer) + _lora_bytes(spec, dims)
                         + cases * 2 * F32)
    numbers = 12 * (rows + cases) + spec.fluency_tokens * 3
    return max(evaluation, *parts) + numbers * RESULT


_ESTIMATES = {"causal_test": _causal, "trace": _trace, "diagnostics": _diagnostics, "snapshot": _snapshot,
              "rollback": _snapshot, "train_target": _teach, "train_live": _teach}


def working_memory(kind: str, spec: msgspec.Struct, dims: ModelDims) -> int:
    """Bytes a job of `kind` with `spec` (its decoded spec Struct) needs beyond the model's own weights."""
    return BASE + _ESTIMATES[kind](spec, dims)


# The fields a request can turn up, per kind; "a.b" is field b of the nested struct a.
CANDIDATES = {
    "causal_test": ("batch_size", "noise.samples", "clean", "corrupt", "layers", "sites", "window", "ablation",
                    "reference", "prompt", "positive", "negative", "max_tokens"),
    "trace": ("prompt", "target", "prefix", "max_target_tokens", "method", "n_steps", "batch_size"),
    "diagnostics": ("mode", "sections", "n_sequences", "repeat_len", "n_controls", "probes", "texts", "canaries"),
    "snapshot": (),
    "rollback": (),
    "train_target": ("prompt", "messages", "target", "rejected", "paraphrases", "neighbors", "regression_extra",
                     "method", "auto_methods", "rank", "modules", "layers", "fluency_tokens", "regression_set"),
    "train_live": ("corrections", "neighbors", "regression_extra", "method", "auto_methods", "rank", "modules",
                   "layers", "fluency_tokens", "regression_set"),
}


TEXT_FIELDS = {"clean", "corrupt", "prompt", "target", "prefix"}  # cut to REF_TEXT; other fields go to their default


def _default(struct: msgspec.Struct, name: str) -> Any:
    field = next(f for f in msgspec.structs.fields(struct) if f.name == name)
    return field.default_factory() if field.default is msgspec.NODEFAULT else field.default


def _typical(struct: msgspec.Struct, path: str) -> msgspec.Struct | None:
    """struct with the field at path set to a typical value: a text cut to REF_TEXT characters, anything else
    its default; None when the field is absent (a nested struct left out)."""
    name, _, rest = path.partition(".")
    value = getattr(struct, name)
    if rest:
        inner = None if value is None else _typical(value, rest)
        return None if inner is None else msgspec.structs.replace(struct, **{name: inner})
    if name in TEXT_FIELDS:
        return msgspec.structs.replace(struct, **{name: value if value is None else value[:REF_TEXT]})
    return msgspec.structs.replace(struct, **{name: _default(struct, name)})


def responsible_field(kind: str, spec: msgspec.Struct, dims: ModelDims) -> str:
    """The field whose typical value would shrink the estimate most; "model" when none would (the model's
    own shape is what does not fit)."""
    total, best, saved = working_memory(kind, spec, dims), "model", 0
    for path in CANDIDATES[kind]:
        typical = _typical(spec, path)
        if typical is not None and total - working_memory(kind, typical, dims) > saved:
            best, saved = path, total - working_memory(kind, typical, dims)
    return best
