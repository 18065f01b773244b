"""Prompts as the teach engines see them: raw text or chat messages, rendered to token ids the way the server
renders a request (chat: the tokenizer's chat template with its generation prompt), with or without a
prompt delta; answers as token ids; greedy decoding with hooks and a logit bias.

A prompt delta (the `prompt_delta` component) is rendered as the server applies it:
  chat messages  `text` appended to the first system message (after a newline), or a new system message
                 first when there is none (which replaces a template's default system prompt, as any
                 client-given system message does);
  raw text       `text` and a newline before the prompt.
apply_prompt_delta / prefix_prompt_delta (adapters/overlay.py) are those two rules, the server's too."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.overlay import apply_prompt_delta, prefix_prompt_delta
from lab_engines.context import JobContext
from lab_engines.model_access import ModelView

__all__ = ["Prompt", "answer_ids", "apply_prompt_delta", "greedy", "greedy_batch", "prefix_prompt_delta"]

@dataclass(frozen=True)
class Prompt:
    """Raw `text`, or chat `messages` (role/content dicts; the last one a user turn)."""

    text: str = ""
    messages: tuple[dict, ...] | None = None

    @classmethod
    def of(cls, prompt: str, messages, field: str = "prompt") -> Prompt:
        """From a spec's `prompt` / `messages` pair (msgspec Message structs or dicts); ValueError naming the field."""
        if messages is not None and prompt:
            raise ValueError(f"Give `{field}` or `messages`, not both.")
        if messages is None:
            if not prompt:
                raise ValueError(f"`{field}` is empty: give a prompt or chat `messages`.")
            return cls(text=prompt)
        msgs = tuple({"role": m["role"], "content": m["content"]} if isinstance(m, dict)
                     else {"role": m.role, "content": m.content} for m in messages)
        if not msgs or msgs[-1]["role"] != "user" or not msgs[-1]["content"]:
            raise ValueError("`messages` must end with a non-empty user message (the question the answer is for).")
        return cls(messages=msgs)

    @property
    def chat(self) -> bool:
        return self.messages is not None

    @property
    def question(self) -> str:
        """The text a paraphrase replaces: the raw prompt, or the last user message."""
        return self.messages[-1]["content"] if self.chat else self.text

    def replaced(self, question: str) -> Prompt:
        """The same prompt with another question (a paraphrase or a neighbour in the same form)."""
        if not self.chat:
            return Prompt(text=question)
        return Prompt(messages=(*self.messages[:-1], {"role": "user", "content": question}))

    def render(self, view: ModelView, delta: str = "") -> str:
        if not self.chat:
            return prefix_prompt_delta(self.text, delta)
        if not getattr(view.tokenizer, "chat_template", None):
            raise ValueError("`messages` needs a chat template, and this model's tokenizer has none: give `prompt`.")
        return view.tokenizer.apply_chat_template(apply_prompt_delta(list(self.messages), delta), tokenize=False,
                                                  add_generation_prompt=True)

    def ids(self, view: ModelView, delta: str = "") -> list[int]:
        ids = view.tokenizer(self.render(view, delta), add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("The prompt has no tokens.")
        return list(ids)


def answer_ids(view: ModelView, text: str, field: str) -> list[int]:
    """Token ids of an answer (a continuation: " Paris" and "Paris" are different tokens)."""
    if not text:
        raise ValueError(f"`{field}` is empty.")
    ids = view.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"`{field}` has no tokens.")
    return list(ids)


def _cache_kw(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy(view: ModelView, ids: list[int], max_tokens: int, bias: torch.Tensor | None = None,
           ctx: JobContext | None = None, stop_at_eos: bool = True) -> list[int]:
    """Greedy continuation of ids (KV cache), argmax of logits + bias; hooks active around the call apply."""
    out: list[int] = []
    if max_tokens <= 0:
        return out
    kw, cache = _cache_kw(view.model), None
    step = torch.tensor([ids], device=view.device)
    with torch.no_grad():
        for _ in range(max_tokens):
            if ctx is not None:
                ctx.check()
            result = view.model(input_ids=step, use_cache=True, **({kw: cache} if cache is not None else {}))
            cache = result.past_key_values
            logits = result.logits[0, -1].float()
            if bias is not None:
                logits = logits + bias.to(logits.device)
            token = int(logits.argmax())
            out.append(token)
            if stop_at_eos and token == view.tokenizer.eos_token_id:
                break
            step = torch.tensor([[token]], device=view.device)
    return out


def greedy_batch(view: ModelView, prompts: list[list[int]], max_tokens: int, bias: torch.Tensor | None = None,
                 ctx: JobContext | None = None) -> list[list[int]]:
    """Greedy continuations of several prompts at once (left-padded, one forward pass a token: on a CPU the
    per-pass overhead dominates a small model), each cut after its EOS. Rows of a batch may differ from
    `greedy` in the last bits of the logits: for samples to read, not for exact checks."""
    if max_tokens <= 0 or not prompts:
        return [[] for _ in prompts]
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    class Bias(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores + bias.to(scores.device, scores.dtype)

    class Cancel(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if ctx is not None:
                ctx.check()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    eos = view.tokenizer.eos_token_id
    pad = view.tokenizer.pad_token_id if view.tokenizer.pad_token_id is not None else (eos or 0)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    with torch.no_grad():
        out = view.model.generate(input_ids=ids.to(view.device), attention_mask=mask.to(view.device),
                                  max_new_tokens=max_tokens, min_new_tokens=0, do_sample=False, num_beams=1,
                                  temperature=None, top_p=None, top_k=None, pad_token_id=pad, eos_token_id=eos,
                                  logits_processor=LogitsProcessorList([Bias()] if bias is not None else []),
                                  stopping_criteria=StoppingCriteriaList([Cancel()]))
    rows = []
    for r in range(len(prompts)):
        new = out[r, width:].tolist()
        rows.append(new[:new.index(eos) + 1] if eos in new else new)
    return rows
