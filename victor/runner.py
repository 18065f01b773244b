"""Victor, the example runner: a tiny byte-level transformer (pure torch) trained by train.py on
the public-domain text in data/. OmniLoader runs this file in its own worker process and calls:

    init(config)               once, with config.yaml's contents (+ "root": this folder)
    infer(messages, params)    per request: yields text pieces (a dict = usage); may `return` usage
    tokenize(text), detokenize(ids), diagnostics(), trace(text), causal_test(spec),
    train_target(examples, settings)                                  optional hooks (the Lab's)

See README.md for the whole contract. Needs torch (the `hf` extra)."""
from __future__ import annotations

import codecs
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
VOCAB = 256  # bytes: any text in, any text out, no tokenizer files to train

_state: dict[str, Any] = {}


# --- the model -------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Byte embeddings + learned positions, pre-norm blocks, tied output head."""

    def __init__(self, context: int = 64, d_model: int = 64, n_layers: int = 2, n_heads: int = 4) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(batch, time) byte ids -> (batch, time, 256) next-byte logits."""
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.tok.weight.T

    @torch.no_grad()
    def next_bytes(self, prompt: list[int], max_new: int, temperature: float = 0.0, top_k: int = 0,
                   seed: int | None = None) -> Iterator[int]:
        """Sampled (greedy at temperature 0) continuation, one byte at a time."""
        generator = torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))
        ids = list(prompt) or [ord("\n")]
        for _ in range(max_new):
            window = torch.tensor([ids[-self.context:]])
            logits = self(window)[0, -1]
            if temperature <= 0:
                token = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k > 0:
                    cutoff = torch.topk(logits, min(top_k, VOCAB)).values[-1]
                    logits = logits.masked_fill(logits < cutoff, float("-inf"))
                token = int(torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator))
            ids.append(token)
            yield token


def model_config(config: dict[str, Any]) -> dict[str, int]:
    dims = {"context": 64, "d_model": 64, "n_layers": 2, "n_heads": 4}
    dims.update({k: int(v) for k, v in (config.get("model") or {}).items() if k in dims})
    return dims


def weights_dir(config: dict[str, Any]) -> Path:
    folder = Path(config.get("weights", "weights"))
    return folder if folder.is_absolute() else Path(config.get("root", ROOT)) / folder


def load_model(folder: Path) -> tuple[TinyGPT, dict[str, Any]]:
    """The trained model in `folder` (model.safetensors + meta.json written by train.py)."""
    from safetensors.torch import load_file

    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"No trained weights in {folder}: run `python victor/train.py` first.")
    meta = json.loads((folder / META_FILE).read_text())
    model = TinyGPT(**meta["model"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.eval(), meta


# --- the contract ----------------------------------------------------------------------------

def init(config: dict[str, Any]) -> None:
    torch.set_num_threads(int(config.get("threads", 1)))
    model, meta = load_model(weights_dir(config))
    _state.update(model=model, meta=meta, config=config)


def prompt_text(messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
    """A completion continues its prompt; a chat continues its last user turn on a new line (a
    byte model trained on prose has no chat template: it keeps writing)."""
    if params.get("mode") == "completion":
        return params.get("prompt") or ""
    users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
    return (users[-1] if users else "") + "\n"


def infer(messages: list[dict[str, Any]], params: dict[str, Any]) -> Iterator[str]:
    model, config = _state["model"], _state["config"]
    prompt = list(prompt_text(messages, params).encode("utf-8"))
    limit = params.get("max_tokens") or int(config.get("max_new_tokens", 120))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    produced, finish, text = 0, "length", ""
    yield {"prompt_tokens": len(prompt)}  # a dict is usage, not text: counted even if the request stops early
    for token in model.next_bytes(prompt, limit, float(params.get("temperature") or 0.0),
                                  int(params.get("top_k") or 0), params.get("seed")):
        produced += 1
        piece = decoder.decode(bytes([token]))
        text += piece
        if piece:
            yield piece
        if text.endswith("\n\n"):  # a blank line ends the paragraph: the model's way to stop
            finish = "stop"
            break
    if tail := decoder.decode(b"", final=True):
        yield tail
    return {"prompt_tokens": len(prompt), "completion_tokens": produced, "finish_reason": finish}


def tokenize(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def detokenize(ids: list[int]) -> str:
    return bytes(i for i in ids if 0 <= i < VOCAB).decode("utf-8", errors="replace")


def diagnostics() -> dict[str, Any]:
    model, meta = _state["model"], _state["meta"]
    return {"parameters": sum(p.numel() for p in model.parameters()), **meta}


@torch.no_grad()
def trace(text: str) -> list[dict[str, Any]]:
    """Per byte of `text` (after the first): its probability under the model and its top guess."""
    model = _state["model"]
    ids = list(text.encode("utf-8"))[-model.context:]
    if len(ids) < 2:
        return []
    probs = F.softmax(model(torch.tensor([ids[:-1]]))[0], dim=-1)
    return [{"byte": chr(ids[i + 1]), "p": float(probs[i, ids[i + 1]]), "top": chr(int(probs[i].argmax()))}
            for i in range(len(ids) - 1)]


def _logprob(model: TinyGPT, prompt: list[int], target: list[int]) -> torch.Tensor:
    """Summed log-probability of `target`'s bytes after `prompt` (the last `context` bytes)."""
    ids = (prompt + target)[-model.context:]
    logits = model(torch.tensor([ids[:-1]]))[0]
    start = len(ids) - len(target) - 1
    return F.log_softmax(logits[start:], dim=-1).gather(1, torch.tensor(ids[start + 1:])[:, None]).sum()


@torch.no_grad()
def causal_test(spec: dict[str, Any]) -> dict[str, Any]:
    """Zero-ablate each block's MLP in turn: how much the log-probability of `answer` after `prompt`
    drops (a positive effect means the block helps predict it)."""
    model = _state["model"]
    prompt = list(str(spec.get("prompt") or spec.get("clean") or "").encode("utf-8"))
    answer = list(str(spec.get("answer") or " ").encode("utf-8"))
    base = float(_logprob(model, prompt, answer))
    effects = []
    for i, block in enumerate(model.blocks):
        handle = block.mlp.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
        try:
            effects.append({"layer": i, "site": "mlp", "effect": base - float(_logprob(model, prompt, answer))})
        finally:
            handle.remove()
    return {"intervention": "ablate", "answer_logprob": base, "layers": effects}


def train_target(examples: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """Teach the examples in place: a few Adam steps on the whole model raising each target's
    log-probability after its prompt. The change lives in this process until it restarts."""
    model = _state["model"]
    steps, lr = int(settings.get("steps", 20)), float(settings.get("lr", 3e-3))
    pairs = []
    for example in examples:
        messages = example.get("messages") or [{"role": "user", "content": example.get("prompt", "")}]
        prompt = prompt_text(messages, {"mode": "chat" if example.get("messages") else "completion",
                                        "prompt": example.get("prompt")})
        pairs.append((list(prompt.encode("utf-8")), list(str(example["target"]).encode("utf-8"))))
    with torch.no_grad():
        before = [float(_logprob(model, p, t)) for p, t in pairs]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = -sum(_logprob(model, p, t) for p, t in pairs) / len(pairs)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = [float(_logprob(model, p, t)) for p, t in pairs]
    return {"method": "finetune", "steps": steps, "lr": lr, "target_logprob_before": before,
            "target_logprob_after": after}
