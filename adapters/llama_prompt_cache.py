"""The llama.cpp prompt cache, reused only where reuse cannot change a result.

A token's logits (and the KV a prompt leaves behind) depend slightly on the batch it was decoded
in: llama.cpp's kernels tile and accumulate differently for different batch shapes. Reusing any
prefix of the previous request (llama-cpp-python's default) therefore makes the same seeded request
sample differently depending on what ran before it. Here every prompt is evaluated in fixed chunks
counted from position 0, and only whole chunks that were evaluated that way are reused: the
computation behind a prompt's logits is then the same whether or not its prefix was cached, with no
extra decode for a prompt that fits one chunk (and a long shared prefix, such as a system prompt
over CHUNK tokens, is still reused)."""
from __future__ import annotations

__all__ = ["CHUNK", "PromptCache"]

CHUNK = 256  # tokens a canonical chunk (at most the context's n_batch)


class PromptCache:
    def __init__(self, llm) -> None:
        self.llm = llm
        self.chunk = min(CHUNK, llm.n_batch)
        self._canonical = 0  # leading cache tokens evaluated in canonical chunks (not generated one by one)

    def reset(self) -> None:
        """Forget the cache (another overlay, a scoring pass): the next prompt is evaluated from scratch."""
        self.llm.n_tokens = 0
        self._canonical = 0

    def prefill(self, prompt: list[int]) -> int:
        """Evaluate `prompt` so that its last token's logits are ready to sample from (llama-cpp-python's
        generate() then samples at once); returns how many of its tokens came from the cache."""
        llm, chunk = self.llm, self.chunk
        cached = llm.input_ids[: min(llm.n_tokens, self._canonical)]
        common = 0
        for ours, theirs in zip(prompt, cached):
            if ours != theirs:
                break
            common += 1
        keep = (common // chunk) * chunk
        if keep >= len(prompt):  # all cached: evaluate its last chunk again, for the last token's logits
            keep = ((len(prompt) - 1) // chunk) * chunk if prompt else 0
        llm.n_tokens = keep
        for start in range(keep, len(prompt), chunk):
            llm.eval(prompt[start:start + chunk])  # drops the cache past n_tokens first
        self._canonical = len(prompt)
        return keep
