"""The llama.cpp prompt cache, reused only where reuse cannot change a result.

A token's logits (and the KV a prompt leaves behind) depend slightly on the batch it was decoded
in: llama.cpp's kernels tile and accumulate differently for different batch shapes. Reusing any
prefix of the previous request (llama-cpp-python's default) therefore makes the same seeded request
sample differently depending on what ran before it. Here every prompt is evaluated in the same
segments — chunks of CHUNK tokens counted from position 0, the rest of the prompt but its last token,
then the last token alone — and the cache is reused only for the leading segments that the previous
prompt evaluated identically (same tokens, same boundaries). The computation behind a prompt's
logits is then the same whether or not it was cached: a repeated prompt costs one token's decode, a
long shared prefix (a system prompt) is reused chunk by chunk, and a fresh prompt costs one extra
decode call a chunk over one batch."""
from __future__ import annotations

__all__ = ["CHUNK", "PromptCache", "segments"]

CHUNK = 128  # tokens a canonical chunk (at most the context's n_batch)


def segments(n: int, chunk: int) -> list[int]:
    """Where the segments of an n-token prompt end: every whole chunk of its head (all but the last
    token), the rest of the head, then the last token."""
    head = n - 1
    ends = list(range(chunk, head + 1, chunk))
    if head > 0 and (not ends or ends[-1] != head):
        ends.append(head)
    return [*ends, n] if n > 0 else []


class PromptCache:
    def __init__(self, llm) -> None:
        self.llm = llm
        self.chunk = min(CHUNK, llm.n_batch)
        self._ends: list[int] = []  # the segments the cache's leading tokens were evaluated in

    def reset(self) -> None:
        """Forget the cache (another overlay, a scoring pass): the next prompt is evaluated from scratch."""
        self.llm.n_tokens = 0
        self._ends = []

    def prefill(self, prompt: list[int]) -> int:
        """Evaluate `prompt` so that its last token's logits are ready to sample from (llama-cpp-python's
        generate() then samples at once); returns how many of its tokens came from the cache."""
        llm = self.llm
        cached = llm.input_ids[: llm.n_tokens]
        common = 0
        for ours, theirs in zip(prompt, cached):
            if ours != theirs:
                break
            common += 1
        plan = segments(len(prompt), self.chunk)
        keep = 0
        for mine, before in zip(plan[:-1], self._ends):  # the last segment is always decoded: its logits
            if mine != before or mine > common:
                break
            keep = mine
        llm.n_tokens = keep
        start = keep
        for end in plan:
            if end > keep:
                llm.eval(prompt[start:end])  # drops the cache past n_tokens first
                start = end
        self._ends = plan
        return keep
